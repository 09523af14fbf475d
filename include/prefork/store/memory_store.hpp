// MemoryStore, the default Store backend: an ordered map with byte accounting, lazy expiry,
// an expiry index for bounded sweeps, and crash-safe snapshots. Runs in the master only; its
// operations are synchronous and single-threaded, so each one is linearizable.
#ifndef PREFORK_STORE_MEMORY_STORE_HPP
#define PREFORK_STORE_MEMORY_STORE_HPP

#include <charconv>
#include <chrono>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "prefork/version.hpp"
#include "prefork/detail/store_snapshot.hpp"
#include "prefork/store/concept.hpp"
#include "prefork/store/error.hpp"

namespace prefork {

/// What MemoryStore needs of a clock: std::chrono::steady_clock, or a test's fake clock.
template <class C>
concept StoreClock = requires(const C& c) {
  typename C::duration;
  typename C::time_point;
  { c.now() } -> std::same_as<typename C::time_point>;
};

/// Bounds on a MemoryStore. An entry costs key.size() + value.size() + entry_overhead bytes
/// against max_bytes; the overhead approximates the map and index nodes, so max_bytes tracks
/// the heap the store really holds.
struct StoreLimits {
  static constexpr std::size_t entry_overhead = 128;

  std::size_t max_bytes = 64 * 1024 * 1024;
  std::size_t max_key_size = 1024;
  std::size_t max_value_size = 1024 * 1024;

  /// Throws std::invalid_argument naming the field: max_bytes must exceed entry_overhead, and
  /// max_key_size and max_value_size must be between 1 and 2^32 - 1 (the snapshot and wire
  /// formats carry 32-bit lengths).
  void validate() const {
    constexpr std::size_t max_length = std::numeric_limits<std::uint32_t>::max();
    if (max_bytes <= entry_overhead)
      throw std::invalid_argument("prefork: StoreLimits.max_bytes must be more than " +
                                  std::to_string(entry_overhead) + " (one entry's overhead), got " +
                                  std::to_string(max_bytes));
    if (max_key_size == 0 || max_key_size > max_length)
      throw std::invalid_argument("prefork: StoreLimits.max_key_size must be between 1 and " +
                                  std::to_string(max_length) + ", got " +
                                  std::to_string(max_key_size));
    if (max_value_size == 0 || max_value_size > max_length)
      throw std::invalid_argument("prefork: StoreLimits.max_value_size must be between 1 and " +
                                  std::to_string(max_length) + ", got " +
                                  std::to_string(max_value_size));
  }
};

/// Options of MemoryStore::save and load.
struct SnapshotOptions {
  /// The wall-clock time that expiries are converted against; default system_clock::now().
  std::optional<std::chrono::system_clock::time_point> wall_now{};
  /// save only: called after each chunk (about 64 KiB) reaches the temporary file.
  std::function<void(std::size_t bytes_written)> on_progress{};
};

namespace detail {

/// A whole-string decimal int64 ("-12", "0", "007"); no sign '+', no spaces.
inline std::optional<std::int64_t> parse_int64(std::string_view s) noexcept {
  std::int64_t v = 0;
  const char* end = s.data() + s.size();
  auto [ptr, ec] = std::from_chars(s.data(), end, v);
  if (s.empty() || ec != std::errc{} || ptr != end) return std::nullopt;
  return v;
}

inline std::string format_int64(std::int64_t v) {
  char buf[24];
  auto [ptr, ec] = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, ptr);
}

}  // namespace detail

/// The default Store: an ordered map (keys() by prefix is a range scan), O(log n) per
/// operation. Runs in the master; not thread-safe (the master's loop is single-threaded).
///
/// Expiry is lazy: an operation that meets an expired key reclaims it. sweep() reclaims the
/// rest from the master's timer, in expiry order, with a bound on the work per call; a write
/// that would fail with `full` sweeps everything expired first.
template <StoreClock Clock = std::chrono::steady_clock>
class MemoryStore {
 public:
  using clock_type = Clock;
  using time_point = typename Clock::time_point;

  /// Throws std::invalid_argument from StoreLimits::validate.
  explicit MemoryStore(StoreLimits limits = {}, Clock clock = Clock{})
      : limits_((limits.validate(), limits)), clock_(std::move(clock)) {}

  // The expiry index holds views of the map's keys: a copy would point into the original.
  MemoryStore(const MemoryStore&) = delete;
  MemoryStore& operator=(const MemoryStore&) = delete;
  MemoryStore(MemoryStore&& o) noexcept
      : limits_(o.limits_), clock_(std::move(o.clock_)), entries_(std::move(o.entries_)),
        expiries_(std::move(o.expiries_)), used_(std::exchange(o.used_, 0)) {
    o.entries_.clear();
    o.expiries_.clear();
  }
  MemoryStore& operator=(MemoryStore&& o) noexcept {
    if (this != &o) {
      limits_ = o.limits_;
      clock_ = std::move(o.clock_);
      entries_ = std::move(o.entries_);
      expiries_ = std::move(o.expiries_);
      used_ = std::exchange(o.used_, 0);
      o.entries_.clear();
      o.expiries_.clear();
    }
    return *this;
  }

  /// The value of a live key, or nullopt. Throws std::bad_alloc only.
  std::optional<std::string> get(std::string_view key) {
    auto it = find_live(key, clock_.now());
    if (it == entries_.end()) return std::nullopt;
    return it->second.value;
  }

  /// Stores value under key, replacing any value and expiry; ttl 0 means no expiry.
  /// Errors: key_too_long, value_too_long, invalid_ttl (negative), full (replacing a value
  /// counts only the difference). On error nothing changed. Throws std::bad_alloc only.
  std::error_code set(std::string_view key, std::string_view value,
                      std::chrono::milliseconds ttl = {}) {
    if (auto ec = check(key, value, ttl)) return ec;
    const time_point now = clock_.now();
    auto it = find_live(key, now);
    if (auto ec = make_room(it, key.size() + value.size(), now)) return ec;
    write(it, key, value, expiry_after(ttl, now));
    return {};
  }

  /// Removes key; true if it existed (an expired key did not). Never fails.
  bool erase(std::string_view key) {
    auto it = find_live(key, clock_.now());
    if (it == entries_.end()) return false;
    remove(it);
    return true;
  }

  /// Adds delta to the decimal int64 under key and returns the new value. A missing key counts
  /// from 0 and is created with the given ttl (0: none); an existing key keeps its expiry.
  /// Errors: not_a_number, overflow, key_too_long, value_too_long, invalid_ttl, full. On error
  /// nothing changed. Throws std::bad_alloc only.
  StoreResult<std::int64_t> increment(std::string_view key, std::int64_t delta,
                                      std::chrono::milliseconds ttl = {}) {
    if (auto ec = check(key, {}, ttl)) return {0, ec};
    const time_point now = clock_.now();
    auto it = find_live(key, now);
    std::int64_t current = 0;
    if (it != entries_.end()) {
      auto parsed = detail::parse_int64(it->second.value);
      if (!parsed) return {0, store_errc::not_a_number};
      current = *parsed;
    }
    constexpr auto lo = std::numeric_limits<std::int64_t>::min();
    constexpr auto hi = std::numeric_limits<std::int64_t>::max();
    if ((delta > 0 && current > hi - delta) || (delta < 0 && current < lo - delta))
      return {0, store_errc::overflow};
    const std::int64_t next = current + delta;
    const std::string text = detail::format_int64(next);
    if (text.size() > limits_.max_value_size) return {0, store_errc::value_too_long};
    if (auto ec = make_room(it, key.size() + text.size(), now)) return {0, ec};
    write(it, key, text, it != entries_.end() ? it->second.expires : expiry_after(ttl, now));
    return {next, {}};
  }

  /// Sets key to value only if its current value equals *expected, or, with expected ==
  /// nullopt, only if key is absent (or expired). The new value gets ttl (0: none).
  /// Errors: conflict, key_too_long, value_too_long, invalid_ttl, full. On error nothing
  /// changed. Throws std::bad_alloc only.
  std::error_code compare_and_set(std::string_view key, std::optional<std::string_view> expected,
                                  std::string_view value, std::chrono::milliseconds ttl = {}) {
    if (auto ec = check(key, value, ttl)) return ec;
    const time_point now = clock_.now();
    auto it = find_live(key, now);
    const bool present = it != entries_.end();
    if (expected ? !present || it->second.value != *expected : present)
      return store_errc::conflict;
    if (auto ec = make_room(it, key.size() + value.size(), now)) return ec;
    write(it, key, value, expiry_after(ttl, now));
    return {};
  }

  /// Live keys that start with prefix, in ascending byte order, at most limit of them.
  /// Throws std::bad_alloc only.
  std::vector<std::string> keys(std::string_view prefix,
                                std::size_t limit = std::numeric_limits<std::size_t>::max()) {
    std::vector<std::string> out;
    const time_point now = clock_.now();
    for (auto it = entries_.lower_bound(prefix);
         it != entries_.end() && out.size() < limit && it->first.starts_with(prefix);) {
      if (expired(it->second, now)) {
        it = remove(it);
      } else {
        out.push_back(it->first);
        ++it;
      }
    }
    return out;
  }

  /// Reclaims up to max_entries expired entries, soonest-expired first, and returns how many.
  /// O(k log n) for k reclaimed; meant for a master timer (e.g. every second, 1000 entries).
  std::size_t sweep(std::size_t max_entries = std::numeric_limits<std::size_t>::max()) {
    return sweep_until(clock_.now(), max_entries);
  }

  /// ec's message with this store's numbers where they help ("store full: 1048000 of 1048576
  /// bytes used"); for other codes, ec.message().
  std::string describe(std::error_code ec) const {
    if (ec == store_errc::full)
      return "store full: " + std::to_string(used_) + " of " + std::to_string(limits_.max_bytes) +
             " bytes used";
    if (ec == store_errc::key_too_long)
      return "key too long: the store's limit is " + std::to_string(limits_.max_key_size) +
             " bytes";
    if (ec == store_errc::value_too_long)
      return "value too long: the store's limit is " + std::to_string(limits_.max_value_size) +
             " bytes";
    return ec.message();
  }

  /// Entries held, expired ones not yet reclaimed included.
  std::size_t size() const noexcept { return entries_.size(); }
  /// Bytes counted against max_bytes, expired entries not yet reclaimed included.
  std::size_t bytes_used() const noexcept { return used_; }
  const StoreLimits& limits() const noexcept { return limits_; }
  const Clock& clock() const noexcept { return clock_; }

  void clear() noexcept {
    expiries_.clear();
    entries_.clear();
    used_ = 0;
  }

  /// Writes the live entries to `path` crash-safely (see detail::SnapshotFileWriter): on any
  /// error, or a crash of the process at any point, the previous file at `path` is intact.
  /// Expiries are written as wall-clock times. Errors: system errors of open/write/fsync/
  /// rename (e.g. ENOSPC, EACCES). Runs in the master, typically at shutdown; blocks for the
  /// disk. Throws std::bad_alloc only.
  std::error_code save(const std::string& path, const SnapshotOptions& options = {}) const {
    const auto wall_ms = wall_now_ms(options);
    const time_point now = clock_.now();
    detail::SnapshotFileWriter writer(path, options.on_progress);
    if (auto ec = writer.open()) return ec;
    for (const auto& [key, entry] : entries_) {
      if (expired(entry, now)) continue;
      if (auto ec = writer.add({key, entry.value, to_wall_ms(entry.expires, now, wall_ms)}))
        return ec;
    }
    return writer.commit();
  }

  /// Replaces the whole content with the snapshot at `path`, dropping entries already expired.
  /// Everything is validated first; on any error the store is unchanged. Errors: ENOENT (as a
  /// system error: no snapshot yet, a normal first start), other open/read errors,
  /// snapshot_corrupt, snapshot_version, and full / key_too_long / value_too_long when the
  /// snapshot does not fit this store's limits. Runs in the master at start. Throws
  /// std::bad_alloc only.
  std::error_code load(const std::string& path, const SnapshotOptions& options = {}) {
    // A record takes 16 bytes of the file besides its key and value, and counts at least that
    // (entry_overhead) against max_bytes, so no file above this size fits.
    constexpr std::size_t frame = detail::kSnapshotHeaderSize + detail::kSnapshotTrailerSize;
    const std::size_t max_file =
        limits_.max_bytes > std::numeric_limits<std::size_t>::max() - frame
            ? std::numeric_limits<std::size_t>::max()
            : limits_.max_bytes + frame;
    std::string bytes;
    if (auto ec = detail::read_snapshot_file(path, max_file, bytes)) return ec;
    std::vector<detail::SnapshotRecord> records;
    const detail::SnapshotBounds bounds{limits_.max_key_size, limits_.max_value_size,
                                        limits_.max_bytes, StoreLimits::entry_overhead};
    if (auto ec = detail::parse_snapshot(bytes, bounds, records)) return ec;

    const auto wall_ms = wall_now_ms(options);
    const time_point now = clock_.now();
    Map entries;
    Index expiries;
    std::size_t used = 0;
    for (const detail::SnapshotRecord& r : records) {
      time_point expires = never();
      if (r.expires_ms != 0) {
        if (r.expires_ms <= wall_ms) continue;
        const std::uint64_t left = r.expires_ms - wall_ms;
        constexpr auto max_ms = static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
        expires = expiry_after(std::chrono::milliseconds(static_cast<std::int64_t>(
                                   left > max_ms ? max_ms : left)),
                               now);
      }
      auto it = entries.emplace_hint(entries.end(), std::string(r.key),
                                     Entry{std::string(r.value), expires});
      if (expires != never()) expiries.emplace(expires, it->first);
      used += cost(r.key.size() + r.value.size());
    }
    entries_.swap(entries);
    expiries_.swap(expiries);
    used_ = used;
    return {};
  }

 private:
  struct Entry {
    std::string value;
    time_point expires;  ///< never() for no expiry
  };
  using Map = std::map<std::string, Entry, std::less<>>;
  using Iter = typename Map::iterator;
  // Views of the map's own keys: node-based, so they stay valid until the entry is erased.
  using Index = std::set<std::pair<time_point, std::string_view>>;

  static constexpr time_point never() noexcept { return time_point::max(); }
  static bool expired(const Entry& e, time_point now) noexcept { return e.expires <= now; }
  static std::size_t cost(std::size_t payload) noexcept {
    return payload + StoreLimits::entry_overhead;
  }

  std::error_code check(std::string_view key, std::string_view value,
                        std::chrono::milliseconds ttl) const noexcept {
    if (key.size() > limits_.max_key_size) return store_errc::key_too_long;
    if (value.size() > limits_.max_value_size) return store_errc::value_too_long;
    if (ttl.count() < 0) return store_errc::invalid_ttl;
    return {};
  }

  // A TTL beyond what the clock can represent from now is as good as never.
  static time_point expiry_after(std::chrono::milliseconds ttl, time_point now) noexcept {
    using namespace std::chrono;
    if (ttl.count() == 0) return never();
    const auto headroom = now.time_since_epoch().count() >= 0
                              ? time_point::max() - now
                              : time_point::duration::max();
    if (ttl >= floor<milliseconds>(headroom)) return never();
    return now + ceil<typename time_point::duration>(ttl);
  }

  static std::uint64_t wall_now_ms(const SnapshotOptions& options) {
    using namespace std::chrono;
    const auto wall = options.wall_now.value_or(system_clock::now());
    const auto ms = duration_cast<milliseconds>(wall.time_since_epoch()).count();
    return ms > 0 ? static_cast<std::uint64_t>(ms) : 0;
  }

  static std::uint64_t to_wall_ms(time_point expires, time_point now, std::uint64_t wall_ms) {
    using namespace std::chrono;
    if (expires == never()) return 0;
    const auto left = static_cast<std::uint64_t>(ceil<milliseconds>(expires - now).count());
    // At least 1: 0 means "never" in the file.
    return wall_ms + (left == 0 ? 1 : left);
  }

  std::size_t sweep_until(time_point now, std::size_t max_entries) {
    std::size_t n = 0;
    while (n < max_entries && !expiries_.empty() && expiries_.begin()->first <= now) {
      remove(entries_.find(expiries_.begin()->second));
      ++n;
    }
    return n;
  }

  Iter find_live(std::string_view key, time_point now) {
    auto it = entries_.find(key);
    if (it != entries_.end() && expired(it->second, now)) {
      remove(it);
      return entries_.end();
    }
    return it;
  }

  Iter remove(Iter it) noexcept {
    if (it->second.expires != never()) expiries_.erase({it->second.expires, it->first});
    used_ -= cost(it->first.size() + it->second.value.size());
    return entries_.erase(it);
  }

  // `it` is the live entry being replaced (or end()); payload the new key + value size.
  std::error_code make_room(Iter it, std::size_t payload, time_point now) {
    const std::size_t old = it == entries_.end() ? 0 : cost(it->first.size() + it->second.value.size());
    auto fits = [&] { return used_ - old + cost(payload) <= limits_.max_bytes; };
    if (fits()) return {};
    // Expired entries still count until reclaimed; a write must not fail for their sake. `it`
    // is live at `now`, so sweeping up to the same `now` cannot remove it.
    if (sweep_until(now, std::numeric_limits<std::size_t>::max()) > 0 && fits()) return {};
    return store_errc::full;
  }

  // Either completes or, if an allocation throws, leaves the store as it was.
  void write(Iter it, std::string_view key, std::string_view value, time_point expires) {
    if (it == entries_.end()) {
      it = entries_.emplace(std::string(key), Entry{std::string(value), expires}).first;
      if (expires != never()) {
        try {
          expiries_.emplace(expires, it->first);
        } catch (...) {
          entries_.erase(it);
          throw;
        }
      }
      used_ += cost(key.size() + value.size());
      return;
    }
    Entry& e = it->second;
    const std::size_t old_size = e.value.size();
    const bool reindex = e.expires != expires;
    if (reindex && expires != never()) expiries_.emplace(expires, it->first);
    try {
      e.value.assign(value.data(), value.size());
    } catch (...) {
      if (reindex && expires != never()) expiries_.erase({expires, it->first});
      throw;
    }
    if (reindex && e.expires != never()) expiries_.erase({e.expires, it->first});
    e.expires = expires;
    used_ = used_ - old_size + value.size();
  }

  StoreLimits limits_;
  [[no_unique_address]] Clock clock_;
  Map entries_;
  Index expiries_;
  std::size_t used_ = 0;
};

static_assert(Store<MemoryStore<>>);

}  // namespace prefork

#endif  // PREFORK_STORE_MEMORY_STORE_HPP
