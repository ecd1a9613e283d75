#include "async_queue.hpp"

#include <algorithm>
#include <utility>

#include "thread_frames.hpp"
#include "tsan.hpp"

namespace stepflow::detail {
namespace {
// Room is given back every this many finished closures, not once per batch: when the bound equals
// the step size, releasing a whole batch at once makes producer and drainer take turns instead of
// overlapping (measured on the prototype, see docs/architecture.md).
constexpr std::size_t release_every = 16;
constexpr std::size_t initial_ring_slots = 8;
// Only its address is used, as a ThreadSanitizer synchronisation key.
[[maybe_unused]] char tsan_handoff_key;
}  // namespace

async_queue::async_queue(tbb::task_arena& arena, std::size_t capacity, batch_pool& pool)
    : arena_(arena), pool_(pool), capacity_(capacity), ring_(initial_ring_slots) {}

async_queue::~async_queue() = default;

std::uint64_t async_queue::reserve(closure_batch&& batch) {
  const std::size_t n = batch.size();
  lock_type lock(mutex_);
  if (n == 0 || failed_) {
    if (n != 0) {
      // Handed over behind a failure that is not reported yet: discarded with it.
      discarded_since_failure_ += n;
      discarded_count_.fetch_add(n);
    }
    const std::uint64_t ticket = reserved_seq_;
    lock.unlock();
    pool_.release(std::move(batch));  // destroys the closures outside the lock
    return ticket;
  }
  if (capacity_ == 0 || n <= capacity_) {
    push_ring_locked(std::move(batch));
  } else {
    // Larger than the whole queue: split into entries that each fit once the queue is empty.
    for (std::size_t offset = 0; offset < n; offset += capacity_) {
      closure_batch piece = pool_.acquire();
      const std::size_t end = std::min(n, offset + capacity_);
      piece.reserve(end - offset);
      for (std::size_t i = offset; i < end; ++i) piece.push_back(std::move(batch[i]));
      push_ring_locked(std::move(piece));
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
  wait_until(lock, [&] { return admitted_seq_ >= ticket; });
}

void async_queue::push_ring_locked(closure_batch&& batch) {
  if (ring_size_ == ring_.size()) {
    std::vector<closure_batch> bigger(ring_.size() * 2);
    for (std::size_t i = 0; i < ring_size_; ++i) {
      bigger[i] = std::move(ring_[(ring_head_ + i) % ring_.size()]);
    }
    ring_ = std::move(bigger);
    ring_head_ = 0;
  }
  ring_[(ring_head_ + ring_size_) % ring_.size()] = std::move(batch);
  ++ring_size_;
  has_unadmitted_.store(true);
}

void async_queue::admit_locked(bool force) noexcept {
  bool admitted = false;
  while (admitted_batches_ < ring_size_) {
    const std::size_t n = ring_[(ring_head_ + admitted_batches_) % ring_.size()].size();
    // Dekker with finished(): has_unadmitted_ is set before pending_ is read here, and the
    // drainer lowers pending_ before it reads has_unadmitted_, so one of the two admits.
    if (!force && capacity_ != 0 && pending_.load() + n > capacity_) break;
    const std::size_t pending = pending_.fetch_add(n) + n;
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
  if (!draining_ && !task_pending_) schedule_drainer_locked();
  if (waiters_.load() > 0) progress_.notify_all();
}

void async_queue::schedule_drainer_locked() {
  task_pending_ = true;
  // The task only claims the drain role; it must never throw (an exception escaping an enqueued
  // task aborts the process), and run_drainer_task is noexcept.
  // TSan: the task object is written here and read by a worker through oneTBB's uninstrumented
  // queues, so the hand-over is announced after the task is built and acquired before the lambda
  // reads its capture. The key is the task-independent `tsan_handoff_key`, because the capture
  // itself cannot be read before the acquire.
  // oneTBB also recycles task memory between threads, so the end of each task releases the same
  // key and the next task's construction acquires it.
  tsan_acquire(&tsan_handoff_key);
  tbb::task_handle task = drainer_tasks_.defer([this] {
    tsan_acquire(&tsan_handoff_key);
    run_drainer_task();
    tsan_release(&tsan_handoff_key);
  });
  tsan_release(&tsan_handoff_key);
  arena_.enqueue(std::move(task));
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
    while (admitted_batches_ != 0 && !stop()) {
      closure_batch batch = std::move(ring_[ring_head_]);
      ring_head_ = (ring_head_ + 1) % ring_.size();
      --ring_size_;
      --admitted_batches_;
      lock.unlock();
      run_batch(batch);
      pool_.release(std::move(batch));
      lock.lock();
    }
  });
}

void async_queue::release_drain_role_locked() noexcept {
  draining_ = false;
  if (admitted_batches_ != 0 && !task_pending_) schedule_drainer_locked();
  if (waiters_.load() > 0) progress_.notify_all();
}

template <class Done>
void async_queue::wait_until(lock_type& lock, Done done) noexcept {
  while (!done()) {
    if (!draining_) {
      // Nobody is running closures (no free worker, or the task has not started): do it here
      // rather than wait on a worker that may never come.
      draining_ = true;
      drain_locked(lock, done);
      release_drain_role_locked();
      continue;
    }
    // Dekker with finished(): the drainer updates the counters and then reads waiters_; this
    // thread raises waiters_ and then re-reads the counters, so one of the two sees the other.
    waiters_.fetch_add(1);
    if (!done() && draining_) progress_.wait(lock);
    waiters_.fetch_sub(1);
  }
}

void async_queue::run_batch(closure_batch& batch) noexcept {
  const std::size_t n = batch.size();
  std::size_t released = 0;
  for (std::size_t i = 0; i < n; ++i) {
    if (i - released == release_every) {
      finished(release_every, 0);
      released = i;
    }
    std::exception_ptr error;
    try {
      batch[i]();
    } catch (...) {  // any exception, not only std::exception (H6)
      error = std::current_exception();
    }
    // Recorded after the handler ended, so this thread's hold on the exception object is only
    // `error`, handed over under the queue's lock (the handler's own reference count lives in
    // uninstrumented libstdc++, invisible to ThreadSanitizer).
    if (error) {
      finished(i + 1 - released, 0);
      record_failure(std::move(error), batch, i + 1);
      return;
    }
    batch[i].reset();
  }
  finished(n - released, 0);
}

void async_queue::record_failure(std::exception_ptr error, closure_batch& batch,
                                 std::size_t next) noexcept {
  std::vector<closure_batch> behind;
  std::size_t discarded = batch.size() - next;  // admitted: they count in pending_
  std::size_t unadmitted = 0;
  {
    lock_type lock(mutex_);
    failure_ = std::move(error);
    failed_ = true;
    failed_count_.fetch_add(1);
    behind.reserve(ring_size_);
    for (std::size_t i = 0; ring_size_ != 0; ++i) {
      const std::size_t n = ring_[ring_head_].size();
      (i < admitted_batches_ ? discarded : unadmitted) += n;
      behind.push_back(std::move(ring_[ring_head_]));
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
    if (waiters_.load() > 0) progress_.notify_all();
  }
  // Destructors of discarded closures are user code: run them outside the lock.
  detail::discard(batch, next);
  for (closure_batch& b : behind) pool_.release(std::move(b));
  finished(0, discarded);
}

void async_queue::finished(std::size_t ran, std::size_t discarded) noexcept {
  const std::size_t n = ran + discarded;
  if (n == 0) return;
  if (ran != 0) ran_count_.fetch_add(ran, std::memory_order_relaxed);
  pending_.fetch_sub(n);
  finished_.fetch_add(n);
  if (has_unadmitted_.load() || waiters_.load() > 0) {
    lock_type lock(mutex_);
    admit_locked(false);
    progress_.notify_all();
  }
}

void async_queue::wait_for_handed_over() {
  const std::uint64_t target = handed_over_.load();
  lock_type lock(mutex_);
  wait_until(lock, [&] { return finished_.load() >= target; });
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
  c.pending = pending_.load();
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
  } catch (...) {
    // Drainer tasks never throw; nothing to report.
  }
}

}  // namespace stepflow::detail
