// Socket helpers: listen-address parsing ("127.0.0.1:8080", "[::1]:0", "unix:/path"), binding
// listeners with errors that name the address, and printable socket addresses.
#ifndef PREFORK_DETAIL_SOCKET_HPP
#define PREFORK_DETAIL_SOCKET_HPP

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstddef>
#include <cstring>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include <prefork/detail/syscall.hpp>
#include <prefork/detail/unique_fd.hpp>

namespace prefork::detail {

struct SocketAddress {
  sockaddr_storage storage{};
  socklen_t length = 0;

  int family() const noexcept { return storage.ss_family; }
  const sockaddr* get() const noexcept { return reinterpret_cast<const sockaddr*>(&storage); }
  sockaddr* get() noexcept { return reinterpret_cast<sockaddr*>(&storage); }
};

/// Parses "HOST:PORT" (IPv4 or "[IPv6]"), ":PORT" (all IPv4 interfaces) or "unix:PATH".
/// Returns std::errc::invalid_argument for anything else, including a port above 65535.
inline std::error_code parse_address(std::string_view spec, SocketAddress& out) noexcept {
  out = {};
  if (spec.starts_with("unix:")) {
    std::string_view path = spec.substr(5);
    sockaddr_un un{};
    if (path.empty() || path.size() >= sizeof un.sun_path)
      return std::make_error_code(std::errc::invalid_argument);
    un.sun_family = AF_UNIX;
    std::memcpy(un.sun_path, path.data(), path.size());
    std::memcpy(&out.storage, &un, sizeof un);
    out.length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size() + 1);
    return {};
  }
  auto colon = spec.rfind(':');
  if (colon == std::string_view::npos) return std::make_error_code(std::errc::invalid_argument);
  std::string host(spec.substr(0, colon));
  std::string_view port_text = spec.substr(colon + 1);
  unsigned port = 0;
  auto [end, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
  if (ec != std::errc{} || end != port_text.data() + port_text.size() || port > 65535 ||
      port_text.empty())
    return std::make_error_code(std::errc::invalid_argument);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    sockaddr_in6 in6{};
    in6.sin6_family = AF_INET6;
    in6.sin6_port = htons(static_cast<std::uint16_t>(port));
    if (::inet_pton(AF_INET6, host.substr(1, host.size() - 2).c_str(), &in6.sin6_addr) != 1)
      return std::make_error_code(std::errc::invalid_argument);
    std::memcpy(&out.storage, &in6, sizeof in6);
    out.length = sizeof in6;
    return {};
  }
  sockaddr_in in{};
  in.sin_family = AF_INET;
  in.sin_port = htons(static_cast<std::uint16_t>(port));
  if (host.empty()) host = "0.0.0.0";
  if (::inet_pton(AF_INET, host.c_str(), &in.sin_addr) != 1)
    return std::make_error_code(std::errc::invalid_argument);
  std::memcpy(&out.storage, &in, sizeof in);
  out.length = sizeof in;
  return {};
}

/// A host name as RFC 1123 allows one: dot-separated labels of 1 to 63 letters, digits and
/// '-', not starting or ending with '-', 253 bytes at most.
inline bool is_host_name(std::string_view host) noexcept {
  if (host.empty() || host.size() > 253) return false;
  std::size_t label = 0;
  char previous = '.';
  for (char c : host) {
    bool alnum = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
    if (c == '.') {
      if (label == 0 || previous == '-') return false;
      label = 0;
    } else if (alnum || (c == '-' && label > 0)) {
      if (++label > 63) return false;
    } else {
      return false;
    }
    previous = c;
  }
  return label > 0 && previous != '-';
}

/// Why `spec` is not a listen address, as the rule it breaks ("the path is 120 bytes, longer
/// than 107"); empty if it is one: what parse_address() takes, or HOST:PORT with a host name,
/// which resolve_listen_address() resolves when the master binds.
inline std::string address_problem(std::string_view spec) {
  constexpr std::string_view kForms = "HOST:PORT, [IPV6]:PORT or unix:PATH";
  if (spec.starts_with("unix:")) {
    std::string_view path = spec.substr(5);
    constexpr std::size_t kMaxPath = sizeof(sockaddr_un{}.sun_path) - 1;  // and its NUL
    if (path.empty()) return "no path after 'unix:'";
    if (path.find('\0') != std::string_view::npos) return "the path holds a NUL byte";
    if (path.size() > kMaxPath)
      return "the path is " + std::to_string(path.size()) + " bytes, longer than " +
             std::to_string(kMaxPath) + " (the size of a Unix socket address)";
    return {};
  }
  auto colon = spec.rfind(':');
  if (colon == std::string_view::npos) return "no port (want " + std::string(kForms) + ")";
  std::string host(spec.substr(0, colon));
  std::string_view port_text = spec.substr(colon + 1);
  unsigned port = 0;
  auto [end, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
  if (port_text.empty() || ec != std::errc{} || end != port_text.data() + port_text.size() ||
      port > 65535)
    return "the port '" + std::string(port_text) + "' is not a number from 0 to 65535";
  in6_addr v6{};
  in_addr v4{};
  if (host.starts_with('[')) {
    if (host.size() < 2 || !host.ends_with(']')) return "'" + host + "' has no closing ']'";
    if (::inet_pton(AF_INET6, host.substr(1, host.size() - 2).c_str(), &v6) != 1)
      return "'" + host.substr(1, host.size() - 2) + "' is not a numeric IPv6 address";
    return {};
  }
  if (host.find(':') != std::string::npos)
    return "an IPv6 address goes in brackets: [" + host + "]:" + std::string(port_text);
  if (host.empty()) return {};
  if (host.find_first_not_of("0123456789.") == std::string::npos) {
    if (::inet_pton(AF_INET, host.c_str(), &v4) != 1)
      return "'" + host + "' is not a numeric IPv4 address";
    return {};
  }
  if (!is_host_name(host))
    return "'" + host + "' is neither a numeric address nor a host name (letters, digits, '-' "
           "and '.')";
  return {};
}

/// "127.0.0.1:8080", "[::1]:8080" or "unix:/path".
inline std::string to_string(const SocketAddress& a) {
  char buf[INET6_ADDRSTRLEN] = {};
  switch (a.family()) {
    case AF_INET: {
      sockaddr_in in;
      std::memcpy(&in, &a.storage, sizeof in);
      ::inet_ntop(AF_INET, &in.sin_addr, buf, sizeof buf);
      return std::string(buf) + ":" + std::to_string(ntohs(in.sin_port));
    }
    case AF_INET6: {
      sockaddr_in6 in6;
      std::memcpy(&in6, &a.storage, sizeof in6);
      ::inet_ntop(AF_INET6, &in6.sin6_addr, buf, sizeof buf);
      return "[" + std::string(buf) + "]:" + std::to_string(ntohs(in6.sin6_port));
    }
    case AF_UNIX: {
      sockaddr_un un;
      std::memcpy(&un, &a.storage, sizeof un);
      std::size_t max = a.length > offsetof(sockaddr_un, sun_path)
                            ? a.length - offsetof(sockaddr_un, sun_path)
                            : 0;
      return "unix:" + std::string(un.sun_path, strnlen(un.sun_path, std::min(max, sizeof un.sun_path)));
    }
  }
  return "unknown";
}

/// The address a socket is bound to (with the port the kernel chose for port 0).
inline SocketAddress local_address(int fd) noexcept {
  SocketAddress a;
  a.length = sizeof a.storage;
  if (::getsockname(fd, a.get(), &a.length) != 0) a.length = 0;
  return a;
}

/// A Unix socket file that nobody accepts on (connect() is refused) is left over from a process
/// that died without cleaning up: remove it, as nginx and systemd do. A live one is kept.
/// Only a socket file is ever removed: connect() to a regular file is refused too.
inline bool remove_stale_unix_socket(const SocketAddress& a) noexcept {
  sockaddr_un un;
  std::memcpy(&un, &a.storage, sizeof un);
  struct stat st {};
  if (::lstat(un.sun_path, &st) != 0 || !S_ISSOCK(st.st_mode)) return false;
  UniqueFd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!probe) return false;
  if (retry_eintr([&] { return ::connect(probe.get(), a.get(), a.length); }) == 0 ||
      errno != ECONNREFUSED)
    return false;
  return ::unlink(un.sun_path) == 0;
}

/// Removes the file of a Unix listening socket this process bound ("unix:/path"); other
/// addresses are left alone.
inline void unlink_unix_socket(std::string_view address) noexcept {
  if (!address.starts_with("unix:")) return;
  std::string path(address.substr(5));
  ::unlink(path.c_str());
}

/// The numeric listen addresses `spec` stands for: itself when parse_address() takes it; for a
/// host name, every IPv4 and IPv6 address getaddrinfo(3) returns for it, in its order (IPv4
/// first for "localhost" under the default /etc/gai.conf), each once (AI_ADDRCONFIG), nginx's
/// rule for `listen NAME:PORT`. Throws std::system_error naming the address and the resolver's reason
/// when the name does not resolve. Master, at bind time.
inline std::vector<std::string> resolve_listen_address(const std::string& spec) {
  SocketAddress a;
  if (!parse_address(spec, a)) return {spec};
  auto colon = spec.rfind(':');
  const std::string host = spec.substr(0, colon), port = spec.substr(colon + 1);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  // AI_ADDRCONFIG: IPv6 addresses only where the machine has IPv6 configured, so that "::1
  // localhost" in /etc/hosts does not make a bind fail on a machine without IPv6.
  hints.ai_flags = AI_NUMERICSERV | AI_ADDRCONFIG;
  addrinfo* list = nullptr;
  const auto unresolved = std::make_error_code(std::errc::address_not_available);
  if (int rc = ::getaddrinfo(host.c_str(), port.c_str(), &hints, &list); rc != 0)
    throw StatedError(unresolved, "prefork: listen address '" + spec + "': cannot resolve '" +
                                      host + "': " + ::gai_strerror(rc));
  std::vector<std::string> out;
  for (addrinfo* p = list; p; p = p->ai_next) {
    if ((p->ai_family != AF_INET && p->ai_family != AF_INET6) ||
        p->ai_addrlen > sizeof a.storage)
      continue;
    SocketAddress r;
    std::memcpy(&r.storage, p->ai_addr, p->ai_addrlen);
    r.length = p->ai_addrlen;
    std::string s = to_string(r);
    if (std::find(out.begin(), out.end(), s) == out.end()) out.push_back(std::move(s));
  }
  ::freeaddrinfo(list);
  if (out.empty())
    throw StatedError(unresolved, "prefork: listen address '" + spec + "': '" + host +
                                      "' resolves to no IPv4 or IPv6 address");
  return out;
}

/// Numeric TCP `spec` with port 0 replaced by the port of `bound`: the addresses of one host
/// name share the port the kernel chose for the first. Any other `spec` is returned as it is.
inline std::string same_port_as(const std::string& spec, const std::string& bound) {
  SocketAddress s, b;
  if (parse_address(spec, s) || parse_address(bound, b) || s.family() == AF_UNIX ||
      b.family() == AF_UNIX)
    return spec;
  auto port_ref = [](SocketAddress& x) -> in_port_t& {
    return x.family() == AF_INET ? reinterpret_cast<sockaddr_in*>(&x.storage)->sin_port
                                 : reinterpret_cast<sockaddr_in6*>(&x.storage)->sin6_port;
  };
  if (port_ref(s) != 0) return spec;
  port_ref(s) = port_ref(b);
  return to_string(s);
}

/// How a TCP listening socket takes part in a SO_REUSEPORT group (Unix sockets: ignored).
enum class ReusePortRole {
  none,  ///< no SO_REUSEPORT: the address is this socket's alone
  /// The first socket of a group that only this process may grow: bound without SO_REUSEPORT,
  /// so that the bind fails if any socket holds the address (SO_REUSEPORT or not, any user:
  /// the kernel lets a socket share a port only if both it and every holder set the option),
  /// and given SO_REUSEPORT after the bind, before listen(), when the kernel forms the group.
  /// Without this a second server of the same user with SO_REUSEPORT joins the group silently
  /// and takes its share of the connections (socket(7): sharing needs only the same uid).
  lead,
  join,  ///< SO_REUSEPORT before bind: joins the group that a `lead` socket started
};

/// Creates a non-blocking, close-on-exec listening socket. Throws std::system_error whose
/// message names the operation and the address ("prefork: bind 127.0.0.1:8080: Address
/// already in use"). A stale Unix socket file (nobody accepting) is replaced. defer_accept_s
/// > 0 sets TCP_DEFER_ACCEPT on TCP sockets: accept wakes when the client's first data arrives
/// (or, at the latest, about that many seconds after the handshake).
inline UniqueFd listen_on(const std::string& spec, int backlog,
                          ReusePortRole reuse_port = ReusePortRole::none, int defer_accept_s = 0) {
  SocketAddress a;
  if (auto ec = parse_address(spec, a))
    throw std::system_error(ec, "prefork: bad listen address '" + spec +
                                    "' (want HOST:PORT, [IPV6]:PORT or unix:PATH)");
  UniqueFd fd(::socket(a.family(), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd) throw_errno("socket for " + spec);
  int one = 1;
  if (a.family() != AF_UNIX) {
    // SO_REUSEADDR lets a restarted master bind while old connections sit in TIME_WAIT.
    ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (a.family() == AF_INET6) ::setsockopt(fd.get(), IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    if (reuse_port == ReusePortRole::join &&
        ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0)
      throw_errno("setsockopt SO_REUSEPORT " + spec);
    if (defer_accept_s > 0 && ::setsockopt(fd.get(), IPPROTO_TCP, TCP_DEFER_ACCEPT,
                                           &defer_accept_s, sizeof defer_accept_s) != 0)
      throw_errno("setsockopt TCP_DEFER_ACCEPT " + spec);
  }
  if (::bind(fd.get(), a.get(), a.length) != 0) {
    if (errno != EADDRINUSE || a.family() != AF_UNIX || !remove_stale_unix_socket(a))
      throw_errno("bind " + spec);
    if (::bind(fd.get(), a.get(), a.length) != 0) throw_errno("bind " + spec);
  }
  if (reuse_port == ReusePortRole::lead && a.family() != AF_UNIX &&
      ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0)
    throw_errno("setsockopt SO_REUSEPORT " + spec);
  if (::listen(fd.get(), backlog) != 0) throw_errno("listen " + spec);
  return fd;
}

}  // namespace prefork::detail

#endif  // PREFORK_DETAIL_SOCKET_HPP
