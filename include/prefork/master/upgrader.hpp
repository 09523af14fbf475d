// The master upgrade (nginx's binary upgrade) from both sides: the old master starts its
// successor with the listening and control sockets and waits for it; a new master takes what
// it inherited and tells the old one once it serves. Also the pid file, which changes hands.
#ifndef PREFORK_MASTER_UPGRADER_HPP
#define PREFORK_MASTER_UPGRADER_HPP

#include <signal.h>
#include <unistd.h>

#include <cstddef>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include <prefork/version.hpp>
#include <prefork/codec.hpp>
#include <prefork/detail/own_program.hpp>
#include <prefork/detail/pid_file.hpp>
#include <prefork/detail/syscall.hpp>
#include <prefork/detail/systemd.hpp>
#include <prefork/detail/upgrade.hpp>
#include <prefork/event_loop.hpp>
#include <prefork/log.hpp>
#include <prefork/options.hpp>
#include <prefork/master/log.hpp>
#include <prefork/master/phase.hpp>
#include <prefork/master/worker_table.hpp>

namespace prefork::detail {

/// What the upgrader asks of the rest of the master.
struct UpgraderHooks {
  std::function<bool()> bound;  // the listening sockets are bound
  std::function<std::vector<InheritedSocket>()> sockets;  // to hand over: listeners, control
  std::function<bool()> hold_store;  // saved for the new master and held; false: not saved
  std::function<void(bool handed_over)> release_store;
  std::function<std::vector<int>()> master_only_fds;  // not for the new master
  std::function<std::vector<std::string>()> environment;  // the new master's
  std::function<void()> took_over;    // new master: the old master's files are ours now
  std::function<void()> handed_over;  // old master: the new master serves (before the report)
  std::function<void(const UpgradeReport&)> ended;  // old master: the upgrade ended
};

template <MessageCodec Codec>
class Upgrader {
 public:
  Upgrader(EventLoop& loop, const Options& opts, const WorkerTable<Codec>& table,
           const MasterLog& log, const Phase& phase, UpgraderHooks hooks)
      : opts_(opts), table_(table), log_(log), phase_(phase), hooks_(std::move(hooks)),
        successor_(loop) {}
  Upgrader(const Upgrader&) = delete;
  Upgrader& operator=(const Upgrader&) = delete;

  /// In the master's constructor: the program an upgrade runs, and what this master inherited
  /// if an upgrade started it. Throws std::runtime_error for a malformed upgrade environment.
  void start() {
    master_argv_ = own_argv();
    master_path_ = own_executable(master_argv_);
    std::string upgrade_error;
    boot_ = take_upgrade_boot(upgrade_error);
    if (!upgrade_error.empty()) throw std::runtime_error("prefork: " + upgrade_error);
  }

  /// Master upgrade; see Master::upgrade(). False (logged, refusal()) if none started.
  bool upgrade() {
    if (stopping(phase_)) return refuse("the master is shutting down");
    if (successor_.running())
      return refuse("one is already running (new master pid " + std::to_string(successor_.pid()) +
                    ")");
    if (!hooks_.bound()) return refuse("the master is not serving yet");
    std::vector<InheritedSocket> sockets = hooks_.sockets();
    for (auto& s : sockets)
      if (s.spec.starts_with("control:") && !encodable(s.spec))
        return refuse("the control socket's path holds a newline");
    for (auto& s : sockets)
      if (!encodable(s.spec)) return refuse("a listen address holds a newline");
    // The new master loads the store from the snapshot before it forks: from the save on,
    // this master holds store operations (StoreService::hold), so that none it acknowledges
    // is missing from the new master's store (or handed out again by it).
    if (!hooks_.hold_store()) return refuse("the store could not be saved for the new master");
    std::string error = successor_.start(
        master_path_, master_argv_, hooks_.environment(), sockets, hooks_.master_only_fds(),
        opts_.upgrade_timeout, [this] { succeeded(); },
        [this](const std::string& why) {
          log_(LogLevel::warning, "upgrade", "upgrade failed: " + why +
               (stopping(phase_) ? std::string() : "; this master keeps serving"));
          reclaim_pid_file();
          hooks_.release_store(false);
          hooks_.ended(UpgradeReport{false, successor_.pid(), why});
        });
    if (!error.empty()) {
      hooks_.release_store(false);
      return refuse(error);
    }
    log_(LogLevel::info, "upgrade",
         "upgrade: started new master pid " + std::to_string(successor_.pid()) + " (" +
             master_path_ + ")");
    return true;
  }

  /// Ends a running upgrade: the new master is killed with `signo` (the master shuts down).
  void fail(const std::string& why, int signo) { successor_.fail(why, signo); }
  /// An upgrade waits for its new master.
  bool waiting() const noexcept { return successor_.waiting(); }
  /// The new master's pid (0 before the first upgrade).
  pid_t new_master() const noexcept { return successor_.pid(); }
  /// Why the last upgrade() returned false.
  const std::string& refusal() const noexcept { return refusal_; }

  /// In a master started by an upgrade: the pid of the master it replaces; 0 otherwise.
  pid_t upgraded_from() const noexcept { return boot_ ? boot_->old_master : 0; }
  bool started_by_upgrade() const noexcept { return boot_.has_value(); }

  // New master: a socket the old master handed over for this listen entry and slot.
  UniqueFd take_inherited(const std::string& spec, long slot) {
    if (!boot_) return {};
    auto& b = *boot_;
    for (std::size_t i = 0; i < b.sockets.size() && i < b.fds.size(); ++i)
      if (b.fds[i] && b.sockets[i].spec == spec && b.sockets[i].slot == slot)
        return std::move(b.fds[i]);
    return {};
  }

  /// New master: the old master served on sockets systemd passed it (kActivatedSpec).
  bool inherits_activated() const {
    if (boot_)
      for (auto& s : boot_->sockets)
        if (s.spec.starts_with(kActivatedSpec)) return true;
    return false;
  }

  /// New master: the passed sockets of `slot` not taken yet, with their specs.
  std::vector<std::pair<UniqueFd, std::string>> take_inherited_activated(long slot) {
    std::vector<std::pair<UniqueFd, std::string>> taken;
    if (!boot_) return taken;
    auto& b = *boot_;
    for (std::size_t i = 0; i < b.sockets.size() && i < b.fds.size(); ++i)
      if (b.fds[i] && b.sockets[i].slot == slot && b.sockets[i].spec.starts_with(kActivatedSpec))
        taken.emplace_back(std::move(b.fds[i]), b.sockets[i].spec);
    return taken;
  }

  // Inherited sockets nobody listens on are closed; the control socket's is kept for
  // listen_control(), which may come after bind(); run() closes it if nobody takes it
  // (close_inherited).
  void close_unclaimed() {
    if (!boot_) return;
    for (std::size_t i = 0; i < boot_->fds.size(); ++i)
      if (i >= boot_->sockets.size() || !boot_->sockets[i].spec.starts_with("control:"))
        boot_->fds[i].reset();
  }
  void close_inherited() {
    if (boot_) boot_->fds.clear();
  }

  /// Descriptors a forked child must not keep.
  void descriptors(std::vector<int>& fds) const {
    if (boot_ && boot_->notify) fds.push_back(boot_->notify.get());
    if (pid_file_.held()) fds.push_back(pid_file_.native_handle());  // or a child keeps the lock
    successor_.descriptors(fds);
  }

  /// Takes Options::pid_file, if set. Throws std::system_error if a live master holds it or
  /// it cannot be written.
  void take_pid_file() {
    if (opts_.pid_file.empty()) return;
    std::error_code ec = pid_file_.acquire(opts_.pid_file, ::getpid());
    if (ec == std::errc::resource_unavailable_try_again) {
      pid_t holder = pid_file_.holder();
      // Started by an upgrade: the old master (our parent) holds it. It is taken over once
      // this master serves (tell_old_master_if_ready), so that until then it names the
      // master that serves, and a failed upgrade leaves it alone.
      if (boot_ && holder == boot_->old_master && holder == ::getppid()) {
        pid_file_handover_ = true;
        return;
      }
      throw StatedError(ec, "prefork: pid file " + opts_.pid_file +
                                " is held by a running master (pid " +
                                (holder ? std::to_string(holder) : "unknown") + ")");
    }
    if (ec) throw std::system_error(ec, "prefork: pid file " + opts_.pid_file);
  }

  /// The end of run(): the pid file goes.
  void remove_pid_file() { pid_file_.remove(); }

  // New master: once every slot has a listening worker (online, without listeners), tell the
  // old master, which then drains and exits.
  void tell_old_master_if_ready() {
    if (!boot_ || !boot_->notify) return;
    for (auto& s : table_.slots()) {
      auto* w = table_.owner(s);
      if (!w) return;
      if (!w->ready()) return;
    }
    if (pid_file_handover_) {  // before "ready": the old master must find it taken when it exits
      pid_file_handover_ = false;
      if (std::error_code ec = pid_file_.take_over(opts_.pid_file, ::getpid()))
        log_(LogLevel::warning, "pid-file",
             "pid file " + opts_.pid_file + " not taken over: " + ec.message());
    }
    hooks_.took_over();
    static constexpr char kReady[] = "ready\n";
    write_all(boot_->notify.get(), kReady, sizeof kReady - 1);
    boot_->notify.reset();
    log_(LogLevel::info, "upgrade", "upgrade: every worker is listening; the old master (pid " +
         std::to_string(boot_->old_master) + ") hands over");
  }

 private:
  bool refuse(const std::string& why) {
    refusal_ = why;
    log_(LogLevel::warning, "upgrade", "upgrade refused: " + why);
    return false;
  }

  void succeeded() {
    hooks_.handed_over();
    log_(LogLevel::info, "upgrade", "upgrade: new master pid " + std::to_string(successor_.pid()) +
         " is serving; this master shuts down");
    hooks_.ended(UpgradeReport{true, successor_.pid(), {}});
  }

  // The old master after a failed upgrade: the new master may have taken the pid file over
  // before it failed.
  void reclaim_pid_file() {
    if (!pid_file_.held() || pid_file_.current()) return;
    if (std::error_code ec = pid_file_.take_over(opts_.pid_file, ::getpid()))
      log_(LogLevel::warning, "pid-file",
           "pid file " + opts_.pid_file + " not taken back: " + ec.message());
  }

  const Options& opts_;
  const WorkerTable<Codec>& table_;
  const MasterLog& log_;
  const Phase& phase_;
  UpgraderHooks hooks_;
  Successor successor_;  // constructed after the loop it watches, destroyed before it
  std::vector<std::string> master_argv_;  // what an upgrade executes
  std::string master_path_;
  std::optional<UpgradeBoot> boot_;  // set in a master started by an upgrade
  PidFile pid_file_;                 // Options::pid_file, held while this master runs
  std::string refusal_;              // why the last upgrade() returned false
  bool pid_file_handover_ = false;   // started by an upgrade: take the pid file once serving
};

}  // namespace prefork::detail

#endif  // PREFORK_MASTER_UPGRADER_HPP
