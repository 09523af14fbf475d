// asio_hello: hello's answer ("Handled by process <pid>\n") from a Server written the way an
// existing standalone-asio code base writes servers (Debian: libasio-dev; no Boost), to show
// how such a code base plugs into prefork. The master is an ordinary prefork::Cluster: it binds,
// deals connections out round-robin, restarts crashed workers, and SIGUSR2 restarts the workers
// one at a time; SIGTERM/SIGINT stop everything gracefully (exit status 0).
//
//   asio_hello [--host ADDR] [--port N] [--workers N]
//              defaults: 127.0.0.1, 8080, one worker per CPU
//
//   $ ./asio_hello --workers 2 --port 0
//   Master PID: 5120
//   Listening on 127.0.0.1:40311
//   Started process 5121
//   Started process 5122
//   $ curl http://127.0.0.1:40311/
//   Handled by process 5121
//   $ kill -USR2 5120       # rolling restart: idle keep-alive connections are closed, requests
//   Started process 5130    # in flight are answered (with Connection: close), nothing is lost
//   Started process 5131
//   Reload done: 2 workers replaced in 14 ms
//
// Two loops, one thread. The library drives the worker's prefork::EventLoop (ctx.loop()): the
// channel to the master, the connections it dispatches, heartbeats, the drain and the decision
// to exit all live there. The Server owns an asio::io_context for its own I/O. The integration
// nests asio's reactor in prefork's: asio's epoll descriptor is watched by prefork's loop, and
// when it is readable (a socket asio waits on is ready, an asio timer expired: asio arms a
// timerfd inside that same epoll set) the Server runs io_context::poll(), which runs asio's
// reactor without blocking and every handler that is ready, until none is. Each entry from
// prefork into asio code (a new connection, the drain) also ends with poll(), because asio does
// not wake its reactor for work posted while nobody is inside run(). Nothing spins and no thread
// is started; the channel stays on prefork's loop, and asio handlers may call the WorkerContext
// directly (connection_opened(), request_done()...) because both loops run on this thread.
//
// Costs, honestly: a nested epoll descriptor, and an epoll_wait(0) on asio's set each time
// poll() runs. Under keep-alive load (strace -c) a worker makes per request one recv, one send,
// one epoll_ctl (async_wait re-arms the socket in asio's set), about 0.6 epoll_wait and 0.3
// timerfd_settime: few system calls, so what it loses against hello's http::Server (about
// 2.5x fewer requests per second with wrk on two cores) is asio's per-operation bookkeeping in
// user space (a handler allocated per operation, a timer re-armed per state). And one hack: asio does not expose its reactor's descriptor
// (chriskohlhoff/asio#557, open), so find_reactor_descriptor() below finds it as the epoll
// instance that appeared in /proc/self/fd when the io_context created its reactor. And one
// trap: poll() on an io_context without work returns before it runs the reactor, while asio
// leaves its interrupter's eventfd readable in that epoll set (it relies on edge triggering),
// so prefork would find asio's descriptor readable for ever and spin. A work guard keeps the
// io_context from ever running out of work; instead, open connections keep prefork's loop
// alive (the watch's keeps_alive), so a draining worker exits when its last connection is
// done, not before.
//
// The other direction, asio's run() driving prefork's loop through a watch on
// ctx.loop().native_handle() (EventLoop::run_once(0) when readable), needs a library change:
// the worker's WorkerContext::serve() runs the loop itself and keeps its "drained or orphaned,
// now exit" condition private. A Server hook that hands the loop over (say
// `void run(prefork::LoopDriver&)`, with `LoopDriver::run_once(timeout)` and `bool finished()`)
// would allow it; the nesting below needs nothing but what exists.
//
// HTTP here is deliberately small (the examples' full server is examples/common/http.hpp):
// HTTP/1.0 and 1.1 requests, Content-Length bodies (read and ignored), keep-alive (the default
// for 1.1, "Connection: keep-alive" for 1.0), pipelining, a 5 s idle and a 10 s request timeout.
// Transfer-Encoding gets 501, a head over 8 KiB 431, a malformed one 400, each then closed.
#include <asio.hpp>

#if !defined(ASIO_HAS_EPOLL)
#error "asio_hello nests asio's epoll reactor in prefork's loop: build asio with epoll"
#endif

#include <dirent.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <unordered_set>
#include <utility>
#include <vector>

#include <prefork/prefork.hpp>

#include "common/cli.hpp"
#include "common/master_lines.hpp"

namespace {

using tcp = asio::ip::tcp;
using namespace std::chrono_literals;

struct Config {
  std::string host = "127.0.0.1";
  unsigned port = 8080;
  unsigned workers = prefork::cpu_count();
};

// Parsed in main() before the cluster starts: a forked worker inherits it.
Config config;

constexpr std::size_t kMaxHead = 8 * 1024;
constexpr std::size_t kMaxBody = 1024 * 1024;
constexpr auto kIdleTimeout = 5s;
constexpr auto kRequestTimeout = 10s;
// After the drain starts, an idle keep-alive connection gets this long to send one more request
// (answered with Connection: close) before it is closed: closing it at once races a client that
// is already sending. The same grace as examples/common/http.hpp, for the same reason.
constexpr auto kDrainGrace = 500ms;
// After the last answer, how long to read and discard what the client still sends before
// closing, so that unread input does not turn the close into a reset (nginx's lingering_close).
constexpr auto kLinger = 1s;

/// The epoll descriptors open in this process.
std::set<int> epoll_descriptors() {
  std::set<int> fds;
  DIR* dir = ::opendir("/proc/self/fd");
  if (!dir) return fds;
  while (dirent* e = ::readdir(dir)) {
    int fd = -1;
    std::string_view name(e->d_name);
    if (std::from_chars(name.data(), name.data() + name.size(), fd).ec != std::errc{}) continue;
    char target[64];
    std::string path = "/proc/self/fd/" + std::string(name);
    ssize_t n = ::readlink(path.c_str(), target, sizeof target - 1);
    if (n > 0 && std::string_view(target, static_cast<std::size_t>(n)) == "anon_inode:[eventpoll]")
      fds.insert(fd);
  }
  ::closedir(dir);
  return fds;
}

/// asio's reactor descriptor (see the header comment for why it is looked for). The reactor is
/// created with the first I/O object of the io_context; a timer is the cheapest. Throws
/// std::runtime_error if no single new epoll descriptor appeared (an asio built without
/// epoll, or a thread of the program creating one at the same moment).
int find_reactor_descriptor(asio::io_context& io) {
  std::set<int> before = epoll_descriptors();
  asio::steady_timer creates_the_reactor(io);
  std::vector<int> appeared;
  for (int fd : epoll_descriptors())
    if (!before.count(fd)) appeared.push_back(fd);
  if (appeared.size() != 1)
    throw std::runtime_error("asio_hello: cannot tell asio's epoll descriptor (" +
                             std::to_string(appeared.size()) + " new epoll descriptors)");
  return appeared.front();
}

char lower(char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c + 32) : c; }

bool iequals(std::string_view a, std::string_view b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(),
                                            [](char x, char y) { return lower(x) == lower(y); });
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

/// What the server needs from a request head.
struct Head {
  bool head_method = false;
  bool keep_alive = false;
  bool http10 = false;
  std::size_t content_length = 0;
  int error = 0;  ///< an HTTP status to answer with, then close
};

// Parses "METHOD SP target SP HTTP/1.x CRLF *(field CRLF) CRLF".
Head parse_head(std::string_view text) {
  Head h;
  auto eol = text.find("\r\n");
  std::string_view line = text.substr(0, eol);
  auto sp1 = line.find(' '), sp2 = line.rfind(' ');
  if (sp1 == std::string_view::npos || sp2 == sp1 || sp1 == 0) return {.error = 400};
  std::string_view version = line.substr(sp2 + 1);
  if (version == "HTTP/1.1") {
    h.keep_alive = true;
  } else if (version == "HTTP/1.0") {
    h.http10 = true;
  } else {
    return {.error = version.starts_with("HTTP/") ? 505 : 400};
  }
  h.head_method = line.substr(0, sp1) == "HEAD";
  bool has_length = false;
  for (std::size_t at = eol + 2; at < text.size();) {
    std::size_t end = text.find("\r\n", at);
    if (end == std::string_view::npos || end == at) break;
    std::string_view field = text.substr(at, end - at);
    at = end + 2;
    auto colon = field.find(':');
    if (colon == std::string_view::npos || colon == 0) return {.error = 400};
    std::string_view name = field.substr(0, colon), value = trim(field.substr(colon + 1));
    if (iequals(name, "Transfer-Encoding")) return {.error = 501};
    if (iequals(name, "Content-Length")) {
      std::size_t n = 0;
      auto [p, ec] = std::from_chars(value.data(), value.data() + value.size(), n);
      bool number = ec == std::errc{} && p == value.data() + value.size();
      if (!number || (has_length && n != h.content_length)) return {.error = 400};
      has_length = true;
      h.content_length = n;
      if (n > kMaxBody) return {.error = 413};
    } else if (iequals(name, "Connection")) {
      // A list ("keep-alive, Upgrade"); close wins.
      for (std::size_t i = 0; i <= value.size();) {
        std::size_t comma = std::min(value.find(',', i), value.size());
        std::string_view token = trim(value.substr(i, comma - i));
        if (iequals(token, "close")) h.keep_alive = false;
        if (iequals(token, "keep-alive") && h.http10) h.keep_alive = true;
        i = comma + 1;
      }
    }
  }
  return h;
}

class Session;

/// The Server: built in each worker, after fork. Runs asio's io_context on prefork's loop.
class AsioHello {
 public:
  explicit AsioHello(prefork::WorkerContext<>& ctx)
      : ctx_(ctx),
        body_("Handled by process " + std::to_string(ctx.pid()) + "\n"),
        reactor_fd_(find_reactor_descriptor(io_)) {
    watch_reactor(false);
  }
  AsioHello(const AsioHello&) = delete;
  AsioHello& operator=(const AsioHello&) = delete;
  // prefork's loop outlives the Server: it must stop calling into an io_context that is gone.
  ~AsioHello() { ctx_.loop().unwatch(reactor_fd_); }

  // The descriptor leaves prefork's Connection for an asio socket; asio registers it with its
  // own reactor (the descriptor is already non-blocking and close-on-exec).
  void on_connection(prefork::Connection c);

  void on_drain();

  void on_listening() {
    std::printf("Started process %d\n", static_cast<int>(ctx_.pid()));
    std::fflush(stdout);
  }

  prefork::WorkerContext<>& context() noexcept { return ctx_; }
  asio::io_context& io() noexcept { return io_; }
  const std::string& body() const noexcept { return body_; }
  bool draining() const noexcept { return draining_; }
  void add(Session* s) { sessions_.insert(s); }
  void remove(Session* s) { sessions_.erase(s); }

 private:
  // Runs what asio has ready, then lets open connections (if any) keep prefork's loop alive.
  // An exception from an asio handler leaves through poll() into prefork's loop, which
  // reports it and ends the worker with status 1 (the master replaces it).
  void pump() {
    io_.poll();
    bool busy = !sessions_.empty();
    if (busy != holds_loop_) watch_reactor(busy);
  }

  // EventLoop::modify() cannot change keeps_alive: watch again. Safe from inside the watch's
  // own callback (unwatch() defers the callback's destruction to the end of the round).
  void watch_reactor(bool keeps_alive) {
    ctx_.loop().unwatch(reactor_fd_);
    ctx_.loop().watch(reactor_fd_, prefork::EventLoop::readable, [this](std::uint32_t) { pump(); },
                      keeps_alive);
    holds_loop_ = keeps_alive;
  }

  prefork::WorkerContext<>& ctx_;
  std::string body_;
  // Declared before io_ so that it is still there when io_'s destructor destroys the handlers
  // that own the last sessions.
  std::unordered_set<Session*> sessions_;
  asio::io_context io_{1};  // one thread: this one
  asio::executor_work_guard<asio::io_context::executor_type> work_ = asio::make_work_guard(io_);
  int reactor_fd_;
  bool holds_loop_ = false;
  bool draining_ = false;
};

/// One connection: wait for a request (idle), read it (head, then body), answer, and again
/// until either side wants to close.
class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(AsioHello& server, tcp::socket socket)
      : server_(server), socket_(std::move(socket)), timer_(server.io()) {
    server_.add(this);
    server_.context().connection_opened();  // LeastConnections reads this count
  }
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;
  ~Session() {
    server_.remove(this);
    server_.context().connection_closed();
  }

  void start() { await_request(); }

  // The drain began: an idle connection gets kDrainGrace to start one last request.
  void drain() {
    if (state_ == State::idle) arm(kDrainGrace);
  }

 private:
  enum class State { idle, reading, writing, lingering, closed };

  void await_request() {
    if (!in_.empty()) return read_head();  // pipelined: the next request is already here
    state_ = State::idle;
    arm(server_.draining() ? std::chrono::milliseconds(kDrainGrace)
                           : std::chrono::milliseconds(kIdleTimeout));
    socket_.async_wait(tcp::socket::wait_read, [self = shared_from_this()](std::error_code ec) {
      if (ec || self->state_ != State::idle) return self->close();
      self->read_head();
    });
  }

  void read_head() {
    state_ = State::reading;
    arm(kRequestTimeout);
    asio::async_read_until(socket_, asio::dynamic_buffer(in_, kMaxHead), "\r\n\r\n",
                           [self = shared_from_this()](std::error_code ec, std::size_t n) {
                             self->on_head(ec, n);
                           });
  }

  void on_head(std::error_code ec, std::size_t head_len) {
    if (state_ == State::closed) return;
    if (ec == asio::error::not_found) return answer_error(431);  // the head outgrew kMaxHead
    if (ec) return close();  // EOF, reset, or the request timeout closed the socket
    Head head = parse_head(std::string_view(in_).substr(0, head_len));
    if (head.error) return answer_error(head.error);
    std::size_t have = in_.size() - head_len;
    if (have >= head.content_length) {
      in_.erase(0, head_len + head.content_length);
      return answer(head);
    }
    asio::async_read(socket_, asio::dynamic_buffer(in_),
                     asio::transfer_exactly(head.content_length - have),
                     [self = shared_from_this(), head, head_len](std::error_code ec2, std::size_t) {
                       if (ec2 || self->state_ == State::closed) return self->close();
                       self->in_.erase(0, head_len + head.content_length);
                       self->answer(head);
                     });
  }

  void answer(const Head& head) {
    // While draining, this is the connection's last answer: the client reconnects, to a worker
    // that is not leaving.
    bool keep = head.keep_alive && !server_.draining();
    const std::string& body = server_.body();
    out_ = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: " +
           std::to_string(body.size()) + "\r\n";
    if (!keep) out_ += "Connection: close\r\n";
    if (keep && head.http10) out_ += "Connection: keep-alive\r\n";
    out_ += "\r\n";
    if (!head.head_method) out_ += body;
    server_.context().request_done();
    write(keep);
  }

  void answer_error(int status) {
    const char* reason = status == 400   ? "Bad Request"
                         : status == 413 ? "Content Too Large"
                         : status == 431 ? "Request Header Fields Too Large"
                         : status == 501 ? "Not Implemented"
                                         : "HTTP Version Not Supported";
    out_ = "HTTP/1.1 " + std::to_string(status) + " " + reason +
           "\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    in_.clear();
    write(false);
  }

  void write(bool keep) {
    state_ = State::writing;
    arm(kRequestTimeout);  // a client that reads nothing for this long is gone
    asio::async_write(socket_, asio::buffer(out_),
                      [self = shared_from_this(), keep](std::error_code ec, std::size_t) {
                        if (ec || self->state_ == State::closed) return self->close();
                        self->out_.clear();
                        if (keep) return self->await_request();
                        self->linger();
                      });
  }

  // Our FIN goes out now; what the client still sends is read and dropped until its FIN.
  void linger() {
    state_ = State::lingering;
    std::error_code ignored;
    socket_.shutdown(tcp::socket::shutdown_send, ignored);
    in_.clear();
    arm(kLinger);
    discard();
  }
  void discard() {
    socket_.async_read_some(asio::buffer(scratch_),
                            [self = shared_from_this()](std::error_code ec, std::size_t) {
                              if (ec || self->state_ == State::closed) return self->close();
                              self->discard();
                            });
  }

  // One timer per connection, re-armed at each change of state; a stale expiry (one already
  // queued when the timer was re-armed) is told apart by its generation.
  void arm(std::chrono::steady_clock::duration d) {
    timer_.expires_after(d);
    timer_.async_wait([self = shared_from_this(), gen = ++timer_gen_](std::error_code ec) {
      if (ec || gen != self->timer_gen_ || self->state_ == State::closed) return;
      // A request that reached an idle connection is answered, not cut off: its read
      // handler is about to run in this same poll().
      if (self->state_ == State::idle) {
        std::error_code e;
        if (self->socket_.available(e) > 0 && !e) return;
      }
      self->close();
    });
  }

  void close() {
    if (state_ == State::closed) return;
    state_ = State::closed;
    std::error_code ignored;
    timer_.cancel();
    socket_.close(ignored);  // pending operations complete with operation_aborted
  }

  AsioHello& server_;
  tcp::socket socket_;
  asio::steady_timer timer_;
  std::uint64_t timer_gen_ = 0;
  std::string in_, out_;
  char scratch_[1024];
  State state_ = State::idle;
};

void AsioHello::on_connection(prefork::Connection c) {
  const auto protocol = c.peer_address().family() == AF_INET6 ? tcp::v6() : tcp::v4();
  tcp::socket socket(io_);
  std::error_code ec;
  socket.assign(protocol, c.fd(), ec);
  if (ec) {  // the Connection still owns the descriptor and closes it: the client sees EOF
    std::fprintf(stderr, "asio_hello: cannot adopt a connection: %s\n", ec.message().c_str());
    return;
  }
  c.release().release();  // the socket owns it now
  std::make_shared<Session>(*this, std::move(socket))->start();
  pump();
}

void AsioHello::on_drain() {
  draining_ = true;
  for (Session* s : sessions_) s->drain();
  pump();
}

static_assert(prefork::Server<AsioHello>);

// The library's defaults are Node's: the master accepts and deals connections out round-robin,
// crashed workers are restarted (with backoff), messages are strings.
using AsioCluster = prefork::Cluster<AsioHello>;

constexpr const char* kUsage = "usage: asio_hello [--host ADDR] [--port N] [--workers N]\n";

const cli::Parser args("asio_hello", kUsage);

Config parse_args(int argc, char** argv) {
  Config c;
  args.parse(argc, argv, {"--host", "--port", "--workers"}, {},
             [&c](std::string_view flag, std::string_view value) {
    if (flag == "--host") {
      c.host = args.text(flag, value);
    } else if (flag == "--port") {
      c.port = args.number<unsigned>(flag, value, 0, 65535);
    } else {
      c.workers = args.number<unsigned>(flag, value, 1, 4096);
    }
  });
  return c;
}

int serve(const std::string& address) {
  AsioCluster cluster(prefork::Options{
      .workers = config.workers,
      .listen = {address},
      .defer_accept = std::chrono::seconds(1)});  // HTTP: the client speaks first
  if (cluster.is_master()) {
    cluster.bind();  // first: a master that cannot bind prints no readiness line
    std::printf("Master PID: %d\n", static_cast<int>(::getpid()));
    std::printf("Listening on %s\n", cluster.addresses().front().c_str());
    std::fflush(stdout);
    master_lines::print_crashes(cluster);
    master_lines::print_reloads(cluster);
  }
  return cluster.run();
}

}  // namespace

int main(int argc, char** argv) {
  config = parse_args(argc, argv);
  const std::string address = cli::listen_address(config.host, config.port);
  try {
    return serve(address);
  } catch (const std::invalid_argument& e) {  // Options the library refuses, e.g. --host x
    args.fail(e.what());
  } catch (const std::exception& e) {  // set-up failures, e.g. the port is in use
    std::fprintf(stderr, "asio_hello: %s\n", e.what());
    return 1;
  }
}
