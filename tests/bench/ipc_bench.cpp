// ipc_bench: prefork's master<->worker messaging measured the way the seed's Node anchor
// (anchors/node/ipc.js) measures cluster IPC, and printed in the same format so that
// tests/bench/ipc.sh parses both alike:
//
//   one-way   the master sends N small messages {seq, usersCount: 625} to one worker as fast as
//             send() takes them; the clock stops when the worker's reply says it received all N.
//             "one-way: 200000 msgs in 0.105 s = 1904762 msg/s"
//   rtt       RTT ping-pongs, one at a time: master send() -> worker on_message -> worker send()
//             -> master on_message. "rtt us p50=12.3 p99=25.0" (Node's percentile indexing).
//
//   ipc_bench [--codec string|pod] [--mode MODE[,MODE...]] [-n N] [--rtt RTT]
//             defaults: string, one-way,rtt, N 200000, RTT 20000 (Node's N and RTT env too)
//   --codec string  StringCodec; a message is the text Node sends: {"seq":17,"usersCount":625}
//   --codec pod     PodCodec<Msg>, Msg = {uint64 seq; uint64 users}: 16 bytes, no parsing
//
// Modes run in order in one cluster, each after the previous one ended (a new mode is a Phase
// below; request/response and a shared-store get belong here once the library has them). Not
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
#include <memory>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <prefork/prefork.hpp>

namespace {

using Clock = std::chrono::steady_clock;

struct Config {
  std::string codec = "string";
  std::vector<std::string> modes{"one-way", "rtt"};
  std::uint64_t n = 200000;
  std::uint64_t rtt = 20000;
};
Config config;  // parsed before the cluster starts; the forked worker inherits it

// What a message means, whatever its codec.
enum class Kind { data, ping, pong, done, other };
struct Decoded {
  Kind kind = Kind::other;
  std::uint64_t value = 0;  // data: seq; ping/pong: k; done: messages received
};

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

  static Decoded decode(const Message& m) {
    if (m.empty()) return {};
    Kind kind = m[0] == '{' ? Kind::data : m[0] == 'p' ? Kind::ping : m[0] == 'P' ? Kind::pong
              : m[0] == 'd' ? Kind::done : Kind::other;
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
  static constexpr std::uint64_t kPing = ~0ull, kPong = ~0ull - 1, kDone = ~0ull - 2;

  static Message data(std::uint64_t seq) { return {seq, 625}; }
  static Message ping(std::uint64_t k) { return {k, kPing}; }
  static Message pong(std::uint64_t k) { return {k, kPong}; }
  static Message done(std::uint64_t n) { return {n, kDone}; }
  static Decoded decode(const Message& m) {
    switch (m.users) {
      case 625: return {Kind::data, m.seq};
      case kPing: return {Kind::ping, m.seq};
      case kPong: return {Kind::pong, m.seq};
      case kDone: return {Kind::done, m.seq};
      default: return {};
    }
  }
};

// ---- the worker: counts data messages, answers pings --------------------------------------------

template <class P>
struct Echo {
  explicit Echo(prefork::WorkerContext<typename P::Codec>& ctx) : ctx_(ctx) {}

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
      default: return;
    }
  }

 private:
  prefork::WorkerContext<typename P::Codec>& ctx_;
  std::uint64_t received_ = 0;
  bool out_of_order_ = false;
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
    auto at = [&](double q) { return lat_[static_cast<std::size_t>(static_cast<double>(config.rtt) * q)]; };
    std::printf("rtt us p50=%.1f p99=%.1f\n", at(0.5), at(0.99));
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

template <class P>
int run() {
  BenchCluster<P> cluster(prefork::Options{.workers = 1});
  if (cluster.is_worker()) return cluster.run();

  std::vector<std::unique_ptr<Phase<P>>> phases;
  for (auto& m : config.modes) {
    if (m == "one-way") phases.push_back(std::make_unique<OneWay<P>>());
    if (m == "rtt") phases.push_back(std::make_unique<RoundTrip<P>>());
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
               "ipc_bench: %s\nusage: ipc_bench [--codec string|pod] [--mode one-way|rtt[,...]] "
               "[-n N] [--rtt RTT]\n",
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
      std::printf("usage: ipc_bench [--codec string|pod] [--mode one-way|rtt[,...]] [-n N] [--rtt RTT]\n");
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
        if (m != "one-way" && m != "rtt") usage_error("--mode: '" + m + "' is not one-way or rtt");
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
