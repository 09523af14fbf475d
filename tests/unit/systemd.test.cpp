#include "prefork/detail/systemd.hpp"

#include <catch2/catch.hpp>

#include "support/descriptors.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <optional>
#include <string>
#include <utility>

using prefork::UniqueFd;
using prefork::detail::Notifier;
using prefork::detail::parse_listen_env;
using prefork_test::FdLeakCheck;

namespace {

// A datagram socket the test binds, standing in for systemd's notify socket.
struct NotifySink {
  UniqueFd fd;
  std::string name;  // as NOTIFY_SOCKET spells it
  std::string path;  // the file to remove, for a path socket

  static NotifySink at_path() {
    NotifySink s;
    s.path = (std::filesystem::temp_directory_path() /
              ("prefork-notify-" + std::to_string(::getpid()) + ".sock"))
                 .string();
    ::unlink(s.path.c_str());
    s.name = s.path;
    s.bind_to(s.path, false);
    return s;
  }

  static NotifySink abstract() {
    NotifySink s;
    s.name = "@prefork-notify-test-" + std::to_string(::getpid());
    s.bind_to(s.name.substr(1), true);
    return s;
  }

  void bind_to(const std::string& where, bool abstract_ns) {
    fd.reset(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
    REQUIRE(fd);
    sockaddr_un un{};
    un.sun_family = AF_UNIX;
    std::size_t off = abstract_ns ? 1 : 0;
    std::memcpy(un.sun_path + off, where.data(), where.size());
    auto len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + off + where.size() +
                                      (abstract_ns ? 0 : 1));
    REQUIRE(::bind(fd.get(), reinterpret_cast<sockaddr*>(&un), len) == 0);
  }

  // The next datagram, or nullopt if none comes within a second (the sender has sent it
  // already when this is called: the wait only covers the local socket's delivery).
  std::optional<std::string> receive() {
    pollfd p{fd.get(), POLLIN, 0};
    if (::poll(&p, 1, 1000) != 1) return std::nullopt;
    char buf[4096];
    ssize_t n = ::recv(fd.get(), buf, sizeof buf, MSG_DONTWAIT);
    if (n < 0) return std::nullopt;
    return std::string(buf, static_cast<std::size_t>(n));
  }

  ~NotifySink() {
    if (!path.empty()) ::unlink(path.c_str());
  }
  NotifySink() = default;
  NotifySink(NotifySink&&) = default;
};

}  // namespace

TEST_CASE("LISTEN_FDS for this pid gives the count and default names", "[systemd]") {
  auto e = parse_listen_env("42", "2", nullptr, 42);
  CHECK(e.for_us);
  CHECK(e.error.empty());
  CHECK(e.count == 2);
  CHECK(e.names == std::vector<std::string>{"unknown", "unknown"});
}

TEST_CASE("LISTEN_FDNAMES gives each descriptor its name, empty names included", "[systemd]") {
  auto e = parse_listen_env("7", "3", "http:admin:", 7);
  REQUIRE(e.error.empty());
  CHECK(e.names == std::vector<std::string>{"http", "admin", ""});
  auto one = parse_listen_env("7", "1", "", 7);
  REQUIRE(one.error.empty());
  CHECK(one.names == std::vector<std::string>{""});
}

TEST_CASE("LISTEN_FDS for another pid, or without LISTEN_PID, is not for this process",
          "[systemd]") {
  CHECK_FALSE(parse_listen_env("41", "2", nullptr, 42).for_us);
  CHECK_FALSE(parse_listen_env(nullptr, "2", nullptr, 42).for_us);
  CHECK_FALSE(parse_listen_env("42", nullptr, nullptr, 42).for_us);
  CHECK_FALSE(parse_listen_env("x42", "2", nullptr, 42).for_us);
  CHECK_FALSE(parse_listen_env("", "2", nullptr, 42).for_us);
  CHECK(parse_listen_env("41", "junk", "a:b:c", 42).error.empty());
}

TEST_CASE("malformed LISTEN_FDS or a name count that does not match is an error", "[systemd]") {
  for (const char* bad : {"", "-1", "two", "2x", "99999999999999999999", "4097"}) {
    auto e = parse_listen_env("5", bad, nullptr, 5);
    CHECK(e.for_us);
    CHECK_FALSE(e.error.empty());
  }
  auto names = parse_listen_env("5", "2", "only-one", 5);
  CHECK(names.error.find("LISTEN_FDNAMES") != std::string::npos);
  CHECK_FALSE(parse_listen_env("5", "1", "a:b", 5).error.empty());
  CHECK(parse_listen_env("5", "0", nullptr, 5).count == 0);
}

TEST_CASE("take_activated_sockets unsets the variables, even when they are not for us",
          "[systemd]") {
  ::setenv("LISTEN_PID", std::to_string(::getpid() + 1).c_str(), 1);
  ::setenv("LISTEN_FDS", "1", 1);
  ::setenv("LISTEN_FDNAMES", "x", 1);
  std::string error;
  auto taken = prefork::detail::take_activated_sockets(error);
  CHECK(taken.empty());
  CHECK(error.empty());
  CHECK(std::getenv("LISTEN_PID") == nullptr);
  CHECK(std::getenv("LISTEN_FDS") == nullptr);
  CHECK(std::getenv("LISTEN_FDNAMES") == nullptr);
}

TEST_CASE("take_activated_sockets owns descriptors from 3 on and makes them close-on-exec",
          "[systemd]") {
  // Descriptors 3 and 4 are whatever the test runner left there; put sockets of ours in
  // their place, and restore them afterwards.
  int saved3 = ::fcntl(3, F_DUPFD_CLOEXEC, 100), saved4 = ::fcntl(4, F_DUPFD_CLOEXEC, 100);
  int a[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM, 0, a) == 0);  // not close-on-exec
  // Moved out of the way first: socketpair may itself have returned 3 or 4.
  int hi0 = ::fcntl(a[0], F_DUPFD, 200), hi1 = ::fcntl(a[1], F_DUPFD, 200);
  ::close(a[0]);
  ::close(a[1]);
  REQUIRE(::dup2(hi0, 3) == 3);
  REQUIRE(::dup2(hi1, 4) == 4);
  ::close(hi0);
  ::close(hi1);
  ::setenv("LISTEN_PID", std::to_string(::getpid()).c_str(), 1);
  ::setenv("LISTEN_FDS", "2", 1);
  ::setenv("LISTEN_FDNAMES", "web:admin", 1);
  std::string error;
  {
    auto taken = prefork::detail::take_activated_sockets(error);
    CHECK(error == "");
    REQUIRE(taken.size() == 2);
    CHECK(taken[0].fd.get() == 3);
    CHECK(taken[1].fd.get() == 4);
    CHECK(taken[0].name == "web");
    CHECK(taken[1].name == "admin");
    CHECK((::fcntl(3, F_GETFD) & FD_CLOEXEC) != 0);
    CHECK((::fcntl(4, F_GETFD) & FD_CLOEXEC) != 0);
    CHECK_FALSE(prefork::detail::is_stream_listener(3));  // a connected pair: not a listener
    CHECK(std::getenv("LISTEN_FDS") == nullptr);
  }
  CHECK(::fcntl(3, F_GETFD) < 0);  // owned: closed with the result
  for (auto [saved, fd] : {std::pair{saved3, 3}, std::pair{saved4, 4}}) {
    if (saved < 0) continue;
    ::dup2(saved, fd);
    ::close(saved);
  }
}

TEST_CASE("take_activated_sockets refuses a count that names a closed descriptor", "[systemd]") {
  FdLeakCheck leaks;
  int probe = 3 + 4000;  // far above anything a test holds
  REQUIRE(::fcntl(probe, F_GETFD) < 0);
  ::setenv("LISTEN_PID", std::to_string(::getpid()).c_str(), 1);
  ::setenv("LISTEN_FDS", "4001", 1);
  ::unsetenv("LISTEN_FDNAMES");
  std::string error;
  auto taken = prefork::detail::take_activated_sockets(error);
  CHECK(taken.empty());
  CHECK(error.find("not open") != std::string::npos);
}

TEST_CASE("a passed socket matches the listen address it is bound to", "[systemd]") {
  using prefork::detail::parse_address;
  using prefork::detail::same_listen_address;
  using prefork::detail::SocketAddress;
  SocketAddress c, a;
  REQUIRE(!parse_address("127.0.0.1:8080", a));
  REQUIRE(!parse_address("127.0.0.1:8080", c));
  CHECK(same_listen_address(c, a));
  REQUIRE(!parse_address("127.0.0.1:0", c));
  CHECK(same_listen_address(c, a));  // port 0: any port
  REQUIRE(!parse_address("127.0.0.1:8081", c));
  CHECK_FALSE(same_listen_address(c, a));
  REQUIRE(!parse_address("0.0.0.0:8080", c));
  CHECK_FALSE(same_listen_address(c, a));
  REQUIRE(!parse_address("[::1]:8080", c));
  CHECK_FALSE(same_listen_address(c, a));
  SocketAddress u1, u2;
  REQUIRE(!parse_address("unix:/run/x.sock", u1));
  REQUIRE(!parse_address("unix:/run/x.sock", u2));
  CHECK(same_listen_address(u1, u2));
}

TEST_CASE("the notifier delivers to a path socket and to an abstract one", "[systemd]") {
  FdLeakCheck leaks;
  SECTION("path") {
    NotifySink sink = NotifySink::at_path();
    Notifier n(sink.name);
    REQUIRE(n.enabled());
    CHECK(n.notify("READY=1\nSTATUS=2 workers listening"));
    CHECK(sink.receive() == std::optional<std::string>("READY=1\nSTATUS=2 workers listening"));
  }
  SECTION("abstract") {
    NotifySink sink = NotifySink::abstract();
    Notifier n(sink.name);
    REQUIRE(n.enabled());
    CHECK(n.notify("STOPPING=1"));
    CHECK(sink.receive() == std::optional<std::string>("STOPPING=1"));
  }
}

TEST_CASE("the notifier reports a missing listener as false and does nothing else",
          "[systemd]") {
  FdLeakCheck leaks;
  Notifier gone("/nonexistent-dir/prefork-notify.sock");
  CHECK(gone.enabled());
  CHECK_FALSE(gone.notify("READY=1"));
  CHECK_FALSE(Notifier("").enabled());
  CHECK_FALSE(Notifier("relative.sock").enabled());
  CHECK_FALSE(Notifier("vsock:2:1234").enabled());
  CHECK_FALSE(Notifier(std::string(200, '/')).enabled());
  CHECK_FALSE(Notifier().notify("READY=1"));
}

TEST_CASE("the notifier never blocks on a full notify socket", "[systemd]") {
  FdLeakCheck leaks;
  NotifySink sink = NotifySink::abstract();
  Notifier n(sink.name);
  int sent = 0;
  bool dropped = false;
  for (int i = 0; i < 100000 && !dropped; ++i) {
    if (n.notify("WATCHDOG=1")) {
      ++sent;
    } else {
      dropped = true;
    }
  }
  CHECK(dropped);  // the receiver never reads: its queue fills and sends fail, not block
  CHECK(sent > 0);
}

TEST_CASE("the watchdog is on for WATCHDOG_USEC when WATCHDOG_PID is unset or ours",
          "[systemd]") {
  using std::chrono::microseconds;
  CHECK(Notifier::watchdog_from("200000", nullptr, 9) == microseconds(200000));
  CHECK(Notifier::watchdog_from("200000", "9", 9) == microseconds(200000));
  CHECK(Notifier::watchdog_from("200000", "8", 9) == microseconds(0));
  CHECK(Notifier::watchdog_from("0", nullptr, 9) == microseconds(0));
  CHECK(Notifier::watchdog_from("abc", nullptr, 9) == microseconds(0));
  CHECK(Notifier::watchdog_from(nullptr, "9", 9) == microseconds(0));
}

TEST_CASE("take_from_environment reads and unsets NOTIFY_SOCKET and the watchdog", "[systemd]") {
  ::setenv("NOTIFY_SOCKET", "@prefork-x", 1);
  ::setenv("WATCHDOG_USEC", "1000000", 1);
  ::setenv("WATCHDOG_PID", std::to_string(::getpid()).c_str(), 1);
  Notifier n = Notifier::take_from_environment();
  CHECK(n.enabled());
  CHECK(n.socket() == "@prefork-x");
  CHECK(n.watchdog() == std::chrono::microseconds(1000000));
  CHECK(std::getenv("NOTIFY_SOCKET") == nullptr);
  CHECK(std::getenv("WATCHDOG_USEC") == nullptr);
  CHECK(std::getenv("WATCHDOG_PID") == nullptr);
  CHECK(n.environment() ==
        std::vector<std::string>{"NOTIFY_SOCKET=@prefork-x", "WATCHDOG_USEC=1000000"});
}
