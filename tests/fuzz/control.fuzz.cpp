// libFuzzer target for the control socket's JSON (include/prefork/detail/json.hpp): every
// request line a client sends goes through parse_flat_object, and every text the master puts in
// a reply through json_quote. The whole input is both:
//   - a request: parse_flat_object must not crash; an accepted object has at most 64 fields,
//     and writing it back (keys and strings through json_quote, other scalars as their
//     literal) must parse again to the same fields, which also proves the decoded strings are
//     well-formed UTF-8 (json_quote would otherwise have replaced a byte);
//   - a text: {"k":json_quote(input)} must parse, and give the input back when it is
//     well-formed UTF-8.
// Seeds: tests/fuzz/corpus/control/, written by fuzz.make_corpus.
#include "prefork/detail/json.hpp"

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

namespace {

[[noreturn]] void violated(const char* what, int line) {
  std::fprintf(stderr, "control.fuzz:%d: invariant violated: %s\n", line, what);
  std::abort();
}
// A macro only for the condition's text and line: std::source_location needs Clang 15.
#define FUZZ_CHECK(cond)                    \
  do {                                      \
    if (!(cond)) violated(#cond, __LINE__); \
  } while (0)

using prefork::detail::json_quote;
using prefork::detail::JsonFields;
using prefork::detail::JsonScalar;
using prefork::detail::parse_flat_object;

bool well_formed_utf8(std::string_view s) {
  for (std::size_t i = 0; i < s.size();) {
    std::size_t n = prefork::detail::utf8_sequence(s, i);
    if (n == 0) return false;
    i += n;
  }
  return true;
}

bool same(const JsonFields& a, const JsonFields& b) {
  if (a.size() != b.size()) return false;
  for (auto ia = a.begin(), ib = b.begin(); ia != a.end(); ++ia, ++ib)
    if (ia->first != ib->first || ia->second.type != ib->second.type ||
        ia->second.text != ib->second.text)
      return false;
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // Its own allocation of exactly `size` bytes: ASan catches a read past the end.
  const std::string owned(reinterpret_cast<const char*>(data), size);
  const std::string_view bytes(owned);

  JsonFields fields;
  std::string error;
  if (parse_flat_object(bytes, fields, error)) {
    FUZZ_CHECK(error.empty());
    FUZZ_CHECK(fields.size() <= prefork::detail::kMaxJsonFields);
    std::string again = "{";
    for (const auto& [key, value] : fields) {
      if (again.size() > 1) again += ',';
      again += json_quote(key) + ":";
      again += value.type == JsonScalar::Type::string ? json_quote(value.text) : value.text;
    }
    again += "}";
    JsonFields reparsed;
    FUZZ_CHECK(parse_flat_object(again, reparsed, error));
    FUZZ_CHECK(same(fields, reparsed));
  } else {
    FUZZ_CHECK(error.find(" at offset ") != std::string::npos);
  }

  const std::string quoted = json_quote(bytes);
  FUZZ_CHECK(well_formed_utf8(quoted));
  JsonFields one;
  FUZZ_CHECK(parse_flat_object("{\"k\":" + quoted + "}", one, error));
  FUZZ_CHECK(one.size() == 1 && one.begin()->second.type == JsonScalar::Type::string);
  if (well_formed_utf8(bytes)) FUZZ_CHECK(one.begin()->second.text == bytes);
  return 0;
}
