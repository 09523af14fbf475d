// The one fork/exec sequence of the master (libuv's src/unix/process.c discipline): a worker
// and a new master started by an upgrade both start through it, each with its own options.
// Everything the child needs is prepared before fork(); after it, the exec path only calls
// async-signal-safe functions.
#ifndef PREFORK_DETAIL_SPAWN_HPP
#define PREFORK_DETAIL_SPAWN_HPP

#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <functional>
#include <vector>

#include <prefork/detail/privileges.hpp>
#include <prefork/detail/process.hpp>

namespace prefork::detail {

/// What the child does between fork() and execve() (or its function, in fork mode), in this
/// order: die with `parent`, its own process group, default signal state, close `close`,
/// switch to `credentials`, keep `keep` across exec, then exec `path` or run `run`. Every
/// pointer must stay valid until spawn_child() returns; none is copied.
struct ChildSetup {
  const char* label = "child";  ///< names the child in its error lines ("worker: execve ...")
  pid_t die_with_parent = 0;    ///< PR_SET_PDEATHSIG, and exit if this parent is gone; 0: no
  bool own_process_group = false;
  const std::vector<int>* close = nullptr;   ///< descriptors the child must not keep
  const Credentials* credentials = nullptr;  ///< switched to before any code of the caller runs
  const std::vector<int>* keep = nullptr;    ///< made to survive execve (FD_CLOEXEC cleared)
  const char* keep_error = nullptr;  ///< reported if `keep` fails; nullptr: exit 127 silently
  const char* path = nullptr;        ///< exec: the program; nullptr: fork mode, call `run`
  char* const* argv = nullptr;       ///< exec: null-terminated
  char* const* envp = nullptr;       ///< exec: null-terminated
  const std::function<int()>* run = nullptr;  ///< fork mode: its result is the exit status
};

/// In the child: runs `s` and never returns. Exit status 1 if the credentials cannot be
/// switched, 127 if a kept descriptor or execve fails (reported on stderr with child_error).
[[noreturn]] inline void run_child(const ChildSetup& s) noexcept {
  if (s.die_with_parent) die_with_parent(s.die_with_parent);
  // Its own process group, so that whatever it starts can be stopped with it (the supervisor
  // kills the group when it reaps the worker).
  if (s.own_process_group) ::setpgid(0, 0);
  reset_signals_in_child();
  if (s.close)
    for (int fd : *s.close) ::close(fd);
  // Options::user: dropped here, before the exec in exec mode, so that no worker code ever
  // runs with the master's privileges (nor does the exec'd binary's start-up).
  if (s.credentials && s.credentials->any()) {
    char why[512];
    if (!drop_privileges(*s.credentials, why, sizeof why)) {
      child_error(why);
      ::_exit(1);
    }
    // prctl(2): the parent-death signal is cleared when the effective ids change. Re-armed,
    // and the parent checked again: it may have died before the re-arm.
    if (s.die_with_parent) die_with_parent(s.die_with_parent);
  }
  if (!s.path) {
    int code = (*s.run)();
    std::fflush(nullptr);
    ::_exit(code);
  }
  if (s.keep)
    for (int fd : *s.keep)
      if (!keep_across_exec(fd)) {
        if (s.keep_error) child_error(s.keep_error);
        ::_exit(127);
      }
  ::execve(s.path, s.argv, s.envp);
  char msg[256];
  std::snprintf(msg, sizeof msg, "%s: execve %s failed: %s", s.label, s.path,
                std::strerror(errno));
  child_error(msg);
  ::_exit(127);
}

/// Forks a child that runs `s` (run_child). Returns its pid, or -1 with errno set if fork()
/// failed. Signals are blocked around fork() so that no handler runs in the child before it
/// has reset its signal state, and stdio is flushed first, or the child would write the
/// parent's buffered output again. Parent process; the caller reaps the child.
inline pid_t spawn_child(const ChildSetup& s) noexcept {
  SignalBlock block;
  std::fflush(nullptr);
  pid_t pid = ::fork();
  if (pid == 0) run_child(s);
  return pid;
}

}  // namespace prefork::detail

#endif  // PREFORK_DETAIL_SPAWN_HPP
