// The examples' Redis backend (examples/common/redis_store.hpp) against a real redis-server,
// started here on a Unix socket in a temporary directory (no port to collide with): the Store
// contract operation by operation, as MemoryStore keeps it, and what a Redis that goes away
// and comes back looks like to the master. Skipped, with a warning, without redis-server.
#include "common/redis_store.hpp"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "process/harness.hpp"
#include "support/temp_dir.hpp"

namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

std::optional<std::string> find_redis_server() {
  for (const char* p : {"/usr/bin/redis-server", "/usr/local/bin/redis-server"})
    if (::access(p, X_OK) == 0) return std::string(p);
  return std::nullopt;
}

/// redis-server on `dir`/redis.sock, no persistence, its log on a pipe (wait_ready() reads it),
/// stopped (SIGKILL, reaped) by the destructor or stop().
class RedisServer {
 public:
  RedisServer(const std::string& binary, const std::string& dir) : socket_(dir + "/redis.sock") {
    std::vector<std::string> args = {binary, "--port", "0", "--unixsocket", socket_,
                                     "--save", "", "--appendonly", "no", "--dir", dir,
                                     "--logfile", "", "--daemonize", "no"};
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_ = ::fork();
    if (pid_ == 0) {
      ::dup2(log_.write, 1);
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
    log_.close_write();
  }
  RedisServer(const RedisServer&) = delete;
  RedisServer& operator=(const RedisServer&) = delete;
  ~RedisServer() { stop(); }

  void stop() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }
  bool started() const { return pid_ > 0; }
  /// Waits for the log line Redis writes once it accepts connections on the socket ("The
  /// server is now ready to accept connections at PATH"); false at the deadline (or if it
  /// exited), with its log in the test's output.
  bool wait_ready(Clock::duration within = 10s) {
    bool ready =
        reader_.next_containing("ready to accept connections at " + socket_, Clock::now() + within)
            .has_value();
    if (!ready) UNSCOPED_INFO("redis-server said:\n" << reader_.transcript());
    return ready;
  }
  std::string address() const { return "unix:" + socket_; }

 private:
  std::string socket_;
  prefork_test::Pipe log_;
  prefork_test::LineReader reader_{log_.read};
  pid_t pid_ = -1;
};

redis::Options options_for(const RedisServer& server, std::string prefix = "test:") {
  redis::Options o;
  o.address = server.address();
  o.prefix = std::move(prefix);
  o.retry_interval = 0ms;  // reconnect at the next operation: once Redis is ready, it answers
  return o;
}

}  // namespace

TEST_CASE("redis::Store keeps the Store contract operation by operation", "[redis_store]") {
  auto binary = find_redis_server();
  if (!binary) {
    WARN("redis-server not found (apt-get install redis-server): skipped");
    return;
  }
  prefork_test::TempDir dir("prefork-redis");
  REQUIRE_FALSE(dir.path.empty());
  RedisServer server(*binary, dir.path);
  REQUIRE(server.started());
  REQUIRE(server.wait_ready());
  redis::Store s(options_for(server));
  using prefork::store_errc;

  SECTION("get, set and erase take any bytes, and a TTL expires the key") {
    const std::string value("a\0b\r\n", 5);
    CHECK_FALSE(s.get("k").has_value());
    CHECK_FALSE(s.set("k", value));
    CHECK(s.get("k") == value);
    CHECK(s.erase("k"));
    CHECK_FALSE(s.erase("k"));
    CHECK_FALSE(s.set("t", "v", 30ms));
    // The TTL is the stimulus here: Redis expires a key on access once its time has passed
    // (millisecond resolution), so 30 ms after the SET was answered, plus one tick, it is gone.
    std::this_thread::sleep_until(Clock::now() + 31ms);
    CHECK_FALSE(s.get("t").has_value());
  }

  SECTION("bad arguments change nothing") {
    CHECK(s.set(std::string(1025, 'k'), "v") == store_errc::key_too_long);
    CHECK(s.set("k", std::string(1024 * 1024 + 1, 'v')) == store_errc::value_too_long);
    CHECK(s.set("k", "v", -1ms) == store_errc::invalid_ttl);
    CHECK(s.increment("n", 1, -1ms).error == store_errc::invalid_ttl);
    CHECK_FALSE(s.get("k").has_value());
    CHECK_FALSE(s.get("n").has_value());
  }

  SECTION("increment counts from 0, keeps an existing key's expiry, and refuses overflow "
          "and text") {
    auto r = s.increment("n", 5, 60s);
    CHECK(r.ok());
    CHECK(r.value == 5);
    constexpr auto max = std::numeric_limits<std::int64_t>::max();
    r = s.increment("n", max - 5);
    CHECK(r.value == max);  // exact: not rounded through a double
    CHECK(s.get("n") == std::to_string(max));
    CHECK(s.increment("n", 1).error == store_errc::overflow);
    CHECK(s.get("n") == std::to_string(max));
    CHECK_FALSE(s.set("word", "ten"));
    CHECK(s.increment("word", 1).error == store_errc::not_a_number);
    CHECK(s.increment("fresh", -3).value == -3);
  }

  SECTION("compare_and_set writes only over the expected value, or only when absent") {
    CHECK_FALSE(s.compare_and_set("lock", std::nullopt, "me"));
    CHECK(s.compare_and_set("lock", std::nullopt, "you") == store_errc::conflict);
    CHECK(s.compare_and_set("lock", std::string_view("you"), "us") == store_errc::conflict);
    CHECK_FALSE(s.compare_and_set("lock", std::string_view("me"), "us", 60s));
    CHECK(s.get("lock") == "us");
    CHECK(s.compare_and_set("absent", std::string_view("x"), "y") == store_errc::conflict);
    CHECK_FALSE(s.get("absent").has_value());
  }

  SECTION("keys lists this store's keys by prefix, sorted, up to the limit, and nothing of "
          "another prefix") {
    redis::Store other(options_for(server, "other:"));
    CHECK_FALSE(other.set("sid:zz", "x"));
    for (const char* k : {"sid:c", "sid:a", "sid:b", "sid*?[", "user:1"}) CHECK_FALSE(s.set(k, "v"));
    CHECK(s.keys("sid:") == std::vector<std::string>{"sid:a", "sid:b", "sid:c"});
    CHECK(s.keys("sid:", 2) == std::vector<std::string>{"sid:a", "sid:b"});
    CHECK(s.keys("sid*") == std::vector<std::string>{"sid*?["});  // a glob character is itself
    CHECK(s.keys("", 0).empty());
    CHECK(s.keys("").size() == 5);
    CHECK(other.keys("") == std::vector<std::string>{"sid:zz"});
  }

  SECTION("apply(), as the master runs it, answers with the store's values and codes") {
    prefork::StoreRequest set{.op = prefork::StoreOp::set, .key = "k", .value = "v"};
    CHECK(prefork::apply(s, set).ok());
    prefork::StoreRequest get{.op = prefork::StoreOp::get, .key = "k"};
    CHECK(prefork::apply(s, get).value == "v");
    prefork::StoreRequest cas{.op = prefork::StoreOp::compare_and_set, .key = "k", .value = "w",
                              .expected = "x"};
    CHECK(prefork::apply(s, cas).error == store_errc::conflict);
  }
}

TEST_CASE("redis::Store fails with backend_error while Redis is gone and reconnects by itself",
          "[redis_store]") {
  auto binary = find_redis_server();
  if (!binary) {
    WARN("redis-server not found (apt-get install redis-server): skipped");
    return;
  }
  prefork_test::TempDir dir("prefork-redis");
  REQUIRE_FALSE(dir.path.empty());
  std::vector<std::string> states;
  std::optional<RedisServer> server;
  server.emplace(*binary, dir.path);
  redis::Options o = options_for(*server);
  o.on_state = [&states](const std::string& line) { states.push_back(line); };
  REQUIRE(server->wait_ready());
  redis::Store s(std::move(o));
  REQUIRE_FALSE(s.set("k", "v"));
  CHECK(s.connected());

  server->stop();
  prefork::StoreRequest get{.op = prefork::StoreOp::get, .key = "k"};
  prefork::StoreReply reply = prefork::apply(s, get);
  CHECK(reply.error == prefork::store_errc::backend_error);
  CHECK_THAT(reply.message, Catch::Contains(dir.path + "/redis.sock"));
  CHECK_FALSE(s.connected());
  CHECK_THROWS_AS(s.get("k"), redis::Error);

  server.emplace(*binary, dir.path);
  REQUIRE(server->wait_ready());  // no persistence: the new Redis starts empty
  CHECK_FALSE(s.get("k").has_value());
  CHECK_FALSE(s.set("k", "again"));
  CHECK(s.get("k") == "again");
  // Reported once per change, not per failed operation: up, down (maybe more than once while
  // it was never up), up again.
  auto starts = [](const char* p) { return [p](const std::string& l) { return l.starts_with(p); }; };
  auto up = std::find_if(states.begin(), states.end(), starts("connected to unix:"));
  REQUIRE(up != states.end());
  auto down = std::find_if(up, states.end(), starts("down: "));
  REQUIRE(down != states.end());
  CHECK(std::count_if(down, states.end(), starts("down: ")) == 1);
  CHECK(states.back().starts_with("connected to unix:"));
}
