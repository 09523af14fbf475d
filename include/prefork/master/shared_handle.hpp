// Kernel dispatch (Node's shared_handle.js), the Master's Dispatch for a KernelDispatch policy
// (SharedAccept, ReusePort): every worker accepts from its own copies of the listening sockets,
// so the master accepts nothing and holds no connection; it only hands the sockets over.
#ifndef PREFORK_MASTER_SHARED_HANDLE_HPP
#define PREFORK_MASTER_SHARED_HANDLE_HPP

#include <fcntl.h>

#include <cerrno>
#include <cstddef>
#include <cstring>
#include <string>
#include <vector>

#include <prefork/version.hpp>
#include <prefork/channel.hpp>
#include <prefork/codec.hpp>
#include <prefork/detail/unique_fd.hpp>
#include <prefork/event_loop.hpp>
#include <prefork/log.hpp>
#include <prefork/master/log.hpp>
#include <prefork/master/phase.hpp>
#include <prefork/master/worker_record.hpp>
#include <prefork/master/worker_table.hpp>

namespace prefork::detail {

/// The same interface as RoundRobinHandle; everything but hand_listeners has nothing to do,
/// since no connection passes through the master.
template <MessageCodec Codec, class Balance>
class SharedHandle {
 public:
  using Record = WorkerRecord<Codec>;

  /// The same constructor as RoundRobinHandle, so that the Master builds either alike; only
  /// the log is used.
  SharedHandle(EventLoop&, WorkerTable<Codec>&, const MasterLog& log, const Phase&, Balance&,
               const std::vector<UniqueFd>&)
      : log_(log) {}
  SharedHandle(const SharedHandle&) = delete;
  SharedHandle& operator=(const SharedHandle&) = delete;

  void start() {}
  void stop() {}
  void flush() {}
  void rebalance() {}
  void worker_ready(Record&) {}
  void acknowledged(Record&, std::size_t, Clock::time_point) {}
  void declined(Record&, std::size_t, Clock::time_point) {}
  void worker_gone(Record&) {}
  void descriptors(std::vector<int>&) const {}

  /// The worker gets its own copies of `listeners`: the shared sockets, or its slot's
  /// ReusePort set (the listeners part chooses). A failed dup sends nothing (logged).
  void hand_listeners(Record& w, const std::vector<UniqueFd>& listeners) {
    std::vector<UniqueFd> dups;
    for (auto& l : listeners) {
      int d = ::fcntl(l.get(), F_DUPFD_CLOEXEC, 0);
      if (d < 0) {
        log_(LogLevel::warning, "bind",
             "dup of a listening socket failed: " + std::string(std::strerror(errno)));
        return;
      }
      dups.emplace_back(d);
    }
    w.channel->send(FrameKind::handles, {}, 0, std::move(dups));
  }

 private:
  const MasterLog& log_;
};

}  // namespace prefork::detail

#endif  // PREFORK_MASTER_SHARED_HANDLE_HPP
