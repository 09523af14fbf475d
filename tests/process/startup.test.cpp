// Start-up of the hello example (issue 13): what it prints when a start-up check fails (no
// readiness line before every check has passed, an error that ends where its sentence ends),
// which addresses it refuses to share, and which listen addresses it accepts (host names,
// Unix sockets) or refuses (naming the rule broken).
#include <catch2/catch.hpp>

#include <netdb.h>
#include <netinet/in.h>
#include <pwd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "harness.hpp"
#include "hello_process.hpp"
#include "http_client.hpp"
#include "support/temp_dir.hpp"

using namespace prefork_test;

namespace {

bool exited_with(const std::optional<int>& status, int code) {
  return status && WIFEXITED(*status) && WEXITSTATUS(*status) == code;
}

/// Everything `r` delivers until EOF (or the deadline).
std::string drain(LineReader& r, Clock::time_point deadline) {
  while (r.next(deadline)) {
  }
  return r.transcript();
}

/// SIGTERM, and the exit status 0 of a graceful stop.
bool stops_cleanly(HelloProcess& p) {
  return ::kill(p.pid(), SIGTERM) == 0 && exited_with(p.wait(Clock::now() + kDeadline), 0);
}

/// What a hello that must refuse to start said: its exit status, stdout and stderr.
struct Refusal {
  std::optional<int> status;
  std::string out, err;
};

Refusal refused(HelloProcess& p) {
  Refusal r;
  r.status = p.wait(Clock::now() + kDeadline);
  r.out = drain(p.out(), Clock::now() + kDeadline);
  r.err = drain(p.err(), Clock::now() + kDeadline);
  return r;
}

/// The last line of `text` without its '\n'.
std::string last_line(std::string text) {
  while (!text.empty() && text.back() == '\n') text.pop_back();
  auto nl = text.rfind('\n');
  return nl == std::string::npos ? text : text.substr(nl + 1);
}

}  // namespace

TEST_CASE("hello refused for a held pid file prints no readiness line and no stray strerror",
          "[startup][pid-file]") {
  REQUIRE(::access(kHello.c_str(), X_OK) == 0);
  FdLeakCheck fds;
  TempDir dir;
  const std::string pid_file = dir.path + "/hello.pid";
  HelloProcess first({"--workers", "1", "--port", "0", "--work", "0", "--pid-file", pid_file,
                      "--control", "off"});
  REQUIRE(first.pid() > 0);
  if (!first.start(1)) FAIL("hello did not start; it said:\n" << first.out().transcript());

  HelloProcess second({"--workers", "1", "--port", "0", "--work", "0", "--pid-file", pid_file,
                       "--control", "off"});
  REQUIRE(second.pid() > 0);
  Refusal r = refused(second);
  INFO("second hello said on stdout:\n" << r.out << "and on stderr:\n" << r.err);
  CHECK(exited_with(r.status, 1));
  CHECK(r.out.find("Master PID") == std::string::npos);
  CHECK(r.out.find("Listening on") == std::string::npos);
  CHECK(last_line(r.err) == "hello: prefork: pid file " + pid_file +
                                " is held by a running master (pid " +
                                std::to_string(first.pid()) + ")");
  CHECK(stops_cleanly(first));
}

TEST_CASE("hello refused for a control directory of another user prints no readiness line",
          "[startup][control]") {
  REQUIRE(::access(kHello.c_str(), X_OK) == 0);
  if (::geteuid() != 0) {
    WARN("skipped: making a directory owned by another user needs root");
    return;
  }
  passwd* nobody = ::getpwnam("nobody");
  if (!nobody) {
    WARN("skipped: no user 'nobody' on this system");
    return;
  }
  FdLeakCheck fds;
  TempDir runtime;  // XDG_RUNTIME_DIR, ours; its prefork/ directory is nobody's
  const std::string theirs = runtime.path + "/prefork";
  REQUIRE(::mkdir(theirs.c_str(), 0700) == 0);
  REQUIRE(::chown(theirs.c_str(), nobody->pw_uid, nobody->pw_gid) == 0);

  const char* saved = std::getenv("XDG_RUNTIME_DIR");
  std::optional<std::string> old = saved ? std::optional<std::string>(saved) : std::nullopt;
  ::setenv("XDG_RUNTIME_DIR", runtime.path.c_str(), 1);
  HelloProcess hello({"--workers", "1", "--port", "0", "--work", "0"});
  if (old) ::setenv("XDG_RUNTIME_DIR", old->c_str(), 1);
  else ::unsetenv("XDG_RUNTIME_DIR");
  REQUIRE(hello.pid() > 0);

  Refusal r = refused(hello);
  INFO("hello said on stdout:\n" << r.out << "and on stderr:\n" << r.err);
  CHECK(exited_with(r.status, 1));
  CHECK(r.out.find("Master PID") == std::string::npos);
  CHECK(r.out.find("Listening on") == std::string::npos);
  CHECK(r.out.find("Started process") == std::string::npos);
  CHECK(last_line(r.err) == "hello: prefork: control directory " + theirs + " is owned by uid " +
                                std::to_string(nobody->pw_uid) + ", not by uid 0; refusing to use it");
}

TEST_CASE("A second hello on the port of a running reuse-port hello exits 1 in every balance mode",
          "[startup][balance]") {
  REQUIRE(::access(kHello.c_str(), X_OK) == 0);
  FdLeakCheck fds;
  HelloProcess first({"--workers", "2", "--port", "0", "--work", "0", "--balance", "reuse-port",
                      "--control", "off"});
  REQUIRE(first.pid() > 0);
  if (!first.start(2)) FAIL("hello did not start; it said:\n" << first.out().transcript());
  const std::string port = std::to_string(first.port());

  for (const char* balance : {"reuse-port", "round-robin", "shared"}) {
    HelloProcess second({"--workers", "2", "--port", port, "--work", "0", "--balance", balance,
                         "--control", "off"});
    REQUIRE(second.pid() > 0);
    Refusal r = refused(second);
    INFO("balance " << balance << "; the second hello said on stdout:\n"
                    << r.out << "and on stderr:\n" << r.err);
    CHECK(exited_with(r.status, 1));
    CHECK(r.out.find("Listening on") == std::string::npos);
    CHECK(last_line(r.err) == "hello: prefork: bind 127.0.0.1:" + port + ": Address already in use");
  }

  // Every request still goes to the first hello's workers.
  std::vector<std::string> failures;
  auto by_pid = get_many(first.port(), 8, failures);
  CHECK(failures.empty());
  for (auto& [pid, n] : by_pid) {
    INFO("answered by pid " << pid);
    CHECK((pid == first.workers()[0] || pid == first.workers()[1]));
  }
  CHECK(stops_cleanly(first));
}

TEST_CASE("hello --balance reuse-port refuses an address another process holds with SO_REUSEPORT",
          "[startup][balance]") {
  REQUIRE(::access(kHello.c_str(), X_OK) == 0);
  FdLeakCheck fds;
  // Another program of this user that shares its port (nginx's `listen ... reuseport`).
  prefork::UniqueFd other(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  REQUIRE(other);
  int one = 1;
  REQUIRE(::setsockopt(other.get(), SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) == 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::bind(other.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  REQUIRE(::listen(other.get(), 8) == 0);
  socklen_t length = sizeof a;
  REQUIRE(::getsockname(other.get(), reinterpret_cast<sockaddr*>(&a), &length) == 0);
  const std::string port = std::to_string(ntohs(a.sin_port));

  HelloProcess hello({"--workers", "2", "--port", port, "--work", "0", "--balance", "reuse-port",
                      "--control", "off"});
  REQUIRE(hello.pid() > 0);
  Refusal r = refused(hello);
  INFO("hello said on stdout:\n" << r.out << "and on stderr:\n" << r.err);
  CHECK(exited_with(r.status, 1));
  CHECK(r.out.find("Listening on") == std::string::npos);
  CHECK(last_line(r.err) == "hello: prefork: bind 127.0.0.1:" + port + ": Address already in use");
}

namespace {

/// The addresses in hello's "Listening on ADDR" lines, read up to its first "Started process".
std::vector<std::string> listening_addresses(HelloProcess& p) {
  std::vector<std::string> out;
  auto deadline = Clock::now() + kDeadline;
  while (auto line = p.out().next(deadline)) {
    if (line->starts_with("Listening on ")) out.push_back(line->substr(13));
    if (line->starts_with("Started process ")) break;
  }
  return out;
}

/// What getaddrinfo(3) says `name` stands for, as "ADDR:port" strings, each once (with
/// AI_ADDRCONFIG, as a master resolves: no IPv6 address where the machine has no IPv6).
std::vector<std::string> resolved(const std::string& name, int port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_ADDRCONFIG;
  addrinfo* list = nullptr;
  std::vector<std::string> out;
  if (::getaddrinfo(name.c_str(), std::to_string(port).c_str(), &hints, &list) != 0) return out;
  for (addrinfo* p = list; p; p = p->ai_next) {
    prefork::detail::SocketAddress a;
    std::memcpy(&a.storage, p->ai_addr, p->ai_addrlen);
    a.length = p->ai_addrlen;
    std::string s = prefork::detail::to_string(a);
    if (std::find(out.begin(), out.end(), s) == out.end()) out.push_back(s);
  }
  ::freeaddrinfo(list);
  return out;
}

}  // namespace

TEST_CASE("hello --host localhost listens on every address localhost resolves to, on one port",
          "[startup][listen]") {
  REQUIRE(::access(kHello.c_str(), X_OK) == 0);
  FdLeakCheck fds;
  HelloProcess hello({"--workers", "1", "--host", "localhost", "--port", "0", "--work", "0",
                      "--control", "off"});
  REQUIRE(hello.pid() > 0);
  std::vector<std::string> bound = listening_addresses(hello);
  INFO("hello said:\n" << hello.out().transcript() << hello.err().transcript());
  REQUIRE_FALSE(bound.empty());
  const int port = std::stoi(bound.front().substr(bound.front().rfind(':') + 1));
  CHECK(port > 0);
  CHECK(bound == resolved("localhost", port));  // 127.0.0.1, and ::1 where localhost has it
  for (auto& a : bound) {
    INFO("GET / on " << a);
    CHECK(http_get(a).status == 200);
  }
  CHECK(stops_cleanly(hello));
}

TEST_CASE("hello --listen unix:PATH serves on a Unix socket beside its TCP port",
          "[startup][listen]") {
  REQUIRE(::access(kHello.c_str(), X_OK) == 0);
  FdLeakCheck fds;
  TempDir dir;
  const std::string unix_address = "unix:" + dir.path + "/hello.sock";
  HelloProcess hello({"--workers", "1", "--port", "0", "--listen", unix_address, "--work", "0",
                      "--control", "off"});
  REQUIRE(hello.pid() > 0);
  std::vector<std::string> bound = listening_addresses(hello);
  INFO("hello said:\n" << hello.out().transcript() << hello.err().transcript());
  REQUIRE(bound.size() == 2);
  CHECK(bound[0].starts_with("127.0.0.1:"));
  CHECK(bound[1] == unix_address);
  CHECK(http_get(bound[0]).status == 200);
  HttpResult over_unix = http_get(unix_address);
  CHECK(over_unix.status == 200);
  CHECK(over_unix.body.starts_with("Handled by process "));

  // Given alone, --listen replaces the default 127.0.0.1:8080.
  HelloProcess only({"--workers", "1", "--listen", "unix:" + dir.path + "/only.sock", "--work",
                     "0", "--control", "off"});
  REQUIRE(only.pid() > 0);
  CHECK(listening_addresses(only) == std::vector<std::string>{"unix:" + dir.path + "/only.sock"});
  CHECK(stops_cleanly(hello));
  CHECK(stops_cleanly(only));
}

TEST_CASE("hello refuses a bad listen address with exit status 2 naming the rule it breaks",
          "[startup][listen]") {
  REQUIRE(::access(kHello.c_str(), X_OK) == 0);
  struct Case {
    std::vector<std::string> args;
    std::string says;
  };
  const std::string long_path = "/tmp/" + std::string(103, 'p');  // 108 bytes
  for (const Case& c : std::vector<Case>{
           {{"--listen", "unix:" + long_path}, "the path is 108 bytes, longer than 107"},
           {{"--listen", "unix:"}, "no path after 'unix:'"},
           {{"--listen", "127.0.0.1"}, "no port"},
           {{"--listen", "127.0.0.1:99999"}, "the port '99999' is not a number from 0 to 65535"},
           {{"--host", "1.2.3.999"}, "'1.2.3.999' is not a numeric IPv4 address"},
           {{"--host", "[::1"}, "'[::1' has no closing ']'"},
           {{"--host", "bad_host!"}, "'bad_host!' is neither a numeric address nor a host name"},
       }) {
    std::vector<std::string> args = c.args;
    for (const char* a : {"--workers", "1", "--work", "0", "--control", "off"}) args.push_back(a);
    HelloProcess hello(args);
    REQUIRE(hello.pid() > 0);
    Refusal r = refused(hello);
    INFO(c.args[0] << " " << c.args[1] << ": hello said on stderr:\n" << r.err);
    CHECK(exited_with(r.status, 2));
    CHECK(r.err.find(c.says) != std::string::npos);
    CHECK(r.out.find("Listening on") == std::string::npos);
  }
}
