// The master's watchdog: a periodic check of every supervised worker against
// Options::start_timeout, watchdog_timeout (heartbeats), max_lifetime and max_rss. A worker
// that never became ready is killed, a hung one replaced and terminated; one past its lifetime
// or memory limit is recycled (replaced first, drained after) by the reloader, through a hook.
#ifndef PREFORK_MASTER_WATCHDOG_HPP
#define PREFORK_MASTER_WATCHDOG_HPP

#include <signal.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <functional>
#include <string>
#include <vector>

#include <prefork/version.hpp>
#include <prefork/codec.hpp>
#include <prefork/detail/process.hpp>
#include <prefork/event_loop.hpp>
#include <prefork/options.hpp>
#include <prefork/master/log.hpp>
#include <prefork/master/phase.hpp>
#include <prefork/master/worker_record.hpp>
#include <prefork/master/worker_table.hpp>

namespace prefork::detail {

/// What the watchdog asks of the Master (set in the Master's constructor).
template <MessageCodec Codec>
struct WatchdogHooks {
  using Record = WorkerRecord<Codec>;
  /// A replacement for a hung worker, started into its slot now.
  std::function<Record*(std::size_t slot)> spawn;
  /// Replace `w` first, drain it after (the reloader's recycling).
  std::function<void(Record&, const std::string& why)> recycle;
  /// The cluster has listening sockets (for the start timeout's reason: "not listening").
  std::function<bool()> listens;
};

template <MessageCodec Codec>
class Watchdog {
 public:
  using Record = WorkerRecord<Codec>;

  Watchdog(EventLoop& loop, const Options& opts, WorkerTable<Codec>& table, const MasterLog& log,
           const Phase& phase) noexcept
      : loop_(loop), opts_(opts), table_(table), log_(log), phase_(phase) {}
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  WatchdogHooks<Codec> hooks;

  /// Starts the periodic check, if any limit is set: every quarter of the shortest time limit,
  /// between 10 ms and 1 s.
  void start() {
    using std::chrono::milliseconds;
    milliseconds tick{1000};
    for (milliseconds limit : {opts_.watchdog_timeout, opts_.start_timeout, opts_.max_lifetime})
      if (limit.count() > 0) tick = std::min(tick, std::max(milliseconds(10), limit / 4));
    if (opts_.watchdog_timeout.count() <= 0 && opts_.start_timeout.count() <= 0 &&
        opts_.max_lifetime.count() <= 0 && opts_.max_rss == 0)
      return;
    loop_.every(tick, [this] { supervise(Clock::now()); }, false);
  }

  /// One check of every supervised worker as of `now`.
  void supervise(Clock::time_point now) {
    if (stopping(phase_)) return;
    std::vector<Record*> all = table_.records();  // hung() and recycle() may fork into the table
    for (Record* w : all) {
      if (!w->supervised()) continue;
      if (!w->was_ready()) {
        if (opts_.start_timeout.count() > 0 && now - w->started > opts_.start_timeout)
          start_timed_out(*w);
        continue;
      }
      if (opts_.watchdog_timeout.count() > 0 && now - w->last_heard > opts_.watchdog_timeout) {
        // Judged again on what read_pending() delivered (a frame moves last_heard to the
        // time it was read, which is after `now`).
        if (read_pending(*w) && now - w->last_heard > opts_.watchdog_timeout)
          hung(*w, now - w->last_heard);
        continue;
      }
      if (w->lifetime.count() > 0 && now - w->started > w->lifetime) {
        hooks.recycle(*w, "max_lifetime " + std::to_string(opts_.max_lifetime.count()) +
                              " ms reached");
        continue;
      }
      if (opts_.max_rss > 0) {
        std::size_t rss = resident_bytes(w->pid);
        if (rss > opts_.max_rss)
          hooks.recycle(*w, "resident memory " + std::to_string(rss >> 20) +
                                " MiB above max_rss " + std::to_string(opts_.max_rss >> 20) +
                                " MiB");
      }
    }
  }

 private:
  // The watchdog's verdict: no new connections (dispatch skips it), a replacement in its
  // slot now, and SIGTERM, then SIGKILL. Not a planned exit: ExitInfo says why.
  void hung(Record& w, Clock::duration silent) {
    w.condemn();
    auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(silent).count();
    w.exit.reason = "watchdog: no heartbeat for " + std::to_string(ms) + " ms (watchdog_timeout " +
                     std::to_string(opts_.watchdog_timeout.count()) + " ms)";
    log_(LogLevel::warning, "hung",
         MasterLog::describe(w) + " is hung (" + w.exit.reason + "); replacing it and sending SIGTERM",
         &w);
    if (table_.owns_slot(w) && !stopping(phase_)) hooks.spawn(w.slot);
    w.terminate();
  }

  // Frames may be waiting unread: the master's own loop may have stood still (a slow fork, a
  // SIGSTOP, swap) and the tick come due before the channels were read. A worker is judged by
  // what it has sent, not by when the master last looked. False if that ended its supervision.
  bool read_pending(Record& w) {
    if (w.channel && w.channel->is_open()) w.channel->read_all_pending();
    return w.supervised();
  }

  void start_timed_out(Record& w) {
    if (!read_pending(w) || w.was_ready()) return;
    w.condemn();
    w.exit.start_timed_out = true;
    w.exit.reason = "start timeout: not " +
                     std::string(hooks.listens() ? "listening" : "started") + " after " +
                     std::to_string(opts_.start_timeout.count()) + " ms";
    log_(LogLevel::warning, "start-timeout",
         MasterLog::describe(w) + ": " + w.exit.reason + "; SIGKILL", &w);
    w.signal(SIGKILL);
  }

  EventLoop& loop_;
  const Options& opts_;
  WorkerTable<Codec>& table_;
  const MasterLog& log_;
  const Phase& phase_;
};

}  // namespace prefork::detail

#endif  // PREFORK_MASTER_WATCHDOG_HPP
