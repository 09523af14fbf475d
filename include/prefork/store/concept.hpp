// The Store concept: what the master's shared store must offer, so that another backend (the
// examples' Redis one, say) can replace MemoryStore; and StoreResult, the value-or-error its
// operations return.
#ifndef PREFORK_STORE_CONCEPT_HPP
#define PREFORK_STORE_CONCEPT_HPP

#include <chrono>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include <prefork/version.hpp>

namespace prefork {

/// A value or the error that prevented it; `value` is meaningful only when ok().
template <class T>
struct StoreResult {
  T value{};
  std::error_code error{};
  bool ok() const noexcept { return !error; }
};

// The Store concept, one requirement per operation. Keys and values are arbitrary bytes; a ttl
// of zero means "never expires". Expired keys are invisible to every operation.
//
// Optional members, used when present:
//   std::size_t sweep(std::size_t max_entries)  reclaims expired entries (the master's timer)
//   std::string describe(std::error_code) const  a message with the store's numbers in it

template <class S>
concept GetsValues = requires(S& s, std::string_view key) {
  { s.get(key) } -> std::same_as<std::optional<std::string>>;
};

template <class S>
concept SetsValues =
    requires(S& s, std::string_view key, std::string_view value, std::chrono::milliseconds ttl) {
      { s.set(key, value, ttl) } -> std::same_as<std::error_code>;
    };

template <class S>
concept ErasesKeys = requires(S& s, std::string_view key) {
  { s.erase(key) } -> std::same_as<bool>;
};

template <class S>
concept IncrementsValues =
    requires(S& s, std::string_view key, std::int64_t delta, std::chrono::milliseconds ttl) {
      { s.increment(key, delta, ttl) } -> std::same_as<StoreResult<std::int64_t>>;
    };

template <class S>
concept ComparesAndSets = requires(S& s, std::string_view key,
                                   std::optional<std::string_view> expected,
                                   std::string_view value, std::chrono::milliseconds ttl) {
  { s.compare_and_set(key, expected, value, ttl) } -> std::same_as<std::error_code>;
};

template <class S>
concept ListsKeys = requires(S& s, std::string_view prefix, std::size_t limit) {
  { s.keys(prefix, limit) } -> std::same_as<std::vector<std::string>>;
};

template <class S>
concept Store = GetsValues<S> && SetsValues<S> && ErasesKeys<S> && IncrementsValues<S> &&
                ComparesAndSets<S> && ListsKeys<S>;

}  // namespace prefork

#endif  // PREFORK_STORE_CONCEPT_HPP
