// The shared store seen from a worker: StoreClient reaches the master's store (any Store,
// MemoryStore by default, behind detail::StoreHost in store_host.hpp) asynchronously, with a
// callback on its own loop. One store in one single-threaded master makes every operation on a
// key linearizable. No backend here, so Server code does not compile MemoryStore.
#ifndef PREFORK_STORE_CLIENT_HPP
#define PREFORK_STORE_CLIENT_HPP

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <prefork/version.hpp>
#include <prefork/channel.hpp>
#include <prefork/codec.hpp>
#include <prefork/event_loop.hpp>
#include <prefork/request.hpp>
#include <prefork/store/error.hpp>
#include <prefork/detail/store_wire.hpp>

namespace prefork {

/// A worker's handle on the master's shared store (WorkerContext::store()). Every operation
/// is one round trip to the master; its callback runs exactly once on this worker's loop,
/// never from inside the call, with the result or an error:
///   - the store's own (prefork::store_errc: full, conflict, not_a_number, overflow,
///     key_too_long, value_too_long, invalid_ttl...),
///   - errc::request_timeout (no answer within timeout()), errc::peer_gone (the master went
///     away), or what the channel's send() reports (errc::queue_full: the master is not
///     keeping up; errc::frame_too_large).
/// A callback may be empty (fire and forget). Operations on one key take effect in the order
/// the master receives them, so two workers incrementing one counter never lose an update.
/// A pending operation keeps a draining worker alive until it is answered.
class StoreClient {
 public:
  template <class... A>
  using Callback = std::function<void(std::error_code, A...)>;

  StoreClient(EventLoop& loop, std::shared_ptr<detail::ReplyLink> link)
      : link_(std::move(link)), calls_(loop, true) {}

  void get(std::string_view key, Callback<std::optional<std::string>> cb) {
    call(request(StoreOp::get, key), [cb = std::move(cb)](std::error_code ec, StoreReply& r) {
      if (cb) cb(ec, std::move(r.value));
    });
  }
  /// ttl 0: the key never expires.
  void set(std::string_view key, std::string_view value, Callback<> cb,
           std::chrono::milliseconds ttl = {}) {
    StoreRequest r = request(StoreOp::set, key);
    r.value = value;
    r.ttl_ms = ttl.count();
    call(std::move(r), done(std::move(cb)));
  }
  /// cb(ec, existed).
  void erase(std::string_view key, Callback<bool> cb) {
    call(request(StoreOp::erase, key), [cb = std::move(cb)](std::error_code ec, StoreReply& r) {
      if (cb) cb(ec, r.number != 0);
    });
  }
  /// Adds delta to the decimal int64 under key (a missing key counts from 0; ttl applies when
  /// the key is created) and gives the new value.
  void increment(std::string_view key, std::int64_t delta, Callback<std::int64_t> cb,
                 std::chrono::milliseconds ttl = {}) {
    StoreRequest r = request(StoreOp::increment, key);
    r.delta = delta;
    r.ttl_ms = ttl.count();
    call(std::move(r), [cb = std::move(cb)](std::error_code ec, StoreReply& reply) {
      if (cb) cb(ec, reply.number);
    });
  }
  /// Sets key to value if it holds `expected` now (nullopt: if it is absent); else
  /// store_errc::conflict and nothing changes.
  void compare_and_set(std::string_view key, std::optional<std::string_view> expected,
                       std::string_view value, Callback<> cb, std::chrono::milliseconds ttl = {}) {
    StoreRequest r = request(StoreOp::compare_and_set, key);
    if (expected) r.expected.emplace(*expected);
    r.value = value;
    r.ttl_ms = ttl.count();
    call(std::move(r), done(std::move(cb)));
  }
  /// The keys starting with prefix, sorted, at most `limit` of them. The master refuses (with
  /// store_errc::value_too_long) a list larger than the channel's max_message_size.
  void keys(std::string_view prefix, std::size_t limit, Callback<std::vector<std::string>> cb) {
    StoreRequest r = request(StoreOp::keys, prefix);
    r.limit = limit;
    call(std::move(r), [cb = std::move(cb)](std::error_code ec, StoreReply& reply) {
      if (cb) cb(ec, std::move(reply.keys));
    });
  }

  /// How long an operation waits for the master (default kDefaultRequestTimeout).
  void timeout(Clock::duration d) noexcept { timeout_ = d; }
  /// Operations sent and not answered yet.
  std::size_t pending() const noexcept { return calls_.size(); }

  // For WorkerContext: a store_reply frame, and the end of the channel.
  void on_reply(std::uint64_t id, std::string_view bytes) { calls_.on_reply(id, bytes); }
  void fail_all(std::error_code ec) { calls_.fail_all(ec); }

 private:
  static StoreRequest request(StoreOp op, std::string_view key) {
    StoreRequest r;
    r.op = op;
    r.key = key;
    return r;
  }
  static std::function<void(std::error_code, StoreReply&)> done(Callback<> cb) {
    return [cb = std::move(cb)](std::error_code ec, StoreReply&) {
      if (cb) cb(ec);
    };
  }

  void call(StoreRequest r, std::function<void(std::error_code, StoreReply&)> then) {
    calls_.start(link_->channel, FrameKind::store, encode(r),
                 [then = std::move(then)](std::error_code ec, const std::string& bytes) {
                   StoreReply reply;
                   if (!ec) {
                     std::optional<StoreReply> r = decode_reply(bytes, ec);
                     if (r) reply = std::move(*r);
                     if (!ec && !reply.ok()) ec = reply.code();
                   }
                   then(ec, reply);
                 },
                 timeout_);
  }

  std::shared_ptr<detail::ReplyLink> link_;  // the worker's channel, null once it closed
  detail::Requests<StringCodec> calls_;
  Clock::duration timeout_ = kDefaultRequestTimeout;
};

}  // namespace prefork

#endif  // PREFORK_STORE_CLIENT_HPP
