// prefork::Connection: one accepted stream connection handed to a Server, already non-blocking
// and close-on-exec, with the peer's address. The Server owns it from then on.
#ifndef PREFORK_CONNECTION_HPP
#define PREFORK_CONNECTION_HPP

#include <string>
#include <utility>

#include <prefork/version.hpp>
#include <prefork/detail/socket.hpp>
#include <prefork/detail/unique_fd.hpp>

namespace prefork {

class Connection {
 public:
  Connection() = default;
  Connection(UniqueFd fd, detail::SocketAddress peer) noexcept
      : fd_(std::move(fd)), peer_(peer) {}

  int fd() const noexcept { return fd_.get(); }
  /// Hands the descriptor over; the Connection no longer closes it.
  UniqueFd release() noexcept { return std::move(fd_); }
  explicit operator bool() const noexcept { return static_cast<bool>(fd_); }
  /// The peer as text: "127.0.0.1:53422", "[::1]:53422" or "unix:" for unnamed Unix peers.
  std::string peer() const { return detail::to_string(peer_); }
  const detail::SocketAddress& peer_address() const noexcept { return peer_; }

 private:
  UniqueFd fd_;
  detail::SocketAddress peer_;
};

}  // namespace prefork

#endif  // PREFORK_CONNECTION_HPP
