// The master's record of one worker process (Node's lib/internal/cluster/worker.js on the
// primary side): id, slot, pid, state, the channel to it, and the graceful disconnect with its
// escalation to SIGTERM and SIGKILL.
#ifndef PREFORK_WORKER_HANDLE_HPP
#define PREFORK_WORKER_HANDLE_HPP

#include <signal.h>
#include <sys/types.h>

#include <chrono>
#include <deque>
#include <functional>
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

namespace prefork {

namespace detail {
/// A connection the master accepted, with its own copy of the socket.
struct Handoff {
  UniqueFd fd;
  SocketAddress peer;
};
}  // namespace detail

template <class Balance, class Restart, MessageCodec Codec>
class Master;

/// One worker as the master sees it. Every member runs in the master process. A Worker& given
/// to a callback stays valid until the worker's 'exit' callbacks have returned.
template <MessageCodec Codec>
class Worker {
 public:
  using message_type = typename Codec::message_type;

  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;
  // A Reply kept past the worker's life (in a timer, say) must not answer into a dead channel.
  ~Worker() { link_->channel = nullptr; }

  /// 1 for the first worker forked, then 2, 3... never reused (Node's worker.id).
  unsigned id() const noexcept { return id_; }
  /// 0..workers-1; a replacement takes the slot of the worker it replaces.
  std::size_t slot() const noexcept { return slot_; }
  pid_t pid() const noexcept { return pid_; }
  WorkerState state() const noexcept { return state_; }
  /// The channel to the worker is open (Node's worker.isConnected()).
  bool is_connected() const noexcept { return channel_ && channel_->is_open(); }
  /// The process has exited and been reaped (Node's worker.isDead()).
  bool is_dead() const noexcept { return state_ == WorkerState::dead; }
  /// The exit is planned: disconnect() or kill() was called, the worker disconnected itself, or
  /// the master is shutting down (Node's worker.exitedAfterDisconnect).
  bool exited_after_disconnect() const noexcept { return exited_after_disconnect_; }
  Clock::time_point started_at() const noexcept { return started_; }
  /// Workers its slot had before this one (crash restarts, rolling restarts, recycling).
  unsigned restarts() const noexcept { return restarts_; }
  /// Open connections, as the worker last reported them (WorkerContext::connection_opened).
  std::size_t connections() const noexcept { return reported_connections_; }
  /// Connections taken and requests served (WorkerContext::request_done), as the worker last
  /// reported them: when its open count changed, or when Master::query_status asked.
  std::uint64_t connections_total() const noexcept { return counters_.connections_total; }
  std::uint64_t requests() const noexcept { return counters_.requests; }
  /// Valid once is_dead().
  const ExitInfo& exit_info() const noexcept { return exit_; }

  /// Sends a message to the worker. Errors, with nothing sent: errc::channel_closed,
  /// errc::frame_too_large, errc::queue_full (the worker is not reading: back-pressure).
  std::error_code send(const message_type& m) {
    if (!is_connected()) return errc::channel_closed;
    return channel_->send(FrameKind::user, std::string(codec_.encode(m)));
  }

  using RequestCallback = std::function<void(std::error_code, const message_type&)>;

  /// Sends `m` to the worker as a request; the Server's on_request(m, Reply) answers it.
  /// `cb(ec, reply)` then runs exactly once on the master's loop, never from inside request():
  /// with the reply and no error, or with ec set and a default message_type:
  /// errc::request_timeout, errc::peer_gone (the worker exited or its channel closed first; a
  /// replacement never answers its predecessor's requests), errc::no_handler (the Server has
  /// no on_request), errc::request_failed, errc::decode_failed, or what send() reports.
  void request(const message_type& m, RequestCallback cb,
               Clock::duration timeout = kDefaultRequestTimeout) {
    outgoing_.start(is_connected() ? channel_.get() : nullptr, FrameKind::request,
                    std::string(codec_.encode(m)), std::move(cb), timeout);
  }

  /// Asks the worker to drain and exit 0 (Node's worker.disconnect()): it stops accepting,
  /// finishes what it has, and exits. After Options::drain_timeout it gets SIGTERM, after a
  /// further Options::kill_timeout SIGKILL; the exit record's reason says so.
  void disconnect() {
    if (is_dead()) return;
    exited_after_disconnect_ = true;
    if (is_connected()) channel_->send(FrameKind::disconnect, {});
    arm_escalation();
  }

  /// Sends a signal now (default SIGTERM), without waiting for a drain. Counts as a planned
  /// exit: exited_after_disconnect() becomes true, as Node documents for worker.kill() (Node's
  /// code sets it only on the disconnect path; we follow the documentation so that
  /// RestartOnCrash never undoes a kill the application asked for). Returns the error of
  /// pidfd_send_signal(2); ESRCH once the process has exited.
  std::error_code kill(int sig = SIGTERM) {
    if (is_dead()) return std::make_error_code(std::errc::no_such_process);
    exited_after_disconnect_ = true;
    return signal(sig);
  }

 private:
  template <class, class, MessageCodec>
  friend class Master;

  Worker(EventLoop& loop, const Options& opts, unsigned id, std::size_t slot)
      : loop_(loop), opts_(opts), id_(id), slot_(slot) {}

  std::error_code signal(int sig) noexcept {
    if (!pidfd_ || is_dead()) return std::make_error_code(std::errc::no_such_process);
    if (detail::pidfd_send_signal(pidfd_.get(), sig) != 0) return detail::errno_code();
    return {};
  }

  void arm_escalation() {
    if (escalation_timer_) return;
    escalation_timer_ = loop_.after(opts_.drain_timeout, [this] {
      escalation_timer_ = 0;
      exit_.reason = "drain timeout: SIGTERM after " +
                     std::to_string(opts_.drain_timeout.count()) + " ms";
      signal(SIGTERM);
      escalation_timer_ = loop_.after(opts_.kill_timeout, [this] {
        escalation_timer_ = 0;
        exit_.reason = "drain timeout: SIGKILL after SIGTERM was ignored";
        signal(SIGKILL);
      }, false);
    }, false);
  }

  // SIGTERM now, SIGKILL after kill_timeout (a hung worker: no drain to wait for).
  void terminate() {
    signal(SIGTERM);
    if (escalation_timer_) loop_.cancel(escalation_timer_);
    escalation_timer_ = loop_.after(opts_.kill_timeout, [this] {
      escalation_timer_ = 0;
      exit_.reason += "; SIGKILL after SIGTERM was ignored";
      signal(SIGKILL);
    }, false);
  }

  void cancel_timers() noexcept {
    if (escalation_timer_) loop_.cancel(escalation_timer_);
    escalation_timer_ = 0;
  }

  EventLoop& loop_;
  const Options& opts_;
  unsigned id_;
  std::size_t slot_;
  pid_t pid_ = -1;
  UniqueFd pidfd_;
  std::unique_ptr<Channel> channel_;
  std::shared_ptr<detail::ReplyLink> link_ = std::make_shared<detail::ReplyLink>();
  detail::Requests<Codec> outgoing_{loop_, false};
  [[no_unique_address]] Codec codec_;
  WorkerState state_ = WorkerState::none;
  bool exited_after_disconnect_ = false;
  bool listened_ = false;
  std::size_t reported_connections_ = 0;  // open connections, as the worker last reported
  detail::WorkerCounters counters_;        // the same report's counters
  unsigned restarts_ = 0;
  std::deque<detail::Handoff> in_flight_;  // handed over, not yet acknowledged
  Clock::time_point unacked_since_{};      // in_flight_ waits since (or since the last ack)
  Clock::time_point declined_until_{};     // out of descriptors: offered none before this
  bool out_of_fds_ = false;                // declined since it last took one (logged once)
  Clock::time_point started_ = Clock::now();
  Clock::time_point last_heard_ = started_;  // the last frame from it (watchdog)
  Clock::duration lifetime_{};               // recycled after this long (0: never)
  bool hung_ = false;                        // the watchdog gave up on it
  bool start_timed_out_ = false;             // killed at start_timeout
  std::string recycle_reason_;               // set once a recycle was asked for
  ExitInfo exit_;
  EventLoop::TimerId escalation_timer_ = 0;
};

}  // namespace prefork

#endif  // PREFORK_WORKER_HANDLE_HPP
