// The master's worker table (Node's cluster.workers, plus what Node keeps implicitly): the
// slots (Options::workers, changed by scale()), the live workers' records by id, and the ids
// handed out so far. It decides nothing; the master's parts read and change it.
#ifndef PREFORK_MASTER_WORKER_TABLE_HPP
#define PREFORK_MASTER_WORKER_TABLE_HPP

#include <cstddef>
#include <map>
#include <memory>
#include <vector>

#include <prefork/version.hpp>
#include <prefork/codec.hpp>
#include <prefork/event_loop.hpp>
#include <prefork/master/worker_record.hpp>
#include <prefork/worker_handle.hpp>

namespace prefork::detail {

/// A place for one worker: a crashed or replaced worker's successor takes its predecessor's
/// slot, so that slot-keyed state (IpHash, ReusePort sockets, restart backoff) follows it.
struct Slot {
  unsigned worker_id = 0;  // the worker that owns the slot now, 0 if none
  EventLoop::TimerId restart_timer = 0;
  bool errored = false;
  unsigned restarts = 0;  // workers started in the slot after its first
  bool used = false;      // a worker was ever started in it
};

template <MessageCodec Codec>
class WorkerTable {
 public:
  using Record = WorkerRecord<Codec>;
  using Live = std::map<unsigned, std::unique_ptr<Record>>;

  std::size_t slot_count() const noexcept { return slots_.size(); }
  Slot& slot(std::size_t i) noexcept { return slots_[i]; }
  const Slot& slot(std::size_t i) const noexcept { return slots_[i]; }
  std::vector<Slot>& slots() noexcept { return slots_; }
  const std::vector<Slot>& slots() const noexcept { return slots_; }
  void resize_slots(std::size_t n) { slots_.resize(n); }
  std::size_t add_slot() {
    slots_.emplace_back();
    return slots_.size() - 1;
  }
  /// The worker is its slot's current one (not a replaced one, nor in a slot scaled away).
  bool owns_slot(const Record& w) const noexcept {
    return w.slot < slots_.size() && slots_[w.slot].worker_id == w.id;
  }
  /// The current worker of `slot`, or nullptr.
  Record* owner(const Slot& s) const { return s.worker_id ? find(s.worker_id) : nullptr; }

  /// Live workers (forked, not yet reaped) by id.
  const Live& live() const noexcept { return workers_; }
  bool empty() const noexcept { return workers_.empty(); }
  std::size_t size() const noexcept { return workers_.size(); }
  Record* find(unsigned id) const {
    auto it = workers_.find(id);
    return it == workers_.end() ? nullptr : it->second.get();
  }
  /// A copy of the live list, in id order: safe to walk while a step forks or reaps.
  std::vector<Record*> records() const {
    std::vector<Record*> v;
    for (auto& [id, w] : workers_) v.push_back(w.get());
    return v;
  }
  std::vector<Worker<Codec>*> handles() const {
    std::vector<Worker<Codec>*> v;
    for (auto& [id, w] : workers_) v.push_back(&w->handle);
    return v;
  }

  /// The id the next worker gets: 1, 2, 3... never reused (Node's worker.id). Taken by
  /// use_id() once its fork succeeded.
  unsigned next_id() const noexcept { return last_id_ + 1; }
  void use_id(unsigned id) noexcept { last_id_ = id; }

  Record& insert(std::unique_ptr<Record> r) {
    Record& w = *r;
    workers_.emplace(w.id, std::move(r));
    return w;
  }
  /// Removes a worker from the live list; the caller owns it until its callbacks are done.
  std::unique_ptr<Record> extract(unsigned id) {
    auto node = workers_.extract(id);
    return node ? std::move(node.mapped()) : nullptr;
  }

 private:
  std::vector<Slot> slots_;
  Live workers_;
  unsigned last_id_ = 0;
};

}  // namespace prefork::detail

#endif  // PREFORK_MASTER_WORKER_TABLE_HPP
