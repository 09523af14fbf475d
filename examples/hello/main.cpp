// hello: the seed's server.js + cluster.js. A master forks one worker per CPU; every worker
// answers any HTTP request, after a loop that simulates CPU work, with the pid that served it.
// Crashed workers are replaced, SIGUSR2 restarts the workers one at a time, SIGUSR1 replaces the
// master itself (a new master from the binary on disk takes over the listening socket), and
// SIGTERM or SIGINT stops everything gracefully (exit status 0; a second signal: at once).
//
//   hello [--host ADDR] [--port N] [--listen ADDR]... [--workers N] [--work ITERATIONS]
//         [--spawn fork|exec]
//         [--balance round-robin|least-connections|ip-hash|cookie|shared|reuse-port]
//         [--crash-ms MS] [--faults] [--watchdog-ms MS] [--max-requests N]
//         [--max-lifetime-ms MS] [--max-rss-mb N] [--pid-file PATH] [--user NAME] [--group NAME]
//         [--control PATH|off]
//   hello ctl status|reload|scale N|stop|upgrade [--control PATH | --port N]
//         defaults: 127.0.0.1, 8080, one worker per CPU, 10000000 iterations, fork, round-robin,
//         watchdog 30000 ms (0: off), no recycling, control socket hello-<port>.sock in the
//         user's runtime directory ($XDG_RUNTIME_DIR/prefork, else /tmp/prefork-<uid>)
//   --host ADDR:   a numeric address or a host name: a name listens on every address it
//                  resolves to, all on one port (`--host localhost`: 127.0.0.1 and ::1).
//   --listen ADDR: one more address, repeatable: HOST:PORT, [IPV6]:PORT or unix:PATH. Given
//                  without --host and --port, hello listens on the --listen addresses only.
//   --balance cookie: a request whose cookie `sid` names a slot ("sid=s1", or "sid=s1~token")
//                  goes to that slot's worker, and to its replacement after a crash; any other
//                  goes round-robin (prefork::StickyCookie).
//   --crash-ms MS: every worker exits with status 1 after a random time below MS (the seed's
//                  availability experiment); the master replaces it as usual.
//   --faults:      GET /crash makes the worker that reads it exit with status 1 at once, and
//                  GET /hang makes it spin for ever (for demos and tests of supervision).
//   --watchdog-ms MS: a worker whose loop has not turned for MS is replaced and killed.
//   --max-requests N, --max-lifetime-ms MS, --max-rss-mb N: recycle a worker (replacement
//                  first, then a drain; one at a time) after N requests (plus up to 10% more,
//                  per worker), after MS (plus up to 10%), or above N MiB resident.
//   --pid-file PATH: the master's pid, written atomically, locked while it runs and removed
//                  when it exits; a second hello with the same file exits with status 1
//                  ("pid file PATH is held by a running master (pid N)"). A master upgrade
//                  hands it to the new master.
//   --user NAME, --group NAME: workers run as this user and group (names or numeric ids); the
//                  master stays root, so it can bind ports below 1024 (needs a root master).
//   --control PATH: the master's control socket (mode 0600; the master's user and root only),
//                  named after the port it listens on unless given; `off`: none.
//   stdout and stderr: hello ignores SIGPIPE, so `hello | head -1` or `hello 2>&1 | head -1`
//                  keeps serving after head exits; what it prints then is lost.
//   ctl COMMAND:   this binary as the control client, like `nginx -s reload`: prints the
//                  master's JSON reply and exits 0, or 1 with its error. `status` lists the
//                  master and every worker (pid, state, uptime, restarts, connections,
//                  requests, RSS); `reload` and `upgrade` return once done; `scale N` leaves N
//                  workers; `stop` returns once the master has exited. The signals work too:
//                  HUP and USR2 reload, USR1 upgrades, TTIN and TTOU add and remove a worker,
//                  TERM, INT and QUIT stop gracefully.
//
//   $ ./hello --workers 2 --port 0
//   Master PID: 4120
//   Listening on 127.0.0.1:41237
//   Started process 4121
//   Started process 4122
//   $ curl http://127.0.0.1:41237/
//   Handled by process 4121
//   $ kill -9 4121          # the master prints:
//   Worker 4121 died (code -1 / signal 9); starting a new one
//   Started process 4130
//   $ ./hello ctl status --port 41237
//   {"ok":true,"pid":4120,"uptime_ms":5120,"workers_wanted":2,...,"workers":[{"id":1,...}]}
//   $ kill -USR2 4120       # rolling restart (or: ./hello ctl reload --port 41237)
//   Started process 4131
//   Started process 4132
//   Reload done: 2 workers replaced in 12 ms
//   $ kill -USR1 4120       # master upgrade: the new master prints its own lines, then
//   Master PID: 4133
//   Upgraded from master 4120
//   Listening on 127.0.0.1:41237
//   Started process 4134
//   Started process 4135
//   Upgrade done: new master 4133 is serving; this master exits
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <random>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <prefork/prefork.hpp>

#include "common/cli.hpp"
#include "common/http.hpp"
#include "common/master_lines.hpp"

namespace {

struct Config {
  std::string host = "127.0.0.1";
  unsigned port = 8080;
  bool host_or_port = false;        // --host or --port given
  std::vector<std::string> listen;  // --listen, in order
  unsigned workers = prefork::cpu_count();
  unsigned long long work = 10'000'000;
  prefork::SpawnMode spawn = prefork::SpawnMode::fork;
  std::string balance = "round-robin";
  unsigned crash_ms = 0;  // 0: never crash on purpose
  bool faults = false;    // GET /crash and GET /hang
  unsigned watchdog_ms = 30000;
  unsigned long long max_requests = 0;
  unsigned max_lifetime_ms = 0;
  unsigned max_rss_mb = 0;
  std::string pid_file;
  std::string user;
  std::string group;
  std::string control;  // empty: the default for the port; "off": none
};

// Parsed in main() before the cluster starts: a forked worker inherits it, an exec'd worker
// parses the same command line again.
Config config;

// The seed's `for (let i = 0; i < work; i++);`: the same empty counting loop. The empty asm
// statement claims to read and change the counter, so -O2 can neither delete the loop nor fold
// it into one step, yet it adds no instruction: an increment per iteration, as in V8's compiled
// loop (10 million iterations: about 1.4 ms here, unrolled; V8 about 3 ms). Not inlined, and
// aligned to 64 bytes, so that the loop sits at the same offset in a cache line whatever code is
// built around it: placed where the compiler happened to put it, its 9 bytes once straddled a
// 32-byte boundary and ran at half speed (on Intel cores with the JCC erratum fix, a jump that
// crosses one is not kept in the decoded-instruction cache), a CPU-bound figure that moved
// with unrelated changes to the library.
[[gnu::noinline, gnu::aligned(64)]] void simulate_cpu_work(unsigned long long iterations) {
  for (unsigned long long i = 0; i < iterations; ++i) asm volatile("" : "+r"(i));
}

struct Hello {
  explicit Hello(prefork::WorkerContext<>& ctx)
      : pid_(ctx.pid()),
        body_("Handled by process " + std::to_string(pid_) + "\n"),
        http_(ctx.loop(), [this, &ctx](const http::Request& req, http::Response& res) {
          if (config.faults) inject_fault(req.path());
          simulate_cpu_work(config.work);
          res.body = body_;
          ctx.request_done();  // for --max-requests
        }) {
    http_.on_open([&ctx] { ctx.connection_opened(); });
    http_.on_close([&ctx] { ctx.connection_closed(); });
    if (config.crash_ms > 0) {
      // The seed's `setTimeout(() => process.exit(1), Math.random() * ms)`. A timer runs
      // between two events, so the exit never interrupts a request halfway through.
      std::mt19937 rng(static_cast<unsigned>(pid_) ^ static_cast<unsigned>(
          std::chrono::steady_clock::now().time_since_epoch().count()));
      std::uniform_int_distribution<unsigned> below(0, config.crash_ms - 1);
      ctx.loop().after(std::chrono::milliseconds(below(rng)), [&ctx] { ctx.exit(1); }, false);
    }
  }

  void on_connection(prefork::Connection c) { http_.adopt(std::move(c)); }

  // --faults: a crash mid-request (the client sees its connection closed, unanswered) and a
  // hang that blocks the worker's loop for good (what a watchdog is for).
  static void inject_fault(std::string_view path) {
    if (path == "/crash") {
      std::fflush(nullptr);
      ::_exit(1);
    }
    if (path == "/hang")
      for (;;) asm volatile("");
  }
  void on_listening() {
    std::printf("Started process %d\n", static_cast<int>(pid_));
    std::fflush(stdout);
  }
  void on_drain() { http_.drain(); }

 private:
  pid_t pid_;
  std::string body_;
  http::Server http_;
};

static_assert(prefork::Server<Hello>);

// The library's defaults are Node's: the master accepts and deals connections out round-robin,
// crashed workers are restarted (with backoff), messages are strings. --balance picks another
// BalancePolicy, which is one template argument: prefork::Cluster<Hello, prefork::IpHash>.
template <class Balance>
using HelloCluster = prefork::Cluster<Hello, Balance>;

constexpr const char* kUsage =
    "usage: hello [--host ADDR] [--port N] [--listen ADDR]... [--workers N] [--work ITERATIONS]\n"
    "             [--spawn fork|exec]\n"
    "             [--balance round-robin|least-connections|ip-hash|cookie|shared|reuse-port]\n"
    "             [--crash-ms MS] [--faults] [--watchdog-ms MS] [--max-requests N]\n"
    "             [--max-lifetime-ms MS] [--max-rss-mb N] [--pid-file PATH]\n"
    "             [--user NAME] [--group NAME] [--control PATH|off]\n"
    "       hello ctl status|reload|scale N|stop|upgrade [--control PATH | --port N]\n";

const cli::Parser args("hello", kUsage);

Config parse_args(int argc, char** argv) {
  Config c;
  args.parse(argc, argv,
             {"--host", "--port", "--listen", "--workers", "--work", "--spawn", "--balance",
              "--crash-ms",
              "--watchdog-ms", "--max-requests", "--max-lifetime-ms", "--max-rss-mb",
              "--pid-file", "--user", "--group", "--control"},
             {"--faults"}, [&c](std::string_view flag, std::string_view value) {
    if (flag == "--faults") {
      c.faults = true;
    } else if (flag == "--host") {
      c.host = args.text(flag, value);
      c.host_or_port = true;
    } else if (flag == "--port") {
      c.port = args.number<unsigned>(flag, value, 0, 65535);
      c.host_or_port = true;
    } else if (flag == "--listen") {
      c.listen.push_back(args.text(flag, value));
    } else if (flag == "--workers") {
      c.workers = args.number<unsigned>(flag, value, 1, 4096);
    } else if (flag == "--work") {
      c.work = args.number<unsigned long long>(flag, value, 0, 1'000'000'000'000ULL);
    } else if (flag == "--crash-ms") {
      c.crash_ms = args.number<unsigned>(flag, value, 1, 86'400'000);
    } else if (flag == "--watchdog-ms") {
      c.watchdog_ms = args.number<unsigned>(flag, value, 0, 86'400'000);
    } else if (flag == "--max-requests") {
      c.max_requests = args.number<unsigned long long>(flag, value, 0, 1ULL << 60);
    } else if (flag == "--max-lifetime-ms") {
      c.max_lifetime_ms = args.number<unsigned>(flag, value, 0, 86'400'000);
    } else if (flag == "--max-rss-mb") {
      c.max_rss_mb = args.number<unsigned>(flag, value, 0, 1'000'000);
    } else if (flag == "--pid-file" || flag == "--user" || flag == "--group" ||
               flag == "--control") {
      (flag == "--pid-file" ? c.pid_file
       : flag == "--user"   ? c.user
       : flag == "--group"  ? c.group
                            : c.control) = args.text(flag, value);
    } else if (flag == "--balance") {
      if (value != "round-robin" && value != "least-connections" && value != "ip-hash" &&
          value != "cookie" && value != "shared" && value != "reuse-port")
        args.fail("--balance: '" + std::string(value) +
                  "' is not round-robin, least-connections, ip-hash, cookie, shared or "
                  "reuse-port");
      c.balance = value;
    } else if (value == "fork" || value == "exec") {
      c.spawn = value == "fork" ? prefork::SpawnMode::fork : prefork::SpawnMode::exec;
    } else {
      args.fail("--spawn: '" + std::string(value) + "' is not fork or exec");
    }
  });
  return c;
}

// The control socket's default name: after the port of the first TCP address, so that hellos
// on different ports (port 0 included) never share one and `hello ctl --port N` finds it; for
// Unix addresses only, after the first socket's file name.
std::string control_name(const std::vector<std::string>& bound) {
  for (auto& a : bound)
    if (!a.starts_with("unix:")) return "hello-" + a.substr(a.rfind(':') + 1);
  const std::string& path = bound.front();
  std::string file = path.substr(path.rfind('/') + 1);
  if (file.ends_with(".sock")) file.resize(file.size() - 5);  // "hello-app.sock", not ".sock.sock"
  return "hello-" + file;
}

template <class Balance>
int serve(const std::vector<std::string>& addresses) {
  using Cluster = HelloCluster<Balance>;
  Cluster cluster(prefork::Options{
      .workers = config.workers,
      .listen = addresses,
      .defer_accept = std::chrono::seconds(1),  // HTTP: the client speaks first
      .spawn = config.spawn,
      .watchdog_timeout = std::chrono::milliseconds(config.watchdog_ms),
      .max_requests = config.max_requests,
      .max_requests_jitter = config.max_requests / 10,
      .max_lifetime = std::chrono::milliseconds(config.max_lifetime_ms),
      .max_rss = std::size_t{config.max_rss_mb} << 20,
      .pid_file = config.pid_file,
      .user = config.user,
      .group = config.group});
  if (cluster.is_master()) {
    // Every start-up check first (pid file, user, the port, the control socket), then the
    // lines that announce readiness: a script that waits for "Listening on" must never see it
    // from a hello that is about to refuse to start.
    cluster.bind();  // now, so that a port-0 address can be printed before workers start
    if (config.control != "off")
      cluster.listen_control(config.control.empty()
                                 ? prefork::default_control_path(control_name(cluster.addresses()))
                                 : config.control);
    std::printf("Master PID: %d\n", static_cast<int>(::getpid()));
    if (pid_t old = cluster.upgraded_from()) std::printf("Upgraded from master %d\n", static_cast<int>(old));
    for (auto& a : cluster.addresses()) std::printf("Listening on %s\n", a.c_str());
    std::fflush(stdout);
    master_lines::print_crashes(cluster);
    cluster.on_errored([](std::size_t slot, const prefork::ExitInfo&) {
      std::printf("Workers in slot %zu keep crashing; not restarting it\n", slot);
      std::fflush(stdout);
    });
    master_lines::print_reloads(cluster);
    cluster.on_upgrade_done([&cluster](const prefork::UpgradeReport& u) {
      if (u.ok) {
        std::printf("Upgrade done: new master %d is serving; this master exits\n", u.new_master);
      } else {
        std::printf("Upgrade failed: %s%s\n", u.reason.c_str(),
                    cluster.shutting_down() ? "" : "; this master keeps serving");
      }
      std::fflush(stdout);
    });
  }
  return cluster.run();
}

}  // namespace

// `hello ctl ...`: the client side of the control socket. --port N names the default socket
// of the hello listening on port N (8080 if neither --port nor --control is given).
int control(int argc, char** argv) {
  std::vector<std::string> words;
  unsigned port = 8080;
  for (int i = 2; i < argc; ++i) {
    std::string_view w = argv[i];
    if (w == "--port" && i + 1 < argc) {
      port = args.number<unsigned>("--port", argv[++i], 1, 65535);
    } else if (w.starts_with("--port=")) {
      port = args.number<unsigned>("--port", w.substr(7), 1, 65535);
    } else {
      words.emplace_back(w);
    }
  }
  try {
    return prefork::control_main(prefork::default_control_path("hello-" + std::to_string(port)),
                                 words, stdout, stderr, "hello");
  } catch (const std::exception& e) {  // the runtime directory is not this user's, say
    std::fprintf(stderr, "hello: ctl: %s\n", e.what());
    return 1;
  }
}

int main(int argc, char** argv) {
  if (argc > 1 && std::string_view(argv[1]) == "ctl") return control(argc, argv);
  // As Node does at start-up: a write to a peer that went away fails with EPIPE instead of
  // killing the process. It holds in every worker too (prefork keeps an ignored signal
  // ignored), and it is what keeps `hello | head -1` serving once head has exited: the
  // printf lines then go nowhere, as console.log's do in Node.
  std::signal(SIGPIPE, SIG_IGN);
  config = parse_args(argc, argv);
  std::vector<std::string> addresses;  // --host/--port unless only --listen was given
  if (config.host_or_port || config.listen.empty())
    addresses.push_back(cli::listen_address(config.host, config.port));
  addresses.insert(addresses.end(), config.listen.begin(), config.listen.end());
  try {
    const std::string& b = config.balance;
    if (b == "least-connections") return serve<prefork::LeastConnections>(addresses);
    if (b == "ip-hash") return serve<prefork::IpHash>(addresses);
    if (b == "cookie") return serve<prefork::StickyCookie>(addresses);
    if (b == "shared") return serve<prefork::SharedAccept>(addresses);
    if (b == "reuse-port") return serve<prefork::ReusePort>(addresses);
    return serve<prefork::RoundRobin>(addresses);
  } catch (const std::invalid_argument& e) {  // Options the library refuses, e.g. --host x
    args.fail(e.what());
  } catch (const std::exception& e) {  // set-up failures, e.g. the port is in use
    std::fprintf(stderr, "hello: %s\n", e.what());
    return 1;
  }
}
