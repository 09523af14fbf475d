// The control socket (include/prefork/detail/control_server.hpp, detail/control_client.hpp,
// include/prefork/control.hpp): the socket file's mode and life (stale replaced, live and
// non-socket refused, only our own file unlinked), the protocol's order and limits, the peer
// check, the blocking client and the `ctl` command line. The JSON subset: json.test.cpp.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include <prefork/control.hpp>
#include <prefork/detail/control_client.hpp>
#include <prefork/detail/control_server.hpp>
#include <prefork/detail/json.hpp>
#include <prefork/event_loop.hpp>

#include "support/descriptors.hpp"
#include "support/loop.hpp"
#include "support/temp_dir.hpp"

using namespace std::chrono_literals;
using prefork::Clock;
using prefork::EventLoop;
using prefork::UniqueFd;
using prefork::detail::ControlReply;
using prefork::detail::ControlRequest;
using prefork::detail::ControlServer;
using prefork_test::FdLeakCheck;
using prefork_test::run_until;
using prefork_test::TempDir;

// The client accepts every reply line the server may send.
static_assert(prefork::detail::kControlMaxReply == prefork::detail::kControlMaxOutput);

namespace {

sockaddr_un unix_address(const std::string& path, socklen_t& len) {
  sockaddr_un un{};
  un.sun_family = AF_UNIX;
  std::memcpy(un.sun_path, path.data(), path.size());
  len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size() + 1);
  return un;
}

// A raw, non-blocking client, so that the server's loop runs on the same thread.
struct Client {
  UniqueFd fd;
  std::string in;
  bool eof = false;
  int connect_errno = 0;

  explicit Client(const std::string& path) {
    fd.reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    socklen_t len;
    sockaddr_un un = unix_address(path, len);
    if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&un), len) != 0) connect_errno = errno;
  }
  bool send(std::string_view bytes) {
    while (!bytes.empty()) {
      ssize_t n = ::send(fd.get(), bytes.data(), bytes.size(), MSG_NOSIGNAL);
      if (n < 0) {
        if (errno != EAGAIN) return false;
        pollfd p{fd.get(), POLLOUT, 0};
        ::poll(&p, 1, 1000);
        continue;
      }
      bytes.remove_prefix(static_cast<std::size_t>(n));
    }
    return true;
  }
  void pump() {
    char buf[65536];
    for (;;) {
      ssize_t n = ::recv(fd.get(), buf, sizeof buf, MSG_DONTWAIT);
      if (n > 0) {
        in.append(buf, static_cast<std::size_t>(n));
        continue;
      }
      if (n == 0 || errno == ECONNRESET) eof = true;
      return;
    }
  }
  std::optional<std::string> line() {
    pump();
    auto nl = in.find('\n');
    if (nl == std::string::npos) return std::nullopt;
    std::string l = in.substr(0, nl);
    in.erase(0, nl + 1);
    return l;
  }
};

// The next reply line on `c`, running the server's loop meanwhile ("" if none came).
std::string next_line(EventLoop& loop, Client& c) {
  std::string got;
  run_until(loop, [&] {
    if (auto l = c.line()) {
      got = *l;
      return true;
    }
    return c.eof;
  });
  return got;
}

bool closed_by_server(EventLoop& loop, Client& c) {
  return run_until(loop, [&] {
    c.pump();
    return c.eof;
  });
}

std::string fail_line(std::string_view message) {
  std::string l = prefork::detail::control_failure_line(message);
  l.pop_back();
  return l;
}

// A server on its own loop in `dir`, with a handler that keeps every request's reply.
struct Fixture {
  FdLeakCheck fds;
  TempDir dir{"prefork-control"};
  std::string path = dir.path + "/ctl.sock";
  EventLoop loop;
  ControlServer server{loop};
  std::vector<std::pair<ControlRequest, ControlReply>> held;

  Fixture() {
    REQUIRE_FALSE(dir.path.empty());
    REQUIRE_FALSE(server.listen(path));
    server.on_request([this](const ControlRequest& r, ControlReply reply) { held.emplace_back(r, reply); });
  }
  bool wait_held(std::size_t n) {
    return run_until(loop, [&] { return held.size() >= n; });
  }
};

bool exists(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}

// A socket file nobody accepts on: bound, never listened on, closed.
void make_stale_socket(const std::string& path) {
  UniqueFd s(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  socklen_t len;
  sockaddr_un un = unix_address(path, len);
  REQUIRE(::bind(s.get(), reinterpret_cast<sockaddr*>(&un), len) == 0);
}

std::string contents(const std::string& path) {
  std::ifstream in(path);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

}  // namespace

// ------------------------------------------------------------------------------------------
// The socket file
// ------------------------------------------------------------------------------------------

TEST_CASE("The control socket is created with mode 0600 and a close-on-exec descriptor",
          "[control]") {
  Fixture f;
  struct stat st {};
  REQUIRE(::lstat(f.path.c_str(), &st) == 0);
  CHECK(S_ISSOCK(st.st_mode));
  CHECK((st.st_mode & 0777) == 0600);
  CHECK(f.server.path() == f.path);
  REQUIRE(f.server.native_handle() >= 0);
  CHECK((::fcntl(f.server.native_handle(), F_GETFD) & FD_CLOEXEC) != 0);
  CHECK((::fcntl(f.server.native_handle(), F_GETFL) & O_NONBLOCK) != 0);
  CHECK_FALSE(f.loop.alive());  // the control socket never keeps a loop running
  CHECK(f.server.listen(f.path) == std::errc::already_connected);
  f.server.close();
  CHECK(f.server.native_handle() == -1);
  CHECK(exists(f.path));  // close() leaves the file to its owner
}

TEST_CASE("A stale control socket file is replaced", "[control]") {
  FdLeakCheck fds;
  TempDir dir("prefork-control");
  const std::string path = dir.path + "/ctl.sock";
  make_stale_socket(path);
  EventLoop loop;
  ControlServer server(loop);
  REQUIRE_FALSE(server.listen(path));
  Client c(path);
  CHECK(c.connect_errno == 0);
}

TEST_CASE("A control socket a live process accepts on is refused with address_in_use and kept",
          "[control]") {
  Fixture f;
  EventLoop loop2;
  ControlServer second(loop2);
  CHECK(second.listen(f.path) == std::errc::address_in_use);
  CHECK(second.native_handle() == -1);
  Client c(f.path);  // the first one still owns the path
  CHECK(c.connect_errno == 0);
  REQUIRE(run_until(f.loop, [&] { return f.server.connections() == 1; }));
}

TEST_CASE("A path that is not a socket is refused with file_exists and never removed",
          "[control]") {
  FdLeakCheck fds;
  TempDir dir("prefork-control");
  const std::string path = dir.path + "/ctl.sock";
  { std::ofstream(path) << "precious"; }
  EventLoop loop;
  ControlServer server(loop);
  CHECK(server.listen(path) == std::errc::file_exists);
  CHECK(contents(path) == "precious");
  REQUIRE(::symlink("/nonexistent", (dir.path + "/link.sock").c_str()) == 0);
  CHECK(server.listen(dir.path + "/link.sock") == std::errc::file_exists);
  CHECK(::access((dir.path + "/link.sock").c_str(), F_OK) != 0);  // a dangling link, still there
  CHECK(exists(dir.path + "/link.sock"));
  CHECK(server.listen(dir.path + "/" + std::string(120, 'x')) == std::errc::filename_too_long);
  CHECK(server.listen(dir.path + "/missing/ctl.sock") == std::errc::no_such_file_or_directory);
  CHECK(server.native_handle() == -1);
}

TEST_CASE("unlink() removes the server's own socket file but never a successor's", "[control]") {
  FdLeakCheck fds;
  TempDir dir("prefork-control");
  const std::string path = dir.path + "/ctl.sock";
  EventLoop loop;
  ControlServer old_master(loop);
  REQUIRE_FALSE(old_master.listen(path));
  old_master.close();  // its file is stale now
  ControlServer successor(loop);
  REQUIRE_FALSE(successor.listen(path));
  old_master.unlink();
  CHECK(exists(path));
  Client c(path);
  CHECK(c.connect_errno == 0);
  successor.unlink();
  CHECK_FALSE(exists(path));
}

TEST_CASE("adopt() takes over a listening socket and serves requests on it", "[control]") {
  FdLeakCheck fds;
  TempDir dir("prefork-control");
  const std::string path = dir.path + "/ctl.sock";
  EventLoop loop;
  UniqueFd handed;
  {
    ControlServer old_master(loop);
    REQUIRE_FALSE(old_master.listen(path));
    handed.reset(::fcntl(old_master.native_handle(), F_DUPFD, 0));  // as if inherited over exec
  }
  ControlServer server(loop);
  UniqueFd not_listening(::socket(AF_UNIX, SOCK_STREAM, 0));
  CHECK(server.adopt(std::move(not_listening), path) == std::errc::invalid_argument);
  REQUIRE_FALSE(server.adopt(std::move(handed), path));
  CHECK((::fcntl(server.native_handle(), F_GETFD) & FD_CLOEXEC) != 0);
  server.on_request([](const ControlRequest& r, ControlReply reply) {
    reply.ok("\"echo\":" + prefork::detail::json_quote(r.command));
  });
  Client c(path);
  REQUIRE(c.send("{\"command\":\"status\"}\n"));
  CHECK(next_line(loop, c) == R"({"ok":true,"echo":"status"})");
  server.unlink();
  CHECK_FALSE(exists(path));
}

// ------------------------------------------------------------------------------------------
// The protocol
// ------------------------------------------------------------------------------------------

TEST_CASE("Replies leave in request order even when a later request is answered first",
          "[control]") {
  Fixture f;
  Client c(f.path);
  REQUIRE(c.send("{\"command\":\"a\"}\n{\"command\":\"b\",\"n\":2}\n{\"command\":\"c\"}\n"));
  REQUIRE(f.wait_held(3));
  CHECK(f.held[0].first.command == "a");
  CHECK(f.held[1].first.fields.at("n").text == "2");
  CHECK(f.held[1].first.peer.uid == ::geteuid());
  CHECK(f.held[1].first.peer.pid == ::getpid());
  f.held[2].second.ok("\"n\":3");
  CHECK(f.held[2].second.answered());
  f.held[2].second.fail("ignored: answered already");
  // Replies are written when answered: had the third one been sent, it would be readable now.
  c.pump();
  CHECK(c.in.empty());
  f.held[0].second.ok();
  CHECK(next_line(f.loop, c) == R"({"ok":true})");
  c.pump();
  CHECK(c.in.empty());
  f.held[1].second.fail("no \"such\" thing");
  CHECK(next_line(f.loop, c) == R"({"ok":false,"error":"no \"such\" thing"})");
  CHECK(next_line(f.loop, c) == R"({"ok":true,"n":3})");
}

TEST_CASE("A reply dropped unanswered is answered with a failure", "[control]") {
  Fixture f;
  f.server.on_request([](const ControlRequest&, ControlReply) {});
  Client c(f.path);
  REQUIRE(c.send("{\"command\":\"status\"}\n"));
  CHECK(next_line(f.loop, c) == fail_line("the master dropped the request"));
}

TEST_CASE("A handler that throws fails its request and the exception reaches the loop",
          "[control]") {
  Fixture f;
  f.server.on_request([](const ControlRequest& r, ControlReply reply) {
    if (r.command == "boom") throw std::runtime_error("boom");
    reply.ok();
  });
  Client c(f.path);
  REQUIRE(c.send("{\"command\":\"boom\"}\n{\"command\":\"fine\"}\n"));
  bool threw = false;
  f.loop.on_exception([&](std::exception_ptr) { threw = true; });
  const std::string first = next_line(f.loop, c);
  CHECK(threw);
  CHECK(first == fail_line("the master's handler failed: boom"));
  CHECK(next_line(f.loop, c) == R"({"ok":true})");
}

TEST_CASE("Malformed requests are answered with a failure and the connection stays open",
          "[control]") {
  Fixture f;
  Client c(f.path);
  REQUIRE(c.send("not json\n"));
  CHECK(next_line(f.loop, c) == fail_line("malformed request: expected '{' at offset 0"));
  REQUIRE(c.send("{\"verb\":\"status\"}\n"));
  CHECK(next_line(f.loop, c) == fail_line("malformed request: no \"command\" field"));
  REQUIRE(c.send("{\"command\":7}\n"));
  CHECK(next_line(f.loop, c) == fail_line("malformed request: \"command\" is not a string"));
  REQUIRE(c.send("{\"command\":{\"x\":1}}\n"));
  CHECK(next_line(f.loop, c).starts_with(R"({"ok":false,"error":"malformed request: nested)"));
  REQUIRE(c.send("\n  \r\n{\"command\":\"status\"}\r\n"));  // blank lines ignored, CRLF taken
  REQUIRE(f.wait_held(1));
  CHECK(f.held[0].first.command == "status");
  f.held[0].second.ok();
  CHECK(next_line(f.loop, c) == R"({"ok":true})");
  CHECK_FALSE(c.eof);
}

TEST_CASE("Without a handler every request fails", "[control]") {
  FdLeakCheck fds;
  TempDir dir("prefork-control");
  EventLoop loop;
  ControlServer server(loop);
  REQUIRE_FALSE(server.listen(dir.path + "/ctl.sock"));
  Client c(dir.path + "/ctl.sock");
  REQUIRE(c.send("{\"command\":\"status\"}\n"));
  CHECK(next_line(loop, c) == fail_line("no handler for control requests"));
}

TEST_CASE("A request line over 64 KiB is refused and the connection closed", "[control]") {
  Fixture f;
  SECTION("without a newline yet") {
    Client c(f.path);
    REQUIRE(c.send(std::string(65537, ' ')));
    CHECK(next_line(f.loop, c) == fail_line("request line longer than 65536 bytes"));
    CHECK(closed_by_server(f.loop, c));
  }
  SECTION("with its newline, after a good request") {
    Client c(f.path);
    std::string big = "{\"command\":\"" + std::string(70000, 'x') + "\"}\n";
    REQUIRE(c.send("{\"command\":\"first\"}\n" + big));
    CHECK(next_line(f.loop, c) == fail_line("request line longer than 65536 bytes"));
    CHECK(closed_by_server(f.loop, c));
    REQUIRE(f.held.size() == 1);
    CHECK(f.held[0].second.closed());  // the first request's answer now goes nowhere
    f.held[0].second.ok();
  }
  SECTION("a line of exactly 65536 bytes is accepted") {
    Client c(f.path);
    std::string line = "{\"command\":\"";
    line += std::string(65536 - line.size() - 2, 'x') + "\"}";
    REQUIRE(line.size() == 65536);
    REQUIRE(c.send(line + "\n"));
    REQUIRE(f.wait_held(1));
    f.held[0].second.ok();
    CHECK(next_line(f.loop, c) == R"({"ok":true})");
  }
}

TEST_CASE("A 17th unanswered request on one connection is refused and the connection closed",
          "[control]") {
  Fixture f;
  Client c(f.path);
  std::string lines;
  for (int i = 0; i < 17; ++i) lines += "{\"command\":\"status\"}\n";
  REQUIRE(c.send(lines));
  CHECK(next_line(f.loop, c) ==
        fail_line("more than 16 unanswered requests on one connection"));
  CHECK(closed_by_server(f.loop, c));
  CHECK(f.held.size() == 16);
  for (auto& [r, reply] : f.held) CHECK(reply.closed());
}

TEST_CASE("A 65th control connection is refused while 64 wait for answers", "[control]") {
  Fixture f;
  std::vector<std::unique_ptr<Client>> clients;
  for (int i = 0; i < 64; ++i) {
    clients.push_back(std::make_unique<Client>(f.path));
    REQUIRE(clients.back()->send("{\"command\":\"reload\"}\n"));
  }
  REQUIRE(f.wait_held(64));
  Client extra(f.path);
  CHECK(next_line(f.loop, extra) == fail_line("too many control connections"));
  CHECK(closed_by_server(f.loop, extra));
  clients.pop_back();
  REQUIRE(run_until(f.loop, [&] { return f.server.connections() == 63; }));
  Client next(f.path);
  REQUIRE(next.send("{\"command\":\"status\"}\n"));
  REQUIRE(f.wait_held(65));
}

TEST_CASE("With 64 connections that trickle a partial line, a status request still gets through",
          "[control]") {
  Fixture f;
  // Each holds a partial line and sends one more byte now and then: never idle by bytes, never
  // a request. The newcomer takes the place of the one whose last request is oldest.
  std::vector<std::unique_ptr<Client>> clients;
  for (int i = 0; i < 64; ++i) {
    clients.push_back(std::make_unique<Client>(f.path));
    REQUIRE(clients.back()->send("{\"command\":"));
    REQUIRE(run_until(f.loop, [&] { return f.server.connections() == std::size_t(i) + 1; }));
  }
  for (auto& c : clients) REQUIRE(c->send(" "));
  Client status(f.path);
  REQUIRE(status.send("{\"command\":\"status\"}\n"));
  REQUIRE(f.wait_held(1));
  CHECK(f.held[0].first.command == "status");
  f.held[0].second.ok("\"pid\":1");
  CHECK(next_line(f.loop, status) == R"({"ok":true,"pid":1})");
  CHECK(f.server.connections() == 64);
  // The evicted one is told why.
  CHECK(next_line(f.loop, *clients.front()) ==
        fail_line("too many control connections: closing the one idle longest"));
  CHECK(closed_by_server(f.loop, *clients.front()));
}

TEST_CASE("A connection that trickles a partial line is closed at the idle timeout",
          "[control]") {
  Fixture f;
  f.server.set_idle_timeout(300ms);
  Client trickle(f.path);
  REQUIRE(trickle.send("{"));
  // One byte per 50 ms, for as long as the connection lasts (bounded by run_until's limit).
  auto t = f.loop.every(50ms, [&] { (void)trickle.send(" "); }, false);
  CHECK(closed_by_server(f.loop, trickle));
  f.loop.cancel(t);
  CHECK(f.held.empty());
}

TEST_CASE("An idle control connection is closed, one waiting for an answer is not",
          "[control]") {
  Fixture f;
  f.server.set_idle_timeout(50ms);
  Client idle(f.path);
  Client waiting(f.path);
  REQUIRE(waiting.send("{\"command\":\"reload\"}\n"));
  REQUIRE(f.wait_held(1));
  CHECK(closed_by_server(f.loop, idle));
  const auto until = Clock::now() + 200ms;  // several idle periods: still open
  run_until(f.loop, [&] { return Clock::now() > until; });
  waiting.pump();
  CHECK_FALSE(waiting.eof);
  f.held[0].second.ok();
  CHECK(next_line(f.loop, waiting) == R"({"ok":true})");
  CHECK(closed_by_server(f.loop, waiting));  // idle again afterwards
}

TEST_CASE("A client that does not read its replies is closed past 4 MiB of unsent output",
          "[control]") {
  Fixture f;
  const std::string blob = "\"blob\":\"" + std::string(std::size_t{1} << 20, 'x') + "\"";
  f.server.on_request([&](const ControlRequest&, ControlReply reply) { reply.ok(blob); });
  Client c(f.path);
  std::string lines;
  for (int i = 0; i < 8; ++i) lines += "{\"command\":\"status\"}\n";
  REQUIRE(c.send(lines));
  REQUIRE(run_until(f.loop, [&] { return f.server.connections() == 0; }));
  CHECK(closed_by_server(f.loop, c));
  CHECK(c.in.size() < 5 * blob.size());  // what the socket held, not every reply
}

TEST_CASE("ok() keeps a reply on one line", "[control]") {
  Fixture f;
  f.server.on_request([](const ControlRequest&, ControlReply reply) {
    reply.ok("\"a\":1,\n\"b\":2\r");
  });
  Client c(f.path);
  REQUIRE(c.send("{\"command\":\"status\"}\n"));
  CHECK(next_line(f.loop, c) == "{\"ok\":true,\"a\":1, \"b\":2 }");
}

TEST_CASE("A client that shuts down its side still gets its replies, then the connection closes",
          "[control]") {
  Fixture f;
  Client c(f.path);
  REQUIRE(c.send("{\"command\":\"reload\"}\n"));
  REQUIRE(::shutdown(c.fd.get(), SHUT_WR) == 0);
  REQUIRE(f.wait_held(1));
  f.loop.run_once(0);
  CHECK_FALSE(f.held[0].second.closed());
  f.held[0].second.ok("\"restarted\":2");
  CHECK(next_line(f.loop, c) == R"({"ok":true,"restarted":2})");
  CHECK(closed_by_server(f.loop, c));
}

TEST_CASE("A client that goes away makes its pending replies closed", "[control]") {
  Fixture f;
  {
    Client c(f.path);
    REQUIRE(c.send("{\"command\":\"reload\"}\n"));
    REQUIRE(f.wait_held(1));
  }
  REQUIRE(run_until(f.loop, [&] { return f.server.connections() == 0; }));
  CHECK(f.held[0].second.closed());
  f.held[0].second.ok();  // goes nowhere, harmlessly
  f.server.close();
  f.held.clear();  // nor does dropping it after close()
}

TEST_CASE("close() ends every connection and its pending replies go nowhere", "[control]") {
  Fixture f;
  Client c(f.path);
  REQUIRE(c.send("{\"command\":\"stop\"}\n"));
  REQUIRE(f.wait_held(1));
  f.held[0].second.ok();
  CHECK(next_line(f.loop, c) == R"({"ok":true})");
  REQUIRE(c.send("{\"command\":\"status\"}\n"));
  REQUIRE(f.wait_held(2));
  f.server.close();
  CHECK(f.held[1].second.closed());
  f.held[1].second.ok();
  CHECK(closed_by_server(f.loop, c));
  CHECK(c.in.empty());
}

TEST_CASE("stop_listening() closes the socket but open connections still get their replies",
          "[control]") {
  Fixture f;
  Client c(f.path);
  REQUIRE(c.send("{\"command\":\"upgrade\"}\n"));
  REQUIRE(f.wait_held(1));
  std::vector<int> fds;
  f.server.descriptors(fds);
  REQUIRE(fds.size() == 3);  // the listening socket, the socket file (O_PATH), the connection
  CHECK(fds[0] == f.server.native_handle());
  f.server.stop_listening();
  CHECK(f.server.native_handle() == -1);
  fds.clear();
  f.server.descriptors(fds);
  CHECK(fds.size() == 2);
  Client late(f.path);
  CHECK(late.connect_errno == ECONNREFUSED);
  f.held[0].second.ok("\"pid\":1");
  CHECK(next_line(f.loop, c) == R"({"ok":true,"pid":1})");
  CHECK(exists(f.path));
}

TEST_CASE("A full descriptor table pauses accepting, which resumes from a timer", "[control]") {
  Fixture f;
  Client c(f.path);
  rlimit old{};
  REQUIRE(::getrlimit(RLIMIT_NOFILE, &old) == 0);
  // The lowest free descriptor number: with the soft limit there, accept4 fails with EMFILE.
  int lowest = ::fcntl(0, F_DUPFD_CLOEXEC, 0);
  REQUIRE(lowest >= 0);
  ::close(lowest);
  rlimit tight = old;
  tight.rlim_cur = static_cast<rlim_t>(lowest);
  REQUIRE(::setrlimit(RLIMIT_NOFILE, &tight) == 0);
  f.loop.run_once(1000);  // the listener is readable: accept4 fails and accepting pauses
  const bool paused = !f.loop.watching(f.server.native_handle());
  REQUIRE(::setrlimit(RLIMIT_NOFILE, &old) == 0);
  CHECK(paused);
  CHECK(f.server.connections() == 0);
  REQUIRE(run_until(f.loop, [&] { return f.server.connections() == 1; }));
  CHECK(f.loop.watching(f.server.native_handle()));
}

TEST_CASE("A peer whose uid is neither the master's nor root's is refused", "[control]") {
  if (::geteuid() != 0) {
    WARN("skipped: needs root to connect as another uid (setresuid to 65534)");
    return;
  }
  Fixture f;
  REQUIRE(::chmod(f.dir.path.c_str(), 0755) == 0);
  REQUIRE(::chmod(f.path.c_str(), 0666) == 0);
  int pipe_fds[2];
  REQUIRE(::pipe2(pipe_fds, O_CLOEXEC | O_NONBLOCK) == 0);
  UniqueFd from_child(pipe_fds[0]), to_parent(pipe_fds[1]);
  std::fflush(nullptr);
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    // The child: never returns into Catch2; everything it reports goes through the pipe.
    std::string got = "setresuid failed";
    if (::setresuid(65534, 65534, 65534) == 0) {
      UniqueFd s(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
      socklen_t len;
      sockaddr_un un = unix_address(f.path, len);
      if (::connect(s.get(), reinterpret_cast<sockaddr*>(&un), len) != 0) {
        got = std::string("connect: ") + std::strerror(errno);
      } else {
        (void)!::send(s.get(), "{\"command\":\"stop\"}\n", 19, MSG_NOSIGNAL);
        got.clear();
        char buf[512];
        pollfd p{s.get(), POLLIN, 0};
        while (got.find('\n') == std::string::npos && ::poll(&p, 1, 20000) > 0) {
          ssize_t n = ::recv(s.get(), buf, sizeof buf, 0);
          if (n <= 0) break;
          got.append(buf, static_cast<std::size_t>(n));
        }
      }
    }
    prefork::detail::write_all(to_parent.get(), got.data(), got.size());
    ::_exit(0);
  }
  to_parent.reset();
  std::string reported;
  bool child_done = false;
  run_until(f.loop, [&] {
    char buf[512];
    ssize_t n = ::read(from_child.get(), buf, sizeof buf);
    if (n > 0) reported.append(buf, static_cast<std::size_t>(n));
    else if (n == 0) child_done = true;
    return child_done;
  });
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  CHECK(WIFEXITED(status));
  CHECK(reported == fail_line("permission denied: uid 65534 is not the master's uid 0 or root") +
                        "\n");
  CHECK(f.held.empty());
  CHECK(f.server.connections() == 0);
}

// ------------------------------------------------------------------------------------------
// The client: control_call and control_main
// ------------------------------------------------------------------------------------------

namespace {

// A master stand-in on its own thread: status, scale and stop succeed, reload fails, "slow"
// never answers; stop closes the server after its reply.
struct ThreadedMaster {
  TempDir dir{"prefork-control"};
  std::string path = dir.path + "/ctl.sock";
  EventLoop loop;
  ControlServer server{loop};
  std::vector<ControlReply> kept;
  std::atomic<bool> quit{false};
  std::thread thread;

  ThreadedMaster() {
    REQUIRE(!dir.path.empty());
    REQUIRE_FALSE(server.listen(path));
    server.on_request([this](const ControlRequest& r, ControlReply reply) {
      if (r.command == "status") {
        reply.ok("\"workers\":[{\"id\":1,\"pid\":42}]");
      } else if (r.command == "scale") {
        reply.ok("\"workers\":" + r.fields.at("workers").text);
      } else if (r.command == "reload") {
        reply.fail("a rolling restart is already running");
      } else if (r.command == "stop") {
        reply.ok();
        loop.post([this] { server.close(); });
      } else if (r.command == "upgrade") {
        reply.fail("bad \"upgrade\"\nline");
      } else {
        kept.push_back(reply);
      }
    });
    thread = std::thread([this] {
      while (!quit) loop.run_once(10);
      server.close();
      kept.clear();
    });
  }
  ~ThreadedMaster() {
    quit = true;
    thread.join();
  }
};

struct Captured {
  int code = -1;
  std::string out, err;
};

Captured ctl(const std::string& path, std::vector<std::string> words) {
  char* out_buf = nullptr;
  char* err_buf = nullptr;
  std::size_t out_len = 0, err_len = 0;
  std::FILE* out = ::open_memstream(&out_buf, &out_len);
  std::FILE* err = ::open_memstream(&err_buf, &err_len);
  Captured c;
  c.code = prefork::control_main(path, words, out, err, "hello");
  std::fclose(out);
  std::fclose(err);
  c.out.assign(out_buf, out_len);
  c.err.assign(err_buf, err_len);
  std::free(out_buf);
  std::free(err_buf);
  return c;
}

}  // namespace

TEST_CASE("control_call reports a missing master, a stale socket and a timeout", "[control]") {
  FdLeakCheck fds;
  TempDir dir("prefork-control");
  const std::string path = dir.path + "/ctl.sock";
  std::error_code ec;
  CHECK(prefork::detail::control_call(path, "{\"command\":\"status\"}", 1s, ec).empty());
  CHECK(ec == std::errc::no_such_file_or_directory);
  make_stale_socket(path);
  CHECK(prefork::detail::control_call(path, "{\"command\":\"status\"}", 1s, ec).empty());
  CHECK(ec == std::errc::connection_refused);
  ::unlink(path.c_str());
  // A socket that listens and never answers (nobody accepts): the client gives up in time.
  UniqueFd silent(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  socklen_t len;
  sockaddr_un un = unix_address(path, len);
  REQUIRE(::bind(silent.get(), reinterpret_cast<sockaddr*>(&un), len) == 0);
  REQUIRE(::listen(silent.get(), 4) == 0);
  CHECK(prefork::detail::control_call(path, "{\"command\":\"status\"}", 100ms, ec).empty());
  CHECK(ec == std::errc::timed_out);
  CHECK(prefork::detail::control_call(std::string(200, 'x'), "{}", 100ms, ec).empty());
  CHECK(ec == std::errc::filename_too_long);
}

TEST_CASE("control_call reports a connection that ends without a reply line", "[control]") {
  FdLeakCheck fds;
  TempDir dir("prefork-control");
  const std::string path = dir.path + "/ctl.sock";
  UniqueFd listener(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  socklen_t len;
  sockaddr_un un = unix_address(path, len);
  REQUIRE(::bind(listener.get(), reinterpret_cast<sockaddr*>(&un), len) == 0);
  REQUIRE(::listen(listener.get(), 4) == 0);
  std::thread half_answer([&] {
    UniqueFd conn(::accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC));
    char buf[256];
    (void)!::recv(conn.get(), buf, sizeof buf, 0);
    (void)!::send(conn.get(), "{\"ok\":tr", 8, MSG_NOSIGNAL);
  });
  std::error_code ec;
  CHECK(prefork::detail::control_call(path, "{\"command\":\"status\"}", 20s, ec).empty());
  half_answer.join();
  CHECK(ec == std::errc::bad_message);
}

TEST_CASE("control_call returns the reply line and can wait for the master to close", "[control]") {
  FdLeakCheck fds;
  ThreadedMaster m;
  std::error_code ec;
  CHECK(prefork::detail::control_call(m.path, "{\"command\":\"status\"}", 20s, ec) ==
        R"({"ok":true,"workers":[{"id":1,"pid":42}]})");
  CHECK_FALSE(ec);
  CHECK(prefork::detail::control_call(m.path, "{\"command\":\"slow\"}", 100ms, ec).empty());
  CHECK(ec == std::errc::timed_out);
  CHECK(prefork::detail::control_call(m.path, "{\"command\":\"stop\"}", 20s, ec, 20s) ==
        R"({"ok":true})");
  CHECK_FALSE(ec);
}

TEST_CASE("control_main prints the reply and exits 0 when the master says ok", "[control]") {
  FdLeakCheck fds;
  ThreadedMaster m;
  auto status = ctl(m.path, {"status"});
  CHECK(status.code == 0);
  CHECK(status.out == "{\"ok\":true,\"workers\":[{\"id\":1,\"pid\":42}]}\n");
  CHECK(status.err.empty());
  auto scale = ctl("/nonexistent/ignored.sock", {"scale", "3", "--control", m.path});
  CHECK(scale.code == 0);
  CHECK(scale.out == "{\"ok\":true,\"workers\":3}\n");
  auto stop = ctl(m.path, {"--control=" + m.path, "stop"});
  CHECK(stop.code == 0);
  CHECK(stop.out == "{\"ok\":true}\n");
  CHECK(stop.err.empty());
}

TEST_CASE("control_main exits 1 with the master's error or when no master listens",
          "[control]") {
  FdLeakCheck fds;
  ThreadedMaster m;
  auto reload = ctl(m.path, {"reload"});
  CHECK(reload.code == 1);
  CHECK(reload.out.empty());
  CHECK(reload.err == "hello: ctl reload: a rolling restart is already running\n");
  auto upgrade = ctl(m.path, {"upgrade"});
  CHECK(upgrade.code == 1);
  CHECK(upgrade.err == "hello: ctl upgrade: bad \"upgrade\"\nline\n");
  const std::string missing = m.dir.path + "/none.sock";
  auto none = ctl(missing, {"status"});
  CHECK(none.code == 1);
  CHECK(none.err == "hello: ctl: no master is listening on " + missing +
                        " (No such file or directory)\n");
}

TEST_CASE("control_main exits 2 with a usage line for bad words", "[control]") {
  FdLeakCheck fds;
  const std::string usage =
      "usage: hello ctl status|reload|scale N|stop|upgrade [--control PATH]\n";
  for (std::vector<std::string> words : std::vector<std::vector<std::string>>{
           {}, {"restart"}, {"scale"}, {"scale", "0"}, {"scale", "4097"}, {"scale", "3x"},
           {"scale", "-1"}, {"scale", "2", "3"}, {"status", "now"}, {"--control"}}) {
    CAPTURE(words);
    auto r = ctl("/nonexistent/ctl.sock", words);
    CHECK(r.code == 2);
    CHECK(r.err == usage);
    CHECK(r.out.empty());
  }
  CHECK(ctl("/nonexistent/ctl.sock", {"scale", "4096"}).code == 1);  // valid: no master there
}

TEST_CASE("default_control_path is private to the user and refuses a squatted directory",
          "[control]") {
  FdLeakCheck fds;
  TempDir dir("prefork-control");
  const char* saved = std::getenv("XDG_RUNTIME_DIR");
  std::optional<std::string> old = saved ? std::optional<std::string>(saved) : std::nullopt;
  REQUIRE(::setenv("XDG_RUNTIME_DIR", dir.path.c_str(), 1) == 0);
  std::string path = prefork::default_control_path("hello");
  CHECK(path == dir.path + "/prefork/hello.sock");
  struct stat st {};
  REQUIRE(::lstat((dir.path + "/prefork").c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0700);
  CHECK(prefork::default_control_path("hello") == path);  // the directory exists now: fine
  REQUIRE(::chmod((dir.path + "/prefork").c_str(), 0777) == 0);
  CHECK_THROWS_AS(prefork::default_control_path("hello"), std::system_error);
  REQUIRE(::rmdir((dir.path + "/prefork").c_str()) == 0);
  REQUIRE(::symlink(dir.path.c_str(), (dir.path + "/prefork").c_str()) == 0);
  CHECK_THROWS_AS(prefork::default_control_path("hello"), std::system_error);
  if (::geteuid() == 0) {
    REQUIRE(::unlink((dir.path + "/prefork").c_str()) == 0);
    REQUIRE(::mkdir((dir.path + "/prefork").c_str(), 0700) == 0);
    REQUIRE(::chown((dir.path + "/prefork").c_str(), 65534, 65534) == 0);
    CHECK_THROWS_WITH(prefork::default_control_path("hello"),
                      Catch::Contains("is owned by uid 65534"));
  }
  for (const char* bad : {"", ".", "..", "a/b", "/x"})
    CHECK_THROWS_AS(prefork::default_control_path(bad), std::invalid_argument);
  // Without a usable XDG_RUNTIME_DIR: /tmp/prefork-<uid>.
  REQUIRE(::setenv("XDG_RUNTIME_DIR", (dir.path + "/missing").c_str(), 1) == 0);
  CHECK(prefork::default_control_path("hello") ==
        "/tmp/prefork-" + std::to_string(::geteuid()) + "/hello.sock");
  if (old) ::setenv("XDG_RUNTIME_DIR", old->c_str(), 1);
  else ::unsetenv("XDG_RUNTIME_DIR");
}
