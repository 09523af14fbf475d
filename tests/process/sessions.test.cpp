// The sessions example as a user runs it (examples/sessions/main.cpp, built into
// PREFORK_EXAMPLES_DIR): POST /login hands out a cookie, GET /me answers the name with it and
// 401 without it, POST /logout ends the session. Every /me below goes on a new connection, so
// that the balancer picks a worker for each: with the shared store (any balancing) every worker
// knows the session; with --store local under round-robin only the worker that created it does
// (the seed's failure, some 401s); with --store local --balance cookie every request reaches
// that worker. A shared-store session outlives the worker that created it. Bad options exit 2.
// Once with curl too, the client the seed's article uses.
//
// sessions runs as a child with its stdout on a pipe; the test is a client and an observer.
#include <catch2/catch.hpp>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "harness.hpp"
#include "hello_process.hpp"
#include "http_client.hpp"

using namespace prefork_test;

namespace {

const std::string kSessions = PREFORK_EXAMPLES_DIR "/sessions";
const std::string kCurl = "/usr/bin/curl";

/// One answer with the fields the tests look at.
struct Reply {
  int status = 0;  ///< 0: no answer (see error)
  std::string head, body, error;
  pid_t worker = -1;       ///< X-Worker-Pid
  std::string set_cookie;  ///< Set-Cookie, if any

  std::string describe() const {
    return "status " + std::to_string(status) + " " + error + " body '" + body + "' head '" +
           head + "'";
  }
};

/// The value of field `name` (exact case, as sessions writes it) in a head, or "".
std::string field(const std::string& head, std::string_view name) {
  std::string key = "\r\n" + std::string(name) + ": ";
  auto at = head.find(key);
  if (at == std::string::npos) return {};
  at += key.size();
  return head.substr(at, head.find("\r\n", at) - at);
}

/// `method path` on a new connection (Connection: close), with an optional form body and an
/// optional Cookie field, read to EOF.
Reply call(int port, std::string_view method, std::string_view path, std::string_view body = {},
           std::string_view cookie = {}) {
  Reply r;
  HttpClient c;
  if (!c.connect("127.0.0.1:" + std::to_string(port))) {
    r.error = c.error();
    return r;
  }
  std::string req = std::string(method) + " " + std::string(path) +
                    " HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n";
  if (!cookie.empty()) req += "Cookie: " + std::string(cookie) + "\r\n";
  if (!body.empty() || method == "POST")
    req += "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: " +
           std::to_string(body.size()) + "\r\n";
  req += "\r\n" + std::string(body);
  if (!write_all(c.fd(), req)) {
    r.error = "send failed";
    return r;
  }
  std::string all;
  char buf[4096];
  for (;;) {
    ssize_t n = ::recv(c.fd(), buf, sizeof buf, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      r.error = std::string("recv: ") + std::strerror(errno);
      return r;
    }
    if (n == 0) break;
    all.append(buf, static_cast<std::size_t>(n));
  }
  auto end = all.find("\r\n\r\n");
  if (!all.starts_with("HTTP/1.1 ") || end == std::string::npos) {
    r.error = "no answer in '" + all + "'";
    return r;
  }
  r.head = all.substr(0, end + 2);
  r.body = all.substr(end + 4);
  r.status = std::atoi(all.substr(9, 3).c_str());
  r.worker = static_cast<pid_t>(std::atol(field(r.head, "X-Worker-Pid").c_str()));
  r.set_cookie = field(r.head, "Set-Cookie");
  return r;
}

/// The "sid=<token>" pair of a login's Set-Cookie, "" if it has none of 32 hex digits.
std::string sid_of(const Reply& login) {
  const std::string& sc = login.set_cookie;
  if (!sc.starts_with("sid=")) return {};
  std::string pair = sc.substr(0, sc.find(';'));
  if (pair.size() != 4 + 32 || pair.find_first_not_of("0123456789abcdef", 4) != std::string::npos)
    return {};
  return pair;
}

/// sessions as a child; start() reads its first lines.
class SessionsProcess {
 public:
  explicit SessionsProcess(std::vector<std::string> args)
      : proc_(kSessions, with_port0(std::move(args))) {}

  bool start(unsigned workers) { return proc_.pid() > 0 && proc_.start(workers); }
  int port() const noexcept { return proc_.port(); }
  const std::vector<pid_t>& workers() const noexcept { return proc_.workers(); }
  HelloProcess& proc() noexcept { return proc_; }
  const std::string& transcript() noexcept { return proc_.out().transcript(); }

  /// SIGTERM: exit 0, no worker left behind.
  void stop_gracefully() {
    REQUIRE(::kill(proc_.pid(), SIGTERM) == 0);
    auto status = proc_.wait(Clock::now() + kDeadline);
    REQUIRE(status.has_value());
    CHECK(WIFEXITED(*status));
    CHECK(WEXITSTATUS(*status) == 0);
    for (pid_t pid : proc_.workers()) {
      INFO("worker " << pid);
      CHECK(process_gone(pid));
    }
  }

 private:
  static std::vector<std::string> with_port0(std::vector<std::string> args) {
    args.insert(args.end(), {"--port", "0"});
    return args;
  }
  HelloProcess proc_;
};

void require_started(bool ok, SessionsProcess& s) {
  if (!ok) FAIL("sessions printed:\n" << s.transcript());
}

/// Logs `user` in: a 200 with the cookie and "Logged in as <user>".
Reply login(int port, const std::string& user) {
  Reply r = call(port, "POST", "/login", "user=" + user);
  INFO(r.describe());
  REQUIRE(r.status == 200);
  REQUIRE(!sid_of(r).empty());
  CHECK(r.body == "Logged in as " + user + "\n");
  CHECK(r.worker > 0);
  return r;
}

/// GET /me n times, each on a new connection: how many answers of each kind, by worker.
struct MeCount {
  std::map<pid_t, int> ok, unauthorized;
  std::vector<std::string> other;
};
MeCount me_many(int port, const std::string& cookie, const std::string& name, int n) {
  MeCount m;
  for (int i = 0; i < n; ++i) {
    Reply r = call(port, "GET", "/me", {}, cookie);
    if (r.status == 200 && r.body == name + "\n") {
      ++m.ok[r.worker];
    } else if (r.status == 401 && r.body == "Not logged in\n") {
      ++m.unauthorized[r.worker];
    } else {
      m.other.push_back("request " + std::to_string(i) + ": " + r.describe());
    }
  }
  return m;
}

std::string first_of(const std::vector<std::string>& failures) {
  return failures.empty() ? std::string() : "first: " + failures.front();
}

int total(const std::map<pid_t, int>& m) {
  int n = 0;
  for (auto& [pid, k] : m) n += k;
  return n;
}

}  // namespace

TEST_CASE("sessions with the shared store knows a login on every worker, under any balancing",
          "[sessions]") {
  REQUIRE(::access(kSessions.c_str(), X_OK) == 0);
  std::string balance = GENERATE(as<std::string>{}, "round-robin", "ip-hash", "cookie");
  INFO("--balance " << balance);
  std::size_t fds_before = count_open_fds();
  {
    SessionsProcess s({"--workers", "2", "--balance", balance});
    require_started(s.start(2), s);
    const std::set<pid_t> workers(s.workers().begin(), s.workers().end());

    Reply in = login(s.port(), "ann");
    const std::string cookie = sid_of(in);
    MeCount m = me_many(s.port(), cookie, "ann", 20);
    INFO("other answers: " << m.other.size() << " " << first_of(m.other));
    CHECK(total(m.ok) == 20);
    if (balance == "round-robin") CHECK(keys(m.ok) == workers);  // both workers knew it

    // Without the cookie, with one nobody issued, or with a malformed one: 401.
    for (const std::string& bad :
         {std::string(), std::string("sid=0123456789abcdef0123456789abcdef"), std::string("sid=x"),
          std::string("other=") + cookie.substr(4)}) {
      Reply r = call(s.port(), "GET", "/me", {}, bad);
      INFO("cookie '" << bad << "': " << r.describe());
      CHECK(r.status == 401);
      CHECK(r.body == "Not logged in\n");
    }

    // The cookie among others, as a browser sends it.
    Reply among = call(s.port(), "GET", "/me", {}, "theme=dark; " + cookie + "; lang=en");
    CHECK(among.status == 200);
    CHECK(among.body == "ann\n");

    // Logout on whichever worker; then no worker knows the session.
    Reply out = call(s.port(), "POST", "/logout", {}, cookie);
    INFO(out.describe());
    CHECK(out.status == 200);
    CHECK(out.body == "Logged out\n");
    CHECK(out.set_cookie.starts_with("sid=;"));
    MeCount after = me_many(s.port(), cookie, "ann", 4);
    CHECK(total(after.unauthorized) == 4);
    CHECK(call(s.port(), "POST", "/logout", {}, cookie).status == 401);
    s.stop_gracefully();
  }
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("sessions with --store local under round-robin loses the session on the other worker",
          "[sessions]") {
  REQUIRE(::access(kSessions.c_str(), X_OK) == 0);
  std::size_t fds_before = count_open_fds();
  {
    SessionsProcess s({"--workers", "2", "--store", "local"});
    require_started(s.start(2), s);
    Reply in = login(s.port(), "ann");
    MeCount m = me_many(s.port(), sid_of(in), "ann", 20);
    INFO("other answers: " << m.other.size() << " " << first_of(m.other));
    CHECK(m.other.empty());
    // The seed's failure: the worker that authenticated the user knows it, the other does not.
    CHECK(total(m.ok) >= 1);
    CHECK(total(m.unauthorized) >= 1);
    CHECK(keys(m.ok) == std::set<pid_t>{in.worker});
    CHECK(keys(m.unauthorized).count(in.worker) == 0);
    s.stop_gracefully();
  }
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("sessions with --store local --balance cookie sends every request to the worker that "
          "holds the session",
          "[sessions]") {
  REQUIRE(::access(kSessions.c_str(), X_OK) == 0);
  std::size_t fds_before = count_open_fds();
  {
    SessionsProcess s({"--workers", "2", "--store", "local", "--balance", "cookie"});
    require_started(s.start(2), s);
    // Two users: logins without a cookie go round-robin, so they may land on either worker;
    // each user's requests must then stay on the worker that logged them in.
    Reply ann = login(s.port(), "ann");
    Reply bob = login(s.port(), "bob");
    for (const Reply* in : {&ann, &bob}) {
      std::string name = in == &ann ? "ann" : "bob";
      INFO(name);
      MeCount m = me_many(s.port(), sid_of(*in), name, 20);
      INFO("other answers: " << m.other.size() << " " << first_of(m.other));
      CHECK(total(m.ok) == 20);
      CHECK(keys(m.ok) == std::set<pid_t>{in->worker});
    }
    // Logout reaches the same worker, which forgets the session.
    Reply out = call(s.port(), "POST", "/logout", {}, sid_of(ann));
    CHECK(out.status == 200);
    CHECK(out.worker == ann.worker);
    MeCount after = me_many(s.port(), sid_of(ann), "ann", 4);
    CHECK(total(after.unauthorized) == 4);
    CHECK(me_many(s.port(), sid_of(bob), "bob", 2).ok.size() == 1);
    s.stop_gracefully();
  }
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("A session in the shared store survives the SIGKILL of the worker that created it",
          "[sessions]") {
  REQUIRE(::access(kSessions.c_str(), X_OK) == 0);
  std::size_t fds_before = count_open_fds();
  {
    SessionsProcess s({"--workers", "2"});
    require_started(s.start(2), s);
    Reply in = login(s.port(), "ann");
    REQUIRE(::kill(in.worker, SIGKILL) == 0);
    auto replacement = s.proc().next_started(Clock::now() + kDeadline);
    if (!replacement) FAIL("no replacement started; sessions printed:\n" << s.transcript());

    // Round-robin over the survivor and the replacement: ask until the replacement (which
    // never saw the login) has answered, each answer on a new connection.
    std::set<pid_t> answered;
    auto deadline = Clock::now() + kDeadline;
    while (!answered.count(*replacement) && Clock::now() < deadline) {
      Reply r = call(s.port(), "GET", "/me", {}, sid_of(in));
      INFO(r.describe());
      REQUIRE(r.status == 200);
      REQUIRE(r.body == "ann\n");
      CHECK(r.worker != in.worker);
      answered.insert(r.worker);
    }
    CHECK(answered.count(*replacement) == 1);
    CHECK(s.proc().out().transcript().find("Worker " + std::to_string(in.worker) + " died") !=
          std::string::npos);
    s.stop_gracefully();
    CHECK(process_gone(*replacement));
  }
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("sessions answers 400 to a login without a valid name, 404 and 405 elsewhere",
          "[sessions]") {
  REQUIRE(::access(kSessions.c_str(), X_OK) == 0);
  std::string store = GENERATE(as<std::string>{}, "shared", "local");
  INFO("--store " << store);
  SessionsProcess s({"--workers", "1", "--store", store});
  require_started(s.start(1), s);
  for (const std::string& body : {std::string(), std::string("user="), std::string("name=ann"),
                                  std::string("user=%4"), std::string("user=a%0Ab"),
                                  std::string("user=") + std::string(65, 'x')}) {
    Reply r = call(s.port(), "POST", "/login", body);
    INFO("body '" << body << "': " << r.describe());
    CHECK(r.status == 400);
    CHECK(r.set_cookie.empty());
  }
  // Form encoding is decoded: "Ann+Lee%21" is "Ann Lee!", and another field may come first.
  Reply ok = call(s.port(), "POST", "/login", "remember=1&user=Ann+Lee%21");
  CHECK(ok.status == 200);
  CHECK(ok.body == "Logged in as Ann Lee!\n");
  CHECK(call(s.port(), "GET", "/me", {}, sid_of(ok)).body == "Ann Lee!\n");

  Reply get_login = call(s.port(), "GET", "/login");
  CHECK(get_login.status == 405);
  CHECK(field(get_login.head, "Allow") == "POST");
  CHECK(call(s.port(), "POST", "/me").status == 405);
  CHECK(call(s.port(), "GET", "/").status == 404);
  CHECK(call(s.port(), "GET", "/logins").status == 404);
  s.stop_gracefully();
}

TEST_CASE("sessions works with curl and its cookie jar", "[sessions]") {
  REQUIRE(::access(kSessions.c_str(), X_OK) == 0);
  if (::access(kCurl.c_str(), X_OK) != 0) {
    WARN("no " << kCurl << ": not tested with curl");
    return;
  }
  char dir_template[] = "/tmp/prefork-sessions-XXXXXX";
  REQUIRE(::mkdtemp(dir_template) != nullptr);
  const std::string jar = std::string(dir_template) + "/cookies";
  {
    SessionsProcess s({"--workers", "2"});
    require_started(s.start(2), s);
    const std::string url = "http://127.0.0.1:" + std::to_string(s.port());
    // curl's output (body, then the status from -w) as lines; its exit status must be 0.
    auto curl = [&](std::vector<std::string> args) {
      args.insert(args.begin(), {"--silent", "--show-error", "--max-time", "10", "--cookie", jar,
                                 "--cookie-jar", jar, "--write-out", "%{http_code}\n"});
      HelloProcess c(kCurl, args);
      std::vector<std::string> lines;
      while (auto line = c.out().next(Clock::now() + kDeadline)) lines.push_back(*line);
      auto status = c.wait(Clock::now() + kDeadline);
      while (c.err().next(Clock::now())) {
      }
      INFO("curl " << args.back() << " wrote '" << c.err().transcript() << "'");
      REQUIRE(status.has_value());
      CHECK(WIFEXITED(*status));
      CHECK(WEXITSTATUS(*status) == 0);
      return lines;
    };
    CHECK(curl({"--data", "user=ann", url + "/login"}) ==
          std::vector<std::string>{"Logged in as ann", "200"});
    for (int i = 0; i < 4; ++i)  // new connections: both workers
      CHECK(curl({url + "/me"}) == std::vector<std::string>{"ann", "200"});
    CHECK(curl({"--request", "POST", url + "/logout"}) ==
          std::vector<std::string>{"Logged out", "200"});
    CHECK(curl({url + "/me"}) == std::vector<std::string>{"Not logged in", "401"});
    s.stop_gracefully();
  }
  ::unlink(jar.c_str());
  ::rmdir(dir_template);
}

TEST_CASE("sessions rejects bad options with exit status 2 and says why", "[sessions]") {
  REQUIRE(::access(kSessions.c_str(), X_OK) == 0);
  std::vector<std::string> args = GENERATE(values<std::vector<std::string>>({
      {"--bogus"},
      {"--balance", "sticky"},
      {"--balance"},
      {"--store", "memcached"},
      {"--store", "redis", "--redis", "localhost"},
      {"--store="},
      {"--workers", "0"},
      {"--port", "70000"},
      {"--host", ""},
  }));
  std::string shown;
  for (auto& a : args) shown += "'" + a + "' ";
  INFO("sessions " << shown);
  HelloProcess p(kSessions, args);
  REQUIRE(p.pid() > 0);
  auto status = p.wait(Clock::now() + kDeadline);
  REQUIRE(status.has_value());
  CHECK(WIFEXITED(*status));
  CHECK(WEXITSTATUS(*status) == 2);
  auto why = p.err().next(Clock::now() + kDeadline);
  REQUIRE(why.has_value());
  CHECK(why->starts_with("sessions: "));
  CHECK_FALSE(p.out().next_starting_with("Master PID", Clock::now() + kDeadline).has_value());
}
