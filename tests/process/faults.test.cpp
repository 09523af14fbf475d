// Faults with real processes (issue 5): a hello worker that dies in the middle of a request or
// whose loop hangs (hello --faults), a slot that crashes at every start-up while the other slot
// serves a load, a worker that floods its channel (with garbage, or with messages up to
// send()'s back-pressure) while another worker is in the middle of a request. What gunicorn,
// unicorn and PM2 promise for a broken worker: it costs only what it was doing, the master
// stays calm, and the healthy workers never notice.
//
// hello runs as a child of the test (posix_spawn), its stdout read line by line with deadlines.
// Library-level clusters run their master in a harness child (RemoteMaster); the test process
// is only a client (HttpLoad's threads start after the last fork of the test process).
#include <catch2/catch.hpp>

#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/http.hpp"
#include "harness.hpp"
#include "hello_process.hpp"
#include "http_client.hpp"
#include "remote_master.hpp"

using namespace prefork_test;
using prefork::ExitInfo;
using prefork::Options;
using WorkerT = prefork::Worker<prefork::StringCodec>;

namespace {

// ---------------------------------------------------------------------------------------------
// Helpers.

/// Field `index` of /proc/<pid>/stat counted from the state letter (0), or -1: the fields
/// after the command name, which may itself contain ") ".
long stat_field(pid_t pid, std::size_t index) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto close = all.rfind(')');
  if (close == std::string::npos) return -1;
  auto w = words(std::string_view(all).substr(close + 1));
  return index < w.size() ? std::stol(w[index]) : -1;
}

/// CPU time (user + system) process pid has used so far, in milliseconds (proc(5): utime and
/// stime, fields 14 and 15, in clock ticks).
long cpu_ms(pid_t pid) {
  long ticks = stat_field(pid, 11) + stat_field(pid, 12);
  return ticks * 1000 / ::sysconf(_SC_CLK_TCK);
}

/// Waits until pid has used `ms` of CPU more than when called, which a process spinning in a
/// loop (a worker that got GET /hang) does in about that time on an idle core; false at the
/// deadline.
bool spins(pid_t pid, long ms = 100) {
  const long before = cpu_ms(pid);
  for (auto deadline = Clock::now() + kDeadline; Clock::now() < deadline;) {
    if (cpu_ms(pid) >= before + ms) return true;
    ::poll(nullptr, 0, 5);  // CPU time has no event to wait on
  }
  return false;
}

/// "3 failed, the first: ..." for a test's failure message.
std::string summary(const std::vector<std::string>& failures) {
  std::string s = std::to_string(failures.size()) + " failed";
  return failures.empty() ? s : s + ", the first: " + failures.front();
}

bool exited_zero(const std::optional<int>& status) {
  return status && WIFEXITED(*status) && WEXITSTATUS(*status) == 0;
}

/// True when fd has something to read (bytes, EOF or an error) right now.
bool readable_now(int fd) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, 0) == 1;
}

/// A keep-alive HTTP/1.1 connection, one request at a time. Unlike KeepAliveClient it never
/// reconnects, so that the test sees what happens to this one connection.
struct KeptConnection {
  HttpClient client;
  std::string buf;

  bool open(const std::string& address) { return client.connect(address); }

  /// Sends "GET path" (MSG_NOSIGNAL: a reset connection is an error, not a SIGPIPE).
  bool send_get(const std::string& path) {
    const std::string request = "GET " + path + " HTTP/1.1\r\nHost: localhost\r\n\r\n";
    return ::send(client.fd(), request.data(), request.size(), MSG_NOSIGNAL) ==
           static_cast<ssize_t>(request.size());
  }

  /// The next answer on the connection, or why none came.
  HttpResult read() {
    bool close = false;
    return read_http_answer(client.fd(), buf, close);
  }

  HttpResult get(const std::string& path = "/") {
    if (!send_get(path)) return {0, {}, std::string("send: ") + std::strerror(errno)};
    return read();
  }
};

/// One keep-alive connection to each of hello's `workers` workers, keyed by the pid that
/// answered on it (connections to a worker that already has one are closed). Round-robin
/// dispatch reaches every worker within a few connections.
std::map<pid_t, KeptConnection> one_connection_per_worker(int port, std::size_t workers) {
  std::map<pid_t, KeptConnection> by_pid;
  for (int attempt = 0; attempt < 20 && by_pid.size() < workers; ++attempt) {
    KeptConnection c;
    if (!c.open("127.0.0.1:" + std::to_string(port))) continue;
    pid_t pid = handled_by(c.get().body);
    if (pid > 0 && !by_pid.count(pid)) by_pid.emplace(pid, std::move(c));
  }
  return by_pid;
}

/// An answer that is no answer and came at once: the connection was closed (EOF) or reset.
/// A recv timeout (SO_RCVTIMEO, kDeadline) would say "Resource temporarily unavailable".
bool closed_unanswered(const HttpResult& r) {
  return r.status == 0 && (r.error == "no status line in ''" || r.error.starts_with("EOF after 0 ") ||
                           r.error.find("reset by peer") != std::string::npos);
}

/// "Worker <pid> died ..." lines and "Started process <pid>" lines read from hello's stdout
/// until `died` deaths and `started` starts have been seen, or the deadline.
struct HelloEvents {
  std::vector<std::string> died;
  std::vector<pid_t> started;
};

HelloEvents read_hello_events(HelloProcess& hello, std::size_t died, std::size_t started) {
  HelloEvents e;
  const auto deadline = Clock::now() + kDeadline;
  while (e.died.size() < died || e.started.size() < started) {
    auto line = hello.out().next(deadline);
    if (!line) break;
    if (line->starts_with("Worker ")) e.died.push_back(*line);
    if (line->starts_with("Started process "))
      e.started.push_back(static_cast<pid_t>(number_after(*line, "Started process ")));
  }
  return e;
}

std::string died_line(pid_t pid, int code, int signal) {
  return "Worker " + std::to_string(pid) + " died (code " + std::to_string(code) + " / signal " +
         std::to_string(signal) + "); starting a new one";
}

// ---------------------------------------------------------------------------------------------
// A Server for library-level fault tests.

// How a FaultServer starts in slot 1. Set in the master (the "slot-1-start" command), so that
// only workers forked after it (fork mode: they inherit the master's memory) are affected.
enum class Slot1Start { ok, throws, hangs };
Slot1Start g_slot1_start = Slot1Start::ok;
// Counted in the master: the "flood:..." messages it received (see count_floods).
std::uint64_t g_floods = 0;

/// The descriptor of this worker's channel to the master: the one AF_UNIX socket whose peer is
/// the parent (SO_PEERCRED of a socketpair names the process that made it). -1 unless exactly one.
int channel_to_master() {
  int found = -1;
  for (int fd : open_fds()) {
    sockaddr_storage a{};
    socklen_t alen = sizeof a;
    ucred peer{};
    socklen_t plen = sizeof peer;
    if (::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &alen) != 0 || a.ss_family != AF_UNIX ||
        ::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &peer, &plen) != 0 || peer.pid != ::getppid())
      continue;
    if (found >= 0) return -1;
    found = fd;
  }
  return found;
}

/// Writes all of bytes on the non-blocking socket fd, waiting for room; false once the peer
/// has closed it (EPIPE, ECONNRESET) or no room came within kDeadline.
bool push(int fd, std::string_view bytes) {
  while (!bytes.empty()) {
    ssize_t n = ::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
    if (n > 0) {
      bytes.remove_prefix(static_cast<std::size_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno != EAGAIN) return false;
    pollfd p{fd, POLLOUT, 0};
    if (::poll(&p, 1, static_cast<int>(std::chrono::milliseconds(kDeadline).count())) <= 0)
      return false;
  }
  return true;
}

/// A frame as the channel lays it out (prefork::detail::encode_header), with a payload.
std::string frame(unsigned kind, std::uint32_t length, std::string_view payload = {}) {
  std::string f(prefork::detail::kHeaderSize, '\0');
  prefork::detail::encode_header(
      f.data(), {static_cast<std::uint8_t>(kind), 0, length, 0});
  f.append(payload);
  return f;
}

/// A user frame whose payload is "flood:" and padding, `size` bytes in all.
std::string flood_frame(std::size_t size) {
  std::string payload = "flood:" + std::string(size - 6, 'f');
  return frame(static_cast<unsigned>(prefork::FrameKind::user),
               static_cast<std::uint32_t>(payload.size()), payload);
}

/// An HTTP server like hello's (every request answered "Handled by process <pid>\n", and counted
/// with request_done()) that tells the master "connection" when it adopts one and "draining"
/// when it starts to drain, throws or blocks for ever in its constructor in slot 1 as
/// g_slot1_start says, and takes Puppet's orders and:
///   "flood garbage <how>"  writes straight onto its channel: "random bytes" (16 MiB, from the
///                          first byte on), or 4 MiB of valid "flood:" frames followed by "a bad
///                          header", "an oversized header" or "half a frame" (then exits 5);
///                          then waits for its SIGKILL without reading its channel
///   "flood messages"       replies "flooding", then every 1 ms sends 4 KiB "flood:" messages
///                          through the API until send() says queue_full, until
///   "stop flood"           replies "flood stopped"
///   "fill on next frame"   replies "armed", then blocks until the master's next frame is in
///                          its channel and fills its send queue to the byte before that
///                          frame is read (4 KiB messages, then empty ones)
///   "request done"         counts a request with request_done() (for max_requests)
///   "busy <ms>"            keeps its loop from turning for that long, then replies "busy done"
///   "child"                starts `sleep 60` (posix_spawnp) and replies "child:<pid>"
/// Its replies are sent again every 1 ms while send() says queue_full.
struct FaultServer : Puppet {
  explicit FaultServer(prefork::WorkerContext<>& ctx)
      : Puppet(check(ctx)),
        body_("Handled by process " + std::to_string(ctx.pid()) + "\n"),
        http_(ctx.loop(), [this](const http::Request&, http::Response& res) {
          res.body = body_;
          ctx_.request_done();
        }) {
    http_.on_open([this] { reply("connection"); });
  }

  static prefork::WorkerContext<>& check(prefork::WorkerContext<>& ctx) {
    if (ctx.slot() == 1 && g_slot1_start == Slot1Start::throws)
      throw std::runtime_error("cannot start in slot 1 (test)");
    if (ctx.slot() == 1 && g_slot1_start == Slot1Start::hangs)
      for (;;) ::pause();
    return ctx;
  }

  void on_connection(prefork::Connection c) { http_.adopt(std::move(c)); }
  void on_drain() {
    http_.drain();
    reply("draining");
  }

  void on_message(const std::string& m) {
    if (m.starts_with("flood garbage ")) return flood_garbage(m.substr(14));
    if (m == "flood messages") {
      reply("flooding");
      flood_ = ctx_.loop().every(std::chrono::milliseconds(1), [this] { fill(false); });
    } else if (m == "stop flood") {
      ctx_.loop().cancel(flood_);
      reply("flood stopped");
    } else if (m == "request done") {
      ctx_.request_done();
    } else if (m.starts_with("busy ")) {
      ::poll(nullptr, 0, static_cast<int>(number_after(m, "busy ")));  // work, not a wait
      reply("busy done");
    } else if (m == "child") {
      pid_t pid = -1;
      char prog[] = "sleep", arg[] = "60";
      char* argv[] = {prog, arg, nullptr};
      if (::posix_spawnp(&pid, "sleep", nullptr, nullptr, argv, environ) != 0) pid = -1;
      reply("child:" + std::to_string(pid));
    } else if (m == "fill on next frame") {
      reply("armed");  // the queue is empty: it goes out now
      int fd = channel_to_master();
      pollfd p{fd, POLLIN, 0};
      if (fd < 0 || ::poll(&p, 1, static_cast<int>(std::chrono::milliseconds(kDeadline).count())) != 1)
        ctx_.exit(106);
      fill(true);
    } else {
      Puppet::on_message(m);
    }
  }

  // Sends until send() reports queue_full, the documented back-pressure: 4 KiB messages, then
  // (to_the_byte) empty ones, a bare frame header, for the last bytes of room. At most 80 MiB
  // at a time (the queue takes 64), or a master that reads as fast would keep this loop from
  // turning.
  void fill(bool to_the_byte) {
    static const std::string message = "flood:" + std::string(4090, 'f');
    for (int i = 0; i < 20480 && !ctx_.send(message); ++i) {
    }
    for (int i = 0; to_the_byte && i < 4096 && !ctx_.send(std::string()); ++i) {
    }
  }

  // A reply that waits for room in a full queue instead of being lost.
  void reply(const std::string& text) {
    if (ctx_.send(text) != prefork::errc::queue_full) return;
    ctx_.loop().after(std::chrono::milliseconds(1), [this, text] { reply(text); });
  }

  void flood_garbage(const std::string& how) {
    // Nothing of the worker's own is queued on the channel now (it answers one message at a
    // time), so the first byte written here starts a frame.
    int fd = channel_to_master();
    if (fd < 0) ctx_.exit(101);
    std::string bytes;
    if (how == "random bytes") {
      bytes = random_bytes(std::size_t{16} << 20, 5);
      bytes[0] = 'X';  // not the magic "PF"
    } else {
      const std::string valid = flood_frame(4096);
      for (int i = 0; i < 1024; ++i) bytes += valid;
      if (how == "a bad header") bytes += frame(99, 0);
      else if (how == "an oversized header") bytes += frame(1, 0x7fffffffu);
      else if (how == "half a frame") bytes += flood_frame(4096).substr(0, 2000);
      else ctx_.exit(102);
    }
    bool all = push(fd, bytes);
    if (how == "half a frame") ::_exit(all ? 5 : 103);
    for (;;) ::pause();
  }

  std::string body_;
  http::Server http_;
  prefork::EventLoop::TimerId flood_ = 0;
};

// Backoff<RestartOnCrash>, the library's default restart policy.
using FaultCluster = RemoteMaster<FaultServer>;

/// A POST sent halfway to a two-worker FaultCluster: the worker that took it (it said
/// "connection") is in the middle of reading it; finish() sends the rest and reads the answer.
struct RequestInProgress {
  HttpClient client;
  Listening holder, other;

  RequestInProgress(FaultCluster& master, const std::vector<Listening>& ws) {
    REQUIRE(client.connect(ws.at(0).addresses.at(0)));
    REQUIRE(write_all(client.fd(),
                      "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\n12345"));
    const std::string said = master.expect("message ");
    const unsigned id = static_cast<unsigned>(number_after(said, "message "));
    REQUIRE(said == "message " + std::to_string(id) + " connection");
    holder = ws[0].id == id ? ws[0] : ws[1];
    other = ws[0].id == id ? ws[1] : ws[0];
  }

  HttpResult finish() {
    if (!write_all(client.fd(), "67890")) return {0, {}, "send failed"};
    std::string buf;
    bool close = false;
    return read_http_answer(client.fd(), buf, close);
  }
};

/// The port of the cluster's first listening address ("127.0.0.1:PORT").
int port_of(const Listening& l) {
  const std::string& a = l.addresses.at(0);
  return static_cast<int>(number_after(a.substr(a.rfind(':') + 1), ""));
}

Options listening_on(unsigned workers) {
  return Options{.workers = workers, .listen = {"127.0.0.1:0"}, .handle_signals = false};
}

/// Extra commands: "slot-1-start ok|throw|hang" (replies the same), "fork" (cluster.fork();
/// replies "forked"), "floods" ("floods <n>": flood messages the master has received), "stall
/// <ms>" (keeps the master's loop from turning for that long, as a slow fork or a descheduled
/// master would; replies "stalled").
bool fault_commands(FaultCluster::ClusterT& cluster, const std::vector<std::string>& w,
                    const FaultCluster::Say& say) {
  if (w.size() == 2 && w[0] == "slot-1-start") {
    g_slot1_start = w[1] == "throw" ? Slot1Start::throws
                    : w[1] == "hang" ? Slot1Start::hangs
                                     : Slot1Start::ok;
    say("slot-1-start " + w[1]);
  } else if (w.size() == 1 && w[0] == "fork") {
    cluster.fork();
    say("forked");
  } else if (w.size() == 2 && w[0] == "stall") {
    ::poll(nullptr, 0, std::stoi(w[1]));
    say("stalled");
  } else if (w.size() == 1 && w[0] == "floods") {
    say("floods " + std::to_string(g_floods));
  } else {
    return false;
  }
  return true;
}

/// Setup: reports on_errored as "errored <slot> <exit code> <signal>", and counts "flood:"
/// and empty messages (in g_floods) instead of reporting each one.
void fault_reports(FaultCluster::ClusterT& cluster, const FaultCluster::Say& say) {
  cluster.on_errored([say](std::size_t slot, const ExitInfo& e) {
    say("errored " + std::to_string(slot) + " " + std::to_string(e.exit_code) + " " +
        std::to_string(e.signal));
  });
  cluster.on_message([say](WorkerT& w, const std::string& text) {
    if (text.empty() || text.starts_with("flood:")) {
      ++g_floods;
      return;
    }
    say("message " + std::to_string(w.id()) + " " + text);
  });
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// hello --faults.

TEST_CASE("hello with faults closes a GET crash connection unanswered and replaces that worker",
          "[faults][hello]") {
  REQUIRE(::access(kHello.c_str(), X_OK) == 0);
  FdLeakCheck fds;
  HelloProcess hello({"--workers", "2", "--port", "0", "--work", "0", "--faults"});
  REQUIRE(hello.pid() > 0);
  if (!hello.start(2)) FAIL("hello did not start; it said:\n" << hello.out().transcript());
  auto kept = one_connection_per_worker(hello.port(), 2);
  REQUIRE(kept.size() == 2);

  HttpClient crash;
  REQUIRE(crash.connect("127.0.0.1:" + std::to_string(hello.port())));
  REQUIRE(crash.send_get("/crash"));
  HttpResult r = crash.receive();
  INFO("GET /crash: status " << r.status << " " << r.error << " body '" << r.body << "'");
  CHECK(closed_unanswered(r));

  HelloEvents e = read_hello_events(hello, 1, 1);
  INFO("hello said:\n" << hello.out().transcript());
  REQUIRE(e.died.size() == 1);
  REQUIRE(e.started.size() == 1);
  const pid_t victim = static_cast<pid_t>(number_after(e.died[0], "Worker "));
  REQUIRE(kept.count(victim) == 1);
  CHECK(e.died[0] == died_line(victim, 1, 0));
  const pid_t replacement = e.started[0];
  CHECK(kept.count(replacement) == 0);
  CHECK(process_gone(victim));
  pid_t survivor = -1;
  for (auto& [pid, c] : kept)
    if (pid != victim) survivor = pid;

  // The victim's idle keep-alive connection was closed with it; the survivor's still serves.
  CHECK(closed_unanswered(kept[victim].read()));
  for (int i = 0; i < 10; ++i) {
    HttpResult k = kept[survivor].get();
    INFO(k.error);
    CHECK(handled_by(k.body) == survivor);
  }
  std::vector<std::string> failures;
  auto by_pid = get_many(hello.port(), 20, failures);
  CHECK(failures.empty());
  CHECK(keys(by_pid) == std::set<pid_t>{survivor, replacement});
  REQUIRE(::kill(hello.pid(), SIGTERM) == 0);
  CHECK(exited_zero(hello.wait(Clock::now() + kDeadline)));
}

TEST_CASE("hello with faults stops answering from a worker that got GET hang while the other "
          "worker answers",
          "[faults][hello]") {
  REQUIRE(::access(kHello.c_str(), X_OK) == 0);
  FdLeakCheck fds;
  HelloProcess hello({"--workers", "2", "--port", "0", "--work", "0", "--faults"});
  REQUIRE(hello.pid() > 0);
  if (!hello.start(2)) FAIL("hello did not start; it said:\n" << hello.out().transcript());
  auto kept = one_connection_per_worker(hello.port(), 2);
  REQUIRE(kept.size() == 2);
  const pid_t hung = hello.workers()[0], other = hello.workers()[1];
  REQUIRE(kept.count(hung) == 1);

  REQUIRE(kept[hung].send_get("/hang"));
  CHECK(spins(hung));

  // The other worker answers request after request on its connection...
  for (int i = 0; i < 20; ++i) {
    HttpResult k = kept[other].get();
    INFO(k.error);
    CHECK(handled_by(k.body) == other);
  }
  // ...while the hung one has not answered its one request.
  CHECK_FALSE(readable_now(kept[hung].client.fd()));
  CHECK_FALSE(process_gone(hung));
  // New connections: the master may deal the first to the hung worker (nothing tells it the
  // worker is hung until one has waited 100 ms unacknowledged); it waits in its channel.
  std::vector<HttpClient> fresh(6);
  for (auto& c : fresh) {
    REQUIRE(c.connect("127.0.0.1:" + std::to_string(hello.port())));
    REQUIRE(c.send_get("/"));
  }

  // No watchdog yet: the test ends the hang itself.
  REQUIRE(::kill(hung, SIGKILL) == 0);
  HelloEvents e = read_hello_events(hello, 1, 1);
  INFO("hello said:\n" << hello.out().transcript());
  REQUIRE(e.died.size() == 1);
  CHECK(e.died[0] == died_line(hung, -1, SIGKILL));
  REQUIRE(e.started.size() == 1);
  const pid_t replacement = e.started[0];
  // The hung request is lost with its worker; the connections dealt to it and never read go to
  // the other workers.
  CHECK(closed_unanswered(kept[hung].read()));
  for (auto& c : fresh) {
    HttpResult r = c.receive();
    INFO(r.error);
    pid_t pid = handled_by(r.body);
    CHECK((pid == other || pid == replacement));
  }
  REQUIRE(::kill(hello.pid(), SIGTERM) == 0);
  CHECK(exited_zero(hello.wait(Clock::now() + kDeadline)));
}

TEST_CASE("hello without faults answers GET crash and GET hang like any other path",
          "[faults][hello]") {
  REQUIRE(::access(kHello.c_str(), X_OK) == 0);
  FdLeakCheck fds;
  HelloProcess hello({"--workers", "2", "--port", "0", "--work", "0"});
  REQUIRE(hello.pid() > 0);
  if (!hello.start(2)) FAIL("hello did not start; it said:\n" << hello.out().transcript());
  const std::set<pid_t> workers(hello.workers().begin(), hello.workers().end());
  for (const char* path : {"/crash", "/hang", "/crash", "/hang"}) {
    HttpClient c;
    REQUIRE(c.connect("127.0.0.1:" + std::to_string(hello.port())));
    REQUIRE(c.send_get(path));
    HttpResult r = c.receive();
    INFO(path << ": " << r.error);
    CHECK(r.status == 200);
    CHECK(workers.count(handled_by(r.body)) == 1);
  }
  for (pid_t pid : workers) CHECK_FALSE(process_gone(pid));
  REQUIRE(::kill(hello.pid(), SIGTERM) == 0);
  CHECK(exited_zero(hello.wait(Clock::now() + kDeadline)));
  INFO(hello.out().transcript());
  CHECK(hello.out().transcript().find(" died ") == std::string::npos);
}

// ---------------------------------------------------------------------------------------------
// A crash loop under load.

namespace {

/// Adds a slot 1 that cannot start (`how`: its Server throws, or blocks for ever and
/// start_timeout in `opts` ends it) to a one-worker FaultCluster whose worker serves a load, and
/// checks what issue 5 asks of a crash loop: the slot backs off and is errored after
/// max_restarts, the master logs why, stays responsive and nearly idle, slot 0 answers every
/// request throughout, and the master's descriptors are as they were.
void check_slot_errored_under_load(Slot1Start how, Options opts) {
  // Backoff's defaults except the first delay and healthy_after: 16 restarts 1 ms x 1.5^n
  // apart (about 1.3 s in all) instead of 100 ms x 1.5^n (83 s), and every exit counts as
  // quick however slow the machine. The CPU bound is against a master that spins, not a
  // measurement: a loop that forks 17 workers and dispatches the load needs a fraction of it.
  constexpr long kCpuBoundMs = 2000;
  FdLeakCheck fds;
  using Policy = prefork::Backoff<prefork::RestartOnCrash>;
  FaultCluster master(std::move(opts),
                      Policy(prefork::BackoffOptions{.initial_delay = std::chrono::milliseconds(1),
                                                     .healthy_after = std::chrono::seconds(60)}),
                      fault_reports, fault_commands);
  REQUIRE(master.pid() > 0);
  const Listening healthy = master.expect_listening(1).front();
  const std::size_t fds_before = master.master_fds();
  const long cpu_before = cpu_ms(master.pid());

  HttpLoad load(healthy.addresses.at(0), 2, HttpLoad::Mode::new_connection);
  REQUIRE(load.wait_answered(100, Clock::now() + kDeadline));
  const std::string mode = how == Slot1Start::throws ? "throw" : "hang";
  master.command("slot-1-start " + mode);
  master.expect("slot-1-start " + mode);
  const std::uint64_t at_fork = load.answered();
  master.command("fork");  // slot 1, which cannot start

  const std::vector<std::string> loop = master.expect_all_until("errored ");
  const std::uint64_t at_errored = load.answered();
  const long cpu_loop = cpu_ms(master.pid()) - cpu_before;
  // Slot 0 goes on serving after the slot is given up, and nothing more is forked.
  master.command("wait 300");
  const std::vector<std::string> after = master.expect_all_until("waited");
  CHECK(load.wait_answered(load.answered() + 100, Clock::now() + kDeadline));
  load.stop();

  INFO("the master said:\n" << master.transcript());
  CHECK(loop.back() == (how == Slot1Start::throws ? "errored 1 1 0" : "errored 1 -1 9"));
  std::size_t forks = 0, exits = 0, failed_start = 0;
  for (auto& line : loop) {
    auto w = words(line);
    if (w.size() < 3 || w[2] != "1") continue;  // slot 1 only
    if (w[0] == "fork") ++forks;
    if (auto e = parse_exit(line)) {
      ++exits;
      if (e->after_disconnect) continue;
      if (how == Slot1Start::throws && e->code == 1 && e->signal == 0) ++failed_start;
      if (how == Slot1Start::hangs && e->signal == SIGKILL && e->reason.starts_with("start timeout: "))
        ++failed_start;
    }
  }
  CHECK(forks == 17);         // the first worker and max_restarts restarts...
  CHECK(exits == 17);
  CHECK(failed_start == 17);  // ...none of which started
  CHECK(std::any_of(loop.begin(), loop.end(), [](const std::string& l) {
    return l.starts_with("log slot 1 is errored: its workers keep exiting");
  }));
  for (auto& line : loop) CHECK_FALSE(line.starts_with("exit " + std::to_string(healthy.id) + " "));
  for (auto& line : after) CHECK_FALSE(line.starts_with("fork "));
  CHECK(cpu_loop < kCpuBoundMs);
  // The load went on throughout, answered by slot 0 alone.
  CHECK(at_errored > at_fork);
  const auto failures = load.failures();
  INFO(load.sent() << " requests, " << summary(failures));
  CHECK(failures.empty());
  CHECK(keys(load.by_pid(0)) == std::set<pid_t>{healthy.pid});
  // The crash loop left nothing behind in the master.
  CHECK(master.master_fds() == fds_before);
  CHECK(exited_zero(master.finish()));
}

}  // namespace

TEST_CASE("A slot that crashes at every start-up is errored under load while the other slot "
          "serves and the master stays idle",
          "[faults][crash-loop]") {
  check_slot_errored_under_load(Slot1Start::throws, listening_on(1));
}

// ---------------------------------------------------------------------------------------------
// A worker that floods its channel.

TEST_CASE("A worker that floods its channel with garbage is killed and replaced while a request "
          "in progress on another worker completes",
          "[faults][channel]") {
  const std::string how = GENERATE(as<std::string>{}, "random bytes", "a bad header",
                                   "an oversized header", "half a frame");
  INFO("flood: " << how);
  FdLeakCheck fds;
  FaultCluster master(listening_on(2), {}, fault_reports, fault_commands);
  REQUIRE(master.pid() > 0);
  const std::vector<Listening> ws = master.expect_listening(2);

  RequestInProgress request(master, ws);
  const Listening& holder = request.holder;
  const Listening& flooder = request.other;

  master.command("send " + std::to_string(flooder.id) + " flood garbage " + how);
  Exit e = master.expect_exit(flooder.id);
  Listening replacement = master.expect_listening(1).front();
  INFO("the master said:\n" << master.transcript());
  CHECK(e.reason.starts_with("protocol error: "));
  CHECK_FALSE(e.after_disconnect);
  if (how == "half a frame") {
    CHECK(e.code == 5);  // it exited itself; the master saw the frame cut short
  } else {
    CHECK(e.signal == SIGKILL);
  }
  CHECK(replacement.slot == flooder.slot);

  HttpResult r = request.finish();
  INFO(r.error);
  CHECK(handled_by(r.body) == holder.pid);
  std::vector<std::string> failures;
  auto by_pid = get_many(port_of(holder), 10, failures);
  INFO(summary(failures));
  CHECK(failures.empty());
  CHECK(keys(by_pid) == std::set<pid_t>{holder.pid, replacement.pid});
  master.sync();
  CHECK(master.transcript().find("exit " + std::to_string(holder.id) + " ") == std::string::npos);
  CHECK(exited_zero(master.finish()));
}

TEST_CASE("A worker that floods the master with messages starves neither a request in progress "
          "on another worker nor new connections",
          "[faults][channel]") {
  FdLeakCheck fds;
  FaultCluster master(listening_on(2), {}, fault_reports, fault_commands);
  REQUIRE(master.pid() > 0);
  const std::vector<Listening> ws = master.expect_listening(2);

  RequestInProgress request(master, ws);
  const Listening& holder = request.holder;
  const Listening& flooder = request.other;

  master.command("send " + std::to_string(flooder.id) + " flood messages");
  master.expect("message " + std::to_string(flooder.id) + " flooding");
  master.command("floods");
  const long floods_before = number_after(master.expect("floods "), "floods ");

  HttpResult r = request.finish();
  INFO(r.error);
  CHECK(handled_by(r.body) == holder.pid);
  // New connections reach both workers: the flooder's loop turns, it only writes a lot.
  std::vector<std::string> failures;
  auto by_pid = get_many(port_of(holder), 20, failures);
  INFO(summary(failures));
  CHECK(failures.empty());
  CHECK(keys(by_pid) == std::set<pid_t>{holder.pid, flooder.pid});
  master.command("floods");
  const long floods_after = number_after(master.expect("floods "), "floods ");
  CHECK(floods_after > floods_before);  // the flood went on all along

  master.command("send " + std::to_string(flooder.id) + " stop flood");
  master.expect("message " + std::to_string(flooder.id) + " flood stopped");
  INFO("the master said:\n" << master.transcript());
  CHECK(master.transcript().find("exit ") == std::string::npos);
  CHECK(exited_zero(master.finish()));
}

TEST_CASE("A connection that reaches a worker whose message queue is full is acknowledged and "
          "closed when served",
          "[faults][channel]") {
  // A Server may send until send() reports queue_full (the documented back-pressure). The
  // worker's own frames to the master must still get through: if its acknowledgement of a
  // connection is refused too, the master keeps its copy of the socket, so the client of a
  // Connection: close answer does not see the connection end; and since an acknowledgement
  // counts connections in order, every later one then closes the master's copy of the one
  // before it, so each later client waits for the next connection to see its EOF.
  FdLeakCheck fds;
  FaultCluster master(listening_on(1), {}, fault_reports, fault_commands);
  REQUIRE(master.pid() > 0);
  const Listening w = master.expect_listening(1).front();
  const std::size_t fds_before = master.master_fds();

  master.command("send " + std::to_string(w.id) + " fill on next frame");
  master.expect("message " + std::to_string(w.id) + " armed");
  // This connection's frame is the next one: the worker's queue is full when it comes.
  HttpResult r = http_get(w.addresses.at(0));
  INFO(r.error);
  CHECK(handled_by(r.body) == w.pid);
  std::vector<std::string> failures;
  get_many(port_of(w), 3, failures);
  INFO(summary(failures));
  CHECK(failures.empty());
  // Everything the worker queued has reached the master once this reply has.
  master.command("send " + std::to_string(w.id) + " ping");
  master.expect("message " + std::to_string(w.id) + " pong:");
  CHECK(master.master_fds() == fds_before);
  CHECK(exited_zero(master.finish()));
}

// ---------------------------------------------------------------------------------------------
// Issue 5's supervision options (watchdog_timeout, start_timeout, max_connections,
// max_requests, max_lifetime), hello's --watchdog-ms, --max-requests and --max-lifetime-ms, and
// process groups, seen from outside: what they do to clients and to the other workers. To be
// appended to faults.test.cpp (it uses its helpers). supervision.test.cpp checks each
// mechanism's exit record on its own; these check it under load and across its edges.

namespace {

/// Reads the master's reports until every worker in `ids` has exited (each report at most
/// kDeadline after the one before, or the test case fails), and returns them.
std::vector<std::string> read_until_exited(FaultCluster& master, std::set<unsigned> ids) {
  std::vector<std::string> lines;
  while (!ids.empty()) {
    auto part = master.expect_all_until("exit ");
    lines.insert(lines.end(), part.begin(), part.end());
    if (auto e = parse_exit(part.back())) ids.erase(e->id);
  }
  return lines;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The watchdog.

namespace {

/// The watchdog took no worker for hung and no worker exited; then the master shuts down cleanly.
void check_no_worker_ended(FaultCluster& master) {
  INFO("the master said:\n" << master.transcript());
  CHECK(master.transcript().find(" is hung") == std::string::npos);
  CHECK(master.transcript().find("exit ") == std::string::npos);
  CHECK(exited_zero(master.finish()));
}

}  // namespace

TEST_CASE("hello with a watchdog replaces a worker hung by GET hang and answers every other "
          "request",
          "[faults][watchdog][hello]") {
  REQUIRE(::access(kHello.c_str(), X_OK) == 0);
  FdLeakCheck fds;
  HelloProcess hello(
      {"--workers", "2", "--port", "0", "--work", "0", "--faults", "--watchdog-ms", "300"});
  REQUIRE(hello.pid() > 0);
  if (!hello.start(2)) FAIL("hello did not start; it said:\n" << hello.out().transcript());
  auto kept = one_connection_per_worker(hello.port(), 2);
  REQUIRE(kept.size() == 2);
  const pid_t hung = hello.workers()[0], other = hello.workers()[1];
  REQUIRE(kept[hung].send_get("/hang"));
  // 20 ms, not 100: the watchdog ends the spinning worker 300 ms after its last heartbeat, and
  // on a loaded machine (ctest runs tests in parallel) a spinning process may get a tenth of a
  // core, so 100 ms of CPU could come after the worker is gone.
  REQUIRE(spins(hung, 20));

  // New connections from now on: those dealt to the hung worker before the watchdog finds it
  // wait in its channel and go to another worker once it is gone; none is lost.
  HttpLoad load(hello.port(), 2, HttpLoad::Mode::new_connection);
  HelloEvents e = read_hello_events(hello, 1, 1);
  CHECK(load.wait_answered(load.answered() + 200, Clock::now() + kDeadline));
  load.stop();
  INFO("hello said:\n" << hello.out().transcript());
  REQUIRE(e.died.size() == 1);
  CHECK(e.died[0] == died_line(hung, -1, SIGTERM));
  REQUIRE(e.started.size() == 1);
  const pid_t replacement = e.started[0];
  const auto failures = load.failures();
  INFO(load.sent() << " requests, " << summary(failures));
  CHECK(failures.empty());
  for (auto& [pid, n] : load.by_pid(0)) CHECK((pid == other || pid == replacement));
  // The hung request is lost with its worker, and the worker is not replaced twice.
  CHECK(closed_unanswered(kept[hung].read()));
  REQUIRE(::kill(hello.pid(), SIGTERM) == 0);
  CHECK(exited_zero(hello.wait(Clock::now() + kDeadline)));
  while (hello.out().next(Clock::now() + kDeadline)) {
  }
  const std::string& all = hello.out().transcript();
  std::size_t started = 0;
  for (auto at = all.find("Started process "); at != std::string::npos;
       at = all.find("Started process ", at + 1))
    ++started;
  CHECK(started == 3);
}

TEST_CASE("A hung worker is dealt no new connection once the watchdog has found it",
          "[faults][watchdog]") {
  FdLeakCheck fds;
  Options opts = listening_on(2);
  opts.watchdog_timeout = std::chrono::milliseconds(300);
  opts.kill_timeout = std::chrono::milliseconds(60000);  // it ignores SIGTERM: hung to the end
  FaultCluster master(std::move(opts), {}, fault_reports, fault_commands);
  REQUIRE(master.pid() > 0);
  const std::vector<Listening> ws = master.expect_listening(2);
  const Listening& hung = ws[0];
  const Listening& other = ws[1];
  const std::string to_hung = "send " + std::to_string(hung.id) + " ";
  master.command(to_hung + "ignore sigterm");
  master.expect("message " + std::to_string(hung.id) + " ignoring sigterm");
  master.command(to_hung + "spin");
  master.expect("message " + std::to_string(hung.id) + " spinning");

  master.expect("log worker " + std::to_string(hung.id) + " (pid " + std::to_string(hung.pid) +
                ") is hung");
  const Listening replacement = master.expect_listening(1).front();
  INFO("the master said:\n" << master.transcript());
  CHECK(replacement.slot == hung.slot);
  // A connection dealt to the hung worker now would wait in its channel to the end of the test
  // (and time out): every one is answered, by the other worker or the replacement.
  std::vector<std::string> failures;
  auto by_pid = get_many(port_of(other), 6, failures);
  INFO(summary(failures));
  CHECK(failures.empty());
  CHECK(keys(by_pid) == std::set<pid_t>{other.pid, replacement.pid});
  CHECK_FALSE(process_gone(hung.pid));

  REQUIRE(::kill(hung.pid, SIGKILL) == 0);
  Exit e = master.expect_exit(hung.id);
  CHECK(e.signal == SIGKILL);
  CHECK_FALSE(e.after_disconnect);
  CHECK(e.reason.starts_with("watchdog: "));
  // Its slot has a worker already: nothing more is forked for it.
  master.command("wait 300");
  for (auto& line : master.expect_all_until("waited")) CHECK_FALSE(line.starts_with("fork "));
  CHECK(exited_zero(master.finish()));
}

TEST_CASE("A worker whose loop is busy for less than watchdog_timeout at a time is never taken "
          "for hung",
          "[faults][watchdog]") {
  // 30 spells of 50 ms with the loop turning in between, 1.5 s in all, against a 400 ms
  // watchdog (heartbeats every 100 ms): a heartbeat is never more than about 150 ms late.
  FdLeakCheck fds;
  Options opts = listening_on(1);
  opts.watchdog_timeout = std::chrono::milliseconds(400);
  FaultCluster master(std::move(opts), {}, fault_reports, fault_commands);
  REQUIRE(master.pid() > 0);
  const Listening w = master.expect_listening(1).front();
  for (int i = 0; i < 30; ++i) {
    master.command("send " + std::to_string(w.id) + " busy 50");
    master.expect("message " + std::to_string(w.id) + " busy done");
  }
  master.sync();
  check_no_worker_ended(master);
}

TEST_CASE("A master that was stalled for longer than watchdog_timeout does not take its healthy "
          "workers for hung",
          "[faults][watchdog]") {
  // The workers' heartbeats kept coming while the master's loop stood still (a slow fork under
  // a sanitizer, swap, a SIGSTOP): they wait in the channels. The watchdog must judge by them,
  // not by when the master last read its channels.
  FdLeakCheck fds;
  Options opts = listening_on(2);
  opts.watchdog_timeout = std::chrono::milliseconds(300);
  FaultCluster master(std::move(opts), {}, fault_reports, fault_commands);
  REQUIRE(master.pid() > 0);
  master.expect_listening(2);
  master.command("stall 1000");
  master.expect("stalled");
  master.command("wait 500");  // a few of the watchdog's rounds after the stall
  master.expect("waited");
  check_no_worker_ended(master);
}

// ---------------------------------------------------------------------------------------------
// start_timeout.

TEST_CASE("A slot whose workers never start listening is killed at start_timeout and errored "
          "under load while the other slot serves",
          "[faults][crash-loop][start-timeout]") {
  Options opts = listening_on(1);
  opts.start_timeout = std::chrono::milliseconds(100);
  check_slot_errored_under_load(Slot1Start::hangs, std::move(opts));
}

// ---------------------------------------------------------------------------------------------
// Recycling.

TEST_CASE("Recycling hello workers under load answers every request", "[faults][recycle][hello]") {
  const std::string flag = GENERATE(as<std::string>{}, "--max-requests", "--max-lifetime-ms");
  const auto mode = GENERATE(HttpLoad::Mode::keep_alive, HttpLoad::Mode::new_connection);
  const std::string value = flag == "--max-requests" ? "2000" : "300";
  INFO(flag << " " << value << ", "
            << (mode == HttpLoad::Mode::keep_alive ? "keep-alive" : "a connection per request"));
  REQUIRE(::access(kHello.c_str(), X_OK) == 0);
  FdLeakCheck fds;
  HelloProcess hello({"--workers", "2", "--port", "0", "--work", "0", flag, value});
  REQUIRE(hello.pid() > 0);
  if (!hello.start(2)) FAIL("hello did not start; it said:\n" << hello.out().transcript());

  HttpLoad load(hello.port(), 4, mode);
  constexpr std::size_t kRecycled = 6;
  HelloEvents e = read_hello_events(hello, 0, kRecycled);
  CHECK(load.wait_answered(load.answered() + 200, Clock::now() + kDeadline));
  load.stop();
  INFO("hello said:\n" << hello.out().transcript());
  CHECK(e.started.size() == kRecycled);
  CHECK(e.died.empty());
  const auto failures = load.failures();
  INFO(load.sent() << " requests, " << summary(failures));
  CHECK(failures.empty());
  REQUIRE(::kill(hello.pid(), SIGTERM) == 0);
  CHECK(exited_zero(hello.wait(Clock::now() + kDeadline)));
}

TEST_CASE("A worker recycled after max_connections answers its last connection and the next "
          "client reaches its replacement",
          "[faults][recycle]") {
  FdLeakCheck fds;
  Options opts = listening_on(1);
  opts.max_connections = 5;
  FaultCluster master(std::move(opts), {}, fault_reports, fault_commands);
  REQUIRE(master.pid() > 0);
  const Listening w = master.expect_listening(1).front();
  for (int i = 0; i < 5; ++i) {
    HttpResult r = http_get(w.addresses.at(0));
    INFO("connection " << i + 1 << ": " << r.error);
    CHECK(handled_by(r.body) == w.pid);
  }
  const std::vector<std::string> lines = master.expect_all_until("exit " + std::to_string(w.id) + " ");
  INFO("the master said:\n" << master.transcript());
  REQUIRE(parse_exit(lines.back()).has_value());
  const Exit e = *parse_exit(lines.back());
  CHECK(e.code == 0);
  CHECK(e.after_disconnect);
  CHECK(e.reason == "recycled: max_connections: took 5 connections");
  std::optional<Listening> replacement;
  for (auto& line : lines)
    if (auto l = parse_listening(line)) replacement = l;
  REQUIRE(replacement.has_value());  // listening before the old worker was let go
  CHECK(replacement->slot == w.slot);
  HttpResult sixth = http_get(w.addresses.at(0));
  INFO(sixth.error);
  CHECK(handled_by(sixth.body) == replacement->pid);
  CHECK(exited_zero(master.finish()));
}

TEST_CASE("Workers recycled by max_lifetime drain one at a time", "[faults][recycle]") {
  // Each worker holds an idle keep-alive connection, so its drain lasts the drain grace
  // (500 ms), longer than max_lifetime: recycling one worker after the other without waiting
  // for the drain would have several draining together.
  FdLeakCheck fds;
  Options opts = listening_on(4);
  opts.max_lifetime = std::chrono::milliseconds(200);
  FaultCluster master(std::move(opts), {}, fault_reports, fault_commands);
  REQUIRE(master.pid() > 0);
  const std::vector<Listening> ws = master.expect_listening(4);
  auto kept = one_connection_per_worker(port_of(ws[0]), 4);
  REQUIRE(kept.size() == 4);

  const std::vector<std::string> lines = read_until_exited(master, {1, 2, 3, 4});
  INFO("the master said:\n" << master.transcript());
  std::set<unsigned> draining;
  std::size_t most = 0;
  for (auto& line : lines) {
    auto w = words(line);
    if (w.size() == 3 && w[0] == "message" && w[2] == "draining") {
      draining.insert(static_cast<unsigned>(std::stoul(w[1])));
      most = std::max(most, draining.size());
    } else if (auto e = parse_exit(line)) {
      draining.erase(e->id);
      INFO(line);
      CHECK(e->reason.starts_with("recycled: max_lifetime 200 ms reached"));
    }
  }
  CHECK(most == 1);
  CHECK(exited_zero(master.finish()));
}

TEST_CASE("The master holds no more descriptors or memory after 300 recycling cycles",
          "[faults][recycle]") {
  // The recycling path (a retire frame, a pass of the rolling-restart machinery, a drain)
  // rather than the crash path of supervision.test.cpp's 1000 cycles.
  constexpr int kCycles = 300;
  std::size_t fds_before = count_open_fds();
  std::vector<std::size_t> master_fds;
  std::vector<ExitInfo> exits;
  std::size_t rss_warm = 0, rss_end = 0;  // the master's resident memory at cycle 50 and last
  bool timed_out = false;
  {
    Options opts = listening_on(1);
    opts.max_requests = 1;
    opts.log = [](const prefork::LogRecord&) {};
    prefork::Cluster<FaultServer, prefork::RoundRobin, prefork::RestartOnCrash> cluster(
        std::move(opts));
    cluster.on_listening([&](WorkerT& w) {
      if (w.id() == 1) w.send("request done");
    });
    cluster.on_exit([&](WorkerT&, const ExitInfo& e) {
      // The old worker is reaped and its replacement listens: one worker's channel and pidfd.
      exits.push_back(e);
      master_fds.push_back(count_open_fds());
      if (exits.size() == 50) rss_warm = prefork::detail::resident_bytes(::getpid());
      rss_end = prefork::detail::resident_bytes(::getpid());
      if (exits.size() == kCycles) return cluster.shutdown();
      for (auto* next : cluster.workers()) next->send("request done");
    });
    arm_watchdog(cluster, timed_out, 6 * kDeadline);
    CHECK(cluster.run() == 0);
  }
  REQUIRE_FALSE(timed_out);
  REQUIRE(exits.size() == kCycles + 1);  // and the last worker, at shutdown
  CHECK(std::count(master_fds.begin(), master_fds.end() - 1, master_fds.front()) == kCycles);
  for (std::size_t i = 0; i < kCycles; ++i) {
    INFO("cycle " << i);
    CHECK(exits[i].exit_code == 0);
    CHECK(exits[i].reason == "recycled: max_requests: served 1 requests");
  }
#if !defined(__SANITIZE_ADDRESS__)  // ASan's quarantine keeps freed memory resident on purpose
  CAPTURE(rss_warm, rss_end);
  CHECK(rss_end <= rss_warm + (256u << 10));
#endif
  CHECK(count_open_fds() == fds_before);
}

// ---------------------------------------------------------------------------------------------
// Process groups.

TEST_CASE("A process a worker started is stopped with the worker however the worker ends",
          "[faults][process-group]") {
  const std::string how =
      GENERATE(as<std::string>{}, "killed from outside", "found hung", "shut down");
  INFO("the worker is " << how);
  FdLeakCheck fds;
  Options opts = listening_on(1);
  opts.watchdog_timeout = std::chrono::milliseconds(300);
  FaultCluster master(std::move(opts), {}, fault_reports, fault_commands);
  REQUIRE(master.pid() > 0);
  const Listening w = master.expect_listening(1).front();
  master.command("send " + std::to_string(w.id) + " child");
  const std::string said = master.expect("message " + std::to_string(w.id) + " child:");
  const pid_t child = static_cast<pid_t>(number_after(said, "message " + std::to_string(w.id) + " child:"));
  REQUIRE(child > 0);
  prefork::UniqueFd watch(pidfd_open(child));  // not our child: polled, never reaped here
  REQUIRE(watch);

  std::optional<int> status;
  if (how == "killed from outside") {
    REQUIRE(::kill(w.pid, SIGKILL) == 0);
    CHECK(master.expect_exit(w.id).signal == SIGKILL);
  } else if (how == "found hung") {
    master.command("send " + std::to_string(w.id) + " spin");
    Exit e = master.expect_exit(w.id);
    CHECK(e.reason.starts_with("watchdog: "));
  } else {
    status = master.finish();
    CHECK(exited_zero(status));
  }
  CHECK(wait_pidfd(watch.get(), Clock::now() + kDeadline));
  CHECK(process_gone(child));
  if (!status) CHECK(exited_zero(master.finish()));
}

// ---------------------------------------------------------------------------------------------
// Slow and silent clients.

TEST_CASE("Clients that stall mid-request starve neither dispatch nor any worker: other "
          "clients are answered by every worker",
          "[faults][clients][hello]") {
  // 300 connections that send one byte and stop, and 30 that stop half-way through their
  // headers (slowloris), stay open while the load runs. (Clients that send nothing at all
  // never get past the kernel: hello sets TCP_DEFER_ACCEPT.) With master dispatch the master
  // never reads a client, it hands the socket over at once whatever the client does; each
  // worker's loop turns between clients. So each worker holds ~165 of them and still answers
  // everyone else.
  const std::string balance = GENERATE(as<std::string>{}, "round-robin", "shared");
  INFO("--balance " << balance);
  REQUIRE(::access(kHello.c_str(), X_OK) == 0);
  FdLeakCheck fds;
  HelloProcess hello({"--workers", "2", "--port", "0", "--work", "0", "--balance", balance});
  REQUIRE(hello.pid() > 0);
  if (!hello.start(2)) FAIL("hello did not start; it said:\n" << hello.out().transcript());
  const std::string address = "127.0.0.1:" + std::to_string(hello.port());

  std::vector<HttpClient> stalled(330);
  for (std::size_t i = 0; i < stalled.size(); ++i) {
    INFO("client " << i);
    REQUIRE(stalled[i].connect(address));
    REQUIRE(write_all(stalled[i].fd(),
                      i % 11 == 0 ? "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Ag" : "G"));
  }

  HttpLoad load(address, 4, HttpLoad::Mode::new_connection);
  CHECK(load.wait_answered(1000, Clock::now() + kDeadline));
  load.stop();
  const auto failures = load.failures();
  INFO(load.sent() << " requests, " << summary(failures));
  CHECK(failures.empty());
  std::set<pid_t> served;
  for (auto& [pid, n] : load.by_pid(0)) served.insert(pid);
  CHECK(served == std::set<pid_t>(hello.workers().begin(), hello.workers().end()));
  stalled.clear();
  REQUIRE(::kill(hello.pid(), SIGTERM) == 0);
  CHECK(exited_zero(hello.wait(Clock::now() + kDeadline)));
}
