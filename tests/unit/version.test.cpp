// prefork/version.hpp: the version macros agree with the version the build declares (CMake's
// project(VERSION) or Meson's project(version:), passed as PREFORK_PROJECT_VERSION).
#include <prefork/version.hpp>

#include <catch2/catch.hpp>

#include <string>

#ifndef PREFORK_PROJECT_VERSION
#error "the build must define PREFORK_PROJECT_VERSION as the project's version"
#endif

TEST_CASE("PREFORK_VERSION matches the version the build declares", "[version]") {
  const std::string declared = PREFORK_PROJECT_VERSION;
  CHECK(std::string(PREFORK_VERSION_STRING) == declared);
  CHECK(std::to_string(PREFORK_VERSION_MAJOR) + "." + std::to_string(PREFORK_VERSION_MINOR) + "." +
            std::to_string(PREFORK_VERSION_PATCH) ==
        declared);
  CHECK(PREFORK_VERSION == PREFORK_VERSION_MAJOR * 10000 + PREFORK_VERSION_MINOR * 100 +
                               PREFORK_VERSION_PATCH);
}
