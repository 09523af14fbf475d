// The syscall layer: EINTR retried in one place, errors reported as std::error_code. Nothing in
// this header throws or allocates except throw_errno, which the public set-up paths use.
#ifndef PREFORK_DETAIL_SYSCALL_HPP
#define PREFORK_DETAIL_SYSCALL_HPP

#include <signal.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <string>
#include <system_error>

namespace prefork::detail {

/// Calls f() again while it fails with EINTR, without sleeping. Never use it for close().
template <class F>
auto retry_eintr(F f) noexcept(noexcept(f())) {
  decltype(f()) r;
  do {
    r = f();
  } while (r == -1 && errno == EINTR);
  return r;
}

inline std::error_code errno_code() noexcept { return {errno, std::system_category()}; }

/// Throws std::system_error for errno with "prefork: <what>" as its message prefix.
[[noreturn]] inline void throw_errno(const std::string& what) {
  throw std::system_error(errno, std::system_category(), "prefork: " + what);
}

/// A set-up failure stated in a whole sentence: what() is the sentence alone, without the
/// ": <strerror>" that std::system_error appends, where that text would contradict it ("held by
/// a running master: Resource temporarily unavailable"); code() still carries the cause.
class StatedError : public std::system_error {
 public:
  StatedError(std::error_code ec, const std::string& sentence)
      : std::system_error(ec, sentence), sentence_(sentence) {}
  const char* what() const noexcept override { return sentence_.c_str(); }

 private:
  std::string sentence_;
};

/// write(2) that never raises SIGPIPE, whatever the process's disposition: the library must
/// not change it (it is the application's), so SIGPIPE is blocked in the calling thread around
/// the write, and one the write raised is taken back with sigtimedwait before the old mask
/// returns. Unless it was already pending: then it is not ours to take (signal(7): a pending
/// standard signal is not queued twice, so ours merged into it). Returns what write returned;
/// EPIPE when the reader is gone.
inline ssize_t write_no_sigpipe(int fd, const void* p, std::size_t n) noexcept {
  sigset_t pipe_only, pending, old;
  sigemptyset(&pipe_only);
  sigaddset(&pipe_only, SIGPIPE);
  sigemptyset(&pending);
  ::sigpending(&pending);
  const bool was_pending = sigismember(&pending, SIGPIPE) == 1;
  ::pthread_sigmask(SIG_BLOCK, &pipe_only, &old);
  ssize_t w = retry_eintr([&] { return ::write(fd, p, n); });
  if (w < 0 && errno == EPIPE && !was_pending) {
    const int saved = errno;
    const timespec none{};
    (void)retry_eintr([&] { return ::sigtimedwait(&pipe_only, nullptr, &none); });
    errno = saved;
  }
  ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
  return w;
}

/// Writes a whole buffer to a (blocking) descriptor, never raising SIGPIPE; for log lines and
/// last-resort diagnostics (usable after fork). False if it could not all be written (EPIPE:
/// nobody reads it any more).
inline bool write_all(int fd, const char* p, std::size_t n) noexcept {
  while (n > 0) {
    ssize_t w = write_no_sigpipe(fd, p, n);
    if (w <= 0) return false;
    p += w;
    n -= static_cast<std::size_t>(w);
  }
  return true;
}

}  // namespace prefork::detail

#endif  // PREFORK_DETAIL_SYSCALL_HPP
