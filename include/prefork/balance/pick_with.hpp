// PickWith<F>: master dispatch by a user callable, F being the type of a default-constructible
// function object (a captureless lambda works: C++20 lets it appear in a template argument).
// F receives the client's address and the ready workers' loads and returns an index into
// ctx.ready, or nullopt to let the master take the first ready worker.
//
//   using Sticky = prefork::PickWith<decltype([](const prefork::PickContext& c)
//                                        -> std::optional<std::size_t> { return 0; })>;
#ifndef PREFORK_BALANCE_PICK_WITH_HPP
#define PREFORK_BALANCE_PICK_WITH_HPP

#include <concepts>
#include <cstddef>
#include <optional>

#include <prefork/version.hpp>
#include <prefork/balance/policy.hpp>

namespace prefork {

template <class F>
concept PickFunction = std::default_initializable<F> && requires(F& f, const PickContext& ctx) {
  { f(ctx) } -> std::convertible_to<std::optional<std::size_t>>;
};

template <PickFunction F>
struct PickWith {
  static constexpr Dispatch dispatch = Dispatch::master;
  [[no_unique_address]] F fn;
  std::optional<std::size_t> pick(const PickContext& ctx) { return fn(ctx); }
};

}  // namespace prefork

#endif  // PREFORK_BALANCE_PICK_WITH_HPP
