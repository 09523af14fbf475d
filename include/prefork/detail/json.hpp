// The JSON subset of the control socket (detail/control_server.hpp, detail/control_client.hpp):
// quoting any bytes as a JSON string, and parsing one flat object of scalars, the shape of every
// control request. Replies are written by the master, which knows their shape.
//
// Why its own tiny JSON: requests are flat objects of scalars, so a full JSON library would be a
// dependency for a few hundred lines.
#ifndef PREFORK_DETAIL_JSON_HPP
#define PREFORK_DETAIL_JSON_HPP

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <utility>

namespace prefork::detail {

/// The length of the well-formed UTF-8 sequence starting at s[i] (1 to 4), or 0 if there is
/// none: overlong forms, UTF-16 surrogates (U+D800..U+DFFF) and code points above U+10FFFF are
/// ill-formed (RFC 3629 section 4 grammar).
inline std::size_t utf8_sequence(std::string_view s, std::size_t i) noexcept {
  auto byte = [&](std::size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = byte(i);
  if (c < 0x80) return 1;
  std::size_t n;
  unsigned char lo = 0x80, hi = 0xbf;  // the allowed range of the second byte
  if (c >= 0xc2 && c <= 0xdf) {
    n = 2;
  } else if (c >= 0xe0 && c <= 0xef) {
    n = 3;
    if (c == 0xe0) lo = 0xa0;  // overlong
    if (c == 0xed) hi = 0x9f;  // surrogates
  } else if (c >= 0xf0 && c <= 0xf4) {
    n = 4;
    if (c == 0xf0) lo = 0x90;  // overlong
    if (c == 0xf4) hi = 0x8f;  // above U+10FFFF
  } else {
    return 0;
  }
  if (s.size() - i < n) return 0;
  if (byte(i + 1) < lo || byte(i + 1) > hi) return 0;
  for (std::size_t k = 2; k < n; ++k)
    if ((byte(i + k) & 0xc0) != 0x80) return 0;
  return n;
}

/// `s` as a JSON string literal, quotes included. Control characters are escaped, well-formed
/// UTF-8 passes through and every byte that is not part of a well-formed sequence becomes
/// \ufffd, so the result is always valid JSON (a file name or an error text may hold any bytes).
inline std::string json_quote(std::string_view s) {
  static constexpr char hex[] = "0123456789abcdef";
  std::string out;
  out.reserve(s.size() + 2);
  out += '"';
  for (std::size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
      ++i;
    } else if (c < 0x20) {
      out += "\\u00";
      out += hex[c >> 4];
      out += hex[c & 0xf];
      ++i;
    } else if (std::size_t n = utf8_sequence(s, i); n == 0) {
      out += "\\ufffd";
      ++i;
    } else {
      out.append(s.substr(i, n));
      i += n;
    }
  }
  out += '"';
  return out;
}

/// One scalar value of a flat JSON object. `text`: the decoded string; a number's literal as
/// written; "true"/"false"; "null".
struct JsonScalar {
  enum class Type { string, number, boolean, null };
  Type type = Type::null;
  std::string text;
};

using JsonFields = std::map<std::string, JsonScalar, std::less<>>;

/// The most fields a request object may have.
inline constexpr std::size_t kMaxJsonFields = 64;

namespace json_parse {

// A cursor over the text with the error it stopped at. Every read checks the bounds: the
// parser is fed untrusted bytes (and fuzzed, tests/fuzz/control.fuzz.cpp).
struct Cursor {
  std::string_view s;
  std::size_t pos = 0;
  std::string* error;

  bool at_end() const noexcept { return pos >= s.size(); }
  char peek() const noexcept { return at_end() ? '\0' : s[pos]; }
  bool fail(std::string_view what) {
    *error = std::string(what) + " at offset " + std::to_string(pos);
    return false;
  }
  void skip_ws() noexcept {
    while (!at_end() && (s[pos] == ' ' || s[pos] == '\t' || s[pos] == '\n' || s[pos] == '\r'))
      ++pos;
  }
};

inline int hex_value(char c) noexcept {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Four hex digits after "\u".
inline bool hex4(Cursor& c, std::uint32_t& v) {
  if (c.s.size() - c.pos < 4) return c.fail("truncated \\u escape");
  v = 0;
  for (int k = 0; k < 4; ++k) {
    int h = hex_value(c.s[c.pos]);
    if (h < 0) return c.fail("bad hex digit in \\u escape");
    v = v * 16 + static_cast<std::uint32_t>(h);
    ++c.pos;
  }
  return true;
}

inline void append_utf8(std::string& out, std::uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xc0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xe0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  } else {
    out += static_cast<char>(0xf0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3f));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  }
}

// A string literal, the cursor on its opening quote; `out` gets the decoded bytes.
inline bool string(Cursor& c, std::string& out) {
  ++c.pos;  // the opening quote
  out.clear();
  for (;;) {
    if (c.at_end()) return c.fail("unterminated string");
    const unsigned char ch = static_cast<unsigned char>(c.s[c.pos]);
    if (ch == '"') {
      ++c.pos;
      return true;
    }
    if (ch < 0x20) return c.fail("control character in string");
    if (ch == '\\') {
      if (c.s.size() - c.pos < 2) return c.fail("truncated escape");
      const char e = c.s[c.pos + 1];
      c.pos += 2;
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          std::uint32_t cp = 0;
          if (!hex4(c, cp)) return false;
          if (cp >= 0xdc00 && cp <= 0xdfff) return c.fail("unpaired low surrogate");
          if (cp >= 0xd800 && cp <= 0xdbff) {
            if (c.s.size() - c.pos < 2 || c.s[c.pos] != '\\' || c.s[c.pos + 1] != 'u')
              return c.fail("unpaired high surrogate");
            c.pos += 2;
            std::uint32_t low = 0;
            if (!hex4(c, low)) return false;
            if (low < 0xdc00 || low > 0xdfff) return c.fail("unpaired high surrogate");
            cp = 0x10000 + ((cp - 0xd800) << 10) + (low - 0xdc00);
          }
          append_utf8(out, cp);
          break;
        }
        default:
          c.pos -= 2;
          return c.fail("bad escape");
      }
      continue;
    }
    std::size_t n = utf8_sequence(c.s, c.pos);
    if (n == 0) return c.fail("invalid UTF-8");
    out.append(c.s.substr(c.pos, n));
    c.pos += n;
  }
}

inline bool is_digit(char ch) noexcept { return ch >= '0' && ch <= '9'; }

// A number as RFC 8259 section 6 writes it; `out` gets the literal.
inline bool number(Cursor& c, std::string& out) {
  const std::size_t start = c.pos;
  if (c.peek() == '-') ++c.pos;
  if (c.peek() == '0') {
    ++c.pos;
  } else if (is_digit(c.peek())) {
    while (is_digit(c.peek())) ++c.pos;
  } else {
    return c.fail("bad number");
  }
  if (c.peek() == '.') {
    ++c.pos;
    if (!is_digit(c.peek())) return c.fail("bad number");
    while (is_digit(c.peek())) ++c.pos;
  }
  if (c.peek() == 'e' || c.peek() == 'E') {
    ++c.pos;
    if (c.peek() == '+' || c.peek() == '-') ++c.pos;
    if (!is_digit(c.peek())) return c.fail("bad number");
    while (is_digit(c.peek())) ++c.pos;
  }
  out.assign(c.s.substr(start, c.pos - start));
  return true;
}

inline bool literal(Cursor& c, std::string_view word) {
  if (c.s.substr(c.pos, word.size()) != word) return c.fail("unexpected character");
  c.pos += word.size();
  return true;
}

inline bool value(Cursor& c, JsonScalar& v) {
  switch (c.peek()) {
    case '"': v.type = JsonScalar::Type::string; return string(c, v.text);
    case 't': v.type = JsonScalar::Type::boolean; v.text = "true"; return literal(c, "true");
    case 'f': v.type = JsonScalar::Type::boolean; v.text = "false"; return literal(c, "false");
    case 'n': v.type = JsonScalar::Type::null; v.text = "null"; return literal(c, "null");
    case '{':
    case '[': return c.fail("nested value (only flat objects of scalars are accepted)");
    default:
      if (c.peek() == '-' || is_digit(c.peek())) {
        v.type = JsonScalar::Type::number;
        return number(c, v.text);
      }
      return c.at_end() ? c.fail("missing value") : c.fail("unexpected character");
  }
}

}  // namespace json_parse

/// Parses one JSON object whose values are scalars (no nesting), surrounded by optional
/// whitespace. Returns false with `error` naming what is wrong and its byte offset for anything
/// else: nested values, duplicate keys, trailing bytes, bad escapes, unpaired surrogates, more
/// than kMaxJsonFields fields, ill-formed UTF-8. `out` is cleared first; after a failure it
/// holds the fields read so far. Never undefined behaviour, whatever the bytes.
inline bool parse_flat_object(std::string_view text, JsonFields& out, std::string& error) {
  out.clear();
  error.clear();
  json_parse::Cursor c{text, 0, &error};
  c.skip_ws();
  if (c.peek() != '{' || c.at_end()) return c.fail("expected '{'");
  ++c.pos;
  c.skip_ws();
  if (c.peek() == '}' && !c.at_end()) {
    ++c.pos;
  } else {
    for (;;) {
      if (c.peek() != '"' || c.at_end()) return c.fail("expected a string key");
      const std::size_t key_at = c.pos;
      std::string key;
      if (!json_parse::string(c, key)) return false;
      c.skip_ws();
      if (c.peek() != ':' || c.at_end()) return c.fail("expected ':'");
      ++c.pos;
      c.skip_ws();
      JsonScalar v;
      if (!json_parse::value(c, v)) return false;
      if (out.size() >= kMaxJsonFields) {
        c.pos = key_at;
        return c.fail("more than " + std::to_string(kMaxJsonFields) + " fields");
      }
      if (!out.emplace(std::move(key), std::move(v)).second) {
        c.pos = key_at;
        return c.fail("duplicate key");
      }
      c.skip_ws();
      if (c.peek() == ',' && !c.at_end()) {
        ++c.pos;
        c.skip_ws();
        continue;
      }
      if (c.peek() == '}' && !c.at_end()) {
        ++c.pos;
        break;
      }
      return c.fail("expected ',' or '}'");
    }
  }
  c.skip_ws();
  if (!c.at_end()) return c.fail("trailing bytes after the object");
  return true;
}

}  // namespace prefork::detail

#endif  // PREFORK_DETAIL_JSON_HPP
