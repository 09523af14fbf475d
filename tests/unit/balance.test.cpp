#include "prefork/balance/ip_hash.hpp"
#include "prefork/balance/least_connections.hpp"
#include "prefork/balance/pick_with.hpp"
#include "prefork/balance/reuse_port.hpp"
#include "prefork/balance/round_robin.hpp"
#include "prefork/balance/shared_accept.hpp"

#include <catch2/catch.hpp>

#include <sys/socket.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "prefork/balance/policy.hpp"

using prefork::BalancePolicy;
using prefork::Dispatch;
using prefork::IpHash;
using prefork::LeastConnections;
using prefork::PickContext;
using prefork::PickWith;
using prefork::ReusePort;
using prefork::RoundRobin;
using prefork::SharedAccept;
using prefork::WorkerLoad;
using prefork::detail::SocketAddress;

namespace {

// The number of slots a cluster with these ready workers has at least: the highest slot + 1.
std::size_t slots_for(const std::vector<WorkerLoad>& ready) {
  std::size_t n = 0;
  for (auto& w : ready) n = std::max(n, w.slot + 1);
  return n;
}

// Asks the policy for one connection with `ready` workers (in that order, with their loads) and
// returns the slot it chose, so that assertions read as slot numbers rather than indices.
template <class Policy>
std::size_t pick_loaded(Policy& p, std::vector<WorkerLoad> ready, const SocketAddress& peer = {}) {
  std::optional<std::size_t> index =
      p.pick(PickContext{peer, std::span<const WorkerLoad>(ready), slots_for(ready)});
  REQUIRE(index.has_value());
  REQUIRE(*index < ready.size());
  return ready[*index].slot;
}

// The same with every listed slot ready and idle.
template <class Policy>
std::size_t pick_slot(Policy& p, std::initializer_list<std::size_t> slots) {
  std::vector<WorkerLoad> ready;
  for (std::size_t s : slots) ready.push_back({s, 0});
  return pick_loaded(p, std::move(ready));
}

SocketAddress address(const std::string& spec) {
  SocketAddress a;
  REQUIRE_FALSE(prefork::detail::parse_address(spec, a));
  return a;
}

// IpHash with `slots` slots of which `ready` are ready (idle): the slot it picks for `peer`.
std::size_t ip_hash_slot(const SocketAddress& peer, std::size_t slots,
                         std::vector<std::size_t> ready) {
  std::vector<WorkerLoad> loads;
  for (std::size_t s : ready) loads.push_back({s, 0});
  IpHash h;
  std::optional<std::size_t> index = h.pick(PickContext{peer, loads, slots});
  REQUIRE(index.has_value());
  REQUIRE(*index < loads.size());
  return loads[*index].slot;
}

std::vector<std::size_t> all_slots(std::size_t n) {
  std::vector<std::size_t> v;
  for (std::size_t s = 0; s < n; ++s) v.push_back(s);
  return v;
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
struct ReusePortOff {
  static constexpr Dispatch dispatch = Dispatch::kernel;
  static constexpr bool reuse_port = false;
};

// PickWith's function objects: captureless lambdas named by their type (C++20 allows a lambda
// in decltype), and callables PickFunction must refuse.
using PickLast = PickWith<decltype([](const PickContext& c) -> std::optional<std::size_t> {
  return c.ready.size() - 1;
})>;
using PickNothing = PickWith<decltype([](const PickContext&) -> std::optional<std::size_t> {
  return std::nullopt;
})>;
using PickBySlotCount = PickWith<decltype([](const PickContext& c) -> std::optional<std::size_t> {
  return c.slots;  // echoes what the master passed, to check it arrives
})>;
struct NeedsState {
  explicit NeedsState(int) {}
  std::optional<std::size_t> operator()(const PickContext&) const { return 0; }
};
struct ReturnsString {
  std::string operator()(const PickContext&) const { return "0"; }
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

static_assert(BalancePolicy<LeastConnections>);
static_assert(prefork::MasterDispatch<LeastConnections>);
static_assert(!prefork::WantsReusePort<LeastConnections>);
static_assert(BalancePolicy<IpHash>);
static_assert(prefork::MasterDispatch<IpHash>);
static_assert(!prefork::WantsReusePort<IpHash>);
static_assert(BalancePolicy<ReusePort>);
static_assert(prefork::KernelDispatch<ReusePort>);
static_assert(!prefork::MasterDispatch<ReusePort>);
static_assert(prefork::WantsReusePort<ReusePort>);
static_assert(!prefork::WantsReusePort<SharedAccept>);
static_assert(!prefork::WantsReusePort<RoundRobin>);
static_assert(!prefork::WantsReusePort<ReusePortOff>);
static_assert(BalancePolicy<ReusePortOff>);  // a kernel policy that shares one socket
static_assert(BalancePolicy<PickLast>);
static_assert(prefork::MasterDispatch<PickLast>);
static_assert(BalancePolicy<PickNothing>);
static_assert(prefork::PickFunction<decltype([](const PickContext&) { return std::size_t{0}; })>);
static_assert(!prefork::PickFunction<NeedsState>);
static_assert(!prefork::PickFunction<ReturnsString>);
static_assert(!prefork::PickFunction<int>);

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
  PickContext ctx{peer, ready, 8};
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

TEST_CASE("LeastConnections picks the ready worker with the fewest open connections",
          "[balance]") {
  LeastConnections lc;
  for (int i = 0; i < 3; ++i) CHECK(pick_loaded(lc, {{0, 3}, {1, 1}, {2, 2}}) == 1);
  CHECK(pick_loaded(lc, {{5, 4}, {2, 0}, {7, 9}}) == 2);
  CHECK(pick_loaded(lc, {{0, 100}, {1, 99}}) == 1);
}

TEST_CASE("LeastConnections returns the index into the ready list and not the slot number",
          "[balance]") {
  LeastConnections lc;
  std::vector<WorkerLoad> ready{{7, 1}, {3, 0}};
  SocketAddress peer;
  CHECK(lc.pick(PickContext{peer, ready, 8}) == std::optional<std::size_t>{1});
}

TEST_CASE("LeastConnections breaks ties round-robin by slot", "[balance]") {
  LeastConnections lc;
  SECTION("every worker idle") {
    std::vector<std::size_t> picked;
    for (int i = 0; i < 6; ++i) picked.push_back(pick_slot(lc, {0, 1, 2}));
    CHECK(picked == std::vector<std::size_t>{0, 1, 2, 0, 1, 2});
  }
  SECTION("every worker idle and the ready list not sorted") {
    std::vector<std::size_t> picked;
    for (int i = 0; i < 6; ++i) picked.push_back(pick_slot(lc, {2, 0, 1}));
    CHECK(picked == std::vector<std::size_t>{0, 1, 2, 0, 1, 2});
  }
  SECTION("only the least loaded workers take turns") {
    std::vector<std::size_t> picked;
    for (int i = 0; i < 6; ++i) picked.push_back(pick_loaded(lc, {{0, 5}, {1, 2}, {2, 2}, {3, 2}}));
    CHECK(picked == std::vector<std::size_t>{1, 2, 3, 1, 2, 3});
  }
  SECTION("the rotation continues after a slot picked for being least loaded") {
    REQUIRE(pick_loaded(lc, {{0, 1}, {1, 0}, {2, 1}}) == 1);
    CHECK(pick_slot(lc, {0, 1, 2}) == 2);
    CHECK(pick_slot(lc, {0, 1, 2}) == 0);
    CHECK(pick_slot(lc, {0, 1, 2}) == 1);
  }
  SECTION("slots that are not contiguous") {
    std::vector<std::size_t> picked;
    for (int i = 0; i < 6; ++i) picked.push_back(pick_slot(lc, {10, 3, 7}));
    CHECK(picked == std::vector<std::size_t>{3, 7, 10, 3, 7, 10});
  }
}

TEST_CASE("LeastConnections returns nullopt when no worker is ready", "[balance]") {
  LeastConnections lc;
  SocketAddress peer;
  std::vector<WorkerLoad> none;
  CHECK_FALSE(lc.pick(PickContext{peer, none, 4}).has_value());
  // And it still starts its rotation at the lowest slot afterwards.
  CHECK(pick_slot(lc, {1, 0}) == 0);
}

TEST_CASE("IpHash maps one IPv4 address to the same slot every time", "[balance]") {
  const SocketAddress peer = address("192.0.2.17:40000");
  const std::size_t expected = static_cast<std::size_t>(IpHash::hash(peer) % 4);
  IpHash h;
  std::vector<WorkerLoad> ready{{0, 0}, {1, 0}, {2, 0}, {3, 0}};
  for (int i = 0; i < 50; ++i) {
    // Loads change nothing: the address alone decides.
    ready[static_cast<std::size_t>(i) % 4].connections += static_cast<std::size_t>(i);
    CHECK(pick_loaded(h, ready, peer) == expected);
  }
  // A second policy object (the master of another cluster) agrees: no hidden state.
  CHECK(ip_hash_slot(peer, 4, all_slots(4)) == expected);
  CHECK(IpHash::hash(peer) == IpHash::hash(address("192.0.2.17:40000")));
}

TEST_CASE("IpHash gives every port of one address the same slot", "[balance]") {
  const std::size_t expected = ip_hash_slot(address("198.51.100.4:1"), 5, all_slots(5));
  for (const char* port : {"2", "80", "443", "40000", "65535"}) {
    INFO("port " << port);
    const SocketAddress peer = address(std::string("198.51.100.4:") + port);
    CHECK(IpHash::hash(peer) == IpHash::hash(address("198.51.100.4:1")));
    CHECK(ip_hash_slot(peer, 5, all_slots(5)) == expected);
  }
}

TEST_CASE("IpHash treats an IPv4-mapped IPv6 address like the IPv4 address", "[balance]") {
  const SocketAddress v4 = address("203.0.113.9:5000");
  const SocketAddress mapped = address("[::ffff:203.0.113.9]:6000");
  REQUIRE(mapped.family() == AF_INET6);
  CHECK(IpHash::hash(mapped) == IpHash::hash(v4));
  for (std::size_t slots : {2u, 3u, 4u, 7u, 16u}) {
    INFO(slots << " slots");
    CHECK(ip_hash_slot(mapped, slots, all_slots(slots)) ==
          ip_hash_slot(v4, slots, all_slots(slots)));
  }
  // A native IPv6 address hashes its 16 bytes: ::1 is not 127.0.0.1.
  CHECK(IpHash::hash(address("[::1]:80")) != IpHash::hash(address("127.0.0.1:80")));
  CHECK(IpHash::hash(address("[::1]:80")) == IpHash::hash(address("[::1]:81")));
}

TEST_CASE("IpHash finds the hashed slot wherever it sits in the ready list", "[balance]") {
  const SocketAddress peer = address("10.20.30.40:1234");
  const std::size_t expected = static_cast<std::size_t>(IpHash::hash(peer) % 4);
  CHECK(ip_hash_slot(peer, 4, {3, 1, 0, 2}) == expected);
  CHECK(ip_hash_slot(peer, 4, {2, 0, 3, 1}) == expected);
}

TEST_CASE("IpHash falls back to a ready worker when the hashed slot is not ready", "[balance]") {
  const SocketAddress peer = address("10.20.30.40:1234");
  const std::size_t home = static_cast<std::size_t>(IpHash::hash(peer) % 4);
  std::vector<std::size_t> others;
  for (std::size_t s = 0; s < 4; ++s)
    if (s != home) others.push_back(s);
  std::size_t fallback = ip_hash_slot(peer, 4, others);
  CHECK(fallback != home);
  CHECK(std::find(others.begin(), others.end(), fallback) != others.end());
  // The fallback is stable too, so the client sticks to it while its home slot is down...
  for (int i = 0; i < 10; ++i) CHECK(ip_hash_slot(peer, 4, others) == fallback);
  // ...a lone ready worker takes it...
  CHECK(ip_hash_slot(peer, 4, {others.front()}) == others.front());
  // ...and it goes home once its slot is back.
  CHECK(ip_hash_slot(peer, 4, all_slots(4)) == home);
}

TEST_CASE("IpHash returns nullopt with no ready workers", "[balance]") {
  IpHash h;
  const SocketAddress peer = address("10.0.0.1:80");
  std::vector<WorkerLoad> none;
  CHECK_FALSE(h.pick(PickContext{peer, none, 4}).has_value());
}

TEST_CASE("IpHash spreads the addresses of a subnet over every slot", "[balance]") {
  std::vector<int> per_slot(4, 0);
  for (int last = 0; last < 256; ++last) {
    std::size_t slot = ip_hash_slot(address("10.1.2." + std::to_string(last) + ":80"), 4,
                                    all_slots(4));
    ++per_slot[slot];
  }
  INFO(per_slot[0] << " " << per_slot[1] << " " << per_slot[2] << " " << per_slot[3]);
  for (int n : per_slot) CHECK(n >= 32);  // 64 each on average
}

TEST_CASE("IpHash sends every Unix peer to the same slot", "[balance]") {
  SocketAddress unnamed;
  unnamed.storage.ss_family = AF_UNIX;
  unnamed.length = sizeof(sa_family_t);
  const SocketAddress named = address("unix:/tmp/client.sock");
  CHECK(IpHash::hash(unnamed) == IpHash::hash(named));
  CHECK(ip_hash_slot(unnamed, 3, all_slots(3)) == ip_hash_slot(named, 3, all_slots(3)));
}

TEST_CASE("PickWith calls the function object a captureless lambda type names", "[balance]") {
  STATIC_REQUIRE(PickLast::dispatch == Dispatch::master);
  PickLast last;
  CHECK(pick_slot(last, {4, 1, 9}) == 9);
  CHECK(pick_slot(last, {4, 1}) == 1);

  PickNothing nothing;
  SocketAddress peer;
  std::vector<WorkerLoad> ready{{0, 0}, {1, 0}};
  CHECK_FALSE(nothing.pick(PickContext{peer, ready, 2}).has_value());

  PickBySlotCount echo;
  CHECK(echo.pick(PickContext{peer, ready, 2}) == std::optional<std::size_t>{2});
  CHECK(echo.pick(PickContext{peer, ready, 1}) == std::optional<std::size_t>{1});
}

TEST_CASE("PickWith stores a captureless lambda in no space", "[balance]") {
  STATIC_REQUIRE(sizeof(PickLast) == 1);
  STATIC_REQUIRE(std::is_empty_v<decltype(PickLast{}.fn)>);
}

TEST_CASE("ReusePort asks for one listening socket per slot and kernel dispatch", "[balance]") {
  STATIC_REQUIRE(ReusePort::dispatch == Dispatch::kernel);
  STATIC_REQUIRE(ReusePort::reuse_port);
  STATIC_REQUIRE(LeastConnections::dispatch == Dispatch::master);
  STATIC_REQUIRE(IpHash::dispatch == Dispatch::master);
}
