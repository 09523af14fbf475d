// expect-error: Server::on_drain must be callable as on_drain()
// The worker calls on_drain() with nothing: an on_drain(int) would never run, and a Server
// that relies on it to close its connections would keep a draining worker until drain_timeout.
#include <prefork/cluster.hpp>

struct Bad {
  void on_connection(prefork::Connection) {}
  void on_drain(int reason);
};

int main() {
  prefork::Cluster<Bad> cluster;
  return cluster.run();
}
