#pragma once
// The one place that builds stepflow's messages about failed closures and throws
// `async_closure_error`, so every report reads the same.

#include <exception>
#include <string>
#include <string_view>

#include "stepflow/options.hpp"

namespace stepflow::detail {

struct async_failure;

/// The device name that failures and reports of joined closures carry.
inline constexpr std::string_view joined_device_name = "joined";

/// `what()` of a std::exception, or a phrase saying the exception is of another type.
std::string describe_exception(const std::exception_ptr& error);

/// Throws `async_closure_error` with `failure.error` nested inside it.
[[noreturn]] void throw_async_closure_error(std::string_view device, const async_failure& failure);

/// The shutdown report as text, one line per device; empty when there is nothing to say.
std::string format_shutdown_report(const shutdown_report& report);

}  // namespace stepflow::detail
