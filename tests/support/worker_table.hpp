// A master's worker table without processes, for the unit tests of the master's parts: records
// inserted by hand (pid -1, no pidfd, no channel) into slots, the way the spawner inserts them.
#ifndef PREFORK_TESTS_SUPPORT_WORKER_TABLE_HPP
#define PREFORK_TESTS_SUPPORT_WORKER_TABLE_HPP

#include <cstddef>
#include <memory>

#include <prefork/codec.hpp>
#include <prefork/event_loop.hpp>
#include <prefork/master/log.hpp>
#include <prefork/master/phase.hpp>
#include <prefork/master/worker_record.hpp>
#include <prefork/master/worker_table.hpp>
#include <prefork/options.hpp>

namespace prefork_test {

struct FakeTable {
  using Codec = prefork::StringCodec;
  using Record = prefork::detail::WorkerRecord<Codec>;

  explicit FakeTable(std::size_t slots) {
    opts.log = [](const prefork::LogRecord&) {};  // quiet
    table.resize_slots(slots);
  }

  /// A new record that owns `slot` now (as a spawn, or a replacement, makes it).
  Record& add(std::size_t slot) {
    unsigned id = table.next_id();
    table.use_id(id);
    table.slot(slot).worker_id = id;
    return table.insert(std::make_unique<Record>(loop, opts, id, slot));
  }

  prefork::EventLoop loop;
  prefork::Options opts;
  prefork::detail::WorkerTable<Codec> table;
  prefork::detail::MasterLog log{opts};
  prefork::detail::Phase phase = prefork::detail::Phase::serving;
};

}  // namespace prefork_test

#endif  // PREFORK_TESTS_SUPPORT_WORKER_TABLE_HPP
