// Worker: the application's handle on one worker process, as the master sees it (Node's
// lib/internal/cluster/worker.js on the primary side). The master's record behind it
// (master/worker_record.hpp) holds the state; the handle reads it and asks it to act.
#ifndef PREFORK_WORKER_HANDLE_HPP
#define PREFORK_WORKER_HANDLE_HPP

#include <signal.h>
#include <sys/types.h>

#include <chrono>
#include <functional>
#include <string>
#include <system_error>

#include <prefork/version.hpp>
#include <prefork/codec.hpp>
#include <prefork/options.hpp>
#include <prefork/request.hpp>

namespace prefork {

namespace detail {
template <MessageCodec Codec>
struct WorkerRecord;
}  // namespace detail

/// One worker as the master sees it. Every member runs in the master process. A Worker& given
/// to a callback stays valid until the worker's 'exit' callbacks have returned.
template <MessageCodec Codec>
class Worker {
 public:
  using message_type = typename Codec::message_type;

  /// Made by the master, one per worker record; never by the application.
  explicit Worker(detail::WorkerRecord<Codec>& record) noexcept : r_(record) {}
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  /// 1 for the first worker forked, then 2, 3... never reused (Node's worker.id).
  unsigned id() const noexcept { return r_.id; }
  /// 0..workers-1; a replacement takes the slot of the worker it replaces.
  std::size_t slot() const noexcept { return r_.slot; }
  pid_t pid() const noexcept { return r_.pid; }
  WorkerState state() const noexcept { return r_.state; }
  /// The channel to the worker is open (Node's worker.isConnected()).
  bool is_connected() const noexcept { return r_.is_connected(); }
  /// The process has exited and been reaped (Node's worker.isDead()).
  bool is_dead() const noexcept { return r_.is_dead(); }
  /// The exit is planned: disconnect() or kill() was called, the worker disconnected itself, or
  /// the master is shutting down (Node's worker.exitedAfterDisconnect).
  bool exited_after_disconnect() const noexcept { return r_.planned(); }
  Clock::time_point started_at() const noexcept { return r_.started; }
  /// Workers its slot had before this one (crash restarts, rolling restarts, recycling).
  unsigned restarts() const noexcept { return r_.restarts; }
  /// Open connections, as the worker last reported them (WorkerContext::connection_opened).
  std::size_t connections() const noexcept { return r_.reported_connections; }
  /// Connections taken and requests served (WorkerContext::request_done), as the worker last
  /// reported them: when its open count changed, or when Master::query_status asked.
  std::uint64_t connections_total() const noexcept { return r_.counters.connections_total; }
  std::uint64_t requests() const noexcept { return r_.counters.requests; }
  /// Valid once is_dead().
  const ExitInfo& exit_info() const noexcept { return r_.exit; }

  /// Sends a message to the worker. Errors, with nothing sent: errc::channel_closed,
  /// errc::frame_too_large, errc::queue_full (the worker is not reading: back-pressure).
  std::error_code send(const message_type& m) {
    return r_.send(FrameKind::user, std::string(r_.codec.encode(m)));
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
    r_.outgoing.start(r_.is_connected() ? r_.channel.get() : nullptr, FrameKind::request,
                      std::string(r_.codec.encode(m)), std::move(cb), timeout);
  }

  /// Asks the worker to drain and exit 0 (Node's worker.disconnect()): it stops accepting,
  /// finishes what it has, and exits. After Options::drain_timeout it gets SIGTERM, after a
  /// further Options::kill_timeout SIGKILL; the exit record's reason says so.
  void disconnect() { r_.disconnect(); }

  /// Sends a signal now (default SIGTERM), without waiting for a drain. Counts as a planned
  /// exit: exited_after_disconnect() becomes true, as Node documents for worker.kill() (Node's
  /// code sets it only on the disconnect path; we follow the documentation so that
  /// RestartOnCrash never undoes a kill the application asked for). Returns the error of
  /// pidfd_send_signal(2); ESRCH once the process has exited.
  std::error_code kill(int sig = SIGTERM) { return r_.kill(sig); }

 private:
  detail::WorkerRecord<Codec>& r_;
};

}  // namespace prefork

#if defined(PREFORK_SEPARATE_COMPILATION)
// The default codec's handle, instantiated once in <prefork/impl/src.hpp>.
namespace prefork {
extern template class Worker<StringCodec>;
}  // namespace prefork
#endif

#endif  // PREFORK_WORKER_HANDLE_HPP
