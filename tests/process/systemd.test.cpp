// hello under systemd's protocols, with systemd's own tool: systemd-socket-activate binds the
// port and execs hello in its place (LISTEN_PID/LISTEN_FDS), and a datagram socket the test
// binds plays the service manager's notify socket (NOTIFY_SOCKET), with SO_PASSCRED so that
// each notification says which process sent it.
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <algorithm>
#include <cstdlib>
#include <memory>
#include <cstring>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "harness.hpp"
#include "hello_process.hpp"
#include "http_client.hpp"

using namespace prefork_test;

namespace {

const std::string kActivate = "/usr/bin/systemd-socket-activate";

// A port nobody listens on right now (bound to port 0, read, closed). Someone else may take it
// before systemd-socket-activate binds it: ActivatedHello retries then.
int free_port() {
  prefork::UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  prefork::detail::SocketAddress a;
  prefork::detail::parse_address("127.0.0.1:0", a);
  if (::bind(fd.get(), a.get(), a.length) != 0) return 0;
  auto bound = prefork::detail::local_address(fd.get());
  auto text = prefork::detail::to_string(bound);
  return static_cast<int>(number_after(text.substr(text.rfind(':') + 1), ""));
}

struct Notification {
  std::string text;
  pid_t sender = 0;
  bool has(std::string_view line) const {
    std::string t = "\n" + text + "\n";
    return t.find("\n" + std::string(line) + "\n") != std::string::npos;
  }
  std::string value(std::string_view key) const {
    std::string t = "\n" + text;
    auto at = t.find("\n" + std::string(key) + "=");
    if (at == std::string::npos) return {};
    auto start = at + key.size() + 2;
    return t.substr(start, t.find('\n', start) - start);
  }
};

// The service manager's end: a datagram socket at a path of the test's own.
class NotifySocket {
 public:
  NotifySocket() {
    path_ = (std::filesystem::temp_directory_path() /
             ("prefork-sd-" + std::to_string(::getpid()) + "-" + std::to_string(++counter()) +
              ".sock"))
                .string();
    ::unlink(path_.c_str());
    fd_.reset(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
    sockaddr_un un{};
    un.sun_family = AF_UNIX;
    std::memcpy(un.sun_path, path_.c_str(), path_.size() + 1);
    int one = 1;
    ::setsockopt(fd_.get(), SOL_SOCKET, SO_PASSCRED, &one, sizeof one);
    ok_ = ::bind(fd_.get(), reinterpret_cast<sockaddr*>(&un), sizeof un) == 0;
  }
  ~NotifySocket() { ::unlink(path_.c_str()); }

  bool ok() const noexcept { return ok_; }
  const std::string& path() const noexcept { return path_; }

  /// The next notification, or nullopt at the deadline.
  std::optional<Notification> next(Clock::time_point deadline) {
    for (;;) {
      pollfd p{fd_.get(), POLLIN, 0};
      int r = ::poll(&p, 1, ms_until(deadline));
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) return std::nullopt;
      char buf[4096];
      alignas(cmsghdr) char control[CMSG_SPACE(sizeof(ucred))];
      iovec iov{buf, sizeof buf};
      msghdr m{};
      m.msg_iov = &iov;
      m.msg_iovlen = 1;
      m.msg_control = control;
      m.msg_controllen = sizeof control;
      ssize_t n = ::recvmsg(fd_.get(), &m, MSG_DONTWAIT);
      if (n < 0) continue;
      Notification note{std::string(buf, static_cast<std::size_t>(n)), 0};
      for (cmsghdr* c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_CREDENTIALS) {
          ucred cred;
          std::memcpy(&cred, CMSG_DATA(c), sizeof cred);
          note.sender = cred.pid;
        }
      log_ += "[" + std::to_string(note.sender) + "] " + note.text + "\n---\n";
      return note;
    }
  }

  /// The next notification holding the line `line` ("READY=1"); others are skipped.
  std::optional<Notification> wait_for(std::string_view line, Clock::time_point deadline) {
    while (auto n = next(deadline))
      if (n->has(line)) return n;
    return std::nullopt;
  }

  /// Reads what is queued now, without waiting (its senders are done: e.g. they exited).
  void drain() {
    while (next(Clock::now())) {
    }
  }

  /// Everything received so far, for failure messages.
  const std::string& log() const noexcept { return log_; }

 private:
  static int& counter() {
    static int n = 0;
    return n;
  }
  prefork::UniqueFd fd_;
  std::string path_, log_;
  bool ok_ = false;
};

// systemd-socket-activate -l 127.0.0.1:PORT [-E VAR...] hello ARGS, through a shell that
// exports WATCHDOG_PID=$$ first when asked (the pid stays the same through both execs, as
// under systemd). systemd-socket-activate passes on only the variables named with -E.
class ActivatedHello {
 public:
  ActivatedHello(std::vector<std::string> env, std::vector<std::string> hello_args,
                 bool watchdog_pid = false) {
    for (int attempt = 0; attempt < 5 && !process_; ++attempt) {
      int port = free_port();
      std::vector<std::string> args{"-c",
                                    std::string(watchdog_pid ? "export WATCHDOG_PID=$$; " : "") +
                                        "exec \"$0\" \"$@\"",
                                    kActivate, "-l", "127.0.0.1:" + std::to_string(port)};
      if (watchdog_pid) env.push_back("WATCHDOG_PID");
      for (const char* v : {"ASAN_OPTIONS", "UBSAN_OPTIONS", "LSAN_OPTIONS"})
        if (std::getenv(v)) env.push_back(v);
      for (auto& e : env) {
        args.push_back("-E");
        args.push_back(e);
      }
      args.push_back(kHello);
      args.insert(args.end(), hello_args.begin(), hello_args.end());
      auto p = std::make_unique<HelloProcess>("/bin/sh", args);
      // "Listening on 127.0.0.1:PORT as 3." once it holds the port; anything else (it could
      // not bind: the port was taken meanwhile) ends it.
      auto line = p->err().next(Clock::now() + kDeadline);
      if (line && line->starts_with("Listening on ")) {
        port_ = port;
        process_ = std::move(p);
      } else {
        transcript_ += p->err().transcript();
        ::kill(p->pid(), SIGKILL);
      }
    }
  }

  explicit operator bool() const noexcept { return static_cast<bool>(process_); }
  HelloProcess& hello() { return *process_; }
  int port() const noexcept { return port_; }
  const std::string& transcript() const noexcept { return transcript_; }

  /// The first connection makes systemd-socket-activate exec hello; GET / through it, then
  /// read hello's start-up lines. The pid that answered, or -1.
  pid_t first_request(unsigned workers) {
    auto r = http_get(port_);
    if (!process_->start(workers)) return -1;
    return r.status == 200 ? handled_by(r.body) : -1;
  }

 private:
  std::unique_ptr<HelloProcess> process_;
  int port_ = 0;
  std::string transcript_;
};

bool contains(const std::vector<pid_t>& v, pid_t p) {
  return std::find(v.begin(), v.end(), p) != v.end();
}

}  // namespace

TEST_CASE("hello under systemd-socket-activate serves on the passed port", "[systemd]") {
  // The command line as it is: hello's own --port (8080 by default) is not bound.
  ActivatedHello sa({}, {"--workers", "2", "--work", "0"});
  INFO(sa.transcript());
  REQUIRE(sa);
  pid_t served = sa.first_request(2);
  INFO(sa.hello().out().transcript() << sa.hello().err().transcript());
  CHECK(sa.hello().master_pid() == sa.hello().pid());  // exec'd in place
  CHECK(sa.hello().port() == sa.port());                // "Listening on 127.0.0.1:PORT"
  CHECK(contains(sa.hello().workers(), served));
  for (int i = 0; i < 4; ++i) CHECK(contains(sa.hello().workers(), handled_by(http_get(sa.port()).body)));
  ::kill(sa.hello().pid(), SIGTERM);
  auto status = sa.hello().wait(Clock::now() + kDeadline);
  REQUIRE(status);
  CHECK(WIFEXITED(*status));
  CHECK(WEXITSTATUS(*status) == 0);
}

TEST_CASE("an activated master does not bind its configured port, which may be taken",
          "[systemd]") {
  // The test holds --port itself: a master that tried to bind it would exit with
  // "Address already in use"; it serves on the passed socket instead, and the held port's
  // connections stay the test's.
  prefork::UniqueFd held = prefork::detail::listen_on("127.0.0.1:0", 8);
  std::string held_address = prefork::detail::to_string(prefork::detail::local_address(held.get()));
  std::string held_port = held_address.substr(held_address.rfind(':') + 1);
  ActivatedHello sa({}, {"--workers", "2", "--work", "0", "--port", held_port});
  INFO(sa.transcript());
  REQUIRE(sa);
  pid_t served = sa.first_request(2);
  INFO(sa.hello().out().transcript() << sa.hello().err().transcript());
  CHECK(contains(sa.hello().workers(), served));
  CHECK(sa.hello().port() == sa.port());
  auto why = sa.hello().err().next_containing("socket activation: not binding",
                                              Clock::now() + kDeadline);
  REQUIRE(why);
  CHECK(why->find("not binding 127.0.0.1:" + held_port) != std::string::npos);
  ::kill(sa.hello().pid(), SIGTERM);
  REQUIRE(sa.hello().wait(Clock::now() + kDeadline));
}

TEST_CASE("hello tells the notify socket READY, RELOADING and READY again, then STOPPING",
          "[systemd]") {
  NotifySocket sd;
  REQUIRE(sd.ok());
  ActivatedHello sa({"NOTIFY_SOCKET=" + sd.path()}, {"--workers", "2", "--work", "0"});
  INFO(sa.transcript());
  REQUIRE(sa);
  pid_t served = sa.first_request(2);
  INFO(sa.hello().out().transcript() << sa.hello().err().transcript());
  CHECK(served > 0);
  pid_t master = sa.hello().master_pid();
  auto deadline = Clock::now() + kDeadline;

  auto ready = sd.wait_for("READY=1", deadline);
  INFO(sd.log());
  REQUIRE(ready);
  CHECK(ready->sender == master);
  // Counted from the master's own records: both workers had said 'listening'.
  CHECK(ready->value("STATUS") == "2 workers listening on 127.0.0.1:" + std::to_string(sa.port()));
  CHECK(ready->value("MAINPID").empty());

  std::uint64_t before = prefork::detail::monotonic_usec();
  ::kill(master, SIGUSR2);
  auto reloading = sd.wait_for("RELOADING=1", Clock::now() + kDeadline);
  REQUIRE(reloading);
  std::uint64_t stamp = std::strtoull(reloading->value("MONOTONIC_USEC").c_str(), nullptr, 10);
  CHECK(stamp >= before);
  CHECK(stamp <= prefork::detail::monotonic_usec());
  auto reloaded = sd.wait_for("READY=1", Clock::now() + kDeadline);
  REQUIRE(reloaded);
  CHECK(reloaded->value("STATUS").find("reloaded in") != std::string::npos);
  REQUIRE(sa.hello().out().next_starting_with("Reload done", Clock::now() + kDeadline));
  CHECK(handled_by(http_get(sa.port()).body) > 0);

  ::kill(master, SIGTERM);
  auto stopping = sd.wait_for("STOPPING=1", Clock::now() + kDeadline);
  REQUIRE(stopping);
  CHECK(stopping->sender == master);
  auto status = sa.hello().wait(Clock::now() + kDeadline);
  REQUIRE(status);
  CHECK(WIFEXITED(*status));
  CHECK(WEXITSTATUS(*status) == 0);
}

TEST_CASE("with WATCHDOG_USEC and its own WATCHDOG_PID the master pings WATCHDOG=1",
          "[systemd]") {
  NotifySocket sd;
  REQUIRE(sd.ok());
  ActivatedHello sa({"NOTIFY_SOCKET=" + sd.path(), "WATCHDOG_USEC=200000"},
                    {"--workers", "2", "--work", "0"}, true);
  INFO(sa.transcript());
  REQUIRE(sa);
  REQUIRE(sa.first_request(2) > 0);
  INFO(sa.hello().out().transcript() << sa.hello().err().transcript());
  auto deadline = Clock::now() + kDeadline;
  for (int i = 0; i < 3; ++i) {
    auto ping = sd.wait_for("WATCHDOG=1", deadline);
    INFO(sd.log());
    REQUIRE(ping);
    CHECK(ping->sender == sa.hello().master_pid());
  }
  ::kill(sa.hello().pid(), SIGTERM);
  REQUIRE(sa.hello().wait(Clock::now() + kDeadline));
}

TEST_CASE("after a master upgrade the new master sends MAINPID and READY on the same socket",
          "[systemd]") {
  NotifySocket sd;
  REQUIRE(sd.ok());
  ActivatedHello sa({"NOTIFY_SOCKET=" + sd.path()}, {"--workers", "2", "--work", "0"});
  INFO(sa.transcript());
  REQUIRE(sa);
  REQUIRE(sa.first_request(2) > 0);
  INFO(sa.hello().out().transcript() << sa.hello().err().transcript());
  pid_t old_master = sa.hello().master_pid();
  REQUIRE(sd.wait_for("READY=1", Clock::now() + kDeadline));

  ::kill(old_master, SIGUSR1);
  auto deadline = Clock::now() + kDeadline;
  auto line = sa.hello().out().next_starting_with("Master PID: ", deadline);
  REQUIRE(line);
  pid_t fresh = static_cast<pid_t>(number_after(*line, "Master PID: "));
  // Not our child (the old master forked it): stopped through a pidfd at the end, whatever
  // happens in between.
  int fresh_fd = pidfd_open(fresh);
  REQUIRE(fresh_fd >= 0);
  struct Stop {
    pid_t pid;
    int fd;
    ~Stop() {
      ::kill(pid, SIGTERM);
      if (!wait_pidfd(fd, Clock::now() + kDeadline)) ::kill(pid, SIGKILL);
      ::close(fd);
    }
  } stop{fresh, fresh_fd};
  REQUIRE(sa.hello().out().next_starting_with("Listening on 127.0.0.1:" + std::to_string(sa.port()),
                                              deadline));

  bool from_old = false, from_new = false;
  while (!(from_old && from_new)) {
    auto n = sd.wait_for("MAINPID=" + std::to_string(fresh), deadline);
    INFO(sd.log());
    REQUIRE(n);
    if (n->sender == old_master) from_old = true;  // NotifyAccess=main takes this one
    if (n->sender == fresh) {
      from_new = true;
      CHECK(n->has("READY=1"));
    }
  }
  auto old_status = sa.hello().wait(Clock::now() + kDeadline);  // the old master hands over
  REQUIRE(old_status);
  CHECK(WIFEXITED(*old_status));
  sd.drain();
  CHECK(sd.log().find("STOPPING=1") == std::string::npos);  // the service goes on
  pid_t after = handled_by(http_get(sa.port()).body);
  CHECK(after > 0);
  CHECK_FALSE(contains(sa.hello().workers(), after));

  ::kill(fresh, SIGTERM);
  auto stopping = sd.wait_for("STOPPING=1", Clock::now() + kDeadline);
  REQUIRE(stopping);
  CHECK(stopping->sender == fresh);
  CHECK(wait_pidfd(fresh_fd, Clock::now() + kDeadline));
}
