// A private temporary directory for a test case, removed with everything in it at the end.
#ifndef PREFORK_TESTS_SUPPORT_TEMP_DIR_HPP
#define PREFORK_TESTS_SUPPORT_TEMP_DIR_HPP

#include <stdlib.h>

#include <filesystem>
#include <string>
#include <system_error>
#include <vector>

namespace prefork_test {

struct TempDir {
  std::string path;  // empty if mkdtemp failed
  explicit TempDir(const std::string& prefix = "prefork-test") {
    std::string tmpl = "/tmp/" + prefix + "-XXXXXX";
    if (::mkdtemp(tmpl.data())) path = tmpl;
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ec;
    if (!path.empty()) std::filesystem::remove_all(path, ec);
  }
  /// The names in the directory (a leftover temporary file shows up here).
  std::vector<std::string> names() const {
    std::vector<std::string> v;
    for (auto& e : std::filesystem::directory_iterator(path)) v.push_back(e.path().filename());
    return v;
  }
};

}  // namespace prefork_test

#endif  // PREFORK_TESTS_SUPPORT_TEMP_DIR_HPP
