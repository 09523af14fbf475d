#include "prefork/restart.hpp"

#include <catch2/catch.hpp>

#include <chrono>
#include <csignal>
#include <cstddef>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

using namespace std::chrono_literals;
using prefork::Backoff;
using prefork::BackoffOptions;
using prefork::ExitInfo;
using prefork::RestartDecision;
using Action = RestartDecision::Action;

namespace Catch {
template <>
struct StringMaker<RestartDecision> {
  static std::string convert(const RestartDecision& d) {
    switch (d.action) {
      case Action::none: return "no_restart";
      case Action::give_up: return "give_up_slot";
      case Action::restart: return "restart_after(" + std::to_string(d.delay.count()) + "ms)";
    }
    return "?";
  }
};
}  // namespace Catch

namespace {

// Uptime of a worker that ran long past any healthy_after in these tests.
constexpr auto long_run = 1h;

ExitInfo exited(int code, std::chrono::milliseconds uptime = long_run) {
  ExitInfo e;
  e.exit_code = code;
  e.signal = 0;
  e.uptime = uptime;
  return e;
}

ExitInfo killed(int sig, std::chrono::milliseconds uptime = long_run) {
  ExitInfo e;
  e.exit_code = -1;
  e.signal = sig;
  e.uptime = uptime;
  return e;
}

ExitInfo planned(ExitInfo e) {
  e.exited_after_disconnect = true;
  return e;
}

ExitInfo quick_crash() { return exited(1, 10ms); }

struct Case {
  const char* what;
  ExitInfo exit;
};

std::vector<Case> unplanned_exits() {
  return {{"exit 0", exited(0)}, {"exit 1", exited(1)}, {"SIGKILL", killed(SIGKILL)}};
}

std::vector<Case> planned_exits() {
  return {{"exit 0 after disconnect", planned(exited(0))},
          {"exit 1 after disconnect", planned(exited(1))},
          {"SIGKILL after disconnect", planned(killed(SIGKILL))}};
}

// A policy a user might write: restarts every exit after a fixed pause.
struct FixedPause {
  std::chrono::milliseconds pause;
  RestartDecision on_exit(std::size_t, const ExitInfo&) const {
    return RestartDecision::restart_after(pause);
  }
};

// A policy that gives up on its own, to check that Backoff passes it through.
struct AlwaysGiveUp {
  RestartDecision on_exit(std::size_t, const ExitInfo&) const {
    return RestartDecision::give_up_slot();
  }
};

// Stateful and move-only, with the optional on_listening hook.
struct CountingPolicy {
  std::unique_ptr<int> exits = std::make_unique<int>(0);
  std::vector<std::size_t> listening;
  RestartDecision on_exit(std::size_t, const ExitInfo&) {
    ++*exits;
    return RestartDecision::restart_now();
  }
  void on_listening(std::size_t slot) { listening.push_back(slot); }
};

// Negative cases for the concepts.
struct ReturnsBool {
  bool on_exit(std::size_t, const ExitInfo&) { return true; }
};
struct ReturnsReference {
  RestartDecision d;
  RestartDecision& on_exit(std::size_t, const ExitInfo&) { return d; }
};
struct NoOnExit {
  RestartDecision decide(std::size_t, const ExitInfo&) { return {}; }
};
struct TakesOnlyExit {
  RestartDecision on_exit(const ExitInfo&) { return {}; }
};
struct Immovable {
  Immovable() = default;
  Immovable(Immovable&&) = delete;
  RestartDecision on_exit(std::size_t, const ExitInfo&) { return {}; }
};

}  // namespace

static_assert(prefork::RestartPolicy<FixedPause>);
static_assert(prefork::RestartPolicy<CountingPolicy>);
static_assert(prefork::RestartPolicy<Backoff<FixedPause>>);
static_assert(prefork::RestartPolicy<Backoff<CountingPolicy>>);
static_assert(prefork::RestartPolicy<Backoff<Backoff<>>>);

static_assert(!prefork::DecidesRestart<ReturnsBool>);
static_assert(!prefork::RestartPolicy<ReturnsBool>);
static_assert(!prefork::DecidesRestart<ReturnsReference>);
static_assert(!prefork::DecidesRestart<NoOnExit>);
static_assert(!prefork::DecidesRestart<TakesOnlyExit>);
static_assert(!prefork::DecidesRestart<int>);
static_assert(prefork::DecidesRestart<Immovable>);
static_assert(!prefork::RestartPolicy<Immovable>);

TEST_CASE("RestartDecision factories produce the action and delay they name", "[restart]") {
  CHECK(RestartDecision::restart_now() == RestartDecision{Action::restart, 0ms});
  CHECK(RestartDecision::restart_after(250ms) == RestartDecision{Action::restart, 250ms});
  CHECK(RestartDecision::no_restart() == RestartDecision{Action::none, 0ms});
  CHECK(RestartDecision::give_up_slot() == RestartDecision{Action::give_up, 0ms});
  CHECK(RestartDecision{} == RestartDecision::no_restart());
  CHECK(RestartDecision::restart_now() != RestartDecision::restart_after(1ms));
}

TEST_CASE("RestartOnCrash restarts a worker that exited non-zero or was killed", "[restart]") {
  prefork::RestartOnCrash policy;
  CHECK(policy.on_exit(0, exited(1)) == RestartDecision::restart_now());
  CHECK(policy.on_exit(0, exited(2, 0ms)) == RestartDecision::restart_now());
  CHECK(policy.on_exit(3, killed(SIGKILL)) == RestartDecision::restart_now());
  CHECK(policy.on_exit(3, killed(SIGSEGV)) == RestartDecision::restart_now());
}

TEST_CASE("RestartOnCrash does not restart a worker that exited with code 0", "[restart]") {
  prefork::RestartOnCrash policy;
  CHECK(policy.on_exit(0, exited(0)) == RestartDecision::no_restart());
  CHECK(policy.on_exit(0, exited(0, 0ms)) == RestartDecision::no_restart());
}

TEST_CASE("RestartOnCrash does not restart a worker that exited after disconnect", "[restart]") {
  prefork::RestartOnCrash policy;
  for (const auto& c : planned_exits()) {
    INFO(c.what);
    CHECK(policy.on_exit(0, c.exit) == RestartDecision::no_restart());
  }
}

TEST_CASE("RestartAlways restarts a worker that exited on its own whatever the status",
          "[restart]") {
  prefork::RestartAlways policy;
  for (const auto& c : unplanned_exits()) {
    INFO(c.what);
    CHECK(policy.on_exit(0, c.exit) == RestartDecision::restart_now());
  }
}

TEST_CASE("RestartAlways does not restart a worker that exited after disconnect", "[restart]") {
  prefork::RestartAlways policy;
  for (const auto& c : planned_exits()) {
    INFO(c.what);
    CHECK(policy.on_exit(0, c.exit) == RestartDecision::no_restart());
  }
}

TEST_CASE("NeverRestart restarts no worker however it exited", "[restart]") {
  prefork::NeverRestart policy;
  for (const auto& cases : {unplanned_exits(), planned_exits()}) {
    for (const auto& c : cases) {
      INFO(c.what);
      CHECK(policy.on_exit(0, c.exit) == RestartDecision::no_restart());
    }
  }
}

TEST_CASE("Backoff defaults are PM2's", "[restart]") {
  Backoff<> policy;
  CHECK(policy.options().initial_delay == 100ms);
  CHECK(policy.options().factor == 1.5);
  CHECK(policy.options().max_delay == 15000ms);
  CHECK(policy.options().healthy_after == 1000ms);
  CHECK(policy.options().max_restarts == 16u);
}

TEST_CASE("Backoff grows the delay by factor after each quick exit up to max_delay",
          "[restart]") {
  Backoff<> policy;
  // 100 * 1.5^n rounded to the nearest millisecond, capped at 15 s; PM2's logs show the same
  // 100, 150, 225 start.
  const std::vector<long> expected{100,  150,  225,  338,  506,   759,   1139,  1709,
                                   2563, 3844, 5767, 8650, 12975, 15000, 15000, 15000};
  for (std::size_t i = 0; i < expected.size(); ++i) {
    INFO("quick exit " << i + 1);
    CHECK(policy.on_exit(0, quick_crash()) ==
          RestartDecision::restart_after(std::chrono::milliseconds{expected[i]}));
    CHECK(policy.streak(0) == i + 1);
  }
}

TEST_CASE("Backoff doubles exactly with factor 2 and stops at max_delay", "[restart]") {
  Backoff<> policy({.initial_delay = 100ms, .factor = 2, .max_delay = 1000ms});
  for (long ms : {100, 200, 400, 800, 1000, 1000}) {
    CHECK(policy.on_exit(0, quick_crash()) ==
          RestartDecision::restart_after(std::chrono::milliseconds{ms}));
  }
}

TEST_CASE("Backoff with factor 1 waits initial_delay after every quick exit", "[restart]") {
  Backoff<> policy({.initial_delay = 300ms, .factor = 1, .max_delay = 1000ms});
  for (int i = 0; i < 10; ++i) {
    CHECK(policy.on_exit(0, quick_crash()) == RestartDecision::restart_after(300ms));
  }
}

TEST_CASE("Backoff gives the slot up after exactly max_restarts quick exits", "[restart]") {
  SECTION("max_restarts 3") {
    Backoff<> policy({.max_restarts = 3});
    for (int i = 0; i < 3; ++i) {
      CHECK(policy.on_exit(0, quick_crash()).action == Action::restart);
    }
    CHECK(policy.on_exit(0, quick_crash()) == RestartDecision::give_up_slot());
  }
  SECTION("the default 16") {
    Backoff<> policy;
    for (int i = 0; i < 16; ++i) {
      INFO("quick exit " << i + 1);
      CHECK(policy.on_exit(0, quick_crash()).action == Action::restart);
    }
    CHECK(policy.on_exit(0, quick_crash()) == RestartDecision::give_up_slot());
  }
  SECTION("max_restarts 1") {
    Backoff<> policy({.max_restarts = 1});
    CHECK(policy.on_exit(0, quick_crash()) == RestartDecision::restart_after(100ms));
    CHECK(policy.on_exit(0, quick_crash()) == RestartDecision::give_up_slot());
  }
}

TEST_CASE("Backoff starts a fresh streak in a slot it gave up", "[restart]") {
  Backoff<> policy({.max_restarts = 2});
  policy.on_exit(0, quick_crash());
  policy.on_exit(0, quick_crash());
  REQUIRE(policy.on_exit(0, quick_crash()) == RestartDecision::give_up_slot());
  CHECK(policy.streak(0) == 0u);
  CHECK(policy.on_exit(0, quick_crash()) == RestartDecision::restart_after(100ms));
}

TEST_CASE("Backoff restarts at once and resets the streak after an exit past healthy_after",
          "[restart]") {
  Backoff<> policy({.healthy_after = 1000ms, .max_restarts = 5});
  for (int i = 0; i < 5; ++i) policy.on_exit(0, quick_crash());
  REQUIRE(policy.streak(0) == 5u);

  SECTION("uptime equal to healthy_after counts as healthy") {
    CHECK(policy.on_exit(0, exited(1, 1000ms)) == RestartDecision::restart_now());
  }
  SECTION("a healthy worker killed by a signal") {
    CHECK(policy.on_exit(0, killed(SIGKILL, 5s)) == RestartDecision::restart_now());
  }
  CHECK(policy.streak(0) == 0u);
  // The streak starts over: the next quick exit waits initial_delay and five more are allowed.
  CHECK(policy.on_exit(0, quick_crash()) == RestartDecision::restart_after(100ms));
  for (int i = 0; i < 4; ++i) CHECK(policy.on_exit(0, quick_crash()).action == Action::restart);
  CHECK(policy.on_exit(0, quick_crash()) == RestartDecision::give_up_slot());
}

TEST_CASE("Backoff counts an exit just under healthy_after as quick", "[restart]") {
  Backoff<> policy({.healthy_after = 1000ms});
  CHECK(policy.on_exit(0, exited(1, 999ms)) == RestartDecision::restart_after(100ms));
  CHECK(policy.streak(0) == 1u);
}

TEST_CASE("Backoff restarts at once a worker that had started and served, however short its "
          "uptime",
          "[restart]") {
  // chaos.sh: workers SIGKILLed every half second under load must come back at once.
  Backoff<> policy({.healthy_after = 1000ms, .max_restarts = 2});
  for (int i = 0; i < 2; ++i) policy.on_exit(0, quick_crash());
  REQUIRE(policy.streak(0) == 2u);
  ExitInfo e = killed(SIGKILL, 10ms);
  e.reached_listening = true;
  e.served = true;
  for (int i = 0; i < 5; ++i) CHECK(policy.on_exit(0, e) == RestartDecision::restart_now());
  CHECK(policy.streak(0) == 0u);
}

TEST_CASE("Backoff counts a worker that reached listening but served nothing before healthy_after "
          "as a quick exit",
          "[restart]") {
  // Issue 13: `hello --crash-ms 1` and a Server that exits in on_listening were forked
  // thousands of times a second when 'listening' alone counted as healthy.
  Backoff<> policy({.healthy_after = 1000ms, .max_restarts = 2});
  ExitInfo e = exited(1, 10ms);
  e.reached_listening = true;
  CHECK(policy.on_exit(0, e) == RestartDecision::restart_after(100ms));
  CHECK(policy.on_exit(0, e) == RestartDecision::restart_after(150ms));
  CHECK(policy.on_exit(0, e) == RestartDecision::give_up_slot());
  e.uptime = 1000ms;  // lived past healthy_after: healthy, served or not
  CHECK(policy.on_exit(0, e) == RestartDecision::restart_now());
}

TEST_CASE("Backoff with started_is_healthy false judges a started worker by uptime alone",
          "[restart]") {
  Backoff<> policy({.healthy_after = 1000ms, .started_is_healthy = false});
  ExitInfo e = exited(1, 10ms);
  e.reached_listening = true;
  e.served = true;
  CHECK(policy.on_exit(0, e) == RestartDecision::restart_after(100ms));
  CHECK(policy.on_exit(0, e) == RestartDecision::restart_after(150ms));
  e.uptime = 1000ms;
  CHECK(policy.on_exit(0, e) == RestartDecision::restart_now());
}

TEST_CASE("Backoff counts a worker killed at start_timeout as a quick exit, however long it ran",
          "[restart]") {
  Backoff<> policy({.healthy_after = 1000ms, .max_restarts = 2});
  ExitInfo e = killed(SIGKILL, 60s);
  e.start_timed_out = true;
  CHECK(policy.on_exit(0, e) == RestartDecision::restart_after(100ms));
  CHECK(policy.on_exit(0, e) == RestartDecision::restart_after(150ms));
  CHECK(policy.on_exit(0, e) == RestartDecision::give_up_slot());
}

TEST_CASE("Backoff keeps each slot's streak separately", "[restart]") {
  Backoff<> policy({.max_restarts = 2});
  CHECK(policy.on_exit(0, quick_crash()) == RestartDecision::restart_after(100ms));
  CHECK(policy.on_exit(0, quick_crash()) == RestartDecision::restart_after(150ms));
  CHECK(policy.on_exit(5, quick_crash()) == RestartDecision::restart_after(100ms));
  CHECK(policy.on_exit(0, quick_crash()) == RestartDecision::give_up_slot());
  CHECK(policy.streak(5) == 1u);
  CHECK(policy.streak(3) == 0u);
  CHECK(policy.on_exit(5, quick_crash()) == RestartDecision::restart_after(150ms));
  CHECK(policy.on_exit(5, exited(1)) == RestartDecision::restart_now());
  CHECK(policy.streak(5) == 0u);
  CHECK(policy.on_exit(3, quick_crash()) == RestartDecision::restart_after(100ms));
}

TEST_CASE("Backoff with max_restarts 0 never gives up and holds the delay at max_delay",
          "[restart]") {
  SECTION("defaults otherwise") {
    Backoff<> policy({.max_restarts = 0});
    std::chrono::milliseconds previous{0};
    for (int i = 0; i < 1000; ++i) {
      const RestartDecision d = policy.on_exit(0, quick_crash());
      REQUIRE(d.action == Action::restart);
      REQUIRE(d.delay >= previous);
      REQUIRE(d.delay <= 15000ms);
      previous = d.delay;
    }
    CHECK(previous == 15000ms);
    CHECK(policy.streak(0) == 1000u);
  }
  SECTION("a steep factor and the largest max_delay do not overflow") {
    const auto max = std::chrono::milliseconds::max();
    Backoff<> policy({.initial_delay = 1ms, .factor = 1e6, .max_delay = max, .max_restarts = 0});
    std::chrono::milliseconds previous{0};
    for (int i = 0; i < 1000; ++i) {
      const RestartDecision d = policy.on_exit(0, quick_crash());
      REQUIRE(d.action == Action::restart);
      REQUIRE(d.delay >= previous);
      previous = d.delay;
    }
    CHECK(previous == max);
  }
  SECTION("initial_delay 0 stays 0") {
    Backoff<> policy({.initial_delay = 0ms, .factor = 1e300, .max_restarts = 0});
    for (int i = 0; i < 1000; ++i) {
      REQUIRE(policy.on_exit(0, quick_crash()) == RestartDecision::restart_now());
    }
  }
}

TEST_CASE("Backoff passes Inner's no restart through and resets the slot's streak",
          "[restart]") {
  Backoff<> policy;
  policy.on_exit(0, quick_crash());
  policy.on_exit(0, quick_crash());
  REQUIRE(policy.streak(0) == 2u);

  SECTION("a clean exit") {
    CHECK(policy.on_exit(0, exited(0, 10ms)) == RestartDecision::no_restart());
  }
  SECTION("a planned stop") {
    CHECK(policy.on_exit(0, planned(exited(1, 10ms))) == RestartDecision::no_restart());
  }
  SECTION("a planned stop by SIGKILL") {
    CHECK(policy.on_exit(0, planned(killed(SIGKILL, 10ms))) == RestartDecision::no_restart());
  }
  CHECK(policy.streak(0) == 0u);
}

TEST_CASE("Backoff passes Inner's give_up through", "[restart]") {
  Backoff<AlwaysGiveUp> policy;
  CHECK(policy.on_exit(0, quick_crash()) == RestartDecision::give_up_slot());
  CHECK(policy.on_exit(0, exited(1)) == RestartDecision::give_up_slot());
}

TEST_CASE("Backoff keeps the longer of Inner's delay and its own", "[restart]") {
  Backoff<FixedPause> policy(
      {.initial_delay = 100ms, .factor = 10, .max_delay = 5000ms, .max_restarts = 0},
      FixedPause{500ms});
  CHECK(policy.on_exit(0, quick_crash()) == RestartDecision::restart_after(500ms));
  CHECK(policy.on_exit(0, quick_crash()) == RestartDecision::restart_after(1000ms));
  CHECK(policy.on_exit(0, quick_crash()) == RestartDecision::restart_after(5000ms));
  // A healthy exit ends the streak but keeps Inner's own pause.
  CHECK(policy.on_exit(0, exited(1)) == RestartDecision::restart_after(500ms));
}

TEST_CASE("Backoff of RestartAlways with healthy_after 30s is PM2's exponential backoff",
          "[restart]") {
  Backoff<prefork::RestartAlways> policy({.healthy_after = 30s, .started_is_healthy = false});
  CHECK(policy.on_exit(0, exited(0, 20s)) == RestartDecision::restart_after(100ms));
  CHECK(policy.on_exit(0, exited(1, 20s)) == RestartDecision::restart_after(150ms));
  CHECK(policy.on_exit(0, killed(SIGKILL, 20s)) == RestartDecision::restart_after(225ms));
  CHECK(policy.on_exit(0, exited(0, 31s)) == RestartDecision::restart_now());
  CHECK(policy.on_exit(0, planned(exited(0, 1s))) == RestartDecision::no_restart());
}

TEST_CASE("Backoff reset forgets one slot's streak", "[restart]") {
  Backoff<> policy;
  policy.on_exit(0, quick_crash());
  policy.on_exit(0, quick_crash());
  policy.on_exit(1, quick_crash());
  policy.reset(0);
  policy.reset(42);  // never seen: nothing to forget
  CHECK(policy.streak(0) == 0u);
  CHECK(policy.streak(1) == 1u);
  CHECK(policy.streak(42) == 0u);
  CHECK(policy.on_exit(0, quick_crash()) == RestartDecision::restart_after(100ms));
}

TEST_CASE("Backoff rejects inconsistent options and names the field", "[restart]") {
  using Catch::Matchers::Contains;
  using Catch::Matchers::Equals;
  CHECK_THROWS_AS(Backoff<>({.factor = 0.5}), std::invalid_argument);
  CHECK_THROWS_WITH(Backoff<>({.factor = 0.5}),
                    Equals("prefork: BackoffOptions.factor must be a finite number >= 1, got 0.5"));
  CHECK_THROWS_WITH(Backoff<>({.factor = 0}), Contains("BackoffOptions.factor"));
  CHECK_THROWS_WITH(Backoff<>({.factor = -2}), Contains("got -2"));
  CHECK_THROWS_WITH(Backoff<>({.factor = std::numeric_limits<double>::quiet_NaN()}),
                    Contains("BackoffOptions.factor") && Contains("got nan"));
  CHECK_THROWS_WITH(Backoff<>({.factor = std::numeric_limits<double>::infinity()}),
                    Contains("BackoffOptions.factor") && Contains("got inf"));
  CHECK_THROWS_WITH(Backoff<>({.initial_delay = -1ms}),
                    Equals("prefork: BackoffOptions.initial_delay must be >= 0, got -1ms"));
  CHECK_THROWS_WITH(Backoff<>({.max_delay = -5ms}),
                    Contains("BackoffOptions.max_delay must be >= 0, got -5ms"));
  CHECK_THROWS_WITH(Backoff<>({.healthy_after = -1ms}),
                    Contains("BackoffOptions.healthy_after must be >= 0"));
  CHECK_THROWS_WITH(
      Backoff<>({.initial_delay = 2000ms, .max_delay = 1000ms}),
      Equals("prefork: BackoffOptions.initial_delay must be <= max_delay (1000ms), got 2000ms"));
}

TEST_CASE("Backoff accepts options at the edges of their ranges", "[restart]") {
  CHECK_NOTHROW(Backoff<>({.factor = 1}));
  CHECK_NOTHROW(Backoff<>({.initial_delay = 0ms, .max_delay = 0ms, .healthy_after = 0ms}));
  CHECK_NOTHROW(Backoff<>({.initial_delay = 500ms, .max_delay = 500ms}));
  CHECK_NOTHROW(Backoff<>({.max_restarts = 0}));
}

TEST_CASE("Backoff with healthy_after 0 restarts every exit at once", "[restart]") {
  Backoff<> policy({.healthy_after = 0ms, .max_restarts = 1});
  for (int i = 0; i < 5; ++i) {
    CHECK(policy.on_exit(0, exited(1, 0ms)) == RestartDecision::restart_now());
  }
}

TEST_CASE("Backoff can be copy-list-initialized from empty braces", "[restart]") {
  Backoff<> policy = {};
  CHECK(policy.options().max_restarts == 16u);
}

TEST_CASE("A user-written policy satisfies RestartPolicy and can be wrapped in Backoff",
          "[restart]") {
  Backoff<CountingPolicy> policy({.max_restarts = 0}, CountingPolicy{});
  CHECK(policy.on_exit(0, exited(0, 10ms)) == RestartDecision::restart_after(100ms));
  CHECK(policy.on_exit(0, exited(0, 10ms)) == RestartDecision::restart_after(150ms));
  CHECK(*policy.inner().exits == 2);

  Backoff<CountingPolicy> moved = std::move(policy);
  CHECK(*moved.inner().exits == 2);
  CHECK(moved.streak(0) == 2u);
}

TEST_CASE("The optional on_listening hook is detected the way the master detects it",
          "[restart]") {
  auto notify_listening = [](auto& p, std::size_t slot) {
    if constexpr (requires { p.on_listening(slot); }) {
      p.on_listening(slot);
      return true;
    } else {
      return false;
    }
  };
  CountingPolicy counting;
  CHECK(notify_listening(counting, 2));
  CHECK(counting.listening == std::vector<std::size_t>{2});

  Backoff<> backoff;
  prefork::RestartOnCrash on_crash;
  CHECK_FALSE(notify_listening(backoff, 0));
  CHECK_FALSE(notify_listening(on_crash, 0));
}
