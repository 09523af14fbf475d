// The master's dispatch parts without forking: RoundRobinHandle deals connections from a real
// loopback listener to worker records that have real channels (socketpairs) but no process;
// SharedHandle hands the listening sockets over. Time-dependent decisions are driven through
// made-up `now` values; nothing here asserts a timing.
#include "prefork/master/round_robin_handle.hpp"

#include <catch2/catch.hpp>

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <memory>
#include <vector>

#include "prefork/balance/round_robin.hpp"
#include "prefork/balance/shared_accept.hpp"
#include "prefork/channel.hpp"
#include "prefork/codec.hpp"
#include "prefork/detail/socket.hpp"
#include "prefork/event_loop.hpp"
#include "prefork/master/shared_handle.hpp"
#include "prefork/options.hpp"
#include "support/loop.hpp"
#include "support/master_parts.hpp"

namespace {

using prefork::Clock;
using prefork::StringCodec;
using prefork::UniqueFd;
using prefork::WorkerState;
using Record = prefork::detail::WorkerRecord<StringCodec>;
using Handle = prefork::detail::RoundRobinHandle<StringCodec, prefork::RoundRobin>;

bool wait_readable(int fd, int timeout_ms = 5000) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, timeout_ms) == 1;
}

struct Fixture : prefork_test::MasterParts {
  prefork::RoundRobin balance;
  std::vector<UniqueFd> listeners;
  std::vector<UniqueFd> clients;      // the client ends of the connections made
  std::vector<UniqueFd> worker_ends;  // the workers' ends of their channels, never read
  Handle rr{loop, table, log, phase, balance, listeners};

  Fixture() {
    listeners.push_back(prefork::detail::listen_on("127.0.0.1:0", 16));
  }

  // A worker record in `slot` with an open channel and no process; `ready`: listening, so
  // that it takes connections.
  Record& add(std::size_t slot, bool ready = true) {
    Record* r = &MasterParts::add(slot);
    auto [mine, theirs] = prefork::make_channel_pair();
    r->channel = std::make_unique<prefork::Channel>(loop, std::move(mine));
    worker_ends.push_back(std::move(theirs));
    if (ready) {
      r->state = WorkerState::listening;
      r->became_ready();
    } else {
      r->state = WorkerState::online;
    }
    return *r;
  }

  // A client connects; its connection is in the listener's backlog when this returns.
  void connect() {
    const prefork::detail::SocketAddress a = prefork::detail::local_address(listeners[0].get());
    UniqueFd c(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    REQUIRE(c);
    REQUIRE(::connect(c.get(), a.get(), a.length) == 0);
    clients.push_back(std::move(c));
    REQUIRE(wait_readable(listeners[0].get()));
  }

  // One client connects and the master accepts and deals what is in the backlog.
  void deal_one() {
    connect();
    rr.accept_from(listeners[0].get());
  }
};

int first_in_flight(const Record& w) {
  return w.in_flight.empty() ? -1 : w.in_flight.front().fd.get();
}

}  // namespace

TEST_CASE("RoundRobinHandle deals connections to the ready workers in turn", "[master_dispatch]") {
  Fixture f;
  Record* w[3] = {&f.add(0), &f.add(1), &f.add(2)};
  for (std::size_t k = 0; k < 6; ++k) {
    f.deal_one();
    for (std::size_t i = 0; i < 3; ++i) {
      CHECK(w[i]->in_flight.size() == (i == k % 3 ? 1u : 0u));
      // Acknowledged at once, so that no window closes whatever the time between rounds.
      f.rr.acknowledged(*w[i], 1, Clock::now());
    }
  }
  CHECK(f.rr.pending().empty());
}

TEST_CASE("The dispatch window closes at kMaxUnacked and after kAckBound without an ack",
          "[master_dispatch]") {
  Fixture f;
  Record& w = f.add(0);
  const Clock::time_point t0 = Clock::time_point{} + std::chrono::hours(1);
  CHECK(Handle::window_open(w, t0));  // nothing in flight: open whenever
  w.in_flight.emplace_back();
  w.unacked_since = t0;
  CHECK(Handle::window_open(w, t0 + Handle::kAckBound - std::chrono::milliseconds(1)));
  CHECK_FALSE(Handle::window_open(w, t0 + Handle::kAckBound));
  while (w.in_flight.size() < Handle::kMaxUnacked - 1) w.in_flight.emplace_back();
  CHECK(Handle::window_open(w, t0));
  w.in_flight.emplace_back();
  CHECK_FALSE(Handle::window_open(w, t0));

  SECTION("acknowledging reopens it from the acknowledgement's time") {
    f.rr.acknowledged(w, Handle::kMaxUnacked - 1, t0 + std::chrono::seconds(5));
    CHECK(w.in_flight.size() == 1);
    CHECK(Handle::window_open(w, t0 + std::chrono::seconds(5)));
    CHECK_FALSE(Handle::window_open(w, t0 + std::chrono::seconds(5) + Handle::kAckBound));
  }
}

TEST_CASE("A worker with a closed window is passed over for the next one", "[master_dispatch]") {
  Fixture f;
  Record& full = f.add(0);
  Record& stuck = f.add(1);
  Record& free = f.add(2);
  full.unacked_since = Clock::now();
  while (full.in_flight.size() < Handle::kMaxUnacked) full.in_flight.emplace_back();
  stuck.in_flight.emplace_back();
  stuck.unacked_since = Clock::now() - std::chrono::hours(1);  // far past kAckBound
  f.deal_one();
  CHECK(full.in_flight.size() == Handle::kMaxUnacked);
  CHECK(stuck.in_flight.size() == 1);
  CHECK(free.in_flight.size() == 1);
}

TEST_CASE("A decline pauses the worker and puts its connection first in line",
          "[master_dispatch]") {
  Fixture f;
  Record& a = f.add(0);
  f.deal_one();
  REQUIRE(a.in_flight.size() == 1);
  const int conn = first_in_flight(a);
  // A made-up `now` an hour ahead: the pause (kSaturatedPause from now) cannot end during
  // the test, however slow the machine.
  const Clock::time_point now = Clock::now() + std::chrono::hours(1);
  f.rr.declined(a, 1, now);
  CHECK(a.in_flight.empty());
  CHECK(a.out_of_fds);
  CHECK(a.declined_until == now + Handle::kSaturatedPause);
  CHECK_FALSE(Handle::window_open(a, now));
  CHECK(Handle::window_open(a, now + Handle::kSaturatedPause));
  REQUIRE(f.rr.pending().size() == 1);
  CHECK(f.rr.pending().front().fd.get() == conn);

  // Nobody takes connections: the next client waits in the kernel backlog.
  f.deal_one();
  CHECK(f.rr.pending().size() == 1);
  CHECK(wait_readable(f.listeners[0].get(), 0));

  // Another worker becomes ready: the declined connection goes to it first.
  Record& b = f.add(1);
  f.rr.worker_ready(b);
  CHECK(f.rr.pending().empty());
  CHECK(first_in_flight(b) == conn);
}

TEST_CASE("The in-flight connections of a gone worker go to another one", "[master_dispatch]") {
  Fixture f;
  Record& a = f.add(0);
  Record& b = f.add(1);
  f.deal_one();
  REQUIRE(a.in_flight.size() == 1);
  const int conn = first_in_flight(a);
  a.channel->close();
  a.became_disconnected();
  f.rr.worker_gone(a);
  CHECK(a.in_flight.empty());
  REQUIRE(f.rr.pending().size() == 1);
  CHECK(prefork_test::run_until(f.loop, [&] { return !b.in_flight.empty(); }));
  CHECK(f.rr.pending().empty());
  CHECK(first_in_flight(b) == conn);
}

TEST_CASE("At shutdown the waiting connections reach a draining worker", "[master_dispatch]") {
  Fixture f;
  Record& a = f.add(0);
  f.deal_one();
  f.rr.declined(a, 1, Clock::now() + std::chrono::hours(1));
  REQUIRE(f.rr.pending().size() == 1);
  a.plan_exit();
  REQUIRE_FALSE(a.takes_connections());
  REQUIRE(a.accepts_handoffs());
  f.phase = prefork::detail::shut_down(f.phase);
  f.rr.flush();
  CHECK(f.rr.pending().empty());
  CHECK(a.in_flight.size() == 1);
}

TEST_CASE("Nothing is dealt to a worker that does not take connections", "[master_dispatch]") {
  Fixture f;
  Record& starting = f.add(0, false);
  Record& draining = f.add(1);
  draining.plan_exit();
  Record& condemned = f.add(2);
  condemned.condemn();
  for (Record* w : {&starting, &draining, &condemned}) REQUIRE_FALSE(w->takes_connections());
  f.deal_one();
  for (Record* w : {&starting, &draining, &condemned}) CHECK(w->in_flight.empty());
  CHECK(f.rr.pending().empty());
  CHECK(wait_readable(f.listeners[0].get(), 0));  // left in the kernel backlog
}

TEST_CASE("The master's held connections are descriptors a child must close",
          "[master_dispatch]") {
  Fixture f;
  Record& a = f.add(0);
  f.deal_one();
  const int conn = first_in_flight(a);
  std::vector<int> fds;
  f.rr.descriptors(fds);
  CHECK(std::find(fds.begin(), fds.end(), conn) != fds.end());
  f.rr.declined(a, 1, Clock::now() + std::chrono::hours(1));  // now it waits in pending
  fds.clear();
  f.rr.descriptors(fds);
  CHECK(std::find(fds.begin(), fds.end(), conn) != fds.end());
}

TEST_CASE("Kernel dispatch hands each worker its own copies of the listening sockets",
          "[master_dispatch]") {
  Fixture f;
  Record& w = f.add(0);
  prefork::SharedAccept kernel;
  prefork::detail::SharedHandle<StringCodec, prefork::SharedAccept> shared{
      f.loop, f.table, f.log, f.phase, kernel, f.listeners};
  shared.hand_listeners(w, f.listeners);
  f.rr.hand_listeners(w, f.listeners);

  prefork::Channel peer(f.loop, std::move(f.worker_ends[0]));
  std::vector<std::size_t> handed;
  peer.on_frame([&](prefork::Frame&& fr) {
    if (fr.kind == prefork::FrameKind::handles) handed.push_back(fr.fds.size());
  });
  REQUIRE(prefork_test::run_until(f.loop, [&] { return handed.size() >= 2; }));
  REQUIRE(handed.size() == 2);
  CHECK(handed[0] == 1);  // kernel dispatch: a copy of the one listener
  CHECK(handed[1] == 0);  // master dispatch: connections come over the channel
}
