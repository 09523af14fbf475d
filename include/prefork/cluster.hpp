// Cluster<Server, BalancePolicy, RestartPolicy, MessageCodec>: the facade (Node's
// lib/cluster.js). The same binary is master or worker: in fork mode the child of fork() runs
// the worker and never returns here; in exec mode main() runs again and is_worker() is true.
#ifndef PREFORK_CLUSTER_HPP
#define PREFORK_CLUSTER_HPP

#include <fcntl.h>
#include <sys/stat.h>

#include <cstddef>
#include <cstdlib>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

#include <prefork/version.hpp>
#include <prefork/balance/policy.hpp>
#include <prefork/balance/round_robin.hpp>
#include <prefork/balance/shared_accept.hpp>
#include <prefork/codec.hpp>
#include <prefork/detail/boot.hpp>
#include <prefork/detail/process.hpp>
#include <prefork/master.hpp>
#include <prefork/options.hpp>
#include <prefork/restart.hpp>
#include <prefork/server.hpp>
#include <prefork/worker.hpp>

namespace prefork {

namespace detail {

/// Reads PREFORK_WORKER (encode_boot()'s fields, comma-separated) and removes it from the
/// environment, so that neither user code nor the worker's own children see it.
inline std::optional<WorkerBoot> take_exec_boot() noexcept {
  const char* raw = std::getenv(kWorkerEnv);
  if (!raw) return std::nullopt;
  std::string value(raw);
  ::unsetenv(kWorkerEnv);
  std::optional<WorkerBoot> b = decode_boot(value);
  struct stat st {};
  if (!b || ::fstat(b->channel_fd, &st) != 0 || !S_ISSOCK(st.st_mode)) {
    child_error("ignoring a malformed PREFORK_WORKER environment variable");
    return std::nullopt;
  }
  ::fcntl(b->channel_fd, F_SETFD, FD_CLOEXEC);
  is_worker_process() = true;
  return b;
}

/// Runs before main(), so that the marker is gone before any user code can read it.
inline const std::optional<WorkerBoot> exec_boot = take_exec_boot();

// Cluster reaches the master's constructor and run() through these two function templates.
// They are not inline on purpose: in separate compilation mode (detail/config.hpp) prefork's
// src.hpp instantiates them for Cluster's default policies and the declarations at the end of
// this file keep a user's translation unit from instantiating them again. An extern template
// of Master alone is not enough: g++ and clang still instantiate an extern template's inline
// members (all of Master's, defined in its class) to inline them at -O1 and above, and from
// the constructor's callbacks and run() that is the whole master.
template <class Balance, class Restart, MessageCodec Codec>
void emplace_master(std::optional<Master<Balance, Restart, Codec>>& master, Options opts,
                    Restart restart,
                    typename Master<Balance, Restart, Codec>::ChildMain child_main) {
  master.emplace(std::move(opts), std::move(restart), std::move(child_main));
}

template <class Balance, class Restart, MessageCodec Codec>
int run_master(Master<Balance, Restart, Codec>& master) {
  return master.run();
}

}  // namespace detail

/// A cluster of worker processes, each running a Server.
///
/// Server: built in each worker after it starts, from WorkerContext<Codec>& (or default);
/// optional hooks on_connection, on_message, on_request, on_drain, on_listening (the Server
/// concept, server.hpp: a hook with the wrong signature stops the build, naming the hook).
/// The master-side members (callbacks, send, broadcast, timers...) do nothing in a worker.
template <class Server, BalancePolicy Balance = RoundRobin,
          RestartPolicy Restart = Backoff<RestartOnCrash>, MessageCodec Codec = StringCodec>
class Cluster {
  static_assert(detail::check_server<Server, Codec>());

 public:
  using MasterT = Master<Balance, Restart, Codec>;
  using WorkerT = Worker<Codec>;
  using Context = WorkerContext<Codec>;
  using message_type = typename Codec::message_type;

  /// Throws std::invalid_argument for bad options (in the master).
  explicit Cluster(Options opts = {}, Restart restart = {}) {
    if (detail::exec_boot) {
      boot_ = *detail::exec_boot;
      worker_log_ = std::move(opts.log);
    } else {
      // A forked worker logs through the master's sink (its copy, after fork).
      detail::emplace_master(master_, std::move(opts), std::move(restart),
                             [this](const detail::WorkerBoot& b) {
                               return detail::run_worker<Server, Codec>(b, master_->options().log);
                             });
    }
  }

  bool is_master() const noexcept { return master_.has_value(); }
  bool is_worker() const noexcept { return !master_.has_value(); }

  /// Master: binds, forks, supervises; returns 0 after a graceful shutdown, throws
  /// std::system_error for set-up failures (e.g. the port is in use). Worker (exec mode):
  /// serves and returns the worker's exit status.
  int run() {
    if (master_) return detail::run_master(*master_);
    return detail::run_worker<Server, Codec>(*boot_, worker_log_);
  }

  /// The master's full API. Throws std::logic_error in a worker.
  MasterT& master() {
    if (!master_) throw std::logic_error("prefork: Cluster::master() called in a worker");
    return *master_;
  }

  void bind() { if (master_) master_->bind(); }
  std::vector<std::string> addresses() const {
    return master_ ? master_->addresses() : std::vector<std::string>{};
  }
  std::vector<WorkerT*> workers() const { return master_ ? master_->workers() : std::vector<WorkerT*>{}; }
  WorkerT* fork() { return master_ ? master_->fork() : nullptr; }
  std::error_code send(unsigned id, const message_type& m) {
    return master_ ? master_->send(id, m) : make_error_code(errc::no_such_worker);
  }
  std::size_t broadcast(const message_type& m) { return master_ ? master_->broadcast(m) : 0; }
  void shutdown(bool fast = false) { if (master_) master_->shutdown(fast); }
  bool shutting_down() const noexcept { return master_ && master_->shutting_down(); }
  void reload() { if (master_) master_->reload(); }
  bool upgrade() { return master_ && master_->upgrade(); }
  /// Master::scale: the number of workers while running; std::errc::operation_not_supported
  /// in a worker.
  std::error_code scale(std::size_t n) {
    return master_ ? master_->scale(n) : std::make_error_code(std::errc::operation_not_supported);
  }
  /// Master::workers_wanted: the worker slots (Options::workers, then as scale() set it); 0 in
  /// a worker.
  std::size_t workers_wanted() const noexcept { return master_ ? master_->workers_wanted() : 0; }
  /// Master::status: the master and its workers now (empty in a worker).
  ClusterStatus status() const { return master_ ? master_->status() : ClusterStatus{}; }
  /// Master::query_status: cb(status) with every worker's fresh counters (never in a worker).
  void query_status(std::function<void(const ClusterStatus&)> cb) {
    if (master_) master_->query_status(std::move(cb));
  }
  /// Master::listen_control: serve the control socket on `path` (before run()).
  void listen_control(const std::string& path) { if (master_) master_->listen_control(path); }
  /// In a master started by an upgrade, the old master's pid; 0 otherwise (and in a worker).
  pid_t upgraded_from() const noexcept { return master_ ? master_->upgraded_from() : 0; }
  EventLoop::TimerId every(Clock::duration d, std::function<void()> cb) {
    return master_ ? master_->every(d, std::move(cb)) : 0;
  }
  EventLoop::TimerId after(Clock::duration d, std::function<void()> cb) {
    return master_ ? master_->after(d, std::move(cb)) : 0;
  }
  bool cancel(EventLoop::TimerId id) { return master_ && master_->cancel(id); }

  void on_fork(std::function<void(WorkerT&)> cb) { if (master_) master_->on_fork(std::move(cb)); }
  void on_online(std::function<void(WorkerT&)> cb) { if (master_) master_->on_online(std::move(cb)); }
  /// cb(Worker&) or cb(Worker&, const std::vector<std::string>& addresses).
  template <class F>
  void on_listening(F cb) { if (master_) master_->on_listening(std::move(cb)); }
  void on_disconnect(std::function<void(WorkerT&)> cb) { if (master_) master_->on_disconnect(std::move(cb)); }
  void on_exit(std::function<void(WorkerT&, const ExitInfo&)> cb) { if (master_) master_->on_exit(std::move(cb)); }
  void on_message(std::function<void(WorkerT&, const message_type&)> cb) { if (master_) master_->on_message(std::move(cb)); }
  void on_error(std::function<void(WorkerT&, std::error_code)> cb) { if (master_) master_->on_error(std::move(cb)); }
  /// The shared store's backend (Master::use_store); nothing in a worker.
  template <Store S>
  void use_store(S store) { if (master_) master_->use_store(std::move(store)); }
  /// Requests from workers: cb(worker, message, reply); see Master::on_request.
  void on_request(std::function<void(WorkerT&, const message_type&, Reply<Codec>)> cb) { if (master_) master_->on_request(std::move(cb)); }
  void on_errored(std::function<void(std::size_t, const ExitInfo&)> cb) { if (master_) master_->on_errored(std::move(cb)); }
  /// cb(const ReloadReport&) or cb(bool ok).
  template <class F>
  void on_reload_done(F cb) { if (master_) master_->on_reload_done(std::move(cb)); }
  void on_upgrade_done(std::function<void(const UpgradeReport&)> cb) { if (master_) master_->on_upgrade_done(std::move(cb)); }

 private:
  std::optional<MasterT> master_;
  std::optional<detail::WorkerBoot> boot_;
  LogSink worker_log_;  // exec mode: Options::log, for this worker
};

}  // namespace prefork

#if defined(PREFORK_SEPARATE_COMPILATION)
// Cluster's way into the master for its default policies, instantiated once in
// <prefork/impl/src.hpp> (see emplace_master above).
namespace prefork::detail {
extern template void emplace_master(std::optional<DefaultMaster>&, Options,
                                    Backoff<RestartOnCrash>, DefaultMaster::ChildMain);
extern template int run_master(DefaultMaster&);
}  // namespace prefork::detail
#endif

#endif  // PREFORK_CLUSTER_HPP
