// The master's systemd reporter (include/prefork/master/systemd_reporter.hpp), without forking:
// a Notifier aimed at a datagram socket this test reads back, records put in a worker table by
// hand, and fake hooks for what the rest of the master would say.
#include <catch2/catch.hpp>

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstddef>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <prefork/codec.hpp>
#include <prefork/detail/systemd.hpp>
#include <prefork/event_loop.hpp>
#include <prefork/options.hpp>
#include <prefork/master/phase.hpp>
#include <prefork/master/systemd_reporter.hpp>
#include <prefork/master/worker_table.hpp>

#include "support/temp_dir.hpp"

using prefork::EventLoop;
using prefork::Options;
using prefork::ReloadReport;
using prefork::StringCodec;
using prefork::UniqueFd;
using prefork::detail::Phase;
using prefork_test::TempDir;
using Record = prefork::detail::WorkerRecord<StringCodec>;
using Table = prefork::detail::WorkerTable<StringCodec>;

namespace {

// The service manager's end: a datagram socket at `dir`/notify, read without blocking.
struct Manager {
  TempDir dir{"prefork-systemd-reporter"};
  std::string path = dir.path + "/notify";
  UniqueFd fd;

  Manager() {
    fd.reset(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    sockaddr_un un{};
    un.sun_family = AF_UNIX;
    std::memcpy(un.sun_path, path.data(), path.size());
    REQUIRE(::bind(fd.get(), reinterpret_cast<sockaddr*>(&un), sizeof un) == 0);
  }
  // The next message sent (Notifier::notify has sent it before it returns), if any.
  std::optional<std::string> next() {
    char buf[4096];
    ssize_t n = ::recv(fd.get(), buf, sizeof buf, MSG_DONTWAIT);
    if (n < 0) return std::nullopt;
    return std::string(buf, static_cast<std::size_t>(n));
  }
};

struct Fixture {
  Manager manager;
  EventLoop loop;
  Options opts;
  Table table;
  Phase phase = Phase::serving;
  std::vector<std::string> addresses{"127.0.0.1:8080"};
  bool reloading = false, upgraded = false;
  prefork::detail::SystemdReporter<StringCodec> reporter{
      loop, table, phase,
      {[] { return true; }, [this]() -> const std::vector<std::string>& { return addresses; },
       [this] { return reloading; }, [this] { return upgraded; }}};

  Fixture() { reporter.use(prefork::detail::Notifier(manager.path)); }

  // A record owning its own new slot, not ready yet.
  Record& add() {
    std::size_t slot = table.add_slot();
    unsigned id = table.next_id();
    table.use_id(id);
    table.slot(slot).worker_id = id;
    return table.insert(std::make_unique<Record>(loop, opts, id, slot));
  }
};

}  // namespace

TEST_CASE("READY=1 goes out once every slot has a ready worker, then STATUS= updates",
          "[master_systemd_reporter]") {
  Fixture f;
  Record& a = f.add();
  Record& b = f.add();
  a.became_ready();
  f.reporter.ready();
  CHECK_FALSE(f.manager.next());  // slot 1 not ready yet
  b.became_ready();
  f.reporter.ready();
  CHECK(f.manager.next() == "READY=1\nSTATUS=2 workers listening on 127.0.0.1:8080");
  b.plan_exit();  // a planned exit is not counted
  f.reporter.ready();
  CHECK(f.manager.next() == "STATUS=1 worker listening on 127.0.0.1:8080");
  f.reloading = true;  // a rolling restart says READY=1 itself when it ends
  f.reporter.ready();
  CHECK_FALSE(f.manager.next());
}

TEST_CASE("A master started by an upgrade says MAINPID= with its READY=1",
          "[master_systemd_reporter]") {
  Fixture f;
  f.upgraded = true;
  f.add().became_ready();
  f.reporter.ready();
  CHECK(f.manager.next() == "MAINPID=" + std::to_string(::getpid()) +
                                "\nREADY=1\nSTATUS=1 worker listening on 127.0.0.1:8080");
}

TEST_CASE("A rolling restart says RELOADING=1, then READY=1 with how it ended",
          "[master_systemd_reporter]") {
  Fixture f;
  f.add().became_ready();
  f.reporter.reloading(1);
  auto reloading = f.manager.next();
  REQUIRE(reloading);
  CHECK(reloading->starts_with("RELOADING=1\nMONOTONIC_USEC="));
  CHECK(reloading->ends_with("\nSTATUS=rolling restart: replacing 1 workers"));
  ReloadReport ok;
  ok.ok = true;
  ok.took = std::chrono::milliseconds(12);
  f.reporter.reloaded(ok);
  CHECK(f.manager.next() ==
        "READY=1\nSTATUS=1 worker listening on 127.0.0.1:8080; reloaded in 12 ms");
  ReloadReport failed;
  failed.reason = "replacement worker 3 (pid 9) exited with code 1 before it was ready";
  f.reporter.reloaded(failed);
  CHECK(f.manager.next() == "READY=1\nSTATUS=1 worker listening on 127.0.0.1:8080; rolling "
                            "restart stopped: " + failed.reason);
}

TEST_CASE("STOPPING=1 goes out once, and nothing of a reload after it",
          "[master_systemd_reporter]") {
  Fixture f;
  f.add();
  f.add();
  f.phase = Phase::shutting_down;
  f.reporter.stopping();
  CHECK(f.manager.next() == "STOPPING=1\nSTATUS=stopping: draining 2 workers");
  f.reporter.stopping();
  CHECK_FALSE(f.manager.next());
  f.reporter.reloaded(ReloadReport{});
  f.reporter.ready();
  CHECK_FALSE(f.manager.next());
}

TEST_CASE("After a hand-over the old master says neither STOPPING=1 nor READY=1",
          "[master_systemd_reporter]") {
  Fixture f;
  f.add().became_ready();
  f.reporter.handed_over_to(4321);
  CHECK(f.manager.next() == "MAINPID=4321\nSTATUS=handed over to new master pid 4321");
  f.phase = Phase::shutting_down_after_hand_over;
  f.reporter.stopping();
  f.reporter.ready();
  CHECK_FALSE(f.manager.next());
}

TEST_CASE("An upgrade's start and failure are told in STATUS=", "[master_systemd_reporter]") {
  Fixture f;
  f.add().became_ready();
  f.reporter.upgrade_started(77);
  CHECK(f.manager.next() ==
        "STATUS=upgrading: new master pid 77 starting; 1 worker listening on 127.0.0.1:8080");
  f.reporter.upgrade_failed();
  CHECK(f.manager.next() == "STATUS=upgrade failed; 1 worker listening on 127.0.0.1:8080");
  f.phase = Phase::shutting_down;
  f.reporter.upgrade_failed();
  CHECK_FALSE(f.manager.next());
}

TEST_CASE("Without NOTIFY_SOCKET the reporter is silent and hands no environment on",
          "[master_systemd_reporter]") {
  Fixture f;
  f.reporter.use(prefork::detail::Notifier());
  f.add().became_ready();
  f.reporter.ready();
  f.reporter.stopping();
  CHECK_FALSE(f.manager.next());
  CHECK(f.reporter.environment().empty());
}
