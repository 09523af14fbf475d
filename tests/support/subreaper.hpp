// Makes the test process the subreaper of its descendants for a scope (prctl(2),
// PR_SET_CHILD_SUBREAPER): the workers of a killed master, or the new master of an upgrade
// orphaned when the old one exits, are reparented to the test, which can then reap them, so
// that no zombie or stray process outlives the test.
#ifndef PREFORK_TESTS_SUPPORT_SUBREAPER_HPP
#define PREFORK_TESTS_SUPPORT_SUBREAPER_HPP

#include <sys/prctl.h>

namespace prefork_test {

struct Subreaper {
  Subreaper() { ok = ::prctl(PR_SET_CHILD_SUBREAPER, 1) == 0; }
  ~Subreaper() { ::prctl(PR_SET_CHILD_SUBREAPER, 0); }
  Subreaper(const Subreaper&) = delete;
  Subreaper& operator=(const Subreaper&) = delete;
  bool ok;
};

}  // namespace prefork_test

#endif  // PREFORK_TESTS_SUPPORT_SUBREAPER_HPP
