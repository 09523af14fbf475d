// log.hpp: the default line's format, the default sink that drops rather than blocks when
// stderr is full (and says so later), and a sink that throws losing only its record.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <optional>
#include <stdexcept>
#include <string>

#include <prefork/log.hpp>

#include "process/harness.hpp"
#include "support/descriptors.hpp"

using prefork::LogLevel;
using prefork::LogRecord;

namespace {

LogRecord record_at(std::int64_t epoch_ms) {
  LogRecord r;
  r.time = std::chrono::system_clock::time_point(std::chrono::milliseconds(epoch_ms));
  r.role = "master";
  r.pid = 4120;
  r.event = "exit";
  r.message = "pid 4125 exited with code 1 after 532 ms";
  return r;
}

}  // namespace

TEST_CASE("A log line holds the UTC time with milliseconds, role, pid, worker, event, message",
          "[log]") {
  LogRecord r = record_at(1796272256123);  // 2026-12-03T04:30:56.123Z
  r.worker = 3;
  CHECK(prefork::format_log_line(r) ==
        "2026-12-03T04:30:56.123Z master 4120 worker 3 exit: pid 4125 exited with code 1 after "
        "532 ms");
  r.worker = 0;
  r.level = LogLevel::warning;
  r.event = "accept";
  r.message = "too many open files";
  CHECK(prefork::format_log_line(r) ==
        "2026-12-03T04:30:56.123Z master 4120 accept (warning): too many open files");
  r = record_at(5);  // leading zeros everywhere
  r.role = "worker";
  r.level = LogLevel::error;
  CHECK(prefork::format_log_line(r).starts_with(
      "1970-01-01T00:00:00.005Z worker 4120 exit (error): "));
}

TEST_CASE("The default sink drops lines while stderr is full and reports how many, never blocking",
          "[log]") {
  prefork_test::FdLeakCheck fds;
  // In a child: its stderr becomes a pipe that nobody reads until the test says so. A sink
  // that blocked would hang the child, and the parent's deadline would fail the test.
  int p[2];
  REQUIRE(::pipe2(p, O_CLOEXEC) == 0);
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::dup2(p[1], 2);
    int flags = ::fcntl(p[1], F_GETFL);
    ::fcntl(p[1], F_SETFL, flags | O_NONBLOCK);
    static char filler[4096] = {};
    while (::write(p[1], filler, sizeof filler) > 0 || errno == EINTR) {
    }
    LogRecord r = record_at(0);
    for (int i = 0; i < 3; ++i) prefork::detail::write_log_line(r);  // must return at once
    if (prefork::detail::dropped_log_lines() != 3) ::_exit(10);
    // Empty the pipe, then the next line goes out after a note of the three lost ones.
    ::fcntl(p[0], F_SETFL, ::fcntl(p[0], F_GETFL) | O_NONBLOCK);
    char buf[65536];
    while (::read(p[0], buf, sizeof buf) > 0) {
    }
    prefork::detail::write_log_line(r);
    if (prefork::detail::dropped_log_lines() != 0) ::_exit(11);
    ssize_t n = ::read(p[0], buf, sizeof buf - 1);
    if (n <= 0) ::_exit(12);
    buf[n] = '\0';
    std::string got(buf);
    if (!got.starts_with("(3 log lines dropped: stderr was full)\n")) ::_exit(13);
    if (got.find(" master 4120 exit: pid 4125") == std::string::npos) ::_exit(14);
    ::_exit(0);
  }
  ::close(p[0]);
  ::close(p[1]);
  std::optional<int> status =
      prefork_test::wait_child(pid, prefork_test::Clock::now() + prefork_test::kDeadline);
  if (!status) {
    prefork_test::kill_and_reap(pid);
    FAIL("the default sink blocked on a full stderr");
  }
  REQUIRE(WIFEXITED(*status));
  CHECK(WEXITSTATUS(*status) == 0);
}

TEST_CASE("The default sink never raises SIGPIPE when stderr's reader is gone, and counts the "
          "lines",
          "[log]") {
  prefork_test::FdLeakCheck fds;
  // `prog 2>&1 | head -1`: stderr is a pipe whose reader has exited, or a socket (a journal
  // stream) whose peer has. In a child with SIGPIPE at its default, which would kill it.
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::signal(SIGPIPE, SIG_DFL);
    LogRecord r = record_at(0);
    int p[2];
    if (::pipe2(p, O_CLOEXEC) != 0) ::_exit(20);
    ::dup2(p[1], 2);
    ::close(p[0]);
    ::close(p[1]);
    for (int i = 0; i < 3; ++i) prefork::detail::write_log_line(r);
    if (prefork::detail::dropped_log_lines() != 3) ::_exit(10);
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) ::_exit(21);
    ::dup2(sv[0], 2);
    ::close(sv[0]);
    ::close(sv[1]);
    prefork::detail::write_log_line(r);
    if (prefork::detail::dropped_log_lines() != 4) ::_exit(11);
    sigset_t now;
    ::sigpending(&now);
    if (sigismember(&now, SIGPIPE)) ::_exit(12);  // none left behind for later
    ::sigprocmask(SIG_SETMASK, nullptr, &now);
    if (sigismember(&now, SIGPIPE)) ::_exit(13);  // the mask is as it was
    // A SIGPIPE the application itself has pending (blocked) is not the sink's to take.
    sigset_t pipe_only;
    sigemptyset(&pipe_only);
    sigaddset(&pipe_only, SIGPIPE);
    ::sigprocmask(SIG_BLOCK, &pipe_only, nullptr);
    ::raise(SIGPIPE);
    prefork::detail::write_log_line(r);
    ::sigpending(&now);
    if (!sigismember(&now, SIGPIPE)) ::_exit(14);
    ::signal(SIGPIPE, SIG_IGN);  // discards the pending one, so that _exit reports 0
    ::_exit(0);
  }
  std::optional<int> status =
      prefork_test::wait_child(pid, prefork_test::Clock::now() + prefork_test::kDeadline);
  if (!status) {
    prefork_test::kill_and_reap(pid);
    FAIL("the default sink blocked on a closed stderr");
  }
  INFO("wait status " << *status << (WIFSIGNALED(*status) ? " (killed by a signal)" : ""));
  REQUIRE(WIFEXITED(*status));
  CHECK(WEXITSTATUS(*status) == 0);
}

TEST_CASE("A sink that throws loses its record, not the process", "[log]") {
  int calls = 0;
  prefork::LogSink sink = [&](const LogRecord& r) {
    ++calls;
    CHECK(r.role == "worker");
    CHECK(r.worker == 7);
    CHECK(r.pid == ::getpid());
    CHECK(r.event == "worker");
    CHECK(r.message == "hello");
    throw std::runtime_error("sink failed");
  };
  CHECK_NOTHROW(prefork::detail::emit_log(sink, LogLevel::info, "worker", 7, ::getpid(), "worker",
                                          "hello"));
  CHECK(calls == 1);
}
