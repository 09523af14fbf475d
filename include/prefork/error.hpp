// prefork error codes: runtime conditions reported as values (std::error_code), never as
// exceptions thrown across the event loop. Set-up failures throw std::system_error built from
// these or from errno.
#ifndef PREFORK_ERROR_HPP
#define PREFORK_ERROR_HPP

#include <string>
#include <system_error>
#include <type_traits>

#include <prefork/version.hpp>

namespace prefork {

enum class errc {
  frame_too_large = 1,  ///< a frame announced or offered more bytes than the channel's maximum
  malformed_frame,      ///< bad magic, unknown kind, or descriptor count that does not match
  truncated_frame,      ///< the peer closed the channel in the middle of a frame
  channel_closed,       ///< the peer closed the channel (or it was closed locally)
  queue_full,           ///< the channel's bounded send queue has no room: back-pressure
  decode_failed,        ///< a codec rejected the bytes of a user message
  too_many_fds,         ///< more descriptors than one frame may carry
  no_such_worker,       ///< the worker id is unknown or the worker is dead
  request_timeout,      ///< a request got no answer within its timeout
  peer_gone,            ///< the peer exited (or its channel closed) before it answered
  no_handler,           ///< the peer has no on_request to answer requests with
  request_failed,       ///< the peer's handler dropped the request unanswered, or threw
};

namespace detail {
class error_category_impl final : public std::error_category {
 public:
  const char* name() const noexcept override { return "prefork"; }
  std::string message(int ev) const override {
    switch (static_cast<errc>(ev)) {
      case errc::frame_too_large: return "frame larger than the channel's maximum message size";
      case errc::malformed_frame: return "malformed frame";
      case errc::truncated_frame: return "truncated frame (peer closed mid-frame)";
      case errc::channel_closed: return "channel closed";
      case errc::queue_full: return "channel send queue full";
      case errc::decode_failed: return "message could not be decoded";
      case errc::too_many_fds: return "too many descriptors for one frame";
      case errc::no_such_worker: return "no such worker";
      case errc::request_timeout: return "request timed out";
      case errc::peer_gone: return "peer exited before it answered";
      case errc::no_handler: return "peer has no request handler";
      case errc::request_failed: return "peer failed to answer the request";
    }
    return "unknown prefork error";
  }
};
}  // namespace detail

/// The category of every prefork::errc value.
inline const std::error_category& error_category() noexcept {
  static const detail::error_category_impl instance;
  return instance;
}

inline std::error_code make_error_code(errc e) noexcept {
  return {static_cast<int>(e), error_category()};
}

}  // namespace prefork

template <>
struct std::is_error_code_enum<prefork::errc> : std::true_type {};

#endif  // PREFORK_ERROR_HPP
