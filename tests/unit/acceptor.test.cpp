// The one accept loop (include/prefork/detail/acceptor.hpp) on a real listening socket and a
// real EventLoop: connections with their peer address, a batch ended by its owner, and the pause
// at a full descriptor table, which re-arms from its timer and is logged once per episode.
#include <catch2/catch.hpp>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <vector>

#include <prefork/detail/acceptor.hpp>
#include <prefork/event_loop.hpp>

#include "support/descriptors.hpp"
#include "support/loop.hpp"

using namespace std::chrono_literals;
using prefork::EventLoop;
using prefork::UniqueFd;
using prefork::detail::AcceptPause;
using prefork::detail::Acceptor;
using prefork::detail::SocketAddress;
using prefork_test::FdLeakCheck;
using prefork_test::run_until;

namespace {

UniqueFd listen_loopback() {
  UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  REQUIRE(fd);
  sockaddr_in in{};
  in.sin_family = AF_INET;
  in.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::bind(fd.get(), reinterpret_cast<const sockaddr*>(&in), sizeof in) == 0);
  REQUIRE(::listen(fd.get(), 64) == 0);
  return fd;
}

// A blocking client connected to `listener` (the kernel completes the handshake from the
// backlog, before anyone accepts).
UniqueFd connect_to(int listener) {
  sockaddr_in in{};
  socklen_t len = sizeof in;
  REQUIRE(::getsockname(listener, reinterpret_cast<sockaddr*>(&in), &len) == 0);
  UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  REQUIRE(fd);
  REQUIRE(::connect(fd.get(), reinterpret_cast<const sockaddr*>(&in), len) == 0);
  return fd;
}

std::uint16_t port_of(const sockaddr_in& in) { return ntohs(in.sin_port); }

// One listener on a loop, accepted through an Acceptor whose hooks count what they were asked.
struct Fixture {
  explicit Fixture(AcceptPause pause)
      : acceptor(loop, pause,
                 {.stop = [this] {
                    ++stops;
                    loop.unwatch(listener.get());
                  },
                  .resume = [this] {
                    ++resumes;
                    watch();
                  },
                  .log = [this](int err) { logged.push_back(err); }}) {
    watch();
  }
  Fixture(const Fixture&) = delete;
  Fixture& operator=(const Fixture&) = delete;
  ~Fixture() { acceptor.cancel(); }

  void watch() {
    loop.watch(listener.get(), EventLoop::readable, [this](std::uint32_t) {
      acceptor.accept(listener.get(), [this] { return more; },
                      [this](UniqueFd fd, const SocketAddress& peer) {
                        accepted.push_back(std::move(fd));
                        peers.push_back(peer);
                        return accepted.size() % stop_every != 0;
                      });
    });
  }
  bool watching() const { return const_cast<EventLoop&>(loop).watching(listener.get()); }

  EventLoop loop;
  UniqueFd listener = listen_loopback();
  Acceptor acceptor;
  std::vector<UniqueFd> accepted;
  std::vector<SocketAddress> peers;
  std::vector<int> logged;
  int stops = 0;
  int resumes = 0;
  bool more = true;
  std::size_t stop_every = 1000;
};

// Lowers the soft descriptor limit to the lowest free descriptor number, so that the next
// descriptor the process creates fails with EMFILE; the old limit returns when it is destroyed.
class FullTable {
 public:
  FullTable() {
    REQUIRE(::getrlimit(RLIMIT_NOFILE, &old_) == 0);
    int lowest = ::fcntl(0, F_DUPFD_CLOEXEC, 0);
    REQUIRE(lowest >= 0);
    ::close(lowest);
    rlimit tight = old_;
    tight.rlim_cur = static_cast<rlim_t>(lowest);
    REQUIRE(::setrlimit(RLIMIT_NOFILE, &tight) == 0);
  }
  FullTable(const FullTable&) = delete;
  FullTable& operator=(const FullTable&) = delete;
  ~FullTable() { free(); }
  void free() {
    if (old_.rlim_cur != 0) ::setrlimit(RLIMIT_NOFILE, &old_);
    old_.rlim_cur = 0;
  }

 private:
  rlimit old_{};
};

}  // namespace

TEST_CASE("An Acceptor hands over each connection, non-blocking and close-on-exec, with its peer",
          "[acceptor]") {
  FdLeakCheck leaks;
  Fixture f({});
  std::vector<UniqueFd> clients;
  for (int i = 0; i < 3; ++i) clients.push_back(connect_to(f.listener.get()));
  REQUIRE(run_until(f.loop, [&] { return f.accepted.size() == 3; }));
  for (std::size_t i = 0; i < 3; ++i) {
    CHECK((::fcntl(f.accepted[i].get(), F_GETFL) & O_NONBLOCK) != 0);
    CHECK((::fcntl(f.accepted[i].get(), F_GETFD) & FD_CLOEXEC) != 0);
    REQUIRE(f.peers[i].family() == AF_INET);
    sockaddr_in local{};
    socklen_t len = sizeof local;
    REQUIRE(::getsockname(clients[i].get(), reinterpret_cast<sockaddr*>(&local), &len) == 0);
    sockaddr_in peer{};
    std::memcpy(&peer, &f.peers[i].storage, sizeof peer);
    CHECK(port_of(peer) == port_of(local));
  }
  CHECK(f.logged.empty());
  CHECK(f.stops == 0);
}

TEST_CASE("An Acceptor's batch ends when its owner says so and takes nothing while more() is false",
          "[acceptor]") {
  FdLeakCheck leaks;
  Fixture f({});
  f.stop_every = 2;
  std::vector<UniqueFd> clients;
  for (int i = 0; i < 4; ++i) clients.push_back(connect_to(f.listener.get()));
  f.loop.run_once(1000);  // the listener is readable: one batch, ended after the second
  CHECK(f.accepted.size() == 2);
  REQUIRE(run_until(f.loop, [&] { return f.accepted.size() == 4; }));

  f.more = false;
  clients.push_back(connect_to(f.listener.get()));
  f.loop.run_once(1000);
  CHECK(f.accepted.size() == 4);
  f.more = true;
  REQUIRE(run_until(f.loop, [&] { return f.accepted.size() == 5; }));
  CHECK(f.stops == 0);
}

TEST_CASE("A full descriptor table pauses an Acceptor, which resumes once descriptors are free",
          "[acceptor]") {
  FdLeakCheck leaks;
  Fixture f({.length = 10ms});
  auto client = connect_to(f.listener.get());
  {
    FullTable full;
    f.loop.run_once(1000);  // the listener is readable: accept4 fails and accepting pauses
    const bool paused = f.acceptor.paused() && !f.watching();
    // The timer re-arms the listener; it is still full, so the acceptor pauses again.
    const bool paused_again = run_until(f.loop, [&] { return f.stops >= 3; });
    full.free();
    CHECK(paused);
    CHECK(paused_again);
    CHECK(f.resumes >= 2);
  }
  CHECK(f.accepted.empty());
  REQUIRE(f.logged.size() == 1);  // one episode, however many pauses
  CHECK(f.logged[0] == EMFILE);
  REQUIRE(run_until(f.loop, [&] { return f.accepted.size() == 1; }));
  CHECK(f.watching());
  CHECK_FALSE(f.acceptor.paused());

  // The accepted connection ended the episode: the next failure is a new one.
  auto second = connect_to(f.listener.get());
  {
    FullTable full;
    const bool paused = run_until(f.loop, [&] { return f.acceptor.paused(); });
    full.free();
    CHECK(paused);
  }
  CHECK(f.logged.size() == 2);
  REQUIRE(run_until(f.loop, [&] { return f.accepted.size() == 2; }));
}

TEST_CASE("With a quiet period, an episode outlives the accepts between its failures",
          "[acceptor]") {
  FdLeakCheck leaks;
  Fixture f({.length = 10ms, .quiet = std::chrono::hours(1)});
  for (int round = 1; round <= 2; ++round) {
    auto client = connect_to(f.listener.get());
    {
      FullTable full;
      const bool paused = run_until(f.loop, [&] { return f.acceptor.paused(); });
      full.free();
      CHECK(paused);
    }
    const auto want = static_cast<std::size_t>(round);
    REQUIRE(run_until(f.loop, [&] { return f.accepted.size() == want; }));
  }
  CHECK(f.logged.size() == 1);
  CHECK(f.stops == 2);
}

TEST_CASE("cancel() ends a pause without resuming", "[acceptor]") {
  FdLeakCheck leaks;
  Fixture f({.length = 10ms});
  auto client = connect_to(f.listener.get());
  {
    FullTable full;
    f.loop.run_once(1000);
    full.free();
  }
  REQUIRE(f.acceptor.paused());
  f.acceptor.cancel();
  CHECK_FALSE(f.acceptor.paused());
  // Timers fire in deadline order: had the pause's 10 ms timer survived, it would fire first.
  bool later = false;
  f.loop.after(50ms, [&] { later = true; });
  REQUIRE(run_until(f.loop, [&] { return later; }));
  CHECK(f.resumes == 0);
  CHECK_FALSE(f.watching());
}
