// The IPC channel between the master and one worker: a non-blocking AF_UNIX stream socketpair
// carrying length-prefixed frames, with descriptors passed by SCM_RIGHTS, a bounded send queue
// (back-pressure) and strict validation of every frame that arrives.
#ifndef PREFORK_CHANNEL_HPP
#define PREFORK_CHANNEL_HPP

#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <prefork/version.hpp>
#include <prefork/detail/syscall.hpp>
#include <prefork/detail/unique_fd.hpp>
#include <prefork/error.hpp>
#include <prefork/event_loop.hpp>

namespace prefork {

/// What a frame is. `user` frames carry codec bytes; every other kind is the library's own
/// control traffic and never reaches on_message.
enum class FrameKind : std::uint8_t {
  user = 1,
  online = 2,       ///< worker -> master: the process is running
  listening = 3,    ///< worker -> master: the Server is taking connections
  disconnect = 4,   ///< either way: drain and exit (worker -> master: "I am draining")
  handles = 5,      ///< master -> worker: listening sockets (kernel dispatch)
  connection = 6,   ///< master -> worker: one accepted connection (master dispatch)
  heartbeat = 7,    ///< worker -> master: the worker's loop is turning
  stats = 8,        ///< worker -> master: open connections (tag), counters (payload);
                    ///< master -> worker: report them now
  accepted = 9,     ///< worker -> master: it received `tag` more connection frames
  retire = 10,      ///< worker -> master: recycle me (payload: why), e.g. max_connections
  started = 11,     ///< worker -> master: the Server is built and the worker's loop turns
  request = 12,     ///< either way: codec bytes expecting an answer (tag: correlation id)
  reply = 13,       ///< either way: the answer to request `tag` (codec bytes)
  failure = 14,     ///< either way: request `tag` failed (payload: why)
  store = 15,       ///< worker -> master: a shared-store operation (tag: correlation id)
  store_reply = 16, ///< master -> worker: its result (tag: correlation id)
  bind = 17,        ///< worker -> master: route a session key to this worker's slot
  declined = 18,    ///< worker -> master: it could not take the next `tag` connection frames
                    ///< (out of descriptors); the master still holds them
};
inline constexpr std::uint8_t kMaxFrameKind = 18;

/// Frames that carry the user's traffic and so count against max_queued_bytes: a peer that
/// stops reading is pushed back on (errc::queue_full) instead of growing the queue for ever.
/// Control frames always go out, so that a full queue cannot stop a connection being
/// acknowledged or a drain being asked for.
constexpr bool is_user_traffic(FrameKind k) noexcept {
  return k == FrameKind::user || k == FrameKind::connection || k == FrameKind::request ||
         k == FrameKind::store;
}

/// One frame as received: the payload and the descriptors that came with it (owned). A
/// descriptor the kernel could not install because the receiving process was at its limit
/// (EMFILE, ENFILE: the kernel closes it and sets MSG_CTRUNC) is an empty UniqueFd in `fds`:
/// the frame still arrives, and its receiver decides what a missing descriptor means.
struct Frame {
  FrameKind kind = FrameKind::user;
  std::uint64_t tag = 0;  ///< a free word for the kind's use (e.g. a correlation id)
  std::string payload;
  std::vector<UniqueFd> fds;
};

struct ChannelLimits {
  std::size_t max_message_size = std::size_t{256} << 20;
  std::size_t max_queued_bytes = std::size_t{64} << 20;
};

namespace detail {

// Wire header, little-endian: magic "PF" (u16), kind (u8), descriptor count (u8), payload
// length (u32), tag (u64). The magic catches a peer that writes garbage at the first frame.
inline constexpr std::size_t kHeaderSize = 16;
inline constexpr std::uint16_t kFrameMagic = 0x4650;
inline constexpr std::size_t kMaxFdsPerFrame = 16;

struct FrameHeader {
  std::uint8_t kind;
  std::uint8_t nfds;
  std::uint32_t length;
  std::uint64_t tag;
};

inline void put_le(char* p, std::uint64_t v, int bytes) noexcept {
  for (int i = 0; i < bytes; ++i) p[i] = static_cast<char>((v >> (8 * i)) & 0xff);
}
inline std::uint64_t get_le(const char* p, int bytes) noexcept {
  std::uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v |= std::uint64_t{static_cast<unsigned char>(p[i])} << (8 * i);
  return v;
}

inline void encode_header(char* out, const FrameHeader& h) noexcept {
  put_le(out, kFrameMagic, 2);
  put_le(out + 2, h.kind, 1);
  put_le(out + 3, h.nfds, 1);
  put_le(out + 4, h.length, 4);
  put_le(out + 8, h.tag, 8);
}

/// Parses and validates a header. Never reads past kHeaderSize bytes of `in`.
inline std::error_code decode_header(const char* in, std::size_t max_message_size,
                                     FrameHeader& h) noexcept {
  if (get_le(in, 2) != kFrameMagic) return errc::malformed_frame;
  h.kind = static_cast<std::uint8_t>(get_le(in + 2, 1));
  h.nfds = static_cast<std::uint8_t>(get_le(in + 3, 1));
  h.length = static_cast<std::uint32_t>(get_le(in + 4, 4));
  h.tag = get_le(in + 8, 8);
  if (h.kind == 0 || h.kind > kMaxFrameKind) return errc::malformed_frame;
  if (h.nfds > kMaxFdsPerFrame) return errc::too_many_fds;
  if (h.length > max_message_size) return errc::frame_too_large;
  return {};
}

}  // namespace detail

/// One end of a framed channel. Runs on the EventLoop it was given; all callbacks run there.
/// The first error (malformed frame, oversized frame, EOF, EPIPE) closes the channel and is
/// reported once through on_close; nothing after it is delivered. A callback may close() the
/// channel, but must not destroy it: destroy it from a later loop round (EventLoop::post).
class Channel {
 public:
  using FrameCallback = std::function<void(Frame&&)>;
  using CloseCallback = std::function<void(std::error_code)>;

  /// Takes ownership of a connected, non-blocking AF_UNIX SOCK_STREAM socket and starts
  /// reading. Throws std::system_error if the loop cannot watch it.
  Channel(EventLoop& loop, UniqueFd sock, ChannelLimits limits = {}, bool keeps_alive = false)
      : loop_(loop), sock_(std::move(sock)), limits_(limits) {
    loop_.watch(sock_.get(), EventLoop::readable, [this](std::uint32_t ev) { on_events(ev); },
                keeps_alive);
  }
  Channel(const Channel&) = delete;
  Channel& operator=(const Channel&) = delete;
  ~Channel() { close(); }

  void on_frame(FrameCallback cb) { on_frame_ = std::move(cb); }
  void on_close(CloseCallback cb) { on_close_ = std::move(cb); }
  /// Called when the send queue has emptied after send() had to queue: resume producing.
  void on_drained(std::function<void()> cb) { on_drained_ = std::move(cb); }

  /// Queues one frame and writes as much as the socket takes now. Takes ownership of fds,
  /// which are closed once sent (or when the channel closes). Errors, with nothing queued:
  /// errc::frame_too_large (payload over max_message_size), errc::too_many_fds,
  /// errc::queue_full (is_user_traffic frames only: the queue holds max_queued_bytes
  /// already; an empty queue always takes one message), errc::channel_closed.
  std::error_code send(FrameKind kind, std::string payload, std::uint64_t tag = 0,
                       std::vector<UniqueFd> fds = {}) {
    const std::size_t n = fds.size();  // before fds is moved from (argument order)
    if (n > detail::kMaxFdsPerFrame) return errc::too_many_fds;
    int raw[detail::kMaxFdsPerFrame] = {};
    for (std::size_t i = 0; i < n; ++i) raw[i] = fds[i].get();
    return enqueue(kind, std::move(payload), tag, raw, n, std::move(fds));
  }

  /// As send(), with one descriptor the caller keeps owning: it must stay open until the
  /// frame is sent (the peer's acknowledgement proves it) or the channel has closed.
  std::error_code send_borrowed(FrameKind kind, std::string payload, std::uint64_t tag, int fd) {
    return enqueue(kind, std::move(payload), tag, &fd, 1, {});
  }

  /// Back-pressure on the peer's requests (the master enables it on each worker's channel):
  /// while the send queue holds more than max_queued_bytes, no further frame is delivered and
  /// the socket is not read, so a peer that asks for large answers and stops reading them
  /// waits for them (its own queue fills, then its sends fail with errc::queue_full) instead
  /// of growing this process by an answer a request. Delivery resumes once the queue has
  /// drained to half the limit. The queue so stays under max_queued_bytes plus one answer.
  void pause_reading_while_full(bool on) noexcept { pause_when_full_ = on; }

  /// Holds the peer's frames, whatever the queue holds, until hold_reading(false): no frame
  /// after the one being delivered is delivered and the socket is not read (the master's
  /// store service, for a worker that sends past its budget while an upgrade holds the
  /// store). Lifting the hold delivers the frames already read from within this call (unless
  /// pause_reading_while_full still pauses). A peer that hangs up while held with nothing
  /// left to send it closes the channel (errc::channel_closed), its unread frames dropped.
  void hold_reading(bool on) {
    held_ = on;
    if (on || !sock_ || !paused_ || (pause_when_full_ && queued_ > limits_.max_queued_bytes / 2))
      return;
    paused_ = false;
    rearm();
    (void)deliver();
  }

  /// The queue holds more than max_queued_bytes: an answer produced now would go past the
  /// budget (Reply fails it with errc::queue_full instead).
  bool over_budget() const noexcept { return queued_ > limits_.max_queued_bytes; }

  /// Whether send() of a payload of this size would be taken now (not errc::queue_full).
  bool has_room(std::size_t payload_size) const noexcept {
    return sock_ && (out_.empty() ||
                     queued_ + payload_size + detail::kHeaderSize <= limits_.max_queued_bytes);
  }

  /// Writes the queue out, blocking in poll() up to timeout_ms. For a process about to exit.
  /// Returns true if everything was sent.
  bool flush_blocking(int timeout_ms) {
    auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
    while (sock_ && !out_.empty()) {
      if (flush()) return false;
      if (out_.empty()) break;
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      if (left.count() <= 0) return false;
      pollfd p{sock_.get(), POLLOUT, 0};
      detail::retry_eintr([&] { return ::poll(&p, 1, static_cast<int>(left.count())); });
    }
    return out_.empty();
  }

  /// Reads and delivers everything the peer has sent, up to EOF or EAGAIN; used when the peer
  /// process is known to have exited, so that its last frames are not lost.
  void read_all_pending() {
    while (read_some()) {
    }
  }

  /// Closes the socket without reporting through on_close; queued frames are dropped.
  void close() noexcept { (void)take(); }

  bool is_open() const noexcept { return static_cast<bool>(sock_); }
  int native_handle() const noexcept { return sock_.get(); }
  /// Bytes of accepted frames (headers included) not yet written to the socket.
  std::size_t queued_bytes() const noexcept { return queued_; }
  const ChannelLimits& limits() const noexcept { return limits_; }

 private:
  // The send queue is a list of chunks. A chunk holds the headers and payloads of consecutive
  // frames copied back to back, so that a burst of small messages costs a memcpy each and one
  // sendmsg per socketful, not an allocation, two iovecs and a share of a sendmsg each (what a
  // queue of one entry per frame cost: about 31 frames per sendmsg, and a wake-up of the peer
  // for each). A payload above kInlinePayload is moved in, not copied, and ends its chunk. A
  // frame with descriptors starts a chunk of its own: SCM_RIGHTS ride on the first byte a
  // sendmsg writes, and the receiver charges them to the frame that begins there.
  static constexpr std::size_t kInlinePayload = 16 * 1024;
  // Where a chunk stops taking frames. It bounds the buffer a chunk grows and the one kept
  // for reuse; a sendmsg still gathers many chunks (kMaxIov) when the socket has room.
  static constexpr std::size_t kChunkBytes = 64 * 1024;
  static constexpr std::size_t kMaxIov = 64;
  static constexpr unsigned kBurstWrites = 16;
  static constexpr std::chrono::microseconds kBurstWindow{1000};
  // What an idle channel keeps of its send buffer once the queue has drained.
  static constexpr std::size_t kIdleSendBuffer = 16 * 1024;
  // A frame whose payload is larger than this is read straight into the string it is
  // delivered in, rather than into the read buffer and then copied.
  static constexpr std::size_t kDirectRead = 64 * 1024;

  struct Chunk {
    std::string bytes;            // frames back to back; the last one's payload may be in large
    std::string large;            // a payload moved from the caller, sent after bytes
    std::size_t sent = 0;         // of bytes, then of large
    std::size_t nfds = 0;         // descriptors for the first byte; 0 once it has been sent
    int fds[detail::kMaxFdsPerFrame] = {};
    std::vector<UniqueFd> owned;  // of fds, those the channel closes once they are sent
    std::size_t size() const noexcept { return bytes.size() + large.size(); }
    bool takes_more() const noexcept { return large.empty() && bytes.size() < kChunkBytes; }
  };

  std::error_code enqueue(FrameKind kind, std::string&& payload, std::uint64_t tag,
                          const int* fds, std::size_t nfds, std::vector<UniqueFd> owned) {
    if (!sock_) return errc::channel_closed;
    if (payload.size() > limits_.max_message_size) return errc::frame_too_large;
    if (nfds > detail::kMaxFdsPerFrame) return errc::too_many_fds;
    // The limit is back-pressure on what the application sends (and on the connections the
    // master deals out). The library's own small control frames always go: a worker whose
    // Server filled the queue must still acknowledge connections, or the master would keep
    // its copies and their clients would never see them end.
    if (is_user_traffic(kind) && !has_room(payload.size()))
      return errc::queue_full;
    char header[detail::kHeaderSize];
    detail::encode_header(header, {static_cast<std::uint8_t>(kind),
                                   static_cast<std::uint8_t>(nfds),
                                   static_cast<std::uint32_t>(payload.size()), tag});
    // Behind a queue the frame waits with the others for EPOLLOUT, so that one sendmsg takes
    // them all (and wakes the peer once). A producer that outruns the loop would fill chunk
    // after chunk meanwhile: writing what the socket takes whenever a chunk is full keeps the
    // queue (and its fresh, page-faulting memory) small and hands the sent chunk's buffer to
    // the next one. Even if that empties the queue, the frame is queued, not written alone:
    // the socket is still polled for writing, and a write per frame is what this avoids.
    const bool was_empty = out_.empty();
    if (!was_empty && !out_.back().takes_more()) (void)flush();  // errors: as below
    const bool inline_payload = payload.size() <= kInlinePayload;
    const bool fresh = out_.empty() || nfds > 0 || !out_.back().takes_more();
    if (fresh) {
      out_.emplace_back();
      out_.back().bytes.swap(spare_);  // a buffer that served before: no allocation
    }
    Chunk& c = out_.back();
    try {
      c.bytes.reserve(c.bytes.size() + detail::kHeaderSize + (inline_payload ? payload.size() : 0));
    } catch (...) {  // nothing queued, as if send() had not been called
      if (fresh) out_.pop_back();
      throw;
    }
    const std::size_t size = detail::kHeaderSize + payload.size();
    c.bytes.append(header, detail::kHeaderSize);
    if (inline_payload)
      c.bytes.append(payload);
    else
      c.large = std::move(payload);
    if (nfds > 0) {
      std::copy(fds, fds + nfds, c.fds);
      c.nfds = nfds;
      c.owned = std::move(owned);
    }
    queued_ += size;
    // A write error here is left for the loop to report (the socket then polls writable with
    // EPOLLERR), so that on_close never runs inside the caller's send(). A queue that was not
    // empty has the socket polled for writing already.
    if (was_empty) {
      // A frame with descriptors gains nothing from waiting: it starts a sendmsg of its own.
      if (nfds > 0 || write_now()) (void)flush();
      if (!out_.empty()) {
        must_notify_drained_ = true;
        rearm();
      }
    }
    return {};
  }

  // Whether a frame sent on an empty queue is written at once. It is, unless this is a burst:
  // while the peer keeps up, a queue never forms, and a producer that sends many frames from
  // one callback would make a sendmsg (and a wake-up of the peer) for each. From the
  // kBurstWrites-th such write within kBurstWindow with no event on the channel in between,
  // frames are queued and the loop writes them together in its next round (EPOLLOUT, at once
  // since the socket has room). A request and its answer, or an occasional message, never
  // wait.
  bool write_now() noexcept {
    auto now = Clock::now();
    if (now - burst_start_ > kBurstWindow) {
      burst_start_ = now;
      burst_writes_ = 0;
    }
    return ++burst_writes_ <= kBurstWrites;
  }

  // What the socket is polled for: writable while frames wait, readable unless paused.
  void rearm() {
    std::uint32_t interest = paused_ ? 0 : EventLoop::readable;
    if (!out_.empty()) interest |= EventLoop::writable;
    loop_.modify(sock_.get(), interest);
  }

  // Called before each frame is delivered: whether to hold it (pause_reading_while_full,
  // hold_reading).
  bool must_pause() {
    if (paused_) return true;
    if (!held_ && !(pause_when_full_ && over_budget())) return false;
    paused_ = true;
    rearm();
    return true;
  }

  void on_events(std::uint32_t ev) {
    burst_writes_ = 0;  // a new loop round for this channel
    // A paused channel is not read, so a peer that hung up shows as EPOLLHUP alone: the
    // write that follows fails (EPIPE) and closes the channel, rather than the loop spinning.
    if ((ev & (EPOLLOUT | EPOLLERR)) || (paused_ && (ev & EPOLLHUP))) {
      if (auto ec = flush()) return fail(ec);
      if (paused_ && !held_ && queued_ <= limits_.max_queued_bytes / 2) {
        paused_ = false;
        rearm();
        // The frames already read wait in the buffer: the socket will not say so again.
        if (!deliver()) return;
        if (!paused_) ev |= EPOLLIN;
      }
      if (out_.empty()) {
        rearm();
        // A burst grew the buffer up to a chunk; an idle channel (there is one per worker in
        // the master) need not keep that much.
        if (spare_.capacity() > kIdleSendBuffer) std::string().swap(spare_);
        if (must_notify_drained_) {
          must_notify_drained_ = false;
          if (on_drained_) on_drained_();
          if (!sock_) return;
        }
      }
    }
    // Held with nothing to write: the hang-up would be reported again every round.
    if (paused_ && held_ && (ev & EPOLLHUP) && out_.empty()) return fail(errc::channel_closed);
    if ((ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) && !paused_) (void)read_some();
  }

  // The socket stays open until on_close has run: a master that kills a misbehaving worker
  // from on_close must do so before the worker can see EOF and exit 0 (planned-looking).
  void fail(std::error_code ec) {
    UniqueFd doomed = take();
    if (on_close_) on_close_(ec);
  }

  UniqueFd take() noexcept {
    if (!sock_) return {};
    loop_.unwatch(sock_.get());
    out_.clear();
    std::string().swap(spare_);
    queued_ = 0;
    paused_ = false;
    held_ = false;
    in_fds_.clear();  // descriptors of frames that will never be delivered
    lost_batches_ = 0;
    begin_ = end_ = 0;
    have_header_ = false;
    std::string().swap(large_in_);
    large_filled_ = 0;
    reading_large_ = false;
    return std::move(sock_);
  }

  // Writes queued chunks with sendmsg, gathering several per call. A chunk that carries
  // descriptors always starts a sendmsg, so its SCM_RIGHTS ride on its own first byte.
  std::error_code flush() {
    while (!out_.empty()) {
      iovec iov[kMaxIov];
      std::size_t n = 0, want = 0;
      for (std::size_t i = 0; i < out_.size() && n + 2 <= kMaxIov; ++i) {
        Chunk& c = out_[i];
        if (i > 0 && c.nfds > 0) break;
        if (c.sent < c.bytes.size()) iov[n++] = {c.bytes.data() + c.sent, c.bytes.size() - c.sent};
        std::size_t ls = c.sent > c.bytes.size() ? c.sent - c.bytes.size() : 0;
        if (ls < c.large.size()) iov[n++] = {c.large.data() + ls, c.large.size() - ls};
        want += c.size() - c.sent;
      }
      msghdr msg{};
      msg.msg_iov = iov;
      msg.msg_iovlen = n;
      alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * detail::kMaxFdsPerFrame)];
      Chunk& head = out_.front();
      if (head.nfds > 0) {
        std::size_t len = sizeof(int) * head.nfds;
        msg.msg_control = control;
        msg.msg_controllen = CMSG_SPACE(len);
        cmsghdr* c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(len);
        std::memcpy(CMSG_DATA(c), head.fds, len);
      }
      ssize_t w = detail::retry_eintr([&] { return ::sendmsg(sock_.get(), &msg, MSG_NOSIGNAL); });
      if (w < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) return {};
        return errno == EPIPE || errno == ECONNRESET ? make_error_code(errc::channel_closed)
                                                     : detail::errno_code();
      }
      auto left = static_cast<std::size_t>(w);
      if (left > 0 && head.nfds > 0) {  // the kernel holds its own references now
        head.nfds = 0;
        head.owned.clear();
      }
      queued_ -= left;
      while (left > 0) {
        Chunk& c = out_.front();
        std::size_t take = std::min(left, c.size() - c.sent);
        c.sent += take;
        left -= take;
        if (c.sent == c.size()) pop_chunk();
      }
      // A short write means the socket is full: asking again would only return EAGAIN.
      if (static_cast<std::size_t>(w) < want) return {};
    }
    return {};
  }

  // Drops the sent head chunk, keeping its buffer for the next chunk: a steady stream of
  // frames then reuses one buffer instead of allocating. Chunks stop growing at about
  // kChunkBytes, so what is kept is bounded.
  void pop_chunk() noexcept {
    std::string& b = out_.front().bytes;
    if (b.capacity() > spare_.capacity()) {
      b.clear();
      spare_.swap(b);
    }
    out_.pop_front();
  }

  // Reads what is there, up to a budget per round so that one flooding peer cannot starve the
  // loop's other descriptors, and delivers every complete frame in order. Returns true when it
  // stopped for the budget (more may be waiting).
  bool read_some() {
    std::size_t budget = std::size_t{4} << 20;
    while (sock_ && budget > 0 && !paused_) {
      iovec iov;
      if (reading_large_) {
        // Grow toward the announced length as bytes arrive (doubling), not at the header: a
        // 16-byte header alone must not make us allocate max_message_size. Never past the
        // frame, so that the next frame's bytes land in buf_.
        if (large_in_.size() == large_filled_) {
          std::size_t need = header_.length - large_filled_;
          large_in_.resize(large_filled_ + std::min(need, std::max(kDirectRead, large_filled_)));
        }
        iov = {large_in_.data() + large_filled_, large_in_.size() - large_filled_};
      } else {
        std::size_t want = 64 * 1024;
        if (have_header_) {
          std::size_t need = detail::kHeaderSize + header_.length - (end_ - begin_);
          want = std::min(need, std::max(want, buf_.size()));
        }
        reserve(want);
        iov = {buf_.data() + end_, buf_.size() - end_};
      }
      msghdr msg{};
      msg.msg_iov = &iov;
      msg.msg_iovlen = 1;
      alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * detail::kMaxFdsPerFrame)];
      msg.msg_control = control;
      msg.msg_controllen = sizeof control;
      ssize_t r = detail::retry_eintr(
          [&] { return ::recvmsg(sock_.get(), &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT); });
      if (r < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) return false;
        fail(errno == ECONNRESET ? make_error_code(errc::channel_closed) : detail::errno_code());
        return false;
      }
      std::size_t received = 0;
      for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        received += count;
        const unsigned char* data = CMSG_DATA(c);
        for (std::size_t i = 0; i < count; ++i) {
          int fd;
          std::memcpy(&fd, data + i * sizeof(int), sizeof fd);
          in_fds_.emplace_back(fd);
        }
      }
      // MSG_CTRUNC with the control buffer full: more descriptors than a frame may carry came
      // in one batch (the kernel closed the rest); only a hostile or broken sender does that,
      // so nothing more from it is trusted. With room left, the kernel could not install them
      // here: this process is at its descriptor limit (scm_detach_fds stops at the first
      // EMFILE and closes the rest). The sender did nothing wrong; the frame that owns them
      // (the batch is one sendmsg, which starts with that frame) arrives without them.
      if (msg.msg_flags & MSG_CTRUNC) {
        if (received >= detail::kMaxFdsPerFrame) {
          fail(errc::too_many_fds);
          return false;
        }
        ++lost_batches_;
      }
      if (r == 0) {
        fail(end_ > begin_ || have_header_ ? make_error_code(errc::truncated_frame)
                                           : make_error_code(errc::channel_closed));
        return false;
      }
      if (reading_large_)
        large_filled_ += static_cast<std::size_t>(r);
      else
        end_ += static_cast<std::size_t>(r);
      budget -= std::min(budget, static_cast<std::size_t>(r));
      if (!deliver()) return false;
    }
    return static_cast<bool>(sock_) && !paused_;
  }

  // Delivers every complete frame received, up to a pause (pause_reading_while_full). Returns
  // false once the channel closed.
  bool deliver() {
    // One Frame for the whole batch: a callback that only reads the payload (decodes it) leaves
    // its buffer behind for the next frame, so small frames cost no allocation each.
    Frame f;
    for (;;) {
      // Frames held back stay in buf_ (or large_in_), whole or partial, with their
      // descriptors in in_fds_: delivery picks up there when the queue has drained.
      if (must_pause()) return true;
      if (reading_large_) {
        if (large_filled_ < header_.length) break;
        reading_large_ = false;
        f.payload = std::move(large_in_);
        large_in_ = std::string();
        large_filled_ = 0;
      } else {
        std::size_t avail = end_ - begin_;
        if (!have_header_) {
          if (avail < detail::kHeaderSize) break;
          if (auto ec = detail::decode_header(buf_.data() + begin_, limits_.max_message_size,
                                              header_)) {
            fail(ec);
            return false;
          }
          have_header_ = true;
        }
        if (avail < detail::kHeaderSize + header_.length) {
          if (header_.length > kDirectRead) {
            // The rest of a large frame goes straight into its payload string: no second copy,
            // and no read buffer the size of the largest message. Its partial bytes are the
            // last thing in buf_.
            large_in_.assign(buf_.data() + begin_ + detail::kHeaderSize,
                             avail - detail::kHeaderSize);
            large_filled_ = large_in_.size();
            begin_ = end_;
            reading_large_ = true;
          }
          break;
        }
        f.payload.assign(buf_.data() + begin_ + detail::kHeaderSize, header_.length);
        begin_ += detail::kHeaderSize + header_.length;
      }
      if (in_fds_.size() < header_.nfds) {
        if (lost_batches_ == 0) {
          fail(errc::malformed_frame);
          return false;
        }
        --lost_batches_;
        in_fds_.resize(header_.nfds);  // empty: what the kernel could not install
      }
      f.kind = static_cast<FrameKind>(header_.kind);
      f.tag = header_.tag;
      f.fds.clear();
      for (std::size_t i = 0; i < header_.nfds; ++i) {
        f.fds.push_back(std::move(in_fds_.front()));
        in_fds_.pop_front();
      }
      have_header_ = false;
      if (on_frame_) on_frame_(std::move(f));
      f.fds.clear();  // those the callback did not take are closed now, as before
      if (!sock_) return false;
    }
    // A well-behaved sender attaches descriptors only to a frame's first byte, and recvmsg
    // returns one batch per call: only the partial frame (whose header may be read) can own
    // any. More means a peer is smuggling descriptors in to exhaust our table.
    std::size_t allowed = have_header_ ? header_.nfds : begin_ == end_ ? 0 : detail::kMaxFdsPerFrame;
    if (in_fds_.size() > allowed) {
      fail(errc::malformed_frame);
      return false;
    }
    if (begin_ == end_) {
      begin_ = end_ = 0;
      // A large frame leaves a large buffer behind: give it back once it is consumed.
      if (buf_.size() > (std::size_t{1} << 20)) {
        buf_.resize(64 * 1024);
        buf_.shrink_to_fit();
      }
    }
    return true;
  }

  // Makes room for `want` more bytes after end_, compacting before growing.
  void reserve(std::size_t want) {
    if (buf_.size() - end_ >= want) return;
    if (begin_ > 0) {
      std::memmove(buf_.data(), buf_.data() + begin_, end_ - begin_);
      end_ -= begin_;
      begin_ = 0;
    }
    if (buf_.size() - end_ < want) buf_.resize(end_ + want);
  }

  EventLoop& loop_;
  UniqueFd sock_;
  ChannelLimits limits_;
  FrameCallback on_frame_;
  CloseCallback on_close_;
  std::function<void()> on_drained_;
  std::deque<Chunk> out_;
  std::string spare_;  // the buffer of the last chunk sent, for the next one
  std::size_t queued_ = 0;
  bool must_notify_drained_ = false;
  bool pause_when_full_ = false;  // see pause_reading_while_full()
  bool paused_ = false;           // frames are held until the queue drains
  bool held_ = false;             // see hold_reading()
  unsigned burst_writes_ = 0;  // see write_now()
  Clock::time_point burst_start_{};
  std::vector<char> buf_;
  std::size_t begin_ = 0, end_ = 0;
  detail::FrameHeader header_{};
  bool have_header_ = false;
  std::string large_in_;  // the payload of a large frame being read (reading_large_)
  std::size_t large_filled_ = 0;
  bool reading_large_ = false;
  std::deque<UniqueFd> in_fds_;
  std::size_t lost_batches_ = 0;  // batches whose descriptors the kernel could not install
};

/// A connected pair of non-blocking, close-on-exec stream sockets for one master/worker channel.
/// Throws std::system_error (EMFILE, ENFILE).
inline std::pair<UniqueFd, UniqueFd> make_channel_pair() {
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) != 0)
    detail::throw_errno("socketpair");
  return {UniqueFd(sv[0]), UniqueFd(sv[1])};
}

}  // namespace prefork

#endif  // PREFORK_CHANNEL_HPP
