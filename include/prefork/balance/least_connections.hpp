// LeastConnections: the master hands each connection to the ready worker with the fewest open
// connections, as the workers report them (WorkerContext::connection_opened/closed) plus what
// the master dispatched since their last report. Ties go round-robin by slot, so idle workers
// share a burst instead of the first one taking it all.
#ifndef PREFORK_BALANCE_LEAST_CONNECTIONS_HPP
#define PREFORK_BALANCE_LEAST_CONNECTIONS_HPP

#include <cstddef>
#include <optional>

#include <prefork/version.hpp>
#include <prefork/balance/policy.hpp>

namespace prefork {

class LeastConnections {
 public:
  static constexpr Dispatch dispatch = Dispatch::master;

  std::optional<std::size_t> pick(const PickContext& ctx) noexcept {
    std::optional<std::size_t> best;
    for (std::size_t i = 0; i < ctx.ready.size(); ++i) {
      if (!best) {
        best = i;
        continue;
      }
      const WorkerLoad& a = ctx.ready[i];
      const WorkerLoad& b = ctx.ready[*best];
      if (a.connections != b.connections) {
        if (a.connections < b.connections) best = i;
      } else if (rank(a.slot) < rank(b.slot)) {
        best = i;
      }
    }
    if (best) last_slot_ = ctx.ready[*best].slot;
    return best;
  }

 private:
  // Slots after the last one picked rank first, then the rest, each in slot order (unsigned
  // wrap-around does it: slots at or below last_slot_ land at the top of the range).
  std::size_t rank(std::size_t slot) const noexcept { return slot - (last_slot_ + 1); }
  std::size_t last_slot_ = ~std::size_t{0};
};
static_assert(BalancePolicy<LeastConnections>);

}  // namespace prefork

#endif  // PREFORK_BALANCE_LEAST_CONNECTIONS_HPP
