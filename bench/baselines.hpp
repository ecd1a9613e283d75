#pragma once
// The baselines stepflow's asynchronous path is measured against (issue 5, B2 and B5). Each has
// the same shape as a stepflow device: add closures, end the step, flush.
//
// - `task_per_closure_device` (baseline a): the obvious oneTBB design, one `task_group::run` per
//   closure. Order and one-at-a-time execution per device come from a mutex-protected FIFO: each
//   task takes the device's run lock, pops the oldest closure and runs it. Unbounded (the
//   producer never blocks), which only favours the baseline.
// - `torch_port_device` (baseline b): a faithful C++ port of torch/_lazy/closure.py's
//   AsyncClosureHandler on top of Python's queue.Queue: one std::mutex with three condition
//   variables (not_empty, not_full, all_tasks_done), a deque bounded at 100, one consumer
//   std::thread started on first use that exits after 3 s idle, and a handler lock taken once per
//   closure (`AsyncClosureHandler.run`). Python's queue has no flush; `flush()` here is
//   `Queue.join()`, which waits on the same task_done accounting the worker already does.
//
// Both store closures as `std::function<void()>`, as a C++ port naturally would (libstdc++
// allocates for captures over 16 bytes; see B7 for what that costs).

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include <oneapi/tbb/task_group.h>

namespace stepflow_bench {

// --- baseline (a): one TBB task per closure ------------------------------------------------------

class task_per_closure_device {
 public:
  task_per_closure_device() = default;
  ~task_per_closure_device() { group_.wait(); }
  task_per_closure_device(const task_per_closure_device&) = delete;
  task_per_closure_device& operator=(const task_per_closure_device&) = delete;

  /// Owner thread only (like torch's per-device list).
  template <class F>
  void add(F&& f) {
    pending_.emplace_back(std::forward<F>(f));
  }

  /// Queues this step's closures, one task each.
  void run_step_closures() {
    for (std::function<void()>& f : pending_) {
      {
        std::lock_guard lock(queue_mutex_);
        queue_.push_back(std::move(f));
      }
      group_.run([this] { run_oldest(); });
    }
    pending_.clear();
  }

  /// Waits for every queued closure (the caller runs tasks meanwhile, as task_group::wait does).
  void flush() { group_.wait(); }

 private:
  void run_oldest() {
    // The run lock makes the device's closures run one at a time, and popping under it makes
    // them run in the order queued, whichever thread picks up whichever task.
    std::lock_guard run(run_mutex_);
    std::function<void()> f;
    {
      std::lock_guard lock(queue_mutex_);
      f = std::move(queue_.front());
      queue_.pop_front();
    }
    f();
  }

  std::vector<std::function<void()>> pending_;
  std::mutex run_mutex_;
  std::mutex queue_mutex_;
  std::deque<std::function<void()>> queue_;  // guarded by queue_mutex_
  // Isolated, as long-lived groups must be (a bound context attaches to its first user's).
  tbb::task_group_context context_{tbb::task_group_context::isolated};
  tbb::task_group group_{context_};
};

// --- baseline (b): torch._lazy's AsyncClosureHandler, ported ------------------------------------

/// Python's queue.Queue(maxsize): one mutex, three conditions, notify per put and per get.
class python_queue {
 public:
  explicit python_queue(std::size_t maxsize) : maxsize_(maxsize) {}

  void put(std::function<void()>&& item) {
    std::unique_lock lock(mutex_);
    if (maxsize_ > 0) {
      not_full_.wait(lock, [&] { return items_.size() < maxsize_; });
    }
    items_.push_back(std::move(item));
    ++unfinished_tasks_;
    not_empty_.notify_one();
  }

  /// get(block=True, timeout): false on timeout (Python raises queue.Empty).
  bool get(std::function<void()>& out, std::chrono::milliseconds timeout) {
    std::unique_lock lock(mutex_);
    if (!not_empty_.wait_for(lock, timeout, [&] { return !items_.empty(); })) return false;
    out = std::move(items_.front());
    items_.pop_front();
    not_full_.notify_one();
    return true;
  }

  void task_done() {
    std::lock_guard lock(mutex_);
    if (--unfinished_tasks_ == 0) all_tasks_done_.notify_all();
  }

  void join() {
    std::unique_lock lock(mutex_);
    all_tasks_done_.wait(lock, [&] { return unfinished_tasks_ == 0; });
  }

  bool empty() {
    std::lock_guard lock(mutex_);
    return items_.empty();
  }

 private:
  const std::size_t maxsize_;
  std::mutex mutex_;
  std::condition_variable not_empty_;
  std::condition_variable not_full_;
  std::condition_variable all_tasks_done_;
  std::deque<std::function<void()>> items_;
  std::size_t unfinished_tasks_ = 0;
};

class torch_port_device {
 public:
  explicit torch_port_device(std::size_t max_queue_size = 100) : queue_(max_queue_size) {}

  /// Not part of the original (whose non-daemon worker makes process exit wait 3 s, H7): stops
  /// the worker at once so a benchmark does not pay 3 s per run.
  ~torch_port_device() {
    {
      std::lock_guard lock(closure_lock_);
      if (running_) queue_.put(nullptr);  // an empty function: the worker returns
    }
    if (event_loop_.joinable()) event_loop_.join();
  }
  torch_port_device(const torch_port_device&) = delete;
  torch_port_device& operator=(const torch_port_device&) = delete;

  /// add_step_closure(closure, run_async=True): appends to the device's list.
  template <class F>
  void add(F&& f) {
    async_step_closures_.emplace_back(std::forward<F>(f));
  }

  /// The asynchronous half of run_step_closures(): swap the list out, then
  /// AsyncClosureHandler.__call__ -> run(closure) for each closure.
  void run_step_closures() {
    std::vector<std::function<void()>> closures = std::move(async_step_closures_);
    // Lists keep their buffers from step to step (as CPython's free lists would): only the
    // std::function objects themselves are per closure.
    async_step_closures_ = std::move(spare_);
    async_step_closures_.clear();
    for (std::function<void()>& c : closures) run(std::move(c));
    closures.clear();
    spare_ = std::move(closures);
  }

  /// Queue.join(): blocks until every closure put so far has run.
  void flush() { queue_.join(); }

 private:
  // AsyncClosureHandler.run: under the handler lock, put (blocking while full), then start the
  // event loop if it is not running (exception propagation omitted: no closure here throws).
  void run(std::function<void()>&& closure) {
    std::lock_guard lock(closure_lock_);
    queue_.put(std::move(closure));
    if (!running_) {
      if (event_loop_.joinable()) event_loop_.join();  // Python just drops the dead thread
      running_ = true;
      event_loop_ = std::thread([this] { event_loop(); });
    }
  }

  void event_loop() {
    for (;;) {
      std::function<void()> closure;
      if (queue_.get(closure, std::chrono::seconds(3))) {
        if (!closure) return;  // the destructor's stop request (not in the original)
        closure();
        queue_.task_done();
        continue;
      }
      std::lock_guard lock(closure_lock_);  // except EmptyQueue: with self._closure_lock
      if (queue_.empty()) {
        running_ = false;
        return;
      }
    }
  }

  std::vector<std::function<void()>> async_step_closures_;
  std::vector<std::function<void()>> spare_;
  std::mutex closure_lock_;
  python_queue queue_;
  std::thread event_loop_;
  bool running_ = false;  // guarded by closure_lock_ (the thread's is_alive())
};

}  // namespace stepflow_bench
