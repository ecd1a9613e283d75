#pragma once
// One device: its pending closures, its step end, its asynchronous queue.

#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>

#include <oneapi/tbb/task_arena.h>
#include <oneapi/tbb/task_group.h>

#include "async_queue.hpp"
#include "closure_batch.hpp"
#include "closure_observer.hpp"
#include "inline_step_order.hpp"
#include "pending_closures.hpp"
#include "stepflow/device_context.hpp"
#include "stepflow/metrics.hpp"
#include "stepflow/options.hpp"

namespace stepflow::detail {

class step_graph;

/// Totals of one device's synchronous side.
struct sync_counts {
  std::uint64_t ran = 0;      // started (returned or threw)
  std::uint64_t failed = 0;   // threw
  std::uint64_t dropped = 0;  // skipped: behind a failure in the same step
};

class device_state {
 public:
  device_state(stepflow::scheduler& owner, std::string name, const options& opts,
               tbb::task_arena& arena, step_graph& graph, trace_recorder* trace);
  ~device_state();
  device_state(const device_state&) = delete;
  device_state& operator=(const device_state&) = delete;

  device_context& context() noexcept { return context_; }
  const std::string& name() const noexcept { return name_; }
  stepflow::scheduler& owner() const noexcept { return owner_; }

  void run_step_closures();
  void flush();
  /// `flush` with a deadline: false (and nothing reported) when it passed first.
  bool flush_until(std::chrono::steady_clock::time_point deadline);
  std::uint64_t step() const noexcept { return step_.load(std::memory_order_acquire); }

  /// The flush without the report, for `scheduler::flush`.
  void wait_for_async() { queue_.wait_for_handed_over(); }
  /// Throws `async_closure_error` if a failure of this device, or of a joined closure, awaits
  /// its report.
  void report_async_failure();
  /// The same for this device's own failure only (`scheduler::flush` reports every device's
  /// before the joined closures').
  void report_own_async_failure();

  async_queue& queue() noexcept { return queue_; }

  /// First half of shutdown: waits until the queue is idle. Never throws.
  void drain_for_shutdown() noexcept;
  /// Second half: joins the queue's tasks and collects what was never reported or run.
  device_shutdown_report finish_shutdown() noexcept;

  async_queue_counts async_counts() const noexcept { return queue_.counts(); }
  device_metrics metrics() const;
  const closure_observer& observer() const noexcept { return observer_; }
  sync_counts sync_totals() const noexcept;

 private:
  /// `lane.prepare_take(out)`, with `out` from the pool when it needs buffers; a plan that
  /// takes nothing when nothing was added.
  pending_closures::take_plan prepare_take(pending_closures& lane, closure_batch& out);
  void run_inline(closure_batch& first, closure_batch* second, std::uint64_t step);

  device_context context_;
  stepflow::scheduler& owner_;
  const std::string name_;
  const bool sync_mode_;
  step_graph& graph_;

  batch_pool pool_;
  pending_closures sync_pending_;
  pending_closures async_pending_;
  std::mutex take_mutex_;               // one step end takes closures at a time
  std::atomic<std::uint64_t> step_{0};  // written under take_mutex_, read without it
  inline_step_order inline_steps_;      // sync mode only

  // The device's task group for sync work. Isolated: a bound context would attach to the first
  // caller's context and be cancelled when, say, the user's pipeline that called us throws.
  tbb::task_group_context sync_context_{tbb::task_group_context::isolated};
  tbb::task_group sync_group_{sync_context_};
  // task_group::wait is not thread-safe (oneTBB #1759): a second step end running at the same
  // time uses a group of its own.
  std::atomic<bool> sync_group_busy_{false};

  std::atomic<std::uint64_t> sync_ran_{0};
  std::atomic<std::uint64_t> sync_failed_{0};
  std::atomic<std::uint64_t> sync_dropped_{0};
  std::atomic<std::uint64_t> taken_{0};  // closures taken by step ends

  closure_observer observer_;  // before queue_, which feeds it

  async_queue queue_;
};

}  // namespace stepflow::detail
