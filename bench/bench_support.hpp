#pragma once
// Shared pieces of stepflow's benchmarks (issue 5): the closures they run, how they count time
// per closure, peak memory, percentiles and the run context written into every JSON report.
//
// Conventions every benchmark follows, so scripts/bench_report.py can read them:
// - names are `<B-id>_<what>/<implementation>/<arg>:<value>...`, e.g. `B2_async/torch_port/
//   capture:48`; the implementation `stepflow` is measured, everything else is a baseline that
//   runs in the same binary (so ratios come from one run on this noisy machine);
// - wall-clock time (`UseRealTime`), since asynchronous work runs on other threads;
// - `ns_per_closure`: wall time of the timed region divided by the closures it ran, in ns;
//   `items_per_second` (SetItemsProcessed) is the same number as a rate.

#include <benchmark/benchmark.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include <fmt/core.h>  // FMT_VERSION only, for the run context
#include <oneapi/tbb/info.h>
#include <oneapi/tbb/version.h>

#include "stepflow/version.hpp"

namespace stepflow_bench {

using clock_type = std::chrono::steady_clock;

inline std::int64_t now_ns() noexcept {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(clock_type::now().time_since_epoch())
      .count();
}

/// Where closures put their result: one cache line per device so that devices' drainers never
/// share a line. Writes of one device are serialised by the scheduler (one closure at a time per
/// device), so a relaxed load + store is race-free and costs what a plain add costs; an atomic
/// read-modify-write would add ~8 ns of its own to every closure.
struct alignas(64) sink {
  std::atomic<std::uint64_t> value{0};

  void add(std::uint64_t v) noexcept {
    value.store(value.load(std::memory_order_relaxed) + v, std::memory_order_relaxed);
  }
  std::uint64_t get() const noexcept { return value.load(std::memory_order_acquire); }
};

/// A callable whose captures take exactly `Bytes` bytes: a pointer to its sink plus payload
/// words. Each call adds 2 to the sink, so after n calls the sink holds 2n (checked by every
/// benchmark: a closure that did not run, or ran twice, fails the benchmark).
template <std::size_t Bytes>
struct work {
  static_assert(Bytes >= 16 && Bytes % 8 == 0);
  sink* out;
  std::array<std::uint64_t, (Bytes - 8) / 8> words;

  void operator()() const noexcept { out->add(words.front() + words.back()); }
};

template <std::size_t Bytes>
inline work<Bytes> make_work(sink& s) noexcept {
  work<Bytes> w{&s, {}};
  w.words.fill(1);
  return w;
}

static_assert(sizeof(work<16>) == 16);
static_assert(sizeof(work<48>) == 48);

/// Calls `f.template operator()<Bytes>()` for the capture size given at run time (16 or 48).
template <class F>
void with_capture(benchmark::State& state, std::int64_t bytes, F&& f) {
  switch (bytes) {
    case 16:
      f.template operator()<16>();
      break;
    case 48:
      f.template operator()<48>();
      break;
    default:
      state.SkipWithError("capture size must be 16 or 48");
  }
}

/// Wall time of the timed region, reported per closure.
class closure_timer {
 public:
  void start() noexcept { start_ = now_ns(); }
  void stop() noexcept { elapsed_ += now_ns() - start_; }
  /// Adds `elapsed` nanoseconds measured elsewhere (manual timing).
  void add(std::int64_t elapsed) noexcept { elapsed_ += elapsed; }
  std::int64_t elapsed_ns() const noexcept { return elapsed_; }

  /// Sets `ns_per_closure` and items_per_second for `closures` closures in total.
  void report(benchmark::State& state, std::uint64_t closures) const {
    state.SetItemsProcessed(static_cast<std::int64_t>(closures));
    state.counters["ns_per_closure"] =
        closures == 0 ? 0.0 : static_cast<double>(elapsed_) / static_cast<double>(closures);
  }

 private:
  std::int64_t start_ = 0;
  std::int64_t elapsed_ = 0;
};

/// Fails the benchmark when the sink does not hold 2 per closure that should have run.
inline void check_sink(benchmark::State& state, const sink& s, std::uint64_t closures) {
  if (s.get() != 2 * closures) {
    const std::string msg = "wrong sink: " + std::to_string(s.get()) + " != 2 * " +
                            std::to_string(closures) + " (a closure was lost or ran twice)";
    state.SkipWithError(msg.c_str());
  }
}

// --- memory ---------------------------------------------------------------------------------

/// A field of /proc/self/status in kB (VmHWM, VmRSS), or -1.
inline long status_kb(const char* key) {
  std::FILE* f = std::fopen("/proc/self/status", "r");
  if (f == nullptr) return -1;
  char line[256];
  long kb = -1;
  const std::size_t n = std::strlen(key);
  while (std::fgets(line, sizeof line, f) != nullptr) {
    if (std::strncmp(line, key, n) == 0 && line[n] == ':') {
      kb = std::strtol(line + n + 1, nullptr, 10);
      break;
    }
  }
  std::fclose(f);
  return kb;
}

/// Resets VmHWM to the current RSS (Linux >= 4.0: "5" > /proc/self/clear_refs), so the peak of
/// one benchmark is not the peak of an earlier one. Returns false when the kernel refused.
inline bool reset_peak_rss() {
  std::FILE* f = std::fopen("/proc/self/clear_refs", "w");
  if (f == nullptr) return false;
  const bool ok = std::fputs("5", f) >= 0;
  return std::fclose(f) == 0 && ok;
}

// --- percentiles ----------------------------------------------------------------------------

/// Nearest-rank percentile (p in [0, 100]) of `sorted`, which must be sorted ascending.
inline double percentile(const std::vector<std::int64_t>& sorted, double p) {
  if (sorted.empty()) return 0.0;
  const double rank = std::ceil(p / 100.0 * static_cast<double>(sorted.size()));
  const std::size_t index = rank < 1.0 ? 0 : static_cast<std::size_t>(rank) - 1;
  return static_cast<double>(sorted[std::min(index, sorted.size() - 1)]);
}

// --- timing helpers -------------------------------------------------------------------------

/// Busy-waits until `deadline_ns` (steady clock): the training thread "computing".
inline void spin_until(std::int64_t deadline_ns) noexcept {
  while (now_ns() < deadline_ns) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }
}

// --- run context ----------------------------------------------------------------------------

inline void add_context() {
  benchmark::AddCustomContext("stepflow_version", stepflow::version_string);
  benchmark::AddCustomContext(
      "tbb_version", std::to_string(TBB_VERSION_MAJOR) + "." + std::to_string(TBB_VERSION_MINOR));
  benchmark::AddCustomContext("tbb_runtime_version", TBB_runtime_version());
  benchmark::AddCustomContext("tbb_default_concurrency",
                              std::to_string(tbb::info::default_concurrency()));
  benchmark::AddCustomContext("fmt_version", std::to_string(FMT_VERSION / 10000) + "." +
                                                 std::to_string(FMT_VERSION / 100 % 100) + "." +
                                                 std::to_string(FMT_VERSION % 100));
#if defined(__clang__)
  benchmark::AddCustomContext("compiler", std::string("clang ") + __clang_version__);
#elif defined(__GNUC__)
  benchmark::AddCustomContext("compiler", std::string("g++ ") + __VERSION__);
#endif
#ifdef NDEBUG
  benchmark::AddCustomContext("assertions", "off (NDEBUG)");
#else
  benchmark::AddCustomContext("assertions", "ON: not a release build, numbers are meaningless");
#endif
  benchmark::AddCustomContext("hardware_concurrency",
                              std::to_string(std::thread::hardware_concurrency()));
}

}  // namespace stepflow_bench

/// main() of every benchmark binary: the run context, then Google Benchmark as usual.
#define STEPFLOW_BENCHMARK_MAIN()                                       \
  int main(int argc, char** argv) {                                     \
    stepflow_bench::add_context();                                      \
    ::benchmark::Initialize(&argc, argv);                               \
    if (::benchmark::ReportUnrecognizedArguments(argc, argv)) return 1; \
    ::benchmark::RunSpecifiedBenchmarks();                              \
    ::benchmark::Shutdown();                                            \
    return 0;                                                           \
  }                                                                     \
  static_assert(true, "require a semicolon")
