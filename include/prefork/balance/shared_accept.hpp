// SharedAccept: every worker accepts from the same listening sockets, inherited from the
// master (Node's SCHED_NONE). Each worker waits with EPOLLEXCLUSIVE so one connection wakes one
// worker, not all of them (epoll_ctl(2); the thundering herd nginx solved with accept_mutex).
#ifndef PREFORK_BALANCE_SHARED_ACCEPT_HPP
#define PREFORK_BALANCE_SHARED_ACCEPT_HPP

#include <prefork/version.hpp>
#include <prefork/balance/policy.hpp>

namespace prefork {

struct SharedAccept {
  static constexpr Dispatch dispatch = Dispatch::kernel;
};
static_assert(BalancePolicy<SharedAccept>);

}  // namespace prefork

#endif  // PREFORK_BALANCE_SHARED_ACCEPT_HPP
