#pragma once
// Occupies every oneTBB worker thread with a task that blocks until released, so that a test
// sees what stepflow does when no worker is free: nobody drains a device's queue unless a thread
// that waits on it (a flush, a step end short of room, the destructor) runs its closures itself.
//
// Why a helper: a low oneTBB thread limit does not get there. With
// tbb::global_control::max_allowed_parallelism at 1, oneTBB still grants one worker to an arena
// with enqueued tasks ("mandatory concurrency"), and stepflow enqueues its drainer tasks into an
// arena of its own (max(2, limit) - 1 slots, none reserved: src/scheduler.cpp,
// worker_pool_size()). So at 1 thread, as at 2, a worker drains the queue.
//
// How many: oneTBB lets limit - 1 workers run at once (the limit in force, by default the
// number of cores), and with a limit of 1 exactly one, for the whole process, to the first
// arena with enqueued tasks in priority order (market::update_allotment). That is
// max(2, limit) - 1, as many as stepflow's arena can hold. The blockers' arena has high priority:
// oneTBB allots workers to higher-priority arenas first, so while every blocker holds a worker
// none is allotted to stepflow's arena (normal or low priority), and at a limit of 1 the one
// mandatory worker is the blockers'. The constructor returns only once every blocker runs, so no
// worker is left over, or still lingering in stepflow's arena, when the test goes on.
// Checked at 1, 2 and 4 threads by
// OccupyWorkers.WhileHeldOnlyAFlushRunsQueuedClosuresAndOnceReleasedWorkersDo (scheduler_test);
// with one blocker fewer, a worker runs the closures at every limit.
//
//   stepflow::scheduler s(...);                // first: destroyed after the workers are freed
//   stepflow::testing::occupy_workers busy;    // every worker blocked from here
//   ... step ends: their async closures wait ...
//   busy.release();                            // or at the end of the scope
//
// Declare it after the scheduler, so that it releases the workers before the scheduler's
// destructor runs.

#include <oneapi/tbb/global_control.h>
#include <oneapi/tbb/task_arena.h>
#include <oneapi/tbb/task_group.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <mutex>
#include <stdexcept>
#include <string>

#include "tsan_handoff.hpp"

namespace stepflow::testing {

class occupy_workers {
 public:
  /// oneTBB's workers under the thread limit in force: max(2, limit) - 1.
  static int worker_count() {
    const std::size_t limit =
        tbb::global_control::active_value(tbb::global_control::max_allowed_parallelism);
    return static_cast<int>(std::max<std::size_t>(2, limit) - 1);
  }

  /// Blocks `count` workers (by default all of them); returns once every one of them runs its
  /// blocker. Throws std::runtime_error if that has not happened within `bound` (a generous hang
  /// bound, not a timing claim: it takes microseconds), after releasing those that did start.
  explicit occupy_workers(int count = worker_count(),
                          std::chrono::seconds bound = std::chrono::seconds(30))
      : count_(count), arena_(std::max(count, 1), 0, tbb::task_arena::priority::high) {
    for (int i = 0; i < count_; ++i) {
      tbb::task_handle blocker = group_.defer([this] {
        const tbb_body_scope scope;  // before the capture is read
        block();
      });
      // After the task is built, which a worker reads (TSan cannot see oneTBB's hand-over).
      before_tbb_algorithm();
      arena_.enqueue(std::move(blocker));
    }
    std::unique_lock lock(mutex_);
    if (!changed_.wait_for(lock, bound, [this] { return running_ == count_; })) {
      const int running = running_;
      lock.unlock();
      join();
      throw std::runtime_error("occupy_workers: only " + std::to_string(running) + " of " +
                               std::to_string(count_) + " oneTBB workers started a blocker");
    }
  }

  occupy_workers(const occupy_workers&) = delete;
  occupy_workers& operator=(const occupy_workers&) = delete;

  /// Releases the workers and waits until every blocker returned.
  ~occupy_workers() { join(); }

  /// Lets the blockers return; the workers are free again soon after. Idempotent.
  void release() {
    std::lock_guard lock(mutex_);
    released_ = true;
    changed_.notify_all();
  }

  /// The number of workers blocked.
  int count() const noexcept { return count_; }

 private:
  void block() {
    std::unique_lock lock(mutex_);
    ++running_;
    changed_.notify_all();
    changed_.wait(lock, [this] { return released_; });
  }

  /// Releases the blockers and waits for every one of them to end, in the arena, as oneTBB
  /// asks of a task_group whose tasks were enqueued there.
  void join() {
    release();
    if (count_ <= 0) return;
    const auto wait = [this] {
      const tbb_body_scope scope;  // before the capture is read
      group_.wait();
    };
    before_tbb_algorithm();  // `wait` may be handed to a worker of the arena and run there
    arena_.execute(wait);
    after_tbb_algorithm();
  }

  const int count_;
  std::mutex mutex_;
  std::condition_variable changed_;
  int running_ = 0;        // blockers started, guarded by mutex_
  bool released_ = false;  // guarded by mutex_
  tbb::task_group_context context_{tbb::task_group_context::isolated};
  tbb::task_group group_{context_};  // joined by the destructor before anything here goes
  tbb::task_arena arena_;
};

}  // namespace stepflow::testing
