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
// Target: p99 <= 5 us at a 50 us period (worker awake), <= 60 us at a few ms (worker asleep).

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <thread>
#include <vector>

#include "baselines.hpp"
#include "bench_support.hpp"
#include "stepflow/stepflow.hpp"

namespace {

using namespace stepflow_bench;

constexpr std::size_t queue_bound = 100;
constexpr int closures_per_step = 10;

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

  // Warm-up: a few steps at the same period.
  {
    std::int64_t warm_stamp = 0;
    for (int i = 0; i < 20; ++i) {
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

void latency_stepflow(benchmark::State& state) {
  stepflow::options opts;
  opts.max_queue_size = queue_bound;
  stepflow::scheduler sched(opts);
  stepflow::device_context& dev = sched.device("bench");
  sink s;
  run_latency_loop(
      state, s, [&](stamp st) { dev.add_step_closure(stepflow::run_async, st); },
      [&](const work<16>& w) { dev.add_step_closure(stepflow::run_async, w); },
      [&] { dev.run_step_closures(); }, [&] { dev.flush(); });
}

void latency_task_per_closure(benchmark::State& state) {
  task_per_closure_device dev;
  sink s;
  run_latency_loop(
      state, s, [&](stamp st) { dev.add(st); }, [&](const work<16>& w) { dev.add(w); },
      [&] { dev.run_step_closures(); }, [&] { dev.flush(); });
}

void latency_torch_port(benchmark::State& state) {
  torch_port_device dev(queue_bound);
  sink s;
  run_latency_loop(
      state, s, [&](stamp st) { dev.add(st); }, [&](const work<16>& w) { dev.add(w); },
      [&] { dev.run_step_closures(); }, [&] { dev.flush(); });
}

void latency_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"period_us", "gap", "steps"});
  b->Args({50, spin, 20'000});    // worker awake: 1 s per run
  b->Args({2000, spin, 1'000});   // worker asleep, training thread busy: 2 s per run
  b->Args({2000, sleep, 1'000});  // worker asleep, training thread asleep: 2 s per run
  b->Iterations(1)->UseRealTime()->Unit(benchmark::kMillisecond);
}

}  // namespace

BENCHMARK(latency_stepflow)->Name("B5_latency/stepflow")->Apply(latency_args);
BENCHMARK(latency_task_per_closure)->Name("B5_latency/tbb_task_per_closure")->Apply(latency_args);
BENCHMARK(latency_torch_port)->Name("B5_latency/torch_port")->Apply(latency_args);

STEPFLOW_BENCHMARK_MAIN();
