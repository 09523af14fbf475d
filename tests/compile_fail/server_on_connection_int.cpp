// expect-error: Server::on_connection must be callable as on_connection(prefork::Connection)
// A Server whose on_connection takes a descriptor number: the worker cannot call it with a
// Connection, and it used to be taken for "no on_connection", so every worker exited at its
// first listener and the master restarted them in a loop. Now the Cluster refuses it.
#include <prefork/cluster.hpp>

struct Bad {
  void on_connection(int fd);
};

int main() {
  prefork::Cluster<Bad> cluster;
  return cluster.run();
}
