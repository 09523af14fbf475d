// Connection distribution with real forked workers, after Node's
// test/parallel/test-cluster-round-robin.js, test-cluster-shared-handle-bind-error.js and
// test-cluster-bind-twice.js: every BalancePolicy serves the hello example; RoundRobin spreads
// connections evenly; IpHash keeps a client on its slot across a crash; connections handed to a
// stuck worker survive its death; the listening sockets outlive the workers; one cluster on
// IPv4, IPv6 and Unix addresses at once; port 0; bind errors; stale Unix socket files; EMFILE
// in the master's accept loop.
//
// Library-level clusters run their master in a harness child (RemoteMaster), steered by commands
// on one pipe and reporting its events on another. The test process is only a client, with
// blocking sockets whose every step times out, so it never stalls a master's loop.
#include <catch2/catch.hpp>

#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "common/http.hpp"
#include "harness.hpp"
#include "hello_process.hpp"
#include "http_client.hpp"
#include "remote_master.hpp"

using namespace prefork_test;
using prefork::ExitInfo;
using prefork::Options;
using prefork::RestartDecision;
using WorkerT = prefork::Worker<prefork::StringCodec>;

namespace {

/// Answers every HTTP request with "slot <slot> pid <pid>\n", and takes Puppet's orders on the
/// channel ("spin" makes it stop reading its channel for good).
struct SlotServer : Puppet {
  explicit SlotServer(prefork::WorkerContext<>& ctx)
      : Puppet(ctx),
        body_("slot " + std::to_string(ctx.slot()) + " pid " + std::to_string(ctx.pid()) + "\n"),
        http_(ctx.loop(),
              [this](const http::Request&, http::Response& res) { res.body = body_; }) {}

  void on_connection(prefork::Connection c) { http_.adopt(std::move(c)); }
  void on_drain() { http_.drain(); }

  std::string body_;
  http::Server http_;
};

/// Who answered a SlotServer request; slot and pid are -1 unless the answer was a 200 with
/// exactly the expected body.
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

/// Waits for every client's answer at once, up to one deadline for all of them: a client
/// whose answer never comes costs the test one deadline, not one each.
std::vector<HttpResult> receive_all(std::vector<HttpClient>& clients, Clock::time_point deadline) {
  std::vector<HttpResult> results(clients.size());
  std::vector<bool> done(clients.size(), false);
  for (;;) {
    std::vector<pollfd> fds;
    std::vector<std::size_t> which;
    for (std::size_t i = 0; i < clients.size(); ++i) {
      if (done[i]) continue;
      fds.push_back({clients[i].fd(), POLLIN, 0});
      which.push_back(i);
    }
    if (fds.empty()) return results;
    int r = ::poll(fds.data(), fds.size(), ms_until(deadline));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) break;
    for (std::size_t k = 0; k < fds.size(); ++k) {
      if (!fds[k].revents) continue;
      results[which[k]] = clients[which[k]].receive();  // Connection: close: all of it is there
      done[which[k]] = true;
    }
  }
  for (std::size_t i = 0; i < clients.size(); ++i)
    if (!done[i]) results[i].error = "no answer by the deadline";
  return results;
}

Options listening_on(unsigned workers, std::vector<std::string> listen = {"127.0.0.1:0"}) {
  return Options{.workers = workers, .listen = std::move(listen), .handle_signals = false};
}

bool exited_zero(const std::optional<int>& status) {
  return status && WIFEXITED(*status) && WEXITSTATUS(*status) == 0;
}

/// A directory of its own under /tmp for Unix socket files, removed with what is in it.
struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/prefork-balance-XXXXXX";
    if (::mkdtemp(tmpl)) path = tmpl;
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    if (path.empty()) return;
    for (const char* name : {"s.sock", "file", "other.sock"}) ::unlink((path + "/" + name).c_str());
    ::rmdir(path.c_str());
  }
};

bool exists(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}

bool is_socket_file(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode);
}

/// Whether this machine can bind [::1] (containers often run without IPv6).
bool ipv6_loopback_works() {
  prefork::UniqueFd fd(::socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return false;
  sockaddr_in6 a{};
  a.sin6_family = AF_INET6;
  a.sin6_addr = in6addr_loopback;
  return ::bind(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
}

/// A listening TCP socket on 127.0.0.1 with a port the kernel chose, held by the test.
struct TakenPort {
  prefork::UniqueFd fd{::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)};
  std::string address;
  TakenPort() {
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
        ::listen(fd.get(), 4) != 0 ||
        ::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&a), &len) != 0)
      return;
    address = "127.0.0.1:" + std::to_string(ntohs(a.sin_port));
  }
};

/// A Unix socket bound at path and then closed without unlinking: what a crashed server leaves.
bool make_stale_unix_socket(const std::string& path) {
  prefork::UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un un{};
  un.sun_family = AF_UNIX;
  std::snprintf(un.sun_path, sizeof un.sun_path, "%s", path.c_str());
  return fd && ::bind(fd.get(), reinterpret_cast<sockaddr*>(&un), sizeof un) == 0 &&
         ::listen(fd.get(), 1) == 0;
}

/// Runs hello with `balance` and `workers` workers, sends `requests` sequential requests and
/// stops it; the answers by pid.
struct HelloRun {
  std::vector<pid_t> workers;
  std::map<pid_t, int> by_pid;
  std::vector<std::string> failures;
};

HelloRun run_hello(const std::string& balance, unsigned workers, int requests) {
  REQUIRE(::access(kHello.c_str(), X_OK) == 0);
  HelloRun run;
  HelloProcess hello({"--workers", std::to_string(workers), "--work", "0", "--port", "0",
                      "--balance", balance});
  REQUIRE(hello.pid() > 0);
  bool started = hello.start(workers);
  INFO("hello said:\n" << hello.out().transcript());
  REQUIRE(started);
  run.workers = hello.workers();
  run.by_pid = get_many(hello.port(), requests, run.failures);
  ::kill(hello.pid(), SIGTERM);
  auto status = hello.wait(Clock::now() + kDeadline);
  CHECK(exited_zero(status));
  return run;
}

std::string describe(const std::map<pid_t, int>& by_pid) {
  std::string s;
  for (auto& [pid, n] : by_pid) s += std::to_string(pid) + ":" + std::to_string(n) + " ";
  return s;
}

/// Prefers the worker in slot 0 whenever it is ready; otherwise lets the master take the
/// first ready worker.
using PreferSlotZero =
    prefork::PickWith<decltype([](const prefork::PickContext& c) -> std::optional<std::size_t> {
      for (std::size_t i = 0; i < c.ready.size(); ++i)
        if (c.ready[i].slot == 0) return i;
      return std::nullopt;
    })>;

/// Restarts a crashed worker 1.5 s later: a window with no worker alive.
struct RestartLater {
  RestartDecision on_exit(std::size_t, const ExitInfo& e) const noexcept {
    if (e.exited_after_disconnect) return RestartDecision::no_restart();
    return RestartDecision::restart_after(std::chrono::milliseconds(1500));
  }
};
static_assert(prefork::RestartPolicy<RestartLater>);

}  // namespace

// ---------------------------------------------------------------------------------------------
// Every policy serves hello.

TEST_CASE("hello with round-robin balance answers every request and every worker serves",
          "[balance]") {
  FdLeakCheck fds;
  unsigned workers = GENERATE(2u, 4u);
  INFO(workers << " workers");
  HelloRun run = run_hello("round-robin", workers, 10 * static_cast<int>(workers));
  INFO(describe(run.by_pid));
  CHECK(run.failures.empty());
  CHECK(keys(run.by_pid) == std::set<pid_t>(run.workers.begin(), run.workers.end()));
}

TEST_CASE("hello with least-connections balance answers every request and every worker serves",
          "[balance]") {
  FdLeakCheck fds;
  unsigned workers = GENERATE(2u, 4u);
  INFO(workers << " workers");
  HelloRun run = run_hello("least-connections", workers, 10 * static_cast<int>(workers));
  INFO(describe(run.by_pid));
  CHECK(run.failures.empty());
  CHECK(keys(run.by_pid) == std::set<pid_t>(run.workers.begin(), run.workers.end()));
}

TEST_CASE("hello with ip-hash balance answers every request from 127.0.0.1 with one worker",
          "[balance]") {
  FdLeakCheck fds;
  unsigned workers = GENERATE(2u, 4u);
  INFO(workers << " workers");
  HelloRun run = run_hello("ip-hash", workers, 10 * static_cast<int>(workers));
  INFO(describe(run.by_pid));
  CHECK(run.failures.empty());
  REQUIRE(run.by_pid.size() == 1);
  pid_t only = run.by_pid.begin()->first;
  CHECK(std::find(run.workers.begin(), run.workers.end(), only) != run.workers.end());
}

TEST_CASE("hello with shared accept balance answers every request from its workers",
          "[balance]") {
  FdLeakCheck fds;
  unsigned workers = GENERATE(2u, 4u);
  INFO(workers << " workers");
  HelloRun run = run_hello("shared", workers, 10 * static_cast<int>(workers));
  INFO(describe(run.by_pid));
  CHECK(run.failures.empty());
  for (pid_t pid : keys(run.by_pid))
    CHECK(std::find(run.workers.begin(), run.workers.end(), pid) != run.workers.end());
}

TEST_CASE("hello with reuse-port balance answers every request from its workers", "[balance]") {
  FdLeakCheck fds;
  unsigned workers = GENERATE(2u, 4u);
  INFO(workers << " workers");
  HelloRun run = run_hello("reuse-port", workers, 10 * static_cast<int>(workers));
  INFO(describe(run.by_pid));
  CHECK(run.failures.empty());
  for (pid_t pid : keys(run.by_pid))
    CHECK(std::find(run.workers.begin(), run.workers.end(), pid) != run.workers.end());
}

TEST_CASE("RoundRobin spreads 200 sequential connections evenly over four workers",
          "[balance]") {
  FdLeakCheck fds;
  HelloRun run = run_hello("round-robin", 4, 200);
  INFO(describe(run.by_pid));
  CHECK(run.failures.empty());
  REQUIRE(run.by_pid.size() == 4);
  int most = 0, least = 200;
  for (auto& [pid, n] : run.by_pid) {
    most = std::max(most, n);
    least = std::min(least, n);
  }
  CHECK(10 * most <= 11 * least);  // max / min <= 1.1
}

// ---------------------------------------------------------------------------------------------
// IpHash stickiness across a crash.

TEST_CASE("IpHash sends every connection from one address to its slot and then to the replacement",
          "[balance]") {
  FdLeakCheck fds;
  RemoteMaster<SlotServer, prefork::IpHash> master(listening_on(4));
  REQUIRE(master.pid() > 0);
  std::vector<Listening> ready = master.expect_listening(4);
  const std::string address = ready[0].addresses.at(0);

  prefork::detail::SocketAddress client;
  REQUIRE_FALSE(prefork::detail::parse_address("127.0.0.1:0", client));
  const auto home = static_cast<long>(prefork::IpHash::hash(client) % 4);
  const pid_t first = ready[static_cast<std::size_t>(home)].pid;
  INFO("127.0.0.1 hashes to slot " << home << ", worker pid " << first);

  for (int i = 0; i < 20; ++i) {
    Served s = served_by(http_get(address));
    INFO("request " << i << " " << s.error);
    CHECK(s.slot == home);
    CHECK(s.pid == first);
  }

  REQUIRE(::kill(first, SIGKILL) == 0);
  auto exit = parse_exit(master.expect("exit "));
  REQUIRE(exit.has_value());
  CHECK(exit->slot == static_cast<std::size_t>(home));
  CHECK(exit->pid == first);
  CHECK(exit->signal == SIGKILL);
  std::vector<Listening> replacement = master.expect_listening(1);
  REQUIRE(replacement[0].slot == static_cast<std::size_t>(home));
  const pid_t second = replacement[0].pid;
  CHECK(second != first);

  for (int i = 0; i < 20; ++i) {
    Served s = served_by(http_get(address));
    INFO("request " << i << " after the crash " << s.error);
    CHECK(s.slot == home);
    CHECK(s.pid == second);
  }
  CHECK(exited_zero(master.finish()));
}

// ---------------------------------------------------------------------------------------------
// Connections the master handed to a worker that never took them.

TEST_CASE("Connections handed to a stuck worker are answered by another worker once it is killed",
          "[balance]") {
  FdLeakCheck fds;
  const unsigned workers = GENERATE(1u, 2u);
  INFO(workers << " workers; every connection goes to slot 0 while it is ready");
  RemoteMaster<SlotServer, PreferSlotZero> master(listening_on(workers));
  REQUIRE(master.pid() > 0);
  std::vector<Listening> ready = master.expect_listening(workers);
  const std::string address = ready[0].addresses.at(0);
  const Listening stuck = ready[0];

  // The worker in slot 0 stops reading its channel: connection frames pile up unread, and the
  // master keeps its own copy of each socket until the worker acknowledges it.
  master.command("send " + std::to_string(stuck.id) + " spin");
  master.expect("message " + std::to_string(stuck.id) + " spinning");
  const std::size_t before = master.master_fds();

  constexpr std::size_t kClients = 16;
  std::vector<HttpClient> clients(kClients);
  for (auto& c : clients) {
    REQUIRE(c.connect(address));  // the kernel completes the handshake: accepted or not
    REQUIRE(c.send_get());
  }
  master.sync();  // the master has accepted them all (64 per wake-up) and handed them over
  CHECK(master.master_fds() == before + kClients);

  REQUIRE(::kill(stuck.pid, SIGKILL) == 0);
  std::set<long> answered_by;
  for (std::size_t i = 0; i < kClients; ++i) {
    Served s = served_by(clients[i].receive());
    INFO("client " << i << " " << s.error);
    CHECK(s.pid > 0);
    CHECK(s.pid != stuck.pid);
    answered_by.insert(s.pid);
  }
  CHECK(master.expect_exit(stuck.id).signal == SIGKILL);
  if (workers == 1) CHECK(answered_by.size() == 1);  // the replacement, in slot 0
  CHECK(exited_zero(master.finish()));
}

TEST_CASE("Connections round-robin queued for a stuck worker are all answered after it is killed",
          "[balance]") {
  FdLeakCheck fds;
  RemoteMaster<SlotServer, prefork::RoundRobin> master(listening_on(2));
  REQUIRE(master.pid() > 0);
  std::vector<Listening> ready = master.expect_listening(2);
  const std::string address = ready[0].addresses.at(0);
  const Listening stuck = ready[0];

  master.command("send " + std::to_string(stuck.id) + " spin");
  master.expect("message " + std::to_string(stuck.id) + " spinning");
  const std::size_t before = master.master_fds();

  constexpr std::size_t kClients = 16;
  std::vector<HttpClient> clients(kClients);
  for (auto& c : clients) {
    REQUIRE(c.connect(address));
    REQUIRE(c.send_get());
  }
  master.sync();
  // Half went to the stuck worker and stay unacknowledged (the healthy worker's half may not
  // be acknowledged yet either).
  CHECK(master.master_fds() >= before + kClients / 2);

  REQUIRE(::kill(stuck.pid, SIGKILL) == 0);
  std::map<long, int> by_slot;
  for (std::size_t i = 0; i < kClients; ++i) {
    Served s = served_by(clients[i].receive());
    INFO("client " << i << " " << s.error);
    CHECK(s.pid > 0);
    CHECK(s.pid != stuck.pid);
    ++by_slot[s.slot];
  }
  CHECK(by_slot[1] >= static_cast<int>(kClients / 2));  // its own half at least
  CHECK(by_slot[0] + by_slot[1] == static_cast<int>(kClients));
  CHECK(exited_zero(master.finish()));
}

// ---------------------------------------------------------------------------------------------
// The listening sockets outlive the workers.

namespace {

template <class Balance>
void check_backlog_waits_for_a_worker() {
  FdLeakCheck fds;
  RemoteMaster<SlotServer, Balance, RestartLater> master(listening_on(1));
  REQUIRE(master.pid() > 0);
  Listening only = master.expect_listening(1).front();
  const std::string address = only.addresses.at(0);
  CHECK(served_by(http_get(address)).pid == only.pid);

  REQUIRE(::kill(only.pid, SIGKILL) == 0);
  master.expect("exit " + std::to_string(only.id) + " ");
  // No worker is alive now; the replacement is 1.5 s away.
  constexpr std::size_t kClients = 3;
  std::vector<HttpClient> clients(kClients);
  for (auto& c : clients) {
    REQUIRE(c.connect(address));  // the listening socket is still open: the backlog takes it
    REQUIRE(c.send_get());
  }
  bool worker_was_back = false;
  while (auto line = master.arrived())
    if (line->starts_with("fork ")) worker_was_back = true;
  if (worker_was_back)
    WARN("the replacement was forked before the clients connected: the machine is too slow "
         "for this test's 1.5 s window, which then checks less");

  for (std::size_t i = 0; i < kClients; ++i) {
    Served s = served_by(clients[i].receive());
    INFO("client " << i << " " << s.error);
    CHECK(s.slot == 0);
    CHECK(s.pid > 0);
    CHECK(s.pid != only.pid);
  }
  CHECK(exited_zero(master.finish()));
}

}  // namespace

TEST_CASE("The listening socket stays open with no worker alive and is served once one is back",
          "[balance][listen]") {
  SECTION("round-robin") { check_backlog_waits_for_a_worker<prefork::RoundRobin>(); }
  SECTION("ip-hash") { check_backlog_waits_for_a_worker<prefork::IpHash>(); }
  SECTION("shared accept") { check_backlog_waits_for_a_worker<prefork::SharedAccept>(); }
  SECTION("reuse-port") { check_backlog_waits_for_a_worker<prefork::ReusePort>(); }
}

TEST_CASE("A reuse-port worker stopped on purpose leaves no new connection stranded on its socket",
          "[balance][listen]") {
  FdLeakCheck fds;
  RemoteMaster<SlotServer, prefork::ReusePort> master(listening_on(2));
  REQUIRE(master.pid() > 0);
  std::vector<Listening> ready = master.expect_listening(2);
  const std::string address = ready[0].addresses.at(0);
  const Listening stopped = ready[1];

  // A planned stop (scaling down): RestartOnCrash does not replace it, so slot 1 stays empty.
  master.command("kill " + std::to_string(stopped.id));
  master.expect("exit " + std::to_string(stopped.id) + " ");
  master.sync();

  // Each connection has its own source port, so the kernel's reuse-port hash spreads them over
  // every socket in the group; with 24 of them, some hash to slot 1's (2^-24 that none does).
  constexpr std::size_t kClients = 24;
  std::vector<HttpClient> clients(kClients);
  for (auto& c : clients) {
    REQUIRE(c.connect(address));
    REQUIRE(c.send_get());
  }
  std::vector<HttpResult> results = receive_all(clients, Clock::now() + kDeadline);
  std::size_t stranded = 0;
  for (std::size_t i = 0; i < kClients; ++i) {
    Served s = served_by(results[i]);
    INFO("client " << i << " " << s.error);
    CHECK(s.slot == 0);
    if (s.slot != 0) ++stranded;
  }
  INFO(stranded << " of " << kClients << " connections were never answered");
  CHECK(stranded == 0);
  CHECK(exited_zero(master.finish()));
}

// ---------------------------------------------------------------------------------------------
// Listen addresses.

namespace {

template <class Balance>
void check_every_address_serves() {
  FdLeakCheck fds;
  TempDir dir;
  REQUIRE_FALSE(dir.path.empty());
  const std::string unix_path = dir.path + "/s.sock";
  std::vector<std::string> listen{"127.0.0.1:0"};
  if (ipv6_loopback_works())
    listen.push_back("[::1]:0");
  else
    WARN("IPv6 loopback does not work here: testing IPv4 and Unix addresses only");
  listen.push_back("unix:" + unix_path);

  {
    RemoteMaster<SlotServer, Balance> master(listening_on(2, listen));
    REQUIRE(master.pid() > 0);
    std::vector<Listening> ready = master.expect_listening(2);
    const std::vector<std::string>& addresses = ready[0].addresses;
    CHECK(ready[1].addresses == addresses);
    REQUIRE(addresses.size() == listen.size());
    for (std::size_t i = 0; i < listen.size(); ++i) {
      INFO("configured " << listen[i] << ", bound " << addresses[i]);
      if (listen[i].starts_with("unix:")) {
        CHECK(addresses[i] == listen[i]);
        CHECK(is_socket_file(unix_path));
      } else {
        // Port 0 is reported resolved: same host, the port the kernel chose.
        std::string host = listen[i].substr(0, listen[i].size() - 1);
        CHECK(addresses[i].starts_with(host));
        CHECK(number_after(addresses[i], host, 0) > 0);
      }
    }
    std::set<long> pids{ready[0].pid, ready[1].pid};
    for (auto& a : addresses) {
      for (int i = 0; i < 4; ++i) {
        Served s = served_by(http_get(a));
        INFO(a << " request " << i << " " << s.error);
        CHECK(pids.count(s.pid) == 1);
      }
    }
    CHECK(exited_zero(master.finish()));
  }
  // The master removes the socket file it created when run() returns.
  CHECK_FALSE(exists(unix_path));
}

}  // namespace

TEST_CASE("One cluster listens on IPv4 and IPv6 and Unix addresses and serves each of them",
          "[listen]") {
  SECTION("round-robin") { check_every_address_serves<prefork::RoundRobin>(); }
  SECTION("least-connections") { check_every_address_serves<prefork::LeastConnections>(); }
  SECTION("ip-hash") { check_every_address_serves<prefork::IpHash>(); }
  SECTION("shared accept") { check_every_address_serves<prefork::SharedAccept>(); }
  SECTION("reuse-port") { check_every_address_serves<prefork::ReusePort>(); }
}

TEST_CASE("on_listening with addresses reports the port the kernel chose for port 0",
          "[listen]") {
  FdLeakCheck fds;
  bool timed_out = false;
  std::vector<std::string> bound, reported_one, reported_two;
  {
    prefork::Cluster<Puppet> cluster(
        Options{.workers = 2, .listen = {"127.0.0.1:0", "127.0.0.1:0"}, .handle_signals = false});
    CHECK(cluster.addresses().empty());
    cluster.bind();
    bound = cluster.addresses();
    int listening = 0;
    cluster.master().on_listening([&](WorkerT& w, const std::vector<std::string>& addresses) {
      (w.slot() == 0 ? reported_one : reported_two) = addresses;
      if (++listening == 2) cluster.shutdown();
    });
    arm_watchdog(cluster, timed_out);
    CHECK(cluster.run() == 0);
    CHECK(cluster.addresses() == bound);
  }
  REQUIRE_FALSE(timed_out);
  REQUIRE(bound.size() == 2);
  for (auto& a : bound) {
    INFO(a);
    CHECK(a.starts_with("127.0.0.1:"));
    CHECK(number_after(a, "127.0.0.1:", 0) > 0);
  }
  CHECK(bound[0] != bound[1]);  // two sockets, two ports
  CHECK(reported_one == bound);
  CHECK(reported_two == bound);
}

namespace {

/// Expects f() to throw std::system_error EADDRINUSE with exactly `message`. Checks rather
/// than requires, so that a test case goes on to check what the failed call left behind.
template <class F>
void check_address_in_use(F f, const std::string& message) {
  bool threw = false;
  try {
    f();
  } catch (const std::system_error& e) {
    threw = true;
    CHECK(e.code() == std::errc::address_in_use);
    CHECK(std::string(e.what()) == message);
  }
  INFO("expected: " << message);
  CHECK(threw);
}

}  // namespace

TEST_CASE("Binding an address in use throws system_error naming the address", "[listen]") {
  FdLeakCheck fds;
  TakenPort taken;
  REQUIRE_FALSE(taken.address.empty());
  const std::string message = "prefork: bind " + taken.address + ": Address already in use";
  Options opts{.workers = 2, .listen = {taken.address}, .handle_signals = false};

  SECTION("from bind") {
    prefork::Cluster<Puppet> cluster(opts);
    check_address_in_use([&] { cluster.bind(); }, message);
    CHECK(cluster.addresses().empty());
  }
  SECTION("from run before any worker is forked") {
    prefork::Cluster<Puppet> cluster(opts);
    int forked = 0;
    cluster.on_fork([&](WorkerT&) { ++forked; });
    check_address_in_use([&] { cluster.run(); }, message);
    CHECK(forked == 0);
    CHECK(cluster.workers().empty());
  }
  SECTION("for the second of two addresses with nothing left bound") {
    opts.listen = {"127.0.0.1:0", taken.address};
    prefork::Cluster<Puppet> cluster(opts);
    std::size_t open_before = count_open_fds();
    check_address_in_use([&] { cluster.bind(); }, message);
    CHECK(cluster.addresses().empty());
    CHECK(count_open_fds() == open_before);  // the first socket was closed again
  }
  SECTION("with reuse-port") {
    prefork::Cluster<Puppet, prefork::ReusePort> cluster(opts);
    check_address_in_use([&] { cluster.bind(); }, message);
  }
  SECTION("with reuse-port from run") {
    prefork::Cluster<Puppet, prefork::ReusePort> cluster(opts);
    check_address_in_use([&] { cluster.run(); }, message);
    CHECK(cluster.workers().empty());
  }
}

TEST_CASE("A stale Unix socket file at the listen path is replaced", "[listen]") {
  FdLeakCheck fds;
  TempDir dir;
  REQUIRE_FALSE(dir.path.empty());
  const std::string path = dir.path + "/s.sock";
  REQUIRE(make_stale_unix_socket(path));
  REQUIRE(is_socket_file(path));
  {
    RemoteMaster<SlotServer, prefork::RoundRobin> master(listening_on(1, {"unix:" + path}));
    REQUIRE(master.pid() > 0);
    Listening only = master.expect_listening(1).front();
    CHECK(only.addresses == std::vector<std::string>{"unix:" + path});
    Served s = served_by(http_get("unix:" + path));
    INFO(s.error);
    CHECK(s.pid == only.pid);
    CHECK(exited_zero(master.finish()));
  }
  CHECK_FALSE(exists(path));
}

TEST_CASE("A Unix listen path with a live listener makes bind fail and is left alone",
          "[listen]") {
  FdLeakCheck fds;
  TempDir dir;
  REQUIRE_FALSE(dir.path.empty());
  const std::string path = dir.path + "/s.sock";
  prefork::UniqueFd live = prefork::detail::listen_on("unix:" + path, 16);
  struct stat before {};
  REQUIRE(::lstat(path.c_str(), &before) == 0);
  {
    prefork::Cluster<Puppet> cluster(
        Options{.workers = 1, .listen = {"unix:" + path}, .handle_signals = false});
    check_address_in_use([&] { cluster.bind(); },
                         "prefork: bind unix:" + path + ": Address already in use");
  }
  // The same file, and its listener still takes connections.
  struct stat after {};
  REQUIRE(::lstat(path.c_str(), &after) == 0);
  CHECK(after.st_ino == before.st_ino);
  HttpClient probe;
  CHECK(probe.connect("unix:" + path));
}

TEST_CASE("A regular file at the Unix listen path makes bind fail and is not deleted",
          "[listen]") {
  FdLeakCheck fds;
  TempDir dir;
  REQUIRE_FALSE(dir.path.empty());
  const std::string path = dir.path + "/file";
  {
    std::ofstream f(path);
    f << "precious\n";
  }
  {
    prefork::Cluster<Puppet> cluster(
        Options{.workers = 1, .listen = {"unix:" + path}, .handle_signals = false});
    check_address_in_use([&] { cluster.bind(); },
                         "prefork: bind unix:" + path + ": Address already in use");
  }
  std::ifstream f(path);
  std::string content;
  std::getline(f, content);
  CHECK(content == "precious");
}

TEST_CASE("A bind that fails on a later address leaves no Unix socket file behind", "[listen]") {
  FdLeakCheck fds;
  TempDir dir;
  REQUIRE_FALSE(dir.path.empty());
  TakenPort taken;
  REQUIRE_FALSE(taken.address.empty());
  const std::string path = dir.path + "/s.sock";
  Options opts{.workers = 2, .listen = {"unix:" + path, taken.address}, .handle_signals = false};
  const std::string message = "prefork: bind " + taken.address + ": Address already in use";

  SECTION("one shared socket per address") {
    prefork::Cluster<Puppet> cluster(opts);
    check_address_in_use([&] { cluster.bind(); }, message);
    CHECK(cluster.addresses().empty());
  }
  SECTION("reuse-port") {
    prefork::Cluster<Puppet, prefork::ReusePort> cluster(opts);
    check_address_in_use([&] { cluster.bind(); }, message);
    CHECK(cluster.addresses().empty());
  }
  // "Nothing stays bound": the socket is closed, and its file must not be left on disk either.
  CHECK_FALSE(exists(path));
}

TEST_CASE("A reuse-port bind that fails for a later slot leaves nothing bound", "[listen]") {
  FdLeakCheck fds;
  Pipe result;
  REQUIRE(result.read >= 0);
  // In a harness child, whose descriptor limit can be lowered so that slot 0's socket is the
  // last one the process may open and slot 1's fails with EMFILE.
  pid_t child = fork_harness([&] {
    result.close_read();
    prefork::Cluster<Puppet, prefork::ReusePort> cluster(
        Options{.workers = 3, .listen = {"127.0.0.1:0"}, .handle_signals = false});
    const std::size_t before = count_open_fds();
    DescriptorFiller filler;
    filler.fill();
    if (filler.fillers.empty()) {
      write_all(result.write, "could not fill the descriptor table\n");
      return 1;
    }
    ::close(filler.fillers.back());  // exactly one descriptor left
    filler.fillers.pop_back();
    // The exception is looked at only once descriptors are back: UBSan's vptr check of the
    // caught object needs one of its own and reports a false "invalid vptr" without it.
    std::exception_ptr error;
    try {
      cluster.bind();
    } catch (...) {
      error = std::current_exception();
    }
    filler.release();
    std::string what = "no exception";
    if (error) {
      try {
        std::rethrow_exception(error);
      } catch (const std::system_error& e) {
        what = e.what();
      } catch (...) {
        what = "another exception";
      }
    }
    std::string report = what + "\naddresses " + std::to_string(cluster.addresses().size()) +
                         "\nextra descriptors " +
                         std::to_string(count_open_fds() - before) + "\n";
    write_all(result.write, report);
    return 0;
  });
  result.close_write();
  REQUIRE(child > 0);
  LineReader reader(result.read);
  auto what = reader.next(Clock::now() + kDeadline);
  auto addresses = reader.next(Clock::now() + kDeadline);
  auto extra = reader.next(Clock::now() + kDeadline);
  auto status = wait_child(child, Clock::now() + kDeadline);
  if (!status) kill_and_reap(child);
  REQUIRE(what.has_value());
  INFO(reader.transcript());
  CHECK(what->starts_with("prefork: socket for 127.0.0.1:"));
  CHECK(what->ends_with("Too many open files"));
  CHECK(addresses == std::optional<std::string>("addresses 0"));
  CHECK(extra == std::optional<std::string>("extra descriptors 0"));
  CHECK(exited_zero(status));
}

// ---------------------------------------------------------------------------------------------
// EMFILE in the master's accept loop.

TEST_CASE("The master survives EMFILE on accept and serves the clients that waited once it can",
          "[balance]") {
  FdLeakCheck fds;
  RemoteMaster<SlotServer, prefork::RoundRobin> master(listening_on(2));
  REQUIRE(master.pid() > 0);
  std::vector<Listening> ready = master.expect_listening(2);
  const std::string address = ready[0].addresses.at(0);
  CHECK(served_by(http_get(address)).pid > 0);

  master.command("limit");
  auto limited = words(master.expect("limited "));
  INFO(master.transcript());
  REQUIRE(limited.size() >= 2);
  CHECK(master.transcript().find("Too many open files") != std::string::npos);

  // Clients connect (the kernel queues them) while every accept4 in the master fails.
  constexpr std::size_t kClients = 4;
  std::vector<HttpClient> clients(kClients);
  for (auto& c : clients) {
    REQUIRE(c.connect(address));
    REQUIRE(c.send_get());
  }
  // The master logs the failure and pauses accept.
  std::string first = master.expect("log accept: ");
  CHECK(first.find("Too many open files") != std::string::npos);
  CHECK(first.find("pausing") != std::string::npos);

  // Not spinning: over the next 300 ms of the master's own clock, pausing 100 ms after each
  // failure, it fails at most a few times more; a master that retried accept4 while the socket
  // stays readable would log thousands of failures. (The bound is a count the pause makes
  // impossible to reach however slow the machine: a late timer means fewer retries, not more.)
  master.command("wait 300");
  std::size_t failed_accepts = 0;
  for (auto& line : master.expect_all_until("waited"))
    if (line.starts_with("log accept: ")) ++failed_accepts;
  INFO(failed_accepts << " more failed accepts logged in 300 ms");
  CHECK(failed_accepts < 1000);
  CHECK_FALSE(process_gone(master.pid()));

  // Descriptors free again: the clients that waited in the backlog are served.
  master.command("unlimit");
  master.expect("unlimited");
  for (std::size_t i = 0; i < kClients; ++i) {
    Served s = served_by(clients[i].receive());
    INFO("client " << i << " " << s.error);
    CHECK(s.pid > 0);
  }
  for (int i = 0; i < 4; ++i) {
    Served s = served_by(http_get(address));
    INFO("new request " << i << " " << s.error);
    CHECK(s.pid > 0);
  }
  CHECK_FALSE(process_gone(master.pid()));
  CHECK(exited_zero(master.finish()));
}
