// The master's store service (include/prefork/master/store_service.hpp), without forking: a
// record put in a worker table by hand, with a real channel over a socketpair whose far end
// sends store operations as a worker does.
#include <catch2/catch.hpp>

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <system_error>
#include <vector>

#include <prefork/channel.hpp>
#include <prefork/codec.hpp>
#include <prefork/event_loop.hpp>
#include <prefork/options.hpp>
#include <prefork/store.hpp>
#include <prefork/master/log.hpp>
#include <prefork/master/store_service.hpp>
#include <prefork/master/worker_table.hpp>

#include "support/loop.hpp"

using prefork::Channel;
using prefork::EventLoop;
using prefork::Frame;
using prefork::FrameKind;
using prefork::Options;
using prefork::StringCodec;
using prefork_test::run_until;
using Record = prefork::detail::WorkerRecord<StringCodec>;
using Table = prefork::detail::WorkerTable<StringCodec>;

namespace {

constexpr std::size_t kValue = 16 * 1024;

// One worker's record, its channel's far end, and what went each way.
struct Fixture {
  EventLoop loop;
  Options opts;
  Table table;
  prefork::detail::MasterLog log{opts};
  prefork::detail::StoreService<StringCodec> service{
      loop, opts, table, log, {[] { return pid_t{4242}; }}};
  prefork::MemoryStore<>& store = service.use(prefork::MemoryStore<>(opts.store_limits));
  std::unique_ptr<Channel> peer;                // the worker's end
  std::vector<std::uint64_t> served;            // tags of the operations the master read
  std::vector<prefork::StoreReply> replies;
  std::vector<std::uint64_t> reply_tags;

  Fixture() {
    opts.store_snapshot = "held.snapshot";  // a hold needs one (never written here)
    opts.max_queued_bytes = 64 * 1024;
    std::size_t slot = table.add_slot();
    unsigned id = table.next_id();
    table.use_id(id);
    auto r = std::make_unique<Record>(loop, opts, id, slot);
    auto [mine, theirs] = prefork::make_channel_pair();
    r->channel = std::make_unique<Channel>(loop, std::move(mine));
    peer = std::make_unique<Channel>(loop, std::move(theirs));
    table.slot(slot).worker_id = id;
    Record& w = table.insert(std::move(r));
    w.channel->on_frame([this, &w](Frame&& f) {
      served.push_back(f.tag);
      service.serve(w, f);
    });
    peer->on_frame([this](Frame&& f) {
      std::error_code ec;
      auto reply = prefork::decode_reply(f.payload, ec);
      REQUIRE(reply);
      replies.push_back(*reply);
      reply_tags.push_back(f.tag);
    });
  }

  // Ten sets of kValue bytes, tags 0..9, "k0".."k9".
  void send_sets() {
    for (std::uint64_t i = 0; i < 10; ++i) {
      prefork::StoreRequest r;
      r.op = prefork::StoreOp::set;
      r.key = "k" + std::to_string(i);
      r.value = std::string(kValue, 'v');
      REQUIRE_FALSE(peer->send(FrameKind::store, prefork::encode(r), i));
    }
  }

  void settle() {
    for (int i = 0; i < 3; ++i) loop.run_once(0);
  }
};

}  // namespace

TEST_CASE("Held operations past max_queued_bytes stop the worker being read until the hold "
          "ends, then all are applied and answered in order",
          "[master_store_service]") {
  Fixture f;
  f.service.hold();
  f.send_sets();
  // Four sets of 16 KiB, with their keys, are just past 64 KiB: the fifth is not read.
  REQUIRE(run_until(f.loop, [&] { return f.served.size() == 4; }));
  f.settle();
  CHECK(f.served.size() == 4);
  CHECK(f.replies.empty());

  f.service.release(false);  // the upgrade failed: this master keeps the store
  REQUIRE(run_until(f.loop, [&] { return f.replies.size() == 10; }));
  for (std::uint64_t i = 0; i < 10; ++i) {
    CHECK(f.reply_tags[i] == i);
    CHECK(f.replies[i].error == prefork::store_errc{});
    CHECK(f.store.get("k" + std::to_string(i)).value_or("").size() == kValue);
  }
}

TEST_CASE("Once the store is handed over, held and later operations fail with handed_over",
          "[master_store_service]") {
  Fixture f;
  f.service.hold();
  f.send_sets();
  REQUIRE(run_until(f.loop, [&] { return f.served.size() == 4; }));
  f.service.release(true);
  REQUIRE(run_until(f.loop, [&] { return f.replies.size() == 10; }));
  for (auto& r : f.replies) CHECK(r.error == prefork::store_errc::handed_over);
  CHECK_FALSE(f.store.get("k0"));
}
