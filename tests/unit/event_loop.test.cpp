#include "prefork/event_loop.hpp"

#include <catch2/catch.hpp>

#include "support/descriptors.hpp"
#include "support/loop.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <memory>
#include <stdexcept>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

using namespace std::chrono_literals;
using prefork::Clock;
using prefork::EventLoop;
using prefork::UniqueFd;

using prefork_test::count_open_fds;
using prefork_test::FdLeakCheck;

using prefork_test::run_until;

namespace {


// A non-blocking eventfd: readable while its counter is non-zero.
class EventFd {
 public:
  EventFd() : fd_(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) { REQUIRE(fd_); }
  int fd() const { return fd_.get(); }
  void signal() const {
    std::uint64_t one = 1;
    REQUIRE(::write(fd_.get(), &one, sizeof one) == sizeof one);
  }
  void drain() const {
    std::uint64_t v;
    (void)!::read(fd_.get(), &v, sizeof v);
  }

 private:
  UniqueFd fd_;
};

// Makes `fd` name a fresh, non-ready eventfd (the descriptor number is reused at once, as
// after close() + open() in a busy process).
void replace_with_fresh_eventfd(int fd) {
  UniqueFd fresh(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  REQUIRE(fresh);
  REQUIRE(::dup3(fresh.get(), fd, O_CLOEXEC) == fd);
}

// Runs rounds until one throws; returns its message ("" if none did before the deadline).
std::string run_until_throw(EventLoop& loop, std::chrono::milliseconds limit = 5s) {
  const auto deadline = Clock::now() + limit;
  while (Clock::now() <= deadline) {
    try {
      loop.run_once(10);
    } catch (const std::runtime_error& e) {
      return e.what();
    }
  }
  return "";
}

bool is_blocked(int signo) {
  sigset_t mask;
  ::sigprocmask(SIG_SETMASK, nullptr, &mask);
  return sigismember(&mask, signo) == 1;
}

volatile sig_atomic_t handler_calls = 0;
void count_signal(int) { handler_calls = handler_calls + 1; }

// Gives SIGUSR1 and SIGUSR2 a counting handler for the test (so that a signal the loop did not
// consume cannot kill the test run) and restores the mask and the dispositions afterwards.
// Declare it before the EventLoop, so that the loop is destroyed first.
class SignalGuard {
 public:
  SignalGuard() {
    ::sigprocmask(SIG_SETMASK, nullptr, &mask_);
    struct sigaction sa{};
    sa.sa_handler = count_signal;
    sigemptyset(&sa.sa_mask);
    ::sigaction(SIGUSR1, &sa, &usr1_);
    ::sigaction(SIGUSR2, &sa, &usr2_);
    handler_calls = 0;
  }
  SignalGuard(const SignalGuard&) = delete;
  SignalGuard& operator=(const SignalGuard&) = delete;
  ~SignalGuard() {
    ::sigprocmask(SIG_SETMASK, &mask_, nullptr);  // a pending signal runs count_signal here
    ::sigaction(SIGUSR1, &usr1_, nullptr);
    ::sigaction(SIGUSR2, &usr2_, nullptr);
  }

 private:
  sigset_t mask_;
  struct sigaction usr1_{}, usr2_{};
};

}  // namespace

// ------------------------------------------------------------------------------------------
// Watches
// ------------------------------------------------------------------------------------------

TEST_CASE("The callback of a watched descriptor runs with the ready events", "[event_loop]") {
  const auto fds_before = count_open_fds();
  {
    EventLoop loop;
    EventFd e;
    std::vector<std::uint32_t> seen;
    loop.watch(e.fd(), EventLoop::readable, [&](std::uint32_t ev) {
      seen.push_back(ev);
      e.drain();
    });
    CHECK(loop.watching(e.fd()));

    loop.run_once(0);
    CHECK(seen.empty());

    e.signal();
    loop.run_once(1000);
    REQUIRE(seen.size() == 1);
    CHECK((seen[0] & EPOLLIN) != 0);

    loop.run_once(0);
    CHECK(seen.size() == 1);
  }
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("A watch is level-triggered and reports again until the descriptor is drained",
          "[event_loop]") {
  EventLoop loop;
  EventFd e;
  int calls = 0;
  loop.watch(e.fd(), EventLoop::readable, [&](std::uint32_t) { ++calls; });
  e.signal();
  loop.run_once(1000);
  loop.run_once(1000);
  loop.run_once(1000);
  CHECK(calls == 3);
  e.drain();
  loop.run_once(0);
  CHECK(calls == 3);
}

TEST_CASE("Watching a descriptor that is already watched throws EEXIST", "[event_loop]") {
  EventLoop loop;
  EventFd e;
  loop.watch(e.fd(), EventLoop::readable, [](std::uint32_t) {});
  try {
    loop.watch(e.fd(), EventLoop::readable, [](std::uint32_t) {});
    FAIL("a second watch of the same descriptor succeeded");
  } catch (const std::system_error& err) {
    CHECK(err.code() == std::errc::file_exists);
    CHECK(std::string(err.what()).find("fd " + std::to_string(e.fd())) != std::string::npos);
  }
  CHECK(loop.watching(e.fd()));
}

TEST_CASE("Watching a descriptor epoll cannot watch throws and leaves nothing behind",
          "[event_loop]") {
  EventLoop loop;
  CHECK_THROWS_AS(loop.watch(-1, EventLoop::readable, [](std::uint32_t) {}), std::system_error);

  // A regular file: epoll_ctl fails with EPERM.
  UniqueFd file(::open("/proc/self/exe", O_RDONLY | O_CLOEXEC));
  REQUIRE(file);
  try {
    loop.watch(file.get(), EventLoop::readable, [](std::uint32_t) {});
    FAIL("epoll accepted a regular file");
  } catch (const std::system_error& err) {
    CHECK(err.code() == std::errc::operation_not_permitted);
  }
  CHECK_FALSE(loop.watching(file.get()));
  CHECK_FALSE(loop.alive());
}

TEST_CASE("unwatch stops the callbacks and ignores a descriptor that is not watched",
          "[event_loop]") {
  EventLoop loop;
  EventFd e;
  int calls = 0;
  loop.watch(e.fd(), EventLoop::readable, [&](std::uint32_t) { ++calls; });
  e.signal();
  loop.unwatch(e.fd());
  CHECK_FALSE(loop.watching(e.fd()));
  loop.run_once(0);
  CHECK(calls == 0);

  loop.unwatch(e.fd());
  loop.unwatch(-1);
  loop.unwatch(100000);
  CHECK_FALSE(loop.alive());
}

TEST_CASE("A callback may unwatch its own descriptor and its captures live until the round ends",
          "[event_loop]") {
  EventLoop loop;
  EventFd e;
  // Heap-allocated captures: a callback destroyed by its own unwatch() would read freed
  // memory here, which ASan reports.
  auto owned = std::make_shared<std::string>(std::string(200, 'x'));
  std::string copy_after_unwatch;
  int calls = 0;
  loop.watch(e.fd(), EventLoop::readable,
             [&loop, &copy_after_unwatch, &calls, fd = e.fd(), owned,
              text = std::string(100, 'y')](std::uint32_t) {
               ++calls;
               loop.unwatch(fd);
               copy_after_unwatch = *owned + text;
             });
  owned.reset();
  e.signal();
  loop.run_once(1000);
  CHECK(calls == 1);
  CHECK(copy_after_unwatch == std::string(200, 'x') + std::string(100, 'y'));
  CHECK_FALSE(loop.watching(e.fd()));
  loop.run_once(0);
  CHECK(calls == 1);
}

TEST_CASE("A callback may unwatch and watch its own descriptor again", "[event_loop]") {
  EventLoop loop;
  EventFd e;
  std::vector<std::string> calls;
  loop.watch(e.fd(), EventLoop::readable, [&](std::uint32_t) {
    calls.push_back("first");
    loop.unwatch(e.fd());
    loop.watch(e.fd(), EventLoop::readable, [&](std::uint32_t) {
      calls.push_back("second");
      e.drain();
    });
  });
  e.signal();
  loop.run_once(1000);
  REQUIRE(calls == std::vector<std::string>{"first"});
  loop.run_once(1000);
  CHECK(calls == std::vector<std::string>{"first", "second"});
}

TEST_CASE("A callback may unwatch another descriptor that is ready in the same round",
          "[event_loop]") {
  EventLoop loop;
  EventFd a, b;
  int a_calls = 0, b_calls = 0;
  // Both are ready in the same epoll_wait; whichever runs first unwatches the other, whose
  // event is already in this round's batch and must not be delivered.
  loop.watch(a.fd(), EventLoop::readable, [&](std::uint32_t) {
    ++a_calls;
    loop.unwatch(b.fd());
  });
  loop.watch(b.fd(), EventLoop::readable, [&](std::uint32_t) {
    ++b_calls;
    loop.unwatch(a.fd());
  });
  a.signal();
  b.signal();
  loop.run_once(1000);
  CHECK(a_calls + b_calls == 1);
  CHECK(loop.watching(a.fd()) != loop.watching(b.fd()));
}

TEST_CASE("An event for a descriptor number reused in the same round does not reach the new watch",
          "[event_loop]") {
  EventLoop loop;
  EventFd a, b;
  int old_calls = 0, new_calls = 0;
  bool replaced = false;
  int replaced_fd = -1;
  // Whichever runs first unwatches the other, replaces that descriptor number with a fresh
  // (not ready) eventfd and watches it: the stale event of the old descriptor, still in this
  // round's batch, must not be delivered to the new watch.
  auto make_cb = [&](int other) {
    return [&, other](std::uint32_t) {
      ++old_calls;
      if (replaced) return;
      replaced = true;
      replaced_fd = other;
      loop.unwatch(other);
      replace_with_fresh_eventfd(other);
      loop.watch(other, EventLoop::readable, [&](std::uint32_t) { ++new_calls; });
    };
  };
  loop.watch(a.fd(), EventLoop::readable, make_cb(b.fd()));
  loop.watch(b.fd(), EventLoop::readable, make_cb(a.fd()));
  a.signal();
  b.signal();
  loop.run_once(1000);
  CHECK(old_calls == 1);
  CHECK(new_calls == 0);

  // The new watch works once its own descriptor is ready.
  std::uint64_t one = 1;
  REQUIRE(::write(replaced_fd, &one, sizeof one) == sizeof one);
  loop.run_once(1000);
  CHECK(new_calls == 1);
}

TEST_CASE("A descriptor number reused after unwatch can be watched with a new callback",
          "[event_loop]") {
  EventLoop loop;
  EventFd e;
  std::vector<std::string> calls;
  loop.watch(e.fd(), EventLoop::readable, [&](std::uint32_t) { calls.push_back("old"); });
  e.signal();
  loop.unwatch(e.fd());
  replace_with_fresh_eventfd(e.fd());
  loop.watch(e.fd(), EventLoop::readable, [&](std::uint32_t) {
    calls.push_back("new");
    e.drain();
  });
  loop.run_once(0);
  CHECK(calls.empty());
  e.signal();
  loop.run_once(1000);
  CHECK(calls == std::vector<std::string>{"new"});
}

TEST_CASE("modify changes the events a watch waits for", "[event_loop]") {
  EventLoop loop;
  int sv[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) == 0);
  UniqueFd s(sv[0]), peer(sv[1]);
  std::vector<std::uint32_t> seen;
  loop.watch(s.get(), EventLoop::readable, [&](std::uint32_t ev) { seen.push_back(ev); });

  loop.run_once(0);
  CHECK(seen.empty());  // writable, but only readability was asked for

  CHECK_FALSE(loop.modify(s.get(), EventLoop::readable | EventLoop::writable));
  loop.run_once(1000);
  REQUIRE(seen.size() == 1);
  CHECK((seen[0] & EPOLLOUT) != 0);
  CHECK((seen[0] & EPOLLIN) == 0);

  CHECK_FALSE(loop.modify(s.get(), EventLoop::readable));
  CHECK_FALSE(loop.modify(s.get(), EventLoop::readable));  // unchanged: nothing to do
  loop.run_once(0);
  CHECK(seen.size() == 1);

  CHECK(loop.modify(peer.get(), EventLoop::readable) == std::errc::bad_file_descriptor);
  CHECK(loop.modify(-1, EventLoop::readable) == std::errc::bad_file_descriptor);
}

// ------------------------------------------------------------------------------------------
// Timers
// ------------------------------------------------------------------------------------------

TEST_CASE("after runs its callback once", "[event_loop]") {
  EventLoop loop;
  int calls = 0;
  loop.after(1ms, [&] { ++calls; });
  REQUIRE(run_until(loop, [&] { return calls > 0; }));
  loop.run_once(20);
  loop.run_once(20);
  CHECK(calls == 1);
  CHECK_FALSE(loop.alive());
}

TEST_CASE("after with a zero delay runs on the next round", "[event_loop]") {
  EventLoop loop;
  int calls = 0;
  loop.after(0ms, [&] { ++calls; });
  REQUIRE(run_until(loop, [&] { return calls > 0; }));
  CHECK(calls == 1);
}

TEST_CASE("Timers fire in deadline order whatever the order they were added in",
          "[event_loop]") {
  EventLoop loop;
  std::string order;
  loop.after(30ms, [&] { order += 'd'; });
  loop.after(10ms, [&] { order += 'b'; });
  loop.after(0ms, [&] { order += 'a'; });
  loop.after(20ms, [&] { order += 'c'; });
  REQUIRE(run_until(loop, [&] { return order.size() == 4; }));
  CHECK(order == "abcd");
}

TEST_CASE("Timers that are all due in one round fire in deadline order", "[event_loop]") {
  EventLoop loop;
  std::string order;
  loop.after(3ms, [&] { order += 'c'; });
  loop.after(1ms, [&] { order += 'a'; });
  loop.after(2ms, [&] { order += 'b'; });
  // Wait for the last deadline without running the loop: poll() on the loop's descriptor
  // until the timerfd has expired for the latest one.
  const auto latest = Clock::now() + 3ms;
  while (Clock::now() < latest) {
    pollfd p{loop.native_handle(), POLLIN, 0};
    ::poll(&p, 1, 1);
  }
  loop.run_once(1000);
  REQUIRE(run_until(loop, [&] { return order.size() == 3; }));
  CHECK(order == "abc");
}

TEST_CASE("every keeps ticking until it is cancelled", "[event_loop]") {
  EventLoop loop;
  int ticks = 0;
  auto id = loop.every(1ms, [&] { ++ticks; });
  REQUIRE(run_until(loop, [&] { return ticks >= 5; }));
  CHECK(loop.alive());
  CHECK(loop.cancel(id));
  const int at_cancel = ticks;
  loop.run_once(10);
  loop.run_once(10);
  CHECK(ticks == at_cancel);
  CHECK_FALSE(loop.alive());
  CHECK_FALSE(loop.cancel(id));
}

TEST_CASE("every refuses an interval that is not positive", "[event_loop]") {
  EventLoop loop;
  CHECK_THROWS_AS(loop.every(0ms, [] {}), std::invalid_argument);
  CHECK_THROWS_AS(loop.every(-1ms, [] {}), std::invalid_argument);
  CHECK_FALSE(loop.alive());
}

TEST_CASE("A periodic timer may cancel itself from its own callback", "[event_loop]") {
  EventLoop loop;
  int ticks = 0;
  EventLoop::TimerId id = 0;
  id = loop.every(1ms, [&] {
    if (++ticks == 3) CHECK(loop.cancel(id));
  });
  REQUIRE(run_until(loop, [&] { return ticks >= 3; }));
  // Another timer, well after, proves the cancelled one stayed quiet meanwhile.
  bool later = false;
  loop.after(10ms, [&] { later = true; });
  REQUIRE(run_until(loop, [&] { return later; }));
  CHECK(ticks == 3);
  CHECK_FALSE(loop.alive());
  CHECK_FALSE(loop.cancel(id));
}

TEST_CASE("A one-shot timer may cancel itself from its own callback", "[event_loop]") {
  EventLoop loop;
  int calls = 0;
  EventLoop::TimerId id = 0;
  id = loop.after(0ms, [&] {
    ++calls;
    loop.cancel(id);
  });
  REQUIRE(run_until(loop, [&] { return calls > 0; }));
  loop.run_once(10);
  CHECK(calls == 1);
  CHECK_FALSE(loop.alive());
  CHECK_FALSE(loop.cancel(id));
}

TEST_CASE("A cancelled timer never runs and cancel reports whether it was pending",
          "[event_loop]") {
  EventLoop loop;
  bool cancelled_ran = false, later = false;
  auto id = loop.after(1ms, [&] { cancelled_ran = true; });
  loop.after(5ms, [&] { later = true; });
  CHECK(loop.cancel(id));
  CHECK_FALSE(loop.cancel(id));
  REQUIRE(run_until(loop, [&] { return later; }));
  CHECK_FALSE(cancelled_ran);
  CHECK_FALSE(loop.alive());
}

TEST_CASE("cancel returns false for an id that was never issued", "[event_loop]") {
  EventLoop loop;
  CHECK_FALSE(loop.cancel(12345));
  // A default TimerId (0) is what a caller holds before starting a timer; no timer has it.
  CHECK_FALSE(loop.cancel(EventLoop::TimerId{}));
}

TEST_CASE("A timer callback may cancel another timer that is due in the same round",
          "[event_loop]") {
  EventLoop loop;
  bool first = false, second = false;
  EventLoop::TimerId second_id = 0;
  loop.after(1ms, [&] {
    first = true;
    CHECK(loop.cancel(second_id));
  });
  second_id = loop.after(2ms, [&] { second = true; });
  REQUIRE(run_until(loop, [&] { return first; }));
  bool later = false;
  loop.after(10ms, [&] { later = true; });
  REQUIRE(run_until(loop, [&] { return later; }));
  CHECK_FALSE(second);
  CHECK_FALSE(loop.alive());
}

TEST_CASE("A timer callback may start a new timer", "[event_loop]") {
  EventLoop loop;
  std::string order;
  loop.after(0ms, [&] {
    order += 'a';
    loop.after(0ms, [&] { order += 'b'; });
  });
  REQUIRE(run_until(loop, [&] { return order.size() == 2; }));
  CHECK(order == "ab");
  CHECK_FALSE(loop.alive());
}

// ------------------------------------------------------------------------------------------
// post, alive
// ------------------------------------------------------------------------------------------

TEST_CASE("A posted callback runs on the next round without waiting for events",
          "[event_loop]") {
  EventLoop loop;
  std::string order;
  loop.post([&] { order += 'a'; });
  loop.post([&] { order += 'b'; });
  CHECK(order.empty());
  CHECK(loop.alive());
  // A backstop so that a loop that blocks despite the posted work ends the test anyway.
  loop.after(5s, [] {}, false);
  loop.run_once(-1);
  CHECK(order == "ab");
  CHECK_FALSE(loop.alive());
}

TEST_CASE("A posted callback runs after the callbacks of the round that posted it",
          "[event_loop]") {
  EventLoop loop;
  EventFd a, b;
  std::vector<std::string> order;
  auto cb = [&](const char* name, const EventFd& e) {
    return [&, name](std::uint32_t) {
      order.push_back(name);
      e.drain();
      loop.post([&, name] { order.push_back(std::string("posted by ") + name); });
    };
  };
  loop.watch(a.fd(), EventLoop::readable, cb("a", a));
  loop.watch(b.fd(), EventLoop::readable, cb("b", b));
  a.signal();
  b.signal();
  loop.run_once(1000);
  REQUIRE(order.size() == 4);
  CHECK(order[0].size() == 1);
  CHECK(order[1].size() == 1);
  CHECK(order[2] == "posted by " + order[0]);
  CHECK(order[3] == "posted by " + order[1]);
}

TEST_CASE("A callback posted from a posted callback also runs", "[event_loop]") {
  EventLoop loop;
  std::string order;
  loop.post([&] {
    order += 'a';
    loop.post([&] { order += 'b'; });
  });
  loop.after(5s, [] {}, false);
  loop.run_once(-1);
  if (order.size() < 2) loop.run_once(-1);
  CHECK(order == "ab");
  CHECK_FALSE(loop.alive());
}

TEST_CASE("alive counts the watches and timers that keep the loop alive", "[event_loop]") {
  EventLoop loop;
  CHECK_FALSE(loop.alive());  // the loop's own timerfd does not count

  EventFd e, f;
  SECTION("a watch that keeps alive") {
    loop.watch(e.fd(), EventLoop::readable, [](std::uint32_t) {});
    CHECK(loop.alive());
    loop.watch(f.fd(), EventLoop::readable, [](std::uint32_t) {});
    loop.unwatch(e.fd());
    CHECK(loop.alive());
    loop.unwatch(f.fd());
    CHECK_FALSE(loop.alive());
  }
  SECTION("a watch that does not keep alive") {
    loop.watch(e.fd(), EventLoop::readable, [](std::uint32_t) {}, false);
    CHECK_FALSE(loop.alive());
    loop.unwatch(e.fd());
    CHECK_FALSE(loop.alive());
    // Unwatching a non-keeping watch must not eat another watch's count.
    loop.watch(f.fd(), EventLoop::readable, [](std::uint32_t) {});
    loop.watch(e.fd(), EventLoop::readable, [](std::uint32_t) {}, false);
    loop.unwatch(e.fd());
    CHECK(loop.alive());
  }
  SECTION("a one-shot timer keeps alive until it has run") {
    bool ran = false;
    loop.after(1ms, [&] { ran = true; });
    CHECK(loop.alive());
    REQUIRE(run_until(loop, [&] { return ran; }));
    CHECK_FALSE(loop.alive());
  }
  SECTION("a timer that does not keep alive") {
    bool ran = false;
    auto id = loop.after(1ms, [&] { ran = true; }, false);
    CHECK_FALSE(loop.alive());
    auto tick = loop.every(1ms, [] {}, false);
    CHECK_FALSE(loop.alive());
    REQUIRE(run_until(loop, [&] { return ran; }));
    CHECK_FALSE(loop.alive());
    CHECK_FALSE(loop.cancel(id));
    CHECK(loop.cancel(tick));
    CHECK_FALSE(loop.alive());
  }
  SECTION("a cancelled timer no longer keeps alive") {
    auto id = loop.after(1h, [] {});
    auto tick = loop.every(1h, [] {});
    CHECK(loop.alive());
    CHECK(loop.cancel(id));
    CHECK(loop.alive());
    CHECK(loop.cancel(tick));
    CHECK_FALSE(loop.alive());
  }
  SECTION("a periodic timer keeps alive while it ticks") {
    int ticks = 0;
    EventLoop::TimerId id = 0;
    id = loop.every(1ms, [&] {
      if (++ticks == 3) loop.cancel(id);
    });
    REQUIRE(run_until(loop, [&] {
      if (ticks < 3) CHECK(loop.alive());
      return ticks == 3;
    }));
    CHECK_FALSE(loop.alive());
  }
}

// ------------------------------------------------------------------------------------------
// Signals
// ------------------------------------------------------------------------------------------

TEST_CASE("on_signal delivers a signal raised by the process through the loop",
          "[event_loop]") {
  const auto fds_before = count_open_fds();
  SignalGuard guard;
  REQUIRE_FALSE(is_blocked(SIGUSR1));
  {
    EventLoop loop;
    std::vector<signalfd_siginfo> got;
    loop.on_signal(SIGUSR1, [&](const signalfd_siginfo& info) { got.push_back(info); });
    CHECK(is_blocked(SIGUSR1));
    REQUIRE(::raise(SIGUSR1) == 0);
    REQUIRE(run_until(loop, [&] { return !got.empty(); }));
    CHECK(got.size() == 1);
    CHECK(got[0].ssi_signo == static_cast<std::uint32_t>(SIGUSR1));
    CHECK(got[0].ssi_pid == static_cast<std::uint32_t>(::getpid()));
    CHECK(handler_calls == 0);
  }
  // The destructor unblocked what on_signal blocked.
  CHECK_FALSE(is_blocked(SIGUSR1));
  CHECK(handler_calls == 0);
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("on_signal handles several signals on one loop", "[event_loop]") {
  SignalGuard guard;
  {
    EventLoop loop;
    std::vector<int> got;
    loop.on_signal(SIGUSR1, [&](const signalfd_siginfo& i) { got.push_back(int(i.ssi_signo)); });
    loop.on_signal(SIGUSR2, [&](const signalfd_siginfo& i) { got.push_back(int(i.ssi_signo)); });
    REQUIRE(::kill(::getpid(), SIGUSR2) == 0);
    REQUIRE(run_until(loop, [&] { return got.size() == 1; }));
    REQUIRE(::raise(SIGUSR1) == 0);
    REQUIRE(run_until(loop, [&] { return got.size() == 2; }));
    CHECK(got == std::vector<int>{SIGUSR2, SIGUSR1});
    CHECK(handler_calls == 0);
  }
  CHECK_FALSE(is_blocked(SIGUSR1));
  CHECK_FALSE(is_blocked(SIGUSR2));
}

TEST_CASE("A second on_signal for the same signal replaces the callback", "[event_loop]") {
  SignalGuard guard;
  EventLoop loop;
  int first = 0, second = 0;
  loop.on_signal(SIGUSR1, [&](const signalfd_siginfo&) { ++first; });
  loop.on_signal(SIGUSR1, [&](const signalfd_siginfo&) { ++second; });
  REQUIRE(::raise(SIGUSR1) == 0);
  REQUIRE(run_until(loop, [&] { return second > 0; }));
  CHECK(first == 0);
  CHECK(second == 1);
}

TEST_CASE("A signal callback may replace its own registration", "[event_loop]") {
  SignalGuard guard;
  EventLoop loop;
  std::vector<std::string> calls;
  loop.on_signal(SIGUSR1, [&](const signalfd_siginfo&) {
    calls.push_back("first");
    loop.on_signal(SIGUSR1, [&](const signalfd_siginfo&) { calls.push_back("second"); });
  });
  REQUIRE(::raise(SIGUSR1) == 0);
  REQUIRE(run_until(loop, [&] { return calls.size() == 1; }));
  REQUIRE(::raise(SIGUSR1) == 0);
  REQUIRE(run_until(loop, [&] { return calls.size() == 2; }));
  CHECK(calls == std::vector<std::string>{"first", "second"});
}

TEST_CASE("The EventLoop destructor leaves a signal blocked that was blocked before on_signal",
          "[event_loop]") {
  SignalGuard guard;
  sigset_t usr2;
  sigemptyset(&usr2);
  sigaddset(&usr2, SIGUSR2);
  REQUIRE(::sigprocmask(SIG_BLOCK, &usr2, nullptr) == 0);
  {
    EventLoop loop;
    loop.on_signal(SIGUSR2, [](const signalfd_siginfo&) {});
    loop.on_signal(SIGUSR1, [](const signalfd_siginfo&) {});
  }
  // "Unblocks the signals this loop blocked, so the process's mask is as it was."
  CHECK(is_blocked(SIGUSR2));
  CHECK_FALSE(is_blocked(SIGUSR1));
}

// ------------------------------------------------------------------------------------------
// Exceptions
// ------------------------------------------------------------------------------------------

TEST_CASE("An exception from a watch callback propagates from run_once by default",
          "[event_loop]") {
  EventLoop loop;
  EventFd e;
  bool fail = true;
  int calls = 0;
  loop.watch(e.fd(), EventLoop::readable, [&](std::uint32_t) {
    ++calls;
    if (fail) throw std::runtime_error("boom from a watch");
    e.drain();
  });
  e.signal();
  CHECK_THROWS_WITH(loop.run_once(1000), "boom from a watch");
  // The loop is still usable: the level-triggered watch reports again.
  fail = false;
  loop.run_once(1000);
  CHECK(calls == 2);
  CHECK(loop.watching(e.fd()));
}

TEST_CASE("An exception from a timer or a posted callback propagates from run_once by default",
          "[event_loop]") {
  EventLoop loop;
  SECTION("timer") {
    loop.after(0ms, [] { throw std::runtime_error("boom from a timer"); });
    CHECK(run_until_throw(loop) == "boom from a timer");
  }
  SECTION("posted") {
    loop.post([] { throw std::runtime_error("boom from post"); });
    CHECK_THROWS_WITH(loop.run_once(0), "boom from post");
  }
  SECTION("signal") {
    SignalGuard guard;
    {
      EventLoop sig_loop;
      sig_loop.on_signal(SIGUSR1,
                         [](const signalfd_siginfo&) { throw std::runtime_error("boom from a signal"); });
      REQUIRE(::raise(SIGUSR1) == 0);
      CHECK(run_until_throw(sig_loop) == "boom from a signal");
    }
    CHECK(handler_calls == 0);
  }
}

TEST_CASE("on_exception receives exceptions from callbacks and the round goes on",
          "[event_loop]") {
  EventLoop loop;
  std::vector<std::string> caught;
  loop.on_exception([&](std::exception_ptr e) {
    try {
      std::rethrow_exception(e);
    } catch (const std::exception& ex) {
      caught.push_back(ex.what());
    }
  });
  EventFd a, b;
  int a_calls = 0, b_calls = 0;
  loop.watch(a.fd(), EventLoop::readable, [&](std::uint32_t) {
    ++a_calls;
    a.drain();
    throw std::runtime_error("a");
  });
  loop.watch(b.fd(), EventLoop::readable, [&](std::uint32_t) {
    ++b_calls;
    b.drain();
    throw std::runtime_error("b");
  });
  bool posted_ran = false;
  loop.post([] { throw std::runtime_error("posted"); });
  loop.post([&] { posted_ran = true; });
  a.signal();
  b.signal();
  REQUIRE_NOTHROW(loop.run_once(1000));
  CHECK(a_calls == 1);
  CHECK(b_calls == 1);
  CHECK(posted_ran);
  CHECK(caught.size() == 3);

  bool after_throw = false;
  loop.after(0ms, [] { throw std::runtime_error("timer"); });
  loop.after(1ms, [&] { after_throw = true; });
  REQUIRE(run_until(loop, [&] { return after_throw; }));
  CHECK(caught.size() == 4);
  CHECK(caught.back() == "timer");
  loop.unwatch(a.fd());
  loop.unwatch(b.fd());
  CHECK_FALSE(loop.alive());
}

TEST_CASE("A timer callback that throws does not stall the other timers or keep the loop alive",
          "[event_loop]") {
  EventLoop loop;
  bool second = false;
  auto throwing = loop.after(0ms, [] { throw std::runtime_error("boom"); });
  loop.after(1ms, [&] { second = true; });
  REQUIRE(run_until_throw(loop) == "boom");
  CHECK(run_until(loop, [&] { return second; }, 1s));
  CHECK_FALSE(loop.alive());
  CHECK_FALSE(loop.cancel(throwing));
}

TEST_CASE("A posted callback that throws does not drop the callbacks posted after it",
          "[event_loop]") {
  EventLoop loop;
  bool second = false;
  loop.post([] { throw std::runtime_error("boom"); });
  loop.post([&] { second = true; });
  CHECK_THROWS_WITH(loop.run_once(0), "boom");
  loop.run_once(0);
  CHECK(second);
  CHECK_FALSE(loop.alive());
}

TEST_CASE("A signal callback that throws does not lose the other signals read with it",
          "[event_loop]") {
  SignalGuard guard;
  {
    EventLoop loop;
    std::vector<int> got;
    auto cb = [&](const signalfd_siginfo& i) {
      got.push_back(int(i.ssi_signo));
      if (got.size() == 1) throw std::runtime_error("boom");
    };
    loop.on_signal(SIGUSR1, cb);
    loop.on_signal(SIGUSR2, cb);
    // Both pending before the loop runs: one read() of the signalfd returns both.
    REQUIRE(::raise(SIGUSR1) == 0);
    REQUIRE(::raise(SIGUSR2) == 0);
    REQUIRE(run_until_throw(loop) == "boom");
    CHECK(run_until(loop, [&] { return got.size() == 2; }, 1s));
  }
  CHECK(handler_calls == 0);
}

// ------------------------------------------------------------------------------------------
// Integration with other loops, run/stop
// ------------------------------------------------------------------------------------------

TEST_CASE("native_handle polls readable when a timer is due", "[event_loop]") {
  EventLoop loop;
  pollfd p{loop.native_handle(), POLLIN, 0};
  CHECK(::poll(&p, 1, 0) == 0);

  bool fired = false;
  loop.after(1ms, [&] { fired = true; });
  p.revents = 0;
  REQUIRE(::poll(&p, 1, 5000) == 1);
  CHECK((p.revents & POLLIN) != 0);
  loop.run_once(0);
  CHECK(fired);

  p.revents = 0;
  CHECK(::poll(&p, 1, 0) == 0);
}

TEST_CASE("native_handle polls readable when a watched descriptor is ready", "[event_loop]") {
  EventLoop loop;
  EventFd e;
  int calls = 0;
  loop.watch(e.fd(), EventLoop::readable, [&](std::uint32_t) {
    ++calls;
    e.drain();
  });
  pollfd p{loop.native_handle(), POLLIN, 0};
  CHECK(::poll(&p, 1, 0) == 0);
  e.signal();
  REQUIRE(::poll(&p, 1, 5000) == 1);
  loop.run_once(0);
  CHECK(calls == 1);
  CHECK(::poll(&p, 1, 0) == 0);
}

TEST_CASE("native_handle polls readable when a callback was posted from outside the loop",
          "[event_loop]") {
  EventLoop loop;
  bool ran = false;
  loop.post([&] { ran = true; });
  // Another loop driving this one only calls run_once() when native_handle() is readable.
  pollfd p{loop.native_handle(), POLLIN, 0};
  CHECK(::poll(&p, 1, 2000) == 1);
  loop.run_once(0);
  CHECK(ran);
}

TEST_CASE("run returns after stop is called from a callback", "[event_loop]") {
  EventLoop loop;
  int ticks = 0;
  auto id = loop.every(1ms, [&] {
    if (++ticks == 3) loop.stop();
  });
  loop.run();
  CHECK(ticks == 3);
  CHECK(loop.stopped());

  // Stopped: run() returns at once, without running the timer.
  loop.run();
  CHECK(ticks == 3);

  loop.restart();
  CHECK_FALSE(loop.stopped());
  loop.post([&] { loop.stop(); });
  loop.run();
  CHECK(loop.stopped());
  CHECK(loop.cancel(id));
}

TEST_CASE("stop from a watch callback ends run after the current round", "[event_loop]") {
  EventLoop loop;
  EventFd e;
  int calls = 0;
  loop.watch(e.fd(), EventLoop::readable, [&](std::uint32_t) {
    ++calls;
    loop.stop();
  });
  e.signal();
  loop.run();
  CHECK(calls == 1);
}

TEST_CASE("The descriptors the loop owns are close-on-exec and closed by its destructor",
          "[event_loop]") {
  const auto fds_before = count_open_fds();
  SignalGuard guard;
  {
    EventLoop loop;
    const auto without_signals = loop.own_descriptors();
    CHECK(count_open_fds() == fds_before + without_signals.size());
    CHECK(std::find(without_signals.begin(), without_signals.end(), loop.native_handle()) !=
          without_signals.end());
    loop.on_signal(SIGUSR1, [](const signalfd_siginfo&) {});
    loop.on_signal(SIGUSR2, [](const signalfd_siginfo&) {});  // the same signalfd
    const auto own = loop.own_descriptors();
    CHECK(own.size() == without_signals.size() + 1);
    CHECK(count_open_fds() == fds_before + own.size());
    for (int fd : own) {
      INFO("fd " << fd);
      int flags = ::fcntl(fd, F_GETFD);
      REQUIRE(flags >= 0);
      CHECK((flags & FD_CLOEXEC) != 0);
    }
  }
  CHECK(count_open_fds() == fds_before);
}
