// Master upgrade hand-over: what an old master tells the new master it exec's, in one
// environment variable, and how the new master takes it back. The listening sockets themselves
// cross execve as inherited descriptors; the variable says which descriptor is which.
//
//   PREFORK_UPGRADE=<old master pid> <notify fd>\n<fd> <slot> <listen spec>\n...
//
// <slot> is "-" for a socket every worker shares, or the slot of a ReusePort socket. <listen
// spec> is the Options::listen entry as configured ("127.0.0.1:0"), so that the new master
// matches its own configuration against it and port 0 keeps the port it resolved to.
#ifndef PREFORK_DETAIL_UPGRADE_HPP
#define PREFORK_DETAIL_UPGRADE_HPP

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <charconv>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <prefork/detail/process.hpp>
#include <prefork/detail/unique_fd.hpp>

namespace prefork::detail {

inline constexpr const char* kUpgradeEnv = "PREFORK_UPGRADE";

/// One listening socket handed from an old master to its successor.
struct InheritedSocket {
  int fd = -1;
  long slot = -1;    ///< -1: shared by all workers; else the ReusePort slot it belongs to
  std::string spec;  ///< the Options::listen entry it was bound for
};

/// What a new master started by an upgrade learns from its environment.
struct UpgradeBoot {
  pid_t old_master = 0;
  UniqueFd notify;  ///< write "ready\n" here once every worker listens
  std::vector<UniqueFd> fds;
  std::vector<InheritedSocket> sockets;  ///< sockets[i].fd == fds[i].get()
};

/// A listening stream socket (SO_ACCEPTCONN), as an inherited descriptor must be.
inline bool is_listening_socket(int fd) noexcept {
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISSOCK(st.st_mode)) return false;
  int on = 0;
  socklen_t len = sizeof on;
  return ::getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &on, &len) == 0 && on == 1;
}

/// The variable's value. Specs holding a newline cannot be told apart from the next entry:
/// the caller refuses the upgrade before it gets here (encodable()).
inline std::string encode_upgrade(pid_t old_master, int notify_fd,
                                  const std::vector<InheritedSocket>& sockets) {
  std::string v = std::to_string(old_master) + " " + std::to_string(notify_fd) + "\n";
  for (auto& s : sockets)
    v += std::to_string(s.fd) + " " + (s.slot < 0 ? std::string("-") : std::to_string(s.slot)) +
         " " + s.spec + "\n";
  return v;
}

inline bool encodable(const std::string& spec) noexcept {
  return spec.find('\n') == std::string::npos && spec.find('\0') == std::string::npos;
}

template <class T>
bool parse_int(std::string_view text, T& out) noexcept {
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), out);
  return ec == std::errc{} && end == text.data() + text.size() && !text.empty();
}

/// Parses the variable's value. Every descriptor it names must be open (and each socket a
/// listening socket); they are owned (and made close-on-exec) by the result. nullopt, with
/// `error` set, if anything is wrong: a new master must not serve on descriptors it misread.
inline std::optional<UpgradeBoot> parse_upgrade(std::string_view value, std::string& error) {
  UpgradeBoot b;
  std::vector<std::string_view> lines;
  while (!value.empty()) {
    auto nl = value.find('\n');
    lines.push_back(value.substr(0, nl));
    value = nl == std::string_view::npos ? std::string_view{} : value.substr(nl + 1);
  }
  auto fail = [&](const std::string& why) {
    error = std::string(kUpgradeEnv) + ": " + why;
    return std::nullopt;
  };
  if (lines.empty()) return fail("empty");
  auto sp = lines[0].find(' ');
  int notify = -1;
  if (sp == std::string_view::npos || !parse_int(lines[0].substr(0, sp), b.old_master) ||
      !parse_int(lines[0].substr(sp + 1), notify) || b.old_master <= 0 ||
      ::fcntl(notify, F_GETFD) < 0)
    return fail("bad first line '" + std::string(lines[0]) + "'");
  b.notify.reset(notify);
  ::fcntl(notify, F_SETFD, FD_CLOEXEC);
  for (std::size_t i = 1; i < lines.size(); ++i) {
    std::string_view l = lines[i];
    auto a = l.find(' ');
    auto c = a == std::string_view::npos ? a : l.find(' ', a + 1);
    InheritedSocket s;
    if (c == std::string_view::npos || !parse_int(l.substr(0, a), s.fd) ||
        (l.substr(a + 1, c - a - 1) != "-" && !parse_int(l.substr(a + 1, c - a - 1), s.slot)))
      return fail("bad socket line '" + std::string(l) + "'");
    if (!is_listening_socket(s.fd))
      return fail("descriptor " + std::to_string(s.fd) + " is not a listening socket");
    s.spec = std::string(l.substr(c + 1));
    ::fcntl(s.fd, F_SETFD, FD_CLOEXEC);
    b.fds.emplace_back(s.fd);
    b.sockets.push_back(std::move(s));
  }
  return b;
}

/// Reads and removes the variable (so that workers and their children never see it).
/// nullopt when this process was not started by an upgrade.
inline std::optional<UpgradeBoot> take_upgrade_boot(std::string& error) {
  const char* raw = std::getenv(kUpgradeEnv);
  if (!raw) return std::nullopt;
  std::string value(raw);
  ::unsetenv(kUpgradeEnv);
  return parse_upgrade(value, error);
}

}  // namespace prefork::detail

#endif  // PREFORK_DETAIL_UPGRADE_HPP
