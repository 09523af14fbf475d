// The reactor both roles run on: epoll for descriptors, one timerfd for all timers, signalfd for
// signals. It is public so that a Server can register its own descriptors and timers, and its
// epoll descriptor is itself pollable so that another loop (asio, libuv) can drive it.
#ifndef PREFORK_EVENT_LOOP_HPP
#define PREFORK_EVENT_LOOP_HPP

#if !defined(__linux__)
#error "prefork supports Linux only (epoll, signalfd, timerfd, pidfd)"
#endif

#include <signal.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <system_error>
#include <unordered_map>
#include <utility>
#include <vector>

#include <prefork/version.hpp>
#include <prefork/clock.hpp>
#include <prefork/detail/syscall.hpp>
#include <prefork/detail/unique_fd.hpp>

namespace prefork {

/// A single-threaded epoll reactor. Every member runs on the thread that runs the loop; none is
/// safe to call from another thread or from a signal handler.
class EventLoop {
 public:
  using IoCallback = std::function<void(std::uint32_t events)>;
  using TimerCallback = std::function<void()>;
  using SignalCallback = std::function<void(const signalfd_siginfo&)>;
  using TimerId = std::uint64_t;

  static constexpr std::uint32_t readable = EPOLLIN;
  static constexpr std::uint32_t writable = EPOLLOUT;
  /// Wake only one of the processes waiting on a shared descriptor (EPOLLEXCLUSIVE, Linux 4.5):
  /// avoids the thundering herd on a listening socket shared by every worker.
  static constexpr std::uint32_t exclusive = EPOLLEXCLUSIVE;

  /// Throws std::system_error if epoll or timerfd cannot be created (EMFILE, ENOMEM).
  EventLoop() {
    epoll_.reset(::epoll_create1(EPOLL_CLOEXEC));
    if (!epoll_) detail::throw_errno("epoll_create1");
    timer_fd_.reset(::timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC));
    if (!timer_fd_) detail::throw_errno("timerfd_create");
    add_internal(timer_fd_.get(), kTimerTag);
  }

  EventLoop(const EventLoop&) = delete;
  EventLoop& operator=(const EventLoop&) = delete;

  /// Unblocks the signals this loop blocked, so the process's mask is as it was.
  ~EventLoop() {
    if (!sigisemptyset(&blocked_by_us_)) ::sigprocmask(SIG_UNBLOCK, &blocked_by_us_, nullptr);
  }

  /// Calls cb with the ready events (EPOLLIN, EPOLLOUT, EPOLLERR, EPOLLHUP...) whenever fd is
  /// ready. Level-triggered. A watch that keeps_alive counts for alive(); internal plumbing
  /// passes false. Throws std::system_error (e.g. EEXIST when fd is already watched).
  void watch(int fd, std::uint32_t events, IoCallback cb, bool keeps_alive = true) {
    if (fd < 0) throw std::system_error(EBADF, std::system_category(), "prefork: watch");
    if (static_cast<std::size_t>(fd) < watches_.size() && watches_[static_cast<std::size_t>(fd)])
      throw std::system_error(EEXIST, std::system_category(),
                              "prefork: watch fd " + std::to_string(fd));
    auto w = std::make_unique<Watch>(Watch{std::move(cb), ++generation_, events, keeps_alive});
    epoll_event ev{};
    ev.events = events;
    ev.data.u64 = (std::uint64_t{w->generation} << 32) | static_cast<std::uint32_t>(fd);
    if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) != 0)
      detail::throw_errno("epoll_ctl ADD fd " + std::to_string(fd));
    if (static_cast<std::size_t>(fd) >= watches_.size())
      watches_.resize(static_cast<std::size_t>(fd) + 1);
    if (keeps_alive) {
      ++alive_;
      ++alive_watches_;
    }
    watches_[static_cast<std::size_t>(fd)] = std::move(w);
  }

  /// Changes the events of a watched fd. EPOLLEXCLUSIVE watches cannot be modified (epoll_ctl(2));
  /// unwatch and watch again instead. Returns the error instead of throwing.
  std::error_code modify(int fd, std::uint32_t events) noexcept {
    Watch* w = find(fd);
    if (!w) return std::make_error_code(std::errc::bad_file_descriptor);
    if (w->events == events) return {};
    epoll_event ev{};
    ev.events = events;
    ev.data.u64 = (std::uint64_t{w->generation} << 32) | static_cast<std::uint32_t>(fd);
    if (::epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, fd, &ev) != 0) return detail::errno_code();
    w->events = events;
    return {};
  }

  /// Stops watching fd. Safe from inside any callback, including fd's own: the callback object
  /// lives until the current dispatch round ends. Call it before closing the descriptor.
  void unwatch(int fd) noexcept {
    Watch* w = find(fd);
    if (!w) return;
    ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, fd, nullptr);
    if (w->keeps_alive) {
      --alive_;
      --alive_watches_;
    }
    graveyard_.push_back(std::move(watches_[static_cast<std::size_t>(fd)]));
  }

  bool watching(int fd) const noexcept { return const_cast<EventLoop*>(this)->find(fd) != nullptr; }

  /// Runs cb once, d from now.
  TimerId after(Clock::duration d, TimerCallback cb, bool keeps_alive = true) {
    return add_timer(d, Clock::duration::zero(), std::move(cb), keeps_alive);
  }

  /// Runs cb every d, first d from now. Late ticks are not replayed in a burst.
  TimerId every(Clock::duration d, TimerCallback cb, bool keeps_alive = true) {
    if (d <= Clock::duration::zero())
      throw std::invalid_argument("prefork: every() needs a positive interval");
    return add_timer(d, d, std::move(cb), keeps_alive);
  }

  /// Cancels a timer; safe from inside its own callback. Returns false if it already ran or
  /// was never there.
  bool cancel(TimerId id) noexcept {
    if (id != 0 && id == firing_) {
      firing_cancelled_ = true;
      return true;
    }
    auto it = timer_index_.find(id);
    if (it == timer_index_.end()) return false;
    auto t = timers_.find({it->second, id});
    if (t != timers_.end()) {
      if (t->second.keeps_alive) --alive_;
      timers_.erase(t);
    }
    timer_index_.erase(it);
    arm_timerfd();
    return true;
  }

  /// Delivers signo through the loop (signalfd) instead of an asynchronous handler. The signal
  /// is blocked in the calling thread. A second registration replaces the callback.
  /// Throws std::system_error if the signalfd cannot be created.
  void on_signal(int signo, SignalCallback cb) {
    sigset_t one, old;
    sigemptyset(&one);
    sigaddset(&one, signo);
    if (::sigprocmask(SIG_BLOCK, &one, &old) != 0) detail::throw_errno("sigprocmask");
    if (!sigismember(&old, signo)) sigaddset(&blocked_by_us_, signo);
    sigaddset(&signal_mask_, signo);
    int fd = ::signalfd(signal_fd_ ? signal_fd_.get() : -1, &signal_mask_, SFD_NONBLOCK | SFD_CLOEXEC);
    if (fd < 0) detail::throw_errno("signalfd");
    if (!signal_fd_) {
      signal_fd_.reset(fd);
      add_internal(fd, kSignalTag);
    }
    signal_handlers_[signo] = std::move(cb);
  }

  /// Runs cb on the loop soon (before it next blocks). Counts for alive() until it has run.
  void post(TimerCallback cb) {
    posted_.push_back(std::move(cb));
    // Make native_handle() readable for a loop driven from outside: a deadline long past
    // expires at once, and fire_timers() re-arms the real one.
    if (posted_.size() == 1) {
      itimerspec now{};
      now.it_value.tv_nsec = 1;
      ::timerfd_settime(timer_fd_.get(), TFD_TIMER_ABSTIME, &now, nullptr);
    }
  }

  /// Waits up to timeout_ms (-1: forever) for one round of events and runs their callbacks.
  /// Use it to drive this loop from another one that polls native_handle().
  void run_once(int timeout_ms = -1) {
    if (!posted_.empty()) timeout_ms = 0;
    epoll_event events[64];
    // EINTR is not retried: a signal ends the round, so that run() looks at stopped_ again.
    int n = ::epoll_wait(epoll_.get(), events, 64, timeout_ms);
    if (n < 0 && errno != EINTR) detail::throw_errno("epoll_wait");
    for (int i = 0; i < n; ++i) dispatch(events[i]);
    graveyard_.clear();
    run_posted();
    if (pending_exception_) std::rethrow_exception(std::exchange(pending_exception_, nullptr));
  }

  /// Runs rounds until stop(). Returns at once if stop() was called before.
  void run() {
    while (!stopped_) run_once(-1);
  }

  /// Makes run() return after the current round. Re-arms with restart().
  void stop() noexcept { stopped_ = true; }
  void restart() noexcept { stopped_ = false; }
  bool stopped() const noexcept { return stopped_; }

  /// True while a watch, timer or posted callback that keeps the loop alive exists (Node's
  /// "the event loop has something to do", used by a draining worker to know when to exit).
  bool alive() const noexcept { return alive_ > 0 || !posted_.empty(); }
  /// True while a watch that keeps the loop alive exists (a connection, say), whatever the
  /// timers: what a draining worker waits for before it closes its channel (Node's server.close
  /// waits for connections, not for timers).
  bool watches_alive() const noexcept { return alive_watches_ > 0; }

  /// Where exceptions thrown by callbacks go. By default the first one of a round propagates
  /// out of run_once() once the round is over (so timers, posted callbacks and signals of that
  /// round are not lost); a second one in the same round is reported on stderr and dropped.
  void on_exception(std::function<void(std::exception_ptr)> h) { exception_handler_ = std::move(h); }

  /// The epoll descriptor: readable when a round has work. For integration with other loops.
  int native_handle() const noexcept { return epoll_.get(); }

  /// Every descriptor the loop itself owns (epoll, timerfd, signalfd): a forked child that will
  /// not use this loop closes them.
  std::vector<int> own_descriptors() const {
    std::vector<int> v{epoll_.get(), timer_fd_.get()};
    if (signal_fd_) v.push_back(signal_fd_.get());
    return v;
  }

 private:
  struct Watch {
    IoCallback cb;
    std::uint32_t generation;  // tells a reused descriptor number from the old watch
    std::uint32_t events;
    bool keeps_alive;
  };
  struct Timer {
    TimerCallback cb;
    Clock::duration period;
    bool keeps_alive;
  };
  static constexpr std::uint64_t kTimerTag = ~std::uint64_t{0};
  static constexpr std::uint64_t kSignalTag = ~std::uint64_t{0} - 1;

  Watch* find(int fd) noexcept {
    if (fd < 0 || static_cast<std::size_t>(fd) >= watches_.size()) return nullptr;
    return watches_[static_cast<std::size_t>(fd)].get();
  }

  void add_internal(int fd, std::uint64_t tag) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = tag;
    if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) != 0) detail::throw_errno("epoll_ctl ADD");
  }

  template <class F>
  void guarded(F&& f) {
    try {
      f();
    } catch (...) {
      if (exception_handler_) {
        exception_handler_(std::current_exception());
      } else if (!pending_exception_) {
        pending_exception_ = std::current_exception();
      } else {
        static constexpr char msg[] =
            "prefork: a second exception in one event loop round was dropped\n";
        detail::write_all(2, msg, sizeof msg - 1);
      }
    }
  }

  void dispatch(const epoll_event& ev) {
    if (ev.data.u64 == kTimerTag) return fire_timers();
    if (ev.data.u64 == kSignalTag) return read_signals();
    int fd = static_cast<int>(ev.data.u64 & 0xffffffffu);
    Watch* w = find(fd);
    // The watch may have been removed (and the fd number reused) earlier in this round.
    if (!w || w->generation != (ev.data.u64 >> 32)) return;
    std::uint32_t events = ev.events;
    guarded([&] { w->cb(events); });
  }

  TimerId add_timer(Clock::duration d, Clock::duration period, TimerCallback cb, bool keeps_alive) {
    TimerId id = ++next_timer_;
    auto when = Clock::now() + d;
    timers_.emplace(std::pair{when, id}, Timer{std::move(cb), period, keeps_alive});
    timer_index_.emplace(id, when);
    if (keeps_alive) ++alive_;
    arm_timerfd();
    return id;
  }

  void arm_timerfd() noexcept {
    itimerspec spec{};
    if (!timers_.empty()) {
      auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                    timers_.begin()->first.first.time_since_epoch())
                    .count();
      if (ns <= 0) ns = 1;  // 0 would disarm the timer
      spec.it_value.tv_sec = static_cast<time_t>(ns / 1000000000);
      spec.it_value.tv_nsec = static_cast<long>(ns % 1000000000);
    }
    // steady_clock is CLOCK_MONOTONIC on Linux, so its epoch is the timerfd's.
    ::timerfd_settime(timer_fd_.get(), TFD_TIMER_ABSTIME, &spec, nullptr);
  }

  void fire_timers() {
    std::uint64_t expirations;
    (void)detail::retry_eintr(
        [&] { return ::read(timer_fd_.get(), &expirations, sizeof expirations); });
    auto now = Clock::now();
    while (!timers_.empty() && timers_.begin()->first.first <= now) {
      auto node = timers_.extract(timers_.begin());
      TimerId id = node.key().second;
      Timer& t = node.mapped();
      firing_ = id;
      firing_cancelled_ = false;
      guarded([&] { t.cb(); });
      firing_ = 0;
      if (t.period > Clock::duration::zero() && !firing_cancelled_) {
        auto next = node.key().first + t.period;
        if (next <= now) next = now + t.period;
        node.key() = {next, id};
        timer_index_[id] = next;
        timers_.insert(std::move(node));
      } else {
        timer_index_.erase(id);
        if (t.keeps_alive) --alive_;
      }
    }
    arm_timerfd();
  }

  void read_signals() {
    signalfd_siginfo info[8];
    for (;;) {
      ssize_t n = detail::retry_eintr([&] { return ::read(signal_fd_.get(), info, sizeof info); });
      if (n <= 0) return;
      for (std::size_t i = 0; i < static_cast<std::size_t>(n) / sizeof info[0]; ++i) {
        auto it = signal_handlers_.find(static_cast<int>(info[i].ssi_signo));
        if (it == signal_handlers_.end()) continue;
        auto cb = it->second;  // the handler may replace itself
        guarded([&] { cb(info[i]); });
      }
    }
  }

  void run_posted() {
    while (!posted_.empty()) {
      auto batch = std::move(posted_);
      posted_.clear();
      for (auto& cb : batch) guarded([&] { cb(); });
    }
  }

  UniqueFd epoll_;
  UniqueFd timer_fd_;
  UniqueFd signal_fd_;
  static sigset_t empty_set() noexcept {
    sigset_t s;
    sigemptyset(&s);
    return s;
  }
  sigset_t signal_mask_ = empty_set();    // what the signalfd listens for
  sigset_t blocked_by_us_ = empty_set();  // what on_signal blocked (the destructor unblocks it)
  std::vector<std::unique_ptr<Watch>> watches_;  // indexed by descriptor
  std::vector<std::unique_ptr<Watch>> graveyard_;
  std::map<std::pair<Clock::time_point, TimerId>, Timer> timers_;
  std::unordered_map<TimerId, Clock::time_point> timer_index_;
  std::unordered_map<int, SignalCallback> signal_handlers_;
  std::vector<TimerCallback> posted_;
  std::function<void(std::exception_ptr)> exception_handler_;
  std::exception_ptr pending_exception_;
  std::uint32_t generation_ = 0;
  TimerId next_timer_ = 0;
  TimerId firing_ = 0;
  bool firing_cancelled_ = false;
  std::size_t alive_ = 0;
  std::size_t alive_watches_ = 0;  // the watches among alive_
  bool stopped_ = false;
};

}  // namespace prefork

#endif  // PREFORK_EVENT_LOOP_HPP
