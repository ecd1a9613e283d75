#pragma once
/// \file
/// The global step whose joined closures the calling thread is running. Not part of the API.

#include <cstdint>
#include <functional>
#include <type_traits>
#include <utility>

namespace stepflow::detail {

/// The global step of the joined closure running on this thread; 0 outside joined closures.
std::uint64_t current_joined_step() noexcept;

/// Whether a joined closure `F` with arguments `Args` takes the step number first: whether it
/// can be called as `f(step, args...)`, with its stored arguments as rvalues or as lvalues.
template <class F, class... Args>
inline constexpr bool takes_joined_step =
    std::is_invocable_v<F&, std::uint64_t, std::decay_t<Args>&&...> ||
    std::is_invocable_v<F&, std::uint64_t, std::decay_t<Args>&...>;

/// A joined closure that takes the step number first: calls `f(step, args...)`. Keeps the
/// label of a `stepflow::labeled` callable.
template <class F>
struct with_joined_step {
  F f;

  // Forwards what `bound_call` passes: rvalues when `f` takes them (move-only arguments),
  // lvalues otherwise, the same capture rules as a device's closures.
  template <class... Args>
  requires std::is_invocable_v<F&, std::uint64_t, Args&&...>
  void operator()(Args&&... args) {
    std::invoke(f, current_joined_step(), std::forward<Args>(args)...);
  }

  const char* stepflow_label() const noexcept requires requires(const F& g) { g.stepflow_label(); }
  { return f.stepflow_label(); }
};

}  // namespace stepflow::detail
