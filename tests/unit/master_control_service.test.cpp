// The master's control service (include/prefork/master/control_service.hpp), without forking:
// the command table against a fake master with the public members it calls, on a real
// control socket with a raw client, the server's loop run on this thread.
#include <catch2/catch.hpp>

#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstddef>
#include <cstring>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include <prefork/event_loop.hpp>
#include <prefork/options.hpp>
#include <prefork/status.hpp>
#include <prefork/master/control_service.hpp>
#include <prefork/master/log.hpp>

#include "support/loop.hpp"
#include "support/temp_dir.hpp"

using prefork::ClusterStatus;
using prefork::EventLoop;
using prefork::Options;
using prefork::ReloadReport;
using prefork::UniqueFd;
using prefork::UpgradeReport;
using prefork_test::run_until;
using prefork_test::TempDir;

namespace {

// The public members of Master that the service calls, recorded.
struct FakeMaster {
  std::vector<std::function<void(const ClusterStatus&)>> status_queries;
  bool stopping = false, reload_running = false, upgrade_ok = true;
  int reloads = 0;
  std::vector<std::size_t> scaled;
  std::optional<bool> shut_down_fast;
  std::vector<int> live{1, 2, 3};
  std::string refusal = "one is already running (new master pid 99)";

  void query_status(std::function<void(const ClusterStatus&)> cb,
                    std::chrono::milliseconds = std::chrono::seconds(1)) {
    status_queries.push_back(std::move(cb));
  }
  bool shutting_down() const noexcept { return stopping; }
  bool reloading() const noexcept { return reload_running; }
  void reload() {
    ++reloads;
    reload_running = true;
  }
  std::error_code scale(std::size_t n) {
    if (stopping) return std::make_error_code(std::errc::operation_canceled);
    scaled.push_back(n);
    return {};
  }
  const std::vector<int>& workers() const { return live; }
  void shutdown(bool fast = false) {
    shut_down_fast = fast;
    stopping = true;
  }
  int upgrades = 0;
  bool upgrade() {
    ++upgrades;
    return upgrade_ok;
  }
  const std::string& upgrade_refusal() const noexcept { return refusal; }
};

// A raw, non-blocking client, so that the service's loop runs on this thread.
struct Client {
  UniqueFd fd;
  std::string in;

  explicit Client(const std::string& path) {
    fd.reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    sockaddr_un un{};
    un.sun_family = AF_UNIX;
    std::memcpy(un.sun_path, path.data(), path.size());
    auto len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size() + 1);
    REQUIRE(::connect(fd.get(), reinterpret_cast<sockaddr*>(&un), len) == 0);
  }
  void send(std::string_view line) {
    REQUIRE(::send(fd.get(), line.data(), line.size(), MSG_NOSIGNAL) ==
            static_cast<ssize_t>(line.size()));
  }
  std::optional<std::string> line() {
    char buf[4096];
    ssize_t n;
    while ((n = ::recv(fd.get(), buf, sizeof buf, MSG_DONTWAIT)) > 0)
      in.append(buf, static_cast<std::size_t>(n));
    auto nl = in.find('\n');
    if (nl == std::string::npos) return std::nullopt;
    std::string l = in.substr(0, nl);
    in.erase(0, nl + 1);
    return l;
  }
};

struct Fixture {
  TempDir dir{"prefork-control-service"};
  std::string path = dir.path + "/ctl.sock";
  EventLoop loop;
  Options opts;
  prefork::detail::MasterLog log{opts};
  FakeMaster master;
  prefork::detail::ControlService<FakeMaster> service{master, loop, log};

  Fixture() {
    opts.log = [](const prefork::LogRecord&) {};
    service.listen(path, {});
  }
  ~Fixture() { service.release(false); }

  // Sends one request on `c` and returns its reply line ("" if none came).
  std::string ask(Client& c, std::string_view request) {
    c.send(request);
    return next(c);
  }
  std::string next(Client& c) {
    std::string got;
    run_until(loop, [&] {
      if (auto l = c.line()) got = *l;
      return !got.empty();
    });
    return got;
  }
  // `first` asks for a reload, then `second` while that pass runs (it waits for the next).
  void reload_twice(Client& first, Client& second) {
    first.send("{\"command\":\"reload\"}\n");
    REQUIRE(until([&] { return master.reloads == 1; }));
    second.send("{\"command\":\"reload\"}\n");
    REQUIRE(until([&] { return master.reloads == 2; }));
  }
  // Requests are read on the loop: run it until the fake has seen `done`.
  bool until(const std::function<bool()>& done) { return run_until(loop, done); }
};

}  // namespace

TEST_CASE("status answers with the status the master's query ends with",
          "[master_control_service]") {
  Fixture f;
  Client c(f.path);
  c.send("{\"command\":\"status\"}\n");
  REQUIRE(f.until([&] { return f.master.status_queries.size() == 1; }));
  ClusterStatus st;
  st.pid = 1234;
  f.master.status_queries[0](st);
  std::string reply = f.next(c);
  CHECK(reply.starts_with("{\"ok\":true,\"pid\":1234,"));
}

TEST_CASE("scale checks its count before it asks the master", "[master_control_service]") {
  Fixture f;
  Client c(f.path);
  CHECK(f.ask(c, "{\"command\":\"scale\",\"workers\":3}\n") == "{\"ok\":true,\"workers\":3}");
  CHECK(f.master.scaled == std::vector<std::size_t>{3});
  for (auto bad : {"{\"command\":\"scale\"}\n", "{\"command\":\"scale\",\"workers\":0}\n",
                   "{\"command\":\"scale\",\"workers\":4097}\n",
                   "{\"command\":\"scale\",\"workers\":\"2\"}\n",
                   "{\"command\":\"scale\",\"workers\":1.5}\n"})
    CHECK(f.ask(c, bad) ==
          "{\"ok\":false,\"error\":\"scale needs \\\"workers\\\": a whole number from 1 to 4096\"}");
  CHECK(f.master.scaled.size() == 1);
  f.master.stopping = true;
  CHECK(f.ask(c, "{\"command\":\"scale\",\"workers\":2}\n") ==
        "{\"ok\":false,\"error\":\"scale: " +
            std::make_error_code(std::errc::operation_canceled).message() + "\"}");
}

TEST_CASE("stop answers with the number of workers, then shuts the master down",
          "[master_control_service]") {
  Fixture f;
  Client c(f.path);
  CHECK(f.ask(c, "{\"command\":\"stop\",\"fast\":true}\n") ==
        "{\"ok\":true,\"stopping\":true,\"workers\":3}");
  REQUIRE(f.master.shut_down_fast);
  CHECK(*f.master.shut_down_fast);
}

TEST_CASE("A plain stop is graceful", "[master_control_service]") {
  Fixture f;
  Client c(f.path);
  f.ask(c, "{\"command\":\"stop\"}\n");
  REQUIRE(f.master.shut_down_fast);
  CHECK_FALSE(*f.master.shut_down_fast);
}

TEST_CASE("reload is answered when its pass ends; one asked during a pass waits for the next",
          "[master_control_service]") {
  Fixture f;
  Client first(f.path), second(f.path);
  f.reload_twice(first, second);

  f.service.reload_ended(ReloadReport{true, 3, std::chrono::milliseconds(40)}, true);
  CHECK(f.next(first) == "{\"ok\":true,\"replaced\":3,\"took_ms\":40}");
  CHECK_FALSE(second.line());

  ReloadReport failed;
  failed.reason = "replacement worker 5 (pid 7) exited with code 1 before it was ready";
  f.service.reload_ended(failed, false);
  CHECK(f.next(second) == "{\"ok\":false,\"error\":\"rolling restart stopped: " + failed.reason +
                              "; the old workers keep serving\"}");
}

TEST_CASE("Reloads still waiting for their pass fail when no pass follows",
          "[master_control_service]") {
  Fixture f;
  Client first(f.path), second(f.path);
  f.reload_twice(first, second);
  // The master is shutting down: no next pass.
  f.service.reload_ended(ReloadReport{.ok = true}, false);
  CHECK(f.next(first).starts_with("{\"ok\":true,"));
  CHECK(f.next(second) ==
        "{\"ok\":false,\"error\":\"rolling restart not run: the master is shutting down\"}");
}

TEST_CASE("reload fails at once while the master shuts down", "[master_control_service]") {
  Fixture f;
  f.master.stopping = true;
  Client c(f.path);
  CHECK(f.ask(c, "{\"command\":\"reload\"}\n") ==
        "{\"ok\":false,\"error\":\"the master is shutting down\"}");
  CHECK(f.master.reloads == 0);
}

TEST_CASE("upgrade says why it was refused, or answers when it ends", "[master_control_service]") {
  Fixture f;
  Client c(f.path);
  f.master.upgrade_ok = false;
  CHECK(f.ask(c, "{\"command\":\"upgrade\"}\n") ==
        "{\"ok\":false,\"error\":\"upgrade refused: " + f.master.refusal + "\"}");
  f.master.upgrade_ok = true;
  c.send("{\"command\":\"upgrade\"}\n");
  REQUIRE(f.until([&] { return f.master.upgrades == 2; }));
  f.service.upgrade_ended(UpgradeReport{true, 4321, {}});
  CHECK(f.next(c) == "{\"ok\":true,\"new_master\":4321}");
  c.send("{\"command\":\"upgrade\"}\n");
  REQUIRE(f.until([&] { return f.master.upgrades == 3; }));
  f.service.upgrade_ended(UpgradeReport{false, 4322, "the new master exited with code 1"});
  CHECK(f.next(c) ==
        "{\"ok\":false,\"error\":\"upgrade failed: the new master exited with code 1\"}");
}

TEST_CASE("An unknown command lists the commands", "[master_control_service]") {
  Fixture f;
  Client c(f.path);
  CHECK(f.ask(c, "{\"command\":\"restart\"}\n") ==
        "{\"ok\":false,\"error\":\"unknown command 'restart'; the commands are status, reload, "
        "scale, stop and upgrade\"}");
}
