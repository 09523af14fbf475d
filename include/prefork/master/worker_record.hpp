// The master's record of one worker process: everything the master's parts know and decide
// about it (pid, channel, lifecycle, dispatch bookkeeping, watchdog clocks, exit record), and
// the graceful disconnect with its escalation to SIGTERM and SIGKILL. The application sees it
// only through its public handle, Worker (worker_handle.hpp).
#ifndef PREFORK_MASTER_WORKER_RECORD_HPP
#define PREFORK_MASTER_WORKER_RECORD_HPP

#include <signal.h>
#include <sys/types.h>

#include <chrono>
#include <deque>
#include <memory>
#include <string>
#include <system_error>

#include <prefork/version.hpp>
#include <prefork/channel.hpp>
#include <prefork/codec.hpp>
#include <prefork/detail/process.hpp>
#include <prefork/detail/socket.hpp>
#include <prefork/event_loop.hpp>
#include <prefork/options.hpp>
#include <prefork/request.hpp>
#include <prefork/worker.hpp>
#include <prefork/worker_handle.hpp>

namespace prefork::detail {

/// A connection the master accepted, with its own copy of the socket.
struct Handoff {
  UniqueFd fd;
  SocketAddress peer;
};

/// Where a worker is in its life, as the master's parts see it: one value, moved forward only
/// (starting -> serving -> draining or condemned -> disconnected -> dead; a step may be
/// skipped). Node's WorkerState (`state`: none, online, listening, disconnected, dead) is the
/// projection the application sees; the parts decide through the record's predicates below,
/// never through `state` or this enum directly.
enum class Lifecycle : unsigned char {
  starting,      ///< forked; not ready yet
  serving,       ///< ready: 'listening', or 'started' when the cluster listens on nothing
  draining,      ///< a planned exit is under way (disconnect(), kill(), shutdown, its own
                 ///< disconnect): it finishes what it has and takes nothing new
  condemned,     ///< the master gave up on it (watchdog, start_timeout): being killed
  disconnected,  ///< its channel has closed; not reaped yet
  dead,          ///< reaped
};

/// One worker as the master's parts see it. Every member runs in the master process. Owned
/// by the master's worker table; `handle` is what application callbacks get, and stays valid
/// until the worker's 'exit' callbacks have returned.
template <MessageCodec Codec>
struct WorkerRecord {
  WorkerRecord(EventLoop& l, const Options& o, unsigned worker_id, std::size_t worker_slot)
      : loop(l), opts(o), id(worker_id), slot(worker_slot) {}
  WorkerRecord(const WorkerRecord&) = delete;
  WorkerRecord& operator=(const WorkerRecord&) = delete;
  // A Reply kept past the worker's life (in a timer, say) must not answer into a dead channel.
  ~WorkerRecord() { link->channel = nullptr; }

  bool is_connected() const noexcept { return channel && channel->is_open(); }
  bool is_dead() const noexcept { return lifecycle == Lifecycle::dead; }

  // The predicates every part decides by.
  /// Dealt new connections (master dispatch) and counted as serving.
  bool takes_connections() const noexcept {
    return lifecycle == Lifecycle::serving && state == WorkerState::listening && is_connected();
  }
  /// Reads connections still (at shutdown, the ones accepted but not dealt out yet go to any
  /// such worker: a draining one serves what reaches it before the disconnect frame).
  bool accepts_handoffs() const noexcept {
    return state == WorkerState::listening && lifecycle != Lifecycle::condemned && is_connected();
  }
  /// Judged by the supervision tick (watchdog, start_timeout, max_lifetime, max_rss).
  bool supervised() const noexcept {
    return lifecycle == Lifecycle::starting || lifecycle == Lifecycle::serving;
  }
  /// Reached 'listening' (or 'started') at some point of its life.
  bool was_ready() const noexcept { return exit.reached_listening; }
  /// Ready now: was ready, and its channel is still open (a rolling restart, an upgrade and
  /// systemd's READY=1 wait for every slot to have such a worker).
  bool ready() const noexcept { return was_ready() && !gone(); }
  /// Its channel has closed, or it has been reaped: nothing more comes from it.
  bool gone() const noexcept {
    return lifecycle == Lifecycle::disconnected || lifecycle == Lifecycle::dead;
  }
  /// Its exit is planned (Node's exitedAfterDisconnect).
  bool planned() const noexcept { return exit.exited_after_disconnect; }
  /// On its way out: a planned exit, or condemned.
  bool leaving() const noexcept { return planned() || lifecycle == Lifecycle::condemned; }
  /// A replacement has been asked for (recycling); it serves until the replacement is ready.
  bool recycling() const noexcept { return !recycle_reason.empty(); }

  // The transitions.
  void became_ready() noexcept {
    exit.reached_listening = true;
    if (lifecycle == Lifecycle::starting) lifecycle = Lifecycle::serving;
  }
  void plan_exit() noexcept {
    exit.exited_after_disconnect = true;
    if (supervised()) lifecycle = Lifecycle::draining;
  }
  void condemn() noexcept {
    if (supervised()) lifecycle = Lifecycle::condemned;
  }
  void became_disconnected() noexcept {
    state = WorkerState::disconnected;
    lifecycle = Lifecycle::disconnected;
  }
  void became_dead() noexcept {
    state = WorkerState::dead;
    lifecycle = Lifecycle::dead;
  }

  std::error_code send(FrameKind kind, std::string bytes) {
    if (!is_connected()) return errc::channel_closed;
    return channel->send(kind, std::move(bytes));
  }

  std::error_code signal(int sig) noexcept {
    if (!pidfd || is_dead()) return std::make_error_code(std::errc::no_such_process);
    if (pidfd_send_signal(pidfd.get(), sig) != 0) return errno_code();
    return {};
  }

  // Worker::disconnect(): drain, then SIGTERM after drain_timeout, SIGKILL after kill_timeout.
  void disconnect() {
    if (is_dead()) return;
    plan_exit();
    if (is_connected()) channel->send(FrameKind::disconnect, {});
    arm_escalation();
  }

  std::error_code kill(int sig) {
    if (is_dead()) return std::make_error_code(std::errc::no_such_process);
    plan_exit();
    return signal(sig);
  }

  void arm_escalation() {
    if (escalation_timer) return;
    escalation_timer = loop.after(opts.drain_timeout, [this] {
      escalation_timer = 0;
      exit.reason = "drain timeout: SIGTERM after " +
                    std::to_string(opts.drain_timeout.count()) + " ms";
      signal(SIGTERM);
      escalation_timer = loop.after(opts.kill_timeout, [this] {
        escalation_timer = 0;
        exit.reason = "drain timeout: SIGKILL after SIGTERM was ignored";
        signal(SIGKILL);
      }, false);
    }, false);
  }

  // SIGTERM now, SIGKILL after kill_timeout (a hung worker: no drain to wait for).
  void terminate() {
    signal(SIGTERM);
    if (escalation_timer) loop.cancel(escalation_timer);
    escalation_timer = loop.after(opts.kill_timeout, [this] {
      escalation_timer = 0;
      exit.reason += "; SIGKILL after SIGTERM was ignored";
      signal(SIGKILL);
    }, false);
  }

  void cancel_timers() noexcept {
    if (escalation_timer) loop.cancel(escalation_timer);
    escalation_timer = 0;
  }

  EventLoop& loop;
  const Options& opts;
  const unsigned id;
  std::size_t slot;
  pid_t pid = -1;
  UniqueFd pidfd;
  std::unique_ptr<Channel> channel;
  std::shared_ptr<ReplyLink> link = std::make_shared<ReplyLink>();
  Requests<Codec> outgoing{loop, false};
  [[no_unique_address]] Codec codec;
  WorkerState state = WorkerState::none;  // Node's view; see Lifecycle
  Lifecycle lifecycle = Lifecycle::starting;
  std::size_t reported_connections = 0;  // open connections, as the worker last reported
  WorkerCounters counters;                // the same report's counters
  unsigned restarts = 0;
  std::deque<Handoff> in_flight;          // handed over, not yet acknowledged
  Clock::time_point unacked_since{};      // in_flight waits since (or since the last ack)
  Clock::time_point declined_until{};     // out of descriptors: offered none before this
  bool out_of_fds = false;                // declined since it last took one (logged once)
  Clock::time_point started = Clock::now();
  Clock::time_point last_heard = started;  // the last frame from it (watchdog)
  Clock::duration lifetime{};              // recycled after this long (0: never)
  std::string recycle_reason;              // set once a recycle was asked for
  ExitInfo exit;  // its exit record, filled in as it lives (planned, reached listening...)
  EventLoop::TimerId escalation_timer = 0;
  Worker<Codec> handle{*this};  // last: what callbacks get
};

}  // namespace prefork::detail

#endif  // PREFORK_MASTER_WORKER_RECORD_HPP
