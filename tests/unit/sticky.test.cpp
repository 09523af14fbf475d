// Sticky sessions, fed bytes directly: cookie parsing (CookieKey), keys that name a slot, the
// bounded table of bound keys, and routing with its fallback. The master's waiting for bytes is
// in tests/process/sticky.test.cpp.
#include "prefork/balance/sticky.hpp"

#include <catch2/catch.hpp>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "prefork/balance/ip_hash.hpp"
#include "prefork/balance/least_connections.hpp"
#include "prefork/balance/pick_with.hpp"
#include "prefork/balance/policy.hpp"
#include "prefork/balance/reuse_port.hpp"
#include "prefork/balance/round_robin.hpp"
#include "prefork/balance/shared_accept.hpp"

using prefork::CookieKey;
using prefork::KeyScan;
using prefork::PickContext;
using prefork::Sticky;
using prefork::StickyCookie;
using prefork::WorkerLoad;
using prefork::detail::SocketAddress;
using Status = KeyScan::Status;

// Only Sticky waits for bytes or takes bindings; every other built-in picks at once.
static_assert(prefork::PeeksFirstBytes<StickyCookie>);
static_assert(prefork::BindsKeys<StickyCookie>);
static_assert(prefork::MasterDispatch<StickyCookie>);
static_assert(!prefork::PeeksFirstBytes<prefork::RoundRobin>);
static_assert(!prefork::PeeksFirstBytes<prefork::IpHash>);
static_assert(!prefork::PeeksFirstBytes<prefork::LeastConnections>);
static_assert(!prefork::PeeksFirstBytes<prefork::SharedAccept>);
static_assert(!prefork::PeeksFirstBytes<prefork::ReusePort>);
static_assert(!prefork::BindsKeys<prefork::RoundRobin>);
static_assert(!prefork::BindsKeys<prefork::IpHash>);
static_assert(prefork::BalancePolicy<Sticky<CookieKey, prefork::IpHash>>);
static_assert(prefork::BalancePolicy<Sticky<CookieKey, prefork::LeastConnections>>);

namespace {

KeyScan scan(std::string_view head, std::string_view name = "sid") {
  return prefork::detail::find_cookie(head, name);
}

std::optional<std::string> key_of(std::string_view head, std::string_view name = "sid") {
  KeyScan s = scan(head, name);
  if (s.status != Status::found) return std::nullopt;
  return std::string(s.key);
}

std::string request(std::string_view fields) {
  return "GET /path HTTP/1.1\r\nHost: localhost\r\n" + std::string(fields) + "\r\n";
}

// The slot the policy picks for `head` with `ready` slots ready (idle), out of `slots`.
template <class Policy>
std::optional<std::size_t> slot_for(Policy& p, std::string_view head,
                                    std::vector<std::size_t> ready, std::size_t slots = 4) {
  std::vector<WorkerLoad> loads;
  for (std::size_t s : ready) loads.push_back({s, 0});
  SocketAddress peer;
  std::optional<std::size_t> i =
      p.pick(PickContext{peer, std::span<const WorkerLoad>(loads), slots, head});
  if (!i) return std::nullopt;
  REQUIRE(*i < loads.size());
  return loads[*i].slot;
}

std::string with_cookie(std::string_view value) { return request("Cookie: sid=" + std::string(value) + "\r\n"); }

}  // namespace

// ---------------------------------------------------------------------------------------------
// Cookie parsing.

TEST_CASE("CookieKey finds its cookie among several in one Cookie field", "[sticky]") {
  CHECK(key_of(request("Cookie: a=1; sid=abc; b=2\r\n")) == "abc");
  CHECK(key_of(request("Cookie: sid=abc\r\n")) == "abc");
  CHECK(key_of(request("Cookie: a=1;sid=abc;b=2\r\n")) == "abc");
  CHECK(key_of(request("Cookie:sid=abc\r\n")) == "abc");
}

TEST_CASE("CookieKey trims spaces and tabs around names and values and drops quotes",
          "[sticky]") {
  CHECK(key_of(request("Cookie:   a=1 ;\t sid = abc \t; b=2  \r\n")) == "abc");
  CHECK(key_of(request("Cookie: sid=\"abc\"\r\n")) == "abc");
  CHECK(key_of(request("Cookie: sid=\"\r\n")) == "\"");  // one quote is a value, not a pair
}

TEST_CASE("CookieKey matches the header name in any case and the cookie name exactly",
          "[sticky]") {
  CHECK(key_of(request("COOKIE: sid=abc\r\n")) == "abc");
  CHECK(key_of(request("cookie: sid=abc\r\n")) == "abc");
  CHECK(key_of(request("CooKie: sid=abc\r\n")) == "abc");
  CHECK_FALSE(key_of(request("Cookie: SID=abc\r\n")));
  CHECK_FALSE(key_of(request("Cookie: xsid=abc; sidx=def\r\n")));
  CHECK_FALSE(key_of(request("Set-Cookie: sid=abc\r\n")));
  CHECK_FALSE(key_of(request("X-Cookie: sid=abc\r\n")));
  CHECK_FALSE(key_of(request("Cookie : sid=abc\r\n")));  // no space before the colon (RFC 9112)
}

TEST_CASE("CookieKey finds its cookie in a second Cookie field", "[sticky]") {
  CHECK(key_of(request("Cookie: a=1\r\nAccept: */*\r\nCookie: sid=two\r\n")) == "two");
  // The first occurrence wins.
  CHECK(key_of(request("Cookie: sid=one\r\nCookie: sid=two\r\n")) == "one");
  // An empty value is no key; a later one is.
  CHECK(key_of(request("Cookie: sid=; sid=later\r\n")) == "later");
  CHECK(key_of(request("Cookie: sid=\r\nCookie: sid=next\r\n")) == "next");
}

TEST_CASE("CookieKey reports absent once the head ends without its cookie", "[sticky]") {
  CHECK(scan(request("")).status == Status::absent);
  CHECK(scan(request("Cookie: a=1; b=2\r\n")).status == Status::absent);
  CHECK(scan(request("Cookie: sid\r\n")).status == Status::absent);
  CHECK(scan(request("Cookie: sid=\r\n")).status == Status::absent);
  // The cookie in the body does not count.
  CHECK(scan(request("Content-Length: 8\r\n") + "sid=abc\n").status == Status::absent);
  // LF-only line ends are tolerated.
  CHECK(key_of("GET / HTTP/1.1\nHost: x\nCookie: sid=lf\n\n") == "lf");
  CHECK(scan("GET / HTTP/1.1\nHost: x\n\n").status == Status::absent);
}

TEST_CASE("CookieKey wants more bytes while the head is incomplete and never takes a cut value",
          "[sticky]") {
  const std::string full = request("Accept: */*\r\nCookie: a=1; sid=abcdef; b=2\r\n");
  const std::size_t value_end = full.find("abcdef") + 6;
  const std::size_t line_end = full.find("\r\n", value_end) + 2;
  for (std::size_t n = 0; n < full.size(); ++n) {
    KeyScan s = scan(std::string_view(full).substr(0, n));
    INFO("first " << n << " bytes");
    if (n < line_end) {  // the Cookie line is not whole yet (its LF is byte line_end - 1)
      CHECK(s.status == Status::need_more);
    } else {
      CHECK(s.status == Status::found);
      CHECK(s.key == "abcdef");
    }
  }
  CHECK(key_of(full) == "abcdef");
  // A head cut inside the request line or before the blank line.
  CHECK(scan("GET / HT").status == Status::need_more);
  CHECK(scan("GET / HTTP/1.1\r\nHost: x\r\n").status == Status::need_more);
  CHECK(scan("").status == Status::need_more);
}

TEST_CASE("CookieKey gives up at once on bytes that are not an HTTP/1 request", "[sticky]") {
  CHECK(scan(std::string("\x16\x03\x01\x02\x00", 5)).status == Status::absent);  // TLS
  CHECK(scan(std::string("\0\0\0", 3)).status == Status::absent);
  CHECK(scan("get / HTTP/1.1\r\n").status == Status::absent);
  CHECK(scan("\r\n").status == Status::absent);
  CHECK(scan("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").status == Status::absent);  // HTTP/2 preface
  CHECK(scan(request("Cookie: sid=abc\r\n"), "").status == Status::absent);  // no name, no key
}

TEST_CASE("CookieKey survives random bytes and every truncation", "[sticky]") {
  std::mt19937_64 rng(0x5eed);
  const std::vector<std::string> seeds = {
      request("Cookie: a=1; sid=abc; b=\"q\"\r\n"),
      request("Cookie: sid=\r\nCookie: ;;;==; sid = x\r\n"),
      "GET / HTTP/1.1\r\nCookie: sid=s1~zz\r\n\r\n",
  };
  std::uint64_t found = 0;
  for (int round = 0; round < 4000; ++round) {
    std::string bytes;
    if (round % 2 == 0) {  // a valid head, mutated
      bytes = seeds[static_cast<std::size_t>(round / 2) % seeds.size()];
      for (int k = 0; k < 3; ++k)
        bytes[rng() % bytes.size()] = static_cast<char>(rng() & 0xff);
    } else {  // random bytes with HTTP's punctuation over-represented
      static constexpr char kAlphabet[] = "GET Cookie:sid=;\r\n\" \t~s1";
      bytes.resize(rng() % 200);
      for (char& c : bytes)
        c = rng() % 3 ? kAlphabet[rng() % (sizeof kAlphabet - 1)] : static_cast<char>(rng() & 0xff);
      if (!bytes.empty() && rng() % 2) bytes[0] = 'G';
    }
    for (std::size_t n = 0; n <= bytes.size(); ++n) {
      std::string_view head(bytes.data(), n);
      KeyScan s = scan(head);
      if (s.status == Status::found) {
        ++found;
        // The key lies inside what was scanned and is never empty.
        REQUIRE_FALSE(s.key.empty());
        REQUIRE(s.key.data() >= head.data());
        REQUIRE(s.key.data() + s.key.size() <= head.data() + head.size());
        if (auto slot = StickyCookie::named_slot(s.key)) REQUIRE(*slot <= 999999999u);
      }
    }
  }
  CHECK(found > 0);
}

// ---------------------------------------------------------------------------------------------
// Keys that name their slot.

TEST_CASE("A key of the form s<slot> or s<slot>~rest names its slot", "[sticky]") {
  CHECK(StickyCookie::named_slot("s0") == std::optional<std::size_t>(0));
  CHECK(StickyCookie::named_slot("s3") == std::optional<std::size_t>(3));
  CHECK(StickyCookie::named_slot("s12~f00d") == std::optional<std::size_t>(12));
  CHECK(StickyCookie::named_slot("s4095~") == std::optional<std::size_t>(4095));
  CHECK(StickyCookie::named_slot("s999999999") == std::optional<std::size_t>(999999999));
  CHECK_FALSE(StickyCookie::named_slot("s1000000000"));  // more than nine digits
  CHECK_FALSE(StickyCookie::named_slot("s"));
  CHECK_FALSE(StickyCookie::named_slot("s~1"));
  CHECK_FALSE(StickyCookie::named_slot("s01"));
  CHECK_FALSE(StickyCookie::named_slot("s1x"));
  CHECK_FALSE(StickyCookie::named_slot("s1.abc"));
  CHECK_FALSE(StickyCookie::named_slot("S1"));
  CHECK_FALSE(StickyCookie::named_slot("1"));
  CHECK_FALSE(StickyCookie::named_slot("abc"));
  CHECK(prefork::slot_key(2) == "s2");
  CHECK(prefork::slot_key(7, "tok") == "s7~tok");
  CHECK(StickyCookie::named_slot(prefork::slot_key(31, "x~y")) == std::optional<std::size_t>(31));
}

// ---------------------------------------------------------------------------------------------
// Routing.

TEST_CASE("Sticky sends a key that names a ready slot to that slot every time", "[sticky]") {
  StickyCookie p;
  for (std::size_t slot = 0; slot < 4; ++slot)
    for (int i = 0; i < 5; ++i)
      CHECK(slot_for(p, with_cookie(prefork::slot_key(slot, "abc")), {0, 1, 2, 3}) == slot);
  CHECK(p.stats().by_key == 20);
  CHECK(p.stats().fallback == 0);
  // Ready workers may come in any order; the index returned is the slot's.
  CHECK(slot_for(p, with_cookie("s2"), {3, 2, 0}) == std::optional<std::size_t>(2));
}

TEST_CASE("Sticky falls back to its fallback policy without a key, or when the owner is not ready",
          "[sticky]") {
  StickyCookie p;
  // No key: RoundRobin's rotation over the ready slots.
  CHECK(slot_for(p, request(""), {0, 1, 2}) == std::optional<std::size_t>(0));
  CHECK(slot_for(p, request(""), {0, 1, 2}) == std::optional<std::size_t>(1));
  CHECK(slot_for(p, {}, {0, 1, 2}) == std::optional<std::size_t>(2));           // nothing came
  CHECK(slot_for(p, "GET / HT", {0, 1, 2}) == std::optional<std::size_t>(0));    // cut short
  CHECK(slot_for(p, "\x16\x03", {0, 1, 2}) == std::optional<std::size_t>(1));    // not HTTP
  // Slot 3 named but not ready (restarting, errored, stopped), and a slot that does not exist.
  CHECK(slot_for(p, with_cookie("s3~x"), {0, 1, 2}) == std::optional<std::size_t>(2));
  CHECK(slot_for(p, with_cookie("s9"), {0, 1, 2}) == std::optional<std::size_t>(0));
  // A key nobody owns.
  CHECK(slot_for(p, with_cookie("unknown"), {0, 1, 2}) == std::optional<std::size_t>(1));
  CHECK(p.stats().fallback == 8);
  CHECK(p.stats().by_key == 0);
}

TEST_CASE("Sticky with IpHash as its fallback hashes the keyless connections", "[sticky]") {
  Sticky<CookieKey, prefork::IpHash> p;
  SocketAddress peer;
  REQUIRE_FALSE(prefork::detail::parse_address("127.0.0.1:0", peer));
  std::vector<WorkerLoad> ready{{0, 0}, {1, 0}, {2, 0}, {3, 0}};
  const std::size_t home = static_cast<std::size_t>(prefork::IpHash::hash(peer) % 4);
  const std::string keyless = request("");
  for (int i = 0; i < 3; ++i)
    CHECK(p.pick(PickContext{peer, ready, 4, keyless}) == std::optional<std::size_t>(home));
  const std::string keyed = with_cookie(prefork::slot_key((home + 1) % 4));
  CHECK(p.pick(PickContext{peer, ready, 4, keyed}) == std::optional<std::size_t>((home + 1) % 4));
}

TEST_CASE("Sticky sends a bound key to the slot that bound it, and a new binding moves it",
          "[sticky]") {
  StickyCookie p;
  p.bind("token-a", 2);
  p.bind("token-b", 0);
  for (int i = 0; i < 3; ++i) {
    CHECK(slot_for(p, with_cookie("token-a"), {0, 1, 2, 3}) == std::optional<std::size_t>(2));
    CHECK(slot_for(p, with_cookie("token-b"), {0, 1, 2, 3}) == std::optional<std::size_t>(0));
  }
  p.bind("token-a", 3);
  CHECK(slot_for(p, with_cookie("token-a"), {0, 1, 2, 3}) == std::optional<std::size_t>(3));
  // A binding wins over the slot a key names.
  p.bind("s1~x", 2);
  CHECK(slot_for(p, with_cookie("s1~x"), {0, 1, 2, 3}) == std::optional<std::size_t>(2));
  CHECK(p.bound_keys() == 3);
  CHECK(p.unbind("s1~x"));
  CHECK_FALSE(p.unbind("s1~x"));
  CHECK(slot_for(p, with_cookie("s1~x"), {0, 1, 2, 3}) == std::optional<std::size_t>(1));
  // The owner's slot not ready: fallback, and the binding stays for when it is back.
  CHECK(slot_for(p, with_cookie("token-a"), {0, 1, 2}).has_value());
  CHECK(slot_for(p, with_cookie("token-a"), {3, 0}) == std::optional<std::size_t>(3));
}

TEST_CASE("Sticky ignores empty and oversized keys", "[sticky]") {
  StickyCookie p;
  p.bind("", 1);
  p.bind(std::string(prefork::max_session_key_bytes + 1, 'k'), 1);
  CHECK(p.bound_keys() == 0);
  const std::string longest(prefork::max_session_key_bytes, 'k');
  p.bind(longest, 1);
  CHECK(p.bound_keys() == 1);
  CHECK(slot_for(p, with_cookie(longest), {0, 1}) == std::optional<std::size_t>(1));
}

TEST_CASE("Sticky's table of bound keys evicts the least recently used beyond its bound",
          "[sticky]") {
  StickyCookie p;
  CHECK(p.max_keys() == 65536);
  p.set_max_keys(3);
  p.bind("a", 1);
  p.bind("b", 1);
  p.bind("c", 1);
  // A connection that carries "a" is a use: "b" is now the oldest.
  CHECK(slot_for(p, with_cookie("a"), {0, 1}) == std::optional<std::size_t>(1));
  p.bind("d", 1);
  CHECK(p.bound_keys() == 3);
  CHECK(p.bound_slot("a") == std::optional<std::size_t>(1));
  CHECK_FALSE(p.bound_slot("b"));
  CHECK(p.bound_slot("c") == std::optional<std::size_t>(1));
  CHECK(p.bound_slot("d") == std::optional<std::size_t>(1));
  // Binding again refreshes too: "c" is now the oldest.
  p.bind("a", 0);
  p.bind("d", 0);
  p.bind("e", 0);
  CHECK_FALSE(p.bound_slot("c"));
  CHECK(p.bound_keys() == 3);
  // Lowering the bound evicts now; 0 turns binding off.
  p.set_max_keys(1);
  CHECK(p.bound_keys() == 1);
  CHECK(p.bound_slot("e") == std::optional<std::size_t>(0));
  p.set_max_keys(0);
  p.bind("f", 1);
  CHECK(p.bound_keys() == 0);
}

TEST_CASE("Sticky's table keeps many keys and survives copies and moves", "[sticky]") {
  StickyCookie p;
  p.set_max_keys(1000);
  for (int i = 0; i < 5000; ++i) p.bind("key-" + std::to_string(i), static_cast<std::size_t>(i % 7));
  CHECK(p.bound_keys() == 1000);
  CHECK_FALSE(p.bound_slot("key-3999"));
  CHECK(p.bound_slot("key-4000") == std::optional<std::size_t>(4000 % 7));
  StickyCookie copy = p;
  p.bind("key-4999", 6);
  p.set_max_keys(0);
  CHECK(copy.bound_keys() == 1000);
  CHECK(copy.bound_slot("key-4999") == std::optional<std::size_t>(4999 % 7));
  copy.bind("key-x", 1);  // evicts in the copy's own list
  CHECK_FALSE(copy.bound_slot("key-4000"));
  StickyCookie moved = std::move(copy);
  CHECK(moved.bound_slot("key-x") == std::optional<std::size_t>(1));
  CHECK(slot_for(moved, with_cookie("key-4001"), {0, 1, 2, 3, 4, 5, 6}, 7) ==
        std::optional<std::size_t>(4001 % 7));
}

TEST_CASE("Sticky says it has enough bytes once the key is found or the head is over",
          "[sticky]") {
  StickyCookie p;
  CHECK_FALSE(p.has_enough(""));
  CHECK_FALSE(p.has_enough("GET / HTTP/1.1\r\nHost: x\r\n"));
  CHECK_FALSE(p.has_enough("GET / HTTP/1.1\r\nCookie: sid=ab"));
  CHECK(p.has_enough("GET / HTTP/1.1\r\nCookie: sid=ab\r\n"));  // the rest cannot change it
  CHECK(p.has_enough("GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
  CHECK(p.has_enough("\x16\x03\x01"));
  // Defaults: 8 KiB, 200 ms, 1024 waiting; settable.
  CHECK(p.peek_limits().max_bytes == 8192);
  CHECK(p.peek_limits().timeout == std::chrono::milliseconds(200));
  CHECK(p.peek_limits().max_waiting == 1024);
  p.set_peek_limits({.max_bytes = 100, .timeout = std::chrono::milliseconds(5), .max_waiting = 2});
  CHECK(p.peek_limits().max_bytes == 100);
}

namespace {

/// A line protocol: the session key is the first line, "KEY <key>\n".
struct FirstLineKey {
  KeyScan operator()(std::string_view head) const noexcept {
    std::size_t nl = head.find('\n');
    if (nl == std::string_view::npos) return KeyScan::more();
    std::string_view line = head.substr(0, nl);
    if (!line.starts_with("KEY ") || line.size() == 4) return KeyScan::none();
    return KeyScan::with(line.substr(4));
  }
};

}  // namespace

TEST_CASE("Sticky takes another protocol's key from a custom extractor", "[sticky]") {
  static_assert(prefork::KeyExtractor<FirstLineKey>);
  Sticky<FirstLineKey> p;
  p.bind("alice", 1);
  CHECK_FALSE(p.has_enough("KEY ali"));
  CHECK(p.has_enough("KEY alice\n"));
  CHECK(slot_for(p, "KEY alice\nrest", {0, 1, 2}) == std::optional<std::size_t>(1));
  CHECK(slot_for(p, "KEY s2\n", {0, 1, 2}) == std::optional<std::size_t>(2));
  CHECK(slot_for(p, "HELLO\n", {0, 1, 2}) == std::optional<std::size_t>(0));  // fallback
  // The cookie name is the built-in extractor's setting.
  StickyCookie c;
  c.extractor().name = "SERVERID";
  CHECK(slot_for(c, request("Cookie: sid=s1; SERVERID=s3\r\n"), {0, 1, 2, 3}) ==
        std::optional<std::size_t>(3));
}
