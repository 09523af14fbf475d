// The worker role (Node's lib/internal/cluster/child.js): bootstrap after fork or exec, the
// WorkerContext a Server is built with, accepting or receiving connections, messages from the
// master, and the graceful disconnect that either side can start.
#ifndef PREFORK_WORKER_HPP
#define PREFORK_WORKER_HPP

#include <sys/socket.h>
#include <unistd.h>

#include <concepts>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <prefork/version.hpp>
#include <prefork/balance/policy.hpp>
#include <prefork/channel.hpp>
#include <prefork/codec.hpp>
#include <prefork/connection.hpp>
#include <prefork/detail/acceptor.hpp>
#include <prefork/detail/boot.hpp>
#include <prefork/detail/process.hpp>
#include <prefork/detail/socket.hpp>
#include <prefork/detail/syscall.hpp>
#include <prefork/event_loop.hpp>
#include <prefork/log.hpp>
#include <prefork/request.hpp>
#include <prefork/store_client.hpp>

namespace prefork {

namespace detail {

/// The process-wide role; set before any user code of a worker runs.
inline bool& is_worker_process() noexcept {
  static bool worker = false;
  return worker;
}

}  // namespace detail

/// True in a worker process, false in the master (Node's cluster.isWorker).
inline bool is_worker() noexcept { return detail::is_worker_process(); }
/// True in the master process (Node's cluster.isPrimary / isMaster).
inline bool is_master() noexcept { return !detail::is_worker_process(); }

/// What a Server gets in its constructor: who it is, the worker's event loop, the channel to
/// the master, and the graceful disconnect. Lives as long as the worker process serves.
/// Every member runs in the worker process, on its loop's thread.
template <MessageCodec Codec = StringCodec>
class WorkerContext {
 public:
  using message_type = typename Codec::message_type;

  /// `log`: where the worker's log records go (Options::log; empty: stderr).
  explicit WorkerContext(const detail::WorkerBoot& boot, LogSink log = {})
      : id_(boot.id), slot_(boot.slot), boot_(boot), log_(std::move(log)) {
    channel_ = std::make_unique<Channel>(loop_, UniqueFd(boot.channel_fd), boot.limits);
    channel_->on_frame([this](Frame&& f) { on_frame(std::move(f)); });
    channel_->on_close([this](std::error_code ec) { on_channel_closed(ec); });
    link_->channel = channel_.get();
  }
  WorkerContext(const WorkerContext&) = delete;
  WorkerContext& operator=(const WorkerContext&) = delete;
  // A Reply kept past the worker's life (in a timer, say) must not answer into a dead channel.
  ~WorkerContext() { link_->channel = nullptr; }

  /// The worker's id: 1 for the first worker the master forked, then 2, 3... never reused.
  unsigned id() const noexcept { return id_; }
  /// The worker's slot, 0..workers-1: a replacement takes over the slot of the one it replaces.
  std::size_t slot() const noexcept { return slot_; }
  pid_t pid() const noexcept { return ::getpid(); }
  /// The worker's event loop: register descriptors and timers here. A watch or timer that
  /// keeps the loop alive delays the exit of a draining worker until it is removed.
  EventLoop& loop() noexcept { return loop_; }

  /// Sends a message to the master. Errors (nothing sent): errc::frame_too_large,
  /// errc::queue_full (the master is not reading; back-pressure), errc::channel_closed.
  std::error_code send(const message_type& m) {
    if (!channel_) return errc::channel_closed;
    return channel_->send(FrameKind::user, std::string(codec_.encode(m)));
  }

  using RequestCallback = std::function<void(std::error_code, const message_type&)>;

  /// Sends `m` to the master as a request; the master's on_request handler answers it.
  /// `cb(ec, reply)` then runs exactly once on this worker's loop, never from inside
  /// request(): with the reply and no error, or with ec set and a default message_type:
  /// errc::request_timeout (no answer within `timeout`), errc::peer_gone (the master went
  /// away first), errc::no_handler (the master has no on_request), errc::request_failed (its
  /// handler dropped the request), errc::decode_failed (either side could not decode), or
  /// what send() reports (nothing was sent). A pending request keeps a draining worker alive
  /// until it is answered or times out.
  void request(const message_type& m, RequestCallback cb,
               Clock::duration timeout = kDefaultRequestTimeout) {
    outgoing_.start(channel_ && channel_->is_open() ? channel_.get() : nullptr,
                    FrameKind::request, std::string(codec_.encode(m)), std::move(cb), timeout);
  }

  /// The master's shared store (see StoreClient): survives any worker's restart, shared by
  /// every worker, one round trip per operation.
  StoreClient& store() noexcept { return store_; }

  /// Graceful disconnect started by the worker (Node's worker.disconnect() in a worker):
  /// stop accepting, tell the master (so the exit counts as exited_after_disconnect), call the
  /// Server's on_drain(), and exit 0 once the loop has nothing left that keeps it alive.
  void disconnect() { begin_drain(true); }
  bool draining() const noexcept { return draining_; }

  /// Leaves the process now with `code`, after giving queued messages up to a second to go.
  [[noreturn]] void exit(int code) {
    if (channel_) channel_->flush_blocking(1000);
    std::fflush(nullptr);
    ::_exit(code);
  }

  /// Connections this worker is serving, as the Server reports them with
  /// connection_opened()/connection_closed(); LeastConnections balances on it. The master
  /// hears the count at most once per loop round.
  void connection_opened() {
    ++connections_;
    schedule_report();
  }
  void connection_closed() {
    if (connections_ > 0) --connections_;
    schedule_report();
  }
  std::size_t connections() const noexcept { return connections_; }

  /// Counts one request served, for Options::max_requests (the library cannot tell requests
  /// apart inside a connection; the Server can). Reaching the limit asks the master to recycle
  /// this worker: a replacement starts, then this one drains.
  void request_done() {
    ++requests_;
    report_first_service();
    if (boot_.max_requests && requests_ == boot_.max_requests)
      retire("max_requests: served " + std::to_string(requests_) + " requests");
  }

  /// Hands a record to the cluster's log sink (Options::log), as this worker ("worker" role,
  /// its id and pid), with event "worker".
  void log(LogLevel level, std::string_view message) const noexcept {
    detail::emit_log(log_, level, "worker", id_, ::getpid(), "worker", message);
  }

  /// Binds a session key to this worker's slot: once the master has it, connections that
  /// carry the key (e.g. the cookie Sticky reads) come to this slot, to this worker or to its
  /// replacement. Call it before the response that hands the key to the client, so that the
  /// binding is on its way to the master before the client can come back with the key.
  /// A cluster that does not balance by key ignores it. Errors (nothing sent):
  /// std::errc::invalid_argument (empty, or longer than max_session_key_bytes),
  /// errc::channel_closed.
  std::error_code bind_session(std::string_view key) {
    if (key.empty() || key.size() > max_session_key_bytes)
      return std::make_error_code(std::errc::invalid_argument);
    if (!channel_ || !channel_->is_open()) return errc::channel_closed;
    return channel_->send(FrameKind::bind, std::string(key));
  }

  /// Runs the worker: builds the Server, serves until drained or the master is gone, and
  /// returns the process's exit status. Called by Cluster; not for user code.
  template <class Server>
  int serve() {
    channel_->send(FrameKind::online, {});
    std::optional<Server> server;
    if constexpr (std::constructible_from<Server, WorkerContext&>) {
      server.emplace(*this);
    } else {
      server.emplace();
    }
    Server& s = *server;
    if constexpr (requires(Server& x, Connection c) { x.on_connection(std::move(c)); })
      on_connection_ = [&s](Connection c) { s.on_connection(std::move(c)); };
    if constexpr (requires(Server& x, const message_type& m) { x.on_message(m); })
      on_message_ = [&s](const message_type& m) { s.on_message(m); };
    if constexpr (requires(Server& x, const message_type& m, Reply<Codec> r) {
                    x.on_request(m, std::move(r));
                  })
      on_request_ = [&s](const message_type& m, Reply<Codec> r) { s.on_request(m, std::move(r)); };
    if constexpr (requires(Server& x) { x.on_drain(); }) on_drain_ = [&s] { s.on_drain(); };
    if constexpr (requires(Server& x) { x.on_listening(); })
      on_listening_ = [&s] { s.on_listening(); };
    loop_.on_signal(SIGINT, [this](const signalfd_siginfo&) { begin_drain(true); });
    // Without listen addresses this is the worker's 'ready' (start_timeout, the watchdog and a
    // rolling restart wait for it): a constructor that blocks is a start-up that never ends.
    channel_->send(FrameKind::started, {});
    if (boot_.heartbeat_ms)  // the watchdog's evidence that this loop turns
      loop_.every(std::chrono::milliseconds(boot_.heartbeat_ms), [this] {
        if (channel_ && channel_->is_open()) channel_->send(FrameKind::heartbeat, {});
      }, false);

    // Judged before each wait, not after: a drain that began before the first round (a Server
    // constructor that calls disconnect()) ends now, instead of when something next wakes an
    // idle loop (a heartbeat, or nothing at all without listeners and watchdog).
    while (!done_ && !(draining_ && !loop_.alive())) {
      if (draining_) close_channel_if_drained();
      loop_.run_once(-1);
    }
    server.reset();
    on_connection_ = nullptr;
    on_message_ = nullptr;
    on_request_ = nullptr;
    on_drain_ = nullptr;
    on_listening_ = nullptr;
    if (channel_) channel_->flush_blocking(1000);
    return exit_code_;
  }

 private:
  void on_frame(Frame&& f) {
    if (f.kind != FrameKind::connection && (unacked_ || !arrived_.empty())) hand_over_arrived();
    switch (f.kind) {
      case FrameKind::user: {
        if (!on_message_) return;
        std::error_code ec;
        auto m = codec_.decode(f.payload, ec);
        if (!m) {
          report("message from the master could not be decoded: " + ec.message());
          return;
        }
        on_message_(*m);
        return;
      }
      case FrameKind::request:
        detail::answer(link_, codec_, f, static_cast<bool>(on_request_),
                       [this](const message_type& m, Reply<Codec> r) { on_request_(m, std::move(r)); });
        return;
      case FrameKind::reply: return outgoing_.on_reply(f.tag, f.payload);
      case FrameKind::failure: return outgoing_.on_failure(f.tag, f.payload);
      case FrameKind::store_reply: return store_.on_reply(f.tag, f.payload);
      case FrameKind::handles: return adopt_listeners(std::move(f.fds));
      case FrameKind::connection: return adopt_connection(std::move(f));
      case FrameKind::disconnect: return begin_drain(false);
      case FrameKind::stats: return send_stats();
      default:
        report("unexpected frame kind " + std::to_string(static_cast<int>(f.kind)) +
               " from the master");
    }
  }

  void on_channel_closed(std::error_code ec) {
    // The master is gone (or broke the protocol): nobody supervises this process any more.
    if (ec != errc::channel_closed) report("channel to the master failed: " + ec.message());
    exit_code_ = ec == errc::channel_closed ? 0 : 1;
    done_ = true;
    link_->channel = nullptr;
    outgoing_.fail_all(errc::peer_gone);
    store_.fail_all(errc::peer_gone);
  }

  // Kernel dispatch brings listening sockets; master dispatch an empty list: connections will
  // come over the channel. Either way the worker is now listening.
  void adopt_listeners(std::vector<UniqueFd> fds) {
    if (draining_) return;
    if (!on_connection_) {
      report("the Server has no on_connection(prefork::Connection) but the cluster listens");
      exit_code_ = 1;
      done_ = true;
      return;
    }
    for (auto& fd : fds) listeners_.push_back(std::move(fd));
    resume_accepting();
    channel_->send(FrameKind::listening, {});
    if (on_listening_) on_listening_();
  }

  // A connection frame is acknowledged before the Server sees the connection: the frames that
  // one read brought are collected, and at the end of the loop round one `accepted` frame goes
  // out first, then each connection is handed over. Until the acknowledgement the master keeps
  // its own copy of the socket and gives it to another worker if this one dies (the frames it
  // never read); after it, the master has closed its copy, so a worker that dies while serving
  // a connection closes it (the client sees EOF) instead of the master handing a half-read
  // connection to someone else, and the socket's teardown happens in the worker that used it.
  //
  // A connection whose descriptor the kernel could not install (this process is at its
  // descriptor limit: the frame came without it) is declined: the master still holds its copy
  // and deals it to another worker, or keeps it until one can take it. Taking the truncated
  // frame for a hostile master and exiting would lose every connection this worker serves.
  void adopt_connection(Frame&& f) {
    if (f.fds.size() == 1 && !f.fds[0]) return decline_connection();
    ++unacked_;
    count_connection();
    if (f.fds.size() == 1 && on_connection_) {
      detail::SocketAddress peer;
      if (f.payload.size() <= sizeof peer.storage) {
        std::memcpy(&peer.storage, f.payload.data(), f.payload.size());
        peer.length = static_cast<socklen_t>(f.payload.size());
      }
      arrived_.emplace_back(std::move(f.fds[0]), peer);
    }
    if (handover_posted_) return;
    handover_posted_ = true;
    loop_.post([this] {
      handover_posted_ = false;
      hand_over_arrived();
    });
  }

  // The master matches acknowledgements to connections in the order it sent them, so those
  // this round took before the declined one are acknowledged first. The master logs the
  // episode (once, not per connection).
  void decline_connection() {
    if (!channel_ || !channel_->is_open()) return;
    if (unacked_) channel_->send(FrameKind::accepted, {}, std::exchange(unacked_, 0));
    channel_->send(FrameKind::declined, {}, 1);
  }

  // Also run before any other frame is handled, so the Server sees connections and messages in
  // the order the master sent them.
  void hand_over_arrived() {
    if (unacked_ && channel_ && channel_->is_open())
      channel_->send(FrameKind::accepted, {}, std::exchange(unacked_, 0));
    std::vector<Connection> batch = std::exchange(arrived_, {});
    for (auto& c : batch)
      if (on_connection_) on_connection_(std::move(c));
  }

  // Accepts a batch, then yields to the loop. EMFILE and friends pause every listener for a
  // while instead of spinning on a socket that stays readable (libuv's uv__emfile_trick lesson).
  void accept_from(int listener) {
    acceptor_.accept(listener, [this] { return !draining_; },
                     [this](UniqueFd fd, const detail::SocketAddress& peer) {
                       count_connection();
                       on_connection_(Connection(std::move(fd), peer));
                       return true;
                     });
  }

  void resume_accepting() {
    if (draining_) return;
    for (auto& l : listeners_) {
      int raw = l.get();
      if (!loop_.watching(raw))
        loop_.watch(raw, EventLoop::readable | EventLoop::exclusive,
                    [this, raw](std::uint32_t) { accept_from(raw); }, false);
    }
  }

  // One report per loop round, after the round's callbacks: how many connections are open.
  void schedule_report() {
    if (report_scheduled_ || !channel_) return;
    report_scheduled_ = true;
    loop_.post([this] {
      report_scheduled_ = false;
      if (!channel_ || !channel_->is_open()) return;
      if (connections_ != reported_connections_) send_stats();
    });
  }

  // Open connections in the tag (LeastConnections reads it), the counters status shows in the
  // payload. Sent when the open count changes and when the master asks (a stats frame from
  // it), never per request: a keep-alive request costs the master nothing.
  void send_stats() {
    if (!channel_ || !channel_->is_open()) return;
    reported_connections_ = connections_;
    channel_->send(FrameKind::stats, detail::encode_counters({connections_taken_, requests_}),
                   connections_);
  }

  void count_connection() {
    ++connections_taken_;
    report_first_service();
    if (boot_.max_connections && connections_taken_ == boot_.max_connections)
      retire("max_connections: took " + std::to_string(connections_taken_) + " connections");
  }

  // The first connection or request this worker serves is reported at once, before the Server
  // sees it: the master's RestartPolicy tells a worker that served and then crashed (restarted
  // at once) from one that dies right after 'listening' every time (a crash loop to back off),
  // even when the crash comes inside that first on_connection. One frame per worker life.
  void report_first_service() {
    if (served_reported_) return;
    served_reported_ = true;
    send_stats();
  }

  // Asks the master to recycle this worker; it keeps serving until the master disconnects it.
  void retire(const std::string& why) {
    if (channel_ && channel_->is_open() && !draining_) channel_->send(FrameKind::retire, why);
  }

  void begin_drain(bool tell_master) {
    if (draining_) return;
    draining_ = true;
    for (auto& l : listeners_) loop_.unwatch(l.get());
    listeners_.clear();
    if (tell_master && channel_) channel_->send(FrameKind::disconnect, {});
    if (on_drain_) on_drain_();
  }

  // Node's worker, once its servers have closed and their connections ended, closes its IPC
  // channel (child.js _disconnect), and the primary emits 'disconnect' then; the process exits
  // when nothing else keeps it alive, maybe much later (a timer). The same here: a draining
  // worker whose loop is kept alive only by timers (no watched descriptor: the Server's
  // connections are done), with no request or store operation waiting for the master and no
  // connection still to hand over, closes its channel, after flushing what it sent; the master
  // reports the disconnect at once and the exit when it comes (drain_timeout still applies).
  void close_channel_if_drained() {
    if (!channel_ || !channel_->is_open() || loop_.watches_alive() || outgoing_.size() ||
        store_.pending() || unacked_ || !arrived_.empty())
      return;
    channel_->flush_blocking(1000);
    channel_->close();
    link_->channel = nullptr;
  }

  void report(const std::string& what) { log(LogLevel::warning, what); }

  unsigned id_;
  std::size_t slot_;
  detail::WorkerBoot boot_;
  LogSink log_;
  EventLoop loop_;
  std::unique_ptr<Channel> channel_;
  std::shared_ptr<detail::ReplyLink> link_ = std::make_shared<detail::ReplyLink>();
  detail::Requests<Codec> outgoing_{loop_, true};
  StoreClient store_{loop_, link_};
  [[no_unique_address]] Codec codec_;
  std::vector<UniqueFd> listeners_;
  // EMFILE and friends pause every listener for 100 ms at a time. One report per episode, which
  // ends when an accept succeeds: one per pause made 86 lines in 5 s under `ulimit -n 256`.
  detail::Acceptor acceptor_{
      loop_, {},
      {.stop = [this] { for (auto& l : listeners_) loop_.unwatch(l.get()); },
       .resume = [this] { resume_accepting(); },
       .log = [this](int err) {
         report(std::string("accept failed (") + std::strerror(err) +
                "); pausing accept for 100 ms at a time until one succeeds");
       }}};
  std::function<void(Connection)> on_connection_;
  std::function<void(const message_type&)> on_message_;
  std::function<void(const message_type&, Reply<Codec>)> on_request_;
  std::function<void()> on_drain_;
  std::function<void()> on_listening_;
  std::size_t connections_ = 0;
  std::size_t reported_connections_ = 0;
  std::uint64_t connections_taken_ = 0;  // ever, for max_connections
  std::uint64_t requests_ = 0;           // request_done() calls, for max_requests
  std::uint64_t unacked_ = 0;
  bool served_reported_ = false;  // report_first_service() has run
  std::vector<Connection> arrived_;  // received this round, acknowledged at its end, then served
  bool handover_posted_ = false;
  bool report_scheduled_ = false;
  bool draining_ = false;
  bool done_ = false;
  int exit_code_ = 0;
};

namespace detail {

/// Runs a worker to completion and returns its exit status; never throws. An exception from
/// the Server (constructor or a callback) ends the worker with status 1 and a message, the way
/// an uncaught exception ends a Node worker.
template <class Server, MessageCodec Codec>
int run_worker(const WorkerBoot& boot, const LogSink& log = {}) noexcept {
  is_worker_process() = true;
  auto fail = [&](const std::string& why) {
    emit_log(log, LogLevel::error, "worker", boot.id, ::getpid(), "worker", why);
  };
  try {
    WorkerContext<Codec> ctx(boot, log);
    ctx.loop().on_exception([&ctx, &fail](std::exception_ptr e) {
      try {
        std::rethrow_exception(e);
      } catch (const std::exception& x) {
        fail(std::string("uncaught exception: ") + x.what());
      } catch (...) {
        fail("uncaught non-standard exception");
      }
      ctx.exit(1);
    });
    return ctx.template serve<Server>();
  } catch (const std::exception& e) {
    fail(std::string("failed: ") + e.what());
  } catch (...) {
    fail("failed with a non-standard exception");
  }
  return 1;
}

}  // namespace detail
}  // namespace prefork

#if defined(PREFORK_SEPARATE_COMPILATION)
// The default codec's worker side (all but serve<Server>, a member template), instantiated
// once in <prefork/impl/src.hpp>.
namespace prefork {
extern template class WorkerContext<StringCodec>;
}  // namespace prefork
#endif

#endif  // PREFORK_WORKER_HPP
