// ReusePort: one SO_REUSEPORT listening socket per slot, all bound to the same address; the
// kernel spreads new connections across them by a hash of the 4-tuple, and each worker accepts
// only from its own. The master keeps every slot's socket open, so connections queued for a
// worker that dies wait for its replacement instead of being reset (what nginx loses).
#ifndef PREFORK_BALANCE_REUSE_PORT_HPP
#define PREFORK_BALANCE_REUSE_PORT_HPP

#include <prefork/version.hpp>
#include <prefork/balance/policy.hpp>

namespace prefork {

struct ReusePort {
  static constexpr Dispatch dispatch = Dispatch::kernel;
  static constexpr bool reuse_port = true;
};
static_assert(BalancePolicy<ReusePort>);

}  // namespace prefork

#endif  // PREFORK_BALANCE_REUSE_PORT_HPP
