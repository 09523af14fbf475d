// The shared store's error codes (category "prefork.store"), kept apart from prefork::errc: they
// describe a store operation's outcome, which travels back to a worker as a value in a reply.
#ifndef PREFORK_STORE_ERROR_HPP
#define PREFORK_STORE_ERROR_HPP

#include <string>
#include <system_error>
#include <type_traits>

#include <prefork/version.hpp>

namespace prefork {

/// Why a store operation failed. Zero is never used, so a reply's error field may hold 0 for
/// success. The values are part of the wire format (detail/store_wire.hpp): append, never renumber.
enum class store_errc {
  full = 1,          ///< the write would take the store past StoreLimits::max_bytes
  conflict,          ///< compare_and_set: the current value is not the expected one
  not_a_number,      ///< increment: the current value is not a decimal int64
  overflow,          ///< increment: the result would not fit in an int64
  key_too_long,      ///< the key is longer than StoreLimits::max_key_size
  value_too_long,    ///< the value is longer than StoreLimits::max_value_size
  invalid_ttl,       ///< a negative time to live
  bad_request,       ///< request bytes that do not decode, or an unknown operation
  bad_reply,         ///< reply bytes that do not decode
  snapshot_corrupt,  ///< a snapshot file that is truncated, altered or not a snapshot
  snapshot_version,  ///< a snapshot written by a newer format version
  backend_error,     ///< a Store backend failed with an error outside this category
  handed_over,       ///< the store moved to a new master (upgrade); the operation was not applied
};

namespace detail {
class store_category_impl final : public std::error_category {
 public:
  const char* name() const noexcept override { return "prefork.store"; }
  std::string message(int ev) const override {
    switch (static_cast<store_errc>(ev)) {
      case store_errc::full: return "store full: the size limit (max_bytes) is reached";
      case store_errc::conflict:
        return "compare-and-set conflict: the current value is not the expected one";
      case store_errc::not_a_number: return "value is not a decimal 64-bit integer";
      case store_errc::overflow: return "increment would overflow a 64-bit integer";
      case store_errc::key_too_long: return "key longer than the store's max_key_size";
      case store_errc::value_too_long: return "value longer than the store's max_value_size";
      case store_errc::invalid_ttl: return "negative time to live";
      case store_errc::bad_request: return "malformed store request";
      case store_errc::bad_reply: return "malformed store reply";
      case store_errc::snapshot_corrupt: return "store snapshot is corrupt or truncated";
      case store_errc::snapshot_version: return "store snapshot has an unsupported format version";
      case store_errc::backend_error: return "store backend failed";
      case store_errc::handed_over:
        return "store handed over to a new master (upgrade); the operation was not applied";
    }
    return "unknown store error";
  }
};
}  // namespace detail

/// The category of every prefork::store_errc value, named "prefork.store".
inline const std::error_category& store_category() noexcept {
  static const detail::store_category_impl instance;
  return instance;
}

inline std::error_code make_error_code(store_errc e) noexcept {
  return {static_cast<int>(e), store_category()};
}

}  // namespace prefork

template <>
struct std::is_error_code_enum<prefork::store_errc> : std::true_type {};

#endif  // PREFORK_STORE_ERROR_HPP
