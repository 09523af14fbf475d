// The BalancePolicy concept: who accepts a connection. Kernel-dispatch policies let every
// worker accept from listening sockets it was handed; master-dispatch policies have the master
// accept and pick a worker for each connection (the pick() seam; see balance/ built-ins).
#ifndef PREFORK_BALANCE_POLICY_HPP
#define PREFORK_BALANCE_POLICY_HPP

#include <chrono>
#include <concepts>
#include <cstddef>
#include <optional>
#include <span>
#include <string_view>

#include <prefork/version.hpp>
#include <prefork/detail/socket.hpp>

namespace prefork {

enum class Dispatch {
  kernel,  ///< workers accept themselves; the kernel decides which one wakes
  master,  ///< the master accepts and hands each connection to the worker pick() names
};

/// What a master-dispatch policy sees when it picks a worker for one connection.
struct WorkerLoad {
  std::size_t slot;         ///< the worker's slot, stable across its restarts
  std::size_t connections;  ///< open connections the worker reported
};
struct PickContext {
  const detail::SocketAddress& peer;  ///< the client
  std::span<const WorkerLoad> ready;  ///< workers taking connections now; never empty
  std::size_t slots = 0;              ///< slots in the cluster, ready or not
  /// The first bytes the client sent, peeked, not consumed (the worker reads them all again).
  /// Empty unless the policy PeeksFirstBytes; may be partial (the wait ended first).
  std::string_view head{};
};

/// How long, and for how much, the master waits for a client's first bytes before it picks
/// (PeeksFirstBytes). The master never blocks on a client: it watches the socket and picks at
/// the deadline with what has come, which may be nothing.
struct PeekLimits {
  std::size_t max_bytes = 8192;  ///< peek at most this much; a longer head is judged on these
  std::chrono::milliseconds timeout{200};  ///< from accept; then pick with what came
  std::size_t max_waiting = 1024;  ///< sockets waiting at once; more are picked at once
};

/// The longest session key a worker may bind (WorkerContext::bind_session) and a peeking
/// policy looks up: keys are cookie values and the like, and the master holds a table of them.
inline constexpr std::size_t max_session_key_bytes = 1024;

template <class B>
concept HasDispatchMode = requires {
  { B::dispatch } -> std::convertible_to<Dispatch>;
};

/// Master dispatch: returns an index into ctx.ready, or nullopt to let the master fall back to
/// the first ready worker.
template <class B>
concept PicksWorker = requires(B& b, const PickContext& ctx) {
  { b.pick(ctx) } -> std::same_as<std::optional<std::size_t>>;
};

/// Kernel dispatch with one SO_REUSEPORT listening socket per slot instead of one shared
/// socket: detected from `static constexpr bool reuse_port = true`.
/// Master dispatch that looks at the client's first bytes (PickContext::head) before it picks,
/// e.g. for a session cookie. has_enough(head) says no further byte can change the pick (the
/// key is found, or the head ended without one); until then, and up to peek_limits(), the
/// master waits for more. Detected, so that other policies never wait.
template <class B>
concept PeeksFirstBytes = requires(const B& b, std::string_view head) {
  { b.peek_limits() } -> std::convertible_to<PeekLimits>;
  { b.has_enough(head) } -> std::convertible_to<bool>;
};

/// Optional hook: a worker bound a session key to its slot (WorkerContext::bind_session,
/// FrameKind::bind). Runs in the master; policies without it ignore the frame.
template <class B>
concept BindsKeys = requires(B& b, std::string_view key, std::size_t slot) { b.bind(key, slot); };

template <class B>
concept WantsReusePort = requires {
  { B::reuse_port } -> std::convertible_to<bool>;
} && B::reuse_port;

template <class B>
concept KernelDispatch = HasDispatchMode<B> && (B::dispatch == Dispatch::kernel);

template <class B>
concept MasterDispatch = HasDispatchMode<B> && (B::dispatch == Dispatch::master) && PicksWorker<B>;

template <class B>
concept BalancePolicy = std::default_initializable<B> && (KernelDispatch<B> || MasterDispatch<B>);

}  // namespace prefork

#endif  // PREFORK_BALANCE_POLICY_HPP
