// The store's wire format: a request a worker sends to the master and the reply it gets back
// (apply(), which runs one against any Store, is the master's: store_host.hpp). The bytes come
// from another process, so
// the decoders treat them as untrusted: every length is checked against the input that remains
// before anything is copied or allocated, and the encoding is canonical (a decoded message
// encodes back to the same bytes).
#ifndef PREFORK_DETAIL_STORE_WIRE_HPP
#define PREFORK_DETAIL_STORE_WIRE_HPP

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "prefork/detail/store_bytes.hpp"
#include "prefork/store/error.hpp"

namespace prefork {

/// The store operations. The values are part of the wire format: append, never renumber.
enum class StoreOp : std::uint8_t {
  get = 1,
  set,
  erase,
  increment,
  compare_and_set,
  keys,
};

/// One store operation, as a worker asks for it. Fields an operation does not use are ignored
/// (but still carried, so the encoding stays canonical).
struct StoreRequest {
  StoreOp op = StoreOp::get;
  std::string key{};                      ///< for keys: the prefix
  std::string value{};                    ///< set, compare_and_set
  std::optional<std::string> expected{};  ///< compare_and_set; nullopt: only if absent
  std::int64_t delta = 0;               ///< increment
  std::int64_t ttl_ms = 0;              ///< set, increment (on creation), compare_and_set; 0: none
  std::uint64_t limit = std::numeric_limits<std::uint64_t>::max();  ///< keys

  bool operator==(const StoreRequest&) const = default;
};

/// The outcome of one StoreRequest.
struct StoreReply {
  store_errc error{};                ///< store_errc{} (0) on success
  std::string message{};               ///< on error: what the store said, with its numbers
  std::optional<std::string> value{};  ///< get: the value, nullopt if absent
  std::int64_t number = 0;           ///< increment: the new value; erase: 1 if the key existed
  std::vector<std::string> keys{};     ///< keys: the matching keys, sorted

  bool ok() const noexcept { return error == store_errc{}; }
  std::error_code code() const noexcept {
    return ok() ? std::error_code{} : make_error_code(error);
  }
  bool operator==(const StoreReply&) const = default;
};

namespace detail {

// Layouts, integers little-endian, strings as u32 length + bytes:
//   request  u8 format (1), u8 op, u8 flags (bit 0: expected present), key, value,
//            [expected], i64 delta, i64 ttl_ms, u64 limit
//   reply    u8 format (1), u8 error, u8 flags (bit 0: value present), message, [value],
//            i64 number, u32 key count, keys
inline constexpr std::uint8_t kStoreWireFormat = 1;
inline constexpr std::uint8_t kStoreHasOptional = 1;
inline constexpr auto kLastStoreOp = StoreOp::keys;
inline constexpr auto kLastStoreErrc = store_errc::handed_over;

template <class T>
std::optional<T> store_decode_failed(std::error_code& ec, store_errc why) {
  ec = why;
  return std::nullopt;
}

}  // namespace detail

/// Precondition: every string is shorter than 4 GiB (MemoryStore's limits ensure it for what it
/// returns). Throws std::bad_alloc only.
inline std::string encode(const StoreRequest& r) {
  std::string out;
  out.reserve(3 + 4 * 3 + r.key.size() + r.value.size() + (r.expected ? r.expected->size() : 0) +
              24);
  detail::store_put(out, detail::kStoreWireFormat);
  detail::store_put(out, static_cast<std::uint8_t>(r.op));
  detail::store_put(out, r.expected ? detail::kStoreHasOptional : std::uint8_t{0});
  detail::store_put_string(out, r.key);
  detail::store_put_string(out, r.value);
  if (r.expected) detail::store_put_string(out, *r.expected);
  detail::store_put(out, static_cast<std::uint64_t>(r.delta));
  detail::store_put(out, static_cast<std::uint64_t>(r.ttl_ms));
  detail::store_put(out, r.limit);
  return out;
}

/// Same precondition as encode(StoreRequest). Throws std::bad_alloc only.
inline std::string encode(const StoreReply& r) {
  std::size_t size = 3 + 4 + r.message.size() + (r.value ? 4 + r.value->size() : 0) + 12;
  for (const std::string& k : r.keys) size += 4 + k.size();
  std::string out;
  out.reserve(size);
  detail::store_put(out, detail::kStoreWireFormat);
  detail::store_put(out, static_cast<std::uint8_t>(r.error));
  detail::store_put(out, r.value ? detail::kStoreHasOptional : std::uint8_t{0});
  detail::store_put_string(out, r.message);
  if (r.value) detail::store_put_string(out, *r.value);
  detail::store_put(out, static_cast<std::uint64_t>(r.number));
  detail::store_put(out, static_cast<std::uint32_t>(r.keys.size()));
  for (const std::string& k : r.keys) detail::store_put_string(out, k);
  return out;
}

/// Decodes request bytes from a worker. Returns nullopt and sets ec to store_errc::bad_request
/// for anything encode() would not have produced (unknown format or op, unknown flags, a
/// length past the end, trailing bytes); otherwise clears ec. Never has undefined behaviour;
/// allocates at most the input's size. Throws std::bad_alloc only.
inline std::optional<StoreRequest> decode_request(std::string_view bytes, std::error_code& ec) {
  detail::StoreReader in(bytes);
  const auto format = in.get<std::uint8_t>();
  const auto op = in.get<std::uint8_t>();
  const auto flags = in.get<std::uint8_t>();
  if (!in.ok() || format != detail::kStoreWireFormat || op == 0 ||
      op > static_cast<std::uint8_t>(detail::kLastStoreOp) ||
      (flags & ~detail::kStoreHasOptional) != 0)
    return detail::store_decode_failed<StoreRequest>(ec, store_errc::bad_request);
  const std::string_view key = in.string();
  const std::string_view value = in.string();
  std::optional<std::string_view> expected;
  if (flags & detail::kStoreHasOptional) expected = in.string();
  const auto delta = in.get<std::uint64_t>();
  const auto ttl = in.get<std::uint64_t>();
  const auto limit = in.get<std::uint64_t>();
  if (!in.at_end()) return detail::store_decode_failed<StoreRequest>(ec, store_errc::bad_request);

  StoreRequest r;
  r.op = static_cast<StoreOp>(op);
  r.key = key;
  r.value = value;
  if (expected) r.expected.emplace(*expected);
  r.delta = static_cast<std::int64_t>(delta);
  r.ttl_ms = static_cast<std::int64_t>(ttl);
  r.limit = limit;
  ec.clear();
  return r;
}

/// Decodes reply bytes from the master. Returns nullopt and sets ec to store_errc::bad_reply
/// for anything encode() would not have produced; otherwise clears ec. Never has undefined
/// behaviour; a key count is checked against the bytes that remain (4 per key at least) before
/// anything is reserved. Throws std::bad_alloc only.
inline std::optional<StoreReply> decode_reply(std::string_view bytes, std::error_code& ec) {
  detail::StoreReader in(bytes);
  const auto format = in.get<std::uint8_t>();
  const auto error = in.get<std::uint8_t>();
  const auto flags = in.get<std::uint8_t>();
  if (!in.ok() || format != detail::kStoreWireFormat ||
      error > static_cast<std::uint8_t>(detail::kLastStoreErrc) ||
      (flags & ~detail::kStoreHasOptional) != 0)
    return detail::store_decode_failed<StoreReply>(ec, store_errc::bad_reply);
  StoreReply r;
  r.error = static_cast<store_errc>(error);
  r.message = in.string();
  if (flags & detail::kStoreHasOptional) r.value.emplace(in.string());
  r.number = static_cast<std::int64_t>(in.get<std::uint64_t>());
  const auto count = in.get<std::uint32_t>();
  if (!in.ok() || count > in.remaining() / 4)
    return detail::store_decode_failed<StoreReply>(ec, store_errc::bad_reply);
  r.keys.reserve(count);
  for (std::uint32_t i = 0; i < count && in.ok(); ++i) r.keys.emplace_back(in.string());
  if (!in.at_end()) return detail::store_decode_failed<StoreReply>(ec, store_errc::bad_reply);
  ec.clear();
  return r;
}

}  // namespace prefork

#endif  // PREFORK_DETAIL_STORE_WIRE_HPP
