// systemd's two process protocols, without libsystemd: socket activation (sd_listen_fds(3):
// LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES, descriptors from 3 on) and the notify protocol
// (sd_notify(3): "KEY=VALUE\n..." datagrams to $NOTIFY_SOCKET). Both are specified as
// stable interfaces in systemd's "Interface Portability and Stability" list, so speaking them
// directly is as supported as linking the library. The master runs all of this.
#ifndef PREFORK_DETAIL_SYSTEMD_HPP
#define PREFORK_DETAIL_SYSTEMD_HPP

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <prefork/detail/socket.hpp>
#include <prefork/detail/syscall.hpp>
#include <prefork/detail/unique_fd.hpp>

namespace prefork::detail {

/// SD_LISTEN_FDS_START: the first passed descriptor.
inline constexpr int kListenFdsStart = 3;
/// More than this many passed descriptors is taken for a corrupt LISTEN_FDS.
inline constexpr unsigned kMaxListenFds = 4096;
/// The prefix of the listen spec a master upgrade hands over for a socket that socket
/// activation passed ("systemd:127.0.0.1:8080"), so that the new master adopts it as such
/// instead of binding its configured addresses. No configured address starts with it.
inline constexpr std::string_view kActivatedSpec = "systemd:";

/// What the LISTEN_* variables say, parsed; no descriptor is touched.
struct ListenEnv {
  bool for_us = false;             ///< LISTEN_PID names this process (and LISTEN_FDS is set)
  unsigned count = 0;              ///< descriptors kListenFdsStart .. kListenFdsStart+count-1
  std::vector<std::string> names;  ///< one per descriptor; "unknown" without LISTEN_FDNAMES
  std::string error;               ///< set when for_us and the values are inconsistent
};

/// Parses the three variables (nullptr: unset) as sd_listen_fds_with_names(3) does: a
/// missing, malformed or foreign LISTEN_PID means the descriptors are not ours (a parent that
/// was socket-activated left the variables behind), which is not an error. For us, a malformed
/// LISTEN_FDS, or LISTEN_FDNAMES with another number of names, is an error: the descriptors
/// cannot be told apart, and serving on a misread one is worse than not starting.
inline ListenEnv parse_listen_env(const char* pid, const char* fds, const char* names,
                                  pid_t self) {
  ListenEnv e;
  long long owner = 0;
  std::string_view p = pid ? std::string_view(pid) : std::string_view();
  auto [pend, pec] = std::from_chars(p.data(), p.data() + p.size(), owner);
  if (!pid || !fds || pec != std::errc{} || pend != p.data() + p.size() || p.empty() ||
      owner != self)
    return e;
  e.for_us = true;
  std::string_view f(fds);
  unsigned long long n = 0;
  auto [fend, fec] = std::from_chars(f.data(), f.data() + f.size(), n);
  if (f.empty() || fec != std::errc{} || fend != f.data() + f.size() || n > kMaxListenFds) {
    e.error = "LISTEN_FDS: '" + std::string(f) + "' is not a count from 0 to " +
              std::to_string(kMaxListenFds);
    return e;
  }
  e.count = static_cast<unsigned>(n);
  if (!names) {
    e.names.assign(e.count, "unknown");
    return e;
  }
  std::string_view rest(names);
  std::vector<std::string> parsed;
  if (!rest.empty() || e.count > 0) {  // "" is one empty name to sd_listen_fds_with_names
    for (;;) {
      auto colon = rest.find(':');
      parsed.emplace_back(rest.substr(0, colon));
      if (colon == std::string_view::npos) break;
      rest.remove_prefix(colon + 1);
    }
  }
  if (parsed.size() != e.count) {
    e.error = "LISTEN_FDNAMES: " + std::to_string(parsed.size()) + " names for " +
              std::to_string(e.count) + " descriptors (LISTEN_FDS)";
    return e;
  }
  e.names = std::move(parsed);
  return e;
}

/// One descriptor handed over by socket activation.
struct ActivatedSocket {
  UniqueFd fd;
  std::string name;  ///< its FileDescriptorName= ("unknown" if none was given)
};

/// Reads LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES, unsets all three whatever they say (so
/// that neither workers nor anything they start take the descriptors for theirs), and owns
/// the descriptors if they are for this process, each made close-on-exec. Empty when the
/// process was not socket-activated. On an inconsistency `error` is set and nothing is owned:
/// the descriptors are left as they are. Never throws for bad values; master process.
inline std::vector<ActivatedSocket> take_activated_sockets(std::string& error) {
  const char* pid = std::getenv("LISTEN_PID");
  const char* fds = std::getenv("LISTEN_FDS");
  const char* names = std::getenv("LISTEN_FDNAMES");
  ListenEnv e = parse_listen_env(pid, fds, names, ::getpid());
  ::unsetenv("LISTEN_PID");
  ::unsetenv("LISTEN_FDS");
  ::unsetenv("LISTEN_FDNAMES");
  std::vector<ActivatedSocket> out;
  if (!e.for_us) return out;
  if (!e.error.empty()) {
    error = e.error;
    return out;
  }
  for (unsigned i = 0; i < e.count; ++i) {
    int fd = kListenFdsStart + static_cast<int>(i);
    int flags = ::fcntl(fd, F_GETFD);
    if (flags < 0) {
      error = "LISTEN_FDS: descriptor " + std::to_string(fd) + " is not open";
      for (auto& s : out) (void)s.fd.release();  // not ours after all: leave them open
      out.clear();
      return out;
    }
    out.push_back({UniqueFd(fd), e.names[i]});
  }
  // Close-on-exec only once all are known good, so that a refusal leaves them untouched.
  for (auto& s : out) ::fcntl(s.fd.get(), F_SETFD, ::fcntl(s.fd.get(), F_GETFD) | FD_CLOEXEC);
  return out;
}

/// A listening stream socket, as the master can serve on: SO_ACCEPTCONN and SOCK_STREAM.
/// (A .socket unit may also pass datagram sockets, FIFOs or message queues: nothing to accept.)
inline bool is_stream_listener(int fd) noexcept {
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISSOCK(st.st_mode)) return false;
  int on = 0, type = 0;
  socklen_t len = sizeof on;
  if (::getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &on, &len) != 0 || on != 1) return false;
  len = sizeof type;
  return ::getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) == 0 && type == SOCK_STREAM;
}

/// Makes a passed listener fit for the master's loop: systemd hands sockets over blocking
/// unless the unit says NonBlocking=yes, and a blocking accept would stall the master.
inline bool make_nonblocking(int fd) noexcept {
  int fl = ::fcntl(fd, F_GETFL);
  return fl >= 0 && ::fcntl(fd, F_SETFL, fl | O_NONBLOCK) == 0;
}

/// True if `actual` (getsockname of a passed socket) is what the listen address `configured`
/// names: same family, same IP address (or Unix path), same port, where a configured port 0
/// ("any port") matches any port. "0.0.0.0:80" and "127.0.0.1:80" are different addresses.
inline bool same_listen_address(const SocketAddress& configured,
                                const SocketAddress& actual) noexcept {
  if (configured.family() != actual.family() || actual.length == 0) return false;
  switch (configured.family()) {
    case AF_INET: {
      sockaddr_in c, a;
      std::memcpy(&c, &configured.storage, sizeof c);
      std::memcpy(&a, &actual.storage, sizeof a);
      return c.sin_addr.s_addr == a.sin_addr.s_addr && (c.sin_port == 0 || c.sin_port == a.sin_port);
    }
    case AF_INET6: {
      sockaddr_in6 c, a;
      std::memcpy(&c, &configured.storage, sizeof c);
      std::memcpy(&a, &actual.storage, sizeof a);
      return std::memcmp(&c.sin6_addr, &a.sin6_addr, sizeof c.sin6_addr) == 0 &&
             (c.sin6_port == 0 || c.sin6_port == a.sin6_port);
    }
    case AF_UNIX: return to_string(configured) == to_string(actual);
  }
  return false;
}

/// CLOCK_MONOTONIC in microseconds, as RELOADING=1 wants it in MONOTONIC_USEC (systemd
/// compares it with its own clock to tell this reload from an older one).
inline std::uint64_t monotonic_usec() noexcept {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1000000u +
         static_cast<std::uint64_t>(ts.tv_nsec) / 1000u;
}

/// The sending side of sd_notify(3). Each message goes out as one datagram on a socket opened
/// for it and closed after it (as libsystemd does), so that no descriptor has to be kept out
/// of forked workers. Sending never blocks (MSG_DONTWAIT: a full queue drops the message) and
/// never fails loudly: a service manager that is gone must not take the master with it.
class Notifier {
 public:
  Notifier() = default;

  /// Aims at `socket` as NOTIFY_SOCKET spells it: an absolute path, or "@name" for the
  /// abstract namespace. Anything else (empty, relative, too long; "vsock:" is not spoken)
  /// leaves the notifier disabled. `watchdog` > 0 asks for WATCHDOG=1 every half of it.
  explicit Notifier(std::string socket, std::chrono::microseconds watchdog = {})
      : watchdog_(watchdog) {
    if (socket.size() < 2 || socket.size() >= sizeof(sockaddr_un{}.sun_path) ||
        (socket.front() != '/' && socket.front() != '@'))
      return;
    addr_.sun_family = AF_UNIX;
    std::memcpy(addr_.sun_path, socket.data(), socket.size());
    if (socket.front() == '@') addr_.sun_path[0] = '\0';  // abstract: no trailing NUL counted
    length_ = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + socket.size() +
                                     (socket.front() == '/' ? 1 : 0));
    socket_ = std::move(socket);
  }

  /// From NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID, which are then unset (workers must
  /// not speak for the service; the master hands them on to a new master itself, see
  /// environment()). The watchdog is on when WATCHDOG_USEC is a positive number and
  /// WATCHDOG_PID is unset or names this process (sd_watchdog_enabled(3)). Master process.
  static Notifier take_from_environment() {
    const char* sock = std::getenv("NOTIFY_SOCKET");
    const char* usec = std::getenv("WATCHDOG_USEC");
    const char* wpid = std::getenv("WATCHDOG_PID");
    std::chrono::microseconds watchdog = watchdog_from(usec, wpid, ::getpid());
    Notifier n(sock ? std::string(sock) : std::string(), watchdog);
    ::unsetenv("NOTIFY_SOCKET");
    ::unsetenv("WATCHDOG_USEC");
    ::unsetenv("WATCHDOG_PID");
    return n;
  }

  /// WATCHDOG_USEC as sd_watchdog_enabled(3) reads it; 0 when off or malformed.
  static std::chrono::microseconds watchdog_from(const char* usec, const char* pid, pid_t self) {
    if (!usec) return {};
    std::string_view u(usec);
    unsigned long long v = 0;
    auto [end, ec] = std::from_chars(u.data(), u.data() + u.size(), v);
    if (u.empty() || ec != std::errc{} || end != u.data() + u.size() || v == 0) return {};
    if (pid) {
      std::string_view p(pid);
      long long owner = 0;
      auto [pe, pc] = std::from_chars(p.data(), p.data() + p.size(), owner);
      if (p.empty() || pc != std::errc{} || pe != p.data() + p.size() || owner != self) return {};
    }
    return std::chrono::microseconds(static_cast<std::int64_t>(v));
  }

  bool enabled() const noexcept { return length_ != 0; }
  /// NOTIFY_SOCKET as it was given ("" when disabled).
  const std::string& socket() const noexcept { return socket_; }
  /// WATCHDOG_USEC (0: no watchdog); ping every half of it.
  std::chrono::microseconds watchdog() const noexcept {
    return enabled() ? watchdog_ : std::chrono::microseconds{0};
  }

  /// Sends one notification ("READY=1\nSTATUS=..."). False if disabled or the datagram was
  /// not sent (no listener, full queue, ...); nothing else happens then.
  bool notify(std::string_view state) const noexcept {
    if (!enabled() || state.empty()) return false;
    UniqueFd fd(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    if (!fd) return false;
    ssize_t n = retry_eintr([&] {
      return ::sendto(fd.get(), state.data(), state.size(), MSG_DONTWAIT | MSG_NOSIGNAL,
                      reinterpret_cast<const sockaddr*>(&addr_), length_);
    });
    return n == static_cast<ssize_t>(state.size());
  }

  /// What a new master started by an upgrade needs in its environment to carry on: the
  /// socket, and the watchdog without WATCHDOG_PID (its pid is not known before it is forked;
  /// without the variable the watchdog applies to whoever reads it). Empty when disabled.
  std::vector<std::string> environment() const {
    std::vector<std::string> env;
    if (!enabled()) return env;
    env.push_back("NOTIFY_SOCKET=" + socket_);
    if (watchdog_.count() > 0) env.push_back("WATCHDOG_USEC=" + std::to_string(watchdog_.count()));
    return env;
  }

 private:
  std::string socket_;
  sockaddr_un addr_{};
  socklen_t length_ = 0;
  std::chrono::microseconds watchdog_{0};
};

}  // namespace prefork::detail

#endif  // PREFORK_DETAIL_SYSTEMD_HPP
