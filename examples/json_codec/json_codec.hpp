// JsonCodec: nlohmann::json (Debian's nlohmann-json3-dev) as a prefork MessageCodec. The library
// knows nothing of JSON; a codec is any type with message_type, encode() and decode() (see
// prefork/codec.hpp), and this is all it takes to send JSON values over the channel:
//
//   prefork::Cluster<Server, prefork::RoundRobin, prefork::Backoff<prefork::RestartOnCrash>,
//                    JsonCodec> cluster(...);
//   cluster.broadcast({{"usersCount", 625}});
#ifndef PREFORK_EXAMPLES_JSON_CODEC_JSON_CODEC_HPP
#define PREFORK_EXAMPLES_JSON_CODEC_JSON_CODEC_HPP

#include <optional>
#include <string>
#include <string_view>
#include <system_error>

#include <nlohmann/json.hpp>
#include <prefork/codec.hpp>

/// A message is any JSON value; its bytes are the value's compact serialization.
struct JsonCodec {
  using message_type = nlohmann::json;

  /// Never throws but std::bad_alloc. dump() throws type_error 316 on a string that is not
  /// valid UTF-8; an exception out of encode() would end a worker (or be logged and lose the
  /// message in the master), so such bytes are replaced with U+FFFD instead.
  std::string encode(const message_type& m) const {
    return m.dump(-1, ' ', false, message_type::error_handler_t::replace);
  }

  /// The bytes come from another process and may be anything: malformed JSON, trailing bytes
  /// after a value, invalid UTF-8 or nothing at all. Parsed with exceptions off, so that no
  /// parse_error can cross the event loop; a value the parser discarded is
  /// errc::decode_failed (the master then drops the worker that sent it). Never throws but
  /// std::bad_alloc. Memory grows with the input, so keep Options::max_message_size at the
  /// size of the largest message you expect.
  std::optional<message_type> decode(std::string_view bytes, std::error_code& ec) const {
    message_type value = message_type::parse(bytes.begin(), bytes.end(), nullptr,
                                             /*allow_exceptions=*/false);
    if (value.is_discarded()) {
      ec = prefork::errc::decode_failed;
      return std::nullopt;
    }
    ec.clear();
    return value;
  }
};
static_assert(prefork::MessageCodec<JsonCodec>);

#endif  // PREFORK_EXAMPLES_JSON_CODEC_JSON_CODEC_HPP
