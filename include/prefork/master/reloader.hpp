// The reloader: one state machine for rolling restarts (reload()) and recycling (a worker
// replaced for its lifetime, memory or its own request). A replacement is forked into the old
// worker's slot first, and the old worker drains only once its replacement is ready.
#ifndef PREFORK_MASTER_RELOADER_HPP
#define PREFORK_MASTER_RELOADER_HPP

#include <signal.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <deque>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <prefork/version.hpp>
#include <prefork/codec.hpp>
#include <prefork/event_loop.hpp>
#include <prefork/log.hpp>
#include <prefork/options.hpp>
#include <prefork/master/log.hpp>
#include <prefork/master/phase.hpp>
#include <prefork/master/worker_record.hpp>
#include <prefork/master/worker_table.hpp>

namespace prefork::detail {

/// What the reloader asks of the Master (set in the Master's constructor).
template <MessageCodec Codec>
struct ReloaderHooks {
  /// Forks a worker into `slot` (its new owner); nullptr if that failed.
  std::function<WorkerRecord<Codec>*(std::size_t slot)> spawn;
  /// Drops the retry a failed spawn scheduled for `slot`.
  std::function<void(std::size_t slot)> cancel_restart;
  /// A rolling restart began, with `replacing` workers to replace (systemd's RELOADING=1).
  std::function<void(std::size_t replacing)> started;
  /// A pass ended (`requested`: a rolling restart, else recycling; `again`: one more pass
  /// runs right after this call).
  std::function<void(const ReloadReport&, bool requested, bool again)> finished;
};

/// Every member runs in the master process, on its loop. Its only clock is reload_timeout, a
/// timer on the loop.
template <MessageCodec Codec>
class Reloader {
 public:
  using Record = WorkerRecord<Codec>;

  Reloader(EventLoop& loop, const Options& opts, WorkerTable<Codec>& table, const MasterLog& log,
           const Phase& phase)
      : loop_(loop), opts_(opts), table_(table), log_(log), phase_(phase) {}
  Reloader(const Reloader&) = delete;
  Reloader& operator=(const Reloader&) = delete;

  ReloaderHooks<Codec> hooks;

  /// A pass runs (a rolling restart, or recycling).
  bool active() const noexcept { return reload_.active; }

  /// Master::reload(): a rolling restart of every worker that owns its slot; coalesced into
  /// one more pass if one runs. Nothing while shutting down.
  void reload() {
    if (stopping(phase_)) return;
    if (reload_.active) {
      reload_.again = true;
      return;
    }
    reload_ = ReloadState{};
    reload_.active = true;
    reload_.started = Clock::now();
    for (auto& [id, w] : table_.live())
      if (!w->planned() && table_.owns_slot(*w))
        reload_.queue.push_back(id);
    if (hooks.started) hooks.started(reload_.queue.size());
    reload_pump();
  }

  // Recycling: one worker replaced the way a rolling restart replaces it (replacement first,
  // drain after), through the same machinery, one at a time: a recycling pass of its own, or
  // one more worker in the pass that runs.
  void recycle(Record& w, const std::string& why) {
    if (stopping(phase_) || w.leaving() || w.recycling())
      return;
    w.recycle_reason = why;
    log_(LogLevel::info, "recycle", "recycling " + describe(w) + ": " + why, &w);
    if (reload_.active) {
      reload_.queue.push_back(w.id);
      if (!reload_.requested) reload_pump();
      return;
    }
    reload_ = ReloadState{};
    reload_.active = true;
    reload_.requested = false;
    reload_.started = Clock::now();
    reload_.queue.push_back(w.id);
    reload_pump();
  }

  // A worker became ready (listening, or online without listeners).
  void worker_ready(Record& w) {
    if (!reload_.active) return;
    auto it = reload_.starting.find(w.id);
    if (it == reload_.starting.end()) return;
    unsigned old_id = it->second;
    reload_.starting.erase(it);
    if (auto t = reload_.deadlines.find(w.id); t != reload_.deadlines.end()) {
      loop_.cancel(t->second);
      reload_.deadlines.erase(t);
    }
    if (Record* old = table_.find(old_id)) {
      if (!old->recycle_reason.empty()) old->exit.reason = "recycled: " + old->recycle_reason;
      old->disconnect();
      reload_.draining.push_back(old_id);
    }
    ++reload_.replaced;
    reload_pump();
  }

  void worker_exited(Record& w, const ExitInfo& info) {
    if (!reload_.active) return;
    if (reload_.starting.count(w.id) && w.slot >= table_.slot_count()) {  // scaled away: not a failure
      reload_.starting.erase(w.id);
      if (auto t = reload_.deadlines.find(w.id); t != reload_.deadlines.end()) {
        loop_.cancel(t->second);
        reload_.deadlines.erase(t);
      }
      return reload_pump();
    }
    if (reload_.starting.count(w.id)) {
      std::string how = info.signal ? "was killed by signal " + std::to_string(info.signal)
                                    : "exited with code " + std::to_string(info.exit_code);
      return finish(false, "replacement " + describe(w) + " " + how + " before it was ready");
    }
    auto d = std::find(reload_.draining.begin(), reload_.draining.end(), w.id);
    if (d == reload_.draining.end()) return;
    reload_.draining.erase(d);
    reload_pump();
  }

  // Ends the rolling restart. On failure every replacement that is not ready yet is stopped
  // and its slot given back to the old worker, which keeps serving; a replacement whose old
  // worker is gone keeps the slot (and, if it is stuck, is killed as a crash, so that the
  // RestartPolicy refills the slot).
  void finish(bool ok, const std::string& reason) {
    if (!reload_.active) return;
    ReloadState r = std::move(reload_);
    reload_ = ReloadState{};
    for (auto& [id, timer] : r.deadlines) loop_.cancel(timer);
    for (auto& [fresh_id, old_id] : r.starting) {
      Record* fresh = table_.find(fresh_id);
      Record* old = table_.find(old_id);
      if (old && !old->planned() && fresh && !fresh->is_dead()) {
        if (fresh->slot < table_.slot_count()) table_.slot(fresh->slot).worker_id = old_id;
        fresh->kill(SIGKILL);
      } else if (old && !old->planned()) {
        if (old->slot < table_.slot_count()) table_.slot(old->slot).worker_id = old_id;
      } else if (fresh && !fresh->is_dead()) {
        fresh->signal(SIGKILL);
      }
    }
    ReloadReport report;
    report.ok = ok;
    report.replaced = r.replaced;
    report.took = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - r.started);
    report.reason = reason;
    const char* what = r.requested ? "rolling restart" : "recycling";
    if (ok) {
      log_(LogLevel::info, r.requested ? "reload" : "recycle",
           std::string(what) + " done: " + std::to_string(r.replaced) + " workers replaced in " +
           std::to_string(report.took.count()) + " ms");
    } else {
      log_(LogLevel::warning, r.requested ? "reload" : "recycle",
           std::string(what) + " stopped: " + reason + "; the old workers keep serving");
    }
    // A reload asked for during a recycling pass runs whatever became of that pass.
    bool again = r.again && (ok || !r.requested) && !stopping(phase_);
    if (hooks.finished) hooks.finished(report, r.requested, again);
    if (again) reload();
  }

 private:
  // Rolling restart. `starting` maps each replacement to the old worker it replaces; an old
  // worker is disconnected when its replacement is ready, and the restart is done when the
  // queue is empty and every old worker has exited.
  struct ReloadState {
    bool active = false;
    bool again = false;                        // coalesced request: one more pass after this
    std::deque<unsigned> queue;                // old workers still to replace
    std::map<unsigned, unsigned> starting;     // replacement id -> old id
    std::map<unsigned, EventLoop::TimerId> deadlines;  // replacement id -> reload_timeout
    std::vector<unsigned> draining;            // old workers disconnected, not exited yet
    unsigned replaced = 0;
    Clock::time_point started{};
    bool requested = true;  // reload(); false: a recycling pass (no on_reload_done)
  };

  static std::string describe(const Record& w) { return MasterLog::describe(w); }

  void reload_pump() {
    // A rolling restart lets drains overlap (it replaces every worker, fast); recycling replaces
    // workers one at a time, the next only once the last one has exited, so that recycling
    // never has several workers on their way out together.
    auto busy = [this] {
      return reload_.requested ? reload_.starting.size() >= opts_.reload_surge
                               : !reload_.starting.empty() || !reload_.draining.empty();
    };
    while (reload_.active && !busy() && !reload_.queue.empty()) {
      unsigned old_id = reload_.queue.front();
      reload_.queue.pop_front();
      Record* old = table_.find(old_id);
      if (!old || old->leaving()) continue;
      std::size_t slot = old->slot;
      Record* fresh = hooks.spawn(slot);
      if (!fresh) {
        hooks.cancel_restart(slot);
        table_.slot(slot).worker_id = old_id;
        return finish(false, "could not fork a replacement for " + describe(*old));
      }
      unsigned fresh_id = fresh->id;
      reload_.starting[fresh_id] = old_id;
      reload_.deadlines[fresh_id] = loop_.after(opts_.reload_timeout, [this, fresh_id] {
        reload_.deadlines.erase(fresh_id);
        Record* late = table_.find(fresh_id);
        std::string why = "not ready after " + std::to_string(opts_.reload_timeout.count()) +
                          " ms (reload_timeout)";
        if (late) late->exit.reason = "rolling restart: " + why + "; SIGKILL";
        finish(false, "replacement " +
                          (late ? describe(*late) : "worker " + std::to_string(fresh_id)) +
                          " " + why);
      }, false);
    }
    if (reload_.active && reload_.queue.empty() && reload_.starting.empty() &&
        reload_.draining.empty())
      finish(true, {});
  }

  EventLoop& loop_;
  const Options& opts_;
  WorkerTable<Codec>& table_;
  const MasterLog& log_;
  const Phase& phase_;
  ReloadState reload_;
};

}  // namespace prefork::detail

#endif  // PREFORK_MASTER_RELOADER_HPP
