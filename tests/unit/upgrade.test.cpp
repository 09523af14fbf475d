#include "prefork/detail/upgrade.hpp"

#include <catch2/catch.hpp>

#include "support/descriptors.hpp"

#include <fcntl.h>
#include <sys/socket.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "prefork/detail/socket.hpp"

using prefork::UniqueFd;
using prefork::detail::encode_upgrade;
using prefork::detail::InheritedSocket;
using prefork::detail::parse_upgrade;
using prefork_test::FdLeakCheck;

namespace {

// A copy of fd that parse_upgrade may take ownership of (and close) without touching fd.
int dup_of(int fd) { return ::fcntl(fd, F_DUPFD, 0); }

bool cloexec(int fd) { return (::fcntl(fd, F_GETFD) & FD_CLOEXEC) != 0; }

struct ReadyPipe {
  ReadyPipe() {
    int p[2];
    REQUIRE(::pipe(p) == 0);
    read.reset(p[0]);
    write.reset(p[1]);
  }
  UniqueFd read, write;
};

}  // namespace

TEST_CASE("An encoded hand-over parses back to the same pid and sockets and slots and specs",
          "[upgrade]") {
  FdLeakCheck leaks;
  UniqueFd tcp = prefork::detail::listen_on("127.0.0.1:0", 16);
  auto dir = std::filesystem::temp_directory_path() / ("prefork-upgrade-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  std::string unix_spec = "unix:" + (dir / "a socket with spaces").string();
  UniqueFd local = prefork::detail::listen_on(unix_spec, 16);
  ReadyPipe ready;
  int a = dup_of(tcp.get()), b = dup_of(local.get()), n = dup_of(ready.write.get());

  std::string value = encode_upgrade(4242, n, {{a, -1, "127.0.0.1:0"}, {b, 3, unix_spec}});
  std::string error;
  auto boot = parse_upgrade(value, error);
  REQUIRE(boot);
  CHECK(error.empty());
  CHECK(boot->old_master == 4242);
  CHECK(boot->notify.get() == n);
  CHECK(cloexec(n));
  REQUIRE(boot->sockets.size() == 2);
  REQUIRE(boot->fds.size() == 2);
  CHECK(boot->sockets[0].fd == a);
  CHECK(boot->sockets[0].slot == -1);
  CHECK(boot->sockets[0].spec == "127.0.0.1:0");
  CHECK(boot->sockets[1].fd == b);
  CHECK(boot->sockets[1].slot == 3);
  CHECK(boot->sockets[1].spec == unix_spec);
  CHECK(boot->fds[0].get() == a);
  CHECK(boot->fds[1].get() == b);
  CHECK(cloexec(a));
  CHECK(cloexec(b));
  boot.reset();  // owns the copies: closing them leaves nothing open
  local.reset();
  std::filesystem::remove_all(dir);
}

TEST_CASE("A hand-over naming a descriptor that is not a listening socket is refused",
          "[upgrade]") {
  FdLeakCheck leaks;
  ReadyPipe ready;
  int pair[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) == 0);
  UniqueFd left(pair[0]), right(pair[1]);
  int n = dup_of(ready.write.get());
  std::string error;
  auto boot = parse_upgrade(encode_upgrade(7, n, {{left.get(), -1, "127.0.0.1:80"}}), error);
  CHECK_FALSE(boot);
  CHECK(error.find("PREFORK_UPGRADE") != std::string::npos);
  CHECK(error.find("not a listening socket") != std::string::npos);
  CHECK(::fcntl(left.get(), F_GETFD) >= 0);  // not ours to close
}

TEST_CASE("A hand-over with a closed or malformed descriptor or pid is refused with the text",
          "[upgrade]") {
  FdLeakCheck leaks;
  std::string error;
  for (const char* bad : {"", "x 5\n", "12\n", "0 1\n", "-3 1\n", "12 999999\n",
                          "12 1\n7\n", "12 1\nx - 127.0.0.1:1\n", "12 1\n5 y 127.0.0.1:1\n",
                          "12 1\n999999 - 127.0.0.1:1\n"}) {
    INFO("value: '" << bad << "'");
    error.clear();
    int n = dup_of(1);  // stdout stands in for the notify pipe; the parse may take it
    std::string value(bad);
    auto pos = value.find(" 1\n");
    if (pos != std::string::npos) value.replace(pos, 3, " " + std::to_string(n) + "\n");
    auto boot = parse_upgrade(value, error);
    CHECK_FALSE(boot);
    CHECK(error.find("PREFORK_UPGRADE") != std::string::npos);
    if (::fcntl(n, F_GETFD) >= 0) ::close(n);
  }
}

TEST_CASE("take_upgrade_boot removes the variable so that children never see it", "[upgrade]") {
  FdLeakCheck leaks;
  UniqueFd tcp = prefork::detail::listen_on("127.0.0.1:0", 16);
  ReadyPipe ready;
  int a = dup_of(tcp.get()), n = dup_of(ready.write.get());
  std::string value = encode_upgrade(99, n, {{a, 0, "127.0.0.1:0"}});
  REQUIRE(::setenv(prefork::detail::kUpgradeEnv, value.c_str(), 1) == 0);
  std::string error;
  auto boot = prefork::detail::take_upgrade_boot(error);
  CHECK(std::getenv(prefork::detail::kUpgradeEnv) == nullptr);
  REQUIRE(boot);
  CHECK(boot->old_master == 99);
  CHECK(boot->sockets.at(0).slot == 0);
  error.clear();
  CHECK_FALSE(prefork::detail::take_upgrade_boot(error));  // absent: not an upgrade, no error
  CHECK(error.empty());
}

TEST_CASE("A listen spec with a newline cannot be encoded", "[upgrade]") {
  CHECK(prefork::detail::encodable("unix:/tmp/a b"));
  CHECK_FALSE(prefork::detail::encodable("unix:/tmp/a\nb"));
  CHECK_FALSE(prefork::detail::encodable(std::string("unix:/tmp/a\0b", 13)));
}

namespace {

using prefork::detail::Successor;
using namespace std::chrono_literals;

// Runs `loop` until `done` or 10 s have passed.
void run_until(prefork::EventLoop& loop, const bool& done) {
  auto deadline = prefork::Clock::now() + 10s;
  while (!done && prefork::Clock::now() < deadline) loop.run_once(100);
}

// The notify descriptor, from the first line of PREFORK_UPGRADE ("<pid> <fd>"), in sh.
constexpr const char* kNotifyFd = "fd=${PREFORK_UPGRADE#* }; fd=${fd%%[!0-9]*}; ";

struct Outcome {
  bool done = false, ready = false;
  std::string why;
};

std::string start_sh(Successor& s, const std::string& script, Outcome& out,
                     const std::vector<InheritedSocket>& sockets = {},
                     const std::vector<int>& close_in_child = {},
                     prefork::Clock::duration timeout = 10s) {
  return s.start("/bin/sh", {"sh", "-c", script}, {"PATH=/usr/bin:/bin"}, sockets, close_in_child,
                 timeout,
                 [&out] { out.done = out.ready = true; },
                 [&out](const std::string& why) {
                   out.done = true;
                   out.why = why;
                 });
}

}  // namespace

TEST_CASE("Successor reports ready when the new master writes ready on its pipe", "[upgrade]") {
  FdLeakCheck leaks;
  prefork::EventLoop loop;
  UniqueFd tcp = prefork::detail::listen_on("127.0.0.1:0", 16);
  UniqueFd secret = prefork::detail::listen_on("127.0.0.1:0", 16);  // must not reach the child
  Outcome out;
  {
    Successor s(loop);
    // The child checks that it holds the socket it was given and not the one it was not.
    std::string script = std::string(kNotifyFd) + "test -e /proc/$$/fd/" +
                         std::to_string(tcp.get()) + " || exit 4; test -e /proc/$$/fd/" +
                         std::to_string(secret.get()) + " && exit 5; echo ready >&$fd; exec sleep 30";
    REQUIRE(start_sh(s, script, out, {{tcp.get(), -1, "127.0.0.1:0"}}, {secret.get()}) == "");
    CHECK(s.waiting());
    CHECK(s.running());
    run_until(loop, out.done);
    CHECK(out.ready);
    CHECK(out.why.empty());
    CHECK_FALSE(s.waiting());
    REQUIRE(s.running());
    ::kill(s.pid(), SIGKILL);  // the test's stand-in for a new master that outlives us
    auto deadline = prefork::Clock::now() + 10s;
    while (s.running() && prefork::Clock::now() < deadline) loop.run_once(100);
    CHECK_FALSE(s.running());  // reaped through its pidfd, with no second callback
  }
}

TEST_CASE("Successor reports a new master that exits before it is ready with its exit code",
          "[upgrade]") {
  FdLeakCheck leaks;
  prefork::EventLoop loop;
  Successor s(loop);
  Outcome out;
  REQUIRE(start_sh(s, "exit 3", out) == "");
  run_until(loop, out.done);
  CHECK_FALSE(out.ready);
  CHECK(out.why.find("exited with code 3 before it was ready") != std::string::npos);
  CHECK_FALSE(s.running());
}

TEST_CASE("Successor kills a new master that is not ready by the deadline and reaps it",
          "[upgrade]") {
  FdLeakCheck leaks;
  prefork::EventLoop loop;
  Successor s(loop);
  Outcome out;
  REQUIRE(start_sh(s, "exec sleep 30", out, {}, {}, 200ms) == "");
  pid_t pid = s.pid();
  run_until(loop, out.done);
  CHECK_FALSE(out.ready);
  CHECK(out.why.find("was not ready after 200 ms") != std::string::npos);
  auto deadline = prefork::Clock::now() + 10s;
  while (s.running() && prefork::Clock::now() < deadline) loop.run_once(100);
  CHECK_FALSE(s.running());
  CHECK((::kill(pid, 0) == -1 && errno == ESRCH));
}

TEST_CASE("Successor refuses a second start while the first new master runs", "[upgrade]") {
  FdLeakCheck leaks;
  prefork::EventLoop loop;
  Successor s(loop);
  Outcome first, second;
  REQUIRE(start_sh(s, "exec sleep 30", first) == "");
  CHECK(start_sh(s, "exit 0", second).find("still running") != std::string::npos);
  s.fail("test over", SIGKILL);
  CHECK(first.done);
  CHECK(first.why == "test over");
  CHECK_FALSE(second.done);
  auto deadline = prefork::Clock::now() + 10s;
  while (s.running() && prefork::Clock::now() < deadline) loop.run_once(100);
  CHECK_FALSE(s.running());
}

TEST_CASE("Successor reports a program that cannot be executed as exit code 127", "[upgrade]") {
  FdLeakCheck leaks;
  prefork::EventLoop loop;
  Successor s(loop);
  Outcome out;
  REQUIRE(s.start("/nonexistent/prefork-new-master", {"x"}, {}, {}, {}, 10s, [&] { out.done = out.ready = true; },
                  [&](const std::string& why) {
                    out.done = true;
                    out.why = why;
                  }) == "");
  run_until(loop, out.done);
  CHECK(out.why.find("exited with code 127") != std::string::npos);
}
