// Master dispatch (Node's round_robin_handle.js), the Master's Dispatch for a MasterDispatch
// policy: the master accepts, the policy picks a worker, the connection is handed over its
// channel and kept here until acknowledged; peeking policies first wait for the client's bytes.
#ifndef PREFORK_MASTER_ROUND_ROBIN_HANDLE_HPP
#define PREFORK_MASTER_ROUND_ROBIN_HANDLE_HPP

#include <sys/epoll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <iterator>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include <prefork/version.hpp>
#include <prefork/balance/policy.hpp>
#include <prefork/channel.hpp>
#include <prefork/codec.hpp>
#include <prefork/detail/acceptor.hpp>
#include <prefork/detail/syscall.hpp>
#include <prefork/detail/unique_fd.hpp>
#include <prefork/event_loop.hpp>
#include <prefork/log.hpp>
#include <prefork/master/log.hpp>
#include <prefork/master/phase.hpp>
#include <prefork/master/worker_record.hpp>
#include <prefork/master/worker_table.hpp>

namespace prefork::detail {

// Master dispatch (Node's round_robin_handle.js): accept here, hand each connection to the
// worker the policy picks, and keep the master's own copy of the socket until the worker
// acknowledges it (FrameKind::accepted): if the worker dies first, the connection goes to
// another one instead of being lost. A worker with max_unacked connections unacknowledged
// is busy or stuck and is skipped. With no worker to take one, the master stops accepting:
// clients wait in the kernel backlog instead of being refused (Node closes the socket), and
// accepting resumes when a worker listens or acknowledges again.
//
// A worker whose loop has stopped (a hang, a long blocking call) reads no more frames: the
// connections dealt to it wait in its channel until the watchdog ends it, and with the
// window alone it would be dealt one in every N for that long. A healthy worker acknowledges
// within its loop round (well under a millisecond idle; a round of hello's default work on
// a busy worker is tens of ms), so one that has left a connection unacknowledged for
// kAckBound is dealt no more until it acknowledges: a hung worker costs the one connection
// it holds (Node's round_robin_handle.js deals a worker its next handle only after the last
// was acknowledged, and a hung Node worker costs the same one). A slow worker comes back at
// its next acknowledgement; meanwhile its share goes to the others, or waits in the backlog.
template <MessageCodec Codec, class Balance>
class RoundRobinHandle {
 public:
  using Record = WorkerRecord<Codec>;

  static constexpr std::size_t kMaxUnacked = 128;
  static constexpr std::chrono::milliseconds kAckBound{100};

  /// `listeners`: the master's listening sockets (listeners part), read at each call; the
  /// same constructor as SharedHandle, so that the Master builds either alike.
  RoundRobinHandle(EventLoop& loop, WorkerTable<Codec>& table, const MasterLog& log,
                   const Phase& phase, Balance& balance, const std::vector<UniqueFd>& listeners)
      : loop_(loop), table_(table), log_(log), phase_(phase), balance_(balance),
        listeners_(listeners) {}
  RoundRobinHandle(const RoundRobinHandle&) = delete;
  RoundRobinHandle& operator=(const RoundRobinHandle&) = delete;

  /// run(): the workers are forked; accept once one takes connections.
  void start() { resume_accepting(); }
  /// shutdown(), before the phase changes: accept no more, deal what waits while workers
  /// still take connections by the policy.
  void stop() {
    stop_accepting();
    dispatch_pending();
  }
  /// shutdown(), after the phase changed: see flush_pending.
  void flush() { flush_pending(); }
  /// scale() down: what waits goes to the workers that are left.
  void rebalance() { dispatch_pending(); }

  /// 'listening' (or 'started'): the worker may be dealt connections.
  void worker_ready(Record&) { resume_accepting(); }

  /// The worker acknowledged its next `n` connections (FrameKind::accepted).
  void acknowledged(Record& w, std::size_t n, Clock::time_point now) {
    n = std::min<std::size_t>(n, w.in_flight.size());
    w.in_flight.erase(w.in_flight.begin(), w.in_flight.begin() + static_cast<std::ptrdiff_t>(n));
    w.unacked_since = now;  // its loop turns: the rest count from now
    if (n > 0 && w.out_of_fds) {
      w.out_of_fds = false;
      log_(LogLevel::info, "dispatch", "takes connections again", &w);
    }
    resume_accepting();
  }

  // The worker could not take its next `n` connections: it is at its descriptor limit (the
  // kernel dropped the descriptor on the way in). They are still open here and go back first
  // in line, to another worker or to this one once it has room: it is offered none for
  // kSaturatedPause (nginx pauses accept for accept_mutex_delay on EMFILE, libuv's
  // uv__emfile_trick closes what it cannot serve; here nothing is lost), then again. Clients
  // meanwhile wait in pending_ or in the kernel backlog. One log line per episode: the first
  // decline after the worker last took a connection.
  static constexpr std::chrono::milliseconds kSaturatedPause{100};

  void declined(Record& w, std::size_t n, Clock::time_point now) {
    n = std::min(n, w.in_flight.size());
    pending_.insert(pending_.begin(), std::make_move_iterator(w.in_flight.begin()),
                    std::make_move_iterator(w.in_flight.begin() + static_cast<std::ptrdiff_t>(n)));
    w.in_flight.erase(w.in_flight.begin(), w.in_flight.begin() + static_cast<std::ptrdiff_t>(n));
    w.unacked_since = now;
    w.declined_until = w.unacked_since + kSaturatedPause;
    if (!w.out_of_fds)
      log_(LogLevel::warning, "dispatch",
           "pid " + std::to_string(w.pid) + " is out of descriptors (EMFILE) and declines "
           "connections; they wait for a worker with room",
           &w);
    w.out_of_fds = true;
    stop_accepting();
    loop_.after(kSaturatedPause, [this] { resume_accepting(); }, false);
    resume_accepting();
  }

  // Connections handed to a worker that never acknowledged them (its channel closed with the
  // frames unread) are still open in the master: they go to another worker, first in line.
  void worker_gone(Record& w) {
    if (w.in_flight.empty()) return;
    pending_.insert(pending_.begin(), std::make_move_iterator(w.in_flight.begin()),
                    std::make_move_iterator(w.in_flight.end()));
    w.in_flight.clear();
    loop_.post([this] { resume_accepting(); });
  }

  /// An empty handles frame: it tells the worker to expect connections over the channel.
  void hand_listeners(Record& w, const std::vector<UniqueFd>&) {
    w.channel->send(FrameKind::handles, {}, 0, {});
  }

  /// What a forked child must close: the connections held here, waiting or in flight.
  void descriptors(std::vector<int>& fds) const {
    for (auto& h : pending_) fds.push_back(h.fd.get());
    for (auto& [fd, p] : peeking_) fds.push_back(fd);
    for (auto& [id, w] : table_.live())
      for (auto& h : w->in_flight) fds.push_back(h.fd.get());
  }

  /// Accepted, not handed to any worker yet (first in line first).
  const std::deque<Handoff>& pending() const noexcept { return pending_; }

  static bool window_open(const Record& w, Clock::time_point now) {
    if (now < w.declined_until) return false;
    return w.in_flight.empty() ||
           (w.in_flight.size() < kMaxUnacked && now - w.unacked_since < kAckBound);
  }

  /// Accepts up to 64 connections from `listener` and deals them (its watch calls it).
  void accept_from(int listener) {
    collect_ready();
    acceptor_.accept(listener, [this] {
      if (!ready_.empty()) return true;
      stop_accepting();
      return false;
    }, [this](UniqueFd fd, const detail::SocketAddress& peer) {
      detail::Handoff h{std::move(fd), peer};
      if constexpr (PeeksFirstBytes<Balance>) {
        std::string_view head;
        if (wait_for_head(h, head)) return true;
        if (dispatch(h, &head)) return true;
      } else if (dispatch(h)) {
        return true;
      }
      pending_.push_back(std::move(h));
      stop_accepting();
      return false;
    });
  }

 private:
  void log(LogLevel level, std::string_view event, const std::string& msg) const {
    log_(level, event, msg);
  }

  bool shutting_down() const noexcept { return stopping(phase_); }

  void resume_accepting() {
    if (shutting_down()) return flush_pending();
    if (acceptor_.paused()) return;
    dispatch_pending();
    if (!pending_.empty()) return;
    for (auto& l : listeners_) {
      int raw = l.get();
      if (!loop_.watching(raw))
        loop_.watch(raw, EventLoop::readable, [this, raw](std::uint32_t) { accept_from(raw); },
                    false);
    }
  }

  void stop_accepting() {
    for (auto& l : listeners_) loop_.unwatch(l.get());
  }

  void collect_ready() {
    ready_.clear();
    ready_workers_.clear();
    const Clock::time_point now = Clock::now();
    for (auto& [id, w] : table_.live()) {
      if (w->takes_connections() && window_open(*w, now)) {
        ready_.push_back({w->slot, w->reported_connections + w->in_flight.size()});
        ready_workers_.push_back(w.get());
      }
    }
  }

  // Sends one connection to `w` and keeps the master's copy in its in-flight list; false (the
  // connection still in `h`) if its channel cannot take it now.
  bool hand_to(Record& w, detail::Handoff& h) {
    if (!w.channel->has_room(h.peer.length)) return false;
    std::string address(reinterpret_cast<const char*>(&h.peer.storage), h.peer.length);
    if (w.channel->send_borrowed(FrameKind::connection, std::move(address), 0, h.fd.get()))
      return false;
    if (w.in_flight.empty()) w.unacked_since = Clock::now();
    w.in_flight.push_back(std::move(h));
    return true;
  }

  // Hands one connection to a worker; false (and the connection back in `h`) if none can
  // take it now. A peeking policy sees `head` if the caller has just peeked it, else what
  // the socket holds now.
  bool dispatch(detail::Handoff& h, const std::string_view* head = nullptr) {
    if (ready_.empty()) return false;
    std::string_view bytes;
    if constexpr (PeeksFirstBytes<Balance>) {
      bool closed = false;
      bytes = head ? *head : peek_head(h.fd.get(), closed);
    }
    std::optional<std::size_t> pick =
        balance_.pick(PickContext{h.peer, ready_, table_.slot_count(), bytes});
    std::size_t first = pick && *pick < ready_.size() ? *pick : 0;
    for (std::size_t k = 0; k < ready_workers_.size(); ++k) {
      std::size_t i = (first + k) % ready_workers_.size();
      Record* w = ready_workers_[i];
      if (w->in_flight.size() >= kMaxUnacked || !hand_to(*w, h)) continue;
      ++ready_[i].connections;
      return true;
    }
    return false;
  }

  void dispatch_pending() {
    if (pending_.empty()) return;
    collect_ready();
    while (!pending_.empty() && dispatch(pending_.front())) pending_.pop_front();
  }

  // Shutting down: connections already accepted go to any worker that still reads its channel
  // (a draining worker serves what reaches it before the disconnect frame), whatever its load.
  // Those still waiting for their first bytes go with what they sent so far.
  void flush_pending() {
    if constexpr (PeeksFirstBytes<Balance>) stop_peeking();
    while (!pending_.empty()) {
      detail::Handoff& h = pending_.front();
      bool sent = false;
      for (auto& [id, w] : table_.live())
        if (w->accepts_handoffs() && hand_to(*w, h)) {
          sent = true;
          break;
        }
      if (!sent) break;
      pending_.pop_front();
    }
    if (!pending_.empty())
      log(LogLevel::warning, "shutdown", std::to_string(pending_.size()) +
          " accepted connections closed unanswered: no worker is left to take them");
    pending_.clear();
  }

  // PeeksFirstBytes: the policy picks on the client's first bytes, peeked (MSG_PEEK) so that
  // the worker still reads every byte. A client whose bytes are not all there at accept is
  // watched, edge-triggered: the bytes stay queued (never consumed), so a level-triggered
  // watch would fire on every loop round until the deadline. It waits until the policy has
  // enough, PeekLimits::max_bytes came, or PeekLimits::timeout passed; then it is dispatched
  // as if just accepted. At most PeekLimits::max_waiting wait at once (more are dispatched on
  // what they sent), so silent clients can neither stall the master nor pile up in it; they
  // are the workers' to time out.

  // Peeks into peek_buf_. Empty if nothing came yet; `closed` if the client closed without
  // sending anything, or the socket failed (ECONNRESET).
  std::string_view peek_head(int fd, bool& closed) {
    closed = false;
    std::size_t max = balance_.peek_limits().max_bytes;
    if (max == 0) return {};
    if (peek_buf_.size() < max) peek_buf_.resize(max);
    ssize_t n = detail::retry_eintr(
        [&] { return ::recv(fd, peek_buf_.data(), max, MSG_PEEK | MSG_DONTWAIT); });
    if (n > 0) return {peek_buf_.data(), static_cast<std::size_t>(n)};
    closed = n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK);
    return {};
  }

  // True if `h` was taken: it waits for more bytes, or it was closed. Otherwise `head` holds
  // what the client sent so far and the connection is to be dispatched now.
  bool wait_for_head(detail::Handoff& h, std::string_view& head) {
    const PeekLimits limits = balance_.peek_limits();
    bool closed = false;
    head = peek_head(h.fd.get(), closed);
    if (closed) {
      h.fd.reset();
      return true;
    }
    if (head.size() >= limits.max_bytes || balance_.has_enough(head) ||
        limits.timeout.count() <= 0 || peeking_.size() >= limits.max_waiting)
      return false;
    const int raw = h.fd.get();
    EventLoop::TimerId deadline =
        loop_.after(limits.timeout, [this, raw] { head_arrived(raw, 0, true); }, false);
    try {
      loop_.watch(raw, EPOLLIN | EPOLLRDHUP | EPOLLET,
                  [this, raw](std::uint32_t events) { head_arrived(raw, events, false); },
                  false);
    } catch (const std::system_error& e) {  // epoll_ctl: ENOMEM, ENOSPC (max_user_watches)
      loop_.cancel(deadline);
      log(LogLevel::warning, "accept",
          std::string("cannot wait for a client's first bytes: ") + e.what());
      return false;
    }
    peeking_.emplace(raw, Peeking{std::move(h), deadline});
    return true;
  }

  // More bytes came for a waiting client, or it shut down its side (no more will come), or
  // its deadline passed.
  void head_arrived(int fd, std::uint32_t events, bool deadline) {
    auto it = peeking_.find(fd);
    if (it == peeking_.end()) return;
    bool closed = false;
    std::string_view head = peek_head(fd, closed);
    bool over = deadline || (events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR));
    if (!closed && !over && head.size() < balance_.peek_limits().max_bytes &&
        !balance_.has_enough(head))
      return;
    detail::Handoff h = std::move(it->second.h);
    if (!deadline) loop_.cancel(it->second.deadline);
    loop_.unwatch(fd);
    peeking_.erase(it);
    if (closed) return;  // h closes it
    collect_ready();
    if (pending_.empty() && dispatch(h, &head)) return;
    pending_.push_back(std::move(h));
    stop_accepting();
  }

  // Shutting down: every waiting client is dispatched now, by key if it sent one and its
  // worker still takes connections, else with the pending ones.
  void stop_peeking() {
    if (peeking_.empty()) return;
    collect_ready();
    for (auto& [fd, p] : peeking_) {
      loop_.cancel(p.deadline);
      loop_.unwatch(fd);
      if (!dispatch(p.h)) pending_.push_back(std::move(p.h));
    }
    peeking_.clear();
  }

  EventLoop& loop_;
  WorkerTable<Codec>& table_;
  const MasterLog& log_;
  const Phase& phase_;
  Balance& balance_;
  const std::vector<UniqueFd>& listeners_;
  // EMFILE, ENFILE, ENOBUFS, ENOMEM pause accepting for 100 ms at a time. Logged once per
  // episode, not once per pause: at the descriptor limit one accept may succeed after each pause
  // (a worker's acknowledgement freed a descriptor) and fail again, so the episode ends after a
  // second without a failure.
  detail::Acceptor acceptor_{
      loop_, {.length = std::chrono::milliseconds(100), .quiet = std::chrono::seconds(1)},
      {.stop = [this] { stop_accepting(); },
       .resume = [this] { resume_accepting(); },
       .log = [this](int err) {
         log(LogLevel::warning, "accept",
             std::string("accept: ") + std::strerror(err) +
                 "; pausing accept for 100 ms at a time while it fails");
       }}};
  std::vector<WorkerLoad> ready_;        // workers taking connections (scratch, reused)
  std::vector<Record*> ready_workers_;  // the same, as records
  std::deque<detail::Handoff> pending_;  // accepted, not handed to any worker yet
  struct Peeking {
    detail::Handoff h;
    EventLoop::TimerId deadline = 0;
  };
  std::map<int, Peeking> peeking_;  // PeeksFirstBytes: accepted, waiting for the first bytes
  std::string peek_buf_;            // PeeksFirstBytes: scratch for MSG_PEEK
};

}  // namespace prefork::detail

#endif  // PREFORK_MASTER_ROUND_ROBIN_HANDLE_HPP
