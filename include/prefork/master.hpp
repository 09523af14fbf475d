// The master role (Node's lib/internal/cluster/primary.js): binds the listening sockets, forks
// or execs the workers, reaps them through pidfds, walks them through Node's lifecycle events,
// restarts them per the RestartPolicy, and runs rolling restarts and graceful shutdown.
#ifndef PREFORK_MASTER_HPP
#define PREFORK_MASTER_HPP

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <iterator>
#include <map>
#include <memory>
#include <optional>
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
#include <prefork/detail/acceptor.hpp>
#include <prefork/detail/boot.hpp>
#include <prefork/detail/control_server.hpp>
#include <prefork/detail/json.hpp>
#include <prefork/detail/pid_file.hpp>
#include <prefork/detail/number.hpp>
#include <prefork/detail/privileges.hpp>
#include <prefork/detail/process.hpp>
#include <prefork/detail/socket.hpp>
#include <prefork/detail/store_host.hpp>
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
#include <prefork/master/phase.hpp>
#include <prefork/master/spawner.hpp>
#include <prefork/master/supervisor.hpp>
#include <prefork/master/watchdog.hpp>
#include <prefork/master/worker_record.hpp>
#include <prefork/master/worker_table.hpp>

namespace prefork {

namespace detail {

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
template <class Balance, class Restart, MessageCodec Codec>
class Master {
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
    master_argv_ = detail::own_argv();
    master_path_ = detail::own_executable(master_argv_);
    std::string upgrade_error;
    upgrade_boot_ = detail::take_upgrade_boot(upgrade_error);
    if (!upgrade_error.empty()) throw std::runtime_error("prefork: " + upgrade_error);
    if (opts_.systemd) {
      std::string activation_error;
      activated_ = detail::take_activated_sockets(activation_error);
      if (!activation_error.empty()) throw std::runtime_error("prefork: " + activation_error);
      notifier_ = detail::Notifier::take_from_environment();
    }
    table_.resize_slots(opts_.workers);
    credentials_ = detail::resolve_credentials(opts_.user, opts_.group);
    store_ = std::make_unique<detail::StoreHostOf<MemoryStore<>>>(MemoryStore<>(opts_.store_limits));
    loop_.on_exception([this](std::exception_ptr e) { callback_failed(e); });
    wire_life();
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
    auto host = std::make_unique<detail::StoreHostOf<S>>(std::move(store));
    S& s = host->store();
    store_ = std::move(host);
    return s;
  }
  void on_online(std::function<void(WorkerT&)> cb) { on_online_ = std::move(cb); }
  /// cb(Worker&) or cb(Worker&, const std::vector<std::string>& addresses): the addresses
  /// as bound, with the port the kernel chose for port 0 (Node's 'listening' address).
  template <class F>
  void on_listening(F cb) {
    if constexpr (std::is_invocable_v<F&, WorkerT&, const std::vector<std::string>&>) {
      on_listening_ = [this, cb = std::move(cb)](WorkerT& w) mutable { cb(w, addresses_); };
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
    if (bound_) return;
    prepare_to_serve();
    std::vector<UniqueFd> fds;
    std::vector<std::string> names, created;  // created: Unix socket files this call made
    std::vector<std::vector<UniqueFd>> sets;
    std::vector<std::string> specs;  // per socket: what an upgrade says it is for
    try {
      const long first_slot = WantsReusePort<Balance> ? 0 : -1;
      const bool adopting = adopts_sockets();
      // A host name stands for every address it resolves to (nginx's rule), all on one port:
      // for port 0, the one the kernel chose for its first address.
      std::vector<std::pair<std::string, bool>> wanted;  // a spec; shares its predecessor's port
      for (auto& entry : opts_.listen) {
        std::vector<std::string> resolved = detail::resolve_listen_address(entry);
        for (std::size_t k = 0; k < resolved.size(); ++k) wanted.emplace_back(resolved[k], k > 0);
      }
      std::string previous;  // where the previous wanted spec was bound, if it was
      for (auto& [wanted_spec, same_port] : wanted) {
        const std::string spec = same_port && !previous.empty()
                                     ? detail::same_port_as(wanted_spec, previous)
                                     : wanted_spec;
        previous.clear();
        std::string as = spec;
        UniqueFd fd = take_inherited(spec, first_slot);
        if (!fd && adopting) {
          as = std::string(detail::kActivatedSpec) + spec;
          fd = take_inherited(as, first_slot);
          if (!fd) fd = take_activated(spec);
          if (!fd) {
            log(LogLevel::warning, "systemd",
                "socket activation: not binding " + spec + ": no socket was passed for it");
            continue;
          }
        }
        bool fresh = !fd;
        if (fresh)
          fd = detail::listen_on(spec, opts_.backlog,
                                 WantsReusePort<Balance> ? detail::ReusePortRole::lead
                                                         : detail::ReusePortRole::none,
                                 defer_accept_s());
        names.push_back(detail::to_string(detail::local_address(fd.get())));
        if (fresh) created.push_back(names.back());
        fds.push_back(std::move(fd));
        specs.push_back(std::move(as));
        previous = names.back();
      }
      if (adopting) adopt_remaining(fds, names, specs, first_slot);
      activated_.clear();  // what is left is no listener: closed
      specs_ = specs;
      if constexpr (WantsReusePort<Balance>) {
        sets.push_back(std::move(fds));
        for (std::size_t s = 1; s < table_.slot_count(); ++s)
          sets.push_back(bind_set(names, &sets[0], s));
      }
    } catch (...) {
      for (auto& n : created) detail::unlink_unix_socket(n);  // nothing stays bound
      throw;
    }
    // Inherited sockets nobody listens on are closed; the control socket's is kept for
    // listen_control(), which may come after bind(); run() closes it if nobody takes it.
    if (upgrade_boot_)
      for (std::size_t i = 0; i < upgrade_boot_->fds.size(); ++i)
        if (i >= upgrade_boot_->sockets.size() ||
            !upgrade_boot_->sockets[i].spec.starts_with("control:"))
          upgrade_boot_->fds[i].reset();
    listeners_ = std::move(fds);
    slot_listeners_ = std::move(sets);
    addresses_ = std::move(names);
    bound_ = true;
  }

  /// The bound addresses, with the ports the kernel chose for port 0. Empty before bind().
  const std::vector<std::string>& addresses() const noexcept { return addresses_; }

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
      log(LogLevel::info, "shutdown",
          std::string(again || fast ? "fast: SIGTERM to " : "graceful: draining ") +
              std::to_string(table_.size()) + (table_.size() == 1 ? " worker" : " workers"));
    if (!again) {
      notify_stopping();
      finish_reload(false, "the master is shutting down");
      successor_.fail("the master is shutting down", SIGTERM);
      if constexpr (MasterDispatch<Balance>) {
        stop_accepting();
        dispatch_pending();
      }
      phase_ = detail::shut_down(phase_);
      for (auto& s : table_.slots()) spawner_.cancel_restart(s);
      for (auto& l : listeners_) loop_.unwatch(l.get());
      listeners_.clear();
      slot_listeners_.clear();
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
    notifier_.notify("RELOADING=1\nMONOTONIC_USEC=" + std::to_string(detail::monotonic_usec()) +
                     "\nSTATUS=rolling restart: replacing " +
                     std::to_string(reload_.queue.size()) + " workers");
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
    if (shutting_down()) return refuse_upgrade("the master is shutting down");
    if (successor_.running())
      return refuse_upgrade("one is already running (new master pid " +
                            std::to_string(successor_.pid()) + ")");
    if (!bound_) return refuse_upgrade("the master is not serving yet");
    std::vector<detail::InheritedSocket> sockets;
    if constexpr (WantsReusePort<Balance>) {
      for (std::size_t slot = 0; slot < slot_listeners_.size(); ++slot)
        for (std::size_t i = 0; i < slot_listeners_[slot].size(); ++i)
          sockets.push_back({slot_listeners_[slot][i].get(), static_cast<long>(slot), specs_[i]});
    } else {
      for (std::size_t i = 0; i < listeners_.size(); ++i)
        sockets.push_back({listeners_[i].get(), -1, specs_[i]});
    }
    if (control_.native_handle() >= 0) {
      if (!detail::encodable(control_spec()))
        return refuse_upgrade("the control socket's path holds a newline");
      sockets.push_back({control_.native_handle(), -1, control_spec()});
    }
    for (auto& spec : specs_)
      if (!detail::encodable(spec)) return refuse_upgrade("a listen address holds a newline");
    // The new master loads the store from the snapshot before it forks: from the save on,
    // this master holds store operations (store_state_), so that none it acknowledges is
    // missing from the new master's store (or handed out again by it).
    if (!save_store()) return refuse_upgrade("the store could not be saved for the new master");
    if (!opts_.store_snapshot.empty()) store_state_ = StoreState::held;
    std::string error = successor_.start(
        master_path_, master_argv_, upgrade_environment(), sockets, spawner_.master_only_fds(),
        opts_.upgrade_timeout, [this] { upgrade_succeeded(); },
        [this](const std::string& why) {
          log(LogLevel::warning, "upgrade", "upgrade failed: " + why +
              (shutting_down() ? std::string() : "; this master keeps serving"));
          if (!shutting_down()) notifier_.notify("STATUS=upgrade failed; " + systemd_status());
          reclaim_pid_file();
          release_store(false);
          UpgradeReport report{false, successor_.pid(), why};
          answer_upgrade_waiters(report);
          emit(on_upgrade_done_, report);
        });
    if (!error.empty()) {
      release_store(false);
      return refuse_upgrade(error);
    }
    log(LogLevel::info, "upgrade",
        "upgrade: started new master pid " + std::to_string(successor_.pid()) + " (" +
        master_path_ + ")");
    notifier_.notify("STATUS=upgrading: new master pid " + std::to_string(successor_.pid()) +
                     " starting; " + systemd_status());
    return true;
  }
  bool upgrading() const noexcept { return successor_.waiting(); }
  /// In a master started by an upgrade: the pid of the master it replaces; 0 otherwise.
  pid_t upgraded_from() const noexcept { return upgrade_boot_ ? upgrade_boot_->old_master : 0; }

  /// Serves the control socket (control.hpp) on `path`, as Options::control does; for a path
  /// known only once the master has bound (hello names it after its port). Call before run().
  /// A new master started by an upgrade serves on the socket the old master hands over, so a
  /// client never finds the path missing, and owns its file only once it serves. Throws
  /// std::system_error: the path is in use by a running master, exists and is not a socket
  /// (it is left alone), or cannot be bound; the control socket listens already.
  void listen_control(const std::string& path) {
    std::error_code ec;
    UniqueFd inherited = take_inherited("control:" + path, -1);
    if (inherited) {
      ec = control_.adopt(std::move(inherited), path);
    } else {
      ec = control_.listen(path);
      control_owned_ = !ec;
    }
    if (ec == std::errc::address_in_use)
      throw detail::StatedError(ec, "prefork: control socket " + path +
                                        " is in use by a running master");
    if (ec == std::errc::file_exists)
      throw detail::StatedError(ec, "prefork: control socket " + path +
                                        " exists and is not a socket (left as it is)");
    if (ec) throw std::system_error(ec, "prefork: control socket " + path);
    control_.on_request([this](const detail::ControlRequest& r, detail::ControlReply reply) {
      on_control(r, std::move(reply));
    });
  }

  /// The master and its live workers now, with each worker's counters as it last reported them
  /// (query_status() asks for fresh ones). Reads each worker's resident memory from /proc.
  ClusterStatus status() const {
    ClusterStatus st;
    st.pid = ::getpid();
    st.uptime = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - started_);
    st.workers_wanted = table_.slot_count();
    st.addresses = addresses_;
    st.reloading = reload_.active;
    st.upgrading = successor_.waiting();
    st.shutting_down = shutting_down();
    for (std::size_t i = 0; i < table_.slot_count(); ++i) {
      st.restarts += table_.slot(i).restarts;
      if (table_.slot(i).errored) st.errored_slots.push_back(i);
    }
    for (auto& [id, w] : table_.live()) {
      WorkerStatus ws;
      ws.id = id;
      ws.slot = w->slot;
      ws.pid = w->pid;
      ws.state = w->state;
      ws.draining = w->leaving();
      ws.uptime = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - w->started);
      ws.restarts = w->restarts;
      ws.connections = w->reported_connections;
      ws.connections_total = w->counters.connections_total;
      ws.requests = w->counters.requests;
      ws.rss = detail::resident_bytes(w->pid);
      st.workers.push_back(ws);
    }
    return st;
  }

  /// Asks every connected worker for its counters and calls cb(status()) once all have
  /// answered or `timeout` passed (a hung worker shows what it last reported). cb runs on the
  /// master's loop, never from inside this call.
  void query_status(std::function<void(const ClusterStatus&)> cb,
                    Clock::duration timeout = std::chrono::seconds(1)) {
    auto q = std::make_shared<StatusQuery>();
    q->done = std::move(cb);
    for (auto& [id, w] : table_.live())
      if (w->is_connected() && !w->channel->send(FrameKind::stats, {})) q->waiting.push_back(id);
    status_queries_.push_back(q);
    q->timer = loop_.after(timeout, [this, q] {
      q->timer = 0;
      finish_status_query(q);
    }, false);
    if (q->waiting.empty()) loop_.post([this, q] { finish_status_query(q); });
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
        if (phase_ == detail::Phase::serving) spawner_.spawn(slot);  // before run(), run() forks them
      }
      return {};
    }
    for (std::size_t slot = n; slot < was; ++slot) spawner_.cancel_restart(table_.slot(slot));
    table_.resize_slots(n);
    if constexpr (WantsReusePort<Balance>) {
      if (slot_listeners_.size() > n) slot_listeners_.resize(n);  // stop routing to them
    }
    for (auto& [id, w] : table_.live())
      if (w->slot >= n) w->disconnect();
    if constexpr (MasterDispatch<Balance>) dispatch_pending();
    notify_ready();
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
    load_store();
    bind();
    if (upgrade_boot_) upgrade_boot_->fds.clear();
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
    for (auto& a : addresses_) on += (on.empty() ? " on " : ", ") + a;
    log(LogLevel::info, "serving", "pid " + std::to_string(::getpid()) + ", " +
                                       std::to_string(table_.slot_count()) + " workers" + on);
    for (std::size_t s = 0; s < table_.slot_count(); ++s)
      if (!table_.slot(s).worker_id) spawner_.spawn(s);
    if constexpr (MasterDispatch<Balance>) resume_accepting();
    watchdog_.start();
    start_systemd_watchdog();
    loop_.every(std::chrono::seconds(1), [this] { store_->sweep(); }, false);
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
    if (!handed_over())
      for (std::size_t i = 0; i < addresses_.size(); ++i)
        if (i >= specs_.size() || !specs_[i].starts_with(detail::kActivatedSpec))  // systemd's
          detail::unlink_unix_socket(addresses_[i]);
    control_.close();
    if (control_owned_ && !handed_over()) control_.unlink();
    // Not after a hand-over: the file is the new master's now (it may have saved it for an
    // upgrade of its own), and this store stopped changing when it was saved for the upgrade.
    bool saved = !save || handed_over() || save_store();
    pid_file_.remove();  // only now: a master started after this must find the store saved
    if (failure_) std::rethrow_exception(std::exchange(failure_, nullptr));
    return saved ? 0 : 1;
  }



  // ReusePort: each slot its own SO_REUSEPORT socket per listen address, bound to what the
  // first bind resolved (so port 0 means one port for all). A Unix socket cannot be balanced
  // that way: its slots share one socket, dup'ed from `model`. Every socket of the group must
  // have a worker accepting from it, since the kernel queues connections on idle members too:
  // a slot that will not be refilled has its sockets closed (after_exit), and bound again when
  // a worker is forked into it. The groups are this master's: without a `model` (no slot holds
  // a socket) each socket leads its address's group again (ReusePortRole::lead), so that no
  // group another program started is joined; with one, they join.
  std::vector<UniqueFd> bind_set(const std::vector<std::string>& names,
                                 const std::vector<UniqueFd>* model, std::size_t slot) {
    std::vector<UniqueFd> fds;
    for (std::size_t i = 0; i < names.size(); ++i) {
      // A passed socket is one socket, whoever balances: its slots share it, as for Unix.
      if (UniqueFd fd = take_inherited(specs_[i], static_cast<long>(slot))) {
        fds.push_back(std::move(fd));
      } else if ((names[i].starts_with("unix:") || specs_[i].starts_with(detail::kActivatedSpec)) &&
                 model && i < model->size()) {
        int d = ::fcntl((*model)[i].get(), F_DUPFD_CLOEXEC, 0);
        if (d < 0) detail::throw_errno("dup listening socket");
        fds.emplace_back(d);
      } else {
        fds.push_back(detail::listen_on(
            names[i], opts_.backlog,
            model ? detail::ReusePortRole::join : detail::ReusePortRole::lead, defer_accept_s()));
      }
    }
    return fds;
  }

  // Binds `slot`'s ReusePort sockets if it has none; false (logged) if that fails.
  bool ensure_slot_bound(std::size_t slot) {
    if (slot_listeners_.size() <= slot) slot_listeners_.resize(slot + 1);
    if (!slot_listeners_[slot].empty() || addresses_.empty()) return true;
    const std::vector<UniqueFd>* model = nullptr;
    for (auto& set : slot_listeners_)
      if (!set.empty()) model = &set;
    try {
      slot_listeners_[slot] = bind_set(addresses_, model, slot);
      return true;
    } catch (const std::system_error& e) {
      log(LogLevel::warning, "bind",
          std::string("cannot bind for slot ") + std::to_string(slot) + ": " + e.what());
      return false;
    }
  }

  int defer_accept_s() const noexcept { return static_cast<int>(opts_.defer_accept.count()); }

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

  // The worker is its slot's current one (not a replaced one, nor in a slot scaled away).
  bool owns_slot(const Record& w) const noexcept { return table_.owns_slot(w); }

  static std::string describe(const Record& w) { return detail::MasterLog::describe(w); }

  // The descriptors of the Master's own parts, which no child may keep (the spawner adds the
  // loop's and the workers'): its listening sockets (a worker is handed them over its
  // channel), the connections not dealt out yet, and what the upgrade, systemd, the pid file
  // and the control socket hold.
  void part_fds(std::vector<int>& fds) const {
    for (auto& l : listeners_) fds.push_back(l.get());
    for (auto& set : slot_listeners_)
      for (auto& l : set) fds.push_back(l.get());
    for (auto& h : pending_) fds.push_back(h.fd.get());
    for (auto& [fd, p] : peeking_) fds.push_back(fd);
    if (upgrade_boot_ && upgrade_boot_->notify) fds.push_back(upgrade_boot_->notify.get());
    for (auto& a : activated_)
      if (a.fd) fds.push_back(a.fd.get());
    if (pid_file_.held()) fds.push_back(pid_file_.native_handle());  // or a child keeps the lock
    control_.descriptors(fds);  // or a child keeps the socket live, and a client's EOF away
    successor_.descriptors(fds);
  }

  // Kernel dispatch: the worker gets its own copies of the listening sockets. Master dispatch:
  // an empty handles frame, which tells the worker to expect connections over the channel.
  void hand_listeners(Record& w) {
    std::vector<UniqueFd> dups;
    const std::vector<UniqueFd>* source = &listeners_;
    if constexpr (WantsReusePort<Balance>) source = &slot_listeners_.at(w.slot);
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

  // The worker acknowledged its next `n` connections (FrameKind::accepted).
  void accepted(Record& w, std::size_t n) {
    n = std::min(n, w.in_flight.size());
    w.in_flight.erase(w.in_flight.begin(), w.in_flight.begin() + static_cast<std::ptrdiff_t>(n));
    w.unacked_since = Clock::now();  // its loop turns: the rest count from now
    if (n > 0 && w.out_of_fds) {
      w.out_of_fds = false;
      log(LogLevel::info, "dispatch", "takes connections again", &w);
    }
    if constexpr (MasterDispatch<Balance>) resume_accepting();
  }

  // One operation on the shared store for `w`. Always answered (a store_reply frame goes out
  // even when the channel's queue is full), with the store's error if it failed; during an
  // upgrade, once the store has been handed over (see store_state_).
  void serve_store(Record& w, const Frame& f) {
    if (store_state_ == StoreState::held) {
      held_store_.push_back({w.id, f.tag, f.payload});
      return;
    }
    answer_store(w, f.tag, f.payload);
  }

  void answer_store(Record& w, std::uint64_t tag, std::string_view payload) {
    std::error_code ec;
    std::optional<StoreRequest> request = decode_request(payload, ec);
    StoreReply reply;
    if (store_state_ == StoreState::handed_over) {
      reply.error = store_errc::handed_over;
      reply.message = "the store is now the new master's (pid " +
                      std::to_string(successor_.pid()) + "); nothing was applied";
    } else if (request) {
      reply = store_->apply(*request);
    } else {
      reply.error = store_errc::bad_request;
      reply.message = ec.message();
    }
    std::string bytes = encode(reply);
    if (bytes.size() > opts_.max_message_size) {
      reply = StoreReply{};
      reply.error = store_errc::value_too_long;
      reply.message = "store reply of " + std::to_string(bytes.size()) +
                      " bytes exceeds max_message_size; ask for fewer keys";
      bytes = encode(reply);
    }
    if (w.is_connected()) w.channel->send(FrameKind::store_reply, std::move(bytes), tag);
  }

  // The end of an upgrade's hold on the store (store_state_): the operations held are applied
  // in the order they came (the upgrade failed: this master keeps the store), or refused with
  // store_errc::handed_over, as every later one is (the new master has the store now; a worker
  // of this master is draining and never reaches it). Either way each is answered once.
  void release_store(bool handed_over) {
    if (store_state_ != StoreState::held) return;
    store_state_ = handed_over ? StoreState::handed_over : StoreState::serving;
    for (auto& op : std::exchange(held_store_, {}))
      if (Record* w = record(op.worker)) answer_store(*w, op.tag, op.payload);
  }

  // What must stop a master before it binds (run() and bind() call it; it runs once): workers
  // it could not switch to Options::user, or a pid file a live master holds.
  void prepare_to_serve() {
    if (prepared_) return;
    credentials_ = detail::check_credentials(std::move(credentials_));
    take_pid_file();
    if (!opts_.control.empty()) listen_control(opts_.control);
    prepared_ = true;
  }

  std::string control_spec() const { return "control:" + control_.path(); }

  // One command from the control socket. reload and upgrade are answered when they end.
  void on_control(const detail::ControlRequest& r, detail::ControlReply reply) {
    log(LogLevel::info, "control",
        r.command + " from pid " + std::to_string(r.peer.pid) + " (uid " +
            std::to_string(r.peer.uid) + ")");
    if (r.command == "status") {
      query_status([reply](const ClusterStatus& st) {
        std::string json = to_json(st);
        reply.ok(json.substr(1, json.size() - 2));  // its fields beside "ok"
      });
    } else if (r.command == "reload") {
      if (shutting_down()) return reply.fail("the master is shutting down");
      // A pass that runs now was asked for before this request: this one waits for the next.
      (reload_.active ? reload_waiters_next_ : reload_waiters_).push_back(std::move(reply));
      reload();
    } else if (r.command == "scale") {
      auto it = r.fields.find("workers");
      std::size_t n = 0;
      if (it == r.fields.end() || it->second.type != detail::JsonScalar::Type::number ||
          !detail::parse_number(it->second.text, n) || n == 0 || n > 4096)
        return reply.fail("scale needs \"workers\": a whole number from 1 to 4096");
      if (std::error_code ec = scale(n)) return reply.fail("scale: " + ec.message());
      reply.ok("\"workers\":" + std::to_string(n));
    } else if (r.command == "stop") {
      auto it = r.fields.find("fast");
      bool fast = it != r.fields.end() && it->second.type == detail::JsonScalar::Type::boolean &&
                  it->second.text == "true";
      reply.ok("\"stopping\":true,\"workers\":" + std::to_string(table_.size()));
      shutdown(fast);
    } else if (r.command == "upgrade") {
      if (!upgrade()) return reply.fail("upgrade refused: " + upgrade_refusal_);
      upgrade_waiters_.push_back(std::move(reply));
    } else {
      reply.fail("unknown command '" + r.command +
                 "'; the commands are status, reload, scale, stop and upgrade");
    }
  }

  // The control clients waiting for the rolling restart that just ended.
  void answer_reload_waiters(const ReloadReport& r, bool will_run_again) {
    auto waiters = std::exchange(reload_waiters_, {});
    for (auto& w : waiters) {
      if (r.ok) {
        w.ok("\"replaced\":" + std::to_string(r.replaced) + ",\"took_ms\":" +
             std::to_string(r.took.count()));
      } else {
        w.fail("rolling restart stopped: " + r.reason + "; the old workers keep serving");
      }
    }
    if (will_run_again) {
      reload_waiters_ = std::exchange(reload_waiters_next_, {});
    } else if (!reload_waiters_next_.empty()) {
      auto next = std::exchange(reload_waiters_next_, {});
      std::string why = r.ok ? std::string("the master is shutting down") : r.reason;
      for (auto& w : next) w.fail("rolling restart not run: " + why);
    }
  }

  void answer_upgrade_waiters(const UpgradeReport& u) {
    auto waiters = std::exchange(upgrade_waiters_, {});
    for (auto& w : waiters) {
      if (u.ok) {
        w.ok("\"new_master\":" + std::to_string(u.new_master));
      } else {
        w.fail("upgrade failed: " + u.reason);
      }
    }
  }

  void take_pid_file() {
    if (opts_.pid_file.empty()) return;
    std::error_code ec = pid_file_.acquire(opts_.pid_file, ::getpid());
    if (ec == std::errc::resource_unavailable_try_again) {
      pid_t holder = pid_file_.holder();
      // Started by an upgrade: the old master (our parent) holds it. It is taken over once
      // this master serves (tell_old_master_if_ready), so that until then it names the
      // master that serves, and a failed upgrade leaves it alone.
      if (upgrade_boot_ && holder == upgrade_boot_->old_master && holder == ::getppid()) {
        pid_file_handover_ = true;
        return;
      }
      throw detail::StatedError(ec, "prefork: pid file " + opts_.pid_file +
                                        " is held by a running master (pid " +
                                        (holder ? std::to_string(holder) : "unknown") + ")");
    }
    if (ec) throw std::system_error(ec, "prefork: pid file " + opts_.pid_file);
  }

  // The old master after a failed upgrade: the new master may have taken the pid file over
  // before it failed.
  void reclaim_pid_file() {
    if (!pid_file_.held() || pid_file_.current()) return;
    if (std::error_code ec = pid_file_.take_over(opts_.pid_file, ::getpid()))
      log(LogLevel::warning, "pid-file",
          "pid file " + opts_.pid_file + " not taken back: " + ec.message());
  }

  void load_store() {
    if (opts_.store_snapshot.empty()) return;
    std::error_code ec = store_->load(opts_.store_snapshot);
    if (ec == std::errc::no_such_file_or_directory) return;
    if (ec)
      throw std::system_error(ec, "prefork: load store snapshot " + opts_.store_snapshot +
                                      " (fix or move the file; it is left as it is)");
    log(LogLevel::info, "store", "store loaded from " + opts_.store_snapshot);
  }

  bool save_store() {
    if (opts_.store_snapshot.empty()) return true;
    std::error_code ec = store_->save(opts_.store_snapshot);
    if (!ec) return true;
    log(LogLevel::error, "store",
        "store snapshot " + opts_.store_snapshot + " not saved: " + ec.message());
    return false;
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

  // "Worker ready": a worker became ready (listening, or started when the cluster listens on
  // nothing). In this order: the rolling restart (its old worker may drain now), the upgrade
  // (the old master may hand over), systemd (READY=1 or STATUS=).
  void worker_ready(Record& w) {
    reload_ready(w);
    tell_old_master_if_ready();
    notify_ready();
  }

  // "Worker exited": reaped and out of the table (the supervisor owns it until this returns).
  // In this order: the application's 'exit', the rolling restart (a replacement failed, or an
  // old worker is gone), the supervisor (the slot refilled per the RestartPolicy), and the end
  // of a shutdown once the last worker is gone.
  void worker_exited(Record& w, const ExitInfo& info) {
    emit(on_exit_, w.handle, info);
    reload_exited(w, info);
    supervisor_.after_exit(w, info);
    if (shutting_down() && table_.empty()) loop_.stop();
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
    if (acceptor_.paused()) return;
    dispatch_pending();
    if (!pending_.empty()) return;
    for (auto& l : listeners_) {
      int raw = l.get();
      if (!loop_.watching(raw))
        loop_.watch(raw, EventLoop::readable, [this, raw](std::uint32_t) { accept_from(raw); },
                    false);
    }
  }

  void stop_accepting() {
    for (auto& l : listeners_) loop_.unwatch(l.get());
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
    ssize_t n = detail::retry_eintr(
        [&] { return ::recv(fd, peek_buf_.data(), max, MSG_PEEK | MSG_DONTWAIT); });
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
    acceptor_.accept(listener, [this] {
      if (!ready_.empty()) return true;
      stop_accepting();
      return false;
    }, [this](UniqueFd fd, const detail::SocketAddress& peer) {
      detail::Handoff h{std::move(fd), peer};
      if constexpr (PeeksFirstBytes<Balance>) {
        std::string_view head;
        if (wait_for_head(h, head)) return true;
        if (dispatch(h, &head)) return true;
      } else if (dispatch(h)) {
        return true;
      }
      pending_.push_back(std::move(h));
      stop_accepting();
      return false;
    });
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
      Record* fresh = spawner_.spawn(slot);
      if (!fresh) {
        spawner_.cancel_restart(table_.slot(slot));
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
    if (r.requested) notify_reloaded(report);
    // A reload asked for during a recycling pass runs whatever became of that pass.
    bool again = r.again && (ok || !r.requested) && !shutting_down();
    if (r.requested || again || shutting_down()) answer_reload_waiters(report, again);
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

  // New master: a socket the old master handed over for this listen entry and slot.
  UniqueFd take_inherited(const std::string& spec, long slot) {
    if (!upgrade_boot_) return {};
    auto& b = *upgrade_boot_;
    for (std::size_t i = 0; i < b.sockets.size() && i < b.fds.size(); ++i)
      if (b.fds[i] && b.sockets[i].spec == spec && b.sockets[i].slot == slot)
        return std::move(b.fds[i]);
    return {};
  }

  // New master: once every slot has a listening worker (online, without listeners), tell the
  // old master, which then drains and exits.
  void tell_old_master_if_ready() {
    if (!upgrade_boot_ || !upgrade_boot_->notify) return;
    for (auto& s : table_.slots()) {
      Record* w = table_.owner(s);
      if (!w) return;
      if (!w->ready()) return;
    }
    if (pid_file_handover_) {  // before "ready": the old master must find it taken when it exits
      pid_file_handover_ = false;
      if (std::error_code ec = pid_file_.take_over(opts_.pid_file, ::getpid()))
        log(LogLevel::warning, "pid-file",
            "pid file " + opts_.pid_file + " not taken over: " + ec.message());
    }
    control_owned_ = true;  // the old master leaves the socket file to this one now
    static constexpr char kReady[] = "ready\n";
    detail::write_all(upgrade_boot_->notify.get(), kReady, sizeof kReady - 1);
    upgrade_boot_->notify.reset();
    log(LogLevel::info, "upgrade", "upgrade: every worker is listening; the old master (pid " +
        std::to_string(upgrade_boot_->old_master) + ") hands over");
  }

  // Whether bind() serves on passed sockets: socket activation passed a listening one, or
  // this master was started by an upgrade from a master that did.
  bool adopts_sockets() const {
    for (auto& a : activated_)
      if (a.fd && detail::is_stream_listener(a.fd.get())) return true;
    if (upgrade_boot_)
      for (auto& s : upgrade_boot_->sockets)
        if (s.spec.starts_with(detail::kActivatedSpec)) return true;
    return false;
  }

  // The passed socket bound to the listen address `spec`, if there is one.
  UniqueFd take_activated(const std::string& spec) {
    detail::SocketAddress want;
    if (detail::parse_address(spec, want)) return {};
    for (auto& a : activated_) {
      if (!a.fd || !detail::is_stream_listener(a.fd.get()) ||
          !detail::same_listen_address(want, detail::local_address(a.fd.get())))
        continue;
      detail::make_nonblocking(a.fd.get());
      return std::move(a.fd);
    }
    return {};
  }

  // Passed sockets no listen address asked for: served as well (the unit asked for them).
  void adopt_remaining(std::vector<UniqueFd>& fds, std::vector<std::string>& names,
                       std::vector<std::string>& specs, long slot) {
    auto adopt = [&](UniqueFd fd, std::string spec) {
      detail::make_nonblocking(fd.get());
      names.push_back(detail::to_string(detail::local_address(fd.get())));
      specs.push_back(spec.empty() ? std::string(detail::kActivatedSpec) + names.back() : spec);
      fds.push_back(std::move(fd));
    };
    for (auto& a : activated_) {
      if (!a.fd) continue;
      if (!detail::is_stream_listener(a.fd.get())) {
        log(LogLevel::warning, "systemd",
            "socket activation: closing descriptor " + std::to_string(a.fd.get()) + " (" +
            a.name + "): not a listening stream socket");
        continue;
      }
      adopt(std::move(a.fd), {});
    }
    if (!upgrade_boot_) return;
    auto& b = *upgrade_boot_;
    for (std::size_t i = 0; i < b.sockets.size() && i < b.fds.size(); ++i)
      if (b.fds[i] && b.sockets[i].slot == slot && b.sockets[i].spec.starts_with(detail::kActivatedSpec))
        adopt(std::move(b.fds[i]), b.sockets[i].spec);
  }

  // Workers get listening sockets: bound, or before bind() whether it will bind any.
  bool listens() const noexcept { return bound_ ? !addresses_.empty() : !opts_.listen.empty(); }

  std::vector<std::string> upgrade_environment() const {
    std::vector<std::string> env = detail::environment_without_markers();
    for (auto& e : notifier_.environment()) env.push_back(e);
    return env;
  }

  // The STATUS= line systemctl status shows: "2 workers listening on 127.0.0.1:8080".
  std::string systemd_status() const {
    std::size_t n = 0;
    for (auto& [id, w] : table_.live())
      if (w->ready() && !w->planned())
        ++n;
    std::string s = std::to_string(n) + (n == 1 ? " worker " : " workers ") +
                    (listens() ? "listening" : "running");
    for (std::size_t i = 0; i < addresses_.size(); ++i) s += (i ? ", " : " on ") + addresses_[i];
    return s;
  }

  // READY=1 once every slot has a worker listening (online, without listeners), as for an
  // upgrade's "ready"; a master started by an upgrade adds MAINPID= (it is the service's main
  // process now). Later, a STATUS= update whenever a worker starts listening outside a
  // rolling restart (a crashed one replaced), which ends with READY=1 of its own.
  void notify_ready() {
    if (!notifier_.enabled() || shutting_down()) return;
    if (ready_notified_) {
      if (!reload_.active) notifier_.notify("STATUS=" + systemd_status());
      return;
    }
    for (auto& s : table_.slots()) {
      Record* w = table_.owner(s);
      if (!w || !w->ready()) return;
    }
    ready_notified_ = true;
    std::string msg = upgrade_boot_ ? "MAINPID=" + std::to_string(::getpid()) + "\n" : "";
    notifier_.notify(msg + "READY=1\nSTATUS=" + systemd_status());
  }

  // The end of a rolling restart, failed or not: the service is serving either way.
  void notify_reloaded(const ReloadReport& r) {
    if (!notifier_.enabled() || stopping_notified_) return;
    std::string status = systemd_status();
    status += r.ok ? "; reloaded in " + std::to_string(r.took.count()) + " ms"
                   : "; rolling restart stopped: " + r.reason;
    notifier_.notify("READY=1\nSTATUS=" + status.substr(0, 400));
  }

  // Not after a handed-over upgrade: the service goes on in the new master.
  void notify_stopping() {
    if (!notifier_.enabled() || stopping_notified_ || handed_over()) return;
    stopping_notified_ = true;
    notifier_.notify("STOPPING=1\nSTATUS=stopping: draining " + std::to_string(table_.size()) +
                     " workers");
  }

  // WATCHDOG=1 from the master's own loop every half of WATCHDOG_USEC: a master stuck in a
  // callback stops pinging, and systemd restarts the service.
  void start_systemd_watchdog() {
    auto every = std::chrono::duration_cast<Clock::duration>(notifier_.watchdog() / 2);
    if (every <= Clock::duration::zero()) return;
    notifier_.notify("WATCHDOG=1");
    loop_.every(std::max<Clock::duration>(every, std::chrono::milliseconds(1)),
                [this] { notifier_.notify("WATCHDOG=1"); }, false);
  }

  // A status query: the workers still to report their counters.
  struct StatusQuery {
    std::vector<unsigned> waiting;
    std::function<void(const ClusterStatus&)> done;
    EventLoop::TimerId timer = 0;
  };

  void status_answered(unsigned id) {
    if (status_queries_.empty()) return;
    std::vector<std::shared_ptr<StatusQuery>> finished;
    for (auto& q : status_queries_) {
      std::erase(q->waiting, id);
      if (q->waiting.empty()) finished.push_back(q);
    }
    for (auto& q : finished) finish_status_query(q);
  }

  void finish_status_query(const std::shared_ptr<StatusQuery>& q) {
    auto it = std::find(status_queries_.begin(), status_queries_.end(), q);
    if (it == status_queries_.end()) return;  // finished already
    status_queries_.erase(it);
    if (q->timer) loop_.cancel(q->timer);
    q->timer = 0;
    if (q->done) q->done(status());
  }

  // The life parts (spawner, supervisor, watchdog): what they ask of the Master.
  void wire_life() {
    auto& sp = spawner_.hooks;
    if constexpr (WantsReusePort<Balance>)
      sp.prepare_slot = [this](std::size_t slot) { return !bound_ || ensure_slot_bound(slot); };
    sp.master_fds = [this](std::vector<int>& fds) { part_fds(fds); };
    sp.frame = [this](Record& w, Frame&& f) { supervisor_.on_frame(w, std::move(f)); };
    sp.closed = [this](Record& w, std::error_code ec) { supervisor_.on_channel_closed(w, ec); };
    sp.exited = [this](Record& w) { supervisor_.on_pidfd(w); };
    sp.hand_listeners = [this](Record& w) {
      if (bound_ && listens() && !shutting_down()) hand_listeners(w);
    };
    sp.forked = [this](Record& w) { emit(on_fork_, w.handle); };

    auto& su = supervisor_.hooks;
    su.online = [this](Record& w) { emit(on_online_, w.handle); };
    su.listening = [this](Record& w) {
      emit(on_listening_, w.handle);
      if constexpr (MasterDispatch<Balance>) resume_accepting();
    };
    su.disconnected = [this](Record& w) { emit(on_disconnect_, w.handle); };
    su.message = [this](Record& w, const message_type& m) { emit(on_message_, w.handle, m); };
    su.protocol_error = [this](Record& w, std::error_code ec) {
      if (!on_error_) return false;
      emit(on_error_, w.handle, ec);
      return true;
    };
    su.errored = [this](std::size_t slot, const ExitInfo& info) { emit(on_errored_, slot, info); };
    su.ready = [this](Record& w) { worker_ready(w); };
    su.exited = [this](Record& w, const ExitInfo& info) { worker_exited(w, info); };
    su.request = [this](Record& w, const Frame& f) {
      detail::answer(w.link, codec_, f, static_cast<bool>(on_request_),
                     [this, &w](const message_type& m, Reply<Codec> r) {
                       on_request_(w.handle, m, std::move(r));
                     });
    };
    su.store = [this](Record& w, const Frame& f) { serve_store(w, f); };
    su.accepted = [this](Record& w, std::size_t n) { accepted(w, n); };
    if constexpr (MasterDispatch<Balance>)
      su.declined = [this](Record& w, std::size_t n) { declined(w, n); };
    // A session key for this worker's slot; a policy that routes by key keeps it, any other
    // ignores it, so a Server may bind whatever the cluster balances with.
    if constexpr (BindsKeys<Balance>)
      su.bind = [this](std::string_view key, std::size_t slot) { balance_.bind(key, slot); };
    su.recycle = [this](Record& w, const std::string& why) { recycle(w, why); };
    su.stats_answered = [this](unsigned id) { status_answered(id); };
    su.recover = [this](Record& w) { recover_in_flight(w); };
    su.listens = [this] { return listens(); };
    su.spawn = [this](std::size_t slot) { return spawner_.spawn(slot); };
    su.spawn_after = [this](std::size_t slot, Clock::duration d) { spawner_.spawn_after(slot, d); };
    if constexpr (WantsReusePort<Balance>)
      su.slot_abandoned = [this](std::size_t slot) {
        if (slot < slot_listeners_.size())
          slot_listeners_[slot].clear();  // nobody will accept there: stop the kernel routing to it
      };

    auto& wd = watchdog_.hooks;
    wd.spawn = su.spawn;
    wd.recycle = su.recycle;
    wd.listens = su.listens;
  }

  bool refuse_upgrade(const std::string& why) {
    upgrade_refusal_ = why;
    log(LogLevel::warning, "upgrade", "upgrade refused: " + why);
    return false;
  }

  void upgrade_succeeded() {
    phase_ = detail::Phase::handed_over;
    release_store(true);
    // From the main process, so that NotifyAccess=main takes it too; the new master says it
    // again itself with READY=1 (NotifyAccess=all). systemd follows the new pid from now on.
    notifier_.notify("MAINPID=" + std::to_string(successor_.pid()) +
                     "\nSTATUS=handed over to new master pid " + std::to_string(successor_.pid()));
    log(LogLevel::info, "upgrade", "upgrade: new master pid " + std::to_string(successor_.pid()) +
        " is serving; this master shuts down");
    UpgradeReport report{true, successor_.pid(), {}};
    answer_upgrade_waiters(report);
    control_.stop_listening();  // new clients reach the new master; these connections stay
    emit(on_upgrade_done_, report);
    shutdown();
  }

  Options opts_;
  detail::MasterLog log_{opts_};
  detail::Phase phase_ = detail::Phase::starting;
  [[no_unique_address]] Restart restart_;
  [[no_unique_address]] Codec codec_;
  [[no_unique_address]] Balance balance_;
  std::vector<std::string> master_argv_;  // what an upgrade executes
  std::string master_path_;
  std::optional<detail::UpgradeBoot> upgrade_boot_;  // set in a master started by an upgrade
  std::vector<std::string> specs_;  // per listener: its listen entry, or kActivatedSpec + ...
  std::vector<detail::ActivatedSocket> activated_;  // passed by systemd, not adopted yet
  detail::Notifier notifier_;  // disabled unless NOTIFY_SOCKET was set
  bool ready_notified_ = false, stopping_notified_ = false;
  bool prepared_ = false;     // prepare_to_serve() ran
  detail::Credentials credentials_;  // Options::user/group, resolved; what workers switch to
  detail::PidFile pid_file_;         // Options::pid_file, held while this master runs
  std::string upgrade_refusal_;      // why the last upgrade() returned false
  bool pid_file_handover_ = false;   // started by an upgrade: take the pid file once serving
  EventLoop loop_;
  detail::Successor successor_{loop_};  // after loop_: it unwatches on destruction
  detail::ControlServer control_{loop_};  // Options::control
  bool control_owned_ = false;  // the socket file is this master's to remove on exit
  std::vector<detail::ControlReply> reload_waiters_;       // answered when this pass ends
  std::vector<detail::ControlReply> reload_waiters_next_;  // asked during it: the next pass
  std::vector<detail::ControlReply> upgrade_waiters_;
  std::vector<UniqueFd> listeners_;
  std::vector<std::string> addresses_;
  bool bound_ = false;
  detail::WorkerTable<Codec> table_;
  // EMFILE, ENFILE, ENOBUFS, ENOMEM pause accepting for 100 ms at a time. Logged once per
  // episode, not once per pause: at the descriptor limit one accept may succeed after each pause
  // (a worker's acknowledgement freed a descriptor) and fail again, so the episode ends after a
  // second without a failure.
  detail::Acceptor acceptor_{
      loop_, {.length = std::chrono::milliseconds(100), .quiet = std::chrono::seconds(1)},
      {.stop = [this] { stop_accepting(); },
       .resume = [this] {
         // Only master dispatch accepts here (and only it has a pick() to instantiate).
         if constexpr (!KernelDispatch<Balance>) resume_accepting();
       },
       .log = [this](int err) {
         log(LogLevel::warning, "accept",
             std::string("accept: ") + std::strerror(err) +
                 "; pausing accept for 100 ms at a time while it fails");
       }}};
  std::vector<WorkerLoad> ready_;        // workers taking connections (scratch, reused)
  std::vector<Record*> ready_workers_;  // the same, as records
  std::deque<detail::Handoff> pending_;  // accepted, not handed to any worker yet
  struct Peeking {
    detail::Handoff h;
    EventLoop::TimerId deadline = 0;
  };
  std::map<int, Peeking> peeking_;  // PeeksFirstBytes: accepted, waiting for the first bytes
  std::string peek_buf_;            // PeeksFirstBytes: scratch for MSG_PEEK
  std::vector<std::vector<UniqueFd>> slot_listeners_;  // ReusePort: per slot
  ReloadState reload_;
  std::unique_ptr<detail::StoreHost> store_;
  // From the snapshot an upgrade's new master loads until the upgrade ends, store
  // operations wait here, unapplied, so that this store never changes behind the snapshot.
  enum class StoreState { serving, held, handed_over };
  struct HeldStoreOp {
    unsigned worker;
    std::uint64_t tag;
    std::string payload;
  };
  StoreState store_state_ = StoreState::serving;
  std::vector<HeldStoreOp> held_store_;
  std::vector<std::shared_ptr<StatusQuery>> status_queries_;
  Clock::time_point started_ = Clock::now();
  std::exception_ptr failure_;  // the first exception a callback let escape: run() rethrows it

  std::function<void(WorkerT&)> on_fork_, on_online_, on_listening_, on_disconnect_;
  std::function<void(WorkerT&, const ExitInfo&)> on_exit_;
  std::function<void(WorkerT&, const message_type&)> on_message_;
  std::function<void(WorkerT&, std::error_code)> on_error_;
  std::function<void(WorkerT&, const message_type&, Reply<Codec>)> on_request_;
  std::function<void(std::size_t, const ExitInfo&)> on_errored_;
  std::function<void(const ReloadReport&)> on_reload_done_;
  std::function<void(const UpgradeReport&)> on_upgrade_done_;

  // The life parts: starting workers, their lifecycle and exits, the periodic checks.
  detail::Spawner<Codec> spawner_;
  detail::Supervisor<Codec, Restart> supervisor_{loop_, table_, log_, phase_, restart_, codec_};
  detail::Watchdog<Codec> watchdog_{loop_, opts_, table_, log_, phase_};
};

}  // namespace prefork

#if defined(PREFORK_SEPARATE_COMPILATION)
// Separate compilation: the master for Cluster's default policies. Its public members that do
// more than set a field are instantiated once, in <prefork/impl/src.hpp>, from this one list
// (used there with INSTANTIATE = `template`, here with `extern template`). Not the whole class:
// an explicit instantiation of a class instantiates every member, also those a policy's kind
// never calls (the first-bytes peeking, for RoundRobin).
#include <prefork/balance/round_robin.hpp>
namespace prefork::detail {
using DefaultMaster = Master<RoundRobin, Backoff<RestartOnCrash>, StringCodec>;
}  // namespace prefork::detail
// Spelled out, not the alias: an explicit instantiation names a member through a template-id.
#define PREFORK_DETAIL_DEFAULT_MASTER Master<RoundRobin, Backoff<RestartOnCrash>, StringCodec>
#define PREFORK_DETAIL_DEFAULT_MASTER_MEMBERS(INSTANTIATE)                                     \
  INSTANTIATE void PREFORK_DETAIL_DEFAULT_MASTER::bind();                                      \
  INSTANTIATE detail::DefaultMaster::WorkerT* PREFORK_DETAIL_DEFAULT_MASTER::fork();           \
  INSTANTIATE std::vector<detail::DefaultMaster::WorkerT*>                                     \
      PREFORK_DETAIL_DEFAULT_MASTER::workers() const;                                          \
  INSTANTIATE detail::DefaultMaster::WorkerT* PREFORK_DETAIL_DEFAULT_MASTER::worker(unsigned)  \
      const;                                                                                   \
  INSTANTIATE std::error_code PREFORK_DETAIL_DEFAULT_MASTER::send(unsigned, const std::string&); \
  INSTANTIATE std::size_t PREFORK_DETAIL_DEFAULT_MASTER::broadcast(const std::string&);        \
  INSTANTIATE EventLoop::TimerId PREFORK_DETAIL_DEFAULT_MASTER::every(Clock::duration,         \
                                                                      std::function<void()>);  \
  INSTANTIATE EventLoop::TimerId PREFORK_DETAIL_DEFAULT_MASTER::after(Clock::duration,         \
                                                                      std::function<void()>);  \
  INSTANTIATE void PREFORK_DETAIL_DEFAULT_MASTER::shutdown(bool);                              \
  INSTANTIATE void PREFORK_DETAIL_DEFAULT_MASTER::reload();                                    \
  INSTANTIATE bool PREFORK_DETAIL_DEFAULT_MASTER::upgrade();                                   \
  INSTANTIATE void PREFORK_DETAIL_DEFAULT_MASTER::listen_control(const std::string&);          \
  INSTANTIATE ClusterStatus PREFORK_DETAIL_DEFAULT_MASTER::status() const;                     \
  INSTANTIATE void PREFORK_DETAIL_DEFAULT_MASTER::query_status(                                \
      std::function<void(const ClusterStatus&)>, Clock::duration);                             \
  INSTANTIATE std::error_code PREFORK_DETAIL_DEFAULT_MASTER::scale(std::size_t);               \
  INSTANTIATE int PREFORK_DETAIL_DEFAULT_MASTER::run();
namespace prefork {
PREFORK_DETAIL_DEFAULT_MASTER_MEMBERS(extern template)
}  // namespace prefork
#endif

#endif  // PREFORK_MASTER_HPP
