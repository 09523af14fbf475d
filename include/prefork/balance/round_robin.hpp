// RoundRobin: the master accepts every connection and hands it to the next ready worker in slot
// order (Node's SCHED_RR, its default outside Windows). The kernel's own spreading of accepts
// is uneven when workers are idle: one worker tends to win every wake-up.
#ifndef PREFORK_BALANCE_ROUND_ROBIN_HPP
#define PREFORK_BALANCE_ROUND_ROBIN_HPP

#include <cstddef>
#include <optional>

#include <prefork/version.hpp>
#include <prefork/balance/policy.hpp>

namespace prefork {

class RoundRobin {
 public:
  static constexpr Dispatch dispatch = Dispatch::master;

  /// The first ready worker whose slot comes after the last one picked, wrapping around; so a
  /// worker that leaves or joins the ready set does not reset the rotation.
  std::optional<std::size_t> pick(const PickContext& ctx) noexcept {
    std::optional<std::size_t> next, lowest;
    for (std::size_t i = 0; i < ctx.ready.size(); ++i) {
      std::size_t s = ctx.ready[i].slot;
      if (!lowest || s < ctx.ready[*lowest].slot) lowest = i;
      if ((!started_ || s > last_slot_) && (!next || s < ctx.ready[*next].slot)) next = i;
    }
    if (!lowest) return std::nullopt;
    std::size_t chosen = next ? *next : *lowest;
    last_slot_ = ctx.ready[chosen].slot;
    started_ = true;
    return chosen;
  }

 private:
  std::size_t last_slot_ = 0;
  bool started_ = false;
};
static_assert(BalancePolicy<RoundRobin>);

}  // namespace prefork

#endif  // PREFORK_BALANCE_ROUND_ROBIN_HPP
