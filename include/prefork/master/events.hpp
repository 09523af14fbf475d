// The application's callbacks on the master (on_fork, on_exit, on_message...) and emit(),
// which runs one so that an exception from it never skips the master's bookkeeping: the first
// exception is kept (run() rethrows it) and starts a graceful shutdown. Master derives from
// MasterEvents publicly: its setters are Master's own public API.
#ifndef PREFORK_MASTER_EVENTS_HPP
#define PREFORK_MASTER_EVENTS_HPP

#include <cstddef>
#include <exception>
#include <functional>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include <prefork/version.hpp>
#include <prefork/channel.hpp>
#include <prefork/codec.hpp>
#include <prefork/log.hpp>
#include <prefork/options.hpp>
#include <prefork/request.hpp>
#include <prefork/worker_handle.hpp>

namespace prefork::detail {

// What the callbacks ask of the Master (the wiring, in master.hpp).
struct MasterEventsHooks {
  std::function<void(LogLevel, std::string_view event, const std::string&)> log;
  std::function<void()> stop;  // a callback threw: shut down gracefully, unless already
  std::function<const std::vector<std::string>&()> addresses;  // as bound (on_listening)
};

template <MessageCodec Codec>
class MasterEvents {
 public:
  using WorkerT = Worker<Codec>;
  using message_type = typename Codec::message_type;

  // Lifecycle callbacks, in Node's order: fork -> online -> listening -> disconnect -> exit.
  void on_fork(std::function<void(WorkerT&)> cb) { on_fork_ = std::move(cb); }
  void on_online(std::function<void(WorkerT&)> cb) { on_online_ = std::move(cb); }
  /// cb(Worker&) or cb(Worker&, const std::vector<std::string>& addresses): the addresses
  /// as bound, with the port the kernel chose for port 0 (Node's 'listening' address).
  template <class F>
  void on_listening(F cb) {
    if constexpr (std::is_invocable_v<F&, WorkerT&, const std::vector<std::string>&>) {
      on_listening_ = [this, cb = std::move(cb)](WorkerT& w) mutable {
        cb(w, hooks.addresses());
      };
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


 protected:
  MasterEventsHooks hooks;

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
      hooks.log(LogLevel::error, "exception",
                "another exception in a master callback: " + what);
      return;
    }
    failure_ = e;
    hooks.log(LogLevel::error, "exception",
              "exception in a master callback: " + what + "; shutting down, run() rethrows it");
    hooks.stop();
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

  // The events the supervisor and the spawner report, to the callbacks that hear them (the
  // wiring calls it once): 'fork', 'online', 'listening', 'disconnect', 'message', 'error', an
  // errored slot, and the workers' requests, decoded and answered with `codec`.
  template <class SupervisorHooks, class SpawnerHooks>
  void report_to_callbacks(SupervisorHooks& su, SpawnerHooks& sp, const Codec& codec) {
    using Record = typename SupervisorHooks::Record;
    sp.forked = [this](Record& w) { emit(on_fork_, w.handle); };
    su.online = [this](Record& w) { emit(on_online_, w.handle); };
    su.listening = [this](Record& w) { emit(on_listening_, w.handle); };
    su.disconnected = [this](Record& w) { emit(on_disconnect_, w.handle); };
    su.message = [this](Record& w, const message_type& m) { emit(on_message_, w.handle, m); };
    su.protocol_error = [this](Record& w, std::error_code ec) {
      if (!on_error_) return false;  // the supervisor logs it
      emit(on_error_, w.handle, ec);
      return true;
    };
    su.errored = [this](std::size_t slot, const ExitInfo& info) { emit(on_errored_, slot, info); };
    su.request = [this, &codec](Record& w, const Frame& f) {
      answer(w.link, codec, f, static_cast<bool>(on_request_),
             [this, &w](const message_type& m, Reply<Codec> r) {
               on_request_(w.handle, m, std::move(r));
             });
    };
  }

  // The end of run(): the first exception a callback let escape, rethrown.
  void rethrow_failure() {
    if (failure_) std::rethrow_exception(std::exchange(failure_, nullptr));
  }

  std::function<void(WorkerT&)> on_fork_, on_online_, on_listening_, on_disconnect_;
  std::function<void(WorkerT&, const ExitInfo&)> on_exit_;
  std::function<void(WorkerT&, const message_type&)> on_message_;
  std::function<void(WorkerT&, std::error_code)> on_error_;
  std::function<void(WorkerT&, const message_type&, Reply<Codec>)> on_request_;
  std::function<void(std::size_t, const ExitInfo&)> on_errored_;
  std::function<void(const ReloadReport&)> on_reload_done_;
  std::function<void(const UpgradeReport&)> on_upgrade_done_;

 private:
  std::exception_ptr failure_;  // the first exception a callback let escape: run() rethrows it
};

}  // namespace prefork::detail

#endif  // PREFORK_MASTER_EVENTS_HPP
