// The master's memory and the store's integrity under stress (issue 13): answers to store
// operations and requests count against max_queued_bytes, so a worker that asks for large
// values and stops reading cannot grow the master; and acknowledged store writes survive a
// master upgrade, none lost and none handed out twice.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "harness.hpp"
#include "support/heap.hpp"
#include "support/temp_dir.hpp"
#include "support/subreaper.hpp"

using namespace prefork_test;
using prefork::Options;
using WorkerT = prefork::Worker<prefork::StringCodec>;

namespace {

constexpr std::size_t kMiB = std::size_t{1} << 20;
constexpr std::size_t kBigValue = 1000 * 1024;  // under StoreLimits::max_value_size (1 MiB)

/// This process's resident set (VmRSS), in bytes.
std::size_t rss_bytes() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.starts_with("VmRSS:")) return std::stoul(line.substr(6)) * 1024;
  return 0;
}

/// What the master holds: its resident set, and its heap in use (see support/heap.hpp).
struct Memory {
  std::size_t rss = 0;
  std::size_t heap = 0;
};
Memory memory_now() { return {rss_bytes(), prefork_test::heap_in_use()}; }

/// A Server that asks the master for large answers when told to:
///   "store <n>"    sets "big" to kBigValue bytes, then gets it n times at once
///   "request <n>"  sends n requests at once (the master answers each with kBigValue bytes)
/// and, right after the last one is sent, says "sent"; once every answer has come, it says
/// "answers <ok> <queue_full> <other>". "probe" sets a small key and says "probe <result>".
struct Flooder {
  explicit Flooder(prefork::WorkerContext<>& ctx) : ctx_(ctx) {}

  void on_message(const std::string& m) {
    auto w = words(m);
    if (w.size() == 2 && w[0] == "store") {
      int n = std::stoi(w[1]);
      ctx_.store().set("big", std::string(kBigValue, 'v'), [this, n](std::error_code ec) {
        if (ec) return (void)ctx_.send("set " + ec.message());
        for (int i = 0; i < n; ++i)
          ctx_.store().get("big", [this, n](std::error_code e, std::optional<std::string> v) {
            count(n, e, v && v->size() == kBigValue);
          });
        ctx_.send("sent");
      });
    } else if (w.size() == 2 && w[0] == "request") {
      int n = std::stoi(w[1]);
      for (int i = 0; i < n; ++i)
        ctx_.request("big", [this, n](std::error_code e, const std::string& v) {
          count(n, e, v.size() == kBigValue);
        });
      ctx_.send("sent");
    } else if (w.size() == 2 && w[0] == "pump") {
      pump(std::stoi(w[1]));
    } else if (m == "probe") {
      ctx_.store().set("probe", "1", [this](std::error_code ec) {
        ctx_.send("probe " + (ec ? ec.message() : std::string("ok")));
      });
    }
  }

  // One set of a kBigValue value a millisecond (the channel writes in between), without
  // waiting for the answers, n in all; then "sent" on pump_done (a pipe: the master may not
  // be reading this worker's channel).
  void pump(int n) {
    if (n == 0) return (void)write_all(pump_done, "sent\n");
    ctx_.store().set("big", std::string(kBigValue, 'p'), [](std::error_code) {});
    ctx_.loop().after(1ms, [this, n] { pump(n - 1); });
  }

  inline static int pump_done = -1;

  void count(int n, std::error_code ec, bool whole) {
    if (!ec && whole)
      ++ok_;
    else if (ec == prefork::errc::queue_full)
      ++full_;
    else
      ++other_;
    if (ok_ + full_ + other_ == n)
      ctx_.send("answers " + std::to_string(ok_) + " " + std::to_string(full_) + " " +
                std::to_string(other_));
  }

  prefork::WorkerContext<>& ctx_;
  int ok_ = 0, full_ = 0, other_ = 0;
};

using FloodCluster = prefork::Cluster<Flooder, prefork::RoundRobin, prefork::NeverRestart>;

struct FloodResult {
  Memory baseline;    // the master's, once both workers are online
  Memory at_sent;     // when the flooder's last request has been read
  Memory after_exit;  // once the flooder has exited
  std::string probe;            // the other worker's store operation meanwhile
  std::string answers;          // the flooder's tally ("answers ..."), if it got one
  bool timed_out = false;
};

/// Worker 1 floods (`command`) and is stopped (SIGSTOP: it reads nothing more) once the master
/// has read its last request; worker 2 then uses the store; then worker 1 is killed. With
/// `later`, the master's on_request keeps each Reply and answers all of them when "sent"
/// arrives (an asynchronous handler); otherwise it answers at once.
FloodResult flood(const std::string& command, bool later, std::size_t max_queued) {
  FloodResult r;
  Options opts{.workers = 2, .handle_signals = false};
  opts.max_queued_bytes = max_queued;
  opts.log = [](const prefork::LogRecord&) {};
  FloodCluster cluster(std::move(opts));
  const std::string big(kBigValue, 'r');
  std::vector<prefork::Reply<>> kept;
  WorkerT* flooder = nullptr;
  WorkerT* prober = nullptr;
  cluster.on_request([&](WorkerT&, const std::string&, prefork::Reply<> reply) {
    if (later)
      kept.push_back(std::move(reply));
    else
      reply(big);
  });
  cluster.on_online([&](WorkerT& w) {
    (w.id() == 1 ? flooder : prober) = &w;
    if (!flooder || !prober) return;
    r.baseline = memory_now();
    flooder->send(command);
  });
  cluster.on_message([&](WorkerT& w, const std::string& m) {
    if (&w == flooder && m == "sent") {
      for (auto& reply : kept) reply(big);
      kept.clear();
      r.at_sent = memory_now();
      if (!later) {
        ::kill(w.pid(), SIGSTOP);
        prober->send("probe");
      }
    } else if (&w == flooder && m.starts_with("answers")) {
      r.answers = m;
      prober->send("probe");
    } else if (&w == prober && m.starts_with("probe")) {
      r.probe = m;
      flooder->kill(SIGKILL);
    }
  });
  cluster.on_exit([&](WorkerT& w, const prefork::ExitInfo&) {
    if (&w != flooder) return;
    flooder = nullptr;
    r.after_exit = memory_now();
    cluster.shutdown();
  });
  arm_watchdog(cluster, r.timed_out, 30s);
  CHECK(cluster.run() == 0);
  return r;
}

/// Growth of the master from the baseline, in MiB (for the log).
double grown_mib(std::size_t baseline, std::size_t now) {
  return now > baseline ? static_cast<double>(now - baseline) / kMiB : 0.0;
}

/// The master's heap (and, without a sanitizer, its RSS) stayed within its queue budget, one
/// answer over it, the read buffer (4 MiB a round) and what malloc and the store's own copy
/// keep: a bound an unbounded queue of 200 answers passes ten times over. The other worker's
/// store operation was answered meanwhile.
void check_bounded(const FloodResult& r, std::size_t max_queued) {
  REQUIRE_FALSE(r.timed_out);
  WARN("master RSS +" << grown_mib(r.baseline.rss, r.at_sent.rss) << " MiB, heap +"
                      << grown_mib(r.baseline.heap, r.at_sent.heap)
                      << " MiB under the flood; RSS +" << grown_mib(r.baseline.rss, r.after_exit.rss)
                      << " MiB, heap +" << grown_mib(r.baseline.heap, r.after_exit.heap)
                      << " MiB after the worker exited");
  const std::size_t bound = max_queued + kBigValue + 16 * kMiB;
  CHECK(r.at_sent.heap < r.baseline.heap + bound);
  CHECK(r.after_exit.heap < r.baseline.heap + bound);
#ifndef PREFORK_TEST_SANITIZER_HEAP  // whose quarantine keeps what was freed resident
  CHECK(r.at_sent.rss < r.baseline.rss + bound);
  CHECK(r.after_exit.rss < r.baseline.rss + bound);
#endif
  CHECK(r.probe == "probe ok");
}

constexpr std::size_t kQueued = 4 * kMiB;

// --- Upgrades with every worker writing --------------------------------------------------

/// Where the upgrade test's masters and workers write (a directory), inherited by every master
/// an upgrade execs: this binary, which then runs counter_master() before Catch2 starts.
constexpr const char* kDirEnv = "PREFORK_TEST_STORE_BOUNDS_DIR";

/// A Server that increments "counter" for as long as it runs, one increment in flight at a
/// time, and appends each value it is given to <dir>/values.<pid> (an error line, and no
/// more increments, on the first error); every 100th value it says "tick <master pid>" on the
/// <dir>/events FIFO. It stops once it drains, so that every increment it sent is answered.
struct Counter {
  explicit Counter(prefork::WorkerContext<>& ctx) : ctx_(ctx) {
    const std::string dir = std::getenv(kDirEnv);
    values_ = ::open((dir + "/values." + std::to_string(::getpid())).c_str(),
                     O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    events_ = ::open((dir + "/events").c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC);
    next();
  }
  Counter(const Counter&) = delete;
  Counter& operator=(const Counter&) = delete;
  ~Counter() {
    ::close(values_);
    ::close(events_);
  }

  void on_drain() { draining_ = true; }

  void next() {
    if (draining_) return;
    ctx_.store().increment("counter", 1, [this](std::error_code ec, std::int64_t v) {
      if (ec) return (void)write_all(values_, "error " + ec.message() + "\n");
      write_all(values_, std::to_string(v) + "\n");
      if (++acknowledged_ % 100 == 0)
        write_all(events_, "tick " + std::to_string(::getppid()) + "\n");
      next();
    });
  }

  prefork::WorkerContext<>& ctx_;
  int values_ = -1, events_ = -1;
  long acknowledged_ = 0;
  bool draining_ = false;
};

using CounterCluster = prefork::Cluster<Counter>;

/// A master of two Counters with its store in <dir>/store.snapshot; it says "upgraded <its
/// pid> <new master pid>" (or "failed <pid>") on the FIFO when an upgrade (SIGUSR1) ends.
int counter_master(const std::string& dir) {
  Options opts{.workers = 2};
  opts.store_snapshot = dir + "/store.snapshot";
  opts.drain_timeout = std::chrono::seconds(5);
  opts.log = [](const prefork::LogRecord& r) {  // what went wrong, for a failing run's output
    if (r.level != prefork::LogLevel::info)
      std::fprintf(stderr, "master %d: %.*s\n", static_cast<int>(r.pid),
                   static_cast<int>(r.message.size()), r.message.data());
  };
  const int events = ::open((dir + "/events").c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC);
  CounterCluster cluster(std::move(opts));
  cluster.on_upgrade_done([&](const prefork::UpgradeReport& u) {
    write_all(events, (u.ok ? "upgraded " : "failed ") + std::to_string(::getpid()) + " " +
                          std::to_string(u.new_master) + "\n");
  });
  int rc = cluster.run();
  ::close(events);
  return rc;
}

// A master started by an upgrade is this binary again, with the test's arguments: it must be
// the master, not a second run of the tests.
const bool kUpgradedMaster = [] {
  const char* dir = std::getenv(kDirEnv);
  if (dir && std::getenv(prefork::detail::kUpgradeEnv)) {
    int rc = 1;
    try {
      rc = counter_master(dir);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "upgraded master: %s\n", e.what());
    }
    std::fflush(nullptr);
    ::_exit(rc);
  }
  return false;
}();

/// Set for the test of held store operations: a master started by an upgrade is this binary
/// again, and it never becomes ready, so that the old master holds the store until it stops
/// the upgrade (SIGTERM from its shutdown), or an alarm ends it.
constexpr const char* kStallEnv = "PREFORK_TEST_STORE_BOUNDS_STALL";

const bool kStalledMaster = [] {
  if (std::getenv(kStallEnv) && std::getenv(prefork::detail::kUpgradeEnv)) {
    ::alarm(60);
    for (;;) ::pause();
  }
  return false;
}();

}  // namespace

TEST_CASE("A worker that gets large store values and stops reading them grows the master by "
          "at most max_queued_bytes, and other workers' store operations go on",
          "[store][bounds]") {
  // 200 gets of a 1000 KiB value: unbounded, the master would queue 200 MB of answers.
  FdLeakCheck fds;
  check_bounded(flood("store 200", false, kQueued), kQueued);
}

TEST_CASE("A worker that sends requests with large answers and stops reading them grows the "
          "master by at most max_queued_bytes",
          "[request][bounds]") {
  FdLeakCheck fds;
  check_bounded(flood("request 200", false, kQueued), kQueued);
}

TEST_CASE("Answers given later to requests past max_queued_bytes fail with queue_full on the "
          "worker's side instead of growing the master",
          "[request][bounds]") {
  // The handler keeps 200 Replies and answers them all at once: the first fill the queue,
  // the rest fail, and the worker hears of every one of them.
  FdLeakCheck fds;
  FloodResult r = flood("request 200", true, kQueued);
  check_bounded(r, kQueued);
  auto w = words(r.answers);
  REQUIRE(w.size() == 4);
  CHECK(std::stoi(w[1]) + std::stoi(w[2]) == 200);
  CHECK(std::stoi(w[1]) >= 1);
  CHECK(std::stoi(w[2]) >= 1);
  CHECK(w[3] == "0");
}

TEST_CASE("No acknowledged store write is lost or handed out twice across master upgrades with "
          "every worker incrementing throughout",
          "[store][upgrade]") {
  constexpr int kUpgrades = 3;
  Subreaper subreaper;
  REQUIRE(subreaper.ok);
  TempDir dir("prefork-store-bounds");
  REQUIRE_FALSE(dir.path.empty());
  const std::string fifo = dir.path + "/events";
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  const int events = ::open(fifo.c_str(), O_RDWR | O_NONBLOCK | O_CLOEXEC);  // never EOF
  REQUIRE(events >= 0);
  LineReader lines(events);
  REQUIRE(::setenv(kDirEnv, dir.path.c_str(), 1) == 0);
  std::vector<pid_t> masters{fork_harness([&] { return counter_master(dir.path); })};
  REQUIRE(::unsetenv(kDirEnv) == 0);

  // The current master's workers have each acknowledged some increments (4 ticks: 400).
  auto writing = [&](pid_t master) {
    const std::string tick = "tick " + std::to_string(master);
    for (int ticks = 0; ticks < 4;) {
      std::optional<std::string> line = lines.next(Clock::now() + kDeadline);
      if (!line) return false;
      if (*line == tick) ++ticks;
    }
    return true;
  };
  bool ok = writing(masters.back());
  for (int u = 0; ok && u < kUpgrades; ++u) {
    const std::string old = std::to_string(masters.back());
    REQUIRE(::kill(masters.back(), SIGUSR1) == 0);
    std::optional<std::string> done;
    while ((done = lines.next(Clock::now() + kDeadline)))
      if (done->starts_with("upgraded " + old + " ") || done->starts_with("failed " + old + " "))
        break;
    ok = done && done->starts_with("upgraded");
    INFO("upgrade " << u << ": " << done.value_or("no answer"));
    CHECK(ok);
    if (ok) masters.push_back(static_cast<pid_t>(std::stol(words(*done)[2])));
    ok = ok && writing(masters.back());
  }
  CHECK(ok);
  // Oldest first: a master that handed over exits once its workers have, and its successor is
  // then our child (the last one is stopped only then: a parent still alive would reap it).
  for (pid_t m : masters) {
    if (m == masters.back()) ::kill(m, ok ? SIGTERM : SIGKILL);
    std::optional<int> status = wait_child(m, Clock::now() + kDeadline);
    if (!status) kill_and_reap(m);
    INFO("master " << m << " wait status " << status.value_or(-1));
    CHECK((status && WIFEXITED(*status) && WEXITSTATUS(*status) == 0));
  }
  ::close(events);
  REQUIRE(ok);

  std::vector<long> handed_out;
  std::map<std::string, int> errors;
  for (auto& entry : std::filesystem::directory_iterator(dir.path)) {
    if (!entry.path().filename().string().starts_with("values.")) continue;
    std::ifstream in(entry.path());
    for (std::string line; std::getline(in, line);) {
      if (line.starts_with("error "))
        ++errors[line];
      else
        handed_out.push_back(std::stol(line));
    }
  }
  prefork::MemoryStore<> store;
  REQUIRE_FALSE(store.load(dir.path + "/store.snapshot"));
  const long final_value = std::stol(store.get("counter").value_or("0"));
  std::set<long> distinct(handed_out.begin(), handed_out.end());
  std::string refused;
  for (auto& [e, n] : errors) refused += " " + std::to_string(n) + " x '" + e + "'";
  WARN(handed_out.size() << " increments acknowledged over " << kUpgrades << " upgrades, "
                         << handed_out.size() - distinct.size() << " values handed out twice, "
                         << "final counter " << final_value << "; failed:" << refused);
  CHECK(distinct.size() == handed_out.size());           // none handed out twice
  CHECK(final_value == static_cast<long>(handed_out.size()));  // none lost
  CHECK(*distinct.rbegin() == final_value);
}

TEST_CASE("Store operations held during an upgrade grow the master by at most max_queued_bytes "
          "a worker",
          "[store][upgrade][bounds]") {
  // While the new master starts, the store's operations wait unapplied. A worker that goes on
  // sending 1000 KiB sets meanwhile (150 of them) is no longer read past max_queued_bytes; its
  // own queue then fills and its sets fail with queue_full there.
  TempDir dir("prefork-store-held");
  REQUIRE_FALSE(dir.path.empty());
  int pipe_fds[2];
  REQUIRE(::pipe2(pipe_fds, O_CLOEXEC | O_NONBLOCK) == 0);
  Flooder::pump_done = pipe_fds[1];
  REQUIRE(::setenv(kStallEnv, "1", 1) == 0);

  Options opts{.workers = 1, .handle_signals = false};
  opts.max_queued_bytes = kQueued;
  opts.store_snapshot = dir.path + "/store.snapshot";
  opts.upgrade_timeout = 30s;
  opts.log = [](const prefork::LogRecord&) {};
  FloodCluster cluster(std::move(opts));
  Memory baseline, at_sent;
  bool upgrading = false, sent = false, timed_out = false;
  cluster.on_online([&](WorkerT& w) {
    baseline = memory_now();
    upgrading = cluster.upgrade();  // the store is held from here on
    if (upgrading) w.send("pump 150");
    else cluster.shutdown();
  });
  cluster.every(10ms, [&] {
    char buf[16];
    if (sent || ::read(pipe_fds[0], buf, sizeof buf) <= 0) return;
    sent = true;
    at_sent = memory_now();
    cluster.shutdown();  // stops the upgrade: the held operations are applied and answered
  });
  arm_watchdog(cluster, timed_out, 30s);
  CHECK(cluster.run() == 0);
  REQUIRE(::unsetenv(kStallEnv) == 0);
  ::close(pipe_fds[0]);
  ::close(pipe_fds[1]);

  REQUIRE(upgrading);
  REQUIRE_FALSE(timed_out);
  REQUIRE(sent);
  WARN("master RSS +" << grown_mib(baseline.rss, at_sent.rss) << " MiB, heap +"
                      << grown_mib(baseline.heap, at_sent.heap) << " MiB with the store held");
  const std::size_t bound = kQueued + kBigValue + 16 * kMiB;
  CHECK(at_sent.heap < baseline.heap + bound);
#ifndef PREFORK_TEST_SANITIZER_HEAP
  CHECK(at_sent.rss < baseline.rss + bound);
#endif
}
