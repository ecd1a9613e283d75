#include "device_state.hpp"

#include <exception>
#include <utility>

#include <fmt/format.h>
#include <oneapi/tbb/task.h>

#include "closure_observer.hpp"
#include "error_reporting.hpp"
#include "liveness.hpp"
#include "step_graph.hpp"
#include "stepflow/errors.hpp"
#include "thread_frames.hpp"

namespace stepflow::detail {

device_state::device_state(stepflow::scheduler& owner, std::string name, const options& opts,
                           tbb::task_arena& arena, step_graph& graph, trace_recorder* trace)
    : context_(*this, sync_pending_, async_pending_),
      owner_(owner),
      name_(std::move(name)),
      sync_mode_(opts.sync_mode),
      graph_(graph),
      queue_(arena, opts.max_queue_size, opts.worker_linger, pool_, observer_) {
  observer_.measure_run_time = opts.measure_run_time;
  if (trace != nullptr) {
    observer_.trace = trace;
    observer_.track = trace->track(name_, trace_recorder::track_kind::sync);
    observer_.async_track = trace->track(name_, trace_recorder::track_kind::async);
    observer_.depth_counter = "queue depth " + name_;
  }
  mark_alive(&context_);
}

device_state::~device_state() { mark_dead(&context_); }

void device_state::report_async_failure() {
  report_own_async_failure();
  report_failure(graph_, joined_device_name);
}

void device_state::report_own_async_failure() { report_failure(queue_, name_); }

void device_state::run_step_closures() {
  if (sync_frame::inside(this)) {
    throw error(fmt::format(
        "run_step_closures() on device '{}' was called from inside one of that device's "
        "synchronous closures: a step cannot end inside itself (end it after the closure "
        "returns, or from an asynchronous closure)",
        name_));
  }
  // Reported before anything is taken: the call that reports a failure has no other effect.
  report_async_failure();
  // The first step end of any device fixes who takes part in lockstep and joined closures.
  graph_.freeze();

  closure_batch async_batch;
  closure_batch sync_batch;
  std::uint64_t step = 0;
  std::uint64_t ticket = 0;
  // Sync mode: the step's closures all ran (or threw) inline; tell the queue the step is done,
  // even when one threw, so joined closures and lockstep see it, but only once every earlier
  // step of this device is done too (another thread may still run one).
  struct report_inline_step {
    device_state& device;
    inline_step_order::entry entry;
    ~report_inline_step() {
      if (const std::uint64_t done = device.inline_steps_.end(entry)) {
        closure_batch empty;
        device.queue_.reserve(empty, done);
      }
    }
  } inline_step{*this, {}};
  {
    std::lock_guard lock(take_mutex_);
    // Room for both kinds, and in the queue, is made before anything is taken: a step end that
    // runs out of memory throws having taken nothing and counted no step.
    if (!sync_mode_) queue_.make_room_for_a_batch();
    pending_closures::take_plan async_plan = prepare_take(async_pending_, async_batch);
    pending_closures::take_plan sync_plan = prepare_take(sync_pending_, sync_batch);
    async_pending_.take(async_batch, async_plan);
    sync_pending_.take(sync_batch, sync_plan);
    // Written under take_mutex_ only: a plain increment, read by metrics.
    taken_.store(taken_.load(std::memory_order_relaxed) + async_batch.size() + sync_batch.size(),
                 std::memory_order_relaxed);
    // Also written under take_mutex_ only: a plain increment (a locked one costs ~10 ns more).
    step = step_.load(std::memory_order_relaxed) + 1;
    step_.store(step, std::memory_order_release);
    // Reserved under the take lock, so concurrent step ends queue their batches in the order
    // they took them: FIFO holds across them even when one of them must wait for room.
    if (!sync_mode_) {
      ticket = queue_.reserve(async_batch, step);
    } else {
      inline_steps_.begin(inline_step.entry, step);
    }
  }
  // Left by reserve when discarded behind an unreported failure: destroyed here, outside the
  // take lock, since their destructors are user code (one may end a step of this device).
  if (!sync_mode_ && !async_batch.empty()) queue_.discard(std::move(async_batch));
  if (sync_mode_) {
    run_inline(async_batch, &sync_batch, step);
  } else {
    // Handed over before the sync closures run, so the worker starts on them meanwhile.
    queue_.wait_admitted(ticket);
    if (observer_.trace != nullptr) {
      observer_.trace->counter(observer_.track, observer_.depth_counter, queue_.counts().pending,
                               trace_recorder::now_ns());
    }
    run_inline(sync_batch, nullptr, step);
  }
}

pending_closures::take_plan device_state::prepare_take(pending_closures& lane, closure_batch& out) {
  // A step that added nothing of this kind costs no trip to the pool.
  if (!lane.has_untaken()) {
    pending_closures::take_plan nothing;
    nothing.nothing = true;
    return nothing;
  }
  // The owner's records make one segment, which a batch holds inline; only closures added by
  // other threads are held in the batch's buffers, which come from the pool. (One added between
  // this check and the take costs the batch an allocation, once: the pool keeps it afterwards.)
  if (lane.has_shared_untaken()) out = pool_.acquire();
  return lane.prepare_take(out);
}

void device_state::run_inline(closure_batch& first, closure_batch* second, std::uint64_t step) {
  std::exception_ptr failure;
  std::uint64_t ran = 0;
  std::uint64_t dropped = 0;
  // In sync mode `first` holds the step's async closures, traced as such.
  auto run_all = [&](closure_batch& batch, closure_kind kind) {
    if (batch.empty()) return;  // no clock reads for nothing
    if (failure) {
      dropped += batch.discard();
      return;
    }
    observed_batch observed(observer_, kind, step);
    dropped += observed.run_all(
        batch, failure, [] {}, [](std::size_t) {});
    ran += observed.ran();
  };
  const auto body = [&] {
    sync_frame frame(this);
    run_all(first, second != nullptr ? closure_kind::async : closure_kind::sync);
    if (second != nullptr) run_all(*second, closure_kind::sync);
  };
  // Nothing to run: skip the task group, whose run_and_wait is most of an empty step end.
  if (!first.empty() || (second != nullptr && !second->empty())) {
    // Isolation keeps a closure's nested wait (a parallel_for inside it) from picking up
    // unrelated tasks, which inside a parallel_pipeline filter would re-enter the user's filters.
    // Outside any oneTBB task no user context encloses the closures, so nothing of the user's
    // can cancel their nested work and they run as plain calls. Inside a task (a pipeline
    // filter, a flow graph body) they run through the device's task group, whose isolated
    // context is what a user's cancellation cannot reach; run_and_wait executes the body on this
    // thread (it is never spawned, so never stolen). The task group costs ~400 ns a step end.
    if (tbb::task::current_context() == nullptr) {
      tbb::this_task_arena::isolate(body);
    } else if (!sync_group_busy_.exchange(true, std::memory_order_acquire)) {
      struct release_group {
        std::atomic<bool>& busy;
        ~release_group() { busy.store(false, std::memory_order_release); }
      } release{sync_group_busy_};
      tbb::this_task_arena::isolate([&] { sync_group_.run_and_wait(body); });
    } else {
      tbb::task_group_context context(tbb::task_group_context::isolated);
      tbb::task_group group(context);
      tbb::this_task_arena::isolate([&] { group.run_and_wait(body); });
    }
    sync_ran_.fetch_add(ran, std::memory_order_relaxed);
    if (dropped != 0) sync_dropped_.fetch_add(dropped, std::memory_order_relaxed);
  }
  pool_.release(std::move(first));
  if (second != nullptr) pool_.release(std::move(*second));
  if (failure) {
    sync_failed_.fetch_add(1, std::memory_order_relaxed);
    // The same exception object, unchanged.
    std::rethrow_exception(failure);
  }
}

void device_state::flush() {
  if (async_frame::active()) {
    throw error(fmt::format(
        "flush() on device '{}' was called from inside an asynchronous closure: it could wait "
        "for itself. Flush from outside the closure",
        name_));
  }
  queue_.wait_for_handed_over();
  report_async_failure();
}

bool device_state::flush_until(std::chrono::steady_clock::time_point deadline) {
  if (async_frame::active()) {
    throw error(fmt::format(
        "flush_for() on device '{}' was called from inside an asynchronous closure: it could "
        "wait for itself. Flush from outside the closure",
        name_));
  }
  if (!queue_.wait_for_handed_over_until(deadline)) return false;
  report_async_failure();
  return true;
}

device_metrics device_state::metrics() const {
  device_metrics m;
  m.device = name_;
  m.steps = step();
  m.added_sync = sync_pending_.pushed();
  m.added_async = async_pending_.pushed();
  const std::uint64_t taken = taken_.load(std::memory_order_relaxed);
  const std::uint64_t added = m.added_sync + m.added_async;
  m.waiting = added > taken ? added - taken : 0;
  const struct sync_counts sync = sync_totals();
  m.ran_sync = sync.ran;
  m.failed_sync = sync.failed;
  m.dropped_sync = sync.dropped;
  const async_queue_counts async = queue_.counts();
  m.ran_async = async.ran;
  m.failed_async = async.failed;
  m.discarded_async = async.discarded;
  m.pending = async.pending;
  m.queue_high_water = async.high_water;
  m.blocked_ns = observer_.blocked_ns.load(std::memory_order_relaxed);
  m.async_tasks = async.tasks;
  m.run_time = observer_.run_time();
  return m;
}

sync_counts device_state::sync_totals() const noexcept {
  return {sync_ran_.load(std::memory_order_relaxed), sync_failed_.load(std::memory_order_relaxed),
          sync_dropped_.load(std::memory_order_relaxed)};
}

void device_state::drain_for_shutdown() noexcept { queue_.wait_for_idle(); }

device_shutdown_report device_state::finish_shutdown() noexcept {
  queue_.shutdown();
  device_shutdown_report report;
  report.device = name_;
  if (auto failure = queue_.take_failure()) {
    report.unreported_error = failure->error;
    report.discarded = failure->discarded;
  }
  closure_batch never_run;
  {
    std::lock_guard lock(take_mutex_);
    sync_pending_.take(never_run);
    async_pending_.take(never_run);
  }
  report.never_run = never_run.discard();
  return report;
}

}  // namespace stepflow::detail
