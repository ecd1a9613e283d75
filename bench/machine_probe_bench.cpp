// Not a stepflow benchmark: how steady this machine's CPUs are while the benchmarks run. One
// thread per CPU runs a fixed loop (~0.5 us of arithmetic, no memory traffic) for a second and
// times every pass. The second is cut into 1 ms windows; a window is *slow* when its median pass
// took over `slow_factor` times the run's median pass.
//
// Why: on the virtual machines this project is measured on, the CPUs run several times slower
// for tens of milliseconds at a time, with nothing else running in the guest (other tenants on
// the host). Any single-run number can land in such a stretch; B5's p99 (one second of 50 us
// steps) does whenever a stretch outlasts 1% of its steps. The report shows these counters next
// to the machine description:
//   slow_window_pct  windows that were slow, % of all (all CPUs together)
//   longest_slow_ms  the longest run of consecutive slow windows on one CPU
//
// machine/locked_add: what one locked read-modify-write costs here, back to back on one thread
// whose cache line never leaves its core. It is the unit in which a step end's fixed cost is
// counted (docs/benchmarks.md, "B1 at 16 bytes").

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>

#include "bench_support.hpp"

namespace {

using namespace stepflow_bench;

constexpr double slow_factor = 1.8;
constexpr std::int64_t window_ns = 1'000'000;

struct cpu_result {
  std::size_t windows = 0;
  std::size_t slow = 0;
  std::size_t longest_slow = 0;
};

// Times passes of a fixed loop until `end_ns`; returns each pass's duration and end time.
std::vector<std::pair<std::int64_t, std::int64_t>> time_passes(std::int64_t end_ns) {
  std::vector<std::pair<std::int64_t, std::int64_t>> passes;
  passes.reserve(4'000'000);
  std::uint32_t x = 1;
  std::int64_t before = now_ns();
  while (before < end_ns) {
    for (int i = 0; i < 300; ++i) x = x * 1664525u + 1013904223u;  // a dependent chain
    benchmark::DoNotOptimize(x);
    const std::int64_t after = now_ns();
    passes.emplace_back(after, after - before);
    before = after;
  }
  return passes;
}

cpu_result classify(const std::vector<std::pair<std::int64_t, std::int64_t>>& passes) {
  cpu_result r;
  if (passes.empty()) return r;
  std::vector<std::int64_t> all;
  all.reserve(passes.size());
  for (const auto& p : passes) all.push_back(p.second);
  std::nth_element(all.begin(), all.begin() + static_cast<std::ptrdiff_t>(all.size() / 2),
                   all.end());
  const double median = static_cast<double>(all[all.size() / 2]);

  std::vector<std::int64_t> window;
  std::int64_t window_end = passes.front().first + window_ns;
  std::size_t run = 0;
  auto close_window = [&] {
    if (window.empty()) return;
    std::nth_element(window.begin(),
                     window.begin() + static_cast<std::ptrdiff_t>(window.size() / 2), window.end());
    ++r.windows;
    if (static_cast<double>(window[window.size() / 2]) > slow_factor * median) {
      ++r.slow;
      r.longest_slow = std::max(r.longest_slow, ++run);
    } else {
      run = 0;
    }
    window.clear();
  };
  for (const auto& [end, took] : passes) {
    if (end > window_end) {
      close_window();
      window_end = end + window_ns;
    }
    window.push_back(took);
  }
  close_window();
  return r;
}

void slow_stretches(benchmark::State& state) {
  const unsigned cpus = std::max(1u, std::thread::hardware_concurrency());
  cpu_result total;
  for (auto _ : state) {
    const std::int64_t end_ns = now_ns() + 1'000'000'000;
    std::vector<cpu_result> results(cpus);
    std::vector<std::thread> threads;
    for (unsigned c = 0; c < cpus; ++c) {
      threads.emplace_back([&, c] { results[c] = classify(time_passes(end_ns)); });
    }
    for (auto& t : threads) t.join();
    for (const auto& r : results) {
      total.windows += r.windows;
      total.slow += r.slow;
      total.longest_slow = std::max(total.longest_slow, r.longest_slow);
    }
  }
  state.counters["slow_window_pct"] = total.windows == 0 ? 0.0
                                                         : 100.0 * static_cast<double>(total.slow) /
                                                               static_cast<double>(total.windows);
  state.counters["longest_slow_ms"] = static_cast<double>(total.longest_slow);
}

void locked_add(benchmark::State& state) {
  std::atomic<std::uint64_t> counter{0};
  for (auto _ : state) counter.fetch_add(1, std::memory_order_relaxed);
  benchmark::DoNotOptimize(counter.load(std::memory_order_relaxed));
}

}  // namespace

BENCHMARK(locked_add)->Name("machine/locked_add");
BENCHMARK(slow_stretches)
    ->Name("machine/probe")
    ->Iterations(1)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

STEPFLOW_BENCHMARK_MAIN();
