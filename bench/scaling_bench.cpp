// B4 (issue 5): scaling. Asynchronous closures end to end (as B2: add, step end, flush at the
// end of the iteration; 48-byte captures; 100 closures per device step; queue bound 100).
//
// - devices sweep: 1, 4, 16, 64 devices, the same 1e6 closures in total per iteration; one
//   "round" ends a step on every device in turn, so with 64 devices a round is 6,400 closures
//   and an iteration 156 rounds.
// - steps sweep: one device, 1e3, 1e4, 1e5 and 1e6 steps of 100 closures per iteration (1e5 to
//   1e8 closures). Peak memory must not grow with the number of steps.
//
// Counters: ns_per_closure; peak_rss_kib (VmHWM after the run, reset to the current RSS before
// it via /proc/self/clear_refs), rss_before_kib and peak_growth_kib (= peak - before), so growth
// with the number of steps shows up directly. The devices sweep also reports, for diagnosis,
// blocked_pct (the step ends' time waiting for room in a full queue, metrics' blocked_ns summed
// over the devices, as a share of the timed region) and steps_per_task (device steps per oneTBB
// task started to run them, metrics' async_tasks): they tell a run whose drainer falls behind
// and takes many queued steps per visit from one where it keeps up and takes them one by one.
//
// Target: ns_per_closure within +-25% from 1 to 64 devices and from 1e3 to 1e6 steps; peak
// memory flat in the number of steps.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "bench_support.hpp"
#include "stepflow/stepflow.hpp"

namespace {

using namespace stepflow_bench;

constexpr std::size_t queue_bound = 100;
constexpr std::uint64_t per_step = 100;

struct memory_probe {
  long before = -1;
  bool reset_ok = false;

  void start() {
    reset_ok = reset_peak_rss();
    before = status_kb("VmRSS");
  }
  void report(benchmark::State& state) const {
    const long peak = status_kb("VmHWM");
    state.counters["peak_rss_kib"] = static_cast<double>(peak);
    state.counters["rss_before_kib"] = static_cast<double>(before);
    state.counters["peak_growth_kib"] = reset_ok ? static_cast<double>(peak - before) : -1.0;
  }
};

/// One round = one step on each device, in turn; the last round may be partial so that every
/// device count runs exactly `total` closures.
void scaling_devices(benchmark::State& state) {
  const auto n_devices = static_cast<std::size_t>(state.range(0));
  const auto total = static_cast<std::uint64_t>(state.range(1));
  const std::uint64_t device_steps = total / per_step;

  stepflow::options opts;
  opts.max_queue_size = queue_bound;
  memory_probe memory;
  memory.start();
  stepflow::scheduler sched(opts);
  std::vector<stepflow::device_context*> devices;
  auto sinks = std::make_unique<sink[]>(n_devices);
  for (std::size_t d = 0; d < n_devices; ++d) {
    devices.push_back(&sched.device("device" + std::to_string(d)));
  }
  auto one_step = [&](std::size_t d) {
    const work<48> w = make_work<48>(sinks[d]);
    for (std::uint64_t i = 0; i < per_step; ++i) {
      devices[d]->add_step_closure(stepflow::run_async, w);
    }
    devices[d]->run_step_closures();
  };
  for (int round = 0; round < 4; ++round) {  // warm-up
    for (std::size_t d = 0; d < n_devices; ++d) one_step(d);
  }
  sched.flush();

  const stepflow::device_metrics before = sched.metrics().total;
  closure_timer timer;
  timer.start();
  for (auto _ : state) {
    for (std::uint64_t s = 0; s < device_steps; ++s) one_step(s % n_devices);
    sched.flush();
  }
  timer.stop();
  const stepflow::device_metrics after = sched.metrics().total;
  const std::uint64_t closures =
      static_cast<std::uint64_t>(state.iterations()) * device_steps * per_step;
  timer.report(state, closures);
  const auto tasks = static_cast<double>(after.async_tasks - before.async_tasks);
  state.counters["steps_per_task"] =
      tasks == 0 ? 0.0 : static_cast<double>(after.steps - before.steps) / tasks;
  state.counters["blocked_pct"] =
      timer.elapsed_ns() == 0 ? 0.0
                              : 100.0 * static_cast<double>(after.blocked_ns - before.blocked_ns) /
                                    static_cast<double>(timer.elapsed_ns());
  memory.report(state);
  std::uint64_t ran = 0;
  for (std::size_t d = 0; d < n_devices; ++d) ran += sinks[d].get() / 2;
  const std::uint64_t warm = 4 * n_devices * per_step;
  if (ran != warm + closures) state.SkipWithError("a closure was lost or ran twice");
}

void scaling_steps(benchmark::State& state) {
  const auto steps = static_cast<std::uint64_t>(state.range(0));
  const auto bound = static_cast<std::size_t>(state.range(1));

  stepflow::options opts;
  opts.max_queue_size = bound;
  memory_probe memory;
  memory.start();
  stepflow::scheduler sched(opts);
  stepflow::device_context& dev = sched.device("bench");
  sink s;
  const work<48> w = make_work<48>(s);
  for (int step = 0; step < 16; ++step) {  // warm-up
    for (std::uint64_t i = 0; i < per_step; ++i) dev.add_step_closure(stepflow::run_async, w);
    dev.run_step_closures();
  }
  dev.flush();
  const std::uint64_t warm = s.get() / 2;

  closure_timer timer;
  timer.start();
  for (auto _ : state) {
    for (std::uint64_t step = 0; step < steps; ++step) {
      for (std::uint64_t i = 0; i < per_step; ++i) dev.add_step_closure(stepflow::run_async, w);
      dev.run_step_closures();
    }
    dev.flush();
  }
  timer.stop();
  const std::uint64_t closures = static_cast<std::uint64_t>(state.iterations()) * steps * per_step;
  timer.report(state, closures);
  memory.report(state);
  check_sink(state, s, warm + closures);
}

}  // namespace

BENCHMARK(scaling_devices)
    ->Name("B4_scaling/stepflow_devices")
    ->ArgNames({"devices", "total"})
    ->Args({1, 1'000'000})
    ->Args({4, 1'000'000})
    ->Args({16, 1'000'000})
    ->Args({64, 1'000'000})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

// bound 0 (unbounded) is informational: the same loop without the bound, for comparison of
// peak memory. At 1e6 steps (1e8 closures, ~1 s) Google Benchmark runs a single iteration.
BENCHMARK(scaling_steps)
    ->Name("B4_scaling/stepflow_steps")
    ->ArgNames({"steps", "bound"})
    ->Args({1'000, queue_bound})
    ->Args({10'000, queue_bound})
    ->Args({100'000, queue_bound})
    ->Args({1'000'000, queue_bound})
    ->Args({100'000, 0})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

STEPFLOW_BENCHMARK_MAIN();
