// The master's spawner: starts a worker into a slot (Node's cluster.fork()): its channel, its
// boot record, the fork or fork+exec through the one detail sequence (detail/spawn.hpp), its
// pidfd, and a retry from a timer when any of that fails. What the worker then says is the
// supervisor's: the Master wires the channel and the pidfd to it through SpawnerHooks.
#ifndef PREFORK_MASTER_SPAWNER_HPP
#define PREFORK_MASTER_SPAWNER_HPP

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <prefork/version.hpp>
#include <prefork/channel.hpp>
#include <prefork/codec.hpp>
#include <prefork/detail/boot.hpp>
#include <prefork/detail/privileges.hpp>
#include <prefork/detail/own_program.hpp>
#include <prefork/detail/process.hpp>
#include <prefork/detail/spawn.hpp>
#include <prefork/detail/upgrade.hpp>
#include <prefork/event_loop.hpp>
#include <prefork/options.hpp>
#include <prefork/worker.hpp>
#include <prefork/master/log.hpp>
#include <prefork/master/phase.hpp>
#include <prefork/master/worker_record.hpp>
#include <prefork/master/worker_table.hpp>

extern char** environ;

namespace prefork::detail {

/// This environment minus the variables that tell a process it is a worker or a new master.
inline std::vector<std::string> environment_without_markers() {
  std::vector<std::string> env;
  std::string worker = std::string(kWorkerEnv) + "=";
  std::string upgrade = std::string(kUpgradeEnv) + "=";
  for (char** e = environ; e && *e; ++e) {
    std::string_view v(*e);
    if (!v.starts_with(worker) && !v.starts_with(upgrade)) env.emplace_back(v);
  }
  return env;
}

/// What the spawner asks of the Master (set in the Master's constructor).
template <MessageCodec Codec>
struct SpawnerHooks {
  using Record = WorkerRecord<Codec>;
  /// Before the fork: readies what the slot needs (ReusePort: its sockets); false (logged) if
  /// that failed, and the spawn is retried. Unset: nothing to ready.
  std::function<bool(std::size_t slot)> prepare_slot;
  /// Adds the descriptors the Master's other parts hold (listeners, pending connections, the
  /// control socket...), which no child may keep.
  std::function<void(std::vector<int>&)> master_fds;
  /// The worker's channel and pidfd, wired to the supervisor.
  std::function<void(Record&, Frame&&)> frame;
  std::function<void(Record&, std::error_code)> closed;
  std::function<void(Record&)> exited;
  /// Forked and in the table: hand it the listening sockets if it gets any now.
  std::function<void(Record&)> hand_listeners;
  /// Forked and logged: the Master emits 'fork'.
  std::function<void(Record&)> forked;
};

template <MessageCodec Codec>
class Spawner {
 public:
  using Record = WorkerRecord<Codec>;
  /// What a forked child runs (fork mode); returns the worker's exit status.
  using ChildMain = std::function<int(const WorkerBoot&)>;

  Spawner(EventLoop& loop, const Options& opts, WorkerTable<Codec>& table, const MasterLog& log,
          const Phase& phase, const Credentials& credentials, ChildMain child_main)
      : loop_(loop), opts_(opts), table_(table), log_(log), phase_(phase),
        credentials_(credentials), child_main_(std::move(child_main)) {}
  Spawner(const Spawner&) = delete;
  Spawner& operator=(const Spawner&) = delete;

  SpawnerHooks<Codec> hooks;

  /// Exec mode: fixes the program and argv every worker is exec'd with. Throws
  /// std::invalid_argument if there is no argv.
  void set_up_exec() {
    if (opts_.spawn != SpawnMode::exec) return;
    exec_argv_ = opts_.exec_argv.empty() ? own_argv() : opts_.exec_argv;
    exec_path_ = opts_.exec_argv.empty() ? own_executable(exec_argv_) : opts_.exec_argv.front();
    if (exec_argv_.empty()) throw std::invalid_argument("prefork: exec mode needs an argv");
  }

  /// Starts a worker into `slot`. nullptr if it could not (logged; retried in 1 s).
  Record* spawn(std::size_t slot) {
    Slot& s = table_.slot(slot);
    cancel_restart(s);
    s.errored = false;
    if (hooks.prepare_slot && !hooks.prepare_slot(slot)) return retry_spawn(slot, "bind failed");
    std::pair<UniqueFd, UniqueFd> pair;
    try {
      pair = make_channel_pair();
    } catch (const std::system_error& e) {
      return retry_spawn(slot, e.what());
    }
    auto& [mine, theirs] = pair;
    unsigned id = table_.next_id();
    WorkerBoot boot{id, slot, theirs.get(), {opts_.max_message_size, opts_.max_queued_bytes}};
    if (opts_.watchdog_timeout.count() > 0)
      boot.heartbeat_ms = static_cast<std::uint64_t>(
          std::max<std::int64_t>(1, opts_.watchdog_timeout.count() / 4));
    if (opts_.max_connections) boot.max_connections = opts_.max_connections + jitter(opts_.max_connections_jitter);
    if (opts_.max_requests) boot.max_requests = opts_.max_requests + jitter(opts_.max_requests_jitter);

    // Prepared before fork(): after it, the exec path only calls async-signal-safe functions.
    std::vector<std::string> env_store;
    std::vector<char*> argv, envp;
    if (opts_.spawn == SpawnMode::exec) {
      for (auto& a : exec_argv_) argv.push_back(const_cast<char*>(a.c_str()));
      argv.push_back(nullptr);
      env_store = environment_without_markers();
      env_store.push_back(std::string(kWorkerEnv) + "=" + encode_boot(boot));
      for (auto& e : env_store) envp.push_back(e.data());
      envp.push_back(nullptr);
    }
    std::vector<int> close_in_child = master_only_fds();
    close_in_child.push_back(mine.get());
    ChildSetup child;
    child.label = "worker";
    child.die_with_parent = ::getpid();
    child.own_process_group = true;
    child.close = &close_in_child;
    child.credentials = &credentials_;
    std::vector<int> keep{boot.channel_fd};
    child.keep = &keep;
    child.keep_error = "worker: fcntl on the channel failed";
    std::function<int()> run = [&] { return child_main_(boot); };
    if (opts_.spawn == SpawnMode::exec) {
      child.path = exec_path_.c_str();
      child.argv = argv.data();
      child.envp = envp.data();
    } else {
      child.run = &run;
    }
    pid_t pid = spawn_child(child);
    if (pid < 0) return retry_spawn(slot, std::string("fork: ") + std::strerror(errno));
    table_.use_id(id);
    theirs.reset();

    auto owned = std::make_unique<Record>(loop_, opts_, id, slot);
    Record& w = *owned;
    w.pid = pid;
    if (opts_.max_lifetime.count() > 0)  // up to 10% more, so that workers started together
      w.lifetime = opts_.max_lifetime +  // do not all come due together
                    std::chrono::milliseconds(jitter(static_cast<std::uint64_t>(
                        opts_.max_lifetime.count() / 10)));
    w.pidfd.reset(pidfd_open(pid));
    if (!w.pidfd) {
      // Without a pidfd we cannot reap this child safely; it is ours, so kill and reap it.
      log_(LogLevel::warning, "fork",
           "pidfd_open failed for pid " + std::to_string(pid) + ": " + std::strerror(errno));
      ::kill(pid, SIGKILL);
      detail::retry_eintr([&] { return ::waitpid(pid, nullptr, 0); });
      return retry_spawn(slot, "pidfd_open failed");
    }
    w.channel = std::make_unique<Channel>(
        loop_, std::move(mine), ChannelLimits{opts_.max_message_size, opts_.max_queued_bytes});
    // Store and request answers count against max_queued_bytes like everything else: a
    // worker that does not read them is not read either until it has (issue 13).
    w.channel->pause_reading_while_full(true);
    w.channel->on_frame([this, &w](Frame&& f) { hooks.frame(w, std::move(f)); });
    w.link->channel = w.channel.get();
    w.channel->on_close([this, &w](std::error_code ec) { hooks.closed(w, ec); });
    loop_.watch(w.pidfd.get(), EventLoop::readable, [this, &w](std::uint32_t) { hooks.exited(w); });
    s.worker_id = id;
    if (s.used) ++s.restarts;
    s.used = true;
    w.restarts = s.restarts;
    table_.insert(std::move(owned));
    if (hooks.hand_listeners) hooks.hand_listeners(w);
    log_(LogLevel::info, "fork", "pid " + std::to_string(pid) + ", slot " + std::to_string(slot) +
         (s.restarts ? ", restart " + std::to_string(s.restarts) + " of the slot" : std::string()),
         &w);
    if (hooks.forked) hooks.forked(w);
    return &w;
  }

  /// Starts a worker into `slot` after `delay` (a restart's backoff), unless the master is
  /// stopping by then. Replaces nothing: the slot's timer must be free (spawn() frees it).
  void spawn_after(std::size_t slot, Clock::duration delay) {
    table_.slot(slot).restart_timer = loop_.after(delay, [this, slot] {
      table_.slot(slot).restart_timer = 0;
      if (!stopping(phase_)) spawn(slot);
    }, false);
  }

  /// Cancels a restart or retry the slot waits for.
  void cancel_restart(Slot& s) {
    if (s.restart_timer) loop_.cancel(s.restart_timer);
    s.restart_timer = 0;
  }

  // Everything the child must not keep: the master's loop, what the Master's other parts hold
  // (its listening sockets: a worker is handed them over its channel), and every other
  // worker's channel, pidfd and connections in flight.
  std::vector<int> master_only_fds() const {
    std::vector<int> fds = loop_.own_descriptors();
    if (hooks.master_fds) hooks.master_fds(fds);
    for (auto& [id, w] : table_.live()) {
      for (auto& h : w->in_flight) fds.push_back(h.fd.get());
      if (w->channel && w->channel->is_open()) fds.push_back(w->channel->native_handle());
      if (w->pidfd) fds.push_back(w->pidfd.get());
    }
    return fds;
  }

 private:
  Record* retry_spawn(std::size_t slot, const std::string& why) {
    log_(LogLevel::warning, "fork",
         "cannot start a worker for slot " + std::to_string(slot) + ": " + why +
         "; retrying in 1 s");
    spawn_after(slot, std::chrono::seconds(1));
    return nullptr;
  }

  std::uint64_t jitter(std::uint64_t max) {
    if (max == 0) return 0;
    return std::uniform_int_distribution<std::uint64_t>(0, max)(rng_);
  }

  EventLoop& loop_;
  const Options& opts_;
  WorkerTable<Codec>& table_;
  const MasterLog& log_;
  const Phase& phase_;
  const Credentials& credentials_;
  ChildMain child_main_;
  std::vector<std::string> exec_argv_;
  std::string exec_path_;
  std::mt19937_64 rng_{std::random_device{}()};
};

}  // namespace prefork::detail

#endif  // PREFORK_MASTER_SPAWNER_HPP
