// libFuzzer target for the built-in codecs' decode(): the same untrusted bytes go to every codec.
// Decoding must never crash or hit undefined behaviour (ASan, UBSan), must succeed exactly when
// the documented format says so, and a decoded value must survive encode() and decode() again.
#include "prefork/codec.hpp"

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <variant>
#include <vector>

#include "prefork/error.hpp"
#include "sample.hpp"

namespace {

[[noreturn]] void violated(const char* what, int line) {
  std::fprintf(stderr, "codec.fuzz:%d: invariant violated: %s\n", line, what);
  std::abort();
}
// A macro only for the condition's text and line: std::source_location needs Clang 15.
#define FUZZ_CHECK(cond)                    \
  do {                                      \
    if (!(cond)) violated(#cond, __LINE__); \
  } while (0)

using prefork_fuzz::kSamplePadding;
using prefork_fuzz::Sample;

bool same(const Sample& x, const Sample& y) {
  return x.a == y.a && x.b == y.b && x.c == y.c && x.d == y.d &&
         std::bit_cast<std::uint64_t>(x.e) == std::bit_cast<std::uint64_t>(y.e);
}
template <class T>
bool same(const T& x, const T& y) {
  return x == y;
}
template <class... Ts>
bool same(const std::variant<Ts...>& x, const std::variant<Ts...>& y) {
  // By index, not by type: VariantCodec keeps a repeated type's alternatives apart.
  return x.index() == y.index() && [&]<std::size_t... Is>(std::index_sequence<Is...>) {
    return ((x.index() == Is && same(std::get<Is>(x), std::get<Is>(y))) || ...);
  }(std::index_sequence_for<Ts...>{});
}

// A stale error that decode() must overwrite either way.
std::error_code stale() { return std::make_error_code(std::errc::io_error); }

// Decodes `bytes`; checks the result against `should_decode` and the error contract; on
// success checks that encode() gives bytes that decode to the same value, and returns them.
template <class Codec>
std::optional<std::string> round_trip(std::string_view bytes, bool should_decode) {
  const Codec codec{};
  std::error_code ec = stale();
  const std::optional<typename Codec::message_type> value = codec.decode(bytes, ec);
  if (!value) {
    FUZZ_CHECK(!should_decode);
    FUZZ_CHECK(ec == prefork::errc::decode_failed);
    return std::nullopt;
  }
  FUZZ_CHECK(should_decode);
  FUZZ_CHECK(!ec);
  std::string encoded = codec.encode(*value);
  ec = stale();
  const auto again = codec.decode(encoded, ec);
  FUZZ_CHECK(again.has_value());
  FUZZ_CHECK(!ec);
  FUZZ_CHECK(same(*again, *value));
  return encoded;
}

std::uint32_t index_of(std::string_view bytes) {
  std::uint32_t v = 0;
  for (int i = 0; i < 4; ++i)
    v |= std::uint32_t{static_cast<unsigned char>(bytes[static_cast<std::size_t>(i)])} << (8 * i);
  return v;
}

// Equal except at the POD's padding byte, which encode() copies from an indeterminate value.
bool equal_but_padding(std::string_view x, std::string_view y, std::size_t padding_at) {
  return x.size() == y.size() && x.substr(0, padding_at) == y.substr(0, padding_at) &&
         x.substr(padding_at + 1) == y.substr(padding_at + 1);
}

bool is_bool(char c) { return c == 0 || c == 1; }

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // Its own allocation of exactly `size` bytes (libFuzzer's is too): ASan catches a read past
  // the end, and a decoder that kept a view into the input would read freed memory below.
  std::string owned(reinterpret_cast<const char*>(data), size);
  const std::string_view bytes(owned);

  // Every byte string is a message, unchanged.
  if (auto out = round_trip<prefork::StringCodec>(bytes, true)) FUZZ_CHECK(*out == bytes);
  if (auto out = round_trip<prefork::BytesCodec>(bytes, true)) FUZZ_CHECK(*out == bytes);

  // Exactly sizeof(T) bytes; for bool, 0 or 1.
  if (auto out = round_trip<prefork::PodCodec<Sample>>(bytes, size == sizeof(Sample)))
    FUZZ_CHECK(equal_but_padding(*out, bytes, kSamplePadding));
  if (auto out = round_trip<prefork::PodCodec<bool>>(bytes, size == 1 && is_bool(bytes[0])))
    FUZZ_CHECK(*out == bytes);

  // A 4-byte little-endian index, then the alternative: a string takes the rest, a POD exactly
  // its size.
  {
    using Codec = prefork_fuzz::SampleVariantCodec;
    const std::uint32_t index = size >= 4 ? index_of(bytes) : 3;
    const std::size_t rest = size >= 4 ? size - 4 : 0;
    const bool ok = size >= 4 && (index == 0   ? rest == sizeof(int)
                                  : index == 1 ? true
                                  : index == 2 ? rest == sizeof(Sample)
                                               : false);
    if (auto out = round_trip<Codec>(bytes, ok)) {
      if (index == 2)
        FUZZ_CHECK(equal_but_padding(*out, bytes, 4 + kSamplePadding));
      else
        FUZZ_CHECK(*out == bytes);
    }
  }
  {
    using Codec = prefork_fuzz::OtherVariantCodec;
    const std::uint32_t index = size >= 4 ? index_of(bytes) : 4;
    const std::size_t rest = size >= 4 ? size - 4 : 0;
    const bool ok = size >= 4 && (index == 0   ? rest == 1 && is_bool(bytes[4])
                                  : index == 1 ? true
                                  : index == 2 ? rest == 2
                                  : index == 3 ? true
                                               : false);
    if (auto out = round_trip<Codec>(bytes, ok)) FUZZ_CHECK(*out == bytes);
  }
  return 0;
}
