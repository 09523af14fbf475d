// How much heap a test process holds: the sanitizer's allocator when one is linked in (its
// quarantine keeps freed blocks resident, so RSS says little there), else glibc's main arena
// plus its mmapped blocks. For single-threaded processes (one arena).
#ifndef PREFORK_TESTS_SUPPORT_HEAP_HPP
#define PREFORK_TESTS_SUPPORT_HEAP_HPP

#include <malloc.h>

#include <cstddef>

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define PREFORK_TEST_SANITIZER_HEAP 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define PREFORK_TEST_SANITIZER_HEAP 1
#endif
#endif
#ifdef PREFORK_TEST_SANITIZER_HEAP
// From the sanitizer runtime (sanitizer/allocator_interface.h, which g++ 12 does not install).
extern "C" std::size_t __sanitizer_get_current_allocated_bytes();
#endif

namespace prefork_test {

/// Heap bytes this process holds now.
inline std::size_t heap_in_use() {
#ifdef PREFORK_TEST_SANITIZER_HEAP
  return __sanitizer_get_current_allocated_bytes();
#else
  struct mallinfo2 m = ::mallinfo2();
  return m.uordblks + m.hblkhd;
#endif
}

}  // namespace prefork_test

#endif  // PREFORK_TESTS_SUPPORT_HEAP_HPP
