// detail::PidFile (include/prefork/detail/pid_file.hpp): published whole, held by a lock that a
// second holder cannot take, replaced when stale, removed only by its holder, handed over
// across a master upgrade, and exactly one winner when several processes race for it.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <poll.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <system_error>
#include <vector>

#include <prefork/detail/pid_file.hpp>

#include "support/descriptors.hpp"
#include "support/temp_dir.hpp"

using prefork::detail::PidFile;
using prefork_test::FdLeakCheck;
using prefork_test::TempDir;

namespace {

std::string contents(const std::string& path) {
  std::ifstream in(path);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

bool exists(const std::string& path) { return ::access(path.c_str(), F_OK) == 0; }

}  // namespace

TEST_CASE("A pid file is published with the pid, locked close-on-exec, and removed by remove()",
          "[pid_file]") {
  FdLeakCheck fds;
  TempDir dir;
  REQUIRE_FALSE(dir.path.empty());
  const std::string path = dir.path + "/master.pid";
  PidFile f;
  REQUIRE_FALSE(f.acquire(path, 4242));
  CHECK(contents(path) == "4242\n");
  CHECK(f.held());
  CHECK(f.current());
  CHECK(dir.names() == std::vector<std::string>{"master.pid"});  // no temporary file left
  CHECK((::fcntl(f.native_handle(), F_GETFD) & FD_CLOEXEC) != 0);
  struct stat st {};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  CHECK((st.st_mode & 0022) == 0);  // 0644 at most: nobody else may write it
  f.remove();
  CHECK_FALSE(exists(path));
  CHECK_FALSE(f.held());
}

TEST_CASE("A pid file held by a live holder is refused with the holder's pid and left as it is",
          "[pid_file]") {
  FdLeakCheck fds;
  TempDir dir;
  const std::string path = dir.path + "/master.pid";
  PidFile first;
  REQUIRE_FALSE(first.acquire(path, 111));
  PidFile second;
  std::error_code ec = second.acquire(path, 222);
  CHECK(ec == std::errc::resource_unavailable_try_again);
  CHECK(second.holder() == 111);
  CHECK_FALSE(second.held());
  CHECK(contents(path) == "111\n");
  CHECK(dir.names() == std::vector<std::string>{"master.pid"});
  second.remove();  // holds nothing: must not touch the first holder's file
  CHECK(contents(path) == "111\n");
  first.remove();
  CHECK_FALSE(exists(path));
  // Free again: the next holder takes it.
  REQUIRE_FALSE(second.acquire(path, 222));
  CHECK(contents(path) == "222\n");
}

TEST_CASE("A stale pid file, whose holder is gone, is replaced", "[pid_file]") {
  FdLeakCheck fds;
  TempDir dir;
  const std::string path = dir.path + "/master.pid";
  std::ofstream(path) << "999999\n";  // a master that died without removing it
  PidFile f;
  REQUIRE_FALSE(f.acquire(path, 333));
  CHECK(contents(path) == "333\n");
  CHECK(dir.names() == std::vector<std::string>{"master.pid"});
  // A holder that was destroyed without remove() (its process ended) leaves a released lock;
  // destruction removes the file, as run() returning does.
  { PidFile g = std::move(f); }
  CHECK_FALSE(exists(path));
}

TEST_CASE("A pid file name that is not a regular file is refused and nothing is left behind",
          "[pid_file]") {
  FdLeakCheck fds;
  TempDir dir;
  const std::string path = dir.path + "/a-directory";
  REQUIRE(::mkdir(path.c_str(), 0755) == 0);
  PidFile f;
  CHECK(f.acquire(path, 1) == std::errc::invalid_argument);
  CHECK_FALSE(f.held());
  const std::string fifo = dir.path + "/a-fifo";
  REQUIRE(::mkfifo(fifo.c_str(), 0644) == 0);
  CHECK(f.acquire(fifo, 1) == std::errc::invalid_argument);  // and did not block opening it
  CHECK(f.acquire(dir.path + "/missing/master.pid", 1) == std::errc::no_such_file_or_directory);
  auto names = dir.names();
  CHECK(names.size() == 2);
}

TEST_CASE("A new master takes over a held pid file and the old holder leaves it on removal",
          "[pid_file][upgrade]") {
  FdLeakCheck fds;
  TempDir dir;
  const std::string path = dir.path + "/master.pid";
  PidFile old_master;
  REQUIRE_FALSE(old_master.acquire(path, 100));
  PidFile new_master;
  CHECK(new_master.acquire(path, 200) == std::errc::resource_unavailable_try_again);
  CHECK(new_master.holder() == 100);
  REQUIRE_FALSE(new_master.take_over(path, 200));
  CHECK(contents(path) == "200\n");
  CHECK(new_master.current());
  CHECK_FALSE(old_master.current());
  CHECK(dir.names() == std::vector<std::string>{"master.pid"});
  old_master.remove();  // the old master exits after the hand-over
  CHECK(contents(path) == "200\n");
  PidFile third;  // the new master's lock is the one that counts now
  CHECK(third.acquire(path, 300) == std::errc::resource_unavailable_try_again);
  CHECK(third.holder() == 200);
  new_master.remove();
  CHECK_FALSE(exists(path));
}

TEST_CASE("An old master takes its pid file back after a failed upgrade", "[pid_file][upgrade]") {
  FdLeakCheck fds;
  TempDir dir;
  const std::string path = dir.path + "/master.pid";
  PidFile old_master;
  REQUIRE_FALSE(old_master.acquire(path, 100));
  // The new master takes the file over, then dies without cleaning up (SIGKILL: _exit here).
  pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    PidFile new_master;
    ::_exit(new_master.take_over(path, ::getpid()) ? 1 : 0);
  }
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);
  CHECK(contents(path) == std::to_string(child) + "\n");
  REQUIRE_FALSE(old_master.current());
  REQUIRE_FALSE(old_master.take_over(path, 100));
  CHECK(contents(path) == "100\n");
  PidFile other;
  CHECK(other.acquire(path, 300) == std::errc::resource_unavailable_try_again);
  old_master.remove();
  CHECK_FALSE(exists(path));
}

TEST_CASE("Of processes racing for a stale or missing pid file exactly one takes it",
          "[pid_file]") {
  FdLeakCheck fds;
  TempDir dir;
  const std::string path = dir.path + "/master.pid";
  const bool stale = GENERATE(false, true);
  if (stale) std::ofstream(path) << "999999\n";
  constexpr int kRacers = 8;
  int go[2], done[2], release[2];
  REQUIRE(::pipe2(go, O_CLOEXEC) == 0);
  REQUIRE(::pipe2(done, O_CLOEXEC) == 0);
  REQUIRE(::pipe2(release, O_CLOEXEC) == 0);
  std::vector<pid_t> racers;
  for (int i = 0; i < kRacers; ++i) {
    pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      ::close(go[1]);
      ::close(done[0]);
      ::close(release[1]);
      char c;
      (void)::read(go[0], &c, 1);  // all start together when the write end closes
      PidFile f;
      std::error_code ec = f.acquire(path, ::getpid());
      char r = !ec ? 'W' : ec == std::errc::resource_unavailable_try_again ? 'L' : 'E';
      (void)::write(done[1], &r, 1);
      ::close(done[1]);
      (void)::read(release[0], &c, 1);  // hold it until every racer has tried
      ::_exit(0);
    }
    racers.push_back(pid);
  }
  ::close(done[1]);
  ::close(go[1]);  // go: EOF wakes every racer
  std::string results;
  char buf[16];
  pollfd p{done[0], POLLIN, 0};
  while (results.size() < kRacers && ::poll(&p, 1, 10000) > 0) {
    ssize_t n = ::read(done[0], buf, sizeof buf);
    if (n <= 0) break;
    results.append(buf, static_cast<std::size_t>(n));
  }
  ::close(done[0]);
  std::string names_seen = contents(path);
  ::close(release[1]);  // EOF: the racers exit (with _exit: the winner leaves a stale file)
  for (pid_t pid : racers) {
    int status = 0;
    CHECK(::waitpid(pid, &status, 0) == pid);
  }
  ::close(go[0]);
  ::close(release[0]);
  INFO("results: " << results << ", stale: " << stale);
  CHECK(results.size() == kRacers);
  CHECK(std::count(results.begin(), results.end(), 'W') == 1);
  CHECK(std::count(results.begin(), results.end(), 'L') == kRacers - 1);
  CHECK_FALSE(names_seen.empty());
  CHECK(dir.names() == std::vector<std::string>{"master.pid"});  // and no temporary file
}
