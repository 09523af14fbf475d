// The one clock of the library: timers, timeouts and the watchdog all measure on it. A header of
// its own so that the event loop need not include the cluster's Options to name it.
#ifndef PREFORK_CLOCK_HPP
#define PREFORK_CLOCK_HPP

#include <chrono>

#include <prefork/version.hpp>

namespace prefork {

using Clock = std::chrono::steady_clock;

}  // namespace prefork

#endif  // PREFORK_CLOCK_HPP
