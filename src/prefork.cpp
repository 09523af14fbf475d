// prefork's library in separate compilation mode (PREFORK_SEPARATE_COMPILATION): the CMake
// option of that name and the Meson option separate_compilation build this file into a static
// library; see README, "Compile time". A build that does it by hand compiles one such file.
#include <prefork/impl/src.hpp>
