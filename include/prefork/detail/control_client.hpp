// The control socket's blocking client, which any prefork binary runs as `<program> ctl ...`
// (prefork/control.hpp): connect, send one request line, read the reply line, all within a
// deadline. It needs neither the master's loop nor the server (detail/control_server.hpp).
#ifndef PREFORK_DETAIL_CONTROL_CLIENT_HPP
#define PREFORK_DETAIL_CONTROL_CLIENT_HPP

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>

#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <string>
#include <string_view>
#include <system_error>

#include <prefork/detail/syscall.hpp>
#include <prefork/detail/unique_fd.hpp>

namespace prefork::detail {

/// The longest reply line control_call() accepts: the server's output bound (kControlMaxOutput
/// in detail/control_server.hpp; unit.control checks that the two agree).
inline constexpr std::size_t kControlMaxReply = std::size_t{4} << 20;

namespace control {

// prefork::Clock, named here without options.hpp, which the client has no other use for.
using Clock = std::chrono::steady_clock;

// Waits until fd is ready for `events` or the deadline passes; false with ec set otherwise.
inline bool wait_ready(int fd, short events, Clock::time_point deadline, std::error_code& ec) {
  for (;;) {
    auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) {
      ec = std::make_error_code(std::errc::timed_out);
      return false;
    }
    pollfd p{fd, events, 0};
    // EINTR is handled below, not retried as is: the loop waits again for what is left.
    int r = ::poll(&p, 1, left > 1000000 ? 1000000 : static_cast<int>(left));
    if (r > 0) return true;
    if (r < 0 && errno != EINTR) {
      ec = errno_code();
      return false;
    }
  }
}

}  // namespace control

/// Connects to the control socket `path`, sends `request_line` (one JSON object; the newline
/// is added) and returns the first reply line (without its newline), all within `timeout`. With
/// `wait_for_close` > 0 it then waits that long for the master to close the connection (after
/// `stop`): the reply is returned even when that wait fails. Errors, set in `ec`: connect's
/// errno (no_such_file_or_directory: no master; connection_refused: a stale socket; EACCES),
/// timed_out, message_size (a reply line over kControlMaxReply bytes), bad_message (the
/// connection ended before a whole reply line), the errno of send or recv. Blocking; any process.
inline std::string control_call(const std::string& path, std::string_view request_line,
                                std::chrono::milliseconds timeout, std::error_code& ec,
                                std::chrono::milliseconds wait_for_close = {}) {
  ec.clear();
  const auto deadline = control::Clock::now() + timeout;
  sockaddr_un un{};
  if (path.empty() || path.size() >= sizeof un.sun_path) {
    ec = std::make_error_code(path.empty() ? std::errc::invalid_argument
                                           : std::errc::filename_too_long);
    return {};
  }
  un.sun_family = AF_UNIX;
  std::memcpy(un.sun_path, path.data(), path.size());
  const auto len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size() + 1);
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) {
    ec = errno_code();
    return {};
  }
  // A blocking Unix connect waits only while the listener's backlog is full, at most
  // SO_SNDTIMEO (unix_stream_connect), and then fails with EAGAIN.
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(timeout.count() / 1000);
  tv.tv_usec = static_cast<suseconds_t>((timeout.count() % 1000) * 1000);
  if (timeout.count() <= 0) tv.tv_usec = 1;
  ::setsockopt(fd.get(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  // An interrupted Unix connect leaves the socket unconnected, so it may be tried again (a TCP
  // connect goes on in the background and may not).
  const auto* addr = reinterpret_cast<const sockaddr*>(&un);
  if (retry_eintr([&] { return ::connect(fd.get(), addr, len); }) != 0) {
    ec = errno == EAGAIN ? std::make_error_code(std::errc::timed_out) : errno_code();
    return {};
  }
  int fl = ::fcntl(fd.get(), F_GETFL);
  if (fl < 0 || ::fcntl(fd.get(), F_SETFL, fl | O_NONBLOCK) != 0) {
    ec = errno_code();
    return {};
  }

  std::string request(request_line);
  request += '\n';
  std::size_t sent = 0;
  while (sent < request.size()) {
    ssize_t n = retry_eintr([&] {
      return ::send(fd.get(), request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
    });
    if (n >= 0) {
      sent += static_cast<std::size_t>(n);
      continue;
    }
    // The master may refuse (permission, too many connections) and close before reading:
    // its refusal line is still readable, so go and read it.
    if (errno == EPIPE || errno == ECONNRESET) break;
    if ((errno != EAGAIN && errno != EWOULDBLOCK)) {
      ec = errno_code();
      return {};
    }
    if (!control::wait_ready(fd.get(), POLLOUT, deadline, ec)) return {};
  }

  std::string in;
  std::size_t nl = std::string::npos;
  char buf[16384];
  while (nl == std::string::npos) {
    ssize_t n = retry_eintr([&] { return ::recv(fd.get(), buf, sizeof buf, 0); });
    if (n > 0) {
      const std::size_t old = in.size();
      in.append(buf, static_cast<std::size_t>(n));
      nl = in.find('\n', old);
      if (nl == std::string::npos && in.size() > kControlMaxReply) {
        ec = std::make_error_code(std::errc::message_size);
        return {};
      }
      continue;
    }
    if (n == 0 || errno == ECONNRESET) {
      ec = std::make_error_code(std::errc::bad_message);
      return {};
    }
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
      ec = errno_code();
      return {};
    }
    if (!control::wait_ready(fd.get(), POLLIN, deadline, ec)) return {};
  }
  if (nl > kControlMaxReply) {
    ec = std::make_error_code(std::errc::message_size);
    return {};
  }
  in.resize(nl);

  if (wait_for_close.count() > 0) {
    const auto close_deadline = control::Clock::now() + wait_for_close;
    for (;;) {
      ssize_t n = retry_eintr([&] { return ::recv(fd.get(), buf, sizeof buf, 0); });
      if (n == 0 || (n < 0 && errno == ECONNRESET)) break;
      if (n > 0) continue;  // nothing more is expected; whatever comes is not waited for
      if (errno != EAGAIN && errno != EWOULDBLOCK) {
        ec = errno_code();
        break;
      }
      if (!control::wait_ready(fd.get(), POLLIN, close_deadline, ec)) break;
    }
  }
  return in;
}

}  // namespace prefork::detail

#endif  // PREFORK_DETAIL_CONTROL_CLIENT_HPP
