#include "error_reporting.hpp"

#include <fmt/format.h>

#include "async_queue.hpp"
#include "stepflow/errors.hpp"

namespace stepflow::detail {

std::string describe_exception(const std::exception_ptr& error) {
  if (!error) return "no exception";
  try {
    std::rethrow_exception(error);
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
    return "an exception not derived from std::exception";
  }
}

void throw_async_closure_error(std::string_view device, const async_failure& failure) {
  const std::string message =
      fmt::format("{} on device '{}': {} ({} queued asynchronous closure{} discarded)",
                  async_failure_prefix, device, describe_exception(failure.error),
                  failure.discarded, failure.discarded == 1 ? " was" : "s were");
  try {
    std::rethrow_exception(failure.error);
  } catch (...) {
    // Thrown while the original is being handled, so std::nested_exception captures it.
    throw async_closure_error(message, std::string(device), failure.discarded);
  }
}

std::string format_shutdown_report(const shutdown_report& report) {
  if (report.empty()) return {};
  std::string text = "stepflow: scheduler destroyed with unreported problems:\n";
  for (const device_shutdown_report& d : report.devices) {
    if (d.unreported_error) {
      text += fmt::format(
          "  device '{}': an asynchronous closure failed and no step end or flush reported it: "
          "{} ({} closure{} discarded behind it)\n",
          d.device, describe_exception(d.unreported_error), d.discarded,
          d.discarded == 1 ? "" : "s");
    }
    if (d.never_run != 0) {
      text += fmt::format("  device '{}': {} closure{} added after its last step end never ran\n",
                          d.device, d.never_run, d.never_run == 1 ? "" : "s");
    }
  }
  return text;
}

}  // namespace stepflow::detail
