// json_codec: the broadcast example's messages as JSON objects, through a JSON library plugged in
// as the cluster's MessageCodec (json_codec.hpp: nlohmann::json, Debian's nlohmann-json3-dev;
// the prefork library itself does not depend on it). The master sends the users count as
// {"usersCount":N} (as the seed's `worker.send({ usersCount })`), each worker answers with an
// acknowledgement object, and once every worker has acknowledged a count the master computes
// the next one (the seed's mock database: 5 squared, again and again). After --rounds counts
// the master shuts the cluster down and exits 0. No sockets: the channel is all there is.
//
//   json_codec [--workers N] [--rounds N]
//              defaults: 2 workers, 3 rounds (at most 8: the 9th square overflows a double,
//              and JSON has no Infinity)
//
//   $ ./json_codec --workers 2 --rounds 2
//   Master PID: 7001
//   Master sends {"usersCount":25}
//   Worker 1 (pid 7002) got {"usersCount":25}
//   Worker 2 (pid 7003) got {"usersCount":25}
//   Master got {"ack":25,"pid":7002,"worker":1} from worker 1
//   Master got {"ack":25,"pid":7003,"worker":2} from worker 2
//   Master sends {"usersCount":625}
//   Worker 1 (pid 7002) got {"usersCount":625}
//   ...
//   Done: 2 rounds, 4 acknowledgements
//
// (Lines of different processes may interleave differently.)
#include <unistd.h>

#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <set>
#include <stdexcept>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>
#include <prefork/prefork.hpp>

#include "common/cli.hpp"
#include "json_codec/json_codec.hpp"

namespace {

using json = nlohmann::json;

struct Config {
  unsigned workers = 2;
  unsigned rounds = 3;
};

Config config;

// JavaScript keeps the seed's count in a double. JSON makes no difference between 25 and 25.0,
// but nlohmann::json writes a double as "25.0": integers that a double holds exactly go out as
// integers, so that the objects read as the seed's {"usersCount":625}.
json as_json_number(double v) {
  if (v >= 0 && v < 0x1p53 && v == std::floor(v)) return static_cast<std::uint64_t>(v);
  return v;
}

void print(const std::string& line) {
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
}

struct Acknowledger {
  explicit Acknowledger(prefork::WorkerContext<JsonCodec>& ctx) : ctx_(ctx) {}

  void on_message(const json& m) {
    print("Worker " + std::to_string(ctx_.id()) + " (pid " + std::to_string(ctx_.pid()) +
          ") got " + m.dump());
    // A message is whatever JSON the peer sent: check the shape before using it, as a
    // JavaScript worker would check `msg.usersCount !== undefined`.
    auto users = m.find("usersCount");
    if (users == m.end() || !users->is_number()) return;
    ctx_.send({{"worker", ctx_.id()}, {"pid", ctx_.pid()}, {"ack", *users}});
  }

 private:
  prefork::WorkerContext<JsonCodec>& ctx_;
};

static_assert(prefork::Server<Acknowledger, JsonCodec>);

using JsonCluster = prefork::Cluster<Acknowledger, prefork::RoundRobin,
                                     prefork::Backoff<prefork::RestartOnCrash>, JsonCodec>;

constexpr const char* kUsage = "usage: json_codec [--workers N] [--rounds N]\n";

const cli::Parser args("json_codec", kUsage);

Config parse_args(int argc, char** argv) {
  Config c;
  args.parse(argc, argv, {"--workers", "--rounds"}, {},
             [&c](std::string_view flag, std::string_view value) {
    if (flag == "--workers") {
      c.workers = args.number<unsigned>(flag, value, 1, 64);
    } else {
      c.rounds = args.number<unsigned>(flag, value, 1, 8);
    }
  });
  return c;
}

int serve() {
  JsonCluster cluster(prefork::Options{
      .workers = config.workers,
      // A JSON parser's memory grows with its input: the channel refuses anything larger than
      // the few bytes these messages need (the library's default is 256 MiB).
      .max_message_size = 64 * 1024,
  });
  double count = 5;
  unsigned round = 0, acks = 0;
  std::set<unsigned> acked;  // workers that acknowledged this round's count
  auto next_round = [&] {
    ++round;
    count *= count;
    acked.clear();
  };
  if (cluster.is_master()) {
    print("Master PID: " + std::to_string(::getpid()));
    next_round();
    print("Master sends " + json{{"usersCount", as_json_number(count)}}.dump());
    cluster.on_online([&](JsonCluster::WorkerT& w) {
      w.send({{"usersCount", as_json_number(count)}});
    });
    cluster.on_message([&](JsonCluster::WorkerT& w, const json& m) {
      print("Master got " + m.dump() + " from worker " + std::to_string(w.id()));
      auto ack = m.find("ack");
      if (ack == m.end() || *ack != as_json_number(count) || !acked.insert(w.id()).second) return;
      ++acks;
      if (acked.size() < config.workers) return;
      if (round == config.rounds) {
        print("Done: " + std::to_string(round) + " rounds, " + std::to_string(acks) +
              " acknowledgements");
        cluster.shutdown();
        return;
      }
      next_round();
      json users{{"usersCount", as_json_number(count)}};
      print("Master sends " + users.dump());
      cluster.broadcast(users);
    });
    cluster.on_error([](JsonCluster::WorkerT& w, std::error_code ec) {
      print("Worker " + std::to_string(w.id()) + " broke the protocol (" + ec.message() +
            "); killing it");
    });
  }
  return cluster.run();
}

}  // namespace

int main(int argc, char** argv) {
  config = parse_args(argc, argv);
  try {
    return serve();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "json_codec: %s\n", e.what());
    return 1;
  }
}
