// Request/response over a channel, both ways: a request carries a correlation id in the frame's
// tag, its answer (a `reply` or a `failure` frame) comes back with the same id and runs the
// caller's callback on the caller's loop. Node's cluster has only fire-and-forget send(); this
// adds the timeouts and the "peer died" errors users otherwise rebuild by hand.
#ifndef PREFORK_REQUEST_HPP
#define PREFORK_REQUEST_HPP

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

#include <prefork/version.hpp>
#include <prefork/channel.hpp>
#include <prefork/codec.hpp>
#include <prefork/error.hpp>
#include <prefork/event_loop.hpp>

namespace prefork {

/// How long a request waits for its answer unless the caller says otherwise.
inline constexpr std::chrono::milliseconds kDefaultRequestTimeout{10000};

namespace detail {

// Why a request failed, as the answering side tells it (the first byte of a `failure` frame).
enum class FailureCode : std::uint8_t {
  no_handler = 1,   // the peer has no on_request
  unanswered = 2,   // the handler dropped its Reply, or threw
  undecodable = 3,  // the peer could not decode the request
  queue_full = 4,   // the answer would take the answering side's send queue past its budget
};

inline errc to_errc(std::string_view payload) noexcept {
  if (payload.empty()) return errc::request_failed;
  switch (static_cast<FailureCode>(payload[0])) {
    case FailureCode::no_handler: return errc::no_handler;
    case FailureCode::undecodable: return errc::decode_failed;
    case FailureCode::queue_full: return errc::queue_full;
    case FailureCode::unanswered: break;
  }
  return errc::request_failed;
}

// The answering side's way back to the caller. Reset when the channel closes, so that a Reply
// kept past its peer's life answers into nothing instead of into a dangling channel.
struct ReplyLink {
  Channel* channel = nullptr;
};

// Answers request `id` with a failure frame. Never throws: it runs from Reply's destructor.
inline void refuse(const ReplyLink& link, std::uint64_t id, FailureCode code) noexcept {
  if (!link.channel) return;
  try {
    link.channel->send(FrameKind::failure, std::string(1, static_cast<char>(code)), id);
  } catch (...) {  // bad_alloc: the caller's timeout ends the request instead
  }
}

}  // namespace detail

/// The answer to one request, handed to an on_request handler. Call it once with the reply
/// message (or fail() it); copies share one answer, and the last copy dropped unanswered fails
/// the request at once (errc::request_failed on the caller's side) rather than leaving it to
/// time out. May be kept and called later from the same process's loop (an asynchronous
/// answer). Runs in the process that received the request.
template <MessageCodec Codec = StringCodec>
class Reply {
 public:
  using message_type = typename Codec::message_type;

  /// Sends the reply. Errors, nothing sent: errc::channel_closed (the caller is gone),
  /// errc::frame_too_large; errc::queue_full when the channel's queue already holds more
  /// than max_queued_bytes (a caller that does not read its answers): the request then fails
  /// with errc::queue_full on the caller's side too. A second answer to the same request is
  /// ignored (returns {}).
  std::error_code operator()(const message_type& m) const {
    if (state_->answered) return {};
    state_->answered = true;
    Channel* channel = state_->link->channel;
    if (!channel) return errc::channel_closed;
    if (channel->over_budget()) {
      detail::refuse(*state_->link, state_->id, detail::FailureCode::queue_full);
      return errc::queue_full;
    }
    return channel->send(FrameKind::reply, std::string(Codec{}.encode(m)), state_->id);
  }
  /// Fails the request (the caller gets errc::request_failed).
  void fail() const { state_->fail(); }
  /// The request has been answered (or failed) already.
  bool answered() const noexcept { return state_->answered; }

  /// For the library: a Reply to request `id` arriving over `link`'s channel.
  Reply(std::shared_ptr<detail::ReplyLink> link, std::uint64_t id)
      : state_(std::make_shared<State>(std::move(link), id)) {}

 private:
  struct State {
    State(std::shared_ptr<detail::ReplyLink> l, std::uint64_t i) : link(std::move(l)), id(i) {}
    State(const State&) = delete;
    State& operator=(const State&) = delete;
    ~State() { fail(); }
    void fail() noexcept {
      if (answered) return;
      answered = true;
      detail::refuse(*link, id, detail::FailureCode::unanswered);
    }
    std::shared_ptr<detail::ReplyLink> link;
    std::uint64_t id;
    bool answered = false;
  };
  std::shared_ptr<State> state_;
};

namespace detail {

// One side's table of requests it sent and is waiting on: the correlation ids, the callbacks
// and their timeout timers. Every callback runs exactly once, on the owner's loop, and never
// from inside start().
template <MessageCodec Codec>
class Requests {
 public:
  using message_type = typename Codec::message_type;
  using Callback = std::function<void(std::error_code, const message_type&)>;

  Requests(EventLoop& loop, bool keeps_alive) : loop_(loop), keeps_alive_(keeps_alive) {}
  Requests(const Requests&) = delete;
  Requests& operator=(const Requests&) = delete;
  ~Requests() {
    for (auto& [id, p] : pending_) loop_.cancel(p.timer);
  }

  void start(Channel* channel, FrameKind kind, std::string payload, Callback cb,
             Clock::duration timeout) {
    std::error_code ec = channel ? std::error_code{} : make_error_code(errc::channel_closed);
    const std::uint64_t id = ++next_id_;
    if (!ec) ec = channel->send(kind, std::move(payload), id);
    if (ec) {
      loop_.post([cb = std::move(cb), ec] { cb(ec, message_type{}); });
      return;
    }
    EventLoop::TimerId timer = loop_.after(timeout, [this, id] {
      finish(id, make_error_code(errc::request_timeout), nullptr);
    }, keeps_alive_);
    pending_.emplace(id, Pending{std::move(cb), timer});
  }

  // A `reply` frame: unknown ids (answered after their timeout) are dropped.
  void on_reply(std::uint64_t id, std::string_view bytes) {
    if (!pending_.count(id)) return;
    std::error_code ec;
    std::optional<message_type> m = codec_.decode(bytes, ec);
    if (!m) return finish(id, ec ? ec : make_error_code(errc::decode_failed), nullptr);
    finish(id, {}, &*m);
  }
  void on_failure(std::uint64_t id, std::string_view payload) {
    finish(id, make_error_code(to_errc(payload)), nullptr);
  }

  // The peer is gone: everything still waiting fails with `ec`, in the order it was sent.
  void fail_all(std::error_code ec) {
    auto all = std::exchange(pending_, {});
    for (auto& [id, p] : all) {
      loop_.cancel(p.timer);
      p.cb(ec, message_type{});
    }
  }

  std::size_t size() const noexcept { return pending_.size(); }

 private:
  struct Pending {
    Callback cb;
    EventLoop::TimerId timer = 0;
  };

  void finish(std::uint64_t id, std::error_code ec, const message_type* m) {
    auto it = pending_.find(id);
    if (it == pending_.end()) return;
    Pending p = std::move(it->second);
    pending_.erase(it);
    loop_.cancel(p.timer);
    if (m) {
      p.cb(ec, *m);
    } else {
      p.cb(ec, message_type{});
    }
  }

  EventLoop& loop_;
  bool keeps_alive_;
  [[no_unique_address]] Codec codec_;
  std::uint64_t next_id_ = 0;
  std::map<std::uint64_t, Pending> pending_;
};

// The answering side: decodes a request frame and hands it to `handler` with a Reply, or
// answers with a failure at once (no handler, undecodable bytes).
template <MessageCodec Codec, class Handler>
void answer(const std::shared_ptr<ReplyLink>& link, const Codec& codec, const Frame& f,
            bool has_handler, Handler&& handler) {
  if (!has_handler) return refuse(*link, f.tag, FailureCode::no_handler);
  std::error_code ec;
  auto m = codec.decode(f.payload, ec);
  if (!m) return refuse(*link, f.tag, FailureCode::undecodable);
  handler(*m, Reply<Codec>(link, f.tag));
}

}  // namespace detail
}  // namespace prefork

#if defined(PREFORK_SEPARATE_COMPILATION)
// The default codec's request machinery, instantiated once in <prefork/impl/src.hpp>.
namespace prefork {
extern template class Reply<StringCodec>;
extern template class detail::Requests<StringCodec>;
}  // namespace prefork
#endif

#endif  // PREFORK_REQUEST_HPP
