#pragma once
// The one place that builds stepflow's messages about failed closures and throws
// `async_closure_error`, so every report reads the same.

#include <exception>
#include <string>
#include <string_view>

#include "stepflow/errors.hpp"
#include "stepflow/options.hpp"

namespace stepflow::detail {

struct async_failure;

/// The device name that failures and reports of joined closures carry.
inline constexpr std::string_view joined_device_name = "joined";

/// `what()` of a std::exception, or a phrase saying the exception is of another type.
std::string describe_exception(const std::exception_ptr& error);

/// Throws `async_closure_error` with `failure.error` nested inside it.
[[noreturn]] void throw_async_closure_error(std::string_view device, const async_failure& failure);

/// Takes the failure recorded in `source` (an `async_queue` or the `step_graph`), if any, and
/// throws it as `async_closure_error`. If building that exception throws (out of memory), the
/// failure goes back to `source` first: a failure is never lost on its way to the user.
template <class Source>
void report_failure(Source& source, std::string_view device) {
  auto failure = source.take_failure();
  if (!failure) return;
  try {
    throw_async_closure_error(device, *failure);
  } catch (const stepflow::async_closure_error&) {
    throw;
  } catch (...) {
    source.restore_failure(std::move(*failure));
    throw;
  }
}

/// The shutdown report as text, one line per device; empty when there is nothing to say.
std::string format_shutdown_report(const shutdown_report& report);

}  // namespace stepflow::detail
