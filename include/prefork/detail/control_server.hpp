// The master's control socket (`hello ctl status|reload|scale N|stop|upgrade`), server side: a
// Unix stream socket on the master's loop speaking JSON lines, one flat object per request, one
// line per reply in request order. What each command does is the master's.
//
// Why a socket and not signals: nginx's `-s reload` and PM2's daemon socket tell the operator
// whether the command worked (a rolling restart can fail), and a signal cannot carry "scale 8".
#ifndef PREFORK_DETAIL_CONTROL_SERVER_HPP
#define PREFORK_DETAIL_CONTROL_SERVER_HPP

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <prefork/detail/acceptor.hpp>
#include <prefork/detail/json.hpp>
#include <prefork/detail/syscall.hpp>
#include <prefork/detail/unique_fd.hpp>
#include <prefork/event_loop.hpp>

namespace prefork::detail {

/// Limits of the control protocol (documented in ControlServer).
inline constexpr std::size_t kControlMaxLine = 65536;
inline constexpr std::size_t kControlMaxConnections = 64;
inline constexpr std::size_t kControlMaxPending = 16;
inline constexpr std::size_t kControlMaxOutput = std::size_t{4} << 20;
inline constexpr std::chrono::seconds kControlIdleTimeout{60};

/// The reply line for a failure: {"ok":false,"error":"..."} and a newline.
inline std::string control_failure_line(std::string_view message) {
  return "{\"ok\":false,\"error\":" + json_quote(message) + "}\n";
}

/// One request as the master's handler sees it. `fields` holds every field of the object,
/// "command" included; `peer` is the client's pid, uid and gid (SO_PEERCRED at accept).
struct ControlRequest {
  std::string command;
  JsonFields fields;
  ucred peer{};
};

class ControlServer;

namespace control {

// One reply slot of a connection: replies leave in the order their requests arrived.
struct Slot {
  std::string line;
  bool ready = false;
};

struct Connection {
  UniqueFd fd;
  ucred peer{};
  std::string in;                          // bytes read, not yet a whole line
  std::string out;                         // reply bytes not yet sent
  std::deque<std::shared_ptr<Slot>> slots;  // requests in arrival order, answered or not
  ControlServer* server = nullptr;         // null once the connection is closed
  Clock::time_point last_active{};
  EventLoop::TimerId timer = 0;
  bool closing = false;  // send what `out` holds, then close
  bool eof = false;      // the peer shut down its writing side
};

}  // namespace control

/// The answer to one control request. Copyable: all copies share one answer, the first answer
/// wins and later ones are ignored; the last copy dropped unanswered answers
/// fail("the master dropped the request"), so a client never waits for an answer that cannot
/// come. May be kept and answered later from the master's loop (a rolling restart answers when
/// it is done). Answering after the connection went away does nothing. Master process.
class ControlReply {
 public:
  /// Sends {"ok":true} or {"ok":true,<fields>}: `fields` is the inside of a JSON object
  /// (`"workers":4,"pid":1234`), written as given; a raw line break in it would end the reply
  /// line early, so CR and LF become spaces.
  void ok(std::string fields = {}) const {
    for (char& ch : fields)
      if (ch == '\n' || ch == '\r') ch = ' ';
    state_->answer("{\"ok\":true" + (fields.empty() ? std::string() : "," + fields) + "}\n");
  }
  /// Sends {"ok":false,"error":<message>}.
  void fail(std::string_view message) const { state_->answer(control_failure_line(message)); }
  bool answered() const noexcept { return state_->answered; }
  /// The connection went away or the server closed: answering does nothing.
  bool closed() const noexcept {
    auto c = state_->connection.lock();
    return !c || !c->server;
  }

  /// For the server: the reply to the request holding `slot` on `connection`.
  ControlReply(std::weak_ptr<control::Connection> connection, std::shared_ptr<control::Slot> slot)
      : state_(std::make_shared<State>(std::move(connection), std::move(slot))) {}

 private:
  struct State {
    State(std::weak_ptr<control::Connection> c, std::shared_ptr<control::Slot> s)
        : connection(std::move(c)), slot(std::move(s)) {}
    State(const State&) = delete;
    State& operator=(const State&) = delete;
    ~State() {
      if (answered) return;
      try {
        answer(control_failure_line("the master dropped the request"));
      } catch (...) {  // bad_alloc: the client's timeout ends its wait instead
      }
    }
    void answer(std::string line);
    std::weak_ptr<control::Connection> connection;
    std::shared_ptr<control::Slot> slot;
    bool answered = false;
  };
  std::shared_ptr<State> state_;
};

/// The master's control socket on its EventLoop. Protocol: each request is one line holding a
/// flat JSON object with a string field "command"; each gets one reply line,
/// {"ok":true...} or {"ok":false,"error":"..."}, in request order even when the handler answers
/// a later request first. Limits, each answered with a failure line: a request line over 64 KiB
/// (then the connection is closed), more than 64 connections at once (see below),
/// more than 16 unanswered requests on one connection (the failure is sent at once, ahead of
/// the unanswered ones, and the connection closed), malformed JSON or a missing or non-string
/// "command" (the connection stays open). Only the master's effective uid and root may connect
/// (SO_PEERCRED); anyone else is refused and the handler never sees them. A connection with no
/// unanswered request and no whole request line nor reply for 60 s is closed (the bytes of a
/// partial line do not count); one whose unsent replies pass 4 MiB (a client that does not
/// read) is closed. At 64 connections a newcomer closes the one idle longest (no unanswered
/// request, oldest last request or reply); it is refused only if all 64 wait for answers. Its
/// watches do not keep the loop alive.
/// Single-threaded: every member runs on the loop's thread. Master process.
class ControlServer {
 public:
  using Handler = std::function<void(const ControlRequest&, ControlReply)>;

  explicit ControlServer(EventLoop& loop)
      : loop_(loop),
        acceptor_(loop, AcceptPause{}, {.stop = [this] { loop_.unwatch(listener_.get()); },
                                        .resume = [this] { watch_listener(); },
                                        .log = {}}) {}
  ControlServer(const ControlServer&) = delete;
  ControlServer& operator=(const ControlServer&) = delete;
  /// Closes the socket and every connection. Leaves the socket file (see unlink()).
  ~ControlServer() { close(); }

  /// Binds and listens on the Unix socket `path` (its directory must exist), created with mode
  /// 0600 (never accessible to others, not even between bind and chmod: the umask is 0177
  /// around bind). Errors, nothing bound then: filename_too_long (longer than sun_path allows),
  /// invalid_argument (empty), already_connected (this server listens already), address_in_use
  /// (a live process accepts on that socket), file_exists (the path is not a socket: it is never
  /// removed), errno of socket, bind, chmod or listen otherwise. A stale socket file, one nobody
  /// accepts on (ECONNREFUSED), is removed and replaced, as nginx and systemd do.
  std::error_code listen(const std::string& path) {
    if (listener_) return std::make_error_code(std::errc::already_connected);
    sockaddr_un un{};
    if (path.empty()) return std::make_error_code(std::errc::invalid_argument);
    if (path.size() >= sizeof un.sun_path)
      return std::make_error_code(std::errc::filename_too_long);
    un.sun_family = AF_UNIX;
    std::memcpy(un.sun_path, path.data(), path.size());
    const auto len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size() + 1);
    const auto* addr = reinterpret_cast<const sockaddr*>(&un);

    UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (!fd) return errno_code();
    // Linux creates the socket file with the socket inode's mode minus the umask (unix_bind in
    // net/unix/af_unix.c), so both keep it 0600 from the start; the umask alone would do, but
    // it is process-wide and another thread might create a file meanwhile.
    ::fchmod(fd.get(), 0600);
    auto bind_private = [&] {
      const mode_t old = ::umask(0177);
      int r = ::bind(fd.get(), addr, len);
      int saved = errno;
      ::umask(old);
      errno = saved;
      return r;
    };
    if (bind_private() != 0) {
      if (errno != EADDRINUSE) return errno_code();
      if (auto ec = claim_stale(path, addr, len)) return ec;
      if (bind_private() != 0) return errno_code();
    }
    UniqueFd file = open_file(path);
    if (!file || ::chmod(path.c_str(), 0600) != 0 || ::listen(fd.get(), 64) != 0) {
      auto ec = errno_code();
      ::unlink(path.c_str());
      return ec;
    }
    auto ec = start(std::move(fd), path, std::move(file));
    if (ec) ::unlink(path.c_str());
    return ec;
  }

  /// Takes over a socket that listens already (a master upgrade hands it over): makes it
  /// non-blocking and close-on-exec, and remembers the file at `path` as this server's, for
  /// unlink(). Errors, `listening` closed then: already_connected, invalid_argument (not a
  /// listening Unix stream socket), errno of fcntl.
  std::error_code adopt(UniqueFd listening, const std::string& path) {
    if (listener_) return std::make_error_code(std::errc::already_connected);
    int accepting = 0;
    socklen_t n = sizeof accepting;
    sockaddr_storage local{};
    socklen_t local_len = sizeof local;
    if (!listening ||
        ::getsockopt(listening.get(), SOL_SOCKET, SO_ACCEPTCONN, &accepting, &n) != 0 ||
        !accepting ||
        ::getsockname(listening.get(), reinterpret_cast<sockaddr*>(&local), &local_len) != 0 ||
        local.ss_family != AF_UNIX)
      return std::make_error_code(std::errc::invalid_argument);
    int fl = ::fcntl(listening.get(), F_GETFL);
    if (fl < 0 || ::fcntl(listening.get(), F_SETFL, fl | O_NONBLOCK) != 0 ||
        ::fcntl(listening.get(), F_SETFD, FD_CLOEXEC) != 0)
      return errno_code();
    return start(std::move(listening), path, open_file(path));
  }

  /// The listening socket, -1 if none.
  int native_handle() const noexcept { return listener_.get(); }
  /// The path given to listen() or adopt() (kept after close(), for unlink()).
  const std::string& path() const noexcept { return path_; }
  /// Connections open now.
  std::size_t connections() const noexcept { return connections_.size(); }

  /// Appends every descriptor this server holds (the listening socket and each connection),
  /// for a forked child to close: a child that kept them would keep the socket answering after
  /// the master died, and a client waiting for the master's EOF waiting.
  void descriptors(std::vector<int>& out) const {
    if (listener_) out.push_back(listener_.get());
    if (file_) out.push_back(file_.get());
    for (auto& [fd, c] : connections_) out.push_back(fd);
  }

  /// Stops accepting (the socket is closed; the file stays) and keeps the open connections,
  /// whose pending replies still go out: after a master upgrade, new clients reach the new
  /// master while those of this one get their answers.
  void stop_listening() noexcept {
    acceptor_.cancel();
    if (listener_) {
      loop_.unwatch(listener_.get());
      listener_.reset();
    }
  }

  /// Stops accepting and closes the listening socket and every connection; replies still
  /// pending go nowhere (their closed() turns true). The socket file stays.
  void close() noexcept {
    acceptor_.cancel();
    if (listener_) {
      loop_.unwatch(listener_.get());
      listener_.reset();
    }
    auto all = std::exchange(connections_, {});
    for (auto& [fd, c] : all) drop(*c);
  }

  /// Removes the socket file if it is still the one this server bound or adopted (same device
  /// and inode), so that a successor's socket at the same path is never removed. After a
  /// handover (adopt() in the new master) the file is the successor's too: the old master
  /// must not call this then.
  void unlink() noexcept {
    if (!file_) return;
    struct stat mine {}, now {};
    if (::fstat(file_.get(), &mine) == 0 && ::lstat(path_.c_str(), &now) == 0 &&
        mine.st_dev == now.st_dev && mine.st_ino == now.st_ino)
      ::unlink(path_.c_str());
    file_.reset();
  }

  /// The handler of every valid request. Without one, requests fail ("no handler"). An
  /// exception from it fails that request with its message and is rethrown to the loop once
  /// the connection's other complete lines are handled.
  void on_request(Handler h) { handler_ = std::move(h); }

  /// How long a connection with nothing pending may stay silent (default 60 s; tests shorten it).
  void set_idle_timeout(Clock::duration d) noexcept { idle_timeout_ = d; }

 private:
  friend class ControlReply;
  using ConnectionPtr = std::shared_ptr<control::Connection>;

  // The path holds something that refused our bind: a live socket, a stale one, or no socket.
  static std::error_code claim_stale(const std::string& path, const sockaddr* addr,
                                     socklen_t len) {
    struct stat st {};
    if (::lstat(path.c_str(), &st) != 0) return errno_code();
    if (!S_ISSOCK(st.st_mode)) return std::make_error_code(std::errc::file_exists);
    UniqueFd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (!probe) return errno_code();
    // Non-blocking: a live master with a full backlog answers EAGAIN, which is "in use" too.
    if (retry_eintr([&] { return ::connect(probe.get(), addr, len); }) == 0 ||
        errno != ECONNREFUSED)
      return std::make_error_code(std::errc::address_in_use);
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) return errno_code();
    return {};
  }

  // An O_PATH descriptor of the socket file (-1 if it is not one). Holding it keeps the inode
  // allocated, so a successor's file can never get the same inode number (which a filesystem
  // reuses once an inode is freed, so comparing remembered numbers would not do).
  static UniqueFd open_file(const std::string& path) noexcept {
    UniqueFd f(retry_eintr([&] { return ::open(path.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC); }));
    struct stat st {};
    if (f && (::fstat(f.get(), &st) != 0 || !S_ISSOCK(st.st_mode))) f.reset();
    return f;
  }

  std::error_code start(UniqueFd fd, const std::string& path, UniqueFd file) {
    listener_ = std::move(fd);
    try {
      watch_listener();
    } catch (const std::system_error& e) {
      listener_.reset();
      return e.code();
    }
    path_ = path;
    file_ = std::move(file);
    return {};
  }

  // Sends one line, without waiting, on a connection that is not kept (its caller closes it).
  static void refuse(int fd, std::string_view line) noexcept {
    (void)retry_eintr(
        [&] { return ::send(fd, line.data(), line.size(), MSG_NOSIGNAL | MSG_DONTWAIT); });
  }

  // Watches the listening socket, if there is one (the acceptor's pause may outlive it).
  void watch_listener() {
    if (listener_)
      loop_.watch(listener_.get(), EventLoop::readable, [this](std::uint32_t) { accept_some(); },
                  false);
  }

  // EMFILE and friends pause the socket for 100 ms (Acceptor), unlogged: the server has no log.
  void accept_some() {
    acceptor_.accept(listener_.get(), [this] { return bool(listener_); },
                     [this](UniqueFd fd) { return admit(std::move(fd)); });
  }

  // A connection accepted: kept if its peer may talk to the master and there is room. True:
  // accept the next one.
  bool admit(UniqueFd fd) {
    ucred peer{};
    socklen_t n = sizeof peer;
    if (::getsockopt(fd.get(), SOL_SOCKET, SO_PEERCRED, &peer, &n) != 0) return true;
    const uid_t me = ::geteuid();
    if (peer.uid != me && peer.uid != 0) {
      refuse(fd.get(),
             control_failure_line("permission denied: uid " + std::to_string(peer.uid) +
                                  " is not the master's uid " + std::to_string(me) + " or root"));
      return true;
    }
    if (connections_.size() >= kControlMaxConnections && !evict_idlest()) {
      refuse(fd.get(), control_failure_line("too many control connections"));
      return true;
    }
    auto c = std::make_shared<control::Connection>();
    const int raw = fd.get();
    c->fd = std::move(fd);
    c->peer = peer;
    c->server = this;
    c->last_active = Clock::now();
    std::weak_ptr<control::Connection> weak = c;
    loop_.watch(raw, EventLoop::readable, [this, weak](std::uint32_t events) {
      if (auto conn = weak.lock()) on_events(conn, events);
    }, false);
    connections_.emplace(raw, c);
    arm_idle(*c, idle_timeout_);
    return true;
  }

  // Full: the connection with no request waiting for an answer whose last request or reply is
  // oldest makes room, so that clients holding connections open (64 same-uid clients, each
  // trickling a partial line) cannot lock the operator out; nginx reuses its idle keep-alive
  // connections the same way when it runs out (ngx_drain_connections). False if every
  // connection waits for an answer: the newcomer is refused then.
  bool evict_idlest() {
    ConnectionPtr idlest;
    for (auto& [fd, c] : connections_)
      if (c->slots.empty() && !c->closing && (!idlest || c->last_active < idlest->last_active))
        idlest = c;
    if (!idlest) return false;
    refuse(idlest->fd.get(),
           control_failure_line("too many control connections: closing the one idle longest"));
    close_connection(idlest);
    return true;
  }

  void arm_idle(control::Connection& c, Clock::duration d) {
    if (c.timer) loop_.cancel(c.timer);
    const int raw = c.fd.get();
    c.timer = loop_.after(d, [this, raw] { on_idle(raw); }, false);
  }

  void on_idle(int raw) {
    auto it = connections_.find(raw);
    if (it == connections_.end()) return;
    ConnectionPtr c = it->second;
    c->timer = 0;
    if (c->closing) return close_connection(c);  // it did not read its last reply in time
    const auto quiet = Clock::now() - c->last_active;
    if (!c->slots.empty() || quiet < idle_timeout_)
      return arm_idle(*c, c->slots.empty() ? idle_timeout_ - quiet : idle_timeout_);
    close_connection(c);
  }

  // Marks a connection closed and releases its descriptor and timer; the object itself lives
  // on while a callback or a reply still holds it.
  void drop(control::Connection& c) noexcept {
    if (!c.server) return;
    c.server = nullptr;
    if (c.timer) loop_.cancel(std::exchange(c.timer, 0));
    if (c.fd) {
      loop_.unwatch(c.fd.get());
      c.fd.reset();
    }
    c.slots.clear();
  }

  void close_connection(const ConnectionPtr& c) noexcept {
    if (!c->server) return;
    connections_.erase(c->fd.get());
    drop(*c);
  }

  void on_events(const ConnectionPtr& c, std::uint32_t events) {
    if (events & EventLoop::writable) {
      flush(c);
      if (!c->server) return;
    }
    if (!c->closing && !c->eof && (events & (EventLoop::readable | EPOLLHUP | EPOLLERR))) {
      read_some(c);
      return;
    }
    // Reading is over; a hang-up now means nobody is left to send the replies to.
    if (events & (EPOLLHUP | EPOLLERR)) close_connection(c);
  }

  void read_some(const ConnectionPtr& c) {
    char buf[16384];
    for (int round = 0; round < 8; ++round) {
      ssize_t n = retry_eintr([&] { return ::recv(c->fd.get(), buf, sizeof buf, 0); });
      if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) break;
        return close_connection(c);
      }
      if (n == 0) {
        // A client may shut down its side after the request and still wait for the reply.
        c->eof = true;
        break;
      }
      c->in.append(buf, static_cast<std::size_t>(n));
      if (!handle_lines(c) || !c->server) return;
    }
    if (c->eof) {
      if (!c->in.empty()) fail_and_close(c, "request line not terminated by a newline");
      else if (c->slots.empty() && c->out.empty()) close_connection(c);
      else update_watch(c);
    }
  }

  // Handles every whole line in c->in; false if the connection is done with.
  bool handle_lines(const ConnectionPtr& c) {
    std::exception_ptr thrown;
    std::size_t start = 0;
    bool go_on = true;
    while (go_on) {
      std::size_t nl = c->in.find('\n', start);
      if (nl == std::string::npos) break;
      if (nl - start > kControlMaxLine) {
        go_on = false;
        fail_and_close(c, "request line longer than " + std::to_string(kControlMaxLine) + " bytes");
        break;
      }
      std::string_view line(c->in.data() + start, nl - start);
      if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
      std::string copy(line);
      start = nl + 1;
      // Only a whole line is activity: bytes of a partial one, trickled to look busy, are not.
      c->last_active = Clock::now();
      if (copy.find_first_not_of(" \t") == std::string::npos) continue;  // blank: ignored
      go_on = handle_line(c, copy, thrown) && c->server && !c->closing;
    }
    if (c->server && !c->closing) {
      c->in.erase(0, start);
      if (go_on && c->in.size() > kControlMaxLine) {
        go_on = false;
        fail_and_close(c, "request line longer than " + std::to_string(kControlMaxLine) + " bytes");
      }
    }
    if (thrown) std::rethrow_exception(thrown);
    return go_on && c->server;
  }

  bool handle_line(const ConnectionPtr& c, const std::string& line, std::exception_ptr& thrown) {
    if (c->slots.size() >= kControlMaxPending) {
      fail_and_close(c, "more than " + std::to_string(kControlMaxPending) +
                            " unanswered requests on one connection");
      return false;
    }
    auto slot = std::make_shared<control::Slot>();
    c->slots.push_back(slot);
    ControlReply reply(c, slot);
    ControlRequest request;
    std::string error;
    if (!parse_flat_object(line, request.fields, error)) {
      reply.fail("malformed request: " + error);
      return true;
    }
    auto it = request.fields.find("command");
    if (it == request.fields.end()) {
      reply.fail("malformed request: no \"command\" field");
      return true;
    }
    if (it->second.type != JsonScalar::Type::string) {
      reply.fail("malformed request: \"command\" is not a string");
      return true;
    }
    request.command = it->second.text;
    request.peer = c->peer;
    if (!handler_) {
      reply.fail("no handler for control requests");
      return true;
    }
    try {
      handler_(request, reply);
    } catch (const std::exception& e) {
      reply.fail(std::string("the master's handler failed: ") + e.what());
      if (!thrown) thrown = std::current_exception();
    } catch (...) {
      reply.fail("the master's handler failed");
      if (!thrown) thrown = std::current_exception();
    }
    return true;
  }

  // A protocol violation that ends the connection: the failure goes out at once, ahead of any
  // reply still unanswered, and the connection closes when it is sent.
  void fail_and_close(const ConnectionPtr& c, std::string_view message) {
    c->slots.clear();
    c->in.clear();
    c->closing = true;
    c->out += control_failure_line(message);
    // Bounded: a client that never reads its last line does not keep the connection.
    arm_idle(*c, std::chrono::seconds(5));
    flush(c);
  }

  // An answer arrived: move the answered head of the queue to the output and send.
  void deliver(const ConnectionPtr& c) {
    while (!c->slots.empty() && c->slots.front()->ready) {
      c->out += c->slots.front()->line;
      c->slots.pop_front();
    }
    c->last_active = Clock::now();
    if (c->out.size() > kControlMaxOutput) return close_connection(c);
    flush(c);
  }

  void flush(const ConnectionPtr& c) {
    std::size_t sent = 0;
    while (sent < c->out.size()) {
      ssize_t n = retry_eintr([&] {
        return ::send(c->fd.get(), c->out.data() + sent, c->out.size() - sent,
                      MSG_NOSIGNAL | MSG_DONTWAIT);
      });
      if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) break;
        return close_connection(c);  // EPIPE, ECONNRESET: the client is gone
      }
      sent += static_cast<std::size_t>(n);
    }
    c->out.erase(0, sent);
    if (c->out.empty() && (c->closing || (c->eof && c->slots.empty())))
      return close_connection(c);
    update_watch(c);
  }

  void update_watch(const ConnectionPtr& c) {
    std::uint32_t events = 0;
    if (!c->closing && !c->eof) events |= EventLoop::readable;
    if (!c->out.empty()) events |= EventLoop::writable;
    if (loop_.modify(c->fd.get(), events)) close_connection(c);
  }

  EventLoop& loop_;
  UniqueFd listener_;
  std::string path_;
  UniqueFd file_;  // the socket file, for unlink()
  Handler handler_;
  std::map<int, ConnectionPtr> connections_;
  Acceptor acceptor_;
  Clock::duration idle_timeout_ = kControlIdleTimeout;
};

inline void ControlReply::State::answer(std::string line) {
  if (answered) return;
  answered = true;
  auto c = connection.lock();
  if (!c || !c->server) return;
  slot->line = std::move(line);
  slot->ready = true;
  c->server->deliver(c);
}

}  // namespace prefork::detail

#endif  // PREFORK_DETAIL_CONTROL_SERVER_HPP
