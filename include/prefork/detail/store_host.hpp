// The master's side of the shared store: apply(), which runs one wire request against any
// Store, and StoreHost, the master's one backend whatever its type. Runs in the master only;
// workers reach the store through StoreClient (store_client.hpp).
#ifndef PREFORK_DETAIL_STORE_HOST_HPP
#define PREFORK_DETAIL_STORE_HOST_HPP

#include <chrono>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>

#include <prefork/version.hpp>
#include <prefork/store/concept.hpp>
#include <prefork/store/error.hpp>
#include <prefork/store/memory_store.hpp>
#include <prefork/detail/store_wire.hpp>

namespace prefork {

/// Runs one request against `store` and returns its reply; runs in the master, on its loop.
/// An unknown op gives bad_request. An error outside store_category (a foreign backend's) is
/// reported as backend_error with its message, and so is an exception the store throws: a
/// worker's request never brings the master down.
template <Store S>
StoreReply apply(S& store, const StoreRequest& request) {
  StoreReply reply;
  std::error_code ec;
  try {
    const std::chrono::milliseconds ttl(request.ttl_ms);
    switch (request.op) {
      case StoreOp::get: reply.value = store.get(request.key); break;
      case StoreOp::set: ec = store.set(request.key, request.value, ttl); break;
      case StoreOp::erase: reply.number = store.erase(request.key) ? 1 : 0; break;
      case StoreOp::increment: {
        StoreResult<std::int64_t> r = store.increment(request.key, request.delta, ttl);
        ec = r.error;
        if (r.ok()) reply.number = r.value;
        break;
      }
      case StoreOp::compare_and_set: {
        std::optional<std::string_view> expected;
        if (request.expected) expected = *request.expected;
        ec = store.compare_and_set(request.key, expected, request.value, ttl);
        break;
      }
      case StoreOp::keys: {
        constexpr auto max = std::numeric_limits<std::size_t>::max();
        reply.keys = store.keys(request.key, request.limit > max ? max
                                                                 : static_cast<std::size_t>(request.limit));
        break;
      }
      default: ec = store_errc::bad_request; break;
    }
  } catch (const std::exception& e) {
    reply = StoreReply{};
    reply.error = store_errc::backend_error;
    reply.message = e.what();
    return reply;
  }
  if (!ec) return reply;
  reply = StoreReply{};
  reply.error = &ec.category() == &store_category() && ec.value() > 0 &&
                        ec.value() <= static_cast<int>(detail::kLastStoreErrc)
                    ? static_cast<store_errc>(ec.value())
                    : store_errc::backend_error;
  if constexpr (requires(const S& s) {
                  { s.describe(ec) } -> std::convertible_to<std::string>;
                })
    reply.message = store.describe(ec);
  else
    reply.message = ec.message();
  return reply;
}

namespace detail {

// The master's store, whatever its type: the Store operations through the wire format, plus
// the optional sweep and snapshot members when the backend has them.
class StoreHost {
 public:
  virtual ~StoreHost() = default;
  virtual StoreReply apply(const StoreRequest& r) = 0;
  virtual void sweep() = 0;
  /// std::errc::operation_not_supported if the backend has no snapshot.
  virtual std::error_code save(const std::string& path) = 0;
  virtual std::error_code load(const std::string& path) = 0;
};

template <Store S>
class StoreHostOf final : public StoreHost {
 public:
  explicit StoreHostOf(S s) : store_(std::move(s)) {}
  S& store() noexcept { return store_; }

  StoreReply apply(const StoreRequest& r) override { return prefork::apply(store_, r); }
  // Bounded, so that a store full of expired keys cannot stall the master's loop for long.
  void sweep() override {
    if constexpr (requires(S& s) { s.sweep(std::size_t{}); }) store_.sweep(4096);
  }
  std::error_code save(const std::string& path) override {
    if constexpr (requires(S& s) {
                    { s.save(path) } -> std::same_as<std::error_code>;
                  })
      return store_.save(path);
    return std::make_error_code(std::errc::operation_not_supported);
  }
  std::error_code load(const std::string& path) override {
    if constexpr (requires(S& s) {
                    { s.load(path) } -> std::same_as<std::error_code>;
                  })
      return store_.load(path);
    return std::make_error_code(std::errc::operation_not_supported);
  }

 private:
  S store_;
};

}  // namespace detail
}  // namespace prefork

#endif  // PREFORK_DETAIL_STORE_HOST_HPP
