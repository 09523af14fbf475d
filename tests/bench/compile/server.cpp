// The program tests/bench/compile.sh times: a 90-line Server program of the kind issue 14 names,
// cut from examples/broadcast (the master broadcasts a users count every interval, each worker
// answers every connection with its pid and the last count), on the default policies
// (prefork::Cluster<Server>: RoundRobin, Backoff<RestartOnCrash>, StringCodec). It is compiled
// and linked by the script, not by the build.
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <string>
#include <string_view>

#include <prefork/prefork.hpp>

namespace {

struct Config {
  std::string host = "127.0.0.1";
  unsigned port = 8080;
  unsigned workers = prefork::cpu_count();
  unsigned interval_ms = 10000;
};

unsigned number(std::string_view text, unsigned fallback) {
  unsigned v = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  return ec == std::errc{} && end == text.data() + text.size() ? v : fallback;
}

class UsersServer {
 public:
  explicit UsersServer(prefork::WorkerContext<>& ctx)
      : ctx_(ctx), head_("Handled by process " + std::to_string(ctx.pid()) + "\n") {}

  void on_message(const std::string& users) { users_ = users; }
  void on_connection(prefork::Connection c) {
    auto conn = std::make_shared<prefork::Connection>(std::move(c));
    ctx_.loop().watch(conn->fd(), prefork::EventLoop::readable, [this, conn](std::uint32_t) {
      char request[4096];
      if (::recv(conn->fd(), request, sizeof request, 0) < 0 && errno == EAGAIN) return;
      std::string body = head_ + "Users: " + users_;
      std::string response = "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: " +
                             std::to_string(body.size()) + "\r\n\r\n" + body;
      ::send(conn->fd(), response.data(), response.size(), MSG_NOSIGNAL);
      ctx_.loop().unwatch(conn->fd());
    });
  }
  void on_listening() { std::printf("Started process %d\n", static_cast<int>(::getpid())); }
  void on_drain() { draining_ = true; }

 private:
  prefork::WorkerContext<>& ctx_;
  std::string head_;
  std::string users_ = "unknown";
  bool draining_ = false;
};

// compile.sh compiles this file against an older commit's headers too, which may predate the
// Server concept: the check only where the concept is (its header's include guard).
#if defined(PREFORK_SERVER_HPP)
static_assert(prefork::Server<UsersServer>);
#endif
using UsersCluster = prefork::Cluster<UsersServer>;

int serve(const Config& config) {
  UsersCluster cluster(prefork::Options{
      .workers = config.workers,
      .listen = {config.host + ":" + std::to_string(config.port)},
  });
  if (cluster.is_master()) {
    long users = 5;
    cluster.bind();
    std::printf("Master PID: %d\nListening on %s\n", static_cast<int>(::getpid()),
                cluster.addresses().front().c_str());
    cluster.on_online([&users](UsersCluster::WorkerT& w) { w.send(std::to_string(users)); });
    cluster.on_exit([](UsersCluster::WorkerT& w, const prefork::ExitInfo&) {
      std::printf("Worker %u exited\n", w.id());
    });
    cluster.every(std::chrono::milliseconds(config.interval_ms), [&] {
      users *= 2;
      cluster.broadcast(std::to_string(users));
    });
  }
  return cluster.run();
}

}  // namespace

int main(int argc, char** argv) {
  Config config;
  if (argc > 1) config.port = number(argv[1], config.port);
  if (argc > 2) config.workers = number(argv[2], config.workers);
  try {
    return serve(config);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "server: %s\n", e.what());
    return 1;
  }
}
