// RemoteMaster, for the process tests: a cluster whose master runs in a harness child, steered
// by commands on one pipe and reporting its events as lines on another, so that the test
// process is only a client and never stalls the master's loop.
#ifndef PREFORK_TESTS_PROCESS_REMOTE_MASTER_HPP
#define PREFORK_TESTS_PROCESS_REMOTE_MASTER_HPP

#include <catch2/catch.hpp>

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "harness.hpp"

namespace prefork_test {

/// "listening <id> <slot> <pid> <address>...", as RemoteMaster reports it.
struct Listening {
  unsigned id = 0;
  std::size_t slot = 0;
  pid_t pid = -1;
  std::vector<std::string> addresses;
};

inline std::optional<Listening> parse_listening(const std::string& line) {
  auto w = words(line);
  if (w.size() < 4 || w[0] != "listening") return std::nullopt;
  Listening l;
  l.id = static_cast<unsigned>(std::stoul(w[1]));
  l.slot = std::stoul(w[2]);
  l.pid = static_cast<pid_t>(std::stol(w[3]));
  l.addresses.assign(w.begin() + 4, w.end());
  return l;
}

/// "exit <id> <slot> <pid> <exit code> <signal> <after disconnect 0|1> <reason...>", as
/// RemoteMaster reports it.
struct Exit {
  unsigned id = 0;
  std::size_t slot = 0;
  pid_t pid = -1;
  int code = 0;
  int signal = 0;
  bool after_disconnect = false;
  std::string reason;
};

inline std::optional<Exit> parse_exit(const std::string& line) {
  auto w = words(line);
  if (w.size() < 7 || w[0] != "exit") return std::nullopt;
  Exit e;
  e.id = static_cast<unsigned>(std::stoul(w[1]));
  e.slot = std::stoul(w[2]);
  e.pid = static_cast<pid_t>(std::stol(w[3]));
  e.code = std::stoi(w[4]);
  e.signal = std::stoi(w[5]);
  e.after_disconnect = w[6] == "1";
  for (std::size_t i = 7; i < w.size(); ++i) e.reason += (i > 7 ? " " : "") + w[i];
  return e;
}

/// Empties its fd table up to a lowered RLIMIT_NOFILE, so that the next descriptor this
/// process asks for (accept4 included) fails with EMFILE; release() undoes it.
struct DescriptorFiller {
  rlimit saved{};
  std::vector<int> fillers;
  bool limited = false;
  int last_errno = 0;

  std::size_t fill() {
    if (::getrlimit(RLIMIT_NOFILE, &saved) != 0) return 0;
    std::vector<int> fds = open_fds();  // opendir needs a descriptor: before the limit
    int top = fds.empty() ? 2 : *std::max_element(fds.begin(), fds.end());
    // Room for one more than the highest open descriptor: with no gaps below it (as under
    // meson test) a limit of top + 1 would leave nothing to fill.
    rlimit low{static_cast<rlim_t>(top + 2), saved.rlim_max};
    if (::setrlimit(RLIMIT_NOFILE, &low) != 0) return 0;
    limited = true;
    for (;;) {
      int d = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
      if (d < 0) {
        last_errno = errno;
        break;
      }
      fillers.push_back(d);
    }
    return fillers.size();
  }

  void release() {
    for (int fd : fillers) ::close(fd);
    fillers.clear();
    if (limited) ::setrlimit(RLIMIT_NOFILE, &saved);
    limited = false;
  }
};

/// A cluster whose master runs in a harness child. It reports, one line each:
///   "fork|online|disconnect <id> <slot> <pid>"   "listening <id> <slot> <pid> <address>..."
///   "exit <id> <slot> <pid> <exit code> <signal> <after disconnect 0|1> <reason>"
///   "message <id> <text>"   "reload-done <0|1>"   "log <library diagnostic>"
///   and once run() has returned: "returned <rc> children <0|1>" (1: a child is left unreaped)
/// and takes commands: "send <id> <text>", "disconnect <id>", "kill <id>" (Worker::kill: a
/// planned stop), "reload [times]", "count" ("workers <n>"), "sync" ("synced" after everything
/// before it), "fds" ("fds <open descriptors>"), "limit" ("limited <fillers> <errno text>": the
/// next descriptor fails with EMFILE), "unlimit" ("unlimited"), "wait <ms>" ("waited", that
/// much later on the master's clock), "shutdown", "shutdown fast". EOF on the command pipe (the
/// test process died) shuts down fast. `setup` may add callbacks (or replace these) in the
/// master before run(); `extra` handles commands this class does not know. The Options are
/// used as given: handle_signals too.
template <class Server, class Balance = prefork::RoundRobin,
          class Restart = prefork::Backoff<prefork::RestartOnCrash>>
class RemoteMaster {
 public:
  using ClusterT = prefork::Cluster<Server, Balance, Restart>;
  using WorkerT = typename ClusterT::WorkerT;
  using Say = std::function<void(const std::string&)>;
  using Setup = std::function<void(ClusterT&, const Say&)>;
  using Extra = std::function<bool(ClusterT&, const std::vector<std::string>&, const Say&)>;

  explicit RemoteMaster(prefork::Options opts, Restart restart = {}, Setup setup = {},
                        Extra extra = {}) {
    pid_ = fork_harness(
        [&] { return run_child(std::move(opts), std::move(restart), setup, extra); });
    commands_.close_read();
    reports_.close_write();
  }
  RemoteMaster(const RemoteMaster&) = delete;
  RemoteMaster& operator=(const RemoteMaster&) = delete;
  ~RemoteMaster() {
    if (pid_ > 0 && !status_) kill_and_reap(pid_);
  }

  pid_t pid() const noexcept { return pid_; }
  const std::string& transcript() const noexcept { return reader_.transcript(); }

  void command(const std::string& c) { write_all(commands_.write, c + "\n"); }

  /// The next report starting with prefix (earlier ones are skipped); fails the test case,
  /// with what the master said, at the deadline.
  std::string expect(std::string_view prefix) {
    auto line = reader_.next_starting_with(prefix, Clock::now() + kDeadline);
    if (!line) FAIL("no '" << prefix << "' report in time; the master said:\n" << transcript());
    return *line;
  }

  /// Every report up to and including the next one starting with prefix.
  std::vector<std::string> expect_all_until(std::string_view prefix) {
    std::vector<std::string> lines;
    const auto deadline = Clock::now() + kDeadline;
    while (auto line = reader_.next(deadline)) {
      lines.push_back(*line);
      if (line->starts_with(prefix)) return lines;
    }
    FAIL("no '" << prefix << "' report in time; the master said:\n" << transcript());
    return lines;
  }

  /// A report line that has already arrived, without waiting.
  std::optional<std::string> arrived() { return reader_.next(Clock::now()); }

  /// The next 'exit' report of worker id.
  Exit expect_exit(unsigned id) {
    auto e = parse_exit(expect("exit " + std::to_string(id) + " "));
    REQUIRE(e.has_value());
    return *e;
  }

  /// The next n 'listening' reports, by slot.
  std::vector<Listening> expect_listening(std::size_t n) {
    std::vector<Listening> v;
    for (std::size_t i = 0; i < n; ++i) {
      auto l = parse_listening(expect("listening "));
      REQUIRE(l.has_value());
      v.push_back(*l);
    }
    std::sort(v.begin(), v.end(), [](auto& a, auto& b) { return a.slot < b.slot; });
    return v;
  }

  /// Waits until the master has handled every command and event that came before.
  void sync() {
    command("sync");
    expect("synced");
  }

  std::size_t master_fds() {
    command("fds");
    return static_cast<std::size_t>(number_after(expect("fds "), "fds "));
  }

  /// The master process's wait status, waiting up to deadline (nullopt: still running).
  std::optional<int> wait(Clock::time_point deadline) {
    if (!status_) status_ = wait_child(pid_, deadline);
    return status_;
  }

  /// Graceful shutdown; the master process's wait status (nullopt: it had to be killed).
  std::optional<int> finish() {
    command("shutdown");
    if (wait(Clock::now() + kDeadline)) return status_;
    kill_and_reap(pid_);
    status_ = -1;
    return std::nullopt;
  }

 private:
  int run_child(prefork::Options opts, Restart restart, const Setup& setup, const Extra& extra) {
    commands_.close_write();
    reports_.close_read();
    const int out = reports_.write;
    Say say = [out](const std::string& line) { write_all(out, line + "\n"); };
    // Lifecycle records are left out: the callbacks below report those events already.
    opts.log = [say](const prefork::LogRecord& r) {
      for (std::string_view e : {"fork", "online", "listening", "disconnect", "exit"})
        if (r.event == e) return;
      say("log " + std::string(r.message));
    };
    ClusterT cluster(std::move(opts), std::move(restart));
    auto& m = cluster.master();
    auto who = [](WorkerT& w) {
      return std::to_string(w.id()) + " " + std::to_string(w.slot()) + " " +
             std::to_string(w.pid());
    };
    m.on_fork([&](WorkerT& w) { say("fork " + who(w)); });
    m.on_online([&](WorkerT& w) { say("online " + who(w)); });
    m.on_listening([&](WorkerT& w, const std::vector<std::string>& addresses) {
      std::string line = "listening " + who(w);
      for (auto& a : addresses) line += " " + a;
      say(line);
    });
    m.on_disconnect([&](WorkerT& w) { say("disconnect " + who(w)); });
    m.on_exit([&](WorkerT& w, const prefork::ExitInfo& e) {
      say("exit " + who(w) + " " + std::to_string(e.exit_code) + " " + std::to_string(e.signal) +
          " " + (e.exited_after_disconnect ? "1" : "0") + " " + e.reason);
    });
    m.on_message([&](WorkerT& w, const std::string& text) {
      say("message " + std::to_string(w.id()) + " " + text);
    });
    cluster.on_reload_done([&](bool ok) { say(std::string("reload-done ") + (ok ? "1" : "0")); });
    if (setup) setup(cluster, say);

    DescriptorFiller filler;
    auto handle = [&](const std::string& c) {
      auto w = words(c);
      if (w.empty()) return;
      auto id = [&] { return static_cast<unsigned>(std::stoul(w.at(1))); };
      if (w[0] == "sync") {
        m.loop().post([&] { say("synced"); });
      } else if (w[0] == "send" && w.size() >= 3) {
        std::string text = w[2];
        for (std::size_t i = 3; i < w.size(); ++i) text += " " + w[i];
        cluster.send(id(), text);
      } else if (w[0] == "disconnect" && w.size() == 2) {
        if (auto* x = m.worker(id())) x->disconnect();
      } else if (w[0] == "kill" && w.size() == 2) {
        if (auto* x = m.worker(id())) x->kill();
      } else if (w[0] == "reload") {
        int times = w.size() == 2 ? std::stoi(w[1]) : 1;
        for (int i = 0; i < times; ++i) cluster.reload();
      } else if (w[0] == "count") {
        say("workers " + std::to_string(cluster.workers().size()));
      } else if (w[0] == "fds") {
        say("fds " + std::to_string(count_open_fds()));
      } else if (w[0] == "limit") {
        std::size_t n = filler.fill();
        say("limited " + std::to_string(n) + " " + std::strerror(filler.last_errno));
      } else if (w[0] == "unlimit") {
        filler.release();
        say("unlimited");
      } else if (w[0] == "wait" && w.size() == 2) {
        cluster.after(std::chrono::milliseconds(std::stol(w[1])), [&] { say("waited"); });
      } else if (w[0] == "shutdown") {
        cluster.shutdown(w.size() == 2 && w[1] == "fast");
      } else if (!extra || !extra(cluster, w, say)) {
        say("unknown command " + c);
      }
    };
    std::string pending;
    const int in = commands_.read;
    m.loop().watch(in, prefork::EventLoop::readable, [&](std::uint32_t) {
      char buf[512];
      ssize_t n = ::read(in, buf, sizeof buf);
      if (n < 0 && (errno == EINTR || errno == EAGAIN)) return;
      if (n <= 0) {
        m.loop().unwatch(in);
        cluster.shutdown(true);
        return;
      }
      pending.append(buf, static_cast<std::size_t>(n));
      for (auto nl = pending.find('\n'); nl != std::string::npos; nl = pending.find('\n')) {
        std::string line = pending.substr(0, nl);
        pending.erase(0, nl + 1);
        handle(line);
      }
    }, false);
    int rc = cluster.run();
    filler.release();
    errno = 0;
    bool children_left = !(::waitpid(-1, nullptr, WNOHANG) == -1 && errno == ECHILD);
    say("returned " + std::to_string(rc) + " children " + (children_left ? "1" : "0"));
    return rc;
  }

  Pipe commands_, reports_;
  LineReader reader_{reports_.read};
  pid_t pid_ = -1;
  std::optional<int> status_;
};

}  // namespace prefork_test

#endif  // PREFORK_TESTS_PROCESS_REMOTE_MASTER_HPP
