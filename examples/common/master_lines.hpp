// The lines the examples' masters print on stdout when a worker crashes and when a rolling
// restart ends, in the seed's wording; the tests and benchmarks wait for them, so every example
// prints them alike.
#ifndef PREFORK_EXAMPLES_COMMON_MASTER_LINES_HPP
#define PREFORK_EXAMPLES_COMMON_MASTER_LINES_HPP

#include <cstdio>

#include <prefork/prefork.hpp>

namespace master_lines {

/// "Worker 4121 died (code 1 / signal 0); starting a new one" for each exit that is a crash
/// (the seed's exit handler): not after a disconnect, not with status 0.
template <class ClusterT>
void print_crashes(ClusterT& cluster) {
  cluster.on_exit([](typename ClusterT::WorkerT& w, const prefork::ExitInfo& e) {
    if (e.exited_after_disconnect || !e.crashed()) return;
    std::printf("Worker %d died (code %d / signal %d); starting a new one\n",
                static_cast<int>(w.pid()), e.exit_code, e.signal);
    std::fflush(stdout);
  });
}

/// "Reload done: 2 workers replaced in 12 ms", or "Reload failed: <why>; old workers keep
/// serving", when a rolling restart ends.
template <class ClusterT>
void print_reloads(ClusterT& cluster) {
  cluster.on_reload_done([](const prefork::ReloadReport& r) {
    if (r.ok) {
      std::printf("Reload done: %u workers replaced in %lld ms\n", r.replaced,
                  static_cast<long long>(r.took.count()));
    } else {
      std::printf("Reload failed: %s; old workers keep serving\n", r.reason.c_str());
    }
    std::fflush(stdout);
  });
}

}  // namespace master_lines

#endif  // PREFORK_EXAMPLES_COMMON_MASTER_LINES_HPP
