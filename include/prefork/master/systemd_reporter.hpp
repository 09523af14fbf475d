// The master's reports to systemd (sd_notify(3), Type=notify): READY=1 once every slot has a
// ready worker, STATUS= lines, RELOADING=1 and STOPPING=1, MAINPID= around an upgrade, and the
// WATCHDOG=1 pings from the master's own loop. Silent unless NOTIFY_SOCKET was set.
#ifndef PREFORK_MASTER_SYSTEMD_REPORTER_HPP
#define PREFORK_MASTER_SYSTEMD_REPORTER_HPP

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include <prefork/version.hpp>
#include <prefork/codec.hpp>
#include <prefork/detail/systemd.hpp>
#include <prefork/event_loop.hpp>
#include <prefork/options.hpp>
#include <prefork/status.hpp>
#include <prefork/master/phase.hpp>
#include <prefork/master/worker_table.hpp>

namespace prefork::detail {

/// What the reporter reads from the rest of the master.
struct SystemdHooks {
  std::function<bool()> listens;  // workers get listening sockets
  std::function<const std::vector<std::string>&()> addresses;  // as bound
  std::function<bool()> reloading;         // a rolling restart runs
  std::function<bool()> started_by_upgrade;  // this master replaced another one
};

template <MessageCodec Codec>
class SystemdReporter {
 public:
  SystemdReporter(EventLoop& loop, const WorkerTable<Codec>& table, const Phase& phase,
                  SystemdHooks hooks)
      : loop_(loop), table_(table), phase_(phase), hooks_(std::move(hooks)) {}
  SystemdReporter(const SystemdReporter&) = delete;
  SystemdReporter& operator=(const SystemdReporter&) = delete;

  /// Reports to `n` from now on (the master takes it from its environment, Options::systemd).
  void use(Notifier n) { notifier_ = std::move(n); }
  /// What a new master needs in its environment to report for the service in its turn.
  std::vector<std::string> environment() const { return notifier_.environment(); }

  // The STATUS= line systemctl status shows: "2 workers listening on 127.0.0.1:8080".
  std::string status() const {
    std::size_t n = 0;
    for (auto& [id, w] : table_.live())
      if (w->ready() && !w->planned())
        ++n;
    std::string s = std::to_string(n) + (n == 1 ? " worker " : " workers ") +
                    (hooks_.listens() ? "listening" : "running");
    const std::vector<std::string>& addresses = hooks_.addresses();
    for (std::size_t i = 0; i < addresses.size(); ++i) s += (i ? ", " : " on ") + addresses[i];
    return s;
  }

  // READY=1 once every slot has a worker listening (online, without listeners), as for an
  // upgrade's "ready"; a master started by an upgrade adds MAINPID= (it is the service's main
  // process now). Later, a STATUS= update whenever a worker starts listening outside a
  // rolling restart (a crashed one replaced), which ends with READY=1 of its own.
  void ready() {
    if (!notifier_.enabled() || detail::stopping(phase_)) return;
    if (ready_notified_) {
      if (!hooks_.reloading()) notifier_.notify("STATUS=" + status());
      return;
    }
    for (auto& s : table_.slots()) {
      auto* w = table_.owner(s);
      if (!w || !w->ready()) return;
    }
    ready_notified_ = true;
    std::string msg =
        hooks_.started_by_upgrade() ? "MAINPID=" + std::to_string(::getpid()) + "\n" : "";
    notifier_.notify(msg + "READY=1\nSTATUS=" + status());
  }

  /// A rolling restart starts, replacing `n` workers.
  void reloading(std::size_t n) {
    notifier_.notify("RELOADING=1\nMONOTONIC_USEC=" + std::to_string(monotonic_usec()) +
                     "\nSTATUS=rolling restart: replacing " + std::to_string(n) + " workers");
  }

  // The end of a rolling restart, failed or not: the service is serving either way.
  void reloaded(const ReloadReport& r) {
    if (!notifier_.enabled() || stopping_notified_) return;
    std::string status = this->status();
    status += r.ok ? "; reloaded in " + std::to_string(r.took.count()) + " ms"
                   : "; rolling restart stopped: " + r.reason;
    notifier_.notify("READY=1\nSTATUS=" + status.substr(0, 400));
  }

  // Not after a handed-over upgrade: the service goes on in the new master.
  void stopping() {
    if (!notifier_.enabled() || stopping_notified_ || detail::handed_over(phase_)) return;
    stopping_notified_ = true;
    notifier_.notify("STOPPING=1\nSTATUS=stopping: draining " + std::to_string(table_.size()) +
                     " workers");
  }

  /// An upgrade started a new master, `pid`.
  void upgrade_started(pid_t pid) {
    notifier_.notify("STATUS=upgrading: new master pid " + std::to_string(pid) +
                     " starting; " + status());
  }

  /// An upgrade failed; this master keeps serving unless it is shutting down.
  void upgrade_failed() {
    if (!detail::stopping(phase_)) notifier_.notify("STATUS=upgrade failed; " + status());
  }

  /// The new master `pid` serves now. From the main process, so that NotifyAccess=main takes
  /// it too; the new master says it again itself with READY=1 (NotifyAccess=all). systemd
  /// follows the new pid from now on.
  void handed_over_to(pid_t pid) {
    notifier_.notify("MAINPID=" + std::to_string(pid) +
                     "\nSTATUS=handed over to new master pid " + std::to_string(pid));
  }

  // WATCHDOG=1 from the master's own loop every half of WATCHDOG_USEC: a master stuck in a
  // callback stops pinging, and systemd restarts the service.
  void start_watchdog() {
    auto every = std::chrono::duration_cast<Clock::duration>(notifier_.watchdog() / 2);
    if (every <= Clock::duration::zero()) return;
    notifier_.notify("WATCHDOG=1");
    loop_.every(std::max<Clock::duration>(every, std::chrono::milliseconds(1)),
                [this] { notifier_.notify("WATCHDOG=1"); }, false);
  }

 private:
  EventLoop& loop_;
  const WorkerTable<Codec>& table_;
  const Phase& phase_;
  SystemdHooks hooks_;
  Notifier notifier_;  // disabled unless NOTIFY_SOCKET was set
  bool ready_notified_ = false, stopping_notified_ = false;
};

}  // namespace prefork::detail

#endif  // PREFORK_MASTER_SYSTEMD_REPORTER_HPP
