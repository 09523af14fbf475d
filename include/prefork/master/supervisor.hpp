// The master's supervisor (Node's primary.js onmessage and exit handlers): walks each worker
// through its lifecycle frames (online, started, listening, disconnect...), routes every other
// frame to its owner, reaps the worker through its pidfd, and asks the RestartPolicy what to do
// with its slot. Application callbacks and the other parts are reached through SupervisorHooks.
#ifndef PREFORK_MASTER_SUPERVISOR_HPP
#define PREFORK_MASTER_SUPERVISOR_HPP

#include <signal.h>

#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

#include <prefork/version.hpp>
#include <prefork/channel.hpp>
#include <prefork/codec.hpp>
#include <prefork/detail/process.hpp>
#include <prefork/event_loop.hpp>
#include <prefork/options.hpp>
#include <prefork/restart.hpp>
#include <prefork/worker.hpp>
#include <prefork/master/log.hpp>
#include <prefork/master/phase.hpp>
#include <prefork/master/worker_record.hpp>
#include <prefork/master/worker_table.hpp>

namespace prefork::detail {

/// What the supervisor asks of the Master (set in the Master's constructor). Every hook but
/// the optional ones (marked) must be set before the first worker is spawned.
template <MessageCodec Codec>
struct SupervisorHooks {
  using Record = WorkerRecord<Codec>;
  using message_type = typename Codec::message_type;

  // Node's events, for the Master to emit.
  std::function<void(Record&)> online, listening, disconnected;
  std::function<void(Record&, const message_type&)> message;
  /// A protocol error: true if the application handles it (on_error), false to have it logged.
  std::function<bool(Record&, std::error_code)> protocol_error;
  std::function<void(std::size_t slot, const ExitInfo&)> errored;

  // The Master's fan-outs: a worker became ready; a worker was reaped (removed from the table,
  // owned by the caller until this returns).
  std::function<void(Record&)> ready;
  std::function<void(Record&, const ExitInfo&)> exited;

  // Frames other parts own.
  std::function<void(Record&, const Frame&)> request, store;
  std::function<void(Record&, std::size_t n)> accepted;
  /// Optional: the worker could not take its next `n` connections (master dispatch).
  std::function<void(Record&, std::size_t n)> declined;
  /// Optional: a session key for the worker's slot (a policy that routes by key).
  std::function<void(std::string_view key, std::size_t slot)> bind;
  std::function<void(Record&, const std::string& why)> recycle;
  std::function<void(unsigned id)> stats_answered;
  /// Connections handed to `w` and never acknowledged go to another worker.
  std::function<void(Record&)> recover;

  /// The cluster has listening sockets (a worker's 'started' is its ready signal otherwise).
  std::function<bool()> listens;
  // Starting a worker into a slot now, or after a delay (the spawner's).
  std::function<Record*(std::size_t slot)> spawn;
  std::function<void(std::size_t slot, Clock::duration delay)> spawn_after;
  /// Optional: the slot will not be refilled (ReusePort closes its sockets).
  std::function<void(std::size_t slot)> slot_abandoned;
};

template <MessageCodec Codec, class Restart>
class Supervisor {
 public:
  using Record = WorkerRecord<Codec>;

  Supervisor(EventLoop& loop, WorkerTable<Codec>& table, const MasterLog& log, const Phase& phase,
             Restart& restart, Codec& codec) noexcept
      : loop_(loop), table_(table), log_(log), phase_(phase), restart_(restart), codec_(codec) {}
  Supervisor(const Supervisor&) = delete;
  Supervisor& operator=(const Supervisor&) = delete;

  SupervisorHooks<Codec> hooks;

  /// One frame from `w`'s channel.
  void on_frame(Record& w, Frame&& f) {
    w.last_heard = Clock::now();
    switch (f.kind) {
      case FrameKind::user: {
        std::error_code ec;
        auto m = codec_.decode(f.payload, ec);
        if (!m) {
          protocol_error(w, ec ? ec : make_error_code(errc::decode_failed));
          mark_disconnected(w);
          return;
        }
        hooks.message(w, *m);
        return;
      }
      case FrameKind::online:
        if (w.state != WorkerState::none) break;
        w.state = WorkerState::online;
        log_(LogLevel::info, "online", "pid " + std::to_string(w.pid), &w);
        hooks.online(w);
        return;
      case FrameKind::started:
        // Nothing to listen on: a built Server is as ready as the worker gets. (With listen
        // addresses, 'listening' comes later and means the same.)
        if (w.state != WorkerState::online || hooks.listens() || w.was_ready()) return;
        w.became_ready();
        hooks.ready(w);
        return;
      case FrameKind::listening:
        if (w.state != WorkerState::online) break;
        w.state = WorkerState::listening;
        w.became_ready();
        if constexpr (requires(Restart& r) { r.on_listening(std::size_t{}); })
          restart_.on_listening(w.slot);
        log_(LogLevel::info, "listening", "pid " + std::to_string(w.pid), &w);
        hooks.listening(w);
        hooks.ready(w);
        return;
      case FrameKind::disconnect:
        // The worker is draining on its own initiative (Node: worker.disconnect() in a worker).
        w.plan_exit();
        w.arm_escalation();
        return;
      case FrameKind::stats:
        w.reported_connections = static_cast<std::size_t>(f.tag);
        decode_counters(f.payload, w.counters);
        return hooks.stats_answered(w.id);
      case FrameKind::accepted: return hooks.accepted(w, static_cast<std::size_t>(f.tag));
      case FrameKind::declined:
        if (hooks.declined) hooks.declined(w, static_cast<std::size_t>(f.tag));
        return;
      case FrameKind::request: return hooks.request(w, f);
      case FrameKind::reply: return w.outgoing.on_reply(f.tag, f.payload);
      case FrameKind::failure: return w.outgoing.on_failure(f.tag, f.payload);
      case FrameKind::store: return hooks.store(w, f);
      case FrameKind::heartbeat: return;
      case FrameKind::retire:
        hooks.recycle(w, f.payload.empty() ? std::string("the worker asked for it")
                                           : f.payload.substr(0, 200));
        return;
      case FrameKind::bind:
        if (hooks.bind) hooks.bind(std::string_view(f.payload), w.slot);
        return;
      default: break;
    }
    protocol_error(w, make_error_code(errc::malformed_frame));
    mark_disconnected(w);
  }

  /// `w`'s channel closed: an error (ec other than channel_closed) is a protocol error.
  void on_channel_closed(Record& w, std::error_code ec) {
    if (ec != errc::channel_closed) protocol_error(w, ec);
    // A worker that closed its channel but keeps running is unsupervisable: give it the drain
    // deadline to exit, then escalate, as for a disconnect.
    w.arm_escalation();
    mark_disconnected(w);
  }

  /// Node's 'disconnect': nothing more comes from `w`; what it was handed is recovered.
  void mark_disconnected(Record& w) {
    if (w.gone()) return;
    hooks.stats_answered(w.id);  // it never will
    if (w.channel) w.channel->close();
    w.link->channel = nullptr;
    w.became_disconnected();
    hooks.recover(w);
    w.outgoing.fail_all(make_error_code(errc::peer_gone));
    log_(LogLevel::info, "disconnect", "pid " + std::to_string(w.pid), &w);
    hooks.disconnected(w);
  }

  /// `w`'s pidfd is readable: reaps it, then 'disconnect' and 'exit' (hooks.exited).
  void on_pidfd(Record& w) {
    // The worker has exited but is not reaped yet, so its pid (its process group's id) cannot
    // have been reused: what is left of its group is its own children, stopped with it.
    ::kill(-w.pid, SIGKILL);
    Reaped r = reap(w.pidfd.get());
    if (!r.done) return;
    loop_.unwatch(w.pidfd.get());
    w.pidfd.reset();  // or a worker forked from an exit callback would inherit it
    // Deliver what the worker sent before it died, then 'disconnect' before 'exit' (Node).
    if (w.channel && w.channel->is_open()) w.channel->read_all_pending();
    mark_disconnected(w);
    w.cancel_timers();
    w.became_dead();
    w.exit.exit_code = r.exit_code;
    w.exit.signal = r.signal;
    w.exit.served = w.counters.connections_total > 0 || w.counters.requests > 0;
    w.exit.uptime =
        std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - w.started);

    // Removed from the live list before 'exit' is emitted, as Node does; destroyed after.
    std::unique_ptr<Record> owned = table_.extract(w.id);
    ExitInfo info = w.exit;
    log_exit(w, info);
    hooks.exited(w, info);
  }

  /// After 'exit': frees `w`'s slot if it still owns it and, unless the master is stopping,
  /// asks the RestartPolicy whether to refill it now, later, or never (the slot is errored).
  void after_exit(Record& w, const ExitInfo& info) {
    if (!table_.owns_slot(w)) return;  // replaced already (rolling restart), or its slot scaled away
    Slot& s = table_.slot(w.slot);
    s.worker_id = 0;
    if (stopping(phase_)) return;
    RestartDecision d = restart_.on_exit(w.slot, info);
    using A = RestartDecision::Action;
    if (d.action != A::restart && hooks.slot_abandoned) hooks.slot_abandoned(w.slot);
    if (d.action == A::give_up) {
      s.errored = true;
      log_(LogLevel::error, "errored",
           "slot " + std::to_string(w.slot) + " is errored: its workers keep exiting (last: " +
           MasterLog::describe(w) + ")", &w);
      hooks.errored(w.slot, info);
    } else if (d.action == A::restart) {
      if (d.delay.count() <= 0) {
        hooks.spawn(w.slot);
      } else {
        hooks.spawn_after(w.slot, d.delay);
      }
    }
  }

  /// A worker broke the protocol: reported (on_error, or logged) and killed.
  void protocol_error(Record& w, std::error_code ec) {
    if (!hooks.protocol_error(w, ec))
      log_(LogLevel::warning, "protocol",
           MasterLog::describe(w) + ": " + ec.message() + "; killing it", &w);
    if (w.exit.reason.empty()) w.exit.reason = "protocol error: " + ec.message();
    w.signal(SIGKILL);
  }

 private:
  // One line per exit: a crash is a warning, a planned exit (disconnect, kill, shutdown) not.
  void log_exit(const Record& w, const ExitInfo& e) {
    std::string how = e.signal ? "killed by signal " + std::to_string(e.signal)
                               : "exited with code " + std::to_string(e.exit_code);
    bool planned = e.exited_after_disconnect && (e.exit_code == 0 || e.signal);
    log_(planned || !e.crashed() ? LogLevel::info : LogLevel::warning, "exit",
         "pid " + std::to_string(w.pid) + " " + how + " after " +
             std::to_string(e.uptime.count()) + " ms" +
             (e.exited_after_disconnect ? " (planned)" : "") +
             (e.reason.empty() ? std::string() : ": " + e.reason),
         &w);
  }

  EventLoop& loop_;
  WorkerTable<Codec>& table_;
  const MasterLog& log_;
  const Phase& phase_;
  Restart& restart_;
  Codec& codec_;
};

}  // namespace prefork::detail

#endif  // PREFORK_MASTER_SUPERVISOR_HPP
