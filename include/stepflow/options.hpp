#pragma once
/// \file
/// `stepflow::options`: every setting of a scheduler, as a value type with defaults.

#include <chrono>
#include <cstddef>
#include <exception>
#include <functional>
#include <string>
#include <vector>

namespace stepflow {

/// What one device left behind when its scheduler was destroyed.
struct device_shutdown_report {
  std::string device;
  /// An asynchronous failure no step end or flush reported, or null.
  std::exception_ptr unreported_error;
  /// Asynchronous closures discarded behind that failure (fail-stop).
  std::size_t discarded = 0;
  /// Closures added but never taken by a step end (sync and async); destroyed without running.
  std::size_t never_run = 0;
};

/// Handed to `options::on_shutdown_report` when a scheduler is destroyed with something to report.
struct shutdown_report {
  std::vector<device_shutdown_report> devices;  ///< only the devices with something to report
  bool empty() const noexcept { return devices.empty(); }
};

/// How the asynchronous closures of different devices are ordered.
enum class step_ordering {
  /// Devices are independent: each runs its own steps' closures in order, as fast as it can.
  per_device,
  /// No participating device's asynchronous closures of step N+1 start before every
  /// participating device's asynchronous closures of step N (and the joined closures of step N)
  /// have finished.
  lockstep,
};

struct options {
  /// Asynchronous closures pending (handed over by a step end, not yet started) per device;
  /// a step end blocks while its device is full. 0 means unbounded.
  std::size_t max_queue_size = 100;

  /// Run asynchronous closures inline at the step end too (before the sync ones, each in the
  /// order added); their exceptions then propagate like sync ones. For debugging and tests,
  /// from one thread per device; lockstep ordering does not apply (docs/semantics.md).
  bool sync_mode = false;

  /// Name of the device that `get_device_context()` and the free functions use. Not `joined`
  /// (reserved for the joined closures: the scheduler refuses it with `config_error`).
  std::string default_device = "default";

  /// Cross-device ordering of asynchronous closures; see `step_ordering`.
  step_ordering ordering = step_ordering::per_device;

  /// The devices that take part in lockstep ordering and joined closures, created with the
  /// scheduler. Empty: every device created before the first step end of any device takes part.
  /// `joined` may not be one of them (`config_error`).
  std::vector<std::string> participants;

  /// How long the oneTBB worker that ran a device's asynchronous closures stays, once they are
  /// done, watching for the next step's (yielding its CPU between looks) before it goes back to
  /// oneTBB. A step that ends within that time has its closures started by that worker at once
  /// (p50 1-3 us here); a later one enqueues a task, which may have to wake a sleeping worker
  /// (p50 20-40 us, p99 100-350 us on the virtual machines of docs/benchmarks.md, B5). So a loop
  /// whose steps come every few milliseconds and that needs its closures started promptly may
  /// raise it above its step period, at the price of a CPU spent polling between steps: while it
  /// lingers the worker is not in oneTBB's pool, so the application's own parallel work between
  /// steps has one worker fewer per device. The worker never lingers while another of stepflow's
  /// tasks waits for a worker, nor while every CPU is taken by other processes, and not at all
  /// when steps last came further apart than this. `device_metrics::async_tasks` counts the
  /// tasks started: about one per step means the steps come further apart than the linger.
  /// From 0 (leave at once) to 1 s; otherwise the scheduler's constructor throws `config_error`.
  std::chrono::microseconds worker_linger{100};

  /// Run asynchronous closures in an arena of `tbb::task_arena::priority::low`, so they yield
  /// oneTBB's workers to the application's own arenas.
  bool low_priority = false;

  /// Record a timeline of every closure (Chrome trace-event JSON, for Perfetto or
  /// chrome://tracing) into this file: per device a track of its sync closures and one of its
  /// async closures (which overlap the sync ones in time), one of the joined closures, closures
  /// as complete events with their step, kind and label, and a queue-depth counter per device.
  /// Written by `scheduler::flush()`, `scheduler::write_trace()` and at destruction. Empty: no
  /// trace. The file is created when the scheduler is built, which throws `config_error` if it
  /// cannot be.
  std::string trace_path;

  /// The trace keeps at most this many events (the most recent ones; the rest are counted), up
  /// to 2^32; a larger value gets a `config_error` when the scheduler is built.
  std::size_t trace_max_events = std::size_t{1} << 20;

  /// Measure the closures' run time for the metrics (`run_time_stats`: the exact count and sum,
  /// from two clock reads per batch, and p50/p99/max from about one closure in 256, at varied gaps,
  /// timed alone). Off by default because it costs more than 10% of a step of a few small closures,
  /// sync or lockstep (docs/benchmarks.md, "Metrics overhead"); metrics stay on only below that.
  /// Off, every `run_time_stats` is zero and `metrics_snapshot::run_time_measured` is false; the
  /// counters and the trace are unaffected (a trace times every closure it records).
  bool measure_run_time = false;

  /// Write the shutdown report (unreported failures, never-run closures) to stderr.
  bool report_to_stderr = true;

  /// Called from `~scheduler` when there is something to report; must not throw (an exception
  /// from it is swallowed, since the destructor cannot throw).
  std::function<void(const shutdown_report&)> on_shutdown_report;

  /// The defaults, then the environment: `LTC_MAX_ASYNC_QUEUE` (integer; 0 or negative means
  /// unbounded), `STEPFLOW_SYNC` (1/true/on/yes or 0/false/off/no/empty), `STEPFLOW_TRACE`
  /// (a file path for `trace_path`), `STEPFLOW_RUN_TIME` (a switch like `STEPFLOW_SYNC`, for
  /// `measure_run_time`) and `STEPFLOW_LINGER_US` (microseconds, 0 to 1000000, for
  /// `worker_linger`).
  /// Throws `config_error` naming the variable and its value when a value does not parse.
  static options from_env();
};

namespace detail {
/// Parses an `LTC_MAX_ASYNC_QUEUE` value: surrounding white space, an optional sign, decimal
/// digits, within `std::int64_t`. Non-positive means unbounded (0). Throws `config_error`.
std::size_t parse_max_queue_size(const char* variable, const std::string& value);
/// Parses a `STEPFLOW_LINGER_US` value: surrounding white space, an optional sign, decimal
/// digits, from 0 to 1000000 (`max_worker_linger`). Throws `config_error`.
std::chrono::microseconds parse_linger_us(const char* variable, const std::string& value);
/// Throws `config_error` naming the option and its value unless `linger` is within
/// [0, `max_worker_linger`].
void check_worker_linger(std::chrono::microseconds linger);
inline constexpr std::chrono::microseconds max_worker_linger = std::chrono::seconds(1);
/// Throws `config_error` naming the option and its value when `events` exceeds
/// `max_trace_events`, which keeps the trace's buffer sizes from overflowing.
void check_trace_max_events(std::size_t events);
inline constexpr std::size_t max_trace_events = std::size_t{1} << 32;
/// Parses a boolean switch such as `STEPFLOW_SYNC`. Throws `config_error`.
bool parse_switch(const char* variable, const std::string& value);
}  // namespace detail

}  // namespace stepflow
