// The master's side of the shared store: the backend (MemoryStore unless use_store() replaced it),
// the answers to the workers' store frames, the hold on them while an upgrade's new master
// starts from the snapshot, the snapshot's load and save, and the sweep of expired keys.
#ifndef PREFORK_MASTER_STORE_SERVICE_HPP
#define PREFORK_MASTER_STORE_SERVICE_HPP

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <prefork/version.hpp>
#include <prefork/channel.hpp>
#include <prefork/codec.hpp>
#include <prefork/event_loop.hpp>
#include <prefork/log.hpp>
#include <prefork/options.hpp>
#include <prefork/store.hpp>
#include <prefork/store_client.hpp>
#include <prefork/master/log.hpp>
#include <prefork/master/worker_table.hpp>

namespace prefork::detail {

/// What the store service asks the master.
struct StoreServiceHooks {
  std::function<pid_t()> new_master;  // the upgrade's new master, which has the store now
};

template <MessageCodec Codec>
class StoreService {
 public:
  using Record = WorkerRecord<Codec>;

  StoreService(EventLoop& loop, const Options& opts, WorkerTable<Codec>& table,
               const MasterLog& log, StoreServiceHooks hooks)
      : loop_(loop), opts_(opts), table_(table), log_(log), hooks_(std::move(hooks)) {}
  StoreService(const StoreService&) = delete;
  StoreService& operator=(const StoreService&) = delete;

  /// Sets the backend (the master's constructor sets a MemoryStore); returns it.
  template <Store S>
  S& use(S store) {
    auto host = std::make_unique<StoreHostOf<S>>(std::move(store));
    S& s = host->store();
    store_ = std::move(host);
    return s;
  }

  // One operation on the shared store for `w`. Always answered (a store_reply frame goes out
  // even when the channel's queue is full), with the store's error if it failed; during an
  // upgrade, once the store has been handed over (see state_).
  void serve(Record& w, const Frame& f) {
    if (state_ == State::held) {
      held_.push_back({w.id, f.tag, f.payload});
      // Held operations count against max_queued_bytes a worker, as its answers do: past it,
      // the worker is not read until release() (its own queue fills, then its store
      // operations fail with queue_full), instead of growing this master until the upgrade
      // ends.
      std::size_t& bytes = held_bytes_[w.id];
      bytes += f.payload.size();
      if (bytes > opts_.max_queued_bytes && w.channel) w.channel->hold_reading(true);
      return;
    }
    answer(w, f.tag, f.payload);
  }

  /// An upgrade saved the snapshot its new master loads: operations wait, unapplied, until
  /// release(). Nothing is held without a snapshot (the new master starts empty then).
  void hold() {
    if (!opts_.store_snapshot.empty()) state_ = State::held;
  }

  // The end of an upgrade's hold on the store (state_): the operations held are applied
  // in the order they came (the upgrade failed: this master keeps the store), or refused with
  // store_errc::handed_over, as every later one is (the new master has the store now; a worker
  // of this master is draining and never reaches it). Either way each is answered once.
  void release(bool handed_over) {
    if (state_ != State::held) return;
    state_ = handed_over ? State::handed_over : State::serving;
    for (auto& op : std::exchange(held_, {}))
      if (Record* w = table_.find(op.worker)) answer(*w, op.tag, op.payload);
    // The workers no longer read are read again from the loop, not from inside the upgrade's
    // end (lifting a hold delivers their frames at once).
    std::vector<unsigned> workers;
    for (auto& [id, bytes] : std::exchange(held_bytes_, {}))
      if (bytes > opts_.max_queued_bytes) workers.push_back(id);
    if (workers.empty()) return;
    loop_.post([this, workers = std::move(workers)] {
      for (unsigned id : workers)
        if (Record* w = table_.find(id); w && w->channel) w->channel->hold_reading(false);
    });
  }

  /// Loads Options::store_snapshot if it exists. Throws std::system_error if it cannot.
  void load() {
    if (opts_.store_snapshot.empty()) return;
    std::error_code ec = store_->load(opts_.store_snapshot);
    if (ec == std::errc::no_such_file_or_directory) return;
    if (ec)
      throw std::system_error(ec, "prefork: load store snapshot " + opts_.store_snapshot +
                                      " (fix or move the file; it is left as it is)");
    log_(LogLevel::info, "store", "store loaded from " + opts_.store_snapshot);
  }

  /// Saves Options::store_snapshot, if set; false (logged) if that failed.
  bool save() {
    if (opts_.store_snapshot.empty()) return true;
    std::error_code ec = store_->save(opts_.store_snapshot);
    if (!ec) return true;
    log_(LogLevel::error, "store",
         "store snapshot " + opts_.store_snapshot + " not saved: " + ec.message());
    return false;
  }

  /// Sweeps expired keys once a second from now on.
  void start_sweeping() {
    loop_.every(std::chrono::seconds(1), [this] { store_->sweep(); }, false);
  }

 private:
  void answer(Record& w, std::uint64_t tag, std::string_view payload) {
    std::error_code ec;
    std::optional<StoreRequest> request = decode_request(payload, ec);
    StoreReply reply;
    if (state_ == State::handed_over) {
      reply.error = store_errc::handed_over;
      reply.message = "the store is now the new master's (pid " +
                      std::to_string(hooks_.new_master()) + "); nothing was applied";
    } else if (request) {
      reply = store_->apply(*request);
    } else {
      reply.error = store_errc::bad_request;
      reply.message = ec.message();
    }
    std::string bytes = encode(reply);
    if (bytes.size() > opts_.max_message_size) {
      reply = StoreReply{};
      reply.error = store_errc::value_too_long;
      reply.message = "store reply of " + std::to_string(bytes.size()) +
                      " bytes exceeds max_message_size; ask for fewer keys";
      bytes = encode(reply);
    }
    if (w.is_connected()) w.channel->send(FrameKind::store_reply, std::move(bytes), tag);
  }

  EventLoop& loop_;
  const Options& opts_;
  WorkerTable<Codec>& table_;
  const MasterLog& log_;
  StoreServiceHooks hooks_;
  std::unique_ptr<StoreHost> store_;
  // From the snapshot an upgrade's new master loads until the upgrade ends, store
  // operations wait here, unapplied, so that this store never changes behind the snapshot.
  enum class State { serving, held, handed_over };
  struct HeldOp {
    unsigned worker;
    std::uint64_t tag;
    std::string payload;
  };
  State state_ = State::serving;
  std::vector<HeldOp> held_;
  std::map<unsigned, std::size_t> held_bytes_;  // payload bytes held, by worker id
};

}  // namespace prefork::detail

#endif  // PREFORK_MASTER_STORE_SERVICE_HPP
