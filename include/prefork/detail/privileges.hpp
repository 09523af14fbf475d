// Privilege drop for workers (Options::user / Options::group): the master resolves the names
// once, with the NSS calls that may allocate and open files; a freshly forked child then only
// makes the setgroups/setgid/setuid system calls, which are safe between fork and exec.
#ifndef PREFORK_DETAIL_PRIVILEGES_HPP
#define PREFORK_DETAIL_PRIVILEGES_HPP

#include <grp.h>
#include <pwd.h>
#include <sys/types.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

namespace prefork::detail {

/// Who the workers become. Built by resolve_credentials() in the master.
struct Credentials {
  bool change_user = false;   ///< setuid(uid) in each worker
  bool change_group = false;  ///< setgroups(groups) and setgid(gid) in each worker
  uid_t uid = 0;
  gid_t gid = 0;
  std::vector<gid_t> groups;  ///< the supplementary groups, gid included
  std::string text;           ///< "user nobody (65534), group nogroup (65534)", for messages

  bool any() const noexcept { return change_user || change_group; }
};

namespace privileges {

template <class T>
bool numeric_id(const std::string& s, T& out) noexcept {
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
  return !s.empty() && ec == std::errc{} && end == s.data() + s.size();
}

// getpwnam_r/getgrnam_r report "no such entry" as 0 with a null result, and a too small buffer
// as ERANGE (getpwnam_r(3)); the buffer grows until it fits.
template <class Entry, class Lookup>
bool lookup(Lookup call, Entry& entry, std::vector<char>& buf, int& error) {
  buf.resize(1024);
  for (;;) {
    Entry* result = nullptr;
    error = call(&entry, buf.data(), buf.size(), &result);
    if (error == ERANGE && buf.size() < (std::size_t{1} << 20)) {
      buf.resize(buf.size() * 2);
      continue;
    }
    if (error == EINTR) continue;
    return error == 0 && result != nullptr;
  }
}

[[noreturn]] inline void unknown(const char* field, const std::string& what, int error) {
  std::string why = error ? std::string(": ") + std::strerror(error) : std::string();
  throw std::invalid_argument(std::string("prefork: Options.") + field + ": " + what + why);
}

}  // namespace privileges

/// Resolves Options::user and Options::group: each a name, or a numeric id when no entry has
/// that name (chown(1)'s rule). With a user and no group, the group is the user's primary
/// group; the supplementary groups are the user's (getgrouplist, as initgroups(3) would set
/// them), or just the group when no user is given or the uid has no passwd entry. Empty
/// strings: nothing changes. Throws std::invalid_argument naming the field for an unknown name,
/// or for a numeric user without a passwd entry and no group. Master process.
inline Credentials resolve_credentials(const std::string& user, const std::string& group) {
  using namespace privileges;
  Credentials c;
  std::string user_name;
  std::vector<char> buf;
  int error = 0;
  if (!user.empty()) {
    passwd pw{};
    bool found = lookup<passwd>([&](passwd* e, char* b, std::size_t n, passwd** r) {
      return ::getpwnam_r(user.c_str(), e, b, n, r);
    }, pw, buf, error);
    uid_t id = 0;
    if (!found && numeric_id(user, id)) {
      found = lookup<passwd>([&](passwd* e, char* b, std::size_t n, passwd** r) {
        return ::getpwuid_r(id, e, b, n, r);
      }, pw, buf, error);
      if (!found) {
        if (group.empty())
          unknown("user", "uid " + user + " has no passwd entry, so Options.group must name the group", 0);
        pw.pw_uid = id;
        pw.pw_gid = static_cast<gid_t>(-1);
        pw.pw_name = nullptr;
      }
    } else if (!found) {
      unknown("user", "no such user '" + user + "'", error);
    }
    c.change_user = true;
    c.uid = pw.pw_uid;
    if (pw.pw_name) user_name = pw.pw_name;
    c.change_group = true;
    c.gid = pw.pw_gid;
    c.text = "user " + (user_name.empty() ? user : user_name) + " (" + std::to_string(c.uid) + ")";
  }
  if (!group.empty()) {
    struct group gr {};
    gid_t id = 0;
    if (lookup<struct group>([&](struct group* e, char* b, std::size_t n, struct group** r) {
          return ::getgrnam_r(group.c_str(), e, b, n, r);
        }, gr, buf, error)) {
      c.gid = gr.gr_gid;
    } else if (numeric_id(group, id)) {
      c.gid = id;  // a gid needs no group entry: the kernel takes any number
    } else {
      unknown("group", "no such group '" + group + "'", error);
    }
    c.change_group = true;
    c.text += std::string(c.text.empty() ? "" : ", ") + "group " + group + " (" +
              std::to_string(c.gid) + ")";
  } else if (c.change_user) {
    c.text += ", group " + std::to_string(c.gid);
  }
  c.groups.assign(1, c.gid);
  if (!user_name.empty()) {
    int n = 32;
    for (;;) {
      c.groups.assign(static_cast<std::size_t>(n), 0);
      int want = n;
      if (::getgrouplist(user_name.c_str(), c.gid, c.groups.data(), &want) >= 0) {
        c.groups.resize(static_cast<std::size_t>(want));
        break;
      }
      if (want <= n) want = n * 2;  // glibc reports the size it needs; be safe if it did not
      if (want > 65536) {
        c.groups.assign(1, c.gid);
        break;
      }
      n = want;
    }
  }
  return c;
}

/// Checks, in the master before it forks anything, that it can give its workers `c`: only a
/// master running as root switches users (it keeps its own privileges: it binds, and an
/// upgrade re-executes it). Asking for the ids the master already has is no change (returned
/// as such). Throws std::system_error (EPERM) naming what was asked and the master's ids.
inline Credentials check_credentials(Credentials c) {
  if (!c.any() || ::geteuid() == 0) return c;
  bool same_user = !c.change_user || c.uid == ::geteuid();
  bool same_group = !c.change_group || c.gid == ::getegid();
  if (same_user && same_group) return Credentials{};
  throw std::system_error(EPERM, std::system_category(),
                          "prefork: workers can run as " + c.text +
                              " only if the master runs as root (it runs as uid " +
                              std::to_string(::geteuid()) + ", gid " +
                              std::to_string(::getegid()) + ")");
}

/// In a freshly forked worker, before it execs or builds its Server: supplementary groups,
/// then gid, then uid (the other order would leave no privilege to change the groups with),
/// and a check that every id took and, when leaving root, that root cannot be regained (a
/// saved set-user-ID left at 0 would allow it). Returns false with `why` set on any failure:
/// the caller must then _exit, never serve with the master's privileges. Only system calls
/// and snprintf: safe after fork() of a single-threaded master.
inline bool drop_privileges(const Credentials& c, char* why, std::size_t why_size) noexcept {
  auto fail = [&](const char* what) {
    std::snprintf(why, why_size, "worker: cannot switch to %s: %s: %s", c.text.c_str(), what,
                  errno ? std::strerror(errno) : "ids did not change");
    return false;
  };
  errno = 0;
  if (c.change_group) {
    if (::setgroups(c.groups.size(), c.groups.data()) != 0) return fail("setgroups");
    if (::setgid(c.gid) != 0) return fail("setgid");
    gid_t r = 0, e = 0, s = 0;
    if (::getresgid(&r, &e, &s) != 0) return fail("getresgid");
    errno = 0;
    if (r != c.gid || e != c.gid || s != c.gid) return fail("getresgid");
  }
  if (c.change_user) {
    if (::setuid(c.uid) != 0) return fail("setuid");
    uid_t r = 0, e = 0, s = 0;
    if (::getresuid(&r, &e, &s) != 0) return fail("getresuid");
    errno = 0;
    if (r != c.uid || e != c.uid || s != c.uid) return fail("getresuid");
    if (c.uid != 0 && ::setuid(0) == 0) return fail("setuid(0) still works");
    errno = 0;
  }
  return true;
}

}  // namespace prefork::detail

#endif  // PREFORK_DETAIL_PRIVILEGES_HPP
