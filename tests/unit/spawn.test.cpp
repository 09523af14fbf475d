// The master's one fork/exec sequence (detail/spawn.hpp): what a child keeps and loses across
// it, and how a failure is reported. Every child ends in _exit (run_child never returns).
#include <prefork/detail/spawn.hpp>

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>

#include <functional>
#include <string>
#include <vector>

#include <prefork/detail/syscall.hpp>

namespace {

using prefork::detail::ChildSetup;
using prefork::detail::retry_eintr;
using prefork::detail::spawn_child;

// The child's exit code, or -1 if it did not exit normally. Blocks until it has exited.
int reap(pid_t pid) {
  int status = 0;
  if (retry_eintr([&] { return ::waitpid(pid, &status, 0); }) != pid) return -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// Everything written to fd until every writer closed it. Bounded by the child's exit.
std::string read_all(int fd) {
  std::string out;
  char buf[256];
  for (;;) {
    ssize_t n = retry_eintr([&] { return ::read(fd, buf, sizeof buf); });
    if (n <= 0) return out;
    out.append(buf, static_cast<std::size_t>(n));
  }
}

}  // namespace

TEST_CASE("spawn_child execs with the given environment and keeps the chosen descriptor",
          "[spawn]") {
  int p[2];
  REQUIRE(::pipe2(p, O_CLOEXEC) == 0);
  std::string script = "test \"$PREFORK_SPAWN_TEST\" = yes && echo kept >&" + std::to_string(p[1]);
  std::vector<std::string> args{"sh", "-c", script};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::string env = "PREFORK_SPAWN_TEST=yes";
  std::vector<char*> envp{env.data(), nullptr};
  std::vector<int> keep{p[1]};
  std::vector<int> close{p[0]};

  ChildSetup s;
  s.label = "test";
  s.close = &close;
  s.keep = &keep;
  s.path = "/bin/sh";
  s.argv = argv.data();
  s.envp = envp.data();
  pid_t pid = spawn_child(s);
  REQUIRE(pid > 0);
  ::close(p[1]);
  CHECK(read_all(p[0]) == "kept\n");
  ::close(p[0]);
  CHECK(reap(pid) == 0);
}

TEST_CASE("spawn_child reports a failed exec with exit code 127", "[spawn]") {
  char* argv[] = {const_cast<char*>("missing"), nullptr};
  char* envp[] = {nullptr};
  ChildSetup s;
  s.label = "test";
  s.path = "/nonexistent/prefork-spawn-test";
  s.argv = argv;
  s.envp = envp;
  pid_t pid = spawn_child(s);
  REQUIRE(pid > 0);
  CHECK(reap(pid) == 127);
}

TEST_CASE("spawn_child in fork mode closes what it is told and exits with the function's result",
          "[spawn]") {
  int p[2];
  REQUIRE(::pipe2(p, O_CLOEXEC) == 0);
  std::vector<int> close{p[0], p[1]};
  const int closed = p[0];
  std::function<int()> run = [closed] { return ::fcntl(closed, F_GETFD) == -1 ? 7 : 1; };
  ChildSetup s;
  s.die_with_parent = ::getpid();
  s.own_process_group = true;
  s.close = &close;
  s.run = &run;
  pid_t pid = spawn_child(s);
  REQUIRE(pid > 0);
  ::close(p[0]);
  ::close(p[1]);
  CHECK(reap(pid) == 7);
}
