// The vocabulary shared by both roles: cluster options, worker states and exit records, in
// Node's cluster names (online, listening, disconnected, exited_after_disconnect).
#ifndef PREFORK_OPTIONS_HPP
#define PREFORK_OPTIONS_HPP

#include <sched.h>
#include <unistd.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include <prefork/version.hpp>
#include <prefork/clock.hpp>
#include <prefork/detail/store_memory.hpp>
#include <prefork/log.hpp>

namespace prefork {

/// The number of CPUs this process may run on (sched_getaffinity), at least 1.
inline unsigned cpu_count() noexcept {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (::sched_getaffinity(0, sizeof set, &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n > 0) return static_cast<unsigned>(n);
  }
  long n = ::sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? static_cast<unsigned>(n) : 1u;
}

/// How a worker process comes to life.
enum class SpawnMode {
  fork,  ///< the child of fork() builds the Server; shares the master's memory copy-on-write
  exec,  ///< the child re-executes /proc/self/exe, so main() runs again (deploys a new binary)
};

/// Worker states, in the order Node's cluster walks through them.
enum class WorkerState { none, online, listening, disconnected, dead };

inline constexpr std::string_view to_string(WorkerState s) noexcept {
  switch (s) {
    case WorkerState::none: return "none";
    case WorkerState::online: return "online";
    case WorkerState::listening: return "listening";
    case WorkerState::disconnected: return "disconnected";
    case WorkerState::dead: return "dead";
  }
  return "unknown";
}

/// How and why a worker process ended. Exactly one of exit_code/signal describes the end:
/// signal is 0 when the process exited, and exit_code is -1 when a signal killed it.
struct ExitInfo {
  int exit_code = -1;                   ///< the status passed to exit(), or -1
  int signal = 0;                       ///< the signal that killed the process, or 0
  bool exited_after_disconnect = false; ///< a planned exit: disconnect(), kill() or shutdown
  /// The worker got as far as 'listening' (without listen addresses: its Server was built and
  /// its loop turned), i.e. its start-up worked.
  bool reached_listening = false;
  bool start_timed_out = false;         ///< killed by the master at Options::start_timeout
  /// The worker took a connection or counted a request (WorkerContext::request_done), as it
  /// reported to the master: it did some work before it exited.
  bool served = false;
  std::chrono::milliseconds uptime{0};  ///< from fork to exit
  std::string reason{};                 ///< why the master ended it, if it did ("drain timeout")

  bool crashed() const noexcept { return exit_code != 0; }
};

/// How a rolling restart ended (Master::on_reload_done).
struct ReloadReport {
  bool ok = false;                     ///< every worker was replaced and the old ones have exited
  unsigned replaced = 0;               ///< old workers drained after their replacement listened
  std::chrono::milliseconds took{0};   ///< from reload() to the exit of the last old worker
  std::string reason{};                ///< why it stopped, when !ok
};

/// How a master upgrade ended, as the old master sees it (Master::on_upgrade_done).
struct UpgradeReport {
  bool ok = false;       ///< the new master is serving; this one is shutting down
  int new_master = -1;   ///< the new master's pid
  std::string reason{};  ///< why it failed, when !ok
};

/// Options for a Cluster. Aggregate: use designated initializers.
struct Options {
  /// Worker processes to keep running; one per CPU by default.
  unsigned workers = cpu_count();
  /// Addresses to listen on: "127.0.0.1:8080", "0.0.0.0:0", "[::1]:8080", "unix:/path", or a
  /// host name ("localhost:8080"), resolved at bind time: every address it resolves to.
  std::vector<std::string> listen{};
  /// listen(2) backlog for each listening socket.
  int backlog = 511;
  /// TCP listeners: hand a connection over only once the client has sent its first bytes
  /// (TCP_DEFER_ACCEPT), or after about this long. For protocols where the client speaks first
  /// (HTTP): fewer wake-ups, and a worker never holds a connection it could not have read
  /// yet, so one that crashes between requests loses none. 0 (the default): off.
  std::chrono::seconds defer_accept{0};
  SpawnMode spawn = SpawnMode::fork;
  /// After disconnect() a worker has this long to drain before it gets SIGTERM...
  std::chrono::milliseconds drain_timeout{10000};
  /// ...and then this long before SIGKILL.
  std::chrono::milliseconds kill_timeout{5000};
  /// Rolling restart: how many replacement workers start at once (each old worker is drained
  /// once its replacement is listening).
  unsigned reload_surge = 1;
  /// Rolling restart: a replacement must be listening (online, if the cluster listens on
  /// nothing) within this long, or it is killed, the rolling restart stops, and the old
  /// workers keep serving.
  std::chrono::milliseconds reload_timeout{30000};
  /// Master upgrade: the new master must have every worker listening within this long, or it is
  /// killed and this master keeps serving.
  std::chrono::milliseconds upgrade_timeout{60000};
  /// Hung-worker watchdog: each worker's loop sends a heartbeat every quarter of this; a
  /// listening worker not heard from for this long gets no more connections, is replaced at
  /// once, and gets SIGTERM, then SIGKILL after kill_timeout (ExitInfo::reason "watchdog: ...").
  /// 0: off.
  std::chrono::milliseconds watchdog_timeout{30000};
  /// A worker not listening (when the cluster listens on nothing: whose Server is not built)
  /// this long after it was started is killed with SIGKILL (reason "start timeout: ...",
  /// ExitInfo::start_timed_out); the RestartPolicy then decides, as for any crash. 0: off.
  std::chrono::milliseconds start_timeout{60000};
  /// Recycling: a worker is replaced gracefully (replacement first, then a drain; one at a time)
  /// after it has taken max_connections connections (0: never), plus a random 0..jitter of its
  /// own so that workers do not recycle together...
  std::uint64_t max_connections = 0;
  std::uint64_t max_connections_jitter = 0;
  /// ...after max_requests requests, as the Server counts them with
  /// WorkerContext::request_done() (0: never), plus a random 0..jitter...
  std::uint64_t max_requests = 0;
  std::uint64_t max_requests_jitter = 0;
  /// ...after it has run max_lifetime, plus a random 0-10% (0: never)...
  std::chrono::milliseconds max_lifetime{0};
  /// ...or once its resident memory exceeds max_rss bytes, checked at least once a second
  /// (0: never).
  std::size_t max_rss = 0;
  /// Largest user or internal message a channel accepts, in bytes (payload, not framing).
  std::size_t max_message_size = std::size_t{256} << 20;
  /// Bytes a channel may hold queued for sending before send() reports errc::queue_full; an
  /// empty queue always takes one message, however large (up to max_message_size).
  std::size_t max_queued_bytes = std::size_t{64} << 20;
  /// The shared store's bounds (the default MemoryStore; Master::use_store replaces it).
  StoreLimits store_limits{};
  /// If set, the master loads the store from this file before it forks (a missing file is an
  /// empty store; an unreadable or corrupt one stops run() with an error, so that it is never
  /// overwritten), and saves it there on shutdown and before a master upgrade, crash-safely.
  std::string store_snapshot{};
  /// If set, run() publishes the master's pid there (atomically: a reader never sees it empty)
  /// before it binds, holds a lock on it for the master's life, and removes it on exit. A file
  /// a live master holds stops run() with an error naming that master's pid; a stale one (its
  /// master is gone) is replaced. A master upgrade hands it to the new master once that one
  /// serves, and the old master leaves it in place.
  std::string pid_file{};
  /// Workers run as this user: a name, or a numeric uid (empty: as the master). The group is
  /// the user's primary group unless `group` is set; the supplementary groups are the user's.
  /// Needs a master running as root, which keeps its privileges (it binds privileged ports
  /// and re-executes itself on an upgrade); the Cluster constructor throws
  /// std::invalid_argument for an unknown name, run() std::system_error for a master that is
  /// not root. Each worker switches right after fork(), before the exec in exec mode, so no
  /// worker code runs as root; one that cannot switch exits with status 1.
  std::string user{};
  /// Workers run with this group: a name, or a numeric gid (empty: the user's primary group,
  /// or the master's group without `user`).
  std::string group{};
  /// The master installs handlers for SIGTERM/SIGINT (graceful shutdown, twice: fast), SIGUSR2
  /// (rolling restart) and SIGUSR1 (master upgrade). Turn off to manage signals yourself.
  bool handle_signals = true;
  /// Speak systemd's protocols when started by it: serve on the sockets socket activation
  /// passed (LISTEN_FDS) instead of binding, and report READY=1, RELOADING=1, STOPPING=1,
  /// STATUS=, WATCHDOG=1 and MAINPID= to $NOTIFY_SOCKET. Without those variables it does
  /// nothing. false: leave the variables and the passed descriptors alone.
  bool systemd = true;
  /// exec mode: the program and arguments of the workers; empty means this process's own
  /// /proc/self/exe with its original argv.
  std::vector<std::string> exec_argv{};
  /// Where the library's log records go, from the master and (in both spawn modes) from the
  /// workers: one per lifecycle event (fork, online, listening, disconnect, exit), operation
  /// (reload, upgrade, scale, shutdown, control) and diagnostic. Empty: format_log_line() to
  /// stderr, one line each, dropped rather than blocking when stderr is full (log.hpp).
  LogSink log{};
  /// If set, the master serves its control socket here (control.hpp): a Unix socket, mode
  /// 0600, that takes JSON lines (status, reload, scale, stop, upgrade) from the master's own
  /// uid or root. run() throws std::system_error if a live master serves on it, or the path
  /// is not a socket; a stale one is replaced. A master upgrade hands it to the new master.
  std::string control{};
};

}  // namespace prefork

#endif  // PREFORK_OPTIONS_HPP
