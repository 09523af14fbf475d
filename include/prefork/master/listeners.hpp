// The master's listening sockets: bound from Options::listen, inherited from an old master
// (upgrade) or passed by systemd (socket activation); shared by every worker, or one set per
// slot for a ReusePort policy. Their addresses as bound, and their socket files.
#ifndef PREFORK_MASTER_LISTENERS_HPP
#define PREFORK_MASTER_LISTENERS_HPP

#include <fcntl.h>

#include <cstddef>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include <prefork/version.hpp>
#include <prefork/balance/policy.hpp>
#include <prefork/codec.hpp>
#include <prefork/detail/socket.hpp>
#include <prefork/detail/syscall.hpp>
#include <prefork/detail/systemd.hpp>
#include <prefork/detail/unique_fd.hpp>
#include <prefork/detail/upgrade.hpp>
#include <prefork/log.hpp>
#include <prefork/options.hpp>
#include <prefork/master/log.hpp>
#include <prefork/master/upgrader.hpp>
#include <prefork/master/worker_table.hpp>

namespace prefork::detail {

template <MessageCodec Codec, class Balance>
class Listeners {
 public:
  Listeners(const Options& opts, const WorkerTable<Codec>& table, const MasterLog& log,
            Upgrader<Codec>& upgrader)
      : opts_(opts), table_(table), log_(log), upgrader_(upgrader) {}
  Listeners(const Listeners&) = delete;
  Listeners& operator=(const Listeners&) = delete;

  /// In the master's constructor, with Options::systemd: the sockets systemd passed. Throws
  /// std::runtime_error if what it passed cannot be read.
  void take_activated() {
    std::string activation_error;
    activated_ = take_activated_sockets(activation_error);
    if (!activation_error.empty()) throw std::runtime_error("prefork: " + activation_error);
  }

  /// Binds every listen address, or takes the sockets passed for them; see Master::bind().
  /// Throws std::system_error naming the address; nothing stays bound then.
  void bind() {
    if (bound_) return;
    std::vector<UniqueFd> fds;
    std::vector<std::string> names, created;  // created: Unix socket files this call made
    std::vector<std::vector<UniqueFd>> sets;
    std::vector<std::string> specs;  // per socket: what an upgrade says it is for
    try {
      const long first_slot = WantsReusePort<Balance> ? 0 : -1;
      const bool adopting = adopts_sockets();
      // A host name stands for every address it resolves to (nginx's rule), all on one port:
      // for port 0, the one the kernel chose for its first address.
      std::vector<std::pair<std::string, bool>> wanted;  // a spec; shares its predecessor's port
      for (auto& entry : opts_.listen) {
        std::vector<std::string> resolved = resolve_listen_address(entry);
        for (std::size_t k = 0; k < resolved.size(); ++k) wanted.emplace_back(resolved[k], k > 0);
      }
      std::string previous;  // where the previous wanted spec was bound, if it was
      for (auto& [wanted_spec, same_port] : wanted) {
        const std::string spec = same_port && !previous.empty()
                                     ? same_port_as(wanted_spec, previous)
                                     : wanted_spec;
        previous.clear();
        std::string as = spec;
        UniqueFd fd = upgrader_.take_inherited(spec, first_slot);
        if (!fd && adopting) {
          as = std::string(kActivatedSpec) + spec;
          fd = upgrader_.take_inherited(as, first_slot);
          if (!fd) fd = take_activated(spec);
          if (!fd) {
            log_(LogLevel::warning, "systemd",
                 "socket activation: not binding " + spec + ": no socket was passed for it");
            continue;
          }
        }
        bool fresh = !fd;
        if (fresh)
          fd = listen_on(spec, opts_.backlog,
                         WantsReusePort<Balance> ? ReusePortRole::lead : ReusePortRole::none,
                         defer_accept_s());
        names.push_back(to_string(local_address(fd.get())));
        if (fresh) created.push_back(names.back());
        fds.push_back(std::move(fd));
        specs.push_back(std::move(as));
        previous = names.back();
      }
      if (adopting) adopt_remaining(fds, names, specs, first_slot);
      activated_.clear();  // what is left is no listener: closed
      specs_ = specs;
      if constexpr (WantsReusePort<Balance>) {
        sets.push_back(std::move(fds));
        for (std::size_t s = 1; s < table_.slot_count(); ++s)
          sets.push_back(bind_set(names, &sets[0], s));
      }
    } catch (...) {
      for (auto& n : created) unlink_unix_socket(n);  // nothing stays bound
      throw;
    }
    upgrader_.close_unclaimed();
    listeners_ = std::move(fds);
    slot_listeners_ = std::move(sets);
    addresses_ = std::move(names);
    bound_ = true;
  }

  bool bound() const noexcept { return bound_; }
  /// The bound addresses, with the ports the kernel chose for port 0. Empty before bind().
  const std::vector<std::string>& addresses() const noexcept { return addresses_; }
  // Workers get listening sockets: bound, or before bind() whether it will bind any.
  bool listens() const noexcept { return bound_ ? !addresses_.empty() : !opts_.listen.empty(); }

  /// The sockets every worker shares (none for ReusePort: see for_slot()).
  const std::vector<UniqueFd>& shared() const noexcept { return listeners_; }
  /// ReusePort: `slot`'s own sockets (std::out_of_range if it has none).
  const std::vector<UniqueFd>& for_slot(std::size_t slot) const { return slot_listeners_.at(slot); }
  // The listening sockets a worker in `slot` is handed (kernel dispatch): its slot's own
  // ReusePort set, or the shared ones.
  const std::vector<UniqueFd>& for_worker(std::size_t slot) const {
    if constexpr (WantsReusePort<Balance>) {
      return for_slot(slot);
    } else {
      (void)slot;
      return shared();
    }
  }

  // Binds `slot`'s ReusePort sockets if it has none; false (logged) if that fails.
  bool ensure_slot_bound(std::size_t slot) {
    if (slot_listeners_.size() <= slot) slot_listeners_.resize(slot + 1);
    if (!slot_listeners_[slot].empty() || addresses_.empty()) return true;
    const std::vector<UniqueFd>* model = nullptr;
    for (auto& set : slot_listeners_)
      if (!set.empty()) model = &set;
    try {
      slot_listeners_[slot] = bind_set(addresses_, model, slot);
      return true;
    } catch (const std::system_error& e) {
      log_(LogLevel::warning, "bind",
           std::string("cannot bind for slot ") + std::to_string(slot) + ": " + e.what());
      return false;
    }
  }

  /// ReusePort: nobody will accept on `slot`'s sockets: stop the kernel routing to them.
  void close_slot(std::size_t slot) {
    if (slot < slot_listeners_.size()) slot_listeners_[slot].clear();
  }
  /// ReusePort: the slots from `n` on are scaled away: stop routing to them.
  void keep_slots(std::size_t n) {
    if (slot_listeners_.size() > n) slot_listeners_.resize(n);
  }
  /// Shutting down: every listening socket closed (the caller unwatches them first).
  void close() {
    listeners_.clear();
    slot_listeners_.clear();
  }

  /// The sockets an upgrade hands to the new master, with the listen entry each is for.
  std::vector<InheritedSocket> handover() const {
    std::vector<InheritedSocket> sockets;
    if constexpr (WantsReusePort<Balance>) {
      for (std::size_t slot = 0; slot < slot_listeners_.size(); ++slot)
        for (std::size_t i = 0; i < slot_listeners_[slot].size(); ++i)
          sockets.push_back({slot_listeners_[slot][i].get(), static_cast<long>(slot), specs_[i]});
    } else {
      for (std::size_t i = 0; i < listeners_.size(); ++i)
        sockets.push_back({listeners_[i].get(), -1, specs_[i]});
    }
    return sockets;
  }

  /// The end of run(): the Unix socket files this master bound are removed (not systemd's).
  void unlink_socket_files() {
    for (std::size_t i = 0; i < addresses_.size(); ++i)
      if (i >= specs_.size() || !specs_[i].starts_with(kActivatedSpec))  // systemd's
        unlink_unix_socket(addresses_[i]);
  }

  /// Descriptors a forked child must not keep (a worker is handed its sockets over its
  /// channel).
  void descriptors(std::vector<int>& fds) const {
    for (auto& l : listeners_) fds.push_back(l.get());
    for (auto& set : slot_listeners_)
      for (auto& l : set) fds.push_back(l.get());
    for (auto& a : activated_)
      if (a.fd) fds.push_back(a.fd.get());
  }

 private:
  // ReusePort: each slot its own SO_REUSEPORT socket per listen address, bound to what the
  // first bind resolved (so port 0 means one port for all). A Unix socket cannot be balanced
  // that way: its slots share one socket, dup'ed from `model`. Every socket of the group must
  // have a worker accepting from it, since the kernel queues connections on idle members too:
  // a slot that will not be refilled has its sockets closed (close_slot), and bound again when
  // a worker is forked into it. The groups are this master's: without a `model` (no slot holds
  // a socket) each socket leads its address's group again (ReusePortRole::lead), so that no
  // group another program started is joined; with one, they join.
  std::vector<UniqueFd> bind_set(const std::vector<std::string>& names,
                                 const std::vector<UniqueFd>* model, std::size_t slot) {
    std::vector<UniqueFd> fds;
    for (std::size_t i = 0; i < names.size(); ++i) {
      // A passed socket is one socket, whoever balances: its slots share it, as for Unix.
      if (UniqueFd fd = upgrader_.take_inherited(specs_[i], static_cast<long>(slot))) {
        fds.push_back(std::move(fd));
      } else if ((names[i].starts_with("unix:") || specs_[i].starts_with(kActivatedSpec)) &&
                 model && i < model->size()) {
        int d = ::fcntl((*model)[i].get(), F_DUPFD_CLOEXEC, 0);
        if (d < 0) throw_errno("dup listening socket");
        fds.emplace_back(d);
      } else {
        fds.push_back(listen_on(names[i], opts_.backlog,
                                model ? ReusePortRole::join : ReusePortRole::lead,
                                defer_accept_s()));
      }
    }
    return fds;
  }

  int defer_accept_s() const noexcept { return static_cast<int>(opts_.defer_accept.count()); }

  // Whether bind() serves on passed sockets: socket activation passed a listening one, or
  // this master was started by an upgrade from a master that did.
  bool adopts_sockets() const {
    for (auto& a : activated_)
      if (a.fd && is_stream_listener(a.fd.get())) return true;
    return upgrader_.inherits_activated();
  }

  // The passed socket bound to the listen address `spec`, if there is one.
  UniqueFd take_activated(const std::string& spec) {
    SocketAddress want;
    if (parse_address(spec, want)) return {};
    for (auto& a : activated_) {
      if (!a.fd || !is_stream_listener(a.fd.get()) ||
          !same_listen_address(want, local_address(a.fd.get())))
        continue;
      make_nonblocking(a.fd.get());
      return std::move(a.fd);
    }
    return {};
  }

  // Passed sockets no listen address asked for: served as well (the unit asked for them).
  void adopt_remaining(std::vector<UniqueFd>& fds, std::vector<std::string>& names,
                       std::vector<std::string>& specs, long slot) {
    auto adopt = [&](UniqueFd fd, std::string spec) {
      make_nonblocking(fd.get());
      names.push_back(to_string(local_address(fd.get())));
      specs.push_back(spec.empty() ? std::string(kActivatedSpec) + names.back() : spec);
      fds.push_back(std::move(fd));
    };
    for (auto& a : activated_) {
      if (!a.fd) continue;
      if (!is_stream_listener(a.fd.get())) {
        log_(LogLevel::warning, "systemd",
             "socket activation: closing descriptor " + std::to_string(a.fd.get()) + " (" +
                 a.name + "): not a listening stream socket");
        continue;
      }
      adopt(std::move(a.fd), {});
    }
    for (auto& [fd, spec] : upgrader_.take_inherited_activated(slot)) adopt(std::move(fd), spec);
  }

  const Options& opts_;
  const WorkerTable<Codec>& table_;
  const MasterLog& log_;
  Upgrader<Codec>& upgrader_;
  std::vector<UniqueFd> listeners_;
  std::vector<std::vector<UniqueFd>> slot_listeners_;  // ReusePort: per slot
  std::vector<std::string> addresses_;
  std::vector<std::string> specs_;  // per listener: its listen entry, or kActivatedSpec + ...
  std::vector<ActivatedSocket> activated_;  // passed by systemd, not adopted yet
  bool bound_ = false;
};

}  // namespace prefork::detail

#endif  // PREFORK_MASTER_LISTENERS_HPP
