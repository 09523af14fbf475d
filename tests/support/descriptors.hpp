// Descriptor accounting shared by the unit and process tests: what this process holds open,
// and a guard that checks a test case left nothing open behind it.
#ifndef PREFORK_TESTS_SUPPORT_DESCRIPTORS_HPP
#define PREFORK_TESTS_SUPPORT_DESCRIPTORS_HPP

#include <dirent.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <charconv>
#include <exception>
#include <string>
#include <string_view>
#include <vector>

namespace prefork_test {

/// The descriptors open in this process (the one opendir() uses to list them excluded).
inline std::vector<int> open_fds() {
  std::vector<int> fds;
  DIR* dir = ::opendir("/proc/self/fd");
  if (!dir) return fds;
  int own = ::dirfd(dir);
  while (dirent* e = ::readdir(dir)) {
    int fd = 0;
    std::string_view name(e->d_name);
    auto [end, ec] = std::from_chars(name.data(), name.data() + name.size(), fd);
    if (ec == std::errc{} && end == name.data() + name.size() && fd != own) fds.push_back(fd);
  }
  ::closedir(dir);
  return fds;
}

inline std::size_t count_open_fds() { return open_fds().size(); }

/// Declared first in a test case: checks, when the test case (each run of it, one per leaf
/// SECTION) ends, that it left no descriptor open.
class FdLeakCheck {
 public:
  FdLeakCheck() : before_(count_open_fds()) {}
  FdLeakCheck(const FdLeakCheck&) = delete;
  FdLeakCheck& operator=(const FdLeakCheck&) = delete;
  ~FdLeakCheck() {
    if (std::uncaught_exceptions() == 0) CHECK(count_open_fds() == before_);
  }

 private:
  std::size_t before_;
};

}  // namespace prefork_test

#endif  // PREFORK_TESTS_SUPPORT_DESCRIPTORS_HPP
