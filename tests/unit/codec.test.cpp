// Unit tests for prefork/codec.hpp: round-trips of every built-in codec, rejection of malformed
// input with errc::decode_failed, the MessageCodec concept, and a deterministic fuzz loop that
// CI runs under ASan/UBSan to show decoders have no undefined behaviour on arbitrary bytes.
#include "prefork/codec.hpp"

#include <catch2/catch.hpp>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

namespace {

using prefork::BytesCodec;
using prefork::errc;
using prefork::PodCodec;
using prefork::StringCodec;
using prefork::VariantCodec;

// A struct without padding, so every byte string of its size is a distinct valid value and a
// decoded value re-encodes to the same bytes.
struct Sample {
  std::int32_t id;
  std::uint16_t kind;
  std::uint16_t flags;
  std::uint64_t stamp;
};
static_assert(std::has_unique_object_representations_v<Sample>);

bool operator==(const Sample& a, const Sample& b) {
  return a.id == b.id && a.kind == b.kind && a.flags == b.flags && a.stamp == b.stamp;
}

// Trivially copyable but not default-constructible: PodCodec must not need T{}.
struct NoDefault {
  explicit NoDefault(std::int32_t v) : value(v) {}
  std::int32_t value;
};
static_assert(std::is_trivially_copyable_v<NoDefault>);
static_assert(!std::is_default_constructible_v<NoDefault>);

std::string bytes_of(std::initializer_list<unsigned> values) {
  std::string out;
  for (unsigned v : values) out.push_back(static_cast<char>(static_cast<unsigned char>(v)));
  return out;
}

std::string all_byte_values() {
  std::string out;
  for (unsigned v = 0; v < 256; ++v) out.push_back(static_cast<char>(static_cast<unsigned char>(v)));
  return out;
}

// A codec written the way a user would: "key=value", split at the first '='.
struct KeyValueCodec {
  using message_type = std::pair<std::string, std::string>;

  std::string encode(const message_type& m) const { return m.first + '=' + m.second; }

  std::optional<message_type> decode(std::string_view bytes, std::error_code& ec) const {
    auto eq = bytes.find('=');
    if (eq == std::string_view::npos) {
      ec = errc::decode_failed;
      return std::nullopt;
    }
    ec.clear();
    return message_type{std::string(bytes.substr(0, eq)), std::string(bytes.substr(eq + 1))};
  }
};

// Misuses the concept must reject.
struct NoMessageType {
  std::string encode(const std::string& m) const { return m; }
  std::optional<std::string> decode(std::string_view, std::error_code&) const { return {}; }
};
struct NoDecode {
  using message_type = std::string;
  std::string encode(const message_type& m) const { return m; }
};
struct NoEncode {
  using message_type = std::string;
  std::optional<message_type> decode(std::string_view, std::error_code&) const { return {}; }
};
struct DecodeReturnsWrongType {
  using message_type = std::string;
  std::string encode(const message_type& m) const { return m; }
  std::string decode(std::string_view b, std::error_code&) const { return std::string(b); }
};
struct NonConstEncode {
  using message_type = std::string;
  std::string encode(const message_type& m) { return m; }
  std::optional<message_type> decode(std::string_view, std::error_code&) const { return {}; }
};
struct NotDefaultConstructible {
  using message_type = std::string;
  explicit NotDefaultConstructible(int) {}
  std::string encode(const message_type& m) const { return m; }
  std::optional<message_type> decode(std::string_view, std::error_code&) const { return {}; }
};

static_assert(prefork::MessageCodec<KeyValueCodec>);
static_assert(!prefork::MessageCodec<int>);
static_assert(!prefork::HasMessageType<int>);
static_assert(!prefork::MessageCodec<NoMessageType>);
static_assert(!prefork::HasMessageType<NoMessageType>);
static_assert(!prefork::MessageCodec<NoDecode>);
static_assert(prefork::EncodesMessage<NoDecode> && !prefork::DecodesMessage<NoDecode>);
static_assert(!prefork::MessageCodec<NoEncode>);
static_assert(!prefork::EncodesMessage<NoEncode> && prefork::DecodesMessage<NoEncode>);
static_assert(!prefork::MessageCodec<DecodeReturnsWrongType>);
static_assert(!prefork::DecodesMessage<DecodeReturnsWrongType>);
static_assert(!prefork::MessageCodec<NonConstEncode>);
static_assert(!prefork::EncodesMessage<NonConstEncode>);
static_assert(!prefork::MessageCodec<NotDefaultConstructible>);

// Every built-in codec.
static_assert(prefork::MessageCodec<StringCodec>);
static_assert(prefork::MessageCodec<BytesCodec>);
static_assert(prefork::MessageCodec<PodCodec<Sample>>);
static_assert(prefork::MessageCodec<PodCodec<NoDefault>>);
static_assert(prefork::MessageCodec<VariantCodec<std::string>>);
static_assert(prefork::MessageCodec<VariantCodec<std::string, int, int, bool, Sample>>);

// Constraints on the built-in templates.
template <class T>
concept PodCodecAccepts = requires { typename PodCodec<T>; };
static_assert(PodCodecAccepts<int>);
static_assert(PodCodecAccepts<Sample>);
static_assert(!PodCodecAccepts<int*>);
static_assert(!PodCodecAccepts<std::string>);
static_assert(!PodCodecAccepts<std::vector<int>>);

template <class... Ts>
concept VariantCodecAccepts = requires { typename VariantCodec<Ts...>; };
static_assert(VariantCodecAccepts<std::string, int>);
static_assert(VariantCodecAccepts<int, int>);
static_assert(!VariantCodecAccepts<>);
static_assert(!VariantCodecAccepts<int, std::vector<int>>);
static_assert(!VariantCodecAccepts<const char*>);

// Stateless: storable with [[no_unique_address]] at no cost.
template <class C>
struct Holder {
  [[no_unique_address]] C codec;
  int other;
};
static_assert(std::is_empty_v<StringCodec> && sizeof(Holder<StringCodec>) == sizeof(int));
static_assert(std::is_empty_v<BytesCodec> && sizeof(Holder<BytesCodec>) == sizeof(int));
static_assert(std::is_empty_v<PodCodec<Sample>> && sizeof(Holder<PodCodec<Sample>>) == sizeof(int));
static_assert(std::is_empty_v<VariantCodec<std::string, int>> &&
              sizeof(Holder<VariantCodec<std::string, int>>) == sizeof(int));

template <class C>
std::optional<typename C::message_type> round_trip(const typename C::message_type& m) {
  C codec;
  std::error_code ec = errc::channel_closed;  // decode must clear a stale error on success
  auto out = codec.decode(codec.encode(m), ec);
  REQUIRE(out.has_value());
  REQUIRE(!ec);
  return out;
}

template <class C>
void require_rejected(std::string_view bytes) {
  C codec;
  std::error_code ec;
  auto out = codec.decode(bytes, ec);
  REQUIRE_FALSE(out.has_value());
  REQUIRE(ec == errc::decode_failed);
}

}  // namespace

TEST_CASE("StringCodec round-trips empty, binary and text messages unchanged", "[codec]") {
  for (const std::string& m : {std::string(), std::string("hello"), std::string("a\0b\0", 4),
                               std::string(1, '\0'), all_byte_values()}) {
    REQUIRE(StringCodec{}.encode(m) == m);
    REQUIRE(*round_trip<StringCodec>(m) == m);
  }
}

TEST_CASE("StringCodec round-trips a 64 MiB message", "[codec]") {
  std::string big(std::size_t{64} << 20, '\0');
  for (std::size_t i = 0; i < big.size(); i += 4093) big[i] = static_cast<char>(i & 0xFF);
  REQUIRE(*round_trip<StringCodec>(big) == big);
}

TEST_CASE("BytesCodec round-trips empty and binary byte vectors unchanged", "[codec]") {
  REQUIRE(BytesCodec{}.encode({}).empty());
  REQUIRE(round_trip<BytesCodec>({})->empty());

  std::vector<std::byte> bytes;
  for (unsigned v = 0; v < 256; ++v) bytes.push_back(static_cast<std::byte>(v));
  bytes.push_back(std::byte{0});
  REQUIRE(BytesCodec{}.encode(bytes) == all_byte_values() + std::string(1, '\0'));
  REQUIRE(*round_trip<BytesCodec>(bytes) == bytes);
}

TEST_CASE("PodCodec round-trips a struct as exactly sizeof(T) bytes", "[codec]") {
  Sample s{-7, 3, 0xFFFF, 0x0102030405060708u};
  REQUIRE(PodCodec<Sample>{}.encode(s).size() == sizeof(Sample));
  REQUIRE(*round_trip<PodCodec<Sample>>(s) == s);
  REQUIRE(*round_trip<PodCodec<int>>(0) == 0);
  REQUIRE(*round_trip<PodCodec<int>>(-1) == -1);
  REQUIRE(*round_trip<PodCodec<double>>(2.5) == 2.5);
  REQUIRE(*round_trip<PodCodec<bool>>(true) == true);
  REQUIRE(*round_trip<PodCodec<bool>>(false) == false);
}

TEST_CASE("PodCodec decodes a type that has no default constructor", "[codec]") {
  REQUIRE(round_trip<PodCodec<NoDefault>>(NoDefault{42})->value == 42);
}

TEST_CASE("PodCodec rejects input shorter or longer than sizeof(T)", "[codec]") {
  std::string good = PodCodec<Sample>{}.encode(Sample{1, 2, 3, 4});
  require_rejected<PodCodec<Sample>>("");
  require_rejected<PodCodec<Sample>>(std::string_view(good).substr(0, sizeof(Sample) - 1));
  require_rejected<PodCodec<Sample>>(good + '\0');
  require_rejected<PodCodec<int>>(std::string(sizeof(int) * 2, '\0'));
}

TEST_CASE("PodCodec<bool> rejects a byte that is neither 0 nor 1", "[codec]") {
  require_rejected<PodCodec<bool>>(bytes_of({2}));
  require_rejected<PodCodec<bool>>(bytes_of({0xFF}));
}

TEST_CASE("VariantCodec round-trips each alternative", "[codec]") {
  using Codec = VariantCodec<std::string, std::int32_t, Sample, bool>;
  using M = Codec::message_type;
  for (const M& m : {M(std::string()), M(std::string("a\0b", 3)), M(all_byte_values()),
                     M(std::int32_t{-5}), M(Sample{9, 8, 7, 6}), M(true), M(false)}) {
    REQUIRE(*round_trip<Codec>(m) == m);
  }
}

TEST_CASE("VariantCodec round-trips a 64 MiB string alternative", "[codec]") {
  using Codec = VariantCodec<int, std::string>;
  Codec::message_type m(std::string(std::size_t{64} << 20, 'x'));
  REQUIRE(*round_trip<Codec>(m) == m);
}

TEST_CASE("VariantCodec keeps repeated types apart by index", "[codec]") {
  using Codec = VariantCodec<int, int, std::string, std::string>;
  using M = Codec::message_type;
  for (std::size_t i : {0u, 1u}) {
    M m = i == 0 ? M(std::in_place_index<0>, 11) : M(std::in_place_index<1>, 11);
    auto out = round_trip<Codec>(m);
    REQUIRE(out->index() == i);
    REQUIRE(*out == m);
  }
  auto out = round_trip<Codec>(M(std::in_place_index<3>, "s"));
  REQUIRE(out->index() == 3);
  REQUIRE(std::get<3>(*out) == "s");
}

TEST_CASE("VariantCodec writes the index as 4 little-endian bytes before the payload", "[codec]") {
  using Codec = VariantCodec<int, int, int, std::string>;
  REQUIRE(Codec{}.encode(Codec::message_type(std::in_place_index<3>, "hi")) ==
          bytes_of({3, 0, 0, 0}) + "hi");
  REQUIRE(Codec{}.encode(Codec::message_type(std::in_place_index<0>, 0)) ==
          bytes_of({0, 0, 0, 0}) + std::string(sizeof(int), '\0'));
}

TEST_CASE("VariantCodec rejects an index that names no alternative", "[codec]") {
  using Codec = VariantCodec<std::string, int>;
  require_rejected<Codec>(bytes_of({2, 0, 0, 0}) + "payload");
  // Every header byte counts: index 256 and 2^24 + 1 are not 0 or 1.
  require_rejected<Codec>(bytes_of({0, 1, 0, 0}) + "payload");
  require_rejected<Codec>(bytes_of({1, 0, 0, 1}) + std::string(sizeof(int), '\0'));
  require_rejected<Codec>(bytes_of({0xFF, 0xFF, 0xFF, 0xFF}));
}

TEST_CASE("VariantCodec rejects input shorter than its 4-byte header", "[codec]") {
  using Codec = VariantCodec<std::string>;
  for (std::size_t n = 0; n < 4; ++n) require_rejected<Codec>(std::string(n, '\0'));
  // The header alone is a complete message for a string alternative: the empty string.
  REQUIRE(round_trip<Codec>(Codec::message_type(std::string()))->index() == 0);
}

TEST_CASE("VariantCodec rejects a POD alternative whose payload is not sizeof(T) bytes", "[codec]") {
  using Codec = VariantCodec<std::string, Sample, bool>;
  std::string header = bytes_of({1, 0, 0, 0});
  require_rejected<Codec>(header);
  require_rejected<Codec>(header + std::string(sizeof(Sample) - 1, '\0'));
  require_rejected<Codec>(header + std::string(sizeof(Sample) + 1, '\0'));
  require_rejected<Codec>(bytes_of({2, 0, 0, 0, 2}));
}

TEST_CASE("VariantCodec encoding a valueless variant throws bad_variant_access", "[codec]") {
  // libstdc++ never leaves a variant valueless when the new alternative is a string or a small
  // trivially copyable type (it builds a temporary first); a large one is destroyed first.
  struct Big {
    char data[512];
  };
  struct Throws {
    operator Big() const { throw 1; }
  };
  using Codec = VariantCodec<std::string, Big>;
  Codec::message_type m(std::string("x"));
  try {
    m.emplace<1>(Throws{});
  } catch (int) {
  }
  REQUIRE(m.valueless_by_exception());
  const Codec codec;
  REQUIRE_THROWS_AS(codec.encode(m), std::bad_variant_access);
}

TEST_CASE("A user-written key=value codec satisfies MessageCodec and reports decode_failed",
          "[codec]") {
  KeyValueCodec::message_type m{"user", "a=b"};
  REQUIRE(KeyValueCodec{}.encode(m) == "user=a=b");
  REQUIRE(*round_trip<KeyValueCodec>(m) == m);
  require_rejected<KeyValueCodec>("no separator");
}

namespace {

// Feeds bytes to C's decoder: it must either fail with decode_failed, or succeed with a value
// that encodes back to exactly the same bytes (so no input is silently misread).
template <class C>
void check_decoder(std::string_view bytes) {
  C codec;
  std::error_code ec;
  auto out = codec.decode(bytes, ec);
  if (out) {
    REQUIRE(!ec);
    REQUIRE(codec.encode(*out) == bytes);
  } else {
    REQUIRE(ec == errc::decode_failed);
  }
}

}  // namespace

TEST_CASE("Every decoder either rejects or exactly re-encodes 100k random byte strings",
          "[codec][fuzz]") {
  using Variant = VariantCodec<std::string, std::int32_t, std::int32_t, bool, Sample, std::uint8_t>;
  // mt19937's output sequence is fixed by the standard (unlike the distributions), so the
  // inputs are the same with every standard library.
  std::mt19937 rng(20240611u);
  std::string bytes;
  for (int i = 0; i < 100000; ++i) {
    bytes.resize(rng() % 65);
    for (char& c : bytes) c = static_cast<char>(static_cast<unsigned char>(rng() & 0xFF));
    // Random headers almost never name an alternative; give half the inputs a plausible one
    // so the per-alternative decoders are exercised too.
    if (bytes.size() >= 4 && (rng() & 1)) {
      bytes[0] = static_cast<char>(rng() % 7);  // 6 alternatives, plus one out of range
      bytes[1] = bytes[2] = bytes[3] = '\0';
    }
    check_decoder<StringCodec>(bytes);
    check_decoder<BytesCodec>(bytes);
    check_decoder<PodCodec<std::int32_t>>(bytes);
    check_decoder<PodCodec<bool>>(bytes);
    check_decoder<PodCodec<std::uint8_t>>(bytes);
    check_decoder<PodCodec<Sample>>(bytes);
    check_decoder<Variant>(bytes);
    check_decoder<KeyValueCodec>(bytes);
  }
}
