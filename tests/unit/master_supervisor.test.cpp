// The master's supervisor (master/supervisor.hpp) without processes: its decisions after a
// worker's exit against a hand-made worker table and a RestartPolicy, and its lifecycle frames,
// with fake hooks that count what it asks of the Master.
#include <prefork/master/supervisor.hpp>

#include <catch2/catch.hpp>

#include <chrono>
#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include <prefork/restart.hpp>

#include "support/master_parts.hpp"

using namespace std::chrono_literals;
using prefork::ExitInfo;
using prefork::Frame;
using prefork::FrameKind;
using prefork::RestartDecision;
using prefork::WorkerState;

namespace {

// A RestartPolicy that answers what the test says and counts the questions.
struct ScriptedRestart {
  RestartDecision next = RestartDecision::restart_now();
  int asked = 0;
  int listening = 0;
  RestartDecision on_exit(std::size_t, const ExitInfo&) {
    ++asked;
    return next;
  }
  void on_listening(std::size_t) { ++listening; }
};

template <class Restart>
struct Harness : prefork_test::MasterParts {
  using Supervisor = prefork::detail::Supervisor<Codec, Restart>;

  explicit Harness(std::size_t slots) : MasterParts(slots) {
    auto& h = supervisor.hooks;
    h.spawn = [this](std::size_t slot) {
      spawned.push_back(slot);
      return &add(slot);
    };
    h.spawn_after = [this](std::size_t slot, prefork::Clock::duration d) {
      later.emplace_back(slot, d);
    };
    h.errored = [this](std::size_t slot, const ExitInfo&) { errored.push_back(slot); };
    h.online = [this](Record&) { ++events; };
    h.listening = [this](Record&) { ++events; };
    h.ready = [this](Record&) { ++ready; };
    h.disconnected = [this](Record&) { ++disconnected; };
    h.protocol_error = [this](Record&, std::error_code) { return ++protocol_errors, true; };
    h.stats_answered = [](unsigned) {};
    h.recover = [](Record&) {};
    h.listens = [this] { return listens; };
  }

  // What the supervisor's pidfd handler does before after_exit: out of the table.
  std::unique_ptr<Record> reaped(Record& w, int exit_code) {
    w.exit.exit_code = exit_code;
    w.became_dead();
    return table.extract(w.id);
  }

  Restart restart;
  Codec codec;
  Supervisor supervisor{loop, table, log, phase, restart, codec};
  std::vector<std::size_t> spawned, errored;
  std::vector<std::pair<std::size_t, prefork::Clock::duration>> later;
  int events = 0, ready = 0, disconnected = 0, protocol_errors = 0;
  bool listens = true;
};

Frame frame(FrameKind kind) {
  Frame f;
  f.kind = kind;
  return f;
}

}  // namespace

TEST_CASE("Supervisor restarts a crashed worker's slot at once under RestartOnCrash",
          "[supervisor]") {
  Harness<prefork::RestartOnCrash> h(2);
  auto& w = h.add(1);
  auto owned = h.reaped(w, 1);
  h.supervisor.after_exit(w, w.exit);
  REQUIRE(h.spawned == std::vector<std::size_t>{1});
  CHECK(h.table.slot(1).worker_id == h.table.next_id() - 1);
  CHECK(h.later.empty());
}

TEST_CASE("Supervisor leaves the slot of a worker that exited cleanly empty under RestartOnCrash",
          "[supervisor]") {
  Harness<prefork::RestartOnCrash> h(1);
  auto& w = h.add(0);
  auto owned = h.reaped(w, 0);
  h.supervisor.after_exit(w, w.exit);
  CHECK(h.spawned.empty());
  CHECK(h.later.empty());
  CHECK(h.table.slot(0).worker_id == 0);
}

TEST_CASE("Supervisor restarts later when the policy asks for a delay", "[supervisor]") {
  Harness<ScriptedRestart> h(1);
  h.restart.next = RestartDecision::restart_after(1500ms);
  auto& w = h.add(0);
  auto owned = h.reaped(w, 1);
  h.supervisor.after_exit(w, w.exit);
  CHECK(h.spawned.empty());
  REQUIRE(h.later.size() == 1);
  CHECK(h.later[0].first == 0);
  CHECK(h.later[0].second == 1500ms);
  CHECK(h.table.slot(0).worker_id == 0);
}

TEST_CASE("Supervisor marks the slot errored when the policy gives up", "[supervisor]") {
  Harness<ScriptedRestart> h(2);
  h.restart.next = RestartDecision::give_up_slot();
  auto& w = h.add(1);
  auto owned = h.reaped(w, 1);
  h.supervisor.after_exit(w, w.exit);
  CHECK(h.spawned.empty());
  CHECK(h.later.empty());
  CHECK(h.table.slot(1).errored);
  CHECK_FALSE(h.table.slot(0).errored);
  CHECK(h.errored == std::vector<std::size_t>{1});
}

TEST_CASE("Supervisor does not restart a worker that was replaced in its slot", "[supervisor]") {
  Harness<ScriptedRestart> h(1);
  auto& old = h.add(0);
  auto& replacement = h.add(0);
  auto owned = h.reaped(old, 1);
  h.supervisor.after_exit(old, old.exit);
  CHECK(h.restart.asked == 0);
  CHECK(h.spawned.empty());
  CHECK(h.table.slot(0).worker_id == replacement.id);
}

TEST_CASE("Supervisor does not restart a worker whose slot was scaled away", "[supervisor]") {
  Harness<ScriptedRestart> h(2);
  auto& w = h.add(1);
  h.table.resize_slots(1);
  auto owned = h.reaped(w, 1);
  h.supervisor.after_exit(w, w.exit);
  CHECK(h.restart.asked == 0);
  CHECK(h.spawned.empty());
  CHECK(h.later.empty());
}

TEST_CASE("Supervisor restarts nothing while the master shuts down but frees the slot",
          "[supervisor]") {
  Harness<ScriptedRestart> h(1);
  auto& w = h.add(0);
  h.phase = prefork::detail::Phase::shutting_down;
  auto owned = h.reaped(w, 1);
  h.supervisor.after_exit(w, w.exit);
  CHECK(h.restart.asked == 0);
  CHECK(h.spawned.empty());
  CHECK(h.later.empty());
  CHECK(h.table.slot(0).worker_id == 0);
}

TEST_CASE("Supervisor makes a worker ready on 'listening' after 'online', once", "[supervisor]") {
  Harness<ScriptedRestart> h(1);
  auto& w = h.add(0);
  h.supervisor.on_frame(w, frame(FrameKind::online));
  CHECK(w.state == WorkerState::online);
  CHECK_FALSE(w.was_ready());
  h.supervisor.on_frame(w, frame(FrameKind::listening));
  CHECK(w.state == WorkerState::listening);
  CHECK(w.ready());
  CHECK(h.ready == 1);
  CHECK(h.restart.listening == 1);
  CHECK(h.events == 2);
}

TEST_CASE("Supervisor takes 'started' as ready only when the cluster listens on nothing",
          "[supervisor]") {
  Harness<ScriptedRestart> h(2);
  auto& a = h.add(0);
  h.supervisor.on_frame(a, frame(FrameKind::online));
  h.supervisor.on_frame(a, frame(FrameKind::started));
  CHECK_FALSE(a.was_ready());
  h.listens = false;
  auto& b = h.add(1);
  h.supervisor.on_frame(b, frame(FrameKind::online));
  h.supervisor.on_frame(b, frame(FrameKind::started));
  CHECK(b.was_ready());
  CHECK(h.ready == 1);
}

TEST_CASE("Supervisor treats 'listening' before 'online' as a protocol error and disconnects",
          "[supervisor]") {
  Harness<ScriptedRestart> h(1);
  auto& w = h.add(0);
  h.supervisor.on_frame(w, frame(FrameKind::listening));
  CHECK(h.protocol_errors == 1);
  CHECK(w.gone());
  CHECK(w.state == WorkerState::disconnected);
  CHECK(h.disconnected == 1);
  CHECK(h.ready == 0);
}

TEST_CASE("Supervisor plans the exit of a worker that disconnects on its own", "[supervisor]") {
  Harness<ScriptedRestart> h(1);
  auto& w = h.add(0);
  h.supervisor.on_frame(w, frame(FrameKind::disconnect));
  CHECK(w.planned());
  CHECK_FALSE(w.supervised());
  CHECK(w.escalation_timer != 0);
}
