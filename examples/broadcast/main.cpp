// broadcast: the seed's cached users count. Only the master asks the (mock) database how many
// users there are, once at start and then every interval, and broadcasts the number to every
// worker; each worker keeps the last number it received and puts it in every answer, so N
// workers cost one database call per interval instead of N. The mock database squares its count
// on every call, starting from 5: 25, 625, 390625, ...
//
//   broadcast [--host ADDR] [--port N] [--workers N] [--interval-ms MS] [--work ITERATIONS]
//             defaults: 127.0.0.1, 8080, one worker per CPU, 10000 ms (the seed's 10 s),
//             10000000 iterations of simulated CPU work per request (the seed's loop)
//
//   $ ./broadcast --workers 2 --port 0 --interval-ms 2000
//   Master PID: 5120
//   Listening on 127.0.0.1:40313
//   Users count is now 25
//   Started process 5121
//   Started process 5122
//   $ curl http://127.0.0.1:40313/
//   Handled by process 5121
//   Users: 25
//   Users count is now 625      # 2 s later, printed once the new count was sent to every worker
//   $ curl http://127.0.0.1:40313/
//   Handled by process 5122
//   Users: 625
//
// The count is a JavaScript number in the seed (a double), so it overflows to Infinity after
// 8 squarings; the answers print it the way JavaScript does (see js_number). A worker that
// starts later (a crashed worker's replacement, a rolling restart on SIGUSR2) gets the current
// count from the master as soon as it is online, before the master hands it any connection, so
// no answer ever lacks a count. SIGTERM or SIGINT stops everything gracefully (exit status 0).
#include <unistd.h>

#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <stdexcept>
#include <string>
#include <string_view>

#include <prefork/prefork.hpp>

#include "common/cli.hpp"
#include "common/http.hpp"
#include "common/master_lines.hpp"

namespace {

struct Config {
  std::string host = "127.0.0.1";
  unsigned port = 8080;
  unsigned workers = prefork::cpu_count();
  unsigned interval_ms = 10000;
  unsigned long long work = 10'000'000;
};

// Parsed in main() before the cluster starts; a forked worker inherits it.
Config config;

// The count travels as the double itself (8 bytes), not as text: the master and the workers are
// the same binary (fork mode), which is what PodCodec is for, and a worker formats the number
// once per message rather than once per request.
using CountCodec = prefork::PodCodec<double>;

// The seed's `numberOfUsersInDB`: starts at 5 and squares on every call. A double, as in
// JavaScript, so that the sequence and its overflow to Infinity are the seed's.
class MockUsersDb {
 public:
  double number_of_users() {
    count_ *= count_;
    return count_;
  }

 private:
  double count_ = 5;
};

// JavaScript's Number.prototype.toString() (ECMA-262, Number::toString): the shortest digits
// that read back as the same double, then plain notation when the decimal exponent is within
// [-7, 21) and exponent notation otherwise ("2.3283064365386964e+22": at least one exponent
// digit, always signed), and "Infinity"/"NaN". std::to_chars gives the same shortest digits
// (both pick the closest of the shortest candidates) but not JavaScript's layout: its default
// chooses whichever of fixed and scientific is shorter ("1e+20" where JavaScript writes
// "100000000000000000000") and its exponent has two digits ("1.5e-07" for JavaScript's
// "1.5e-7"). So only the digits are taken from it.
std::string js_number(double v) {
  if (std::isnan(v)) return "NaN";
  if (v == 0) return "0";  // -0 too
  if (std::isinf(v)) return v < 0 ? "-Infinity" : "Infinity";
  std::string out = v < 0 ? "-" : "";
  char buf[32];
  auto end = std::to_chars(buf, buf + sizeof buf, std::fabs(v), std::chars_format::scientific).ptr;
  std::string_view sci(buf, static_cast<std::size_t>(end - buf));  // "d[.ddd]e[+-]XX"
  auto e = sci.find('e');
  std::string digits(1, sci[0]);
  if (e > 1) digits.append(sci.substr(2, e - 2));
  int exponent = 0;
  std::from_chars(sci.data() + e + 2, sci.data() + sci.size(), exponent);
  if (sci[e + 1] == '-') exponent = -exponent;
  const int k = static_cast<int>(digits.size());
  const int n = exponent + 1;  // the decimal point goes after n digits
  if (k <= n && n <= 21) return out + digits + std::string(static_cast<std::size_t>(n - k), '0');
  if (0 < n && n <= 21) {
    auto split = static_cast<std::size_t>(n);
    return out + digits.substr(0, split) + "." + digits.substr(split);
  }
  if (-6 < n && n <= 0) return out + "0." + std::string(static_cast<std::size_t>(-n), '0') + digits;
  out += digits[0];
  if (k > 1) out += "." + digits.substr(1);
  out += n - 1 < 0 ? "e-" : "e+";
  return out + std::to_string(std::abs(n - 1));
}

// The seed's `for (let i = 0; i < 1e7; i++);`, as in hello: the empty asm keeps -O2 from
// deleting or folding the loop; not inlined and aligned to 64 bytes, as in hello, so that its
// speed does not depend on where the code around it puts the loop.
[[gnu::noinline, gnu::aligned(64)]] void simulate_cpu_work(unsigned long long iterations) {
  for (unsigned long long i = 0; i < iterations; ++i) asm volatile("" : "+r"(i));
}

struct UsersServer {
  using Context = prefork::WorkerContext<CountCodec>;

  explicit UsersServer(Context& ctx)
      : pid_(ctx.pid()),
        head_("Handled by process " + std::to_string(pid_) + "\n"),
        http_(ctx.loop(), [this](const http::Request&, http::Response& res) {
          simulate_cpu_work(config.work);
          if (body_.empty()) {
            // The seed would answer "Users: undefined". It cannot happen here (the master
            // sends the count before any connection), and if it ever did, a client should
            // see an error, not a made-up number.
            res.status = 503;
            res.body = head_ + "Users: unknown";
            return;
          }
          res.body = body_;
        }) {}

  void on_message(const double& users) { body_ = head_ + "Users: " + js_number(users); }
  void on_connection(prefork::Connection c) { http_.adopt(std::move(c)); }
  void on_listening() {
    std::printf("Started process %d\n", static_cast<int>(pid_));
    std::fflush(stdout);
  }
  void on_drain() { http_.drain(); }

 private:
  pid_t pid_;
  std::string head_;
  std::string body_;  // head_ + "Users: <count>", or empty before the first count
  http::Server http_;
};

static_assert(prefork::Server<UsersServer, CountCodec>);

using UsersCluster = prefork::Cluster<UsersServer, prefork::RoundRobin,
                                      prefork::Backoff<prefork::RestartOnCrash>, CountCodec>;

constexpr const char* kUsage =
    "usage: broadcast [--host ADDR] [--port N] [--workers N] [--interval-ms MS]\n"
    "                 [--work ITERATIONS]\n";

const cli::Parser args("broadcast", kUsage);

Config parse_args(int argc, char** argv) {
  Config c;
  args.parse(argc, argv, {"--host", "--port", "--workers", "--interval-ms", "--work"}, {},
             [&c](std::string_view flag, std::string_view value) {
    if (flag == "--host") {
      c.host = args.text(flag, value);
    } else if (flag == "--port") {
      c.port = args.number<unsigned>(flag, value, 0, 65535);
    } else if (flag == "--workers") {
      c.workers = args.number<unsigned>(flag, value, 1, 4096);
    } else if (flag == "--interval-ms") {
      c.interval_ms = args.number<unsigned>(flag, value, 1, 86'400'000);
    } else {
      c.work = args.number<unsigned long long>(flag, value, 0, 1'000'000'000'000ULL);
    }
  });
  return c;
}

void print_count(double users) {
  std::printf("Users count is now %s\n", js_number(users).c_str());
  std::fflush(stdout);
}

int serve(const std::string& address) {
  UsersCluster cluster(prefork::Options{
      .workers = config.workers,
      .listen = {address},
      .defer_accept = std::chrono::seconds(1),  // HTTP: the client speaks first
  });
  MockUsersDb db;
  double users = 0;
  if (cluster.is_master()) {
    cluster.bind();  // first: a master that cannot bind prints no readiness line
    std::printf("Master PID: %d\n", static_cast<int>(::getpid()));
    std::printf("Listening on %s\n", cluster.addresses().front().c_str());
    // The seed calls updateWorkers() once before its setInterval: the first count is there
    // before any worker can answer.
    users = db.number_of_users();
    print_count(users);
    // Node queues a message sent to a worker that is not up yet; here a worker gets the count
    // when it comes online. The master hands it connections only after it is listening, which
    // it reports after online, and the channel keeps order: the count is the first thing the
    // new worker reads. A worker forked during a broadcast may get the same count twice.
    cluster.on_online([&users](UsersCluster::WorkerT& w) { w.send(users); });
    cluster.every(std::chrono::milliseconds(config.interval_ms), [&] {
      users = db.number_of_users();
      // A worker whose channel is full (not reading: hung) misses this count; the watchdog
      // replaces such a worker, and its replacement gets the count when it comes online.
      cluster.broadcast(users);
      // After the broadcast, so that a request made after this line is answered with the new
      // count: its connection reaches the worker behind the count on the same channel.
      print_count(users);
    });
    master_lines::print_crashes(cluster);
  }
  return cluster.run();
}

}  // namespace

int main(int argc, char** argv) {
  config = parse_args(argc, argv);
  const std::string address = cli::listen_address(config.host, config.port);
  try {
    return serve(address);
  } catch (const std::invalid_argument& e) {  // Options the library refuses, e.g. --host x
    args.fail(e.what());
  } catch (const std::exception& e) {  // set-up failures, e.g. the port is in use
    std::fprintf(stderr, "broadcast: %s\n", e.what());
    return 1;
  }
}
