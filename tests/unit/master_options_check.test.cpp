// The check of a master's Options (master/options_check.hpp): each rejection names the field
// and the rule; the defaults pass.
#include <prefork/master/options_check.hpp>

#include <catch2/catch.hpp>

#include <chrono>
#include <functional>
#include <stdexcept>
#include <string>

using namespace std::chrono_literals;
using Catch::Matchers::Contains;
using Catch::Matchers::Equals;

namespace {

// What validate() says of the defaults changed by `change`.
std::string rejection(const std::function<void(prefork::Options&)>& change) {
  prefork::Options o;
  change(o);
  try {
    prefork::detail::validate(o);
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("the default options pass") {
  CHECK_NOTHROW(prefork::detail::validate(prefork::Options{}));
  CHECK(rejection([](prefork::Options& o) { o.listen = {"127.0.0.1:0", "unix:/tmp/x.sock"}; })
            .empty());
}

TEST_CASE("each rejection names the field and the rule") {
  using O = prefork::Options;
  CHECK_THAT(rejection([](O& o) { o.workers = 0; }),
             Equals("prefork: Options.workers must be at least 1"));
  CHECK_THAT(rejection([](O& o) { o.workers = 4097; }),
             Equals("prefork: Options.workers must be at most 4096, got 4097"));
  CHECK_THAT(rejection([](O& o) { o.backlog = 0; }),
             Equals("prefork: Options.backlog must be positive, got 0"));
  CHECK_THAT(rejection([](O& o) { o.defer_accept = 3601s; }),
             Contains("Options.defer_accept must be between 0 and 3600 s"));
  CHECK_THAT(rejection([](O& o) { o.drain_timeout = -1s; }),
             Contains("Options.drain_timeout must not be negative"));
  CHECK_THAT(rejection([](O& o) { o.kill_timeout = -1s; }),
             Contains("Options.kill_timeout must not be negative"));
  CHECK_THAT(rejection([](O& o) { o.reload_surge = 0; }),
             Contains("Options.reload_surge must be at least 1"));
  CHECK_THAT(rejection([](O& o) { o.reload_timeout = 0s; }),
             Contains("Options.reload_timeout must be positive"));
  CHECK_THAT(rejection([](O& o) { o.upgrade_timeout = 0s; }),
             Contains("Options.upgrade_timeout must be positive"));
  CHECK_THAT(rejection([](O& o) { o.max_message_size = 0; }),
             Contains("Options.max_message_size must be between"));
  CHECK_THAT(rejection([](O& o) { o.max_queued_bytes = 0; }),
             Contains("Options.max_queued_bytes must be positive"));
  CHECK_THAT(rejection([](O& o) { o.listen = {"127.0.0.1"}; }),
             Contains("Options.listen: '127.0.0.1': "));
  CHECK_THAT(rejection([](O& o) { o.pid_file = "/run/"; }),
             Equals("prefork: Options.pid_file: '/run/' is not a file name"));
  CHECK_THAT(rejection([](O& o) { o.user = std::string("a\0b", 3); }),
             Equals("prefork: Options.user holds a NUL byte"));
  CHECK_THAT(rejection([](O& o) { o.group = std::string("a\0b", 3); }),
             Equals("prefork: Options.group holds a NUL byte"));
}
