// The control socket's JSON subset (include/prefork/detail/json.hpp): json_quote on any bytes,
// and parse_flat_object on flat objects of scalars and on everything else, with the offset of
// the error.
#include <catch2/catch.hpp>

#include <string>
#include <string_view>
#include <vector>

#include <prefork/detail/json.hpp>

using prefork::detail::JsonFields;
using prefork::detail::JsonScalar;

TEST_CASE("json_quote escapes quotes, backslashes and control characters", "[control]") {
  using prefork::detail::json_quote;
  CHECK(json_quote("") == R"("")");
  CHECK(json_quote("plain text") == R"("plain text")");
  CHECK(json_quote("a\"b\\c") == R"("a\"b\\c")");
  CHECK(json_quote(std::string_view("\n\t\x01\x1f\0", 5)) == R"("\u000a\u0009\u0001\u001f\u0000")");
  CHECK(json_quote("\x7f") == "\"\x7f\"");
}

TEST_CASE("json_quote passes UTF-8 through and replaces invalid bytes by U+FFFD", "[control]") {
  using prefork::detail::json_quote;
  CHECK(json_quote("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80") ==
        "\"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\"");
  CHECK(json_quote("\xff") == R"("\ufffd")");
  CHECK(json_quote("a\xc3") == R"("a\ufffd")");                    // truncated sequence
  CHECK(json_quote("\xc0\xaf") == R"("\ufffd\ufffd")");            // overlong '/'
  CHECK(json_quote("\xed\xa0\x80") == R"("\ufffd\ufffd\ufffd")");  // a UTF-16 surrogate
  CHECK(json_quote("\xf4\x90\x80\x80") == R"("\ufffd\ufffd\ufffd\ufffd")");  // above U+10FFFF
  // Whatever the bytes, the result parses back as a JSON string.
  std::string all;
  for (int b = 0; b < 256; ++b) all += static_cast<char>(b);
  JsonFields fields;
  std::string error;
  REQUIRE(prefork::detail::parse_flat_object("{\"k\":" + json_quote(all) + "}", fields, error));
  CHECK(fields.at("k").text.substr(0, 128) == all.substr(0, 128));
}

TEST_CASE("parse_flat_object accepts flat objects of scalars", "[control]") {
  using T = JsonScalar::Type;
  struct Case {
    std::string_view text;
    std::string_view key;
    T type;
    std::string_view value;
  };
  for (const Case& c : std::vector<Case>{
           {R"({"command":"status"})", "command", T::string, "status"},
           {" \t\r\n{ \"a\" : 1 } \n", "a", T::number, "1"},
           {R"({"a":-0.5e+10})", "a", T::number, "-0.5e+10"},
           {R"({"a":0})", "a", T::number, "0"},
           {R"({"a":true,"b":2})", "a", T::boolean, "true"},
           {R"({"a":false})", "a", T::boolean, "false"},
           {R"({"a":null})", "a", T::null, "null"},
           {R"({"a":"q\"\\\/\b\f\n\r\t"})", "a", T::string, "q\"\\/\b\f\n\r\t"},
           {R"({"a":"\u00e9\u20ac\ud83d\ude00"})", "a", T::string, "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80"},
           {"{\"a\":\"\xc3\xa9\"}", "a", T::string, "\xc3\xa9"},
           {R"({"a":"\u0000"})", "a", T::string, std::string_view("\0", 1)},
           {R"({"\u0061":"key escaped"})", "a", T::string, "key escaped"},
       }) {
    CAPTURE(c.text);
    JsonFields fields;
    std::string error;
    REQUIRE(prefork::detail::parse_flat_object(c.text, fields, error));
    CHECK(error.empty());
    REQUIRE(fields.count(c.key) == 1);
    CHECK(fields.at(std::string(c.key)).type == c.type);
    CHECK(fields.at(std::string(c.key)).text == c.value);
  }
  JsonFields fields;
  std::string error;
  CHECK(prefork::detail::parse_flat_object("{}", fields, error));
  CHECK(fields.empty());
  std::string sixty_four = "{";
  for (int i = 0; i < 64; ++i) sixty_four += (i ? ",\"k" : "\"k") + std::to_string(i) + "\":1";
  CHECK(prefork::detail::parse_flat_object(sixty_four + "}", fields, error));
  CHECK(fields.size() == 64);
  CHECK_FALSE(prefork::detail::parse_flat_object(sixty_four + ",\"k64\":1}", fields, error));
  CHECK(error == "more than 64 fields at offset " + std::to_string(sixty_four.size() + 1));
}

TEST_CASE("parse_flat_object rejects everything else and names the offset", "[control]") {
  struct Case {
    std::string_view text;
    std::string_view error;
  };
  for (const Case& c : std::vector<Case>{
           {"", "expected '{' at offset 0"},
           {"   ", "expected '{' at offset 3"},
           {"[]", "expected '{' at offset 0"},
           {"{", "expected a string key at offset 1"},
           {"{\"a\"", "expected ':' at offset 4"},
           {"{\"a\":", "missing value at offset 5"},
           {"{\"a\":1", "expected ',' or '}' at offset 6"},
           {"{\"a\":1,}", "expected a string key at offset 7"},
           {"{a:1}", "expected a string key at offset 1"},
           {"{\"a\":{}}", "nested value (only flat objects of scalars are accepted) at offset 5"},
           {"{\"a\":[1]}", "nested value (only flat objects of scalars are accepted) at offset 5"},
           {"{\"a\":1,\"a\":2}", "duplicate key at offset 7"},
           {"{\"a\":1} x", "trailing bytes after the object at offset 8"},
           {"{\"a\":1}{}", "trailing bytes after the object at offset 7"},
           {"{\"a\":\"\\x\"}", "bad escape at offset 6"},
           {"{\"a\":\"\\u12\"}", "bad hex digit in \\u escape at offset 10"},
           {"{\"a\":\"\\u12", "truncated \\u escape at offset 8"},
           {"{\"a\":\"\\ud800\"}", "unpaired high surrogate at offset 12"},
           {"{\"a\":\"\\ud800\\u0041\"}", "unpaired high surrogate at offset 18"},
           {"{\"a\":\"\\udc00\"}", "unpaired low surrogate at offset 12"},
           {"{\"a\":\"\xff\"}", "invalid UTF-8 at offset 6"},
           {"{\"a\":\"\xed\xa0\x80\"}", "invalid UTF-8 at offset 6"},
           {"{\"a\":\"tab\there\"}", "control character in string at offset 9"},
           {"{\"a\":\"open", "unterminated string at offset 10"},
           {"{\"a\":01}", "expected ',' or '}' at offset 6"},
           {"{\"a\":1.}", "bad number at offset 7"},
           {"{\"a\":1e}", "bad number at offset 7"},
           {"{\"a\":-}", "bad number at offset 6"},
           {"{\"a\":+1}", "unexpected character at offset 5"},
           {"{\"a\":tru}", "unexpected character at offset 5"},
           {"{\"a\":nul", "unexpected character at offset 5"},
           {"{\"a\":\"x\"\xff}", "expected ',' or '}' at offset 8"},
       }) {
    CAPTURE(c.text);
    JsonFields fields;
    std::string error;
    CHECK_FALSE(prefork::detail::parse_flat_object(c.text, fields, error));
    CHECK(error == c.error);
  }
}
