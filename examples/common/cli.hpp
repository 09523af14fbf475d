// The examples' command lines: `--flag VALUE` or `--flag=VALUE`, switches without a value,
// `--help`, and exit status 2 with the usage on stderr for anything wrong, so every example
// reports a bad option the same way. Also the one listen address made of --host and --port.
#ifndef PREFORK_EXAMPLES_COMMON_CLI_HPP
#define PREFORK_EXAMPLES_COMMON_CLI_HPP

#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <string>
#include <string_view>
#include <system_error>

namespace cli {

class Parser {
 public:
  /// `program` prefixes every error ("hello: ..."); `usage` is printed with it and by --help.
  Parser(const char* program, const char* usage) : program_(program), usage_(usage) {}

  [[noreturn]] void fail(const std::string& message) const {
    std::fprintf(stderr, "%s: %s\n%s", program_, message.c_str(), usage_);
    std::exit(2);
  }

  /// `text` as a whole decimal number in [min, max]; fails naming the flag otherwise.
  template <class T>
  T number(std::string_view flag, std::string_view text, T min, T max) const {
    T value{};
    auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
    if (text.empty() || ec != std::errc{} || end != text.data() + text.size() || value < min ||
        value > max)
      fail(std::string(flag) + ": '" + std::string(text) + "' is not a number from " +
           std::to_string(min) + " to " + std::to_string(max));
    return value;
  }

  /// A value that must not be empty (--host, --pid-file...).
  std::string text(std::string_view flag, std::string_view value) const {
    if (value.empty()) fail(std::string(flag) + " needs a value");
    return std::string(value);
  }

  /// Calls on_option(flag, value) for each option of `valued` (its value given as --flag=V or
  /// as the next argument) and on_option(flag, "") for each of `switches`. --help and -h print
  /// the usage and exit 0; an unknown option or a missing value fails.
  template <class F>
  void parse(int argc, char** argv, std::initializer_list<std::string_view> valued,
             std::initializer_list<std::string_view> switches, F&& on_option) const {
    auto known = [](std::initializer_list<std::string_view> set, std::string_view f) {
      for (auto s : set)
        if (s == f) return true;
      return false;
    };
    for (int i = 1; i < argc; ++i) {
      std::string_view arg = argv[i];
      if (arg == "--help" || arg == "-h") {
        std::fputs(usage_, stdout);
        std::exit(0);
      }
      if (known(switches, arg)) {
        on_option(arg, std::string_view{});
        continue;
      }
      std::string_view flag = arg, value;
      bool inline_value = false;
      if (auto eq = arg.find('='); arg.starts_with("--") && eq != std::string_view::npos) {
        flag = arg.substr(0, eq);  // --port=8080
        value = arg.substr(eq + 1);
        inline_value = true;
      }
      if (!known(valued, flag)) fail("unknown option '" + std::string(arg) + "'");
      if (!inline_value) {
        if (i + 1 >= argc) fail(std::string(flag) + " needs a value");
        value = argv[++i];
      }
      on_option(flag, value);
    }
  }

 private:
  const char* program_;
  const char* usage_;
};

/// HOST:PORT for Options::listen, with brackets around a bare IPv6 host ("::1" -> "[::1]:80").
inline std::string listen_address(const std::string& host, unsigned port) {
  bool ipv6 = host.find(':') != std::string::npos && host.front() != '[';
  return (ipv6 ? "[" + host + "]" : host) + ":" + std::to_string(port);
}

}  // namespace cli

#endif  // PREFORK_EXAMPLES_COMMON_CLI_HPP
