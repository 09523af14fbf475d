// The master's shared store reached from real worker processes (WorkerContext::store()):
// every operation, concurrent increments from every worker (no lost update), expiry, the
// store outliving a worker, its size limit, and snapshots across master restarts.
// tests/unit/store.test.cpp checks MemoryStore, the snapshot format and the wire format alone.
#include <catch2/catch.hpp>

#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "harness.hpp"

using namespace prefork_test;
using prefork::ExitInfo;
using prefork::Options;
using prefork::store_errc;
using WorkerT = prefork::Worker<prefork::StringCodec>;

namespace {

Options no_listen(unsigned workers) { return Options{.workers = workers, .handle_signals = false}; }

std::string describe(std::error_code ec) { return ec ? "error " + ec.message() : "ok"; }

/// A Server that runs store scripts the master sends, and reports each result as a message:
///   "ops"         every operation once; replies "ops <result>;<result>;..."
///   "count <n>"   n increments of "counter" at once; replies "count <v1> <v2> ..." (the values)
///   "set <k> <v>" / "get <k>"  replies "set ok" / "get <value|none>"
///   "expire"      sets "brief" with a 30 ms TTL, then gets it until it is gone: "expired"
///   "fill"        sets 1 KiB values until the store is full: "full after <n> <message>"
struct StoreUser {
  explicit StoreUser(prefork::WorkerContext<>& ctx) : ctx_(ctx) {}

  void on_message(const std::string& m) {
    auto w = words(m);
    auto& store = ctx_.store();
    if (m == "ops") return ops();
    if (w.size() == 2 && w[0] == "count") return count(std::stoi(w[1]));
    if (w.size() == 3 && w[0] == "set")
      return store.set(w[1], w[2], [this](std::error_code ec) { ctx_.send("set " + describe(ec)); });
    if (w.size() == 2 && w[0] == "get")
      return store.get(w[1], [this](std::error_code ec, std::optional<std::string> v) {
        ctx_.send("get " + (ec ? describe(ec) : v.value_or("none")));
      });
    if (m == "expire") {
      store.set("brief", "x", [this](std::error_code) { poll_brief(); }, std::chrono::milliseconds(30));
      return;
    }
    if (m == "fill") return fill(0);
  }

  void ops() {
    auto out = std::make_shared<std::vector<std::string>>();
    auto& s = ctx_.store();
    auto add = [out](std::string r) { out->push_back(std::move(r)); };
    s.set("user:1", "ada", [add](std::error_code ec) { add("set " + describe(ec)); });
    s.get("user:1", [add](std::error_code ec, std::optional<std::string> v) {
      add("get " + describe(ec) + " " + v.value_or("none"));
    });
    s.get("user:none", [add](std::error_code ec, std::optional<std::string> v) {
      add("get-missing " + describe(ec) + " " + (v ? "value" : "none"));
    });
    s.set("user:2", "bob", nullptr);  // fire and forget: still in order with the rest
    s.keys("user:", 10, [add](std::error_code ec, std::vector<std::string> k) {
      std::string all;
      for (auto& x : k) all += " " + x;
      add("keys " + describe(ec) + all);
    });
    s.compare_and_set("user:1", std::string_view("ada"), "eve",
                      [add](std::error_code ec) { add("cas " + describe(ec)); });
    s.compare_and_set("user:1", std::string_view("ada"), "mallory",
                      [add](std::error_code ec) { add("cas-stale " + describe(ec)); });
    s.compare_and_set("lock", std::nullopt, "me",
                      [add](std::error_code ec) { add("cas-absent " + describe(ec)); });
    s.compare_and_set("lock", std::nullopt, "you",
                      [add](std::error_code ec) { add("cas-absent-again " + describe(ec)); });
    s.increment("n", 5, [add](std::error_code ec, std::int64_t v) {
      add("incr " + describe(ec) + " " + std::to_string(v));
    });
    s.increment("user:1", 1, [add](std::error_code ec, std::int64_t) { add("incr-text " + describe(ec)); });
    s.erase("user:2", [add](std::error_code ec, bool existed) {
      add("erase " + describe(ec) + " " + (existed ? "existed" : "absent"));
    });
    s.erase("user:2", [add](std::error_code ec, bool existed) {
      add("erase-again " + describe(ec) + " " + (existed ? "existed" : "absent"));
    });
    s.get("user:1", [this, out](std::error_code ec, std::optional<std::string> v) {
      out->push_back("get-final " + describe(ec) + " " + v.value_or("none"));
      std::string all = "ops";
      for (auto& r : *out) all += (all == "ops" ? " " : ";") + r;
      ctx_.send(all);
    });
  }

  void count(int n) {
    auto values = std::make_shared<std::vector<std::int64_t>>();
    for (int i = 0; i < n; ++i)
      ctx_.store().increment("counter", 1, [this, n, values](std::error_code ec, std::int64_t v) {
        values->push_back(ec ? -1 : v);
        if (static_cast<int>(values->size()) < n) return;
        std::string all = "count";
        for (auto x : *values) all += " " + std::to_string(x);
        ctx_.send(all);
      });
  }

  void poll_brief() {
    ctx_.store().get("brief", [this](std::error_code ec, std::optional<std::string> v) {
      if (ec || !v) {
        ctx_.send(ec ? "expire " + describe(ec) : std::string("expired"));
        return;
      }
      ctx_.loop().after(std::chrono::milliseconds(5), [this] { poll_brief(); });
    });
  }

  void fill(int n) {
    ctx_.store().set("fill:" + std::to_string(n), std::string(1024, 'x'), [this, n](std::error_code ec) {
      if (!ec) return fill(n + 1);
      ctx_.send(ec == store_errc::full ? "full after " + std::to_string(n) : "fill " + describe(ec));
    });
  }

  prefork::WorkerContext<>& ctx_;
};

using StoreCluster = prefork::Cluster<StoreUser, prefork::RoundRobin, prefork::RestartOnCrash>;

/// Runs a cluster of `workers` StoreUsers whose workers each get `command` once online, and
/// returns each worker's first reply (by worker id).
std::map<unsigned, std::string> ask_each(Options opts, const std::string& command) {
  std::map<unsigned, std::string> replies;
  bool timed_out = false;
  const std::size_t n = opts.workers;
  {
    StoreCluster cluster(std::move(opts));
    cluster.on_online([&](WorkerT& w) { w.send(command); });
    cluster.on_message([&](WorkerT& w, const std::string& m) {
      replies.emplace(w.id(), m);
      if (replies.size() == n) cluster.shutdown();
    });
    arm_watchdog(cluster, timed_out);
    CHECK(cluster.run() == 0);
  }
  CHECK_FALSE(timed_out);
  return replies;
}

struct TempDir {
  TempDir() {
    char tmpl[] = "/tmp/prefork-store-XXXXXX";
    REQUIRE(::mkdtemp(tmpl) != nullptr);
    path = tmpl;
  }
  ~TempDir() { std::filesystem::remove_all(path); }
  std::string path;
};

}  // namespace

TEST_CASE("A worker reaches every store operation through the master, in the order it sent "
          "them",
          "[store]") {
  FdLeakCheck fds;
  auto replies = ask_each(no_listen(1), "ops");
  REQUIRE(replies.size() == 1);
  const std::string conflict = describe(store_errc::conflict);
  CHECK(replies.begin()->second ==
        "ops set ok;get ok ada;get-missing ok none;keys ok user:1 user:2;cas ok;cas-stale " +
            conflict + ";cas-absent ok;cas-absent-again " + conflict + ";incr ok 5;incr-text " +
            describe(store_errc::not_a_number) +
            ";erase ok existed;erase-again ok absent;get-final ok eve");
}

TEST_CASE("Concurrent increments from every worker lose no update and no two get one value",
          "[store]") {
  // 4 workers x 3000 increments of one counter, all in flight at once: the master applies
  // them one at a time, so the values handed out are exactly 1..12000, each once.
  constexpr int kWorkers = 4, kEach = 3000;
  FdLeakCheck fds;
  auto replies = ask_each(no_listen(kWorkers), "count " + std::to_string(kEach));
  REQUIRE(replies.size() == kWorkers);
  std::set<long> seen;
  std::size_t total = 0;
  for (auto& [id, r] : replies) {
    auto w = words(r);
    REQUIRE(w.size() == kEach + 1);
    long last = 0;
    bool increasing = true;
    for (std::size_t i = 1; i < w.size(); ++i) {
      long v = std::stol(w[i]);
      increasing = increasing && v > last;  // one worker's own increments, in its order
      last = v;
      seen.insert(v);
      ++total;
    }
    INFO("worker " << id);
    CHECK(increasing);
  }
  CHECK(total == kWorkers * kEach);
  CHECK(seen.size() == kWorkers * kEach);
  CHECK(*seen.begin() == 1);
  CHECK(*seen.rbegin() == kWorkers * kEach);
}

TEST_CASE("A key with a TTL disappears for workers once it expires", "[store]") {
  FdLeakCheck fds;
  auto replies = ask_each(no_listen(1), "expire");
  REQUIRE(replies.size() == 1);
  CHECK(replies.begin()->second == "expired");
}

TEST_CASE("A full store refuses a write with a clear error and keeps what it holds", "[store]") {
  FdLeakCheck fds;
  std::vector<std::string> said;
  bool timed_out = false;
  {
    Options opts = no_listen(1);
    opts.store_limits.max_bytes = 64 * 1024;
    StoreCluster cluster(std::move(opts));
    cluster.on_online([](WorkerT& w) { w.send("fill"); });
    cluster.on_message([&](WorkerT& w, const std::string& m) {
      said.push_back(m);
      if (said.size() == 1) {
        w.send("get fill:0");
        return;
      }
      cluster.shutdown();
    });
    arm_watchdog(cluster, timed_out);
    CHECK(cluster.run() == 0);
  }
  REQUIRE_FALSE(timed_out);
  REQUIRE(said.size() == 2);
  // What fits in 64 KiB at key + value + StoreLimits::entry_overhead bytes an entry.
  std::size_t used = 0, fits = 0;
  for (;; ++fits) {
    std::size_t entry = ("fill:" + std::to_string(fits)).size() + 1024 +
                        prefork::StoreLimits::entry_overhead;
    if (used + entry > 64 * 1024) break;
    used += entry;
  }
  CHECK(said[0] == "full after " + std::to_string(fits));
  CHECK(said[1] == "get " + std::string(1024, 'x'));
}

TEST_CASE("The store keeps a worker's writes after that worker is killed and replaced",
          "[store]") {
  FdLeakCheck fds;
  std::vector<std::string> said;
  bool timed_out = false;
  {
    StoreCluster cluster(no_listen(1));
    cluster.on_online([](WorkerT& w) {
      if (w.id() == 1) w.send("set session:42 alice");
      if (w.id() == 2) w.send("get session:42");
    });
    cluster.on_message([&](WorkerT& w, const std::string& m) {
      said.push_back(std::to_string(w.id()) + " " + m);
      if (w.id() == 1) w.kill(SIGKILL);
      if (w.id() == 2) cluster.shutdown();
    });
    cluster.on_exit([&](WorkerT& w, const ExitInfo&) {
      if (w.id() == 1) cluster.fork();
    });
    arm_watchdog(cluster, timed_out);
    CHECK(cluster.run() == 0);
  }
  REQUIRE_FALSE(timed_out);
  CHECK(said == std::vector<std::string>{"1 set ok", "2 get alice"});
}

TEST_CASE("A store snapshot saved on shutdown is loaded by the next master", "[store][snapshot]") {
  FdLeakCheck fds;
  TempDir dir;
  const std::string file = dir.path + "/store.snapshot";
  Options opts = no_listen(1);
  opts.store_snapshot = file;
  auto first = ask_each(opts, "set greeting hello");
  CHECK(first.begin()->second == "set ok");
  REQUIRE(std::filesystem::exists(file));
  auto second = ask_each(opts, "get greeting");
  CHECK(second.begin()->second == "get hello");
}

TEST_CASE("A corrupt store snapshot stops the master with an error and is left untouched",
          "[store][snapshot]") {
  FdLeakCheck fds;
  TempDir dir;
  const std::string file = dir.path + "/store.snapshot";
  const std::string garbage = "not a snapshot at all";
  std::ofstream(file) << garbage;
  Options opts = no_listen(1);
  opts.store_snapshot = file;
  opts.log = [](const prefork::LogRecord&) {};
  StoreCluster cluster(std::move(opts));
  try {
    cluster.run();
    FAIL("run() returned");
  } catch (const std::system_error& e) {
    CHECK(std::string(e.what()).find("load store snapshot " + file) != std::string::npos);
  }
  CHECK(cluster.workers().empty());  // nothing was forked
  std::ifstream in(file);
  std::stringstream content;
  content << in.rdbuf();
  CHECK(content.str() == garbage);
}
