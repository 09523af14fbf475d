// Lifecycle of real forked workers, after Node's test/parallel/test-cluster-worker-events.js,
// test-cluster-worker-exit.js, test-cluster-worker-kill.js and test-cluster-worker-disconnect.js:
// the order of the events and the states seen in them, ids and slots, exit records, which exits
// count as planned, restarts into the same slot, crash loops, cluster.fork() and shutdown.
//
// The master runs in the test process; fork-mode workers never return into Catch2 (the library
// ends them in _exit). Callbacks only record; the checks run after run() has returned.
#include <catch2/catch.hpp>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <functional>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "harness.hpp"

using namespace prefork_test;
using prefork::ExitInfo;
using prefork::Options;
using prefork::WorkerState;
using WorkerT = prefork::Worker<prefork::StringCodec>;

namespace {

struct Event {
  unsigned id;
  std::size_t slot;
  std::string what;
  WorkerState state;
};

/// Records every lifecycle event with the worker's state as the callback sees it.
template <class ClusterT>
void record_events(ClusterT& cluster, std::vector<Event>& events) {
  cluster.on_fork([&](WorkerT& w) { events.push_back({w.id(), w.slot(), "fork", w.state()}); });
  cluster.on_online([&](WorkerT& w) { events.push_back({w.id(), w.slot(), "online", w.state()}); });
  cluster.on_listening([&](WorkerT& w) {
    events.push_back({w.id(), w.slot(), "listening", w.state()});
  });
  cluster.on_disconnect([&](WorkerT& w) {
    events.push_back({w.id(), w.slot(), "disconnect", w.state()});
  });
}

std::vector<std::string> names_for(const std::vector<Event>& events, unsigned id) {
  std::vector<std::string> v;
  for (auto& e : events)
    if (e.id == id) v.push_back(e.what);
  return v;
}

std::vector<WorkerState> states_for(const std::vector<Event>& events, unsigned id) {
  std::vector<WorkerState> v;
  for (auto& e : events)
    if (e.id == id) v.push_back(e.state);
  return v;
}

Options listening_options(unsigned workers) {
  return Options{.workers = workers, .listen = {"127.0.0.1:0"}, .handle_signals = false};
}

/// What happened to the first worker of a one-worker cluster after the test acted on it.
struct Outcome {
  bool timed_out = false;
  int rc = -1;
  ExitInfo exit;              // worker 1's exit record
  bool dead_in_exit = false;  // w.is_dead() inside on_exit
  bool live_in_exit = true;   // worker 1 still listed by workers() inside on_exit
  std::vector<Event> events;  // every lifecycle event, all workers
  std::size_t live_after_restart_decision = 0;
};

/// Runs a one-worker cluster that listens; once worker 1 is listening, act(cluster, w) runs.
/// After worker 1's exit has been handled (and the RestartPolicy has decided), the test
/// records how many workers are alive and shuts down. Plain RestartOnCrash decides with no
/// delay, so a replacement, if any, has been forked by then.
template <class Restart = prefork::RestartOnCrash, class Act>
Outcome run_one_worker(Act act) {
  Outcome o;
  std::size_t fds_before = count_open_fds();
  {
    prefork::Cluster<Puppet, prefork::RoundRobin, Restart> cluster(listening_options(1));
    record_events(cluster, o.events);
    cluster.on_listening([&](WorkerT& w) {
      o.events.push_back({w.id(), w.slot(), "listening", w.state()});
      if (w.id() == 1) act(cluster, w);
    });
    cluster.on_exit([&](WorkerT& w, const ExitInfo& e) {
      o.events.push_back({w.id(), w.slot(), "exit", w.state()});
      if (w.id() != 1) return;
      o.exit = e;
      o.dead_in_exit = w.is_dead();
      o.live_in_exit = cluster.master().worker(w.id()) != nullptr;
      cluster.master().loop().post([&] {
        o.live_after_restart_decision = cluster.workers().size();
        cluster.shutdown();
      });
    });
    arm_watchdog(cluster, o.timed_out);
    o.rc = cluster.run();
  }
  CHECK(count_open_fds() == fds_before);
  return o;
}

const Event* find_event(const std::vector<Event>& events, unsigned id, const std::string& what) {
  for (auto& e : events)
    if (e.id == id && e.what == what) return &e;
  return nullptr;
}

}  // namespace

TEST_CASE("Every worker goes through fork online listening disconnect and exit in that order",
          "[lifecycle]") {
  std::size_t fds_before = count_open_fds();
  std::vector<Event> events;
  std::vector<ExitInfo> exits;
  bool timed_out = false, listed_during_exit = false;
  int rc = -1;
  {
    prefork::Cluster<Puppet> cluster(listening_options(2));
    record_events(cluster, events);
    int listening = 0;
    cluster.on_listening([&](WorkerT& w) {
      events.push_back({w.id(), w.slot(), "listening", w.state()});
      if (++listening == 2) cluster.shutdown();
    });
    cluster.on_exit([&](WorkerT& w, const ExitInfo& e) {
      events.push_back({w.id(), w.slot(), "exit", w.state()});
      exits.push_back(e);
      // Node removes the worker from cluster.workers before it emits 'exit'.
      if (cluster.master().worker(w.id())) listed_during_exit = true;
    });
    arm_watchdog(cluster, timed_out);
    rc = cluster.run();
  }
  REQUIRE_FALSE(timed_out);
  CHECK(rc == 0);
  const std::vector<std::string> order{"fork", "online", "listening", "disconnect", "exit"};
  const std::vector<WorkerState> states{WorkerState::none, WorkerState::online,
                                        WorkerState::listening, WorkerState::disconnected,
                                        WorkerState::dead};
  for (unsigned id : {1u, 2u}) {
    INFO("worker " << id);
    CHECK(names_for(events, id) == order);
    CHECK(states_for(events, id) == states);
  }
  REQUIRE(exits.size() == 2);
  for (auto& e : exits) {
    CHECK(e.exit_code == 0);
    CHECK(e.signal == 0);
    CHECK(e.exited_after_disconnect);
    CHECK(e.reached_listening);
    CHECK_FALSE(e.crashed());
  }
  CHECK_FALSE(listed_during_exit);
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("Worker ids start at 1 and increase while slots run from 0 to workers minus 1",
          "[lifecycle]") {
  std::size_t fds_before = count_open_fds();
  std::vector<Event> events;
  struct Self {
    unsigned id;
    std::size_t slot;
    pid_t pid;
  };
  std::map<unsigned, Self> master_view, worker_view;
  bool timed_out = false;
  {
    prefork::Cluster<Puppet> cluster(Options{.workers = 3, .handle_signals = false});
    record_events(cluster, events);
    cluster.on_online([&](WorkerT& w) {
      events.push_back({w.id(), w.slot(), "online", w.state()});
      master_view[w.id()] = {w.id(), w.slot(), w.pid()};
      w.send("whoami");
    });
    cluster.on_message([&](WorkerT& w, const std::string& m) {
      // "me:<id>:<slot>:<pid>"
      unsigned id = 0;
      unsigned long slot = 0;
      int pid = 0;
      if (std::sscanf(m.c_str(), "me:%u:%lu:%d", &id, &slot, &pid) == 3)
        worker_view[w.id()] = {id, static_cast<std::size_t>(slot), static_cast<pid_t>(pid)};
      if (worker_view.size() == 3) cluster.shutdown();
    });
    arm_watchdog(cluster, timed_out);
    CHECK(cluster.run() == 0);
  }
  REQUIRE_FALSE(timed_out);
  std::vector<std::pair<unsigned, std::size_t>> forks;
  for (auto& e : events)
    if (e.what == "fork") forks.emplace_back(e.id, e.slot);
  CHECK(forks == std::vector<std::pair<unsigned, std::size_t>>{{1, 0}, {2, 1}, {3, 2}});
  REQUIRE(worker_view.size() == 3);
  std::set<pid_t> pids;
  for (auto& [id, seen] : worker_view) {
    INFO("worker " << id);
    CHECK(seen.id == id);
    CHECK(seen.slot == master_view[id].slot);
    CHECK(seen.pid == master_view[id].pid);
    CHECK(seen.pid != ::getpid());
    pids.insert(seen.pid);
  }
  CHECK(pids.size() == 3);
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("A worker that exits with a code is reported with exactly that code", "[lifecycle]") {
  // ctx.exit(7) flushes first; _exit(7) does not: both must read as exit code 7, no signal.
  std::string how = GENERATE(as<std::string>{}, "exit:7", "_exit:7");
  INFO(how);
  Outcome o = run_one_worker<prefork::NeverRestart>([&](auto&, WorkerT& w) { w.send(how); });
  REQUIRE_FALSE(o.timed_out);
  CHECK(o.rc == 0);
  CHECK(o.exit.exit_code == 7);
  CHECK(o.exit.signal == 0);
  CHECK(o.exit.crashed());
  CHECK_FALSE(o.exit.exited_after_disconnect);
  CHECK(o.exit.reached_listening);
  CHECK(o.exit.reason.empty());
  CHECK(o.dead_in_exit);
  CHECK_FALSE(o.live_in_exit);
}

TEST_CASE("A worker killed by an external SIGKILL is reported as signal 9 with exit code -1",
          "[lifecycle]") {
  Outcome o =
      run_one_worker<prefork::NeverRestart>([](auto&, WorkerT& w) { ::kill(w.pid(), SIGKILL); });
  REQUIRE_FALSE(o.timed_out);
  CHECK(o.exit.exit_code == -1);
  CHECK(o.exit.signal == SIGKILL);
  CHECK(o.exit.crashed());
  CHECK_FALSE(o.exit.exited_after_disconnect);
}

TEST_CASE("A worker stopped with disconnect exits 0 after disconnect and is not restarted",
          "[lifecycle]") {
  Outcome o = run_one_worker([](auto&, WorkerT& w) { w.disconnect(); });
  REQUIRE_FALSE(o.timed_out);
  CHECK(o.exit.exit_code == 0);
  CHECK(o.exit.signal == 0);
  CHECK(o.exit.exited_after_disconnect);
  CHECK(names_for(o.events, 1) ==
        std::vector<std::string>{"fork", "online", "listening", "disconnect", "exit"});
  CHECK(o.live_after_restart_decision == 0);
  CHECK(find_event(o.events, 2, "fork") == nullptr);
}

TEST_CASE("A worker stopped with kill dies of SIGTERM after disconnect and is not restarted",
          "[lifecycle]") {
  Outcome o = run_one_worker([](auto&, WorkerT& w) { CHECK_FALSE(w.kill()); });
  REQUIRE_FALSE(o.timed_out);
  CHECK(o.exit.exit_code == -1);
  CHECK(o.exit.signal == SIGTERM);
  CHECK(o.exit.exited_after_disconnect);
  CHECK(o.live_after_restart_decision == 0);
  CHECK(find_event(o.events, 2, "fork") == nullptr);
}

TEST_CASE("A worker stopped with kill SIGKILL is after disconnect and is not restarted",
          "[lifecycle]") {
  Outcome o = run_one_worker([](auto&, WorkerT& w) { CHECK_FALSE(w.kill(SIGKILL)); });
  REQUIRE_FALSE(o.timed_out);
  CHECK(o.exit.signal == SIGKILL);
  CHECK(o.exit.exited_after_disconnect);
  CHECK(o.live_after_restart_decision == 0);
}

TEST_CASE("A worker that disconnects itself exits 0 after disconnect and is not restarted",
          "[lifecycle]") {
  Outcome o = run_one_worker([](auto&, WorkerT& w) { w.send("disconnect"); });
  REQUIRE_FALSE(o.timed_out);
  CHECK(o.exit.exit_code == 0);
  CHECK(o.exit.signal == 0);
  CHECK(o.exit.exited_after_disconnect);
  CHECK(names_for(o.events, 1) ==
        std::vector<std::string>{"fork", "online", "listening", "disconnect", "exit"});
  CHECK(o.live_after_restart_decision == 0);
}

TEST_CASE("A worker that exits 0 by itself is not after disconnect and is not restarted",
          "[lifecycle]") {
  Outcome o = run_one_worker([](auto&, WorkerT& w) { w.send("exit:0"); });
  REQUIRE_FALSE(o.timed_out);
  CHECK(o.exit.exit_code == 0);
  CHECK_FALSE(o.exit.crashed());
  CHECK_FALSE(o.exit.exited_after_disconnect);
  CHECK(o.live_after_restart_decision == 0);
}

TEST_CASE("RestartOnCrash replaces a worker that exits with a code in its slot with a new id",
          "[lifecycle]") {
  Outcome o = run_one_worker([](auto&, WorkerT& w) { w.send("_exit:3"); });
  REQUIRE_FALSE(o.timed_out);
  CHECK(o.exit.exit_code == 3);
  CHECK_FALSE(o.exit.exited_after_disconnect);
  CHECK(o.live_after_restart_decision == 1);
  const Event* fork2 = find_event(o.events, 2, "fork");
  REQUIRE(fork2);
  CHECK(fork2->slot == 0);
  CHECK(find_event(o.events, 3, "fork") == nullptr);
}

TEST_CASE("RestartOnCrash replaces a worker killed by an external SIGKILL in its slot",
          "[lifecycle]") {
  Outcome o = run_one_worker([](auto&, WorkerT& w) { ::kill(w.pid(), SIGKILL); });
  REQUIRE_FALSE(o.timed_out);
  CHECK(o.exit.signal == SIGKILL);
  CHECK_FALSE(o.exit.exited_after_disconnect);
  CHECK(o.live_after_restart_decision == 1);
  const Event* fork2 = find_event(o.events, 2, "fork");
  REQUIRE(fork2);
  CHECK(fork2->slot == 0);
}

TEST_CASE("A crashed worker is replaced in its own slot while the other workers stay",
          "[lifecycle]") {
  std::size_t fds_before = count_open_fds();
  std::vector<Event> events;
  std::map<unsigned, pid_t> pids_at_fork;
  std::map<unsigned, std::string> whoami;
  bool timed_out = false, crashed = false;
  {
    prefork::Cluster<Puppet, prefork::RoundRobin, prefork::RestartOnCrash> cluster(
        listening_options(2));
    record_events(cluster, events);
    cluster.on_fork([&](WorkerT& w) {
      events.push_back({w.id(), w.slot(), "fork", w.state()});
      pids_at_fork[w.id()] = w.pid();
    });
    int listening = 0;
    cluster.on_listening([&](WorkerT& w) {
      events.push_back({w.id(), w.slot(), "listening", w.state()});
      ++listening;
      if (listening == 2 && !crashed) {
        crashed = true;
        cluster.send(2, "_exit:3");
      } else if (w.id() == 3) {
        for (auto* x : cluster.workers()) x->send("whoami");
      }
    });
    cluster.on_exit([&](WorkerT& w, const ExitInfo&) {
      events.push_back({w.id(), w.slot(), "exit", w.state()});
    });
    cluster.on_message([&](WorkerT& w, const std::string& m) {
      whoami[w.id()] = m;
      if (whoami.size() == 2) cluster.shutdown();
    });
    arm_watchdog(cluster, timed_out);
    CHECK(cluster.run() == 0);
  }
  REQUIRE_FALSE(timed_out);
  const Event* fork3 = find_event(events, 3, "fork");
  REQUIRE(fork3);
  CHECK(fork3->slot == 1);
  CHECK(pids_at_fork[3] != pids_at_fork[2]);
  // Worker 1 went on untouched: its only exit is the one at shutdown, after worker 3 joined.
  CHECK(names_for(events, 1) ==
        std::vector<std::string>{"fork", "online", "listening", "disconnect", "exit"});
  REQUIRE(whoami.size() == 2);
  CHECK(whoami[1] == "me:1:0:" + std::to_string(pids_at_fork[1]));
  CHECK(whoami[3] == "me:3:1:" + std::to_string(pids_at_fork[3]));
  CHECK(find_event(events, 4, "fork") == nullptr);
  CHECK(count_open_fds() == fds_before);
}

namespace {

/// A Server that cannot start in slot 0 (its constructor throws every time) and works elsewhere.
struct FailsInSlot0 : Puppet {
  explicit FailsInSlot0(prefork::WorkerContext<>& ctx) : Puppet(ctx) {
    if (ctx.slot() == 0) throw std::runtime_error("slot 0 cannot start (test)");
  }
};

}  // namespace

TEST_CASE("A Server whose constructor always throws gets its slot errored after max_restarts",
          "[lifecycle]") {
  // max_restarts 5: the first worker and 5 restarts, then the 6th quick exit gives the slot up.
  // healthy_after is far above any start-up time, so every exit counts as quick even on a
  // loaded machine.
  constexpr unsigned kMaxRestarts = 5;
  std::size_t fds_before = count_open_fds();
  std::map<std::size_t, int> forks_per_slot;
  std::vector<ExitInfo> slot0_exits;
  std::vector<std::size_t> errored;
  std::vector<std::string> log;
  bool timed_out = false, pong = false;
  int forks_when_errored = -1;
  {
    using Policy = prefork::Backoff<prefork::RestartOnCrash>;
    Options opts = listening_options(2);
    opts.log = [&](const prefork::LogRecord& r) { log.emplace_back(r.message); };
    prefork::Cluster<FailsInSlot0, prefork::RoundRobin, Policy> cluster(
        std::move(opts),
        Policy(prefork::BackoffOptions{
            .initial_delay = 1ms, .healthy_after = 60s, .max_restarts = kMaxRestarts}));
    cluster.on_fork([&](WorkerT& w) { ++forks_per_slot[w.slot()]; });
    cluster.on_exit([&](WorkerT& w, const ExitInfo& e) {
      if (w.slot() == 0) slot0_exits.push_back(e);
    });
    cluster.on_errored([&](std::size_t slot, const ExitInfo&) {
      errored.push_back(slot);
      forks_when_errored = forks_per_slot[0];
      // The master is still serving: the healthy worker answers, then a timer still fires.
      for (auto* w : cluster.workers())
        if (w->slot() == 1) w->send("ping");
    });
    cluster.on_message([&](WorkerT&, const std::string& m) {
      if (m.starts_with("pong:")) {
        pong = true;
        cluster.after(50ms, [&] { cluster.shutdown(); });
      }
    });
    arm_watchdog(cluster, timed_out);
    CHECK(cluster.run() == 0);
  }
  REQUIRE_FALSE(timed_out);
  CHECK(errored == std::vector<std::size_t>{0});
  CHECK(forks_when_errored == static_cast<int>(kMaxRestarts + 1));
  CHECK(forks_per_slot[0] == static_cast<int>(kMaxRestarts + 1));  // none after giving up
  CHECK(forks_per_slot[1] == 1);
  REQUIRE(slot0_exits.size() == kMaxRestarts + 1);
  for (auto& e : slot0_exits) {
    CHECK(e.exit_code == 1);
    CHECK_FALSE(e.reached_listening);
  }
  CHECK(pong);
  CHECK(std::any_of(log.begin(), log.end(), [](const std::string& l) {
    return l.find("slot 0 is errored") != std::string::npos;
  }));
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("cluster fork adds a worker in a new slot while the master runs", "[lifecycle]") {
  std::size_t fds_before = count_open_fds();
  std::vector<Event> events;
  bool timed_out = false;
  std::size_t live_at_end = 0;
  WorkerT* added = nullptr;
  unsigned added_id = 0;
  std::size_t added_slot = 99;
  {
    prefork::Cluster<Puppet> cluster(listening_options(1));
    record_events(cluster, events);
    cluster.on_listening([&](WorkerT& w) {
      events.push_back({w.id(), w.slot(), "listening", w.state()});
      if (w.id() == 1) {
        added = cluster.fork();
        if (added) {
          added_id = added->id();
          added_slot = added->slot();
        }
      } else {
        live_at_end = cluster.workers().size();
        cluster.shutdown();
      }
    });
    arm_watchdog(cluster, timed_out);
    CHECK(cluster.run() == 0);
  }
  REQUIRE_FALSE(timed_out);
  REQUIRE(added != nullptr);
  CHECK(added_id == 2);
  CHECK(added_slot == 1);
  CHECK(live_at_end == 2);
  CHECK(names_for(events, 2) ==
        std::vector<std::string>{"fork", "online", "listening", "disconnect"});
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("Graceful shutdown makes run return 0 and leaves no child process", "[lifecycle]") {
  std::size_t fds_before = count_open_fds();
  std::vector<pid_t> pids;
  std::vector<ExitInfo> exits;
  bool timed_out = false;
  int rc = -1;
  {
    prefork::Cluster<Puppet> cluster(listening_options(3));
    int listening = 0;
    cluster.on_listening([&](WorkerT& w) {
      pids.push_back(w.pid());
      if (++listening == 3) cluster.shutdown();
    });
    cluster.on_exit([&](WorkerT&, const ExitInfo& e) { exits.push_back(e); });
    arm_watchdog(cluster, timed_out);
    rc = cluster.run();
  }
  REQUIRE_FALSE(timed_out);
  CHECK(rc == 0);
  errno = 0;
  CHECK(::waitpid(-1, nullptr, WNOHANG) == -1);
  CHECK(errno == ECHILD);
  REQUIRE(pids.size() == 3);
  for (pid_t pid : pids) {
    INFO("worker pid " << pid);
    errno = 0;
    CHECK(::kill(pid, 0) == -1);
    CHECK(errno == ESRCH);
  }
  REQUIRE(exits.size() == 3);
  for (auto& e : exits) {
    CHECK(e.exit_code == 0);
    CHECK(e.exited_after_disconnect);
  }
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("A SIGTERM to the master shuts the cluster down gracefully", "[lifecycle]") {
  std::size_t fds_before = count_open_fds();
  std::vector<ExitInfo> exits;
  bool timed_out = false;
  int rc = -1;
  {
    Options opts = listening_options(2);
    opts.handle_signals = true;
    prefork::Cluster<Puppet> cluster(std::move(opts));
    int listening = 0;
    // run() has installed the handlers (signalfd) by the time a worker is listening.
    cluster.on_listening([&](WorkerT&) {
      if (++listening == 2) ::kill(::getpid(), SIGTERM);
    });
    cluster.on_exit([&](WorkerT&, const ExitInfo& e) { exits.push_back(e); });
    arm_watchdog(cluster, timed_out);
    rc = cluster.run();
  }
  REQUIRE_FALSE(timed_out);
  CHECK(rc == 0);
  REQUIRE(exits.size() == 2);
  for (auto& e : exits) {
    CHECK(e.exit_code == 0);
    CHECK(e.exited_after_disconnect);
  }
  CHECK(::waitpid(-1, nullptr, WNOHANG) == -1);
  CHECK(count_open_fds() == fds_before);
}

namespace {

std::string own_executable() {
  char buf[4096];
  ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  return n > 0 ? std::string(buf, static_cast<std::size_t>(n)) : std::string();
}

/// Tells the master what an exec'd worker sees of its own environment.
struct EnvReporter {
  explicit EnvReporter(prefork::WorkerContext<>& ctx) {
    const char* marker = std::getenv("PREFORK_WORKER");
    ctx.send(std::string("env:") + (marker ? "set" : "unset") + ":" +
             (prefork::is_worker() ? "worker" : "master") + ":" + std::to_string(ctx.id()) + ":" +
             std::to_string(ctx.slot()));
  }
};

}  // namespace

// exec mode re-runs this test binary, restricted to this one test case by exec_argv: Catch2's
// main() runs again, the test case constructs the Cluster, which is a worker now, and the
// worker's run() ends in _exit. The name must stay free of Catch2 test-spec characters; the
// worker's Catch2 reporter writes to /dev/null.
TEST_CASE("An exec mode worker runs main again and its code does not see PREFORK_WORKER",
          "[lifecycle]") {
  const std::string self = own_executable();
  REQUIRE_FALSE(self.empty());
  Options opts{
      .workers = 2,
      .spawn = prefork::SpawnMode::exec,
      .handle_signals = false,
      .exec_argv = {self, Catch::getResultCapture().getCurrentTestName(), "--out", "/dev/null"}};
  prefork::Cluster<EnvReporter> cluster(std::move(opts));
  if (cluster.is_worker()) {
    int rc = cluster.run();
    std::fflush(nullptr);
    ::_exit(rc);
  }
  std::map<unsigned, std::string> reports;
  std::map<unsigned, std::string> exe_of;
  std::map<unsigned, bool> environ_shows_marker;
  bool timed_out = false;
  cluster.on_online([&](WorkerT& w) {
    char buf[4096];
    std::string link = "/proc/" + std::to_string(w.pid()) + "/exe";
    ssize_t n = ::readlink(link.c_str(), buf, sizeof buf - 1);
    exe_of[w.id()] = n > 0 ? std::string(buf, static_cast<std::size_t>(n)) : "";
    std::ifstream env("/proc/" + std::to_string(w.pid()) + "/environ", std::ios::binary);
    std::string all((std::istreambuf_iterator<char>(env)), std::istreambuf_iterator<char>());
    environ_shows_marker[w.id()] = all.find("PREFORK_WORKER=") != std::string::npos;
  });
  cluster.on_message([&](WorkerT& w, const std::string& m) {
    reports[w.id()] = m;
    if (reports.size() == 2) cluster.shutdown();
  });
  arm_watchdog(cluster, timed_out);
  CHECK(cluster.run() == 0);
  REQUIRE_FALSE(timed_out);
  REQUIRE(reports.size() == 2);
  CHECK(reports[1] == "env:unset:worker:1:0");
  CHECK(reports[2] == "env:unset:worker:2:1");
  for (auto& [id, exe] : exe_of) CHECK(exe == self);
  // /proc/<pid>/environ shows the environment block execve() built; unsetenv() only edits the
  // environ array, so the marker can still show there while getenv() no longer finds it.
  for (auto& [id, shown] : environ_shows_marker)
    if (shown) WARN("worker " << id << ": /proc/<pid>/environ still shows PREFORK_WORKER=");
  CHECK(::waitpid(-1, nullptr, WNOHANG) == -1);
}

namespace {

// Logs one record from its worker's side as soon as it is built.
struct LogsWhenBuilt {
  explicit LogsWhenBuilt(prefork::WorkerContext<>& ctx) {
    ctx.log(prefork::LogLevel::info, "built in pid " + std::to_string(::getpid()));
  }
  void on_connection(prefork::Connection) {}
};

}  // namespace

TEST_CASE("The log sink gets one record per lifecycle event from the master and the worker's own",
          "[lifecycle][log]") {
  Pipe lines;  // the sink runs in the master and, after fork, in the worker: both write here
  std::size_t fds_before = count_open_fds();
  bool timed_out = false;
  pid_t worker_pid = 0;
  {
    Options opts = listening_options(1);
    const int out = lines.write;
    opts.log = [out](const prefork::LogRecord& r) {
      write_all(out, prefork::format_log_line(r) + "\n");
    };
    prefork::Cluster<LogsWhenBuilt> cluster(std::move(opts));
    cluster.on_listening([&](WorkerT& w) {
      worker_pid = w.pid();
      cluster.shutdown();
    });
    arm_watchdog(cluster, timed_out);
    CHECK(cluster.run() == 0);
  }
  CHECK(count_open_fds() == fds_before);
  lines.close_write();
  LineReader reader(lines.read);
  std::vector<std::string> got;
  while (auto line = reader.next(Clock::now() + kDeadline)) got.push_back(*line);
  REQUIRE_FALSE(timed_out);
  INFO("log:\n" << reader.transcript());
  const std::string master = " master " + std::to_string(::getpid()) + " ";
  const std::string pid = "pid " + std::to_string(worker_pid);
  std::vector<std::string> lifecycle;
  bool worker_record = false;
  for (auto& l : got) {
    REQUIRE(l.size() > 25);
    CHECK(l[4] == '-');
    CHECK(l[23] == 'Z');  // 2026-12-03T04:30:56.123Z
    if (l.find(" worker " + std::to_string(worker_pid) + " worker 1 worker: built in " + pid) !=
        std::string::npos)
      worker_record = true;
    for (std::string e : {"fork", "online", "listening", "disconnect", "exit"})
      if (l.find(master + "worker 1 " + e + ": " + pid) != std::string::npos)
        lifecycle.push_back(e);
  }
  CHECK(lifecycle ==
        std::vector<std::string>{"fork", "online", "listening", "disconnect", "exit"});
  CHECK(worker_record);
  CHECK(reader.transcript().find(master + "serving: pid") != std::string::npos);
  CHECK(reader.transcript().find(master + "shutdown: graceful: draining 1 worker") !=
        std::string::npos);
}
