// The seed's cluster.js + server.js on prefork's API alone: one worker per CPU (or WORKERS), a
// crashed worker replaced, `kill -USR2` restarts them one by one; each answers a request on PORT
// with its pid and the user count the master sends every 10 s. (server.js's CPU loop left out.)
#include <prefork/prefork.hpp>

#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

struct Users {
  explicit Users(prefork::WorkerContext<>& ctx) : ctx_(ctx) {
    std::printf("Started process %d\n", ::getpid());
  }
  void on_message(const std::string& count) { users_ = count; }
  void on_connection(prefork::Connection c) {
    auto conn = std::make_shared<prefork::Connection>(std::move(c));
    ctx_.loop().watch(conn->fd(), prefork::EventLoop::readable, [this, conn](std::uint32_t) {
      char request[4096];  // one read: enough for curl's GET, not an HTTP parser
      if (::recv(conn->fd(), request, sizeof request, 0) < 0 && errno == EAGAIN) return;
      std::string body = "Handled by process " + std::to_string(::getpid()) + "\nUsers: " + users_;
      std::string response = "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: " +
                             std::to_string(body.size()) + "\r\n\r\n" + body;
      ::send(conn->fd(), response.data(), response.size(), MSG_NOSIGNAL);
      ctx_.loop().unwatch(conn->fd());  // drops the last copy of `conn`, which closes it
    });
  }
  prefork::WorkerContext<>& ctx_;
  std::string users_ = "unknown";
};
static_assert(prefork::Server<Users>);

int main() {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // one line at a time, also into a pipe
  const char* port = std::getenv("PORT");
  const char* workers = std::getenv("WORKERS");
  prefork::Cluster<Users> cluster(prefork::Options{
      .workers = workers ? unsigned(std::atoi(workers)) : prefork::cpu_count(),
      .listen = {std::string("127.0.0.1:") + (port ? port : "8080")}});
  long users = 5;  // the article's count of users in a database; outlives run(), which uses it
  if (cluster.is_master()) {
    cluster.on_online([&](auto& worker) { worker.send(std::to_string(users)); });
    cluster.every(std::chrono::seconds(10), [&] { cluster.broadcast(std::to_string(++users)); });
    cluster.bind();
    std::printf("Master PID: %d\nListening on %s\n", ::getpid(), cluster.addresses()[0].c_str());
  }
  return cluster.run();
}
