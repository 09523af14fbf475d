// What a unit test of one of the master's parts builds instead of a Master: a loop, options
// with a silent log, the log and phase the parts read, and a worker table whose records have
// no process (pid -1, no pidfd) and are put into their slots by hand.
#ifndef PREFORK_TESTS_SUPPORT_MASTER_PARTS_HPP
#define PREFORK_TESTS_SUPPORT_MASTER_PARTS_HPP

#include <cstddef>
#include <memory>

#include "prefork/codec.hpp"
#include "prefork/event_loop.hpp"
#include "prefork/log.hpp"
#include "prefork/master/log.hpp"
#include "prefork/master/phase.hpp"
#include "prefork/master/worker_record.hpp"
#include "prefork/master/worker_table.hpp"
#include "prefork/options.hpp"

namespace prefork_test {

struct MasterParts {
  using Codec = prefork::StringCodec;
  using Record = prefork::detail::WorkerRecord<Codec>;

  /// `slots` worker slots, all empty.
  explicit MasterParts(std::size_t slots = 0) {
    opts.log = [](const prefork::LogRecord&) {};  // quiet
    table.resize_slots(slots);
  }

  /// A new record that owns `slot` (the slot is added if needed), as the spawner leaves it
  /// after a fork, without the process: starting, no channel.
  Record& add(std::size_t slot) {
    if (table.slot_count() <= slot) table.resize_slots(slot + 1);
    unsigned id = table.next_id();
    table.use_id(id);
    table.slot(slot).worker_id = id;
    return table.insert(std::make_unique<Record>(loop, opts, id, slot));
  }

  prefork::EventLoop loop;
  prefork::Options opts;
  prefork::detail::MasterLog log{opts};
  prefork::detail::Phase phase = prefork::detail::Phase::serving;
  prefork::detail::WorkerTable<Codec> table;
};

}  // namespace prefork_test

#endif  // PREFORK_TESTS_SUPPORT_MASTER_PARTS_HPP
