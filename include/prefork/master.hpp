// The master role (Node's lib/internal/cluster/primary.js): binds the listening sockets, forks
// or execs the workers, reaps them through pidfds, walks them through Node's lifecycle events,
// restarts them per the RestartPolicy, and runs rolling restarts and graceful shutdown.
#ifndef PREFORK_MASTER_HPP
#define PREFORK_MASTER_HPP

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <iterator>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <sys/socket.h>

#include <prefork/version.hpp>
#include <prefork/balance/policy.hpp>
#include <prefork/channel.hpp>
#include <prefork/codec.hpp>
#include <prefork/detail/privileges.hpp>
#include <prefork/detail/process.hpp>
#include <prefork/detail/socket.hpp>
#include <prefork/detail/systemd.hpp>
#include <prefork/detail/syscall.hpp>
#include <prefork/detail/upgrade.hpp>
#include <prefork/event_loop.hpp>
#include <prefork/options.hpp>
#include <prefork/restart.hpp>
#include <prefork/status.hpp>
#include <prefork/store_client.hpp>
#include <prefork/worker.hpp>
#include <prefork/worker_handle.hpp>
#include <prefork/master/log.hpp>
#include <prefork/master/control_service.hpp>
#include <prefork/master/listeners.hpp>
#include <prefork/master/phase.hpp>
#include <prefork/master/status_queries.hpp>
#include <prefork/master/store_service.hpp>
#include <prefork/master/systemd_reporter.hpp>
#include <prefork/master/upgrader.hpp>
#include <prefork/master/worker_record.hpp>
#include <prefork/master/worker_table.hpp>

extern char** environ;

namespace prefork {

namespace detail {

/// The environment variable that tells an exec'd worker who it is: "id,slot,fd,max,queued".
inline constexpr const char* kWorkerEnv = "PREFORK_WORKER";

inline void validate(const Options& o) {
  auto bad = [](const std::string& what) { throw std::invalid_argument("prefork: Options." + what); };
  if (o.workers == 0) bad("workers must be at least 1");
  if (o.workers > 4096) bad("workers must be at most 4096, got " + std::to_string(o.workers));
  if (o.backlog <= 0) bad("backlog must be positive, got " + std::to_string(o.backlog));
  if (o.defer_accept.count() < 0 || o.defer_accept.count() > 3600)
    bad("defer_accept must be between 0 and 3600 s");
  if (o.drain_timeout.count() < 0) bad("drain_timeout must not be negative");
  if (o.kill_timeout.count() < 0) bad("kill_timeout must not be negative");
  if (o.reload_surge == 0) bad("reload_surge must be at least 1");
  if (o.reload_timeout.count() <= 0) bad("reload_timeout must be positive");
  if (o.upgrade_timeout.count() <= 0) bad("upgrade_timeout must be positive");
  if (o.max_message_size == 0 || o.max_message_size > 0xffffffffu)
    bad("max_message_size must be between 1 byte and 4 GiB - 1");
  if (o.max_queued_bytes == 0) bad("max_queued_bytes must be positive");
  for (auto& l : o.listen)
    if (std::string why = address_problem(l); !why.empty()) bad("listen: '" + l + "': " + why);
  if (!o.pid_file.empty() && (o.pid_file.back() == '/' || o.pid_file.find('\0') != std::string::npos))
    bad("pid_file: '" + o.pid_file + "' is not a file name");
  for (auto* id : {&o.user, &o.group})
    if (id->find('\0') != std::string::npos)
      bad(std::string(id == &o.user ? "user" : "group") + " holds a NUL byte");
}

}  // namespace detail

/// The master: every member runs in the master process, on the thread that calls run().
/// fork mode requires that thread to be the only one in the process when a worker is forked.
template <MessageCodec Codec, class Restart, class Balance>
class Master {
 public:
  using WorkerT = Worker<Codec>;
  using Record = detail::WorkerRecord<Codec>;
  using message_type = typename Codec::message_type;
  /// What a forked child runs (fork mode); returns the worker's exit status.
  using ChildMain = std::function<int(const detail::WorkerBoot&)>;

  /// Throws std::invalid_argument for bad options.
  Master(Options opts, Restart restart, ChildMain child_main)
      : opts_(std::move(opts)), restart_(std::move(restart)), child_main_(std::move(child_main)) {
    detail::validate(opts_);
    if (opts_.spawn == SpawnMode::exec) {
      exec_argv_ = opts_.exec_argv.empty() ? detail::own_argv() : opts_.exec_argv;
      exec_path_ = opts_.exec_argv.empty() ? detail::own_executable(exec_argv_)
                                           : opts_.exec_argv.front();
      if (exec_argv_.empty()) throw std::invalid_argument("prefork: exec mode needs an argv");
    }
    upgrader_.start();
    if (opts_.systemd) {
      listeners_.take_activated();
      systemd_.use(detail::Notifier::take_from_environment());
    }
    table_.resize_slots(opts_.workers);
    credentials_ = detail::resolve_credentials(opts_.user, opts_.group);
    store_.use(MemoryStore<>(opts_.store_limits));
    loop_.on_exception([this](std::exception_ptr e) { callback_failed(e); });
  }
  Master(const Master&) = delete;
  Master& operator=(const Master&) = delete;

  // Lifecycle callbacks, in Node's order: fork -> online -> listening -> disconnect -> exit.
  void on_fork(std::function<void(WorkerT&)> cb) { on_fork_ = std::move(cb); }

  /// Replaces the shared store's backend (MemoryStore by default) with any Store, before
  /// run(); returns it, for the master's own synchronous use. Snapshots (store_snapshot) need
  /// its save(path)/load(path); expired keys are swept if it has sweep(n).
  template <Store S>
  S& use_store(S store) {
    return store_.use(std::move(store));
  }
  void on_online(std::function<void(WorkerT&)> cb) { on_online_ = std::move(cb); }
  /// cb(Worker&) or cb(Worker&, const std::vector<std::string>& addresses): the addresses
  /// as bound, with the port the kernel chose for port 0 (Node's 'listening' address).
  template <class F>
  void on_listening(F cb) {
    if constexpr (std::is_invocable_v<F&, WorkerT&, const std::vector<std::string>&>) {
      on_listening_ = [this, cb = std::move(cb)](WorkerT& w) mutable {
        cb(w, listeners_.addresses());
      };
    } else {
      on_listening_ = std::move(cb);
    }
  }
  void on_disconnect(std::function<void(WorkerT&)> cb) { on_disconnect_ = std::move(cb); }
  void on_exit(std::function<void(WorkerT&, const ExitInfo&)> cb) { on_exit_ = std::move(cb); }
  void on_message(std::function<void(WorkerT&, const message_type&)> cb) {
    on_message_ = std::move(cb);
  }
  /// A worker broke the protocol (malformed, oversized or undecodable frame); it is killed.
  void on_error(std::function<void(WorkerT&, std::error_code)> cb) { on_error_ = std::move(cb); }
  /// Requests from workers (WorkerContext::request): cb(worker, message, reply) answers by
  /// calling reply(answer), now or later. Without a handler every request fails at once
  /// (errc::no_handler on the worker's side).
  void on_request(std::function<void(WorkerT&, const message_type&, Reply<Codec>)> cb) {
    on_request_ = std::move(cb);
  }
  /// The RestartPolicy gave up on a slot (crash loop); the master stays up without it.
  void on_errored(std::function<void(std::size_t slot, const ExitInfo&)> cb) {
    on_errored_ = std::move(cb);
  }
  /// A rolling restart finished: cb(const ReloadReport&), or cb(bool ok). ok once every old
  /// worker has exited; not ok as soon as it stopped because a replacement failed.
  template <class F>
  void on_reload_done(F cb) {
    if constexpr (std::is_invocable_v<F&, const ReloadReport&>) {
      on_reload_done_ = std::move(cb);
    } else {
      on_reload_done_ = [cb = std::move(cb)](const ReloadReport& r) mutable { cb(r.ok); };
    }
  }

  /// A master upgrade ended (old master side): the new master is serving and this one is
  /// shutting down (ok), or the new master failed and this one keeps serving.
  void on_upgrade_done(std::function<void(const UpgradeReport&)> cb) {
    on_upgrade_done_ = std::move(cb);
  }

  EventLoop& loop() noexcept { return loop_; }
  const Options& options() const noexcept { return opts_; }
  Restart& restart_policy() noexcept { return restart_; }

  /// Binds every listen address (idempotent). Throws std::system_error naming the address
  /// ("prefork: bind 127.0.0.1:8080: Address already in use"); nothing stays bound then.
  /// Before binding, as run() does: takes Options::pid_file and checks Options::user.
  ///
  /// Socket activation (Options::systemd, and systemd passed at least one listening stream
  /// socket): the .socket unit decides what the service listens on, and nothing is bound. A
  /// listen address with a passed socket bound to it (getsockname; a configured port 0
  /// matches any port) is served on that socket, in its place in addresses(); passed sockets
  /// that match no listen address are served too, after those; listen addresses without a
  /// passed socket are not bound (logged). Passed descriptors that are not listening stream
  /// sockets are closed (logged). A master upgrade hands the same set to the new master.
  void bind() {
    if (listeners_.bound()) return;
    prepare_to_serve();
    listeners_.bind();
  }

  /// The bound addresses, with the ports the kernel chose for port 0. Empty before bind().
  const std::vector<std::string>& addresses() const noexcept { return listeners_.addresses(); }

  /// Live workers (not yet exited), in id order.
  std::vector<WorkerT*> workers() const { return table_.handles(); }
  WorkerT* worker(unsigned id) const {
    Record* r = record(id);
    return r ? &r->handle : nullptr;
  }

  /// Adds a slot and forks a worker into it (Node's cluster.fork()). Returns nullptr if fork
  /// failed (logged; retried from a timer) or the master is shutting down.
  WorkerT* fork() {
    if (shutting_down()) return nullptr;
    Record* r = spawn(table_.add_slot());
    return r ? &r->handle : nullptr;
  }

  /// The balance policy object, e.g. to configure a stateful one.
  Balance& balance() noexcept { return balance_; }

  /// Sends to one worker; errc::no_such_worker if id is not live.
  std::error_code send(unsigned id, const message_type& m) {
    auto* w = worker(id);
    return w ? w->send(m) : make_error_code(errc::no_such_worker);
  }

  /// Sends to every connected worker; returns how many accepted it. Encodes once.
  std::size_t broadcast(const message_type& m) {
    std::string bytes = codec_.encode(m);
    std::size_t n = 0;
    for (auto& [id, w] : table_.live())
      if (w->is_connected() && !w->channel->send(FrameKind::user, bytes)) ++n;
    return n;
  }

  EventLoop::TimerId every(Clock::duration d, std::function<void()> cb) {
    return loop_.every(d, std::move(cb), false);
  }
  EventLoop::TimerId after(Clock::duration d, std::function<void()> cb) {
    return loop_.after(d, std::move(cb), false);
  }
  bool cancel(EventLoop::TimerId id) noexcept { return loop_.cancel(id); }

  /// Graceful shutdown: stop restarting and accepting, close the listening sockets, hand the
  /// connections accepted but not dealt out yet to a worker, and disconnect every worker (each
  /// drains and exits); run() returns 0 once all have exited. Called again (or with fast), it
  /// sends SIGTERM to every worker at once.
  void shutdown(bool fast = false) {
    bool again = shutting_down();
    if (!again || fast)
      log(LogLevel::info, "shutdown",
          std::string(again || fast ? "fast: SIGTERM to " : "graceful: draining ") +
              std::to_string(table_.size()) + (table_.size() == 1 ? " worker" : " workers"));
    if (!again) {
      systemd_.stopping();
      finish_reload(false, "the master is shutting down");
      upgrader_.fail("the master is shutting down", SIGTERM);
      if constexpr (MasterDispatch<Balance>) {
        stop_accepting();
        dispatch_pending();
      }
      phase_ = detail::shut_down(phase_);
      for (auto& s : table_.slots()) cancel_restart(s);
      for (auto& l : listeners_.shared()) loop_.unwatch(l.get());
      listeners_.close();
      flush_pending();
      for (auto& [id, w] : table_.live()) w->disconnect();
    }
    if (again || fast) {
      for (auto& [id, w] : table_.live()) {
        w->plan_exit();
        w->signal(SIGTERM);
      }
    }
    if (table_.empty()) loop_.stop();
  }
  bool shutting_down() const noexcept { return detail::stopping(phase_); }

  /// Rolling restart: for each worker, fork its replacement into the same slot, and once the
  /// replacement is listening (online, if the cluster does not listen), disconnect the old one.
  /// Options::reload_surge replacements run at once. A replacement that exits or misses
  /// Options::reload_timeout stops the restart; the old workers keep serving. A request while
  /// one runs is coalesced into one more pass after it.
  void reload() {
    if (shutting_down()) return;
    if (reload_.active) {
      reload_.again = true;
      return;
    }
    reload_ = ReloadState{};
    reload_.active = true;
    reload_.started = Clock::now();
    for (auto& [id, w] : table_.live())
      if (!w->planned() && owns_slot(*w))
        reload_.queue.push_back(id);
    systemd_.reloading(reload_.queue.size());
    reload_pump();
  }
  bool reloading() const noexcept { return reload_.active; }

  /// Master upgrade (nginx's binary upgrade, in one step): fork and exec the program on disk,
  /// with the same arguments, as a new master that inherits the listening sockets instead of
  /// binding them. The new master starts its own workers; once every one of them listens it
  /// tells this master, which then shuts down gracefully (on_upgrade_done ok). If the new
  /// master exits first or misses Options::upgrade_timeout, it is killed and this master keeps
  /// serving. One upgrade at a time: false (logged) if one runs, or before run() has bound.
  bool upgrade() {
    if (!upgrader_.upgrade()) return false;
    systemd_.upgrade_started(upgrader_.new_master());
    return true;
  }
  bool upgrading() const noexcept { return upgrader_.waiting(); }
  /// Why the last upgrade() returned false ("" if none did). Master process.
  const std::string& upgrade_refusal() const noexcept { return upgrader_.refusal(); }
  /// In a master started by an upgrade: the pid of the master it replaces; 0 otherwise.
  pid_t upgraded_from() const noexcept { return upgrader_.upgraded_from(); }

  /// Serves the control socket (control.hpp) on `path`, as Options::control does; for a path
  /// known only once the master has bound (hello names it after its port). Call before run().
  /// A new master started by an upgrade serves on the socket the old master hands over, so a
  /// client never finds the path missing, and owns its file only once it serves. Throws
  /// std::system_error: the path is in use by a running master, exists and is not a socket
  /// (it is left alone), or cannot be bound; the control socket listens already.
  void listen_control(const std::string& path) {
    control_.listen(path, upgrader_.take_inherited("control:" + path, -1));
  }

  /// The master and its live workers now, with each worker's counters as it last reported them
  /// (query_status() asks for fresh ones). Reads each worker's resident memory from /proc.
  ClusterStatus status() const {
    ClusterStatus st;
    st.pid = ::getpid();
    st.uptime = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - started_);
    st.addresses = listeners_.addresses();
    st.reloading = reload_.active;
    st.upgrading = upgrader_.waiting();
    st.shutting_down = shutting_down();
    detail::describe_workers(table_, Clock::now(), st);
    return st;
  }

  /// Asks every connected worker for its counters and calls cb(status()) once all have
  /// answered or `timeout` passed (a hung worker shows what it last reported). cb runs on the
  /// master's loop, never from inside this call.
  void query_status(std::function<void(const ClusterStatus&)> cb,
                    Clock::duration timeout = std::chrono::seconds(1)) {
    status_queries_.query(std::move(cb), timeout);
  }

  /// Changes the number of worker slots (Options::workers) while running, as PM2's scale and
  /// gunicorn's TTIN/TTOU do: more forks a worker into each new slot; fewer disconnects the
  /// workers of the highest slots (each drains and exits; none is restarted). Errors:
  /// std::errc::invalid_argument for 0 or more than 4096, std::errc::operation_canceled while
  /// shutting down.
  std::error_code scale(std::size_t n) {
    if (n == 0 || n > 4096) return std::make_error_code(std::errc::invalid_argument);
    if (shutting_down()) return std::make_error_code(std::errc::operation_canceled);
    std::size_t was = table_.slot_count();
    if (n == was) return {};
    log(LogLevel::info, "scale", "from " + std::to_string(was) + " to " + std::to_string(n) +
                                     (n == 1 ? " worker" : " workers"));
    if (n > was) {
      table_.resize_slots(n);
      for (std::size_t slot = was; slot < n; ++slot) {
        if constexpr (requires(Restart& r) { r.reset(slot); }) restart_.reset(slot);
        if (phase_ == detail::Phase::serving) spawn(slot);  // before run(), run() forks them
      }
      return {};
    }
    for (std::size_t slot = n; slot < was; ++slot) cancel_restart(table_.slot(slot));
    table_.resize_slots(n);
    if constexpr (WantsReusePort<Balance>) {
      listeners_.keep_slots(n);  // stop routing to them
    }
    for (auto& [id, w] : table_.live())
      if (w->slot >= n) w->disconnect();
    if constexpr (MasterDispatch<Balance>) dispatch_pending();
    systemd_.ready();
    return {};
  }

  /// Binds, installs the signal handlers, forks the workers and supervises them until
  /// shutdown. Returns 0 after a graceful shutdown. Throws std::system_error for set-up
  /// failures (bind, signalfd); after set-up nothing a worker does ends it. Before it binds:
  /// std::system_error if Options::pid_file is held by a live master ("prefork: pid file X is
  /// held by a running master (pid N)") or cannot be written, or if Options::user/group ask
  /// for another user and this master is not root. Removes the pid file when it returns.
  /// After shutdown(), returns 0 at once without forking (Node's cluster.disconnect() with no
  /// workers calls back at once): what bind() and listen_control() set up is released as at
  /// the end of a run, and the store snapshot, never loaded, is left as it is. An exception
  /// that escapes a master callback (a timer, on_exit, on_message...) is logged and starts a
  /// graceful shutdown; once every worker has exited, run() rethrows it.
  int run() {
    if (shutting_down()) return release(false);
    prepare_to_serve();
    store_.load();
    bind();
    upgrader_.close_inherited();
    if (opts_.handle_signals) {
      loop_.on_signal(SIGTERM, [this](const signalfd_siginfo&) { shutdown(); });
      loop_.on_signal(SIGINT, [this](const signalfd_siginfo&) { shutdown(); });
      loop_.on_signal(SIGUSR2, [this](const signalfd_siginfo&) { reload(); });
      loop_.on_signal(SIGUSR1, [this](const signalfd_siginfo&) { upgrade(); });
      // nginx and gunicorn's conventions: HUP reloads, QUIT stops gracefully (as TERM does
      // here), TTIN and TTOU add and remove a worker.
      loop_.on_signal(SIGHUP, [this](const signalfd_siginfo&) { reload(); });
      loop_.on_signal(SIGQUIT, [this](const signalfd_siginfo&) { shutdown(); });
      loop_.on_signal(SIGTTIN, [this](const signalfd_siginfo&) { scale(table_.slot_count() + 1); });
      loop_.on_signal(SIGTTOU, [this](const signalfd_siginfo&) {
        if (table_.slot_count() > 1) scale(table_.slot_count() - 1);
      });
    }
    phase_ = detail::Phase::serving;
    std::string on;
    for (auto& a : listeners_.addresses()) on += (on.empty() ? " on " : ", ") + a;
    log(LogLevel::info, "serving", "pid " + std::to_string(::getpid()) + ", " +
                                       std::to_string(table_.slot_count()) + " workers" + on);
    for (std::size_t s = 0; s < table_.slot_count(); ++s)
      if (!table_.slot(s).worker_id) spawn(s);
    if constexpr (MasterDispatch<Balance>) resume_accepting();
    start_supervision();
    systemd_.start_watchdog();
    store_.start_sweeping();
    loop_.restart();
    loop_.run();
    return release(true);
  }

 private:
  Record* record(unsigned id) const { return table_.find(id); }
  bool handed_over() const noexcept { return detail::handed_over(phase_); }

  // The end of run(): socket files, the control socket, the store snapshot (if `save`), the
  // pid file. 0, or 1 if the snapshot could not be saved.
  int release(bool save) {
    // After an upgrade the new master serves on the Unix socket files: they stay.
    if (!handed_over()) listeners_.unlink_socket_files();
    control_.release(handed_over());
    // Not after a hand-over: the file is the new master's now (it may have saved it for an
    // upgrade of its own), and this store stopped changing when it was saved for the upgrade.
    bool saved = !save || handed_over() || store_.save();
    // Only now: a master started after this must find the store saved.
    upgrader_.remove_pid_file();
    if (failure_) std::rethrow_exception(std::exchange(failure_, nullptr));
    return saved ? 0 : 1;
  }



  // Node's primary dies of an uncaught exception, and its workers with it. A master whose
  // callback threw may hold half-updated application state, so it does not go on either; but
  // it stops the way SIGTERM does (workers drained and reaped, none left unsupervised), then
  // run() rethrows the first exception for main() to report (README: the deviations from
  // Node). Later ones are logged only.
  void callback_failed(std::exception_ptr e) {
    std::string what = "a non-standard exception";
    try {
      std::rethrow_exception(e);
    } catch (const std::exception& x) {
      what = x.what();
    } catch (...) {
    }
    if (failure_) {
      log(LogLevel::error, "exception", "another exception in a master callback: " + what);
      return;
    }
    failure_ = e;
    log(LogLevel::error, "exception",
        "exception in a master callback: " + what + "; shutting down, run() rethrows it");
    if (!shutting_down()) shutdown();
  }

  // Runs an application callback, if set. An exception from it goes to callback_failed() here,
  // so that it never skips the bookkeeping after the call (the exit of the last worker must
  // still end a shutdown, a slot must still be freed).
  template <class F, class... A>
  void emit(const F& cb, A&&... args) {
    if (!cb) return;
    try {
      cb(std::forward<A>(args)...);
    } catch (...) {
      callback_failed(std::current_exception());
    }
  }

  void log(LogLevel level, std::string_view event, const std::string& msg,
           const Record* w = nullptr) const {
    log_(level, event, msg, w);
  }

  // One line per exit: a crash is a warning, a planned exit (disconnect, kill, shutdown) not.
  void log_exit(const Record& w, const ExitInfo& e) {
    std::string how = e.signal ? "killed by signal " + std::to_string(e.signal)
                               : "exited with code " + std::to_string(e.exit_code);
    bool planned = e.exited_after_disconnect && (e.exit_code == 0 || e.signal);
    log(planned || !e.crashed() ? LogLevel::info : LogLevel::warning, "exit",
        "pid " + std::to_string(w.pid) + " " + how + " after " +
            std::to_string(e.uptime.count()) + " ms" +
            (e.exited_after_disconnect ? " (planned)" : "") +
            (e.reason.empty() ? std::string() : ": " + e.reason),
        &w);
  }

  // The worker is its slot's current one (not a replaced one, nor in a slot scaled away).
  bool owns_slot(const Record& w) const noexcept { return table_.owns_slot(w); }

  static std::string describe(const Record& w) { return detail::MasterLog::describe(w); }

  void cancel_restart(detail::Slot& s) {
    if (s.restart_timer) loop_.cancel(s.restart_timer);
    s.restart_timer = 0;
  }

  // Everything the child must not keep: the master's loop, its listening sockets (a worker is
  // handed them over its channel), and every other worker's channel and pidfd.
  std::vector<int> master_only_fds() const {
    std::vector<int> fds = loop_.own_descriptors();
    listeners_.descriptors(fds);
    for (auto& h : pending_) fds.push_back(h.fd.get());
    for (auto& [fd, p] : peeking_) fds.push_back(fd);
    upgrader_.descriptors(fds);
    control_.descriptors(fds);  // or a child keeps the socket live, and a client's EOF away
    for (auto& [id, w] : table_.live()) {
      for (auto& h : w->in_flight) fds.push_back(h.fd.get());
      if (w->channel && w->channel->is_open()) fds.push_back(w->channel->native_handle());
      if (w->pidfd) fds.push_back(w->pidfd.get());
    }
    return fds;
  }

  Record* spawn(std::size_t slot) {
    detail::Slot& s = table_.slot(slot);
    cancel_restart(s);
    s.errored = false;
    if constexpr (WantsReusePort<Balance>) {
      if (listeners_.bound() && !listeners_.ensure_slot_bound(slot))
        return retry_spawn(slot, "bind failed");
    }
    std::pair<UniqueFd, UniqueFd> pair;
    try {
      pair = make_channel_pair();
    } catch (const std::system_error& e) {
      return retry_spawn(slot, e.what());
    }
    auto& [mine, theirs] = pair;
    unsigned id = table_.next_id();
    detail::WorkerBoot boot{id, slot, theirs.get(),
                            {opts_.max_message_size, opts_.max_queued_bytes}};
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
      env_store.push_back(std::string(detail::kWorkerEnv) + "=" + detail::encode_boot(boot));
      for (auto& e : env_store) envp.push_back(e.data());
      envp.push_back(nullptr);
    }
    std::vector<int> close_in_child = master_only_fds();
    close_in_child.push_back(mine.get());
    pid_t parent = ::getpid();

    pid_t pid;
    {
      detail::SignalBlock block;
      std::fflush(nullptr);  // or the child would write the master's buffered output again
      pid = ::fork();
      if (pid == 0) child(boot, parent, close_in_child, argv, envp);
    }
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
    w.pidfd.reset(detail::pidfd_open(pid));
    if (!w.pidfd) {
      // Without a pidfd we cannot reap this child safely; it is ours, so kill and reap it.
      log(LogLevel::warning, "fork",
          "pidfd_open failed for pid " + std::to_string(pid) + ": " + std::strerror(errno));
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
      return retry_spawn(slot, "pidfd_open failed");
    }
    w.channel = std::make_unique<Channel>(
        loop_, std::move(mine), ChannelLimits{opts_.max_message_size, opts_.max_queued_bytes});
    // Store and request answers count against max_queued_bytes like everything else: a
    // worker that does not read them is not read either until it has (issue 13).
    w.channel->pause_reading_while_full(true);
    w.channel->on_frame([this, &w](Frame&& f) { on_frame(w, std::move(f)); });
    w.link->channel = w.channel.get();
    w.channel->on_close([this, &w](std::error_code ec) { on_channel_closed(w, ec); });
    loop_.watch(w.pidfd.get(), EventLoop::readable, [this, &w](std::uint32_t) { on_pidfd(w); });
    s.worker_id = id;
    if (s.used) ++s.restarts;
    s.used = true;
    w.restarts = s.restarts;
    table_.insert(std::move(owned));
    if (listeners_.bound() && listens() && !shutting_down()) hand_listeners(w);
    log(LogLevel::info, "fork", "pid " + std::to_string(pid) + ", slot " + std::to_string(slot) +
        (s.restarts ? ", restart " + std::to_string(s.restarts) + " of the slot" : std::string()),
        &w);
    emit(on_fork_, w.handle);
    return &w;
  }

  [[noreturn]] void child(const detail::WorkerBoot& boot, pid_t parent,
                          const std::vector<int>& close_fds, std::vector<char*>& argv,
                          std::vector<char*>& envp) noexcept {
    detail::die_with_parent(parent);
    // Its own process group, so that whatever it starts can be stopped with it (on_pidfd).
    ::setpgid(0, 0);
    detail::reset_signals_in_child();
    for (int fd : close_fds) ::close(fd);
    // Options::user: dropped here, before the exec in exec mode, so that no worker code ever
    // runs with the master's privileges (nor does the exec'd binary's start-up).
    if (credentials_.any()) {
      char why[512];
      if (!detail::drop_privileges(credentials_, why, sizeof why)) {
        detail::child_error(why);
        ::_exit(1);
      }
      // prctl(2): the parent-death signal is cleared when the effective ids change. Re-armed,
      // and the parent checked again: it may have died before the re-arm.
      detail::die_with_parent(parent);
    }
    if (opts_.spawn == SpawnMode::exec) {
      if (!detail::keep_across_exec(boot.channel_fd)) {
        detail::child_error("worker: fcntl on the channel failed");
        ::_exit(127);
      }
      ::execve(exec_path_.c_str(), argv.data(), envp.data());
      char msg[256];
      std::snprintf(msg, sizeof msg, "worker: execve %s failed: %s", exec_path_.c_str(),
                    std::strerror(errno));
      detail::child_error(msg);
      ::_exit(127);
    }
    int code = child_main_(boot);
    std::fflush(nullptr);
    ::_exit(code);
  }

  Record* retry_spawn(std::size_t slot, const std::string& why) {
    log(LogLevel::warning, "fork",
        "cannot start a worker for slot " + std::to_string(slot) + ": " + why +
        "; retrying in 1 s");
    detail::Slot& s = table_.slot(slot);
    s.restart_timer = loop_.after(std::chrono::seconds(1), [this, slot] {
      table_.slot(slot).restart_timer = 0;
      if (!shutting_down()) spawn(slot);
    }, false);
    return nullptr;
  }

  // Kernel dispatch: the worker gets its own copies of the listening sockets. Master dispatch:
  // an empty handles frame, which tells the worker to expect connections over the channel.
  void hand_listeners(Record& w) {
    std::vector<UniqueFd> dups;
    const std::vector<UniqueFd>* source = &listeners_.shared();
    if constexpr (WantsReusePort<Balance>) source = &listeners_.for_slot(w.slot);
    if constexpr (KernelDispatch<Balance>) for (auto& l : *source) {
      int d = ::fcntl(l.get(), F_DUPFD_CLOEXEC, 0);
      if (d < 0) {
        log(LogLevel::warning, "bind",
            "dup of a listening socket failed: " + std::string(std::strerror(errno)));
        return;
      }
      dups.emplace_back(d);
    }
    w.channel->send(FrameKind::handles, {}, 0, std::move(dups));
  }

  // "Worker ready" (listening, or started without listeners), fanned out in this order: the
  // reloader first (it disconnects the old worker this one replaces), then an upgrade's old
  // master (told once every slot is ready), then systemd (its STATUS= counts ready workers).
  void worker_ready(Record& w) {
    reload_ready(w);
    upgrader_.tell_old_master_if_ready();
    systemd_.ready();
  }

  void protocol_error(Record& w, std::error_code ec) {
    if (on_error_) {
      emit(on_error_, w.handle, ec);
    } else {
      log(LogLevel::warning, "protocol", describe(w) + ": " + ec.message() + "; killing it", &w);
    }
    if (w.exit.reason.empty()) w.exit.reason = "protocol error: " + ec.message();
    w.signal(SIGKILL);
  }

  void on_frame(Record& w, Frame&& f) {
    w.last_heard = Clock::now();
    switch (f.kind) {
      case FrameKind::user: {
        std::error_code ec;
        auto m = codec_.decode(f.payload, ec);
        if (!m) {
          protocol_error(w, ec ? ec : make_error_code(errc::decode_failed));
          mark_disconnected(w);
          return;
        }
        emit(on_message_, w.handle, *m);
        return;
      }
      case FrameKind::online:
        if (w.state != WorkerState::none) break;
        w.state = WorkerState::online;
        log(LogLevel::info, "online", "pid " + std::to_string(w.pid), &w);
        emit(on_online_, w.handle);
        return;
      case FrameKind::started:
        // Nothing to listen on: a built Server is as ready as the worker gets. (With listen
        // addresses, 'listening' comes later and means the same.)
        if (w.state != WorkerState::online || listens() || w.was_ready()) return;
        w.became_ready();
        worker_ready(w);
        return;
      case FrameKind::listening:
        if (w.state != WorkerState::online) break;
        w.state = WorkerState::listening;
        w.became_ready();
        if constexpr (requires(Restart& r) { r.on_listening(std::size_t{}); })
          restart_.on_listening(w.slot);
        log(LogLevel::info, "listening", "pid " + std::to_string(w.pid), &w);
        emit(on_listening_, w.handle);
        if constexpr (MasterDispatch<Balance>) resume_accepting();
        worker_ready(w);
        return;
      case FrameKind::disconnect:
        // The worker is draining on its own initiative (Node: worker.disconnect() in a worker).
        w.plan_exit();
        w.arm_escalation();
        return;
      case FrameKind::stats:
        w.reported_connections = static_cast<std::size_t>(f.tag);
        detail::decode_counters(f.payload, w.counters);
        return status_queries_.answered(w.id);
      case FrameKind::accepted: {
        std::size_t n = std::min<std::size_t>(static_cast<std::size_t>(f.tag), w.in_flight.size());
        w.in_flight.erase(w.in_flight.begin(), w.in_flight.begin() + static_cast<std::ptrdiff_t>(n));
        w.unacked_since = Clock::now();  // its loop turns: the rest count from now
        if (n > 0 && w.out_of_fds) {
          w.out_of_fds = false;
          log(LogLevel::info, "dispatch", "takes connections again", &w);
        }
        if constexpr (MasterDispatch<Balance>) resume_accepting();
        return;
      }
      case FrameKind::declined:
        if constexpr (MasterDispatch<Balance>) declined(w, static_cast<std::size_t>(f.tag));
        return;
      case FrameKind::request:
        detail::answer(w.link, codec_, f, static_cast<bool>(on_request_),
                       [this, &w](const message_type& m, Reply<Codec> r) {
                         on_request_(w.handle, m, std::move(r));
                       });
        return;
      case FrameKind::reply: return w.outgoing.on_reply(f.tag, f.payload);
      case FrameKind::failure: return w.outgoing.on_failure(f.tag, f.payload);
      case FrameKind::store: return store_.serve(w, f);
      case FrameKind::heartbeat: return;
      case FrameKind::retire:
        recycle(w, f.payload.empty() ? std::string("the worker asked for it")
                                     : f.payload.substr(0, 200));
        return;
      case FrameKind::bind:
        // A session key for this worker's slot; a policy that routes by key keeps it, any
        // other ignores it, so a Server may bind whatever the cluster balances with.
        if constexpr (BindsKeys<Balance>) balance_.bind(std::string_view(f.payload), w.slot);
        return;
      default: break;
    }
    protocol_error(w, make_error_code(errc::malformed_frame));
    mark_disconnected(w);
  }

  // What must stop a master before it binds (run() and bind() call it; it runs once): workers
  // it could not switch to Options::user, or a pid file a live master holds.
  void prepare_to_serve() {
    if (prepared_) return;
    credentials_ = detail::check_credentials(std::move(credentials_));
    upgrader_.take_pid_file();
    if (!opts_.control.empty()) listen_control(opts_.control);
    prepared_ = true;
  }

  void on_channel_closed(Record& w, std::error_code ec) {
    if (ec != errc::channel_closed) protocol_error(w, ec);
    // A worker that closed its channel but keeps running is unsupervisable: give it the drain
    // deadline to exit, then escalate, as for a disconnect.
    w.arm_escalation();
    mark_disconnected(w);
  }

  void mark_disconnected(Record& w) {
    if (w.gone()) return;
    status_queries_.answered(w.id);  // it never will
    if (w.channel) w.channel->close();
    w.link->channel = nullptr;
    w.became_disconnected();
    recover_in_flight(w);
    w.outgoing.fail_all(make_error_code(errc::peer_gone));
    log(LogLevel::info, "disconnect", "pid " + std::to_string(w.pid), &w);
    emit(on_disconnect_, w.handle);
  }

  // Connections handed to a worker that never acknowledged them (its channel closed with the
  // frames unread) are still open in the master: they go to another worker, first in line.
  void recover_in_flight(Record& w) {
    if (w.in_flight.empty()) return;
    pending_.insert(pending_.begin(), std::make_move_iterator(w.in_flight.begin()),
                    std::make_move_iterator(w.in_flight.end()));
    w.in_flight.clear();
    if constexpr (MasterDispatch<Balance>) loop_.post([this] { resume_accepting(); });
  }

  void on_pidfd(Record& w) {
    // The worker has exited but is not reaped yet, so its pid (its process group's id) cannot
    // have been reused: what is left of its group is its own children, stopped with it.
    ::kill(-w.pid, SIGKILL);
    detail::Reaped r = detail::reap(w.pidfd.get());
    if (!r.done) return;
    loop_.unwatch(w.pidfd.get());
    w.pidfd.reset();  // or a worker forked from an exit callback would inherit it
    // Deliver what the worker sent before it died, then 'disconnect' before 'exit' (Node).
    if (w.channel && w.channel->is_open()) w.channel->read_all_pending();
    mark_disconnected(w);
    w.cancel_timers();
    w.became_dead();
    w.exit.exit_code = r.exit_code;
    w.exit.signal = r.signal;
    w.exit.served = w.counters.connections_total > 0 || w.counters.requests > 0;
    w.exit.uptime =
        std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - w.started);

    // Removed from the live list before 'exit' is emitted, as Node does; destroyed after.
    std::unique_ptr<Record> owned = table_.extract(w.id);
    ExitInfo info = w.exit;
    log_exit(w, info);
    emit(on_exit_, w.handle, info);
    after_exit(w, info);
    if (shutting_down() && table_.empty()) loop_.stop();
  }

  void after_exit(Record& w, const ExitInfo& info) {
    reload_exited(w, info);
    if (!owns_slot(w)) return;  // replaced already (rolling restart), or its slot scaled away
    detail::Slot& s = table_.slot(w.slot);
    s.worker_id = 0;
    if (shutting_down()) return;
    RestartDecision d = restart_.on_exit(w.slot, info);
    using A = RestartDecision::Action;
    if constexpr (WantsReusePort<Balance>) {
      if (d.action != A::restart)
        listeners_.close_slot(w.slot);  // nobody will accept there: stop the kernel routing to it
    }
    if (d.action == A::give_up) {
      s.errored = true;
      log(LogLevel::error, "errored",
          "slot " + std::to_string(w.slot) + " is errored: its workers keep exiting (last: " +
          describe(w) + ")", &w);
      emit(on_errored_, w.slot, info);
    } else if (d.action == A::restart) {
      std::size_t slot = w.slot;
      if (d.delay.count() <= 0) {
        spawn(slot);
      } else {
        s.restart_timer = loop_.after(d.delay, [this, slot] {
          table_.slot(slot).restart_timer = 0;
          if (!shutting_down()) spawn(slot);
        }, false);
      }
    }
  }

  // Master dispatch (Node's round_robin_handle.js): accept here, hand each connection to the
  // worker the policy picks, and keep the master's own copy of the socket until the worker
  // acknowledges it (FrameKind::accepted): if the worker dies first, the connection goes to
  // another one instead of being lost. A worker with max_unacked connections unacknowledged
  // is busy or stuck and is skipped. With no worker to take one, the master stops accepting:
  // clients wait in the kernel backlog instead of being refused (Node closes the socket), and
  // accepting resumes when a worker listens or acknowledges again.
  //
  // A worker whose loop has stopped (a hang, a long blocking call) reads no more frames: the
  // connections dealt to it wait in its channel until the watchdog ends it, and with the
  // window alone it would be dealt one in every N for that long. A healthy worker acknowledges
  // within its loop round (well under a millisecond idle; a round of hello's default work on
  // a busy worker is tens of ms), so one that has left a connection unacknowledged for
  // kAckBound is dealt no more until it acknowledges: a hung worker costs the one connection
  // it holds (Node's round_robin_handle.js deals a worker its next handle only after the last
  // was acknowledged, and a hung Node worker costs the same one). A slow worker comes back at
  // its next acknowledgement; meanwhile its share goes to the others, or waits in the backlog.
  static constexpr std::size_t kMaxUnacked = 128;
  static constexpr std::chrono::milliseconds kAckBound{100};

  static bool window_open(const Record& w, Clock::time_point now) {
    if (now < w.declined_until) return false;
    return w.in_flight.empty() ||
           (w.in_flight.size() < kMaxUnacked && now - w.unacked_since < kAckBound);
  }

  // The worker could not take its next `n` connections: it is at its descriptor limit (the
  // kernel dropped the descriptor on the way in). They are still open here and go back first
  // in line, to another worker or to this one once it has room: it is offered none for
  // kSaturatedPause (nginx pauses accept for accept_mutex_delay on EMFILE, libuv's
  // uv__emfile_trick closes what it cannot serve; here nothing is lost), then again. Clients
  // meanwhile wait in pending_ or in the kernel backlog. One log line per episode: the first
  // decline after the worker last took a connection.
  static constexpr std::chrono::milliseconds kSaturatedPause{100};

  void declined(Record& w, std::size_t n) {
    n = std::min(n, w.in_flight.size());
    pending_.insert(pending_.begin(), std::make_move_iterator(w.in_flight.begin()),
                    std::make_move_iterator(w.in_flight.begin() + static_cast<std::ptrdiff_t>(n)));
    w.in_flight.erase(w.in_flight.begin(), w.in_flight.begin() + static_cast<std::ptrdiff_t>(n));
    w.unacked_since = Clock::now();
    w.declined_until = w.unacked_since + kSaturatedPause;
    if (!w.out_of_fds)
      log(LogLevel::warning, "dispatch",
          "pid " + std::to_string(w.pid) + " is out of descriptors (EMFILE) and declines "
          "connections; they wait for a worker with room",
          &w);
    w.out_of_fds = true;
    stop_accepting();
    loop_.after(kSaturatedPause, [this] { resume_accepting(); }, false);
    resume_accepting();
  }

  void resume_accepting() {
    if (shutting_down()) return flush_pending();
    if (accept_paused_) return;
    dispatch_pending();
    if (!pending_.empty()) return;
    for (auto& l : listeners_.shared()) {
      int raw = l.get();
      if (!loop_.watching(raw))
        loop_.watch(raw, EventLoop::readable, [this, raw](std::uint32_t) { accept_from(raw); },
                    false);
    }
  }

  void stop_accepting() {
    for (auto& l : listeners_.shared()) loop_.unwatch(l.get());
  }

  void collect_ready() {
    ready_.clear();
    ready_workers_.clear();
    const Clock::time_point now = Clock::now();
    for (auto& [id, w] : table_.live()) {
      if (w->takes_connections() && window_open(*w, now)) {
        ready_.push_back({w->slot, w->reported_connections + w->in_flight.size()});
        ready_workers_.push_back(w.get());
      }
    }
  }

  // Sends one connection to `w` and keeps the master's copy in its in-flight list; false (the
  // connection still in `h`) if its channel cannot take it now.
  bool hand_to(Record& w, detail::Handoff& h) {
    if (!w.channel->has_room(h.peer.length)) return false;
    std::string address(reinterpret_cast<const char*>(&h.peer.storage), h.peer.length);
    if (w.channel->send_borrowed(FrameKind::connection, std::move(address), 0, h.fd.get()))
      return false;
    if (w.in_flight.empty()) w.unacked_since = Clock::now();
    w.in_flight.push_back(std::move(h));
    return true;
  }

  // Hands one connection to a worker; false (and the connection back in `h`) if none can
  // take it now. A peeking policy sees `head` if the caller has just peeked it, else what
  // the socket holds now.
  bool dispatch(detail::Handoff& h, const std::string_view* head = nullptr) {
    if (ready_.empty()) return false;
    std::string_view bytes;
    if constexpr (PeeksFirstBytes<Balance>) {
      bool closed = false;
      bytes = head ? *head : peek_head(h.fd.get(), closed);
    }
    std::optional<std::size_t> pick =
        balance_.pick(PickContext{h.peer, ready_, table_.slot_count(), bytes});
    std::size_t first = pick && *pick < ready_.size() ? *pick : 0;
    for (std::size_t k = 0; k < ready_workers_.size(); ++k) {
      std::size_t i = (first + k) % ready_workers_.size();
      Record* w = ready_workers_[i];
      if (w->in_flight.size() >= kMaxUnacked || !hand_to(*w, h)) continue;
      ++ready_[i].connections;
      return true;
    }
    return false;
  }

  void dispatch_pending() {
    if (pending_.empty()) return;
    collect_ready();
    while (!pending_.empty() && dispatch(pending_.front())) pending_.pop_front();
  }

  // Shutting down: connections already accepted go to any worker that still reads its channel
  // (a draining worker serves what reaches it before the disconnect frame), whatever its load.
  // Those still waiting for their first bytes go with what they sent so far.
  void flush_pending() {
    if constexpr (PeeksFirstBytes<Balance>) stop_peeking();
    while (!pending_.empty()) {
      detail::Handoff& h = pending_.front();
      bool sent = false;
      for (auto& [id, w] : table_.live())
        if (w->accepts_handoffs() && hand_to(*w, h)) {
          sent = true;
          break;
        }
      if (!sent) break;
      pending_.pop_front();
    }
    if (!pending_.empty())
      log(LogLevel::warning, "shutdown", std::to_string(pending_.size()) +
          " accepted connections closed unanswered: no worker is left to take them");
    pending_.clear();
  }

  // PeeksFirstBytes: the policy picks on the client's first bytes, peeked (MSG_PEEK) so that
  // the worker still reads every byte. A client whose bytes are not all there at accept is
  // watched, edge-triggered: the bytes stay queued (never consumed), so a level-triggered
  // watch would fire on every loop round until the deadline. It waits until the policy has
  // enough, PeekLimits::max_bytes came, or PeekLimits::timeout passed; then it is dispatched
  // as if just accepted. At most PeekLimits::max_waiting wait at once (more are dispatched on
  // what they sent), so silent clients can neither stall the master nor pile up in it; they
  // are the workers' to time out.

  // Peeks into peek_buf_. Empty if nothing came yet; `closed` if the client closed without
  // sending anything, or the socket failed (ECONNRESET).
  std::string_view peek_head(int fd, bool& closed) {
    closed = false;
    std::size_t max = balance_.peek_limits().max_bytes;
    if (max == 0) return {};
    if (peek_buf_.size() < max) peek_buf_.resize(max);
    ssize_t n;
    do {
      n = ::recv(fd, peek_buf_.data(), max, MSG_PEEK | MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    if (n > 0) return {peek_buf_.data(), static_cast<std::size_t>(n)};
    closed = n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK);
    return {};
  }

  // True if `h` was taken: it waits for more bytes, or it was closed. Otherwise `head` holds
  // what the client sent so far and the connection is to be dispatched now.
  bool wait_for_head(detail::Handoff& h, std::string_view& head) {
    const PeekLimits limits = balance_.peek_limits();
    bool closed = false;
    head = peek_head(h.fd.get(), closed);
    if (closed) {
      h.fd.reset();
      return true;
    }
    if (head.size() >= limits.max_bytes || balance_.has_enough(head) ||
        limits.timeout.count() <= 0 || peeking_.size() >= limits.max_waiting)
      return false;
    const int raw = h.fd.get();
    EventLoop::TimerId deadline =
        loop_.after(limits.timeout, [this, raw] { head_arrived(raw, 0, true); }, false);
    try {
      loop_.watch(raw, EPOLLIN | EPOLLRDHUP | EPOLLET,
                  [this, raw](std::uint32_t events) { head_arrived(raw, events, false); },
                  false);
    } catch (const std::system_error& e) {  // epoll_ctl: ENOMEM, ENOSPC (max_user_watches)
      loop_.cancel(deadline);
      log(LogLevel::warning, "accept",
          std::string("cannot wait for a client's first bytes: ") + e.what());
      return false;
    }
    peeking_.emplace(raw, Peeking{std::move(h), deadline});
    return true;
  }

  // More bytes came for a waiting client, or it shut down its side (no more will come), or
  // its deadline passed.
  void head_arrived(int fd, std::uint32_t events, bool deadline) {
    auto it = peeking_.find(fd);
    if (it == peeking_.end()) return;
    bool closed = false;
    std::string_view head = peek_head(fd, closed);
    bool over = deadline || (events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR));
    if (!closed && !over && head.size() < balance_.peek_limits().max_bytes &&
        !balance_.has_enough(head))
      return;
    detail::Handoff h = std::move(it->second.h);
    if (!deadline) loop_.cancel(it->second.deadline);
    loop_.unwatch(fd);
    peeking_.erase(it);
    if (closed) return;  // h closes it
    collect_ready();
    if (pending_.empty() && dispatch(h, &head)) return;
    pending_.push_back(std::move(h));
    stop_accepting();
  }

  // Shutting down: every waiting client is dispatched now, by key if it sent one and its
  // worker still takes connections, else with the pending ones.
  void stop_peeking() {
    if (peeking_.empty()) return;
    collect_ready();
    for (auto& [fd, p] : peeking_) {
      loop_.cancel(p.deadline);
      loop_.unwatch(fd);
      if (!dispatch(p.h)) pending_.push_back(std::move(p.h));
    }
    peeking_.clear();
  }

  void accept_from(int listener) {
    collect_ready();
    for (int i = 0; i < 64; ++i) {
      if (ready_.empty()) return stop_accepting();
      detail::Handoff h;
      h.peer.length = sizeof h.peer.storage;
      int fd = ::accept4(listener, h.peer.get(), &h.peer.length, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) return;
        if (errno == EINTR || errno == ECONNABORTED || errno == EPROTO || errno == EPERM) continue;
        // EMFILE, ENFILE, ENOBUFS, ENOMEM: the socket stays readable, so pause rather than spin.
        // Logged once per episode, not once per pause: at the descriptor limit one accept may
        // succeed after each pause (a worker's acknowledgement freed a descriptor) and fail
        // again, so the episode ends after a second without a failure.
        const Clock::time_point now = Clock::now();
        if (now - accept_failed_at_ > std::chrono::seconds(1))
          log(LogLevel::warning, "accept",
              std::string("accept: ") + std::strerror(errno) +
                  "; pausing accept for 100 ms at a time while it fails");
        accept_failed_at_ = now;
        stop_accepting();
        accept_paused_ = true;
        loop_.after(std::chrono::milliseconds(100), [this] {
          accept_paused_ = false;
          resume_accepting();
        }, false);
        return;
      }
      h.fd.reset(fd);
      if constexpr (PeeksFirstBytes<Balance>) {
        std::string_view head;
        if (wait_for_head(h, head)) continue;
        if (dispatch(h, &head)) continue;
        pending_.push_back(std::move(h));
        return stop_accepting();
      }
      if (!dispatch(h)) {
        pending_.push_back(std::move(h));
        return stop_accepting();
      }
    }
  }

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
      Record* old = record(old_id);
      if (!old || old->leaving()) continue;
      std::size_t slot = old->slot;
      Record* fresh = spawn(slot);
      if (!fresh) {
        cancel_restart(table_.slot(slot));
        table_.slot(slot).worker_id = old_id;
        return finish_reload(false, "could not fork a replacement for " + describe(*old));
      }
      unsigned fresh_id = fresh->id;
      reload_.starting[fresh_id] = old_id;
      reload_.deadlines[fresh_id] = loop_.after(opts_.reload_timeout, [this, fresh_id] {
        reload_.deadlines.erase(fresh_id);
        Record* late = record(fresh_id);
        std::string why = "not ready after " + std::to_string(opts_.reload_timeout.count()) +
                          " ms (reload_timeout)";
        if (late) late->exit.reason = "rolling restart: " + why + "; SIGKILL";
        finish_reload(false, "replacement " +
                                 (late ? describe(*late) : "worker " + std::to_string(fresh_id)) +
                                 " " + why);
      }, false);
    }
    if (reload_.active && reload_.queue.empty() && reload_.starting.empty() &&
        reload_.draining.empty())
      finish_reload(true, {});
  }

  // A worker became ready (listening, or online without listeners).
  void reload_ready(Record& w) {
    if (!reload_.active) return;
    auto it = reload_.starting.find(w.id);
    if (it == reload_.starting.end()) return;
    unsigned old_id = it->second;
    reload_.starting.erase(it);
    if (auto t = reload_.deadlines.find(w.id); t != reload_.deadlines.end()) {
      loop_.cancel(t->second);
      reload_.deadlines.erase(t);
    }
    if (Record* old = record(old_id)) {
      if (!old->recycle_reason.empty()) old->exit.reason = "recycled: " + old->recycle_reason;
      old->disconnect();
      reload_.draining.push_back(old_id);
    }
    ++reload_.replaced;
    reload_pump();
  }

  void reload_exited(Record& w, const ExitInfo& info) {
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
      return finish_reload(false, "replacement " + describe(w) + " " + how + " before it was ready");
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
  void finish_reload(bool ok, const std::string& reason) {
    if (!reload_.active) return;
    ReloadState r = std::move(reload_);
    reload_ = ReloadState{};
    for (auto& [id, timer] : r.deadlines) loop_.cancel(timer);
    for (auto& [fresh_id, old_id] : r.starting) {
      Record* fresh = record(fresh_id);
      Record* old = record(old_id);
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
      log(LogLevel::info, r.requested ? "reload" : "recycle",
          std::string(what) + " done: " + std::to_string(r.replaced) + " workers replaced in " +
          std::to_string(report.took.count()) + " ms");
    } else {
      log(LogLevel::warning, r.requested ? "reload" : "recycle",
          std::string(what) + " stopped: " + reason + "; the old workers keep serving");
    }
    if (r.requested) systemd_.reloaded(report);
    // A reload asked for during a recycling pass runs whatever became of that pass.
    bool again = r.again && (ok || !r.requested) && !shutting_down();
    if (r.requested || again || shutting_down()) control_.reload_ended(report, again);
    if (r.requested && on_reload_done_) on_reload_done_(report);
    if (again) reload();
  }

  // Recycling: one worker replaced the way a rolling restart replaces it (replacement first,
  // drain after), through the same machinery, one at a time: a recycling pass of its own, or
  // one more worker in the pass that runs.
  void recycle(Record& w, const std::string& why) {
    if (shutting_down() || w.leaving() || w.recycling())
      return;
    w.recycle_reason = why;
    log(LogLevel::info, "recycle", "recycling " + describe(w) + ": " + why, &w);
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

  // The watchdog's verdict: no new connections (collect_ready skips it), a replacement in its
  // slot now, and SIGTERM, then SIGKILL. Not a planned exit: ExitInfo says why.
  void hung(Record& w, Clock::duration silent) {
    w.condemn();
    auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(silent).count();
    w.exit.reason = "watchdog: no heartbeat for " + std::to_string(ms) + " ms (watchdog_timeout " +
                     std::to_string(opts_.watchdog_timeout.count()) + " ms)";
    log(LogLevel::warning, "hung",
        describe(w) + " is hung (" + w.exit.reason + "); replacing it and sending SIGTERM", &w);
    if (owns_slot(w) && !shutting_down()) spawn(w.slot);
    w.terminate();
  }

  // The periodic check behind the watchdog, start_timeout, max_lifetime and max_rss.
  void start_supervision() {
    using std::chrono::milliseconds;
    milliseconds tick{1000};
    for (milliseconds limit : {opts_.watchdog_timeout, opts_.start_timeout, opts_.max_lifetime})
      if (limit.count() > 0) tick = std::min(tick, std::max(milliseconds(10), limit / 4));
    if (opts_.watchdog_timeout.count() <= 0 && opts_.start_timeout.count() <= 0 &&
        opts_.max_lifetime.count() <= 0 && opts_.max_rss == 0)
      return;
    loop_.every(tick, [this] { supervise(); }, false);
  }

  void supervise() {
    if (shutting_down()) return;
    auto now = Clock::now();
    std::vector<Record*> all = table_.records();  // hung() and recycle() may fork into the table
    for (Record* w : all) {
      if (!w->supervised()) continue;
      if (!w->was_ready()) {
        if (opts_.start_timeout.count() > 0 && now - w->started > opts_.start_timeout)
          start_timed_out(*w);
        continue;
      }
      if (opts_.watchdog_timeout.count() > 0 && now - w->last_heard > opts_.watchdog_timeout) {
        if (read_pending(*w) && Clock::now() - w->last_heard > opts_.watchdog_timeout)
          hung(*w, Clock::now() - w->last_heard);
        continue;
      }
      if (w->lifetime.count() > 0 && now - w->started > w->lifetime) {
        recycle(*w, "max_lifetime " + std::to_string(opts_.max_lifetime.count()) + " ms reached");
        continue;
      }
      if (opts_.max_rss > 0) {
        std::size_t rss = detail::resident_bytes(w->pid);
        if (rss > opts_.max_rss)
          recycle(*w, "resident memory " + std::to_string(rss >> 20) + " MiB above max_rss " +
                          std::to_string(opts_.max_rss >> 20) + " MiB");
      }
    }
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
                     std::string(listens() ? "listening" : "started") + " after " +
                     std::to_string(opts_.start_timeout.count()) + " ms";
    log(LogLevel::warning, "start-timeout", describe(w) + ": " + w.exit.reason + "; SIGKILL", &w);
    w.signal(SIGKILL);
  }

  std::uint64_t jitter(std::uint64_t max) {
    if (max == 0) return 0;
    return std::uniform_int_distribution<std::uint64_t>(0, max)(rng_);
  }

  // This environment minus the variables that tell a process it is a worker or a new master.
  static std::vector<std::string> environment_without_markers() {
    std::vector<std::string> env;
    std::string worker = std::string(detail::kWorkerEnv) + "=";
    std::string upgrade = std::string(detail::kUpgradeEnv) + "=";
    for (char** e = environ; e && *e; ++e) {
      std::string_view v(*e);
      if (!v.starts_with(worker) && !v.starts_with(upgrade)) env.emplace_back(v);
    }
    return env;
  }

  // Workers get listening sockets: bound, or before bind() whether it will bind any.
  bool listens() const noexcept { return listeners_.listens(); }

  std::vector<std::string> upgrade_environment() const {
    std::vector<std::string> env = environment_without_markers();
    for (auto& e : systemd_.environment()) env.push_back(e);
    return env;
  }

  // The upgrader's calls into the master (the wiring).
  detail::UpgraderHooks upgrader_hooks() {
    detail::UpgraderHooks h;
    h.bound = [this] { return listeners_.bound(); };
    h.sockets = [this] {
      std::vector<detail::InheritedSocket> sockets = listeners_.handover();
      if (control_.native_handle() >= 0)
        sockets.push_back({control_.native_handle(), -1, control_.spec()});
      return sockets;
    };
    h.hold_store = [this] {
      if (!store_.save()) return false;
      store_.hold();
      return true;
    };
    h.release_store = [this](bool handed_over) { store_.release(handed_over); };
    h.master_only_fds = [this] { return master_only_fds(); };
    h.environment = [this] { return upgrade_environment(); };
    h.took_over = [this] { control_.own_socket_file(); };
    h.handed_over = [this] {
      phase_ = detail::Phase::handed_over;
      store_.release(true);
      systemd_.handed_over_to(upgrader_.new_master());
    };
    h.ended = [this](const UpgradeReport& report) { upgrade_ended(report); };
    return h;
  }

  // An upgrade ended (old master): ok, the new master serves and this one shuts down; not ok,
  // this one keeps serving.
  void upgrade_ended(const UpgradeReport& report) {
    if (!report.ok) systemd_.upgrade_failed();
    control_.upgrade_ended(report);
    if (report.ok) control_.stop_listening();  // new clients reach the new master
    emit(on_upgrade_done_, report);
    if (report.ok) shutdown();
  }

  Options opts_;
  detail::MasterLog log_{opts_};
  detail::Phase phase_ = detail::Phase::starting;
  [[no_unique_address]] Restart restart_;
  [[no_unique_address]] Codec codec_;
  [[no_unique_address]] Balance balance_;
  ChildMain child_main_;
  std::vector<std::string> exec_argv_;
  std::string exec_path_;
  bool prepared_ = false;     // prepare_to_serve() ran
  detail::Credentials credentials_;  // Options::user/group, resolved; what workers switch to
  EventLoop loop_;
  detail::WorkerTable<Codec> table_;
  bool accept_paused_ = false;
  Clock::time_point accept_failed_at_{};  // the last EMFILE (ENFILE...) from accept
  std::vector<WorkerLoad> ready_;        // workers taking connections (scratch, reused)
  std::vector<Record*> ready_workers_;  // the same, as records
  std::deque<detail::Handoff> pending_;  // accepted, not handed to any worker yet
  struct Peeking {
    detail::Handoff h;
    EventLoop::TimerId deadline = 0;
  };
  std::map<int, Peeking> peeking_;  // PeeksFirstBytes: accepted, waiting for the first bytes
  std::string peek_buf_;            // PeeksFirstBytes: scratch for MSG_PEEK
  ReloadState reload_;
  Clock::time_point started_ = Clock::now();
  std::exception_ptr failure_;  // the first exception a callback let escape: run() rethrows it
  std::mt19937_64 rng_{std::random_device{}()};

  std::function<void(WorkerT&)> on_fork_, on_online_, on_listening_, on_disconnect_;
  std::function<void(WorkerT&, const ExitInfo&)> on_exit_;
  std::function<void(WorkerT&, const message_type&)> on_message_;
  std::function<void(WorkerT&, std::error_code)> on_error_;
  std::function<void(WorkerT&, const message_type&, Reply<Codec>)> on_request_;
  std::function<void(std::size_t, const ExitInfo&)> on_errored_;
  std::function<void(const ReloadReport&)> on_reload_done_;
  std::function<void(const UpgradeReport&)> on_upgrade_done_;

  // Outward-facing parts ("outer"): status queries, the systemd reporter, the control
  // service, the store service, the upgrader and the listening sockets.
  detail::StatusQueries<Codec> status_queries_{loop_, table_, {[this] { return status(); }}};
  detail::SystemdReporter<Codec> systemd_{
      loop_, table_, phase_,
      {[this] { return listens(); },
       [this]() -> const std::vector<std::string>& { return listeners_.addresses(); },
       [this] { return reload_.active; }, [this] { return upgrader_.started_by_upgrade(); }}};
  detail::ControlService<Master> control_{*this, loop_, log_};  // Options::control
  detail::StoreService<Codec> store_{loop_, opts_, table_, log_,
                                     {[this] { return upgrader_.new_master(); }}};
  detail::Upgrader<Codec> upgrader_{loop_, opts_, table_, log_, phase_, upgrader_hooks()};
  detail::Listeners<Codec, Balance> listeners_{opts_, table_, log_, upgrader_};
};

}  // namespace prefork

#endif  // PREFORK_MASTER_HPP
