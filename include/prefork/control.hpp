// The client side of the master's control socket: where the socket lives by default, and the
// `<program> ctl status|reload|scale N|stop|upgrade` command line every prefork binary offers
// (like `nginx -s reload`). The transport and protocol are in detail/control_client.hpp
// and detail/control_server.hpp.
#ifndef PREFORK_CONTROL_HPP
#define PREFORK_CONTROL_HPP

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include <prefork/version.hpp>
#include <prefork/detail/control_client.hpp>
#include <prefork/detail/json.hpp>
#include <prefork/detail/syscall.hpp>

namespace prefork {

namespace detail {

// Makes `dir` if missing (mode 0700) and checks that it is a real directory of this user that
// nobody else may write to. A shared /tmp lets anyone create /tmp/prefork-<uid> first (or a
// symlink by that name) and then swap our socket for theirs; refusing such a directory is what
// tmux and ssh-agent do for their socket directories.
inline void ensure_private_dir(const std::string& dir, uid_t uid) {
  if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST)
    throw std::system_error(errno, std::system_category(),
                            "prefork: cannot create the control directory " + dir);
  struct stat st {};
  if (::lstat(dir.c_str(), &st) != 0)
    throw std::system_error(errno, std::system_category(), "prefork: control directory " + dir);
  if (!S_ISDIR(st.st_mode))
    throw StatedError(std::error_code(ENOTDIR, std::system_category()),
                      "prefork: control directory " + dir + " is not a directory");
  if (st.st_uid != uid)
    throw StatedError(std::error_code(EPERM, std::system_category()),
                      "prefork: control directory " + dir + " is owned by uid " +
                          std::to_string(st.st_uid) + ", not by uid " + std::to_string(uid) +
                          "; refusing to use it");
  if ((st.st_mode & 022) != 0)
    throw StatedError(std::error_code(EPERM, std::system_category()),
                      "prefork: control directory " + dir +
                          " is writable by its group or others; refusing to use it");
}

}  // namespace detail

/// The control socket's default path for a program called `name`, private to this effective
/// user: `$XDG_RUNTIME_DIR/prefork/<name>.sock` when XDG_RUNTIME_DIR is set and is a directory
/// owned by this user, else `/tmp/prefork-<uid>/<name>.sock`. The `prefork` directory is
/// created with mode 0700 if missing. Throws std::invalid_argument when `name` is not a plain
/// file name ("", ".", "..", or holding '/' or a NUL byte), std::system_error when the
/// directory cannot be created, or exists but is not a directory, is owned by another user or
/// is writable by group or others (someone else may have put it there). Master and client.
inline std::string default_control_path(std::string_view name) {
  if (name.empty() || name == "." || name == ".." || name.find('/') != std::string_view::npos ||
      name.find('\0') != std::string_view::npos)
    throw std::invalid_argument("prefork: control socket name '" + std::string(name) +
                                "' is not a plain file name");
  const uid_t uid = ::geteuid();
  std::string dir;
  if (const char* xdg = std::getenv("XDG_RUNTIME_DIR"); xdg && xdg[0] == '/') {
    struct stat st {};
    if (::stat(xdg, &st) == 0 && S_ISDIR(st.st_mode) && st.st_uid == uid)
      dir = std::string(xdg) + "/prefork";
  }
  if (dir.empty()) dir = "/tmp/prefork-" + std::to_string(uid);
  detail::ensure_private_dir(dir, uid);
  return dir + "/" + std::string(name) + ".sock";
}

/// How long `ctl` waits for each command's reply. The master answers reload and upgrade when
/// the rolling restart or the upgrade has finished, and scale when the workers have started.
inline constexpr std::chrono::milliseconds kCtlStatusTimeout{std::chrono::seconds(10)};
inline constexpr std::chrono::milliseconds kCtlLongTimeout{std::chrono::minutes(10)};
/// After its reply to `stop`, how long `ctl stop` waits for the master to close the connection
/// (it does when it exits).
inline constexpr std::chrono::milliseconds kCtlStopTimeout{std::chrono::minutes(5)};

namespace detail {

inline std::string duration_text(std::chrono::milliseconds d) {
  if (d.count() % 60000 == 0) return std::to_string(d.count() / 60000) + " min";
  if (d.count() % 1000 == 0) return std::to_string(d.count() / 1000) + " s";
  return std::to_string(d.count()) + " ms";
}

}  // namespace detail

/// `<program> ctl WORDS...`: sends one command to the master listening on `path` and prints
/// the outcome. words: `status` | `reload` | `scale N` (N a whole number 1..4096) | `stop` |
/// `upgrade`, optionally with `--control PATH` (or `--control=PATH`), which overrides `path`.
/// Returns 0 when the master answered {"ok":true...} (that reply line is printed to `out`);
/// 1 when it answered {"ok":false,"error":E} ("<program>: ctl <command>: E" on `err`), when no
/// master listens on the path, the reply does not come in time (status 10 s; reload, scale and
/// upgrade 10 min; stop: 5 min for the reply, then 5 min for the master to close the
/// connection) or is not a reply; 2 with a usage line on `err` for bad words. Never throws
/// except std::bad_alloc. Runs in the client process (blocking), never in a master.
inline int control_main(const std::string& path, const std::vector<std::string>& words,
                        std::FILE* out, std::FILE* err, const char* program) {
  std::string socket_path = path;
  std::vector<std::string> args;
  for (std::size_t i = 0; i < words.size(); ++i) {
    if (words[i] == "--control" && i + 1 < words.size()) {
      socket_path = words[++i];
    } else if (words[i].starts_with("--control=")) {
      socket_path = words[i].substr(10);
    } else {
      args.push_back(words[i]);
    }
  }
  auto usage = [&] {
    std::fprintf(err, "usage: %s ctl status|reload|scale N|stop|upgrade [--control PATH]\n",
                 program);
    return 2;
  };
  if (args.empty() || socket_path.empty()) return usage();
  const std::string& command = args[0];
  std::string request = "{\"command\":" + detail::json_quote(command);
  std::chrono::milliseconds timeout = kCtlLongTimeout;
  std::chrono::milliseconds wait_for_close{0};
  if (command == "scale") {
    if (args.size() != 2) return usage();
    unsigned n = 0;
    const std::string& w = args[1];
    auto [end, ec] = std::from_chars(w.data(), w.data() + w.size(), n);
    if (ec != std::errc{} || end != w.data() + w.size() || n < 1 || n > 4096) return usage();
    request += ",\"workers\":" + std::to_string(n);
  } else if (args.size() != 1) {
    return usage();
  } else if (command == "status") {
    timeout = kCtlStatusTimeout;
  } else if (command == "stop") {
    timeout = kCtlStopTimeout;
    wait_for_close = kCtlStopTimeout;
  } else if (command != "reload" && command != "upgrade") {
    return usage();
  }
  request += "}";

  std::error_code ec;
  std::string reply = detail::control_call(socket_path, request, timeout, ec, wait_for_close);
  if (ec && reply.empty()) {
    if (ec == std::errc::no_such_file_or_directory || ec == std::errc::connection_refused) {
      std::fprintf(err, "%s: ctl: no master is listening on %s (%s)\n", program,
                   socket_path.c_str(), ec.message().c_str());
    } else if (ec == std::errc::timed_out) {
      std::fprintf(err, "%s: ctl %s: no reply from the master on %s within %s\n", program,
                   command.c_str(), socket_path.c_str(), detail::duration_text(timeout).c_str());
    } else {
      std::fprintf(err, "%s: ctl %s: %s: %s\n", program, command.c_str(), socket_path.c_str(),
                   ec.message().c_str());
    }
    return 1;
  }
  if (reply.starts_with("{\"ok\":true")) {
    std::fprintf(out, "%s\n", reply.c_str());
    std::fflush(out);
    if (ec) {  // the reply to stop came, the exit did not
      std::fprintf(err, "%s: ctl stop: the master answered but did not exit within %s\n", program,
                   detail::duration_text(wait_for_close).c_str());
      return 1;
    }
    return 0;
  }
  detail::JsonFields fields;
  std::string parse_error;
  if (reply.starts_with("{\"ok\":false") && detail::parse_flat_object(reply, fields, parse_error)) {
    auto it = fields.find("error");
    std::string message = it != fields.end() ? it->second.text : "failed (no error message)";
    std::fprintf(err, "%s: ctl %s: %s\n", program, command.c_str(), message.c_str());
    return 1;
  }
  std::fprintf(err, "%s: ctl %s: unexpected reply from the master: %s\n", program,
               command.c_str(), reply.c_str());
  return 1;
}

}  // namespace prefork

#endif  // PREFORK_CONTROL_HPP
