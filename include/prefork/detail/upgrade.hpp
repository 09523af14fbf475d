// Master upgrade hand-over: what an old master tells the new master it exec's, in one
// environment variable, and how the new master takes it back; and Successor, the old master's
// watch over the new master until it is ready or has failed. The listening sockets themselves
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

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <prefork/detail/process.hpp>
#include <prefork/detail/spawn.hpp>
#include <prefork/detail/unique_fd.hpp>
#include <prefork/event_loop.hpp>

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

/// The old master's side of an upgrade: the new master it forked and exec'd, watched on the old
/// master's loop through a pidfd and the read end of a "ready" pipe, with a deadline. Exactly
/// one of on_ready / on_fail is called per start(); the process stays watched until it is
/// reaped (or release() after success: the new master outlives the old one). Master process.
class Successor {
 public:
  using ReadyFn = std::function<void()>;
  using FailFn = std::function<void(const std::string& why)>;

  explicit Successor(EventLoop& loop) noexcept : loop_(loop) {}
  Successor(const Successor&) = delete;
  Successor& operator=(const Successor&) = delete;
  ~Successor() { reset(); }

  /// Forks and execs `path` with `argv`, and `env` plus PREFORK_UPGRADE naming `sockets` and the
  /// ready pipe; the child keeps exactly those descriptors of ours open, closes `close_in_child`,
  /// and starts with default signal dispositions and an empty mask. Returns an empty string, or
  /// why nothing was started (nothing is left running then).
  std::string start(const std::string& path, const std::vector<std::string>& argv,
                    std::vector<std::string> env, const std::vector<InheritedSocket>& sockets,
                    const std::vector<int>& close_in_child, Clock::duration timeout,
                    ReadyFn on_ready, FailFn on_fail) {
    if (pidfd_) return "a new master (pid " + std::to_string(pid_) + ") is still running";
    int p[2];
    if (::pipe2(p, O_CLOEXEC | O_NONBLOCK) != 0) return std::string("pipe: ") + std::strerror(errno);
    UniqueFd ready_read(p[0]), ready_write(p[1]);

    // Prepared before fork(): after it, the child only calls async-signal-safe functions.
    env.push_back(std::string(kUpgradeEnv) + "=" +
                  encode_upgrade(::getpid(), ready_write.get(), sockets));
    std::vector<char*> args, envp;
    for (auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    for (auto& e : env) envp.push_back(e.data());
    envp.push_back(nullptr);
    std::vector<int> keep{ready_write.get()};
    for (auto& s : sockets) keep.push_back(s.fd);
    std::vector<int> close_fds{ready_read.get()};
    for (int fd : close_in_child)
      if (std::find(keep.begin(), keep.end(), fd) == keep.end()) close_fds.push_back(fd);

    ChildSetup child;
    child.label = "upgrade";
    child.close = &close_fds;
    child.keep = &keep;
    child.path = path.c_str();
    child.argv = args.data();
    child.envp = envp.data();
    pid_t pid = spawn_child(child);
    if (pid < 0) return std::string("fork: ") + std::strerror(errno);
    ready_write.reset();
    UniqueFd pidfd(pidfd_open(pid));
    if (!pidfd) {
      std::string why = std::string("pidfd_open: ") + std::strerror(errno);
      ::kill(pid, SIGKILL);
      retry_eintr([&] { return ::waitpid(pid, nullptr, 0); });
      return why;
    }
    pid_ = pid;
    pidfd_ = std::move(pidfd);
    ready_ = std::move(ready_read);
    waiting_ = true;
    on_ready_ = std::move(on_ready);
    on_fail_ = std::move(on_fail);
    loop_.watch(pidfd_.get(), EventLoop::readable, [this](std::uint32_t) { on_exit(); }, false);
    loop_.watch(ready_.get(), EventLoop::readable, [this](std::uint32_t) { on_readable(); }, false);
    auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(timeout).count();
    timer_ = loop_.after(timeout, [this, ms] {
      timer_ = 0;
      fail("the new master (pid " + std::to_string(pid_) + ") was not ready after " +
               std::to_string(ms) + " ms (upgrade_timeout); killed it",
           SIGKILL);
    }, false);
    return {};
  }

  /// Started, and neither ready nor failed yet.
  bool waiting() const noexcept { return waiting_; }
  /// Started and not reaped yet (a second upgrade must wait for it).
  bool running() const noexcept { return static_cast<bool>(pidfd_); }
  pid_t pid() const noexcept { return pid_; }

  /// Gives up while waiting: on_fail(why), and `sig` (0: none) to the new master, which stays
  /// watched until it is reaped.
  void fail(const std::string& why, int sig) {
    if (!waiting_) return;
    stop_waiting();
    if (sig && pidfd_) pidfd_send_signal(pidfd_.get(), sig);
    if (auto cb = std::exchange(on_fail_, nullptr)) cb(why);
  }

  /// The descriptors a child of the old master must not inherit.
  void descriptors(std::vector<int>& out) const {
    if (pidfd_) out.push_back(pidfd_.get());
    if (ready_) out.push_back(ready_.get());
  }

 private:
  void stop_waiting() {
    waiting_ = false;
    if (timer_) loop_.cancel(timer_);
    timer_ = 0;
    if (ready_) {
      loop_.unwatch(ready_.get());
      ready_.reset();
    }
  }

  // "ready" from the new master; EOF without it means it is exiting, which its pidfd reports.
  void on_readable() {
    char buf[64];
    ssize_t n = retry_eintr([&] { return ::read(ready_.get(), buf, sizeof buf); });
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    bool ready = n > 0 && std::string_view(buf, static_cast<std::size_t>(n)).find("ready") !=
                              std::string_view::npos;
    loop_.unwatch(ready_.get());
    ready_.reset();
    if (!ready || !waiting_) return;
    stop_waiting();
    on_fail_ = nullptr;
    if (auto cb = std::exchange(on_ready_, nullptr)) cb();
  }

  void on_exit() {
    Reaped r = reap(pidfd_.get());
    if (!r.done) return;
    loop_.unwatch(pidfd_.get());
    pidfd_.reset();
    std::string how = r.signal ? "was killed by signal " + std::to_string(r.signal)
                               : "exited with code " + std::to_string(r.exit_code);
    fail("the new master (pid " + std::to_string(pid_) + ") " + how + " before it was ready", 0);
  }

  void reset() noexcept {
    if (timer_) loop_.cancel(timer_);
    timer_ = 0;
    if (ready_) loop_.unwatch(ready_.get());
    if (pidfd_) loop_.unwatch(pidfd_.get());
    ready_.reset();
    pidfd_.reset();
  }

  EventLoop& loop_;
  pid_t pid_ = -1;
  UniqueFd pidfd_;
  UniqueFd ready_;
  EventLoop::TimerId timer_ = 0;
  bool waiting_ = false;
  ReadyFn on_ready_;
  FailFn on_fail_;
};

}  // namespace prefork::detail

#endif  // PREFORK_DETAIL_UPGRADE_HPP
