// The JSON codec example (examples/json_codec): JsonCodec on its own (values round-trip,
// malformed bytes are an error value and never an exception), and the json_codec program as a
// user runs it: every worker acknowledges every count as a JSON object, then the master exits 0.
// Built only where nlohmann/json is installed, as the example is.
#include <catch2/catch.hpp>

#if __has_include(<nlohmann/json.hpp>)

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "harness.hpp"
#include "hello_process.hpp"
#include "json_codec/json_codec.hpp"

using namespace prefork_test;
using json = nlohmann::json;

namespace {

const std::string kJsonCodec = PREFORK_EXAMPLES_DIR "/json_codec";

/// Everything the program writes to stdout until it closes it.
std::vector<std::string> all_lines(HelloProcess& p) {
  std::vector<std::string> lines;
  auto deadline = Clock::now() + kDeadline;
  while (auto line = p.out().next(deadline)) lines.push_back(*line);
  return lines;
}

}  // namespace

TEST_CASE("JsonCodec decodes what it encodes", "[json_codec]") {
  JsonCodec codec;
  json value = GENERATE(values<json>({
      json{{"usersCount", 625}},
      json{{"usersCount", 2.3283064365386964e+22}, {"tags", {"a", "b"}}, {"ok", true}},
      json::array({1, -2, 3.5, nullptr, "x"}),
      json("caf\xc3\xa9"),
      json(nullptr),
      json::object(),
  }));
  std::string bytes = codec.encode(value);
  std::error_code ec = make_error_code(std::errc::io_error);
  auto back = codec.decode(bytes, ec);
  REQUIRE(back.has_value());
  CHECK_FALSE(ec);
  CHECK(*back == value);
}

TEST_CASE("JsonCodec turns malformed JSON into decode_failed without throwing", "[json_codec]") {
  JsonCodec codec;
  std::string bytes = GENERATE(values<std::string>({
      "",
      "{",
      "{\"usersCount\":}",
      "{\"usersCount\":625",
      "[1,2",
      "nul",
      "{\"a\":1} trailing",
      "{\"a\":1}{\"b\":2}",
      "\"\xff\xfe\"",        // not UTF-8
      std::string("{\"a\":\0}", 7),
      "{'a':1}",
      "[1,]",
      "1e99999",            // out of a double's range
      std::string(100000, '['),
  }));
  INFO("bytes: " << bytes.substr(0, 40));
  std::error_code ec;
  std::optional<json> m;
  CHECK_NOTHROW(m = codec.decode(bytes, ec));
  CHECK_FALSE(m.has_value());
  CHECK(ec == prefork::errc::decode_failed);
}

TEST_CASE("JsonCodec encodes a string that is not UTF-8 instead of throwing", "[json_codec]") {
  JsonCodec codec;
  std::string bytes;
  CHECK_NOTHROW(bytes = codec.encode(json{{"name", "bad \xff byte"}}));
  std::error_code ec;
  auto back = codec.decode(bytes, ec);
  REQUIRE(back.has_value());
  CHECK((*back)["name"] == "bad \xef\xbf\xbd byte");  // U+FFFD
}

TEST_CASE("json_codec: every worker acknowledges every count as JSON, then the master exits 0",
          "[json_codec]") {
  REQUIRE(::access(kJsonCodec.c_str(), X_OK) == 0);
  std::size_t fds_before = count_open_fds();
  {
    HelloProcess p(kJsonCodec, {"--workers", "3", "--rounds", "4"});
    REQUIRE(p.pid() > 0);
    auto status = p.wait(Clock::now() + kDeadline);
    std::vector<std::string> lines = all_lines(p);
    INFO(p.out().transcript() << p.err().transcript());
    REQUIRE(status.has_value());
    CHECK(WIFEXITED(*status));
    CHECK(WEXITSTATUS(*status) == 0);

    // Which pid each worker id had, from the workers' own lines.
    std::map<long, long> pid_of;
    std::set<std::string> seen(lines.begin(), lines.end());
    for (auto& line : lines)
      if (line.starts_with("Worker ") && line.find(" (pid ") != std::string::npos)
        pid_of[number_after(line, "Worker ")] = number_after(line.substr(line.find(" (pid ")), " (pid ");
    REQUIRE(pid_of.size() == 3);

    const std::vector<std::string> counts = {"25", "625", "390625", "152587890625"};
    for (auto& c : counts) {
      INFO("count " << c);
      CHECK(seen.count("Master sends {\"usersCount\":" + c + "}") == 1);
      for (auto [id, pid] : pid_of) {
        INFO("worker " << id);
        std::string who = std::to_string(id);
        CHECK(seen.count("Worker " + who + " (pid " + std::to_string(pid) + ") got {\"usersCount\":" + c + "}") == 1);
        CHECK(seen.count("Master got {\"ack\":" + c + ",\"pid\":" + std::to_string(pid) +
                         ",\"worker\":" + who + "} from worker " + who) == 1);
      }
    }
    REQUIRE_FALSE(lines.empty());
    CHECK(lines.back() == "Done: 4 rounds, 12 acknowledgements");
    CHECK(lines.size() == 1 + counts.size() * (1 + 2 * pid_of.size()) + 1);
    for (auto [id, pid] : pid_of) CHECK(process_gone(static_cast<pid_t>(pid)));
  }
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("json_codec rejects bad options with exit status 2", "[json_codec]") {
  REQUIRE(::access(kJsonCodec.c_str(), X_OK) == 0);
  std::vector<std::string> args = GENERATE(values<std::vector<std::string>>({
      {"--bogus"},
      {"--rounds", "9"},
      {"--rounds", "0"},
      {"--workers", "x"},
      {"--workers"},
  }));
  HelloProcess p(kJsonCodec, args);
  REQUIRE(p.pid() > 0);
  auto status = p.wait(Clock::now() + kDeadline);
  REQUIRE(status.has_value());
  CHECK(WIFEXITED(*status));
  CHECK(WEXITSTATUS(*status) == 2);
  auto why = p.err().next(Clock::now() + kDeadline);
  REQUIRE(why.has_value());
  CHECK(why->starts_with("json_codec: "));
}

#endif  // __has_include(<nlohmann/json.hpp>)
