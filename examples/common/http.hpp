// http::Server: the small HTTP/1.1 server the examples share. It runs on a worker's
// prefork::EventLoop, parses requests (Content-Length bodies, keep-alive, pipelining), calls a
// handler and writes the responses without blocking. Not a framework: enough for the examples,
// health checks and honest benchmarks.
//
//   http::Server http(ctx.loop(), [](const http::Request& req, http::Response& res) {
//     res.body = "hello\n";
//   });
//   void on_connection(prefork::Connection c) { http.adopt(std::move(c)); }
//   void on_drain() { http.drain(); }
//
// A handler that needs something only a callback brings (the shared store, a request to the
// master) defers its answer and completes it later through a Responder:
//
//   [&ctx](const http::Request& req, http::Response& res) {
//     http::Responder r = res.defer();
//     ctx.store().get(req.path(), [r](std::error_code ec, std::optional<std::string> v) {
//       if (ec || !v) return r.send(ec ? 503 : 404, "no\n");
//       r.send(200, *v + "\n");
//     });
//   }
//
// What it does and does not do:
// - Requests: HTTP/1.0 and HTTP/1.1, Content-Length bodies. A request with Transfer-Encoding
//   gets 501 (400 if it also has Content-Length: the request-smuggling case of RFC 9112 §6.1);
//   no example needs chunked uploads. HTTP/1.1 requests need exactly one Host (RFC 9112 §3.2).
//   "Expect: 100-continue" is answered before the body is read, or refused with 413 at once.
// - Keep-alive is the default for HTTP/1.1 and needs "Connection: keep-alive" for HTTP/1.0;
//   "Connection: close" from either side is honoured. Pipelined requests are answered in order.
// - Limits, answered and then closed: malformed 400, request line over max_header_bytes 414,
//   head over max_header_bytes or more than max_headers fields 431, body over max_body_bytes
//   413, HTTP/2+ 505, an unknown expectation 417, a request not complete within
//   request_timeout 408, a handler that throws (or defers and keeps no Responder) 500, a
//   deferred answer not completed within request_timeout (from the end of its request) 504.
// - A deferred answer holds its connection: requests pipelined behind it wait, unanswered
//   (and unread if they are still in the socket), until it is sent, so answers stay in order
//   and a client cannot queue work without bound. Completing it after its connection was
//   closed (the client reset it, the answer timed out, the Server was destroyed) does nothing.
// - Responses are always HTTP/1.1 with Content-Length (computed here; a Content-Length,
//   Transfer-Encoding or Connection set by the handler is dropped, and "Connection: close"
//   from the handler closes the connection), Content-Type text/plain unless the handler set
//   one, and no Date header. HEAD, 204 and 304 responses carry no body.
#ifndef PREFORK_EXAMPLES_COMMON_HTTP_HPP
#define PREFORK_EXAMPLES_COMMON_HTTP_HPP

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <prefork/connection.hpp>
#include <prefork/event_loop.hpp>

namespace http {

using Clock = prefork::Clock;

/// What one connection may send and how long it may take.
struct Limits {
  /// Request line + header fields + the blank line. Over it: 431 (414 for the request line).
  std::size_t max_header_bytes = 8 * 1024;
  /// Header fields per request. Over it: 431.
  std::size_t max_headers = 100;
  /// Content-Length of a request. Over it: 413, before any of the body is read.
  std::size_t max_body_bytes = 1024 * 1024;
  /// A keep-alive connection with no request in progress is closed after this long.
  std::chrono::milliseconds idle_timeout{5000};
  /// From the first byte of a request to its last (a request that trickles in gets 408), and
  /// the longest a response may wait for the client to read any of it.
  std::chrono::milliseconds request_timeout{10000};
  /// After drain(), a connection idle since the drain began is closed after this long, so
  /// that a request the client sent just before the drain is answered (with Connection:
  /// close) instead of being cut off. Closing an idle keep-alive connection always races the
  /// client's next request; the grace makes the race need a client that was silent for this
  /// long. 100 ms was not enough on a loaded 2-core machine: a descheduled load generator
  /// stays silent that long, and its next requests then met closed connections.
  std::chrono::milliseconds drain_idle_grace{500};
  /// After an error answer, how long the server keeps reading (and discarding) what the
  /// client still sends, so that closing with unread data does not reset the connection
  /// before the client has read the answer (nginx's lingering_close).
  std::chrono::milliseconds linger_timeout{1000};
};

namespace detail {

inline char lower(char c) noexcept { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c + 32) : c; }

inline bool iequals(std::string_view a, std::string_view b) noexcept {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (lower(a[i]) != lower(b[i])) return false;
  return true;
}

// tchar (RFC 9110 §5.6.2): the characters of a method or a header field name.
inline constexpr std::array<bool, 256> kTchar = [] {
  std::array<bool, 256> t{};
  for (int c = '0'; c <= '9'; ++c) t[static_cast<std::size_t>(c)] = true;
  for (int c = 'a'; c <= 'z'; ++c) t[static_cast<std::size_t>(c)] = true;
  for (int c = 'A'; c <= 'Z'; ++c) t[static_cast<std::size_t>(c)] = true;
  for (char c : std::string_view("!#$%&'*+-.^_`|~")) t[static_cast<unsigned char>(c)] = true;
  return t;
}();

inline bool is_token(std::string_view s) noexcept {
  if (s.empty()) return false;
  for (char c : s)
    if (!kTchar[static_cast<unsigned char>(c)]) return false;
  return true;
}

// field-value characters (RFC 9110 §5.5): visible ASCII, obs-text, space and tab; no CR, LF, NUL.
inline bool is_field_value(std::string_view s) noexcept {
  for (char ch : s) {
    auto c = static_cast<unsigned char>(ch);
    if (c < 0x20 ? c != '\t' : c == 0x7f) return false;
  }
  return true;
}

inline std::string_view trim(std::string_view s) noexcept {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

// Calls f(token) for each element of a comma-separated list ("close, Upgrade").
template <class F>
void for_each_token(std::string_view list, F f) {
  while (!list.empty()) {
    auto comma = list.find(',');
    auto item = trim(list.substr(0, comma));
    if (!item.empty()) f(item);
    if (comma == std::string_view::npos) break;
    list.remove_prefix(comma + 1);
  }
}

inline std::string_view reason_phrase(int status) noexcept {
  switch (status) {
    case 100: return "Continue";
    case 101: return "Switching Protocols";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 206: return "Partial Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 303: return "See Other";
    case 304: return "Not Modified";
    case 307: return "Temporary Redirect";
    case 308: return "Permanent Redirect";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 410: return "Gone";
    case 411: return "Length Required";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 415: return "Unsupported Media Type";
    case 417: return "Expectation Failed";
    case 422: return "Unprocessable Content";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    default: return "";
  }
}

// A byte buffer with a consumed prefix, so that taking a request off the front is O(1) and
// the bytes behind it move only when the buffer needs room. Unlike std::string it never
// zero-fills the space a read() is about to overwrite.
class Buffer {
 public:
  char* data() noexcept { return data_.get() + begin_; }
  const char* data() const noexcept { return data_.get() + begin_; }
  std::size_t size() const noexcept { return end_ - begin_; }
  bool empty() const noexcept { return begin_ == end_; }
  std::size_t capacity() const noexcept { return cap_; }
  std::size_t writable() const noexcept { return cap_ - end_; }

  void consume(std::size_t n) noexcept {
    begin_ += n;
    if (begin_ >= end_) begin_ = end_ = 0;
  }
  void clear() noexcept { begin_ = end_ = 0; }
  void release() noexcept {
    data_.reset();
    cap_ = begin_ = end_ = 0;
  }

  /// Makes room for at least n more bytes and returns where they go; commit() what was written.
  char* prepare(std::size_t n) {
    if (cap_ - end_ < n) {
      std::size_t used = size();
      if (begin_ > 0 && cap_ - used >= n && cap_ != 0) {
        std::memmove(data_.get(), data_.get() + begin_, used);
      } else {
        std::size_t cap = std::max<std::size_t>({cap_ * 2, used + n, 4096});
        auto bigger = std::make_unique_for_overwrite<char[]>(cap);
        if (used) std::memcpy(bigger.get(), data_.get() + begin_, used);
        data_ = std::move(bigger);
        cap_ = cap;
      }
      begin_ = 0;
      end_ = used;
    }
    return data_.get() + end_;
  }
  void commit(std::size_t n) noexcept { end_ += n; }
  void append(std::string_view s) {
    std::memcpy(prepare(s.size()), s.data(), s.size());
    commit(s.size());
  }

 private:
  std::unique_ptr<char[]> data_;
  std::size_t cap_ = 0, begin_ = 0, end_ = 0;
};

inline char* put(char* p, std::string_view s) noexcept {
  std::memcpy(p, s.data(), s.size());
  return p + s.size();
}

}  // namespace detail

/// One request. Every view points into the connection's input buffer and is valid only during
/// the handler call: copy what you keep.
struct Request {
  std::string_view method;   ///< "GET", case-sensitive as sent
  std::string_view target;   ///< "/path?query" as sent
  std::string_view version;  ///< "HTTP/1.1" or "HTTP/1.0"
  std::vector<std::pair<std::string_view, std::string_view>> headers;  ///< in order, values trimmed
  std::string_view body;
  bool keep_alive = true;    ///< the client lets the connection stay open after this request

  /// The first field named `name` (case-insensitive), or nullopt.
  std::optional<std::string_view> header(std::string_view name) const noexcept {
    for (auto& [k, v] : headers)
      if (detail::iequals(k, name)) return v;
    return std::nullopt;
  }
  /// The target without its query ("/a/b" for "/a/b?x=1").
  std::string_view path() const noexcept { return target.substr(0, target.find('?')); }
  /// The query without its '?' ("x=1" for "/a/b?x=1"), empty if there is none.
  std::string_view query() const noexcept {
    auto q = target.find('?');
    return q == std::string_view::npos ? std::string_view{} : target.substr(q + 1);
  }
};

class Server;
class Responder;

/// One response; the handler fills it. Reused between requests of a connection, so
/// assigning `body` usually does not allocate.
struct Response {
  int status = 200;
  std::vector<std::pair<std::string, std::string>> headers;
  std::string body;

  /// Replaces the field named `name` (case-insensitive) or adds it.
  void set_header(std::string_view name, std::string_view value) {
    for (auto& [k, v] : headers)
      if (detail::iequals(k, name)) {
        v.assign(value);
        return;
      }
    headers.emplace_back(std::string(name), std::string(value));
  }

  /// Answers this request later: the handler returns without an answer, and the returned
  /// Responder (copyable; every copy is the same answer) sends it, from any callback on the
  /// Server's loop. Responder::response() starts as a copy of this Response (fields set
  /// before defer() are kept); changes to this one after defer() are ignored. Calling
  /// defer() again in the same handler call returns the same answer.
  /// The Request's views die with the handler call: copy what the completion needs.
  /// Throws std::logic_error outside a Server's handler call (e.g. on a Response of your own).
  Responder defer();

 private:
  friend class Server;
  Server* server_ = nullptr;  // the Server whose connection owns this Response
};

/// The handler: runs on the worker's loop once per request, and either fills the Response
/// before it returns or defers it (Response::defer()). An exception from it is answered with
/// 500 and the connection is closed.
using Handler = std::function<void(const Request&, Response&)>;

/// An HTTP/1.1 server on one prefork::EventLoop. Not copyable or movable (the loop's callbacks
/// point to it); it must be destroyed before the loop. Every member runs on the loop's thread.
class Server {
 public:
  Server(prefork::EventLoop& loop, Handler handler, Limits limits = {})
      : loop_(loop), handler_(std::move(handler)), limits_(limits) {
    using std::chrono::milliseconds;
    auto shortest = std::min({limits_.idle_timeout, limits_.request_timeout, limits_.linger_timeout});
    sweep_period_ = std::clamp(shortest / 4, milliseconds(10), milliseconds(1000));
    start_sweep(sweep_period_);
  }
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  /// Closes every connection without answering (no on_close calls: the owner is going away).
  /// Deferred answers still outstanding then complete into nothing.
  ~Server() {
    if (sweep_) loop_.cancel(sweep_);
    for (auto& c : active_) {
      if (c->waiting) c->waiting->conn = nullptr;
      loop_.unwatch(c->fd);
      ::close(c->fd);
    }
  }

  /// Takes over an accepted connection: call it from the prefork Server's on_connection.
  /// The connection's watch keeps the loop alive until it is closed.
  void adopt(prefork::Connection conn) {
    prefork::UniqueFd fd = conn.release();
    if (!fd) return;
    // One send per response batch; without TCP_NODELAY a response that follows an unacked
    // one waits for the peer's delayed ACK (up to 40 ms on Linux). Fails harmlessly on unix:.
    int one = 1;
    ::setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    Conn& c = acquire();
    c.fd = fd.get();
    try {
      loop_.watch(c.fd, EPOLLIN, [this, p = &c](std::uint32_t ev) { on_event(*p, ev); });
    } catch (...) {
      c.fd = -1;
      recycle(c);
      return;  // the UniqueFd closes it: the client sees the connection closed
    }
    fd.release();
    c.events = EPOLLIN;
    c.phase = Phase::idle;
    c.deadline = Clock::now() + (draining_ ? limits_.drain_idle_grace : limits_.idle_timeout);
    if (on_open_) on_open_();
    // The request is usually there already (the client sends it right after connect()):
    // reading now saves a round through epoll_wait.
    on_event(c, EPOLLIN);
  }

  /// Graceful stop: call it from the prefork Server's on_drain. From now on every response
  /// carries "Connection: close"; requests in progress are finished, deferred answers
  /// included (until request_timeout: their connections keep the loop alive); idle
  /// connections are closed after Limits::drain_idle_grace. Once the last one is closed
  /// nothing of this server keeps the loop alive (it never did by itself: its sweep timer
  /// does not).
  void drain() {
    if (draining_) return;
    draining_ = true;
    auto grace = Clock::now() + limits_.drain_idle_grace;
    for (auto& c : active_)
      if (c->phase == Phase::idle && c->deadline > grace) c->deadline = grace;
    if (active_.empty()) {
      stop_sweep();
    } else {
      auto half = std::max(std::chrono::milliseconds(1), limits_.drain_idle_grace / 2);
      start_sweep(std::min(sweep_period_, half));
    }
  }
  bool draining() const noexcept { return draining_; }

  std::size_t open_connections() const noexcept { return active_.size(); }
  /// Deferred answers not yet complete (nor timed out, nor orphaned by a closed connection).
  std::size_t deferred() const noexcept { return deferred_; }

  /// Called after a connection is adopted / after it is closed (e.g. to report the count to
  /// WorkerContext::connection_opened() / connection_closed()).
  void on_open(std::function<void()> cb) { on_open_ = std::move(cb); }
  void on_close(std::function<void()> cb) { on_close_ = std::move(cb); }

 private:
  enum class Phase : std::uint8_t {
    idle,       // no request in progress, nothing to write
    reading,    // part of a request has arrived
    writing,    // waiting for the socket to take more of the output
    lingering,  // answered and shut down for writing; discarding input until EOF
    busy,       // transient: a request was just answered, the phase is about to be recomputed
    waiting,    // a deferred answer is not complete yet; nothing to write, nothing read
  };

  struct Conn;

  // One deferred answer, shared by its Responders and its connection. `conn` is set while the
  // connection waits for exactly this answer; closing the connection, timing the answer out or
  // destroying the Server clears it, which is what makes a late completion a no-op without
  // anyone holding a pointer to a Conn that was closed (and maybe freed or reused since).
  struct Pending {
    Server* server = nullptr;
    Conn* conn = nullptr;
    bool done = false;  // done() was called: later calls do nothing
    Response res;
  };
  friend class Responder;
  friend struct Response;

  // What answering a request needs to know about it once its bytes are gone.
  struct RequestInfo {
    bool head = false;
    bool http10 = false;
    bool keep_alive = true;
  };

  struct Conn {
    int fd = -1;
    std::size_t index = 0;      // in active_
    detail::Buffer in, out;
    std::size_t scan = 0;       // where the search for the end of the head resumes
    std::size_t head_len = 0;   // > 0 once the current request's head is complete and valid
    std::size_t body_len = 0;
    Clock::time_point deadline{};
    std::uint32_t events = 0;   // what the loop watches for
    Phase phase = Phase::idle;
    bool close_after_write = false;
    bool linger = false;        // unread input may follow: linger before closing
    bool peer_eof = false;
    bool continue_sent = false;
    Request req;
    Response res;
    RequestInfo info;                  // of the request being answered
    std::shared_ptr<Pending> waiting;  // the deferred answer this connection waits for
    Clock::time_point wait_deadline{};
  };

  struct Head {
    std::size_t content_length = 0;
    bool expect_continue = false;
  };

  enum class Step { answered, need_more, rejected };

  // An output batch is cut here so that a client pipelining without reading cannot make the
  // server buffer without bound; the rest of its requests wait until the batch is sent.
  static constexpr std::size_t kOutputHighWater = 256 * 1024;
  static constexpr std::size_t kReadChunk = 16 * 1024;
  // An idle connection keeps no more buffer than this (one big body must not pin a megabyte).
  static constexpr std::size_t kKeepCapacity = 64 * 1024;
  static constexpr std::size_t kMaxPooled = 256;

  // ---- connection objects --------------------------------------------------------------
  // Closed connections go back to a pool instead of being freed: their buffers are reused by
  // the next connection, and a Conn& stays valid until the current callback returns.

  Conn& acquire() {
    std::unique_ptr<Conn> c;
    if (!pool_.empty()) {
      c = std::move(pool_.back());
      pool_.pop_back();
    } else {
      c = std::make_unique<Conn>();
      c->res.server_ = this;
    }
    c->index = active_.size();
    active_.push_back(std::move(c));
    return *active_.back();
  }

  void recycle(Conn& c) {
    std::size_t i = c.index;
    std::unique_ptr<Conn> owned = std::move(active_[i]);
    if (i + 1 != active_.size()) {
      active_[i] = std::move(active_.back());
      active_[i]->index = i;
    }
    active_.pop_back();
    abandon(c);
    c.in.clear();
    c.out.clear();
    if (c.in.capacity() > kKeepCapacity) c.in.release();
    if (c.out.capacity() > kKeepCapacity) c.out.release();
    c.scan = c.head_len = c.body_len = 0;
    c.events = 0;
    c.phase = Phase::idle;
    c.close_after_write = c.linger = c.peer_eof = c.continue_sent = false;
    pool_.push_back(std::move(owned));  // trimmed by sweep(), outside any connection's callback
  }

  void close(Conn& c) {
    loop_.unwatch(c.fd);  // before close(): the number may be reused at once
    ::close(c.fd);
    c.fd = -1;
    recycle(c);
    if (on_close_) on_close_();
    if (draining_ && active_.empty()) stop_sweep();
  }

  // The connection stops waiting for its deferred answer, which will complete into nothing.
  void abandon(Conn& c) noexcept {
    if (!c.waiting) return;
    c.waiting->conn = nullptr;
    c.waiting.reset();
    --deferred_;
  }

  // ---- events --------------------------------------------------------------------------

  void on_event(Conn& c, std::uint32_t ev) {
    if (c.phase == Phase::lingering) return linger_read(c);
    if (ev & EPOLLERR) return close(c);
    if ((ev & EPOLLOUT) && !flush(c)) return;
    // Nothing is read while an answer is deferred (not even to notice a FIN: a client may
    // half-close after its request and still read the answer). EPOLLHUP, which epoll reports
    // even when nothing is watched, means the peer reset: nobody will read the answer.
    if (c.waiting) return (ev & EPOLLHUP) ? close(c) : pump(c);
    if ((ev & (EPOLLIN | EPOLLHUP)) && c.out.empty() && !c.close_after_write && !read_some(c))
      return;
    pump(c);
  }

  // Returns false if the connection was closed.
  bool read_some(Conn& c) {
    std::size_t want = kReadChunk;
    if (c.head_len && c.head_len + c.body_len > c.in.size())
      want = std::max(want, c.head_len + c.body_len - c.in.size());
    char* p = c.in.prepare(want);
    for (;;) {
      ssize_t n = ::recv(c.fd, p, c.in.writable(), 0);
      if (n > 0) {
        c.in.commit(static_cast<std::size_t>(n));
        return true;
      }
      if (n == 0) {
        c.peer_eof = true;
        return true;
      }
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return true;
      close(c);
      return false;
    }
  }

  // Sends what it can; MSG_NOSIGNAL so that a peer that went away is EPIPE here rather than a
  // process-wide SIGPIPE. Returns false if the connection was closed.
  bool flush(Conn& c) {
    bool progress = false;
    while (!c.out.empty()) {
      ssize_t n = ::send(c.fd, c.out.data(), c.out.size(), MSG_NOSIGNAL);
      if (n > 0) {
        c.out.consume(static_cast<std::size_t>(n));
        progress = true;
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        if (progress || c.phase != Phase::writing) {
          c.phase = Phase::writing;
          c.deadline = Clock::now() + limits_.request_timeout;
        }
        return true;
      }
      close(c);
      return false;
    }
    return true;
  }

  // Answers every complete request in the input, in order, then writes the answers with one
  // send. Decides what to watch for next and when the connection times out.
  void pump(Conn& c) {
    for (;;) {
      bool cut = false;
      while (!c.close_after_write && !c.waiting) {
        if (c.out.size() >= kOutputHighWater) {
          cut = true;
          break;
        }
        if (next_request(c) == Step::need_more) break;
      }
      if (!c.out.empty() && !flush(c)) return;
      if (!c.out.empty()) break;  // the socket is full: wait for EPOLLOUT, stop reading
      if (c.close_after_write) return finish(c);
      if (!cut) break;
    }
    // What is left can never complete (a deferred answer still goes out).
    if (c.peer_eof && c.out.empty() && !c.waiting) return close(c);

    std::uint32_t want = EPOLLOUT;
    if (c.out.empty()) want = c.waiting ? 0u : std::uint32_t{EPOLLIN};
    if (want != c.events && !loop_.modify(c.fd, want)) c.events = want;

    if (!c.out.empty()) return;  // flush() set the write deadline
    if (c.waiting) {
      c.phase = Phase::waiting;
      c.deadline = c.wait_deadline;
      return;
    }
    if (!c.in.empty() || c.head_len) {
      if (c.phase != Phase::reading) {
        c.phase = Phase::reading;
        c.deadline = Clock::now() + limits_.request_timeout;
      }
    } else if (c.phase != Phase::idle) {
      c.phase = Phase::idle;
      c.deadline = Clock::now() + (draining_ ? limits_.drain_idle_grace : limits_.idle_timeout);
      if (c.in.capacity() > kKeepCapacity) c.in.release();
      if (c.out.capacity() > kKeepCapacity) c.out.release();
    }
  }

  // The connection will not be reused: close it, or first linger if the client may still be
  // sending (closing with unread input makes the kernel send RST, and the client may lose the
  // answer it has not read yet).
  void finish(Conn& c) {
    if (c.peer_eof || (!c.linger && c.in.empty())) return close(c);
    ::shutdown(c.fd, SHUT_WR);
    c.in.clear();
    c.phase = Phase::lingering;
    c.deadline = Clock::now() + limits_.linger_timeout;
    if (c.events != EPOLLIN && !loop_.modify(c.fd, EPOLLIN)) c.events = EPOLLIN;
  }

  void linger_read(Conn& c) {
    char* p = c.in.prepare(kReadChunk);
    for (int i = 0; i < 4; ++i) {
      ssize_t n = ::recv(c.fd, p, c.in.writable(), 0);
      if (n > 0) continue;
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
      return close(c);  // EOF or error: the client has what it will read
    }
  }

  // ---- requests ------------------------------------------------------------------------

  Step next_request(Conn& c) {
    Head head;
    if (c.head_len == 0) {
      if (c.scan == 0) skip_empty_lines(c.in);  // RFC 9112 §2.2: ignore CRLFs before a request
      const char* d = c.in.data();
      std::size_t n = c.in.size();
      std::size_t len = find_head_end(d, n, c.scan);
      if (len == 0 && n <= limits_.max_header_bytes) return Step::need_more;
      if (len == 0 || len > limits_.max_header_bytes) {
        bool line_fits = std::memchr(d, '\n', std::min(n, limits_.max_header_bytes)) != nullptr;
        return reject(c, line_fits ? 431 : 414);
      }
      if (int status = parse_head(d, len, c.req, head)) return reject(c, status);
      if (head.content_length > limits_.max_body_bytes) return reject(c, 413);
      c.head_len = len;
      c.body_len = head.content_length;
      if (n - len < c.body_len) {
        if (head.expect_continue && !c.continue_sent) {
          c.out.append("HTTP/1.1 100 Continue\r\n\r\n");
          c.continue_sent = true;
        }
        return Step::need_more;
      }
    } else {
      if (c.in.size() - c.head_len < c.body_len) return Step::need_more;
      parse_head(c.in.data(), c.head_len, c.req, head);  // valid: it was parsed before
    }
    c.req.body = std::string_view(c.in.data() + c.head_len, c.body_len);
    respond(c);
    c.in.consume(c.head_len + c.body_len);
    c.head_len = c.body_len = c.scan = 0;
    c.continue_sent = false;
    c.phase = Phase::busy;
    return Step::answered;
  }

  static void skip_empty_lines(detail::Buffer& in) noexcept {
    for (int i = 0; i < 8 && !in.empty(); ++i) {
      const char* d = in.data();
      if (d[0] == '\n') {
        in.consume(1);
      } else if (d[0] == '\r' && in.size() >= 2 && d[1] == '\n') {
        in.consume(2);
      } else {
        break;
      }
    }
  }

  // The length of the head through its blank line, or 0 if it has not all arrived. `line` is
  // where the unfinished line starts, so a head that trickles in is scanned once. Lines end in
  // CRLF or, leniently, LF (RFC 9112 §2.2).
  static std::size_t find_head_end(const char* d, std::size_t n, std::size_t& line) noexcept {
    while (line < n) {
      auto* nl = static_cast<const char*>(std::memchr(d + line, '\n', n - line));
      if (!nl) return 0;
      auto end = static_cast<std::size_t>(nl - d);
      if (end == line || (end == line + 1 && d[line] == '\r')) return end + 1;
      line = end + 1;
    }
    return 0;
  }

  static std::string_view next_line(const char*& p, const char* end) noexcept {
    auto* nl = static_cast<const char*>(std::memchr(p, '\n', static_cast<std::size_t>(end - p)));
    std::string_view line(p, static_cast<std::size_t>(nl - p));
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    p = nl + 1;
    return line;
  }

  // Parses a complete head into req. Returns 0, or the status to answer with.
  int parse_head(const char* d, std::size_t len, Request& req, Head& head) const {
    using detail::iequals;
    const char* p = d;
    const char* end = d + len;
    req.headers.clear();
    req.body = {};

    std::string_view line = next_line(p, end);
    auto sp1 = line.find(' ');
    if (sp1 == std::string_view::npos) return 400;
    req.method = line.substr(0, sp1);
    auto rest = line.substr(sp1 + 1);
    auto sp2 = rest.find(' ');
    if (sp2 == std::string_view::npos) return 400;
    req.target = rest.substr(0, sp2);
    req.version = rest.substr(sp2 + 1);
    if (!detail::is_token(req.method) || req.target.empty()) return 400;
    for (char ch : req.target)
      if (static_cast<unsigned char>(ch) <= 0x20 || static_cast<unsigned char>(ch) >= 0x7f) return 400;
    const std::string_view v = req.version;
    if (v.size() != 8 || v.substr(0, 5) != "HTTP/" || v[6] != '.' || v[5] < '0' || v[5] > '9' ||
        v[7] < '0' || v[7] > '9')
      return 400;
    if (v[5] != '1') return 505;
    const bool http11 = v[7] != '0';  // 1.x: answer as the highest 1.x we implement

    bool has_length = false, has_te = false, close = false, keep_alive = false;
    int hosts = 0;
    for (;;) {
      line = next_line(p, end);
      if (line.empty()) break;
      if (line.front() == ' ' || line.front() == '\t') return 400;  // obs-fold (RFC 9112 §5.2)
      auto colon = line.find(':');
      if (colon == std::string_view::npos) return 400;
      auto name = line.substr(0, colon);
      auto value = detail::trim(line.substr(colon + 1));
      if (!detail::is_token(name) || !detail::is_field_value(value)) return 400;
      if (req.headers.size() >= limits_.max_headers) return 431;
      req.headers.emplace_back(name, value);

      if (iequals(name, "content-length")) {
        std::size_t n = 0;
        if (value.empty()) return 400;
        for (char ch : value) {
          if (ch < '0' || ch > '9') return 400;  // also refuses "5, 5" lists
          n = n > (std::size_t{1} << 52) ? n : n * 10 + static_cast<std::size_t>(ch - '0');
        }
        if (has_length && n != head.content_length) return 400;
        has_length = true;
        head.content_length = n;
      } else if (iequals(name, "transfer-encoding")) {
        has_te = true;
      } else if (iequals(name, "connection")) {
        detail::for_each_token(value, [&](std::string_view t) {
          if (iequals(t, "close")) close = true;
          else if (iequals(t, "keep-alive")) keep_alive = true;
        });
      } else if (iequals(name, "host")) {
        ++hosts;
      } else if (iequals(name, "expect") && http11) {
        if (!iequals(value, "100-continue")) return 417;
        head.expect_continue = true;
      }
    }
    if (has_te) return has_length ? 400 : 501;
    if (hosts > 1 || (http11 && hosts == 0)) return 400;
    req.keep_alive = !close && (http11 || keep_alive);
    return 0;
  }

  void respond(Conn& c) {
    Response& res = c.res;
    res.status = 200;
    res.headers.clear();
    res.body.clear();
    c.info = {c.req.method == "HEAD", c.req.version == "HTTP/1.0", c.req.keep_alive};
    handling_ = &c;
    try {
      handler_(c.req, res);
    } catch (const std::exception& e) {
      handling_ = nullptr;
      abandon(c);
      report(std::string("handler threw: ") + e.what());
      reject(c, 500);
      return;
    } catch (...) {
      handling_ = nullptr;
      abandon(c);
      report("handler threw a non-standard exception");
      reject(c, 500);
      return;
    }
    handling_ = nullptr;
    if (!c.waiting) return answer(c, res);
    if (c.waiting->done) {  // completed before the handler returned: answer it now
      std::shared_ptr<Pending> p = c.waiting;
      abandon(c);
      return answer(c, p->res);
    }
    if (c.waiting.use_count() == 1) {  // nobody can complete it: say so now, not at the timeout
      abandon(c);
      report("handler deferred its answer and kept no Responder");
      reject(c, 500);
      return;
    }
    c.wait_deadline = Clock::now() + limits_.request_timeout;
  }

  // Called by Response::defer() from inside a handler call.
  std::shared_ptr<Pending> defer(Response& res) {
    if (!handling_ || &handling_->res != &res)
      throw std::logic_error("http::Response::defer() called outside the handler call");
    Conn& c = *handling_;
    if (!c.waiting) {
      c.waiting = std::make_shared<Pending>();
      c.waiting->server = this;
      c.waiting->conn = &c;
      c.waiting->res = res;
      ++deferred_;
    }
    return c.waiting;
  }

  // Called by Responder::done(), on the loop.
  void complete(const std::shared_ptr<Pending>& p) {
    if (!p->conn || p->done) return;
    p->done = true;
    if (p->conn == handling_) return;  // respond() answers it once the handler returns
    // From the loop rather than from here: done() may be called from anywhere on the loop,
    // another connection's handler or an on_close callback included, where answering (and
    // then running the handler for the next pipelined request) would re-enter this Server.
    loop_.post([p] {
      if (!p->conn) return;  // closed, timed out or destroyed meanwhile
      Server& s = *p->server;
      Conn& c = *p->conn;
      s.abandon(c);
      s.answer(c, p->res);
      c.phase = Phase::busy;
      s.pump(c);  // sends it, then goes on with what was pipelined behind it
    });
  }

  void answer(Conn& c, Response& res) {
    if (res.status < 100 || res.status > 999) {
      report("handler set status " + std::to_string(res.status));
      reject(c, 500);
      return;
    }
    bool keep = c.info.keep_alive && !draining_;
    for (auto& [k, v] : res.headers) {
      if (!detail::is_token(k) || !detail::is_field_value(v)) {
        report("handler set an invalid header field '" + k + "'");
        reject(c, 500);
        return;
      }
      if (detail::iequals(k, "connection"))
        detail::for_each_token(v, [&](std::string_view t) {
          if (detail::iequals(t, "close")) keep = false;
        });
    }
    if (!keep) c.close_after_write = true;
    // An HTTP/1.0 client closes unless told otherwise; an HTTP/1.1 one keeps it by default.
    ConnectionHeader conn = !keep ? ConnectionHeader::close
                            : c.info.http10 ? ConnectionHeader::keep_alive
                                            : ConnectionHeader::none;
    write_response(c.out, res.status, res.headers, res.body, !c.info.head, conn);
  }

  Step reject(Conn& c, int status) {
    static const std::vector<std::pair<std::string, std::string>> no_headers;
    char body[64];
    std::string_view reason = detail::reason_phrase(status);
    auto r = std::to_chars(body, body + 4, status);
    char* p = r.ptr;
    *p++ = ' ';
    p = detail::put(p, reason);
    *p++ = '\n';
    write_response(c.out, status, no_headers, std::string_view(body, static_cast<std::size_t>(p - body)),
                   true, ConnectionHeader::close);
    c.close_after_write = true;
    c.linger = true;
    return Step::rejected;
  }

  enum class ConnectionHeader { none, keep_alive, close };

  static void write_response(detail::Buffer& out, int status,
                             const std::vector<std::pair<std::string, std::string>>& headers,
                             std::string_view body, bool send_body, ConnectionHeader conn) {
    using detail::iequals;
    using detail::put;
    constexpr std::string_view kType = "Content-Type: text/plain\r\n";
    std::string_view reason = detail::reason_phrase(status);
    bool framed = status >= 200 && status != 204 && status != 304;
    bool typed = false;
    auto ours = [](std::string_view k) {
      return iequals(k, "content-length") || iequals(k, "transfer-encoding") ||
             iequals(k, "connection");
    };
    std::size_t size = 16 + reason.size() + kType.size() + 40 + 26 + 2;
    for (auto& [k, v] : headers) {
      size += k.size() + v.size() + 4;
      if (iequals(k, "content-type")) typed = true;
    }
    if (send_body && framed) size += body.size();

    char* start = out.prepare(size);
    char* p = put(start, "HTTP/1.1 ");
    p = std::to_chars(p, p + 3, status).ptr;
    *p++ = ' ';
    p = put(p, reason);
    p = put(p, "\r\n");
    for (auto& [k, v] : headers) {
      if (ours(k)) continue;
      p = put(p, k);
      p = put(p, ": ");
      p = put(p, v);
      p = put(p, "\r\n");
    }
    if (!typed && framed) p = put(p, kType);
    if (framed) {
      p = put(p, "Content-Length: ");
      p = std::to_chars(p, p + 20, body.size()).ptr;
      p = put(p, "\r\n");
    }
    if (conn == ConnectionHeader::close) p = put(p, "Connection: close\r\n");
    if (conn == ConnectionHeader::keep_alive) p = put(p, "Connection: keep-alive\r\n");
    p = put(p, "\r\n");
    if (send_body && framed) p = put(p, body);
    out.commit(static_cast<std::size_t>(p - start));
  }

  static void report(const std::string& what) {
    std::string line = "http: pid " + std::to_string(::getpid()) + ": " + what + "\n";
    (void)!::write(2, line.data(), line.size());
  }

  // ---- timeouts ------------------------------------------------------------------------
  // One periodic sweep for all connections rather than a timer each: a request costs no timer
  // operations, only a clock read when a connection changes phase. The sweep never keeps the
  // loop alive, so a drained worker exits as soon as its connections are gone.

  void start_sweep(std::chrono::milliseconds period) {
    stop_sweep();
    sweep_ = loop_.every(period, [this] { sweep(); }, false);
  }
  void stop_sweep() {
    if (sweep_) loop_.cancel(sweep_);
    sweep_ = 0;
  }

  void sweep() {
    auto now = Clock::now();
    for (std::size_t i = active_.size(); i-- > 0;) {  // close() moves the last one into i
      Conn& c = *active_[i];
      if (now < c.deadline) continue;
      if (c.phase == Phase::waiting) {
        // Answered here, so whatever completes it later finds it abandoned. The connection
        // closes after the 504: requests pipelined behind it were never read.
        abandon(c);
        reject(c, 504);
        pump(c);
        continue;
      }
      if (c.phase == Phase::reading && c.out.empty()) {
        reject(c, 408);  // best effort, one send: the client is not keeping up anyway
        (void)!::send(c.fd, c.out.data(), c.out.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
      }
      close(c);
    }
    if (pool_.size() > kMaxPooled) pool_.resize(kMaxPooled);
  }

  prefork::EventLoop& loop_;
  Handler handler_;
  Limits limits_;
  std::vector<std::unique_ptr<Conn>> active_;
  std::vector<std::unique_ptr<Conn>> pool_;
  std::function<void()> on_open_, on_close_;
  std::chrono::milliseconds sweep_period_{1000};
  prefork::EventLoop::TimerId sweep_ = 0;
  bool draining_ = false;
  Conn* handling_ = nullptr;  // the connection whose handler is running
  std::size_t deferred_ = 0;
};

/// A deferred answer (Response::defer()). Copies share it; the first done() sends it, and
/// later calls do nothing. Every member runs on the Server's loop, in the worker process.
class Responder {
 public:
  /// An empty Responder: done() does nothing, response() throws.
  Responder() = default;

  /// The answer to fill in before done(): at first a copy of the handler's Response as it
  /// was when it called defer(). Throws std::logic_error on an empty Responder.
  Response& response() const {
    if (!p_) throw std::logic_error("http::Responder::response() on an empty Responder");
    return p_->res;
  }

  /// Sends response(). Does nothing if it was sent already, if its connection is gone (the
  /// client closed it or reset it, the Server was destroyed) or if request_timeout ran out
  /// first (the client got 504). Never answers from inside this call: the answer goes out
  /// from the loop, before it next blocks, so done() is safe from any callback (another
  /// connection's handler included); called inside this request's own handler, the answer
  /// goes out when the handler returns, as a synchronous one would.
  void done() const {
    if (p_ && p_->conn) p_->server->complete(p_);
  }

  /// Sets the status and the body, then done().
  void send(int status, std::string_view body) const {
    if (!p_ || !p_->conn || p_->done) return;
    p_->res.status = status;
    p_->res.body.assign(body);
    done();
  }

  /// True while the connection waits for this answer and done() has not been called.
  bool waiting() const noexcept { return p_ && p_->conn && !p_->done; }

 private:
  friend struct Response;
  explicit Responder(std::shared_ptr<Server::Pending> p) : p_(std::move(p)) {}
  std::shared_ptr<Server::Pending> p_;
};

inline Responder Response::defer() {
  if (!server_) throw std::logic_error("http::Response::defer() called outside the handler call");
  return Responder(server_->defer(*this));
}

}  // namespace http

#endif  // PREFORK_EXAMPLES_COMMON_HTTP_HPP
