// expect-error: a Server must be constructible from prefork::WorkerContext<Codec>&
// The worker builds the Server from its WorkerContext or by default. A Server whose only
// constructor takes something else (here the context of another codec than the Cluster's)
// used to fail deep inside std::optional::emplace, naming neither the Server nor the rule.
#include <prefork/cluster.hpp>

struct Bad {
  explicit Bad(prefork::WorkerContext<prefork::PodCodec<int>>& ctx);
  void on_connection(prefork::Connection) {}
};

int main() {
  prefork::Cluster<Bad> cluster;
  return cluster.run();
}
