// The syscall layer: EINTR retried in one place, errors reported as std::error_code. Nothing in
// this header throws or allocates except throw_errno, which the public set-up paths use.
#ifndef PREFORK_DETAIL_SYSCALL_HPP
#define PREFORK_DETAIL_SYSCALL_HPP

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

/// Writes a whole buffer to a (blocking) descriptor; for last-resort diagnostics after fork.
inline void write_all(int fd, const char* p, std::size_t n) noexcept {
  while (n > 0) {
    ssize_t w = retry_eintr([&] { return ::write(fd, p, n); });
    if (w <= 0) return;
    p += w;
    n -= static_cast<std::size_t>(w);
  }
}

}  // namespace prefork::detail

#endif  // PREFORK_DETAIL_SYSCALL_HPP
