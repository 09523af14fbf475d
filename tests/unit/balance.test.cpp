#include "prefork/balance/round_robin.hpp"
#include "prefork/balance/shared_accept.hpp"

#include <catch2/catch.hpp>

#include <cstddef>
#include <initializer_list>
#include <optional>
#include <span>
#include <vector>

#include "prefork/balance/policy.hpp"

using prefork::BalancePolicy;
using prefork::Dispatch;
using prefork::PickContext;
using prefork::RoundRobin;
using prefork::SharedAccept;
using prefork::WorkerLoad;

namespace {

// Asks the policy for one connection with `slots` ready (in that order) and returns the slot
// it chose, so that assertions read as slot numbers rather than indices into `ready`.
std::size_t pick_slot(RoundRobin& rr, std::initializer_list<std::size_t> slots) {
  std::vector<WorkerLoad> ready;
  for (std::size_t s : slots) ready.push_back({s, 0});
  prefork::detail::SocketAddress peer;
  std::optional<std::size_t> index = rr.pick(PickContext{peer, std::span<const WorkerLoad>(ready)});
  REQUIRE(index.has_value());
  REQUIRE(*index < ready.size());
  return ready[*index].slot;
}

// Negative cases for the concepts.
struct NoDispatchNoPick {};
struct MasterWithoutPick {
  static constexpr Dispatch dispatch = Dispatch::master;
};
struct PickWithoutDispatch {
  std::optional<std::size_t> pick(const PickContext&) { return 0; }
};
struct PickReturnsIndex {
  static constexpr Dispatch dispatch = Dispatch::master;
  std::size_t pick(const PickContext&) { return 0; }
};
struct KernelPolicy {
  static constexpr Dispatch dispatch = Dispatch::kernel;
};
struct NotDefaultConstructible {
  static constexpr Dispatch dispatch = Dispatch::kernel;
  explicit NotDefaultConstructible(int) {}
};
struct MasterWithPick {
  static constexpr Dispatch dispatch = Dispatch::master;
  std::optional<std::size_t> pick(const PickContext&) { return std::nullopt; }
};

}  // namespace

static_assert(BalancePolicy<RoundRobin>);
static_assert(BalancePolicy<SharedAccept>);
static_assert(prefork::MasterDispatch<RoundRobin>);
static_assert(!prefork::KernelDispatch<RoundRobin>);
static_assert(prefork::KernelDispatch<SharedAccept>);
static_assert(!prefork::MasterDispatch<SharedAccept>);

static_assert(!BalancePolicy<NoDispatchNoPick>);
static_assert(!prefork::HasDispatchMode<NoDispatchNoPick>);
static_assert(!prefork::PicksWorker<NoDispatchNoPick>);
static_assert(!BalancePolicy<MasterWithoutPick>);
static_assert(!BalancePolicy<PickWithoutDispatch>);
static_assert(prefork::PicksWorker<PickWithoutDispatch>);
static_assert(!prefork::PicksWorker<PickReturnsIndex>);
static_assert(!BalancePolicy<PickReturnsIndex>);
static_assert(BalancePolicy<KernelPolicy>);
static_assert(prefork::KernelDispatch<NotDefaultConstructible>);  // only the constructor is missing
static_assert(!BalancePolicy<NotDefaultConstructible>);
static_assert(BalancePolicy<MasterWithPick>);
static_assert(!BalancePolicy<int>);

TEST_CASE("RoundRobin picks the ready workers in slot order and wraps to the first after the last",
          "[balance]") {
  RoundRobin rr;
  std::vector<std::size_t> picked;
  for (int i = 0; i < 9; ++i) picked.push_back(pick_slot(rr, {0, 1, 2}));
  CHECK(picked == std::vector<std::size_t>{0, 1, 2, 0, 1, 2, 0, 1, 2});
}

TEST_CASE("RoundRobin follows slot order even when the ready list is not sorted", "[balance]") {
  RoundRobin rr;
  std::vector<std::size_t> picked;
  for (int i = 0; i < 6; ++i) picked.push_back(pick_slot(rr, {2, 0, 1}));
  CHECK(picked == std::vector<std::size_t>{0, 1, 2, 0, 1, 2});
}

TEST_CASE("RoundRobin returns the index into the ready list and not the slot number",
          "[balance]") {
  RoundRobin rr;
  std::vector<WorkerLoad> ready{{7, 0}, {3, 0}};
  prefork::detail::SocketAddress peer;
  PickContext ctx{peer, ready};
  CHECK(rr.pick(ctx) == std::optional<std::size_t>{1});  // slot 3
  CHECK(rr.pick(ctx) == std::optional<std::size_t>{0});  // slot 7
  CHECK(rr.pick(ctx) == std::optional<std::size_t>{1});  // slot 3 again
}

TEST_CASE("RoundRobin skips a slot that left the ready set and continues after the last pick",
          "[balance]") {
  RoundRobin rr;
  REQUIRE(pick_slot(rr, {0, 1, 2, 3}) == 0);
  REQUIRE(pick_slot(rr, {0, 1, 2, 3}) == 1);

  SECTION("a slot ahead of the rotation leaves") {
    CHECK(pick_slot(rr, {0, 1, 3}) == 3);
    CHECK(pick_slot(rr, {0, 1, 3}) == 0);
    CHECK(pick_slot(rr, {0, 1, 3}) == 1);
  }
  SECTION("the slot picked last leaves") {
    CHECK(pick_slot(rr, {0, 2, 3}) == 2);
    CHECK(pick_slot(rr, {0, 2, 3}) == 3);
    CHECK(pick_slot(rr, {0, 2, 3}) == 0);
  }
  SECTION("every slot after the last pick leaves so the rotation wraps") {
    CHECK(pick_slot(rr, {0, 1}) == 0);
    CHECK(pick_slot(rr, {0, 1}) == 1);
  }
  SECTION("a slot that rejoins takes its turn without resetting the rotation") {
    CHECK(pick_slot(rr, {0, 3}) == 3);
    CHECK(pick_slot(rr, {0, 1, 2, 3}) == 0);
    CHECK(pick_slot(rr, {0, 1, 2, 3}) == 1);
    CHECK(pick_slot(rr, {0, 1, 2, 3}) == 2);
  }
}

TEST_CASE("RoundRobin rotates over slots that are not contiguous", "[balance]") {
  RoundRobin rr;
  std::vector<std::size_t> picked;
  for (int i = 0; i < 6; ++i) picked.push_back(pick_slot(rr, {3, 10, 7}));
  CHECK(picked == std::vector<std::size_t>{3, 7, 10, 3, 7, 10});
}

TEST_CASE("RoundRobin gives every connection to a single ready worker", "[balance]") {
  RoundRobin rr;
  for (int i = 0; i < 5; ++i) CHECK(pick_slot(rr, {4}) == 4);
  // The lone worker changes (a restart in another slot): it still gets everything.
  for (int i = 0; i < 3; ++i) CHECK(pick_slot(rr, {1}) == 1);
}

TEST_CASE("SharedAccept leaves dispatch to the kernel", "[balance]") {
  STATIC_REQUIRE(SharedAccept::dispatch == Dispatch::kernel);
  STATIC_REQUIRE(RoundRobin::dispatch == Dispatch::master);
}
