// The master role (Node's lib/internal/cluster/primary.js): binds the listening sockets, forks
// or execs the workers, reaps them through pidfds, walks them through Node's lifecycle events,
// restarts them per the RestartPolicy, and runs rolling restarts and graceful shutdown.
#ifndef PREFORK_MASTER_HPP
#define PREFORK_MASTER_HPP

#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstddef>
#include <exception>
#include <functional>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include <prefork/version.hpp>
#include <prefork/balance/policy.hpp>
#include <prefork/channel.hpp>
#include <prefork/clock.hpp>
#include <prefork/codec.hpp>
#include <prefork/detail/boot.hpp>
#include <prefork/detail/privileges.hpp>
#include <prefork/detail/systemd.hpp>
#include <prefork/detail/upgrade.hpp>
#include <prefork/error.hpp>
#include <prefork/event_loop.hpp>
#include <prefork/log.hpp>
#include <prefork/options.hpp>
#include <prefork/status.hpp>
#include <prefork/store/concept.hpp>
#include <prefork/store/memory_store.hpp>
#include <prefork/worker_handle.hpp>
#include <prefork/master/control_service.hpp>
#include <prefork/master/events.hpp>
#include <prefork/master/listeners.hpp>
#include <prefork/master/log.hpp>
#include <prefork/master/options_check.hpp>
#include <prefork/master/phase.hpp>
#include <prefork/master/reloader.hpp>
#include <prefork/master/round_robin_handle.hpp>
#include <prefork/master/shared_handle.hpp>
#include <prefork/master/signals.hpp>
#include <prefork/master/spawner.hpp>
#include <prefork/master/status_queries.hpp>
#include <prefork/master/store_service.hpp>
#include <prefork/master/supervisor.hpp>
#include <prefork/master/systemd_reporter.hpp>
#include <prefork/master/upgrader.hpp>
#include <prefork/master/watchdog.hpp>
#include <prefork/master/worker_record.hpp>
#include <prefork/master/worker_table.hpp>

namespace prefork {

/// The master: every member runs in the master process, on the thread that calls run().
/// fork mode requires that thread to be the only one in the process when a worker is forked.
/// The application's callbacks (on_fork, on_exit, on_message...) are in master/events.hpp.
template <class Balance, class Restart, MessageCodec Codec>
class Master : public detail::MasterEvents<Codec> {
 public:
  using WorkerT = Worker<Codec>;
  using Record = detail::WorkerRecord<Codec>;
  using message_type = typename Codec::message_type;
  /// What a forked child runs (fork mode); returns the worker's exit status.
  using ChildMain = std::function<int(const detail::WorkerBoot&)>;

  /// Throws std::invalid_argument for bad options.
  Master(Options opts, Restart restart, ChildMain child_main)
      : opts_(std::move(opts)),
        restart_(std::move(restart)),
        spawner_(loop_, opts_, table_, log_, phase_, credentials_, std::move(child_main)) {
    detail::validate(opts_);
    spawner_.set_up_exec();
    upgrader_.start();
    if (opts_.systemd) {
      listeners_.take_activated();
      systemd_.use(detail::Notifier::take_from_environment());
    }
    table_.resize_slots(opts_.workers);
    credentials_ = detail::resolve_credentials(opts_.user, opts_.group);
    store_.use(MemoryStore<>(opts_.store_limits));
    loop_.on_exception([this](std::exception_ptr e) { this->callback_failed(e); });
    wire();
  }
  Master(const Master&) = delete;
  Master& operator=(const Master&) = delete;

  /// Replaces the shared store's backend (MemoryStore by default) with any Store, before
  /// run(); returns it, for the master's own synchronous use. Snapshots (store_snapshot) need
  /// its save(path)/load(path); expired keys are swept if it has sweep(n).
  template <Store S>
  S& use_store(S store) {
    return store_.use(std::move(store));
  }
  EventLoop& loop() noexcept { return loop_; }
  const Options& options() const noexcept { return opts_; }
  Restart& restart_policy() noexcept { return restart_; }

  /// Binds every listen address (idempotent). Throws std::system_error naming the address
  /// ("prefork: bind 127.0.0.1:8080: Address already in use"); nothing stays bound then.
  /// Before binding, as run() does: takes Options::pid_file and checks Options::user.
  /// Socket activation (Options::systemd): the .socket unit decides what the service listens
  /// on, and nothing is bound (README, Running under systemd).
  void bind() {
    if (listeners_.bound()) return;
    prepare_to_serve();
    listeners_.bind();
  }

  /// The bound addresses, with the ports the kernel chose for port 0. Empty before bind().
  const std::vector<std::string>& addresses() const noexcept { return listeners_.addresses(); }

  /// The worker slots wanted (Options::workers, then as scale() set it).
  std::size_t workers_wanted() const noexcept { return table_.slot_count(); }
  /// Live workers (not yet exited), in id order.
  std::vector<WorkerT*> workers() const { return table_.handles(); }
  WorkerT* worker(unsigned id) const {
    Record* r = table_.find(id);
    return r ? &r->handle : nullptr;
  }

  /// Adds a slot and forks a worker into it (Node's cluster.fork()). Returns nullptr if fork
  /// failed (logged; retried from a timer) or the master is shutting down.
  WorkerT* fork() {
    if (shutting_down()) return nullptr;
    Record* r = spawner_.spawn(table_.add_slot());
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
      log_(LogLevel::info, "shutdown",
          std::string(again || fast ? "fast: SIGTERM to " : "graceful: draining ") +
              std::to_string(table_.size()) + (table_.size() == 1 ? " worker" : " workers"));
    if (!again) {
      systemd_.stopping();
      reloader_.finish(false, "the master is shutting down");
      upgrader_.fail("the master is shutting down", SIGTERM);
      dispatch_.stop();
      phase_ = detail::shut_down(phase_);
      for (auto& s : table_.slots()) spawner_.cancel_restart(s);
      for (auto& l : listeners_.shared()) loop_.unwatch(l.get());
      listeners_.close();
      dispatch_.flush();
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
  void reload() { reloader_.reload(); }
  bool reloading() const noexcept { return reloader_.active(); }

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
    st.reloading = reloader_.active();
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
    log_(LogLevel::info, "scale", "from " + std::to_string(was) + " to " + std::to_string(n) +
                                     (n == 1 ? " worker" : " workers"));
    if (n > was) {
      table_.resize_slots(n);
      for (std::size_t slot = was; slot < n; ++slot) {
        if constexpr (requires(Restart& r) { r.reset(slot); }) restart_.reset(slot);
        if (phase_ == detail::Phase::serving) spawner_.spawn(slot);  // before run(), run() forks them
      }
      return {};
    }
    for (std::size_t slot = n; slot < was; ++slot) spawner_.cancel_restart(table_.slot(slot));
    table_.resize_slots(n);
    if constexpr (WantsReusePort<Balance>) {
      listeners_.keep_slots(n);  // stop routing to them
    }
    for (auto& [id, w] : table_.live())
      if (w->slot >= n) w->disconnect();
    dispatch_.rebalance();
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
    if (opts_.handle_signals) detail::handle_signals(*this);
    phase_ = detail::Phase::serving;
    std::string on;
    for (auto& a : listeners_.addresses()) on += (on.empty() ? " on " : ", ") + a;
    log_(LogLevel::info, "serving", "pid " + std::to_string(::getpid()) + ", " +
                                       std::to_string(table_.slot_count()) + " workers" + on);
    for (std::size_t s = 0; s < table_.slot_count(); ++s)
      if (!table_.slot(s).worker_id) spawner_.spawn(s);
    dispatch_.start();
    watchdog_.start();
    systemd_.start_watchdog();
    store_.start_sweeping();
    loop_.restart();
    loop_.run();
    return release(true);
  }

 private:
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
    this->rethrow_failure();
    return saved ? 0 : 1;
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

  // "Worker ready": a worker became ready (listening, or started when the cluster listens on
  // nothing). In this order: dispatch (it may be dealt connections now), the rolling restart
  // (its old worker may drain now), the upgrade (the old master may hand over), systemd
  // (READY=1 or STATUS=).
  void worker_ready(Record& w) {
    dispatch_.worker_ready(w);
    reloader_.worker_ready(w);
    upgrader_.tell_old_master_if_ready();
    systemd_.ready();
  }

  // "Worker exited": reaped and out of the table (the supervisor owns it until this returns).
  // In this order: the application's 'exit', the rolling restart (a replacement failed, or an
  // old worker is gone), the supervisor (the slot refilled per the RestartPolicy), and the end
  // of a shutdown once the last worker is gone.
  void worker_exited(Record& w, const ExitInfo& info) {
    this->emit(this->on_exit_, w.handle, info);
    reloader_.worker_exited(w, info);
    supervisor_.after_exit(w, info);
    if (shutting_down() && table_.empty()) loop_.stop();
  }

  // The wiring: what each part asks of the Master, in its hooks.
  void wire() {
    auto& ev = this->hooks;
    ev.log = [this](LogLevel l, std::string_view e, const std::string& m) { log_(l, e, m); };
    ev.stop = [this] { if (!shutting_down()) shutdown(); };
    ev.addresses = [this]() -> const std::vector<std::string>& { return listeners_.addresses(); };

    auto& sp = spawner_.hooks;
    if constexpr (WantsReusePort<Balance>)
      sp.prepare_slot = [this](std::size_t slot) {
        return !listeners_.bound() || listeners_.ensure_slot_bound(slot);
      };
    // The descriptors no child may keep, but the loop's and the workers' (the spawner's): the
    // listening sockets (handed over a channel), connections not dealt out yet, the upgrade's
    // (the pid file's lock, the new master's pidfd and ready pipe) and the control socket.
    sp.master_fds = [this](std::vector<int>& fds) {
      listeners_.descriptors(fds);
      dispatch_.descriptors(fds);
      upgrader_.descriptors(fds);
      control_.descriptors(fds);  // or a child keeps the socket live, and a client's EOF away
    };
    sp.frame = [this](Record& w, Frame&& f) { supervisor_.on_frame(w, std::move(f)); };
    sp.closed = [this](Record& w, std::error_code ec) { supervisor_.on_channel_closed(w, ec); };
    sp.exited = [this](Record& w) { supervisor_.on_pidfd(w); };
    sp.hand_listeners = [this](Record& w) {
      if (listeners_.bound() && listeners_.listens() && !shutting_down())
        dispatch_.hand_listeners(w, listeners_.for_worker(w.slot));
    };
    this->report_to_callbacks(supervisor_.hooks, sp, codec_);

    auto& su = supervisor_.hooks;
    su.ready = [this](Record& w) { worker_ready(w); };
    su.exited = [this](Record& w, const ExitInfo& info) { worker_exited(w, info); };
    su.store = [this](Record& w, const Frame& f) { store_.serve(w, f); };
    su.accepted = [this](Record& w, std::size_t n) { dispatch_.acknowledged(w, n, Clock::now()); };
    su.declined = [this](Record& w, std::size_t n) { dispatch_.declined(w, n, Clock::now()); };
    // A session key for this worker's slot; a policy that routes by key keeps it, any other
    // ignores it, so a Server may bind whatever the cluster balances with.
    if constexpr (BindsKeys<Balance>)
      su.bind = [this](std::string_view key, std::size_t slot) { balance_.bind(key, slot); };
    su.recycle = [this](Record& w, const std::string& why) { reloader_.recycle(w, why); };
    su.stats_answered = [this](unsigned id) { status_queries_.answered(id); };
    su.recover = [this](Record& w) { dispatch_.worker_gone(w); };
    su.listens = [this] { return listeners_.listens(); };
    su.spawn = [this](std::size_t slot) { return spawner_.spawn(slot); };
    su.spawn_after = [this](std::size_t slot, Clock::duration d) { spawner_.spawn_after(slot, d); };
    if constexpr (WantsReusePort<Balance>)
      su.slot_abandoned = [this](std::size_t slot) {
        listeners_.close_slot(slot);  // nobody will accept there: stop the kernel routing to it
      };

    auto& wd = watchdog_.hooks;
    wd.spawn = su.spawn;
    wd.recycle = su.recycle;
    wd.listens = su.listens;

    auto& rl = reloader_.hooks;
    rl.spawn = su.spawn;
    rl.cancel_restart = [this](std::size_t slot) { spawner_.cancel_restart(table_.slot(slot)); };
    rl.started = [this](std::size_t replacing) { systemd_.reloading(replacing); };
    // The end of a reloader pass: systemd hears that a rolling restart ended, the control
    // clients waiting for it are answered, then on_reload_done (called directly, not through
    // emit(): an exception from it propagates as it always has).
    rl.finished = [this](const ReloadReport& report, bool requested, bool again) {
      if (requested) systemd_.reloaded(report);
      if (requested || again || shutting_down()) control_.reload_ended(report, again);
      if (requested && this->on_reload_done_) this->on_reload_done_(report);
    };
  }

  // The upgrader's calls into the master (the wiring; the upgrader takes them when it is built).
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
    h.master_only_fds = [this] { return spawner_.master_only_fds(); };
    h.environment = [this] {
      std::vector<std::string> env = detail::environment_without_markers();
      for (auto& e : systemd_.environment()) env.push_back(e);
      return env;
    };
    h.took_over = [this] { control_.own_socket_file(); };
    h.handed_over = [this] {
      phase_ = detail::Phase::handed_over;
      store_.release(true);
      systemd_.handed_over_to(upgrader_.new_master());
    };
    // An upgrade ended (old master): ok, the new master serves and this one shuts down; not
    // ok, this one keeps serving.
    h.ended = [this](const UpgradeReport& report) {
      if (!report.ok) systemd_.upgrade_failed();
      control_.upgrade_ended(report);
      if (report.ok) control_.stop_listening();  // new clients reach the new master
      this->emit(this->on_upgrade_done_, report);
      if (report.ok) shutdown();
    };
    return h;
  }

  Options opts_;
  detail::MasterLog log_{opts_};
  detail::Phase phase_ = detail::Phase::starting;
  [[no_unique_address]] Restart restart_;
  [[no_unique_address]] Codec codec_;
  [[no_unique_address]] Balance balance_;
  bool prepared_ = false;     // prepare_to_serve() ran
  detail::Credentials credentials_;  // Options::user/group, resolved; what workers switch to
  EventLoop loop_;
  detail::WorkerTable<Codec> table_;
  Clock::time_point started_ = Clock::now();

  // The outward-facing parts: status queries, the systemd reporter, the control
  // service, the store service, the upgrader and the listening sockets.
  detail::StatusQueries<Codec> status_queries_{loop_, table_, {[this] { return status(); }}};
  detail::SystemdReporter<Codec> systemd_{
      loop_, table_, phase_,
      {[this] { return listeners_.listens(); },
       [this]() -> const std::vector<std::string>& { return listeners_.addresses(); },
       [this] { return reloader_.active(); }, [this] { return upgrader_.started_by_upgrade(); }}};
  detail::ControlService<Master> control_{*this, loop_, log_};  // Options::control
  detail::StoreService<Codec> store_{loop_, opts_, table_, log_,
                                     {[this] { return upgrader_.new_master(); }}};
  detail::Upgrader<Codec> upgrader_{loop_, opts_, table_, log_, phase_, upgrader_hooks()};
  detail::Listeners<Codec, Balance> listeners_{opts_, table_, log_, upgrader_};

  // The workers' lifecycle: starting them, their frames and exits, the periodic checks.
  detail::Spawner<Codec> spawner_;
  detail::Supervisor<Codec, Restart> supervisor_{loop_, table_, log_, phase_, restart_, codec_};
  detail::Watchdog<Codec> watchdog_{loop_, opts_, table_, log_, phase_};

  // Connections and replacements: dispatch (chosen once from the BalancePolicy's kind) and
  // the reloader.
  using Dispatch = std::conditional_t<MasterDispatch<Balance>,
                                      detail::RoundRobinHandle<Codec, Balance>,
                                      detail::SharedHandle<Codec, Balance>>;
  Dispatch dispatch_{loop_, table_, log_, phase_, balance_, listeners_.shared()};
  detail::Reloader<Codec> reloader_{loop_, opts_, table_, log_, phase_};
};

}  // namespace prefork

#if defined(PREFORK_SEPARATE_COMPILATION)
#include <prefork/master/instantiation.hpp>
#endif

#endif  // PREFORK_MASTER_HPP
