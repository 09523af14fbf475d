// What the master knows about itself and its workers, as one value (Master::status): the
// figures the control socket's `status` prints, available to the application too.
#ifndef PREFORK_STATUS_HPP
#define PREFORK_STATUS_HPP

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include <prefork/version.hpp>
#include <prefork/detail/json.hpp>
#include <prefork/options.hpp>

namespace prefork {

/// One live worker.
struct WorkerStatus {
  unsigned id = 0;
  std::size_t slot = 0;
  pid_t pid = 0;
  WorkerState state = WorkerState::none;
  bool draining = false;                 ///< disconnected or being stopped: a planned exit is due
  std::chrono::milliseconds uptime{0};   ///< since it was forked
  unsigned restarts = 0;                 ///< workers the slot had before this one
  std::size_t connections = 0;           ///< open now, as the worker reports them
  std::uint64_t connections_total = 0;   ///< taken since it started
  std::uint64_t requests = 0;            ///< served, as its Server counts them (request_done)
  std::size_t rss = 0;                   ///< resident memory in bytes (0 if unreadable)
};

/// The master and its workers at one moment.
struct ClusterStatus {
  pid_t pid = 0;                         ///< the master's
  std::chrono::milliseconds uptime{0};   ///< since the master was constructed
  std::size_t workers_wanted = 0;        ///< slots: Options::workers, changed by scale()
  std::vector<std::string> addresses;    ///< as bound
  bool reloading = false;                ///< a rolling restart (or recycling) is running
  bool upgrading = false;                ///< a new master is starting
  bool shutting_down = false;
  unsigned restarts = 0;                 ///< workers started to replace others, all slots
  std::vector<std::size_t> errored_slots;  ///< slots the RestartPolicy gave up on
  std::vector<WorkerStatus> workers;     ///< live workers, in id order
};

/// The status as one JSON object (no newline), as the control socket's `status` prints it:
/// {"pid":..,"uptime_ms":..,"workers_wanted":..,"addresses":[..],"reloading":..,
///  "upgrading":..,"shutting_down":..,"restarts":..,"errored_slots":[..],"workers":[{"id":..,
///  "slot":..,"pid":..,"state":"listening","draining":..,"uptime_ms":..,"restarts":..,
///  "connections":..,"connections_total":..,"requests":..,"rss_bytes":..},..]}
inline std::string to_json(const ClusterStatus& s) {
  auto num = [](auto v) { return std::to_string(v); };
  auto flag = [](bool b) { return std::string(b ? "true" : "false"); };
  std::string j = "{\"pid\":" + num(s.pid) + ",\"uptime_ms\":" + num(s.uptime.count()) +
                  ",\"workers_wanted\":" + num(s.workers_wanted) + ",\"addresses\":[";
  for (std::size_t i = 0; i < s.addresses.size(); ++i)
    j += (i ? "," : "") + detail::json_quote(s.addresses[i]);
  j += "],\"reloading\":" + flag(s.reloading) + ",\"upgrading\":" + flag(s.upgrading) +
       ",\"shutting_down\":" + flag(s.shutting_down) + ",\"restarts\":" + num(s.restarts) +
       ",\"errored_slots\":[";
  for (std::size_t i = 0; i < s.errored_slots.size(); ++i)
    j += (i ? "," : "") + num(s.errored_slots[i]);
  j += "],\"workers\":[";
  for (std::size_t i = 0; i < s.workers.size(); ++i) {
    const WorkerStatus& w = s.workers[i];
    j += std::string(i ? "," : "") + "{\"id\":" + num(w.id) + ",\"slot\":" + num(w.slot) +
         ",\"pid\":" + num(w.pid) + ",\"state\":\"" + std::string(to_string(w.state)) +
         "\",\"draining\":" + flag(w.draining) + ",\"uptime_ms\":" + num(w.uptime.count()) +
         ",\"restarts\":" + num(w.restarts) + ",\"connections\":" + num(w.connections) +
         ",\"connections_total\":" + num(w.connections_total) +
         ",\"requests\":" + num(w.requests) + ",\"rss_bytes\":" + num(w.rss) + "}";
  }
  return j + "]}";
}

}  // namespace prefork

#endif  // PREFORK_STATUS_HPP
