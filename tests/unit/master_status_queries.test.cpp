// The master's status queries (include/prefork/master/status_queries.hpp), without forking:
// records put in a worker table by hand, a real channel over a socketpair for the workers
// that are asked, and made-up times for the uptimes.
#include <catch2/catch.hpp>

#include <chrono>
#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include <prefork/channel.hpp>
#include <prefork/codec.hpp>
#include <prefork/event_loop.hpp>
#include <prefork/options.hpp>
#include <prefork/status.hpp>
#include <prefork/master/status_queries.hpp>
#include <prefork/master/worker_table.hpp>

#include "support/loop.hpp"

using namespace std::chrono_literals;
using prefork::Channel;
using prefork::ClusterStatus;
using prefork::EventLoop;
using prefork::Frame;
using prefork::FrameKind;
using prefork::Options;
using prefork::StringCodec;
using prefork_test::run_until;
using Record = prefork::detail::WorkerRecord<StringCodec>;
using Table = prefork::detail::WorkerTable<StringCodec>;

namespace {

// A table of records (no processes) and the far ends of their channels.
struct Fixture {
  EventLoop loop;
  Options opts;
  Table table;
  std::vector<std::unique_ptr<Channel>> peers;  // the workers' ends
  std::vector<std::vector<FrameKind>> received;  // per peer, what the master sent
  int statuses = 0;                              // how often the hook built a status
  prefork::detail::StatusQueries<StringCodec> queries{
      loop, table, {[this] {
        ++statuses;
        ClusterStatus st;
        st.pid = 42;
        return st;
      }}};

  Fixture() {
    received.reserve(16);
    peers.reserve(16);
  }

  // A record in its own slot; with a channel whose far end records what arrives.
  Record& add(bool connected) {
    std::size_t slot = table.add_slot();
    unsigned id = table.next_id();
    table.use_id(id);
    auto r = std::make_unique<Record>(loop, opts, id, slot);
    if (connected) {
      auto [mine, theirs] = prefork::make_channel_pair();
      r->channel = std::make_unique<Channel>(loop, std::move(mine));
      peers.push_back(std::make_unique<Channel>(loop, std::move(theirs)));
      received.emplace_back();
      std::size_t k = received.size() - 1;
      peers.back()->on_frame([this, k](Frame&& f) { received[k].push_back(f.kind); });
    }
    table.slot(slot).worker_id = id;
    return table.insert(std::move(r));
  }
};

}  // namespace

TEST_CASE("A status query asks every connected worker and answers once all have reported",
          "[master_status_queries]") {
  Fixture f;
  Record& a = f.add(true);
  Record& b = f.add(true);
  f.add(false);  // no channel: not asked, not waited for
  int done = 0;
  f.queries.query([&](const ClusterStatus& st) {
    ++done;
    CHECK(st.pid == 42);
  }, 1h);
  REQUIRE(run_until(f.loop, [&] {
    return f.received[0].size() == 1 && f.received[1].size() == 1;
  }));
  CHECK(f.received[0][0] == FrameKind::stats);
  CHECK(f.received[1][0] == FrameKind::stats);
  f.queries.answered(a.id);
  CHECK(done == 0);
  f.queries.answered(a.id);  // twice changes nothing
  CHECK(done == 0);
  f.queries.answered(b.id);
  CHECK(done == 1);
  CHECK(f.queries.pending() == 0);
  f.loop.run_once(0);
  CHECK(done == 1);
}

TEST_CASE("A status query with nobody to ask is answered on the loop, not inside the call",
          "[master_status_queries]") {
  Fixture f;
  f.add(false);
  int done = 0;
  f.queries.query([&](const ClusterStatus&) { ++done; }, 1h);
  CHECK(done == 0);
  REQUIRE(run_until(f.loop, [&] { return done == 1; }));
  CHECK(f.statuses == 1);
}

TEST_CASE("A status query is answered at its timeout when a worker never reports",
          "[master_status_queries]") {
  Fixture f;
  Record& a = f.add(true);
  f.add(true);
  int done = 0;
  f.queries.query([&](const ClusterStatus&) { ++done; }, 1ms);
  f.queries.answered(a.id);
  REQUIRE(run_until(f.loop, [&] { return done == 1; }));
  CHECK(f.queries.pending() == 0);
}

TEST_CASE("A worker that disconnects counts as answered for every query that waits for it",
          "[master_status_queries]") {
  Fixture f;
  Record& a = f.add(true);
  int first = 0, second = 0;
  f.queries.query([&](const ClusterStatus&) { ++first; }, 1h);
  f.queries.query([&](const ClusterStatus&) { ++second; }, 1h);
  CHECK(f.queries.pending() == 2);
  f.queries.answered(a.id);  // Master::mark_disconnected: it never will
  CHECK(first == 1);
  CHECK(second == 1);
  CHECK(f.queries.pending() == 0);
}

TEST_CASE("describe_workers reads slots, restarts and each worker's last report from the table",
          "[master_status_queries]") {
  Fixture f;
  Record& a = f.add(false);
  Record& b = f.add(false);
  f.table.add_slot();
  f.table.slot(2).errored = true;
  f.table.slot(1).restarts = 3;
  const auto now = prefork::Clock::now();
  a.started = now - 5s;
  a.reported_connections = 7;
  a.counters.requests = 11;
  b.started = now - 250ms;
  b.restarts = 3;
  b.plan_exit();

  ClusterStatus st;
  prefork::detail::describe_workers(f.table, now, st);
  CHECK(st.workers_wanted == 3);
  CHECK(st.restarts == 3);
  CHECK(st.errored_slots == std::vector<std::size_t>{2});
  REQUIRE(st.workers.size() == 2);
  CHECK(st.workers[0].id == a.id);
  CHECK(st.workers[0].uptime == 5000ms);
  CHECK(st.workers[0].connections == 7);
  CHECK(st.workers[0].requests == 11);
  CHECK_FALSE(st.workers[0].draining);
  CHECK(st.workers[1].slot == 1);
  CHECK(st.workers[1].uptime == 250ms);
  CHECK(st.workers[1].restarts == 3);
  CHECK(st.workers[1].draining);
}
