#pragma once
/// \file
/// stepflow's exceptions. Every exception stepflow itself throws derives from `stepflow::error`,
/// except `std::invalid_argument` for a null callable and for the reserved device name `joined`
/// (preconditions on the caller's values, as the standard library reports them). Exceptions thrown
/// by user closures are never wrapped when a step end runs them inline; those of asynchronous
/// closures come back nested inside `async_closure_error`.

#include <cstddef>
#include <exception>
#include <stdexcept>
#include <string>
#include <utility>

namespace stepflow {

/// Root of stepflow's exceptions: misuse (re-entrant or out-of-order calls, use after shutdown).
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A bad option or environment value. `what()` names the variable (or option) and the value.
class config_error : public error {
 public:
  using error::error;
};

/// An asynchronous closure threw. Thrown once, by the first `run_step_closures()` or `flush()` on
/// that device that starts after the failure was recorded. The closure's own exception is nested:
/// `std::rethrow_if_nested(e)` (or `original()`) gives it back.
class async_closure_error : public error, public std::nested_exception {
 public:
  /// Must be constructed while the original exception is being handled (inside a `catch`), so
  /// that `std::nested_exception` captures it; `detail::throw_async_closure_error` does that.
  async_closure_error(const std::string& message, std::string device, std::size_t discarded)
      : error(message), device_(std::move(device)), discarded_(discarded) {}

  /// The exception the closure threw.
  std::exception_ptr original() const noexcept { return nested_ptr(); }
  /// The device whose closure failed.
  const std::string& device() const noexcept { return device_; }
  /// Asynchronous closures of that device that were queued behind the failure and never ran.
  std::size_t discarded() const noexcept { return discarded_; }

 private:
  std::string device_;
  std::size_t discarded_;
};

/// The prefix of `async_closure_error::what()`, word for word torch._lazy's message.
inline constexpr const char* async_failure_prefix =
    "Cannot run asynchronous closure due to previously raised exception";

}  // namespace stepflow
