// The check of a master's Options: Master's constructor rejects options it could not serve
// with (std::invalid_argument, "prefork: Options.<field> ..."), before anything is bound or
// forked. It lives beside the master, its only caller, and not in options.hpp, which workers
// and Server code include too.
#ifndef PREFORK_MASTER_OPTIONS_CHECK_HPP
#define PREFORK_MASTER_OPTIONS_CHECK_HPP

#include <stdexcept>
#include <string>

#include <prefork/version.hpp>
#include <prefork/detail/socket.hpp>
#include <prefork/options.hpp>

namespace prefork::detail {

inline void validate(const Options& o) {
  auto bad = [](const std::string& what) { throw std::invalid_argument("prefork: Options." + what); };
  if (o.workers == 0) bad("workers must be at least 1");
  if (o.workers > 4096) bad("workers must be at most 4096, got " + std::to_string(o.workers));
  if (o.backlog <= 0) bad("backlog must be positive, got " + std::to_string(o.backlog));
  if (o.defer_accept.count() < 0 || o.defer_accept.count() > 3600)
    bad("defer_accept must be between 0 and 3600 s");
  if (o.drain_timeout.count() < 0) bad("drain_timeout must not be negative");
  if (o.kill_timeout.count() < 0) bad("kill_timeout must not be negative");
  if (o.reload_surge == 0) bad("reload_surge must be at least 1");
  if (o.reload_timeout.count() <= 0) bad("reload_timeout must be positive");
  if (o.upgrade_timeout.count() <= 0) bad("upgrade_timeout must be positive");
  if (o.max_message_size == 0 || o.max_message_size > 0xffffffffu)
    bad("max_message_size must be between 1 byte and 4 GiB - 1");
  if (o.max_queued_bytes == 0) bad("max_queued_bytes must be positive");
  for (auto& l : o.listen)
    if (std::string why = address_problem(l); !why.empty()) bad("listen: '" + l + "': " + why);
  if (!o.pid_file.empty() && (o.pid_file.back() == '/' || o.pid_file.find('\0') != std::string::npos))
    bad("pid_file: '" + o.pid_file + "' is not a file name");
  for (auto* id : {&o.user, &o.group})
    if (id->find('\0') != std::string::npos)
      bad(std::string(id == &o.user ? "user" : "group") + " holds a NUL byte");
}

}  // namespace prefork::detail

#endif  // PREFORK_MASTER_OPTIONS_CHECK_HPP
