// How prefork's definitions are compiled. Header-only by default: every definition is inline
// and a program needs nothing but the headers. Defining PREFORK_SEPARATE_COMPILATION in every
// translation unit (CMake and Meson options do it) makes them declarations, compiled once in
// the one .cpp that includes <prefork/impl/src.hpp> (asio's ASIO_SEPARATE_COMPILATION).
#ifndef PREFORK_DETAIL_CONFIG_HPP
#define PREFORK_DETAIL_CONFIG_HPP

// PREFORK_DECL marks a non-template function that is declared in a header and defined in
// include/prefork/impl/<name>.ipp: inline when that .ipp is included at the end of its header
// (header-only), an ordinary external function compiled in src.hpp's translation unit
// otherwise.
#if defined(PREFORK_SEPARATE_COMPILATION)
#define PREFORK_DECL
#else
#define PREFORK_DECL inline
#endif

#endif  // PREFORK_DETAIL_CONFIG_HPP
