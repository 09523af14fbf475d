// examples/common/http.hpp's deferred answers (Response::defer(), http::Responder) over real
// sockets: completed later from a timer or from another connection's handler, or inside the
// handler itself; pipelined requests behind a deferred answer wait and are answered in order;
// a handler that defers and keeps no Responder gets 500; request_timeout answers 504; and a
// completion after the client reset its connection, after the timeout or after the Server was
// destroyed does nothing. drain() waits for a deferred answer in progress.
//
// The server runs in a harness child: its own EventLoop, a listening socket the test made, and
// an http::Server whose handler does what the path says (see serve()). The test is a client.
#include <catch2/catch.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <charconv>
#include <chrono>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "common/http.hpp"
#include "harness.hpp"
#include "http_client.hpp"

using namespace prefork_test;

namespace {

// The child's server. Paths:
//   /sync          answers "sync" at once (the synchronous path, for comparison)
//   /later/<ms>    sets X-Before, defers, then fills the handler's Response (ignored), and
//                  answers "later <ms>" from a timer <ms> later
//   /now           defers and completes inside the handler: "now"
//   /drop          defers and keeps no Responder (500)
//   /throw         defers, keeps the Responder, then throws (500)
//   /hold          defers and keeps the Responder in `held`
//   /waiting       "<held still waiting> <Server::deferred()>"
//   /release       completes every held Responder with "released": "released <were waiting>"
//   /drain         Server::drain(): the child exits 0 once its loop has nothing left
//   /destroy       "destroying", then destroys the Server with held answers outstanding:
//                  completes the first held one just before, the others just after; exits 0
//                  if none of them is waiting any more (3 otherwise)
int serve(int listen_fd, http::Limits limits) {
  prefork::EventLoop loop;
  std::optional<http::Server> server;
  std::vector<http::Responder> held;
  std::optional<int> exit_code;
  auto still_waiting = [&] {
    std::size_t n = 0;
    for (auto& r : held) n += r.waiting();
    return n;
  };
  server.emplace(loop, [&](const http::Request& req, http::Response& res) {
    std::string_view path = req.path();
    if (path == "/sync") {
      res.body = "sync\n";
    } else if (path.starts_with("/later/")) {
      int ms = 0;
      std::from_chars(path.data() + 7, path.data() + path.size(), ms);
      res.set_header("X-Before", "kept");
      http::Responder r = res.defer();
      res.body = "ignored\n";
      loop.after(std::chrono::milliseconds(ms),
                 [r, ms] { r.send(200, "later " + std::to_string(ms) + "\n"); });
    } else if (path == "/now") {
      res.defer().send(200, "now\n");
    } else if (path == "/drop") {
      res.defer();
    } else if (path == "/throw") {
      held.push_back(res.defer());
      throw std::runtime_error("thrown after defer()");
    } else if (path == "/hold") {
      held.push_back(res.defer());
    } else if (path == "/waiting") {
      res.body = std::to_string(still_waiting()) + " " + std::to_string(server->deferred()) + "\n";
    } else if (path == "/release") {
      std::size_t n = still_waiting();
      for (auto& r : held) r.send(200, "released\n");
      held.clear();
      res.body = "released " + std::to_string(n) + "\n";
    } else if (path == "/drain") {
      server->drain();
      res.body = "draining\n";
    } else if (path == "/destroy") {
      res.body = "destroying\n";
      loop.post([&] {
        if (!held.empty()) held.front().send(200, "posted, then destroyed\n");
        server.reset();
        for (auto& r : held) r.send(200, "too late\n");
        exit_code = still_waiting() == 0 ? 0 : 3;
      });
    } else {
      res.status = 404;
    }
  }, limits);
  loop.watch(listen_fd, EPOLLIN, [&](std::uint32_t) {
    for (;;) {
      int fd = ::accept4(listen_fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) return;
      if (!server) {
        ::close(fd);
        continue;
      }
      server->adopt(prefork::Connection(prefork::UniqueFd(fd), {}));
    }
  }, false);
  for (;;) {
    loop.run_once(-1);
    if (exit_code) {
      loop.run_once(0);  // the completion posted before the Server went: it must do nothing
      return *exit_code;
    }
    if (server && server->draining() && !loop.alive()) return 0;
  }
}

/// The server above in a harness child, listening on 127.0.0.1 at a port of the kernel's
/// choosing; killed and reaped on destruction unless the test waited for it.
class AsyncServerChild {
 public:
  explicit AsyncServerChild(http::Limits limits = {}) {
    prefork::UniqueFd listener(::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (!listener || ::bind(listener.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
        ::listen(listener.get(), 64) != 0 ||
        ::getsockname(listener.get(), reinterpret_cast<sockaddr*>(&a), &len) != 0)
      return;
    port_ = ntohs(a.sin_port);
    int fd = listener.get();
    pid_ = fork_harness([fd, limits] { return serve(fd, limits); });
  }
  AsyncServerChild(const AsyncServerChild&) = delete;
  AsyncServerChild& operator=(const AsyncServerChild&) = delete;
  ~AsyncServerChild() {
    if (pid_ > 0 && !status_) kill_and_reap(pid_);
  }

  pid_t pid() const noexcept { return pid_; }
  int port() const noexcept { return port_; }
  std::optional<int> wait(Clock::time_point deadline) {
    if (!status_) status_ = wait_child(pid_, deadline);
    return status_;
  }

 private:
  pid_t pid_ = -1;
  int port_ = 0;
  std::optional<int> status_;
};

/// One answer with its head, for the checks on fields.
struct Answer {
  int status = 0;  ///< 0: none (see error)
  std::string head, body, error;
  bool close = false;  ///< "Connection: close"

  bool has_field(std::string_view line) const {
    return head.find("\r\n" + std::string(line) + "\r\n") != std::string::npos;
  }
};

std::string request(std::string_view method, std::string_view path, std::string_view extra = {}) {
  return std::string(method) + " " + std::string(path) + " HTTP/1.1\r\nHost: test\r\n" +
         std::string(extra) + "\r\n";
}

/// One connection to the child; reads time out after kDeadline (HttpClient::connect).
class Client {
 public:
  explicit Client(int port) { connected_ = http_.connect("127.0.0.1:" + std::to_string(port)); }

  bool send(std::string_view bytes) { return connected_ && write_all(http_.fd(), bytes); }

  /// The next answer; `head_only` for the answer to a HEAD request (a length, no body).
  Answer read(bool head_only = false) {
    Answer a;
    std::size_t end;
    while ((end = buf_.find("\r\n\r\n")) == std::string::npos)
      if (!fill(a)) return a;
    a.head = buf_.substr(0, end + 2);
    if (!a.head.starts_with("HTTP/1.1 ") || a.head.size() < 12) {
      a.error = "no status line in '" + a.head + "'";
      return a;
    }
    std::size_t length = 0;
    if (auto at = a.head.find("\r\nContent-Length: "); at != std::string::npos)
      length = std::strtoul(a.head.c_str() + at + 18, nullptr, 10);
    a.close = a.has_field("Connection: close");
    if (head_only) length = 0;
    while (buf_.size() < end + 4 + length)
      if (!fill(a)) return a;
    a.status = std::atoi(a.head.substr(9, 3).c_str());
    a.body = buf_.substr(end + 4, length);
    buf_.erase(0, end + 4 + length);
    return a;
  }

  /// True when the server closed the connection (EOF) with nothing more to read.
  bool at_eof() {
    Answer a;
    return buf_.empty() && !fill(a) && a.error == "EOF";
  }

  /// True if bytes (or EOF) are there to read right now.
  bool readable_now() {
    pollfd p{http_.fd(), POLLIN, 0};
    return !buf_.empty() || ::poll(&p, 1, 0) > 0;
  }

  /// Closes with RST (SO_LINGER 0) rather than FIN: the client is gone, not half-closed.
  void reset() {
    linger l{1, 0};
    ::setsockopt(http_.fd(), SOL_SOCKET, SO_LINGER, &l, sizeof l);
    http_ = HttpClient{};
    connected_ = false;
  }

 private:
  bool fill(Answer& a) {
    char chunk[4096];
    for (;;) {
      ssize_t n = ::recv(http_.fd(), chunk, sizeof chunk, 0);
      if (n > 0) {
        buf_.append(chunk, static_cast<std::size_t>(n));
        return true;
      }
      if (n < 0 && errno == EINTR) continue;
      a.error = n == 0 ? "EOF" : std::string("recv: ") + std::strerror(errno);
      if (!buf_.empty()) a.error += " after '" + buf_ + "'";
      return false;
    }
  }

  HttpClient http_;
  bool connected_ = false;
  std::string buf_;
};

/// GET path on a connection of its own, with Connection: close.
Answer fetch(int port, std::string_view path) {
  Client c(port);
  c.send(request("GET", path, "Connection: close\r\n"));
  return c.read();
}

/// Asks /waiting until it answers `expected`; false at the deadline.
bool wait_for_waiting(int port, const std::string& expected) {
  auto deadline = Clock::now() + kDeadline;
  std::string last;
  while (Clock::now() < deadline) {
    last = fetch(port, "/waiting").body;
    if (last == expected) return true;
  }
  UNSCOPED_INFO("/waiting answered '" << last << "', not '" << expected << "'");
  return false;
}

}  // namespace

TEST_CASE("A deferred answer completed from a timer is sent with the fields set before defer()",
          "[http][async]") {
  std::size_t fds_before = count_open_fds();
  {
    AsyncServerChild child;
    REQUIRE(child.pid() > 0);
    Client c(child.port());
    REQUIRE(c.send(request("GET", "/later/20")));
    Answer a = c.read();
    INFO(a.head << a.body << a.error);
    CHECK(a.status == 200);
    CHECK(a.body == "later 20\n");  // not what the handler wrote into its Response after defer()
    CHECK(a.has_field("X-Before: kept"));
    CHECK_FALSE(a.close);
    // Keep-alive goes on: the next request on the connection is served.
    REQUIRE(c.send(request("GET", "/sync")));
    CHECK(c.read().body == "sync\n");
    // HTTP/1.0 without keep-alive: answered with Connection: close, then closed.
    Client old(child.port());
    REQUIRE(old.send("GET /later/0 HTTP/1.0\r\n\r\n"));
    Answer b = old.read();
    CHECK(b.status == 200);
    CHECK(b.close);
    CHECK(old.at_eof());
    CHECK(fetch(child.port(), "/waiting").body == "0 0\n");
  }
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("Requests pipelined behind a deferred answer wait for it and are answered in order",
          "[http][async]") {
  AsyncServerChild child;
  REQUIRE(child.pid() > 0);
  Client c(child.port());
  // One write: the server reads them all at once and must answer them in this order although
  // the first answer comes 100 ms after the later ones could have.
  REQUIRE(c.send(request("GET", "/later/100") + request("GET", "/sync") + request("GET", "/now") +
                 request("HEAD", "/later/5") + request("GET", "/later/0") +
                 request("GET", "/sync", "Connection: close\r\n")));
  std::vector<std::string> bodies;
  for (int i = 0; i < 6; ++i) {
    Answer a = c.read(i == 3);
    INFO("answer " << i << ": " << a.head << a.body << a.error);
    REQUIRE(a.status == 200);
    bodies.push_back(a.body);
    if (i == 3) CHECK(a.has_field("Content-Length: 8"));  // HEAD: the length of "later 5\n"
  }
  CHECK(bodies ==
        std::vector<std::string>{"later 100\n", "sync\n", "now\n", "", "later 0\n", "sync\n"});
  CHECK(c.at_eof());
}

TEST_CASE("A handler that defers and keeps no Responder, or throws after defer(), gets 500",
          "[http][async]") {
  AsyncServerChild child;
  REQUIRE(child.pid() > 0);
  for (const char* path : {"/drop", "/throw"}) {
    INFO(path);
    Answer a = fetch(child.port(), path);
    CHECK(a.status == 500);
    CHECK(a.close);
  }
  // The Responder /throw kept is not waiting: completing it does nothing.
  CHECK(fetch(child.port(), "/waiting").body == "0 0\n");
  CHECK(fetch(child.port(), "/release").body == "released 0\n");
  CHECK(fetch(child.port(), "/sync").body == "sync\n");
}

TEST_CASE("A deferred answer not completed within request_timeout is answered 504, and a later "
          "completion does nothing",
          "[http][async]") {
  http::Limits limits;
  limits.request_timeout = std::chrono::milliseconds(300);
  AsyncServerChild child(limits);
  REQUIRE(child.pid() > 0);
  Client c(child.port());
  REQUIRE(c.send(request("GET", "/hold") + request("GET", "/sync")));
  Answer a = c.read();
  INFO(a.head << a.body << a.error);
  CHECK(a.status == 504);
  CHECK(a.close);
  CHECK(c.at_eof());  // the pipelined /sync is never answered: the connection is closed
  CHECK(fetch(child.port(), "/waiting").body == "0 0\n");
  CHECK(fetch(child.port(), "/release").body == "released 0\n");
  CHECK(fetch(child.port(), "/sync").body == "sync\n");
}

TEST_CASE("Completing a deferred answer after the client reset its connection does nothing",
          "[http][async]") {
  AsyncServerChild child;
  REQUIRE(child.pid() > 0);
  std::optional<Client> gone(std::in_place, child.port());
  REQUIRE(gone->send(request("GET", "/hold")));
  REQUIRE(wait_for_waiting(child.port(), "1 1\n"));
  gone->reset();
  // The server notices the reset (EPOLLHUP) although it reads nothing while it waits.
  REQUIRE(wait_for_waiting(child.port(), "0 0\n"));
  CHECK(fetch(child.port(), "/release").body == "released 0\n");
  CHECK(fetch(child.port(), "/sync").body == "sync\n");
}

TEST_CASE("A Responder completed from another connection's handler answers its own connection",
          "[http][async]") {
  AsyncServerChild child;
  REQUIRE(child.pid() > 0);
  Client a(child.port()), b(child.port());
  REQUIRE(a.send(request("GET", "/hold")));
  REQUIRE(b.send(request("GET", "/hold")));
  REQUIRE(wait_for_waiting(child.port(), "2 2\n"));
  CHECK_FALSE(a.readable_now());
  CHECK(fetch(child.port(), "/release").body == "released 2\n");
  for (Client* c : {&a, &b}) {
    Answer r = c->read();
    CHECK(r.status == 200);
    CHECK(r.body == "released\n");
    CHECK_FALSE(r.close);
  }
  // Both connections serve their next request.
  REQUIRE(a.send(request("GET", "/now")));
  CHECK(a.read().body == "now\n");
}

TEST_CASE("drain() waits for a deferred answer in progress, which then closes its connection",
          "[http][async]") {
  std::size_t fds_before = count_open_fds();
  {
    AsyncServerChild child;
    REQUIRE(child.pid() > 0);
    Client a(child.port());
    REQUIRE(a.send(request("GET", "/hold")));
    REQUIRE(wait_for_waiting(child.port(), "1 1\n"));
    Answer d = fetch(child.port(), "/drain");
    CHECK(d.body == "draining\n");
    CHECK(d.close);
    // The held answer keeps the drained server's loop alive: the child cannot exit before
    // the answer is sent, and the connection is neither answered nor closed meanwhile.
    CHECK_FALSE(child.wait(Clock::now()).has_value());
    CHECK_FALSE(a.readable_now());
    CHECK(fetch(child.port(), "/release").body == "released 1\n");
    Answer r = a.read();
    CHECK(r.status == 200);
    CHECK(r.body == "released\n");
    CHECK(r.close);  // draining: every answer closes its connection
    CHECK(a.at_eof());
    auto status = child.wait(Clock::now() + kDeadline);
    REQUIRE(status.has_value());
    CHECK(WIFEXITED(*status));
    CHECK(WEXITSTATUS(*status) == 0);
  }
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("Destroying the Server with deferred answers outstanding makes completing them a no-op",
          "[http][async]") {
  AsyncServerChild child;
  REQUIRE(child.pid() > 0);
  Client a(child.port()), b(child.port());
  REQUIRE(a.send(request("GET", "/hold")));
  REQUIRE(b.send(request("GET", "/hold")));
  REQUIRE(wait_for_waiting(child.port(), "2 2\n"));
  CHECK(fetch(child.port(), "/destroy").body == "destroying\n");
  // The connections close unanswered (the destructor answers nobody), the completions after
  // it find nothing to answer, and the child exits 0 (3 if a Responder still waited).
  for (Client* c : {&a, &b}) {
    Answer r = c->read();
    CHECK(r.status == 0);
    CHECK(r.error == "EOF");
  }
  auto status = child.wait(Clock::now() + kDeadline);
  REQUIRE(status.has_value());
  CHECK(WIFEXITED(*status));
  CHECK(WEXITSTATUS(*status) == 0);
}
