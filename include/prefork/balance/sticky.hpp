// Sticky<Extract, Fallback>: master dispatch by session, not by address. The master peeks at a
// connection's first bytes (MSG_PEEK: the worker still reads all of them), takes a key from them
// (by default the value of an HTTP cookie, CookieKey) and hands the connection to the worker
// slot that owns the key. IpHash gets this wrong behind NAT or a proxy, where many users share
// one address and one user may change address; a session key follows the user.
//
// A key finds its slot two ways, looked up in this order:
//  - bound: a worker called WorkerContext::bind_session(key) when it created the session; the
//    master keeps key -> slot in a table of at most max_keys() entries, least recently used
//    first out (a lookup counts as a use, so live sessions stay);
//  - named: the key names the slot, HAProxy's "cookie ... prefix" style: "s<slot>" or
//    "s<slot>~<anything>" (slot in decimal, no leading zero), e.g. `Set-Cookie: sid=s2~f00d`;
//    slot_key() builds one. A client can pick its slot that way, which moves load, not data.
// The owner is a slot, not a worker, so a replacement forked into the slot (crash, rolling
// restart, recycling) keeps its sessions' traffic. A connection without a key, with a key
// nobody owns, or whose slot has no ready worker (restarting, errored, stopped) goes to the
// Fallback policy (RoundRobin by default), as does one whose head did not come in time.
//
// Waiting is bounded (PeekLimits): the master watches the socket, never blocks on it, and picks
// at the deadline (200 ms by default) with what came; at most 8 KiB is looked at, and at most
// 1024 sockets wait at once (more are picked on what their first peek saw). A client that
// closes while it waits is closed; nothing else accepted is dropped, shutdown included.
#ifndef PREFORK_BALANCE_STICKY_HPP
#define PREFORK_BALANCE_STICKY_HPP

#include <concepts>
#include <cstddef>
#include <list>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>

#include <prefork/version.hpp>
#include <prefork/balance/policy.hpp>
#include <prefork/balance/round_robin.hpp>

namespace prefork {

/// What a key extractor made of a connection's first bytes so far.
struct KeyScan {
  enum class Status : unsigned char {
    need_more,  ///< more bytes could still bring a key
    found,      ///< `key` is final: no later byte changes it
    absent,     ///< final: these bytes carry no key (the head ended, or it is another protocol)
  };
  Status status = Status::need_more;
  std::string_view key;  ///< found: a view into the bytes that were scanned

  static constexpr KeyScan more() noexcept { return {}; }
  static constexpr KeyScan none() noexcept { return {Status::absent, {}}; }
  static constexpr KeyScan with(std::string_view k) noexcept { return {Status::found, k}; }
};

/// The customization point for other protocols: a function object that scans a connection's
/// first bytes for its session key. It must not keep the view (the bytes are the master's
/// scratch buffer) and must tolerate any bytes, truncated anywhere.
template <class E>
concept KeyExtractor = std::default_initializable<E> && requires(const E& e, std::string_view head) {
  { e(head) } -> std::same_as<KeyScan>;
};

namespace detail {

constexpr char ascii_lower(char c) noexcept {
  return c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c;
}

constexpr bool starts_with_nocase(std::string_view s, std::string_view prefix) noexcept {
  if (s.size() < prefix.size()) return false;
  for (std::size_t i = 0; i < prefix.size(); ++i)
    if (ascii_lower(s[i]) != ascii_lower(prefix[i])) return false;
  return true;
}

constexpr std::string_view trim_ows(std::string_view s) noexcept {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

/// The first non-empty value of cookie `name` in one Cookie field value ("a=1; b=2"), with
/// the optional double quotes of RFC 6265's cookie-value removed. Names match exactly (cookie
/// names are case-sensitive); pairs without '=' are skipped.
constexpr std::optional<std::string_view> cookie_in_field(std::string_view value,
                                                          std::string_view name) noexcept {
  while (!value.empty()) {
    std::size_t semi = value.find(';');
    std::string_view pair = value.substr(0, semi);
    value = semi == std::string_view::npos ? std::string_view{} : value.substr(semi + 1);
    std::size_t eq = pair.find('=');
    if (eq == std::string_view::npos || trim_ows(pair.substr(0, eq)) != name) continue;
    std::string_view v = trim_ows(pair.substr(eq + 1));
    if (v.size() >= 2 && v.front() == '"' && v.back() == '"') v = v.substr(1, v.size() - 2);
    if (!v.empty()) return v;
  }
  return std::nullopt;
}

/// Scans an HTTP/1.x request head for cookie `name`, in every Cookie field in order (RFC 6265
/// asks for one, but proxies that translate HTTP/2 send one per cookie). Only whole lines
/// count, so a value cut off by the end of the bytes is never taken. Bytes that cannot start
/// a request line (a method is an upper-case token: TLS, HTTP/2's preface after its first
/// line, binary) are absent at once rather than waited for. Lines may end in CRLF or LF.
constexpr KeyScan find_cookie(std::string_view head, std::string_view name) noexcept {
  if (name.empty()) return KeyScan::none();
  if (head.empty()) return KeyScan::more();
  if (head.front() < 'A' || head.front() > 'Z') return KeyScan::none();
  std::size_t at = head.find('\n');  // past the request line
  if (at == std::string_view::npos) return KeyScan::more();
  ++at;
  for (;;) {
    std::size_t eol = head.find('\n', at);
    if (eol == std::string_view::npos) return KeyScan::more();
    std::string_view line = head.substr(at, eol - at);
    at = eol + 1;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.empty()) return KeyScan::none();  // the blank line: the head is over
    constexpr std::string_view kField = "cookie:";
    if (starts_with_nocase(line, kField))
      if (auto v = cookie_in_field(line.substr(kField.size()), name)) return KeyScan::with(*v);
  }
}

/// Key -> slot, at most `capacity` keys, the least recently used evicted first. The index
/// holds views into the list's own strings (list nodes never move), so copies rebuild it.
class KeyTable {
 public:
  explicit KeyTable(std::size_t capacity = 65536) : capacity_(capacity) {}
  KeyTable(const KeyTable& o) : capacity_(o.capacity_) { copy_from(o); }
  KeyTable& operator=(const KeyTable& o) {
    if (this != &o) {
      capacity_ = o.capacity_;
      copy_from(o);
    }
    return *this;
  }
  KeyTable(KeyTable&&) = default;
  KeyTable& operator=(KeyTable&&) = default;
  ~KeyTable() = default;

  void bind(std::string_view key, std::size_t slot) {
    if (capacity_ == 0) return;
    if (auto it = index_.find(key); it != index_.end()) {
      it->second->slot = slot;
      lru_.splice(lru_.begin(), lru_, it->second);
      return;
    }
    while (lru_.size() >= capacity_) evict_oldest();
    lru_.push_front(Entry{std::string(key), slot});
    index_.emplace(std::string_view(lru_.front().key), lru_.begin());
  }

  /// The key's slot, counting as a use.
  std::optional<std::size_t> find(std::string_view key) {
    auto it = index_.find(key);
    if (it == index_.end()) return std::nullopt;
    lru_.splice(lru_.begin(), lru_, it->second);
    return it->second->slot;
  }
  /// The key's slot, without counting as a use.
  std::optional<std::size_t> peek(std::string_view key) const {
    auto it = index_.find(key);
    if (it == index_.end()) return std::nullopt;
    return it->second->slot;
  }

  bool erase(std::string_view key) {
    auto it = index_.find(key);
    if (it == index_.end()) return false;
    auto entry = it->second;
    index_.erase(it);
    lru_.erase(entry);
    return true;
  }

  std::size_t size() const noexcept { return lru_.size(); }
  std::size_t capacity() const noexcept { return capacity_; }
  void set_capacity(std::size_t n) {
    capacity_ = n;
    while (lru_.size() > capacity_) evict_oldest();
  }

 private:
  struct Entry {
    std::string key;
    std::size_t slot;
  };
  using List = std::list<Entry>;

  void evict_oldest() {
    index_.erase(std::string_view(lru_.back().key));
    lru_.pop_back();
  }
  void copy_from(const KeyTable& o) {
    index_.clear();
    lru_ = o.lru_;
    for (auto it = lru_.begin(); it != lru_.end(); ++it) index_.emplace(std::string_view(it->key), it);
  }

  std::size_t capacity_;
  List lru_;  // most recently used first
  std::unordered_map<std::string_view, List::iterator> index_;
};

}  // namespace detail

/// The built-in extractor: the value of the HTTP cookie `name` ("sid" unless set).
struct CookieKey {
  std::string name = "sid";
  KeyScan operator()(std::string_view head) const noexcept { return detail::find_cookie(head, name); }
};
static_assert(KeyExtractor<CookieKey>);

/// A key that names `slot`, in the form Sticky reads: "s<slot>~<rest>", or "s<slot>" when rest
/// is empty. For a worker's Set-Cookie: `"sid=" + prefork::slot_key(ctx.slot(), token)`.
inline std::string slot_key(std::size_t slot, std::string_view rest = {}) {
  std::string k = "s" + std::to_string(slot);
  if (!rest.empty()) k.append("~").append(rest);
  return k;
}

/// Master dispatch by session key; see the top of this file. Every member runs in the master
/// (configure it through Cluster::master().balance() before run()).
template <KeyExtractor Extract = CookieKey, MasterDispatch Fallback = RoundRobin>
class Sticky {
 public:
  static constexpr Dispatch dispatch = Dispatch::master;

  /// How many connections were routed by key, and how many went to the fallback.
  struct Stats {
    std::size_t by_key = 0;
    std::size_t fallback = 0;
  };

  PeekLimits peek_limits() const noexcept { return limits_; }
  /// Takes effect for connections accepted from then on. max_bytes 0 or max_waiting 0 turn
  /// the wait off (pick on what is there at accept, or nothing); timeout 0 likewise.
  void set_peek_limits(const PeekLimits& l) noexcept { limits_ = l; }

  bool has_enough(std::string_view head) const {
    return extract_(head).status != KeyScan::Status::need_more;
  }

  /// The ready worker of the slot that owns the head's key, else Fallback's pick.
  std::optional<std::size_t> pick(const PickContext& ctx) {
    if (std::optional<std::size_t> slot = owner(ctx.head)) {
      for (std::size_t i = 0; i < ctx.ready.size(); ++i)
        if (ctx.ready[i].slot == *slot) {
          ++stats_.by_key;
          return i;
        }
    }
    ++stats_.fallback;
    return fallback_.pick(ctx);
  }

  /// A worker in `slot` bound `key` (BindsKeys): later connections carrying it go there. A key
  /// that is empty or longer than max_session_key_bytes is ignored.
  void bind(std::string_view key, std::size_t slot) {
    if (key.empty() || key.size() > max_session_key_bytes) return;
    table_.bind(key, slot);
  }
  /// Forgets a bound key (a named one cannot be forgotten). False if it was not bound.
  bool unbind(std::string_view key) { return table_.erase(key); }

  /// The slot that owns the key in `head`, if any (counts as a use of a bound key).
  std::optional<std::size_t> owner(std::string_view head) {
    KeyScan scan = extract_(head);
    if (scan.status != KeyScan::Status::found || scan.key.empty() ||
        scan.key.size() > max_session_key_bytes)
      return std::nullopt;
    if (auto slot = table_.find(scan.key)) return slot;
    return named_slot(scan.key);
  }

  /// The slot a key is bound to, without counting as a use; named keys are not looked at.
  std::optional<std::size_t> bound_slot(std::string_view key) const { return table_.peek(key); }
  /// Bound keys held now.
  std::size_t bound_keys() const noexcept { return table_.size(); }
  std::size_t max_keys() const noexcept { return table_.capacity(); }
  /// The table's bound (65536 by default); a lower bound evicts the least recently used now.
  /// 0 turns binding off.
  void set_max_keys(std::size_t n) { table_.set_capacity(n); }

  /// "s<slot>" or "s<slot>~..." -> slot (decimal, at most 9 digits, no leading zero).
  static constexpr std::optional<std::size_t> named_slot(std::string_view key) noexcept {
    if (key.size() < 2 || key[0] != 's') return std::nullopt;
    std::size_t i = 1, slot = 0;
    for (; i < key.size() && i <= 9 && key[i] >= '0' && key[i] <= '9'; ++i)
      slot = slot * 10 + static_cast<std::size_t>(key[i] - '0');
    if (i == 1 || (key[1] == '0' && i > 2)) return std::nullopt;
    if (i < key.size() && key[i] != '~') return std::nullopt;
    return slot;
  }

  Extract& extractor() noexcept { return extract_; }
  const Extract& extractor() const noexcept { return extract_; }
  Fallback& fallback() noexcept { return fallback_; }
  Stats stats() const noexcept { return stats_; }

 private:
  [[no_unique_address]] Extract extract_;
  [[no_unique_address]] Fallback fallback_;
  PeekLimits limits_;
  detail::KeyTable table_;
  Stats stats_;
};

/// Sticky sessions by the HTTP cookie "sid" (CookieKey), RoundRobin for the rest.
using StickyCookie = Sticky<>;
static_assert(BalancePolicy<StickyCookie>);
static_assert(PeeksFirstBytes<StickyCookie>);
static_assert(BindsKeys<StickyCookie>);

}  // namespace prefork

#endif  // PREFORK_BALANCE_STICKY_HPP
