#pragma once
/// \file
/// `stepflow::scheduler`: owns the devices, their queues and the oneTBB arena they run in.

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include "stepflow/detail/deadline.hpp"
#include "stepflow/detail/joined_step.hpp"
#include "stepflow/device_context.hpp"
#include "stepflow/metrics.hpp"
#include "stepflow/options.hpp"

namespace stepflow {

namespace detail {
class scheduler_state;
}

class scheduler {
 public:
  /// Reads nothing but `opts`; `options::from_env()` is the default (and may throw
  /// `config_error`). Throws `config_error` for a value out of its documented range
  /// (`options::worker_linger`, `options::trace_max_events`), the reserved name `joined` as
  /// `default_device` or a participant, or a trace file it cannot create. Starts no thread:
  /// asynchronous closures run on oneTBB's worker pool.
  explicit scheduler(const options& opts = options::from_env());

  /// Waits for every queued asynchronous closure (running them itself if no worker does), then
  /// reports what nobody saw: unreported asynchronous failures and closures added but never taken
  /// by a step end (which are destroyed without running). The report goes to stderr and to
  /// `options::on_shutdown_report`. Never throws; leaves no task behind.
  /// Precondition: no other thread is using the scheduler or its devices.
  ~scheduler();

  scheduler(const scheduler&) = delete;
  scheduler& operator=(const scheduler&) = delete;

  /// The device named `name`, created on first use. Thread-safe; the reference is stable until
  /// the scheduler is destroyed. Throws `std::invalid_argument` for the name "joined", which
  /// names the joined closures in the metrics and in `async_closure_error::device()`.
  device_context& device(std::string_view name);

  /// The device named `options::default_device`.
  device_context& default_device();

  /// Flushes every device (see `device_context::flush`) and waits for the joined closures of
  /// every global step that all participants finished, then reports the first failure found
  /// (devices by name, then joined closures); the others keep theirs for their own next call.
  /// Same restrictions as `device_context::flush`.
  void flush();

  /// `flush()` that gives up after `timeout`: false (nothing reported) when it did not finish.
  template <class Rep, class Period>
  bool flush_for(const std::chrono::duration<Rep, Period>& timeout) {
    return flush_until(detail::deadline_after(timeout));
  }
  bool flush_until(std::chrono::steady_clock::time_point deadline);

  /// Queues `f(args...)` — or `f(step, args...)` when `f` takes the step number first — to run
  /// once, after every participating device finished its asynchronous closures of the current
  /// global step: the first step that not every participant has ended yet. In lockstep ordering
  /// it runs before any participant's closures of the next step start. Runs on a oneTBB worker;
  /// joined closures of successive steps run in step order, one at a time. A failure follows the
  /// asynchronous rules: closures queued behind it are discarded, and the next step end (of any
  /// device) or flush reports it, once, as `async_closure_error` with `device() == "joined"`.
  /// Same capture rules as `device_context::add_step_closure`. Whether `f` takes the step is
  /// decided by whether it can be called as `f(step, args...)` (`step` a `std::uint64_t`): a
  /// callable that accepts both forms, such as one with a defaulted last parameter, gets the
  /// step. Thread-safe.
  template <class F, class... Args>
  void add_joined_step_closure(F&& f, Args&&... args) {
    using D = std::decay_t<F>;
    detail::check_not_null<D>(f, "add_joined_step_closure");
    if constexpr (detail::takes_joined_step<D, Args...>) {
      push_joined(detail::make_closure(detail::with_joined_step<D>{std::forward<F>(f)},
                                       std::forward<Args>(args)...));
    } else {
      push_joined(detail::make_closure(std::forward<F>(f), std::forward<Args>(args)...));
    }
  }

  /// Takes device `name` out of lockstep ordering and joined closures: the other participants
  /// stop waiting for it, and its own closures are no longer held back. For a device that stops
  /// stepping. Once every participant retired, joined closures (pending or added later) run
  /// without waiting for anyone. Returns false when it was not participating. Thread-safe.
  bool retire(std::string_view name);

  const stepflow::options& options() const noexcept;

  /// A snapshot of every device's counters (and a `joined` row once joined closures were
  /// added), with their total. Counters are read without stopping anything: each is exact, the
  /// set is not one instant. `metrics_report(s.metrics())` prints it. Thread-safe.
  metrics_snapshot metrics() const;

  /// Writes the timeline trace (`options::trace_path`) now; no-op without one, when nothing was
  /// recorded since the last write, or when the trace goes to a pipe or device (/dev/stdout),
  /// which gets one document, at destruction. Throws `config_error` if the file cannot be
  /// written. Thread-safe.
  void write_trace();

  /// The file the timeline trace goes to: `options::trace_path`, or, when another scheduler of
  /// this process already writes that file, a numbered sibling ("trace.json" ->
  /// "trace.2.json"), so neither replaces the other's trace. Empty without a trace.
  std::string trace_path() const;

 private:
  void push_joined(closure&& c);

  std::unique_ptr<detail::scheduler_state> state_;
};

}  // namespace stepflow
