// Zero-downtime operation with real processes and real sockets, after Node's
// test/parallel/test-cluster-disconnect*.js and test-cluster-worker-disconnect-on-error.js, and
// after what nginx and Unicorn promise for a reload: a rolling restart under keep-alive or
// connection-per-request load loses no request; a draining worker finishes the request it has,
// answers one that was arriving with "Connection: close" and closes idle keep-alive connections
// with a FIN, never a reset; a graceful shutdown finishes the requests in progress and a second
// SIGTERM makes it fast; in exec mode a rolling restart deploys the binary now on disk, while
// fork-mode workers keep running the master's image.
//
// hello runs as a child of the test (posix_spawn), its stdout read line by line with deadlines.
// Library-level clusters run their master in a harness child (RemoteMaster), steered by
// commands on one pipe and reporting its events on another; the test process is only a client
// (HttpLoad's client threads start after the last fork of the test process).
#include <catch2/catch.hpp>

#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <linux/sockios.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "common/http.hpp"
#include "harness.hpp"
#include "hello_process.hpp"
#include "http_client.hpp"
#include "remote_master.hpp"
#include "support/subreaper.hpp"

using namespace prefork_test;
using prefork::ExitInfo;
using prefork::Options;
using WorkerT = prefork::Worker<prefork::StringCodec>;

namespace {

// ---------------------------------------------------------------------------------------------
// Helpers.

/// pidfds of processes that need not be this process's children (hello's workers), to wait for
/// their exit with a deadline. A process already gone when watched counts as exited.
class ExitWatch {
 public:
  explicit ExitWatch(const std::vector<pid_t>& pids) {
    for (pid_t pid : pids) watched_.emplace_back(pid, prefork::UniqueFd(pidfd_open(pid)));
  }

  /// True once every watched process has exited; false at the deadline.
  bool wait_all(Clock::time_point deadline) {
    for (auto& [pid, fd] : watched_)
      if (fd && !wait_pidfd(fd.get(), deadline)) return false;
    return true;
  }

  /// The watched processes still running, for failure messages.
  std::string still_running() const {
    std::string s;
    for (auto& [pid, fd] : watched_)
      if (!process_gone(pid)) s += std::to_string(pid) + " ";
    return s;
  }

 private:
  std::vector<std::pair<pid_t, prefork::UniqueFd>> watched_;
};

std::string describe(const std::map<pid_t, int>& by_pid) {
  std::string s;
  for (auto& [pid, n] : by_pid) s += std::to_string(pid) + ":" + std::to_string(n) + " ";
  return s;
}

std::string first_lines(const std::vector<std::string>& lines, std::size_t n = 20) {
  std::string s;
  for (std::size_t i = 0; i < lines.size() && i < n; ++i) s += lines[i] + "\n";
  if (lines.size() > n) s += "... and " + std::to_string(lines.size() - n) + " more\n";
  return s;
}

bool exited_zero(const std::optional<int>& status) {
  return status && WIFEXITED(*status) && WEXITSTATUS(*status) == 0;
}

/// Sockets open in process pid (from /proc/<pid>/fd; works for any process of this user).
std::size_t count_sockets(pid_t pid) {
  std::size_t n = 0;
  std::error_code ec;
  for (auto& e : std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/fd", ec)) {
    std::error_code ignored;
    if (std::filesystem::read_symlink(e.path(), ignored).string().starts_with("socket:")) ++n;
  }
  return n;
}

/// The inode of path (stat follows a /proc/<pid>/exe link to the image the process runs, even
/// when that file has been renamed over or deleted); 0 if there is none.
ino_t inode_of(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 ? st.st_ino : 0;
}

ino_t exe_inode(pid_t pid) { return inode_of("/proc/" + std::to_string(pid) + "/exe"); }

/// A directory of its own under /tmp, removed with everything in it.
struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/prefork-zero-downtime-XXXXXX";
    if (::mkdtemp(tmpl)) path = tmpl;
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ec;
    if (!path.empty()) std::filesystem::remove_all(path, ec);
  }
};

/// Copies an executable to `to` (a new inode), mode 0755. False if it could not.
bool copy_executable(const std::string& from, const std::string& to) {
  std::error_code ec;
  std::filesystem::copy_file(from, to, std::filesystem::copy_options::overwrite_existing, ec);
  return !ec && ::chmod(to.c_str(), 0755) == 0;
}

/// What a deployment does: writes the new binary next to the old one and renames it over,
/// so that the path names a new inode while running processes keep the old one.
bool deploy(const std::string& from, const std::string& path) {
  return copy_executable(from, path + ".new") && ::rename((path + ".new").c_str(), path.c_str()) == 0;
}

/// Waits until fd has no byte left unacknowledged by the peer (SIOCOUTQ): on loopback, the
/// bytes are then in the peer's receive queue.
bool wait_acknowledged(int fd, Clock::time_point deadline) {
  for (;;) {
    int unacked = -1;
    if (::ioctl(fd, SIOCOUTQ, &unacked) != 0) return false;
    if (unacked == 0) return true;
    if (Clock::now() >= deadline) return false;
    ::poll(nullptr, 0, 1);  // the ACK has no descriptor event to wait on
  }
}

/// Reads what fd says next: 0 (EOF: the peer sent FIN), or -errno (ECONNRESET: a reset).
int next_read(int fd) {
  char c;
  for (;;) {
    ssize_t n = ::recv(fd, &c, 1, 0);
    if (n < 0 && errno == EINTR) continue;
    return n < 0 ? -errno : static_cast<int>(n);
  }
}

// ---------------------------------------------------------------------------------------------
// A Server for library-level drain tests.

// Set before the cluster forks, so that fork-mode workers inherit them: the read end of a pipe
// whose bytes open a gate in a worker, and the write end of one on which a worker says it has
// reached the gate.
int g_gate = -1;
int g_at_gate = -1;

/// An HTTP server like hello's: answers every request with "pid <pid>\n"; GET /gate first tells
/// g_at_gate and then blocks its loop until a byte comes on g_gate (a request in progress that
/// the test ends when it wants). Tells the master "draining" when it starts to drain. Takes
/// Puppet's orders, and:
///   "open"                  replies "open:<connections its HTTP server has open>"
///   "gate-then-disconnect"  replies "waiting", blocks until a byte comes on g_gate, then
///                           disconnects itself (the drain starts before the loop runs again)
struct DrainServer : Puppet {
  explicit DrainServer(prefork::WorkerContext<>& ctx)
      : Puppet(ctx),
        body_("pid " + std::to_string(ctx.pid()) + "\n"),
        http_(ctx.loop(), [this](const http::Request& req, http::Response& res) {
          if (req.path() == "/gate") {
            write_all(g_at_gate, "g");
            wait_for_gate();
          }
          res.body = body_;
        }) {}

  void on_connection(prefork::Connection c) { http_.adopt(std::move(c)); }

  void on_drain() {
    http_.drain();
    ctx_.send("draining");
  }

  void on_message(const std::string& m) {
    if (m == "open") {
      ctx_.send("open:" + std::to_string(http_.open_connections()));
    } else if (m == "gate-then-disconnect") {
      ctx_.send("waiting");
      wait_for_gate();
      ctx_.disconnect();
    } else {
      Puppet::on_message(m);
    }
  }

  static void wait_for_gate() {
    char c;
    while (::read(g_gate, &c, 1) < 0 && errno == EINTR) {
    }
  }

  std::string body_;
  http::Server http_;
};

Options listening_on(unsigned workers) {
  return Options{.workers = workers, .listen = {"127.0.0.1:0"}, .handle_signals = false};
}

/// "pid <pid>\n" from a DrainServer: the pid, or -1.
long drain_server_pid(const HttpResult& r) {
  long pid = -1;
  if (r.status != 200 || std::sscanf(r.body.c_str(), "pid %ld", &pid) != 1 ||
      r.body != "pid " + std::to_string(pid) + "\n")
    return -1;
  return pid;
}

// ---------------------------------------------------------------------------------------------
// Rolling restarts of hello under load.

/// What hello prints for one rolling restart: each replacement's "Started process" line and the
/// master's "Reload done/failed" line, in whatever order they come (a replacement prints its
/// line after telling the master it listens, so the master's report may come first).
struct ReloadLines {
  std::vector<pid_t> started;
  std::optional<std::string> outcome;
};

ReloadLines read_reload(HelloProcess& hello, std::size_t workers, Clock::time_point deadline) {
  ReloadLines r;
  while (r.started.size() < workers || !r.outcome) {
    auto line = hello.out().next(deadline);
    if (!line) break;
    if (line->starts_with("Started process "))
      r.started.push_back(static_cast<pid_t>(number_after(*line, "Started process ")));
    if (line->starts_with("Reload ")) r.outcome = *line;
  }
  return r;
}

/// Starts hello with two workers, puts `clients` clients of `mode` on it, sends SIGUSR2
/// `reloads` times (each time waiting for both replacements and for the old workers to exit,
/// then for more answers), and checks that no request failed and who answered.
void check_rolling_restarts_lose_nothing(HttpLoad::Mode mode, unsigned clients, int reloads,
                                         const std::string& balance = "round-robin") {
  REQUIRE(::access(kHello.c_str(), X_OK) == 0);
  FdLeakCheck fds;
  HelloProcess hello({"--workers", "2", "--port", "0", "--work", "0", "--balance", balance});
  REQUIRE(hello.pid() > 0);
  if (!hello.start(2)) FAIL("hello did not start; it said:\n" << hello.out().transcript());
  std::vector<pid_t> current = hello.workers();
  std::vector<pid_t> retired;
  std::map<int, std::set<pid_t>> generation;  // the workers serving after reload n
  generation[0] = {current.begin(), current.end()};

  HttpLoad load(hello.port(), clients, mode);
  if (!load.wait_answered(300, Clock::now() + kDeadline)) {
    load.stop();
    FAIL("the load did not get going: " << load.answered() << " answers; failures:\n"
                                        << first_lines(load.failures()));
  }
  for (int round = 1; round <= reloads; ++round) {
    ExitWatch old(current);
    load.mark(-round);  // while reload `round` runs: old and new workers answer
    REQUIRE(::kill(hello.pid(), SIGUSR2) == 0);
    const auto deadline = Clock::now() + kDeadline;
    ReloadLines lines = read_reload(hello, 2, deadline);
    if (lines.started.size() < 2 || !lines.outcome) {
      load.stop();
      FAIL("reload " << round << " did not complete; hello said:\n" << hello.out().transcript());
    }
    // hello reports the reload once the last old worker has exited.
    CHECK(lines.outcome->starts_with("Reload done: 2 workers replaced in "));
    const std::vector<pid_t> fresh = lines.started;
    if (!old.wait_all(deadline)) {
      load.stop();
      FAIL("reload " << round << ": old workers still running: " << old.still_running());
    }
    // Requests sent and answered between here and the next SIGUSR2 can only reach this
    // generation.
    load.mark(round);
    const std::uint64_t before = load.answered();
    if (!load.wait_answered(before + 300, Clock::now() + kDeadline)) {
      load.stop();
      FAIL("reload " << round << ": the load stalled at " << load.answered()
                     << " answers; failures:\n" << first_lines(load.failures()));
    }
    for (pid_t pid : fresh) {
      INFO("reload " << round << " replacement " << pid);
      CHECK(std::find(current.begin(), current.end(), pid) == current.end());
    }
    retired.insert(retired.end(), current.begin(), current.end());
    current = fresh;
    generation[round] = {fresh.begin(), fresh.end()};
  }
  load.stop();

  const auto failures = load.failures();
  INFO(load.sent() << " requests sent, " << load.answered() << " answered with 200, "
                   << load.connections() << " connections, " << load.idle_closes()
                   << " idle connections found closed before a request");
  {
    INFO("failed requests:\n" << first_lines(failures));
    CHECK(failures.empty());
  }
  CHECK(load.answered() == load.sent());
  if (load.idle_closes() > 0)
    WARN(load.idle_closes() << " keep-alive connections were closed by hello while idle between "
                               "two back-to-back requests (found before the next request went out)");
  for (int round = 1; round <= reloads; ++round) {
    INFO("during reload " << round << " answered by " << describe(load.by_pid(-round)));
    auto served = load.by_pid(round);
    INFO("after reload " << round << " answered by " << describe(served));
    CHECK_FALSE(served.empty());
    for (auto& [pid, n] : served) CHECK(generation[round].count(pid) == 1);
  }
  // The last generation serves new connections: both of its workers when the master deals
  // them out in turn; under ip-hash the one whose slot 127.0.0.1 hashes to; under kernel
  // dispatch whichever the kernel wakes (sequential connections often reach one worker).
  std::vector<std::string> errors;
  auto last = get_many(hello.port(), 10, errors);
  CHECK(errors.empty());
  INFO("then answered by " << describe(last));
  for (auto& [pid, n] : last) CHECK(generation[reloads].count(pid) == 1);
  if (balance == "round-robin" || balance == "least-connections")
    CHECK(keys(last) == generation[reloads]);
  if (balance == "ip-hash") CHECK(last.size() == 1);
  for (pid_t pid : retired) {
    INFO("old worker " << pid);
    CHECK(process_gone(pid));
  }
  {
    // No worker crashed along the way.
    INFO(hello.out().transcript());
    CHECK(hello.out().transcript().find(" died ") == std::string::npos);
  }
  REQUIRE(::kill(hello.pid(), SIGTERM) == 0);
  CHECK(exited_zero(hello.wait(Clock::now() + kDeadline)));
}

}  // namespace

TEST_CASE("Rolling restarts of hello under keep-alive load answer every request with 200",
          "[zero-downtime][reload]") {
  check_rolling_restarts_lose_nothing(HttpLoad::Mode::keep_alive, 4, 5);
}

TEST_CASE("Rolling restarts of hello under new-connection-per-request load answer every request",
          "[zero-downtime][reload]") {
  check_rolling_restarts_lose_nothing(HttpLoad::Mode::new_connection, 4, 5);
}

TEST_CASE("Rolling restarts of hello lose no request with any balance policy",
          "[zero-downtime][reload]") {
  const std::string balance =
      GENERATE(as<std::string>{}, "least-connections", "ip-hash", "shared", "reuse-port");
  const auto mode = GENERATE(HttpLoad::Mode::keep_alive, HttpLoad::Mode::new_connection);
  const unsigned clients = GENERATE(1u, 4u);
  INFO("--balance " << balance << ", " << clients << " clients, "
                    << (mode == HttpLoad::Mode::keep_alive ? "keep-alive" : "a connection per request"));
  check_rolling_restarts_lose_nothing(mode, clients, 3, balance);
}

// ---------------------------------------------------------------------------------------------
// A draining worker.

TEST_CASE("A request in progress when its worker is disconnected is answered with 200",
          "[zero-downtime][drain]") {
  FdLeakCheck fds;
  Pipe gate, at_gate;
  g_gate = gate.read;
  g_at_gate = at_gate.write;
  RemoteMaster<DrainServer> master(listening_on(1));
  REQUIRE(master.pid() > 0);
  const Listening w = master.expect_listening(1).front();

  HttpClient client;
  REQUIRE(client.connect(w.addresses.at(0)));
  REQUIRE(write_all(client.fd(), "GET /gate HTTP/1.1\r\nHost: localhost\r\n\r\n"));
  pollfd p{at_gate.read, POLLIN, 0};
  REQUIRE(::poll(&p, 1, static_cast<int>(std::chrono::milliseconds(kDeadline).count())) == 1);
  char c;
  REQUIRE(::read(at_gate.read, &c, 1) == 1);  // the handler runs: the request is in progress

  master.command("disconnect " + std::to_string(w.id));
  master.sync();  // the master has sent the disconnect; the worker reads it after the handler
  CHECK_FALSE(process_gone(w.pid));
  REQUIRE(write_all(gate.write, "g"));

  std::string buf;
  bool close = false;
  HttpResult r = read_http_answer(client.fd(), buf, close);
  INFO(r.error);
  CHECK(r.status == 200);
  CHECK(drain_server_pid(r) == w.pid);
  master.expect("message " + std::to_string(w.id) + " draining");
  // Then the connection is closed with a FIN: after this answer if it said "Connection:
  // close", else (the answer went out before the worker read the disconnect) once the idle
  // connection has outlived the drain grace.
  CHECK(next_read(client.fd()) == 0);
  Exit e = master.expect_exit(w.id);
  CHECK(e.code == 0);
  CHECK(e.signal == 0);
  CHECK(e.after_disconnect);
  CHECK(e.reason.empty());
  CHECK(exited_zero(master.finish()));
  g_gate = g_at_gate = -1;
}

TEST_CASE("A request still arriving when its worker starts draining is answered with Connection close",
          "[zero-downtime][drain]") {
  FdLeakCheck fds;
  RemoteMaster<DrainServer> master(listening_on(1));
  REQUIRE(master.pid() > 0);
  const Listening w = master.expect_listening(1).front();

  HttpClient client;
  REQUIRE(client.connect(w.addresses.at(0)));
  REQUIRE(write_all(client.fd(),
                    "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\n12345"));
  // The worker has the connection and, by the time it answers, has read what was sent: the
  // request is half there (reading, not idle).
  master.command("send " + std::to_string(w.id) + " open");
  CHECK(master.expect("message " + std::to_string(w.id) + " open:") ==
        "message " + std::to_string(w.id) + " open:1");

  master.command("disconnect " + std::to_string(w.id));
  master.expect("message " + std::to_string(w.id) + " draining");
  CHECK_FALSE(process_gone(w.pid));
  REQUIRE(write_all(client.fd(), "67890"));

  std::string buf;
  bool close = false;
  HttpResult r = read_http_answer(client.fd(), buf, close);
  INFO(r.error);
  CHECK(r.status == 200);
  CHECK(drain_server_pid(r) == w.pid);
  CHECK(close);
  CHECK(next_read(client.fd()) == 0);
  Exit e = master.expect_exit(w.id);
  CHECK(e.code == 0);
  CHECK(e.signal == 0);
  CHECK(e.after_disconnect);
  CHECK(exited_zero(master.finish()));
}

TEST_CASE("An idle keep-alive connection of a draining worker is closed with a FIN and no reset",
          "[zero-downtime][drain]") {
  FdLeakCheck fds;
  RemoteMaster<DrainServer> master(listening_on(1));
  REQUIRE(master.pid() > 0);
  const Listening w = master.expect_listening(1).front();

  HttpClient client;
  REQUIRE(client.connect(w.addresses.at(0)));
  REQUIRE(write_all(client.fd(), "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"));
  std::string buf;
  bool close = true;
  HttpResult r = read_http_answer(client.fd(), buf, close);
  INFO(r.error);
  REQUIRE(r.status == 200);
  REQUIRE_FALSE(close);  // keep-alive: the connection stays open and idle

  master.command("disconnect " + std::to_string(w.id));
  master.expect("message " + std::to_string(w.id) + " draining");
  CHECK(next_read(client.fd()) == 0);  // EOF; -ECONNRESET would be a reset
  Exit e = master.expect_exit(w.id);
  CHECK(e.code == 0);
  CHECK(e.signal == 0);
  CHECK(e.after_disconnect);
  CHECK(exited_zero(master.finish()));
}

TEST_CASE("A request that reached an idle keep-alive connection just before the drain is answered "
          "with Connection close",
          "[zero-downtime][drain]") {
  FdLeakCheck fds;
  Pipe gate;
  g_gate = gate.read;
  RemoteMaster<DrainServer> master(listening_on(1));
  REQUIRE(master.pid() > 0);
  const Listening w = master.expect_listening(1).front();

  HttpClient client;
  REQUIRE(client.connect(w.addresses.at(0)));
  const std::string get = "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n";
  REQUIRE(write_all(client.fd(), get));
  std::string buf;
  bool close = true;
  HttpResult first = read_http_answer(client.fd(), buf, close);
  REQUIRE(first.status == 200);
  REQUIRE_FALSE(close);

  // The worker's loop stops at the gate; the next request arrives on the idle connection; the
  // gate opens and the worker starts draining before its loop looks at the connection again.
  master.command("send " + std::to_string(w.id) + " gate-then-disconnect");
  master.expect("message " + std::to_string(w.id) + " waiting");
  REQUIRE(write_all(client.fd(), get));
  REQUIRE(wait_acknowledged(client.fd(), Clock::now() + kDeadline));
  REQUIRE(write_all(gate.write, "g"));

  HttpResult r = read_http_answer(client.fd(), buf, close);
  INFO(r.error);
  CHECK(r.status == 200);
  CHECK(drain_server_pid(r) == w.pid);
  CHECK(close);
  CHECK(next_read(client.fd()) == 0);
  master.expect("message " + std::to_string(w.id) + " draining");
  Exit e = master.expect_exit(w.id);
  CHECK(e.code == 0);
  CHECK(e.signal == 0);
  CHECK(e.after_disconnect);
  CHECK(exited_zero(master.finish()));
  g_gate = -1;
}

// ---------------------------------------------------------------------------------------------
// Graceful and fast shutdown.

TEST_CASE("SIGTERM to hello during a slow request lets it finish with 200 and hello exit 0",
          "[zero-downtime][shutdown]") {
  REQUIRE(::access(kHello.c_str(), X_OK) == 0);
  FdLeakCheck fds;
  // 2e9 iterations of the seed's loop: a few hundred milliseconds (more under load or ASan).
  HelloProcess hello({"--workers", "2", "--port", "0", "--work", "2000000000"});
  REQUIRE(hello.pid() > 0);
  if (!hello.start(2)) FAIL("hello did not start; it said:\n" << hello.out().transcript());
  std::map<pid_t, std::size_t> sockets;
  for (pid_t pid : hello.workers()) sockets[pid] = count_sockets(pid);

  HttpClient client;
  REQUIRE(client.connect("127.0.0.1:" + std::to_string(hello.port())));
  REQUIRE(client.send_get());
  // A worker has taken the connection (its socket table grew); the request is in its handler.
  pid_t busy = -1;
  for (auto deadline = Clock::now() + kDeadline; busy < 0 && Clock::now() < deadline;) {
    for (auto [pid, n] : sockets)
      if (count_sockets(pid) > n) busy = pid;
    if (busy < 0) ::poll(nullptr, 0, 1);  // /proc has no event to wait on
  }
  REQUIRE(busy > 0);

  REQUIRE(::kill(hello.pid(), SIGTERM) == 0);
  HttpResult r = client.receive();
  INFO(r.error);
  CHECK(r.status == 200);
  CHECK(handled_by(r.body) == busy);
  CHECK(exited_zero(hello.wait(Clock::now() + kDeadline)));
  for (pid_t pid : hello.workers()) {
    INFO("worker " << pid);
    CHECK(process_gone(pid));
  }
}

TEST_CASE("A second SIGTERM while a worker is stuck draining shuts the cluster down fast",
          "[zero-downtime][shutdown]") {
  FdLeakCheck fds;
  Options opts = listening_on(2);
  opts.handle_signals = true;
  opts.drain_timeout = std::chrono::milliseconds(60000);  // far beyond any deadline here
  opts.kill_timeout = std::chrono::milliseconds(60000);
  RemoteMaster<Puppet> master(std::move(opts));
  REQUIRE(master.pid() > 0);
  const std::vector<Listening> ws = master.expect_listening(2);

  master.command("send " + std::to_string(ws[0].id) + " hold");
  master.expect("message " + std::to_string(ws[0].id) + " holding");
  REQUIRE(::kill(master.pid(), SIGTERM) == 0);
  // The first SIGTERM has been handled (a second one sent before could merge with it): the
  // other worker drained and exited.
  Exit drained = master.expect_exit(ws[1].id);
  CHECK(drained.code == 0);
  CHECK(drained.signal == 0);
  CHECK_FALSE(process_gone(ws[0].pid));

  const auto second = Clock::now();
  REQUIRE(::kill(master.pid(), SIGTERM) == 0);
  Exit held = master.expect_exit(ws[0].id);
  CHECK(held.signal == SIGTERM);
  CHECK(held.after_disconnect);
  CHECK(held.reason.empty());  // not the drain timeout's escalation
  CHECK(master.expect("returned ") == "returned 0 children 0");
  CHECK(exited_zero(master.wait(Clock::now() + kDeadline)));
  CHECK(Clock::now() - second < kDeadline);
  for (auto& w : ws) {
    INFO("worker " << w.pid);
    CHECK(process_gone(w.pid));
  }
}

// ---------------------------------------------------------------------------------------------
// Deploying a new binary.

namespace {

/// Starts hello from a copy of its binary in a directory of its own, renames a new copy over it
/// (a new inode at the same path, as a deployment does), sends SIGUSR2 under load, and returns
/// whether the replacements run the new inode; checks that no request failed on the way.
struct Deployed {
  ino_t old_inode = 0, new_inode = 0;
  std::map<pid_t, ino_t> before, after;  // worker -> the inode of its image
  ino_t master_after = 0;
};

Deployed deploy_with_rolling_restart(const std::string& spawn) {
  REQUIRE(::access(kHello.c_str(), X_OK) == 0);
  Deployed d;
  TempDir dir;
  REQUIRE_FALSE(dir.path.empty());
  const std::string binary = dir.path + "/hello";
  REQUIRE(copy_executable(kHello, binary));
  d.old_inode = inode_of(binary);
  REQUIRE(d.old_inode != 0);

  HelloProcess hello(binary, {"--spawn", spawn, "--workers", "2", "--port", "0", "--work", "0"});
  REQUIRE(hello.pid() > 0);
  if (!hello.start(2)) FAIL("hello did not start; it said:\n" << hello.out().transcript());
  CHECK(exe_inode(hello.pid()) == d.old_inode);
  for (pid_t pid : hello.workers()) d.before[pid] = exe_inode(pid);

  REQUIRE(deploy(kHello, binary));
  d.new_inode = inode_of(binary);
  REQUIRE(d.new_inode != 0);
  REQUIRE(d.new_inode != d.old_inode);

  ExitWatch old(hello.workers());
  HttpLoad load(hello.port(), 2, HttpLoad::Mode::new_connection);
  REQUIRE(load.wait_answered(50, Clock::now() + kDeadline));
  REQUIRE(::kill(hello.pid(), SIGUSR2) == 0);
  const auto deadline = Clock::now() + kDeadline;
  ReloadLines lines = read_reload(hello, 2, deadline);
  if (lines.started.size() < 2 || !lines.outcome) {
    load.stop();
    FAIL("the reload did not complete; hello said:\n" << hello.out().transcript());
  }
  CHECK(lines.outcome->starts_with("Reload done: 2 workers replaced in "));
  for (pid_t pid : lines.started) d.after[pid] = exe_inode(pid);
  if (!old.wait_all(deadline)) {
    load.stop();
    FAIL("old workers still running: " << old.still_running());
  }
  load.mark(1);
  const std::uint64_t before = load.answered();
  CHECK(load.wait_answered(before + 50, Clock::now() + kDeadline));
  load.stop();
  const auto failures = load.failures();
  INFO("failed requests:\n" << first_lines(failures));
  CHECK(failures.empty());
  for (auto& [pid, n] : load.by_pid(1)) CHECK(d.after.count(pid) == 1);
  d.master_after = exe_inode(hello.pid());
  REQUIRE(::kill(hello.pid(), SIGTERM) == 0);
  CHECK(exited_zero(hello.wait(Clock::now() + kDeadline)));
  return d;
}

}  // namespace

namespace {

// Deploys a new binary under a running hello, reloads it, and checks which file every worker
// runs: the old workers and the master the old one; the new workers the new one in exec mode.
void check_deploy(const char* spawn, bool new_workers_run_new_binary) {
  Deployed d = deploy_with_rolling_restart(spawn);
  REQUIRE(d.before.size() == 2);
  REQUIRE(d.after.size() == 2);
  for (auto& [pid, inode] : d.before) {
    INFO("old worker " << pid);
    CHECK(inode == d.old_inode);
  }
  for (auto& [pid, inode] : d.after) {
    INFO("new worker " << pid);
    CHECK(inode == (new_workers_run_new_binary ? d.new_inode : d.old_inode));
  }
  CHECK(d.master_after == d.old_inode);  // the master itself runs on, from the old image
}

}  // namespace

TEST_CASE("A rolling restart in exec mode starts workers from the binary now on disk",
          "[zero-downtime][deploy]") {
  FdLeakCheck fds;
  check_deploy("exec", true);
}

// A forked worker is a copy of the master's image: the new file on disk does not reach it.
TEST_CASE("A rolling restart in fork mode keeps workers on the binary the master started from",
          "[zero-downtime][deploy]") {
  FdLeakCheck fds;
  check_deploy("fork", false);
}
// ---------------------------------------------------------------------------------------------
// Rolling restart options and reports (reload_surge, reload_timeout, ReloadReport, coalescing),
// crashing workers under load (hello --crash-ms), and the master upgrade (SIGUSR1): a new
// master from the binary on disk takes over the listening socket while clients keep being
// answered, an upgrade whose new binary fails leaves the old master serving, and a second
// SIGUSR1 during an upgrade starts nothing.

namespace {

// Set in the master by the "replacements <ok|fail|hang>" command, so that only workers forked
// after it (fork mode: they inherit the master's memory) are affected.
enum class Replacements { ok, fail, hang };
Replacements g_replacements = Replacements::ok;

/// A DrainServer that cannot start once the master said so: its constructor throws
/// (the worker exits with a code before it is listening), or blocks for ever (the worker is
/// online and never listening).
struct FragileServer : DrainServer {
  explicit FragileServer(prefork::WorkerContext<>& ctx) : DrainServer(check(ctx)) {}

  static prefork::WorkerContext<>& check(prefork::WorkerContext<>& ctx) {
    if (g_replacements == Replacements::fail) throw std::runtime_error("cannot start (test)");
    if (g_replacements == Replacements::hang)
      for (;;) ::pause();
    return ctx;
  }
};

using FragileCluster = RemoteMaster<FragileServer>;

/// Reports every ReloadReport as "reload-report <ok 0|1> <replaced> <reason...>".
void report_reloads(FragileCluster::ClusterT& cluster, const FragileCluster::Say& say) {
  cluster.on_reload_done([say](const prefork::ReloadReport& r) {
    say("reload-report " + std::string(r.ok ? "1" : "0") + " " + std::to_string(r.replaced) +
        " " + r.reason);
  });
}

bool set_replacements(FragileCluster::ClusterT&, const std::vector<std::string>& w,
                      const FragileCluster::Say& say) {
  if (w.size() != 2 || w[0] != "replacements") return false;
  g_replacements = w[1] == "fail" ? Replacements::fail
                   : w[1] == "hang" ? Replacements::hang
                                    : Replacements::ok;
  say("replacements " + w[1]);
  return true;
}

struct ReloadReportLine {
  bool ok = false;
  unsigned replaced = 0;
  std::string reason;
};

ReloadReportLine parse_reload_report(const std::string& line) {
  auto w = words(line);
  ReloadReportLine r;
  if (w.size() < 3 || w[0] != "reload-report") return r;
  r.ok = w[1] == "1";
  r.replaced = static_cast<unsigned>(std::stoul(w[2]));
  for (std::size_t i = 3; i < w.size(); ++i) r.reason += (i > 3 ? " " : "") + w[i];
  return r;
}

/// Who answers n sequential requests (a new connection each) to a DrainServer cluster.
std::map<long, int> drain_servers_answering(const std::string& address, int n,
                                            std::vector<std::string>& failures) {
  std::map<long, int> by_pid;
  for (int i = 0; i < n; ++i) {
    HttpResult r = http_get(address);
    long pid = drain_server_pid(r);
    if (pid < 0)
      failures.push_back("request " + std::to_string(i) + ": status " + std::to_string(r.status) +
                         " " + r.error + " body '" + r.body + "'");
    ++by_pid[pid];
  }
  return by_pid;
}

/// A process this test adopted as subreaper (an upgrade's new master): SIGKILLed and reaped
/// when the scope ends unless the test has waited for it. Declare it before the HelloProcess
/// whose new master it will hold, so that the old master is reaped first and the new one is
/// this process's child by then.
struct Adopted {
  pid_t pid = -1;
  std::optional<int> status;
  Adopted() = default;
  Adopted(const Adopted&) = delete;
  Adopted& operator=(const Adopted&) = delete;
  ~Adopted() {
    if (pid > 0 && !status) kill_and_reap(pid);
  }
  std::optional<int> wait(Clock::time_point deadline) {
    if (!status) status = wait_child(pid, deadline);
    return status;
  }
};

/// What hello's stdout says during a master upgrade, read up to "Upgrade done" or "Upgrade
/// failed" (the old master's last word on it) and, when it is done, the new master's workers.
struct UpgradeLines {
  pid_t new_master = -1;
  pid_t upgraded_from = -1;
  std::string listening;
  std::vector<pid_t> started;  // "Started process" lines after the new "Master PID"
  std::string outcome;         // "Upgrade done: ..." or "Upgrade failed: ..."
};

UpgradeLines read_upgrade(HelloProcess& hello, unsigned workers, Clock::time_point deadline) {
  UpgradeLines u;
  while (u.outcome.empty() || (u.outcome.starts_with("Upgrade done") && u.started.size() < workers)) {
    auto line = hello.out().next(deadline);
    if (!line) break;
    if (line->starts_with("Master PID: ")) {
      u.new_master = static_cast<pid_t>(number_after(*line, "Master PID: "));
    } else if (line->starts_with("Upgraded from master ")) {
      u.upgraded_from = static_cast<pid_t>(number_after(*line, "Upgraded from master "));
    } else if (line->starts_with("Listening on ") && u.new_master > 0) {
      u.listening = line->substr(13);
    } else if (line->starts_with("Started process ") && u.new_master > 0) {
      u.started.push_back(static_cast<pid_t>(number_after(*line, "Started process ")));
    } else if (line->starts_with("Upgrade done") || line->starts_with("Upgrade failed")) {
      u.outcome = *line;
    }
  }
  return u;
}

std::size_t count_lines_starting_with(const std::string& text, std::string_view prefix) {
  std::size_t n = 0;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);)
    if (line.starts_with(prefix)) ++n;
  return n;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Rolling restart options and reports.

TEST_CASE("A rolling restart with reload_surge 2 starts two replacements before either listens",
          "[zero-downtime][reload]") {
  FdLeakCheck fds;
  Options opts = listening_on(4);
  opts.reload_surge = 2;
  FragileCluster master(std::move(opts), {}, report_reloads, set_replacements);
  REQUIRE(master.pid() > 0);
  master.expect_listening(4);

  master.command("reload");
  const std::vector<std::string> lines = master.expect_all_until("reload-report ");
  INFO("the master said:\n" << master.transcript());
  // Replacements are ids 5..8: count those forked and not listening yet, event by event.
  std::vector<std::string> replacement_events;
  std::size_t starting = 0, most_starting = 0;
  std::set<unsigned> old_exited;
  for (auto& line : lines) {
    auto w = words(line);
    if (w.size() < 2 || (w[0] != "fork" && w[0] != "listening" && w[0] != "exit")) continue;
    unsigned id = static_cast<unsigned>(std::stoul(w[1]));
    if (w[0] == "exit") {
      CHECK(id <= 4);  // no replacement died
      old_exited.insert(id);
      auto e = parse_exit(line);
      REQUIRE(e.has_value());
      CHECK(e->code == 0);
      CHECK(e->signal == 0);
      CHECK(e->after_disconnect);
      continue;
    }
    if (id <= 4) continue;
    replacement_events.push_back(w[0] + " " + w[1]);
    if (w[0] == "fork") {
      most_starting = std::max(most_starting, ++starting);
    } else {
      --starting;
    }
  }
  REQUIRE(replacement_events.size() >= 2);
  CHECK(replacement_events[0] == "fork 5");
  CHECK(replacement_events[1] == "fork 6");
  CHECK(most_starting == 2);
  CHECK(std::count_if(replacement_events.begin(), replacement_events.end(),
                      [](auto& e) { return e.starts_with("fork "); }) == 4);
  // The report comes once every old worker has exited, and counts them all.
  CHECK(old_exited == std::set<unsigned>{1, 2, 3, 4});
  ReloadReportLine report = parse_reload_report(lines.back());
  CHECK(report.ok);
  CHECK(report.replaced == 4);
  CHECK(report.reason.empty());
  CHECK(exited_zero(master.finish()));
}

TEST_CASE("A replacement that exits at start-up stops the rolling restart and the old workers serve",
          "[zero-downtime][reload]") {
  FdLeakCheck fds;
  FragileCluster master(listening_on(2), {}, report_reloads, set_replacements);
  REQUIRE(master.pid() > 0);
  const std::vector<Listening> old = master.expect_listening(2);
  const std::string address = old[0].addresses.at(0);

  master.command("replacements fail");
  master.expect("replacements fail");
  master.command("reload");
  const std::vector<std::string> lines = master.expect_all_until("reload-report ");
  ReloadReportLine report = parse_reload_report(lines.back());
  INFO("the master said:\n" << master.transcript());
  CHECK_FALSE(report.ok);
  CHECK(report.replaced == 0);
  CHECK_FALSE(report.reason.empty());
  // The replacement's exit is what stopped the restart: it comes before the report.
  std::optional<Exit> failed;
  for (auto& line : lines)
    if (line.starts_with("exit 3 ")) failed = parse_exit(line);
  REQUIRE(failed.has_value());
  CHECK(failed->code != 0);
  CHECK_FALSE(failed->after_disconnect);
  // Nothing restarts the failed replacement (a Backoff restart would come after 100 ms, on the
  // master's clock, before 'waited'), and nothing else is forked.
  master.command("wait 300");
  for (auto& line : master.expect_all_until("waited")) CHECK_FALSE(line.starts_with("fork "));
  master.command("count");
  CHECK(master.expect("workers ") == "workers 2");

  std::vector<std::string> failures;
  auto by_pid = drain_servers_answering(address, 10, failures);
  INFO(first_lines(failures));
  CHECK(failures.empty());
  CHECK(keys(by_pid) == std::set<long>{old[0].pid, old[1].pid});

  // Once replacements can start again, a rolling restart goes through.
  master.command("replacements ok");
  master.expect("replacements ok");
  master.command("reload");
  report = parse_reload_report(master.expect("reload-report "));
  CHECK(report.ok);
  CHECK(report.replaced == 2);
  CHECK(exited_zero(master.finish()));
}

TEST_CASE("A replacement not listening within reload_timeout is killed and the old workers serve",
          "[zero-downtime][reload]") {
  FdLeakCheck fds;
  Options opts = listening_on(2);
  opts.reload_timeout = std::chrono::milliseconds(300);
  FragileCluster master(std::move(opts), {}, report_reloads, set_replacements);
  REQUIRE(master.pid() > 0);
  const std::vector<Listening> old = master.expect_listening(2);
  const std::string address = old[0].addresses.at(0);

  master.command("replacements hang");
  master.expect("replacements hang");
  master.command("reload");
  master.expect("online 3 ");  // it started; its Server never finishes being built
  ReloadReportLine report = parse_reload_report(master.expect("reload-report "));
  INFO("the master said:\n" << master.transcript());
  CHECK_FALSE(report.ok);
  CHECK(report.replaced == 0);
  CHECK_FALSE(report.reason.empty());
  Exit killed = master.expect_exit(3);
  CHECK(killed.signal == SIGKILL);
  CHECK(killed.after_disconnect);
  CHECK(process_gone(killed.pid));
  master.command("count");
  CHECK(master.expect("workers ") == "workers 2");

  std::vector<std::string> failures;
  auto by_pid = drain_servers_answering(address, 10, failures);
  INFO(first_lines(failures));
  CHECK(failures.empty());
  CHECK(keys(by_pid) == std::set<long>{old[0].pid, old[1].pid});
  CHECK(exited_zero(master.finish()));
}

TEST_CASE("Reload requests while a rolling restart runs are coalesced into one more pass",
          "[zero-downtime][reload]") {
  // Two reload() calls in a row: the second comes while the first pass runs and adds one pass.
  // Three: the third is coalesced with the second. Either way two passes, 2 x 2 replacements.
  const int calls = GENERATE(2, 3);
  INFO(calls << " reload() calls in a row");
  FdLeakCheck fds;
  FragileCluster master(listening_on(2), {}, report_reloads, set_replacements);
  REQUIRE(master.pid() > 0);
  const std::vector<Listening> old = master.expect_listening(2);
  const std::string address = old[0].addresses.at(0);

  master.command("reload " + std::to_string(calls));
  std::vector<std::string> lines = master.expect_all_until("reload-report ");
  ReloadReportLine first = parse_reload_report(lines.back());
  auto second_lines = master.expect_all_until("reload-report ");
  ReloadReportLine second = parse_reload_report(second_lines.back());
  lines.insert(lines.end(), second_lines.begin(), second_lines.end());
  // No third pass: nothing is forked and nothing reported in the next 300 ms of the master's.
  master.command("wait 300");
  auto after = master.expect_all_until("waited");
  INFO("the master said:\n" << master.transcript());
  CHECK(first.ok);
  CHECK(first.replaced == 2);
  CHECK(second.ok);
  CHECK(second.replaced == 2);
  for (auto& line : after) {
    CHECK_FALSE(line.starts_with("fork "));
    CHECK_FALSE(line.starts_with("reload-report "));
  }
  std::vector<unsigned> forked;
  for (auto& line : lines)
    if (line.starts_with("fork ")) forked.push_back(static_cast<unsigned>(std::stoul(words(line)[1])));
  CHECK(forked == std::vector<unsigned>{3, 4, 5, 6});
  master.command("count");
  CHECK(master.expect("workers ") == "workers 2");
  std::vector<std::string> failures;
  auto by_pid = drain_servers_answering(address, 10, failures);
  INFO(first_lines(failures));
  CHECK(failures.empty());
  for (auto& [pid, n] : by_pid) {
    CHECK(pid != old[0].pid);
    CHECK(pid != old[1].pid);
  }
  CHECK(by_pid.size() == 2);
  CHECK(exited_zero(master.finish()));
}

// ---------------------------------------------------------------------------------------------
// Crashing workers.

TEST_CASE("hello workers that crash every few hundred ms are replaced and every request succeeds",
          "[zero-downtime][crash]") {
  REQUIRE(::access(kHello.c_str(), X_OK) == 0);
  FdLeakCheck fds;
  HelloProcess hello({"--workers", "2", "--port", "0", "--work", "0", "--crash-ms", "300"});
  REQUIRE(hello.pid() > 0);
  if (!hello.start(2)) FAIL("hello did not start; it said:\n" << hello.out().transcript());
  std::set<pid_t> started(hello.workers().begin(), hello.workers().end());
  // A crash exits from a timer, between two events, so a request a worker has read is always
  // answered; connections handed to a worker that dies before reading them go to another one.
  HttpLoad load(hello.port(), 2, HttpLoad::Mode::new_connection);

  constexpr int kCrashes = 4;
  std::vector<std::string> died;
  const auto deadline = Clock::now() + kDeadline;
  while (died.size() < kCrashes) {
    auto line = hello.out().next(deadline);
    if (!line) break;
    if (line->starts_with("Worker ")) died.push_back(*line);
    if (line->starts_with("Started process "))
      started.insert(static_cast<pid_t>(number_after(*line, "Started process ")));
  }
  const std::uint64_t before = load.answered();
  CHECK(load.wait_answered(before + 100, Clock::now() + kDeadline));
  load.stop();
  // A worker prints "Started process" before it can be handed a connection: every worker
  // that answered has its line in the pipe by now.
  while (auto line = hello.out().next(Clock::now()))
    if (line->starts_with("Started process "))
      started.insert(static_cast<pid_t>(number_after(*line, "Started process ")));
  INFO("hello said:\n" << hello.out().transcript());
  REQUIRE(died.size() == kCrashes);
  for (auto& line : died) {
    pid_t pid = static_cast<pid_t>(number_after(line, "Worker "));
    CHECK(line == "Worker " + std::to_string(pid) + " died (code 1 / signal 0); starting a new one");
  }
  const auto failures = load.failures();
  INFO(load.sent() << " requests, failed:\n" << first_lines(failures));
  CHECK(failures.empty());
  auto served = load.by_pid(0);
  CHECK(served.size() > 2);  // replacements answered too
  for (auto& [pid, n] : served) CHECK(started.count(pid) == 1);
  REQUIRE(::kill(hello.pid(), SIGTERM) == 0);
  CHECK(exited_zero(hello.wait(Clock::now() + kDeadline)));
}

// ---------------------------------------------------------------------------------------------
// Master upgrade (SIGUSR1).

TEST_CASE("A master upgrade under load hands the port to a new master without a failed request",
          "[zero-downtime][upgrade]") {
  const std::string balance = GENERATE(as<std::string>{}, "round-robin", "least-connections",
                                       "ip-hash", "shared", "reuse-port");
  const std::string spawn = GENERATE(as<std::string>{}, "fork", "exec");
  INFO("--balance " << balance << " --spawn " << spawn);
  REQUIRE(::access(kHello.c_str(), X_OK) == 0);
  FdLeakCheck fds;
  Subreaper subreaper;
  REQUIRE(subreaper.ok);
  TempDir dir;
  REQUIRE_FALSE(dir.path.empty());
  const std::string binary = dir.path + "/hello";
  REQUIRE(copy_executable(kHello, binary));
  Adopted new_master;
  HelloProcess hello(binary, {"--workers", "2", "--port", "0", "--work", "0", "--balance", balance,
                              "--spawn", spawn});
  REQUIRE(hello.pid() > 0);
  if (!hello.start(2)) FAIL("hello did not start; it said:\n" << hello.out().transcript());
  const pid_t old_master = hello.pid();
  // The upgrade runs the binary now on disk.
  REQUIRE(deploy(kHello, binary));
  const ino_t deployed = inode_of(binary);

  HttpLoad keep_alive(hello.port(), 2, HttpLoad::Mode::keep_alive);
  HttpLoad per_request(hello.port(), 2, HttpLoad::Mode::new_connection);
  REQUIRE(keep_alive.wait_answered(100, Clock::now() + kDeadline));
  REQUIRE(per_request.wait_answered(100, Clock::now() + kDeadline));
  ExitWatch old_workers(hello.workers());

  REQUIRE(::kill(old_master, SIGUSR1) == 0);
  UpgradeLines u = read_upgrade(hello, 2, Clock::now() + kDeadline);
  new_master.pid = u.new_master;
  INFO("hello said:\n" << hello.out().transcript());
  REQUIRE(u.new_master > 0);
  CHECK(u.new_master != old_master);
  CHECK(u.upgraded_from == old_master);
  CHECK(u.listening == "127.0.0.1:" + std::to_string(hello.port()));
  CHECK(u.outcome ==
        "Upgrade done: new master " + std::to_string(u.new_master) + " is serving; this master exits");
  REQUIRE(u.started.size() == 2);
  CHECK(exe_inode(u.new_master) == deployed);

  // The old master drains its workers and exits 0; the new master is now our child.
  CHECK(exited_zero(hello.wait(Clock::now() + kDeadline)));
  CHECK(old_workers.wait_all(Clock::now() + kDeadline));
  keep_alive.mark(1);
  per_request.mark(1);
  std::uint64_t ka = keep_alive.answered(), pr = per_request.answered();
  CHECK(keep_alive.wait_answered(ka + 200, Clock::now() + kDeadline));
  CHECK(per_request.wait_answered(pr + 200, Clock::now() + kDeadline));
  keep_alive.stop();
  per_request.stop();

  const std::set<pid_t> new_workers(u.started.begin(), u.started.end());
  for (HttpLoad* load : {&keep_alive, &per_request}) {
    const auto failures = load->failures();
    INFO(load->sent() << " requests, failed (a refused connection shows as connect: ...):\n"
                      << first_lines(failures));
    CHECK(failures.empty());
    auto after = load->by_pid(1);
    INFO("after the old master exited, answered by " << describe(after));
    CHECK_FALSE(after.empty());
    for (auto& [pid, n] : after) CHECK(new_workers.count(pid) == 1);
  }
  std::vector<std::string> errors;
  auto by_pid = get_many(hello.port(), 10, errors);
  CHECK(errors.empty());
  for (auto& [pid, n] : by_pid) CHECK(new_workers.count(pid) == 1);
  if (balance == "round-robin" || balance == "least-connections") CHECK(keys(by_pid) == new_workers);
  for (pid_t pid : u.started) CHECK(exe_inode(pid) == deployed);  // fork or exec: the new image

  REQUIRE(::kill(u.new_master, SIGTERM) == 0);
  CHECK(exited_zero(new_master.wait(Clock::now() + kDeadline)));
  for (pid_t pid : u.started) {
    INFO("new worker " << pid);
    CHECK(process_gone(pid));
  }
}

TEST_CASE("A master upgrade whose new binary fails leaves the old master serving",
          "[zero-downtime][upgrade]") {
  REQUIRE(::access(kHello.c_str(), X_OK) == 0);
  FdLeakCheck fds;
  Subreaper subreaper;  // should the failed new master outlive the test's hello
  REQUIRE(subreaper.ok);
  TempDir dir;
  REQUIRE_FALSE(dir.path.empty());
  const std::string binary = dir.path + "/hello";
  REQUIRE(copy_executable(kHello, binary));
  HelloProcess hello(binary, {"--workers", "2", "--port", "0", "--work", "0"});
  REQUIRE(hello.pid() > 0);
  if (!hello.start(2)) FAIL("hello did not start; it said:\n" << hello.out().transcript());
  {
    std::ofstream script(binary + ".new");
    script << "#!/bin/sh\nexit 3\n";
  }
  REQUIRE(::chmod((binary + ".new").c_str(), 0755) == 0);
  REQUIRE(::rename((binary + ".new").c_str(), binary.c_str()) == 0);

  HttpLoad load(hello.port(), 2, HttpLoad::Mode::new_connection);
  REQUIRE(load.wait_answered(50, Clock::now() + kDeadline));
  REQUIRE(::kill(hello.pid(), SIGUSR1) == 0);
  auto failed = hello.out().next_starting_with("Upgrade ", Clock::now() + kDeadline);
  const std::uint64_t before = load.answered();
  CHECK(load.wait_answered(before + 100, Clock::now() + kDeadline));
  load.stop();
  INFO("hello said:\n" << hello.out().transcript());
  REQUIRE(failed.has_value());
  CHECK(failed->starts_with("Upgrade failed: "));
  CHECK(failed->ends_with("; this master keeps serving"));
  CHECK(hello.out().transcript().find("Upgraded from master") == std::string::npos);
  const auto failures = load.failures();
  INFO(first_lines(failures));
  CHECK(failures.empty());
  const std::set<pid_t> workers(hello.workers().begin(), hello.workers().end());
  CHECK(keys(load.by_pid(0)) == workers);
  for (pid_t pid : workers) CHECK_FALSE(process_gone(pid));
  REQUIRE(::kill(hello.pid(), SIGTERM) == 0);
  CHECK(exited_zero(hello.wait(Clock::now() + kDeadline)));
}

TEST_CASE("A second SIGUSR1 during a master upgrade does not start a second new master",
          "[zero-downtime][upgrade]") {
  REQUIRE(::access(kHello.c_str(), X_OK) == 0);
  FdLeakCheck fds;
  Subreaper subreaper;
  REQUIRE(subreaper.ok);
  Adopted new_master;
  HelloProcess hello({"--workers", "2", "--port", "0", "--work", "0"});
  REQUIRE(hello.pid() > 0);
  if (!hello.start(2)) FAIL("hello did not start; it said:\n" << hello.out().transcript());
  const pid_t old_master = hello.pid();

  REQUIRE(::kill(old_master, SIGUSR1) == 0);
  // The new master exists (it prints first thing), so the old one is upgrading: a second
  // SIGUSR1 now is not merged with the first one.
  auto line = hello.out().next_starting_with("Master PID: ", Clock::now() + kDeadline);
  REQUIRE(line.has_value());
  new_master.pid = static_cast<pid_t>(number_after(*line, "Master PID: "));
  REQUIRE(new_master.pid != old_master);
  REQUIRE(::kill(old_master, SIGUSR1) == 0);

  auto done = hello.out().next_starting_with("Upgrade ", Clock::now() + kDeadline);
  INFO("hello said:\n" << hello.out().transcript());
  REQUIRE(done.has_value());
  CHECK(*done == "Upgrade done: new master " + std::to_string(new_master.pid) +
                     " is serving; this master exits");
  CHECK(exited_zero(hello.wait(Clock::now() + kDeadline)));
  std::vector<std::string> errors;
  get_many(hello.port(), 4, errors);
  CHECK(errors.empty());
  REQUIRE(::kill(new_master.pid, SIGTERM) == 0);
  CHECK(exited_zero(new_master.wait(Clock::now() + kDeadline)));
  // Everyone who wrote to hello's stdout is gone: read it to the end.
  while (hello.out().next(Clock::now() + kDeadline)) {
  }
  CHECK(hello.out().eof());
  const std::string& all = hello.out().transcript();
  CHECK(count_lines_starting_with(all, "Master PID: ") == 2);
  CHECK(count_lines_starting_with(all, "Upgraded from master ") == 1);
  CHECK(count_lines_starting_with(all, "Upgrade ") == 1);
}
