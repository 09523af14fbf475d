// The master's pid file (Options::pid_file): its pid for init scripts and `kill $(cat ...)`,
// published atomically, locked for the master's life so that a second master is refused while
// the first one lives, replaced when stale, removed on exit, and handed to a new master across
// an upgrade.
//
// Why this shape. A reader must never see the file empty or half-written, so the content is
// complete before the name points at it: it is written to a temporary file that is then
// link()ed (no file yet) or rename()d (a stale file) onto the name. The liveness test is an
// flock(2) on the file itself, taken on the temporary file before it is published: the lock
// belongs to the inode, so it moves with the rename, and it dies with the process that holds
// it (a SIGKILLed master leaves a stale, unlocked file, which the next master replaces). A
// contender locks whatever file the name points at, then checks that the name still points at
// it (it may have been replaced in between): only the holder of the current file's lock
// replaces or removes it. A sibling lock file would serve as well, but would leave two files to
// manage; ftruncate+pwrite on the locked file would let a reader see it empty.
#ifndef PREFORK_DETAIL_PID_FILE_HPP
#define PREFORK_DETAIL_PID_FILE_HPP

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstdio>
#include <string>
#include <system_error>
#include <utility>

#include <prefork/detail/syscall.hpp>
#include <prefork/detail/unique_fd.hpp>

namespace prefork::detail {

/// The pid at the start of what fd holds ("1234\n"), or 0.
inline pid_t read_pid(int fd) noexcept {
  char buf[32];
  ssize_t n = retry_eintr([&] { return ::pread(fd, buf, sizeof buf, 0); });
  if (n <= 0) return 0;
  long pid = 0;
  auto [end, ec] = std::from_chars(buf, buf + n, pid);
  return ec == std::errc{} && end != buf && pid > 0 ? static_cast<pid_t>(pid) : 0;
}

/// One master's hold on a pid file. Move-only; the destructor removes the file if it is still
/// this holder's. Master process.
class PidFile {
 public:
  PidFile() noexcept = default;
  PidFile(PidFile&& o) noexcept
      : path_(std::move(o.path_)), fd_(std::move(o.fd_)), holder_(o.holder_) {}
  PidFile& operator=(PidFile&& o) noexcept {
    if (this != &o) {
      remove();
      path_ = std::move(o.path_);
      fd_ = std::move(o.fd_);
      holder_ = o.holder_;
    }
    return *this;
  }
  PidFile(const PidFile&) = delete;
  PidFile& operator=(const PidFile&) = delete;
  ~PidFile() { remove(); }

  /// Takes `path` for `pid`: publishes "<pid>\n" and holds the file's lock until remove().
  /// A stale file (nobody holds its lock) is replaced. Errors: resource_unavailable_try_again
  /// when a live process holds it (holder() then returns the pid it wrote, 0 if unreadable);
  /// invalid_argument when the name is not a regular file; errno of open, link or rename
  /// otherwise. On any error nothing is held and no temporary file is left.
  std::error_code acquire(const std::string& path, pid_t pid) {
    remove();
    holder_ = 0;
    std::string tmp;
    std::error_code ec;
    UniqueFd mine = publishable(path, pid, tmp, ec);
    if (ec) return ec;
    // Each round either publishes, or finds the name pointing at a file other than the one it
    // looked at (a contender won a race): then it looks again. Bounded, not for ever.
    for (int round = 0; round < 64; ++round) {
      UniqueFd old(retry_eintr(
          [&] { return ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY); }));
      if (!old) {
        if (errno != ENOENT) return discard(tmp, errno_code());
        if (::link(tmp.c_str(), path.c_str()) == 0) return publish(path, tmp, std::move(mine));
        if (errno == EEXIST) continue;
        return discard(tmp, errno_code());
      }
      struct stat st {};
      if (::fstat(old.get(), &st) != 0) return discard(tmp, errno_code());
      if (!S_ISREG(st.st_mode)) return discard(tmp, std::make_error_code(std::errc::invalid_argument));
      if (retry_eintr([&] { return ::flock(old.get(), LOCK_EX | LOCK_NB); }) != 0) {
        if (errno != EWOULDBLOCK) return discard(tmp, errno_code());
        if (!names(path, old.get())) continue;
        holder_ = read_pid(old.get());
        return discard(tmp, std::make_error_code(std::errc::resource_unavailable_try_again));
      }
      if (!names(path, old.get())) continue;
      // Stale: whoever wrote it is gone. Holding its lock, we are the only one replacing it.
      if (::rename(tmp.c_str(), path.c_str()) != 0) return discard(tmp, errno_code());
      path_ = path;
      fd_ = std::move(mine);
      return {};
    }
    return discard(tmp, std::make_error_code(std::errc::resource_unavailable_try_again));
  }

  /// Master upgrade: publishes "<pid>\n" at `path` over the file that the old master (this
  /// process's parent, which forked and exec'd it) still holds, without its lock; from then on
  /// this object holds the file and the old master, finding the name no longer pointing at its
  /// file, leaves it in place when it exits. Also how an old master takes the file back after a
  /// failed upgrade. Errors as for acquire(), nothing held then.
  std::error_code take_over(const std::string& path, pid_t pid) {
    std::string tmp;
    std::error_code ec;
    UniqueFd mine = publishable(path, pid, tmp, ec);
    if (ec) return ec;
    if (::rename(tmp.c_str(), path.c_str()) != 0) return discard(tmp, errno_code());
    fd_ = std::move(mine);  // the file we held before, if any, is no longer at the name
    path_ = path;
    holder_ = 0;
    return {};
  }

  /// Unlinks the file if the name still points at this holder's file, and drops the lock. The
  /// lock is held across the unlink, so no contender replaced it in between.
  void remove() noexcept {
    if (!fd_) return;
    if (current()) ::unlink(path_.c_str());
    fd_.reset();
  }

  /// True while this object holds a pid file (which may have been taken over since).
  bool held() const noexcept { return static_cast<bool>(fd_); }
  /// True while the name points at the file this object holds.
  bool current() const noexcept { return fd_ && names(path_, fd_.get()); }
  /// The locked descriptor (close-on-exec), which a forked child must close: flock(2) locks
  /// belong to the open file description, so a child holding a copy would keep the lock.
  int native_handle() const noexcept { return fd_.get(); }
  const std::string& path() const noexcept { return path_; }
  /// After acquire() failed because the file is held: the pid it names (0 if unreadable).
  pid_t holder() const noexcept { return holder_; }

 private:
  // True if `path` names the file open as fd.
  static bool names(const std::string& path, int fd) noexcept {
    struct stat a {}, b {};
    return ::stat(path.c_str(), &a) == 0 && ::fstat(fd, &b) == 0 && a.st_dev == b.st_dev &&
           a.st_ino == b.st_ino;
  }

  // A new file next to `path` holding "<pid>\n", locked, not yet visible under `path`. O_EXCL:
  // never follows a planted symlink. A leftover of a dead process that had our pid is removed.
  static UniqueFd publishable(const std::string& path, pid_t pid, std::string& tmp,
                              std::error_code& ec) {
    tmp = path + ".tmp." + std::to_string(pid);
    UniqueFd fd;
    for (int attempt = 0; attempt < 2 && !fd; ++attempt) {
      fd.reset(retry_eintr([&] {
        return ::open(tmp.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC | O_NOFOLLOW, 0644);
      }));
      if (!fd && errno == EEXIST) ::unlink(tmp.c_str());
    }
    if (!fd) {
      ec = errno_code();
      return {};
    }
    std::string text = std::to_string(pid) + "\n";
    ssize_t n = retry_eintr([&] { return ::write(fd.get(), text.data(), text.size()); });
    if (n != static_cast<ssize_t>(text.size()))
      ec = n < 0 ? errno_code() : std::make_error_code(std::errc::io_error);
    else if (retry_eintr([&] { return ::flock(fd.get(), LOCK_EX | LOCK_NB); }) != 0)
      ec = errno_code();
    if (ec) {
      ::unlink(tmp.c_str());
      return {};
    }
    return fd;
  }

  std::error_code publish(const std::string& path, const std::string& tmp, UniqueFd fd) {
    ::unlink(tmp.c_str());
    path_ = path;
    fd_ = std::move(fd);
    return {};
  }

  static std::error_code discard(const std::string& tmp, std::error_code ec) {
    ::unlink(tmp.c_str());
    return ec;
  }

  std::string path_;
  UniqueFd fd_;
  pid_t holder_ = 0;
};

}  // namespace prefork::detail

#endif  // PREFORK_DETAIL_PID_FILE_HPP
