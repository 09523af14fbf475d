// The master's phase as one value: where the master is between its construction and the end of
// run(). Every part that must behave differently while the master stops reads it here.
#ifndef PREFORK_MASTER_PHASE_HPP
#define PREFORK_MASTER_PHASE_HPP

#include <prefork/version.hpp>

namespace prefork::detail {

enum class Phase : unsigned char {
  starting,       ///< constructed; run() has not forked the first workers yet
  serving,        ///< run() supervises its workers
  handed_over,    ///< an upgrade succeeded: the new master serves; this one starts to drain
  shutting_down,  ///< draining every worker; run() returns once all have exited
  shutting_down_after_hand_over,  ///< the same, after a successful upgrade
};

/// Restarting, accepting and forking have stopped for good.
constexpr bool stopping(Phase p) noexcept {
  return p == Phase::shutting_down || p == Phase::shutting_down_after_hand_over;
}

/// A new master owns the listening sockets, their files, the control socket and the store.
constexpr bool handed_over(Phase p) noexcept {
  return p == Phase::handed_over || p == Phase::shutting_down_after_hand_over;
}

/// The phase shutdown() moves to.
constexpr Phase shut_down(Phase p) noexcept {
  return handed_over(p) ? Phase::shutting_down_after_hand_over : Phase::shutting_down;
}

}  // namespace prefork::detail

#endif  // PREFORK_MASTER_PHASE_HPP
