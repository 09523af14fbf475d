// The master's memory and the store's integrity under stress (issue 13): answers to store
// operations and requests count against max_queued_bytes, so a worker that asks for large
// values and stops reading cannot grow the master; and acknowledged store writes survive a
// master upgrade, none lost and none handed out twice.
#include <catch2/catch.hpp>

#include <signal.h>
#include <unistd.h>

#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "harness.hpp"

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
    } else if (m == "probe") {
      ctx_.store().set("probe", "1", [this](std::error_code ec) {
        ctx_.send("probe " + (ec ? ec.message() : std::string("ok")));
      });
    }
  }

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
  std::size_t baseline = 0;     // master RSS once both workers are online
  std::size_t at_sent = 0;      // when the flooder's last request has been read
  std::size_t after_exit = 0;   // once the flooder has exited
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
    r.baseline = rss_bytes();
    flooder->send(command);
  });
  cluster.on_message([&](WorkerT& w, const std::string& m) {
    if (&w == flooder && m == "sent") {
      for (auto& reply : kept) reply(big);
      kept.clear();
      r.at_sent = rss_bytes();
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
    r.after_exit = rss_bytes();
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

/// The master stayed within its queue budget, one answer over it, the read buffer (4 MiB a
/// round) and what malloc and the store's own copy keep: a bound an unbounded queue of 200
/// answers passes ten times over. The other worker's store operation was answered meanwhile.
void check_bounded(const FloodResult& r, std::size_t max_queued) {
  REQUIRE_FALSE(r.timed_out);
  WARN("master RSS +" << grown_mib(r.baseline, r.at_sent) << " MiB under the flood, +"
                      << grown_mib(r.baseline, r.after_exit) << " MiB after the worker exited");
  const std::size_t bound = max_queued + kBigValue + 16 * kMiB;
  CHECK(r.at_sent < r.baseline + bound);
  CHECK(r.after_exit < r.baseline + bound);
  CHECK(r.probe == "probe ok");
}

constexpr std::size_t kQueued = 4 * kMiB;

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
