// expect-error: DecidesRestart
// Backoff accepts only a RestartPolicy as its Inner. An on_exit that answers a bool ("restart?")
// cannot say how long to wait or that the slot is crash-looping, so it must be rejected at the
// point of use, with an error that names the missing requirement.
#include <cstddef>

#include "prefork/restart.hpp"

struct Bad {
  bool on_exit(std::size_t, const prefork::ExitInfo&) { return true; }
};

int main() {
  prefork::Backoff<Bad> policy;
  (void)policy;
}
