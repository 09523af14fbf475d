// Little-endian integers and length-prefixed strings for the store's snapshot file and wire
// format. The reader checks every length against the bytes that remain before it copies or
// allocates, so a length field from another process or a damaged file cannot make it read out
// of bounds or reserve memory the input does not back.
#ifndef PREFORK_DETAIL_STORE_BYTES_HPP
#define PREFORK_DETAIL_STORE_BYTES_HPP

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace prefork::detail {

// Byte by byte, so the format is little-endian by definition rather than by the host's order.
template <class U>
void store_put(std::string& out, U v) {
  for (std::size_t i = 0; i < sizeof(U); ++i)
    out.push_back(static_cast<char>(static_cast<unsigned char>((v >> (8 * i)) & 0xFFu)));
}

/// Precondition: s.size() <= UINT32_MAX (the store's limits keep keys and values below it).
inline void store_put_string(std::string& out, std::string_view s) {
  store_put(out, static_cast<std::uint32_t>(s.size()));
  out.append(s);
}

/// A cursor over untrusted bytes. A failed read leaves ok() false for good and returns a zero
/// or empty value; callers check ok() once at the end.
class StoreReader {
 public:
  explicit StoreReader(std::string_view bytes) noexcept : rest_(bytes) {}

  bool ok() const noexcept { return ok_; }
  std::size_t remaining() const noexcept { return rest_.size(); }
  bool at_end() const noexcept { return ok_ && rest_.empty(); }

  template <class U>
  U get() noexcept {
    if (!ok_ || rest_.size() < sizeof(U)) return fail<U>();
    U v = 0;
    for (std::size_t i = 0; i < sizeof(U); ++i)
      v = static_cast<U>(v | (static_cast<U>(static_cast<unsigned char>(rest_[i])) << (8 * i)));
    rest_.remove_prefix(sizeof(U));
    return v;
  }

  /// A view of the next n bytes, or empty (and !ok()) when fewer remain.
  std::string_view bytes(std::size_t n) noexcept {
    if (!ok_ || rest_.size() < n) return fail<std::string_view>();
    std::string_view v = rest_.substr(0, n);
    rest_.remove_prefix(n);
    return v;
  }

  /// A u32 length, then that many bytes.
  std::string_view string() noexcept { return bytes(get<std::uint32_t>()); }

 private:
  template <class T>
  T fail() noexcept {
    ok_ = false;
    rest_ = {};
    return T{};
  }

  std::string_view rest_;
  bool ok_ = true;
};

}  // namespace prefork::detail

#endif  // PREFORK_DETAIL_STORE_BYTES_HPP
