#pragma once
// Starts stepflow's own tasks (drainers, step-graph signals) in its arena, as tasks of a
// task_group so that `group.wait()` can join them later.
//
// From a thread outside the arena (a producer) a task is enqueued, so that it runs even when the
// process has no free oneTBB worker (enqueued tasks get one). From one of stepflow's own tasks
// already running in that arena, between user closures (a drainer, the step graph's wave), it is
// spawned instead: into the running thread's own deque, where that thread finds it as soon as
// its current task ends and an idle worker can steal it, without the arena's shared queue or a
// wake-up (a lockstep wave hands its devices to other workers this way). `own_task_arena` tells the
// two apart: set while stepflow's own task code runs, cleared again while a user closure runs in it
// (`user_code_scope`), since user code may have entered another arena.
//
// TSan: the task object is written here and read by a worker through oneTBB's uninstrumented
// queues, and oneTBB recycles task memory between threads. So the hand-over is released after
// the task is built and acquired before the function reads its capture, and the end of each task
// releases the same key that the next task's construction acquires. The key is one static
// address, because a task's capture cannot be read before the acquire.

#include <atomic>
#include <utility>

#include <oneapi/tbb/task_arena.h>
#include <oneapi/tbb/task_group.h>

#include "tsan.hpp"

namespace stepflow::detail {

inline char tsan_task_handoff_key;

/// stepflow tasks started and not yet running, in the whole process (every scheduler's arena
/// draws on oneTBB's one worker pool). A lingering drainer leaves as soon as this is non-zero, so
/// that it never holds the worker such a task (another device's drainer, a step-graph signal or
/// wave) is waiting for.
inline std::atomic<int> tasks_waiting_for_a_worker{0};

/// The step graph's wave tasks among them. A drainer that keeps finding work leaves between two
/// batches while this is non-zero: the wave task was spawned on its thread (its put came from
/// there), and with one worker nobody else would run a step's joined closures before the
/// device's queue ran dry.
inline std::atomic<int> waves_waiting_for_a_worker{0};

/// The arena in which this thread runs one of stepflow's own tasks, outside user code; null
/// everywhere else.
inline thread_local const tbb::task_arena* own_task_arena = nullptr;

/// Marks the code of one of stepflow's own tasks running in `arena`.
class own_task_scope {
 public:
  explicit own_task_scope(const tbb::task_arena& arena) noexcept : saved_(own_task_arena) {
    own_task_arena = &arena;
  }
  ~own_task_scope() { own_task_arena = saved_; }
  own_task_scope(const own_task_scope&) = delete;
  own_task_scope& operator=(const own_task_scope&) = delete;

 private:
  const tbb::task_arena* saved_;
};

/// User closures (and their destructors) run inside: whatever they start is started as from a
/// foreign thread.
class user_code_scope {
 public:
  user_code_scope() noexcept : saved_(own_task_arena) { own_task_arena = nullptr; }
  ~user_code_scope() { own_task_arena = saved_; }
  user_code_scope(const user_code_scope&) = delete;
  user_code_scope& operator=(const user_code_scope&) = delete;

 private:
  const tbb::task_arena* saved_;
};

/// True on a thread running stepflow's own code in a task of `arena`.
inline bool in_own_task(const tbb::task_arena& arena) noexcept { return own_task_arena == &arena; }

/// How a task started from one of stepflow's own tasks is queued.
enum class task_order {
  next,         // spawned: it runs next on this thread, unless another thread takes it first
  behind_local  // enqueued: behind what this thread spawned already (a wave it must not delay)
};

/// Starts `f` as a task of `group` in `arena`: spawned from one of stepflow's own tasks in that
/// arena (unless `order` says otherwise), enqueued from anywhere else. `f` must not throw: an
/// exception escaping an enqueued task aborts the process.
template <class F>
void start_task(tbb::task_arena& arena, tbb::task_group& group, F f,
                task_order order = task_order::next) {
  tsan_acquire(&tsan_task_handoff_key);
  tasks_waiting_for_a_worker.fetch_add(1, std::memory_order_relaxed);
  tbb::task_handle task = group.defer([&arena, f = std::move(f)] {
    tasks_waiting_for_a_worker.fetch_sub(1, std::memory_order_relaxed);
    tsan_acquire(&tsan_task_handoff_key);
    {
      const own_task_scope own(arena);
      f();
    }
    tsan_release(&tsan_task_handoff_key);
  });
  tsan_release(&tsan_task_handoff_key);
  if (order == task_order::next && in_own_task(arena)) {
    // In a fresh isolation region: spawned tasks inherit the spawner's, and a closure of a batch
    // drained later on this stack that waits for its own TBB work could otherwise pick this
    // task up and run it nested inside that wait.
    tbb::this_task_arena::isolate([&] { group.run(std::move(task)); });
    return;
  }
  arena.enqueue(std::move(task));
}

/// `arena.execute(f)` for a thread outside the arena. When no slot is free, oneTBB hands `f` to
/// one of the arena's workers and waits for it: that hand-over is invisible to TSan too, so it is
/// announced both ways on the same key.
template <class F>
void execute_in_arena(tbb::task_arena& arena, F&& f) {
  const auto body = [&f] {
    tsan_acquire(&tsan_task_handoff_key);
    f();
    tsan_release(&tsan_task_handoff_key);
  };
  tsan_release(&tsan_task_handoff_key);  // after `body` is built: the worker reads it
  arena.execute(body);
  tsan_acquire(&tsan_task_handoff_key);
}

}  // namespace stepflow::detail
