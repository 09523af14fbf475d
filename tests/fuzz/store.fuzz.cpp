// libFuzzer target for the shared store's untrusted inputs: the request and reply decoders (a
// worker's or the master's bytes), the snapshot parser (a file on disk), and a script of
// requests applied to a MemoryStore and to a reference model, whose replies must agree.
//
// Input layout: the first byte modulo 5 is the mode, the rest its bytes:
//   0  a request: decode_request; if accepted, it is canonical and apply() on a fresh
//      MemoryStore answers what the model answers
//   1  a reply: decode_reply; if accepted, it is canonical
//   2  a snapshot file: detail::parse_snapshot (small limits, see kLimits)
//   3  the same, with the trailing CRC-32 recomputed first, to reach the parser behind it
//   4  a script: records of [u8 clock advance in ms][u8 length][request bytes], each applied to
//      one MemoryStore and to the model in turn; sweeps in between; byte counts must agree
// Seeds: tests/fuzz/corpus/store/, written by fuzz.make_corpus.
#include "prefork/store.hpp"

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace {

[[noreturn]] void violated(const char* what, int line) {
  std::fprintf(stderr, "store.fuzz:%d: invariant violated: %s\n", line, what);
  std::abort();
}
// A macro only for the condition's text and line: std::source_location needs Clang 15.
#define FUZZ_CHECK(cond)                    \
  do {                                      \
    if (!(cond)) violated(#cond, __LINE__); \
  } while (0)

using prefork::StoreOp;
using prefork::StoreReply;
using prefork::StoreRequest;
using prefork::store_errc;

// The mode byte; make_corpus.cpp writes the same values.
enum Mode : unsigned char { request = 0, reply = 1, snapshot = 2, snapshot_fixed_crc = 3, script = 4 };

struct FakeClock {
  using duration = std::chrono::nanoseconds;
  using rep = duration::rep;
  using period = duration::period;
  using time_point = std::chrono::time_point<FakeClock, duration>;
  std::shared_ptr<time_point> t = std::make_shared<time_point>(std::chrono::hours(1));
  time_point now() const { return *t; }
};

// Small limits so that scripts reach full, key_too_long and value_too_long.
constexpr prefork::StoreLimits kLimits{.max_bytes = 4 * prefork::StoreLimits::entry_overhead,
                                       .max_key_size = 16,
                                       .max_value_size = 64};

// The store's documented semantics written as plainly as possible: no expiry index, no byte
// counter; expired entries are simply not live.
class Model {
 public:
  explicit Model(const FakeClock& clock) : clock_(clock) {}

  StoreReply apply(const StoreRequest& r) {
    StoreReply out;
    const auto now = clock_.now().time_since_epoch().count();
    drop_expired(now);
    const bool key_ok = r.key.size() <= kLimits.max_key_size;
    const bool value_ok = r.value.size() <= kLimits.max_value_size;
    const bool ttl_ok = r.ttl_ms >= 0;
    auto it = map_.find(r.key);
    auto fail = [&](store_errc e) {
      StoreReply f;
      f.error = e;
      f.message = std::error_code(e).message();
      if (e == store_errc::full)
        f.message = "store full: " + std::to_string(live_bytes()) + " of " +
                    std::to_string(kLimits.max_bytes) + " bytes used";
      if (e == store_errc::key_too_long)
        f.message = "key too long: the store's limit is " + std::to_string(kLimits.max_key_size) + " bytes";
      if (e == store_errc::value_too_long)
        f.message = "value too long: the store's limit is " + std::to_string(kLimits.max_value_size) + " bytes";
      return f;
    };
    auto fits = [&](std::size_t payload) {
      const std::size_t old = it == map_.end() ? 0 : cost(it->first, it->second.value);
      return live_bytes() - old + payload + prefork::StoreLimits::entry_overhead <= kLimits.max_bytes;
    };
    auto expiry = [&](std::int64_t ttl_ms) -> std::int64_t {
      // Past what the nanosecond clock can hold from now: never, as MemoryStore saturates.
      const std::int64_t headroom_ms = (std::numeric_limits<std::int64_t>::max() - now) / 1'000'000;
      if (ttl_ms == 0 || ttl_ms >= headroom_ms) return -1;
      return now + ttl_ms * 1'000'000;
    };
    switch (r.op) {
      case StoreOp::get:
        if (it != map_.end()) out.value = it->second.value;
        return out;
      case StoreOp::erase:
        out.number = it != map_.end() ? 1 : 0;
        if (it != map_.end()) map_.erase(it);
        return out;
      case StoreOp::set:
      case StoreOp::compare_and_set:
        if (!key_ok) return fail(store_errc::key_too_long);
        if (!value_ok) return fail(store_errc::value_too_long);
        if (!ttl_ok) return fail(store_errc::invalid_ttl);
        if (r.op == StoreOp::compare_and_set &&
            (r.expected ? it == map_.end() || it->second.value != *r.expected : it != map_.end()))
          return fail(store_errc::conflict);
        if (!fits(r.key.size() + r.value.size())) return fail(store_errc::full);
        map_[r.key] = {r.value, expiry(r.ttl_ms)};
        return out;
      case StoreOp::increment: {
        if (!key_ok) return fail(store_errc::key_too_long);
        if (!ttl_ok) return fail(store_errc::invalid_ttl);
        std::int64_t v = 0;
        if (it != map_.end()) {
          auto parsed = prefork::detail::parse_int64(it->second.value);
          if (!parsed) return fail(store_errc::not_a_number);
          v = *parsed;
        }
        std::int64_t next = 0;
        if (__builtin_add_overflow(v, r.delta, &next)) return fail(store_errc::overflow);
        const std::string text = std::to_string(next);
        if (text.size() > kLimits.max_value_size) return fail(store_errc::value_too_long);
        if (!fits(r.key.size() + text.size())) return fail(store_errc::full);
        const std::int64_t expires = it != map_.end() ? it->second.expires : expiry(r.ttl_ms);
        map_[r.key] = {text, expires};
        out.number = next;
        return out;
      }
      case StoreOp::keys:
        for (auto k = map_.lower_bound(r.key);
             k != map_.end() && k->first.starts_with(r.key) && out.keys.size() < r.limit; ++k)
          out.keys.push_back(k->first);
        return out;
    }
    return fail(store_errc::bad_request);
  }

  std::size_t live_bytes() const {
    const auto now = clock_.now().time_since_epoch().count();
    std::size_t n = 0;
    for (const auto& [k, e] : map_)
      if (e.expires < 0 || e.expires > now) n += cost(k, e.value);
    return n;
  }

 private:
  struct Entry {
    std::string value;
    std::int64_t expires;  // ns on the fake clock; -1 = never
  };
  static std::size_t cost(const std::string& k, const std::string& v) {
    return k.size() + v.size() + prefork::StoreLimits::entry_overhead;
  }
  void drop_expired(std::int64_t now) {
    std::erase_if(map_, [&](const auto& kv) { return kv.second.expires >= 0 && kv.second.expires <= now; });
  }

  const FakeClock& clock_;
  std::map<std::string, Entry> map_;
};

void check_request(std::string_view bytes) {
  std::error_code ec = store_errc::full;
  const auto r = prefork::decode_request(bytes, ec);
  if (!r) {
    FUZZ_CHECK(ec == store_errc::bad_request);
    return;
  }
  FUZZ_CHECK(!ec);
  FUZZ_CHECK(prefork::encode(*r) == bytes);
  FakeClock clock;
  prefork::MemoryStore<FakeClock> store(kLimits, clock);
  Model model(clock);
  FUZZ_CHECK(prefork::apply(store, *r) == model.apply(*r));
}

void check_reply(std::string_view bytes) {
  std::error_code ec = store_errc::full;
  const auto r = prefork::decode_reply(bytes, ec);
  if (!r) {
    FUZZ_CHECK(ec == store_errc::bad_reply);
    return;
  }
  FUZZ_CHECK(!ec);
  FUZZ_CHECK(prefork::encode(*r) == bytes);
  FUZZ_CHECK(r->ok() == !r->code());
}

void check_snapshot(std::string_view bytes) {
  const prefork::detail::SnapshotBounds bounds{kLimits.max_key_size, kLimits.max_value_size,
                                                kLimits.max_bytes,
                                                prefork::StoreLimits::entry_overhead};
  std::vector<prefork::detail::SnapshotRecord> records;
  const std::error_code ec = prefork::detail::parse_snapshot(bytes, bounds, records);
  if (ec) {
    FUZZ_CHECK(records.empty());
    FUZZ_CHECK(ec.category() == prefork::store_category());
    return;
  }
  std::size_t cost = 0;
  for (std::size_t i = 0; i < records.size(); ++i) {
    const auto& r = records[i];
    FUZZ_CHECK(r.key.data() >= bytes.data() && r.key.data() + r.key.size() <= bytes.data() + bytes.size());
    FUZZ_CHECK(r.value.data() >= bytes.data() &&
               r.value.data() + r.value.size() <= bytes.data() + bytes.size());
    FUZZ_CHECK(r.key.size() <= bounds.max_key_size && r.value.size() <= bounds.max_value_size);
    FUZZ_CHECK(i == 0 || records[i - 1].key < r.key);
    cost += r.key.size() + r.value.size() + bounds.entry_overhead;
  }
  FUZZ_CHECK(cost <= bounds.max_bytes);
}

// Records of [u8 clock advance in ms][u8 request length][request bytes], applied in order to a
// MemoryStore and to the Model, whose replies must be equal.
void check_script(std::string_view bytes) {
  FakeClock clock;
  prefork::MemoryStore<FakeClock> store(kLimits, clock);
  Model model(clock);
  while (bytes.size() >= 2) {
    *clock.t += std::chrono::milliseconds(static_cast<unsigned char>(bytes[0]));
    const std::size_t n = std::min<std::size_t>(static_cast<unsigned char>(bytes[1]), bytes.size() - 2);
    const std::string_view frame = bytes.substr(2, n);
    bytes.remove_prefix(2 + n);
    std::error_code ec;
    const auto r = prefork::decode_request(frame, ec);
    if (!r) continue;
    const StoreReply got = prefork::apply(store, *r);
    const StoreReply want = model.apply(*r);
    FUZZ_CHECK(got == want);
    FUZZ_CHECK(store.bytes_used() <= kLimits.max_bytes);
    if (frame.size() % 7 == 0) store.sweep(2);
  }
  store.sweep();
  FUZZ_CHECK(store.bytes_used() == model.live_bytes());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  // Its own allocation of exactly the input's bytes: ASan catches a read one past the end.
  const std::string owned(reinterpret_cast<const char*>(data) + 1, size - 1);
  const std::string_view bytes(owned);
  switch (data[0] % 5) {
    case request: check_request(bytes); break;
    case reply: check_reply(bytes); break;
    case snapshot: check_snapshot(bytes); break;
    case snapshot_fixed_crc: {
      // A valid checksum, so that the fuzzer reaches the structure behind it.
      std::string fixed = owned;
      if (fixed.size() >= 4) {
        const std::uint32_t crc =
            prefork::detail::crc32(0, std::string_view(fixed).substr(0, fixed.size() - 4));
        for (std::size_t i = 0; i < 4; ++i)
          fixed[fixed.size() - 4 + i] = static_cast<char>((crc >> (8 * i)) & 0xFFu);
      }
      check_snapshot(fixed);
      break;
    }
    case script: check_script(bytes); break;
  }
  return 0;
}
