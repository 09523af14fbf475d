// The hello example (examples/hello/main.cpp, built into PREFORK_EXAMPLES_DIR) as a child of the
// test: spawned with its stdout and stderr on pipes that the test reads line by line with
// deadlines, and killed and reaped if the test does not wait for it.
#ifndef PREFORK_TESTS_PROCESS_HELLO_PROCESS_HPP
#define PREFORK_TESTS_PROCESS_HELLO_PROCESS_HPP

#include <spawn.h>
#include <unistd.h>

#include <optional>
#include <string>
#include <vector>

#include "harness.hpp"

extern char** environ;

#ifndef PREFORK_EXAMPLES_DIR
#error "PREFORK_EXAMPLES_DIR must name the directory that holds the built examples"
#endif

namespace prefork_test {

inline const std::string kHello = PREFORK_EXAMPLES_DIR "/hello";

/// One hello process: spawned with its stdout (and stderr) on pipes, killed and reaped on
/// destruction if the test did not wait for it.
class HelloProcess {
 public:
  explicit HelloProcess(const std::vector<std::string>& args) : HelloProcess(kHello, args) {}
  /// hello from another path (a copy of kHello that a test replaces, as a deployment does).
  HelloProcess(const std::string& program, const std::vector<std::string>& args) {
    std::vector<std::string> argv_store{program};
    argv_store.insert(argv_store.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (auto& a : argv_store) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, out_.write, 1);
    posix_spawn_file_actions_adddup2(&actions, err_.write, 2);
    int rc = ::posix_spawn(&pid_, program.c_str(), &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    out_.close_write();
    err_.close_write();
    if (rc != 0) pid_ = -1;
  }
  HelloProcess(const HelloProcess&) = delete;
  HelloProcess& operator=(const HelloProcess&) = delete;
  ~HelloProcess() {
    if (pid_ > 0 && !status_) kill_and_reap(pid_);
  }

  pid_t pid() const noexcept { return pid_; }
  LineReader& out() noexcept { return out_reader_; }
  LineReader& err() noexcept { return err_reader_; }

  /// Reads "Master PID", "Listening on ADDR:PORT" and `workers` "Started process N" lines.
  /// Returns false (with the transcript in the test's log) if they do not all come in time.
  bool start(unsigned workers) {
    auto deadline = Clock::now() + kDeadline;
    auto master = out_reader_.next_starting_with("Master PID: ", deadline);
    auto listening = out_reader_.next_starting_with("Listening on ", deadline);
    if (!master || !listening) return false;
    master_pid_ = static_cast<pid_t>(number_after(*master, "Master PID: "));
    auto colon = listening->rfind(':');
    if (colon == std::string::npos) return false;
    port_ = static_cast<int>(number_after(listening->substr(colon + 1), ""));
    for (unsigned i = 0; i < workers; ++i) {
      auto pid = next_started(deadline);
      if (!pid) return false;
      workers_.push_back(*pid);
    }
    return port_ > 0;
  }

  /// The pid in the next "Started process <pid>" line.
  std::optional<pid_t> next_started(Clock::time_point deadline) {
    auto line = out_reader_.next_starting_with("Started process ", deadline);
    if (!line) return std::nullopt;
    return static_cast<pid_t>(number_after(*line, "Started process "));
  }

  /// Reaps hello, waiting up to deadline; its wait status.
  std::optional<int> wait(Clock::time_point deadline) {
    if (!status_) status_ = wait_child(pid_, deadline);
    return status_;
  }

  /// Closes the test's ends of both pipes, as `hello 2>&1 | head -3` once head has exited:
  /// whatever hello prints next has no reader. out() and err() are not to be used after.
  void close_output() {
    out_.close_read();
    err_.close_read();
  }

  pid_t master_pid() const noexcept { return master_pid_; }
  int port() const noexcept { return port_; }
  const std::vector<pid_t>& workers() const noexcept { return workers_; }

 private:
  Pipe out_, err_;
  LineReader out_reader_{out_.read}, err_reader_{err_.read};
  pid_t pid_ = -1;
  pid_t master_pid_ = -1;
  int port_ = 0;
  std::vector<pid_t> workers_;
  std::optional<int> status_;
};

}  // namespace prefork_test

#endif  // PREFORK_TESTS_PROCESS_HELLO_PROCESS_HPP
