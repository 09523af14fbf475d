// The asio_hello example (examples/asio_hello/main.cpp: a Server on standalone asio, its
// io_context nested in the worker's prefork loop) as a user runs it: both workers answer, a
// connection stays alive across requests (pipelined ones included), a worker closes every
// socket it adopted, rolling restarts under load lose no request, an idle connection of a
// draining worker is closed with a FIN, and SIGTERM ends everything with status 0.
// Built only where asio is installed, as the example is.
#include <catch2/catch.hpp>

#if __has_include(<asio.hpp>)

#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <filesystem>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <system_error>
#include <vector>

#include "harness.hpp"
#include "hello_process.hpp"
#include "http_client.hpp"

using namespace prefork_test;

namespace {

const std::string kAsioHello = PREFORK_EXAMPLES_DIR "/asio_hello";

bool exited_zero(const std::optional<int>& status) {
  return status && WIFEXITED(*status) && WEXITSTATUS(*status) == 0;
}

/// Descriptors open in process pid (any process of this user), or -1 if it is gone.
long count_fds_of(pid_t pid) {
  std::error_code ec;
  long n = 0;
  for (auto it = std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/fd", ec);
       !ec && it != std::filesystem::directory_iterator(); it.increment(ec))
    ++n;
  return ec ? -1 : n;
}

/// Waits until pid holds `want` descriptors; the last count seen (want on success). /proc has
/// no change notification, so this looks every few milliseconds up to the deadline.
long wait_fd_count(pid_t pid, long want, Clock::time_point deadline) {
  long n = count_fds_of(pid);
  while (n != want && Clock::now() < deadline) {
    ::poll(nullptr, 0, 5);
    n = count_fds_of(pid);
  }
  return n;
}

/// The result of the next read on a blocking socket: bytes read, 0 at EOF, -errno on error.
long next_read(int fd) {
  char c;
  for (;;) {
    ssize_t n = ::recv(fd, &c, 1, 0);
    if (n < 0 && errno == EINTR) continue;
    return n < 0 ? -errno : static_cast<long>(n);
  }
}

/// Each replacement's "Started process" line and the master's "Reload ..." line of one
/// rolling restart, in whatever order they come.
struct ReloadLines {
  std::vector<pid_t> started;
  std::optional<std::string> outcome;
};

ReloadLines read_reload(HelloProcess& p, std::size_t workers, Clock::time_point deadline) {
  ReloadLines r;
  while (r.started.size() < workers || !r.outcome) {
    auto line = p.out().next(deadline);
    if (!line) break;
    if (line->starts_with("Started process "))
      r.started.push_back(static_cast<pid_t>(number_after(*line, "Started process ")));
    if (line->starts_with("Reload ")) r.outcome = *line;
  }
  return r;
}

std::string first_lines(const std::vector<std::string>& lines, std::size_t n = 20) {
  std::string s;
  for (std::size_t i = 0; i < lines.size() && i < n; ++i) s += lines[i] + "\n";
  if (lines.size() > n) s += "... and " + std::to_string(lines.size() - n) + " more\n";
  return s;
}

void stop_with_sigterm(HelloProcess& p) {
  REQUIRE(::kill(p.pid(), SIGTERM) == 0);
  CHECK(exited_zero(p.wait(Clock::now() + kDeadline)));
}

}  // namespace

TEST_CASE("asio_hello answers from both workers and exits 0 on SIGTERM with no worker left",
          "[asio_hello]") {
  REQUIRE(::access(kAsioHello.c_str(), X_OK) == 0);
  FdLeakCheck fds;
  HelloProcess p(kAsioHello, {"--workers", "2", "--port", "0"});
  REQUIRE(p.pid() > 0);
  INFO(p.out().transcript());
  REQUIRE(p.start(2));
  CHECK(p.master_pid() == p.pid());
  std::vector<std::string> failures;
  auto by_pid = get_many(p.port(), 40, failures);
  CHECK(failures.empty());
  CHECK(keys(by_pid) == std::set<pid_t>(p.workers().begin(), p.workers().end()));
  stop_with_sigterm(p);
  for (pid_t pid : p.workers()) {
    INFO("worker " << pid);
    CHECK(process_gone(pid));
  }
  CHECK_FALSE(p.out().next(Clock::now() + kDeadline).has_value());  // nobody holds its stdout
  CHECK(http_get(p.port()).status == 0);                            // the port is closed
}

TEST_CASE("asio_hello keeps a connection alive across requests, pipelined ones in order",
          "[asio_hello]") {
  REQUIRE(::access(kAsioHello.c_str(), X_OK) == 0);
  FdLeakCheck fds;
  HelloProcess p(kAsioHello, {"--workers", "2", "--port", "0"});
  REQUIRE(p.pid() > 0);
  INFO(p.out().transcript());
  REQUIRE(p.start(2));
  const std::string address = "127.0.0.1:" + std::to_string(p.port());

  {
    KeepAliveClient client(address);
    std::set<pid_t> answered_by;
    for (int i = 0; i < 30; ++i) {
      HttpResult r = client.get();
      INFO("request " << i << ": " << r.error);
      REQUIRE(r.status == 200);
      answered_by.insert(handled_by(r.body));
      CHECK_FALSE(client.closed_by_server());
    }
    CHECK(client.connections() == 1);
    REQUIRE(answered_by.size() == 1);
    CHECK(std::count(p.workers().begin(), p.workers().end(), *answered_by.begin()) == 1);
  }

  SECTION("three requests in one write, the last asking to close") {
    HttpClient c;
    REQUIRE(c.connect(address));
    const std::string get = "GET / HTTP/1.1\r\nHost: localhost\r\n";
    REQUIRE(write_all(c.fd(), get + "\r\n" + get + "\r\n" + get + "Connection: close\r\n\r\n"));
    std::string buf;
    std::set<pid_t> pids;
    for (int i = 0; i < 3; ++i) {
      bool close = false;
      HttpResult r = read_http_answer(c.fd(), buf, close);
      INFO("answer " << i << ": " << r.error);
      REQUIRE(r.status == 200);
      pids.insert(handled_by(r.body));
      CHECK(close == (i == 2));
    }
    CHECK(pids.size() == 1);
    CHECK(next_read(c.fd()) == 0);
  }
  SECTION("HTTP/1.0 closes unless it asks for keep-alive") {
    HttpClient c;
    REQUIRE(c.connect(address));
    REQUIRE(write_all(c.fd(), "GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
                              "GET / HTTP/1.0\r\n\r\n"));
    std::string buf;
    bool close = true;
    CHECK(read_http_answer(c.fd(), buf, close).status == 200);
    CHECK_FALSE(close);
    CHECK(read_http_answer(c.fd(), buf, close).status == 200);
    CHECK(close);
    CHECK(next_read(c.fd()) == 0);
  }
  SECTION("a request with a body is answered and the body is not taken for a request") {
    HttpClient c;
    REQUIRE(c.connect(address));
    REQUIRE(write_all(c.fd(), "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nGET /"
                              "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"));
    std::string buf;
    bool close = true;
    CHECK(read_http_answer(c.fd(), buf, close).status == 200);
    CHECK_FALSE(close);
    CHECK(read_http_answer(c.fd(), buf, close).status == 200);
    CHECK(close);
  }
  SECTION("a malformed request gets 400 and its connection is closed") {
    HttpClient c;
    REQUIRE(c.connect(address));
    REQUIRE(write_all(c.fd(), "nonsense\r\n\r\n"));
    std::string buf;
    bool close = false;
    CHECK(read_http_answer(c.fd(), buf, close).status == 400);
    CHECK(close);
    CHECK(next_read(c.fd()) == 0);
  }
  stop_with_sigterm(p);
}

TEST_CASE("An asio_hello worker closes every connection it adopted", "[asio_hello]") {
  REQUIRE(::access(kAsioHello.c_str(), X_OK) == 0);
  FdLeakCheck fds;
  HelloProcess p(kAsioHello, {"--workers", "1", "--port", "0"});
  REQUIRE(p.pid() > 0);
  INFO(p.out().transcript());
  REQUIRE(p.start(1));
  const pid_t worker = p.workers().front();
  const long baseline = count_fds_of(worker);
  REQUIRE(baseline > 0);

  std::vector<std::string> failures;
  get_many(p.port(), 50, failures);  // a connection each, closed by the worker after its answer
  CHECK(failures.empty());
  {
    std::vector<KeepAliveClient> clients;
    for (int i = 0; i < 8; ++i) clients.emplace_back("127.0.0.1:" + std::to_string(p.port()));
    for (int round = 0; round < 5; ++round)
      for (auto& c : clients) CHECK(c.get().status == 200);
    // Eight idle keep-alive connections (the last of the 50 above may still be closing).
    CHECK(wait_fd_count(worker, baseline + 8, Clock::now() + kDeadline) == baseline + 8);
  }  // closed by the clients: the worker sees EOF and closes its side
  CHECK(wait_fd_count(worker, baseline, Clock::now() + kDeadline) == baseline);
  stop_with_sigterm(p);
}

TEST_CASE("Rolling restarts of asio_hello under load answer every request with 200",
          "[asio_hello][reload]") {
  REQUIRE(::access(kAsioHello.c_str(), X_OK) == 0);
  FdLeakCheck fds;
  HelloProcess p(kAsioHello, {"--workers", "2", "--port", "0"});
  REQUIRE(p.pid() > 0);
  if (!p.start(2)) FAIL("asio_hello did not start; it said:\n" << p.out().transcript());
  std::vector<pid_t> current = p.workers();
  HttpLoad keep_alive(p.port(), 2, HttpLoad::Mode::keep_alive);
  HttpLoad new_connections(p.port(), 2, HttpLoad::Mode::new_connection);
  auto stop_load = [&] {
    keep_alive.stop();
    new_connections.stop();
  };
  if (!keep_alive.wait_answered(100, Clock::now() + kDeadline) ||
      !new_connections.wait_answered(100, Clock::now() + kDeadline)) {
    stop_load();
    FAIL("the load did not get going; failures:\n"
         << first_lines(keep_alive.failures()) << first_lines(new_connections.failures()));
  }
  constexpr int kReloads = 5;
  for (int round = 1; round <= kReloads; ++round) {
    std::vector<prefork::UniqueFd> old;
    for (pid_t pid : current) old.emplace_back(pidfd_open(pid));
    REQUIRE(::kill(p.pid(), SIGUSR2) == 0);
    const auto deadline = Clock::now() + kDeadline;
    ReloadLines lines = read_reload(p, 2, deadline);
    if (lines.started.size() < 2 || !lines.outcome) {
      stop_load();
      FAIL("reload " << round << " did not complete; asio_hello said:\n" << p.out().transcript());
    }
    CHECK(lines.outcome->starts_with("Reload done: 2 workers replaced in "));
    for (auto& fd : old) {
      bool exited = fd && wait_pidfd(fd.get(), deadline);
      if (!exited) {
        stop_load();
        FAIL("reload " << round << ": an old worker is still running");
      }
    }
    // More answers, from the new generation, before the next round.
    const auto ka = keep_alive.answered(), nc = new_connections.answered();
    if (!keep_alive.wait_answered(ka + 300, Clock::now() + kDeadline) ||
        !new_connections.wait_answered(nc + 300, Clock::now() + kDeadline)) {
      stop_load();
      FAIL("reload " << round << ": the load stalled");
    }
    current = lines.started;
  }
  stop_load();
  for (HttpLoad* load : {&keep_alive, &new_connections}) {
    INFO(load->sent() << " requests sent, " << load->answered() << " answered with 200; failures:\n"
                      << first_lines(load->failures()));
    CHECK(load->failures().empty());
    CHECK(load->answered() == load->sent());
  }
  {
    INFO(p.out().transcript());
    CHECK(p.out().transcript().find(" died ") == std::string::npos);  // no worker crashed
  }
  std::vector<std::string> errors;
  auto last = get_many(p.port(), 10, errors);
  CHECK(errors.empty());
  CHECK(keys(last) == std::set<pid_t>(current.begin(), current.end()));
  stop_with_sigterm(p);
}

TEST_CASE("An idle keep-alive connection to a draining asio_hello worker is closed with a FIN",
          "[asio_hello][drain]") {
  REQUIRE(::access(kAsioHello.c_str(), X_OK) == 0);
  FdLeakCheck fds;
  HelloProcess p(kAsioHello, {"--workers", "1", "--port", "0"});
  REQUIRE(p.pid() > 0);
  INFO(p.out().transcript());
  REQUIRE(p.start(1));
  const pid_t worker = p.workers().front();
  prefork::UniqueFd worker_fd(pidfd_open(worker));
  REQUIRE(worker_fd);

  HttpClient client;
  REQUIRE(client.connect("127.0.0.1:" + std::to_string(p.port())));
  REQUIRE(write_all(client.fd(), "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"));
  std::string buf;
  bool close = true;
  HttpResult r = read_http_answer(client.fd(), buf, close);
  INFO(r.error);
  REQUIRE(r.status == 200);
  CHECK(handled_by(r.body) == worker);
  REQUIRE_FALSE(close);

  REQUIRE(::kill(p.pid(), SIGUSR2) == 0);
  CHECK(next_read(client.fd()) == 0);  // EOF; -ECONNRESET would be a reset
  CHECK(wait_pidfd(worker_fd.get(), Clock::now() + kDeadline));  // and the worker then exits
  ReloadLines lines = read_reload(p, 1, Clock::now() + kDeadline);
  REQUIRE(lines.outcome.has_value());
  CHECK(lines.outcome->starts_with("Reload done: 1 workers replaced in "));
  stop_with_sigterm(p);
}

TEST_CASE("asio_hello rejects bad options with exit status 2 and says why", "[asio_hello]") {
  REQUIRE(::access(kAsioHello.c_str(), X_OK) == 0);
  std::vector<std::string> args = GENERATE(values<std::vector<std::string>>({
      {"--bogus"},
      {"--workers", "0"},
      {"--workers"},
      {"--port", "70000"},
      {"--host", ""},
  }));
  std::string shown;
  for (auto& a : args) shown += "'" + a + "' ";
  INFO("asio_hello " << shown);
  HelloProcess p(kAsioHello, args);
  REQUIRE(p.pid() > 0);
  auto status = p.wait(Clock::now() + kDeadline);
  REQUIRE(status.has_value());
  CHECK(WIFEXITED(*status));
  CHECK(WEXITSTATUS(*status) == 2);
  auto why = p.err().next(Clock::now() + kDeadline);
  REQUIRE(why.has_value());
  CHECK(why->starts_with("asio_hello: "));
}

#endif  // __has_include(<asio.hpp>)
