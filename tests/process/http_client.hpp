// A blocking HTTP/1.1 test client for the process tests: connects to "127.0.0.1:PORT",
// "[::1]:PORT" or "unix:/path", sends GET with Connection: close and reads the answer to EOF.
// Every step times out after kDeadline, so a server that never answers fails the request
// instead of hanging the test. Connecting and reading are separate steps, so that a test can
// leave many requests waiting in a server at once.
#ifndef PREFORK_TESTS_PROCESS_HTTP_CLIENT_HPP
#define PREFORK_TESTS_PROCESS_HTTP_CLIENT_HPP

#include <sys/socket.h>
#include <sys/time.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <map>
#include <set>
#include <string>
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

}  // namespace prefork_test

#endif  // PREFORK_TESTS_PROCESS_HTTP_CLIENT_HPP
