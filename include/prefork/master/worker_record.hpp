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
  bool is_dead() const noexcept { return state == WorkerState::dead; }

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
    exited_after_disconnect = true;
    if (is_connected()) channel->send(FrameKind::disconnect, {});
    arm_escalation();
  }

  std::error_code kill(int sig) {
    if (is_dead()) return std::make_error_code(std::errc::no_such_process);
    exited_after_disconnect = true;
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
  WorkerState state = WorkerState::none;
  bool exited_after_disconnect = false;
  bool listened = false;
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
  bool hung = false;                       // the watchdog gave up on it
  bool start_timed_out = false;            // killed at start_timeout
  std::string recycle_reason;              // set once a recycle was asked for
  ExitInfo exit;
  EventLoop::TimerId escalation_timer = 0;
  Worker<Codec> handle{*this};  // last: what callbacks get
};

}  // namespace prefork::detail

#endif  // PREFORK_MASTER_WORKER_RECORD_HPP
