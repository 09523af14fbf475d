// The BalancePolicy concept: who accepts a connection. Kernel-dispatch policies let every
// worker accept from listening sockets it was handed; master-dispatch policies have the master
// accept and pick a worker for each connection (the pick() seam; see balance/ built-ins).
#ifndef PREFORK_BALANCE_POLICY_HPP
#define PREFORK_BALANCE_POLICY_HPP

#include <concepts>
#include <cstddef>
#include <optional>
#include <span>

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
};

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
