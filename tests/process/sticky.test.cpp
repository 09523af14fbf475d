// Sticky sessions by cookie with real forked workers and real sockets: a cookie that names a
// slot, a key a worker bound, both across the owning worker's crash; the fallback when nobody
// owns the key or its slot has no worker; and the master's bounded wait for a client's first
// bytes: a silent client delays nobody, is handed over at its deadline, and is not lost at
// shutdown; a client that closes while waiting is closed; a head split over several writes or
// longer than the peek limit reaches its worker whole.
//
// The master runs in a harness child (RemoteMaster); the test process is only a client.
#include <catch2/catch.hpp>

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "common/http.hpp"
#include "harness.hpp"
#include "http_client.hpp"
#include "remote_master.hpp"

using namespace prefork_test;
using prefork::Options;

namespace {

/// Answers every request with "slot <slot> pid <pid>\n"; GET /bind?<key> first binds <key> to
/// this worker's slot. Tells the master "connection <client port>" for every connection it
/// gets, so that a test sees when (and to whom) the master handed one over.
struct StickyServer : Puppet {
  explicit StickyServer(prefork::WorkerContext<>& ctx)
      : Puppet(ctx),
        body_("slot " + std::to_string(ctx.slot()) + " pid " + std::to_string(ctx.pid()) + "\n"),
        http_(ctx.loop(), [this](const http::Request& req, http::Response& res) {
          if (req.path() == "/bind" && ctx_.bind_session(req.query())) {
            res.status = 500;
            return;
          }
          res.body = body_;
        }) {}

  void on_connection(prefork::Connection c) {
    std::string peer = c.peer();
    ctx_.send("connection " + peer.substr(peer.rfind(':') + 1));
    http_.adopt(std::move(c));
  }
  void on_drain() { http_.drain(); }

  std::string body_;
  http::Server http_;
};

using Master = RemoteMaster<StickyServer, prefork::StickyCookie>;
using ClusterT = Master::ClusterT;

/// Who answered; slot and pid are -1 unless the answer was a 200 with exactly that body.
struct Served {
  long slot = -1;
  long pid = -1;
  std::string error;
};

Served served_by(const HttpResult& r) {
  Served s;
  long slot = -1, pid = -1;
  if (r.status == 200 && std::sscanf(r.body.c_str(), "slot %ld pid %ld", &slot, &pid) == 2 &&
      r.body == "slot " + std::to_string(slot) + " pid " + std::to_string(pid) + "\n") {
    s.slot = slot;
    s.pid = pid;
  } else {
    s.error = "status " + std::to_string(r.status) + " " + r.error + " body '" + r.body + "'";
  }
  return s;
}

std::string request(const std::string& cookie, const std::string& path = "/") {
  return "GET " + path + " HTTP/1.1\r\nHost: localhost\r\n" +
         (cookie.empty() ? std::string() : "Cookie: " + cookie + "\r\n") +
         "Connection: close\r\n\r\n";
}

/// One request on a new connection, carrying `cookie` (none if empty).
Served get(const std::string& address, const std::string& cookie, const std::string& path = "/") {
  HttpClient c;
  if (c.connect(address)) write_all(c.fd(), request(cookie, path));
  return served_by(c.receive());
}

/// The client's own port, as the worker reports it ("connection <port>").
std::string local_port(int fd) {
  sockaddr_in a{};
  socklen_t len = sizeof a;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) return "?";
  return std::to_string(ntohs(a.sin_port));
}

/// Waits for the worker report that it got the connection from `port`; the worker's id.
unsigned expect_connection(Master& master, const std::string& port) {
  for (;;) {
    auto w = words(master.expect("message "));
    if (w.size() == 4 && w[2] == "connection" && w[3] == port)
      return static_cast<unsigned>(std::stoul(w[1]));
  }
}

/// Reports already in whether a worker got the connection from `port`.
bool reported_connection(Master& master, const std::string& port) {
  bool seen = false;
  while (auto line = master.arrived()) {
    auto w = words(*line);
    if (w.size() == 4 && w[0] == "message" && w[2] == "connection" && w[3] == port) seen = true;
  }
  return seen;
}

Options listening_on(unsigned workers) {
  return Options{.workers = workers, .listen = {"127.0.0.1:0"}, .handle_signals = false};
}

/// Sets the master's peek limits before run(), and answers "stats" with
/// "stats <by key> <fallback>".
Master::Setup with_limits(prefork::PeekLimits limits) {
  return [limits](ClusterT& c, const Master::Say&) { c.master().balance().set_peek_limits(limits); };
}
Master::Extra stats_command() {
  return [](ClusterT& c, const std::vector<std::string>& w, const Master::Say& say) {
    if (w[0] != "stats") return false;
    auto s = c.master().balance().stats();
    say("stats " + std::to_string(s.by_key) + " " + std::to_string(s.fallback));
    return true;
  };
}
struct Stats {
  long by_key = -1, fallback = -1;
};
Stats stats(Master& master) {
  master.command("stats");
  auto w = words(master.expect("stats "));
  REQUIRE(w.size() == 3);
  return {std::stol(w[1]), std::stol(w[2])};
}

/// The master's open descriptors once it holds no client socket beyond `baseline`: workers
/// acknowledge connections on their channel, so the master may close its copies a little after
/// the answers went out. Asks after each of the master's loop rounds, up to the deadline.
long extra_master_fds(Master& master, std::size_t baseline) {
  const auto deadline = Clock::now() + kDeadline;
  long extra = 0;
  do {
    master.sync();
    extra = static_cast<long>(master.master_fds()) - static_cast<long>(baseline);
  } while (extra > 0 && Clock::now() < deadline);
  return extra;
}

bool exited_zero(const std::optional<int>& status) {
  return status && WIFEXITED(*status) && WEXITSTATUS(*status) == 0;
}

constexpr prefork::PeekLimits kLongWait{.timeout = std::chrono::seconds(60)};

}  // namespace

TEST_CASE("A cookie that names slot k brings every new connection to slot k's worker",
          "[sticky]") {
  FdLeakCheck fds;
  Master master(listening_on(4), {}, {}, stats_command());
  REQUIRE(master.pid() > 0);
  std::vector<Listening> ready = master.expect_listening(4);
  const std::string address = ready[0].addresses.at(0);
  const std::size_t baseline = master.master_fds();

  for (int round = 0; round < 6; ++round) {
    for (std::size_t k = 0; k < 4; ++k) {
      Served s = get(address, "theme=dark; sid=" + prefork::slot_key(k, "c0ffee"));
      INFO("round " << round << " slot " << k << " " << s.error);
      CHECK(s.slot == static_cast<long>(k));
      CHECK(s.pid == ready[k].pid);
    }
    Served keyless = get(address, "");  // round-robin in between does not disturb it
    INFO(keyless.error);
    CHECK(keyless.pid > 0);
  }
  Stats st = stats(master);
  CHECK(st.by_key == 24);
  CHECK(st.fallback == 6);
  CHECK(extra_master_fds(master, baseline) == 0);
  CHECK(exited_zero(master.finish()));
}

TEST_CASE("A key a worker bound brings every new connection that carries it to that worker",
          "[sticky]") {
  FdLeakCheck fds;
  Master master(listening_on(3), {}, {}, stats_command());
  REQUIRE(master.pid() > 0);
  std::vector<Listening> ready = master.expect_listening(3);
  const std::string address = ready[0].addresses.at(0);

  std::set<long> binders;
  for (int t = 0; t < 3; ++t) {
    const std::string token = "token" + std::to_string(t);
    Served owner = get(address, "", "/bind?" + token);  // whoever round-robin picks binds it
    INFO(token << " bound by: " << owner.error);
    REQUIRE(owner.pid > 0);
    binders.insert(owner.slot);
    for (int i = 0; i < 10; ++i) {
      Served s = get(address, "sid=" + token);
      INFO(token << " request " << i << " " << s.error);
      CHECK(s.slot == owner.slot);
      CHECK(s.pid == owner.pid);
    }
  }
  CHECK(binders.size() == 3);  // round-robin gave each token to another slot
  CHECK(stats(master).by_key == 30);
  CHECK(exited_zero(master.finish()));
}

TEST_CASE("After a slot's worker is killed its replacement gets the traffic of the slot's keys",
          "[sticky]") {
  FdLeakCheck fds;
  Master master(listening_on(2));
  REQUIRE(master.pid() > 0);
  std::vector<Listening> ready = master.expect_listening(2);
  const std::string address = ready[0].addresses.at(0);

  Served owner = get(address, "", "/bind?alice");
  REQUIRE(owner.pid > 0);
  const long k = owner.slot;
  const std::string named = "sid=" + prefork::slot_key(static_cast<std::size_t>(k));
  for (int i = 0; i < 5; ++i) {
    CHECK(get(address, "sid=alice").pid == owner.pid);
    CHECK(get(address, named).pid == owner.pid);
  }

  REQUIRE(::kill(static_cast<pid_t>(owner.pid), SIGKILL) == 0);
  auto exit = parse_exit(master.expect("exit "));
  REQUIRE(exit.has_value());
  CHECK(exit->pid == owner.pid);
  std::vector<Listening> replacement = master.expect_listening(1);
  REQUIRE(replacement[0].slot == static_cast<std::size_t>(k));
  CHECK(replacement[0].pid != owner.pid);

  for (int i = 0; i < 10; ++i) {
    Served bound = get(address, "sid=alice");
    Served by_name = get(address, named);
    INFO("request " << i << " after the crash: " << bound.error << by_name.error);
    CHECK(bound.slot == k);
    CHECK(bound.pid == replacement[0].pid);
    CHECK(by_name.pid == replacement[0].pid);
  }
  CHECK(exited_zero(master.finish()));
}

TEST_CASE("A key whose slot has no ready worker, or that nobody owns, goes to the fallback",
          "[sticky]") {
  FdLeakCheck fds;
  Master master(listening_on(2), {}, {}, stats_command());
  REQUIRE(master.pid() > 0);
  std::vector<Listening> ready = master.expect_listening(2);
  const std::string address = ready[0].addresses.at(0);

  // Bind a key to slot 1, then stop slot 1's worker on purpose: RestartOnCrash leaves the
  // slot empty.
  Served owner;
  for (int i = 0; i < 4 && owner.slot != 1; ++i) owner = get(address, "", "/bind?bob");
  REQUIRE(owner.slot == 1);
  master.command("kill " + std::to_string(ready[1].id));
  master.expect_exit(ready[1].id);
  const std::size_t baseline = master.master_fds();
  const Stats before = stats(master);

  for (const char* cookie : {"sid=bob", "sid=s1", "sid=s1~x", "sid=s7", "sid=nobody", ""}) {
    for (int i = 0; i < 3; ++i) {
      Served s = get(address, cookie);
      INFO("cookie '" << cookie << "' request " << i << " " << s.error);
      CHECK(s.slot == 0);
      CHECK(s.pid == ready[0].pid);
    }
  }
  const Stats after = stats(master);
  CHECK(after.fallback - before.fallback == 18);
  CHECK(extra_master_fds(master, baseline) == 0);
  CHECK(after.by_key == before.by_key);
  // Slot 0's own key still goes by key.
  CHECK(get(address, "sid=s0").pid == ready[0].pid);
  CHECK(stats(master).by_key == before.by_key + 1);
  CHECK(exited_zero(master.finish()));
}

TEST_CASE("Clients are answered while a silent client waits, and its late cookie still counts",
          "[sticky]") {
  FdLeakCheck fds;
  Master master(listening_on(2), {}, with_limits(kLongWait));
  REQUIRE(master.pid() > 0);
  std::vector<Listening> ready = master.expect_listening(2);
  const std::string address = ready[0].addresses.at(0);
  const std::size_t baseline = master.master_fds();

  HttpClient silent;
  REQUIRE(silent.connect(address));
  const std::string port = local_port(silent.fd());
  master.sync();
  CHECK(master.master_fds() == baseline + 1);  // the master holds it, waiting for bytes

  for (int i = 0; i < 10; ++i) {
    const std::size_t k = static_cast<std::size_t>(i % 2);
    Served s = get(address, "sid=" + prefork::slot_key(k));
    INFO("request " << i << " " << s.error);
    CHECK(s.pid == ready[k].pid);
  }
  master.sync();
  CHECK_FALSE(reported_connection(master, port));  // still with the master

  // It speaks at last: its cookie decides, as for anyone.
  REQUIRE(write_all(silent.fd(), request("sid=s1")));
  Served s = served_by(silent.receive());
  INFO(s.error);
  CHECK(s.pid == ready[1].pid);
  CHECK(expect_connection(master, port) == ready[1].id);
  CHECK(master.master_fds() == baseline);
  CHECK(exited_zero(master.finish()));
}

TEST_CASE("A silent client goes to the fallback at the deadline and is answered when it speaks",
          "[sticky]") {
  FdLeakCheck fds;
  Master master(listening_on(2), {}, with_limits({.timeout = std::chrono::milliseconds(150)}),
                stats_command());
  REQUIRE(master.pid() > 0);
  std::vector<Listening> ready = master.expect_listening(2);
  const std::string address = ready[0].addresses.at(0);

  HttpClient silent;
  REQUIRE(silent.connect(address));
  const std::string port = local_port(silent.fd());
  const unsigned id = expect_connection(master, port);  // handed over once the deadline passed
  const Listening& to = ready[0].id == id ? ready[0] : ready[1];
  REQUIRE(to.id == id);
  CHECK(stats(master).fallback == 1);

  // It names the other slot, but its worker is chosen: the whole request reaches that worker.
  const std::size_t other = 1 - to.slot;
  REQUIRE(write_all(silent.fd(), request("sid=" + prefork::slot_key(other))));
  Served s = served_by(silent.receive());
  INFO(s.error);
  CHECK(s.pid == to.pid);
  // New connections with that cookie go by key.
  CHECK(get(address, "sid=" + prefork::slot_key(other)).pid == ready[other].pid);
  CHECK(exited_zero(master.finish()));
}

TEST_CASE("A client that closes or resets while the master waits for its bytes is just closed",
          "[sticky]") {
  FdLeakCheck fds;
  Master master(listening_on(2), {}, with_limits(kLongWait));
  REQUIRE(master.pid() > 0);
  std::vector<Listening> ready = master.expect_listening(2);
  const std::string address = ready[0].addresses.at(0);
  const std::size_t baseline = master.master_fds();

  std::vector<std::string> ports;
  {
    std::vector<HttpClient> clients(6);
    for (std::size_t i = 0; i < clients.size(); ++i) {
      REQUIRE(clients[i].connect(address));
      ports.push_back(local_port(clients[i].fd()));
      if (i % 2) {  // SO_LINGER 0: close() sends RST instead of FIN
        linger l{1, 0};
        ::setsockopt(clients[i].fd(), SOL_SOCKET, SO_LINGER, &l, sizeof l);
      }
    }
    master.sync();
    CHECK(master.master_fds() == baseline + clients.size());
  }  // all closed here

  // The master notices each on its own loop.
  CHECK(extra_master_fds(master, baseline) == 0);
  master.sync();
  for (auto& p : ports) CHECK_FALSE(reported_connection(master, p));  // nobody was handed one
  CHECK(get(address, "sid=s0").pid == ready[0].pid);
  CHECK(exited_zero(master.finish()));
}

TEST_CASE("A head split over several writes is routed by the cookie in its last part",
          "[sticky]") {
  FdLeakCheck fds;
  Master master(listening_on(2), {}, with_limits(kLongWait));
  REQUIRE(master.pid() > 0);
  std::vector<Listening> ready = master.expect_listening(2);
  const std::string address = ready[0].addresses.at(0);

  for (int i = 0; i < 6; ++i) {
    const std::size_t k = static_cast<std::size_t>(i % 2);
    HttpClient c;
    REQUIRE(c.connect(address));
    int one = 1;
    ::setsockopt(c.fd(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    REQUIRE(write_all(c.fd(), "GET / HTTP/1.1\r\nHost: localhost\r\nCookie: a=1; si"));
    master.sync();  // the master has peeked the first part and waits for more
    REQUIRE(write_all(c.fd(), "d=" + prefork::slot_key(k, "x")));
    master.sync();
    REQUIRE(write_all(c.fd(), "\r\nConnection: close\r\n\r\n"));
    Served s = served_by(c.receive());
    INFO("request " << i << " " << s.error);
    CHECK(s.pid == ready[k].pid);
  }
  CHECK(exited_zero(master.finish()));
}

TEST_CASE("A head longer than the peek limit goes to the fallback and reaches its worker whole",
          "[sticky]") {
  FdLeakCheck fds;
  Master master(listening_on(2), {}, with_limits({.max_bytes = 512}), stats_command());
  REQUIRE(master.pid() > 0);
  std::vector<Listening> ready = master.expect_listening(2);
  const std::string address = ready[0].addresses.at(0);

  const std::string pad = "X-Pad: " + std::string(2000, 'p') + "\r\n";
  for (int i = 0; i < 4; ++i) {
    HttpClient c;
    REQUIRE(c.connect(address));
    REQUIRE(write_all(c.fd(), "GET / HTTP/1.1\r\nHost: localhost\r\n" + pad +
                                  "Cookie: sid=s1\r\nConnection: close\r\n\r\n"));
    Served s = served_by(c.receive());
    INFO("request " << i << " " << s.error);
    CHECK(s.pid > 0);  // a 200: the worker read the whole 2 KiB head
  }
  Stats st = stats(master);
  CHECK(st.fallback == 4);
  CHECK(st.by_key == 0);
  // A cookie within the first 512 bytes still counts.
  for (int i = 0; i < 4; ++i) {
    HttpClient c;
    REQUIRE(c.connect(address));
    REQUIRE(write_all(c.fd(), "GET / HTTP/1.1\r\nHost: localhost\r\nCookie: sid=s1\r\n" + pad +
                                  "Connection: close\r\n\r\n"));
    CHECK(served_by(c.receive()).pid == ready[1].pid);
  }
  CHECK(stats(master).by_key == 4);
  CHECK(exited_zero(master.finish()));
}

TEST_CASE("A client still waiting for its bytes at shutdown is handed to a worker, not dropped",
          "[sticky]") {
  FdLeakCheck fds;
  Master master(listening_on(2), {}, with_limits(kLongWait));
  REQUIRE(master.pid() > 0);
  std::vector<Listening> ready = master.expect_listening(2);
  const std::string address = ready[0].addresses.at(0);

  HttpClient silent;
  REQUIRE(silent.connect(address));
  const std::string port = local_port(silent.fd());
  master.sync();
  CHECK_FALSE(reported_connection(master, port));

  master.command("shutdown");
  const unsigned id = expect_connection(master, port);
  CHECK((id == ready[0].id || id == ready[1].id));
  // The worker drains: it answers a request that comes in time, or closes the idle connection.
  // Either way the client is not left hanging.
  write_all(silent.fd(), request(""));
  HttpResult r = silent.receive();
  INFO(r.error);
  CHECK((r.status == 200 || r.error.find("no status line in ''") != std::string::npos ||
         r.error.find("recv: Connection reset") != std::string::npos));
  CHECK(exited_zero(master.wait(Clock::now() + kDeadline)));
}
