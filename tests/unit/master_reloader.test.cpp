// The reloader without forking: worker records without a process, a fake spawn hook that puts
// a fresh record into the slot, and the Master's "worker ready" / "worker exited" calls made by
// hand. The one timer (reload_timeout) is waited for on the loop with a bound.
#include "prefork/master/reloader.hpp"

#include <catch2/catch.hpp>

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "prefork/codec.hpp"
#include "prefork/event_loop.hpp"
#include "prefork/options.hpp"
#include "support/loop.hpp"
#include "support/master_parts.hpp"

namespace {

using prefork::ExitInfo;
using prefork::ReloadReport;
using prefork::StringCodec;
using prefork::WorkerState;
using Record = prefork::detail::WorkerRecord<StringCodec>;

struct Finished {
  ReloadReport report;
  bool requested;
  bool again;
};

struct Fixture : prefork_test::MasterParts {
  prefork::detail::Reloader<StringCodec> reloader{loop, opts, table, log, phase};
  std::vector<std::size_t> spawned;    // the slots the hook forked into
  std::vector<std::size_t> cancelled;  // the slots whose restart retry was dropped
  std::vector<std::size_t> started;    // RELOADING=1: workers to replace
  std::vector<Finished> finished;
  bool fail_spawn = false;
  std::vector<std::unique_ptr<Record>> exited;  // kept, as the Master keeps them until 'exit' ends

  explicit Fixture(std::size_t workers) {
    for (std::size_t s = 0; s < workers; ++s) ready(add(s));
    reloader.hooks.spawn = [this](std::size_t slot) -> Record* {
      if (fail_spawn) return nullptr;
      spawned.push_back(slot);
      return &add(slot);
    };
    reloader.hooks.cancel_restart = [this](std::size_t slot) { cancelled.push_back(slot); };
    reloader.hooks.started = [this](std::size_t n) { started.push_back(n); };
    reloader.hooks.finished = [this](const ReloadReport& r, bool requested, bool again) {
      finished.push_back({r, requested, again});
    };
  }

  Record& worker(unsigned id) {
    Record* w = table.find(id);
    REQUIRE(w);
    return *w;
  }

  // 'listening': the Master's "worker ready" reaches the reloader.
  Record& ready(Record& w) {
    w.state = WorkerState::listening;
    w.became_ready();
    reloader.worker_ready(w);
    return w;
  }
  void ready(unsigned id) { ready(worker(id)); }

  // Reaped: out of the table, then the Master's "worker exited" reaches the reloader.
  void exit(unsigned id, int code = 0) {
    Record& w = worker(id);
    w.cancel_timers();
    w.became_dead();
    w.exit.exit_code = code;
    exited.push_back(table.extract(id));
    reloader.worker_exited(w, w.exit);
    if (table.owns_slot(w)) table.slot(w.slot).worker_id = 0;
  }
};

}  // namespace

TEST_CASE("A rolling restart with surge 1 starts one replacement at a time and disconnects "
          "the old worker once its replacement is ready", "[master_reloader]") {
  Fixture f(2);  // workers 1 and 2
  f.reloader.reload();
  CHECK(f.reloader.active());
  CHECK(f.started == std::vector<std::size_t>{2});
  CHECK(f.spawned == std::vector<std::size_t>{0});  // worker 3, for worker 1
  CHECK(f.table.slot(0).worker_id == 3);
  CHECK_FALSE(f.worker(1).planned());

  f.ready(3);
  CHECK(f.worker(1).planned());                        // draining now
  CHECK(f.spawned == std::vector<std::size_t>{0, 1});  // worker 4, for worker 2
  CHECK_FALSE(f.worker(2).planned());

  f.exit(1);
  f.ready(4);
  CHECK(f.worker(2).planned());
  CHECK(f.finished.empty());  // until the last old worker has exited
  f.exit(2);
  REQUIRE(f.finished.size() == 1);
  CHECK(f.finished[0].report.ok);
  CHECK(f.finished[0].report.replaced == 2);
  CHECK(f.finished[0].requested);
  CHECK_FALSE(f.finished[0].again);
  CHECK_FALSE(f.reloader.active());
}

TEST_CASE("A surge of 2 starts two replacements at once", "[master_reloader]") {
  Fixture f(3);
  f.opts.reload_surge = 2;
  f.reloader.reload();
  CHECK(f.spawned == std::vector<std::size_t>{0, 1});
  f.ready(4);
  CHECK(f.spawned == std::vector<std::size_t>{0, 1, 2});
}

TEST_CASE("A replacement that exits before it is ready stops the pass and gives the slot back",
          "[master_reloader]") {
  Fixture f(2);
  f.reloader.reload();
  REQUIRE(f.table.slot(0).worker_id == 3);
  f.exit(3, 1);
  REQUIRE(f.finished.size() == 1);
  CHECK_FALSE(f.finished[0].report.ok);
  CHECK(f.finished[0].report.reason.find("exited with code 1 before it was ready") !=
        std::string::npos);
  CHECK(f.table.slot(0).worker_id == 1);  // the old worker keeps serving
  CHECK_FALSE(f.worker(1).planned());
  CHECK(f.spawned.size() == 1);  // worker 2 is not replaced
  CHECK_FALSE(f.reloader.active());
}

TEST_CASE("A replacement that misses reload_timeout is killed and the slot given back",
          "[master_reloader]") {
  Fixture f(1);
  f.opts.reload_timeout = std::chrono::milliseconds(1);
  f.reloader.reload();
  REQUIRE(f.table.slot(0).worker_id == 2);
  CHECK(prefork_test::run_until(f.loop, [&] { return !f.finished.empty(); }));
  REQUIRE(f.finished.size() == 1);
  CHECK_FALSE(f.finished[0].report.ok);
  CHECK(f.finished[0].report.reason.find("reload_timeout") != std::string::npos);
  CHECK(f.table.slot(0).worker_id == 1);
  CHECK(f.worker(2).planned());  // killed (SIGKILL; no process here)
  CHECK(f.worker(2).exit.reason.find("reload_timeout") != std::string::npos);
  CHECK_FALSE(f.worker(1).planned());
}

TEST_CASE("A replacement that cannot be forked stops the pass", "[master_reloader]") {
  Fixture f(2);
  f.fail_spawn = true;
  f.reloader.reload();
  REQUIRE(f.finished.size() == 1);
  CHECK_FALSE(f.finished[0].report.ok);
  CHECK(f.finished[0].report.reason.find("could not fork a replacement") != std::string::npos);
  CHECK(f.cancelled == std::vector<std::size_t>{0});
  CHECK(f.table.slot(0).worker_id == 1);
}

TEST_CASE("A reload asked for during a pass runs one more pass after it", "[master_reloader]") {
  Fixture f(1);
  f.reloader.reload();
  f.reloader.reload();  // coalesced
  CHECK(f.started.size() == 1);
  CHECK(f.spawned.size() == 1);
  f.ready(2);
  f.exit(1);
  REQUIRE(f.finished.size() == 1);
  CHECK(f.finished[0].report.ok);
  CHECK(f.finished[0].again);
  CHECK(f.reloader.active());  // the second pass runs
  CHECK(f.started.size() == 2);
  CHECK(f.spawned.size() == 2);  // worker 3, for worker 2
  f.ready(3);
  f.exit(2);
  REQUIRE(f.finished.size() == 2);
  CHECK(f.finished[1].report.ok);
  CHECK_FALSE(f.finished[1].again);
  CHECK_FALSE(f.reloader.active());
}

TEST_CASE("Recycling replaces one worker at a time, the next once the last has exited",
          "[master_reloader]") {
  Fixture f(3);
  f.reloader.recycle(f.worker(1), "max_lifetime reached");
  f.reloader.recycle(f.worker(2), "max_rss reached");
  f.reloader.recycle(f.worker(1), "asked twice");  // already recycling: ignored
  CHECK(f.started.empty());  // not a rolling restart: no RELOADING=1
  CHECK(f.spawned == std::vector<std::size_t>{0});  // worker 4, for worker 1
  CHECK(f.worker(1).recycle_reason == "max_lifetime reached");

  f.ready(4);
  CHECK(f.worker(1).planned());
  CHECK(f.worker(1).exit.reason == "recycled: max_lifetime reached");
  CHECK(f.spawned.size() == 1);  // worker 2 waits until worker 1 has exited
  f.exit(1);
  CHECK(f.spawned == std::vector<std::size_t>{0, 1});  // worker 5, for worker 2
  f.ready(5);
  f.exit(2);
  REQUIRE(f.finished.size() == 1);
  CHECK(f.finished[0].report.ok);
  CHECK_FALSE(f.finished[0].requested);
  CHECK(f.finished[0].report.replaced == 2);
  CHECK_FALSE(f.worker(3).planned());
}

TEST_CASE("Nothing is reloaded or recycled while shutting down", "[master_reloader]") {
  Fixture f(1);
  f.phase = prefork::detail::shut_down(f.phase);
  f.reloader.reload();
  f.reloader.recycle(f.worker(1), "max_lifetime reached");
  CHECK_FALSE(f.reloader.active());
  CHECK(f.spawned.empty());
}
