// Supervision with real processes, after Node's test/parallel/test-cluster-master-kill.js,
// test-cluster-worker-death.js and test-cluster-worker-forced-exit.js: workers die with their
// master (even a busy one), the master keeps no descriptor from workers it has reaped, a worker
// that cannot start does not make the master fork without bound, and kill() of a worker that is
// already gone is an error value, not a crash.
#include <catch2/catch.hpp>

#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "harness.hpp"
#include "support/subreaper.hpp"

using namespace prefork_test;
using prefork::ExitInfo;
using prefork::Options;
using WorkerT = prefork::Worker<prefork::StringCodec>;

extern char** environ;

namespace {

Options listening_options(unsigned workers) {
  return Options{.workers = workers, .listen = {"127.0.0.1:0"}, .handle_signals = false};
}

}  // namespace

TEST_CASE("Killing the master with SIGKILL takes every worker down within 2 s even a busy one",
          "[supervision]") {
  std::size_t fds_before = count_open_fds();
  Subreaper subreaper;
  REQUIRE(subreaper.ok);
  std::optional<std::string> line;
  std::vector<pid_t> workers;
  pid_t busy = -1;
  {
    Pipe report;
    REQUIRE(report.read >= 0);
    // The master runs in a harness child, so that the test process can watch it die. Its
    // workers inherit the pipe's write end (fork mode closes only the master's own descriptors),
    // so the pipe reads EOF only once every one of them is gone too.
    pid_t master = fork_harness([&] {
      report.close_read();
      prefork::Cluster<Puppet> cluster(listening_options(3));
      int listening = 0;
      cluster.on_listening([&](WorkerT& w) {
        if (++listening == 3) w.send("spin");
      });
      cluster.on_message([&](WorkerT& w, const std::string& m) {
        if (m != "spinning") return;
        std::string out = "pids";
        for (auto* x : cluster.workers()) out += " " + std::to_string(x->pid());
        out += " busy " + std::to_string(w.pid()) + "\n";
        write_all(report.write, out);
      });
      return cluster.run();
    });
    report.close_write();
    REQUIRE(master > 0);

    LineReader reader(report.read);
    line = reader.next(Clock::now() + kDeadline);
    if (!line) kill_and_reap(master);
    REQUIRE(line.has_value());
    std::istringstream in(*line);
    std::string word;
    in >> word;
    while (in >> word && word != "busy") workers.push_back(std::stoi(word));
    in >> busy;
    REQUIRE(workers.size() == 3);
    REQUIRE(std::find(workers.begin(), workers.end(), busy) != workers.end());

    // pidfds taken while the workers are certainly alive: polling them tells when each exits,
    // whoever its parent is by then.
    std::map<pid_t, int> pidfds;
    for (pid_t pid : workers) {
      int fd = pidfd_open(pid);
      REQUIRE(fd >= 0);
      pidfds[pid] = fd;
    }
    CHECK_FALSE(process_gone(busy));

    REQUIRE(::kill(master, SIGKILL) == 0);
    auto master_status = wait_child(master, Clock::now() + kDeadline);
    if (!master_status) kill_and_reap(master);
    REQUIRE(master_status.has_value());
    CHECK(WIFSIGNALED(*master_status));
    CHECK(WTERMSIG(*master_status) == SIGKILL);

    const auto gone_by = Clock::now() + 2s;
    for (pid_t pid : workers) {
      INFO("worker pid " << pid << (pid == busy ? " (busy)" : ""));
      bool exited = wait_pidfd(pidfds[pid], gone_by);
      CHECK(exited);
      CHECK(process_gone(pid));
      // Reparented to this process (the subreaper): reap it, and see how it died.
      int status = 0;
      if (!exited) ::kill(pid, SIGKILL);
      pid_t r;
      do {
        r = ::waitpid(pid, &status, 0);
      } while (r < 0 && errno == EINTR);
      CHECK(r == pid);
      if (pid == busy) {
        // Only PR_SET_PDEATHSIG can stop a worker that never returns to its loop.
        CHECK(WIFSIGNALED(status));
        CHECK(WTERMSIG(status) == SIGKILL);
      }
      ::close(pidfds[pid]);
    }
    // Every holder of the pipe's write end is gone.
    CHECK_FALSE(reader.next(Clock::now() + kDeadline).has_value());
    CHECK(reader.eof());
  }
  CHECK(::waitpid(-1, nullptr, WNOHANG) == -1);
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("The master holds no more descriptors or memory after 1000 crash and restart cycles",
          "[supervision]") {
  constexpr int kCycles = 1000;
  std::size_t fds_before = count_open_fds();
  std::vector<std::size_t> master_fds;
  std::size_t rss_warm = 0, rss_end = 0;  // the master's resident memory at cycle 100 and last
  std::vector<std::string> worker_fds;  // "fds:<open>:<pidfds>" as each worker saw itself
  std::vector<ExitInfo> exits;
  bool timed_out = false;
  {
    prefork::Cluster<Puppet, prefork::RoundRobin, prefork::RestartOnCrash> cluster(
        listening_options(1));
    cluster.on_listening([&](WorkerT& w) { w.send("fds"); });
    cluster.on_message([&](WorkerT& w, const std::string& m) {
      if (!m.starts_with("fds:")) return;
      // The same moment of every cycle: the previous worker is reaped and its replacement is
      // listening, so the master holds exactly one worker's channel and pidfd.
      master_fds.push_back(count_open_fds());
      worker_fds.push_back(m);
      if (worker_fds.size() == 100) rss_warm = prefork::detail::resident_bytes(::getpid());
      rss_end = prefork::detail::resident_bytes(::getpid());
      if (worker_fds.size() <= kCycles) {
        w.send("_exit:1");
      } else {
        cluster.shutdown();
      }
    });
    cluster.on_exit([&](WorkerT&, const ExitInfo& e) { exits.push_back(e); });
    arm_watchdog(cluster, timed_out, 10 * kDeadline);
    CHECK(cluster.run() == 0);
  }
  REQUIRE_FALSE(timed_out);
  REQUIRE(master_fds.size() == kCycles + 1);
#if !defined(__SANITIZE_ADDRESS__)  // ASan's quarantine keeps freed memory resident on purpose
  // Allocator noise, not growth: 900 cycles that each leaked as little as a worker record
  // (a few hundred bytes) would already exceed it.
  CAPTURE(rss_warm, rss_end);
  CHECK(rss_end <= rss_warm + (256u << 10));
#endif
  CHECK(std::count(master_fds.begin(), master_fds.end(), master_fds.front()) == kCycles + 1);
  CHECK(master_fds.back() == master_fds.front());
  // A worker holds what it inherited and its own loop and channel, the same in every cycle;
  // in particular no pidfd of the master's (a restarted worker is forked while the master
  // still handles its predecessor's exit).
  CHECK(worker_fds.front().ends_with(":0"));
  std::set<std::string> distinct(worker_fds.begin(), worker_fds.end());
  CAPTURE(worker_fds.front(), worker_fds[1], worker_fds.back());
  CHECK(distinct.size() == 1);
  CHECK(std::count_if(exits.begin(), exits.end(),
                      [](const ExitInfo& e) { return e.exit_code == 1; }) == kCycles);
  CHECK(count_open_fds() == fds_before);
}

namespace {

/// A Server that ends its worker as soon as it is built, every time (bad config, port taken).
struct ExitsAtStart {
  explicit ExitsAtStart(prefork::WorkerContext<>& ctx) { ctx.exit(3); }
};

}  // namespace

TEST_CASE(
    "A worker that exits at start-up every time does not make the master fork without "
    "bound",
    "[supervision]") {
  // No timing asserts: the bound is on forks (the first one plus max_restarts), and the
  // master's timers keep firing through the crash loop and after it.
  constexpr unsigned kMaxRestarts = 5;
  std::size_t fds_before = count_open_fds();
  int forks = 0, forks_at_errored = -1, forks_later = -1;
  long ticks = 0, ticks_at_errored = -1, ticks_later = -1;
  std::vector<std::size_t> errored;
  std::vector<ExitInfo> exits;
  bool timed_out = false;
  {
    using Policy = prefork::Backoff<prefork::RestartOnCrash>;
    Options opts = listening_options(1);
    opts.log = [](const prefork::LogRecord&) {};
    prefork::Cluster<ExitsAtStart, prefork::RoundRobin, Policy> cluster(
        std::move(opts),
        Policy(prefork::BackoffOptions{
            .initial_delay = 1ms, .healthy_after = 60s, .max_restarts = kMaxRestarts}));
    cluster.on_fork([&](WorkerT&) { ++forks; });
    cluster.on_exit([&](WorkerT&, const ExitInfo& e) { exits.push_back(e); });
    cluster.every(1ms, [&] { ++ticks; });
    cluster.on_errored([&](std::size_t slot, const ExitInfo&) {
      errored.push_back(slot);
      forks_at_errored = forks;
      ticks_at_errored = ticks;
      // Give the master a while in which nothing may be forked, then look again.
      cluster.after(200ms, [&] {
        forks_later = forks;
        ticks_later = ticks;
        cluster.shutdown();
      });
    });
    arm_watchdog(cluster, timed_out);
    CHECK(cluster.run() == 0);
  }
  REQUIRE_FALSE(timed_out);
  CHECK(errored == std::vector<std::size_t>{0});
  CHECK(forks_at_errored == static_cast<int>(kMaxRestarts + 1));
  CHECK(forks_later == forks_at_errored);
  CHECK(ticks_later > ticks_at_errored);
  REQUIRE(exits.size() == kMaxRestarts + 1);
  for (auto& e : exits) {
    CHECK(e.exit_code == 3);
    CHECK_FALSE(e.exited_after_disconnect);
  }
  CHECK(::waitpid(-1, nullptr, WNOHANG) == -1);
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("kill of a worker that has already exited returns an error and changes nothing",
          "[supervision]") {
  std::size_t fds_before = count_open_fds();
  std::error_code kill_ec, term_ec, send_ec;
  bool after_disconnect_before = true, after_disconnect_after = true, timed_out = false;
  std::optional<ExitInfo> info;
  {
    prefork::Cluster<Puppet, prefork::RoundRobin, prefork::NeverRestart> cluster(
        listening_options(1));
    cluster.on_listening([&](WorkerT& w) { w.send("_exit:4"); });
    cluster.on_exit([&](WorkerT& w, const ExitInfo& e) {
      info = e;
      after_disconnect_before = w.exited_after_disconnect();
      kill_ec = w.kill(SIGKILL);
      term_ec = w.kill();
      w.disconnect();
      send_ec = w.send("ping");
      after_disconnect_after = w.exited_after_disconnect();
      cluster.shutdown();
    });
    arm_watchdog(cluster, timed_out);
    CHECK(cluster.run() == 0);
  }
  REQUIRE_FALSE(timed_out);
  REQUIRE(info.has_value());
  CHECK(info->exit_code == 4);
  CHECK(info->signal == 0);
  CHECK(kill_ec == std::errc::no_such_process);
  CHECK(term_ec == std::errc::no_such_process);
  CHECK(send_ec == prefork::errc::channel_closed);
  CHECK_FALSE(after_disconnect_before);
  // The worker crashed on its own; a failed kill() afterwards does not make it a planned exit.
  CHECK_FALSE(after_disconnect_after);
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE(
    "kill of a worker whose process has exited but is not reaped yet leaves its exit "
    "record alone",
    "[supervision]") {
  // 'disconnect' comes from the channel's EOF, which the kernel produces while the process
  // exits: the process is past the point where a signal could change how it ends.
  std::size_t fds_before = count_open_fds();
  std::optional<ExitInfo> info;
  bool timed_out = false;
  {
    prefork::Cluster<Puppet, prefork::RoundRobin, prefork::NeverRestart> cluster(
        listening_options(1));
    cluster.on_listening([&](WorkerT& w) { w.send("_exit:4"); });
    cluster.on_disconnect([&](WorkerT& w) {
      auto ec = w.kill(SIGKILL);
      CHECK((!ec || ec == std::errc::no_such_process));
    });
    cluster.on_exit([&](WorkerT&, const ExitInfo& e) {
      info = e;
      cluster.shutdown();
    });
    arm_watchdog(cluster, timed_out);
    CHECK(cluster.run() == 0);
  }
  REQUIRE_FALSE(timed_out);
  REQUIRE(info.has_value());
  CHECK(info->exit_code == 4);
  CHECK(info->signal == 0);
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("A worker that does not finish draining gets SIGTERM after drain_timeout",
          "[supervision]") {
  std::size_t fds_before = count_open_fds();
  std::optional<ExitInfo> info;
  bool timed_out = false;
  {
    Options opts = listening_options(1);
    opts.drain_timeout = 100ms;
    opts.kill_timeout = 100ms;
    prefork::Cluster<Puppet, prefork::RoundRobin, prefork::RestartOnCrash> cluster(std::move(opts));
    cluster.on_listening([&](WorkerT& w) { w.send("hold"); });
    cluster.on_message([&](WorkerT& w, const std::string& m) {
      if (m == "holding") w.disconnect();
    });
    cluster.on_exit([&](WorkerT&, const ExitInfo& e) {
      info = e;
      cluster.shutdown();
    });
    arm_watchdog(cluster, timed_out);
    CHECK(cluster.run() == 0);
  }
  REQUIRE_FALSE(timed_out);
  REQUIRE(info.has_value());
  CHECK(info->signal == SIGTERM);
  CHECK(info->exited_after_disconnect);
  CHECK(info->reason == "drain timeout: SIGTERM after 100 ms");
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("A draining worker that ignores SIGTERM gets SIGKILL after kill_timeout",
          "[supervision]") {
  std::size_t fds_before = count_open_fds();
  std::optional<ExitInfo> info;
  bool timed_out = false;
  {
    Options opts = listening_options(1);
    opts.drain_timeout = 100ms;
    opts.kill_timeout = 100ms;
    prefork::Cluster<Puppet, prefork::RoundRobin, prefork::RestartOnCrash> cluster(std::move(opts));
    cluster.on_listening([&](WorkerT& w) {
      w.send("hold");
      w.send("ignore sigterm");
    });
    cluster.on_message([&](WorkerT& w, const std::string& m) {
      if (m == "ignoring sigterm") w.disconnect();
    });
    cluster.on_exit([&](WorkerT&, const ExitInfo& e) {
      info = e;
      cluster.shutdown();
    });
    arm_watchdog(cluster, timed_out);
    CHECK(cluster.run() == 0);
  }
  REQUIRE_FALSE(timed_out);
  REQUIRE(info.has_value());
  CHECK(info->signal == SIGKILL);
  CHECK(info->exited_after_disconnect);
  CHECK(info->reason == "drain timeout: SIGKILL after SIGTERM was ignored");
  CHECK(count_open_fds() == fds_before);
}

// ---- watchdog, start timeout, recycling, process groups (Options::watchdog_timeout,
// start_timeout, max_connections, max_lifetime) ---------------------------------------------

namespace {

using SupervisedCluster = prefork::Cluster<Puppet, prefork::RoundRobin, prefork::RestartOnCrash>;

// Runs a one-worker cluster whose worker 1 is told `commands` once it listens and then blocks
// its loop; returns worker 1's exit record once its replacement (worker 2, slot 0) listens too.
std::optional<ExitInfo> hang_first_worker(const std::vector<std::string>& commands,
                                          std::vector<std::pair<unsigned, std::size_t>>& listened) {
  std::optional<ExitInfo> info;
  bool timed_out = false;
  Options opts = listening_options(1);
  opts.watchdog_timeout = 300ms;
  opts.kill_timeout = 300ms;
  SupervisedCluster cluster(std::move(opts));
  auto done = [&] {
    if (info && listened.size() >= 2) cluster.shutdown();
  };
  cluster.on_listening([&](WorkerT& w) {
    listened.emplace_back(w.id(), w.slot());
    if (w.id() == 1) {
      for (auto& c : commands) w.send(c);
      w.send("spin");
    }
    done();
  });
  cluster.on_exit([&](WorkerT& w, const ExitInfo& e) {
    if (w.id() == 1) info = e;
    done();
  });
  arm_watchdog(cluster, timed_out);
  CHECK(cluster.run() == 0);
  CHECK_FALSE(timed_out);
  return info;
}

}  // namespace

TEST_CASE("A worker whose loop is blocked past watchdog_timeout is replaced and gets SIGTERM",
          "[supervision][watchdog]") {
  std::size_t fds_before = count_open_fds();
  std::vector<std::pair<unsigned, std::size_t>> listened;
  std::optional<ExitInfo> info = hang_first_worker({}, listened);
  REQUIRE(info.has_value());
  CHECK(info->signal == SIGTERM);
  CHECK_FALSE(info->exited_after_disconnect);  // the master's verdict, not a planned stop
  CHECK(info->reason.rfind("watchdog: no heartbeat for ", 0) == 0);
  REQUIRE(listened.size() >= 2);
  CHECK(listened[1] == std::make_pair(2u, std::size_t{0}));  // the replacement, same slot
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("A hung worker that ignores SIGTERM gets SIGKILL after kill_timeout",
          "[supervision][watchdog]") {
  std::size_t fds_before = count_open_fds();
  std::vector<std::pair<unsigned, std::size_t>> listened;
  std::optional<ExitInfo> info = hang_first_worker({"ignore sigterm"}, listened);
  REQUIRE(info.has_value());
  CHECK(info->signal == SIGKILL);
  CHECK(info->reason.rfind("watchdog: ", 0) == 0);
  CHECK(info->reason.find("SIGKILL after SIGTERM was ignored") != std::string::npos);
  CHECK(listened.size() >= 2);
  CHECK(count_open_fds() == fds_before);
}

namespace {

// Worker 1 never finishes its constructor; later workers start normally.
struct StuckAtStart : Puppet {
  explicit StuckAtStart(prefork::WorkerContext<>& ctx) : Puppet(block_first(ctx)) {}
  static prefork::WorkerContext<>& block_first(prefork::WorkerContext<>& ctx) {
    if (ctx.id() == 1)
      for (;;) ::pause();
    return ctx;
  }
};

}  // namespace

TEST_CASE("A worker not listening within start_timeout is killed and its slot restarted",
          "[supervision][watchdog]") {
  std::size_t fds_before = count_open_fds();
  std::optional<ExitInfo> info;
  std::optional<std::pair<unsigned, std::size_t>> replacement;
  bool timed_out = false;
  {
    Options opts = listening_options(1);
    opts.start_timeout = 300ms;
    prefork::Cluster<StuckAtStart> cluster(std::move(opts));  // Backoff<RestartOnCrash>
    cluster.on_exit([&](WorkerT& w, const ExitInfo& e) {
      if (w.id() == 1) info = e;
    });
    cluster.on_listening([&](WorkerT& w) {
      replacement.emplace(w.id(), w.slot());
      cluster.shutdown();
    });
    arm_watchdog(cluster, timed_out);
    CHECK(cluster.run() == 0);
  }
  REQUIRE_FALSE(timed_out);
  REQUIRE(info.has_value());
  CHECK(info->signal == SIGKILL);
  CHECK_FALSE(info->exited_after_disconnect);
  CHECK(info->reason == "start timeout: not listening after 300 ms");
  REQUIRE(replacement.has_value());
  CHECK(*replacement == std::make_pair(2u, std::size_t{0}));
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("Without listen addresses a worker whose Server is never built is killed at "
          "start_timeout, not taken for hung, and its slot restarted",
          "[supervision][watchdog]") {
  // Such a worker is 'online' (sent before its Server is built) but never 'started': the
  // watchdog, which would replace it at once and for ever, must leave it to start_timeout; the
  // exit record says so, which Backoff reads as a failed start (tests/unit/restart.test.cpp).
  std::size_t fds_before = count_open_fds();
  std::optional<ExitInfo> info;
  std::vector<unsigned> online;
  std::vector<std::string> log;
  bool timed_out = false;
  {
    Options opts{.workers = 1, .handle_signals = false};
    opts.start_timeout = 300ms;
    opts.watchdog_timeout = 100ms;
    opts.log = [&](const prefork::LogRecord& r) { log.emplace_back(r.message); };
    using Policy = prefork::Backoff<prefork::RestartOnCrash>;
    prefork::Cluster<StuckAtStart, prefork::RoundRobin, Policy> cluster(
        std::move(opts), Policy(prefork::BackoffOptions{.initial_delay = 1ms, .healthy_after = 1ms}));
    cluster.on_online([&](WorkerT& w) {
      online.push_back(w.id());
      if (w.id() == 2) w.send("ping");
    });
    cluster.on_exit([&](WorkerT& w, const ExitInfo& e) {
      if (w.id() == 1) info = e;
    });
    cluster.on_message([&](WorkerT& w, const std::string& m) {
      if (w.id() == 2 && m == "pong:2") cluster.shutdown();
    });
    arm_watchdog(cluster, timed_out);
    CHECK(cluster.run() == 0);
  }
  REQUIRE_FALSE(timed_out);
  REQUIRE(info.has_value());
  CHECK(info->signal == SIGKILL);
  CHECK(info->reason == "start timeout: not started after 300 ms");
  CHECK(info->start_timed_out);
  CHECK_FALSE(info->reached_listening);
  CHECK(online == std::vector<unsigned>{1, 2});
  for (auto& line : log) CHECK(line.find(" is hung") == std::string::npos);
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("A worker that took max_connections connections is recycled after its replacement "
          "listens",
          "[supervision][recycle]") {
  std::size_t fds_before = count_open_fds();
  std::optional<ExitInfo> info;
  std::vector<std::string> events;
  bool timed_out = false;
  {
    Options opts = listening_options(1);
    opts.max_connections = 3;
    SupervisedCluster cluster(std::move(opts));
    cluster.on_listening([&](WorkerT& w, const std::vector<std::string>& addresses) {
      events.push_back("listening " + std::to_string(w.id()));
      if (w.id() != 1) return;
      for (int i = 0; i < 3; ++i) {  // the kernel completes them from the backlog
        prefork::UniqueFd c(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
        prefork::detail::SocketAddress a;
        REQUIRE_FALSE(prefork::detail::parse_address(addresses.at(0), a));
        REQUIRE(::connect(c.get(), a.get(), a.length) == 0);
      }
    });
    cluster.on_disconnect([&](WorkerT& w) { events.push_back("disconnect " + std::to_string(w.id())); });
    cluster.on_exit([&](WorkerT& w, const ExitInfo& e) {
      events.push_back("exit " + std::to_string(w.id()));
      if (w.id() == 1) {
        info = e;
        cluster.shutdown();
      }
    });
    arm_watchdog(cluster, timed_out);
    CHECK(cluster.run() == 0);
  }
  REQUIRE_FALSE(timed_out);
  REQUIRE(info.has_value());
  CHECK(info->exit_code == 0);
  CHECK(info->exited_after_disconnect);
  CHECK(info->reason == "recycled: max_connections: took 3 connections");
  // The replacement listened before the old worker was let go.
  auto at = [&](const std::string& e) { return std::find(events.begin(), events.end(), e); };
  REQUIRE(at("listening 2") != events.end());
  CHECK(at("listening 2") < at("disconnect 1"));
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("Workers past max_lifetime are recycled one at a time", "[supervision][recycle]") {
  std::size_t fds_before = count_open_fds();
  std::vector<ExitInfo> recycled;
  int starting = 0, most_starting = 0;
  bool timed_out = false;
  {
    Options opts = listening_options(3);
    opts.max_lifetime = 200ms;
    SupervisedCluster cluster(std::move(opts));
    cluster.on_fork([&](WorkerT& w) {
      if (w.id() > 3) most_starting = std::max(most_starting, ++starting);
    });
    cluster.on_listening([&](WorkerT& w) {
      if (w.id() > 3) --starting;
    });
    cluster.on_exit([&](WorkerT& w, const ExitInfo& e) {
      if (w.id() <= 3) recycled.push_back(e);
      if (recycled.size() == 3) cluster.shutdown();
    });
    arm_watchdog(cluster, timed_out);
    CHECK(cluster.run() == 0);
  }
  REQUIRE_FALSE(timed_out);
  REQUIRE(recycled.size() == 3);
  for (auto& e : recycled) {
    INFO(e.reason);
    CHECK(e.exit_code == 0);
    CHECK(e.reason.rfind("recycled: max_lifetime 200 ms reached", 0) == 0);
  }
  CHECK(most_starting == 1);  // never two replacements at once
  CHECK(count_open_fds() == fds_before);
}

namespace {

// On "child" starts `sleep 60` and answers "child:<pid>"; otherwise a Puppet.
struct Parent : Puppet {
  using Puppet::Puppet;
  void on_message(const std::string& m) {
    if (m != "child") return Puppet::on_message(m);
    pid_t pid = -1;
    char prog[] = "sleep", arg[] = "60";
    char* argv[] = {prog, arg, nullptr};
    if (::posix_spawnp(&pid, "sleep", nullptr, nullptr, argv, environ) != 0) pid = -1;
    ctx_.send("child:" + std::to_string(pid));
  }
};

}  // namespace

TEST_CASE("A process a worker started is stopped when the worker exits", "[supervision]") {
  Subreaper subreaper;  // the orphaned child comes to this process, to be reaped here
  REQUIRE(subreaper.ok);
  pid_t child = -1;
  bool timed_out = false;
  {
    prefork::Cluster<Parent, prefork::RoundRobin, prefork::NeverRestart> cluster(
        Options{.workers = 1, .handle_signals = false});
    cluster.on_online([&](WorkerT& w) { w.send("child"); });
    cluster.on_message([&](WorkerT& w, const std::string& m) {
      child = static_cast<pid_t>(number_after(m, "child:"));
      w.send("exit:3");
    });
    cluster.on_exit([&](WorkerT&, const ExitInfo&) { cluster.shutdown(); });
    arm_watchdog(cluster, timed_out);
    CHECK(cluster.run() == 0);
  }
  REQUIRE_FALSE(timed_out);
  REQUIRE(child > 0);
  auto deadline = Clock::now() + kDeadline;
  while (!process_gone(child) && Clock::now() < deadline) {
    pollfd none{};
    ::poll(&none, 0, 10);  // polling a process table that gives no event to wait on
  }
  CHECK(process_gone(child));
  ::waitpid(child, nullptr, WNOHANG);
}

namespace {

// "request": counts one with request_done(); "grow": allocates and touches 64 MiB, kept for
// good; otherwise a Puppet.
struct Consumer : Puppet {
  using Puppet::Puppet;
  void on_message(const std::string& m) {
    if (m == "request") return ctx_.request_done();
    if (m == "grow") {
      hoard_.assign(std::size_t{64} << 20, 'x');
      ctx_.send("grown");
      return;
    }
    Puppet::on_message(m);
  }
  std::string hoard_;
};

// One worker told `commands` once it listens; worker 1's exit record, once it has exited.
std::optional<ExitInfo> recycle_first_worker(Options opts,
                                             const std::vector<std::string>& commands) {
  std::optional<ExitInfo> info;
  bool timed_out = false;
  prefork::Cluster<Consumer, prefork::RoundRobin, prefork::RestartOnCrash> cluster(
      std::move(opts));
  cluster.on_listening([&](WorkerT& w) {
    if (w.id() == 1)
      for (auto& c : commands) w.send(c);
  });
  cluster.on_exit([&](WorkerT& w, const ExitInfo& e) {
    if (w.id() != 1) return;
    info = e;
    cluster.shutdown();
  });
  arm_watchdog(cluster, timed_out);
  CHECK(cluster.run() == 0);
  CHECK_FALSE(timed_out);
  return info;
}

}  // namespace

TEST_CASE("A worker that counted max_requests requests is recycled", "[supervision][recycle]") {
  Options opts = listening_options(1);
  opts.max_requests = 3;
  auto info = recycle_first_worker(std::move(opts), {"request", "request", "request"});
  REQUIRE(info.has_value());
  CHECK(info->exit_code == 0);
  CHECK(info->exited_after_disconnect);
  CHECK(info->reason == "recycled: max_requests: served 3 requests");
}

TEST_CASE("A worker whose resident memory exceeds max_rss is recycled", "[supervision][recycle]") {
  Options opts = listening_options(1);
  opts.max_rss = std::size_t{32} << 20;
  auto info = recycle_first_worker(std::move(opts), {"grow"});
  REQUIRE(info.has_value());
  CHECK(info->exit_code == 0);
  CHECK(info->exited_after_disconnect);
  CHECK(info->reason.rfind("recycled: resident memory ", 0) == 0);
  CHECK(info->reason.find("above max_rss 32 MiB") != std::string::npos);
}
