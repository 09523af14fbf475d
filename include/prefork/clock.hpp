// The clock of the event loop's timers and of every deadline the library keeps: monotonic, so
// that setting the wall clock neither fires a timer early nor holds one back. In its own header
// so that the event loop names it without pulling in the cluster's options.
#ifndef PREFORK_CLOCK_HPP
#define PREFORK_CLOCK_HPP

#include <chrono>

#include <prefork/version.hpp>

namespace prefork {

using Clock = std::chrono::steady_clock;

}  // namespace prefork

#endif  // PREFORK_CLOCK_HPP
