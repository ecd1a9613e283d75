// B6 (issue 5): what lockstep ordering costs per step. 8 devices, each global step = every one of
// the 8 devices adds `per_step` asynchronous closures (48-byte captures) and ends its step once.
// One iteration: `steps` global steps, then scheduler::flush(): the time covers adding, the step
// ends, running every closure on oneTBB's workers and waiting for the last one (end to end, as
// B2 and B4). The same loop runs with `options::ordering = step_ordering::per_device` (devices
// independent) and `step_ordering::lockstep` (no device starts step N+1's closures before every
// device finished step N's), in the same binary run; the scheduler and its 8 devices are built
// outside the timed loop, all before the first step end so that all 8 take part in lockstep;
// queue bound 100 per device.
//
// Two ways to drive the devices:
// - producers:1: one thread ends a step on device 0, 1, ..., 7 in turn (as B4's devices sweep);
// - producers:8: one thread per device (as a data-parallel training loop), persistent threads
//   released by a barrier at the start of each iteration; the main thread flushes once all 8
//   finished their steps. On this 2-vCPU machine 8 producers oversubscribe the CPUs, so these
//   rows are noisier.
//
// Counters: ns_per_step (wall time of the timed region / global steps), ns_per_closure,
// closures_per_step (8 * per_step), and for diagnosis blocked_ns_per_step: the step ends' time
// waiting for room in a full queue (metrics' blocked_ns, summed over the 8 devices) per global
// step, over the timed region.
//
// Target: lockstep at most 2x per_device per step.
//
// stepflow_*_run_time (not a target), one driver thread: both orderings with
// `options::measure_run_time` on (off by default), for what the run-time metrics cost
// (docs/benchmarks.md, "Metrics overhead").

#include <barrier>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "bench_support.hpp"
#include "stepflow/stepflow.hpp"

namespace {

using namespace stepflow_bench;

constexpr std::size_t n_devices = 8;
constexpr std::size_t queue_bound = 100;
constexpr int warmup_steps = 50;

/// The scheduler, its 8 devices (created before any step end: all participate) and one sink per
/// device.
struct eight_devices {
  stepflow::scheduler sched;
  std::vector<stepflow::device_context*> devices;
  std::unique_ptr<sink[]> sinks = std::make_unique<sink[]>(n_devices);

  eight_devices(stepflow::step_ordering ordering, bool measure_run_time)
      : sched(make_options(ordering, measure_run_time)) {
    for (std::size_t d = 0; d < n_devices; ++d) {
      devices.push_back(&sched.device("gpu" + std::to_string(d)));
    }
  }

  static stepflow::options make_options(stepflow::step_ordering ordering, bool measure_run_time) {
    stepflow::options opts;
    opts.max_queue_size = queue_bound;
    opts.ordering = ordering;
    opts.measure_run_time = measure_run_time;
    return opts;
  }

  /// One step of device `d`: `per_step` async closures, then the step end.
  void step(std::size_t d, std::uint64_t per_step) {
    const work<48> w = make_work<48>(sinks[d]);
    for (std::uint64_t i = 0; i < per_step; ++i) {
      devices[d]->add_step_closure(stepflow::run_async, w);
    }
    devices[d]->run_step_closures();
  }

  std::uint64_t blocked_ns() const { return sched.metrics().total.blocked_ns; }

  /// Reports the counters and checks that every device ran exactly `per_device` closures.
  /// `blocked_before`: blocked_ns() when the timed region started.
  void finish(benchmark::State& state, const closure_timer& timer, std::uint64_t global_steps,
              std::uint64_t per_step, std::uint64_t per_device,
              std::uint64_t blocked_before) const {
    timer.report(state, global_steps * n_devices * per_step);
    state.counters["ns_per_step"] = global_steps == 0 ? 0.0
                                                      : static_cast<double>(timer.elapsed_ns()) /
                                                            static_cast<double>(global_steps);
    state.counters["closures_per_step"] = static_cast<double>(n_devices * per_step);
    state.counters["blocked_ns_per_step"] =
        global_steps == 0 ? 0.0
                          : static_cast<double>(blocked_ns() - blocked_before) /
                                static_cast<double>(global_steps);
    for (std::size_t d = 0; d < n_devices; ++d) check_sink(state, sinks[d], per_device);
  }
};

/// producers:1 — one thread ends a step on every device in turn.
void lockstep_one_producer(benchmark::State& state, stepflow::step_ordering ordering,
                           bool measure_run_time) {
  const auto per_step = static_cast<std::uint64_t>(state.range(0));
  const auto steps = static_cast<std::uint64_t>(state.range(1));
  eight_devices bench(ordering, measure_run_time);
  for (int s = 0; s < warmup_steps; ++s) {
    for (std::size_t d = 0; d < n_devices; ++d) bench.step(d, per_step);
  }
  bench.sched.flush();

  const std::uint64_t blocked_before = bench.blocked_ns();
  closure_timer timer;
  timer.start();
  for (auto _ : state) {
    for (std::uint64_t s = 0; s < steps; ++s) {
      for (std::size_t d = 0; d < n_devices; ++d) bench.step(d, per_step);
    }
    bench.sched.flush();
  }
  timer.stop();
  const std::uint64_t global_steps = static_cast<std::uint64_t>(state.iterations()) * steps;
  bench.finish(state, timer, global_steps, per_step, (warmup_steps + global_steps) * per_step,
               blocked_before);
}

/// producers:8 — one persistent thread per device. Each iteration: the main thread releases the
/// 8 producers (barrier), each ends `steps` steps on its device, all meet again (barrier), then
/// the main thread flushes. Warm-up runs on the same threads.
void lockstep_eight_producers(benchmark::State& state, stepflow::step_ordering ordering) {
  const auto per_step = static_cast<std::uint64_t>(state.range(0));
  const auto steps = static_cast<std::uint64_t>(state.range(1));
  eight_devices bench(ordering, false);
  std::barrier<> sync(static_cast<std::ptrdiff_t>(n_devices) + 1);
  // Written by the main thread before it arrives at the start barrier, read after it.
  std::uint64_t round_steps = warmup_steps;
  bool stop = false;
  std::vector<std::thread> producers;
  for (std::size_t d = 0; d < n_devices; ++d) {
    producers.emplace_back([&, d] {
      for (;;) {
        sync.arrive_and_wait();  // start
        if (stop) return;
        for (std::uint64_t s = 0; s < round_steps; ++s) bench.step(d, per_step);
        sync.arrive_and_wait();  // done
      }
    });
  }
  auto round = [&] {
    sync.arrive_and_wait();
    sync.arrive_and_wait();
    bench.sched.flush();
  };
  round();  // warm-up
  round_steps = steps;

  const std::uint64_t blocked_before = bench.blocked_ns();
  closure_timer timer;
  timer.start();
  for (auto _ : state) round();
  timer.stop();
  stop = true;
  sync.arrive_and_wait();
  for (std::thread& t : producers) t.join();
  const std::uint64_t global_steps = static_cast<std::uint64_t>(state.iterations()) * steps;
  bench.finish(state, timer, global_steps, per_step, (warmup_steps + global_steps) * per_step,
               blocked_before);
}

void lockstep_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"per_step", "steps"});
  // per_step closures per device step; 1,000 global steps (8,000 device steps) per iteration.
  for (std::int64_t per_step : {1, 10, 100}) b->Args({per_step, 1000});
  b->UseRealTime()->Unit(benchmark::kMicrosecond);
}

}  // namespace

// Names: B6_lockstep/<implementation>/producers:<n>/per_step:<K>/steps:<S>; bench_report.py
// divides stepflow_lockstep's ns_per_step by stepflow_per_device's.
BENCHMARK_CAPTURE(lockstep_one_producer, per_device, stepflow::step_ordering::per_device, false)
    ->Name("B6_lockstep/stepflow_per_device/producers:1")
    ->Apply(lockstep_args);
BENCHMARK_CAPTURE(lockstep_one_producer, lockstep, stepflow::step_ordering::lockstep, false)
    ->Name("B6_lockstep/stepflow_lockstep/producers:1")
    ->Apply(lockstep_args);
BENCHMARK_CAPTURE(lockstep_one_producer, per_device_run_time, stepflow::step_ordering::per_device,
                  true)
    ->Name("B6_lockstep/stepflow_per_device_run_time/producers:1")
    ->Apply(lockstep_args);
BENCHMARK_CAPTURE(lockstep_one_producer, lockstep_run_time, stepflow::step_ordering::lockstep, true)
    ->Name("B6_lockstep/stepflow_lockstep_run_time/producers:1")
    ->Apply(lockstep_args);
BENCHMARK_CAPTURE(lockstep_eight_producers, per_device, stepflow::step_ordering::per_device)
    ->Name("B6_lockstep/stepflow_per_device/producers:8")
    ->Apply(lockstep_args);
BENCHMARK_CAPTURE(lockstep_eight_producers, lockstep, stepflow::step_ordering::lockstep)
    ->Name("B6_lockstep/stepflow_lockstep/producers:8")
    ->Apply(lockstep_args);

STEPFLOW_BENCHMARK_MAIN();
