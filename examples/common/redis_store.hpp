// redis::Store: a prefork Store backend on Redis (hiredis, synchronous), so that the masters of
// several prefork instances, on one machine or many, share one store. An example's backend, not
// a library dependency: the examples' build uses it only where libhiredis-dev is installed.
//
// The trade-off: the master calls its Store synchronously from its single-threaded loop, so
// every operation blocks the master (dispatching connections, answering other workers) for one
// Redis round trip: tens of microseconds on loopback, a network round trip across hosts, and
// the master serialises every worker's operations on one connection. The timeouts bound the
// worst case. A Redis that does not answer costs one operation command_timeout; the connection
// is dropped and for retry_interval every operation fails at once instead of waiting again, so
// a hung Redis stalls the master for at most command_timeout per retry_interval. A Redis that
// refuses connections or closes them costs nothing; the next operation reconnects. A failure
// reaches the worker as store_errc::backend_error (and the operator through on_state); the
// master carries on.
#ifndef PREFORK_EXAMPLES_COMMON_REDIS_STORE_HPP
#define PREFORK_EXAMPLES_COMMON_REDIS_STORE_HPP

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/time.h>
#include <unistd.h>

#include <hiredis/hiredis.h>

#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <iterator>
#include <limits>
#include <memory>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <prefork/store.hpp>

namespace redis {

struct Options {
  /// "HOST:PORT" ("127.0.0.1:6379", "[::1]:6379") or "unix:/path/to/redis.sock".
  std::string address = "127.0.0.1:6379";
  /// Put in front of every key, so that several deployments (or a deployment and anything
  /// else) can share one Redis; keys() never sees keys outside it.
  std::string prefix = "prefork:";
  std::chrono::milliseconds connect_timeout{100};
  std::chrono::milliseconds command_timeout{250};
  /// After a failed connect or a command timeout, operations fail at once for this long (a
  /// closed connection is replaced at the next operation without waiting).
  std::chrono::milliseconds retry_interval{500};
  /// MemoryStore's default limits, so that the example behaves the same on both backends.
  std::size_t max_key_size = 1024;
  std::size_t max_value_size = 1024 * 1024;
  /// Called when the connection comes up or goes down (not per failed operation), with a line
  /// for the operator. Runs in the master, inside a store operation.
  std::function<void(const std::string&)> on_state{};
};

/// A transport failure (connect, timeout, a connection closed) or an error reply that is not
/// one of the Store's own outcomes. prefork::apply turns it into store_errc::backend_error
/// with this message.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

// Descriptors of this process's Redis connections. A forked child (a prefork worker, in fork
// mode) inherits them; it never uses them, but its copy would keep the TCP connection open on
// the Redis side after the master drops it, one stale client per worker and reconnect.
// pthread_atfork's child handler closes them; close() is async-signal-safe, and clear() keeps
// the capacity, so nothing allocates in the child. Exec mode is covered by FD_CLOEXEC.
inline std::vector<int>& connection_fds() {
  static std::vector<int> fds;
  return fds;
}
inline void close_in_child() noexcept {
  for (int fd : connection_fds()) ::close(fd);
  connection_fds().clear();
}
inline void track(int fd) {
  static const bool registered = ::pthread_atfork(nullptr, nullptr, close_in_child) == 0;
  if (!registered) throw Error("redis: pthread_atfork failed");
  ::fcntl(fd, F_SETFD, ::fcntl(fd, F_GETFD) | FD_CLOEXEC);
  connection_fds().push_back(fd);
}
inline void untrack(int fd) noexcept { std::erase(connection_fds(), fd); }

// hiredis writes with write(2), not send(MSG_NOSIGNAL): writing to a connection Redis has
// reset raises SIGPIPE, whose default action would kill the master (over a Unix socket, the
// first write after Redis died does). So SIGPIPE is blocked around each command, for this
// thread only (the disposition stays the application's), and one the command raised is
// consumed before the mask is restored, so it is never delivered; hiredis sees EPIPE.
class SigpipeBlocked {
 public:
  SigpipeBlocked() noexcept {
    ::sigemptyset(&pipe_);
    ::sigaddset(&pipe_, SIGPIPE);
    sigset_t pending;
    ::sigpending(&pending);
    was_pending_ = ::sigismember(&pending, SIGPIPE) == 1;
    ::pthread_sigmask(SIG_BLOCK, &pipe_, &old_);
  }
  ~SigpipeBlocked() {
    sigset_t pending;
    ::sigpending(&pending);
    if (!was_pending_ && ::sigismember(&pending, SIGPIPE) == 1) {
      const timespec zero{};
      while (::sigtimedwait(&pipe_, nullptr, &zero) < 0 && errno == EINTR) {
      }
    }
    ::pthread_sigmask(SIG_SETMASK, &old_, nullptr);
  }
  SigpipeBlocked(const SigpipeBlocked&) = delete;
  SigpipeBlocked& operator=(const SigpipeBlocked&) = delete;

 private:
  sigset_t pipe_{}, old_{};
  bool was_pending_ = false;
};

struct FreeContext {
  void operator()(redisContext* c) const noexcept {
    if (c->fd >= 0) untrack(c->fd);
    redisFree(c);
  }
};
struct FreeReply {
  void operator()(redisReply* r) const noexcept { freeReplyObject(r); }
};
using Reply = std::unique_ptr<redisReply, FreeReply>;

inline timeval to_timeval(std::chrono::milliseconds ms) {
  return timeval{static_cast<time_t>(ms.count() / 1000),
                 static_cast<suseconds_t>(ms.count() % 1000 * 1000)};
}

// SCAN's MATCH is a glob: a prefix with *, ?, [ or \ in it must match only itself.
inline std::string glob_escape(std::string_view s) {
  std::string out;
  for (char c : s) {
    if (c == '*' || c == '?' || c == '[' || c == ']' || c == '\\') out += '\\';
    out += c;
  }
  return out;
}

// Redis keeps an expiry as an absolute time in ms and refuses one that overflows it; a TTL of
// more than a century is "never" here, as MemoryStore treats one its clock cannot represent.
inline constexpr std::chrono::milliseconds kForever = std::chrono::hours(24 * 365 * 100);

// The value as a string and the TTL ("0": none) in one script, so that the check and the write
// are one atomic step for every master that shares this Redis. Lua strings are byte strings, so
// values may hold anything. The new value is read back with GET rather than taken from INCRBY:
// Redis hands an integer reply to Lua as a double, which rounds values beyond 2^53.
inline constexpr std::string_view kIncrementScript =
    "local created = redis.call('EXISTS', KEYS[1]) == 0\n"
    "redis.call('INCRBY', KEYS[1], ARGV[1])\n"
    "if created and ARGV[2] ~= '0' then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end\n"
    "return redis.call('GET', KEYS[1])\n";
inline constexpr std::string_view kCompareAndSetScript =
    "if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end\n"
    "if ARGV[3] == '0' then redis.call('SET', KEYS[1], ARGV[2])\n"
    "else redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end\n"
    "return 1\n";

}  // namespace detail

/// The Store concept (prefork/store.hpp) on one Redis connection, opened at the first
/// operation. Runs in the master only; not thread-safe. Move-only.
///
/// Outcomes: the Store's own error codes as MemoryStore gives them (key_too_long,
/// value_too_long, invalid_ttl, conflict, not_a_number, overflow, and full when Redis refuses
/// a write at its maxmemory); everything else throws redis::Error, which the master reports
/// to the worker as backend_error. Differences from MemoryStore: a number must be in Redis's
/// canonical form ("7", not "007"); keys() scans the whole Redis keyspace (SCAN), so it costs
/// time in proportion to every key Redis holds, not just the matching ones.
class Store {
 public:
  /// Throws std::invalid_argument for an address that is neither HOST:PORT nor unix:PATH, or
  /// non-positive timeouts. Does not connect.
  explicit Store(Options options) : opts_(std::move(options)) {
    if (opts_.connect_timeout.count() <= 0 || opts_.command_timeout.count() <= 0)
      throw std::invalid_argument("redis: timeouts must be positive");
    if (opts_.address.starts_with("unix:")) {
      unix_path_ = opts_.address.substr(5);
      if (unix_path_.empty()) throw std::invalid_argument("redis: empty unix socket path");
      return;
    }
    auto colon = opts_.address.rfind(':');
    if (colon == std::string::npos || colon == 0)
      throw std::invalid_argument("redis: '" + opts_.address + "' is not HOST:PORT or unix:PATH");
    host_ = opts_.address.substr(0, colon);
    if (host_.size() > 2 && host_.front() == '[' && host_.back() == ']')
      host_ = host_.substr(1, host_.size() - 2);
    const std::string_view port = std::string_view(opts_.address).substr(colon + 1);
    auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), port_);
    if (port.empty() || ec != std::errc{} || end != port.data() + port.size() || port_ < 1 ||
        port_ > 65535)
      throw std::invalid_argument("redis: '" + opts_.address + "': bad port");
  }

  std::optional<std::string> get(std::string_view key) {
    if (key.size() > opts_.max_key_size) return std::nullopt;  // set() never stores one
    detail::Reply r = command({"GET", prefixed(key)}, true);
    if (r->type == REDIS_REPLY_NIL) return std::nullopt;
    if (r->type == REDIS_REPLY_STRING) return std::string(r->str, r->len);
    throw unexpected("GET", r.get());
  }

  std::error_code set(std::string_view key, std::string_view value,
                      std::chrono::milliseconds ttl = {}) {
    if (auto ec = check(key, value, ttl)) return ec;
    const std::string k = prefixed(key);
    detail::Reply r = has_expiry(ttl) ? command({"SET", k, value, "PX", millis(ttl)}, true)
                                      : command({"SET", k, value}, true);
    if (r->type == REDIS_REPLY_STATUS) return {};
    return refused("SET", r.get());
  }

  bool erase(std::string_view key) {
    if (key.size() > opts_.max_key_size) return false;
    detail::Reply r = command({"DEL", prefixed(key)});
    if (r->type == REDIS_REPLY_INTEGER) return r->integer > 0;
    throw unexpected("DEL", r.get());
  }

  prefork::StoreResult<std::int64_t> increment(std::string_view key, std::int64_t delta,
                                               std::chrono::milliseconds ttl = {}) {
    if (auto ec = check(key, {}, ttl)) return {0, ec};
    detail::Reply r = command({"EVAL", detail::kIncrementScript, "1", prefixed(key),
                               prefork::detail::format_int64(delta),
                               has_expiry(ttl) ? millis(ttl) : std::string("0")});
    if (r->type == REDIS_REPLY_STRING) {
      if (auto n = prefork::detail::parse_int64(std::string_view(r->str, r->len))) return {*n, {}};
      throw unexpected("EVAL (increment)", r.get());
    }
    if (r->type == REDIS_REPLY_ERROR) {
      const std::string_view e(r->str, r->len);
      // INCRBY's own errors (t_string.c), passed through the script with a suffix.
      if (e.find("would overflow") != std::string_view::npos) return {0, prefork::store_errc::overflow};
      if (e.find("not an integer") != std::string_view::npos)
        return {0, prefork::store_errc::not_a_number};
    }
    return {0, refused("EVAL (increment)", r.get())};
  }

  std::error_code compare_and_set(std::string_view key, std::optional<std::string_view> expected,
                                  std::string_view value, std::chrono::milliseconds ttl = {}) {
    if (auto ec = check(key, value, ttl)) return ec;
    const std::string k = prefixed(key);
    if (!expected) {
      detail::Reply r = has_expiry(ttl) ? command({"SET", k, value, "NX", "PX", millis(ttl)})
                                        : command({"SET", k, value, "NX"});
      if (r->type == REDIS_REPLY_STATUS) return {};
      if (r->type == REDIS_REPLY_NIL) return prefork::store_errc::conflict;
      return refused("SET NX", r.get());
    }
    detail::Reply r = command({"EVAL", detail::kCompareAndSetScript, "1", k, *expected, value,
                               has_expiry(ttl) ? millis(ttl) : std::string("0")});
    if (r->type == REDIS_REPLY_INTEGER) return r->integer ? std::error_code{} : prefork::store_errc::conflict;
    return refused("EVAL (compare-and-set)", r.get());
  }

  /// The first `limit` keys (without the deployment prefix) that start with `prefix`, sorted.
  std::vector<std::string> keys(std::string_view prefix,
                                std::size_t limit = std::numeric_limits<std::size_t>::max()) {
    // The smallest `limit` seen so far: SCAN returns keys in hash order, so all must be seen.
    if (limit == 0) return {};
    std::set<std::string> best;
    const std::string match = detail::glob_escape(opts_.prefix) + detail::glob_escape(prefix) + "*";
    std::string cursor = "0";
    do {
      detail::Reply r = command({"SCAN", cursor, "MATCH", match, "COUNT", "1000"}, true);
      if (r->type != REDIS_REPLY_ARRAY || r->elements != 2 ||
          r->element[0]->type != REDIS_REPLY_STRING || r->element[1]->type != REDIS_REPLY_ARRAY)
        throw unexpected("SCAN", r.get());
      cursor.assign(r->element[0]->str, r->element[0]->len);
      const redisReply* batch = r->element[1];
      for (std::size_t i = 0; i < batch->elements; ++i) {
        const redisReply* k = batch->element[i];
        if (k->type != REDIS_REPLY_STRING || k->len < opts_.prefix.size()) continue;
        best.emplace(k->str + opts_.prefix.size(), k->len - opts_.prefix.size());
        if (best.size() > limit) best.erase(std::prev(best.end()));
      }
    } while (cursor != "0");
    return {best.begin(), best.end()};
  }

  /// The message for a Store error code, with Redis's words where Redis refused a write.
  std::string describe(std::error_code ec) const {
    if (ec == prefork::store_errc::full && !last_refusal_.empty())
      return "store full: " + last_refusal_;
    if (ec == prefork::store_errc::key_too_long)
      return "key too long: the store's limit is " + std::to_string(opts_.max_key_size) + " bytes";
    if (ec == prefork::store_errc::value_too_long)
      return "value too long: the store's limit is " + std::to_string(opts_.max_value_size) +
             " bytes";
    return ec.message();
  }

  /// Whether the connection is open (it may still have died since the last operation).
  bool connected() const noexcept { return ctx_ != nullptr; }
  const Options& options() const noexcept { return opts_; }

 private:
  using Clock = std::chrono::steady_clock;

  std::string prefixed(std::string_view key) const {
    std::string k;
    k.reserve(opts_.prefix.size() + key.size());
    k += opts_.prefix;
    k += key;
    return k;
  }
  static bool has_expiry(std::chrono::milliseconds ttl) noexcept {
    return ttl.count() > 0 && ttl < detail::kForever;
  }
  static std::string millis(std::chrono::milliseconds ttl) {
    return prefork::detail::format_int64(ttl.count());
  }

  std::error_code check(std::string_view key, std::string_view value,
                        std::chrono::milliseconds ttl) const noexcept {
    if (key.size() > opts_.max_key_size) return prefork::store_errc::key_too_long;
    if (value.size() > opts_.max_value_size) return prefork::store_errc::value_too_long;
    if (ttl.count() < 0) return prefork::store_errc::invalid_ttl;
    return {};
  }

  // An error reply to a write: maxmemory is the store being full; anything else throws.
  std::error_code refused(const char* what, const redisReply* r) {
    if (r->type == REDIS_REPLY_ERROR && std::string_view(r->str, r->len).starts_with("OOM ")) {
      last_refusal_ = "redis " + opts_.address + ": " + std::string(r->str, r->len);
      return prefork::store_errc::full;
    }
    throw unexpected(what, r);
  }

  Error unexpected(const char* what, const redisReply* r) const {
    if (r->type == REDIS_REPLY_ERROR)
      return Error("redis " + opts_.address + ": " + what + ": " + std::string(r->str, r->len));
    return Error("redis " + opts_.address + ": " + what + ": unexpected reply type " +
                 std::to_string(r->type));
  }

  // One command and its reply (an error reply included); throws Error, with the connection
  // dropped, when the command could not be sent or its reply not read in time. `idempotent`:
  // sending the command twice has the effect and the answer of sending it once.
  detail::Reply command(std::initializer_list<std::string_view> args, bool idempotent = false) {
    const bool reused = ctx_ != nullptr;
    redisContext* c = connection();
    const char* argv[8];
    std::size_t lens[8];
    int argc = 0;
    for (std::string_view a : args) {
      argv[argc] = a.data();
      lens[argc] = a.size();
      ++argc;
    }
    redisReply* r = nullptr;
    {
      detail::SigpipeBlocked blocked;
      r = static_cast<redisReply*>(redisCommandArgv(c, argc, argv, lens));
    }
    if (r && !c->err) return detail::Reply(r);
    // After an I/O error or a timeout the context is unusable: a late reply would be taken as
    // the answer to the next command.
    if (r) freeReplyObject(r);
    std::string why = c->errstr[0] ? c->errstr : "no reply";
    const bool timed_out = c->err == REDIS_ERR_IO &&
                           why.find("temporarily unavailable") != std::string::npos;
    if (timed_out) why = "no reply within " + std::to_string(opts_.command_timeout.count()) + " ms";
    // A hung Redis costs command_timeout: wait retry_interval before trying again. A closed
    // connection (Redis restarted, or it closed an idle client) costs nothing to replace, and
    // a command that may be repeated is sent again on a new one, once, the way nginx retries a
    // request that failed on a kept-alive upstream connection.
    went_down(why, timed_out);
    if (!timed_out && reused && idempotent) return command(args, false);
    throw Error(last_error_);
  }

  redisContext* connection() {
    if (ctx_) return ctx_.get();
    const auto now = Clock::now();
    if (hold_until_ && now < *hold_until_)
      throw Error(last_error_ + " (next attempt in " +
                  std::to_string(std::chrono::ceil<std::chrono::milliseconds>(*hold_until_ - now)
                                     .count()) +
                  " ms)");
    const timeval connect_tv = detail::to_timeval(opts_.connect_timeout);
    std::unique_ptr<redisContext, detail::FreeContext> c(
        unix_path_.empty() ? redisConnectWithTimeout(host_.c_str(), port_, connect_tv)
                           : redisConnectUnixWithTimeout(unix_path_.c_str(), connect_tv));
    if (!c) throw std::bad_alloc();  // hiredis returns null only when malloc fails
    if (c->err || redisSetTimeout(c.get(), detail::to_timeval(opts_.command_timeout)) != REDIS_OK) {
      went_down(std::string("connect: ") + (c->errstr[0] ? c->errstr : "failed"), true);
      throw Error(last_error_);
    }
    detail::track(c->fd);
    ctx_ = std::move(c);
    hold_until_.reset();
    if (!up_) report("connected to " + opts_.address + ", keys under '" + opts_.prefix + "'");
    up_ = true;
    return ctx_.get();
  }

  // `hold`: fail at once, without trying to connect, for retry_interval.
  void went_down(const std::string& why, bool hold) {
    ctx_.reset();
    last_error_ = "redis " + opts_.address + ": " + why;
    if (hold) hold_until_ = Clock::now() + opts_.retry_interval;
    if (up_ || !reported_down_)
      report("down: " + last_error_ + (hold ? "; next attempt in " +
                                                  std::to_string(opts_.retry_interval.count()) +
                                                  " ms"
                                            : "; reconnecting at the next operation"));
    up_ = false;
    reported_down_ = true;
  }

  void report(const std::string& line) const {
    if (opts_.on_state) opts_.on_state(line);
  }

  Options opts_;
  std::string host_, unix_path_;
  int port_ = 0;
  std::unique_ptr<redisContext, detail::FreeContext> ctx_;
  std::optional<Clock::time_point> hold_until_;
  bool up_ = false, reported_down_ = false;
  std::string last_error_, last_refusal_;
};

static_assert(prefork::Store<Store>);

}  // namespace redis

#endif  // PREFORK_EXAMPLES_COMMON_REDIS_STORE_HPP
