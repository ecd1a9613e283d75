#pragma once
// One device's asynchronous closures: a bounded FIFO of step batches, drained one closure at a
// time by a single drainer, with fail-stop error handling and flush tickets.
//
// Who drains: whoever holds the `draining_` role. Normally a oneTBB task enqueued into the
// scheduler's arena, which stays a little after the queue empties (it lingers, see
// async_queue.cpp) so that a training loop's next step finds it still running instead of
// enqueueing a task and waking a worker every step. A thread that must wait (a full queue, a flush)
// and finds nobody draining takes the role and runs closures itself. That is what makes every wait
// deadlock-free without depending on a free worker: with one TBB thread, from inside a
// parallel_pipeline filter, or while all workers are busy. Exactly one holder at a time keeps the
// order FIFO.
//
// Knows nothing of device names, steps across devices or the environment.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <limits>
#include <mutex>
#include <optional>
#include <vector>

#include <oneapi/tbb/task_arena.h>
#include <oneapi/tbb/task_group.h>

#include "adaptive_mutex.hpp"
#include "closure_batch.hpp"
#include "start_task.hpp"

namespace stepflow::detail {

struct closure_observer;

/// A failure taken for reporting: the closure's exception and what was discarded behind it.
struct async_failure {
  std::exception_ptr error;
  std::size_t discarded = 0;
};

/// Totals since construction. Read without locking; each is exact once the queue is idle.
struct async_queue_counts {
  std::uint64_t handed_over = 0;  // accepted into the queue (reserved)
  std::uint64_t ran = 0;          // started and returned or threw
  std::uint64_t failed = 0;       // threw
  std::uint64_t discarded = 0;    // never started: queued behind a failure
  std::size_t pending = 0;        // handed over, not yet started
  std::size_t high_water = 0;     // largest `pending` seen
  std::uint64_t tasks = 0;        // drainer tasks enqueued
};

class async_queue {
 public:
  /// `capacity` 0 means unbounded. `pool` recycles batches; both outlive the queue. `linger`:
  /// how long a drainer task that emptied the queue watches for the next batch before it ends
  /// (options::worker_linger).
  async_queue(tbb::task_arena& arena, std::size_t capacity, std::chrono::nanoseconds linger,
              batch_pool& pool, closure_observer& observer);
  /// Precondition: `shutdown()` was called.
  ~async_queue();
  async_queue(const async_queue&) = delete;
  async_queue& operator=(const async_queue&) = delete;

  /// Places `batch` in the FIFO behind everything reserved before, without blocking, and returns
  /// a ticket for `wait_admitted`. Callers reserve under their own lock so that the FIFO order is
  /// the order they took their batches in. After a failure is recorded and until it is taken,
  /// reserves nothing: the closures are counted as discarded with the failure and left in
  /// `batch`, for the caller to destroy with `discard` once it holds no lock of its own (their
  /// destructors are user code); otherwise `batch` is moved from.
  /// `step` is the device's step number for this batch (non-decreasing across calls), also given
  /// for an empty batch so that step completion can be tracked.
  ///
  /// Admission: a closure counts as pending (against the capacity) from when it is admitted
  /// until it starts. Closures are admitted one by one, in FIFO order, as room appears; the
  /// drainer never waits for admission (the next closure to start always fits), so admission only
  /// decides when `wait_admitted` returns. A batch larger than the capacity is handed over piece
  /// by piece this way.
  std::uint64_t reserve(closure_batch& batch, std::uint64_t step);

  /// Makes sure the next `reserve` has a slot for its batch, so that it cannot throw. Call
  /// under the lock that serialises reserves, before taking the closures: running out of
  /// memory here (`std::bad_alloc`) costs nothing but the call.
  void make_room_for_a_batch() {
    if (ring_needs_room_.load(std::memory_order_relaxed)) make_room_slow();
  }

  /// Destroys the closures `reserve` left in `batch` and recycles its buffers. Never throws.
  void discard(closure_batch&& batch) noexcept { pool_.release(std::move(batch)); }

  /// Blocks until the closures reserved up to `ticket` are admitted (or discarded), running
  /// closures itself when nobody drains. Inside an asynchronous closure, or for an unbounded
  /// queue, it never blocks: it admits everything up to `ticket` at once, exceeding the capacity
  /// if need be.
  void wait_admitted(std::uint64_t ticket) {
    // Lock-free when there is room, which is the common case.
    if (fits(started_.load(std::memory_order_acquire), ticket)) return;
    wait_admitted_slow(ticket);
  }

  /// Blocks until every closure handed over before the call ran or was discarded, running
  /// closures itself when nobody drains. Precondition: not inside an asynchronous closure.
  void wait_for_handed_over();

  /// `wait_for_handed_over` with a deadline; false when it passed first.
  bool wait_for_handed_over_until(std::chrono::steady_clock::time_point deadline);

  /// Lockstep ordering: closures of steps after `max_step` do not start until the gate is raised.
  /// The gate only rises (a lower value is ignored).
  /// `no_gate` (the default) lets every step run.
  static constexpr std::uint64_t no_gate = std::numeric_limits<std::uint64_t>::max();
  /// Raises the gate; a drainer task runs the closures it lets through.
  void set_gate(std::uint64_t max_step) noexcept;
  /// Raises the gate for a caller who promises to call `drain_here` next. A thread waiting on the
  /// queue leaves that promise the same grace period as a pending task before it drains itself,
  /// so a caller held up elsewhere (a closure of another device it drains first) cannot stall
  /// the queue. Lock-free: a lockstep wave raises every device's gate this way. `now_ns` is a
  /// `trace_recorder::now_ns()` value taken by the caller (one clock read for a whole wave).
  void set_gate_for_caller(std::uint64_t max_step, std::uint64_t now_ns) noexcept;
  /// Runs the runnable closures on the calling thread, unless someone else holds the drain role.
  /// Precondition: not inside an asynchronous closure.
  void drain_here() noexcept;
  /// Closes the gate at `max_step` (it starts open). Call before the first `reserve`.
  void start_gated(std::uint64_t max_step) noexcept;

  /// Called with step S when every closure of the steps up to S has run or been discarded
  /// (steps may be skipped). Called without the queue's lock, and possibly from two threads at
  /// once, so S may arrive out of order: the listener keeps the largest. A flush returns only
  /// after the listener returned for every step handed over before it. Set before the first
  /// `reserve`.
  void set_step_listener(std::function<void(std::uint64_t)> listener);
  /// From now on a drainer hands a finished step to the listener before it starts the next
  /// batch, instead of while that batch runs (which saves a lock round trip per batch). For the
  /// step graph once it waits on steps: a wave must not wait for the next batch to end.
  void report_steps_before_next_batch() noexcept {
    eager_step_reports_.store(true, std::memory_order_relaxed);
  }

  /// Called, without the lock, by a thread that has waited on this queue for a while (1 ms) and
  /// is still waiting: to let it run other devices' closures that wait for a worker
  /// (`help_if_stalled`), since the drainer it waits for may be blocked in a closure that waits
  /// for one of them, and with one worker nothing else would run them. Set before first use.
  void set_stall_helper(std::function<void()> helper) { stall_helper_ = std::move(helper); }

  /// Runs one batch of this queue's closures on the calling thread if they wait for a worker:
  /// runnable, nobody draining, and no drainer task started within the grace period. For a
  /// thread waiting on another device (`set_stall_helper`). Precondition: not inside an
  /// asynchronous closure.
  void help_if_stalled() noexcept;

  /// The recorded failure, if any, exactly once; the queue then accepts closures again.
  std::optional<async_failure> take_failure();
  /// Puts back a failure taken whose report could not be built (out of memory), so that the
  /// next report finds it. A failure recorded meanwhile gives way to it (only its discarded
  /// closures are still counted, with the older failure).
  void restore_failure(async_failure&& failure) noexcept;

  async_queue_counts counts() const noexcept;

  /// Waits until nothing is queued or running, running closures itself when nobody drains.
  /// Never throws. Precondition: not inside an asynchronous closure.
  void wait_for_idle() noexcept;

  /// `wait_for_idle()`, then waits for every drainer task to end. Never throws.
  void shutdown() noexcept;

 private:
  /// Whether the closures reserved up to `ticket` fit beside `started` started ones: `started +
  /// capacity >= ticket`, written so that a capacity near `SIZE_MAX` (`max_queue_size = -1`)
  /// cannot wrap around and wait forever; such a bound is unbounded in effect.
  bool fits(std::uint64_t started, std::uint64_t ticket) const noexcept {
    return capacity_ == 0 || ticket <= started || ticket - started <= capacity_;
  }

  using lock_type = std::unique_lock<adaptive_mutex>;

  struct queued_batch {
    closure_batch items;
    std::uint64_t step = 0;
  };

  void wait_admitted_slow(std::uint64_t ticket);
  bool admitted(std::uint64_t ticket) const noexcept;
  void push_ring_locked(closure_batch&& batch, std::uint64_t step);
  void grow_ring_locked();
  void make_room_slow();
  bool runnable_locked() const noexcept;
  bool drainer_about_to_start_locked() const noexcept;
  std::uint64_t progress_to_report_locked() noexcept;
  void report_progress(std::uint64_t done) noexcept;
  void note_high_water() noexcept;
  void announce_change_locked() noexcept;
  void call_drainer_locked();
  void schedule_drainer_locked(task_order order = task_order::next);
  void run_drainer_task() noexcept;
  template <class Stop>
  std::uint64_t drain_locked(lock_type& lock, Stop stop) noexcept;
  /// Takes the drain role, drains until `stop`, gives the role up, unlocks and reports the
  /// steps done. Precondition: the role is free and `lock` held.
  template <class Stop>
  void drain_holding_role(lock_type& lock, Stop stop) noexcept;
  bool linger(lock_type& lock, std::uint64_t& unreported) noexcept;
  void release_drain_role_locked(task_order order = task_order::next) noexcept;
  template <class Done>
  bool wait_until(lock_type& lock, Done done,
                  const std::chrono::steady_clock::time_point* deadline = nullptr,
                  bool recheck = false) noexcept;
  void run_batch(closure_batch& batch, std::uint64_t step) noexcept;
  void trace_depth_locked() noexcept;
  std::size_t record_failure_locked(std::exception_ptr error, std::vector<closure_batch>& behind,
                                    std::size_t left_in_batch) noexcept;
  void finished(std::size_t ran, std::size_t discarded) noexcept;
  std::uint64_t pending() const noexcept;
  void mark_started(std::uint64_t n) noexcept {
    started_.store(started_.load(std::memory_order_relaxed) + n, std::memory_order_release);
  }

  tbb::task_arena& arena_;
  batch_pool& pool_;
  closure_observer& observer_;
  const std::size_t capacity_;
  const std::uint64_t linger_ns_;

  tbb::task_group_context context_{tbb::task_group_context::isolated};
  tbb::task_group drainer_tasks_{context_};

  mutable adaptive_mutex mutex_;
  std::condition_variable_any progress_;  // room, finished closures, or the drain role freed
  // Guarded by mutex_:
  // FIFO of batches, a ring so steady state never allocates.
  std::vector<queued_batch> ring_;
  std::size_t ring_head_ = 0;
  std::size_t ring_size_ = 0;
  // Set when a push filled the ring and could not grow it (out of memory); then only the
  // caller of reserve (who alone pushes) grows it, before it takes its closures.
  std::atomic<bool> ring_needs_room_{false};
  std::uint64_t last_step_ = 0;      // step of the latest reserve
  std::uint64_t running_step_ = 0;   // step of the batch being run, 0 when none
  std::uint64_t reported_step_ = 0;  // largest step handed to report_progress
  std::function<void(std::uint64_t)> step_listener_;
  std::function<void()> stall_helper_;  // set before first use, then only read
  bool draining_ = false;               // someone holds the right to run closures
  bool task_pending_ = false;           // a drainer task is enqueued and has not started
  bool lingering_ = false;              // a drainer waits for work without holding the role
  bool stop_lingering_ = false;         // shutdown: a lingering drainer leaves at once
  std::uint64_t idle_since_ns_ = 0;     // when the drainer last found nothing to run
  std::uint64_t last_idle_gap_ns_ = 0;  // from then until the next batch came
  std::exception_ptr failure_;          // fail-stop: set from the failure until it is taken
  std::size_t discarded_since_failure_ = 0;

  // Atomics: read without the lock by waiters, the lingering drainer and counters.
  // Closures are numbered in reserve order. Admitted = max(forced_, min(reserved_, started_ +
  // capacity)); pending = admitted - started_. `started_` has one writer at a time, the holder of
  // the drain role, which stores it before each closure starts (a plain store, no
  // read-modify-write), so a closure that is running, or blocked, no longer takes room.
  // Grouped by writer, a cache line each, so that the producer's writes do not evict the lines
  // the drainer writes and the producer polls (measured: the step end's lock-free failure check
  // missed the cache whenever it shared a line with `finished_`).
  // The drainer's, per closure; polled by producers short of room:
  alignas(64) std::atomic<std::uint64_t> started_{0};  // ran, running or discarded
  // The drainer's, every 16 closures and per step:
  alignas(64) std::atomic<std::uint64_t> finished_{0};  // ran or discarded
  std::atomic<std::uint64_t> ran_count_{0};
  // Per step: every closure of steps <= this ran or was discarded, and the step listener heard.
  std::atomic<std::uint64_t> done_step_{0};
  // The producers', per step (under mutex_):
  alignas(64) std::atomic<std::uint64_t> reserved_{0};  // flush tickets
  std::atomic<std::uint64_t> forced_{0};                // admitted beyond the capacity
  std::atomic<std::uint64_t> changes_{0};               // bumped by every reserve and gate change
  std::atomic<std::size_t> high_water_{0};
  // Per lockstep wave, written without the lock by set_gate_for_caller and read under it:
  alignas(64) std::atomic<std::uint64_t> gate_{no_gate};  // largest step whose closures may start
  std::atomic<bool> drain_promised_{false};  // set_gate_for_caller's caller drains next
  // When a task was enqueued, the lingerer had work or a drain was promised.
  std::atomic<std::uint64_t> drainer_called_ns_{0};
  std::atomic<std::uint64_t> tasks_{0};  // drainer tasks enqueued (under mutex_)
  // Rarely written:
  alignas(64) std::atomic<bool> has_failure_{false};  // failure_ is set, for a lock-free check
  std::atomic<bool> eager_step_reports_{false};       // report_steps_before_next_batch()
  std::atomic<int> waiters_{0};
  std::atomic<std::uint64_t> failed_count_{0};
  std::atomic<std::uint64_t> discarded_count_{0};
};

}  // namespace stepflow::detail
