// ipc_bench: prefork's master<->worker messaging measured the way the seed's Node anchor
// (tests/bench/node/ipc.js) measures cluster IPC, and printed in the same format so that
// tests/bench/ipc.sh parses both alike:
//
//   one-way   the master sends N small messages {seq, usersCount: 625} to one worker as fast as
//             send() takes them; the clock stops when the worker's reply says it received all N.
//             "one-way: 200000 msgs in 0.105 s = 1904762 msg/s"
//   rtt       RTT ping-pongs, one at a time: master send() -> worker on_message -> worker send()
//             -> master on_message. "rtt us p50=12.3 p99=25.0" (Node's percentile indexing).
// and what Node's cluster has no equivalent for, RTT operations each, one at a time:
//   request         master Worker::request() -> the Server's on_request -> Reply -> the
//                   master's callback. "request us p50=.. p99=.."
//   worker-request  WorkerContext::request() -> the master's on_request -> Reply -> the
//                   worker's callback, timed in the worker; it sends its p50/p99 to the master,
//                   which prints "worker-request us p50=.. p99=..".
//   store-get       WorkerContext::store().get() of one of kStoreKeys keys the master put in
//                   its store before forking (kValueSize bytes each, a different key each time),
//                   timed in the worker like worker-request. "store-get us p50=.. p99=.."
//   store-incr      store().increment() of one counter, each answer checked against the count.
//                   "store-incr us p50=.. p99=.."
//
//   ipc_bench [--codec string|pod] [--mode MODE[,MODE...]] [-n N] [--rtt RTT]
//             defaults: string, every mode in the order above, N 200000, RTT 20000 (Node's N
//             and RTT env too)
//   --codec string  StringCodec; a message is the text Node sends: {"seq":17,"usersCount":625}
//   --codec pod     PodCodec<Msg>, Msg = {uint64 seq; uint64 users}: 16 bytes, no parsing
//
// Modes run in order in one cluster, each after the previous one ended (a mode is a Phase
// below). The store modes go through the library's own StringCodec whatever --codec says. Not
// a test: it asserts nothing about time, and it is built with the tests only so that it stays
// compiled. Exit status 0, or 1 if the worker died or a phase did not end within 120 s.
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iterator>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <vector>

#include <prefork/prefork.hpp>

namespace {

using Clock = std::chrono::steady_clock;

constexpr std::string_view kModes[] = {"one-way",        "rtt",       "request",
                                       "worker-request", "store-get", "store-incr"};

struct Config {
  std::string codec = "string";
  std::vector<std::string> modes{std::begin(kModes), std::end(kModes)};
  std::uint64_t n = 200000;
  std::uint64_t rtt = 20000;
};
Config config;  // parsed before the cluster starts; the forked worker inherits it

// The store the worker reads in store-get: as many keys as a small site's sessions, each with
// a value of a session record's size.
constexpr std::size_t kStoreKeys = 10000;
constexpr std::size_t kValueSize = 64;
std::string store_key(std::uint64_t i) {
  char buf[32] = "ipc_bench:key:";
  char* p = std::to_chars(buf + 14, buf + sizeof buf, i % kStoreKeys).ptr;
  return std::string(buf, p);
}

// A timed request that waits longer than this is a hang, not a figure.
constexpr std::chrono::seconds kRequestTimeout{10};

// The modes the worker drives: the master starts one with a `start` message naming it.
enum class WorkerMode : std::uint64_t { request = 1, store_get = 2, store_incr = 3 };

// What a message means, whatever its codec.
enum class Kind { data, ping, pong, done, start, result, failed, other };
struct Decoded {
  // data: seq; ping/pong: k; done: messages received; start: a WorkerMode; result: the
  // worker's p50 and p99 (pack_result); failed: the operation that failed, k.
  Kind kind = Kind::other;
  std::uint64_t value = 0;
};

// Both codecs carry one integer besides the kind: p50 and p99 travel in it as nanoseconds,
// 32 bits each (4.29 s at most, and a phase's operations time out after 10 s anyway).
std::uint64_t pack_result(double p50_us, double p99_us) {
  auto ns = [](double us) {
    double v = us * 1000.0 + 0.5;
    return v >= 4294967295.0 ? std::uint64_t{4294967295u} : static_cast<std::uint64_t>(v);
  };
  return ns(p50_us) << 32 | ns(p99_us);
}
double result_p50(std::uint64_t v) { return static_cast<double>(v >> 32) / 1000.0; }
double result_p99(std::uint64_t v) { return static_cast<double>(v & 0xffffffffu) / 1000.0; }

// Node's percentile indexing (sorted[floor(n * q)]) on a sorted, non-empty vector.
double percentile(const std::vector<double>& sorted, double q) {
  auto i = static_cast<std::size_t>(static_cast<double>(sorted.size()) * q);
  return sorted[std::min(i, sorted.size() - 1)];
}

// ---- the two wire formats ---------------------------------------------------------------------

struct StringProtocol {
  using Codec = prefork::StringCodec;
  using Message = std::string;

  // The bytes Node's default ('json') serialization puts on its channel for the same object,
  // built per message as Node builds them.
  static Message data(std::uint64_t seq) {
    char buf[64] = "{\"seq\":";
    char* p = std::to_chars(buf + 7, buf + 40, seq).ptr;
    constexpr std::string_view tail = ",\"usersCount\":625}";
    std::memcpy(p, tail.data(), tail.size());
    return Message(buf, static_cast<std::size_t>(p - buf) + tail.size());
  }
  static Message tagged(char tag, std::uint64_t v) {
    char buf[24];
    buf[0] = tag;
    char* p = std::to_chars(buf + 1, buf + sizeof buf, v).ptr;
    return Message(buf, static_cast<std::size_t>(p - buf));
  }
  static Message ping(std::uint64_t k) { return tagged('p', k); }
  static Message pong(std::uint64_t k) { return tagged('P', k); }
  static Message done(std::uint64_t n) { return tagged('d', n); }
  static Message start(WorkerMode mode) { return tagged('s', static_cast<std::uint64_t>(mode)); }
  static Message result(std::uint64_t packed) { return tagged('r', packed); }
  static Message failed(std::uint64_t k) { return tagged('f', k); }

  static Decoded decode(const Message& m) {
    if (m.empty()) return {};
    Kind kind;
    switch (m[0]) {
      case '{': kind = Kind::data; break;
      case 'p': kind = Kind::ping; break;
      case 'P': kind = Kind::pong; break;
      case 'd': kind = Kind::done; break;
      case 's': kind = Kind::start; break;
      case 'r': kind = Kind::result; break;
      case 'f': kind = Kind::failed; break;
      default: kind = Kind::other;
    }
    // A data message is counted, not parsed: Node's worker parses JSON, which a StringCodec
    // user would do only if the message needed it. The seq is checked only in --codec pod.
    if (kind == Kind::data || kind == Kind::other) return {kind, 0};
    std::uint64_t v = 0;
    std::from_chars(m.data() + 1, m.data() + m.size(), v);
    return {kind, v};
  }
};

struct PodProtocol {
  struct Msg {
    std::uint64_t seq;
    std::uint64_t users;  // 625 in a data message; otherwise one of the markers below
  };
  using Codec = prefork::PodCodec<Msg>;
  using Message = Msg;
  static constexpr std::uint64_t kPing = ~0ull, kPong = ~0ull - 1, kDone = ~0ull - 2,
                                 kStart = ~0ull - 3, kResult = ~0ull - 4, kFailed = ~0ull - 5;

  static Message data(std::uint64_t seq) { return {seq, 625}; }
  static Message ping(std::uint64_t k) { return {k, kPing}; }
  static Message pong(std::uint64_t k) { return {k, kPong}; }
  static Message done(std::uint64_t n) { return {n, kDone}; }
  static Message start(WorkerMode mode) { return {static_cast<std::uint64_t>(mode), kStart}; }
  static Message result(std::uint64_t packed) { return {packed, kResult}; }
  static Message failed(std::uint64_t k) { return {k, kFailed}; }
  static Decoded decode(const Message& m) {
    switch (m.users) {
      case 625: return {Kind::data, m.seq};
      case kPing: return {Kind::ping, m.seq};
      case kPong: return {Kind::pong, m.seq};
      case kDone: return {Kind::done, m.seq};
      case kStart: return {Kind::start, m.seq};
      case kResult: return {Kind::result, m.seq};
      case kFailed: return {Kind::failed, m.seq};
      default: return {};
    }
  }
};

// ---- the worker: counts data messages, answers pings, drives the worker-side modes ----------------

template <class P>
struct Echo {
  using Message = typename P::Message;
  explicit Echo(prefork::WorkerContext<typename P::Codec>& ctx) : ctx_(ctx) {}

  // The master's request mode: the same ping -> pong as rtt, through request()/Reply.
  void on_request(const Message& m, prefork::Reply<typename P::Codec> reply) {
    Decoded d = P::decode(m);
    if (d.kind == Kind::ping) reply(P::pong(d.value));
    // Anything else: the dropped Reply fails the master's request at once.
  }

  void on_message(const typename P::Message& m) {
    Decoded d = P::decode(m);
    switch (d.kind) {
      case Kind::data:
        if constexpr (std::is_same_v<P, PodProtocol>) {
          if (d.value != received_) out_of_order_ = true;
        }
        if (++received_ == config.n) {
          // Out of order would be a library bug: say so instead of reporting a figure.
          ctx_.send(P::done(out_of_order_ ? 0 : received_));
          received_ = 0;
        }
        return;
      case Kind::ping: ctx_.send(P::pong(d.value)); return;
      case Kind::start: return begin(static_cast<WorkerMode>(d.value));
      default: return;
    }
  }

 private:
  void begin(WorkerMode mode) {
    mode_ = mode;
    k_ = 0;
    lat_.clear();
    lat_.reserve(config.rtt);
    // A fresh counter per store-incr phase, so that each one's answers are 1, 2, ... K.
    if (mode == WorkerMode::store_incr) counter_ = "ipc_bench:counter:" + std::to_string(++incr_phases_);
    next();
  }

  // One operation at a time, each started from the previous one's callback (never inside the
  // call: the library defers every callback to a later loop round, so this does not recurse).
  void next() {
    sent_ = Clock::now();
    switch (mode_) {
      case WorkerMode::request:
        ctx_.request(P::ping(k_), [this](std::error_code ec, const Message& m) {
          if (ec) return fail("request", ec.message());
          Decoded d = P::decode(m);
          if (d.kind != Kind::pong || d.value != k_) return fail("request", "a wrong reply");
          done();
        }, kRequestTimeout);
        return;
      case WorkerMode::store_get:
        ctx_.store().get(store_key(k_), [this](std::error_code ec, std::optional<std::string> v) {
          if (ec) return fail("store get", ec.message());
          if (!v || v->size() != kValueSize) return fail("store get", "a missing or wrong value");
          done();
        });
        return;
      case WorkerMode::store_incr:
        ctx_.store().increment(counter_, 1, [this](std::error_code ec, std::int64_t n) {
          if (ec) return fail("store increment", ec.message());
          if (n < 0 || static_cast<std::uint64_t>(n) != k_ + 1)
            return fail("store increment", "a lost or doubled update");
          done();
        });
        return;
    }
    fail("start", "an unknown mode");
  }

  void done() {
    lat_.push_back(std::chrono::duration<double, std::micro>(Clock::now() - sent_).count());
    if (++k_ < config.rtt) return next();
    std::sort(lat_.begin(), lat_.end());
    ctx_.send(P::result(pack_result(percentile(lat_, 0.5), percentile(lat_, 0.99))));
  }

  void fail(const char* what, const std::string& why) {
    std::fprintf(stderr, "ipc_bench: worker: %s %llu: %s\n", what,
                 static_cast<unsigned long long>(k_), why.c_str());
    ctx_.send(P::failed(k_));
  }

  prefork::WorkerContext<typename P::Codec>& ctx_;
  std::uint64_t received_ = 0;
  bool out_of_order_ = false;
  // The worker-side modes.
  WorkerMode mode_ = WorkerMode::request;
  std::uint64_t k_ = 0;
  Clock::time_point sent_;
  std::vector<double> lat_;
  std::string counter_;
  unsigned incr_phases_ = 0;
};

// ---- the master: one phase per mode ---------------------------------------------------------------

template <class P>
using BenchCluster = prefork::Cluster<Echo<P>, prefork::RoundRobin, prefork::NeverRestart,
                                      typename P::Codec>;

template <class P>
class Phase {
 public:
  using WorkerT = typename BenchCluster<P>::WorkerT;
  virtual ~Phase() = default;
  /// Starts sending to w. finish(ok) once the phase is over.
  virtual void start(WorkerT& w) = 0;
  /// A message from the worker during this phase.
  virtual void on_reply(WorkerT& w, const Decoded& d) = 0;

  std::function<void(bool ok)> finish;
  BenchCluster<P>* cluster = nullptr;
};

template <class P>
class OneWay : public Phase<P> {
 public:
  using typename Phase<P>::WorkerT;
  void start(WorkerT& w) override {
    t0_ = Clock::now();
    send_from(w, 0);
  }
  void on_reply(WorkerT&, const Decoded& d) override {
    if (d.kind != Kind::done) return;
    double s = std::chrono::duration<double>(Clock::now() - t0_).count();
    if (d.value != config.n) {
      std::fprintf(stderr, "ipc_bench: the worker counted %llu messages out of order or lost\n",
                   static_cast<unsigned long long>(config.n));
      return this->finish(false);
    }
    std::printf("one-way: %llu msgs in %.3f s = %.0f msg/s\n",
                static_cast<unsigned long long>(config.n), s, static_cast<double>(config.n) / s);
    this->finish(true);
  }

 private:
  // send() refuses with queue_full once max_queued_bytes wait unsent (the worker is behind):
  // retry from the next loop round, after the loop has written some out.
  void send_from(WorkerT& w, std::uint64_t i) {
    for (; i < config.n; ++i) {
      std::error_code ec = w.send(P::data(i));
      if (ec == prefork::errc::queue_full) {
        unsigned id = w.id();
        this->cluster->after(std::chrono::microseconds(50), [this, id, i] {
          if (auto* again = this->cluster->master().worker(id)) send_from(*again, i);
        });
        return;
      }
      if (ec) {
        std::fprintf(stderr, "ipc_bench: send: %s\n", ec.message().c_str());
        return this->finish(false);
      }
    }
  }

  Clock::time_point t0_;
};

template <class P>
class RoundTrip : public Phase<P> {
 public:
  using typename Phase<P>::WorkerT;
  void start(WorkerT& w) override {
    lat_.reserve(config.rtt);
    ping(w);
  }
  void on_reply(WorkerT& w, const Decoded& d) override {
    if (d.kind != Kind::pong || d.value != k_) return;
    auto now = Clock::now();
    lat_.push_back(std::chrono::duration<double, std::micro>(now - sent_).count());
    if (++k_ < config.rtt) return ping(w);
    std::sort(lat_.begin(), lat_.end());
    std::printf("rtt us p50=%.1f p99=%.1f\n", percentile(lat_, 0.5), percentile(lat_, 0.99));
    this->finish(true);
  }

 private:
  void ping(WorkerT& w) {
    sent_ = Clock::now();
    if (auto ec = w.send(P::ping(k_))) {
      std::fprintf(stderr, "ipc_bench: send: %s\n", ec.message().c_str());
      this->finish(false);
    }
  }

  std::uint64_t k_ = 0;
  Clock::time_point sent_;
  std::vector<double> lat_;
};

// rtt through Worker::request() and the Server's on_request: the library's correlation ids,
// timeout timers and Reply in the path.
template <class P>
class Request : public Phase<P> {
 public:
  using typename Phase<P>::WorkerT;
  void start(WorkerT& w) override {
    lat_.reserve(config.rtt);
    request(w.id());
  }
  void on_reply(WorkerT&, const Decoded&) override {}

 private:
  void request(unsigned id) {
    auto* w = this->cluster->master().worker(id);
    if (!w) return this->finish(false);  // on_exit has said why
    sent_ = Clock::now();
    w->request(P::ping(k_), [this, id](std::error_code ec, const typename P::Message& m) {
      auto now = Clock::now();
      Decoded d = P::decode(m);
      if (ec || d.kind != Kind::pong || d.value != k_) {
        std::fprintf(stderr, "ipc_bench: request %llu: %s\n", static_cast<unsigned long long>(k_),
                     ec ? ec.message().c_str() : "a wrong reply");
        return this->finish(false);
      }
      lat_.push_back(std::chrono::duration<double, std::micro>(now - sent_).count());
      if (++k_ < config.rtt) return request(id);
      std::sort(lat_.begin(), lat_.end());
      std::printf("request us p50=%.1f p99=%.1f\n", percentile(lat_, 0.5), percentile(lat_, 0.99));
      this->finish(true);
    }, kRequestTimeout);
  }

  std::uint64_t k_ = 0;
  Clock::time_point sent_;
  std::vector<double> lat_;
};

// A mode the worker drives and times (its clock is the caller's, as rtt's is the master's):
// the master only starts it and prints what the worker measured.
template <class P>
class WorkerDriven : public Phase<P> {
 public:
  using typename Phase<P>::WorkerT;
  WorkerDriven(std::string name, WorkerMode mode) : name_(std::move(name)), mode_(mode) {}
  void start(WorkerT& w) override {
    if (auto ec = w.send(P::start(mode_))) {
      std::fprintf(stderr, "ipc_bench: send: %s\n", ec.message().c_str());
      this->finish(false);
    }
  }
  void on_reply(WorkerT&, const Decoded& d) override {
    if (d.kind == Kind::failed) return this->finish(false);  // the worker said why
    if (d.kind != Kind::result) return;
    std::printf("%s us p50=%.1f p99=%.1f\n", name_.c_str(), result_p50(d.value), result_p99(d.value));
    this->finish(true);
  }

 private:
  std::string name_;
  WorkerMode mode_;
};

template <class P>
int run() {
  BenchCluster<P> cluster(prefork::Options{.workers = 1});
  if (cluster.is_worker()) return cluster.run();

  std::vector<std::unique_ptr<Phase<P>>> phases;
  for (auto& m : config.modes) {
    if (m == "one-way") phases.push_back(std::make_unique<OneWay<P>>());
    if (m == "rtt") phases.push_back(std::make_unique<RoundTrip<P>>());
    if (m == "request") phases.push_back(std::make_unique<Request<P>>());
    if (m == "worker-request")
      phases.push_back(std::make_unique<WorkerDriven<P>>(m, WorkerMode::request));
    if (m == "store-get") phases.push_back(std::make_unique<WorkerDriven<P>>(m, WorkerMode::store_get));
    if (m == "store-incr")
      phases.push_back(std::make_unique<WorkerDriven<P>>(m, WorkerMode::store_incr));
  }
  // The keys store-get reads, in the master's store before the worker exists.
  auto& store = cluster.master().use_store(prefork::MemoryStore<>{});
  const std::string value(kValueSize, 'v');
  for (std::uint64_t i = 0; i < kStoreKeys; ++i) {
    if (auto ec = store.set(store_key(i), value))
      throw std::system_error(ec, "setting the store's keys");
  }
  std::size_t current = 0;
  int status = 0;
  prefork::EventLoop::TimerId limit = 0;
  unsigned worker_id = 0;

  auto stop = [&](int code) {
    status = code;
    cluster.cancel(limit);
    cluster.shutdown();
  };
  auto begin = [&](std::size_t i) {
    current = i;
    auto* w = cluster.master().worker(worker_id);
    if (i >= phases.size() || !w) return stop(i >= phases.size() ? 0 : 1);
    cluster.cancel(limit);
    limit = cluster.after(std::chrono::seconds(120), [&] {
      std::fprintf(stderr, "ipc_bench: %s did not end within 120 s\n", config.modes[current].c_str());
      stop(1);
    });
    phases[i]->start(*w);
  };
  for (auto& ph : phases) {
    ph->cluster = &cluster;
    ph->finish = [&](bool ok) {
      std::fflush(stdout);
      if (!ok) return stop(1);
      // From the next loop round, not inside the callback that ended this phase.
      cluster.after(std::chrono::milliseconds(0), [&, next = current + 1] { begin(next); });
    };
  }
  cluster.on_online([&](typename BenchCluster<P>::WorkerT& w) {
    worker_id = w.id();
    begin(0);
  });
  cluster.on_message([&](typename BenchCluster<P>::WorkerT& w, const typename P::Message& m) {
    if (current < phases.size()) phases[current]->on_reply(w, P::decode(m));
  });
  // worker-request: the worker's ping, answered at once.
  cluster.on_request([](typename BenchCluster<P>::WorkerT&, const typename P::Message& m,
                        prefork::Reply<typename P::Codec> reply) {
    Decoded d = P::decode(m);
    if (d.kind == Kind::ping) reply(P::pong(d.value));
  });
  cluster.on_exit([&](typename BenchCluster<P>::WorkerT&, const prefork::ExitInfo& e) {
    if (cluster.shutting_down()) return;
    std::fprintf(stderr, "ipc_bench: the worker exited (code %d, signal %d)\n", e.exit_code, e.signal);
    stop(1);
  });
  int rc = cluster.run();
  return rc ? rc : status;
}

[[noreturn]] void usage_error(const std::string& message) {
  std::fprintf(stderr,
               "ipc_bench: %s\nusage: ipc_bench [--codec string|pod] [--mode MODE[,...]] [-n N] "
               "[--rtt RTT]\n  MODE: one-way rtt request worker-request store-get store-incr\n",
               message.c_str());
  std::exit(2);
}

std::uint64_t parse_count(std::string_view flag, std::string_view text) {
  std::uint64_t v = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (text.empty() || ec != std::errc{} || end != text.data() + text.size() || v == 0 ||
      v > 1'000'000'000)
    usage_error(std::string(flag) + ": '" + std::string(text) + "' is not a count from 1 to 1e9");
  return v;
}

Config parse_args(int argc, char** argv) {
  Config c;
  // Node's anchor reads N and RTT from the environment: the script sets them once for both.
  if (const char* n = std::getenv("N")) c.n = parse_count("N", n);
  if (const char* r = std::getenv("RTT")) c.rtt = parse_count("RTT", r);
  for (int i = 1; i < argc; ++i) {
    std::string_view flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::printf("usage: ipc_bench [--codec string|pod] [--mode MODE[,...]] [-n N] [--rtt RTT]\n"
                  "  MODE: one-way rtt request worker-request store-get store-incr (default: all,\n"
                  "  in this order); N messages one way, RTT operations in each other mode\n");
      std::exit(0);
    }
    if (i + 1 >= argc) usage_error(std::string(flag) + " needs a value");
    std::string_view value = argv[++i];
    if (flag == "--codec") {
      if (value != "string" && value != "pod") usage_error("--codec: '" + std::string(value) + "' is not string or pod");
      c.codec = value;
    } else if (flag == "--mode") {
      c.modes.clear();
      while (!value.empty()) {
        auto comma = value.find(',');
        std::string m(value.substr(0, comma));
        if (std::find(std::begin(kModes), std::end(kModes), m) == std::end(kModes))
          usage_error("--mode: '" + m + "' is not a mode (see --help)");
        c.modes.push_back(m);
        value = comma == std::string_view::npos ? std::string_view{} : value.substr(comma + 1);
      }
      if (c.modes.empty()) usage_error("--mode needs a mode");
    } else if (flag == "-n") {
      c.n = parse_count(flag, value);
    } else if (flag == "--rtt") {
      c.rtt = parse_count(flag, value);
    } else {
      usage_error("unknown option '" + std::string(flag) + "'");
    }
  }
  return c;
}

}  // namespace

int main(int argc, char** argv) {
  config = parse_args(argc, argv);
  try {
    return config.codec == "pod" ? run<PodProtocol>() : run<StringProtocol>();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ipc_bench: %s\n", e.what());
    return 1;
  }
}
