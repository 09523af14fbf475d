// The master's application callbacks (master/events.hpp) without processes: emit() catches an
// exception from a callback, keeps the first (rethrown once at the end of run()) and asks the
// master to stop once; the setters' overloads adapt what they are given.
#include <prefork/master/events.hpp>

#include <catch2/catch.hpp>

#include <stdexcept>
#include <string>
#include <vector>

#include "support/master_parts.hpp"

namespace {

// MasterEvents as the Master sees it (emit and the fields are protected), with fake hooks.
struct Probe : prefork::detail::MasterEvents<prefork::StringCodec> {
  Probe() {
    hooks.log = [this](prefork::LogLevel, std::string_view event, const std::string& m) {
      logged.push_back(std::string(event) + ": " + m);
    };
    hooks.stop = [this] { ++stops; };
    hooks.addresses = [this]() -> const std::vector<std::string>& { return addresses; };
  }
  using MasterEvents::emit;
  using MasterEvents::on_errored_;
  using MasterEvents::on_listening_;
  using MasterEvents::on_reload_done_;
  using MasterEvents::rethrow_failure;

  std::vector<std::string> logged;
  int stops = 0;
  std::vector<std::string> addresses{"127.0.0.1:8080"};
};

}  // namespace

TEST_CASE("emit keeps the first exception from a callback and asks for one stop") {
  Probe p;
  int calls = 0;
  p.on_errored([&](std::size_t slot, const prefork::ExitInfo&) {
    ++calls;
    throw std::runtime_error("boom " + std::to_string(slot));
  });
  CHECK_NOTHROW(p.emit(p.on_errored_, std::size_t{1}, prefork::ExitInfo{}));
  CHECK_NOTHROW(p.emit(p.on_errored_, std::size_t{2}, prefork::ExitInfo{}));
  CHECK(calls == 2);
  CHECK(p.stops == 1);
  REQUIRE(p.logged.size() == 2);
  CHECK_THAT(p.logged[0], Catch::Contains("exception in a master callback: boom 1; shutting down"));
  CHECK_THAT(p.logged[1], Catch::Contains("another exception in a master callback: boom 2"));
  CHECK_THROWS_WITH(p.rethrow_failure(), "boom 1");
  CHECK_NOTHROW(p.rethrow_failure());  // kept once
}

TEST_CASE("emit without a callback does nothing") {
  Probe p;
  CHECK_NOTHROW(p.emit(p.on_errored_, std::size_t{0}, prefork::ExitInfo{}));
  CHECK(p.stops == 0);
  CHECK(p.logged.empty());
  CHECK_NOTHROW(p.rethrow_failure());
}

TEST_CASE("on_listening and on_reload_done take either signature") {
  Probe p;
  prefork_test::MasterParts t(1);
  auto& w = t.add(0);
  std::vector<std::string> seen;
  p.on_listening([&](prefork::Worker<prefork::StringCodec>&, const std::vector<std::string>& a) {
    seen = a;
  });
  p.emit(p.on_listening_, w.handle);
  CHECK(seen == p.addresses);

  bool ok = false;
  p.on_reload_done([&](bool b) { ok = b; });
  prefork::ReloadReport report;
  report.ok = true;
  p.emit(p.on_reload_done_, report);
  CHECK(ok);
}
