// The library's log: one record per lifecycle event or diagnostic, from the master or a worker,
// handed to a sink the application can replace (Options::log). The default sink writes one line
// per record to stderr and never blocks the process that logs: a master stuck on a full pipe
// would stop supervising, so a line that does not fit is dropped and counted instead; nor does
// it ever raise SIGPIPE when stderr's reader is gone (the line is dropped and counted too).
#ifndef PREFORK_LOG_HPP
#define PREFORK_LOG_HPP

#include <poll.h>
#include <sys/types.h>
#include <unistd.h>

#include <chrono>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <functional>
#include <string>
#include <string_view>

#include <prefork/version.hpp>
#include <prefork/detail/syscall.hpp>

namespace prefork {

enum class LogLevel : std::uint8_t {
  info,     ///< a lifecycle event or an operation that went as asked
  warning,  ///< something went wrong and the library dealt with it (a crash, a refused request)
  error,    ///< something went wrong that needs an operator (a slot given up, a save that failed)
};

inline constexpr std::string_view to_string(LogLevel l) noexcept {
  switch (l) {
    case LogLevel::info: return "info";
    case LogLevel::warning: return "warning";
    case LogLevel::error: return "error";
  }
  return "unknown";
}

/// One log record. The views are valid only during the sink's call.
struct LogRecord {
  std::chrono::system_clock::time_point time{};
  LogLevel level = LogLevel::info;
  std::string_view role;     ///< "master" or "worker": the process that logs
  pid_t pid = 0;             ///< that process's pid
  unsigned worker = 0;       ///< the worker the record is about (its id), 0 if none
  pid_t worker_pid = 0;      ///< that worker's pid, 0 if none or not known yet
  /// What happened, one word: Node's lifecycle events (fork, online, listening, disconnect,
  /// exit) and the master's own (serving, reload, recycle, upgrade, scale, shutdown, control,
  /// store, errored, hung, protocol, accept, ...); a worker's records use "worker".
  std::string_view event;
  std::string_view message;  ///< the details, one line, no newline
};

/// Receives every record, in the process that logs it, on its loop's thread. Must not throw.
using LogSink = std::function<void(const LogRecord&)>;

/// The default line: "2026-12-03T04:30:56.123Z master 4120 worker 3 exit: pid 4125 exited
/// with code 1 after 532 ms" — UTC time with milliseconds, role, pid, the worker's id when the
/// record is about one, the event, the message; warnings and errors say so after the event.
inline std::string format_log_line(const LogRecord& r) {
  using namespace std::chrono;
  auto since = r.time.time_since_epoch();
  std::time_t secs = static_cast<std::time_t>(duration_cast<seconds>(since).count());
  auto ms = duration_cast<milliseconds>(since).count() % 1000;
  std::tm tm{};
  ::gmtime_r(&secs, &tm);
  char stamp[96];  // room for any int the format could print
  std::snprintf(stamp, sizeof stamp, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
                tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                static_cast<int>(ms < 0 ? 0 : ms));
  std::string line = stamp;
  line += ' ';
  line += r.role;
  line += ' ' + std::to_string(r.pid);
  if (r.worker) line += " worker " + std::to_string(r.worker);
  line += ' ';
  line += r.event;
  if (r.level != LogLevel::info) {
    line += " (";
    line += to_string(r.level);
    line += ')';
  }
  line += ": ";
  line += r.message;
  return line;
}

namespace detail {

/// Lines the default sink could not write because stderr would have blocked or nobody reads it
/// any more (EPIPE).
inline std::uint64_t& dropped_log_lines() noexcept {
  static std::uint64_t dropped = 0;
  return dropped;
}

/// The default sink: format_log_line() to stderr with one write, only if stderr can take it
/// now. A pipe or terminal nobody reads (a test harness that reads stdout only, a stalled
/// journal) fills up; poll() with no wait tells whether a write of up to PIPE_BUF bytes would
/// block, and such a write is atomic, so lines from the master and its workers never mix.
/// Dropped lines are counted and reported by the next line that gets through.
inline void write_log_line(const LogRecord& r) noexcept {
  try {
    std::string line = format_log_line(r);
    if (line.size() > 4000) line.resize(4000);  // stays below PIPE_BUF: one atomic write
    line += '\n';
    pollfd p{2, POLLOUT, 0};
    int ready = detail::retry_eintr([&] { return ::poll(&p, 1, 0); });
    if (ready <= 0 || !(p.revents & POLLOUT)) {
      ++dropped_log_lines();
      return;
    }
    const std::uint64_t dropped = dropped_log_lines();
    if (dropped)
      line = "(" + std::to_string(dropped) + " log lines dropped: stderr was full)\n" + line;
    // A pipe whose reader has gone (`prog 2>&1 | head -1`) or a closed socket: the line is
    // lost, counted, and the process goes on; never killed by SIGPIPE.
    dropped_log_lines() = write_all(2, line.data(), line.size()) ? 0 : dropped + 1;
  } catch (...) {  // std::bad_alloc: the record is lost, the process goes on
    ++dropped_log_lines();
  }
}

/// Builds a record stamped now for this process and hands it to `sink` (the default if empty).
inline void emit_log(const LogSink& sink, LogLevel level, std::string_view role, unsigned worker,
                     pid_t worker_pid, std::string_view event, std::string_view message) noexcept {
  LogRecord r{std::chrono::system_clock::now(), level, role, ::getpid(), worker, worker_pid,
              event, message};
  if (!sink) return write_log_line(r);
  try {
    sink(r);
  } catch (...) {  // a sink that throws loses its record, not the process
  }
}

}  // namespace detail
}  // namespace prefork

#endif  // PREFORK_LOG_HPP
