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
  PREFORK_DECL EventLoop();

  EventLoop(const EventLoop&) = delete;
  EventLoop& operator=(const EventLoop&) = delete;

  /// Unblocks the signals this loop blocked, so the process's mask is as it was.
  PREFORK_DECL ~EventLoop();

  /// Calls cb with the ready events (EPOLLIN, EPOLLOUT, EPOLLERR, EPOLLHUP...) whenever fd is
  /// ready. Level-triggered. A watch that keeps_alive counts for alive(); internal plumbing
  /// passes false. Throws std::system_error (e.g. EEXIST when fd is already watched).
  PREFORK_DECL void watch(int fd, std::uint32_t events, IoCallback cb, bool keeps_alive = true);

  /// Changes the events of a watched fd. EPOLLEXCLUSIVE watches cannot be modified (epoll_ctl(2));
  /// unwatch and watch again instead. Returns the error instead of throwing.
  PREFORK_DECL std::error_code modify(int fd, std::uint32_t events) noexcept;

  /// Stops watching fd. Safe from inside any callback, including fd's own: the callback object
  /// lives until the current dispatch round ends. Call it before closing the descriptor.
  PREFORK_DECL void unwatch(int fd) noexcept;

  bool watching(int fd) const noexcept { return const_cast<EventLoop*>(this)->find(fd) != nullptr; }

  /// Runs cb once, d from now.
  TimerId after(Clock::duration d, TimerCallback cb, bool keeps_alive = true) {
    return add_timer(d, Clock::duration::zero(), std::move(cb), keeps_alive);
  }

  /// Runs cb every d, first d from now. Late ticks are not replayed in a burst.
  PREFORK_DECL TimerId every(Clock::duration d, TimerCallback cb, bool keeps_alive = true);

  /// Cancels a timer; safe from inside its own callback. Returns false if it already ran or
  /// was never there.
  PREFORK_DECL bool cancel(TimerId id) noexcept;

  /// Delivers signo through the loop (signalfd) instead of an asynchronous handler. The signal
  /// is blocked in the calling thread. A second registration replaces the callback.
  /// Throws std::system_error if the signalfd cannot be created.
  PREFORK_DECL void on_signal(int signo, SignalCallback cb);

  /// Runs cb on the loop soon (before it next blocks). Counts for alive() until it has run.
  PREFORK_DECL void post(TimerCallback cb);

  /// Waits up to timeout_ms (-1: forever) for one round of events and runs their callbacks.
  /// Use it to drive this loop from another one that polls native_handle().
  PREFORK_DECL void run_once(int timeout_ms = -1);

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
  PREFORK_DECL std::vector<int> own_descriptors() const;

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

  PREFORK_DECL void add_internal(int fd, std::uint64_t tag);

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

  PREFORK_DECL void dispatch(const epoll_event& ev);

  PREFORK_DECL TimerId add_timer(Clock::duration d, Clock::duration period, TimerCallback cb,
                                 bool keeps_alive);

  PREFORK_DECL void arm_timerfd() noexcept;

  PREFORK_DECL void fire_timers();

  PREFORK_DECL void read_signals();

  PREFORK_DECL void run_posted();

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

#if !defined(PREFORK_SEPARATE_COMPILATION)
#include <prefork/impl/event_loop.ipp>
#endif

#endif  // PREFORK_EVENT_LOOP_HPP
