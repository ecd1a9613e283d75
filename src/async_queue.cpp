#include "async_queue.hpp"

#include <algorithm>
#include <utility>

#include "closure_observer.hpp"
#include "enqueue_task.hpp"
#include "thread_frames.hpp"

namespace stepflow::detail {
namespace {
// Room is given back every this many finished closures, not once per batch: when the bound equals
// the step size, releasing a whole batch at once makes producer and drainer take turns instead of
// overlapping (measured on the prototype, see docs/architecture.md).
constexpr std::size_t release_every = 16;
constexpr std::size_t initial_ring_slots = 8;
// How long a waiter leaves a just-enqueued drainer task to start before draining itself.
constexpr std::uint64_t drainer_start_grace_ns = 200'000;
}  // namespace

async_queue::async_queue(tbb::task_arena& arena, std::size_t capacity, batch_pool& pool,
                         closure_observer& observer)
    : arena_(arena),
      pool_(pool),
      observer_(observer),
      capacity_(capacity),
      ring_(initial_ring_slots) {}

void async_queue::trace_depth_locked() noexcept {
  if (observer_.trace != nullptr) {
    observer_.trace->counter(observer_.track, observer_.depth_counter, pending(),
                             trace_recorder::now_ns());
  }
}

async_queue::~async_queue() = default;

std::uint64_t async_queue::reserve(closure_batch&& batch, std::uint64_t step) {
  const std::size_t n = batch.size();
  lock_type lock(mutex_);
  last_step_ = std::max(last_step_, step);
  if (n == 0 || failed_) {
    if (n != 0) {
      // Handed over behind a failure that is not reported yet: discarded with it.
      discarded_since_failure_ += n;
      discarded_count_.fetch_add(n);
    }
    const std::uint64_t ticket = reserved_seq_;
    publish_progress_locked();
    lock.unlock();
    pool_.release(std::move(batch));  // destroys the closures outside the lock
    return ticket;
  }
  if (capacity_ == 0 || n <= capacity_) {
    push_ring_locked(std::move(batch), step);
  } else {
    // Larger than the whole queue: split into entries that each fit once the queue is empty.
    for (std::size_t offset = 0; offset < n; offset += capacity_) {
      closure_batch piece = pool_.acquire();
      const std::size_t end = std::min(n, offset + capacity_);
      piece.reserve(end - offset);
      for (std::size_t i = offset; i < end; ++i) piece.push_back(std::move(batch[i]));
      push_ring_locked(std::move(piece), step);
    }
    pool_.release(std::move(batch));  // only moved-from closures are left in it
  }
  reserved_seq_ += n;
  handed_over_.fetch_add(n);
  const std::uint64_t ticket = reserved_seq_;
  admit_locked(false);
  return ticket;
}

void async_queue::wait_admitted(std::uint64_t ticket) {
  lock_type lock(mutex_);
  if (admitted_seq_ >= ticket) return;
  // Inside an asynchronous closure this thread may be the very drainer that would make room,
  // or one of a cycle of them, so it never waits there: it admits what is ahead of it and its
  // own batch at once.
  if (capacity_ == 0 || async_frame::active()) {
    while (admitted_seq_ < ticket) admit_locked(true);
    return;
  }
  // Room made between the drainer's chunk boundaries (a closure started) is not announced, so
  // the wait re-checks every millisecond and admits what fits itself.
  const std::uint64_t began = trace_recorder::now_ns();
  struct account_blocked {
    closure_observer& observer;
    std::uint64_t began;
    ~account_blocked() {
      observer.blocked_ns.fetch_add(trace_recorder::now_ns() - began, std::memory_order_relaxed);
    }
  } account{observer_, began};
  wait_until(
      lock,
      [&] {
        admit_locked(false);
        return admitted_seq_ >= ticket;
      },
      nullptr, true);
}

void async_queue::push_ring_locked(closure_batch&& batch, std::uint64_t step) {
  if (ring_size_ == ring_.size()) {
    std::vector<queued_batch> bigger(ring_.size() * 2);
    for (std::size_t i = 0; i < ring_size_; ++i) {
      bigger[i] = std::move(ring_[(ring_head_ + i) % ring_.size()]);
    }
    ring_ = std::move(bigger);
    ring_head_ = 0;
  }
  queued_batch& slot = ring_[(ring_head_ + ring_size_) % ring_.size()];
  slot.items = std::move(batch);
  slot.step = step;
  ++ring_size_;
  has_unadmitted_.store(true);
}

void async_queue::admit_locked(bool force) noexcept {
  bool admitted = false;
  while (admitted_batches_ < ring_size_) {
    const std::size_t n = ring_[(ring_head_ + admitted_batches_) % ring_.size()].items.size();
    // Dekker with finished(): has_unadmitted_ is set before the counts are read here, and the
    // drainer raises finished_ before it reads has_unadmitted_, so one of the two admits; room
    // made between those chunk boundaries is found by waiters re-checking (see wait_admitted).
    if (!force && capacity_ != 0 && pending() + n > capacity_) break;
    admitted_.store(admitted_.load() + n);
    const std::uint64_t pending = this->pending();
    if (pending > high_water_.load(std::memory_order_relaxed)) {
      high_water_.store(pending, std::memory_order_relaxed);
    }
    admitted_seq_ += n;
    ++admitted_batches_;
    admitted = true;
    if (force) break;  // one at a time: the caller loops up to its ticket
  }
  has_unadmitted_.store(admitted_batches_ < ring_size_);
  if (!admitted) return;
  if (!draining_ && !task_pending_ && runnable_locked()) schedule_drainer_locked();
  if (waiters_.load() > 0) progress_.notify_all();
}

bool async_queue::runnable_locked() const noexcept {
  return admitted_batches_ != 0 && ring_[ring_head_].step <= gate_;
}

void async_queue::publish_progress_locked() noexcept {
  std::uint64_t done = last_step_;
  if (ring_size_ != 0) done = std::min(done, ring_[ring_head_].step - 1);
  if (running_step_ != 0) done = std::min(done, running_step_ - 1);
  if (done <= done_step_) return;
  done_step_ = done;
  if (step_listener_) step_listener_(done);
  if (waiters_.load() > 0) progress_.notify_all();
}

void async_queue::set_gate(std::uint64_t max_step) noexcept {
  lock_type lock(mutex_);
  gate_ = std::max(gate_, max_step);  // gates only rise: shutdown lifts them for good
  if (!draining_ && !task_pending_ && runnable_locked()) schedule_drainer_locked();
  if (waiters_.load() > 0) progress_.notify_all();
}

void async_queue::start_gated(std::uint64_t max_step) noexcept {
  lock_type lock(mutex_);
  gate_ = max_step;
}

void async_queue::set_step_listener(std::function<void(std::uint64_t)> listener) {
  lock_type lock(mutex_);
  step_listener_ = std::move(listener);
}

bool async_queue::drainer_about_to_start_locked() const noexcept {
  // A freshly enqueued drainer task usually starts within microseconds on a worker; a waiter
  // that took the drain role at once would run every closure on the producer's thread instead
  // (measured: 100% of them with a bound equal to the step size). So it leaves the task a grace
  // period, and only then drains itself (a task that never starts: no free worker).
  return task_pending_ && trace_recorder::now_ns() - task_scheduled_ns_ < drainer_start_grace_ns;
}

void async_queue::schedule_drainer_locked() {
  task_pending_ = true;
  task_scheduled_ns_ = trace_recorder::now_ns();
  // The task only claims the drain role; run_drainer_task is noexcept.
  enqueue_task(arena_, drainer_tasks_, [this]() noexcept { run_drainer_task(); });
}

void async_queue::run_drainer_task() noexcept {
  lock_type lock(mutex_);
  task_pending_ = false;
  // A waiting thread took the role meanwhile; it reschedules a task if it leaves work behind.
  if (draining_) return;
  draining_ = true;
  drain_locked(lock, [] { return false; });
  release_drain_role_locked();
}

template <class Stop>
void async_queue::drain_locked(lock_type& lock, Stop stop) noexcept {
  async_frame frame;
  // Isolation: a closure that waits on its own TBB work must not pick up another device's
  // drainer task and run it nested on this stack.
  tbb::this_task_arena::isolate([&] {
    while (runnable_locked() && !stop()) {
      queued_batch& front = ring_[ring_head_];
      closure_batch batch = std::move(front.items);
      running_step_ = front.step;
      ring_head_ = (ring_head_ + 1) % ring_.size();
      --ring_size_;
      --admitted_batches_;
      const std::uint64_t step = running_step_;
      lock.unlock();
      run_batch(batch, step);
      pool_.release(std::move(batch));
      lock.lock();
      running_step_ = 0;
      publish_progress_locked();
      trace_depth_locked();
    }
  });
}

void async_queue::release_drain_role_locked() noexcept {
  draining_ = false;
  if (runnable_locked() && !task_pending_) schedule_drainer_locked();
  if (waiters_.load() > 0) progress_.notify_all();
}

template <class Done>
bool async_queue::wait_until(lock_type& lock, Done done,
                             const std::chrono::steady_clock::time_point* deadline,
                             bool recheck) noexcept {
  while (!done()) {
    if (!draining_ && runnable_locked() && !drainer_about_to_start_locked()) {
      // Nobody is running closures (no free worker, or the task did not start in time): do it
      // here rather than wait on a worker that may never come.
      draining_ = true;
      drain_locked(lock, done);
      release_drain_role_locked();
      continue;
    }
    // Dekker with finished(): the drainer updates the counters and then reads waiters_; this
    // thread raises waiters_ and then re-reads the counters, so one of the two sees the other.
    // Also woken by admission, a raised gate and a released drain role.
    waiters_.fetch_add(1);
    bool timed_out = false;
    if (!done() && (draining_ || !runnable_locked() || drainer_about_to_start_locked())) {
      if (recheck || drainer_about_to_start_locked()) {
        progress_.wait_for(lock, std::chrono::milliseconds(1));
      } else if (deadline == nullptr) {
        progress_.wait(lock);
      } else {
        timed_out = progress_.wait_until(lock, *deadline) == std::cv_status::timeout;
      }
    }
    waiters_.fetch_sub(1);
    if (timed_out && !done()) return false;
  }
  return true;
}

void async_queue::run_batch(closure_batch& batch, std::uint64_t step) noexcept {
  const std::size_t n = batch.size();
  std::size_t released = 0;
  observed_batch observed(observer_, closure_kind::async, step);
  for (std::size_t i = 0; i < n; ++i) {
    if (i - released == release_every) {
      finished(release_every, 0);
      released = i;
    }
    mark_started(1);
    // The exception_ptr outlives the handler, so this thread's hold on the exception object is
    // only `error`, handed over under the queue's lock (the handler's own reference count lives
    // in uninstrumented libstdc++, invisible to ThreadSanitizer).
    if (std::exception_ptr error = observed.run(batch[i])) {
      // Failure first: a flush that sees this closure finished must also see the failure.
      record_failure(std::move(error), batch, i + 1, i + 1 - released);
      return;
    }
    batch[i].reset();
  }
  finished(n - released, 0);
}

void async_queue::record_failure(std::exception_ptr error, closure_batch& batch, std::size_t next,
                                 std::size_t ran_unreported) noexcept {
  std::vector<closure_batch> behind;
  std::size_t discarded = batch.size() - next;  // admitted: they count as pending
  std::size_t unadmitted = 0;
  {
    lock_type lock(mutex_);
    failure_ = std::move(error);
    failed_ = true;
    failed_count_.fetch_add(1);
    behind.reserve(ring_size_);
    for (std::size_t i = 0; ring_size_ != 0; ++i) {
      const std::size_t n = ring_[ring_head_].items.size();
      (i < admitted_batches_ ? discarded : unadmitted) += n;
      behind.push_back(std::move(ring_[ring_head_].items));
      ring_head_ = (ring_head_ + 1) % ring_.size();
      --ring_size_;
    }
    admitted_batches_ = 0;
    // Batches that were waiting for room are done too: their producers stop waiting.
    admitted_seq_ = reserved_seq_;
    has_unadmitted_.store(false);
    discarded_since_failure_ += discarded + unadmitted;
    discarded_count_.fetch_add(discarded + unadmitted);
    finished_.fetch_add(unadmitted);
    // The discarded admitted closures leave the pending count now, with the failure.
    mark_started(discarded);
    // Every step handed over so far is done, except the batch this drainer is still in.
  }
  // Destructors of discarded closures are user code: run them outside the lock.
  detail::discard(batch, next);
  for (closure_batch& b : behind) pool_.release(std::move(b));
  finished(ran_unreported, discarded);
}

void async_queue::finished(std::size_t ran, std::size_t discarded) noexcept {
  const std::size_t n = ran + discarded;
  if (n == 0) return;
  if (ran != 0) ran_count_.fetch_add(ran, std::memory_order_relaxed);
  finished_.fetch_add(n);
  if (has_unadmitted_.load() || waiters_.load() > 0) {
    lock_type lock(mutex_);
    admit_locked(false);
    progress_.notify_all();
  }
}

void async_queue::wait_for_handed_over() {
  lock_type lock(mutex_);
  // Also waits for the step-done notification, so that once this returns the step listener
  // (lockstep, joined closures) has seen every step handed over before the call.
  const std::uint64_t target = handed_over_.load();
  const std::uint64_t step = last_step_;
  wait_until(lock, [&] { return finished_.load() >= target && done_step_ >= step; });
}

bool async_queue::wait_for_handed_over_until(std::chrono::steady_clock::time_point deadline) {
  lock_type lock(mutex_);
  const std::uint64_t target = handed_over_.load();
  const std::uint64_t step = last_step_;
  return wait_until(
      lock, [&] { return finished_.load() >= target && done_step_ >= step; }, &deadline);
}

std::optional<async_failure> async_queue::take_failure() {
  std::lock_guard lock(mutex_);
  if (!failed_) return std::nullopt;
  async_failure f{std::move(failure_), discarded_since_failure_};
  failure_ = nullptr;
  failed_ = false;
  discarded_since_failure_ = 0;
  return f;
}

async_queue_counts async_queue::counts() const noexcept {
  async_queue_counts c;
  c.handed_over = handed_over_.load();
  c.discarded = discarded_count_.load();
  c.ran = ran_count_.load(std::memory_order_relaxed);
  c.failed = failed_count_.load();
  c.pending = static_cast<std::size_t>(pending());
  c.high_water = high_water_.load(std::memory_order_relaxed);
  return c;
}

void async_queue::wait_for_idle() noexcept {
  lock_type lock(mutex_);
  // Everything reserved gets admitted as room appears (or discarded), so the ring empties.
  wait_until(lock, [this] { return ring_size_ == 0 && !draining_; });
}

void async_queue::shutdown() noexcept {
  wait_for_idle();
  // Tasks that were enqueued but found the work done still have to start and finish before the
  // queue's memory goes away.
  try {
    arena_.execute([this] { drainer_tasks_.wait(); });
    // The tasks' ends were released on this key (enqueue_task); wait() is their join.
    tsan_acquire(&tsan_task_handoff_key);
  } catch (...) {
    // Drainer tasks never throw; nothing to report.
  }
}

}  // namespace stepflow::detail
