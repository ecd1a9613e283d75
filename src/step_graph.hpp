#pragma once
// Cross-device ordering: lockstep gates and joined step closures, on a oneTBB flow graph.
//
//   device queues --"step N done"--> continue_node(P predecessors): run step N's joined
//        ^                                closures, advance to step N+1
//        |                                              |
//        +------------ raise lockstep gates <-----------+
//
// A *wave* is a global step. Each participating device signals the join once per wave, when all
// its asynchronous closures of that step (and earlier) ran; the continue_node fires after P
// signals (P = participants, a run-time count) and its body runs the wave's joined closures and
// then, in lockstep mode, lets every device start the next step. Signals for wave N+1 are only
// sent after wave N completed, so one continue_node serves every wave, in order.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include <oneapi/tbb/flow_graph.h>
#include <oneapi/tbb/task_arena.h>
#include <oneapi/tbb/task_group.h>

#include "async_queue.hpp"
#include "closure_observer.hpp"
#include "stepflow/closure.hpp"
#include "stepflow/options.hpp"

namespace stepflow::detail {

class device_state;

/// Totals of joined closures.
struct joined_counts {
  std::uint64_t added = 0;
  std::uint64_t ran = 0;
  std::uint64_t failed = 0;
  std::uint64_t discarded = 0;
};

class step_graph {
 public:
  step_graph(tbb::task_arena& arena, step_ordering ordering, bool measure_run_time,
             trace_recorder* trace);
  /// Precondition: `stop()` was called.
  ~step_graph();
  step_graph(const step_graph&) = delete;
  step_graph& operator=(const step_graph&) = delete;

  /// Makes `device` a participant, unless participation is frozen. Call before the device's
  /// first step end.
  void join(device_state& device);
  /// Freezes participation: the first step end of any device calls it.
  void freeze();
  /// Removes `device` from lockstep and joins: the other devices stop waiting for it.
  /// Returns false when it was not a participant.
  bool retire(const device_state& device);

  /// Attaches `c` to the first global step that not every participant has ended yet.
  void add_joined(closure&& c);
  std::optional<async_failure> take_failure();
  /// As `async_queue::restore_failure`.
  void restore_failure(async_failure&& failure) noexcept;

  /// Waits until the joined closures of every global step that all participants finished have
  /// run. With a deadline: false when it passed first.
  bool wait_for_joined(const std::chrono::steady_clock::time_point* deadline);

  /// Shutdown: lifts every lockstep gate.
  void open_gates() noexcept;
  /// Last global step whose joined closures ran.
  std::uint64_t completed_step() const;
  /// Shutdown: stops the graph for good and joins its tasks.
  void stop() noexcept;
  /// After `stop()` and once nothing can add joined closures any more: destroys the joined
  /// closures that never ran and returns how many, and the unreported failure.
  std::size_t collect_unrun(std::optional<async_failure>& unreported) noexcept;

  joined_counts counts() const;
  const closure_observer& observer() const noexcept { return observer_; }

 private:
  struct participant {
    explicit participant(device_state* d) noexcept : device(d) {}
    device_state* device;
    // Its closures of steps <= done ran. Written by step_done without the lock while the graph
    // is inactive (see there), so atomic; read under the lock.
    std::atomic<std::uint64_t> done{0};
    bool signaled = false;             // signalled the current wave
    std::atomic<bool> retired{false};  // written under the lock, read by release_next_step
  };

  /// Signals collected for the join: how many, and whether they are the wave's last.
  struct signal_batch {
    std::size_t count = 0;
    bool completes_wave = false;
  };

  void step_done(std::size_t index, std::uint64_t step) noexcept;
  void activate_locked();
  signal_batch collect_signals_locked() noexcept;
  void collect_and_send_signals() noexcept;
  void send_signals(signal_batch signals) noexcept;
  void complete_wave(std::uint64_t wave) noexcept;
  void release_next_step(std::uint64_t step) noexcept;
  std::uint64_t min_done_locked() const noexcept;
  bool anyone_left_locked() const noexcept;     // a participant not retired
  bool joined_pending_locked() const noexcept;  // joined closures of waves not completed
  std::size_t discard_all_joined_locked(std::vector<closure>& out) noexcept;

  tbb::task_arena& arena_;
  const step_ordering ordering_;
  closure_observer observer_;

  tbb::task_group_context signal_context_{tbb::task_group_context::isolated};
  tbb::task_group signal_tasks_{signal_context_};
  tbb::task_group_context graph_context_{tbb::task_group_context::isolated};
  // Built inside the arena (a graph runs its tasks in the arena that constructs it) by the
  // constructor; the node on activation, once the number of participants is final.
  std::unique_ptr<tbb::flow::graph> graph_;
  std::unique_ptr<tbb::flow::continue_node<tbb::flow::continue_msg>> join_;

  bool spread_drainers_ = false;          // the arena has more than one worker
  std::atomic<bool> frozen_fast_{false};  // frozen_, readable without the lock
  std::atomic<bool> active_fast_{false};  // active_, readable without the lock
  std::atomic<bool> has_failure_{false};  // failed_, readable without the lock
  mutable std::mutex mutex_;
  std::condition_variable progress_;  // a wave completed
  // Guarded by mutex_:
  std::deque<participant> participants_;  // a deque: participants hold atomics, never move
  bool frozen_ = false;
  bool active_ = false;
  bool stopping_ = false;             // shutdown: no more signals or gates
  std::size_t sending_ = 0;           // collected signal batches not yet enqueued
  std::uint64_t wave_ = 1;            // the wave being joined
  std::uint64_t completed_wave_ = 0;  // joined closures of waves <= this ran
  bool wave_firing_ = false;          // wave_'s signals are all collected; it has not completed
  std::map<std::uint64_t, std::vector<closure>> joined_;
  std::exception_ptr failure_;
  bool failed_ = false;
  std::size_t discarded_since_failure_ = 0;
  joined_counts counts_;
};

}  // namespace stepflow::detail
