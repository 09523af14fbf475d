// Unit tests for prefork/store.hpp: every MemoryStore operation and its edge cases, TTL expiry
// driven by a fake clock (no sleeping), the size limit, snapshots (round trip, corruption,
// a save SIGKILLed mid-write), the wire format's round trip and its decoders on truncated and
// random bytes, and apply() against MemoryStore and a test double.
#include "prefork/store.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "prefork/detail/unique_fd.hpp"
#include "prefork/error.hpp"
#include "support/descriptors.hpp"

namespace {

using namespace std::chrono_literals;
using namespace std::literals;
namespace fs = std::filesystem;
using prefork::MemoryStore;
using prefork::SnapshotOptions;
using prefork::StoreLimits;
using prefork::StoreOp;
using prefork::StoreReply;
using prefork::StoreRequest;
using prefork::store_errc;
using Strings = std::vector<std::string>;

// A clock the test moves by hand; copies share the time, so the test keeps one and the store
// another.
struct FakeClock {
  using duration = std::chrono::nanoseconds;
  using rep = duration::rep;
  using period = duration::period;
  using time_point = std::chrono::time_point<FakeClock, duration>;

  std::shared_ptr<time_point> t = std::make_shared<time_point>(std::chrono::hours(1));
  time_point now() const { return *t; }
  void advance(duration d) const { *t += d; }
};

using FakeStore = MemoryStore<FakeClock>;

static_assert(prefork::Store<MemoryStore<>>);
static_assert(prefork::Store<FakeStore>);
static_assert(prefork::StoreClock<FakeClock>);

// A wall clock instant for snapshots, so that TTLs survive save/load exactly.
const std::chrono::system_clock::time_point kWall{std::chrono::milliseconds(1'700'000'000'000)};

SnapshotOptions at_wall(std::chrono::system_clock::time_point wall) {
  SnapshotOptions o;
  o.wall_now = wall;
  return o;
}

// A directory under /tmp for one test case, removed with everything in it at the end.
class TempDir {
 public:
  TempDir() {
    char name[] = "/tmp/prefork-store-XXXXXX";
    if (::mkdtemp(name) == nullptr) throw std::system_error(errno, std::system_category(), "mkdtemp");
    path_ = name;
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string file(std::string_view name) const { return (path_ / name).string(); }
  std::size_t entries() const {
    return static_cast<std::size_t>(std::distance(fs::directory_iterator(path_), {}));
  }

 private:
  fs::path path_;
};

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

void write_file(const std::string& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// Everything a store holds, as "key=value" lines, to compare a store before and after.
template <class S>
Strings dump(S& store) {
  Strings out;
  for (const std::string& k : store.keys("")) out.push_back(k + "=" + store.get(k).value_or("?"));
  return out;
}

std::string binary(std::string_view s) {
  std::string out(s);
  out.push_back('\0');
  out += "\xff\x01 tail";
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Errors and limits

TEST_CASE("Store errors have their own category named prefork.store with clear messages",
          "[store]") {
  std::error_code ec = store_errc::full;
  CHECK(std::string(ec.category().name()) == "prefork.store");
  CHECK(&ec.category() == &prefork::store_category());
  CHECK(ec != prefork::errc::frame_too_large);
  for (int v = 1; v <= static_cast<int>(store_errc::handed_over); ++v) {
    const std::string m = prefork::make_error_code(static_cast<store_errc>(v)).message();
    CHECK_FALSE(m.empty());
    CHECK(m.find("unknown") == std::string::npos);
  }
  CHECK(std::error_code(store_errc::conflict).message().find("compare-and-set") != std::string::npos);
}

TEST_CASE("StoreLimits rejects a limit of zero or too large, naming the field", "[store]") {
  auto message_of = [](StoreLimits l) -> std::string {
    try {
      MemoryStore<> s(l);
    } catch (const std::invalid_argument& e) {
      return e.what();
    }
    return "";
  };
  CHECK(message_of({.max_bytes = 0}).find("max_bytes") != std::string::npos);
  CHECK(message_of({.max_bytes = StoreLimits::entry_overhead}).find("max_bytes") != std::string::npos);
  CHECK(message_of({.max_key_size = 0}).find("max_key_size") != std::string::npos);
  CHECK(message_of({.max_value_size = 0}).find("max_value_size") != std::string::npos);
  CHECK(message_of({.max_value_size = std::size_t{1} << 32}).find("max_value_size") !=
        std::string::npos);
  CHECK(message_of({}).empty());
  StoreLimits defaults;
  CHECK(defaults.max_bytes == 64u * 1024 * 1024);
  CHECK(defaults.max_key_size == 1024u);
  CHECK(defaults.max_value_size == 1024u * 1024);
}

// ---------------------------------------------------------------------------------------------
// Operations

TEST_CASE("get returns what set stored and nothing for a missing key", "[store]") {
  MemoryStore<> store;
  CHECK(store.get("a") == std::nullopt);
  CHECK_FALSE(store.set("a", "1"));
  CHECK(store.get("a") == "1");
  CHECK_FALSE(store.set("", ""));
  CHECK(store.get("") == "");
  CHECK(store.size() == 2);
}

TEST_CASE("Keys and values are arbitrary bytes, NULs included", "[store]") {
  MemoryStore<> store;
  const std::string key = binary("k");
  const std::string value = binary("v");
  CHECK_FALSE(store.set(key, value));
  CHECK(store.get(key) == value);
  CHECK(store.get("k") == std::nullopt);
  CHECK(store.keys("k") == Strings{key});
}

TEST_CASE("set overwrites the value and replaces a previous TTL", "[store]") {
  FakeClock clock;
  FakeStore store({}, clock);
  CHECK_FALSE(store.set("a", "1", 10ms));
  CHECK_FALSE(store.set("a", "2"));
  clock.advance(1h);
  CHECK(store.get("a") == "2");
  CHECK_FALSE(store.set("a", "3", 5ms));
  clock.advance(5ms);
  CHECK(store.get("a") == std::nullopt);
}

TEST_CASE("erase reports whether the key existed", "[store]") {
  MemoryStore<> store;
  CHECK_FALSE(store.erase("a"));
  CHECK_FALSE(store.set("a", "1"));
  CHECK(store.erase("a"));
  CHECK_FALSE(store.erase("a"));
  CHECK(store.get("a") == std::nullopt);
  CHECK(store.bytes_used() == 0);
}

TEST_CASE("increment counts a missing key from zero and returns the new value", "[store]") {
  MemoryStore<> store;
  auto r = store.increment("n", 5);
  REQUIRE(r.ok());
  CHECK(r.value == 5);
  CHECK(store.increment("n", -7).value == -2);
  CHECK(store.get("n") == "-2");
  CHECK(store.increment("n", 0).value == -2);
  CHECK_FALSE(store.set("m", "0041"));
  CHECK(store.increment("m", 1).value == 42);
  CHECK(store.get("m") == "42");
}

TEST_CASE("increment of a value that is not a decimal int64 fails with not_a_number and leaves it",
          "[store]") {
  MemoryStore<> store;
  for (std::string bad : {""s, "abc"s, " 1"s, "1 "s, "+1"s, "1.5"s, "0x10"s, "-"s,
                          "9223372036854775808"s, "-9223372036854775809"s, binary("1")}) {
    INFO("value: " << bad);
    REQUIRE_FALSE(store.set("n", bad));
    auto r = store.increment("n", 1);
    CHECK(r.error == store_errc::not_a_number);
    CHECK(store.get("n") == bad);
  }
}

TEST_CASE("increment that would overflow fails with overflow and leaves the value unchanged",
          "[store]") {
  constexpr auto max = std::numeric_limits<std::int64_t>::max();
  constexpr auto min = std::numeric_limits<std::int64_t>::min();
  MemoryStore<> store;
  CHECK(store.increment("n", max).value == max);
  CHECK(store.increment("n", 1).error == store_errc::overflow);
  CHECK(store.get("n") == "9223372036854775807");
  CHECK(store.increment("n", min).value == -1);
  CHECK(store.increment("n", min).error == store_errc::overflow);
  CHECK(store.increment("n", 1).value == 0);
  CHECK(store.increment("n", min).value == min);
  CHECK(store.increment("n", -1).error == store_errc::overflow);
  CHECK(store.increment("n", min).error == store_errc::overflow);
  CHECK(store.get("n") == "-9223372036854775808");
  CHECK(store.increment("n", max).value == -1);
}

TEST_CASE("increment applies its TTL only when it creates the key and keeps an existing expiry",
          "[store]") {
  FakeClock clock;
  FakeStore store({}, clock);
  CHECK(store.increment("hits", 1, 100ms).value == 1);
  clock.advance(60ms);
  CHECK(store.increment("hits", 1, 100ms).value == 2);  // still expires at 100 ms
  clock.advance(40ms);
  CHECK(store.get("hits") == std::nullopt);
  CHECK(store.increment("hits", 1, 100ms).value == 1);  // a new window
  CHECK(store.increment("plain", 1).value == 1);
  clock.advance(24h);
  CHECK(store.get("plain") == "1");
}

TEST_CASE("compare_and_set without an expected value succeeds only when the key is absent",
          "[store]") {
  FakeClock clock;
  FakeStore store({}, clock);
  CHECK_FALSE(store.compare_and_set("lock", std::nullopt, "me", 50ms));
  CHECK(store.compare_and_set("lock", std::nullopt, "you") == store_errc::conflict);
  CHECK(store.get("lock") == "me");
  clock.advance(50ms);
  CHECK_FALSE(store.compare_and_set("lock", std::nullopt, "you"));
  CHECK(store.get("lock") == "you");
}

TEST_CASE("compare_and_set with an expected value succeeds only on an exact match", "[store]") {
  MemoryStore<> store;
  CHECK(store.compare_and_set("k", "x"sv, "y") == store_errc::conflict);
  CHECK(store.get("k") == std::nullopt);
  REQUIRE_FALSE(store.set("k", "x"));
  CHECK(store.compare_and_set("k", "X"sv, "y") == store_errc::conflict);
  CHECK(store.compare_and_set("k", "x\0"sv, "y") == store_errc::conflict);
  CHECK(store.compare_and_set("k", ""sv, "y") == store_errc::conflict);
  CHECK(store.get("k") == "x");
  CHECK_FALSE(store.compare_and_set("k", "x"sv, "y"));
  CHECK(store.get("k") == "y");
  REQUIRE_FALSE(store.set("e", ""));
  CHECK_FALSE(store.compare_and_set("e", ""sv, "z"));
  CHECK(store.get("e") == "z");
}

TEST_CASE("keys lists the keys with a prefix in ascending byte order and stops at the limit",
          "[store]") {
  MemoryStore<> store;
  for (const char* k : {"user:3", "user:1", "user:10", "users", "use", "session:1", "user;",
                        "user:\xff", "user:\x01"})
    REQUIRE_FALSE(store.set(k, "v"));
  CHECK(store.keys("user:") == Strings{"user:\x01", "user:1", "user:10", "user:3", "user:\xff"});
  CHECK(store.keys("user:", 2) == Strings{"user:\x01", "user:1"});
  CHECK(store.keys("user:", 0).empty());
  CHECK(store.keys("nothing").empty());
  CHECK(store.keys("").size() == 9);
  CHECK(store.keys("use") == Strings{"use", "user:\x01", "user:1", "user:10", "user:3",
                                     "user:\xff", "user;", "users"});
}

// ---------------------------------------------------------------------------------------------
// Expiry

TEST_CASE("Expired keys are invisible to every operation", "[store][ttl]") {
  FakeClock clock;
  FakeStore store({}, clock);
  REQUIRE_FALSE(store.set("a:get", "1", 10ms));
  REQUIRE_FALSE(store.set("a:keys", "1", 10ms));
  REQUIRE_FALSE(store.set("a:incr", "41", 10ms));
  REQUIRE_FALSE(store.set("a:cas", "old", 10ms));
  REQUIRE_FALSE(store.set("a:erase", "1", 10ms));
  REQUIRE_FALSE(store.set("a:live", "1", 11ms));
  clock.advance(9ms);
  CHECK(store.keys("a:").size() == 6);
  clock.advance(1ms);  // expiry is inclusive: at exactly ttl the key is gone

  CHECK(store.get("a:get") == std::nullopt);
  CHECK(store.keys("a:") == Strings{"a:live"});
  CHECK(store.increment("a:incr", 1).value == 1);
  CHECK(store.compare_and_set("a:cas", "old"sv, "new") == store_errc::conflict);
  CHECK_FALSE(store.compare_and_set("a:cas", std::nullopt, "new"));
  CHECK_FALSE(store.erase("a:erase"));
  CHECK(dump(store) == Strings{"a:cas=new", "a:incr=1", "a:live=1"});
}

TEST_CASE("sweep reclaims expired entries and their bytes, at most max_entries per call",
          "[store][ttl]") {
  FakeClock clock;
  FakeStore store({}, clock);
  REQUIRE_FALSE(store.set("keep", "v"));
  const std::size_t base = store.bytes_used();
  for (int i = 0; i < 10; ++i) REQUIRE_FALSE(store.set("t" + std::to_string(i), "value", 1ms * (i + 1)));
  CHECK(store.sweep() == 0);
  clock.advance(5ms);
  CHECK(store.size() == 11);  // lazily expired, not yet reclaimed
  CHECK(store.sweep(3) == 3);
  CHECK(store.sweep() == 2);
  CHECK(store.sweep() == 0);
  CHECK(store.size() == 6);
  clock.advance(1h);
  CHECK(store.sweep() == 5);
  CHECK(store.size() == 1);
  CHECK(store.bytes_used() == base);
  CHECK(base == 4 + 1 + StoreLimits::entry_overhead);
}

TEST_CASE("A negative TTL fails with invalid_ttl and a TTL past the clock's range never expires",
          "[store][ttl]") {
  FakeClock clock;
  FakeStore store({}, clock);
  CHECK(store.set("a", "1", -1ms) == store_errc::invalid_ttl);
  CHECK(store.increment("a", 1, -1ms).error == store_errc::invalid_ttl);
  CHECK(store.compare_and_set("a", std::nullopt, "1", -1ms) == store_errc::invalid_ttl);
  CHECK(store.size() == 0);
  CHECK_FALSE(store.set("a", "1", std::chrono::milliseconds::max()));
  clock.advance(std::chrono::hours(24 * 365 * 200));
  CHECK(store.get("a") == "1");
  CHECK(store.sweep() == 0);
}

// ---------------------------------------------------------------------------------------------
// Size limits

TEST_CASE("A write past max_bytes fails with full and changes nothing", "[store][limits]") {
  constexpr std::size_t o = StoreLimits::entry_overhead;
  // Room for exactly two entries of 1 + 9 bytes.
  MemoryStore<> store({.max_bytes = 2 * (o + 10)});
  REQUIRE_FALSE(store.set("a", "123456789"));
  REQUIRE_FALSE(store.set("b", "123456789"));
  CHECK(store.bytes_used() == store.limits().max_bytes);
  const Strings before = dump(store);

  CHECK(store.set("c", "") == store_errc::full);
  CHECK(store.set("a", "1234567890") == store_errc::full);
  CHECK(store.increment("c", 1).error == store_errc::full);
  CHECK(store.compare_and_set("c", std::nullopt, "x") == store_errc::full);
  CHECK(store.compare_and_set("a", "123456789"sv, "1234567890") == store_errc::full);
  CHECK(dump(store) == before);
  CHECK(store.bytes_used() == store.limits().max_bytes);
  CHECK(store.describe(store_errc::full) == "store full: " + std::to_string(2 * (o + 10)) + " of " +
                                                std::to_string(2 * (o + 10)) + " bytes used");

  // Overwriting counts only the difference.
  CHECK_FALSE(store.set("a", "12345678"));
  CHECK_FALSE(store.set("b", "1234567890"));
  CHECK(store.bytes_used() == store.limits().max_bytes);
  CHECK(store.erase("a"));
  CHECK(store.set("c", "123456789") == store_errc::full);
  CHECK_FALSE(store.set("c", "12345678"));
  CHECK(store.increment("n", 1).error == store_errc::full);
}

TEST_CASE("A write that is full only because of expired entries reclaims them and succeeds",
          "[store][limits][ttl]") {
  constexpr std::size_t o = StoreLimits::entry_overhead;
  FakeClock clock;
  FakeStore store({.max_bytes = 2 * (o + 2)}, clock);
  REQUIRE_FALSE(store.set("a", "1", 1ms));
  REQUIRE_FALSE(store.set("b", "1", 1ms));
  CHECK(store.set("c", "1") == store_errc::full);
  clock.advance(1ms);
  CHECK_FALSE(store.set("c", "1"));
  CHECK(store.size() == 1);
  CHECK(store.bytes_used() == o + 2);
}

TEST_CASE("Keys and values over the size limits fail with key_too_long and value_too_long",
          "[store][limits]") {
  MemoryStore<> store({.max_key_size = 4, .max_value_size = 3});
  CHECK_FALSE(store.set("1234", "123"));
  CHECK(store.set("12345", "1") == store_errc::key_too_long);
  CHECK(store.set("1", "1234") == store_errc::value_too_long);
  CHECK(store.increment("12345", 1).error == store_errc::key_too_long);
  CHECK(store.increment("n", 1000).error == store_errc::value_too_long);
  CHECK(store.increment("n", 999).value == 999);
  CHECK(store.compare_and_set("12345", std::nullopt, "1") == store_errc::key_too_long);
  CHECK(store.compare_and_set("x", std::nullopt, "1234") == store_errc::value_too_long);
  CHECK(dump(store) == Strings{"1234=123", "n=999"});
  CHECK(store.describe(store_errc::key_too_long) == "key too long: the store's limit is 4 bytes");
}

TEST_CASE("A MemoryStore moves with its contents and expiries", "[store]") {
  FakeClock clock;
  FakeStore a({}, clock);
  REQUIRE_FALSE(a.set("x", "1", 5ms));
  REQUIRE_FALSE(a.set("y", "2"));
  FakeStore b(std::move(a));
  clock.advance(5ms);
  CHECK(b.sweep() == 1);
  CHECK(dump(b) == Strings{"y=2"});
  FakeStore c({}, clock);
  c = std::move(b);
  CHECK(dump(c) == Strings{"y=2"});
}

// ---------------------------------------------------------------------------------------------
// Snapshots

TEST_CASE("A snapshot round-trips binary keys and values and the time left on TTLs",
          "[store][snapshot]") {
  prefork_test::FdLeakCheck leaks;
  TempDir dir;
  const std::string path = dir.file("store.snap");
  FakeClock clock;
  FakeStore store({}, clock);
  REQUIRE_FALSE(store.set(binary("k1"), binary("v1")));
  REQUIRE_FALSE(store.set("empty", ""));
  REQUIRE_FALSE(store.set("ttl", "10s", 10s));
  REQUIRE_FALSE(store.set("gone", "x", 2s));
  clock.advance(3s);  // "gone" is expired and not saved, "ttl" has 7 s left
  REQUIRE_FALSE(store.save(path, at_wall(kWall)));
  CHECK(dir.entries() == 1);  // no temporary file left behind
  CHECK(fs::status(path).permissions() == (fs::perms::owner_read | fs::perms::owner_write));

  FakeClock later;
  FakeStore loaded({}, later);
  REQUIRE_FALSE(loaded.set("replaced", "by load"));
  REQUIRE_FALSE(loaded.load(path, at_wall(kWall + 2s)));  // 5 s left
  CHECK(dump(loaded) == Strings{"empty=", binary("k1") + "=" + binary("v1"), "ttl=10s"});
  CHECK(loaded.bytes_used() == store.bytes_used() - (4 + 1 + StoreLimits::entry_overhead));
  later.advance(5s - 1ns);
  CHECK(loaded.get("ttl") == "10s");
  later.advance(1ns);
  CHECK(loaded.get("ttl") == std::nullopt);

  MemoryStore<> real;  // the real wall clock is long past kWall + 7 s: "ttl" is dropped
  REQUIRE_FALSE(real.load(path));
  CHECK(real.keys("") == Strings{"empty", binary("k1")});
}

TEST_CASE("Entries already expired at load time are dropped", "[store][snapshot]") {
  TempDir dir;
  const std::string path = dir.file("s");
  FakeClock clock;
  FakeStore store({}, clock);
  REQUIRE_FALSE(store.set("short", "1", 1s));
  REQUIRE_FALSE(store.set("long", "1", 1h));
  REQUIRE_FALSE(store.save(path, at_wall(kWall)));
  FakeStore loaded({}, clock);
  REQUIRE_FALSE(loaded.load(path, at_wall(kWall + 1s)));
  CHECK(loaded.keys("") == Strings{"long"});
  CHECK(loaded.size() == 1);
}

TEST_CASE("Loading a missing snapshot fails with ENOENT and leaves the store unchanged",
          "[store][snapshot]") {
  TempDir dir;
  MemoryStore<> store;
  REQUIRE_FALSE(store.set("a", "1"));
  const std::error_code ec = store.load(dir.file("absent"));
  CHECK(ec == std::errc::no_such_file_or_directory);
  CHECK(dump(store) == Strings{"a=1"});
}

TEST_CASE("Every truncation and every altered byte of a snapshot is rejected, store unchanged",
          "[store][snapshot]") {
  TempDir dir;
  const std::string good = dir.file("good");
  const std::string bad = dir.file("bad");
  MemoryStore<> source;
  REQUIRE_FALSE(source.set("alpha", "1", 1h));
  REQUIRE_FALSE(source.set(binary("beta"), binary("2")));
  REQUIRE_FALSE(source.set("", "empty key"));
  REQUIRE_FALSE(source.save(good));
  const std::string bytes = read_file(good);
  REQUIRE(bytes.size() > 24);

  MemoryStore<> store;
  REQUIRE_FALSE(store.set("mine", "kept"));
  const Strings before = dump(store);
  for (std::size_t n = 0; n < bytes.size(); ++n) {
    write_file(bad, bytes.substr(0, n));
    INFO("truncated to " << n << " of " << bytes.size());
    CHECK(store.load(bad) == store_errc::snapshot_corrupt);
  }
  for (std::size_t i = 0; i < bytes.size(); ++i) {
    std::string altered = bytes;
    altered[i] = static_cast<char>(altered[i] ^ 0x20);
    write_file(bad, altered);
    INFO("byte " << i << " altered");
    const std::error_code ec = store.load(bad);
    // The version field may read as a newer version instead.
    CHECK((ec == store_errc::snapshot_corrupt || (i >= 8 && i < 12 && ec == store_errc::snapshot_version)));
  }
  write_file(bad, bytes + "x");
  CHECK(store.load(bad) == store_errc::snapshot_corrupt);
  CHECK(dump(store) == before);
  REQUIRE_FALSE(store.load(good));
  CHECK(store.size() == 3);
}

TEST_CASE("A snapshot of a newer format version is rejected with snapshot_version",
          "[store][snapshot]") {
  TempDir dir;
  const std::string path = dir.file("s");
  MemoryStore<> store;
  REQUIRE_FALSE(store.save(path));
  std::string bytes = read_file(path);
  bytes[8] = 2;  // the version; the checksum is checked after it
  write_file(path, bytes);
  CHECK(store.load(path) == store_errc::snapshot_version);
}

TEST_CASE("A snapshot that does not fit the store's limits is rejected, store unchanged",
          "[store][snapshot][limits]") {
  TempDir dir;
  const std::string path = dir.file("s");
  MemoryStore<> big;
  REQUIRE_FALSE(big.set("a-long-key", std::string(100, 'v')));
  REQUIRE_FALSE(big.set("b", std::string(1000, 'w')));
  REQUIRE_FALSE(big.save(path));

  MemoryStore<> small_keys({.max_key_size = 4});
  CHECK(small_keys.load(path) == store_errc::key_too_long);
  MemoryStore<> small_values({.max_value_size = 500});
  CHECK(small_values.load(path) == store_errc::value_too_long);
  MemoryStore<> small_store({.max_bytes = 1000});
  REQUIRE_FALSE(small_store.set("x", "y"));
  CHECK(small_store.load(path) == store_errc::full);
  CHECK(dump(small_store) == Strings{"x=y"});
  MemoryStore<> fits({.max_bytes = big.bytes_used()});
  CHECK_FALSE(fits.load(path));
}

TEST_CASE("A save killed mid-write leaves the previous snapshot intact", "[store][snapshot]") {
  prefork_test::FdLeakCheck leaks;
  TempDir dir;
  const std::string path = dir.file("store.snap");
  MemoryStore<> store;
  REQUIRE_FALSE(store.set("generation", "1"));
  REQUIRE_FALSE(store.save(path));
  const std::string previous = read_file(path);

  for (int i = 0; i < 4000; ++i) REQUIRE_FALSE(store.set("key" + std::to_string(i), std::string(1000, 'x')));
  REQUIRE_FALSE(store.set("generation", "2"));
  constexpr std::size_t kill_after = 256 * 1024;  // about 4 MiB in all: far from done

  int fds[2];
  REQUIRE(::pipe2(fds, O_CLOEXEC) == 0);
  prefork::UniqueFd ready(fds[0]);
  prefork::UniqueFd ready_w(fds[1]);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    SnapshotOptions o;
    o.on_progress = [&](std::size_t written) {
      if (written < kill_after) return;
      const char c = 1;
      (void)!::write(ready_w.get(), &c, 1);
      for (;;) ::pause();  // SIGKILL ends it here, half-way through the file
    };
    (void)store.save(path, o);
    ::_exit(3);
  }
  ready_w.reset();
  // Kill and reap the child whatever happens below.
  struct Reaper {
    pid_t pid;
    int status = 0;
    bool reaped = false;
    int reap() {
      if (!reaped) {
        ::kill(pid, SIGKILL);
        while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
        }
        reaped = true;
      }
      return status;
    }
    ~Reaper() { reap(); }
  } child{pid};

  pollfd p{ready.get(), POLLIN, 0};
  REQUIRE(::poll(&p, 1, 30'000) == 1);  // a deadline, not a sleep: the child signals when ready
  char c = 0;
  REQUIRE(::read(ready.get(), &c, 1) == 1);
  const int status = child.reap();
  REQUIRE(WIFSIGNALED(status));
  CHECK(WTERMSIG(status) == SIGKILL);

  CHECK(read_file(path) == previous);
  const auto partial = fs::file_size(path + ".tmp");
  CHECK(partial >= kill_after);
  CHECK(partial < 4000u * 1000u);
  MemoryStore<> loaded;
  REQUIRE_FALSE(loaded.load(path));
  CHECK(dump(loaded) == Strings{"generation=1"});

  // The next save replaces the stale temporary file.
  REQUIRE_FALSE(store.save(path));
  CHECK(dir.entries() == 1);
  REQUIRE_FALSE(loaded.load(path));
  CHECK(loaded.size() == 4001);
  CHECK(loaded.get("generation") == "2");
}

TEST_CASE("A stray temporary file is ignored by load and replaced by save", "[store][snapshot]") {
  TempDir dir;
  const std::string path = dir.file("s");
  MemoryStore<> store;
  REQUIRE_FALSE(store.set("a", "1"));
  REQUIRE_FALSE(store.save(path));
  write_file(path + ".tmp", "garbage from a crashed save");
  REQUIRE(::chmod((path + ".tmp").c_str(), 0644) == 0);
  MemoryStore<> loaded;
  REQUIRE_FALSE(loaded.load(path));
  CHECK(dump(loaded) == Strings{"a=1"});
  REQUIRE_FALSE(store.set("b", "2"));
  REQUIRE_FALSE(store.save(path));
  CHECK(dir.entries() == 1);
  CHECK(fs::status(path).permissions() == (fs::perms::owner_read | fs::perms::owner_write));
  REQUIRE_FALSE(loaded.load(path));
  CHECK(dump(loaded) == Strings{"a=1", "b=2"});
}

TEST_CASE("A failed save returns the error and leaves the previous snapshot and no temporary file",
          "[store][snapshot]") {
  prefork_test::FdLeakCheck leaks;
  TempDir dir;
  const std::string path = dir.file("s");
  MemoryStore<> store;
  REQUIRE_FALSE(store.set("a", "1"));
  REQUIRE_FALSE(store.save(path));
  const std::string previous = read_file(path);

  CHECK(store.save(dir.file("missing/s")) == std::errc::no_such_file_or_directory);

  for (int i = 0; i < 200; ++i) REQUIRE_FALSE(store.set("k" + std::to_string(i), std::string(1000, 'x')));
  SnapshotOptions o;
  o.on_progress = [](std::size_t) { throw std::runtime_error("disk on fire"); };
  CHECK_THROWS_WITH(store.save(path, o), "disk on fire");
  CHECK(read_file(path) == previous);
  CHECK(dir.entries() == 1);
}

// ---------------------------------------------------------------------------------------------
// Wire format

namespace {

std::vector<StoreRequest> sample_requests() {
  std::vector<StoreRequest> out;
  out.push_back({.op = StoreOp::get, .key = "k"});
  out.push_back({.op = StoreOp::set, .key = binary("k"), .value = binary("v"), .ttl_ms = 1500});
  out.push_back({.op = StoreOp::erase, .key = ""});
  out.push_back({.op = StoreOp::increment,
                 .key = "n",
                 .delta = std::numeric_limits<std::int64_t>::min(),
                 .ttl_ms = -1});
  out.push_back({.op = StoreOp::compare_and_set, .key = "c", .value = "new", .expected = "old"});
  out.push_back({.op = StoreOp::compare_and_set, .key = "c", .value = "v", .expected = ""});
  out.push_back({.op = StoreOp::compare_and_set, .key = "c", .value = "v"});
  out.push_back({.op = StoreOp::keys, .key = "user:", .limit = 10});
  return out;
}

std::vector<StoreReply> sample_replies() {
  std::vector<StoreReply> out;
  out.push_back({});
  out.push_back({.value = binary("v")});
  out.push_back({.value = ""});
  out.push_back({.number = -42});
  out.push_back({.keys = {"a", "", binary("b")}});
  out.push_back({.error = store_errc::full, .message = "store full: 1 of 1 bytes used"});
  out.push_back({.error = store_errc::backend_error});
  return out;
}

}  // namespace

TEST_CASE("Every request and reply survives encode and decode unchanged", "[store][wire]") {
  std::error_code ec = store_errc::full;
  for (const StoreRequest& r : sample_requests()) {
    const std::string bytes = prefork::encode(r);
    auto back = prefork::decode_request(bytes, ec);
    REQUIRE(back.has_value());
    CHECK(!ec);
    CHECK(*back == r);
    ec = store_errc::full;
  }
  for (const StoreReply& r : sample_replies()) {
    const std::string bytes = prefork::encode(r);
    auto back = prefork::decode_reply(bytes, ec);
    REQUIRE(back.has_value());
    CHECK(!ec);
    CHECK(*back == r);
    CHECK(back->code() == (r.ok() ? std::error_code{} : std::error_code(r.error)));
    ec = store_errc::full;
  }
}

TEST_CASE("The decoders reject every truncation and extension of a valid frame", "[store][wire]") {
  std::error_code ec;
  for (const StoreRequest& r : sample_requests()) {
    const std::string bytes = prefork::encode(r);
    for (std::size_t n = 0; n < bytes.size(); ++n) {
      CHECK_FALSE(prefork::decode_request(std::string_view(bytes).substr(0, n), ec));
      CHECK(ec == store_errc::bad_request);
    }
    CHECK_FALSE(prefork::decode_request(bytes + '\0', ec));
  }
  for (const StoreReply& r : sample_replies()) {
    const std::string bytes = prefork::encode(r);
    for (std::size_t n = 0; n < bytes.size(); ++n) {
      CHECK_FALSE(prefork::decode_reply(std::string_view(bytes).substr(0, n), ec));
      CHECK(ec == store_errc::bad_reply);
    }
    CHECK_FALSE(prefork::decode_reply(bytes + '\0', ec));
  }
}

TEST_CASE("The decoders reject unknown formats, ops, errors and flags", "[store][wire]") {
  std::error_code ec;
  const std::string req = prefork::encode(StoreRequest{.op = StoreOp::get, .key = "k"});
  auto patched = [](std::string s, std::size_t i, unsigned v) {
    s[i] = static_cast<char>(v);
    return s;
  };
  CHECK_FALSE(prefork::decode_request(patched(req, 0, 2), ec));
  CHECK_FALSE(prefork::decode_request(patched(req, 1, 0), ec));
  CHECK_FALSE(prefork::decode_request(patched(req, 1, 7), ec));
  CHECK_FALSE(prefork::decode_request(patched(req, 2, 2), ec));
  CHECK(prefork::decode_request(patched(req, 1, 6), ec).has_value());
  const std::string rep = prefork::encode(StoreReply{});
  CHECK_FALSE(prefork::decode_reply(patched(rep, 0, 0), ec));
  CHECK_FALSE(prefork::decode_reply(patched(rep, 1, 14), ec));
  CHECK_FALSE(prefork::decode_reply(patched(rep, 2, 0x80), ec));
  CHECK(prefork::decode_reply(patched(rep, 1, 13), ec).has_value());  // handed_over
}

TEST_CASE("A reply announcing more keys than its bytes can hold is rejected before allocating",
          "[store][wire]") {
  std::string bytes = prefork::encode(StoreReply{});
  bytes.replace(bytes.size() - 4, 4, "\xff\xff\xff\xff");  // 4 billion keys, no bytes
  std::error_code ec;
  CHECK_FALSE(prefork::decode_reply(bytes, ec));
  CHECK(ec == store_errc::bad_reply);
  std::string req = prefork::encode(StoreRequest{.op = StoreOp::get, .key = "k"});
  req.replace(3, 4, "\xff\xff\xff\xff");  // a 4 GiB key
  CHECK_FALSE(prefork::decode_request(req, ec));
  CHECK(ec == store_errc::bad_request);
}

TEST_CASE("The decoders survive random and mutated bytes, and what they accept is canonical",
          "[store][wire]") {
  std::mt19937_64 rng(20240606);
  std::vector<std::string> seeds;
  for (const auto& r : sample_requests()) seeds.push_back(prefork::encode(r));
  for (const auto& r : sample_replies()) seeds.push_back(prefork::encode(r));
  std::size_t accepted = 0;
  for (int round = 0; round < 50'000; ++round) {
    std::string bytes;
    if (round % 2 == 0) {
      bytes.resize(rng() % 64);
      for (char& c : bytes) c = static_cast<char>(rng());
      if (!bytes.empty()) bytes[0] = static_cast<char>(rng() % 3);
    } else {
      bytes = seeds[rng() % seeds.size()];
      for (int m = 0, n = 1 + static_cast<int>(rng() % 3); m < n && !bytes.empty(); ++m)
        bytes[rng() % bytes.size()] = static_cast<char>(rng() % 4 == 0 ? 0xff : rng() % 8);
    }
    std::error_code ec;
    if (auto r = prefork::decode_request(bytes, ec)) {
      ++accepted;
      CHECK(prefork::encode(*r) == bytes);
    } else {
      CHECK(ec == store_errc::bad_request);
    }
    if (auto r = prefork::decode_reply(bytes, ec)) {
      ++accepted;
      CHECK(prefork::encode(*r) == bytes);
    } else {
      CHECK(ec == store_errc::bad_reply);
    }
  }
  CHECK(accepted > 0);
}

// ---------------------------------------------------------------------------------------------
// apply() and the concept

TEST_CASE("apply runs every operation against a MemoryStore and reports errors in the reply",
          "[store][wire]") {
  FakeClock clock;
  FakeStore store({.max_bytes = 1024}, clock);
  auto run = [&](StoreRequest r) {
    // Through the wire both ways, as the lead's channel will carry it.
    std::error_code ec;
    auto req = prefork::decode_request(prefork::encode(r), ec);
    REQUIRE(req);
    auto reply = prefork::decode_reply(prefork::encode(prefork::apply(store, *req)), ec);
    REQUIRE(reply);
    return *reply;
  };
  CHECK(run({.op = StoreOp::set, .key = "e", .value = "1", .ttl_ms = 100}).ok());
  CHECK(run({.op = StoreOp::set, .key = "a", .value = "1", .ttl_ms = 100}).ok());
  CHECK(run({.op = StoreOp::get, .key = "a"}).value == "1");
  CHECK(run({.op = StoreOp::get, .key = "b"}).value == std::nullopt);
  CHECK(run({.op = StoreOp::increment, .key = "a", .delta = 41}).number == 42);
  CHECK(run({.op = StoreOp::increment, .key = "n", .delta = -3}).number == -3);
  CHECK(run({.op = StoreOp::compare_and_set, .key = "a", .value = "x", .expected = "42"}).ok());
  const StoreReply conflict =
      run({.op = StoreOp::compare_and_set, .key = "a", .value = "y", .expected = "42"});
  CHECK(conflict.error == store_errc::conflict);
  CHECK(conflict.message == std::error_code(store_errc::conflict).message());
  CHECK(run({.op = StoreOp::compare_and_set, .key = "c", .value = "z"}).ok());
  CHECK(run({.op = StoreOp::keys, .key = ""}).keys == Strings{"a", "c", "e", "n"});
  CHECK(run({.op = StoreOp::keys, .key = "", .limit = 1}).keys == Strings{"a"});
  CHECK(run({.op = StoreOp::erase, .key = "c"}).number == 1);
  CHECK(run({.op = StoreOp::erase, .key = "c"}).number == 0);
  clock.advance(100ms);
  CHECK(run({.op = StoreOp::get, .key = "e"}).value == std::nullopt);
  CHECK(run({.op = StoreOp::get, .key = "a"}).value == "x");  // the CAS replaced its TTL

  const StoreReply full = run({.op = StoreOp::set, .key = "big", .value = std::string(1000, 'b')});
  CHECK(full.error == store_errc::full);
  CHECK(full.code() == store_errc::full);
  CHECK(full.message.starts_with("store full: "));
  CHECK(full.message.ends_with(" of 1024 bytes used"));
  CHECK(run({.op = StoreOp::set, .key = "t", .ttl_ms = -5}).error == store_errc::invalid_ttl);
  CHECK(run({.op = StoreOp::increment, .key = "n", .delta = std::numeric_limits<std::int64_t>::min()})
            .error == store_errc::overflow);
  CHECK(prefork::apply(store, StoreRequest{.op = static_cast<StoreOp>(99)}).error ==
        store_errc::bad_request);
}

namespace {

// The smallest Store: records each call, answers from canned values, and can fail with a
// foreign error or throw, to show apply() needs nothing but the concept.
struct RecordingStore {
  Strings calls;
  std::error_code fail;
  bool throws = false;

  void record(std::string call) {
    if (throws) throw std::runtime_error("backend down");
    calls.push_back(std::move(call));
  }
  std::optional<std::string> get(std::string_view key) {
    record("get " + std::string(key));
    return "value";
  }
  std::error_code set(std::string_view key, std::string_view value, std::chrono::milliseconds ttl) {
    record("set " + std::string(key) + " " + std::string(value) + " " + std::to_string(ttl.count()));
    return fail;
  }
  bool erase(std::string_view key) {
    record("erase " + std::string(key));
    return true;
  }
  prefork::StoreResult<std::int64_t> increment(std::string_view key, std::int64_t delta,
                                               std::chrono::milliseconds ttl) {
    record("increment " + std::string(key) + " " + std::to_string(delta) + " " +
           std::to_string(ttl.count()));
    return {7, fail};
  }
  std::error_code compare_and_set(std::string_view key, std::optional<std::string_view> expected,
                                  std::string_view value, std::chrono::milliseconds ttl) {
    record("cas " + std::string(key) + " " + (expected ? std::string(*expected) : "<absent>") +
           " " + std::string(value) + " " + std::to_string(ttl.count()));
    return fail;
  }
  std::vector<std::string> keys(std::string_view prefix, std::size_t limit) {
    record("keys " + std::string(prefix) + " " + std::to_string(limit));
    return {"k1", "k2"};
  }
};
static_assert(prefork::Store<RecordingStore>);

// Everything but keys(): the concept names the missing piece.
struct NoListing {
  std::optional<std::string> get(std::string_view);
  std::error_code set(std::string_view, std::string_view, std::chrono::milliseconds);
  bool erase(std::string_view);
  prefork::StoreResult<std::int64_t> increment(std::string_view, std::int64_t,
                                               std::chrono::milliseconds);
  std::error_code compare_and_set(std::string_view, std::optional<std::string_view>,
                                  std::string_view, std::chrono::milliseconds);
};
static_assert(prefork::GetsValues<NoListing> && prefork::ComparesAndSets<NoListing>);
static_assert(!prefork::ListsKeys<NoListing>);
static_assert(!prefork::Store<NoListing>);
static_assert(!prefork::Store<int>);

}  // namespace

TEST_CASE("apply works with any Store and passes every argument through", "[store][wire]") {
  RecordingStore store;
  CHECK(prefork::apply(store, {.op = StoreOp::get, .key = "a"}).value == "value");
  CHECK(prefork::apply(store, {.op = StoreOp::set, .key = "a", .value = "b", .ttl_ms = 9}).ok());
  CHECK(prefork::apply(store, {.op = StoreOp::erase, .key = "a"}).number == 1);
  CHECK(prefork::apply(store, {.op = StoreOp::increment, .key = "n", .delta = -2, .ttl_ms = 3})
            .number == 7);
  prefork::apply(store, {.op = StoreOp::compare_and_set, .key = "c", .value = "v", .expected = "e"});
  prefork::apply(store, {.op = StoreOp::compare_and_set, .key = "c", .value = "v"});
  CHECK(prefork::apply(store, {.op = StoreOp::keys, .key = "p", .limit = 5}).keys ==
        Strings{"k1", "k2"});
  CHECK(store.calls == Strings{"get a", "set a b 9", "erase a", "increment n -2 3",
                               "cas c e v 0", "cas c <absent> v 0", "keys p 5"});
}

TEST_CASE("apply reports a foreign error or an exception from the store as backend_error",
          "[store][wire]") {
  RecordingStore store;
  store.fail = std::make_error_code(std::errc::io_error);
  StoreReply r = prefork::apply(store, {.op = StoreOp::set, .key = "a"});
  CHECK(r.error == store_errc::backend_error);
  CHECK(r.message == std::make_error_code(std::errc::io_error).message());
  store.fail = store_errc::conflict;
  CHECK(prefork::apply(store, {.op = StoreOp::increment, .key = "a"}).error == store_errc::conflict);
  CHECK(prefork::apply(store, {.op = StoreOp::increment, .key = "a"}).number == 0);
  store.throws = true;
  r = prefork::apply(store, {.op = StoreOp::keys});
  CHECK(r.error == store_errc::backend_error);
  CHECK(r.message == "backend down");
  CHECK(r.keys.empty());
}

TEST_CASE("The snapshot parser leaves no records behind when it rejects a snapshot",
          "[store][snapshot]") {
  // Found by fuzz.store: a repeated key after a valid record returned snapshot_corrupt with
  // the first record still in the output.
  TempDir dir;
  const std::string path = dir.file("s");
  MemoryStore<> store;
  REQUIRE_FALSE(store.set("a", "1"));
  REQUIRE_FALSE(store.set("b", "2"));
  REQUIRE_FALSE(store.save(path));
  std::string bytes = read_file(path);
  const std::size_t second_key = 12 + 16 + 2 + 16;  // header, record "a"="1", record header
  REQUIRE(bytes[second_key] == 'b');
  bytes[second_key] = 'a';
  const std::uint32_t crc =
      prefork::detail::crc32(0, std::string_view(bytes).substr(0, bytes.size() - 4));
  for (std::size_t i = 0; i < 4; ++i)
    bytes[bytes.size() - 4 + i] = static_cast<char>((crc >> (8 * i)) & 0xFFu);
  const prefork::detail::SnapshotBounds bounds{16, 16, 4096, StoreLimits::entry_overhead};
  std::vector<prefork::detail::SnapshotRecord> records;
  CHECK(prefork::detail::parse_snapshot(bytes, bounds, records) == store_errc::snapshot_corrupt);
  CHECK(records.empty());
}
