// The second translation unit of the separate_compilation consumer: it includes prefork.hpp
// again and calls the master's API for the default policies (every member that impl/src.hpp
// instantiates), so that the link needs each of those definitions exactly once. Nothing calls
// it: the link is the test.
#include <chrono>
#include <string>

#include <prefork/prefork.hpp>

namespace {

struct Echo {
  void on_message(const std::string&) {}
};

}  // namespace

int second_unit(bool really) {
  if (!really) return 0;
  prefork::Cluster<Echo> cluster({.workers = 1, .listen = {"127.0.0.1:0"}});
  auto& master = cluster.master();
  master.bind();
  master.fork();
  master.send(1, "x");
  master.broadcast("x");
  master.cancel(master.every(std::chrono::seconds(1), [] {}));
  master.after(std::chrono::seconds(1), [] {});
  master.query_status([](const prefork::ClusterStatus&) {});
  master.listen_control("/nonexistent");
  (void)master.scale(1);
  (void)master.workers_wanted();
  (void)master.status();
  (void)master.workers();
  (void)master.worker(1);
  master.reload();
  (void)master.upgrade();
  master.shutdown();
  return master.run() + cluster.run();
}
