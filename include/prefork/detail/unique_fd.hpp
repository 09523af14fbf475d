// prefork::UniqueFd: a move-only owner of one file descriptor. close() is never retried: on
// Linux the descriptor is released even when close() reports EINTR (close(2), "Dealing with error returns").
#ifndef PREFORK_DETAIL_UNIQUE_FD_HPP
#define PREFORK_DETAIL_UNIQUE_FD_HPP

#include <unistd.h>

#include <utility>

namespace prefork {

class UniqueFd {
 public:
  UniqueFd() noexcept = default;
  explicit UniqueFd(int fd) noexcept : fd_(fd) {}
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  UniqueFd(UniqueFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) reset(std::exchange(o.fd_, -1));
    return *this;
  }
  ~UniqueFd() { reset(); }

  int get() const noexcept { return fd_; }
  explicit operator bool() const noexcept { return fd_ >= 0; }
  int release() noexcept { return std::exchange(fd_, -1); }
  void reset(int fd = -1) noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

}  // namespace prefork

#endif  // PREFORK_DETAIL_UNIQUE_FD_HPP
