// The broadcast example as a user runs it (examples/broadcast/main.cpp, built into
// PREFORK_EXAMPLES_DIR): the master's counts follow the seed's squaring sequence printed as
// JavaScript prints numbers, every answer names its worker and carries a count, a request made
// after a broadcast line sees that count (or a later one), a replacement worker answers with the
// current count from its first request, bad options exit 2, SIGTERM exits 0.
//
// The test is a client and an observer: broadcast runs as a child with its stdout on a pipe;
// the master's lines are read as they come, with deadlines.
#include <catch2/catch.hpp>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <functional>
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

const std::string kBroadcast = PREFORK_EXAMPLES_DIR "/broadcast";

// 5 squared again and again in doubles, as JavaScript prints them (node -e 'let c = 5; ...').
const std::vector<std::string> kCounts = {
    "25",
    "625",
    "390625",
    "152587890625",
    "2.3283064365386964e+22",
    "5.421010862427523e+44",
    "2.9387358770557196e+89",
    "8.636168555094449e+178",
    "Infinity",
};

/// The position of text in kCounts, or -1.
int count_index(std::string_view text) {
  auto it = std::find(kCounts.begin(), kCounts.end(), text);
  return it == kCounts.end() ? -1 : static_cast<int>(it - kCounts.begin());
}

/// One answer: who served it and the position of its count in kCounts.
struct Answer {
  pid_t pid = -1;
  int index = -1;
};

/// An answer that is exactly "Handled by process <pid>\nUsers: <count>" with a count of the
/// sequence; nullopt for anything else.
std::optional<Answer> parse_answer(const HttpResult& r) {
  if (r.status != 200) return std::nullopt;
  auto nl = r.body.find('\n');
  if (nl == std::string::npos) return std::nullopt;
  pid_t pid = handled_by(r.body.substr(0, nl + 1));
  std::string_view users = std::string_view(r.body).substr(nl + 1);
  if (pid <= 0 || !users.starts_with("Users: ")) return std::nullopt;
  int index = count_index(users.substr(7));
  if (index < 0) return std::nullopt;
  return Answer{pid, index};
}

std::string describe(const HttpResult& r) {
  return "status " + std::to_string(r.status) + " " + r.error + " body '" + r.body + "'";
}

/// broadcast as a child, with what its master printed so far: the counts in order, the workers
/// started, the deaths reported.
class BroadcastProcess {
 public:
  explicit BroadcastProcess(const std::vector<std::string>& args) : proc_(kBroadcast, args) {}

  HelloProcess& proc() noexcept { return proc_; }
  const std::string& transcript() noexcept { return proc_.out().transcript(); }

  /// Reads lines until done() holds; false at the deadline or at EOF.
  bool read_until(const std::function<bool()>& done, Clock::time_point deadline) {
    while (!done()) {
      auto line = proc_.out().next(deadline);
      if (!line) return false;
      take(*line);
    }
    return true;
  }
  /// Takes the lines already written, without waiting.
  void read_available() {
    while (auto line = proc_.out().next(Clock::now())) take(*line);
  }

  /// The master's first lines and `workers` "Started process" lines.
  bool start(unsigned workers) {
    return read_until([&] { return port_ > 0 && started_.size() >= workers && !counts_.empty(); },
                      Clock::now() + kDeadline);
  }

  int port() const noexcept { return port_; }
  pid_t master_pid() const noexcept { return master_pid_; }
  /// Every "Users count is now X" so far, X as printed.
  const std::vector<std::string>& counts() const noexcept { return counts_; }
  /// The position in kCounts of the last count printed (-1: none yet).
  int current() const { return counts_.empty() ? -1 : count_index(counts_.back()); }
  const std::vector<pid_t>& started() const noexcept { return started_; }
  const std::vector<pid_t>& died() const noexcept { return died_; }

 private:
  void take(const std::string& line) {
    if (line.starts_with("Master PID: ")) master_pid_ = static_cast<pid_t>(number_after(line, "Master PID: "));
    if (line.starts_with("Listening on ")) {
      auto colon = line.rfind(':');
      if (colon != std::string::npos) port_ = static_cast<int>(number_after(line.substr(colon + 1), ""));
    }
    if (line.starts_with("Users count is now ")) counts_.push_back(line.substr(19));
    if (line.starts_with("Started process "))
      started_.push_back(static_cast<pid_t>(number_after(line, "Started process ")));
    if (line.starts_with("Worker ") && line.find(" died ") != std::string::npos)
      died_.push_back(static_cast<pid_t>(number_after(line, "Worker ")));
  }

  HelloProcess proc_;
  int port_ = 0;
  pid_t master_pid_ = -1;
  std::vector<std::string> counts_;
  std::vector<pid_t> started_, died_;
};

/// Fails the test with what the master printed unless ok (INFO would capture the transcript as
/// it was when declared, before any line came).
void require_read(bool ok, BroadcastProcess& b) {
  if (!ok) FAIL("broadcast printed:\n" << b.transcript());
}

/// SIGTERM to the master: it must exit 0 and take its workers along.
void stop_gracefully(BroadcastProcess& b) {
  REQUIRE(::kill(b.proc().pid(), SIGTERM) == 0);
  auto status = b.proc().wait(Clock::now() + kDeadline);
  REQUIRE(status.has_value());
  CHECK(WIFEXITED(*status));
  CHECK(WEXITSTATUS(*status) == 0);
  for (pid_t pid : b.started()) {
    INFO("worker " << pid);
    CHECK(process_gone(pid));
  }
}

/// Kills one of two workers with SIGKILL and returns the first answer of its replacement, which
/// must come with a count at least as recent as the last one printed before the request.
void replacement_answers_with_current_count(const std::string& interval_ms, int at_least) {
  std::size_t fds_before = count_open_fds();
  {
    BroadcastProcess b({"--workers", "2", "--work", "0", "--port", "0", "--interval-ms", interval_ms});
    REQUIRE(b.proc().pid() > 0);
    require_read(b.start(2), b);
    require_read(b.read_until([&] { return b.current() >= at_least; }, Clock::now() + kDeadline), b);

    pid_t victim = b.started()[0];
    REQUIRE(::kill(victim, SIGKILL) == 0);
    require_read(b.read_until([&] { return b.started().size() == 3; }, Clock::now() + kDeadline), b);
    CHECK(b.died() == std::vector<pid_t>{victim});
    pid_t replacement = b.started()[2];

    // Round-robin: the replacement gets one of the next requests.
    std::optional<Answer> first;
    auto deadline = Clock::now() + kDeadline;
    while (!first && Clock::now() < deadline) {
      b.read_available();
      int current = b.current();
      HttpResult r = http_get(b.port());
      auto a = parse_answer(r);
      INFO(describe(r));
      REQUIRE(a.has_value());
      CHECK(a->index >= current);
      CHECK(a->pid != victim);
      if (a->pid == replacement) first = a;
    }
    REQUIRE(first.has_value());
    CHECK(first->index >= at_least);
    stop_gracefully(b);
  }
  CHECK(count_open_fds() == fds_before);
}

}  // namespace

TEST_CASE("broadcast's master squares the count from 5 each interval and prints it as JavaScript does",
          "[broadcast]") {
  REQUIRE(::access(kBroadcast.c_str(), X_OK) == 0);
  std::size_t fds_before = count_open_fds();
  {
    BroadcastProcess b({"--workers", "1", "--work", "0", "--port", "0", "--interval-ms", "20"});
    REQUIRE(b.proc().pid() > 0);
    require_read(b.start(1), b);
    require_read(b.read_until([&] { return b.counts().size() >= kCounts.size() + 1; },
                              Clock::now() + kDeadline),
                 b);
    // Every count in order, none skipped; past the largest double it stays Infinity.
    std::vector<std::string> expected = kCounts;
    expected.push_back("Infinity");
    CHECK(std::vector<std::string>(b.counts().begin(), b.counts().begin() + expected.size()) ==
          expected);
    stop_gracefully(b);
  }
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("Every broadcast answer names its worker and a count no older than the last broadcast line",
          "[broadcast]") {
  REQUIRE(::access(kBroadcast.c_str(), X_OK) == 0);
  std::size_t fds_before = count_open_fds();
  {
    BroadcastProcess b({"--workers", "2", "--work", "0", "--port", "0", "--interval-ms", "200"});
    REQUIRE(b.proc().pid() > 0);
    require_read(b.start(2), b);
    const std::set<pid_t> workers(b.started().begin(), b.started().end());
    REQUIRE(workers.size() == 2);

    // Until the count has changed a few times: each request is made after reading the lines
    // printed so far, so its answer must carry the last printed count or a later one (the
    // master prints a count after it has sent it, and the connection reaches a worker behind
    // it on the same channel).
    std::map<pid_t, std::set<int>> seen;  // the counts each worker answered with
    int requests = 0;
    auto deadline = Clock::now() + kDeadline;
    while (b.current() < 4 && Clock::now() < deadline) {
      b.read_available();
      int current = b.current();
      HttpResult r = http_get(b.port());
      ++requests;
      auto a = parse_answer(r);
      INFO("request " << requests << ": " << describe(r));
      REQUIRE(a.has_value());
      CHECK(workers.count(a->pid) == 1);
      CHECK(a->index >= current);
      seen[a->pid].insert(a->index);
    }
    REQUIRE(b.current() >= 4);
    CHECK(keys(seen) == workers);

    // After a broadcast line every worker moves to that count: poll each until it answers with it.
    b.read_available();
    const int line = b.current();
    std::set<pid_t> moved;
    deadline = Clock::now() + kDeadline;
    while (moved != workers && Clock::now() < deadline) {
      HttpResult r = http_get(b.port());
      auto a = parse_answer(r);
      INFO(describe(r));
      REQUIRE(a.has_value());
      CHECK(a->index >= line);
      moved.insert(a->pid);
    }
    CHECK(moved == workers);
    CHECK(b.died().empty());
    stop_gracefully(b);
  }
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("A broadcast worker replaced after SIGKILL answers its first request with the count",
          "[broadcast]") {
  REQUIRE(::access(kBroadcast.c_str(), X_OK) == 0);
  // No broadcast during the test: only the count sent when the replacement came online can
  // give it one.
  replacement_answers_with_current_count("600000", 0);
}

TEST_CASE("A broadcast worker replaced after the count changed answers with the new count",
          "[broadcast]") {
  REQUIRE(::access(kBroadcast.c_str(), X_OK) == 0);
  replacement_answers_with_current_count("1000", 1);
}

TEST_CASE("broadcast exits 0 on SIGTERM and leaves no worker behind", "[broadcast]") {
  REQUIRE(::access(kBroadcast.c_str(), X_OK) == 0);
  std::size_t fds_before = count_open_fds();
  {
    BroadcastProcess b({"--workers", "2", "--work", "0", "--port", "0"});
    REQUIRE(b.proc().pid() > 0);
    require_read(b.start(2), b);
    HttpResult r = http_get(b.port());
    auto a = parse_answer(r);
    INFO(describe(r));
    REQUIRE(a.has_value());
    CHECK(a->index == 0);  // the default interval is 10 s
    stop_gracefully(b);
    CHECK_FALSE(b.proc().out().next(Clock::now() + kDeadline).has_value());
    CHECK(b.proc().out().eof());
    CHECK(http_get(b.port()).status == 0);
  }
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("broadcast rejects bad options with exit status 2 and says why", "[broadcast]") {
  REQUIRE(::access(kBroadcast.c_str(), X_OK) == 0);
  std::vector<std::string> args = GENERATE(values<std::vector<std::string>>({
      {"--bogus"},
      {"--interval-ms", "0"},
      {"--interval-ms", "ten"},
      {"--interval-ms"},
      {"--workers", "0"},
      {"--port", "70000"},
      {"--host", ""},
  }));
  std::string shown;
  for (auto& a : args) shown += "'" + a + "' ";
  INFO("broadcast " << shown);
  HelloProcess b(kBroadcast, args);
  REQUIRE(b.pid() > 0);
  auto status = b.wait(Clock::now() + kDeadline);
  REQUIRE(status.has_value());
  CHECK(WIFEXITED(*status));
  CHECK(WEXITSTATUS(*status) == 2);
  auto why = b.err().next(Clock::now() + kDeadline);
  REQUIRE(why.has_value());
  CHECK(why->starts_with("broadcast: "));
  CHECK_FALSE(b.out().next_starting_with("Master PID", Clock::now() + kDeadline).has_value());
}
