// The two records a worker and its master exchange outside the channel's frames: the boot
// record an exec'd worker finds in its environment (who it is, which descriptor is its channel,
// its limits), and the counters a worker reports in a stats frame. Encoding and decoding only,
// with no system call, so both formats are tested without a process; cluster.hpp reads the
// environment (take_exec_boot) and checks the descriptor.
#ifndef PREFORK_DETAIL_BOOT_HPP
#define PREFORK_DETAIL_BOOT_HPP

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>

#include <prefork/version.hpp>
#include <prefork/channel.hpp>
#include <prefork/detail/number.hpp>

namespace prefork::detail {

/// The environment variable that tells an exec'd worker who it is: encode_boot()'s value.
inline constexpr const char* kWorkerEnv = "PREFORK_WORKER";

/// What a worker has done so far, for the master's status: sent in a stats frame's payload.
struct WorkerCounters {
  std::uint64_t connections_total = 0;  ///< connections it has taken, ever
  std::uint64_t requests = 0;           ///< WorkerContext::request_done() calls
};

inline std::string encode_counters(const WorkerCounters& c) {
  std::string out(16, '\0');
  std::memcpy(out.data(), &c.connections_total, 8);
  std::memcpy(out.data() + 8, &c.requests, 8);
  return out;
}

/// False (and `c` unchanged) unless `payload` is exactly what encode_counters() makes.
inline bool decode_counters(std::string_view payload, WorkerCounters& c) noexcept {
  if (payload.size() != 16) return false;
  std::memcpy(&c.connections_total, payload.data(), 8);
  std::memcpy(&c.requests, payload.data() + 8, 8);
  return true;
}

/// What a worker needs to know about itself, from fork() or from the exec environment.
struct WorkerBoot {
  unsigned id = 0;
  std::size_t slot = 0;
  int channel_fd = -1;
  ChannelLimits limits;
  std::uint64_t heartbeat_ms = 0;     ///< 0: no heartbeats (no watchdog)
  std::uint64_t max_connections = 0;  ///< ask to be recycled after this many (0: never)
  std::uint64_t max_requests = 0;     ///< ... or after this many request_done() calls
};

/// PREFORK_WORKER's value for an exec'd worker: the fields in declaration order, as decimal
/// numbers separated by commas.
inline std::string encode_boot(const WorkerBoot& b) {
  std::string v;
  for (std::uint64_t x : {std::uint64_t{b.id}, std::uint64_t{b.slot},
                          static_cast<std::uint64_t>(b.channel_fd),
                          std::uint64_t{b.limits.max_message_size},
                          std::uint64_t{b.limits.max_queued_bytes}, b.heartbeat_ms,
                          b.max_connections, b.max_requests})
    v += (v.empty() ? "" : ",") + std::to_string(x);
  return v;
}

/// encode_boot()'s value read back; nullopt unless it has exactly its fields, each a whole
/// number that fits its field. Whether channel_fd is open is for the caller to check.
inline std::optional<WorkerBoot> decode_boot(std::string_view value) noexcept {
  constexpr std::size_t kFields = 8;
  std::string_view parts[kFields];
  std::size_t n = 0, start = 0;
  for (std::size_t i = 0; i <= value.size() && n < kFields; ++i) {
    if (i == value.size() || value[i] == ',') {
      parts[n++] = value.substr(start, i - start);
      start = i + 1;
    }
  }
  WorkerBoot b;
  if (n != kFields || start <= value.size() || !parse_number(parts[0], b.id) ||
      !parse_number(parts[1], b.slot) || !parse_number(parts[2], b.channel_fd) ||
      !parse_number(parts[3], b.limits.max_message_size) ||
      !parse_number(parts[4], b.limits.max_queued_bytes) ||
      !parse_number(parts[5], b.heartbeat_ms) || !parse_number(parts[6], b.max_connections) ||
      !parse_number(parts[7], b.max_requests))
    return std::nullopt;
  return b;
}

}  // namespace prefork::detail

#endif  // PREFORK_DETAIL_BOOT_HPP
