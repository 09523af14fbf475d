// The master's control socket (`hello ctl ...`, control.hpp): the socket itself and the
// command table (status, reload, scale, stop, upgrade), written against the master's public
// API only. reload and upgrade are answered when they end: the master tells the service.
#ifndef PREFORK_MASTER_CONTROL_SERVICE_HPP
#define PREFORK_MASTER_CONTROL_SERVICE_HPP

#include <cstddef>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <prefork/version.hpp>
#include <prefork/detail/control_server.hpp>
#include <prefork/detail/json.hpp>
#include <prefork/detail/number.hpp>
#include <prefork/detail/syscall.hpp>
#include <prefork/detail/unique_fd.hpp>
#include <prefork/error.hpp>
#include <prefork/event_loop.hpp>
#include <prefork/log.hpp>
#include <prefork/options.hpp>
#include <prefork/status.hpp>
#include <prefork/master/log.hpp>

namespace prefork::detail {

/// `Master`: anything with the master's public members that the commands use (status via
/// query_status, reload, reloading, scale, shutdown, shutting_down, upgrade, upgrade_refusal,
/// workers).
template <class Master>
class ControlService {
 public:
  ControlService(Master& master, EventLoop& loop, const MasterLog& log)
      : master_(master), log_(log), server_(loop) {}
  ControlService(const ControlService&) = delete;
  ControlService& operator=(const ControlService&) = delete;

  /// Serves on `path`: on `inherited` if the old master handed it over (an upgrade), else on
  /// a socket bound now, whose file is then this master's. Throws std::system_error as
  /// Master::listen_control() says.
  void listen(const std::string& path, UniqueFd inherited) {
    std::error_code ec;
    if (inherited) {
      ec = server_.adopt(std::move(inherited), path);
    } else {
      ec = server_.listen(path);
      owned_ = !ec;
    }
    if (ec == std::errc::address_in_use)
      throw StatedError(ec, "prefork: control socket " + path + " is in use by a running master");
    if (ec == std::errc::file_exists)
      throw StatedError(ec, "prefork: control socket " + path +
                                " exists and is not a socket (left as it is)");
    if (ec) throw std::system_error(ec, "prefork: control socket " + path);
    server_.on_request([this](const ControlRequest& r, ControlReply reply) {
      on_request(r, std::move(reply));
    });
  }

  /// The listening socket (-1 if none) and what an upgrade says it is for.
  int native_handle() const noexcept { return server_.native_handle(); }
  std::string spec() const { return "control:" + server_.path(); }
  /// Descriptors a forked child must not keep: or it keeps the socket live, and a client's
  /// EOF away.
  void descriptors(std::vector<int>& fds) const { server_.descriptors(fds); }

  /// A new master: the old master leaves the socket file to this one now.
  void own_socket_file() noexcept { owned_ = true; }
  /// An upgrade succeeded: new clients reach the new master; these connections stay.
  void stop_listening() { server_.stop_listening(); }
  /// The end of run(): the socket closed, its file removed if it is this master's (not after
  /// a hand-over: the new master serves on it).
  void release(bool handed_over) {
    server_.close();
    if (owned_ && !handed_over) server_.unlink();
  }

  // One command from the control socket. reload and upgrade are answered when they end.
  void on_request(const ControlRequest& r, ControlReply reply) {
    log_(LogLevel::info, "control",
         r.command + " from pid " + std::to_string(r.peer.pid) + " (uid " +
             std::to_string(r.peer.uid) + ")");
    if (r.command == "status") {
      master_.query_status([reply](const ClusterStatus& st) {
        std::string json = to_json(st);
        reply.ok(json.substr(1, json.size() - 2));  // its fields beside "ok"
      });
    } else if (r.command == "reload") {
      if (master_.shutting_down()) return reply.fail("the master is shutting down");
      // A pass that runs now was asked for before this request: this one waits for the next.
      (master_.reloading() ? reload_waiters_next_ : reload_waiters_).push_back(std::move(reply));
      master_.reload();
    } else if (r.command == "scale") {
      auto it = r.fields.find("workers");
      std::size_t n = 0;
      if (it == r.fields.end() || it->second.type != JsonScalar::Type::number ||
          !parse_number(it->second.text, n) || n == 0 || n > 4096)
        return reply.fail("scale needs \"workers\": a whole number from 1 to 4096");
      if (std::error_code ec = master_.scale(n)) return reply.fail("scale: " + ec.message());
      reply.ok("\"workers\":" + std::to_string(n));
    } else if (r.command == "stop") {
      auto it = r.fields.find("fast");
      bool fast = it != r.fields.end() && it->second.type == JsonScalar::Type::boolean &&
                  it->second.text == "true";
      reply.ok("\"stopping\":true,\"workers\":" + std::to_string(master_.workers().size()));
      master_.shutdown(fast);
    } else if (r.command == "upgrade") {
      if (!master_.upgrade()) return reply.fail("upgrade refused: " + master_.upgrade_refusal());
      upgrade_waiters_.push_back(std::move(reply));
    } else {
      reply.fail("unknown command '" + r.command +
                 "'; the commands are status, reload, scale, stop and upgrade");
    }
  }

  // The control clients waiting for the rolling restart that just ended.
  void reload_ended(const ReloadReport& r, bool will_run_again) {
    auto waiters = std::exchange(reload_waiters_, {});
    for (auto& w : waiters) {
      if (r.ok) {
        w.ok("\"replaced\":" + std::to_string(r.replaced) + ",\"took_ms\":" +
             std::to_string(r.took.count()));
      } else {
        w.fail("rolling restart stopped: " + r.reason + "; the old workers keep serving");
      }
    }
    if (will_run_again) {
      reload_waiters_ = std::exchange(reload_waiters_next_, {});
    } else if (!reload_waiters_next_.empty()) {
      auto next = std::exchange(reload_waiters_next_, {});
      std::string why = r.ok ? std::string("the master is shutting down") : r.reason;
      for (auto& w : next) w.fail("rolling restart not run: " + why);
    }
  }

  /// The clients waiting for the upgrade that just ended.
  void upgrade_ended(const UpgradeReport& u) {
    auto waiters = std::exchange(upgrade_waiters_, {});
    for (auto& w : waiters) {
      if (u.ok) {
        w.ok("\"new_master\":" + std::to_string(u.new_master));
      } else {
        w.fail("upgrade failed: " + u.reason);
      }
    }
  }

 private:
  Master& master_;
  const MasterLog& log_;
  ControlServer server_;  // Options::control
  bool owned_ = false;    // the socket file is this master's to remove on exit
  std::vector<ControlReply> reload_waiters_;       // answered when this pass ends
  std::vector<ControlReply> reload_waiters_next_;  // asked during it: the next pass
  std::vector<ControlReply> upgrade_waiters_;
};

}  // namespace prefork::detail

#endif  // PREFORK_MASTER_CONTROL_SERVICE_HPP
