// Request/response between the master and real worker processes (WorkerContext::request,
// Worker::request, on_request and Reply): replies on the caller's loop, concurrency, a worker
// that dies mid-request, and a draining worker waiting for its answers. tests/unit/request
// checks the protocol itself (timeouts, failures, undecodable bytes) on one loop.
#include <catch2/catch.hpp>

#include <signal.h>
#include <unistd.h>

#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "harness.hpp"

using namespace prefork_test;
using prefork::ExitInfo;
using prefork::Options;
using prefork::Reply;
using WorkerT = prefork::Worker<prefork::StringCodec>;

namespace {

Options no_listen(unsigned workers) { return Options{.workers = workers, .handle_signals = false}; }

/// A Server that asks the master what it is told to, and answers the master's requests:
///   message "ask <n>"  sends n requests "double <i>" at once; when every reply is in, sends
///                      "asked <n> ok" (each reply was 2i, on this loop) or "asked <n> bad ..."
///   message "ask-then-drain"  sends one request "hold", disconnects, says "draining"; sends
///                      the reply it then gets as "drained with <reply>"
///   request "pid"      answers this process's pid
///   request "die"      exits with status 3 without answering
///   request "later"    answers "later" from a timer, 20 ms on
///   anything else      is dropped unanswered
struct Asker {
  explicit Asker(prefork::WorkerContext<>& ctx) : ctx_(ctx) {}

  void on_message(const std::string& m) {
    if (m.starts_with("ask ")) return ask(static_cast<int>(number_after(m, "ask ")));
    if (m == "ask-then-drain") {
      ctx_.request("hold", [this](std::error_code ec, const std::string& r) {
        ctx_.send("drained with " + (ec ? ec.message() : r));
      });
      ctx_.disconnect();
      ctx_.send("draining");
    }
  }

  void on_request(const std::string& m, Reply<prefork::StringCodec> reply) {
    if (m == "pid") reply(std::to_string(::getpid()));
    if (m == "die") ::_exit(3);
    if (m == "later") ctx_.loop().after(std::chrono::milliseconds(20), [reply] { reply("later"); });
  }

  void ask(int n) {
    auto left = std::make_shared<int>(n);
    auto bad = std::make_shared<std::string>();
    for (int i = 0; i < n; ++i)
      ctx_.request("double " + std::to_string(i),
                   [this, i, n, left, bad](std::error_code ec, const std::string& r) {
                     if (ec || r != std::to_string(2 * i))
                       *bad += " " + std::to_string(i) + "=" + (ec ? ec.message() : r);
                     if (--*left == 0)
                       ctx_.send("asked " + std::to_string(n) + (bad->empty() ? " ok" : " bad" + *bad));
                   });
  }

  prefork::WorkerContext<>& ctx_;
};

using AskerCluster = prefork::Cluster<Asker, prefork::RoundRobin, prefork::RestartOnCrash>;

}  // namespace

TEST_CASE("Requests from every worker get their own replies, some answered later by the master",
          "[request]") {
  // 3 workers x 2000 requests in flight at once; the master answers every third one from a
  // timer: the correlation ids keep them apart.
  FdLeakCheck fds;
  std::map<unsigned, std::string> results;
  std::size_t answered = 0;
  bool timed_out = false;
  {
    AskerCluster cluster(no_listen(3));
    cluster.on_request([&](WorkerT&, const std::string& m, Reply<prefork::StringCodec> reply) {
      long i = number_after(m, "double ");
      std::string answer = std::to_string(2 * i);
      ++answered;
      if (i % 3 == 0) {
        cluster.after(std::chrono::milliseconds(1), [reply, answer] { reply(answer); });
      } else {
        reply(answer);
      }
    });
    cluster.on_online([](WorkerT& w) { w.send("ask 2000"); });
    cluster.on_message([&](WorkerT& w, const std::string& m) {
      results[w.id()] = m;
      if (results.size() == 3) cluster.shutdown();
    });
    arm_watchdog(cluster, timed_out);
    CHECK(cluster.run() == 0);
  }
  REQUIRE_FALSE(timed_out);
  CHECK(answered == 6000);
  for (auto& [id, r] : results) {
    INFO("worker " << id);
    CHECK(r == "asked 2000 ok");
  }
}

TEST_CASE("The master's requests are answered by each worker's Server, now or later",
          "[request]") {
  FdLeakCheck fds;
  std::map<unsigned, std::pair<pid_t, std::string>> pids;  // worker id -> (pid, its answer)
  std::vector<std::string> later;
  bool timed_out = false;
  {
    AskerCluster cluster(no_listen(2));
    auto done = [&] {
      if (pids.size() == 2 && later.size() == 2) cluster.shutdown();
    };
    cluster.on_online([&](WorkerT& w) {
      w.request("pid", [&, &w = w](std::error_code ec, const std::string& r) {
        CHECK_FALSE(ec);
        pids[w.id()] = {w.pid(), r};
        done();
      });
      w.request("later", [&](std::error_code ec, const std::string& r) {
        later.push_back(ec ? ec.message() : r);
        done();
      });
    });
    arm_watchdog(cluster, timed_out);
    CHECK(cluster.run() == 0);
  }
  REQUIRE_FALSE(timed_out);
  REQUIRE(pids.size() == 2);
  for (auto& [id, p] : pids) CHECK(std::to_string(p.first) == p.second);
  CHECK(later == std::vector<std::string>{"later", "later"});
}

TEST_CASE("A request to a worker that dies before answering fails with peer_gone, once, and "
          "its replacement is not asked",
          "[request]") {
  FdLeakCheck fds;
  std::vector<std::string> outcome;
  std::optional<ExitInfo> exit;
  std::optional<std::error_code> unanswered;
  bool timed_out = false;
  {
    AskerCluster cluster(no_listen(1));
    cluster.on_online([&](WorkerT& w) {
      if (w.id() == 1) {
        // A request the worker drops (no answer) fails at once, not at its timeout.
        w.request("unknown", [&](std::error_code ec, const std::string&) { unanswered = ec; });
        w.request("die", [&](std::error_code ec, const std::string&) {
          outcome.push_back(ec.message());
          CHECK(ec == prefork::errc::peer_gone);
          // Delivered before 'exit' is emitted (with 'disconnect'), as the channel closes.
          CHECK_FALSE(exit.has_value());
        });
        return;
      }
      // The replacement (slot 0, RestartOnCrash) answers its own requests only.
      w.request("pid", [&](std::error_code ec, const std::string&) {
        CHECK_FALSE(ec);
        cluster.shutdown();
      });
    });
    cluster.on_exit([&](WorkerT& w, const ExitInfo& e) {
      if (w.id() == 1) exit = e;
    });
    arm_watchdog(cluster, timed_out);
    CHECK(cluster.run() == 0);
  }
  REQUIRE_FALSE(timed_out);
  CHECK(outcome == std::vector<std::string>{"peer exited before it answered"});
  REQUIRE(exit.has_value());
  CHECK(exit->exit_code == 3);
  // "unknown" was sent before "die"; the worker dropped its Reply, so it failed at once.
  REQUIRE(unanswered.has_value());
  CHECK(*unanswered == prefork::errc::request_failed);
}

TEST_CASE("A request from a worker the master cannot answer fails with no_handler",
          "[request]") {
  FdLeakCheck fds;
  std::string result;
  bool timed_out = false;
  {
    AskerCluster cluster(no_listen(1));  // no on_request
    cluster.on_online([](WorkerT& w) { w.send("ask 3"); });
    cluster.on_message([&](WorkerT&, const std::string& m) {
      result = m;
      cluster.shutdown();
    });
    arm_watchdog(cluster, timed_out);
    CHECK(cluster.run() == 0);
  }
  REQUIRE_FALSE(timed_out);
  CHECK(result == "asked 3 bad 0=peer has no request handler 1=peer has no request handler "
                  "2=peer has no request handler");
}

TEST_CASE("A draining worker waits for the answer to its pending request before it exits",
          "[request]") {
  FdLeakCheck fds;
  std::optional<Reply<prefork::StringCodec>> held;
  std::string said;
  std::optional<ExitInfo> exit;
  bool disconnected_before_answer = false;
  bool timed_out = false;
  {
    AskerCluster cluster(no_listen(1));
    cluster.on_online([](WorkerT& w) { w.send("ask-then-drain"); });
    cluster.on_request([&](WorkerT&, const std::string&, Reply<prefork::StringCodec> reply) {
      held = reply;
    });
    cluster.on_message([&](WorkerT& w, const std::string& m) {
      // Answered only once the worker is draining: without a pending request its loop would
      // have nothing left and it would exit now.
      if (m == "draining" && held) {
        disconnected_before_answer = w.exited_after_disconnect();
        (*held)("answer");
        return;
      }
      said = m;
    });
    cluster.on_exit([&](WorkerT&, const ExitInfo& e) {
      exit = e;
      cluster.shutdown();
    });
    arm_watchdog(cluster, timed_out);
    CHECK(cluster.run() == 0);
  }
  REQUIRE_FALSE(timed_out);
  CHECK(said == "drained with answer");
  REQUIRE(exit.has_value());
  CHECK(exit->exit_code == 0);
  CHECK(disconnected_before_answer);
}
