// Driving an EventLoop from a test: run rounds until a condition holds, with a deadline that
// only keeps a broken component from hanging the test run (no timing is asserted).
#ifndef PREFORK_TESTS_SUPPORT_LOOP_HPP
#define PREFORK_TESTS_SUPPORT_LOOP_HPP

#include <chrono>

#include "prefork/event_loop.hpp"

namespace prefork_test {

/// Runs rounds of `loop` until done() holds; false if it did not before `limit` passed.
template <class Done>
bool run_until(prefork::EventLoop& loop, Done done,
               std::chrono::milliseconds limit = std::chrono::seconds(20)) {
  const auto deadline = prefork::Clock::now() + limit;
  while (!done()) {
    if (prefork::Clock::now() > deadline) return false;
    loop.run_once(10);
  }
  return true;
}

}  // namespace prefork_test

#endif  // PREFORK_TESTS_SUPPORT_LOOP_HPP
