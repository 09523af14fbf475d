// prefork's version, and the one check that the compiler speaks C++20. Every public header
// includes this first, so that a C++17 build stops at its first prefork include with one
// message naming the flag, instead of a thousand lines about concepts and requires-clauses.
#ifndef PREFORK_VERSION_HPP
#define PREFORK_VERSION_HPP

#if !defined(__cplusplus) || __cplusplus < 202002L
#error "prefork needs C++20: compile with -std=c++20 (or -std=gnu++20, or later)"
// #error lets the compiler go on into the headers; a missing include is fatal in GCC and Clang,
// so the build stops here, with a file name that says why.
#include "prefork needs -std=c++20"
#endif

/// The version as a number for #if, MAJOR * 10000 + MINOR * 100 + PATCH (as FMT_VERSION), and
/// as text; the same as `project(prefork VERSION ...)` in CMakeLists.txt and `version:` in
/// meson.build (tests/unit/version.test.cpp checks both builds against it).
#define PREFORK_VERSION_MAJOR 0
#define PREFORK_VERSION_MINOR 1
#define PREFORK_VERSION_PATCH 0
#define PREFORK_VERSION \
  (PREFORK_VERSION_MAJOR * 10000 + PREFORK_VERSION_MINOR * 100 + PREFORK_VERSION_PATCH)
#define PREFORK_VERSION_STRING "0.1.0"

// Every public header sees whether the build is header-only or separately compiled.
#include <prefork/detail/config.hpp>

#endif  // PREFORK_VERSION_HPP
