// Messages between the master and real forked workers, after Node's
// test/parallel/test-cluster-message.js, test-cluster-send-deadlock.js and
// test-cluster-worker-isconnected.js: order both ways, 64 MiB messages, bursts of small ones,
// broadcast, unknown ids, and a worker that breaks the protocol (garbage on its channel, or a
// message the codec rejects) being killed and replaced while the rest carries on.
#include <catch2/catch.hpp>

#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "harness.hpp"

using namespace prefork_test;
using prefork::ExitInfo;
using prefork::Options;

namespace {

/// StringCodec, except that the exact message "poison" does not decode: a way to make the
/// master's codec reject a message that a worker sends through the ordinary API.
struct PoisonCodec {
  using message_type = std::string;
  std::string encode(const message_type& m) const { return m; }
  std::optional<message_type> decode(std::string_view bytes, std::error_code& ec) const {
    if (bytes == "poison") {
      ec = prefork::errc::decode_failed;
      return std::nullopt;
    }
    ec.clear();
    return std::string(bytes);
  }
};
static_assert(prefork::MessageCodec<PoisonCodec>);

using Ctx = prefork::WorkerContext<PoisonCodec>;
using WorkerT = prefork::Worker<PoisonCodec>;

/// The descriptor of this worker's channel, found the hard way: the API does not expose it, so
/// look for the connected AF_UNIX stream socket whose peer is the master (SO_PEERCRED of a
/// socketpair names the process that created it). -1 unless there is exactly one.
int find_own_channel() {
  int found = -1, count = 0;
  for (int fd : open_fds()) {
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISSOCK(st.st_mode)) continue;
    int domain = 0, type = 0, listening = 0;
    socklen_t len = sizeof domain;
    if (::getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) != 0 || domain != AF_UNIX) continue;
    len = sizeof type;
    if (::getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0 || type != SOCK_STREAM) continue;
    len = sizeof listening;
    if (::getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) != 0 || listening) continue;
    ucred cred{};
    len = sizeof cred;
    if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || cred.pid != ::getppid())
      continue;
    found = fd;
    ++count;
  }
  return count == 1 ? found : -1;
}

/// A frame header as the channel lays it out: "PF", kind, descriptor count, length, tag.
std::string header(unsigned kind, unsigned nfds, std::uint32_t length) {
  std::string h(16, '\0');
  h[0] = 0x50;
  h[1] = 0x46;
  h[2] = static_cast<char>(kind);
  h[3] = static_cast<char>(nfds);
  for (int i = 0; i < 4; ++i) h[4 + i] = static_cast<char>((length >> (8 * i)) & 0xff);
  return h;
}

/// Bytes a hostile worker writes straight onto its channel, by name.
std::string garbage(std::string_view variant) {
  if (variant == "bad magic" || variant == "bad magic then carry on") return "this is no frame";
  if (variant == "unknown kind") return header(99, 0, 0);
  if (variant == "oversized length") return header(1, 0, 0x7fffffffu);
  if (variant == "too many descriptors") return header(1, 17, 0);
  if (variant == "missing descriptor") return header(1, 1, 0);
  if (variant == "control frame the master never takes") return header(5, 0, 0);
  if (variant == "second online") return header(2, 0, 0);
  if (variant == "truncated") return header(1, 0, 4).substr(0, 8);
  return {};
}

/// The workers' Server: answers the master's requests, see on_message.
struct Messenger {
  explicit Messenger(Ctx& ctx) : ctx_(ctx) {}

  void on_message(const std::string& m) {
    if (m.size() > (1u << 20)) return big(m);
    if (m.starts_with("stream:")) {
      // The worker's own stream, sent in one go: worker -> master order.
      long n = number_after(m, "stream:");
      for (long i = 0; i < n; ++i) must(ctx_.send("w:" + std::to_string(i)));
    } else if (m.starts_with("n:")) {
      must(ctx_.send("r:" + m.substr(2)));
    } else if (m.starts_with("b:")) {
      if (m == "b:end") {
        must(ctx_.send("count:" + std::to_string(count_) + ":" +
                       (in_order_ ? "in order" : "out of order")));
        return;
      }
      if (number_after(m, "b:") != static_cast<long>(count_)) in_order_ = false;
      ++count_;
    } else if (m.starts_with("burst:")) {
      long n = number_after(m, "burst:");
      for (long i = 0; i < n; ++i) must(ctx_.send("c:" + std::to_string(i)));
      must(ctx_.send("c:end"));
    } else if (m == "ping") {
      must(ctx_.send("pong:" + std::to_string(ctx_.id())));
    } else if (m.starts_with("exit:")) {
      ctx_.exit(static_cast<int>(number_after(m, "exit:")));
    } else if (m.starts_with("send size:")) {
      // Reports what send() says of a message of the given size.
      auto ec =
          ctx_.send(std::string(static_cast<std::size_t>(number_after(m, "send size:")), 'x'));
      must(ctx_.send("send result:" + std::string(ec ? ec.message() : "ok")));
    } else if (m == "poison please") {
      must(ctx_.send("poison"));
    } else if (m.starts_with("garbage:")) {
      hostile(m.substr(8));
    }
  }

  // A send that fails here would leave the test waiting for a reply: exit with a code the
  // master reports instead.
  void must(std::error_code ec) {
    if (ec) ctx_.exit(90);
  }

  void big(const std::string& m) {
    must(ctx_.send("hash:" + std::to_string(m.size()) + ":" + std::to_string(hash_bytes(m))));
    must(ctx_.send(m));
  }

  void hostile(const std::string& variant) {
    int fd = find_own_channel();
    if (fd < 0) ctx_.exit(101);
    std::string bytes = garbage(variant);
    if (bytes.empty()) ctx_.exit(102);
    // The socket is non-blocking (the worker's Channel shares it): wait for room if need be.
    // Nothing of the worker's own is queued on it by now, so the garbage starts a frame.
    std::string_view rest = bytes;
    while (!rest.empty()) {
      ssize_t n = ::send(fd, rest.data(), rest.size(), MSG_NOSIGNAL);
      if (n > 0) {
        rest.remove_prefix(static_cast<std::size_t>(n));
      } else if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
        pollfd p{fd, POLLOUT, 0};
        if (::poll(&p, 1, 10000) <= 0) ctx_.exit(103);
      } else {
        ctx_.exit(104);
      }
    }
    if (variant == "truncated") ::_exit(5);
    // A worker that goes on as if nothing happened (and so would exit 0 on the channel's EOF
    // if the master closed it before killing it)...
    if (variant.ends_with("then carry on")) return;
    // ...or one that waits for the SIGKILL without reading the channel.
    for (;;) ::pause();
  }

  Ctx& ctx_;
  std::size_t count_ = 0;
  bool in_order_ = true;
};

template <class Restart = prefork::RestartOnCrash>
using MsgCluster = prefork::Cluster<Messenger, prefork::RoundRobin, Restart, PoisonCodec>;

/// "<prefix><i>" for i = 0, 1, ... in order, complete up to n, with nothing else mixed in?
bool is_sequence(const std::vector<std::string>& got, std::string_view prefix, int n) {
  if (got.size() != static_cast<std::size_t>(n)) return false;
  for (int i = 0; i < n; ++i)
    if (got[static_cast<std::size_t>(i)] != std::string(prefix) + std::to_string(i)) return false;
  return true;
}

Options options(unsigned workers) { return Options{.workers = workers, .handle_signals = false}; }

}  // namespace

TEST_CASE("Messages between the master and a worker arrive complete and in order both ways",
          "[messaging]") {
  constexpr int kCount = 1000;
  std::size_t fds_before = count_open_fds();
  std::vector<std::string> from_worker, replies;
  bool timed_out = false, online_first = false;
  std::vector<std::error_code> send_errors;
  {
    MsgCluster<> cluster(options(1));
    cluster.on_online([&](WorkerT& w) {
      online_first = from_worker.empty() && replies.empty();
      if (auto ec = w.send("stream:" + std::to_string(kCount))) send_errors.push_back(ec);
      for (int i = 0; i < kCount; ++i)
        if (auto ec = w.send("n:" + std::to_string(i))) send_errors.push_back(ec);
    });
    cluster.on_message([&](WorkerT&, const std::string& m) {
      if (m.starts_with("w:")) from_worker.push_back(m);
      if (m.starts_with("r:")) replies.push_back(m);
      if (from_worker.size() == kCount && replies.size() == kCount) cluster.shutdown();
    });
    arm_watchdog(cluster, timed_out);
    CHECK(cluster.run() == 0);
  }
  REQUIRE_FALSE(timed_out);
  CHECK(online_first);
  CHECK(send_errors.empty());
  CHECK(is_sequence(from_worker, "w:", kCount));
  CHECK(is_sequence(replies, "r:", kCount));
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("A 64 MiB message arrives intact in both directions", "[messaging]") {
  const std::string big = random_bytes(std::size_t{64} << 20, 0x5eed);
  const std::uint64_t big_hash = hash_bytes(big);
  std::size_t fds_before = count_open_fds();
  std::error_code send_error;
  std::string worker_saw;
  bool echo_intact = false, timed_out = false;
  std::size_t echo_size = 0;
  std::optional<ExitInfo> unexpected_exit;
  {
    MsgCluster<> cluster(options(1));
    cluster.on_online([&](WorkerT& w) { send_error = w.send(big); });
    cluster.on_message([&](WorkerT&, const std::string& m) {
      if (m.starts_with("hash:")) worker_saw = m;
      if (m.size() > (1u << 20)) {
        echo_size = m.size();
        echo_intact = m == big;
        cluster.shutdown();
      }
    });
    cluster.on_exit([&](WorkerT&, const ExitInfo& e) {
      if (!e.exited_after_disconnect) unexpected_exit = e;
    });
    arm_watchdog(cluster, timed_out, 2 * kDeadline);
    CHECK(cluster.run() == 0);
  }
  REQUIRE_FALSE(timed_out);
  CHECK_FALSE(send_error);
  CHECK_FALSE(unexpected_exit.has_value());
  CHECK(worker_saw == "hash:" + std::to_string(big.size()) + ":" + std::to_string(big_hash));
  CHECK(echo_size == big.size());
  CHECK(echo_intact);
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("A message over max_message_size is refused with frame_too_large on both sides",
          "[messaging]") {
  constexpr std::size_t kMax = std::size_t{1} << 20;
  std::size_t fds_before = count_open_fds();
  std::error_code too_big, just_right;
  std::vector<std::string> results;
  bool timed_out = false;
  {
    Options opts = options(1);
    opts.max_message_size = kMax;
    MsgCluster<> cluster(std::move(opts));
    cluster.on_online([&](WorkerT& w) {
      too_big = w.send(std::string(kMax + 1, 'x'));
      just_right = w.send("send size:" + std::to_string(kMax + 1));
      w.send("send size:" + std::to_string(kMax));
    });
    cluster.on_message([&](WorkerT&, const std::string& m) {
      if (m.starts_with("send result:")) results.push_back(m);
      if (results.size() == 2) cluster.shutdown();
    });
    arm_watchdog(cluster, timed_out);
    CHECK(cluster.run() == 0);
  }
  REQUIRE_FALSE(timed_out);
  CHECK(too_big == prefork::errc::frame_too_large);
  CHECK_FALSE(just_right);
  CHECK(results ==
        std::vector<std::string>{
            "send result:" + prefork::make_error_code(prefork::errc::frame_too_large).message(),
            "send result:ok"});
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("A burst of 100000 small messages arrives complete and in order each way",
          "[messaging]") {
  constexpr int kBurst = 100000;
  std::size_t fds_before = count_open_fds();
  std::size_t failed_sends = 0;
  std::string worker_count;
  std::vector<std::string> burst;
  bool burst_ended = false, timed_out = false;
  {
    MsgCluster<> cluster(options(1));
    cluster.on_online([&](WorkerT& w) {
      for (int i = 0; i < kBurst; ++i)
        if (w.send("b:" + std::to_string(i))) ++failed_sends;
      if (w.send("b:end")) ++failed_sends;
    });
    burst.reserve(kBurst);
    cluster.on_message([&](WorkerT& w, const std::string& m) {
      if (m.starts_with("count:")) {
        worker_count = m;
        w.send("burst:" + std::to_string(kBurst));
      } else if (m.starts_with("c:")) {
        if (m == "c:end") {
          burst_ended = true;
          cluster.shutdown();
        } else {
          burst.push_back(m);
        }
      }
    });
    arm_watchdog(cluster, timed_out, 2 * kDeadline);
    CHECK(cluster.run() == 0);
  }
  REQUIRE_FALSE(timed_out);
  CHECK(failed_sends == 0);
  CHECK(worker_count == "count:" + std::to_string(kBurst) + ":in order");
  CHECK(burst_ended);
  CHECK(is_sequence(burst, "c:", kBurst));
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("broadcast reaches every connected worker and counts them", "[messaging]") {
  std::size_t fds_before = count_open_fds();
  std::size_t first_count = 0, second_count = 0;
  std::set<std::string> first_pongs, second_pongs;
  bool timed_out = false;
  int phase = 0;
  {
    MsgCluster<prefork::NeverRestart> cluster(options(3));
    int online = 0;
    cluster.on_online([&](WorkerT&) {
      if (++online == 3) {
        phase = 1;
        first_count = cluster.broadcast("ping");
      }
    });
    cluster.on_message([&](WorkerT&, const std::string& m) {
      if (!m.starts_with("pong:")) return;
      if (phase == 1) {
        first_pongs.insert(m);
        if (first_pongs.size() == 3) {
          phase = 2;
          cluster.send(3, "exit:0");
        }
      } else if (phase == 3) {
        second_pongs.insert(m);
        if (second_pongs.size() == 2) cluster.shutdown();
      }
    });
    cluster.on_exit([&](WorkerT& w, const ExitInfo&) {
      if (phase == 2 && w.id() == 3) {
        phase = 3;
        second_count = cluster.broadcast("ping");
      }
    });
    arm_watchdog(cluster, timed_out);
    CHECK(cluster.run() == 0);
  }
  REQUIRE_FALSE(timed_out);
  CHECK(first_count == 3);
  CHECK(first_pongs == std::set<std::string>{"pong:1", "pong:2", "pong:3"});
  CHECK(second_count == 2);
  CHECK(second_pongs == std::set<std::string>{"pong:1", "pong:2"});
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("send to an unknown or exited worker id reports no_such_worker", "[messaging]") {
  std::size_t fds_before = count_open_fds();
  std::error_code before_run, unknown, exited, live;
  bool timed_out = false;
  {
    MsgCluster<prefork::NeverRestart> cluster(options(2));
    before_run = cluster.send(1, "ping");
    cluster.on_online([&](WorkerT& w) {
      if (w.id() == 2) {
        unknown = cluster.send(999, "ping");
        w.send("exit:0");
      }
    });
    cluster.on_exit([&](WorkerT& w, const ExitInfo&) {
      if (w.id() != 2) return;
      exited = cluster.send(2, "ping");
      live = cluster.send(1, "ping");
    });
    cluster.on_message([&](WorkerT&, const std::string& m) {
      if (m == "pong:1") cluster.shutdown();
    });
    arm_watchdog(cluster, timed_out);
    CHECK(cluster.run() == 0);
  }
  REQUIRE_FALSE(timed_out);
  CHECK(before_run == prefork::errc::no_such_worker);
  CHECK(unknown == prefork::errc::no_such_worker);
  CHECK(exited == prefork::errc::no_such_worker);
  CHECK_FALSE(live);
  CHECK(count_open_fds() == fds_before);
}

namespace {

struct Violation {
  std::string how;         // a garbage() variant, or "poison" for a message the codec rejects
  prefork::errc expected;  // what on_error reports
  bool killed;             // the worker stays alive after the violation: the master kills it
                           // (and must, before the worker can see its channel close)
};

}  // namespace

TEST_CASE(
    "A worker that breaks the protocol is reported killed and replaced while the rest "
    "carries on",
    "[messaging]") {
  Violation v = GENERATE(values<Violation>({
      {"bad magic", prefork::errc::malformed_frame, true},
      {"unknown kind", prefork::errc::malformed_frame, true},
      {"oversized length", prefork::errc::frame_too_large, true},
      {"too many descriptors", prefork::errc::too_many_fds, true},
      {"missing descriptor", prefork::errc::malformed_frame, true},
      {"control frame the master never takes", prefork::errc::malformed_frame, true},
      {"second online", prefork::errc::malformed_frame, true},
      {"truncated", prefork::errc::truncated_frame, false},
      {"poison", prefork::errc::decode_failed, true},
  }));
  INFO("violation: " << v.how);
  std::size_t fds_before = count_open_fds();
  std::vector<std::pair<unsigned, std::error_code>> errors;
  std::optional<ExitInfo> offender_exit;
  std::map<unsigned, std::size_t> slot_of;
  std::set<std::string> pongs;
  std::vector<std::string> log;
  bool timed_out = false;
  {
    Options opts = options(3);
    opts.log = [&](const prefork::LogRecord& r) { log.emplace_back(r.message); };
    MsgCluster<> cluster(std::move(opts));
    int online = 0;
    cluster.on_fork([&](WorkerT& w) { slot_of[w.id()] = w.slot(); });
    cluster.on_online([&](WorkerT&) {
      ++online;
      if (online == 3) {
        cluster.send(1, v.how == "poison" ? "poison please" : "garbage:" + v.how);
      } else if (online == 4) {
        // The replacement is up: everyone alive, old and new, still answers.
        cluster.broadcast("ping");
      }
    });
    cluster.on_error([&](WorkerT& w, std::error_code ec) { errors.emplace_back(w.id(), ec); });
    cluster.on_exit([&](WorkerT& w, const ExitInfo& e) {
      if (w.id() == 1) offender_exit = e;
    });
    cluster.on_message([&](WorkerT&, const std::string& m) {
      if (m.starts_with("pong:")) pongs.insert(m);
      if (pongs.size() == 3) cluster.shutdown();
    });
    arm_watchdog(cluster, timed_out);
    CHECK(cluster.run() == 0);
  }
  INFO("worker 1 exit: " << (offender_exit ? "code " + std::to_string(offender_exit->exit_code) +
                                                 ", signal " + std::to_string(offender_exit->signal)
                                           : std::string("none")));
  REQUIRE_FALSE(timed_out);
  REQUIRE(errors.size() == 1);
  CHECK(errors[0].first == 1);
  CHECK(errors[0].second == v.expected);
  CHECK(errors[0].second.category() == prefork::error_category());
  REQUIRE(offender_exit.has_value());
  CHECK_FALSE(offender_exit->exited_after_disconnect);
  if (v.killed) CHECK(offender_exit->signal == SIGKILL);
  CHECK(offender_exit->reason.find("protocol error") != std::string::npos);
  REQUIRE(slot_of.count(4) == 1);
  CHECK(slot_of[4] == 0);
  CHECK(slot_of.count(5) == 0);
  CHECK(pongs == std::set<std::string>{"pong:2", "pong:3", "pong:4"});
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE(
    "A worker that breaks the protocol and carries on is killed before it sees its channel "
    "close",
    "[messaging]") {
  // The master calls on_error, then kills the worker. If it closed the channel first, a worker
  // that goes on serving would see EOF and exit 0 on its own — a clean exit that RestartOnCrash
  // does not replace. on_error waits (up to a second) for that exit to make the race certain:
  // the worker must still be running, since its channel must still be open.
  std::string how = GENERATE(as<std::string>{}, "bad magic then carry on", "poison");
  INFO("violation: " << how);
  std::size_t fds_before = count_open_fds();
  bool exited_before_kill = false, timed_out = false;
  std::vector<std::error_code> errors;
  std::optional<ExitInfo> offender_exit;
  std::optional<std::size_t> replacement_slot;
  {
    Options opts = options(1);
    opts.log = [](const prefork::LogRecord&) {};
    MsgCluster<> cluster(std::move(opts));
    cluster.on_fork([&](WorkerT& w) {
      if (w.id() == 2) replacement_slot = w.slot();
    });
    cluster.on_online([&](WorkerT& w) {
      if (w.id() == 1) {
        w.send(how == "poison" ? "poison please" : "garbage:" + how);
      } else {
        cluster.shutdown();
      }
    });
    cluster.on_error([&](WorkerT& w, std::error_code ec) {
      errors.push_back(ec);
      int fd = pidfd_open(w.pid());
      if (fd >= 0) {
        exited_before_kill = wait_pidfd(fd, Clock::now() + 1s);
        ::close(fd);
      }
    });
    cluster.on_exit([&](WorkerT& w, const ExitInfo& e) {
      if (w.id() != 1) return;
      offender_exit = e;
      cluster.master().loop().post([&] {
        if (cluster.workers().empty()) cluster.shutdown();  // no replacement is coming
      });
    });
    arm_watchdog(cluster, timed_out);
    CHECK(cluster.run() == 0);
  }
  REQUIRE_FALSE(timed_out);
  REQUIRE(errors.size() == 1);
  CHECK(errors[0].category() == prefork::error_category());
  CHECK_FALSE(exited_before_kill);
  REQUIRE(offender_exit.has_value());
  CHECK(offender_exit->signal == SIGKILL);
  CHECK(offender_exit->exit_code == -1);
  CHECK(replacement_slot == std::optional<std::size_t>(0));
  CHECK(count_open_fds() == fds_before);
}
