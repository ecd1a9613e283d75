#include "step_graph.hpp"

#include <algorithm>
#include <limits>
#include <utility>

#include "atomic_max.hpp"
#include "device_state.hpp"
#include "start_task.hpp"
#include "thread_frames.hpp"

namespace stepflow::detail {
namespace {

// The step graph whose wave this thread is releasing (release_next_step): the step-done reports
// of the devices it drains meanwhile only record `done`, and it collects their signals once.
thread_local const step_graph* releasing_wave = nullptr;

}  // namespace

step_graph::step_graph(tbb::task_arena& arena, step_ordering ordering, bool measure_run_time,
                       trace_recorder* trace)
    : arena_(arena), ordering_(ordering) {
  observer_.measure_run_time = measure_run_time;
  if (trace != nullptr) {
    observer_.trace = trace;
    observer_.track = trace->track("joined", trace_recorder::track_kind::joined);
  }
  // The graph is built inside stepflow's arena, so that its tasks run there, with an isolated
  // context, so that nothing outside (a user's graph or pipeline being cancelled) can cancel
  // it. Built here, not on activation: entering the arena waits for a free slot, and on
  // activation (under mutex_) the slot may be held by a drainer waiting for mutex_.
  execute_in_arena(arena_, [&] {
    // With one worker there is nobody to hand a wave's drainers to (see release_next_step).
    spread_drainers_ = tbb::this_task_arena::max_concurrency() > 1;
    graph_ = std::make_unique<tbb::flow::graph>(graph_context_);
  });
}

step_graph::~step_graph() = default;

void step_graph::join(device_state& device) {
  std::size_t index;
  {
    std::lock_guard lock(mutex_);
    if (frozen_) return;
    index = participants_.size();
    participants_.emplace_back(&device);
  }
  // Outside mutex_: set_step_listener takes the queue's lock.
  device.queue().set_step_listener([this, index](std::uint64_t step) { step_done(index, step); });
  if (ordering_ == step_ordering::lockstep) device.queue().start_gated(1);
}

void step_graph::freeze() {
  if (frozen_fast_.load(std::memory_order_acquire)) return;  // every step end calls this
  signal_batch signals;
  {
    std::lock_guard lock(mutex_);
    if (frozen_) return;
    frozen_ = true;
    frozen_fast_.store(true, std::memory_order_release);
    if (ordering_ == step_ordering::lockstep || !joined_.empty()) {
      activate_locked();
      signals = collect_signals_locked();
    }
  }
  send_signals(signals);
}

bool step_graph::retire(const device_state& device) {
  signal_batch signals;
  device_state* retired = nullptr;
  {
    std::lock_guard lock(mutex_);
    for (participant& p : participants_) {
      if (p.device == &device && !p.retired) {
        p.retired.store(true, std::memory_order_relaxed);
        retired = p.device;
      }
    }
    if (retired == nullptr) return false;
    signals = collect_signals_locked();
  }
  send_signals(signals);
  retired->queue().set_gate(async_queue::no_gate);
  progress_.notify_all();
  return true;
}

void step_graph::activate_locked() {
  // First: if it throws (std::bad_alloc), the graph stays inactive rather than active without a
  // node.
  const auto predecessors = static_cast<int>(participants_.size());
  // No arena needed here: the graph (built in the constructor) spawns the node's tasks in its own.
  // One node, one graph task per wave: it fires once every participant signalled the wave,
  // and its body runs the wave's joined closures and raises the gates. Waves cannot overlap
  // or reorder: the signals of wave N+1 are only collected once complete_wave(N) advanced
  // `wave_`, so no sequencer or serial node is needed behind it (with them a lockstep wave
  // cost three graph tasks).
  join_ = std::make_unique<tbb::flow::continue_node<tbb::flow::continue_msg>>(
      *graph_, predecessors, [this](const tbb::flow::continue_msg&) {
        tsan_acquire(&tsan_task_handoff_key);  // the put that fired it (send_signals)
        tasks_waiting_for_a_worker.fetch_sub(1, std::memory_order_relaxed);
        waves_waiting_for_a_worker.fetch_sub(1, std::memory_order_relaxed);
        const own_task_scope own(arena_);
        std::uint64_t wave = 0;
        {
          std::lock_guard lock(mutex_);
          wave = wave_;
        }
        complete_wave(wave);
        return tbb::flow::continue_msg();
      });
  active_ = true;
  // Before reading `done`: pairs with step_done, which writes `done` before it reads this.
  active_fast_.store(true);
  std::uint64_t min_done = min_done_locked();
  if (min_done == std::numeric_limits<std::uint64_t>::max()) min_done = 0;
  wave_ = min_done + 1;
  completed_wave_ = min_done;
  // A step's signal must go out before the device's next batch runs, not while it runs: that
  // batch could be long, or wait for the step's joined closure.
  for (participant& p : participants_) p.device->queue().report_steps_before_next_batch();
}

void step_graph::step_done(std::size_t index, std::uint64_t step) noexcept {
  // Every step end of a participant gets here. Until a joined closure or lockstep activates the
  // graph, nothing waits on `done`, so the common per-device case takes no lock: it publishes
  // `done` and checks `active_fast_`; activation sets that flag, then reads `done` (both
  // sequentially consistent, so one side sees the other). Participants are fixed by now (the
  // first step end froze them). Two threads may report one queue's steps at once, out of order
  // (async_queue::set_step_listener): `done` keeps the largest.
  participant& p = participants_[index];
  raise_to(p.done, step);
  if (!active_fast_.load() || releasing_wave == this) return;
  collect_and_send_signals();
}

void step_graph::collect_and_send_signals() noexcept {
  signal_batch signals;
  {
    std::lock_guard lock(mutex_);
    signals = collect_signals_locked();
  }
  send_signals(signals);
  progress_.notify_all();
}

step_graph::signal_batch step_graph::collect_signals_locked() noexcept {
  if (!active_ || stopping_) return {};
  // With every participant retired nobody is waited for: a wave with joined closures left
  // completes at once (its retired participants signal it below), but without any, nothing is
  // collected, or waves would follow each other forever.
  if (!anyone_left_locked() && !joined_pending_locked()) return {};
  signal_batch signals;
  signals.completes_wave = true;
  for (participant& p : participants_) {
    if (!p.signaled && (p.retired || p.done.load() >= wave_)) {
      p.signaled = true;
      ++signals.count;
    }
    signals.completes_wave = signals.completes_wave && p.signaled;
  }
  // Counted until sent, so that shutdown can wait for signals collected before it began.
  if (signals.count != 0) ++sending_;
  if (signals.count != 0 && signals.completes_wave) wave_firing_ = true;
  return signals;
}

bool step_graph::joined_pending_locked() const noexcept {
  // Keys only grow past wave_ (add_joined never picks a wave already taken), but a stale one
  // must not make waves without closures follow each other forever.
  return !joined_.empty() && joined_.rbegin()->first >= wave_;
}

bool step_graph::anyone_left_locked() const noexcept {
  return std::any_of(participants_.begin(), participants_.end(),
                     [](const participant& p) { return !p.retired; });
}

void step_graph::send_signals(signal_batch signals) noexcept {
  if (signals.count == 0) return;
  // The wave's graph task, from the put that completes the wave until its body starts: a
  // lingering drainer must not hold the worker it waits for.
  if (signals.completes_wave) {
    tasks_waiting_for_a_worker.fetch_add(1, std::memory_order_relaxed);
    waves_waiting_for_a_worker.fetch_add(1, std::memory_order_relaxed);
  }
  const auto put = [this, count = signals.count]() noexcept {
    for (std::size_t i = 0; i < count; ++i) join_->try_put(tbb::flow::continue_msg());
  };
  if (in_own_task(arena_)) {
    // On one of stepflow's own tasks in the arena (a drainer, the previous wave): put directly,
    // the node's task is spawned into this thread's deque (and may be stolen: the hand-over is
    // announced to TSan). In a fresh isolation region, for the reason start_task gives.
    tsan_release(&tsan_task_handoff_key);
    tbb::this_task_arena::isolate(put);
  } else {
    // From any other thread a put would spawn the node's task where no worker may ever look (a
    // process with one oneTBB thread); an enqueued task always gets a thread, and the graph task
    // it spawns then runs on that thread.
    start_task(arena_, signal_tasks_, put);
  }
  std::lock_guard lock(mutex_);
  --sending_;
  if (stopping_) progress_.notify_all();
}

void step_graph::complete_wave(std::uint64_t wave) noexcept {
  std::vector<closure> todo;
  {
    std::lock_guard lock(mutex_);
    auto node = joined_.extract(wave);
    if (!node.empty()) todo = std::move(node.mapped());
  }
  // Most waves have no joined closure: then no clock reads for the observer.
  if (!todo.empty()) {
    async_frame frame;  // like an asynchronous closure: never blocks on a full queue
    joined_step_frame step(wave);
    observed_batch observed(observer_, closure_kind::joined, wave);
    const user_code_scope user_code;
    for (std::size_t i = 0; i < todo.size(); ++i) {
      std::exception_ptr error;
      observed.run(todo[i], error);
      todo[i].reset();
      std::vector<closure> behind;
      const bool failed = static_cast<bool>(error);
      {
        std::lock_guard lock(mutex_);
        ++counts_.ran;
        if (error) {
          ++counts_.failed;
          failure_ = std::move(error);
          failed_ = true;
          has_failure_.store(true);
          const std::size_t later = discard_all_joined_locked(behind);
          discarded_since_failure_ += todo.size() - i - 1 + later;
          counts_.discarded += todo.size() - i - 1 + later;
        }
      }
      if (failed) break;  // fail-stop: the rest were discarded above
    }
  }
  {
    // Destroys the closures discarded behind a failure, outside the lock. Their destructors are
    // user code, like their calls above.
    const user_code_scope user_code;
    todo.clear();
  }
  signal_batch signals;
  bool release = false;
  {
    std::lock_guard lock(mutex_);
    completed_wave_ = wave;
    wave_ = wave + 1;
    wave_firing_ = false;
    for (participant& p : participants_) p.signaled = false;
    signals = collect_signals_locked();
    release = ordering_ == step_ordering::lockstep && !stopping_;
  }
  progress_.notify_all();
  send_signals(signals);
  if (release) release_next_step(wave + 1);
  tsan_release(&tsan_task_handoff_key);  // joined by shutdown's wait_for_all
}

void step_graph::release_next_step(std::uint64_t step) noexcept {
  // The next step may start on every device only now, after the joined closures ran. This thread
  // then runs the released closures itself instead of starting a drainer task per device: a step
  // of a few closures costs less to run than a task costs to start, and the devices' step-done
  // signals then start the next wave from this thread too. With other workers in the arena, all
  // but one device get spawned drainer tasks, which idle workers steal, so that devices still
  // drain in parallel. A device whose drain role is taken (a producer waiting for room drains it,
  // a lingering drainer woke) is left to its holder.
  //
  // All gates rise first: while this thread runs one device's closures (which may wait for
  // another device's), a producer waiting on another device drains it itself after the grace
  // period (async_queue::set_gate_for_caller), as it would with a task that does not start.
  // The steps drained here are collected for the join once, at the end, rather than device by
  // device: each collection takes the lock twice and puts into the graph.
  //
  // Participants are fixed once the graph is active, so they are read without the lock; one
  // retired meanwhile keeps its open gate (gates only rise) and merely gets drained here.
  device_state* last = nullptr;
  for (participant& p : participants_) {
    if (!p.retired.load(std::memory_order_relaxed)) last = p.device;
  }
  if (last == nullptr) return;
  const std::uint64_t now = trace_recorder::now_ns();
  for (participant& p : participants_) {
    // One retired since the loop above has its gate open for good already.
    if (p.retired.load(std::memory_order_relaxed)) continue;
    if (spread_drainers_ && p.device != last) {
      p.device->queue().set_gate(step);
    } else {
      p.device->queue().set_gate_for_caller(step, now);
    }
  }
  releasing_wave = this;
  for (participant& p : participants_) {
    // Also one retired since the loop above: it must not keep the promise of a drain.
    if (!spread_drainers_ || p.device == last) p.device->queue().drain_here();
  }
  releasing_wave = nullptr;
  collect_and_send_signals();
}

std::size_t step_graph::discard_all_joined_locked(std::vector<closure>& out) noexcept {
  std::size_t n = 0;
  for (auto& [wave, closures] : joined_) {
    for (closure& c : closures) {
      out.push_back(std::move(c));
      ++n;
    }
  }
  joined_.clear();
  return n;
}

std::uint64_t step_graph::min_done_locked() const noexcept {
  std::uint64_t min_done = std::numeric_limits<std::uint64_t>::max();
  for (const participant& p : participants_) {
    if (!p.retired) min_done = std::min(min_done, p.done.load());
  }
  return min_done;
}

void step_graph::add_joined(closure&& c) {
  signal_batch signals;
  closure discarded;
  {
    std::lock_guard lock(mutex_);
    ++counts_.added;
    if (failed_) {
      // Behind an unreported failure: discarded with it.
      ++discarded_since_failure_;
      ++counts_.discarded;
      discarded = std::move(c);
    } else {
      std::uint64_t step = 1;
      std::uint64_t min_steps = std::numeric_limits<std::uint64_t>::max();
      for (const participant& p : participants_) {
        if (!p.retired) min_steps = std::min(min_steps, p.device->step());
      }
      if (min_steps != std::numeric_limits<std::uint64_t>::max()) {
        step = min_steps + 1;
      } else if (!joined_.empty()) {
        // Every participant retired: behind the joined closures added before, in add order.
        step = joined_.rbegin()->first;
      }
      // Not a wave whose joined closures were taken already: one added from inside them (with
      // every participant retired, nothing else keeps it from the running wave).
      if (active_) step = std::max(step, wave_firing_ ? wave_ + 1 : wave_);
      joined_[step].push_back(std::move(c));
      if (frozen_ && !active_ && !stopping_) {
        activate_locked();
        signals = collect_signals_locked();
      } else if (active_ && !anyone_left_locked()) {
        // Every participant retired: no step end will collect the signals for it.
        signals = collect_signals_locked();
      }
    }
  }
  send_signals(signals);
}

std::optional<async_failure> step_graph::take_failure() {
  if (!has_failure_.load()) return std::nullopt;  // every step end calls this
  std::lock_guard lock(mutex_);
  if (!failed_) return std::nullopt;
  has_failure_.store(false);
  async_failure f{std::move(failure_), discarded_since_failure_};
  failure_ = nullptr;
  failed_ = false;
  discarded_since_failure_ = 0;
  return f;
}

void step_graph::restore_failure(async_failure&& failure) noexcept {
  std::lock_guard lock(mutex_);
  failure_ = std::move(failure.error);
  failed_ = true;
  discarded_since_failure_ += failure.discarded;
  has_failure_.store(true);
}

bool step_graph::wait_for_joined(const std::chrono::steady_clock::time_point* deadline) {
  std::unique_lock lock(mutex_);
  if (!active_) return true;
  const std::uint64_t target = min_done_locked();  // the maximum when nobody is left
  // Or every participant retired (now or meanwhile): then no wave completes without joined
  // closures, so the target may never be reached; done once no joined closure is left or running.
  const auto done = [&] {
    return completed_wave_ >= target ||
           (!anyone_left_locked() && !joined_pending_locked() && !wave_firing_);
  };
  if (deadline == nullptr) {
    progress_.wait(lock, done);
    return true;
  }
  return progress_.wait_until(lock, *deadline, done);
}

void step_graph::open_gates() noexcept {
  std::vector<device_state*> all;
  {
    std::lock_guard lock(mutex_);
    for (const participant& p : participants_) all.push_back(p.device);
  }
  for (device_state* d : all) d->queue().set_gate(async_queue::no_gate);
}

std::uint64_t step_graph::completed_step() const {
  std::lock_guard lock(mutex_);
  return completed_wave_;
}

void step_graph::stop() noexcept {
  {
    // From now on no signal is collected, no gate raised and no graph built; once the signals
    // collected before are enqueued and the tasks below are joined, no task of the graph can
    // run again. Joined closures that ran meanwhile may have queued device work: the caller
    // drains the devices again afterwards.
    std::unique_lock lock(mutex_);
    stopping_ = true;
    progress_.wait(lock, [this] { return sending_ == 0; });
  }
  try {
    // Joined: signal tasks release the hand-over key at their end (start_task), graph bodies
    // too, and execute_in_arena acquires it after the wait.
    execute_in_arena(arena_, [this] {
      signal_tasks_.wait();
      if (graph_) graph_->wait_for_all();
    });
  } catch (...) {
    // Graph bodies and signal tasks catch everything; nothing to report.
  }
}

std::size_t step_graph::collect_unrun(std::optional<async_failure>& unreported) noexcept {
  std::vector<closure> never_run;
  std::size_t count;
  {
    std::lock_guard lock(mutex_);
    count = discard_all_joined_locked(never_run);
  }
  never_run.clear();
  unreported = take_failure();
  return count;
}

joined_counts step_graph::counts() const {
  std::lock_guard lock(mutex_);
  return counts_;
}

}  // namespace stepflow::detail
