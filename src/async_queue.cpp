#include "async_queue.hpp"

#include <algorithm>
#include <new>
#include <thread>
#include <utility>

#include <oneapi/tbb/info.h>

#include "atomic_max.hpp"
#include "closure_observer.hpp"
#include "start_task.hpp"
#include "thread_frames.hpp"

namespace stepflow::detail {
namespace {

// Progress (finished closures) is published every this many closures, not once per batch, so a
// flush or a producer waiting for room hears of it while a long batch runs.
constexpr std::size_t release_every = 16;
constexpr std::size_t initial_ring_slots = 8;
// How long a waiter leaves a just-enqueued drainer task to start before draining itself. A
// waiter that took the drain role at once would run the closures on the producer's thread
// whenever a worker is a few microseconds late (measured: 40% of them with a bound equal to the
// step size); one that waits long makes a machine without a free worker crawl.
constexpr std::uint64_t drainer_start_grace_ns = 50'000;

// A thread waiting on a device that another thread drains looks this often for other devices
// whose closures wait for a worker (set_stall_helper): the drainer it waits for may be blocked in
// a closure that waits for one of those.
constexpr auto stall_help_interval = std::chrono::milliseconds(1);
// How long a producer short of room spins before it sleeps: room usually appears
// within microseconds, and sleeping costs a wake-up.
constexpr std::uint64_t room_spin_ns = 20'000;

// A yield that took longer than this ran other threads' work: no CPU was free.
// (Measured here, two threads yielding for 3 s: ~1 yield a second took over 1 ms on the idle
// machine, while 80 took over 20 us; beside two busy loops, ~200 a second took over 1 ms.)
constexpr std::uint64_t descheduled_ns = 1'000'000;
// After that, nobody spins for this long: every yield could cost a whole time slice.
constexpr std::uint64_t oversubscribed_pause_ns = 20'000'000;
// Process-wide, as the CPUs are: when (now_ns) spinning may be tried again, and how many
// threads wait in a queue now (spinning, or blocked after spinning).
std::atomic<std::uint64_t> no_spinning_until_ns{0};
std::atomic<int> threads_waiting{0};

/// Counts the calling thread in `threads_waiting` while it lives.
class waiting_scope {
 public:
  waiting_scope() noexcept { threads_waiting.fetch_add(1, std::memory_order_relaxed); }
  ~waiting_scope() { threads_waiting.fetch_sub(1, std::memory_order_relaxed); }
  waiting_scope(const waiting_scope&) = delete;
  waiting_scope& operator=(const waiting_scope&) = delete;
};

/// Polls `ready` for up to `budget_ns`, yielding between polls; true as soon as it holds.
/// Yielding (not pause-spinning) because on a machine without a free CPU the thread that would
/// make `ready` true needs this one's; spacing the polls by pause instructions instead measured
/// no better in B2 on two CPUs.
///
/// But a yield only costs little while no other process wants the CPU. When other processes
/// keep every CPU busy, CFS puts a yielder behind all of them and each yield can cost a time
/// slice (strace of B2 beside two busy loops on the two CPUs: 1.5 ms per sched_yield, 16 us per
/// closure instead of 32 ns, where the torch port took 2.7 us and a oneTBB task per closure
/// 0.5 us), while a thread that blocks is woken ahead of them. So a yield that comes back late
/// stops all spinning for `oversubscribed_pause_ns`: waiters block at once and drainers do not
/// linger (B2_loaded in bench/async_bench.cpp: 37-108 ns per closure). Not when more of this
/// process's threads wait in queues than there are CPUs: then the late yields passed the CPUs
/// among them, which is what they need. The cost is where a process's own threads outnumber
/// the CPUs without waiting in queues: B6 with 8 producer threads on 2 CPUs, lockstep, one
/// closure per step, measured 15-24 us per global step against 11-15 without this rule while a
/// wave still started a drainer task per device, 6-10 us either way since the wave drains the
/// devices itself. Late yields there came with 1-2 threads waiting, so they stop spinning;
/// always stopping measured ~50 us.
template <class Ready>
bool spin_until(Ready ready, std::uint64_t budget_ns) {
  static const int cpus = std::max(1, tbb::info::default_concurrency());
  const std::uint64_t began = trace_recorder::now_ns();
  if (began < no_spinning_until_ns.load(std::memory_order_relaxed)) return ready();
  std::uint64_t before = began;
  for (;;) {
    if (ready()) return true;
    std::this_thread::yield();
    const std::uint64_t now = trace_recorder::now_ns();
    if (now - before >= descheduled_ns && threads_waiting.load(std::memory_order_relaxed) <= cpus) {
      no_spinning_until_ns.store(now + oversubscribed_pause_ns, std::memory_order_relaxed);
      return ready();
    }
    if (now - began >= budget_ns) return false;
    before = now;
  }
}

}  // namespace

async_queue::async_queue(tbb::task_arena& arena, std::size_t capacity,
                         std::chrono::nanoseconds linger, batch_pool& pool,
                         closure_observer& observer)
    : arena_(arena),
      pool_(pool),
      observer_(observer),
      capacity_(capacity),
      linger_ns_(static_cast<std::uint64_t>(std::max(linger.count(), std::int64_t{0}))),
      ring_(initial_ring_slots) {}

async_queue::~async_queue() = default;

std::uint64_t async_queue::pending() const noexcept {
  const std::uint64_t started = started_.load(std::memory_order_acquire);
  const std::uint64_t reserved = reserved_.load(std::memory_order_acquire);
  std::uint64_t admitted = fits(started, reserved) ? reserved : started + capacity_;
  admitted = std::max(admitted, forced_.load(std::memory_order_acquire));
  return admitted > started ? admitted - started : 0;
}

bool async_queue::admitted(std::uint64_t ticket) const noexcept {
  return fits(started_.load(std::memory_order_acquire), ticket) ||
         forced_.load(std::memory_order_acquire) >= ticket;
}

void async_queue::note_high_water() noexcept {
  const std::uint64_t now = pending();
  if (now > high_water_.load(std::memory_order_relaxed)) {
    high_water_.store(now, std::memory_order_relaxed);
  }
}

void async_queue::trace_depth_locked() noexcept {
  if (observer_.trace != nullptr) {
    observer_.trace->counter(observer_.track, observer_.depth_counter, pending(),
                             trace_recorder::now_ns());
  }
}

std::uint64_t async_queue::reserve(closure_batch& batch, std::uint64_t step) {
  const std::size_t n = batch.size();
  lock_type lock(mutex_);
  last_step_ = std::max(last_step_, step);
  if (n == 0 || failure_) {
    if (n != 0) {
      // Handed over behind a failure that is not reported yet: discarded with it.
      discarded_since_failure_ += n;
      discarded_count_.fetch_add(n);
    }
    const std::uint64_t ticket = reserved_.load(std::memory_order_relaxed);
    const std::uint64_t done = progress_to_report_locked();
    lock.unlock();
    report_progress(done);
    return ticket;
  }
  if (ring_size_ == 0 && running_step_ == 0 && !lingering_) {
    // The queue was idle with nobody lingering (a lingerer times its own wait, off this path).
    last_idle_gap_ns_ = trace_recorder::now_ns() - idle_since_ns_;
  }
  push_ring_locked(std::move(batch), step);
  const std::uint64_t ticket = reserved_.load(std::memory_order_relaxed) + n;
  reserved_.store(ticket, std::memory_order_release);
  announce_change_locked();
  note_high_water();
  call_drainer_locked();
  return ticket;
}

void async_queue::wait_admitted_slow(std::uint64_t ticket) {
  // Inside an asynchronous closure this thread may be the very drainer that would make room,
  // or one of a cycle of them, so it never waits there: it admits its batch at once.
  if (async_frame::active()) {
    lock_type lock(mutex_);
    if (forced_.load(std::memory_order_relaxed) < ticket) {
      forced_.store(ticket, std::memory_order_release);
    }
    note_high_water();
    return;
  }
  const waiting_scope waiting;
  const std::uint64_t began = trace_recorder::now_ns();
  struct account_blocked {
    closure_observer& observer;
    std::uint64_t began;
    ~account_blocked() {
      observer.blocked_ns.fetch_add(trace_recorder::now_ns() - began, std::memory_order_relaxed);
    }
  } account{observer_, began};
  // Room usually appears within microseconds, when a drainer is at work: spin for it first.
  if (spin_until([&] { return admitted(ticket); }, room_spin_ns)) return;
  lock_type lock(mutex_);
  // Room made between the drainer's progress reports (a closure started) is not announced, so
  // the wait re-checks every millisecond.
  wait_until(
      lock, [&] { return admitted(ticket); }, nullptr, true);
}

void async_queue::push_ring_locked(closure_batch&& batch, std::uint64_t step) {
  // Never full here when the caller made room first (make_room_for_a_batch).
  if (ring_size_ == ring_.size()) grow_ring_locked();
  queued_batch& slot = ring_[(ring_head_ + ring_size_) % ring_.size()];
  slot.items = std::move(batch);
  slot.step = step;
  ++ring_size_;
  // Grown now rather than at the next push: by then the caller's step end has taken its
  // closures and counted its step, and running out of memory would lose them. If it fails here,
  // the next step end grows the ring before it takes anything.
  if (ring_size_ == ring_.size()) {
    try {
      grow_ring_locked();
    } catch (const std::bad_alloc&) {
      ring_needs_room_.store(true, std::memory_order_relaxed);
    }
  }
}

void async_queue::make_room_slow() {
  lock_type lock(mutex_);
  if (ring_size_ == ring_.size()) grow_ring_locked();
  ring_needs_room_.store(false, std::memory_order_relaxed);
}

void async_queue::grow_ring_locked() {
  std::vector<queued_batch> bigger(ring_.size() * 2);
  for (std::size_t i = 0; i < ring_size_; ++i) {
    bigger[i] = std::move(ring_[(ring_head_ + i) % ring_.size()]);
  }
  ring_ = std::move(bigger);
  ring_head_ = 0;
}

bool async_queue::runnable_locked() const noexcept {
  return ring_size_ != 0 && ring_[ring_head_].step <= gate_.load();
}

std::uint64_t async_queue::progress_to_report_locked() noexcept {
  std::uint64_t done = last_step_;
  if (ring_size_ != 0) done = std::min(done, ring_[ring_head_].step - 1);
  if (running_step_ != 0) done = std::min(done, running_step_ - 1);
  if (done <= reported_step_) return 0;
  reported_step_ = done;
  return done;
}

void async_queue::report_progress(std::uint64_t done) noexcept {
  if (done == 0) return;
  // Without the lock: the listener's work (the step graph's signals) would otherwise keep a
  // producer that reserves on this queue waiting on the lock (measured in B6 lockstep: the
  // producer blocked in futex_wait behind the drainer's signals, 8% of its time).
  if (step_listener_) step_listener_(done);
  // Only now, so that a flush that sees the step done knows that the listener saw it too.
  raise_to(done_step_, done);
  // Dekker with wait_until, as in finished().
  if (waiters_.load() > 0) {
    lock_type lock(mutex_);
    progress_.notify_all();
  }
}

void async_queue::set_gate(std::uint64_t max_step) noexcept {
  lock_type lock(mutex_);
  raise_to(gate_, max_step);  // gates only rise: shutdown lifts them for good
  announce_change_locked();
  call_drainer_locked();
  if (waiters_.load() > 0) progress_.notify_all();
}

void async_queue::set_gate_for_caller(std::uint64_t max_step, std::uint64_t now_ns) noexcept {
  // Without the lock: the caller takes it in drain_here next anyway, and meanwhile the device's
  // producer reserves under it (B6 lockstep with one thread ending every device's steps: raising
  // 8 gates under their locks was 12% of a wave, much of it waiting behind those reserves).
  // Nobody else needs to hear of the gate: a drainer holding the role re-reads it under the lock
  // before it gives the role up, and drain_here takes the lock after this store.
  //
  // Promised like a pending task: a waiter leaves it the grace period before draining itself.
  // The promise before the gate, so that a waiter that sees the new gate sees the promise.
  drainer_called_ns_.store(now_ns, std::memory_order_relaxed);
  drain_promised_.store(true, std::memory_order_release);
  raise_to(gate_, max_step);
  // Dekker with wait_until, as in finished(): a waiter asleep because nothing was runnable wakes
  // to honour the promise's grace and then drains itself.
  if (waiters_.load() > 0) {
    lock_type lock(mutex_);
    progress_.notify_all();
  }
}

void async_queue::drain_here() noexcept {
  lock_type lock(mutex_);
  drain_promised_.store(false, std::memory_order_relaxed);
  if (draining_ || !runnable_locked()) return;
  // A lingering drainer sees the role taken when it wakes, and leaves; a pending drainer task
  // finds it taken, or nothing left to run.
  drain_holding_role(lock, [] { return false; });
}

template <class Stop>
void async_queue::drain_holding_role(lock_type& lock, Stop stop) noexcept {
  draining_ = true;
  const std::uint64_t done = drain_locked(lock, stop);
  release_drain_role_locked();
  lock.unlock();
  report_progress(done);
}

void async_queue::start_gated(std::uint64_t max_step) noexcept {
  lock_type lock(mutex_);
  gate_.store(max_step);
}

void async_queue::set_step_listener(std::function<void(std::uint64_t)> listener) {
  lock_type lock(mutex_);
  step_listener_ = std::move(listener);
}

bool async_queue::drainer_about_to_start_locked() const noexcept {
  if (!task_pending_ && !lingering_ && !drain_promised_.load(std::memory_order_acquire)) {
    return false;
  }
  // A lock-free promise (set_gate_for_caller) may carry a time a little after this thread's
  // clock read: compared without subtracting, so that it counts as fresh.
  return drainer_called_ns_.load(std::memory_order_relaxed) + drainer_start_grace_ns >
         trace_recorder::now_ns();
}

void async_queue::announce_change_locked() noexcept {
  // Only ever written under mutex_: a plain increment; a lingering drainer polls it.
  changes_.store(changes_.load(std::memory_order_relaxed) + 1, std::memory_order_release);
}

void async_queue::call_drainer_locked() {
  // A lingering drainer notices `changes_` by itself; otherwise a task is needed.
  if (lingering_) {
    drainer_called_ns_.store(trace_recorder::now_ns(), std::memory_order_relaxed);
  } else if (!draining_ && !task_pending_ && runnable_locked()) {
    schedule_drainer_locked();
  }
}

void async_queue::schedule_drainer_locked(task_order order) {
  task_pending_ = true;
  tasks_.store(tasks_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
  drainer_called_ns_.store(trace_recorder::now_ns(), std::memory_order_relaxed);
  // The task only claims the drain role; run_drainer_task is noexcept.
  start_task(
      arena_, drainer_tasks_, [this]() noexcept { run_drainer_task(); }, order);
}

void async_queue::run_drainer_task() noexcept {
  lock_type lock(mutex_);
  task_pending_ = false;
  // A waiting thread took the role meanwhile; it reschedules a task if it leaves work behind.
  if (draining_) return;
  draining_ = true;
  std::uint64_t unreported = 0;
  // Set when it leaves work behind for a wave waiting for a worker: after one batch at least, it
  // leaves the worker to the wave (see waves_waiting_for_a_worker), and the drainer task that
  // giving up the role schedules is enqueued behind the wave's task rather than spawned ahead.
  bool left_for_wave = false;
  for (;;) {
    bool first = true;
    const auto wave_waits = [&first, &left_for_wave] {
      left_for_wave = !std::exchange(first, false) &&
                      waves_waiting_for_a_worker.load(std::memory_order_relaxed) != 0;
      return left_for_wave;
    };
    unreported = std::max(unreported, drain_locked(lock, wave_waits));
    // Lingering, this thread gives the role up: a lingerer that the OS has descheduled (the
    // machine is oversubscribed) must not hold up a producer that needs room, which takes the
    // role after the grace period (`drainer_about_to_start_locked`).
    draining_ = false;
    lingering_ = true;
    if (waiters_.load() > 0) progress_.notify_all();
    const bool again = linger(lock, unreported);
    lingering_ = false;
    if (!again || draining_ || !runnable_locked()) break;
    draining_ = true;
  }
  if (!draining_) {
    release_drain_role_locked(left_for_wave ? task_order::behind_local : task_order::next);
  }
  lock.unlock();
  report_progress(unreported);
}

bool async_queue::linger(lock_type& lock, std::uint64_t& unreported) noexcept {
  // Called with the lock held and nothing runnable; returns with it held, true when there is
  // work again.
  //
  // Why linger: a training loop's steps come every few to few hundred microseconds, and a
  // drainer that left at once would make every step enqueue a task and wake a worker (2-9 us on
  // a good machine, 20-350 us on a virtual machine). It yields while it waits, and leaves at
  // once when another of stepflow's tasks waits for a worker, so it never holds the worker
  // another device needs. When work last came after a longer pause than lingering would wait,
  // lingering would only keep a worker from the application: leave at once.
  idle_since_ns_ = trace_recorder::now_ns();
  if (stop_lingering_ || linger_ns_ == 0 || last_idle_gap_ns_ > linger_ns_) return false;
  // Closures wait behind a lockstep gate: the wave that raises it also starts their drainer.
  if (ring_size_ != 0) return false;
  const std::uint64_t seen = changes_.load(std::memory_order_relaxed);
  lock.unlock();
  report_progress(std::exchange(unreported, 0));
  bool changed = false;
  const waiting_scope waiting;
  spin_until(
      [&] {
        changed = changes_.load(std::memory_order_acquire) != seen;
        return changed || tasks_waiting_for_a_worker.load(std::memory_order_relaxed) != 0;
      },
      linger_ns_);
  lock.lock();
  last_idle_gap_ns_ = trace_recorder::now_ns() - idle_since_ns_;
  return changed && !stop_lingering_;
}

template <class Stop>
std::uint64_t async_queue::drain_locked(lock_type& lock, Stop stop) noexcept {
  // The step completed by the batch before: reported while the next one runs, or by the caller
  // once it lets the lock go, since the report is made without the lock (report_progress).
  std::uint64_t unreported = 0;
  async_frame frame;
  // Isolation: a closure that waits on its own TBB work must not pick up another device's
  // drainer task and run it nested on this stack.
  tbb::this_task_arena::isolate([&] {
    while (runnable_locked() && !stop()) {
      if (unreported != 0 && eager_step_reports_.load(std::memory_order_relaxed)) {
        lock.unlock();
        report_progress(std::exchange(unreported, 0));
        lock.lock();
        continue;  // the report may have started a wave: `stop` looks again
      }
      queued_batch& front = ring_[ring_head_];
      closure_batch batch = std::move(front.items);
      running_step_ = front.step;
      ring_head_ = (ring_head_ + 1) % ring_.size();
      --ring_size_;
      const std::uint64_t step = running_step_;
      lock.unlock();
      report_progress(std::exchange(unreported, 0));
      run_batch(batch, step);
      pool_.release(std::move(batch));
      lock.lock();
      running_step_ = 0;
      trace_depth_locked();
      unreported = progress_to_report_locked();
    }
  });
  return unreported;
}

void async_queue::release_drain_role_locked(task_order order) noexcept {
  draining_ = false;
  if (runnable_locked() && !task_pending_) {
    if (lingering_) {
      // A waiter that drained leaves work behind: wake the lingerer for it.
      announce_change_locked();
      drainer_called_ns_.store(trace_recorder::now_ns(), std::memory_order_relaxed);
    } else {
      schedule_drainer_locked(order);
    }
  }
  if (waiters_.load() > 0) progress_.notify_all();
}

template <class Done>
bool async_queue::wait_until(lock_type& lock, Done done,
                             const std::chrono::steady_clock::time_point* deadline,
                             bool recheck) noexcept {
  const auto out_of_time = [deadline] {
    return deadline != nullptr && std::chrono::steady_clock::now() >= *deadline;
  };
  while (!done()) {
    if (out_of_time()) return false;
    if (!draining_ && runnable_locked() && !drainer_about_to_start_locked()) {
      // Nobody is running closures (no free worker, or the task did not start in time): do it
      // here rather than wait on a worker that may never come. A bounded wait stops at its
      // deadline, between two batches (a batch it started runs to its end), and leaves the
      // rest to the drainer task that giving up the role schedules.
      draining_ = true;
      const std::uint64_t step = drain_locked(lock, [&] { return done() || out_of_time(); });
      release_drain_role_locked();
      if (step != 0) {
        lock.unlock();
        report_progress(step);
        lock.lock();
      }
      continue;
    }
    // Dekker with finished(): the drainer updates the counters and then reads waiters_; this
    // thread raises waiters_ and then re-reads the counters, so one of the two sees the other.
    // Also woken by a raised gate and a released drain role.
    waiters_.fetch_add(1);
    bool timed_out = false;
    // Read once: the grace period may end between two reads, and a waiter that saw a drainer
    // coming in the first and none in the second slept without a deadline, with runnable
    // closures and nobody left to wake it (a flush in
    // Lockstep.AClosureWaitingForAnotherParticipantsClosureOfItsStepDoesNotStallThatOne hung
    // about once in 300 runs of step_graph_test, two at a time).
    const bool drainer_coming = drainer_about_to_start_locked();
    bool help = false;
    if (!done() && (draining_ || !runnable_locked() || drainer_coming)) {
      if (drainer_coming) {
        progress_.wait_for(lock, std::chrono::nanoseconds(drainer_start_grace_ns));
      } else if (!recheck && !stall_helper_) {
        if (deadline == nullptr) {
          progress_.wait(lock);
        } else {
          timed_out = progress_.wait_until(lock, *deadline) == std::cv_status::timeout;
        }
      } else {
        // In slices: between two, the wait may be over because other devices made progress
        // that only this thread could give them, or (recheck) because of progress that is not
        // announced. A step end waiting for room helps too: the drainer that would make room
        // may be blocked in a closure that waits for another device's closure.
        const auto slice_end = std::chrono::steady_clock::now() + stall_help_interval;
        if (deadline == nullptr || slice_end < *deadline) {
          help = progress_.wait_until(lock, slice_end) == std::cv_status::timeout &&
                 static_cast<bool>(stall_helper_);
        } else {
          timed_out = progress_.wait_until(lock, *deadline) == std::cv_status::timeout;
        }
      }
    }
    waiters_.fetch_sub(1);
    if (timed_out && !done()) return false;
    if (help && !done()) {
      lock.unlock();
      stall_helper_();
      lock.lock();
    }
  }
  return true;
}

void async_queue::help_if_stalled() noexcept {
  lock_type lock(mutex_);
  // As a waiter decides to drain its own device (wait_until): runnable closures, nobody
  // draining, and no drainer task or promise fresh enough to be worth waiting for.
  if (draining_ || !runnable_locked() || drainer_about_to_start_locked()) return;
  // One batch: the helper has a wait of its own to go back to.
  bool first = true;
  drain_holding_role(lock, [&first] { return !std::exchange(first, false); });
}

void async_queue::run_batch(closure_batch& batch, std::uint64_t step) noexcept {
  std::uint64_t started = started_.load(std::memory_order_relaxed);  // this thread's to write
  std::size_t unreported = 0;  // ran, not yet counted in finished_
  std::size_t discarded = 0;
  std::exception_ptr error;
  std::vector<closure_batch> behind;
  observed_batch observed(observer_, closure_kind::async, step);
  const user_code_scope user_code;
  // The exception_ptr outlives the handler, so this thread's hold on the exception object is
  // only `error`, handed over under the queue's lock (the handler's own reference count lives
  // in uninstrumented libstdc++, invisible to ThreadSanitizer).
  observed.run_all(
      batch, error,
      [&]() noexcept {
        if (unreported == release_every) [[unlikely]] {
          finished(unreported, 0);
          unreported = 0;
        }
        started_.store(++started, std::memory_order_release);
        ++unreported;
      },
      [&](std::size_t left) noexcept {
        // Failure first: a flush that sees this closure finished must also see the failure.
        lock_type lock(mutex_);
        discarded = record_failure_locked(std::move(error), behind, left);
      });
  // Destructors of discarded closures are user code: they ran outside the lock (above), and so
  // do those of the batches queued behind the failure.
  for (closure_batch& b : behind) pool_.release(std::move(b));
  finished(unreported, discarded);
}

std::size_t async_queue::record_failure_locked(std::exception_ptr error,
                                               std::vector<closure_batch>& behind,
                                               std::size_t left_in_batch) noexcept {
  failure_ = std::move(error);
  has_failure_.store(true, std::memory_order_release);
  failed_count_.fetch_add(1);
  std::size_t discarded = left_in_batch;
  try {
    behind.reserve(ring_size_);
  } catch (...) {
    // Out of memory: the batches are destroyed under the lock instead (below).
  }
  while (ring_size_ != 0) {
    closure_batch& b = ring_[ring_head_].items;
    discarded += b.size();
    if (behind.size() < behind.capacity()) {
      behind.push_back(std::move(b));
    } else {
      b.discard();
    }
    ring_head_ = (ring_head_ + 1) % ring_.size();
    --ring_size_;
  }
  discarded_since_failure_ += discarded;
  discarded_count_.fetch_add(discarded);
  // Everything handed over so far is done: the discarded closures leave the pending count, and
  // producers waiting for room stop waiting.
  mark_started(reserved_.load(std::memory_order_relaxed) -
               started_.load(std::memory_order_relaxed));
  return discarded;
}

void async_queue::finished(std::size_t ran, std::size_t discarded) noexcept {
  const std::size_t n = ran + discarded;
  if (n == 0) return;
  if (ran != 0) ran_count_.fetch_add(ran, std::memory_order_relaxed);
  finished_.fetch_add(n);
  if (waiters_.load() > 0) {
    lock_type lock(mutex_);
    progress_.notify_all();
  }
}

void async_queue::wait_for_handed_over() {
  lock_type lock(mutex_);
  // Also waits for the step-done notification, so that once this returns the step listener
  // (lockstep, joined closures) has seen every step handed over before the call.
  const std::uint64_t target = reserved_.load(std::memory_order_relaxed);
  const std::uint64_t step = last_step_;
  wait_until(lock, [&] { return finished_.load() >= target && done_step_ >= step; });
}

bool async_queue::wait_for_handed_over_until(std::chrono::steady_clock::time_point deadline) {
  lock_type lock(mutex_);
  const std::uint64_t target = reserved_.load(std::memory_order_relaxed);
  const std::uint64_t step = last_step_;
  return wait_until(
      lock, [&] { return finished_.load() >= target && done_step_ >= step; }, &deadline);
}

std::optional<async_failure> async_queue::take_failure() {
  if (!has_failure_.load(std::memory_order_acquire)) return std::nullopt;  // every step end
  std::lock_guard lock(mutex_);
  if (!failure_) return std::nullopt;
  has_failure_.store(false, std::memory_order_relaxed);
  async_failure f{std::move(failure_), discarded_since_failure_};
  failure_ = nullptr;
  discarded_since_failure_ = 0;
  return f;
}

void async_queue::restore_failure(async_failure&& failure) noexcept {
  lock_type lock(mutex_);
  failure_ = std::move(failure.error);
  discarded_since_failure_ += failure.discarded;
  has_failure_.store(true, std::memory_order_release);
}

async_queue_counts async_queue::counts() const noexcept {
  async_queue_counts c;
  c.handed_over = reserved_.load();
  c.discarded = discarded_count_.load();
  c.ran = ran_count_.load(std::memory_order_relaxed);
  c.failed = failed_count_.load();
  c.pending = static_cast<std::size_t>(pending());
  c.high_water = high_water_.load(std::memory_order_relaxed);
  c.tasks = tasks_.load(std::memory_order_relaxed);
  return c;
}

void async_queue::wait_for_idle() noexcept {
  lock_type lock(mutex_);
  // Everything reserved runs or is discarded, so the ring empties; a lingering drainer counts
  // as idle. Idle includes the step listener having heard of every step done (shutdown then
  // waits for the joined closures those steps release).
  wait_until(lock, [this] {
    return ring_size_ == 0 && running_step_ == 0 && done_step_.load() >= reported_step_;
  });
}

void async_queue::shutdown() noexcept {
  wait_for_idle();
  {
    lock_type lock(mutex_);
    stop_lingering_ = true;
    announce_change_locked();
  }
  // Tasks that were enqueued but found the work done still have to start and finish before the
  // queue's memory goes away.
  try {
    // The tasks' ends were released on the hand-over key (start_task); wait() is their join,
    // and execute_in_arena acquires that key after it.
    execute_in_arena(arena_, [this] { drainer_tasks_.wait(); });
  } catch (...) {
    // Drainer tasks never throw; nothing to report.
  }
}

}  // namespace stepflow::detail
