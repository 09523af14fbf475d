// The one accept loop of every listening socket the library serves (the master's dispatch, a
// kernel-dispatch worker's listeners, the control socket): a batch of accept4 per readiness,
// per-connection failures skipped, and a pause instead of a spin at the descriptor limit.
#ifndef PREFORK_DETAIL_ACCEPTOR_HPP
#define PREFORK_DETAIL_ACCEPTOR_HPP

#include <sys/socket.h>

#include <cerrno>
#include <chrono>
#include <functional>
#include <type_traits>
#include <utility>

#include <prefork/detail/socket.hpp>
#include <prefork/detail/syscall.hpp>
#include <prefork/detail/unique_fd.hpp>
#include <prefork/event_loop.hpp>

namespace prefork::detail {

/// How an Acceptor pauses when accept fails for want of resources, and how it tells one episode
/// of such failures from the next (one log line per episode).
struct AcceptPause {
  /// How long the listeners stay unwatched before the owner watches them again.
  Clock::duration length = std::chrono::milliseconds(100);
  /// Zero: an episode ends at the next accepted connection. Otherwise it ends only after this
  /// long without a failure, for an owner whose accepts alternate with failures at the limit.
  Clock::duration quiet = Clock::duration::zero();
};

/// Accepts from listening sockets on an EventLoop. Its owner watches the listeners and calls
/// accept() when one is readable. The owner's hooks: `stop` unwatches every listener when a
/// pause starts, `resume` runs when it is over (the owner watches them again if it still
/// accepts), `log` (may be empty) runs once per episode with the errno of its first failure.
/// The pause timer does not keep the loop alive; an owner that may outlive it, or that stops
/// for good, calls cancel(). Single-threaded, on the loop's thread; any process.
class Acceptor {
 public:
  struct Hooks {
    std::function<void()> stop;
    std::function<void()> resume;
    std::function<void(int)> log;
  };

  /// How many accept4 calls one readiness gets before yielding to the loop.
  static constexpr int kBatch = 64;

  Acceptor(EventLoop& loop, AcceptPause pause, Hooks hooks)
      : loop_(loop), pause_(pause), hooks_(std::move(hooks)) {}
  Acceptor(const Acceptor&) = delete;
  Acceptor& operator=(const Acceptor&) = delete;

  /// Accepts up to kBatch connections from `listener` (non-blocking, close-on-exec), each while
  /// more() holds, and hands each to on_accept(UniqueFd, const SocketAddress& peer), or to
  /// on_accept(UniqueFd) when it takes no address; on_accept returns false to end the batch.
  /// Returns at EAGAIN. ECONNABORTED, EPROTO and EPERM (a connection that died in the backlog,
  /// one a firewall rule refused) cost that connection only. Any other failure (EMFILE, ENFILE,
  /// ENOBUFS, ENOMEM) leaves the listener readable, so a level-triggered watch would spin: the
  /// listeners pause instead and are watched again from a timer (libuv's uv__emfile_trick
  /// lesson; nginx disables accept events for accept_mutex_delay).
  template <class More, class OnAccept>
  void accept(int listener, More&& more, OnAccept&& on_accept) {
    constexpr bool with_peer = std::is_invocable_v<OnAccept&, UniqueFd, const SocketAddress&>;
    for (int i = 0; i < kBatch && more(); ++i) {
      SocketAddress peer;
      peer.length = sizeof peer.storage;
      UniqueFd fd(retry_eintr([&] {
        return ::accept4(listener, with_peer ? peer.get() : nullptr,
                         with_peer ? &peer.length : nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      }));
      if (!fd) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) return;
        if (errno == ECONNABORTED || errno == EPROTO || errno == EPERM) continue;
        return pause(errno);
      }
      if (pause_.quiet == Clock::duration::zero()) in_episode_ = false;
      bool go_on;
      if constexpr (with_peer) go_on = on_accept(std::move(fd), std::as_const(peer));
      else go_on = on_accept(std::move(fd));
      if (!go_on) return;
    }
  }

  /// A pause is under way: the owner must not watch the listeners again before it ends.
  bool paused() const noexcept { return timer_ != 0; }

  /// Ends a pause without running `resume`.
  void cancel() noexcept {
    if (timer_) loop_.cancel(std::exchange(timer_, 0));
  }

 private:
  void pause(int err) {
    const Clock::time_point now = Clock::now();
    const bool timed = pause_.quiet != Clock::duration::zero();
    const bool new_episode = !in_episode_ || (timed && now - failed_at_ > pause_.quiet);
    in_episode_ = true;
    failed_at_ = now;
    if (new_episode && hooks_.log) hooks_.log(err);
    hooks_.stop();
    cancel();
    timer_ = loop_.after(pause_.length, [this] {
      timer_ = 0;
      hooks_.resume();
    }, false);
  }

  EventLoop& loop_;
  AcceptPause pause_;
  Hooks hooks_;
  EventLoop::TimerId timer_ = 0;
  bool in_episode_ = false;
  Clock::time_point failed_at_{};
};

}  // namespace prefork::detail

#endif  // PREFORK_DETAIL_ACCEPTOR_HPP
