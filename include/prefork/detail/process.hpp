// Process plumbing, the one place that knows pidfd, PR_SET_PDEATHSIG and the fork discipline
// (libuv's src/unix/process.c): block signals around fork(), reset the child's signal state,
// reap and signal only our own children through pidfds so a recycled pid is never touched.
#ifndef PREFORK_DETAIL_PROCESS_HPP
#define PREFORK_DETAIL_PROCESS_HPP

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <system_error>

#include <prefork/detail/syscall.hpp>
#include <prefork/detail/unique_fd.hpp>

#ifndef P_PIDFD
#define P_PIDFD 3
#endif

namespace prefork::detail {

/// pidfd_open(2) (Linux 5.3). Returns -1 with errno set on failure.
inline int pidfd_open(pid_t pid) noexcept {
  return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
}

/// Sends sig through a pidfd: the target is the process the pidfd was opened for, even if its
/// pid number has since been reused. ESRCH once it has exited.
inline int pidfd_send_signal(int pidfd, int sig) noexcept {
  return static_cast<int>(::syscall(SYS_pidfd_send_signal, pidfd, sig, nullptr, 0));
}

/// Result of reaping one child.
struct Reaped {
  bool done = false;  ///< false: still running (or already reaped)
  int exit_code = -1;
  int signal = 0;
};

/// Reaps the child behind pidfd if it has exited (waitid P_PIDFD, WNOHANG).
inline Reaped reap(int pidfd) noexcept {
  siginfo_t info{};
  int r = retry_eintr([&] {
    return ::waitid(static_cast<idtype_t>(P_PIDFD), static_cast<id_t>(pidfd), &info,
                    WEXITED | WNOHANG);
  });
  Reaped out;
  if (r != 0 || info.si_pid == 0) return out;
  out.done = true;
  if (info.si_code == CLD_EXITED) {
    out.exit_code = info.si_status;
  } else {
    out.signal = info.si_status;
  }
  return out;
}

/// Blocks every signal for the lifetime of the object, restoring the old mask after. Used
/// around fork() so that no handler runs in the child before it has reset its signal state.
class SignalBlock {
 public:
  SignalBlock() noexcept {
    sigset_t all;
    sigfillset(&all);
    ::sigprocmask(SIG_SETMASK, &all, &old_);
  }
  SignalBlock(const SignalBlock&) = delete;
  SignalBlock& operator=(const SignalBlock&) = delete;
  ~SignalBlock() { ::sigprocmask(SIG_SETMASK, &old_, nullptr); }

 private:
  sigset_t old_;
};

/// In a freshly forked child: every handler back to default and an empty mask, so the worker
/// starts with the signal state of a new process (a master's blocked SIGTERM must not make its
/// workers unkillable; a handler the application installed in main() for the master must not
/// run in a worker). An ignored signal stays ignored, as execve(2) keeps it and as a shell's
/// child inherits it: `signal(SIGPIPE, SIG_IGN)` in main() is the application's choice for
/// every process of the cluster, and a worker that lost it would die of its first write to a
/// client that went away. Except SIGTERM and SIGINT, which the master uses to stop and drain a
/// worker: they always start at their default.
inline void reset_signals_in_child() noexcept {
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  for (int s = 1; s < NSIG; ++s) {
    if (s == SIGKILL || s == SIGSTOP) continue;
    struct sigaction now {};
    // EINVAL for the glibc-reserved real-time signals is fine.
    if (::sigaction(s, nullptr, &now) != 0) continue;
    if (now.sa_handler == SIG_IGN && !(now.sa_flags & SA_SIGINFO) && s != SIGTERM && s != SIGINT)
      continue;
    ::sigaction(s, &dfl, nullptr);
  }
  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);
}

/// In a child: die with SIGKILL when the parent dies, even if stuck in a CPU loop; and if the
/// parent is already gone (the race between fork and prctl), exit at once.
inline void die_with_parent(pid_t parent) noexcept {
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (::getppid() != parent) ::_exit(1);
}

/// Clears FD_CLOEXEC so that fd survives execve. Returns false on failure.
inline bool keep_across_exec(int fd) noexcept {
  int flags = ::fcntl(fd, F_GETFD);
  return flags >= 0 && ::fcntl(fd, F_SETFD, flags & ~FD_CLOEXEC) == 0;
}

/// The resident set size of pid in bytes, from /proc/<pid>/statm; 0 if it cannot be read.
inline std::size_t resident_bytes(pid_t pid) noexcept {
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%d/statm", static_cast<int>(pid));
  int fd = retry_eintr([&] { return ::open(path, O_RDONLY | O_CLOEXEC); });
  if (fd < 0) return 0;
  char buf[128];
  ssize_t n = retry_eintr([&] { return ::read(fd, buf, sizeof buf - 1); });
  ::close(fd);
  if (n <= 0) return 0;
  buf[n] = '\0';
  unsigned long long size = 0, resident = 0;
  if (std::sscanf(buf, "%llu %llu", &size, &resident) != 2) return 0;
  long page = ::sysconf(_SC_PAGESIZE);
  return static_cast<std::size_t>(resident) * static_cast<std::size_t>(page > 0 ? page : 4096);
}

/// Writes "prefork: <msg>\n" to stderr with one write(2): usable after fork.
inline void child_error(const char* msg) noexcept {
  char buf[512];
  int n = std::snprintf(buf, sizeof buf, "prefork: %s\n", msg);
  if (n > 0) write_all(2, buf, static_cast<std::size_t>(n < 512 ? n : 511));
}

}  // namespace prefork::detail

#endif  // PREFORK_DETAIL_PROCESS_HPP
