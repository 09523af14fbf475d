// expect-error: Server::on_request must be callable as on_request(const message_type&, prefork::Reply<Codec>)
// An on_request that returns its answer instead of taking a Reply: the worker has no way to
// call it, so every request from the master would fail with errc::no_handler.
#include <prefork/cluster.hpp>

#include <string>

struct Bad {
  std::string on_request(const std::string& m) { return m; }
};

int main() {
  prefork::Cluster<Bad> cluster;
  return cluster.run();
}
