// B2 (issue 5): asynchronous closures end to end. One iteration: `total` closures added
// `per_step` at a time, a step end after each group, then flush(): the time covers adding,
// handing over, running every closure on the worker(s) and waiting for the last one. The
// scheduler (or baseline device) is built once, outside the timed loop; the queue is bounded at
// 100 closures, torch._lazy's default.
//
// Baselines (bench/baselines.hpp): (a) one tbb::task_group::run per closure with a per-device
// FIFO; (b) a C++ port of torch._lazy's AsyncClosureHandler (mutex + deque + condition
// variables, bounded at 100, one consumer std::thread).
//
// Target: stepflow >= 30x faster than (a) and than (b), and <= 10 ns per closure end to end.
//
// B2_async/stepflow_run_time (not a target): stepflow with `options::measure_run_time` on (off by
// default), beside the default, for what the run-time metrics cost (docs/benchmarks.md, "Metrics
// overhead").
//
// B2_loaded (not a target): the same 48-byte rows while one busy thread per CPU competes for the
// CPUs, as data-loading processes or a build beside a training loop would. It shows how each
// design degrades when no CPU is free (stepflow's waits spin only while a CPU is).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

#include "baselines.hpp"
#include "bench_support.hpp"
#include "stepflow/stepflow.hpp"

namespace {

using namespace stepflow_bench;

constexpr std::size_t queue_bound = 100;

/// Other work that keeps every CPU busy while it lives: one thread per CPU in a loop that never
/// yields or sleeps.
class busy_cpus {
 public:
  busy_cpus() {
    const unsigned cpus = std::max(1u, std::thread::hardware_concurrency());
    for (unsigned i = 0; i < cpus; ++i) {
      threads_.emplace_back([this] {
        while (!stop_.load(std::memory_order_relaxed)) {
        }
      });
    }
  }
  ~busy_cpus() {
    stop_.store(true, std::memory_order_relaxed);
    for (std::thread& t : threads_) t.join();
  }
  busy_cpus(const busy_cpus&) = delete;
  busy_cpus& operator=(const busy_cpus&) = delete;

 private:
  std::atomic<bool> stop_{false};
  std::vector<std::thread> threads_;
};

/// Runs `bench(state)` with every CPU kept busy by other threads.
template <void (*Bench)(benchmark::State&)>
void loaded(benchmark::State& state) {
  const busy_cpus load;
  Bench(state);
}

/// Runs the B2 loop on any device type with add(f) / run_step_closures() / flush().
template <std::size_t Bytes, class AddOne, class EndStep, class Flush>
void run_async_loop(benchmark::State& state, sink& s, AddOne add_one, EndStep end_step,
                    Flush flush) {
  const auto per_step = static_cast<std::uint64_t>(state.range(1));
  const auto total = static_cast<std::uint64_t>(state.range(2));
  const std::uint64_t steps = total / per_step;
  const work<Bytes> w = make_work<Bytes>(s);

  // Warm-up: a few hundred steps reach steady state (buffers, worker awake, pools).
  for (int step = 0; step < 200; ++step) {
    for (std::uint64_t i = 0; i < per_step; ++i) add_one(w);
    end_step();
  }
  flush();
  const std::uint64_t warm = s.get() / 2;

  closure_timer timer;
  timer.start();
  for (auto _ : state) {
    for (std::uint64_t step = 0; step < steps; ++step) {
      for (std::uint64_t i = 0; i < per_step; ++i) add_one(w);
      end_step();
    }
    flush();
  }
  timer.stop();
  const std::uint64_t closures = static_cast<std::uint64_t>(state.iterations()) * steps * per_step;
  timer.report(state, closures);
  check_sink(state, s, warm + closures);
}

template <bool MeasureRunTime = false>
void async_stepflow(benchmark::State& state) {
  with_capture(state, state.range(0), [&]<std::size_t Bytes>() {
    stepflow::options opts;
    opts.max_queue_size = static_cast<std::size_t>(state.range(3));
    opts.measure_run_time = MeasureRunTime;
    stepflow::scheduler sched(opts);
    stepflow::device_context& dev = sched.device("bench");
    sink s;
    run_async_loop<Bytes>(
        state, s, [&](const work<Bytes>& w) { dev.add_step_closure(stepflow::run_async, w); },
        [&] { dev.run_step_closures(); }, [&] { dev.flush(); });
  });
}

void async_task_per_closure(benchmark::State& state) {
  with_capture(state, state.range(0), [&]<std::size_t Bytes>() {
    task_per_closure_device dev;
    sink s;
    run_async_loop<Bytes>(
        state, s, [&](const work<Bytes>& w) { dev.add(w); }, [&] { dev.run_step_closures(); },
        [&] { dev.flush(); });
  });
}

void async_torch_port(benchmark::State& state) {
  with_capture(state, state.range(0), [&]<std::size_t Bytes>() {
    torch_port_device dev(static_cast<std::size_t>(state.range(3)));
    sink s;
    run_async_loop<Bytes>(
        state, s, [&](const work<Bytes>& w) { dev.add(w); }, [&] { dev.run_step_closures(); },
        [&] { dev.flush(); });
  });
}

void loaded_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"capture", "per_step", "total", "bound"});
  b->Args({48, 100, 1'000'000, queue_bound});
  b->UseRealTime()->Unit(benchmark::kMillisecond)->Iterations(1);
}

void async_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"capture", "per_step", "total", "bound"});
  for (std::int64_t capture : {16, 48}) b->Args({capture, 100, 1'000'000, queue_bound});
  b->UseRealTime()->Unit(benchmark::kMillisecond);
}

// Diagnosis, not targets:
// - the same with a bound of 10 steps instead of 1, showing what the bound itself costs when a
//   step is as large as the queue;
// - the same 1e6 closures in steps of 10, 1,000 and 10,000 (bound: one step, at least 100), which
//   splits B2's cost into a part per step (the hand-over between the two threads) and a part
//   per closure (docs/benchmarks.md, "B2: bytes across cores").
void async_args_diagnosis(benchmark::internal::Benchmark* b) {
  async_args(b);
  b->Args({48, 100, 1'000'000, 10 * queue_bound});
  for (std::int64_t capture : {16, 48}) {
    for (std::int64_t per_step : {10, 1'000, 10'000}) {
      b->Args({capture, per_step, 1'000'000, std::max<std::int64_t>(per_step, queue_bound)});
    }
  }
}

}  // namespace

BENCHMARK(async_stepflow)->Name("B2_async/stepflow")->Apply(async_args_diagnosis);
BENCHMARK(async_stepflow<true>)->Name("B2_async/stepflow_run_time")->Apply(async_args);
// One iteration of a baseline takes 0.3-0.6 s: a single iteration per repetition is plenty.
BENCHMARK(async_task_per_closure)
    ->Name("B2_async/tbb_task_per_closure")
    ->Apply(async_args)
    ->Iterations(1);
BENCHMARK(async_torch_port)->Name("B2_async/torch_port")->Apply(async_args)->Iterations(1);
// Under load one iteration each: the slowest took seconds before stepflow stopped spinning there.
BENCHMARK(loaded<async_stepflow<>>)->Name("B2_loaded/stepflow")->Apply(loaded_args);
BENCHMARK(loaded<async_task_per_closure>)
    ->Name("B2_loaded/tbb_task_per_closure")
    ->Apply(loaded_args);
BENCHMARK(loaded<async_torch_port>)->Name("B2_loaded/torch_port")->Apply(loaded_args);

STEPFLOW_BENCHMARK_MAIN();
