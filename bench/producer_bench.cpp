// B3 (issue 5): the producer's cost. Only the time spent inside run_step_closures() is measured
// (manual timing around each call), divided by the asynchronous closures that step handed over.
// The queue always has room: its bound is far above what is ever pending, and the benchmark
// flushes (untimed) every `flush_every` steps, so the step end never waits. The drainer runs
// concurrently on TBB's worker, as in real use.
//
// Baseline: the same measurement on the torch._lazy port (baseline b), whose step end puts each
// closure into its queue under two locks and signals a condition variable per closure.
//
// Target: stepflow <= 10 ns per closure while the queue has room.

#include <cstdint>

#include "baselines.hpp"
#include "bench_support.hpp"
#include "stepflow/stepflow.hpp"

namespace {

using namespace stepflow_bench;

constexpr std::uint64_t flush_every = 64;

template <std::size_t Bytes, class AddOne, class EndStep, class Flush>
void run_producer_loop(benchmark::State& state, sink& s, AddOne add_one, EndStep end_step,
                       Flush flush) {
  const auto per_step = static_cast<std::uint64_t>(state.range(1));
  const work<Bytes> w = make_work<Bytes>(s);
  for (int step = 0; step < 100; ++step) {  // warm-up
    for (std::uint64_t i = 0; i < per_step; ++i) add_one(w);
    end_step();
  }
  flush();
  const std::uint64_t warm = s.get() / 2;

  closure_timer timer;
  std::uint64_t steps = 0;
  for (auto _ : state) {
    for (std::uint64_t i = 0; i < per_step; ++i) add_one(w);
    const std::int64_t t0 = now_ns();
    end_step();
    const std::int64_t t = now_ns() - t0;
    timer.add(t);
    state.SetIterationTime(static_cast<double>(t) * 1e-9);
    if (++steps % flush_every == 0) flush();
  }
  flush();
  const std::uint64_t closures = steps * per_step;
  timer.report(state, closures);
  check_sink(state, s, warm + closures);
}

void producer_stepflow(benchmark::State& state) {
  with_capture(state, state.range(0), [&]<std::size_t Bytes>() {
    stepflow::options opts;
    // Far above the `flush_every * per_step` closures that can ever be pending: never full.
    opts.max_queue_size = 1'000'000;
    stepflow::scheduler sched(opts);
    stepflow::device_context& dev = sched.device("bench");
    sink s;
    run_producer_loop<Bytes>(
        state, s, [&](const work<Bytes>& w) { dev.add_step_closure(stepflow::run_async, w); },
        [&] { dev.run_step_closures(); }, [&] { dev.flush(); });
  });
}

void producer_torch_port(benchmark::State& state) {
  with_capture(state, state.range(0), [&]<std::size_t Bytes>() {
    torch_port_device dev(1'000'000);
    sink s;
    run_producer_loop<Bytes>(
        state, s, [&](const work<Bytes>& w) { dev.add(w); }, [&] { dev.run_step_closures(); },
        [&] { dev.flush(); });
  });
}

void producer_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"capture", "per_step"});
  for (std::int64_t capture : {16, 48}) {
    for (std::int64_t per_step : {100, 1000}) b->Args({capture, per_step});
  }
  b->UseManualTime();
}

}  // namespace

BENCHMARK(producer_stepflow)->Name("B3_producer/stepflow")->Apply(producer_args);
BENCHMARK(producer_torch_port)->Name("B3_producer/torch_port")->Apply(producer_args);

STEPFLOW_BENCHMARK_MAIN();
