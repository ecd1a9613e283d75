// metrics_report() and to_string(closure_kind): the readable side of stepflow/metrics.hpp.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>

#include "stepflow/metrics.hpp"

namespace stepflow {

std::string_view to_string(closure_kind kind) noexcept {
  switch (kind) {
    case closure_kind::sync:
      return "sync";
    case closure_kind::async:
      return "async";
    case closure_kind::joined:
      return "joined";
  }
  return "unknown";
}

namespace {

// "734 ns", "12.3 us", "4.56 ms", "1.20 s", "250 s": three significant digits at most, in the
// largest unit that keeps the number at or above 1.
std::string format_duration(std::uint64_t ns) {
  if (ns < 1000) return fmt::format("{} ns", ns);
  struct unit {
    double scale;
    const char* name;
  };
  static constexpr unit units[] = {{1e3, "us"}, {1e6, "ms"}, {1e9, "s"}};
  for (const unit& u : units) {
    const double v = static_cast<double>(ns) / u.scale;
    // Rounded to the digits shown, 999.5 would print as "1000": use the next unit then.
    if (v >= 999.5 && u.scale < 1e9) continue;
    const int decimals = v < 9.995 ? 2 : (v < 99.95 ? 1 : 0);
    return fmt::format("{:.{}f} {}", v, decimals, u.name);
  }
  return {};  // unreachable: the last unit always returns
}

std::string three(std::uint64_t sync, std::uint64_t async, std::uint64_t joined) {
  return fmt::format("{}/{}/{}", sync, async, joined);
}

// A fixed-width table: first column left-aligned, the others right-aligned, two spaces between
// columns, each column as wide as its widest cell; a dashed rule before the last row (the total).
class table {
 public:
  explicit table(std::vector<std::string> header) { rows_.push_back(std::move(header)); }
  void add(std::vector<std::string> row) { rows_.push_back(std::move(row)); }

  void render(std::string& out) const {
    std::vector<std::size_t> widths(rows_.front().size(), 0);
    for (const auto& row : rows_) {
      for (std::size_t c = 0; c < row.size(); ++c) widths[c] = std::max(widths[c], row[c].size());
    }
    std::size_t line_width = 0;
    for (const std::size_t w : widths) line_width += w + 2;
    for (std::size_t r = 0; r < rows_.size(); ++r) {
      if (r + 1 == rows_.size() && r > 1) {
        out += "  ";
        out.append(line_width - 2, '-');
        out += '\n';
      }
      out += "  ";
      const auto& row = rows_[r];
      for (std::size_t c = 0; c < row.size(); ++c) {
        if (c != 0) out += "  ";
        if (c == 0) {
          fmt::format_to(std::back_inserter(out), "{:<{}}", row[c], widths[c]);
        } else {
          fmt::format_to(std::back_inserter(out), "{:>{}}", row[c], widths[c]);
        }
      }
      // No trailing blanks from the padding of the last column (it is right-aligned) or of a
      // lone first column.
      while (!out.empty() && out.back() == ' ') out.pop_back();
      out += '\n';
    }
  }

 private:
  std::vector<std::vector<std::string>> rows_;
};

std::vector<std::string> closures_row(const device_metrics& d) {
  return {d.device,
          fmt::format("{}", d.steps),
          three(d.added_sync, d.added_async, d.added_joined),
          three(d.ran_sync, d.ran_async, d.ran_joined),
          three(d.failed_sync, d.failed_async, d.failed_joined),
          fmt::format("{}", d.dropped_sync),
          fmt::format("{}", d.discarded_async),
          fmt::format("{}", d.waiting),
          fmt::format("{}", d.pending),
          fmt::format("{}", d.queue_high_water),
          format_duration(d.blocked_ns),
          fmt::format("{}", d.async_tasks)};
}

std::vector<std::string> run_time_row(const device_metrics& d) {
  const run_time_stats& r = d.run_time;
  const std::string none = "-";
  const bool timed = r.count != 0;
  const bool sampled = r.sampled != 0;
  return {d.device,
          fmt::format("{}", r.count),
          timed ? format_duration(r.sum_ns) : none,
          timed ? format_duration(r.sum_ns / r.count) : none,
          sampled ? format_duration(r.p50_ns) : none,
          sampled ? format_duration(r.p99_ns) : none,
          sampled ? format_duration(r.max_ns) : none,
          fmt::format("{}", r.sampled)};
}

}  // namespace

std::string metrics_report(const metrics_snapshot& snapshot) {
  // The "joined" row is not a device.
  const auto n = static_cast<std::size_t>(
      std::count_if(snapshot.devices.begin(), snapshot.devices.end(),
                    [](const device_metrics& d) { return d.device != "joined"; }));
  std::string out = fmt::format("stepflow metrics: {} device{}\n", n, n == 1 ? "" : "s");

  out += "closures (counts are sync/async/joined)\n";
  table closures({"device", "steps", "added", "ran", "failed", "dropped", "discarded", "waiting",
                  "pending", "queue max", "blocked", "tasks"});
  for (const device_metrics& d : snapshot.devices) closures.add(closures_row(d));
  device_metrics total = snapshot.total;
  total.device = "total";
  closures.add(closures_row(total));
  closures.render(out);

  if (!snapshot.run_time_measured) {
    out +=
        "run time: not measured (turn on with options::measure_run_time or STEPFLOW_RUN_TIME=1)\n";
    return out;
  }
  out += "run time (p50, p99 and max from a sample of closures)\n";
  table times({"device", "closures", "total", "mean", "p50", "p99", "max", "sampled"});
  for (const device_metrics& d : snapshot.devices) times.add(run_time_row(d));
  times.add(run_time_row(total));
  times.render(out);
  return out;
}

}  // namespace stepflow
