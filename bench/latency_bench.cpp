// B5 (issue 5): latency from the step end (the moment run_step_closures() is called) to the start
// of the step's first asynchronous closure. Each step adds 10 asynchronous closures; the first
// one stamps the steady clock when it starts. Steps come on a fixed period:
//
// - period 50 us, the training thread busy-waiting in between ("computing"): the worker has
//   barely finished the last step's closures, so it should still be awake;
// - period 2000 us, busy-waiting: the worker has gone to sleep, the producer's core is busy;
// - period 2000 us, the training thread sleeping in between (blocked on its device): both cores
//   are idle when the step ends.
//
// One iteration is one run of `steps` steps; p50/p90/p99/max are computed here over its steps
// and reported as counters in ns (Google Benchmark then takes the median over repetitions).
// Baselines: (a) one TBB task per closure, (b) the torch._lazy port (a condition variable wakes
// its consumer thread).
//
// Floors (not schedulers, no queue, no closures beyond the stamp): what the machine itself takes
// to get a step's end noticed by another thread. `wake_floor`: one thread blocked in a futex,
// woken by the step end (what any design pays whose idle thread sleeps); `spin_floor`: one
// thread spinning with `pause` on the step counter, never sleeping (what a design pays that
// keeps a CPU busy for it). They bound what the targets can ask of this machine.
//
// Target: p99 <= 5 us at a 50 us period (worker awake), <= 60 us at a few ms (worker asleep).

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "baselines.hpp"
#include "bench_support.hpp"
#include "stepflow/stepflow.hpp"

namespace {

using namespace stepflow_bench;

constexpr std::size_t queue_bound = 100;
constexpr int closures_per_step = 10;
constexpr std::int64_t warm_up_ns = 300'000'000;

enum gap_mode : std::int64_t { spin = 0, sleep = 1 };

/// The first closure of a step: stamps when it started.
struct stamp {
  std::int64_t* slot;
  void operator()() const noexcept { *slot = now_ns(); }
};

// STEPFLOW_BENCH_LATENCY_DUMP=<file>: every step's end time and latency (ns), one step a line in
// step order, of the last iteration run (give a filter that selects one benchmark). Whether slow
// steps come alone or in runs says what made them slow: scripts/latency_runs.py reads it.
void dump_latencies(const std::vector<std::int64_t>& ended,
                    const std::vector<std::int64_t>& started) {
  const char* path = std::getenv("STEPFLOW_BENCH_LATENCY_DUMP");
  if (path == nullptr) return;
  std::ofstream out(path);
  for (std::size_t i = 0; i < ended.size(); ++i) {
    out << ended[i] << ' ' << started[i] - ended[i] << '\n';
  }
}

template <class AddStamp, class AddWork, class EndStep, class Flush>
void run_latency_loop(benchmark::State& state, sink& s, AddStamp add_stamp, AddWork add_work,
                      EndStep end_step, Flush flush) {
  const std::int64_t period_ns = state.range(0) * 1000;
  const auto mode = static_cast<gap_mode>(state.range(1));
  const auto steps = static_cast<std::size_t>(state.range(2));
  const work<16> w = make_work<16>(s);

  std::vector<std::int64_t> ended(steps);
  std::vector<std::int64_t> started(steps);
  std::vector<std::int64_t> latencies;
  latencies.reserve(steps * static_cast<std::size_t>(state.max_iterations));

  // Warm-up: steps at the same period for at least 300 ms. Threads created at the first step
  // end (oneTBB creates its workers then) can start on the training thread's CPU and stay
  // there, runnable, for ~100-150 ms until the kernel moves them to the idle CPU; meanwhile a
  // closure waits for the 4 ms scheduler tick (measured here: with 20 warm-up steps, the first
  // ~45-80 steps of stepflow's 2 ms run waited 0.3-3.6 ms when it ran first in the process).
  {
    std::int64_t warm_stamp = 0;
    const std::int64_t warm_until = now_ns() + warm_up_ns;
    for (int i = 0; i < 20 || now_ns() < warm_until; ++i) {
      spin_until(now_ns() + period_ns);
      add_stamp(stamp{&warm_stamp});
      end_step();
    }
    flush();
  }

  std::uint64_t closures = 0;
  for (auto _ : state) {
    std::int64_t next = now_ns() + period_ns;
    for (std::size_t i = 0; i < steps; ++i) {
      if (mode == spin) {
        spin_until(next);
      } else {
        std::this_thread::sleep_until(clock_type::time_point(std::chrono::nanoseconds(next)));
      }
      next += period_ns;
      add_stamp(stamp{&started[i]});
      for (int k = 1; k < closures_per_step; ++k) add_work(w);
      ended[i] = now_ns();
      end_step();
    }
    flush();
    for (std::size_t i = 0; i < steps; ++i) latencies.push_back(started[i] - ended[i]);
    dump_latencies(ended, started);
    closures += steps * closures_per_step;
  }
  std::sort(latencies.begin(), latencies.end());
  state.counters["p50_ns"] = percentile(latencies, 50);
  state.counters["p90_ns"] = percentile(latencies, 90);
  state.counters["p99_ns"] = percentile(latencies, 99);
  state.counters["max_ns"] = latencies.empty() ? 0.0 : static_cast<double>(latencies.back());
  state.counters["samples"] = static_cast<double>(latencies.size());
  state.SetItemsProcessed(static_cast<std::int64_t>(latencies.size()));
  // Every closure but the stamps adds 2 to the sink (the warm-up adds only stamps).
  check_sink(state, s, closures / closures_per_step * (closures_per_step - 1));
}

void run_latency_stepflow(benchmark::State& state, std::chrono::microseconds linger) {
  stepflow::options opts;
  opts.max_queue_size = queue_bound;
  opts.worker_linger = linger;
  stepflow::scheduler sched(opts);
  stepflow::device_context& dev = sched.device("bench");
  sink s;
  run_latency_loop(
      state, s, [&](stamp st) { dev.add_step_closure(stepflow::run_async, st); },
      [&](const work<16>& w) { dev.add_step_closure(stepflow::run_async, w); },
      [&] { dev.run_step_closures(); }, [&] { dev.flush(); });
}

void latency_stepflow(benchmark::State& state) {
  run_latency_stepflow(state, stepflow::options{}.worker_linger);
}

/// stepflow told to keep its worker watching for longer than the 2 ms step period
/// (options::worker_linger = 5 ms), so that the worker does not go to sleep between steps: what
/// a user who gives a CPU to polling gets in the regimes where the worker would otherwise sleep.
void latency_stepflow_lingering(benchmark::State& state) {
  run_latency_stepflow(state, std::chrono::milliseconds(5));
}

/// The baselines and floors: add(callable), run_step_closures(), flush().
template <class Device>
void run_latency_loop_on(benchmark::State& state, Device& dev) {
  sink s;
  run_latency_loop(
      state, s, [&](stamp st) { dev.add(st); }, [&](const work<16>& w) { dev.add(w); },
      [&] { dev.run_step_closures(); }, [&] { dev.flush(); });
}

void latency_task_per_closure(benchmark::State& state) {
  task_per_closure_device dev;
  run_latency_loop_on(state, dev);
}

void latency_torch_port(benchmark::State& state) {
  torch_port_device dev(queue_bound);
  run_latency_loop_on(state, dev);
}

#if defined(__linux__)
/// The floors' "device": a thread that waits for step ends and stamps each step's stamp, either
/// blocked in a futex (woken by every step end, as a sleeping worker is) or spinning. Steps it
/// finds together (it was slower than the period) all get the same start time.
class bare_handoff_device {
 public:
  enum class waiting { futex, spin };

  explicit bare_handoff_device(waiting how) : how_(how), waiter_([this] { wait_loop(); }) {}
  ~bare_handoff_device() {
    stop_.store(true, std::memory_order_relaxed);
    publish(ended_.load(std::memory_order_relaxed) + 1);
    waiter_.join();
  }
  bare_handoff_device(const bare_handoff_device&) = delete;
  bare_handoff_device& operator=(const bare_handoff_device&) = delete;

  void add(stamp st) noexcept {
    const std::uint32_t step = ended_.load(std::memory_order_relaxed);  // the step being added
    // Never waits at these periods; keeps a stalled waiter's stamp slot from being reused.
    while (step - stamped_.load(std::memory_order_acquire) >= ring) __builtin_ia32_pause();
    stamps_[step % ring] = st;
  }
  // The work closures are not what is measured: run inline, for the sink check only.
  void add(const work<16>& w) noexcept { w(); }
  void run_step_closures() noexcept { publish(ended_.load(std::memory_order_relaxed) + 1); }
  void flush() noexcept {
    while (stamped_.load(std::memory_order_acquire) != ended_.load(std::memory_order_relaxed)) {
      __builtin_ia32_pause();
    }
  }

 private:
  static constexpr std::uint32_t ring = 1024;

  void publish(std::uint32_t step) noexcept {
    ended_.store(step, std::memory_order_release);
    if (how_ == waiting::futex) futex(FUTEX_WAKE_PRIVATE, 1);
  }
  void futex(int op, std::uint32_t value) noexcept {
    syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&ended_), op, value, nullptr, nullptr, 0);
  }
  void wait_loop() noexcept {
    std::uint32_t seen = 0;
    for (;;) {
      std::uint32_t now_ended = ended_.load(std::memory_order_acquire);
      while (now_ended == seen) {
        if (how_ == waiting::futex) {
          futex(FUTEX_WAIT_PRIVATE, seen);
        } else {
          __builtin_ia32_pause();
        }
        now_ended = ended_.load(std::memory_order_acquire);
      }
      if (stop_.load(std::memory_order_relaxed)) return;
      for (; seen != now_ended; ++seen) stamps_[seen % ring]();
      stamped_.store(seen, std::memory_order_release);
    }
  }

  const waiting how_;
  std::array<stamp, ring> stamps_{};
  alignas(64) std::atomic<std::uint32_t> ended_{0};
  alignas(64) std::atomic<std::uint32_t> stamped_{0};
  std::atomic<bool> stop_{false};
  std::thread waiter_;
};
static_assert(sizeof(std::atomic<std::uint32_t>) == sizeof(std::uint32_t));

template <bare_handoff_device::waiting How>
void latency_floor(benchmark::State& state) {
  bare_handoff_device dev(How);
  run_latency_loop_on(state, dev);
}
#endif

void latency_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"period_us", "gap", "steps"});
  b->Args({50, spin, 20'000});    // worker awake: 1 s per run
  b->Args({2000, spin, 1'000});   // worker asleep, training thread busy: 2 s per run
  b->Args({2000, sleep, 1'000});  // worker asleep, training thread asleep: 2 s per run
  b->Iterations(1)->UseRealTime()->Unit(benchmark::kMillisecond);
}

void asleep_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"period_us", "gap", "steps"});
  b->Args({2000, spin, 1'000});
  b->Args({2000, sleep, 1'000});
  b->Iterations(1)->UseRealTime()->Unit(benchmark::kMillisecond);
}

}  // namespace

BENCHMARK(latency_stepflow)->Name("B5_latency/stepflow")->Apply(latency_args);
BENCHMARK(latency_stepflow_lingering)->Name("B5_latency/stepflow_linger_5ms")->Apply(asleep_args);
BENCHMARK(latency_task_per_closure)->Name("B5_latency/tbb_task_per_closure")->Apply(latency_args);
BENCHMARK(latency_torch_port)->Name("B5_latency/torch_port")->Apply(latency_args);
#if defined(__linux__)
BENCHMARK(latency_floor<bare_handoff_device::waiting::futex>)
    ->Name("B5_latency/wake_floor")
    ->Apply(latency_args);
BENCHMARK(latency_floor<bare_handoff_device::waiting::spin>)
    ->Name("B5_latency/spin_floor")
    ->Apply(latency_args);
#endif

STEPFLOW_BENCHMARK_MAIN();
