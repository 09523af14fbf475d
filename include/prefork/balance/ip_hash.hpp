// IpHash: sticky balancing by client address. The address (not the port) hashes to a slot, and
// a replacement worker inherits its slot, so a client keeps reaching "its" worker across that
// worker's crashes and restarts. While the slot has no ready worker the connection goes to
// another worker chosen by the same hash, rather than waiting.
#ifndef PREFORK_BALANCE_IP_HASH_HPP
#define PREFORK_BALANCE_IP_HASH_HPP

#include <netinet/in.h>
#include <sys/socket.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>

#include <prefork/version.hpp>
#include <prefork/balance/policy.hpp>

namespace prefork {

class IpHash {
 public:
  static constexpr Dispatch dispatch = Dispatch::master;

  /// FNV-1a over the address bytes (IPv4: 4, IPv6: 16, Unix peers: none, so they all hash
  /// alike). An IPv4-mapped IPv6 address hashes as its IPv4 address.
  static std::uint64_t hash(const detail::SocketAddress& a) noexcept {
    unsigned char bytes[16];
    std::size_t n = 0;
    if (a.family() == AF_INET) {
      sockaddr_in in;
      std::memcpy(&in, &a.storage, sizeof in);
      std::memcpy(bytes, &in.sin_addr, 4);
      n = 4;
    } else if (a.family() == AF_INET6) {
      sockaddr_in6 in6;
      std::memcpy(&in6, &a.storage, sizeof in6);
      if (IN6_IS_ADDR_V4MAPPED(&in6.sin6_addr)) {
        std::memcpy(bytes, reinterpret_cast<const unsigned char*>(&in6.sin6_addr) + 12, 4);
        n = 4;
      } else {
        std::memcpy(bytes, &in6.sin6_addr, 16);
        n = 16;
      }
    }
    std::uint64_t h = 14695981039346656037ull;
    for (std::size_t i = 0; i < n; ++i) {
      h ^= bytes[i];
      h *= 1099511628211ull;
    }
    return h;
  }

  std::optional<std::size_t> pick(const PickContext& ctx) const noexcept {
    if (ctx.ready.empty() || ctx.slots == 0) return std::nullopt;
    std::uint64_t h = hash(ctx.peer);
    std::size_t slot = static_cast<std::size_t>(h % ctx.slots);
    for (std::size_t i = 0; i < ctx.ready.size(); ++i)
      if (ctx.ready[i].slot == slot) return i;
    return static_cast<std::size_t>(h % ctx.ready.size());
  }
};
static_assert(BalancePolicy<IpHash>);

}  // namespace prefork

#endif  // PREFORK_BALANCE_IP_HASH_HPP
