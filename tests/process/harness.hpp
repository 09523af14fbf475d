// Helpers shared by the process tests (tests/process/*.test.cpp): descriptor counts, process
// liveness, waiting on pipes and processes with deadlines, a watchdog for a running master, a
// forked harness child that always ends in _exit, and a Server that does what the master says.
#ifndef PREFORK_TESTS_PROCESS_HARNESS_HPP
#define PREFORK_TESTS_PROCESS_HARNESS_HPP

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <prefork/prefork.hpp>

#include "support/descriptors.hpp"

namespace prefork_test {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

/// How long a test waits for any one event before it calls the run a failure. Generous on
/// purpose: CI runs these under ASan, several test processes at once, on two cores.
inline constexpr std::chrono::seconds kDeadline{10};

using prefork_test::count_open_fds;
using prefork_test::open_fds;

/// What /proc/self/fd/<fd> points at: "socket:[123]", "anon_inode:[pidfd]", "pipe:[7]"...
inline std::string fd_target(int fd) {
  char buf[256];
  std::string path = "/proc/self/fd/" + std::to_string(fd);
  ssize_t n = ::readlink(path.c_str(), buf, sizeof buf - 1);
  return n > 0 ? std::string(buf, static_cast<std::size_t>(n)) : std::string();
}

/// How many pidfds this process holds (a fork-mode worker should hold none).
inline std::size_t count_pidfds() {
  std::size_t n = 0;
  for (int fd : open_fds())
    if (fd_target(fd) == "anon_inode:[pidfd]") ++n;
  return n;
}

/// The state letter of /proc/<pid>/stat ('R', 'S', 'Z'...), or 0 if there is no such process.
inline char process_state(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto close = all.rfind(')');  // the command name may itself contain ") "
  if (close == std::string::npos || close + 2 >= all.size()) return 0;
  return all[close + 2];
}

/// True when pid no longer runs: no such process, or a zombie waiting for its parent to reap it.
inline bool process_gone(pid_t pid) {
  if (::kill(pid, 0) == -1 && errno == ESRCH) return true;
  char s = process_state(pid);
  return s == 0 || s == 'Z' || s == 'X';
}

/// A 64-bit hash of s, a word at a time (FNV-1a's multiply over 8-byte words, so that hashing
/// 64 MiB under ASan stays cheap): enough to tell a corrupted message from the original.
inline std::uint64_t hash_bytes(std::string_view s) noexcept {
  std::uint64_t h = 0xcbf29ce484222325ull ^ s.size();
  std::size_t i = 0;
  for (; i + 8 <= s.size(); i += 8) {
    std::uint64_t w;
    std::memcpy(&w, s.data() + i, 8);
    h = (h ^ w) * 0x100000001b3ull;
    h ^= h >> 29;
  }
  for (; i < s.size(); ++i) h = (h ^ static_cast<unsigned char>(s[i])) * 0x100000001b3ull;
  return h;
}

/// n pseudo-random bytes (xorshift64*), the same for the same seed in every process.
inline std::string random_bytes(std::size_t n, std::uint64_t seed) {
  std::string out(n, '\0');
  std::uint64_t x = seed ? seed : 1;
  for (std::size_t i = 0; i < n; i += 8) {
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    std::uint64_t v = x * 0x2545f4914f6cdd1dull;
    std::memcpy(out.data() + i, &v, std::min<std::size_t>(8, n - i));
  }
  return out;
}

inline int ms_until(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  return left.count() <= 0 ? 0 : static_cast<int>(left.count());
}

/// A pipe, both ends close-on-exec. The ends are plain ints so that a forked child can close
/// the one it does not use; whoever owns an end closes it.
struct Pipe {
  int read = -1;
  int write = -1;
  Pipe() {
    int p[2];
    if (::pipe2(p, O_CLOEXEC) == 0) {
      read = p[0];
      write = p[1];
    }
  }
  Pipe(const Pipe&) = delete;
  Pipe& operator=(const Pipe&) = delete;
  ~Pipe() {
    close_read();
    close_write();
  }
  void close_read() {
    if (read >= 0) ::close(read);
    read = -1;
  }
  void close_write() {
    if (write >= 0) ::close(write);
    write = -1;
  }
};

/// Writes all of s (a line for a LineReader on the other end). Usable in a forked child.
inline bool write_all(int fd, std::string_view s) {
  while (!s.empty()) {
    ssize_t n = ::write(fd, s.data(), s.size());
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    s.remove_prefix(static_cast<std::size_t>(n));
  }
  return true;
}

/// Reads '\n'-terminated lines from a descriptor, waiting in poll() up to a deadline.
class LineReader {
 public:
  explicit LineReader(int fd) : fd_(fd) {}

  /// The next line without its '\n'; nullopt at the deadline or at EOF (see eof()).
  std::optional<std::string> next(Clock::time_point deadline) {
    for (;;) {
      auto nl = buf_.find('\n');
      if (nl != std::string::npos) {
        std::string line = buf_.substr(0, nl);
        buf_.erase(0, nl + 1);
        return line;
      }
      if (eof_) return std::nullopt;
      pollfd p{fd_, POLLIN, 0};
      int r = ::poll(&p, 1, ms_until(deadline));
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) return std::nullopt;
      char chunk[4096];
      ssize_t n = ::read(fd_, chunk, sizeof chunk);
      if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
      if (n <= 0) {
        eof_ = true;
        continue;
      }
      buf_.append(chunk, static_cast<std::size_t>(n));
      all_.append(chunk, static_cast<std::size_t>(n));
    }
  }

  /// The next line that starts with prefix (earlier lines are skipped); nullopt at the deadline.
  std::optional<std::string> next_starting_with(std::string_view prefix,
                                                Clock::time_point deadline) {
    while (auto line = next(deadline))
      if (line->starts_with(prefix)) return line;
    return std::nullopt;
  }

  /// The next line that holds `part` anywhere (earlier lines are skipped); nullopt at the
  /// deadline. For log lines, which start with a time stamp.
  std::optional<std::string> next_containing(std::string_view part, Clock::time_point deadline) {
    while (auto line = next(deadline))
      if (line->find(part) != std::string::npos) return line;
    return std::nullopt;
  }

  bool eof() const noexcept { return eof_; }
  /// Everything read so far, for failure messages.
  const std::string& transcript() const noexcept { return all_; }

 private:
  int fd_;
  std::string buf_, all_;
  bool eof_ = false;
};

inline int pidfd_open(pid_t pid) { return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)); }

/// Waits until the process behind pidfd exits, up to deadline. Works for any process, not only
/// children (pidfd_open(2): the descriptor polls readable when the process terminates).
inline bool wait_pidfd(int pidfd, Clock::time_point deadline) {
  for (;;) {
    pollfd p{pidfd, POLLIN, 0};
    int r = ::poll(&p, 1, ms_until(deadline));
    if (r < 0 && errno == EINTR) continue;
    return r > 0;
  }
}

/// Reaps the child pid, waiting for it up to deadline. Returns its wait status, or nullopt if
/// it is still running at the deadline (it is then left alone: the caller decides).
inline std::optional<int> wait_child(pid_t pid, Clock::time_point deadline) {
  int fd = pidfd_open(pid);
  if (fd >= 0) {
    bool exited = wait_pidfd(fd, deadline);
    ::close(fd);
    if (!exited) return std::nullopt;
  }
  int status = 0;
  pid_t r;
  do {
    r = ::waitpid(pid, &status, fd >= 0 ? 0 : WNOHANG);
  } while (r < 0 && errno == EINTR);
  if (r != pid) return std::nullopt;
  return status;
}

/// Kills and reaps a child that overran its deadline, so that a failing test leaves nothing.
inline void kill_and_reap(pid_t pid) {
  ::kill(pid, SIGKILL);
  int status;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
}

/// Forks a harness child that runs body() and ends in _exit with what body() returns (125 if it
/// throws), never returning into Catch2. The child dies with the test process.
template <class F>
pid_t fork_harness(F&& body) {
  std::fflush(nullptr);
  pid_t parent = ::getpid();
  pid_t pid = ::fork();
  if (pid != 0) return pid;
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (::getppid() != parent) ::_exit(124);
  int rc = 125;
  try {
    rc = body();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "harness child: %s\n", e.what());
  } catch (...) {
  }
  std::fflush(nullptr);
  ::_exit(rc);
}

/// Makes a master give up after `limit`: sets timed_out, shuts down fast (SIGTERM to every
/// worker) and, if that is not enough within 5 s more, SIGKILLs what is left. The test then
/// fails on timed_out instead of hanging until CTest's timeout.
template <class ClusterT>
void arm_watchdog(ClusterT& cluster, bool& timed_out, Clock::duration limit = kDeadline) {
  cluster.after(limit, [&cluster, &timed_out] {
    timed_out = true;
    cluster.shutdown(true);
    cluster.after(5s, [&cluster] {
      for (auto* w : cluster.workers()) w->kill(SIGKILL);
    });
  });
}

/// Number after "prefix" in "prefix<number>..." (e.g. "exit:7" -> 7), or fallback.
inline long number_after(std::string_view text, std::string_view prefix, long fallback = -1) {
  if (!text.starts_with(prefix)) return fallback;
  text.remove_prefix(prefix.size());
  long v = fallback;
  std::from_chars(text.data(), text.data() + text.size(), v);
  return v;
}

/// The whitespace-separated words of line ("exit 3 1 42" -> {"exit", "3", "1", "42"}).
inline std::vector<std::string> words(std::string_view line) {
  std::vector<std::string> v;
  std::istringstream in{std::string(line)};
  std::string w;
  while (in >> w) v.push_back(w);
  return v;
}

/// A Server that does what the master tells it, for tests that steer workers by message:
///   "exit:N"     ctx.exit(N)             "_exit:N"    ::_exit(N), no flushing
///   "disconnect" ctx.disconnect()        "spin"       replies "spinning", then loops for ever
///   "ping"       replies "pong:<id>"     "whoami"     replies "me:<id>:<slot>:<pid>"
///   "fds"        replies "fds:<open descriptors>:<pidfds held>"
///   "hold"       keeps its loop alive for ever (a drain never ends), replies "holding"
///   "ignore sigterm"  ignores SIGTERM, replies "ignoring sigterm"
/// Connections (when the cluster listens) are accepted and closed at once.
struct Puppet {
  explicit Puppet(prefork::WorkerContext<>& ctx) : ctx_(ctx) {}

  void on_connection(prefork::Connection) {}

  void on_message(const std::string& m) {
    if (m.starts_with("exit:")) ctx_.exit(static_cast<int>(number_after(m, "exit:")));
    if (m.starts_with("_exit:")) ::_exit(static_cast<int>(number_after(m, "_exit:")));
    if (m == "disconnect") return ctx_.disconnect();
    if (m == "ping") {
      ctx_.send("pong:" + std::to_string(ctx_.id()));
      return;
    }
    if (m == "whoami") {
      ctx_.send("me:" + std::to_string(ctx_.id()) + ":" + std::to_string(ctx_.slot()) + ":" +
                std::to_string(::getpid()));
      return;
    }
    if (m == "fds") {
      ctx_.send("fds:" + std::to_string(count_open_fds()) + ":" + std::to_string(count_pidfds()));
      return;
    }
    if (m == "hold") {
      ctx_.loop().every(std::chrono::hours(1), [] {});
      ctx_.send("holding");
      return;
    }
    if (m == "ignore sigterm") {
      ::signal(SIGTERM, SIG_IGN);
      ctx_.send("ignoring sigterm");
      return;
    }
    if (m == "spin") {
      ctx_.send("spinning");
      volatile unsigned long n = 0;
      for (;;) n = n + 1;
    }
  }

  prefork::WorkerContext<>& ctx_;
};

}  // namespace prefork_test

#endif  // PREFORK_TESTS_PROCESS_HARNESS_HPP
