// Signals and failures at the edges, with real processes: SIGPIPE from a log whose reader has
// gone (`hello 2>&1 | head -1`) and from a client that reset its connection in a worker whose
// main() ignores SIGPIPE, and an exception that escapes a master callback.
#include <catch2/catch.hpp>

#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "harness.hpp"
#include "hello_process.hpp"
#include "http_client.hpp"

using namespace prefork_test;
using prefork::ExitInfo;
using prefork::Options;
using WorkerT = prefork::Worker<prefork::StringCodec>;

namespace {

// What a worker does with a client that resets its connection: says "ready", waits for the
// reset, then writes to it with plain write(2), as an application's own code would, and
// reports how the write failed and the signal state it started with.
struct Resetter {
  explicit Resetter(prefork::WorkerContext<>& ctx) : ctx_(ctx) {}

  void on_connection(prefork::Connection c) {
    const int fd = c.fd();
    (void)!::write(fd, "ready\n", 6);
    pollfd p{fd, POLLIN, 0};
    (void)::poll(&p, 1, 10000);
    char buf[64];
    while (::read(fd, buf, sizeof buf) > 0) {
    }
    int failed = 0;
    for (int i = 0; i < 3 && !failed; ++i)
      if (::write(fd, "x", 1) < 0) failed = errno;
    ctx_.send("wrote errno=" + std::to_string(failed) + " pipe=" + disposition(SIGPIPE) +
              " usr1=" + disposition(SIGUSR1) + " term=" + disposition(SIGTERM));
  }

  static std::string disposition(int sig) {
    struct sigaction now {};
    ::sigaction(sig, nullptr, &now);
    if (now.sa_handler == SIG_IGN) return "ign";
    if (now.sa_handler == SIG_DFL) return "dfl";
    return "handler";
  }

  prefork::WorkerContext<>& ctx_;
};

void on_usr1(int) {}

// Connects to 127.0.0.1:port, waits for the worker's "ready", and resets the connection
// (SO_LINGER 0: close sends RST). False if the worker never said "ready".
bool connect_and_reset(int port) {
  prefork::UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<std::uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) return false;
  LineReader reader(fd.get());
  auto line = reader.next(Clock::now() + kDeadline);
  linger l{1, 0};
  ::setsockopt(fd.get(), SOL_SOCKET, SO_LINGER, &l, sizeof l);
  return line && *line == "ready";
}

}  // namespace

TEST_CASE("A worker keeps SIG_IGN for SIGPIPE from main(): a write to a reset client fails "
          "with EPIPE",
          "[signals]") {
  FdLeakCheck fds;
  Pipe report;
  REQUIRE(report.read >= 0);
  pid_t master = fork_harness([&] {
    report.close_read();
    // What an application's main() does before run(): the worker must keep the SIG_IGN, lose
    // the handler (it was for the master), and start SIGTERM at its default.
    ::signal(SIGPIPE, SIG_IGN);
    ::signal(SIGTERM, SIG_IGN);
    ::signal(SIGUSR1, on_usr1);
    prefork::Cluster<Resetter> cluster(
        Options{.workers = 2, .listen = {"127.0.0.1:0"}, .handle_signals = false});
    cluster.bind();
    const std::string address = cluster.addresses().front();
    write_all(report.write, "port " + address.substr(address.rfind(':') + 1) + "\n");
    bool timed_out = false;
    arm_watchdog(cluster, timed_out);
    int wrote = 0;
    cluster.on_message([&](WorkerT&, const std::string& m) {
      write_all(report.write, "msg " + m + "\n");
      if (++wrote == 10) cluster.shutdown();
    });
    cluster.on_exit([&](WorkerT&, const ExitInfo& e) {
      write_all(report.write, "exit signal=" + std::to_string(e.signal) + "\n");
    });
    int rc = cluster.run();
    return timed_out ? 3 : rc;
  });
  report.close_write();
  REQUIRE(master > 0);
  LineReader reader(report.read);
  auto port_line = reader.next(Clock::now() + kDeadline);
  if (!port_line) kill_and_reap(master);
  REQUIRE(port_line);
  const int port = static_cast<int>(number_after(*port_line, "port "));
  int ready = 0;
  for (int i = 0; i < 10; ++i) ready += connect_and_reset(port) ? 1 : 0;
  int epipe = 0, sigpipe_deaths = 0, other = 0;
  const auto deadline = Clock::now() + kDeadline;
  while (auto line = reader.next(deadline)) {
    if (*line == "msg wrote errno=" + std::to_string(EPIPE) + " pipe=ign usr1=dfl term=dfl")
      ++epipe;
    else if (*line == "exit signal=" + std::to_string(SIGPIPE))
      ++sigpipe_deaths;
    else if (line->starts_with("msg"))
      ++other;
    if (epipe == 10) break;
  }
  auto status = wait_child(master, Clock::now() + kDeadline);
  if (!status) kill_and_reap(master);
  INFO(reader.transcript());
  CHECK(ready == 10);
  CHECK(sigpipe_deaths == 0);
  CHECK(other == 0);
  CHECK(epipe == 10);
  REQUIRE(status);
  CHECK(WIFEXITED(*status));
  CHECK(WEXITSTATUS(*status) == 0);
}

TEST_CASE("A master whose stderr has lost its reader keeps supervising, not killed by SIGPIPE",
          "[signals]") {
  FdLeakCheck fds;
  Pipe report;
  REQUIRE(report.read >= 0);
  pid_t master = fork_harness([&] {
    report.close_read();
    // `prog 2>&1 | head -1` once head has exited, in an application that leaves SIGPIPE at
    // its default: every log line of the default sink now goes to a pipe nobody reads.
    ::signal(SIGPIPE, SIG_DFL);
    int p[2];
    if (::pipe(p) != 0) return 4;
    ::dup2(p[1], 2);
    ::close(p[0]);
    ::close(p[1]);
    prefork::Cluster<Puppet> cluster(Options{.workers = 1, .handle_signals = false});
    bool timed_out = false;
    arm_watchdog(cluster, timed_out);
    int online = 0;
    cluster.on_online([&](WorkerT& w) {
      if (++online == 1) {  // a crash: logged, and its restart, logged
        w.send("exit:1");
        return;
      }
      write_all(report.write, "restarted\n");
      cluster.shutdown();
    });
    int rc = cluster.run();
    write_all(report.write, "dropped " + std::to_string(prefork::detail::dropped_log_lines()) +
                                "\n");
    return timed_out ? 3 : rc;
  });
  report.close_write();
  REQUIRE(master > 0);
  LineReader reader(report.read);
  auto restarted = reader.next(Clock::now() + kDeadline);
  auto dropped = reader.next(Clock::now() + kDeadline);
  auto status = wait_child(master, Clock::now() + kDeadline);
  if (!status) kill_and_reap(master);
  INFO(reader.transcript());
  REQUIRE(status);
  INFO("wait status " << *status);
  CHECK(WIFEXITED(*status));
  CHECK(WEXITSTATUS(*status) == 0);
  CHECK(restarted == std::optional<std::string>("restarted"));
  REQUIRE(dropped);
  CHECK(number_after(*dropped, "dropped ") >= 4);  // serving, fork, exit, fork at least
}

TEST_CASE("hello keeps serving once the reader of its stdout and stderr has exited",
          "[signals]") {
  FdLeakCheck fds;
  // `hello 2>&1 | head -3`: the reader goes away after the start lines.
  HelloProcess hello({"--workers", "2", "--port", "0", "--work", "0", "--faults", "--control",
                      "off"});
  REQUIRE(hello.start(2));
  const int port = hello.port();
  hello.close_output();
  // The crash makes the master print "Worker N died" and log the exit, and the replacement
  // print "Started process N": all of it into the closed pipe.
  HttpClient crash;
  if (crash.connect("127.0.0.1:" + std::to_string(port)) && crash.send_get("/crash"))
    CHECK(crash.receive().status == 0);  // the worker exits before it answers
  int ok = 0;
  for (int i = 0; i < 20; ++i) {
    HttpResult r = http_get(port);
    if (r.status == 200 && handled_by(r.body) > 0) ++ok;
  }
  CHECK(ok == 20);
  ::kill(hello.pid(), SIGTERM);
  auto status = hello.wait(Clock::now() + kDeadline);
  REQUIRE(status);
  INFO("wait status " << *status);
  CHECK(WIFEXITED(*status));
  CHECK(WEXITSTATUS(*status) == 0);
}

TEST_CASE("An exception from a master callback drains and reaps every worker, then run() "
          "rethrows it",
          "[signals]") {
  FdLeakCheck fds;
  // Where the exception comes from: a timer (after, every), on_exit, on_message.
  const std::string where = GENERATE(as<std::string>{}, "after", "every", "on_exit",
                                     "on_message");
  INFO("thrown from " << where);
  Pipe report;
  REQUIRE(report.read >= 0);
  pid_t master = fork_harness([&] {
    report.close_read();
    prefork::Cluster<Puppet> cluster(Options{.workers = 2, .handle_signals = false});
    bool timed_out = false;
    arm_watchdog(cluster, timed_out);
    std::set<pid_t> forked;
    int online = 0, exits = 0, planned = 0;
    const auto boom = [&where] { throw std::runtime_error("boom in " + where); };
    cluster.on_fork([&](WorkerT& w) { forked.insert(w.pid()); });
    cluster.on_online([&](WorkerT& w) {
      if (++online != 2) return;
      if (where == "after") cluster.after(1ms, boom);
      if (where == "every") cluster.every(50ms, boom);
      if (where == "on_exit") w.send("exit:3");
      if (where == "on_message") w.send("ping");
    });
    cluster.on_exit([&](WorkerT&, const ExitInfo& e) {
      ++exits;
      if (e.exited_after_disconnect) ++planned;
      if (where == "on_exit") boom();
    });
    cluster.on_message([&](WorkerT&, const std::string& m) {
      if (m.starts_with("pong") && where == "on_message") boom();
    });
    std::string caught = "nothing";
    try {
      cluster.run();
    } catch (const std::runtime_error& e) {
      caught = e.what();
    }
    int alive = 0;
    for (pid_t pid : forked) alive += process_gone(pid) ? 0 : 1;
    write_all(report.write, "caught=" + caught + " forked=" + std::to_string(forked.size()) +
                                " exits=" + std::to_string(exits) + " planned=" +
                                std::to_string(planned) + " left=" +
                                std::to_string(cluster.workers().size()) + " alive=" +
                                std::to_string(alive) + (timed_out ? " timed out" : "") + "\n");
    return 0;
  });
  report.close_write();
  REQUIRE(master > 0);
  LineReader reader(report.read);
  auto line = reader.next(Clock::now() + 2 * kDeadline);
  auto status = wait_child(master, Clock::now() + kDeadline);
  if (!status) kill_and_reap(master);
  REQUIRE(line);
  // "caught=boom in <where> forked=N exits=N planned=N left=0 alive=0", nothing more (no
  // "timed out"): every worker forked was reaped by the master, and all but the one that
  // crashed on purpose exited planned (drained).
  auto w = words(*line);
  REQUIRE(w.size() == 8);
  CHECK(w[0] + " " + w[1] + " " + w[2] == "caught=boom in " + where);
  const long forked = number_after(w[3], "forked=");
  CHECK(forked >= 2);
  CHECK(number_after(w[4], "exits=") == forked);
  CHECK(number_after(w[5], "planned=") == forked - (where == "on_exit" ? 1 : 0));
  CHECK(w[6] == "left=0");
  CHECK(w[7] == "alive=0");
  REQUIRE(status);
  CHECK(WIFEXITED(*status));
}
