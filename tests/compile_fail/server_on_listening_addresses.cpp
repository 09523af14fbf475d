// expect-error: Server::on_listening must be callable as on_listening()
// The master's on_listening callback gets the addresses; the worker's hook gets nothing. A
// Server that copies the master's signature would never hear that it listens.
#include <prefork/cluster.hpp>

#include <string>
#include <vector>

struct Bad {
  void on_connection(prefork::Connection) {}
  void on_listening(const std::vector<std::string>& addresses);
};

int main() {
  prefork::Cluster<Bad> cluster;
  return cluster.run();
}
