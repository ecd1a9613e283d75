#pragma once
/// \file
/// The global step whose joined closures the calling thread is running. Not part of the API.

#include <cstdint>
#include <functional>
#include <utility>

namespace stepflow::detail {

/// The global step of the joined closure running on this thread; 0 outside joined closures.
std::uint64_t current_joined_step() noexcept;

/// A joined closure that takes the step number first: calls `f(step, args...)`. Keeps the
/// label of a `stepflow::labeled` callable.
template <class F>
struct with_joined_step {
  F f;

  template <class... Args>
  void operator()(Args&... args) {
    std::invoke(f, current_joined_step(), args...);
  }

  const char* stepflow_label() const noexcept requires requires(const F& g) { g.stepflow_label(); }
  { return f.stepflow_label(); }
};

}  // namespace stepflow::detail
