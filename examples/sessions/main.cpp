// sessions: the seed's authenticated users across workers. A user logs in on one worker; the
// session must be known to whichever worker serves the user's next request. Kept in one
// worker's memory (--store local) it is not: under round-robin the next request usually lands
// on another worker, which answers 401. The seed's two fixes are both here: a store every
// worker shares (--store shared, the default: the master's store, prefork's stand-in for Redis)
// and sticky load balancing (--balance cookie: the worker that creates a session binds its key
// to itself, so the master sends every later connection that carries the cookie to it).
// --store redis puts the master's store in Redis (examples/common/redis_store.hpp), so that
// several sessions instances, on one machine or several, share the logins
// (examples/deploy/run.sh: two instances behind nginx).
//
//   sessions [--host ADDR] [--port N] [--workers N] [--balance round-robin|ip-hash|cookie]
//            [--store shared|local|redis] [--redis HOST:PORT|unix:PATH] [--redis-prefix P]
//            defaults: 127.0.0.1, 8080, one worker per CPU, round-robin, shared,
//            127.0.0.1:6379, "prefork:sessions:"
//
//   POST /login   body user=<name> (form-encoded)  200 "Logged in as <name>" and
//                                                  Set-Cookie: sid=<token>; 400 without a name
//   GET  /me      cookie sid=<token>               200 "<name>"; 401 "Not logged in"
//   POST /logout  cookie sid=<token>               200 "Logged out" (the session is gone);
//                                                  401 if there was none
//   Every answer names its worker in X-Worker-Pid. A session lasts 30 minutes. A shared-store
//   failure (the master not answering in time, the store full, Redis down) is 503.
//
//   $ ./sessions --workers 2 --port 0 --store local
//   Master PID: 7120
//   Listening on 127.0.0.1:40777
//   Started process 7121
//   Started process 7122
//   $ curl -i -d user=ann http://127.0.0.1:40777/login
//   HTTP/1.1 200 OK
//   Set-Cookie: sid=4be1...; Path=/; HttpOnly; SameSite=Lax; Max-Age=1800
//   ...
//   Logged in as ann
//   $ curl -b sid=4be1... http://127.0.0.1:40777/me     # the other worker: it never heard of ann
//   Not logged in
//   $ curl -b sid=4be1... http://127.0.0.1:40777/me     # round-robin: back to the first one
//   ann
//
// With --store shared every /me answers "ann"; with --store local --balance cookie too, as long
// as the worker that holds the session lives (a replacement starts with an empty memory: the
// price of sticky sessions the seed warns about). SIGTERM or SIGINT stops everything gracefully
// (exit status 0); SIGUSR2 restarts the workers one at a time and prints
// "Reload done: 2 workers replaced in 7 ms". With --store redis the master prints to stderr
// when its Redis connection comes up or goes down; it reconnects by itself. Without
// libhiredis-dev at build time, --store redis is refused with a message saying so.
#include <sys/random.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <unordered_map>

#include <prefork/prefork.hpp>

#include "common/cli.hpp"
#include "common/http.hpp"
#include "common/master_lines.hpp"
#if PREFORK_EXAMPLE_HIREDIS  // set by the build when hiredis is found
#include "common/redis_store.hpp"
#endif

namespace {

struct Config {
  std::string host = "127.0.0.1";
  unsigned port = 8080;
  unsigned workers = prefork::cpu_count();
  std::string balance = "round-robin";
  std::string store = "shared";
  bool shared_store = true;  // through ctx.store(): "shared" or "redis"
  std::string redis = "127.0.0.1:6379";
  std::string redis_prefix = "prefork:sessions:";
};

// Parsed in main() before the cluster starts; a forked worker inherits it.
Config config;

constexpr std::chrono::minutes kSessionTtl{30};
constexpr std::string_view kCookie = "sid";
constexpr std::string_view kKeyPrefix = "sid:";  // the shared store's key: "sid:<token>"
constexpr std::size_t kTokenBytes = 16;           // 128 random bits, 32 hex digits
constexpr std::size_t kMaxNameBytes = 64;
// --store local: a worker's sessions are bounded too, so that logins cannot exhaust its memory.
constexpr std::size_t kMaxLocalSessions = 100000;

// getrandom(2) from the kernel's CSPRNG: a token that cannot be guessed from earlier ones (a
// counter or a PRNG seeded with the pid could be), so that holding a cookie means logging in.
std::optional<std::string> new_token() {
  unsigned char raw[kTokenBytes];
  std::size_t got = 0;
  while (got < sizeof raw) {
    ssize_t n = ::getrandom(raw + got, sizeof raw - got, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return std::nullopt;
    got += static_cast<std::size_t>(n);
  }
  static constexpr char kHex[] = "0123456789abcdef";
  std::string token;
  for (unsigned char b : raw) {
    token += kHex[b >> 4];
    token += kHex[b & 15];
  }
  return token;
}

// Only a token this server could have made is looked up: another cookie value is 401 at once,
// without a store round trip or a stored key of the client's choosing.
bool well_formed_token(std::string_view t) {
  if (t.size() != 2 * kTokenBytes) return false;
  for (char c : t)
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  return true;
}

bool same_nocase(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    char x = a[i] >= 'A' && a[i] <= 'Z' ? static_cast<char>(a[i] + 32) : a[i];
    char y = b[i] >= 'A' && b[i] <= 'Z' ? static_cast<char>(b[i] + 32) : b[i];
    if (x != y) return false;
  }
  return true;
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

// The session token in the request's "sid" cookie (RFC 6265 §4.2: "a=1; b=2", possibly in
// more than one Cookie field), or empty.
std::string_view session_token(const http::Request& req) {
  for (auto& [field, value] : req.headers) {
    if (!same_nocase(field, "cookie")) continue;
    std::string_view rest = value;
    while (!rest.empty()) {
      auto semi = rest.find(';');
      std::string_view pair = rest.substr(0, semi);
      rest = semi == std::string_view::npos ? std::string_view{} : rest.substr(semi + 1);
      auto eq = pair.find('=');
      if (eq != std::string_view::npos && trim(pair.substr(0, eq)) == kCookie)
        return trim(pair.substr(eq + 1));
    }
  }
  return {};
}

int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// The value of `field` in an application/x-www-form-urlencoded body ("user=ann&x=1"), decoded
// ('+' is a space, %XX a byte); nullopt if it is missing or badly escaped.
std::optional<std::string> form_value(std::string_view body, std::string_view field) {
  while (!body.empty()) {
    auto amp = body.find('&');
    std::string_view pair = body.substr(0, amp);
    body = amp == std::string_view::npos ? std::string_view{} : body.substr(amp + 1);
    auto eq = pair.find('=');
    if (eq == std::string_view::npos || pair.substr(0, eq) != field) continue;
    std::string out;
    std::string_view v = pair.substr(eq + 1);
    for (std::size_t i = 0; i < v.size(); ++i) {
      if (v[i] == '+') {
        out += ' ';
      } else if (v[i] == '%') {
        if (i + 2 >= v.size()) return std::nullopt;
        int hi = hex_digit(v[i + 1]), lo = hex_digit(v[i + 2]);
        if (hi < 0 || lo < 0) return std::nullopt;
        out += static_cast<char>(hi * 16 + lo);
        i += 2;
      } else {
        out += v[i];
      }
    }
    return out;
  }
  return std::nullopt;
}

// A name is echoed on one line of /me's answer: no control characters, so no line breaks.
bool valid_name(std::string_view name) {
  if (name.empty() || name.size() > kMaxNameBytes || trim(name).size() != name.size()) return false;
  for (char ch : name) {
    auto c = static_cast<unsigned char>(ch);
    if (c < 0x20 || c == 0x7f) return false;
  }
  return true;
}

// The answers, written into whichever Response is at hand: the handler's own, or a deferred
// one's (Responder::response()) in a store callback.
void answer(http::Response& res, int status, std::string body) {
  res.status = status;
  res.body = std::move(body);
}
void logged_in(http::Response& res, const std::string& token, const std::string& name) {
  res.set_header("Set-Cookie", std::string(kCookie) + "=" + token +
                                   "; Path=/; HttpOnly; SameSite=Lax; Max-Age=" +
                                   std::to_string(std::chrono::seconds(kSessionTtl).count()));
  answer(res, 200, "Logged in as " + name + "\n");
}
void logged_out(http::Response& res) {
  res.set_header("Set-Cookie", std::string(kCookie) + "=; Path=/; Max-Age=0");
  answer(res, 200, "Logged out\n");
}
void not_logged_in(http::Response& res) { answer(res, 401, "Not logged in\n"); }
void store_failed(http::Response& res, std::error_code ec) {
  answer(res, 503, "Session store unavailable: " + ec.message() + "\n");
}

struct Sessions {
  using Context = prefork::WorkerContext<>;

  explicit Sessions(Context& ctx)
      : ctx_(ctx),
        pid_(std::to_string(ctx.pid())),
        http_(ctx.loop(), [this](const http::Request& req, http::Response& res) {
          res.set_header("X-Worker-Pid", pid_);
          route(req, res);
        }) {
    http_.on_open([&ctx] { ctx.connection_opened(); });
    http_.on_close([&ctx] { ctx.connection_closed(); });
    if (!config.shared_store)
      ctx.loop().every(std::chrono::minutes(1), [this] { forget_expired(); }, false);
  }

  void on_connection(prefork::Connection c) { http_.adopt(std::move(c)); }
  void on_listening() {
    std::printf("Started process %s\n", pid_.c_str());
    std::fflush(stdout);
  }
  void on_drain() { http_.drain(); }

 private:
  struct LocalSession {
    std::string name;
    prefork::Clock::time_point expires;
  };

  void route(const http::Request& req, http::Response& res) {
    std::string_view path = req.path();
    std::string_view method = req.method;
    const char* allow = path == "/login" || path == "/logout" ? "POST"
                        : path == "/me"                       ? "GET, HEAD"
                                                              : nullptr;
    if (!allow) return answer(res, 404, "Not found: try POST /login, GET /me, POST /logout\n");
    if (path == "/login" && method == "POST") return login(req, res);
    if (path == "/logout" && method == "POST") return logout(req, res);
    if (path == "/me" && (method == "GET" || method == "HEAD")) return me(req, res);
    res.set_header("Allow", allow);
    answer(res, 405, "Method not allowed\n");
  }

  void login(const http::Request& req, http::Response& res) {
    std::optional<std::string> name = form_value(req.body, "user");
    if (!name || !valid_name(*name))
      return answer(res, 400, "Expected a body user=<name> (1 to 64 printable bytes)\n");
    std::optional<std::string> token = new_token();
    if (!token) return answer(res, 503, "No random token available\n");
    // The seed's sticky balancing: the load balancer records which worker authenticated the
    // user. Before the answer that hands out the cookie, so that the binding reaches the
    // master before the client can come back with it. Harmless without --balance cookie (the
    // master ignores it), but pointless: skip it.
    if (config.balance == "cookie") {
      if (std::error_code ec = ctx_.bind_session(*token))
        return answer(res, 503, "Could not bind the session: " + ec.message() + "\n");
    }
    if (!config.shared_store) {
      if (local_.size() >= kMaxLocalSessions) forget_expired();
      if (local_.size() >= kMaxLocalSessions) return answer(res, 503, "Too many sessions\n");
      local_[*token] = LocalSession{*name, prefork::Clock::now() + kSessionTtl};
      return logged_in(res, *token, *name);
    }
    http::Responder r = res.defer();  // its response() starts with X-Worker-Pid
    // The callbacks capture values, not `this`: the Responder makes a late answer harmless,
    // and nothing else of this Server is needed once the store has answered.
    ctx_.store().set(
        std::string(kKeyPrefix) + *token, *name,
        [r, token = *token, name = *name](std::error_code ec) {
          if (ec) {
            store_failed(r.response(), ec);
          } else {
            logged_in(r.response(), token, name);
          }
          r.done();
        },
        kSessionTtl);
  }

  void me(const http::Request& req, http::Response& res) {
    std::string_view token = session_token(req);
    if (!well_formed_token(token)) return not_logged_in(res);
    if (!config.shared_store) {
      auto it = local_.find(std::string(token));
      if (it == local_.end() || it->second.expires <= prefork::Clock::now())
        return not_logged_in(res);
      return answer(res, 200, it->second.name + "\n");
    }
    http::Responder r = res.defer();
    ctx_.store().get(std::string(kKeyPrefix) + std::string(token),
                     [r](std::error_code ec, std::optional<std::string> name) {
                       if (ec) {
                         store_failed(r.response(), ec);
                       } else if (!name) {
                         not_logged_in(r.response());
                       } else {
                         answer(r.response(), 200, *name + "\n");
                       }
                       r.done();
                     });
  }

  void logout(const http::Request& req, http::Response& res) {
    std::string_view token = session_token(req);
    if (!well_formed_token(token)) return not_logged_in(res);
    if (!config.shared_store) {
      auto it = local_.find(std::string(token));
      bool live = it != local_.end() && it->second.expires > prefork::Clock::now();
      if (it != local_.end()) local_.erase(it);
      return live ? logged_out(res) : not_logged_in(res);
    }
    http::Responder r = res.defer();
    ctx_.store().erase(std::string(kKeyPrefix) + std::string(token),
                       [r](std::error_code ec, bool existed) {
                         if (ec) {
                           store_failed(r.response(), ec);
                         } else if (existed) {
                           logged_out(r.response());
                         } else {
                           not_logged_in(r.response());
                         }
                         r.done();
                       });
  }

  void forget_expired() {
    auto now = prefork::Clock::now();
    std::erase_if(local_, [now](const auto& kv) { return kv.second.expires <= now; });
  }

  Context& ctx_;
  std::string pid_;
  std::unordered_map<std::string, LocalSession> local_;  // --store local: this worker's only
  http::Server http_;
};

static_assert(prefork::Server<Sessions>);

template <class Balance>
using SessionsCluster = prefork::Cluster<Sessions, Balance>;

constexpr const char* kUsage =
    "usage: sessions [--host ADDR] [--port N] [--workers N]\n"
    "                [--balance round-robin|ip-hash|cookie] [--store shared|local|redis]\n"
    "                [--redis HOST:PORT|unix:PATH] [--redis-prefix PREFIX]\n";

const cli::Parser args("sessions", kUsage);

Config parse_args(int argc, char** argv) {
  Config c;
  args.parse(argc, argv,
             {"--host", "--port", "--workers", "--balance", "--store", "--redis", "--redis-prefix"},
             {},
             [&c](std::string_view flag, std::string_view value) {
    if (flag == "--host") {
      c.host = args.text(flag, value);
    } else if (flag == "--port") {
      c.port = args.number<unsigned>(flag, value, 0, 65535);
    } else if (flag == "--workers") {
      c.workers = args.number<unsigned>(flag, value, 1, 4096);
    } else if (flag == "--balance") {
      if (value != "round-robin" && value != "ip-hash" && value != "cookie")
        args.fail("--balance: '" + std::string(value) + "' is not round-robin, ip-hash or cookie");
      c.balance = value;
    } else if (flag == "--redis") {
      c.redis = args.text(flag, value);
    } else if (flag == "--redis-prefix") {
      c.redis_prefix = value;  // empty: the whole Redis keyspace is the example's
    } else if (value == "shared" || value == "local" || value == "redis") {
      c.store = value;
      c.shared_store = value != "local";
    } else {
      args.fail("--store: '" + std::string(value) + "' is not shared, local or redis");
    }
  });
#if PREFORK_EXAMPLE_HIREDIS
  if (c.store == "redis") {
    try {
      redis::Store check(redis::Options{.address = c.redis});  // parses; connects only when used
    } catch (const std::invalid_argument& e) {
      args.fail(e.what());
    }
  }
#else
  if (c.store == "redis")
    args.fail("--store redis: this build has no Redis support (apt-get install libhiredis-dev, "
              "then reconfigure and rebuild)");
#endif
  return c;
}

template <class Balance>
int serve(const std::string& address) {
  using Cluster = SessionsCluster<Balance>;
  Cluster cluster(prefork::Options{
      .workers = config.workers,
      .listen = {address},
      .defer_accept = std::chrono::seconds(1),  // HTTP: the client speaks first
  });
  if (cluster.is_master()) {
    cluster.bind();  // first: a master that cannot bind prints no readiness line
    std::printf("Master PID: %d\n", static_cast<int>(::getpid()));
    std::printf("Listening on %s\n", cluster.addresses().front().c_str());
    std::fflush(stdout);
    master_lines::print_crashes(cluster);
    master_lines::print_reloads(cluster);
#if PREFORK_EXAMPLE_HIREDIS
    if (config.store == "redis") {
      // Short timeouts: the master waits for Redis inside its loop (see redis_store.hpp).
      cluster.use_store(redis::Store(redis::Options{
          .address = config.redis,
          .prefix = config.redis_prefix,
          .on_state = [](const std::string& line) {
            std::fprintf(stderr, "sessions: redis store: %s\n", line.c_str());
          },
      }));
    }
#endif
  }
  return cluster.run();
}

}  // namespace

int main(int argc, char** argv) {
  config = parse_args(argc, argv);
  const std::string address = cli::listen_address(config.host, config.port);
  try {
    if (config.balance == "ip-hash") return serve<prefork::IpHash>(address);
    if (config.balance == "cookie") return serve<prefork::StickyCookie>(address);
    return serve<prefork::RoundRobin>(address);
  } catch (const std::invalid_argument& e) {  // Options the library refuses, e.g. --host x
    args.fail(e.what());
  } catch (const std::exception& e) {  // set-up failures, e.g. the port is in use
    std::fprintf(stderr, "sessions: %s\n", e.what());
    return 1;
  }
}
