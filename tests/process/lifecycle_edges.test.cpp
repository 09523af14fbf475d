// Lifecycle edges of real forked workers (issue 13, "Sound under stress"): a worker that dies
// right after 'listening' is a crash loop to back off, not a healthy worker to replace at once;
// a disconnect() in the Server's constructor is acted on before the loop first blocks; a
// shutdown() before run() makes run() return without forking; 'disconnect' comes when a
// draining worker has closed its channel, 'exit' when it exits (Node's order and timing).
//
// The master runs in the test process; fork-mode workers never return into Catch2 (the library
// ends them in _exit). Callbacks only record; the checks run after run() has returned.
#include <catch2/catch.hpp>

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "harness.hpp"
#include "support/temp_dir.hpp"

using namespace prefork_test;
using prefork::ExitInfo;
using prefork::Options;
using WorkerT = prefork::Worker<prefork::StringCodec>;

namespace {

/// Dies the moment it is listening, every time: what `hello --crash-ms 1` does by chance.
struct ExitOnListening {
  void on_connection(prefork::Connection) {}
  void on_listening() { ::_exit(1); }
};

/// Dies inside the first connection it is given: it served, then crashed.
struct ExitOnConnection {
  void on_connection(prefork::Connection) { ::_exit(1); }
};

/// Asks to leave before its loop ever turns.
struct DisconnectInConstructor {
  explicit DisconnectInConstructor(prefork::WorkerContext<>& ctx) { ctx.disconnect(); }
};

/// A client connection to `address` ("127.0.0.1:PORT"), blocking, close-on-exec; -1 on failure.
/// connect() completes from the listen backlog, without anyone accepting.
int connect_to(const std::string& address) {
  auto colon = address.rfind(':');
  if (colon == std::string::npos) return -1;
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(static_cast<std::uint16_t>(std::atoi(address.c_str() + colon + 1)));
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

}  // namespace

TEST_CASE("A worker that dies right after listening without serving backs off until its slot "
          "is errored",
          "[lifecycle][restart]") {
  std::size_t fds_before = count_open_fds();
  bool timed_out = false, errored = false;
  unsigned forks = 0;
  std::vector<ExitInfo> exits;
  int rc = -1;
  {
    using Policy = prefork::Backoff<prefork::RestartOnCrash>;
    // Short delays so that the slot is errored quickly; the count is what matters. An hour's
    // healthy_after: a loaded machine's slow start-up must not pass for a healthy uptime.
    Policy policy({.initial_delay = std::chrono::milliseconds(1),
                   .factor = 1.0,
                   .max_delay = std::chrono::milliseconds(1),
                   .healthy_after = std::chrono::hours(1),
                   .max_restarts = 4});
    prefork::Cluster<ExitOnListening, prefork::RoundRobin, Policy> cluster(
        Options{.workers = 1, .listen = {"127.0.0.1:0"}, .handle_signals = false}, policy);
    cluster.on_fork([&](WorkerT&) { ++forks; });
    cluster.on_exit([&](WorkerT&, const ExitInfo& e) { exits.push_back(e); });
    cluster.on_errored([&](std::size_t, const ExitInfo&) {
      errored = true;
      cluster.shutdown();
    });
    arm_watchdog(cluster, timed_out);
    rc = cluster.run();
  }
  CHECK_FALSE(timed_out);
  CHECK(rc == 0);
  CHECK(errored);
  // max_restarts quick exits are restarted, the next one errors the slot.
  CHECK(forks == 5);
  for (auto& e : exits) {
    CHECK(e.exit_code == 1);
    CHECK(e.reached_listening);
    CHECK_FALSE(e.served);
  }
  CHECK(count_open_fds() == fds_before);
}

TEMPLATE_TEST_CASE("A worker that crashes in its first connection is replaced at once each time",
                   "[lifecycle][restart]", prefork::RoundRobin, prefork::SharedAccept) {
  // It served, then crashed: the chaos case (tests/bench/chaos.sh), which must not back off.
  // An hour's delay would show any backoff as a timeout.
  std::size_t fds_before = count_open_fds();
  bool timed_out = false, errored = false;
  std::vector<ExitInfo> exits;
  std::vector<int> clients;
  int rc = -1;
  constexpr std::size_t kCrashes = 6;
  {
    using Policy = prefork::Backoff<prefork::RestartOnCrash>;
    Policy policy({.initial_delay = std::chrono::hours(1),
                   .max_delay = std::chrono::hours(1),
                   .max_restarts = 2});
    prefork::Cluster<ExitOnConnection, TestType, Policy> cluster(
        Options{.workers = 1, .listen = {"127.0.0.1:0"}, .handle_signals = false}, policy);
    cluster.on_listening([&](WorkerT&, const std::vector<std::string>& addresses) {
      if (exits.size() < kCrashes) clients.push_back(connect_to(addresses.at(0)));
    });
    cluster.on_exit([&](WorkerT&, const ExitInfo& e) {
      exits.push_back(e);
      if (exits.size() == kCrashes) cluster.shutdown();
    });
    cluster.on_errored([&](std::size_t, const ExitInfo&) {
      errored = true;
      cluster.shutdown();
    });
    arm_watchdog(cluster, timed_out);
    rc = cluster.run();
  }
  for (int fd : clients) {
    CHECK(fd >= 0);
    if (fd >= 0) ::close(fd);
  }
  CHECK_FALSE(timed_out);
  CHECK(rc == 0);
  CHECK_FALSE(errored);
  REQUIRE(exits.size() == kCrashes);
  for (auto& e : exits) {
    CHECK(e.exit_code == 1);
    CHECK(e.reached_listening);
    CHECK(e.served);
  }
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("A Server that disconnects in its constructor exits 0 at once without listen addresses",
          "[lifecycle][disconnect]") {
  // No heartbeat (watchdog off) and a long drain_timeout: nothing but the disconnect itself may
  // end the worker before the test's deadline.
  std::size_t fds_before = count_open_fds();
  bool timed_out = false;
  std::vector<ExitInfo> exits;
  unsigned forks = 0;
  int rc = -1;
  {
    prefork::Cluster<DisconnectInConstructor> cluster(
        Options{.workers = 1,
                .drain_timeout = std::chrono::seconds(60),
                .watchdog_timeout = std::chrono::milliseconds(0),
                .handle_signals = false});
    cluster.on_fork([&](WorkerT&) { ++forks; });
    cluster.on_exit([&](WorkerT&, const ExitInfo& e) {
      exits.push_back(e);
      cluster.shutdown();
    });
    arm_watchdog(cluster, timed_out);
    rc = cluster.run();
  }
  CHECK_FALSE(timed_out);
  CHECK(rc == 0);
  CHECK(forks == 1);  // a planned exit: not restarted
  REQUIRE(exits.size() == 1);
  CHECK(exits[0].exit_code == 0);
  CHECK(exits[0].signal == 0);
  CHECK(exits[0].exited_after_disconnect);
  CHECK(exits[0].reason.empty());  // not a drain timeout
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("shutdown before run makes run return 0 at once without forking a worker",
          "[lifecycle][shutdown]") {
  // Node: cluster.disconnect() with no workers calls back at once, and the process ends.
  // What was set up before is let go as at the end of a run: here a Unix socket file.
  TempDir dir;
  REQUIRE_FALSE(dir.path.empty());
  std::size_t fds_before = count_open_fds();
  bool timed_out = false;
  unsigned forks = 0;
  int rc = -1;
  {
    prefork::Cluster<Puppet> cluster(Options{.workers = 2,
                                             .listen = {"127.0.0.1:0", "unix:" + dir.path + "/s"},
                                             .handle_signals = false});
    cluster.on_fork([&](WorkerT&) { ++forks; });
    cluster.bind();
    REQUIRE(dir.names() == std::vector<std::string>{"s"});
    cluster.shutdown();
    CHECK(cluster.shutting_down());
    arm_watchdog(cluster, timed_out);
    rc = cluster.run();
    CHECK(cluster.fork() == nullptr);
  }
  CHECK_FALSE(timed_out);
  CHECK(rc == 0);
  CHECK(forks == 0);
  CHECK(dir.names().empty());
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("workers_wanted is Options::workers, then what scale set; run forks that many",
          "[lifecycle][scale]") {
  bool timed_out = false;
  std::vector<std::size_t> slots;
  std::size_t wanted_after_shrink = 0;
  prefork::Cluster<Puppet> cluster(
      Options{.workers = 2, .listen = {"127.0.0.1:0"}, .handle_signals = false});
  CHECK(cluster.workers_wanted() == 2);
  CHECK(cluster.scale(0) == std::errc::invalid_argument);
  CHECK(cluster.scale(4097) == std::errc::invalid_argument);
  CHECK(cluster.workers_wanted() == 2);
  CHECK_FALSE(cluster.scale(3));
  CHECK(cluster.workers_wanted() == 3);
  CHECK(cluster.workers().empty());  // before run(), scale() forks nothing: run() does
  cluster.on_listening([&](WorkerT& w) {
    slots.push_back(w.slot());
    if (slots.size() < 3) return;
    CHECK_FALSE(cluster.scale(1));
    wanted_after_shrink = cluster.workers_wanted();
    cluster.shutdown();
  });
  arm_watchdog(cluster, timed_out);
  CHECK(cluster.run() == 0);
  CHECK_FALSE(timed_out);
  std::sort(slots.begin(), slots.end());
  CHECK(slots == std::vector<std::size_t>{0, 1, 2});
  CHECK(wanted_after_shrink == 1);
}

TEST_CASE("A disconnected worker that keeps a timer alive reports disconnect at once and exit "
          "when it exits",
          "[lifecycle][disconnect]") {
  // Node (test-cluster-worker-disconnect.js, child.js _disconnect): the worker closes its
  // servers, then its IPC channel, and the primary emits 'disconnect'; 'exit' follows when the
  // process ends. Puppet's "hold" keeps a timer alive for an hour, so here the worker lives on
  // until drain_timeout sends SIGTERM.
  std::size_t fds_before = count_open_fds();
  bool timed_out = false;
  std::vector<std::string> events;
  bool running_at_disconnect = false, connected_at_disconnect = true;
  std::string reason_at_disconnect = "not called";
  std::optional<ExitInfo> exit;
  int rc = -1;
  {
    Options opts{.workers = 1, .listen = {"127.0.0.1:0"}, .handle_signals = false};
    opts.drain_timeout = std::chrono::seconds(3);
    prefork::Cluster<Puppet, prefork::RoundRobin, prefork::RestartOnCrash> cluster(opts);
    cluster.on_listening([&](WorkerT& w) { w.send("hold"); });
    cluster.on_message([&](WorkerT& w, const std::string& m) {
      if (m == "holding") w.disconnect();
    });
    cluster.on_disconnect([&](WorkerT& w) {
      events.push_back("disconnect");
      running_at_disconnect = !w.is_dead() && !process_gone(w.pid());
      connected_at_disconnect = w.is_connected();
      // Empty until the master escalates: a disconnect reported only at the exit that
      // drain_timeout forced would carry "drain timeout: ...".
      reason_at_disconnect = w.exit_info().reason;
    });
    cluster.on_exit([&](WorkerT&, const ExitInfo& e) {
      events.push_back("exit");
      exit = e;
      cluster.shutdown();
    });
    arm_watchdog(cluster, timed_out);
    rc = cluster.run();
  }
  CHECK_FALSE(timed_out);
  CHECK(rc == 0);
  CHECK(events == std::vector<std::string>{"disconnect", "exit"});
  CHECK(reason_at_disconnect.empty());
  CHECK(running_at_disconnect);
  CHECK_FALSE(connected_at_disconnect);
  REQUIRE(exit.has_value());
  CHECK(exit->exited_after_disconnect);
  CHECK(exit->signal == SIGTERM);  // the hour-long timer outlived drain_timeout
  CHECK(exit->reason == "drain timeout: SIGTERM after 3000 ms");
  CHECK(count_open_fds() == fds_before);
}
