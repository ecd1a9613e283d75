#pragma once
/// \file
/// `stepflow::device_context`: one device's step closures and its step barrier.

#include <chrono>
#include <cstdint>
#include <string_view>
#include <type_traits>
#include <utility>

#include "stepflow/closure.hpp"
#include "stepflow/detail/bind.hpp"
#include "stepflow/detail/closure_lane.hpp"
#include "stepflow/detail/deadline.hpp"

namespace stepflow {

class scheduler;
namespace detail {
class device_state;
}

/// Tag selecting the asynchronous overload of `add_step_closure`.
struct run_async_t {
  explicit run_async_t() = default;
};
inline constexpr run_async_t run_async{};

/// One device's closures. Owned by a `scheduler` (`scheduler::device(name)`); the reference stays
/// valid until the scheduler is destroyed. Using it afterwards is undefined behaviour. A debug
/// build of the library (without `NDEBUG`; for `add_step_closure` the caller's code must be
/// built without it too) usually detects it in `add_step_closure`, `run_step_closures` and the
/// flushes and throws `stepflow::error`. Usually: the check looks the device's address up among
/// the live ones, so a device of a later scheduler built at the same address passes it. `name`,
/// `step` and `scheduler` are not checked.
///
/// Every member is thread-safe. Which step a closure belongs to: the first `run_step_closures()`
/// on this device that *starts* after the closure was added. Closures added while a step end is
/// running, including by that step's own closures, belong to the next one.
class device_context {
 public:
  device_context(const device_context&) = delete;
  device_context& operator=(const device_context&) = delete;

  /// The device's name, as given to `scheduler::device`.
  std::string_view name() const noexcept;

  /// Queues `f(args...)` to run synchronously, inline on the thread that ends the step, in the
  /// order added. `f` and `args` are decay-copied now (`std::ref` passes a reference); the result
  /// is discarded. Never blocks. Throws `std::invalid_argument` for a null function pointer or
  /// an empty `std::function`; an exception from copying `f` or `args` propagates and nothing is
  /// added. The copy is made in stepflow's storage, so the copy and move constructors of `f` and
  /// `args` must not add closures to this device (undefined behaviour).
  template <class F, class... Args>
  requires(!std::is_same_v<std::decay_t<F>, run_async_t>) void add_step_closure(F&& f,
                                                                                Args&&... args) {
    add(sync_lane, std::forward<F>(f), std::forward<Args>(args)...);
  }

  /// Queues `f(args...)` to run asynchronously on oneTBB's workers after the step end: one at a
  /// time per device, in the order added, across steps. Same capture rules as the sync overload.
  template <class F, class... Args>
  void add_step_closure(run_async_t, F&& f, Args&&... args) {
    add(async_lane, std::forward<F>(f), std::forward<Args>(args)...);
  }

  /// The step barrier. In this order: reports an asynchronous failure recorded before the call
  /// (throws `async_closure_error` and does nothing else: this step's closures stay pending);
  /// takes this step's closures; hands the asynchronous ones to the device's queue (blocking
  /// while it is full, see below); runs the synchronous ones inline on the calling thread, in
  /// order. The first exception of a sync closure propagates unchanged; the rest of that step's
  /// sync closures are dropped (counted).
  ///
  /// Blocking: while the queue is full the caller waits for room, and when no worker is draining
  /// the queue it runs queued asynchronous closures itself, so a full queue never deadlocks. Called
  /// from inside an asynchronous closure (of any device) it never blocks: the queue may then exceed
  /// `max_queue_size` by this step's batch.
  ///
  /// Throws `stepflow::error` when called from inside one of this device's own synchronous
  /// closures (a step cannot end inside itself).
  void run_step_closures();

  /// Blocks until every asynchronous closure handed over before the call has run or been
  /// discarded, then reports an unreported failure (throws `async_closure_error`). Runs queued
  /// closures itself when no worker is draining the queue. Throws `stepflow::error` when called
  /// from inside an asynchronous closure (of any device: waiting there could wait on itself).
  void flush();

  /// `flush()` that gives up after `timeout`: returns false, reporting nothing, when the
  /// closures did not all finish in time (for example, in lockstep ordering, while another
  /// participating device has stopped stepping); true after a complete flush.
  template <class Rep, class Period>
  bool flush_for(const std::chrono::duration<Rep, Period>& timeout) {
    return flush_until(detail::deadline_after(timeout));
  }
  /// `flush_for` with an absolute deadline.
  bool flush_until(std::chrono::steady_clock::time_point deadline);

  /// Step ends that took their closures, including one whose sync closure threw; a call that
  /// only reported an asynchronous failure does not count. A step end counts from the moment it
  /// takes its closures, before it waits for room and runs its sync closures: a sync closure sees
  /// its own step counted, and another thread may see a step that is still running.
  std::uint64_t step() const noexcept;

  /// The scheduler that owns this device.
  stepflow::scheduler& scheduler() const noexcept;

 private:
  friend class detail::device_state;
  device_context(detail::device_state& state, detail::closure_lane_tail& sync,
                 detail::closure_lane_tail& async) noexcept
      : state_(&state), lanes_{&sync, &async} {}

  static constexpr int sync_lane = 0;
  static constexpr int async_lane = 1;

  template <class F, class... Args>
  void add(int lane, F&& f, Args&&... args) {
#ifndef NDEBUG
    check_alive_for_add();  // before anything of this object is read: it may be gone
#endif
    detail::add_closure_to(*lanes_[lane], std::forward<F>(f), std::forward<Args>(args)...);
  }
  /// Throws `stepflow::error` if this device's scheduler is gone (debug builds of the library).
  void check_alive_for_add() const;

  detail::device_state* state_;
  detail::closure_lane_tail* lanes_[2];
};

}  // namespace stepflow
