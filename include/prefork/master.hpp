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
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <prefork/balance/policy.hpp>
#include <sys/socket.h>
#include <prefork/channel.hpp>
#include <prefork/codec.hpp>
#include <prefork/detail/process.hpp>
#include <prefork/detail/socket.hpp>
#include <prefork/event_loop.hpp>
#include <prefork/options.hpp>
#include <prefork/restart.hpp>
#include <prefork/worker.hpp>
#include <prefork/worker_handle.hpp>

extern char** environ;

namespace prefork {

namespace detail {

/// The environment variable that tells an exec'd worker who it is: "id,slot,fd,max,queued".
inline constexpr const char* kWorkerEnv = "PREFORK_WORKER";

/// This program's argv, from /proc/self/cmdline (the Cluster is not handed argv).
inline std::vector<std::string> own_argv() {
  std::ifstream in("/proc/self/cmdline", std::ios::binary);
  std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::string> argv;
  std::size_t start = 0;
  for (std::size_t i = 0; i < all.size(); ++i) {
    if (all[i] == '\0') {
      argv.emplace_back(all, start, i - start);
      start = i + 1;
    }
  }
  return argv;
}

/// The path of the binary on disk, resolved now: after a deploy replaces the file, exec'ing this
/// path runs the new binary (while /proc/self/exe would still name the old, deleted one).
inline std::string own_executable() {
  char buf[4096];
  ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) return "/proc/self/exe";
  return std::string(buf, static_cast<std::size_t>(n));
}

inline void validate(const Options& o) {
  auto bad = [](const std::string& what) { throw std::invalid_argument("prefork: Options." + what); };
  if (o.workers == 0) bad("workers must be at least 1");
  if (o.workers > 4096) bad("workers must be at most 4096, got " + std::to_string(o.workers));
  if (o.backlog <= 0) bad("backlog must be positive, got " + std::to_string(o.backlog));
  if (o.drain_timeout.count() < 0) bad("drain_timeout must not be negative");
  if (o.kill_timeout.count() < 0) bad("kill_timeout must not be negative");
  if (o.max_message_size == 0 || o.max_message_size > 0xffffffffu)
    bad("max_message_size must be between 1 byte and 4 GiB - 1");
  if (o.max_queued_bytes == 0) bad("max_queued_bytes must be positive");
  for (auto& l : o.listen) {
    SocketAddress a;
    if (parse_address(l, a))
      bad("listen: '" + l + "' is not HOST:PORT, [IPV6]:PORT or unix:PATH");
  }
}

}  // namespace detail

/// The master: every member runs in the master process, on the thread that calls run().
/// fork mode requires that thread to be the only one in the process when a worker is forked.
template <MessageCodec Codec, class Restart, class Balance>
class Master {
 public:
  using WorkerT = Worker<Codec>;
  using message_type = typename Codec::message_type;
  /// What a forked child runs (fork mode); returns the worker's exit status.
  using ChildMain = std::function<int(const detail::WorkerBoot&)>;

  /// Throws std::invalid_argument for bad options.
  Master(Options opts, Restart restart, ChildMain child_main)
      : opts_(std::move(opts)), restart_(std::move(restart)), child_main_(std::move(child_main)) {
    detail::validate(opts_);
    if (opts_.spawn == SpawnMode::exec) {
      exec_argv_ = opts_.exec_argv.empty() ? detail::own_argv() : opts_.exec_argv;
      exec_path_ = opts_.exec_argv.empty() ? detail::own_executable() : opts_.exec_argv.front();
      if (exec_argv_.empty()) throw std::invalid_argument("prefork: exec mode needs an argv");
    }
    slots_.resize(opts_.workers);
    loop_.on_exception([this](std::exception_ptr e) {
      try {
        std::rethrow_exception(e);
      } catch (const std::exception& x) {
        log(std::string("exception in a master callback: ") + x.what());
      } catch (...) {
        log("non-standard exception in a master callback");
      }
    });
  }
  Master(const Master&) = delete;
  Master& operator=(const Master&) = delete;

  // Lifecycle callbacks, in Node's order: fork -> online -> listening -> disconnect -> exit.
  void on_fork(std::function<void(WorkerT&)> cb) { on_fork_ = std::move(cb); }
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
  /// The RestartPolicy gave up on a slot (crash loop); the master stays up without it.
  void on_errored(std::function<void(std::size_t slot, const ExitInfo&)> cb) {
    on_errored_ = std::move(cb);
  }
  /// A rolling restart finished (true) or was stopped because a replacement failed (false).
  void on_reload_done(std::function<void(bool ok)> cb) { on_reload_done_ = std::move(cb); }

  EventLoop& loop() noexcept { return loop_; }
  const Options& options() const noexcept { return opts_; }
  Restart& restart_policy() noexcept { return restart_; }

  /// Binds every listen address (idempotent). Throws std::system_error naming the address
  /// ("prefork: bind 127.0.0.1:8080: Address already in use"); nothing stays bound then.
  void bind() {
    if (bound_) return;
    std::vector<UniqueFd> fds;
    std::vector<std::string> names;
    std::vector<std::vector<UniqueFd>> sets;
    try {
      for (auto& spec : opts_.listen) {
        fds.push_back(detail::listen_on(spec, opts_.backlog, WantsReusePort<Balance>));
        names.push_back(detail::to_string(detail::local_address(fds.back().get())));
      }
      if constexpr (WantsReusePort<Balance>) {
        sets.push_back(std::move(fds));
        for (std::size_t s = 1; s < slots_.size(); ++s) sets.push_back(bind_set(names, &sets[0]));
      }
    } catch (...) {
      for (auto& n : names) detail::unlink_unix_socket(n);  // nothing stays bound
      throw;
    }
    listeners_ = std::move(fds);
    slot_listeners_ = std::move(sets);
    addresses_ = std::move(names);
    bound_ = true;
  }

  /// The bound addresses, with the ports the kernel chose for port 0. Empty before bind().
  const std::vector<std::string>& addresses() const noexcept { return addresses_; }

  /// Live workers (not yet exited), in id order.
  std::vector<WorkerT*> workers() const {
    std::vector<WorkerT*> v;
    for (auto& [id, w] : workers_) v.push_back(w.get());
    return v;
  }
  WorkerT* worker(unsigned id) const {
    auto it = workers_.find(id);
    return it == workers_.end() ? nullptr : it->second.get();
  }

  /// Adds a slot and forks a worker into it (Node's cluster.fork()). Returns nullptr if fork
  /// failed (logged; retried from a timer) or the master is shutting down.
  WorkerT* fork() {
    if (shutting_down_) return nullptr;
    slots_.emplace_back();
    return spawn(slots_.size() - 1);
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
    for (auto& [id, w] : workers_)
      if (w->is_connected() && !w->channel_->send(FrameKind::user, bytes)) ++n;
    return n;
  }

  EventLoop::TimerId every(Clock::duration d, std::function<void()> cb) {
    return loop_.every(d, std::move(cb), false);
  }
  EventLoop::TimerId after(Clock::duration d, std::function<void()> cb) {
    return loop_.after(d, std::move(cb), false);
  }
  bool cancel(EventLoop::TimerId id) noexcept { return loop_.cancel(id); }

  /// Graceful shutdown: stop restarting, close the listening sockets, disconnect every worker;
  /// run() returns 0 once all have exited. Called again (or with fast), it sends SIGTERM to
  /// every worker at once.
  void shutdown(bool fast = false) {
    bool again = shutting_down_;
    shutting_down_ = true;
    if (!again) {
      for (auto& s : slots_) cancel_restart(s);
      for (auto& l : listeners_) loop_.unwatch(l.get());
      listeners_.clear();
      slot_listeners_.clear();
      pending_.clear();
      for (auto& [id, w] : workers_) w->disconnect();
    }
    if (again || fast) {
      for (auto& [id, w] : workers_) {
        w->exited_after_disconnect_ = true;
        w->signal(SIGTERM);
      }
    }
    if (workers_.empty()) loop_.stop();
  }
  bool shutting_down() const noexcept { return shutting_down_; }

  /// Rolling restart: for each worker in turn, fork its replacement into the same slot, and
  /// once the replacement is listening (online, if the cluster does not listen), disconnect
  /// the old one. A request while one runs is coalesced into one more pass.
  void reload() {
    if (shutting_down_) return;
    if (reloading_) {
      reload_again_ = true;
      return;
    }
    reloading_ = true;
    reload_queue_.clear();
    for (auto& [id, w] : workers_)
      if (!w->exited_after_disconnect_ && slots_[w->slot_].worker_id == id)
        reload_queue_.push_back(id);
    reload_next();
  }
  bool reloading() const noexcept { return reloading_; }

  /// Binds, installs the signal handlers, forks the workers and supervises them until
  /// shutdown. Returns 0 after a graceful shutdown. Throws std::system_error for set-up
  /// failures (bind, signalfd); after set-up nothing a worker does ends it.
  int run() {
    bind();
    if (opts_.handle_signals) {
      loop_.on_signal(SIGTERM, [this](const signalfd_siginfo&) { shutdown(); });
      loop_.on_signal(SIGINT, [this](const signalfd_siginfo&) { shutdown(); });
      loop_.on_signal(SIGUSR2, [this](const signalfd_siginfo&) { reload(); });
    }
    for (std::size_t s = 0; s < slots_.size(); ++s)
      if (!slots_[s].worker_id) spawn(s);
    if constexpr (MasterDispatch<Balance>) resume_accepting();
    loop_.restart();
    loop_.run();
    for (auto& a : addresses_) detail::unlink_unix_socket(a);
    return 0;
  }

 private:
  struct Slot {
    unsigned worker_id = 0;  // the worker that owns the slot now, 0 if none
    EventLoop::TimerId restart_timer = 0;
    bool errored = false;
  };

  // ReusePort: each slot its own SO_REUSEPORT socket per listen address, bound to what the
  // first bind resolved (so port 0 means one port for all). A Unix socket cannot be balanced
  // that way: its slots share one socket, dup'ed from `model`. Every socket of the group must
  // have a worker accepting from it, since the kernel queues connections on idle members too:
  // a slot that will not be refilled has its sockets closed (after_exit), and bound again when
  // a worker is forked into it.
  std::vector<UniqueFd> bind_set(const std::vector<std::string>& names,
                                 const std::vector<UniqueFd>* model) {
    std::vector<UniqueFd> fds;
    for (std::size_t i = 0; i < names.size(); ++i) {
      if (names[i].starts_with("unix:") && model && i < model->size()) {
        int d = ::fcntl((*model)[i].get(), F_DUPFD_CLOEXEC, 0);
        if (d < 0) detail::throw_errno("dup listening socket");
        fds.emplace_back(d);
      } else {
        fds.push_back(detail::listen_on(names[i], opts_.backlog, true));
      }
    }
    return fds;
  }

  // Binds `slot`'s ReusePort sockets if it has none; false (logged) if that fails.
  bool ensure_slot_bound(std::size_t slot) {
    if (slot_listeners_.size() <= slot) slot_listeners_.resize(slot + 1);
    if (!slot_listeners_[slot].empty() || opts_.listen.empty()) return true;
    const std::vector<UniqueFd>* model = nullptr;
    for (auto& set : slot_listeners_)
      if (!set.empty()) model = &set;
    try {
      slot_listeners_[slot] = bind_set(addresses_, model);
      return true;
    } catch (const std::system_error& e) {
      log(std::string("cannot bind for slot ") + std::to_string(slot) + ": " + e.what());
      return false;
    }
  }

  void log(const std::string& msg) {
    if (opts_.log) {
      opts_.log(msg);
    } else {
      std::string line = "prefork: master (pid " + std::to_string(::getpid()) + "): " + msg + "\n";
      detail::write_all(2, line.data(), line.size());
    }
  }

  static std::string describe(const WorkerT& w) {
    return "worker " + std::to_string(w.id_) + " (pid " + std::to_string(w.pid_) + ")";
  }

  void cancel_restart(Slot& s) {
    if (s.restart_timer) loop_.cancel(s.restart_timer);
    s.restart_timer = 0;
  }

  // Everything the child must not keep: the master's loop, its listening sockets (a worker is
  // handed them over its channel), and every other worker's channel and pidfd.
  std::vector<int> master_only_fds() const {
    std::vector<int> fds = loop_.own_descriptors();
    for (auto& l : listeners_) fds.push_back(l.get());
    for (auto& set : slot_listeners_)
      for (auto& l : set) fds.push_back(l.get());
    for (auto& h : pending_) fds.push_back(h.fd.get());
    for (auto& [id, w] : workers_) {
      for (auto& h : w->in_flight_) fds.push_back(h.fd.get());
      if (w->channel_ && w->channel_->is_open()) fds.push_back(w->channel_->native_handle());
      if (w->pidfd_) fds.push_back(w->pidfd_.get());
    }
    return fds;
  }

  WorkerT* spawn(std::size_t slot) {
    Slot& s = slots_[slot];
    cancel_restart(s);
    s.errored = false;
    if constexpr (WantsReusePort<Balance>) {
      if (bound_ && !ensure_slot_bound(slot)) return retry_spawn(slot, "bind failed");
    }
    std::pair<UniqueFd, UniqueFd> pair;
    try {
      pair = make_channel_pair();
    } catch (const std::system_error& e) {
      return retry_spawn(slot, e.what());
    }
    auto& [mine, theirs] = pair;
    unsigned id = next_id_ + 1;
    detail::WorkerBoot boot{id, slot, theirs.get(),
                            {opts_.max_message_size, opts_.max_queued_bytes}};

    // Prepared before fork(): after it, the exec path only calls async-signal-safe functions.
    std::vector<std::string> env_store;
    std::vector<char*> argv, envp;
    if (opts_.spawn == SpawnMode::exec) {
      for (auto& a : exec_argv_) argv.push_back(const_cast<char*>(a.c_str()));
      argv.push_back(nullptr);
      std::string marker = std::string(detail::kWorkerEnv) + "=";
      for (char** e = environ; e && *e; ++e)
        if (std::strncmp(*e, marker.c_str(), marker.size()) != 0) env_store.emplace_back(*e);
      env_store.push_back(marker + std::to_string(id) + "," + std::to_string(slot) + "," +
                          std::to_string(theirs.get()) + "," +
                          std::to_string(opts_.max_message_size) + "," +
                          std::to_string(opts_.max_queued_bytes));
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
    next_id_ = id;
    theirs.reset();

    auto owned = std::unique_ptr<WorkerT>(new WorkerT(loop_, opts_, id, slot));
    WorkerT& w = *owned;
    w.pid_ = pid;
    w.pidfd_.reset(detail::pidfd_open(pid));
    if (!w.pidfd_) {
      // Without a pidfd we cannot reap this child safely; it is ours, so kill and reap it.
      log("pidfd_open failed for pid " + std::to_string(pid) + ": " + std::strerror(errno));
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
      return retry_spawn(slot, "pidfd_open failed");
    }
    w.channel_ = std::make_unique<Channel>(
        loop_, std::move(mine), ChannelLimits{opts_.max_message_size, opts_.max_queued_bytes});
    w.channel_->on_frame([this, &w](Frame&& f) { on_frame(w, std::move(f)); });
    w.channel_->on_close([this, &w](std::error_code ec) { on_channel_closed(w, ec); });
    loop_.watch(w.pidfd_.get(), EventLoop::readable, [this, &w](std::uint32_t) { on_pidfd(w); });
    s.worker_id = id;
    workers_.emplace(id, std::move(owned));
    if (bound_ && !opts_.listen.empty() && !shutting_down_) hand_listeners(w);
    if (on_fork_) on_fork_(w);
    return &w;
  }

  [[noreturn]] void child(const detail::WorkerBoot& boot, pid_t parent,
                          const std::vector<int>& close_fds, std::vector<char*>& argv,
                          std::vector<char*>& envp) noexcept {
    detail::die_with_parent(parent);
    detail::reset_signals_in_child();
    for (int fd : close_fds) ::close(fd);
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

  WorkerT* retry_spawn(std::size_t slot, const std::string& why) {
    log("cannot start a worker for slot " + std::to_string(slot) + ": " + why +
        "; retrying in 1 s");
    Slot& s = slots_[slot];
    s.restart_timer = loop_.after(std::chrono::seconds(1), [this, slot] {
      slots_[slot].restart_timer = 0;
      if (!shutting_down_) spawn(slot);
    }, false);
    return nullptr;
  }

  // Kernel dispatch: the worker gets its own copies of the listening sockets. Master dispatch:
  // an empty handles frame, which tells the worker to expect connections over the channel.
  void hand_listeners(WorkerT& w) {
    std::vector<UniqueFd> dups;
    const std::vector<UniqueFd>* source = &listeners_;
    if constexpr (WantsReusePort<Balance>) source = &slot_listeners_.at(w.slot_);
    if constexpr (KernelDispatch<Balance>) for (auto& l : *source) {
      int d = ::fcntl(l.get(), F_DUPFD_CLOEXEC, 0);
      if (d < 0) {
        log("dup of a listening socket failed: " + std::string(std::strerror(errno)));
        return;
      }
      dups.emplace_back(d);
    }
    w.channel_->send(FrameKind::handles, {}, 0, std::move(dups));
  }

  void protocol_error(WorkerT& w, std::error_code ec) {
    if (on_error_) {
      on_error_(w, ec);
    } else {
      log(describe(w) + ": " + ec.message() + "; killing it");
    }
    if (w.exit_.reason.empty()) w.exit_.reason = "protocol error: " + ec.message();
    w.signal(SIGKILL);
  }

  void on_frame(WorkerT& w, Frame&& f) {
    switch (f.kind) {
      case FrameKind::user: {
        std::error_code ec;
        auto m = codec_.decode(f.payload, ec);
        if (!m) {
          protocol_error(w, ec ? ec : make_error_code(errc::decode_failed));
          mark_disconnected(w);
          return;
        }
        if (on_message_) on_message_(w, *m);
        return;
      }
      case FrameKind::online:
        if (w.state_ != WorkerState::none) break;
        w.state_ = WorkerState::online;
        if (on_online_) on_online_(w);
        if (opts_.listen.empty()) reload_progress(w);  // nothing to listen on: online is ready
        return;
      case FrameKind::listening:
        if (w.state_ != WorkerState::online) break;
        w.state_ = WorkerState::listening;
        w.listened_ = true;
        if constexpr (requires(Restart& r) { r.on_listening(std::size_t{}); })
          restart_.on_listening(w.slot_);
        if (on_listening_) on_listening_(w);
        if constexpr (MasterDispatch<Balance>) resume_accepting();
        reload_progress(w);
        return;
      case FrameKind::disconnect:
        // The worker is draining on its own initiative (Node: worker.disconnect() in a worker).
        w.exited_after_disconnect_ = true;
        w.arm_escalation();
        return;
      case FrameKind::stats:
        w.reported_connections_ = static_cast<std::size_t>(f.tag);
        return;
      case FrameKind::accepted: {
        std::size_t n = std::min<std::size_t>(static_cast<std::size_t>(f.tag), w.in_flight_.size());
        w.in_flight_.erase(w.in_flight_.begin(), w.in_flight_.begin() + static_cast<std::ptrdiff_t>(n));
        if constexpr (MasterDispatch<Balance>) resume_accepting();
        return;
      }
      case FrameKind::heartbeat: return;
      default: break;
    }
    protocol_error(w, make_error_code(errc::malformed_frame));
    mark_disconnected(w);
  }

  void on_channel_closed(WorkerT& w, std::error_code ec) {
    if (ec != errc::channel_closed) protocol_error(w, ec);
    // A worker that closed its channel but keeps running is unsupervisable: give it the drain
    // deadline to exit, then escalate, as for a disconnect.
    w.arm_escalation();
    mark_disconnected(w);
  }

  void mark_disconnected(WorkerT& w) {
    if (w.state_ == WorkerState::disconnected || w.state_ == WorkerState::dead) return;
    if (w.channel_) w.channel_->close();
    w.state_ = WorkerState::disconnected;
    recover_in_flight(w);
    if (on_disconnect_) on_disconnect_(w);
  }

  // Connections handed to a worker that never acknowledged them (its channel closed with the
  // frames unread) are still open in the master: they go to another worker, first in line.
  void recover_in_flight(WorkerT& w) {
    if (w.in_flight_.empty()) return;
    pending_.insert(pending_.begin(), std::make_move_iterator(w.in_flight_.begin()),
                    std::make_move_iterator(w.in_flight_.end()));
    w.in_flight_.clear();
    if constexpr (MasterDispatch<Balance>) loop_.post([this] { resume_accepting(); });
  }

  void on_pidfd(WorkerT& w) {
    detail::Reaped r = detail::reap(w.pidfd_.get());
    if (!r.done) return;
    loop_.unwatch(w.pidfd_.get());
    w.pidfd_.reset();  // or a worker forked from an exit callback would inherit it
    // Deliver what the worker sent before it died, then 'disconnect' before 'exit' (Node).
    if (w.channel_ && w.channel_->is_open()) w.channel_->read_all_pending();
    mark_disconnected(w);
    w.cancel_timers();
    w.state_ = WorkerState::dead;
    w.exit_.exit_code = r.exit_code;
    w.exit_.signal = r.signal;
    w.exit_.exited_after_disconnect = w.exited_after_disconnect_;
    w.exit_.reached_listening = w.listened_;
    w.exit_.uptime =
        std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - w.started_);

    // Removed from the live list before 'exit' is emitted, as Node does; destroyed after.
    auto node = workers_.extract(w.id_);
    std::unique_ptr<WorkerT> owned = std::move(node.mapped());
    ExitInfo info = w.exit_;
    if (on_exit_) on_exit_(w, info);
    after_exit(w, info);
    if (shutting_down_ && workers_.empty()) loop_.stop();
  }

  void after_exit(WorkerT& w, const ExitInfo& info) {
    if (reloading_ && reload_new_ == w.id_ && w.state_ == WorkerState::dead) {
      // The replacement died before it was ready: stop, and give the slot back to the old one.
      Slot& s = slots_[w.slot_];
      if (worker(reload_old_)) s.worker_id = reload_old_;
      log("rolling restart stopped: replacement " + describe(w) + " exited before listening");
      finish_reload(false);
    }
    Slot& s = slots_[w.slot_];
    if (s.worker_id != w.id_) return;  // replaced already (rolling restart)
    s.worker_id = 0;
    if (shutting_down_) return;
    RestartDecision d = restart_.on_exit(w.slot_, info);
    using A = RestartDecision::Action;
    if constexpr (WantsReusePort<Balance>) {
      if (d.action != A::restart && w.slot_ < slot_listeners_.size())
        slot_listeners_[w.slot_].clear();  // nobody will accept there: stop the kernel routing to it
    }
    if (d.action == A::give_up) {
      s.errored = true;
      log("slot " + std::to_string(w.slot_) + " is errored: its workers keep exiting (last: " +
          describe(w) + ")");
      if (on_errored_) on_errored_(w.slot_, info);
    } else if (d.action == A::restart) {
      std::size_t slot = w.slot_;
      if (d.delay.count() <= 0) {
        spawn(slot);
      } else {
        s.restart_timer = loop_.after(d.delay, [this, slot] {
          slots_[slot].restart_timer = 0;
          if (!shutting_down_) spawn(slot);
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
  static constexpr std::size_t kMaxUnacked = 128;

  void resume_accepting() {
    if (shutting_down_ || accept_paused_) return;
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
    for (auto& [id, w] : workers_) {
      if (w->state_ == WorkerState::listening && !w->exited_after_disconnect_ &&
          w->is_connected() && w->in_flight_.size() < kMaxUnacked) {
        ready_.push_back({w->slot_, w->reported_connections_ + w->in_flight_.size()});
        ready_workers_.push_back(w.get());
      }
    }
  }

  // Hands one connection to a worker; false (and the connection back in `h`) if none can
  // take it now.
  bool dispatch(detail::Handoff& h) {
    if (ready_.empty()) return false;
    std::optional<std::size_t> pick = balance_.pick(PickContext{h.peer, ready_, slots_.size()});
    std::size_t first = pick && *pick < ready_.size() ? *pick : 0;
    for (std::size_t k = 0; k < ready_workers_.size(); ++k) {
      std::size_t i = (first + k) % ready_workers_.size();
      WorkerT* w = ready_workers_[i];
      if (w->in_flight_.size() >= kMaxUnacked || !w->channel_->has_room(h.peer.length)) continue;
      std::string address(reinterpret_cast<const char*>(&h.peer.storage), h.peer.length);
      if (w->channel_->send_borrowed(FrameKind::connection, std::move(address), 0, h.fd.get()))
        continue;
      w->in_flight_.push_back(std::move(h));
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
        log(std::string("accept: ") + std::strerror(errno) + "; pausing accept for 100 ms");
        stop_accepting();
        accept_paused_ = true;
        loop_.after(std::chrono::milliseconds(100), [this] {
          accept_paused_ = false;
          resume_accepting();
        }, false);
        return;
      }
      h.fd.reset(fd);
      if (!dispatch(h)) {
        pending_.push_back(std::move(h));
        return stop_accepting();
      }
    }
  }

  void reload_next() {
    while (!reload_queue_.empty()) {
      unsigned old_id = reload_queue_.front();
      reload_queue_.pop_front();
      WorkerT* old = worker(old_id);
      if (!old || old->exited_after_disconnect_) continue;
      reload_old_ = old_id;
      WorkerT* fresh = spawn(old->slot_);
      if (!fresh) {
        slots_[old->slot_].worker_id = old_id;
        log("rolling restart stopped: could not fork a replacement");
        return finish_reload(false);
      }
      reload_new_ = fresh->id_;
      return;
    }
    finish_reload(true);
  }

  void reload_progress(WorkerT& w) {
    if (!reloading_ || w.id_ != reload_new_) return;
    if (WorkerT* old = worker(reload_old_)) old->disconnect();
    reload_new_ = reload_old_ = 0;
    reload_next();
  }

  void finish_reload(bool ok) {
    reloading_ = false;
    reload_new_ = reload_old_ = 0;
    reload_queue_.clear();
    log(ok ? "rolling restart done" : "rolling restart failed; old workers keep serving");
    if (on_reload_done_) on_reload_done_(ok);
    if (ok && reload_again_) {
      reload_again_ = false;
      reload();
    }
    reload_again_ = false;
  }

  Options opts_;
  [[no_unique_address]] Restart restart_;
  [[no_unique_address]] Codec codec_;
  [[no_unique_address]] Balance balance_;
  ChildMain child_main_;
  std::vector<std::string> exec_argv_;
  std::string exec_path_;
  EventLoop loop_;
  std::vector<UniqueFd> listeners_;
  std::vector<std::string> addresses_;
  bool bound_ = false;
  std::map<unsigned, std::unique_ptr<WorkerT>> workers_;
  std::vector<Slot> slots_;
  unsigned next_id_ = 0;
  bool accept_paused_ = false;
  std::vector<WorkerLoad> ready_;        // workers taking connections (scratch, reused)
  std::vector<WorkerT*> ready_workers_;  // the same, as records
  std::deque<detail::Handoff> pending_;  // accepted, not handed to any worker yet
  std::vector<std::vector<UniqueFd>> slot_listeners_;  // ReusePort: per slot
  bool shutting_down_ = false;
  bool reloading_ = false;
  bool reload_again_ = false;
  std::deque<unsigned> reload_queue_;
  unsigned reload_old_ = 0, reload_new_ = 0;

  std::function<void(WorkerT&)> on_fork_, on_online_, on_listening_, on_disconnect_;
  std::function<void(WorkerT&, const ExitInfo&)> on_exit_;
  std::function<void(WorkerT&, const message_type&)> on_message_;
  std::function<void(WorkerT&, std::error_code)> on_error_;
  std::function<void(std::size_t, const ExitInfo&)> on_errored_;
  std::function<void(bool)> on_reload_done_;
};

}  // namespace prefork

#endif  // PREFORK_MASTER_HPP
