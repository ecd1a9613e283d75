// B1 (issue 5): synchronous step closures. One iteration is one step: N closures added, then the
// step end runs them inline on this thread. Reported per closure (add + run).
//
// Baseline: what torch._lazy does, in C++: a std::vector<std::function<void()>> that closures
// are pushed onto, then called in order and cleared (the vector keeps its capacity, so only the
// std::function objects cost anything; libstdc++ stores captures of up to 16 bytes inline and
// allocates for larger ones).
//
// Target: stepflow >= 1.5x faster than the baseline at N = 100 with 48-byte captures, and no
// slower with 16-byte captures.
//
// B1_sync/stepflow_run_time (not a target): stepflow with `options::measure_run_time` on (off by
// default), beside the default, for what the run-time metrics cost (docs/benchmarks.md, "Metrics
// overhead").

#include <cstdint>
#include <functional>
#include <vector>

#include "bench_support.hpp"
#include "stepflow/stepflow.hpp"

namespace {

using namespace stepflow_bench;

void sync_stepflow(benchmark::State& state, bool measure_run_time) {
  const auto n = static_cast<std::size_t>(state.range(1));
  with_capture(state, state.range(0), [&]<std::size_t Bytes>() {
    stepflow::options opts;
    opts.max_queue_size = 100;
    opts.measure_run_time = measure_run_time;
    stepflow::scheduler sched(opts);
    stepflow::device_context& dev = sched.device("bench");
    sink s;
    const work<Bytes> w = make_work<Bytes>(s);
    // Warm-up: chunks, batch buffers and the task group reach their steady state.
    for (int step = 0; step < 16; ++step) {
      for (std::size_t i = 0; i < n; ++i) dev.add_step_closure(w);
      dev.run_step_closures();
    }
    const std::uint64_t warm = s.get() / 2;

    closure_timer timer;
    timer.start();
    for (auto _ : state) {
      for (std::size_t i = 0; i < n; ++i) dev.add_step_closure(w);
      dev.run_step_closures();
    }
    timer.stop();
    const std::uint64_t closures = static_cast<std::uint64_t>(state.iterations()) * n;
    timer.report(state, closures);
    check_sink(state, s, warm + closures);
  });
}

void sync_vector_of_function(benchmark::State& state) {
  const auto n = static_cast<std::size_t>(state.range(1));
  with_capture(state, state.range(0), [&]<std::size_t Bytes>() {
    std::vector<std::function<void()>> step_closures;
    sink s;
    const work<Bytes> w = make_work<Bytes>(s);
    for (std::size_t i = 0; i < n; ++i) step_closures.emplace_back(w);  // warm-up: capacity
    for (auto& f : step_closures) f();
    step_closures.clear();
    const std::uint64_t warm = s.get() / 2;

    closure_timer timer;
    timer.start();
    for (auto _ : state) {
      for (std::size_t i = 0; i < n; ++i) step_closures.emplace_back(w);
      for (auto& f : step_closures) f();
      step_closures.clear();
    }
    timer.stop();
    const std::uint64_t closures = static_cast<std::uint64_t>(state.iterations()) * n;
    timer.report(state, closures);
    check_sink(state, s, warm + closures);
  });
}

void sync_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"capture", "n"});
  for (std::int64_t capture : {16, 48}) {
    for (std::int64_t n : {1, 10, 100, 1000}) b->Args({capture, n});
  }
  b->UseRealTime();
}

}  // namespace

BENCHMARK_CAPTURE(sync_stepflow, defaults, false)->Name("B1_sync/stepflow")->Apply(sync_args);
BENCHMARK_CAPTURE(sync_stepflow, run_time, true)
    ->Name("B1_sync/stepflow_run_time")
    ->Apply(sync_args);
BENCHMARK(sync_vector_of_function)->Name("B1_sync/vector_function")->Apply(sync_args);

STEPFLOW_BENCHMARK_MAIN();
