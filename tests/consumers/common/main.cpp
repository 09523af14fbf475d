// The program every project in tests/consumers builds, whichever way it gets prefork: a master
// with two workers on 127.0.0.1:0, each of which tells the master it is listening; once both
// have, the master shuts the cluster down gracefully and prints one line. A worker that dies
// unasked, a wrong message, or no result within kDeadline makes it exit 1, so a broken build,
// install or package shows up as a failure and never as a hang.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <exception>
#include <map>
#include <string>
#include <system_error>

#include <prefork/prefork.hpp>

namespace {

// Generous: CI runs this next to other builds on a small, noisy machine.
constexpr auto kDeadline = std::chrono::seconds(20);

struct Greeter {
  explicit Greeter(prefork::WorkerContext<>& ctx) : ctx_(ctx) {}

  // Runs in the worker once it is listening. The pid, compared by the master with the pid it
  // forked, shows that the message really crossed from that process.
  void on_listening() {
    if (auto ec = ctx_.send(std::to_string(::getpid())))
      throw std::system_error(ec, "consumer: send to the master");
  }

  // The check is that workers start and talk to the master; a connection is just closed.
  void on_connection(prefork::Connection) {}

 private:
  prefork::WorkerContext<>& ctx_;
};

using GreeterCluster = prefork::Cluster<Greeter>;

}  // namespace

int main() try {
  GreeterCluster cluster({.workers = 2, .listen = {"127.0.0.1:0"}});

  std::map<unsigned, pid_t> started;  // worker id -> pid
  std::string address;
  std::string failure;
  auto fail = [&](std::string why) {
    if (failure.empty()) failure = std::move(why);
    cluster.shutdown(true);
  };

  cluster.on_message([&](GreeterCluster::WorkerT& w, const std::string& m) {
    if (m != std::to_string(w.pid()))
      return fail("worker " + std::to_string(w.id()) + " (pid " + std::to_string(w.pid()) +
                  ") sent \"" + m + "\" instead of its pid");
    started.emplace(w.id(), w.pid());
    if (started.size() == 2 && failure.empty()) {
      if (!cluster.addresses().empty()) address = cluster.addresses().front();
      cluster.shutdown();
    }
  });
  cluster.on_exit([&](GreeterCluster::WorkerT& w, const prefork::ExitInfo& e) {
    if (!e.exited_after_disconnect || e.exit_code != 0)
      fail("worker " + std::to_string(w.id()) + " (pid " + std::to_string(w.pid()) +
           ") ended unasked: exit code " + std::to_string(e.exit_code) + ", signal " +
           std::to_string(e.signal));
  });
  cluster.after(kDeadline, [&] {
    fail("only " + std::to_string(started.size()) + " of 2 workers reported within " +
         std::to_string(kDeadline.count()) + " s");
  });

  const int status = cluster.run();
  if (!failure.empty() || status != 0 || started.size() != 2) {
    std::fprintf(stderr, "consumer: FAILED: %s (run() returned %d)\n",
                 failure.empty() ? "the cluster stopped early" : failure.c_str(), status);
    return 1;
  }
  std::printf("consumer: 2 workers listened on %s (pids %d %d) and shut down cleanly\n",
              address.c_str(), static_cast<int>(started.begin()->second),
              static_cast<int>(started.rbegin()->second));
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "consumer: FAILED: %s\n", e.what());
  return 1;
}
