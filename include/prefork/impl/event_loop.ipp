// EventLoop's definitions (event_loop.hpp): included at the end of that header when header-only,
// compiled once in impl/src.hpp with PREFORK_SEPARATE_COMPILATION (detail/config.hpp).
#ifndef PREFORK_IMPL_EVENT_LOOP_IPP
#define PREFORK_IMPL_EVENT_LOOP_IPP

#include <prefork/event_loop.hpp>

namespace prefork {

PREFORK_DECL EventLoop::EventLoop() {
  epoll_.reset(::epoll_create1(EPOLL_CLOEXEC));
  if (!epoll_) detail::throw_errno("epoll_create1");
  timer_fd_.reset(::timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC));
  if (!timer_fd_) detail::throw_errno("timerfd_create");
  add_internal(timer_fd_.get(), kTimerTag);
}

PREFORK_DECL EventLoop::~EventLoop() {
  if (!sigisemptyset(&blocked_by_us_)) ::sigprocmask(SIG_UNBLOCK, &blocked_by_us_, nullptr);
}

PREFORK_DECL void EventLoop::watch(int fd, std::uint32_t events, IoCallback cb, bool keeps_alive) {
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

PREFORK_DECL std::error_code EventLoop::modify(int fd, std::uint32_t events) noexcept {
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

PREFORK_DECL void EventLoop::unwatch(int fd) noexcept {
  Watch* w = find(fd);
  if (!w) return;
  ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, fd, nullptr);
  if (w->keeps_alive) {
    --alive_;
    --alive_watches_;
  }
  graveyard_.push_back(std::move(watches_[static_cast<std::size_t>(fd)]));
}

PREFORK_DECL EventLoop::TimerId EventLoop::every(Clock::duration d, TimerCallback cb,
                                                 bool keeps_alive) {
  if (d <= Clock::duration::zero())
    throw std::invalid_argument("prefork: every() needs a positive interval");
  return add_timer(d, d, std::move(cb), keeps_alive);
}

PREFORK_DECL bool EventLoop::cancel(TimerId id) noexcept {
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

PREFORK_DECL void EventLoop::on_signal(int signo, SignalCallback cb) {
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

PREFORK_DECL void EventLoop::post(TimerCallback cb) {
  posted_.push_back(std::move(cb));
  // Make native_handle() readable for a loop driven from outside: a deadline long past
  // expires at once, and fire_timers() re-arms the real one.
  if (posted_.size() == 1) {
    itimerspec now{};
    now.it_value.tv_nsec = 1;
    ::timerfd_settime(timer_fd_.get(), TFD_TIMER_ABSTIME, &now, nullptr);
  }
}

PREFORK_DECL void EventLoop::run_once(int timeout_ms) {
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

PREFORK_DECL std::vector<int> EventLoop::own_descriptors() const {
  std::vector<int> v{epoll_.get(), timer_fd_.get()};
  if (signal_fd_) v.push_back(signal_fd_.get());
  return v;
}

PREFORK_DECL void EventLoop::add_internal(int fd, std::uint64_t tag) {
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = tag;
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) != 0) detail::throw_errno("epoll_ctl ADD");
}

PREFORK_DECL void EventLoop::dispatch(const epoll_event& ev) {
  if (ev.data.u64 == kTimerTag) return fire_timers();
  if (ev.data.u64 == kSignalTag) return read_signals();
  int fd = static_cast<int>(ev.data.u64 & 0xffffffffu);
  Watch* w = find(fd);
  // The watch may have been removed (and the fd number reused) earlier in this round.
  if (!w || w->generation != (ev.data.u64 >> 32)) return;
  std::uint32_t events = ev.events;
  guarded([&] { w->cb(events); });
}

PREFORK_DECL EventLoop::TimerId EventLoop::add_timer(Clock::duration d, Clock::duration period,
                                                     TimerCallback cb, bool keeps_alive) {
  TimerId id = ++next_timer_;
  auto when = Clock::now() + d;
  timers_.emplace(std::pair{when, id}, Timer{std::move(cb), period, keeps_alive});
  timer_index_.emplace(id, when);
  if (keeps_alive) ++alive_;
  arm_timerfd();
  return id;
}

PREFORK_DECL void EventLoop::arm_timerfd() noexcept {
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

PREFORK_DECL void EventLoop::fire_timers() {
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

PREFORK_DECL void EventLoop::read_signals() {
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

PREFORK_DECL void EventLoop::run_posted() {
  while (!posted_.empty()) {
    auto batch = std::move(posted_);
    posted_.clear();
    for (auto& cb : batch) guarded([&] { cb(); });
  }
}

}  // namespace prefork

#endif  // PREFORK_IMPL_EVENT_LOOP_IPP
