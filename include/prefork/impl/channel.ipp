// Channel's definitions (channel.hpp): included at the end of that header when header-only,
// compiled once in impl/src.hpp with PREFORK_SEPARATE_COMPILATION (detail/config.hpp).
#ifndef PREFORK_IMPL_CHANNEL_IPP
#define PREFORK_IMPL_CHANNEL_IPP

#include <prefork/channel.hpp>

namespace prefork {

PREFORK_DECL Channel::Channel(EventLoop& loop, UniqueFd sock, ChannelLimits limits,
                              bool keeps_alive)
    : loop_(loop), sock_(std::move(sock)), limits_(limits) {
  loop_.watch(sock_.get(), EventLoop::readable, [this](std::uint32_t ev) { on_events(ev); },
              keeps_alive);
}

PREFORK_DECL std::error_code Channel::send(FrameKind kind, std::string payload, std::uint64_t tag,
                                           std::vector<UniqueFd> fds) {
  const std::size_t n = fds.size();  // before fds is moved from (argument order)
  if (n > detail::kMaxFdsPerFrame) return errc::too_many_fds;
  int raw[detail::kMaxFdsPerFrame] = {};
  for (std::size_t i = 0; i < n; ++i) raw[i] = fds[i].get();
  return enqueue(kind, std::move(payload), tag, raw, n, std::move(fds));
}

PREFORK_DECL bool Channel::flush_blocking(int timeout_ms) {
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

PREFORK_DECL std::error_code Channel::enqueue(FrameKind kind, std::string&& payload,
                                              std::uint64_t tag, const int* fds, std::size_t nfds,
                                              std::vector<UniqueFd> owned) {
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

PREFORK_DECL bool Channel::write_now() noexcept {
  auto now = Clock::now();
  if (now - burst_start_ > kBurstWindow) {
    burst_start_ = now;
    burst_writes_ = 0;
  }
  return ++burst_writes_ <= kBurstWrites;
}

PREFORK_DECL void Channel::rearm() {
  std::uint32_t interest = paused_ ? 0 : EventLoop::readable;
  if (!out_.empty()) interest |= EventLoop::writable;
  loop_.modify(sock_.get(), interest);
}

PREFORK_DECL bool Channel::must_pause() {
  if (paused_) return true;
  if (!held_ && !(pause_when_full_ && over_budget())) return false;
  paused_ = true;
  rearm();
  return true;
}

PREFORK_DECL void Channel::on_events(std::uint32_t ev) {
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

PREFORK_DECL void Channel::fail(std::error_code ec) {
  UniqueFd doomed = take();
  if (on_close_) on_close_(ec);
}

PREFORK_DECL UniqueFd Channel::take() noexcept {
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

PREFORK_DECL std::error_code Channel::flush() {
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

PREFORK_DECL void Channel::pop_chunk() noexcept {
  std::string& b = out_.front().bytes;
  if (b.capacity() > spare_.capacity()) {
    b.clear();
    spare_.swap(b);
  }
  out_.pop_front();
}

PREFORK_DECL bool Channel::read_some() {
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

PREFORK_DECL bool Channel::deliver() {
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

PREFORK_DECL void Channel::reserve(std::size_t want) {
  if (buf_.size() - end_ >= want) return;
  if (begin_ > 0) {
    std::memmove(buf_.data(), buf_.data() + begin_, end_ - begin_);
    end_ -= begin_;
    begin_ = 0;
  }
  if (buf_.size() - end_ < want) buf_.resize(end_ + want);
}

}  // namespace prefork

#endif  // PREFORK_IMPL_CHANNEL_IPP
