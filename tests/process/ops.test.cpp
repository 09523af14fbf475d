// Operations (issue 7, items 1, 3 and 5), driven through the hello example as an operator runs
// it: the control socket and `hello ctl` (status, scale, reload, stop, upgrade, refusals) with
// the conventional signals (TTIN, TTOU, HUP, QUIT),
// --pid-file (written with the master's pid, removed on SIGTERM, refused while a live master
// holds it, stale ones replaced, handed over by a master upgrade) and --user/--group (workers
// as nobody while the master stays root and binds a port below 1024; unknown names and a
// non-root master refused). The privilege tests need root and skip, saying so, without it.
#include <catch2/catch.hpp>

#include <grp.h>
#include <pwd.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <prefork/detail/privileges.hpp>

#include "harness.hpp"
#include "hello_process.hpp"
#include "http_client.hpp"
#include "support/temp_dir.hpp"
#include "support/subreaper.hpp"

using namespace prefork_test;

namespace {

std::string contents(const std::string& path) {
  std::ifstream in(path);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

bool exists(const std::string& path) { return ::access(path.c_str(), F_OK) == 0; }

bool exited_with(const std::optional<int>& status, int code) {
  return status && WIFEXITED(*status) && WEXITSTATUS(*status) == code;
}

/// Everything hello writes to stderr until it exits (or the deadline).
std::string drain(LineReader& r, Clock::time_point deadline) {
  while (r.next(deadline)) {
  }
  return r.transcript();
}

/// The fields of a "Uid:" or "Gid:" line of /proc/<pid>/status (real, effective, saved, fs),
/// or of "Groups:"; empty if the process is gone.
std::vector<long> status_ids(pid_t pid, const std::string& field) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  for (std::string line; std::getline(in, line);) {
    if (!line.starts_with(field + ":")) continue;
    std::vector<long> ids;
    for (auto& w : words(line.substr(field.size() + 1))) ids.push_back(std::stol(w));
    return ids;
  }
  return {};
}

/// nobody's uid and the nogroup (or nobody) group's gid, if this system has them.
struct Nobody {
  uid_t uid = 0;
  gid_t gid = 0;
  std::string group;
  bool found = false;
  Nobody() {
    passwd* pw = ::getpwnam("nobody");
    if (!pw) return;
    uid = pw->pw_uid;
    for (const char* name : {"nogroup", "nobody"})
      if (struct group* gr = ::getgrnam(name)) {
        gid = gr->gr_gid;
        this->group = name;
        found = true;
        return;
      }
  }
};

/// nobody, if the test can act as nobody: it runs as root and the system has nobody and a
/// group for it. Otherwise nullopt, and a warning that the test is skipped, since `needs` (what
/// the test does) needs root.
std::optional<Nobody> nobody_for(const char* needs) {
  if (::geteuid() != 0) {
    WARN("skipped: " << needs << " needs root (euid " << ::geteuid() << ")");
    return std::nullopt;
  }
  Nobody nobody;
  if (!nobody.found) {
    WARN("skipped: this system has no user nobody or no group nogroup/nobody");
    return std::nullopt;
  }
  return nobody;
}

/// A process this test adopted as subreaper: SIGKILLed and reaped at the end of the scope
/// unless waited for. Declared before the HelloProcess whose new master it will hold.
struct Adopted {
  pid_t pid = -1;
  std::optional<int> status;
  Adopted() = default;
  Adopted(const Adopted&) = delete;
  Adopted& operator=(const Adopted&) = delete;
  ~Adopted() {
    if (pid > 0 && !status) kill_and_reap(pid);
  }
  std::optional<int> wait(Clock::time_point deadline) {
    if (!status) status = wait_child(pid, deadline);
    return status;
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// --pid-file

TEST_CASE("hello --pid-file writes the master's pid and removes the file on SIGTERM",
          "[ops][pid-file]") {
  REQUIRE(::access(kHello.c_str(), X_OK) == 0);
  FdLeakCheck fds;
  TempDir dir;
  REQUIRE_FALSE(dir.path.empty());
  const std::string pid_file = dir.path + "/hello.pid";
  HelloProcess hello({"--workers", "2", "--port", "0", "--work", "0", "--pid-file", pid_file});
  REQUIRE(hello.pid() > 0);
  if (!hello.start(2)) FAIL("hello did not start; it said:\n" << hello.out().transcript());
  CHECK(contents(pid_file) == std::to_string(hello.pid()) + "\n");
  struct stat st {};
  REQUIRE(::stat(pid_file.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0644);
  std::vector<std::string> failures;
  get_many(hello.port(), 4, failures);
  CHECK(failures.empty());
  // The workers hold no copy of the locked descriptor (or a worker would keep the lock).
  for (pid_t w : hello.workers()) {
    std::error_code ec;
    for (auto& e : std::filesystem::directory_iterator("/proc/" + std::to_string(w) + "/fd", ec)) {
      std::error_code ec2;
      auto target = std::filesystem::read_symlink(e.path(), ec2);
      CHECK(target.string() != pid_file);
    }
  }
  REQUIRE(::kill(hello.pid(), SIGTERM) == 0);
  CHECK(exited_with(hello.wait(Clock::now() + kDeadline), 0));
  CHECK_FALSE(exists(pid_file));
  CHECK(std::filesystem::is_empty(dir.path));
}

TEST_CASE("A second hello with a pid file that a running hello holds exits 1 naming its pid",
          "[ops][pid-file]") {
  REQUIRE(::access(kHello.c_str(), X_OK) == 0);
  FdLeakCheck fds;
  TempDir dir;
  const std::string pid_file = dir.path + "/hello.pid";
  HelloProcess first({"--workers", "1", "--port", "0", "--work", "0", "--pid-file", pid_file});
  REQUIRE(first.pid() > 0);
  if (!first.start(1)) FAIL("hello did not start; it said:\n" << first.out().transcript());

  HelloProcess second({"--workers", "1", "--port", "0", "--work", "0", "--pid-file", pid_file});
  REQUIRE(second.pid() > 0);
  auto status = second.wait(Clock::now() + kDeadline);
  std::string err = drain(second.err(), Clock::now() + kDeadline);
  INFO("second hello said on stderr:\n" << err);
  CHECK(exited_with(status, 1));
  CHECK(err.find("hello: prefork: pid file " + pid_file + " is held by a running master (pid " +
                 std::to_string(first.pid()) + ")") != std::string::npos);
  CHECK(second.out().transcript().find("Started process") == std::string::npos);

  // The first one is untouched: its file, its workers.
  CHECK(contents(pid_file) == std::to_string(first.pid()) + "\n");
  HttpResult r = http_get(first.port());
  CHECK(r.status == 200);
  CHECK(handled_by(r.body) == first.workers().front());
  REQUIRE(::kill(first.pid(), SIGTERM) == 0);
  CHECK(exited_with(first.wait(Clock::now() + kDeadline), 0));
  CHECK_FALSE(exists(pid_file));
}

TEST_CASE("hello replaces a stale pid file left by a master that was killed", "[ops][pid-file]") {
  REQUIRE(::access(kHello.c_str(), X_OK) == 0);
  FdLeakCheck fds;
  TempDir dir;
  const std::string pid_file = dir.path + "/hello.pid";
  {
    Subreaper subreaper;  // the killed master's workers (they die with it) are reaped here
    REQUIRE(subreaper.ok);
    HelloProcess killed({"--workers", "1", "--port", "0", "--work", "0", "--pid-file", pid_file});
    REQUIRE(killed.pid() > 0);
    if (!killed.start(1)) FAIL("hello did not start; it said:\n" << killed.out().transcript());
    REQUIRE(::kill(killed.pid(), SIGKILL) == 0);
    CHECK(killed.wait(Clock::now() + kDeadline).has_value());
    pid_t worker = killed.workers().front();
    CHECK(wait_child(worker, Clock::now() + kDeadline).has_value());
    CHECK(contents(pid_file) == std::to_string(killed.pid()) + "\n");  // stale now
  }
  HelloProcess hello({"--workers", "1", "--port", "0", "--work", "0", "--pid-file", pid_file});
  REQUIRE(hello.pid() > 0);
  if (!hello.start(1)) FAIL("hello did not start; it said:\n" << hello.err().transcript());
  CHECK(contents(pid_file) == std::to_string(hello.pid()) + "\n");
  REQUIRE(::kill(hello.pid(), SIGTERM) == 0);
  CHECK(exited_with(hello.wait(Clock::now() + kDeadline), 0));
  CHECK_FALSE(exists(pid_file));
}

TEST_CASE("A master upgrade hands the pid file to the new master and the old master leaves it",
          "[ops][pid-file][upgrade]") {
  REQUIRE(::access(kHello.c_str(), X_OK) == 0);
  const std::string spawn = GENERATE(as<std::string>{}, "fork", "exec");
  INFO("--spawn " << spawn);
  FdLeakCheck fds;
  Subreaper subreaper;
  REQUIRE(subreaper.ok);
  TempDir dir;
  const std::string pid_file = dir.path + "/hello.pid";
  Adopted new_master;
  HelloProcess hello({"--workers", "2", "--port", "0", "--work", "0", "--spawn", spawn,
                      "--pid-file", pid_file});
  REQUIRE(hello.pid() > 0);
  if (!hello.start(2)) FAIL("hello did not start; it said:\n" << hello.out().transcript());
  REQUIRE(contents(pid_file) == std::to_string(hello.pid()) + "\n");

  REQUIRE(::kill(hello.pid(), SIGUSR1) == 0);
  auto deadline = Clock::now() + kDeadline;
  auto master = hello.out().next_starting_with("Master PID: ", deadline);
  REQUIRE(master);
  new_master.pid = static_cast<pid_t>(number_after(*master, "Master PID: "));
  auto done = hello.out().next_starting_with("Upgrade ", deadline);
  INFO("hello said:\n" << hello.out().transcript() << "\nand on stderr:\n" << hello.err().transcript());
  REQUIRE(done);
  CHECK(done->starts_with("Upgrade done: new master " + std::to_string(new_master.pid)));
  // The new master took the file before it told the old one it serves.
  CHECK(contents(pid_file) == std::to_string(new_master.pid) + "\n");
  CHECK(exited_with(hello.wait(Clock::now() + kDeadline), 0));
  CHECK(contents(pid_file) == std::to_string(new_master.pid) + "\n");  // the old one left it

  // It is the new master's now: a third master is refused with its pid...
  HelloProcess third({"--workers", "1", "--port", "0", "--pid-file", pid_file});
  CHECK(exited_with(third.wait(Clock::now() + kDeadline), 1));
  CHECK(drain(third.err(), Clock::now() + kDeadline)
            .find("held by a running master (pid " + std::to_string(new_master.pid) + ")") !=
        std::string::npos);
  // ...and the new master removes it when it stops.
  REQUIRE(::kill(new_master.pid, SIGTERM) == 0);
  CHECK(exited_with(new_master.wait(Clock::now() + kDeadline), 0));
  CHECK_FALSE(exists(pid_file));
}

// ---------------------------------------------------------------------------------------------
// --user / --group

TEST_CASE("hello with an unknown user or group exits 2 naming the option", "[ops][privileges]") {
  REQUIRE(::access(kHello.c_str(), X_OK) == 0);
  FdLeakCheck fds;
  struct Case {
    std::vector<std::string> args;
    std::string message;
  };
  for (const Case& c : {Case{{"--user", "no-such-user-prefork"},
                             "hello: prefork: Options.user: no such user 'no-such-user-prefork'"},
                        Case{{"--group", "no-such-group-prefork"},
                             "hello: prefork: Options.group: no such group 'no-such-group-prefork'"}}) {
    std::vector<std::string> args{"--workers", "1", "--port", "0"};
    args.insert(args.end(), c.args.begin(), c.args.end());
    HelloProcess hello(args);
    REQUIRE(hello.pid() > 0);
    auto status = hello.wait(Clock::now() + kDeadline);
    std::string err = drain(hello.err(), Clock::now() + kDeadline);
    INFO(err);
    CHECK(exited_with(status, 2));
    CHECK(err.find(c.message) != std::string::npos);
    CHECK(hello.out().transcript().find("Listening on") == std::string::npos);
  }
}

TEST_CASE("hello --user nobody runs its workers as nobody, its master as root, and serves",
          "[ops][privileges]") {
  auto nobody = nobody_for("dropping privileges");
  if (!nobody) return;
  REQUIRE(::access(kHello.c_str(), X_OK) == 0);
  const std::string spawn = GENERATE(as<std::string>{}, "fork", "exec");
  const std::string balance = GENERATE(as<std::string>{}, "round-robin", "shared");
  INFO("--spawn " << spawn << " --balance " << balance);
  FdLeakCheck fds;
  HelloProcess hello({"--workers", "2", "--port", "0", "--work", "0", "--spawn", spawn,
                      "--balance", balance, "--user", "nobody", "--group", nobody->group});
  REQUIRE(hello.pid() > 0);
  if (!hello.start(2))
    FAIL("hello did not start; it said:\n" << hello.out().transcript() << hello.err().transcript());
  const long uid = nobody->uid, gid = nobody->gid;
  for (pid_t w : hello.workers()) {
    INFO("worker " << w);
    CHECK(status_ids(w, "Uid") == std::vector<long>{uid, uid, uid, uid});
    CHECK(status_ids(w, "Gid") == std::vector<long>{gid, gid, gid, gid});
    for (long g : status_ids(w, "Groups")) CHECK(g != 0);  // no supplementary group of root's
  }
  CHECK(status_ids(hello.pid(), "Uid") == std::vector<long>{0, 0, 0, 0});
  CHECK(status_ids(hello.pid(), "Gid") == std::vector<long>{0, 0, 0, 0});
  std::vector<std::string> failures;
  auto by_pid = get_many(hello.port(), 20, failures);
  CHECK(failures.empty());
  for (auto& [pid, n] : by_pid) CHECK(std::set<pid_t>(hello.workers().begin(), hello.workers().end()).count(pid) == 1);

  // A replacement is switched too, and the master still signals and reaps it.
  REQUIRE(::kill(hello.workers().front(), SIGKILL) == 0);
  auto fresh = hello.next_started(Clock::now() + kDeadline);
  REQUIRE(fresh);
  CHECK(status_ids(*fresh, "Uid") == std::vector<long>{uid, uid, uid, uid});
  REQUIRE(::kill(hello.pid(), SIGTERM) == 0);
  CHECK(exited_with(hello.wait(Clock::now() + kDeadline), 0));
  CHECK(process_gone(*fresh));
}

TEST_CASE("hello as root serves a port below 1024 from workers running as nobody",
          "[ops][privileges]") {
  auto nobody = nobody_for("binding a port below 1024 and dropping privileges");
  if (!nobody) return;
  REQUIRE(::access(kHello.c_str(), X_OK) == 0);
  FdLeakCheck fds;
  // A free privileged port: hello itself is the probe (another test, or a service, may hold
  // one); "Address already in use" means try the next.
  for (int port : {1023, 1013, 997, 979, 953, 919, 887, 853, 811, 777}) {
    HelloProcess hello({"--workers", "2", "--port", std::to_string(port), "--work", "0",
                        "--user", "nobody", "--group", nobody->group});
    REQUIRE(hello.pid() > 0);
    if (!hello.start(2)) {
      auto status = hello.wait(Clock::now() + kDeadline);
      std::string err = drain(hello.err(), Clock::now() + kDeadline);
      if (exited_with(status, 1) && err.find("Address already in use") != std::string::npos)
        continue;
      FAIL("hello on port " << port << " did not start:\n" << hello.out().transcript() << err);
    }
    INFO("port " << port);
    CHECK(hello.port() == port);
    for (pid_t w : hello.workers()) CHECK(status_ids(w, "Uid").at(1) == static_cast<long>(nobody->uid));
    std::vector<std::string> failures;
    auto by_pid = get_many(port, 10, failures);
    CHECK(failures.empty());
    CHECK(by_pid.size() == 2);
    REQUIRE(::kill(hello.pid(), SIGTERM) == 0);
    CHECK(exited_with(hello.wait(Clock::now() + kDeadline), 0));
    return;
  }
  FAIL("every candidate port below 1024 was in use");
}

TEST_CASE("hello --user from a master that is not root exits 1 saying it needs root",
          "[ops][privileges]") {
  auto nobody = nobody_for("becoming nobody to run a non-root master");
  if (!nobody) return;
  REQUIRE(::access(kHello.c_str(), X_OK) == 0);
  FdLeakCheck fds;
  Pipe out, err;
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::dup2(out.write, 1);
    ::dup2(err.write, 2);
    if (::setgroups(0, nullptr) != 0 || ::setgid(nobody->gid) != 0 || ::setuid(nobody->uid) != 0)
      ::_exit(126);
    const char* argv[] = {kHello.c_str(), "--workers", "1", "--port", "0", "--user", "root",
                          nullptr};
    ::execv(kHello.c_str(), const_cast<char**>(argv));
    ::_exit(127);
  }
  out.close_write();
  err.close_write();
  auto status = wait_child(pid, Clock::now() + kDeadline);
  if (!status) kill_and_reap(pid);
  LineReader err_reader(err.read);
  std::string text = drain(err_reader, Clock::now() + kDeadline);
  INFO(text);
  CHECK(exited_with(status, 1));
  CHECK(text.find("workers can run as user root (0), group 0 only if the master runs as root (it runs as "
                  "uid " + std::to_string(nobody->uid)) != std::string::npos);
}

TEST_CASE("A worker's privilege drop switches every id, cannot regain root, and fails cleanly",
          "[ops][privileges]") {
  auto nobody = nobody_for("dropping privileges");
  if (!nobody) return;
  auto creds = prefork::detail::resolve_credentials("nobody", nobody->group);
  CHECK(creds.uid == nobody->uid);
  CHECK(creds.gid == nobody->gid);
  auto numeric = prefork::detail::resolve_credentials(std::to_string(nobody->uid),
                                                      std::to_string(nobody->gid));
  CHECK(numeric.uid == nobody->uid);
  CHECK(numeric.gid == nobody->gid);
  CHECK_THROWS_WITH(prefork::detail::resolve_credentials("4000000001", ""),
                    Catch::Contains("Options.user: uid 4000000001 has no passwd entry"));

  // Exit codes of the forked child: 0 ok; 10+n the n-th check failed.
  pid_t pid = fork_harness([&] {
    char why[512];
    if (!prefork::detail::drop_privileges(creds, why, sizeof why)) return 10;
    uid_t r, e, s;
    gid_t gr, ge, gs;
    if (::getresuid(&r, &e, &s) != 0 || r != nobody->uid || e != nobody->uid || s != nobody->uid) return 11;
    if (::getresgid(&gr, &ge, &gs) != 0 || gr != nobody->gid || ge != nobody->gid || gs != nobody->gid) return 12;
    if (::setuid(0) == 0 || ::seteuid(0) == 0) return 13;
    // A second drop to another user now fails, with a message, and changes nothing.
    prefork::detail::Credentials root = prefork::detail::resolve_credentials("root", "");
    if (prefork::detail::drop_privileges(root, why, sizeof why)) return 14;
    if (std::string(why).find("cannot switch to user root (0)") == std::string::npos) return 15;
    if (::getuid() != nobody->uid) return 16;
    return 0;
  });
  auto status = wait_child(pid, Clock::now() + kDeadline);
  if (!status) kill_and_reap(pid);
  CHECK(exited_with(status, 0));
}

// ---------------------------------------------------------------------------------------------
// The control socket: hello --control PATH, and `hello ctl ...` as its client

namespace {

/// One `hello ctl ...` run: its exit status, stdout and stderr.
struct CtlResult {
  std::optional<int> status;
  std::string out, err;
  /// The JSON reply it printed (null if it printed none that parses).
  nlohmann::json reply() const {
    return nlohmann::json::parse(out, nullptr, /*allow_exceptions=*/false);
  }
};

CtlResult ctl(const std::vector<std::string>& words) {
  std::vector<std::string> args{"ctl"};
  args.insert(args.end(), words.begin(), words.end());
  HelloProcess client(args);
  CtlResult r;
  auto deadline = Clock::now() + 2 * kDeadline;
  r.status = client.wait(deadline);
  r.out = drain(client.out(), deadline);
  r.err = drain(client.err(), deadline);
  return r;
}

CtlResult ctl(const std::string& socket, const std::vector<std::string>& words) {
  std::vector<std::string> w = words;
  w.insert(w.end(), {"--control", socket});
  return ctl(w);
}

/// Asks for the status until pred(reply) holds or the deadline passes; the last reply.
template <class Pred>
nlohmann::json status_until(const std::string& socket, Pred pred) {
  auto deadline = Clock::now() + kDeadline;
  nlohmann::json last;
  do {
    CtlResult r = ctl(socket, {"status"});
    last = r.reply();
    if (exited_with(r.status, 0) && last.is_object() && pred(last)) return last;
  } while (Clock::now() < deadline);
  return last;
}

std::set<pid_t> worker_pids(const nlohmann::json& status) {
  std::set<pid_t> pids;
  for (auto& w : status["workers"]) pids.insert(w["pid"].get<pid_t>());
  return pids;
}

std::size_t listening_workers(const nlohmann::json& status) {
  std::size_t n = 0;
  for (auto& w : status["workers"])
    if (w["state"] == "listening" && !w["draining"].get<bool>()) ++n;
  return n;
}

}  // namespace

TEST_CASE("hello ctl status shows the master and its real workers with their counters",
          "[ops][control]") {
  REQUIRE(::access(kHello.c_str(), X_OK) == 0);
  FdLeakCheck fds;
  TempDir dir;
  const std::string socket = dir.path + "/ctl.sock";
  HelloProcess hello({"--workers", "2", "--port", "0", "--work", "0", "--control", socket});
  REQUIRE(hello.pid() > 0);
  if (!hello.start(2)) FAIL("hello did not start; it said:\n" << hello.out().transcript());
  struct stat st {};
  REQUIRE(::lstat(socket.c_str(), &st) == 0);
  CHECK(S_ISSOCK(st.st_mode));
  CHECK((st.st_mode & 0777) == 0600);
  std::vector<std::string> failures;
  get_many(hello.port(), 10, failures);
  REQUIRE(failures.empty());

  CtlResult r = ctl(socket, {"status"});
  INFO("ctl said: " << r.out << r.err);
  REQUIRE(exited_with(r.status, 0));
  nlohmann::json s = r.reply();
  REQUIRE(s.is_object());
  CHECK(s["ok"] == true);
  CHECK(s["pid"] == hello.pid());
  CHECK(s["workers_wanted"] == 2);
  CHECK(s["addresses"][0] == "127.0.0.1:" + std::to_string(hello.port()));
  CHECK(s["uptime_ms"].get<long>() >= 0);
  REQUIRE(s["workers"].size() == 2);
  CHECK(worker_pids(s) == std::set<pid_t>(hello.workers().begin(), hello.workers().end()));
  std::uint64_t requests = 0, taken = 0;
  for (auto& w : s["workers"]) {
    CHECK(w["state"] == "listening");
    CHECK(w["restarts"] == 0);
    CHECK(w["rss_bytes"].get<std::uint64_t>() > 0);
    CHECK(w["connections"] == 0);  // each request closed its connection
    requests += w["requests"].get<std::uint64_t>();
    taken += w["connections_total"].get<std::uint64_t>();
  }
  // The status asks the workers for their counters: all 10 requests are in it.
  CHECK(requests == 10);
  CHECK(taken == 10);

  REQUIRE(::kill(hello.pid(), SIGTERM) == 0);
  CHECK(exited_with(hello.wait(Clock::now() + kDeadline), 0));
  CHECK_FALSE(exists(socket));  // removed by the master that made it
}

TEST_CASE("hello ctl scale 3 leaves three workers and scale 1 one, each serving",
          "[ops][control]") {
  REQUIRE(::access(kHello.c_str(), X_OK) == 0);
  FdLeakCheck fds;
  TempDir dir;
  const std::string socket = dir.path + "/ctl.sock";
  HelloProcess hello({"--workers", "2", "--port", "0", "--work", "0", "--control", socket});
  REQUIRE(hello.pid() > 0);
  if (!hello.start(2)) FAIL("hello did not start; it said:\n" << hello.out().transcript());

  CtlResult up = ctl(socket, {"scale", "3"});
  INFO("ctl said: " << up.out << up.err);
  REQUIRE(exited_with(up.status, 0));
  CHECK(up.reply()["workers"] == 3);
  auto third = hello.next_started(Clock::now() + kDeadline);
  REQUIRE(third);
  nlohmann::json s = status_until(socket, [](auto& j) { return listening_workers(j) == 3; });
  REQUIRE(listening_workers(s) == 3);
  CHECK(s["workers_wanted"] == 3);
  std::set<pid_t> three = worker_pids(s);
  CHECK(three.count(*third) == 1);
  // Round-robin reaches all three.
  std::set<pid_t> served;
  for (int i = 0; i < 30; ++i) served.insert(handled_by(http_get(hello.port()).body));
  CHECK(served == three);

  CtlResult down = ctl(socket, {"scale", "1"});
  REQUIRE(exited_with(down.status, 0));
  s = status_until(socket, [](auto& j) { return j["workers"].size() == 1; });
  REQUIRE(s["workers"].size() == 1);
  CHECK(s["workers_wanted"] == 1);
  pid_t left = *worker_pids(s).begin();
  for (pid_t p : three)
    if (p != left) CHECK(process_gone(p));
  for (int i = 0; i < 5; ++i) CHECK(handled_by(http_get(hello.port()).body) == left);
  // None of the scaled-away workers was restarted.
  CHECK(hello.out().transcript().find("died") == std::string::npos);

  REQUIRE(::kill(hello.pid(), SIGTERM) == 0);
  CHECK(exited_with(hello.wait(Clock::now() + kDeadline), 0));
}

TEST_CASE("hello ctl reload returns once every worker is replaced, and stop once the master "
          "has exited",
          "[ops][control]") {
  REQUIRE(::access(kHello.c_str(), X_OK) == 0);
  FdLeakCheck fds;
  TempDir dir;
  const std::string socket = dir.path + "/ctl.sock";
  HelloProcess hello({"--workers", "2", "--port", "0", "--work", "0", "--control", socket});
  REQUIRE(hello.pid() > 0);
  if (!hello.start(2)) FAIL("hello did not start; it said:\n" << hello.out().transcript());
  std::set<pid_t> before(hello.workers().begin(), hello.workers().end());

  CtlResult r = ctl(socket, {"reload"});
  INFO("ctl said: " << r.out << r.err);
  REQUIRE(exited_with(r.status, 0));
  CHECK(r.reply()["replaced"] == 2);
  // Answered after the old workers exited: they are gone, and the status shows only new ones.
  for (pid_t p : before) CHECK(process_gone(p));
  nlohmann::json s = ctl(socket, {"status"}).reply();
  REQUIRE(s["workers"].size() == 2);
  for (auto& w : s["workers"]) {
    CHECK(before.count(w["pid"].get<pid_t>()) == 0);
    CHECK(w["restarts"] == 1);
  }
  CHECK(s["restarts"] == 2);

  CtlResult stop = ctl(socket, {"stop"});
  REQUIRE(exited_with(stop.status, 0));
  CHECK(stop.reply()["stopping"] == true);
  // ctl returned once the master closed the connection, at its exit: reaped at once.
  CHECK(exited_with(hello.wait(Clock::now() + std::chrono::seconds(2)), 0));
  CHECK_FALSE(exists(socket));
}

TEST_CASE("hello ctl refuses bad words with status 2 and reports a missing master with 1",
          "[ops][control]") {
  REQUIRE(::access(kHello.c_str(), X_OK) == 0);
  TempDir dir;
  const std::string socket = dir.path + "/ctl.sock";
  for (auto words : std::vector<std::vector<std::string>>{
           {}, {"bogus"}, {"scale"}, {"scale", "0"}, {"scale", "4097"}, {"scale", "x"},
           {"status", "extra"}}) {
    CtlResult r = ctl(socket, words);
    INFO("words: " << words.size() << (words.empty() ? "" : " " + words[0]));
    CHECK(exited_with(r.status, 2));
    CHECK(r.err.find("usage: hello ctl") != std::string::npos);
  }
  CtlResult none = ctl(socket, {"status"});
  CHECK(exited_with(none.status, 1));
  CHECK(none.err.find("no master is listening on " + socket) != std::string::npos);
}

TEST_CASE("A second hello on the same control socket exits 1 and a stale one is replaced",
          "[ops][control]") {
  REQUIRE(::access(kHello.c_str(), X_OK) == 0);
  FdLeakCheck fds;
  TempDir dir;
  const std::string socket = dir.path + "/ctl.sock";
  {
    HelloProcess first({"--workers", "1", "--port", "0", "--work", "0", "--control", socket});
    REQUIRE(first.pid() > 0);
    if (!first.start(1)) FAIL("hello did not start; it said:\n" << first.out().transcript());
    HelloProcess second({"--workers", "1", "--port", "0", "--work", "0", "--control", socket});
    CHECK(exited_with(second.wait(Clock::now() + kDeadline), 1));
    CHECK(drain(second.err(), Clock::now() + kDeadline)
              .find("control socket " + socket + " is in use by a running master") !=
          std::string::npos);
    CHECK(ctl(socket, {"status"}).reply()["pid"] == first.pid());  // untouched
    // SIGKILL: the master cannot remove its socket file.
    REQUIRE(::kill(first.pid(), SIGKILL) == 0);
    REQUIRE(first.wait(Clock::now() + kDeadline));
  }
  REQUIRE(exists(socket));
  HelloProcess third({"--workers", "1", "--port", "0", "--work", "0", "--control", socket});
  REQUIRE(third.pid() > 0);
  if (!third.start(1)) FAIL("hello did not start; it said:\n" << third.err().transcript());
  CHECK(ctl(socket, {"status"}).reply()["pid"] == third.pid());
  CHECK(exited_with(ctl(socket, {"stop"}).status, 0));
  CHECK(exited_with(third.wait(Clock::now() + kDeadline), 0));
}

TEST_CASE("The control socket refuses another uid: by its mode, and by SO_PEERCRED past it",
          "[ops][control][privileges]") {
  auto nobody = nobody_for("running the client as another user");
  if (!nobody) return;
  REQUIRE(::access(kHello.c_str(), X_OK) == 0);
  TempDir dir;
  REQUIRE(::chmod(dir.path.c_str(), 0755) == 0);  // nobody may reach the socket's directory
  const std::string socket = dir.path + "/ctl.sock";
  HelloProcess hello({"--workers", "1", "--port", "0", "--work", "0", "--control", socket});
  REQUIRE(hello.pid() > 0);
  if (!hello.start(1)) FAIL("hello did not start; it said:\n" << hello.out().transcript());

  // `hello ctl status` as nobody: a forked child that drops to nobody and execs the client.
  auto as_nobody = [&] {
    Pipe err;
    pid_t pid = ::fork();
    if (pid == 0) {
      ::dup2(err.write, 2);
      ::dup2(err.write, 1);
      if (::setgroups(0, nullptr) != 0 || ::setresgid(nobody->gid, nobody->gid, nobody->gid) != 0 ||
          ::setresuid(nobody->uid, nobody->uid, nobody->uid) != 0)
        ::_exit(99);
      ::execl(kHello.c_str(), kHello.c_str(), "ctl", "status", "--control", socket.c_str(),
              static_cast<char*>(nullptr));
      ::_exit(98);
    }
    err.close_write();
    LineReader reader(err.read);
    CtlResult r;
    r.status = wait_child(pid, Clock::now() + kDeadline);
    r.err = drain(reader, Clock::now() + kDeadline);
    if (!r.status) kill_and_reap(pid);
    return r;
  };
  CtlResult by_mode = as_nobody();
  INFO("as nobody, mode 0600: " << by_mode.err);
  CHECK(exited_with(by_mode.status, 1));
  CHECK(by_mode.err.find("Permission denied") != std::string::npos);

  REQUIRE(::chmod(socket.c_str(), 0666) == 0);  // past the mode: the master checks the peer
  CtlResult by_peer = as_nobody();
  INFO("as nobody, mode 0666: " << by_peer.err);
  CHECK(exited_with(by_peer.status, 1));
  CHECK(by_peer.err.find("permission denied: uid " + std::to_string(nobody->uid)) !=
        std::string::npos);
  // Root still gets in, and the master is unharmed.
  CHECK(ctl(socket, {"status"}).reply()["pid"] == hello.pid());
  REQUIRE(::kill(hello.pid(), SIGTERM) == 0);
  CHECK(exited_with(hello.wait(Clock::now() + kDeadline), 0));
}

TEST_CASE("SIGTTIN adds a worker, SIGTTOU removes one, SIGHUP reloads, SIGQUIT stops gracefully",
          "[ops][control][signals]") {
  REQUIRE(::access(kHello.c_str(), X_OK) == 0);
  FdLeakCheck fds;
  TempDir dir;
  const std::string socket = dir.path + "/ctl.sock";
  HelloProcess hello({"--workers", "2", "--port", "0", "--work", "0", "--control", socket});
  REQUIRE(hello.pid() > 0);
  if (!hello.start(2)) FAIL("hello did not start; it said:\n" << hello.out().transcript());

  REQUIRE(::kill(hello.pid(), SIGTTIN) == 0);
  REQUIRE(hello.next_started(Clock::now() + kDeadline));
  nlohmann::json s = status_until(socket, [](auto& j) { return listening_workers(j) == 3; });
  CHECK(listening_workers(s) == 3);
  CHECK(s["workers_wanted"] == 3);

  REQUIRE(::kill(hello.pid(), SIGTTOU) == 0);
  s = status_until(socket, [](auto& j) { return j["workers"].size() == 2; });
  CHECK(s["workers"].size() == 2);
  CHECK(s["workers_wanted"] == 2);

  std::set<pid_t> before = worker_pids(s);
  REQUIRE(::kill(hello.pid(), SIGHUP) == 0);
  auto done = hello.out().next_starting_with("Reload done: 2 workers", Clock::now() + kDeadline);
  INFO("hello said:\n" << hello.out().transcript());
  CHECK(done);
  s = ctl(socket, {"status"}).reply();
  for (pid_t p : worker_pids(s)) CHECK(before.count(p) == 0);

  REQUIRE(::kill(hello.pid(), SIGQUIT) == 0);  // no core dump: a graceful stop
  CHECK(exited_with(hello.wait(Clock::now() + kDeadline), 0));
  for (pid_t p : worker_pids(s)) CHECK(process_gone(p));
  CHECK_FALSE(exists(socket));
}

TEST_CASE("hello ctl upgrade answers with the new master, which takes the control socket over",
          "[ops][control][upgrade]") {
  REQUIRE(::access(kHello.c_str(), X_OK) == 0);
  FdLeakCheck fds;
  Subreaper subreaper;
  REQUIRE(subreaper.ok);
  TempDir dir;
  const std::string socket = dir.path + "/ctl.sock";
  Adopted new_master;
  HelloProcess hello({"--workers", "2", "--port", "0", "--work", "0", "--control", socket});
  REQUIRE(hello.pid() > 0);
  if (!hello.start(2)) FAIL("hello did not start; it said:\n" << hello.out().transcript());

  CtlResult r = ctl(socket, {"upgrade"});
  INFO("ctl said: " << r.out << r.err << "\nhello said:\n" << hello.out().transcript());
  REQUIRE(exited_with(r.status, 0));
  new_master.pid = r.reply()["new_master"].get<pid_t>();
  REQUIRE(new_master.pid > 0);
  CHECK(exited_with(hello.wait(Clock::now() + kDeadline), 0));
  REQUIRE(exists(socket));  // the old master left the file to the new one
  nlohmann::json s = ctl(socket, {"status"}).reply();
  CHECK(s["pid"] == new_master.pid);
  CHECK(listening_workers(s) == 2);
  std::vector<std::string> failures;
  get_many(hello.port(), 4, failures);
  CHECK(failures.empty());

  CHECK(exited_with(ctl(socket, {"stop"}).status, 0));
  CHECK(exited_with(new_master.wait(Clock::now() + kDeadline), 0));
  CHECK_FALSE(exists(socket));
}
