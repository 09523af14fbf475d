// The master's log lines: every part of the master logs through one MasterLog, so that each
// line carries the role "master" and, when it is about a worker, that worker's id and pid.
#ifndef PREFORK_MASTER_LOG_HPP
#define PREFORK_MASTER_LOG_HPP

#include <string>
#include <string_view>
#include <type_traits>

#include <prefork/version.hpp>
#include <prefork/log.hpp>
#include <prefork/options.hpp>

namespace prefork::detail {

class MasterLog {
 public:
  explicit MasterLog(const Options& opts) noexcept : opts_(opts) {}

  /// `w`: a WorkerRecord (anything with `id` and `pid`) the line is about, or nullptr.
  template <class Record = void>
  void operator()(LogLevel level, std::string_view event, const std::string& msg,
                  const Record* w = nullptr) const {
    if constexpr (std::is_void_v<Record>) {
      emit_log(opts_.log, level, "master", 0, 0, event, msg);
    } else {
      emit_log(opts_.log, level, "master", w ? w->id : 0, w ? w->pid : 0, event, msg);
    }
  }

  /// "worker 3 (pid 1234)", for lines about a worker told by another one.
  template <class Record>
  static std::string describe(const Record& w) {
    return "worker " + std::to_string(w.id) + " (pid " + std::to_string(w.pid) + ")";
  }

 private:
  const Options& opts_;
};

}  // namespace prefork::detail

#endif  // PREFORK_MASTER_LOG_HPP
