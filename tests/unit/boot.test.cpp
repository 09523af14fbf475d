#include "prefork/detail/boot.hpp"

#include <catch2/catch.hpp>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>

using prefork::detail::decode_boot;
using prefork::detail::decode_counters;
using prefork::detail::encode_boot;
using prefork::detail::encode_counters;
using prefork::detail::WorkerBoot;
using prefork::detail::WorkerCounters;

namespace {

// Every field different from its default and from every other field, so that a swap shows.
WorkerBoot sample_boot() {
  WorkerBoot b;
  b.id = 7;
  b.slot = 3;
  b.channel_fd = 11;
  b.limits.max_message_size = 1u << 20;
  b.limits.max_queued_bytes = 1u << 22;
  b.heartbeat_ms = 250;
  b.max_connections = 1000;
  b.max_requests = 5000;
  return b;
}

void check_same(const WorkerBoot& a, const WorkerBoot& b) {
  CHECK(a.id == b.id);
  CHECK(a.slot == b.slot);
  CHECK(a.channel_fd == b.channel_fd);
  CHECK(a.limits.max_message_size == b.limits.max_message_size);
  CHECK(a.limits.max_queued_bytes == b.limits.max_queued_bytes);
  CHECK(a.heartbeat_ms == b.heartbeat_ms);
  CHECK(a.max_connections == b.max_connections);
  CHECK(a.max_requests == b.max_requests);
}

}  // namespace

TEST_CASE("encode_boot writes the fields in declaration order, comma-separated", "[boot]") {
  CHECK(encode_boot(sample_boot()) == "7,3,11,1048576,4194304,250,1000,5000");
}

TEST_CASE("decode_boot reads back every field encode_boot wrote", "[boot]") {
  SECTION("ordinary values") {
    const WorkerBoot b = sample_boot();
    std::optional<WorkerBoot> back = decode_boot(encode_boot(b));
    REQUIRE(back);
    check_same(*back, b);
  }
  SECTION("the largest value of every field") {
    WorkerBoot b;
    b.id = std::numeric_limits<unsigned>::max();
    b.slot = std::numeric_limits<std::size_t>::max();
    b.channel_fd = std::numeric_limits<int>::max();
    b.limits.max_message_size = std::numeric_limits<std::size_t>::max();
    b.limits.max_queued_bytes = std::numeric_limits<std::size_t>::max();
    b.heartbeat_ms = std::numeric_limits<std::uint64_t>::max();
    b.max_connections = std::numeric_limits<std::uint64_t>::max();
    b.max_requests = std::numeric_limits<std::uint64_t>::max();
    std::optional<WorkerBoot> back = decode_boot(encode_boot(b));
    REQUIRE(back);
    check_same(*back, b);
  }
  SECTION("zeros, as a worker without watchdog or recycling gets them") {
    WorkerBoot b;
    b.channel_fd = 0;
    b.limits = {0, 0};
    std::optional<WorkerBoot> back = decode_boot(encode_boot(b));
    REQUIRE(back);
    check_same(*back, b);
  }
}

TEST_CASE("decode_boot rejects an empty value", "[boot]") {
  CHECK_FALSE(decode_boot(""));
  CHECK_FALSE(decode_boot(","));
  CHECK_FALSE(decode_boot(",,,,,,,"));
}

TEST_CASE("decode_boot rejects a value with a field missing", "[boot]") {
  CHECK_FALSE(decode_boot("7,3,11,1048576,4194304,250,1000"));
  CHECK_FALSE(decode_boot("7,3,11,1048576,4194304,250,1000,"));
  CHECK_FALSE(decode_boot("7,3,11,1048576,,250,1000,5000"));
  CHECK_FALSE(decode_boot("7"));
}

TEST_CASE("decode_boot rejects a value with an extra field", "[boot]") {
  CHECK_FALSE(decode_boot("7,3,11,1048576,4194304,250,1000,5000,1"));
  CHECK_FALSE(decode_boot("7,3,11,1048576,4194304,250,1000,5000,"));
  CHECK_FALSE(decode_boot("7,3,11,1048576,4194304,250,1000,5000,,"));
}

TEST_CASE("decode_boot rejects a field that is not a whole decimal number", "[boot]") {
  for (const char* bad : {"x,3,11,1048576,4194304,250,1000,5000",
                          "7,3,11,1048576,4194304,250,1000,5000x",
                          "7,3a,11,1048576,4194304,250,1000,5000",
                          "7, 3,11,1048576,4194304,250,1000,5000",
                          "7,3,11 ,1048576,4194304,250,1000,5000",
                          "+7,3,11,1048576,4194304,250,1000,5000",
                          "-7,3,11,1048576,4194304,250,1000,5000",
                          "7,3,11,1.5,4194304,250,1000,5000",
                          "7,3,0x11,1048576,4194304,250,1000,5000",
                          "7;3;11;1048576;4194304;250;1000;5000"}) {
    CAPTURE(bad);
    CHECK_FALSE(decode_boot(bad));
  }
}

TEST_CASE("decode_boot rejects a number too large for its field", "[boot]") {
  // id is unsigned (32 bits), channel_fd an int, the rest 64 bits.
  CHECK_FALSE(decode_boot("4294967296,3,11,1048576,4194304,250,1000,5000"));
  CHECK_FALSE(decode_boot("7,3,2147483648,1048576,4194304,250,1000,5000"));
  CHECK_FALSE(decode_boot("7,3,11,1048576,4194304,250,1000,18446744073709551616"));
  CHECK_FALSE(decode_boot("7,18446744073709551616,11,1048576,4194304,250,1000,5000"));
  CHECK(decode_boot("4294967295,3,2147483647,1048576,4194304,250,1000,18446744073709551615"));
}

TEST_CASE("decode_counters reads back what encode_counters wrote", "[boot]") {
  const WorkerCounters sent{123456789012345ull, std::numeric_limits<std::uint64_t>::max()};
  const std::string payload = encode_counters(sent);
  CHECK(payload.size() == 16);
  WorkerCounters got;
  REQUIRE(decode_counters(payload, got));
  CHECK(got.connections_total == sent.connections_total);
  CHECK(got.requests == sent.requests);
}

TEST_CASE("decode_counters rejects a payload of the wrong size and leaves the counters alone",
          "[boot]") {
  const std::string payload = encode_counters({5, 6});
  for (const std::string& bad : {std::string(), payload.substr(0, 15), payload + '\0',
                                 payload + payload}) {
    CAPTURE(bad.size());
    WorkerCounters c{1, 2};
    CHECK_FALSE(decode_counters(bad, c));
    CHECK(c.connections_total == 1);
    CHECK(c.requests == 2);
  }
}
