// Message codecs: a codec turns one user message into the payload bytes of one IPC frame and
// back. The MessageCodec concept is what Cluster and Channel require of their codec parameter;
// StringCodec (the default), BytesCodec, PodCodec and VariantCodec are the built-ins.
#ifndef PREFORK_CODEC_HPP
#define PREFORK_CODEC_HPP

#include <array>
#include <bit>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include <prefork/version.hpp>

#include "prefork/error.hpp"

namespace prefork {

// A codec is a stateless policy: Cluster stores it with [[no_unique_address]] and builds it
// with C{} in each process, so it must be default-constructible and its encode/decode const.
//
// decode() receives bytes from another process and must treat them as untrusted: whatever the
// input, it returns std::nullopt and sets ec to errc::decode_failed, or returns a value (and
// clears ec). It never reads past bytes.end() and never has undefined behaviour.

template <class C>
concept HasMessageType = requires { typename C::message_type; };

template <class C>
concept EncodesMessage =
    HasMessageType<C> && requires(const C& c, const typename C::message_type& m) {
      { c.encode(m) } -> std::convertible_to<std::string>;
    };

template <class C>
concept DecodesMessage =
    HasMessageType<C> && requires(const C& c, std::string_view bytes, std::error_code& ec) {
      { c.decode(bytes, ec) } -> std::same_as<std::optional<typename C::message_type>>;
    };

template <class C>
concept MessageCodec = HasMessageType<C> && EncodesMessage<C> && DecodesMessage<C> &&
                       std::default_initializable<C>;

namespace detail {

template <class T>
concept TriviallyCopyable = std::is_trivially_copyable_v<T>;

template <class T>
concept NotPointer = !std::is_pointer_v<T>;

/// Types PodCodec copies byte for byte. A pointer is rejected because its value means nothing
/// in another address space (exec mode), and only by accident something in a forked one.
template <class T>
concept PodPayload = TriviallyCopyable<T> && NotPointer<T>;

template <class T>
concept StringPayload = std::same_as<T, std::string>;

/// The alternatives VariantCodec can carry: a string (the rest of the frame) or a POD (exactly
/// sizeof(T) bytes).
template <class T>
concept VariantAlternative = StringPayload<T> || PodPayload<T>;

inline void append_bytes(std::string& out, const void* data, std::size_t size) {
  // memcpy/append with a null pointer is UB even for size 0, and an empty vector's data() may
  // be null.
  if (size != 0) out.append(static_cast<const char*>(data), size);
}

template <PodPayload T>
void append_pod(std::string& out, const T& value) {
  // The object representation, padding bytes included: reading any object's bytes through a
  // char glvalue is defined ([basic.lval]/11), and the decoder ignores the padding. (A
  // bit_cast to std::array<char, N> would not be: a padding bit may only land in an unsigned
  // char or std::byte, [bit.cast]/2.)
  out.append(reinterpret_cast<const char*>(std::addressof(value)), sizeof(T));
}

/// Bytes that are not the object representation of any value of T. Loading such a value is
/// undefined, so the check has to happen before the bit_cast. Only bool is checked: the SysV
/// x86-64 and AArch64 ABIs define false as 0 and true as 1 in one byte.
template <class T>
bool invalid_representation(std::string_view bytes) noexcept {
  if constexpr (std::same_as<std::remove_cv_t<T>, bool>) {
    return static_cast<unsigned char>(bytes[0]) > 1;
  } else {
    return false;
  }
}

template <PodPayload T>
std::optional<T> load_pod(std::string_view bytes, std::error_code& ec) {
  if (bytes.size() != sizeof(T) || invalid_representation<T>(bytes)) {
    ec = errc::decode_failed;
    return std::nullopt;
  }
  // bit_cast rather than default-construct + memcpy: a trivially copyable T need not be
  // default-constructible.
  std::array<char, sizeof(T)> raw;
  std::memcpy(raw.data(), bytes.data(), sizeof(T));
  ec.clear();
  return std::bit_cast<std::remove_cv_t<T>>(raw);
}

// The variant header is written byte by byte so that the format is little-endian by
// definition, not by the accident of the host; it costs nothing measurable next to a syscall.
inline void append_u32_le(std::string& out, std::uint32_t v) {
  for (unsigned shift = 0; shift < 32; shift += 8) {
    out.push_back(static_cast<char>(static_cast<unsigned char>((v >> shift) & 0xFFu)));
  }
}

/// Precondition: bytes.size() >= 4.
inline std::uint32_t load_u32_le(std::string_view bytes) noexcept {
  std::uint32_t v = 0;
  for (unsigned i = 0; i < 4; ++i) {
    v |= std::uint32_t{static_cast<unsigned char>(bytes[i])} << (8 * i);
  }
  return v;
}

}  // namespace detail

/// The default codec: the message is a std::string and its bytes are the payload unchanged.
struct StringCodec {
  using message_type = std::string;

  /// Throws std::bad_alloc only.
  std::string encode(const message_type& m) const { return m; }

  /// Never fails: every byte string is a message. Clears ec. Throws std::bad_alloc only.
  std::optional<message_type> decode(std::string_view bytes, std::error_code& ec) const {
    ec.clear();
    return std::optional<message_type>(std::in_place, bytes);
  }
};
static_assert(MessageCodec<StringCodec>);

/// Raw binary messages as std::vector<std::byte>; the payload is the vector's bytes unchanged.
struct BytesCodec {
  using message_type = std::vector<std::byte>;

  /// Throws std::bad_alloc only.
  std::string encode(const message_type& m) const {
    std::string out;
    detail::append_bytes(out, m.data(), m.size());
    return out;
  }

  /// Never fails: every byte string is a message. Clears ec. Throws std::bad_alloc only.
  std::optional<message_type> decode(std::string_view bytes, std::error_code& ec) const {
    message_type out(bytes.size());
    if (!bytes.empty()) std::memcpy(out.data(), bytes.data(), bytes.size());
    ec.clear();
    return out;
  }
};
static_assert(MessageCodec<BytesCodec>);

/// A trivially copyable T sent as exactly its sizeof(T) bytes of object representation.
///
/// Meant for peers built from the same binary: fork mode, or exec mode re-running the same
/// build. The layout, padding and byte order are the host's and the compiler's, so a different
/// build (other compiler, flags or architecture) may read a different value.
///
/// The decoder checks the size, and for T = bool that the byte is 0 or 1. It cannot check the
/// members of a struct: if T contains a bool, an enum without a fixed underlying type, or a
/// pointer, bytes from an untrusted peer can make an invalid value, which is undefined
/// behaviour to read. Use such types only with a trusted peer, or validate in a custom codec.
template <class T>
  requires detail::PodPayload<T>
struct PodCodec {
  using message_type = T;

  /// Returns sizeof(T) bytes. Throws std::bad_alloc only.
  std::string encode(const message_type& m) const {
    std::string out;
    out.reserve(sizeof(T));
    detail::append_pod(out, m);
    return out;
  }

  /// Fails with errc::decode_failed (and returns std::nullopt) unless bytes.size() is exactly
  /// sizeof(T), or when T is bool and the byte is neither 0 nor 1. Clears ec on success.
  std::optional<message_type> decode(std::string_view bytes, std::error_code& ec) const {
    return detail::load_pod<T>(bytes, ec);
  }
};
static_assert(MessageCodec<PodCodec<int>>);
static_assert(MessageCodec<PodCodec<bool>>);

/// One of several message types, as std::variant<Ts...>. Each alternative is std::string or a
/// type PodCodec accepts (with PodCodec's same-binary caveat).
///
/// Wire format: the alternative's index as 4 bytes little-endian, then the alternative's
/// bytes: for std::string all the remaining bytes, for a POD exactly sizeof(T) bytes.
/// The index, not the type, identifies the alternative, so a repeated type such as
/// VariantCodec<int, int> keeps its two alternatives apart.
template <class... Ts>
  requires(sizeof...(Ts) > 0) && (detail::VariantAlternative<Ts> && ...)
struct VariantCodec {
  using message_type = std::variant<Ts...>;

  /// Throws std::bad_variant_access if m is valueless_by_exception (as std::visit would), and
  /// std::bad_alloc.
  std::string encode(const message_type& m) const {
    if (m.valueless_by_exception()) throw std::bad_variant_access{};
    return encoders[m.index()](m);
  }

  /// Fails with errc::decode_failed (and returns std::nullopt) when bytes is shorter than the
  /// 4-byte header, the index names no alternative, or a POD alternative's payload is not
  /// exactly sizeof(T) bytes (or is not 0/1 for bool). Clears ec on success.
  std::optional<message_type> decode(std::string_view bytes, std::error_code& ec) const {
    if (bytes.size() < header_size) {
      ec = errc::decode_failed;
      return std::nullopt;
    }
    std::uint32_t index = detail::load_u32_le(bytes);
    if (index >= sizeof...(Ts)) {
      ec = errc::decode_failed;
      return std::nullopt;
    }
    return decoders[index](bytes.substr(header_size), ec);
  }

 private:
  static constexpr std::size_t header_size = 4;

  template <std::size_t I>
  static std::string encode_alternative(const message_type& m) {
    const auto& value = std::get<I>(m);
    std::string out;
    detail::append_u32_le(out, static_cast<std::uint32_t>(I));
    if constexpr (detail::StringPayload<std::variant_alternative_t<I, message_type>>) {
      // Appended in place rather than through StringCodec::encode: a message may be hundreds
      // of MiB and the extra copy would be the whole cost of encoding.
      out.reserve(header_size + value.size());
      out.append(value);
    } else {
      detail::append_pod(out, value);
    }
    return out;
  }

  template <std::size_t I>
  static std::optional<message_type> decode_alternative(std::string_view payload,
                                                        std::error_code& ec) {
    using T = std::variant_alternative_t<I, message_type>;
    if constexpr (detail::StringPayload<T>) {
      ec.clear();
      return std::optional<message_type>(std::in_place, std::in_place_index<I>, payload);
    } else {
      std::optional<T> value = detail::load_pod<T>(payload, ec);
      if (!value) return std::nullopt;
      return std::optional<message_type>(std::in_place, std::in_place_index<I>, *value);
    }
  }

  using encoder = std::string (*)(const message_type&);
  using decoder = std::optional<message_type> (*)(std::string_view, std::error_code&);

  // Tables indexed by the runtime index: one indirect call, no recursion over the alternatives.
  template <std::size_t... Is>
  static constexpr std::array<encoder, sizeof...(Ts)> make_encoders(std::index_sequence<Is...>) {
    return {&encode_alternative<Is>...};
  }
  template <std::size_t... Is>
  static constexpr std::array<decoder, sizeof...(Ts)> make_decoders(std::index_sequence<Is...>) {
    return {&decode_alternative<Is>...};
  }
  static constexpr std::array<encoder, sizeof...(Ts)> encoders =
      make_encoders(std::index_sequence_for<Ts...>{});
  static constexpr std::array<decoder, sizeof...(Ts)> decoders =
      make_decoders(std::index_sequence_for<Ts...>{});
};
static_assert(MessageCodec<VariantCodec<std::string, int>>);

}  // namespace prefork

#endif  // PREFORK_CODEC_HPP
