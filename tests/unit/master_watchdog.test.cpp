// The master's watchdog (master/watchdog.hpp) without processes: its verdicts on hand-made
// worker records, driven by made-up `now` values, with fake spawn and recycle hooks.
#include <prefork/master/watchdog.hpp>

#include <catch2/catch.hpp>

#include <chrono>
#include <cstddef>
#include <string>
#include <vector>

#include "support/master_parts.hpp"

using namespace std::chrono_literals;

namespace {

struct Harness : prefork_test::MasterParts {
  explicit Harness(std::size_t slots) : MasterParts(slots) {
    auto& h = watchdog.hooks;
    h.spawn = [this](std::size_t slot) {
      spawned.push_back(slot);
      return &add(slot);
    };
    h.recycle = [this](Record&, const std::string& why) { recycled.push_back(why); };
    h.listens = [] { return true; };
  }

  prefork::detail::Watchdog<Codec> watchdog{loop, opts, table, log, phase};
  std::vector<std::size_t> spawned;
  std::vector<std::string> recycled;
};

// A worker that became ready at `t0` and was last heard from then.
prefork_test::MasterParts::Record& ready_worker(Harness& h, std::size_t slot,
                                              prefork::Clock::time_point t0) {
  auto& w = h.add(slot);
  w.started = t0;
  w.last_heard = t0;
  w.became_ready();
  return w;
}

}  // namespace

TEST_CASE("Watchdog kills a worker that is not ready after start_timeout", "[watchdog]") {
  Harness h(1);
  h.opts.start_timeout = 1000ms;
  auto& w = h.add(0);
  const auto t0 = w.started;
  h.watchdog.supervise(t0 + 900ms);
  CHECK(w.supervised());
  h.watchdog.supervise(t0 + 1100ms);
  CHECK_FALSE(w.supervised());
  CHECK(w.exit.start_timed_out);
  CHECK(w.exit.reason.find("start timeout: not listening") != std::string::npos);
  CHECK(h.spawned.empty());  // its exit refills the slot, per the RestartPolicy
}

TEST_CASE("Watchdog replaces and terminates a worker without a heartbeat for watchdog_timeout",
          "[watchdog]") {
  Harness h(2);
  h.opts.watchdog_timeout = 1000ms;
  const auto t0 = prefork::Clock::now();
  auto& quiet = ready_worker(h, 0, t0);
  auto& chatty = ready_worker(h, 1, t0);
  chatty.last_heard = t0 + 800ms;
  h.watchdog.supervise(t0 + 900ms);
  CHECK(quiet.supervised());
  h.watchdog.supervise(t0 + 1500ms);
  CHECK_FALSE(quiet.supervised());
  CHECK(quiet.exit.reason.find("watchdog: no heartbeat for 1500 ms") != std::string::npos);
  CHECK_FALSE(quiet.planned());  // not a planned exit: a crash for the RestartPolicy
  CHECK(quiet.escalation_timer != 0);
  CHECK(h.spawned == std::vector<std::size_t>{0});
  CHECK(chatty.supervised());
}

TEST_CASE("Watchdog does not replace a hung worker that no longer owns its slot", "[watchdog]") {
  Harness h(1);
  h.opts.watchdog_timeout = 1000ms;
  const auto t0 = prefork::Clock::now();
  auto& old = ready_worker(h, 0, t0);
  auto& replacement = ready_worker(h, 0, t0 + 1000ms);
  h.watchdog.supervise(t0 + 1500ms);
  CHECK_FALSE(old.supervised());
  CHECK(h.spawned.empty());
  CHECK(replacement.supervised());
}

TEST_CASE("Watchdog recycles a worker past its max_lifetime", "[watchdog]") {
  Harness h(1);
  h.opts.max_lifetime = 10000ms;
  const auto t0 = prefork::Clock::now();
  auto& w = ready_worker(h, 0, t0);
  w.lifetime = 10500ms;  // the spawner adds up to 10% jitter
  w.last_heard = t0 + 10800ms;
  h.watchdog.supervise(t0 + 10400ms);
  CHECK(h.recycled.empty());
  h.watchdog.supervise(t0 + 11000ms);
  REQUIRE(h.recycled.size() == 1);
  CHECK(h.recycled[0] == "max_lifetime 10000 ms reached");
  CHECK(w.supervised());  // it serves until its replacement is ready
}

TEST_CASE("Watchdog judges nothing of a worker that is not supervised", "[watchdog]") {
  Harness h(1);
  h.opts.start_timeout = 1000ms;
  h.opts.watchdog_timeout = 1000ms;
  h.opts.max_lifetime = 1000ms;
  const auto t0 = prefork::Clock::now();
  auto& draining = ready_worker(h, 0, t0);
  draining.lifetime = 1000ms;
  draining.plan_exit();
  h.watchdog.supervise(t0 + 60s);
  CHECK(draining.exit.reason.empty());
  CHECK(h.spawned.empty());
  CHECK(h.recycled.empty());
}

TEST_CASE("Watchdog judges nothing while the master shuts down", "[watchdog]") {
  Harness h(1);
  h.opts.watchdog_timeout = 1000ms;
  const auto t0 = prefork::Clock::now();
  auto& w = ready_worker(h, 0, t0);
  h.phase = prefork::detail::Phase::shutting_down;
  h.watchdog.supervise(t0 + 60s);
  CHECK(w.supervised());
  CHECK(h.spawned.empty());
}
