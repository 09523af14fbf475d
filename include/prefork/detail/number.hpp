// Whole decimal numbers read from text that another process wrote: the exec'd worker's boot
// variable and the control socket's arguments. Nothing before or after the digits is accepted,
// so "8 " or "8x" is an error rather than 8.
#ifndef PREFORK_DETAIL_NUMBER_HPP
#define PREFORK_DETAIL_NUMBER_HPP

#include <charconv>
#include <string_view>
#include <system_error>

#include <prefork/version.hpp>

namespace prefork::detail {

/// `text` as a whole decimal number, nothing before or after it.
template <class T>
bool parse_number(std::string_view text, T& out) noexcept {
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), out);
  return ec == std::errc{} && end == text.data() + text.size();
}

}  // namespace prefork::detail

#endif  // PREFORK_DETAIL_NUMBER_HPP
