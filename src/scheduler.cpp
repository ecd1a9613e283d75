#include "stepflow/scheduler.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <oneapi/tbb/global_control.h>
#include <oneapi/tbb/task_arena.h>

#include "device_state.hpp"
#include "error_reporting.hpp"
#include "run_time_histogram.hpp"
#include "step_graph.hpp"
#include "stepflow/errors.hpp"
#include "thread_frames.hpp"
#include "trace_recorder.hpp"

namespace stepflow {
namespace detail {
namespace {

/// oneTBB's workers: the thread limit in force (a tbb::global_control, by default the number of
/// cores) minus the application's thread.
int worker_pool_size() {
  const std::size_t limit =
      tbb::global_control::active_value(tbb::global_control::max_allowed_parallelism);
  return static_cast<int>(std::max<std::size_t>(2, limit) - 1);
}

}  // namespace

class scheduler_state {
 public:
  scheduler_state(stepflow::scheduler& owner, const options& opts)
      : owner_(owner),
        options_(checked(opts)),
        // Only stepflow's drainer tasks run here, so no slot is reserved for an application
        // thread; sized to the worker pool (the thread limit in force, by default the cores,
        // minus one), since asking for more workers than exist makes oneTBB print a warning.
        arena_(
            worker_pool_size(), 0,
            opts.low_priority ? tbb::task_arena::priority::low : tbb::task_arena::priority::normal),
        // Opened first, so that an unwritable path fails the construction (config_error).
        trace_(opts.trace_path.empty()
                   ? nullptr
                   : std::make_unique<trace_recorder>(opts.trace_path, opts.trace_max_events)),
        graph_(arena_, opts.ordering, opts.measure_run_time, trace_.get()) {
    // Declared participants exist from the start and are the only ones.
    for (const std::string& name : options_.participants) device(name);
    if (!options_.participants.empty()) graph_.freeze();
    if (trace_ && trace_->path() != opts.trace_path && opts.report_to_stderr) {
      fmt::print(stderr,
                 "stepflow: another scheduler of this process writes the trace file '{}'; this "
                 "one's trace goes to '{}'\n",
                 opts.trace_path, trace_->path());
    }
  }

  device_state& device(std::string_view name) {
    std::lock_guard lock(mutex_);
    auto it = devices_.find(name);
    if (it == devices_.end()) {
      if (name == joined_device_name) {
        throw std::invalid_argument(
            "stepflow: the device name \"joined\" is reserved: it names the joined closures in "
            "the metrics and in async_closure_error::device()");
      }
      auto state = std::make_unique<device_state>(owner_, std::string(name), options_, arena_,
                                                  graph_, trace_.get());
      device_state* const self = state.get();
      state->queue().set_stall_helper([this, self] { help_stalled_devices(self); });
      // The new list is built before the device is added, so that running out of memory
      // leaves both as they were.
      auto in_order = std::make_shared<std::vector<device_state*>>();
      in_order->reserve(devices_.size() + 1);
      const auto next = devices_.lower_bound(name);
      for (auto i = devices_.begin(); i != next; ++i) in_order->push_back(i->second.get());
      in_order->push_back(self);
      for (auto i = next; i != devices_.end(); ++i) in_order->push_back(i->second.get());
      it = devices_.emplace_hint(next, std::string(name), std::move(state));
      devices_in_order_ = std::move(in_order);
      // Takes part in lockstep and joins unless participation is frozen already.
      graph_.join(*it->second);
    }
    return *it->second;
  }

  // Created on first use, not with the scheduler: a device that exists before the first step
  // end takes part in lockstep, and an unused default device would hold every step back.
  device_state& default_device() {
    device_state* d = default_device_.load(std::memory_order_acquire);
    if (d == nullptr) {
      d = &device(options_.default_device);
      default_device_.store(d, std::memory_order_release);
    }
    return *d;
  }
  const options& opts() const noexcept { return options_; }

  /// Every device, in name order. Copy on write: waiters take it without allocating (a step end
  /// that helps other devices must not allocate in steady state, B7), and a device's creation
  /// replaces it.
  std::shared_ptr<const std::vector<device_state*>> snapshot() {
    std::lock_guard lock(mutex_);
    return devices_in_order_;
  }

  /// Runs a batch of every other device whose closures wait for a worker. For a thread that has
  /// waited on `waiting` a while (async_queue::set_stall_helper): with one worker, a closure
  /// blocked on another device's closure holds it, and that closure would never run.
  void help_stalled_devices(const device_state* waiting) noexcept {
    try {
      for (device_state* d : *snapshot()) {
        if (d != waiting) d->queue().help_if_stalled();
      }
    } catch (...) {
      // std::system_error from the scheduler's mutex: the waiter just waits another slice.
    }
  }

  void flush() { flush_until(nullptr); }

  bool flush_until(const std::chrono::steady_clock::time_point* deadline) {
    if (async_frame::active()) {
      throw error(
          "scheduler::flush() was called from inside an asynchronous closure: it could wait for "
          "itself. Flush from outside the closure");
    }
    const auto all = snapshot();
    for (device_state* d : *all) {
      if (deadline == nullptr) {
        d->wait_for_async();
      } else if (!d->queue().wait_for_handed_over_until(*deadline)) {
        return false;
      }
    }
    if (!graph_.wait_for_joined(deadline)) return false;
    write_trace();
    // Only the first failure is thrown; the others stay recorded for their devices' next call.
    for (device_state* d : *all) d->report_own_async_failure();
    report_failure(graph_, joined_device_name);
    return true;
  }

  void add_joined(closure&& c) { graph_.add_joined(std::move(c)); }

  metrics_snapshot metrics() {
    metrics_snapshot result;
    run_time_histogram::counts merged{};
    for (device_state* d : *snapshot()) {
      result.devices.push_back(d->metrics());
      d->observer().histogram.add_to(merged);
    }
    const joined_counts joined = graph_.counts();
    if (joined.added != 0) {
      device_metrics j;
      j.device = std::string(joined_device_name);
      j.added_joined = joined.added;
      j.ran_joined = joined.ran;
      j.failed_joined = joined.failed;
      j.discarded_async = joined.discarded;
      j.run_time = graph_.observer().run_time();
      graph_.observer().histogram.add_to(merged);
      result.devices.push_back(std::move(j));
    }
    result.total = total_of(result.devices, merged);
    result.run_time_measured = options_.measure_run_time;
    return result;
  }

  void write_trace() {
    if (trace_) trace_->write();
  }
  void write_final_trace() {
    if (trace_) trace_->write_final();
  }
  std::string trace_path() const { return trace_ ? trace_->path() : std::string(); }

  bool retire(std::string_view name) {
    device_state* d = nullptr;
    {
      std::lock_guard lock(mutex_);
      auto it = devices_.find(name);
      if (it != devices_.end()) d = it->second.get();
    }
    return d != nullptr && graph_.retire(*d);
  }

  shutdown_report shutdown() noexcept {
    // Ordering is no longer enforced: a participant that stopped stepping must not hold the
    // others' closures back forever.
    graph_.open_gates();
    // An asynchronous or joined closure may end another device's step and so queue more work
    // there: repeat until a whole pass finds every device idle and nothing new handed over.
    drain_until_quiet(true);
    // Then stop the graph for good; joined closures that ran during its join may have queued
    // device work, drained once more. After that nothing runs: the devices' and the graph's
    // leftovers can be collected without losing any closure.
    graph_.stop();
    drain_until_quiet(false);
    shutdown_report report;
    for (device_state* d : *snapshot()) {
      device_shutdown_report r = d->finish_shutdown();
      if (r.unreported_error || r.never_run != 0) report.devices.push_back(std::move(r));
    }
    std::optional<async_failure> joined_failure;
    const std::size_t joined_never_run = graph_.collect_unrun(joined_failure);
    if (joined_failure || joined_never_run != 0) {
      device_shutdown_report r;
      r.device = std::string(joined_device_name);
      if (joined_failure) {
        r.unreported_error = joined_failure->error;
        r.discarded = joined_failure->discarded;
      }
      r.never_run = joined_never_run;
      report.devices.push_back(std::move(r));
    }
    return report;
  }

 private:
  void drain_until_quiet(bool joined_too) noexcept {
    for (;;) {
      const auto all = snapshot();
      const std::uint64_t before = total_handed_over(*all);
      const std::uint64_t joined_before = graph_.completed_step();
      for (device_state* d : *all) d->drain_for_shutdown();
      if (joined_too) {
        try {
          graph_.wait_for_joined(nullptr);
        } catch (...) {
        }
      }
      const auto now = snapshot();
      if (total_handed_over(*now) == before && now->size() == all->size() &&
          graph_.completed_step() == joined_before) {
        return;
      }
    }
  }

  /// `opts`, once every value in it is known to be usable (before anything is built with it).
  static const options& checked(const options& opts) {
    check_worker_linger(opts.worker_linger);
    check_trace_max_events(opts.trace_max_events);
    const auto reserved = [](const std::string& name) { return name == joined_device_name; };
    if (reserved(opts.default_device) ||
        std::any_of(opts.participants.begin(), opts.participants.end(), reserved)) {
      throw config_error(fmt::format(
          "options: the device name \"{}\" (in default_device or participants) is reserved for "
          "the joined closures' metrics row and errors",
          joined_device_name));
    }
    return opts;
  }

  static std::uint64_t total_handed_over(const std::vector<device_state*>& all) noexcept {
    std::uint64_t total = 0;
    for (device_state* d : all) total += d->async_counts().handed_over;
    return total;
  }

  stepflow::scheduler& owner_;
  const options options_;
  tbb::task_arena arena_;
  std::unique_ptr<trace_recorder> trace_;  // null: no trace
  step_graph graph_;                       // before devices_: devices are destroyed first
  std::mutex mutex_;
  // std::map: device addresses (and references handed out) must stay stable.
  std::map<std::string, std::unique_ptr<device_state>, std::less<>> devices_;  // guarded
  // The same devices, replaced whole when one is added (snapshot()); guarded by mutex_.
  std::shared_ptr<const std::vector<device_state*>> devices_in_order_ =
      std::make_shared<const std::vector<device_state*>>();
  std::atomic<device_state*> default_device_{nullptr};
};

}  // namespace detail

scheduler::scheduler(const stepflow::options& opts)
    : state_(std::make_unique<detail::scheduler_state>(*this, opts)) {}

scheduler::~scheduler() {
  const shutdown_report report = state_->shutdown();
  try {
    state_->write_final_trace();
  } catch (const std::exception& e) {
    if (state_->opts().report_to_stderr) {
      try {
        fmt::print(stderr, "stepflow: could not write the trace: {}\n", e.what());
      } catch (...) {
      }
    }
  }
  if (!report.empty()) {
    if (state_->opts().report_to_stderr) {
      try {
        fmt::print(stderr, "{}", detail::format_shutdown_report(report));
      } catch (...) {
        // A destructor must not throw; stderr failing leaves the callback as the only channel.
      }
    }
    if (state_->opts().on_shutdown_report) {
      try {
        state_->opts().on_shutdown_report(report);
      } catch (...) {
        // Documented: an exception from the callback is swallowed.
      }
    }
  }
}

device_context& scheduler::device(std::string_view name) { return state_->device(name).context(); }

device_context& scheduler::default_device() { return state_->default_device().context(); }

void scheduler::flush() { state_->flush(); }

bool scheduler::flush_until(std::chrono::steady_clock::time_point deadline) {
  return state_->flush_until(&deadline);
}

void scheduler::push_joined(closure&& c) { state_->add_joined(std::move(c)); }

bool scheduler::retire(std::string_view name) { return state_->retire(name); }

metrics_snapshot scheduler::metrics() const { return state_->metrics(); }

void scheduler::write_trace() { state_->write_trace(); }

std::string scheduler::trace_path() const { return state_->trace_path(); }

const stepflow::options& scheduler::options() const noexcept { return state_->opts(); }

}  // namespace stepflow
