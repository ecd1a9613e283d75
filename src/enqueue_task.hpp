#pragma once
// Enqueues a function into an arena as a task of `group`, so that it runs even when the process
// has no oneTBB worker (enqueued tasks get one), and so that `group.wait()` can join it later.
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

/// stepflow tasks enqueued and not yet started, in the whole process (every scheduler's arena
/// draws on oneTBB's one worker pool). A lingering drainer leaves as soon as this is non-zero, so
/// that it never holds the worker such a task (another device's drainer, a step-graph signal)
/// is waiting for.
inline std::atomic<int> tasks_waiting_for_a_worker{0};

/// `f` must not throw: an exception escaping an enqueued task aborts the process.
template <class F>
void enqueue_task(tbb::task_arena& arena, tbb::task_group& group, F f) {
  tsan_acquire(&tsan_task_handoff_key);
  tasks_waiting_for_a_worker.fetch_add(1, std::memory_order_relaxed);
  tbb::task_handle task = group.defer([f = std::move(f)] {
    tasks_waiting_for_a_worker.fetch_sub(1, std::memory_order_relaxed);
    tsan_acquire(&tsan_task_handoff_key);
    f();
    tsan_release(&tsan_task_handoff_key);
  });
  tsan_release(&tsan_task_handoff_key);
  arena.enqueue(std::move(task));
}

}  // namespace stepflow::detail
