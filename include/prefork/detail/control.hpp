// The master's control socket (`hello ctl status|reload|scale N|stop|upgrade`): a Unix stream
// socket speaking JSON lines, one flat object per request, one line per reply in request order.
// This header holds the JSON subset it needs, the server the master runs on its loop and the
// blocking client any prefork binary runs as `ctl`; what each command does is the master's.
//
// Why a socket and not signals: nginx's `-s reload` and PM2's daemon socket tell the operator
// whether the command worked (a rolling restart can fail), and a signal cannot carry "scale 8".
// Why its own tiny JSON: requests are flat objects of scalars, so a full JSON library would be a
// dependency for a few hundred lines; replies are written by the master, which knows their shape.
#ifndef PREFORK_DETAIL_CONTROL_HPP
#define PREFORK_DETAIL_CONTROL_HPP

#include <fcntl.h>
#include <poll.h>
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

#include <prefork/detail/syscall.hpp>
#include <prefork/detail/unique_fd.hpp>
#include <prefork/event_loop.hpp>

namespace prefork::detail {

// ---------------------------------------------------------------------------------------------
// JSON: quoting any bytes, and parsing one flat object
// ---------------------------------------------------------------------------------------------

/// The length of the well-formed UTF-8 sequence starting at s[i] (1 to 4), or 0 if there is
/// none: overlong forms, UTF-16 surrogates (U+D800..U+DFFF) and code points above U+10FFFF are
/// ill-formed (RFC 3629 section 4 grammar).
inline std::size_t utf8_sequence(std::string_view s, std::size_t i) noexcept {
  auto byte = [&](std::size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = byte(i);
  if (c < 0x80) return 1;
  std::size_t n;
  unsigned char lo = 0x80, hi = 0xbf;  // the allowed range of the second byte
  if (c >= 0xc2 && c <= 0xdf) {
    n = 2;
  } else if (c >= 0xe0 && c <= 0xef) {
    n = 3;
    if (c == 0xe0) lo = 0xa0;  // overlong
    if (c == 0xed) hi = 0x9f;  // surrogates
  } else if (c >= 0xf0 && c <= 0xf4) {
    n = 4;
    if (c == 0xf0) lo = 0x90;  // overlong
    if (c == 0xf4) hi = 0x8f;  // above U+10FFFF
  } else {
    return 0;
  }
  if (s.size() - i < n) return 0;
  if (byte(i + 1) < lo || byte(i + 1) > hi) return 0;
  for (std::size_t k = 2; k < n; ++k)
    if ((byte(i + k) & 0xc0) != 0x80) return 0;
  return n;
}

/// `s` as a JSON string literal, quotes included. Control characters are escaped, well-formed
/// UTF-8 passes through and every byte that is not part of a well-formed sequence becomes
/// \ufffd, so the result is always valid JSON (a file name or an error text may hold any bytes).
inline std::string json_quote(std::string_view s) {
  static constexpr char hex[] = "0123456789abcdef";
  std::string out;
  out.reserve(s.size() + 2);
  out += '"';
  for (std::size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
      ++i;
    } else if (c < 0x20) {
      out += "\\u00";
      out += hex[c >> 4];
      out += hex[c & 0xf];
      ++i;
    } else if (std::size_t n = utf8_sequence(s, i); n == 0) {
      out += "\\ufffd";
      ++i;
    } else {
      out.append(s.substr(i, n));
      i += n;
    }
  }
  out += '"';
  return out;
}

/// One scalar value of a flat JSON object. `text`: the decoded string; a number's literal as
/// written; "true"/"false"; "null".
struct JsonScalar {
  enum class Type { string, number, boolean, null };
  Type type = Type::null;
  std::string text;
};

using JsonFields = std::map<std::string, JsonScalar, std::less<>>;

/// The most fields a request object may have.
inline constexpr std::size_t kMaxJsonFields = 64;

namespace json_parse {

// A cursor over the text with the error it stopped at. Every read checks the bounds: the
// parser is fed untrusted bytes (and fuzzed, tests/fuzz/control.fuzz.cpp).
struct Cursor {
  std::string_view s;
  std::size_t pos = 0;
  std::string* error;

  bool at_end() const noexcept { return pos >= s.size(); }
  char peek() const noexcept { return at_end() ? '\0' : s[pos]; }
  bool fail(std::string_view what) {
    *error = std::string(what) + " at offset " + std::to_string(pos);
    return false;
  }
  void skip_ws() noexcept {
    while (!at_end() && (s[pos] == ' ' || s[pos] == '\t' || s[pos] == '\n' || s[pos] == '\r'))
      ++pos;
  }
};

inline int hex_value(char c) noexcept {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Four hex digits after "\u".
inline bool hex4(Cursor& c, std::uint32_t& v) {
  if (c.s.size() - c.pos < 4) return c.fail("truncated \\u escape");
  v = 0;
  for (int k = 0; k < 4; ++k) {
    int h = hex_value(c.s[c.pos]);
    if (h < 0) return c.fail("bad hex digit in \\u escape");
    v = v * 16 + static_cast<std::uint32_t>(h);
    ++c.pos;
  }
  return true;
}

inline void append_utf8(std::string& out, std::uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xc0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xe0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  } else {
    out += static_cast<char>(0xf0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3f));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  }
}

// A string literal, the cursor on its opening quote; `out` gets the decoded bytes.
inline bool string(Cursor& c, std::string& out) {
  ++c.pos;  // the opening quote
  out.clear();
  for (;;) {
    if (c.at_end()) return c.fail("unterminated string");
    const unsigned char ch = static_cast<unsigned char>(c.s[c.pos]);
    if (ch == '"') {
      ++c.pos;
      return true;
    }
    if (ch < 0x20) return c.fail("control character in string");
    if (ch == '\\') {
      if (c.s.size() - c.pos < 2) return c.fail("truncated escape");
      const char e = c.s[c.pos + 1];
      c.pos += 2;
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          std::uint32_t cp = 0;
          if (!hex4(c, cp)) return false;
          if (cp >= 0xdc00 && cp <= 0xdfff) return c.fail("unpaired low surrogate");
          if (cp >= 0xd800 && cp <= 0xdbff) {
            if (c.s.size() - c.pos < 2 || c.s[c.pos] != '\\' || c.s[c.pos + 1] != 'u')
              return c.fail("unpaired high surrogate");
            c.pos += 2;
            std::uint32_t low = 0;
            if (!hex4(c, low)) return false;
            if (low < 0xdc00 || low > 0xdfff) return c.fail("unpaired high surrogate");
            cp = 0x10000 + ((cp - 0xd800) << 10) + (low - 0xdc00);
          }
          append_utf8(out, cp);
          break;
        }
        default:
          c.pos -= 2;
          return c.fail("bad escape");
      }
      continue;
    }
    std::size_t n = utf8_sequence(c.s, c.pos);
    if (n == 0) return c.fail("invalid UTF-8");
    out.append(c.s.substr(c.pos, n));
    c.pos += n;
  }
}

inline bool is_digit(char ch) noexcept { return ch >= '0' && ch <= '9'; }

// A number as RFC 8259 section 6 writes it; `out` gets the literal.
inline bool number(Cursor& c, std::string& out) {
  const std::size_t start = c.pos;
  if (c.peek() == '-') ++c.pos;
  if (c.peek() == '0') {
    ++c.pos;
  } else if (is_digit(c.peek())) {
    while (is_digit(c.peek())) ++c.pos;
  } else {
    return c.fail("bad number");
  }
  if (c.peek() == '.') {
    ++c.pos;
    if (!is_digit(c.peek())) return c.fail("bad number");
    while (is_digit(c.peek())) ++c.pos;
  }
  if (c.peek() == 'e' || c.peek() == 'E') {
    ++c.pos;
    if (c.peek() == '+' || c.peek() == '-') ++c.pos;
    if (!is_digit(c.peek())) return c.fail("bad number");
    while (is_digit(c.peek())) ++c.pos;
  }
  out.assign(c.s.substr(start, c.pos - start));
  return true;
}

inline bool literal(Cursor& c, std::string_view word) {
  if (c.s.substr(c.pos, word.size()) != word) return c.fail("unexpected character");
  c.pos += word.size();
  return true;
}

inline bool value(Cursor& c, JsonScalar& v) {
  switch (c.peek()) {
    case '"': v.type = JsonScalar::Type::string; return string(c, v.text);
    case 't': v.type = JsonScalar::Type::boolean; v.text = "true"; return literal(c, "true");
    case 'f': v.type = JsonScalar::Type::boolean; v.text = "false"; return literal(c, "false");
    case 'n': v.type = JsonScalar::Type::null; v.text = "null"; return literal(c, "null");
    case '{':
    case '[': return c.fail("nested value (only flat objects of scalars are accepted)");
    default:
      if (c.peek() == '-' || is_digit(c.peek())) {
        v.type = JsonScalar::Type::number;
        return number(c, v.text);
      }
      return c.at_end() ? c.fail("missing value") : c.fail("unexpected character");
  }
}

}  // namespace json_parse

/// Parses one JSON object whose values are scalars (no nesting), surrounded by optional
/// whitespace. Returns false with `error` naming what is wrong and its byte offset for anything
/// else: nested values, duplicate keys, trailing bytes, bad escapes, unpaired surrogates, more
/// than kMaxJsonFields fields, ill-formed UTF-8. `out` is cleared first; after a failure it
/// holds the fields read so far. Never undefined behaviour, whatever the bytes.
inline bool parse_flat_object(std::string_view text, JsonFields& out, std::string& error) {
  out.clear();
  error.clear();
  json_parse::Cursor c{text, 0, &error};
  c.skip_ws();
  if (c.peek() != '{' || c.at_end()) return c.fail("expected '{'");
  ++c.pos;
  c.skip_ws();
  if (c.peek() == '}' && !c.at_end()) {
    ++c.pos;
  } else {
    for (;;) {
      if (c.peek() != '"' || c.at_end()) return c.fail("expected a string key");
      const std::size_t key_at = c.pos;
      std::string key;
      if (!json_parse::string(c, key)) return false;
      c.skip_ws();
      if (c.peek() != ':' || c.at_end()) return c.fail("expected ':'");
      ++c.pos;
      c.skip_ws();
      JsonScalar v;
      if (!json_parse::value(c, v)) return false;
      if (out.size() >= kMaxJsonFields) {
        c.pos = key_at;
        return c.fail("more than " + std::to_string(kMaxJsonFields) + " fields");
      }
      if (!out.emplace(std::move(key), std::move(v)).second) {
        c.pos = key_at;
        return c.fail("duplicate key");
      }
      c.skip_ws();
      if (c.peek() == ',' && !c.at_end()) {
        ++c.pos;
        c.skip_ws();
        continue;
      }
      if (c.peek() == '}' && !c.at_end()) {
        ++c.pos;
        break;
      }
      return c.fail("expected ',' or '}'");
    }
  }
  c.skip_ws();
  if (!c.at_end()) return c.fail("trailing bytes after the object");
  return true;
}

// ---------------------------------------------------------------------------------------------
// The server (master process)
// ---------------------------------------------------------------------------------------------

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

  explicit ControlServer(EventLoop& loop) : loop_(loop) {}
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
    if (pause_timer_) loop_.cancel(std::exchange(pause_timer_, 0));
    if (listener_) {
      loop_.unwatch(listener_.get());
      listener_.reset();
    }
  }

  /// Stops accepting and closes the listening socket and every connection; replies still
  /// pending go nowhere (their closed() turns true). The socket file stays.
  void close() noexcept {
    if (pause_timer_) loop_.cancel(std::exchange(pause_timer_, 0));
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
    if (::connect(probe.get(), addr, len) == 0 || errno != ECONNREFUSED)
      return std::make_error_code(std::errc::address_in_use);
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) return errno_code();
    return {};
  }

  // An O_PATH descriptor of the socket file (-1 if it is not one). Holding it keeps the inode
  // allocated, so a successor's file can never get the same inode number (which a filesystem
  // reuses once an inode is freed, so comparing remembered numbers would not do).
  static UniqueFd open_file(const std::string& path) noexcept {
    UniqueFd f(::open(path.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC));
    struct stat st {};
    if (f && (::fstat(f.get(), &st) != 0 || !S_ISSOCK(st.st_mode))) f.reset();
    return f;
  }

  std::error_code start(UniqueFd fd, const std::string& path, UniqueFd file) {
    const int raw = fd.get();
    try {
      loop_.watch(raw, EventLoop::readable, [this](std::uint32_t) { accept_some(); }, false);
    } catch (const std::system_error& e) {
      return e.code();
    }
    listener_ = std::move(fd);
    path_ = path;
    file_ = std::move(file);
    return {};
  }

  // Sends one line, without waiting, on a connection that is not kept (its caller closes it).
  static void refuse(int fd, std::string_view line) noexcept {
    (void)retry_eintr(
        [&] { return ::send(fd, line.data(), line.size(), MSG_NOSIGNAL | MSG_DONTWAIT); });
  }

  void accept_some() {
    for (int i = 0; i < 64 && listener_; ++i) {
      UniqueFd fd(::accept4(listener_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
      if (!fd) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) return;
        if (errno == EINTR || errno == ECONNABORTED || errno == EPROTO || errno == EPERM) continue;
        // EMFILE, ENFILE, ENOBUFS, ENOMEM: the socket stays readable, so a level-triggered
        // watch would spin. Pause, and look again from a timer.
        loop_.unwatch(listener_.get());
        pause_timer_ = loop_.after(std::chrono::milliseconds(100), [this] {
          pause_timer_ = 0;
          if (listener_)
            loop_.watch(listener_.get(), EventLoop::readable,
                        [this](std::uint32_t) { accept_some(); }, false);
        }, false);
        return;
      }
      ucred peer{};
      socklen_t n = sizeof peer;
      if (::getsockopt(fd.get(), SOL_SOCKET, SO_PEERCRED, &peer, &n) != 0) continue;
      const uid_t me = ::geteuid();
      if (peer.uid != me && peer.uid != 0) {
        refuse(fd.get(),
               control_failure_line("permission denied: uid " + std::to_string(peer.uid) +
                                    " is not the master's uid " + std::to_string(me) + " or root"));
        continue;
      }
      if (connections_.size() >= kControlMaxConnections && !evict_idlest()) {
        refuse(fd.get(), control_failure_line("too many control connections"));
        continue;
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
    }
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
  EventLoop::TimerId pause_timer_ = 0;
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

// ---------------------------------------------------------------------------------------------
// The client (any process: `<program> ctl ...`)
// ---------------------------------------------------------------------------------------------

/// The longest reply line control_call() accepts (the server's output bound).
inline constexpr std::size_t kControlMaxReply = kControlMaxOutput;

namespace control {

// Waits until fd is ready for `events` or the deadline passes; false with ec set otherwise.
inline bool wait_ready(int fd, short events, Clock::time_point deadline, std::error_code& ec) {
  for (;;) {
    auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) {
      ec = std::make_error_code(std::errc::timed_out);
      return false;
    }
    pollfd p{fd, events, 0};
    int r = ::poll(&p, 1, left > 1000000 ? 1000000 : static_cast<int>(left));
    if (r > 0) return true;
    if (r < 0 && errno != EINTR) {
      ec = errno_code();
      return false;
    }
  }
}

}  // namespace control

/// Connects to the control socket `path`, sends `request_line` (one JSON object; the newline
/// is added) and returns the first reply line (without its newline), all within `timeout`. With
/// `wait_for_close` > 0 it then waits that long for the master to close the connection (after
/// `stop`): the reply is returned even when that wait fails. Errors, set in `ec`: connect's
/// errno (no_such_file_or_directory: no master; connection_refused: a stale socket; EACCES),
/// timed_out, message_size (a reply line over kControlMaxReply bytes), bad_message (the
/// connection ended before a whole reply line), the errno of send or recv. Blocking; any process.
inline std::string control_call(const std::string& path, std::string_view request_line,
                                std::chrono::milliseconds timeout, std::error_code& ec,
                                std::chrono::milliseconds wait_for_close = {}) {
  ec.clear();
  const auto deadline = Clock::now() + timeout;
  sockaddr_un un{};
  if (path.empty() || path.size() >= sizeof un.sun_path) {
    ec = std::make_error_code(path.empty() ? std::errc::invalid_argument
                                           : std::errc::filename_too_long);
    return {};
  }
  un.sun_family = AF_UNIX;
  std::memcpy(un.sun_path, path.data(), path.size());
  const auto len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size() + 1);
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) {
    ec = errno_code();
    return {};
  }
  // A blocking Unix connect waits only while the listener's backlog is full, at most
  // SO_SNDTIMEO (unix_stream_connect), and then fails with EAGAIN.
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(timeout.count() / 1000);
  tv.tv_usec = static_cast<suseconds_t>((timeout.count() % 1000) * 1000);
  if (timeout.count() <= 0) tv.tv_usec = 1;
  ::setsockopt(fd.get(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&un), len) != 0) {
    ec = errno == EAGAIN ? std::make_error_code(std::errc::timed_out) : errno_code();
    return {};
  }
  int fl = ::fcntl(fd.get(), F_GETFL);
  if (fl < 0 || ::fcntl(fd.get(), F_SETFL, fl | O_NONBLOCK) != 0) {
    ec = errno_code();
    return {};
  }

  std::string request(request_line);
  request += '\n';
  std::size_t sent = 0;
  while (sent < request.size()) {
    ssize_t n = retry_eintr([&] {
      return ::send(fd.get(), request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
    });
    if (n >= 0) {
      sent += static_cast<std::size_t>(n);
      continue;
    }
    // The master may refuse (permission, too many connections) and close before reading:
    // its refusal line is still readable, so go and read it.
    if (errno == EPIPE || errno == ECONNRESET) break;
    if ((errno != EAGAIN && errno != EWOULDBLOCK)) {
      ec = errno_code();
      return {};
    }
    if (!control::wait_ready(fd.get(), POLLOUT, deadline, ec)) return {};
  }

  std::string in;
  std::size_t nl = std::string::npos;
  char buf[16384];
  while (nl == std::string::npos) {
    ssize_t n = retry_eintr([&] { return ::recv(fd.get(), buf, sizeof buf, 0); });
    if (n > 0) {
      const std::size_t old = in.size();
      in.append(buf, static_cast<std::size_t>(n));
      nl = in.find('\n', old);
      if (nl == std::string::npos && in.size() > kControlMaxReply) {
        ec = std::make_error_code(std::errc::message_size);
        return {};
      }
      continue;
    }
    if (n == 0 || errno == ECONNRESET) {
      ec = std::make_error_code(std::errc::bad_message);
      return {};
    }
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
      ec = errno_code();
      return {};
    }
    if (!control::wait_ready(fd.get(), POLLIN, deadline, ec)) return {};
  }
  if (nl > kControlMaxReply) {
    ec = std::make_error_code(std::errc::message_size);
    return {};
  }
  in.resize(nl);

  if (wait_for_close.count() > 0) {
    const auto close_deadline = Clock::now() + wait_for_close;
    for (;;) {
      ssize_t n = retry_eintr([&] { return ::recv(fd.get(), buf, sizeof buf, 0); });
      if (n == 0 || (n < 0 && errno == ECONNRESET)) break;
      if (n > 0) continue;  // nothing more is expected; whatever comes is not waited for
      if (errno != EAGAIN && errno != EWOULDBLOCK) {
        ec = errno_code();
        break;
      }
      if (!control::wait_ready(fd.get(), POLLIN, close_deadline, ec)) break;
    }
  }
  return in;
}

}  // namespace prefork::detail

#endif  // PREFORK_DETAIL_CONTROL_HPP
