// expect-error: prefork needs C++20: compile with -std=c++20
// flags: -std=c++17
// prefork is C++20 (concepts, designated initializers, std::span). Compiled as C++17, including
// it must stop with one error that says which flag to add (prefork/version.hpp), not with pages
// of errors about concepts that never name the cause.
#include <prefork/prefork.hpp>

int main() {}
