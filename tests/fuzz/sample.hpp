// The message types codec.fuzz.cpp fuzzes, shared with make_corpus.cpp, which writes seeds
// encoded with the same codecs.
#ifndef PREFORK_TESTS_FUZZ_SAMPLE_HPP
#define PREFORK_TESTS_FUZZ_SAMPLE_HPP

#include <cstddef>
#include <cstdint>
#include <string>

#include "prefork/codec.hpp"

namespace prefork_fuzz {

// A POD with a padding byte (after c) and a double, whose NaNs compare unequal to themselves,
// so the fuzzer compares values member by member and the double by its bits.
struct Sample {
  std::uint32_t a;
  std::uint16_t b;
  std::uint8_t c;
  std::int64_t d;
  double e;
};
static_assert(sizeof(Sample) == 24 && offsetof(Sample, d) == 8, "one padding byte, at offset 7");
inline constexpr std::size_t kSamplePadding = 7;

using SampleVariantCodec = prefork::VariantCodec<int, std::string, Sample>;
// bool as an alternative (the decoder checks its byte), and a repeated type kept apart by index.
using OtherVariantCodec = prefork::VariantCodec<bool, std::string, std::uint16_t, std::string>;

}  // namespace prefork_fuzz

#endif  // PREFORK_TESTS_FUZZ_SAMPLE_HPP
