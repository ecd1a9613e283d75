#pragma once
/// \file
/// Opt-in fmt support: `fmt::format("{}", scheduler.metrics())` prints `metrics_report()`.
///
/// stepflow links fmt privately (only its .cpp files use it), so neither the umbrella header nor
/// any other stepflow header includes fmt. A program that includes this header uses fmt itself
/// and must link it: `target_link_libraries(app PRIVATE stepflow::stepflow fmt::fmt)`.

#include <string>
#include <string_view>

#include <fmt/format.h>

#include "stepflow/metrics.hpp"

/// Formats a `metrics_snapshot` as `metrics_report(snapshot)`. The format spec is that of a
/// string (`{:>80}` pads the whole report, which is rarely useful; `{}` is the usual form).
/// Thread-safe as `metrics_report` is.
template <>
struct fmt::formatter<stepflow::metrics_snapshot> : fmt::formatter<std::string_view> {
  template <class FormatContext>
  auto format(const stepflow::metrics_snapshot& snapshot, FormatContext& ctx) const
      -> decltype(ctx.out()) {
    const std::string report = stepflow::metrics_report(snapshot);
    return fmt::formatter<std::string_view>::format(std::string_view(report), ctx);
  }
};
