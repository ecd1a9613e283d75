#pragma once
/// \file
/// Metrics: what a scheduler's devices did with their closures, as a value snapshot, and a
/// readable report of it (like torch._lazy's metrics report). Value types only: no oneTBB, no fmt
/// (`<stepflow/fmt.hpp>` adds `fmt::format("{}", snapshot)` for users who want it).

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace stepflow {

/// The three kinds of step closure: run inline by the step end (`sync`), queued to run in the
/// background (`async`), or run once after every participating device finished a step (`joined`).
enum class closure_kind : std::uint8_t { sync, async, joined };

/// "sync", "async" or "joined" ("unknown" for a value outside the enumeration). Thread-safe; the
/// view refers to a string literal.
std::string_view to_string(closure_kind kind) noexcept;

/// Closure run time. `count` and `sum_ns` are exact (every closure that ran is timed, in batches);
/// the distribution comes from a sample of closures timed one by one. All zero unless the
/// scheduler measures run time (`options::measure_run_time`, off by default).
struct run_time_stats {
  std::uint64_t count = 0;   ///< closures timed exactly (all that ran)
  std::uint64_t sum_ns = 0;  ///< their total run time
  std::uint64_t max_ns = 0;  ///< max over the sampled closures
  /// Percentiles of the sampled closures, from a log-scale histogram: the upper bound of the
  /// bucket holding the percentile (at most 25% above the true value), capped at `max_ns`.
  std::uint64_t p50_ns = 0, p99_ns = 0;
  std::uint64_t sampled = 0;  ///< closures in the sample
};

/// One device's counters, or the total over all devices (`device == "total"`).
/// Counters (`added_*`, `ran_*`, ...) only grow; `waiting` and `pending` are the current values.
struct device_metrics {
  std::string device;
  /// Completed step ends, as `device_context::step()`: a `run_step_closures` call that only
  /// reported an asynchronous failure, or was refused, does not count.
  std::uint64_t steps = 0;
  std::uint64_t added_sync = 0, added_async = 0, added_joined = 0;
  std::uint64_t ran_sync = 0, ran_async = 0, ran_joined = 0;  ///< started (returned or threw)
  std::uint64_t failed_sync = 0, failed_async = 0, failed_joined = 0;  ///< threw
  std::uint64_t dropped_sync = 0;      ///< skipped: behind a sync failure of the same step
  std::uint64_t discarded_async = 0;   ///< never started: queued behind an async failure
  std::uint64_t waiting = 0;           ///< added, not yet taken by a step end
  std::uint64_t pending = 0;           ///< async handed over, not yet started
  std::uint64_t queue_high_water = 0;  ///< largest `pending` seen
  std::uint64_t blocked_ns = 0;        ///< producers' time waiting for room in a full queue
  /// oneTBB tasks started to run asynchronous closures; each may have had to wake a sleeping
  /// worker. Near `steps` when the steps come further apart than `options::worker_linger`, which
  /// keeps the worker that ran one step's closures watching for the next.
  std::uint64_t async_tasks = 0;
  run_time_stats run_time;
};

/// Every device's metrics at one moment, and their total.
struct metrics_snapshot {
  /// Sorted by device name, then a row named `joined` for the joined closures once any was
  /// added (a name no device may take).
  std::vector<device_metrics> devices;
  /// `device == "total"`. Counters, gauges, `blocked_ns`, `run_time.count`, `.sum_ns` and
  /// `.sampled` are sums; `queue_high_water` and `run_time.max_ns` are the maxima over the
  /// devices. `run_time.p50_ns`/`p99_ns` are percentiles of all devices' samples together,
  /// computed from the devices' histograms merged (not a max or mean of device percentiles).
  device_metrics total;
  /// `options::measure_run_time` of the scheduler that took the snapshot: false means every
  /// `run_time` above is zero because nothing was timed, not because nothing ran, and
  /// `metrics_report` says so instead of printing the run-time table.
  bool run_time_measured = true;
};

/// A readable report: a closures table and a run-time table (a line saying run time was not
/// measured instead, when `run_time_measured` is false), each with one row per device (in
/// the snapshot's order) and a `total` row, fixed-width columns, durations in ns/us/ms/s.
/// Ends with a newline. Thread-safe (reads only `snapshot`); may throw `std::bad_alloc`.
std::string metrics_report(const metrics_snapshot& snapshot);

}  // namespace stepflow
