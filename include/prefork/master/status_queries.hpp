// The master's status: the slots' and live workers' part of a ClusterStatus, read from the
// worker table, and the status queries that first ask every connected worker for fresh
// counters (FrameKind::stats) and answer once all have reported or the timeout passed.
#ifndef PREFORK_MASTER_STATUS_QUERIES_HPP
#define PREFORK_MASTER_STATUS_QUERIES_HPP

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include <prefork/version.hpp>
#include <prefork/channel.hpp>
#include <prefork/codec.hpp>
#include <prefork/detail/process.hpp>
#include <prefork/event_loop.hpp>
#include <prefork/options.hpp>
#include <prefork/status.hpp>
#include <prefork/master/worker_table.hpp>

namespace prefork::detail {

/// Fills in what the table knows of `st`: the slots wanted, restarts and errored slots, and
/// each live worker with the counters it last reported and its resident memory (/proc).
template <MessageCodec Codec>
void describe_workers(const WorkerTable<Codec>& table, Clock::time_point now, ClusterStatus& st) {
  st.workers_wanted = table.slot_count();
  for (std::size_t i = 0; i < table.slot_count(); ++i) {
    st.restarts += table.slot(i).restarts;
    if (table.slot(i).errored) st.errored_slots.push_back(i);
  }
  for (auto& [id, w] : table.live()) {
    WorkerStatus ws;
    ws.id = id;
    ws.slot = w->slot;
    ws.pid = w->pid;
    ws.state = w->state;
    ws.draining = w->leaving();
    ws.uptime = std::chrono::duration_cast<std::chrono::milliseconds>(now - w->started);
    ws.restarts = w->restarts;
    ws.connections = w->reported_connections;
    ws.connections_total = w->counters.connections_total;
    ws.requests = w->counters.requests;
    ws.rss = resident_bytes(w->pid);
    st.workers.push_back(ws);
  }
}

/// What a status query needs from the master: the status as it is when the query ends.
struct StatusQueryHooks {
  std::function<ClusterStatus()> status;
};

template <MessageCodec Codec>
class StatusQueries {
 public:
  StatusQueries(EventLoop& loop, WorkerTable<Codec>& table, StatusQueryHooks hooks)
      : loop_(loop), table_(table), hooks_(std::move(hooks)) {}
  StatusQueries(const StatusQueries&) = delete;
  StatusQueries& operator=(const StatusQueries&) = delete;

  /// Asks every connected worker for its counters; cb(status) once all have answered or
  /// `timeout` passed. cb runs on the loop, never from inside this call.
  void query(std::function<void(const ClusterStatus&)> cb, Clock::duration timeout) {
    auto q = std::make_shared<Query>();
    q->done = std::move(cb);
    for (auto& [id, w] : table_.live())
      if (w->is_connected() && !w->channel->send(FrameKind::stats, {})) q->waiting.push_back(id);
    queries_.push_back(q);
    q->timer = loop_.after(timeout, [this, q] {
      q->timer = 0;
      finish(q);
    }, false);
    if (q->waiting.empty()) loop_.post([this, q] { finish(q); });
  }

  /// Worker `id` reported its counters, or will never (it disconnected).
  void answered(unsigned id) {
    if (queries_.empty()) return;
    std::vector<std::shared_ptr<Query>> finished;
    for (auto& q : queries_) {
      std::erase(q->waiting, id);
      if (q->waiting.empty()) finished.push_back(q);
    }
    for (auto& q : finished) finish(q);
  }

  /// Queries not answered yet.
  std::size_t pending() const noexcept { return queries_.size(); }

 private:
  // A status query: the workers still to report their counters.
  struct Query {
    std::vector<unsigned> waiting;
    std::function<void(const ClusterStatus&)> done;
    EventLoop::TimerId timer = 0;
  };

  void finish(const std::shared_ptr<Query>& q) {
    auto it = std::find(queries_.begin(), queries_.end(), q);
    if (it == queries_.end()) return;  // finished already
    queries_.erase(it);
    if (q->timer) loop_.cancel(q->timer);
    q->timer = 0;
    if (q->done) q->done(hooks_.status());
  }

  EventLoop& loop_;
  WorkerTable<Codec>& table_;
  StatusQueryHooks hooks_;
  std::vector<std::shared_ptr<Query>> queries_;
};

}  // namespace prefork::detail

#endif  // PREFORK_MASTER_STATUS_QUERIES_HPP
