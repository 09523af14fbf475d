// The README's minimal example (examples/minimal/main.cpp, the seed's cluster.js + server.js on
// the API alone) run as a user runs it, with PORT=0 and WORKERS=2 in its environment: both
// workers answer over 127.0.0.1 with their pid and the user count the master sent them, and
// SIGTERM ends it with status 0.
#include <catch2/catch.hpp>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "harness.hpp"
#include "hello_process.hpp"
#include "http_client.hpp"

using namespace prefork_test;

namespace {

const std::string kMinimal = PREFORK_EXAMPLES_DIR "/minimal";

// The example reads its settings from the environment, as server.js does: set them for the
// spawn only (posix_spawn copies environ), so no other test sees them.
struct Environment {
  Environment() {
    ::setenv("PORT", "0", 1);
    ::setenv("WORKERS", "2", 1);
  }
  ~Environment() {
    ::unsetenv("PORT");
    ::unsetenv("WORKERS");
  }
};

// "Handled by process <pid>\nUsers: <count>": the pid, or -1 if the body is not that.
pid_t answered_by(const std::string& body) {
  long pid = number_after(body, "Handled by process ");
  if (pid <= 0) return -1;
  std::string head = "Handled by process " + std::to_string(pid) + "\nUsers: ";
  if (!body.starts_with(head) || number_after(body.substr(head.size()), "") < 5) return -1;
  return static_cast<pid_t>(pid);
}

}  // namespace

TEST_CASE("The minimal example answers from both workers with the users the master sent",
          "[minimal]") {
  REQUIRE(::access(kMinimal.c_str(), X_OK) == 0);
  std::size_t fds_before = count_open_fds();
  {
    std::optional<HelloProcess> minimal;
    {
      Environment env;
      minimal.emplace(kMinimal, std::vector<std::string>{});
    }
    REQUIRE(minimal->pid() > 0);
    INFO(minimal->out().transcript());
    REQUIRE(minimal->start(2));
    CHECK(minimal->master_pid() == minimal->pid());

    std::set<pid_t> answered;
    for (int i = 0; i < 20; ++i) {
      HttpResult r = http_get(minimal->port());
      INFO("request " << i << ": status " << r.status << " " << r.error << " body '" << r.body
                      << "'");
      CHECK(r.status == 200);
      pid_t pid = answered_by(r.body);
      CHECK(pid > 0);
      answered.insert(pid);
    }
    CHECK(answered ==
          std::set<pid_t>(minimal->workers().begin(), minimal->workers().end()));

    REQUIRE(::kill(minimal->pid(), SIGTERM) == 0);
    auto status = minimal->wait(Clock::now() + kDeadline);
    REQUIRE(status.has_value());
    CHECK(WIFEXITED(*status));
    CHECK(WEXITSTATUS(*status) == 0);
  }
  CHECK(count_open_fds() == fds_before);
}
