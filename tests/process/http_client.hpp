// A blocking HTTP/1.1 test client for the process tests: connects to "127.0.0.1:PORT",
// "[::1]:PORT" or "unix:/path", sends GET with Connection: close and reads the answer to EOF.
// Every step times out after kDeadline, so a server that never answers fails the request
// instead of hanging the test. Connecting and reading are separate steps, so that a test can
// leave many requests waiting in a server at once.
#ifndef PREFORK_TESTS_PROCESS_HTTP_CLIENT_HPP
#define PREFORK_TESTS_PROCESS_HTTP_CLIENT_HPP

#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>

#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "harness.hpp"

namespace prefork_test {

struct HttpResult {
  int status = 0;  ///< 0: no valid answer (see error)
  std::string body;
  std::string error;
};

/// One request on one connection.
class HttpClient {
 public:
  /// Connects (blocking, up to kDeadline). False with error() set if it cannot.
  bool connect(const std::string& address) {
    prefork::detail::SocketAddress a;
    if (prefork::detail::parse_address(address, a)) return fail("bad address " + address);
    fd_.reset(::socket(a.family(), SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!fd_) return fail(std::string("socket: ") + std::strerror(errno));
    timeval tv{static_cast<time_t>(kDeadline.count()), 0};
    ::setsockopt(fd_.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    ::setsockopt(fd_.get(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    int r;
    do {
      r = ::connect(fd_.get(), a.get(), a.length);
    } while (r != 0 && errno == EINTR);
    if (r != 0) return fail("connect " + address + ": " + std::strerror(errno));
    return true;
  }

  /// Sends "GET path" with Connection: close.
  bool send_get(const std::string& path = "/") {
    const std::string request =
        "GET " + path + " HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    if (!fd_ || !write_all(fd_.get(), request)) return fail("send failed");
    return true;
  }

  /// Reads the answer up to EOF and parses its status line and body.
  HttpResult receive() {
    HttpResult r;
    if (!error_.empty()) return {0, {}, error_};
    std::string response;
    char buf[4096];
    for (;;) {
      ssize_t n = ::recv(fd_.get(), buf, sizeof buf, 0);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return {0, {}, std::string("recv: ") + std::strerror(errno)};
      if (n == 0) break;
      response.append(buf, static_cast<std::size_t>(n));
    }
    fd_.reset();
    if (!response.starts_with("HTTP/1.1 ") || response.size() < 12)
      return {0, {}, "no status line in '" + response + "'"};
    r.status = std::atoi(response.substr(9, 3).c_str());
    auto end = response.find("\r\n\r\n");
    if (end != std::string::npos) r.body = response.substr(end + 4);
    return r;
  }

  const std::string& error() const noexcept { return error_; }
  int fd() const noexcept { return fd_.get(); }

 private:
  bool fail(std::string why) {
    error_ = std::move(why);
    fd_.reset();
    return false;
  }

  prefork::UniqueFd fd_;
  std::string error_;
};

/// GET / on address, one connection, Connection: close.
inline HttpResult http_get(const std::string& address) {
  HttpClient c;
  if (c.connect(address)) c.send_get();
  return c.receive();
}

/// GET / on 127.0.0.1:port.
inline HttpResult http_get(int port) { return http_get("127.0.0.1:" + std::to_string(port)); }

/// The pid in hello's "Handled by process <pid>\n", or -1 if the body is not exactly that.
inline pid_t handled_by(const std::string& body) {
  if (!body.starts_with("Handled by process ") || !body.ends_with("\n")) return -1;
  long pid = number_after(body, "Handled by process ");
  if (body != "Handled by process " + std::to_string(pid) + "\n") return -1;
  return static_cast<pid_t>(pid);
}

/// Sends n requests to hello, one after the other; counts the answers by pid (-1: a failure,
/// described in failures).
inline std::map<pid_t, int> get_many(int port, int n, std::vector<std::string>& failures) {
  std::map<pid_t, int> by_pid;
  for (int i = 0; i < n; ++i) {
    HttpResult r = http_get(port);
    pid_t pid = r.status == 200 ? handled_by(r.body) : -1;
    if (pid < 0)
      failures.push_back("request " + std::to_string(i) + ": status " + std::to_string(r.status) +
                         " " + r.error + " body '" + r.body + "'");
    ++by_pid[pid];
  }
  return by_pid;
}

template <class K, class V>
std::set<K> keys(const std::map<K, V>& m) {
  std::set<K> s;
  for (auto& [k, v] : m) s.insert(k);
  return s;
}

/// Reads one HTTP/1.1 answer from fd: the head, then a body of its Content-Length. `buf` holds
/// what was read past the previous answer and keeps what is read past this one. `close` is set
/// when the answer says "Connection: close". Status 0 with error set when no complete answer
/// came (the error says how much of it did).
inline HttpResult read_http_answer(int fd, std::string& buf, bool& close) {
  close = false;
  auto fill = [&]() -> std::string {  // "" when more bytes arrived, else why not
    char chunk[4096];
    for (;;) {
      ssize_t n = ::recv(fd, chunk, sizeof chunk, 0);
      if (n > 0) {
        buf.append(chunk, static_cast<std::size_t>(n));
        return {};
      }
      if (n < 0 && errno == EINTR) continue;
      if (n == 0) return "EOF";
      return std::string("recv: ") + std::strerror(errno);
    }
  };
  auto lower = [](std::string s) {
    for (char& c : s)
      if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
    return s;
  };
  std::size_t head_end;
  while ((head_end = buf.find("\r\n\r\n")) == std::string::npos) {
    std::string why = fill();
    if (!why.empty())
      return {0, {}, why + " after " + std::to_string(buf.size()) + " bytes of the answer ('" + buf + "')"};
  }
  const std::string head = buf.substr(0, head_end + 2);
  if (!head.starts_with("HTTP/1.1 ") || head.size() < 12)
    return {0, {}, "no status line in '" + head + "'"};
  HttpResult r;
  r.status = std::atoi(head.substr(9, 3).c_str());
  std::size_t length = 0;
  for (std::size_t at = head.find("\r\n") + 2; at < head.size();) {
    std::size_t eol = head.find("\r\n", at);
    std::string line = lower(head.substr(at, eol - at));
    at = eol + 2;
    if (line.starts_with("content-length:")) length = std::strtoul(line.c_str() + 15, nullptr, 10);
    if (line.starts_with("connection:") && line.find("close") != std::string::npos) close = true;
  }
  const std::size_t total = head_end + 4 + length;
  while (buf.size() < total) {
    std::string why = fill();
    if (!why.empty()) {
      r.status = 0;
      r.error = why + " in the body, after " + std::to_string(buf.size() - head_end - 4) + " of " +
                std::to_string(length) + " bytes";
      return r;
    }
  }
  r.body = buf.substr(head_end + 4, length);
  buf.erase(0, total);
  return r;
}

/// An HTTP/1.1 client that keeps its connection open between requests (keep-alive), as a
/// browser or a proxy does: one request at a time, each answer read by its Content-Length. It
/// opens a new connection when the last answer said "Connection: close", and when the server
/// closed the idle connection before the next request went out: it looks just before sending,
/// as curl and Go's net/http do, since a request that never left cannot have been lost. Once a
/// request is sent, anything but a complete answer is a failure; it is never resent.
class KeepAliveClient {
 public:
  explicit KeepAliveClient(std::string address) : address_(std::move(address)) {}

  /// GET path on the open connection, or on a new one.
  HttpResult get(const std::string& path = "/") {
    if (conn_.fd() >= 0 && closed_while_idle()) {
      ++idle_closes_;
      drop();
    }
    if (conn_.fd() < 0) {
      conn_ = HttpClient{};
      if (!conn_.connect(address_)) {
        HttpResult r{0, {}, conn_.error()};
        drop();
        return r;
      }
      ++connections_;
      on_connection_ = 0;
    }
    ++on_connection_;
    const std::string request = "GET " + path + " HTTP/1.1\r\nHost: localhost\r\n\r\n";
    if (!write_all(conn_.fd(), request)) {
      HttpResult r{0, {}, std::string("send: ") + std::strerror(errno)};
      drop();
      return r;
    }
    bool close = false;
    HttpResult r = read_http_answer(conn_.fd(), buf_, close);
    closed_by_server_ = close;
    if (r.status == 0 || close) drop();
    return r;
  }

  /// The last answer carried "Connection: close" (the client has closed its end since).
  bool closed_by_server() const noexcept { return closed_by_server_; }
  /// Connections opened so far.
  unsigned connections() const noexcept { return connections_; }
  /// Requests sent on the current connection, the last one included.
  unsigned requests_on_connection() const noexcept { return on_connection_; }
  /// Idle connections found closed by the server before a request was sent on them.
  unsigned idle_closes() const noexcept { return idle_closes_; }
  int fd() const noexcept { return conn_.fd(); }

 private:
  // The server's FIN (or RST) has arrived on the idle connection: readable with nothing to read.
  bool closed_while_idle() {
    pollfd p{conn_.fd(), POLLIN | POLLRDHUP, 0};
    if (::poll(&p, 1, 0) <= 0) return false;
    char c;
    ssize_t n = ::recv(conn_.fd(), &c, 1, MSG_PEEK | MSG_DONTWAIT);
    return n <= 0;  // data before a request would be the server's bug: left for the read
  }
  void drop() {
    conn_ = HttpClient{};
    buf_.clear();
  }

  std::string address_;
  HttpClient conn_;
  std::string buf_;
  bool closed_by_server_ = false;
  unsigned connections_ = 0, on_connection_ = 0, idle_closes_ = 0;
};

/// Clients on threads of their own sending "GET /" to hello back to back until stop(): each
/// keeps one keep-alive connection (KeepAliveClient) or opens a new connection per request
/// (http_get, Connection: close). Every request that does not get hello's 200 is a failure,
/// recorded with what happened; the answering pids are counted per phase (see mark()).
/// Start it only after every fork the test makes (a forked child would copy the threads' locks).
class HttpLoad {
 public:
  enum class Mode { keep_alive, new_connection };

  HttpLoad(std::string address, unsigned clients, Mode mode)
      : address_(std::move(address)), mode_(mode), start_(Clock::now()) {
    results_.resize(clients);
    for (unsigned i = 0; i < clients; ++i) threads_.emplace_back([this, i] { run(i); });
  }
  HttpLoad(int port, unsigned clients, Mode mode)
      : HttpLoad("127.0.0.1:" + std::to_string(port), clients, mode) {}
  HttpLoad(const HttpLoad&) = delete;
  HttpLoad& operator=(const HttpLoad&) = delete;
  ~HttpLoad() { stop(); }

  /// Requests started from now on count under `phase` (0 at first); one that was sent before
  /// a mark() and answered after it counts under kAcross instead.
  void mark(int phase) { phase_.store(phase); }
  static constexpr int kAcross = std::numeric_limits<int>::min();

  /// 200 answers so far.
  std::uint64_t answered() const noexcept { return answered_.load(); }

  /// Waits until at least n requests have been answered with 200; false at the deadline.
  bool wait_answered(std::uint64_t n, Clock::time_point deadline) {
    std::unique_lock lock(mutex_);
    return progress_.wait_until(lock, deadline, [&] { return answered_.load() >= n || stopping_; }) &&
           answered_.load() >= n;
  }

  /// Stops the clients after their current request and joins them.
  void stop() {
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
    }
    progress_.notify_all();
    for (auto& t : threads_)
      if (t.joinable()) t.join();
    threads_.clear();
  }

  // After stop():
  std::uint64_t sent() const {
    std::uint64_t n = 0;
    for (auto& r : results_) n += r.sent;
    return n;
  }
  /// One line per failed request: which client, which request, when, and what came back.
  std::vector<std::string> failures() const {
    std::vector<std::string> all;
    for (auto& r : results_) all.insert(all.end(), r.failures.begin(), r.failures.end());
    return all;
  }
  /// Who answered the requests sent and answered in phase (-1: an answer that is not hello's).
  std::map<pid_t, int> by_pid(int phase) const {
    std::map<pid_t, int> m;
    for (auto& r : results_) {
      auto it = r.by_phase.find(phase);
      if (it == r.by_phase.end()) continue;
      for (auto& [pid, n] : it->second) m[pid] += n;
    }
    return m;
  }
  /// Keep-alive mode: connections opened, and idle ones the server closed before a request.
  unsigned connections() const {
    unsigned n = 0;
    for (auto& r : results_) n += r.connections;
    return n;
  }
  unsigned idle_closes() const {
    unsigned n = 0;
    for (auto& r : results_) n += r.idle_closes;
    return n;
  }

 private:
  struct Results {
    std::uint64_t sent = 0;
    std::vector<std::string> failures;
    std::map<int, std::map<pid_t, int>> by_phase;
    unsigned connections = 0, idle_closes = 0;
  };

  bool stopping() {
    std::lock_guard lock(mutex_);
    return stopping_;
  }

  void run(unsigned i) {
    Results& out = results_[i];
    KeepAliveClient client(address_);
    while (!stopping()) {
      const int phase = phase_.load();
      const auto started = Clock::now();
      HttpResult r;
      unsigned on_connection = 1;
      if (mode_ == Mode::keep_alive) {
        r = client.get();
        on_connection = client.requests_on_connection();
      } else {
        r = http_get(address_);
      }
      ++out.sent;
      pid_t pid = r.status == 200 ? handled_by(r.body) : -1;
      ++out.by_phase[phase_.load() == phase ? phase : kAcross][pid];
      if (pid < 0) {
        using std::chrono::duration_cast;
        using std::chrono::milliseconds;
        out.failures.push_back(
            "client " + std::to_string(i) + " request " + std::to_string(out.sent) +
            (mode_ == Mode::keep_alive
                 ? " (request " + std::to_string(on_connection) + " on connection " +
                       std::to_string(client.connections()) + ")"
                 : std::string()) +
            ", sent " + std::to_string(duration_cast<milliseconds>(started - start_).count()) +
            " ms into the load, phase " + std::to_string(phase) + ": status " +
            std::to_string(r.status) + " " + r.error + " body '" + r.body + "'");
        continue;
      }
      answered_.fetch_add(1);
      {
        std::lock_guard lock(mutex_);  // so that a waiter cannot miss the notification
      }
      progress_.notify_all();
    }
    out.connections = client.connections();
    out.idle_closes = client.idle_closes();
  }

  const std::string address_;
  const Mode mode_;
  const Clock::time_point start_;
  std::vector<Results> results_;
  std::vector<std::thread> threads_;
  std::atomic<int> phase_{0};
  std::atomic<std::uint64_t> answered_{0};
  std::mutex mutex_;
  std::condition_variable progress_;
  bool stopping_ = false;
};

}  // namespace prefork_test

#endif  // PREFORK_TESTS_PROCESS_HTTP_CLIENT_HPP
