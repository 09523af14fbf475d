// This program as it was started: its argv (from /proc/self/cmdline) and the path of its binary
// on disk. What exec mode runs for a worker and what a master upgrade runs for the new master.
#ifndef PREFORK_DETAIL_OWN_PROGRAM_HPP
#define PREFORK_DETAIL_OWN_PROGRAM_HPP

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace prefork::detail {

/// This program's argv, from /proc/self/cmdline (the Cluster is not handed argv).
inline std::vector<std::string> own_argv() {
  std::ifstream in("/proc/self/cmdline", std::ios::binary);
  std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::string> argv;
  std::size_t start = 0;
  for (std::size_t i = 0; i < all.size(); ++i) {
    if (all[i] == '\0') {
      argv.emplace_back(all, start, i - start);
      start = i + 1;
    }
  }
  return argv;
}

/// The path of the program on disk, as an absolute path fixed now: argv[0] when it names a file
/// (made absolute against the current directory, symlinks left alone), else /proc/self/exe
/// resolved. Exec'ing it later runs whatever a deploy put there: a binary renamed over the old
/// one, or a new release behind a swapped symlink (/proc/self/exe would name the old file).
inline std::string own_executable(const std::vector<std::string>& argv) {
  if (!argv.empty() && argv[0].find('/') != std::string::npos) {
    std::string path = argv[0];
    if (path.front() != '/') {
      char cwd[4096];
      if (::getcwd(cwd, sizeof cwd)) path = std::string(cwd) + "/" + path;
    }
    path = std::filesystem::path(path).lexically_normal().string();
    if (::access(path.c_str(), X_OK) == 0) return path;
  }
  char buf[4096];
  ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) return "/proc/self/exe";
  return std::string(buf, static_cast<std::size_t>(n));
}

}  // namespace prefork::detail

#endif  // PREFORK_DETAIL_OWN_PROGRAM_HPP
