// B7 (issue 5): heap allocations per closure in steady state. This binary replaces the global
// operator new/delete (every form) with counting versions, and interposes glibc's malloc family
// too, so it sees every heap allocation of the process, on every thread: stepflow's, the
// baselines', libstdc++'s and oneTBB's (whose own allocator falls back to malloc when
// libtbbmalloc is absent; with libtbbmalloc loaded, its allocations are invisible here, which the
// `tbbmalloc_loaded` context entry records). Counts are taken over the timed loop only, after a
// warm-up that brings buffers, pools and the worker to steady state.
//
// Sizes: 100 closures per step (the size); stepflow also 1000 per step.
//
// Counters: new_per_closure (operator new calls / closures), malloc_per_closure (all heap
// allocations, operator new included, / closures), news (operator new calls in the region),
// warm_up_steps (steps before counting: see min_warm_steps).
//
// STEPFLOW_BENCH_TRACE_NEW=1 in the environment prints a backtrace to stderr for every operator new
// counted inside a measured region (the binary is linked with -rdynamic for the symbol names).
//
// Target: stepflow makes zero heap allocations per closure in steady state, sync and async, for
// captures of 16 and 48 bytes. Baselines for contrast: std::vector<std::function> (sync) and the
// torch._lazy port (async).

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <new>
#include <vector>

#include <execinfo.h>
#include <unistd.h>

#include "baselines.hpp"
#include "bench_support.hpp"
#include "stepflow/stepflow.hpp"

// --- counting allocation functions ---------------------------------------------------------------

namespace {
std::atomic<std::uint64_t> operator_news{0};
std::atomic<std::uint64_t> heap_allocations{0};
std::atomic<bool> trace_news{false};  // inside a measured region with STEPFLOW_BENCH_TRACE_NEW

void trace_new(std::size_t n) noexcept {
  void* frames[24];
  const int depth = backtrace(frames, 24);
  char header[64];
  const int len =
      std::snprintf(header, sizeof header, "operator new(%zu) in a measured region:\n", n);
  if (len > 0) static_cast<void>(::write(2, header, static_cast<std::size_t>(len)));
  backtrace_symbols_fd(frames, depth, 2);
}
}  // namespace

extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
void __libc_free(void*);

void* malloc(std::size_t n) {
  heap_allocations.fetch_add(1, std::memory_order_relaxed);
  return __libc_malloc(n);
}
void* calloc(std::size_t count, std::size_t n) {
  heap_allocations.fetch_add(1, std::memory_order_relaxed);
  return __libc_calloc(count, n);
}
void* realloc(void* p, std::size_t n) {
  heap_allocations.fetch_add(1, std::memory_order_relaxed);
  return __libc_realloc(p, n);
}
void* aligned_alloc(std::size_t alignment, std::size_t n) {
  heap_allocations.fetch_add(1, std::memory_order_relaxed);
  return __libc_memalign(alignment, n);
}
void* memalign(std::size_t alignment, std::size_t n) {
  heap_allocations.fetch_add(1, std::memory_order_relaxed);
  return __libc_memalign(alignment, n);
}
int posix_memalign(void** out, std::size_t alignment, std::size_t n) {
  heap_allocations.fetch_add(1, std::memory_order_relaxed);
  void* p = __libc_memalign(alignment, n);
  if (p == nullptr) return ENOMEM;
  *out = p;
  return 0;
}
void free(void* p) { __libc_free(p); }
}

namespace {
void* counted_new(std::size_t n) {
  operator_news.fetch_add(1, std::memory_order_relaxed);
  if (trace_news.load(std::memory_order_relaxed)) trace_new(n);
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void* counted_new(std::size_t n, std::align_val_t alignment) {
  operator_news.fetch_add(1, std::memory_order_relaxed);
  if (trace_news.load(std::memory_order_relaxed)) trace_new(n);
  const auto a = static_cast<std::size_t>(alignment);
  if (void* p = std::aligned_alloc(a, (n + a - 1) / a * a)) return p;
  throw std::bad_alloc();
}
}  // namespace

void* operator new(std::size_t n) { return counted_new(n); }
void* operator new[](std::size_t n) { return counted_new(n); }
void* operator new(std::size_t n, std::align_val_t a) { return counted_new(n, a); }
void* operator new[](std::size_t n, std::align_val_t a) { return counted_new(n, a); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  try {
    return counted_new(n);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept {
  try {
    return counted_new(n);
  } catch (...) {
    return nullptr;
  }
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

// --- benchmarks ----------------------------------------------------------------------------------

namespace {

using namespace stepflow_bench;

constexpr std::uint64_t steps_per_flush = 10;

struct allocation_probe {
  std::uint64_t news = 0;
  std::uint64_t heap = 0;

  void start() {
    news = operator_news.load();
    heap = heap_allocations.load();
    static const bool trace = std::getenv("STEPFLOW_BENCH_TRACE_NEW") != nullptr;
    trace_news.store(trace);
  }
  void report(benchmark::State& state, std::uint64_t closures) const {
    trace_news.store(false);
    const auto d_news = static_cast<double>(operator_news.load() - news);
    const auto d_heap = static_cast<double>(heap_allocations.load() - heap);
    const auto n = static_cast<double>(closures == 0 ? 1 : closures);
    state.counters["closures"] = static_cast<double>(closures);
    state.counters["news"] = d_news;
    state.counters["new_per_closure"] = d_news / n;
    state.counters["malloc_per_closure"] = d_heap / n;
    state.SetItemsProcessed(static_cast<std::int64_t>(closures));
  }
};

// Steady state, for the warm-up: at least `min_warm_steps` steps, then until `quiet_steps` steps
// in a row made no heap allocation, or `max_warm_steps` in all. Why not a fixed count: a lane
// needs its most chunks in flight only when the producer happens to run furthest ahead of the
// drainer, which may first happen after any fixed count (one 8 KiB chunk in 17-33 million
// closures after 200 steps, in some runs). That is growth, not a cost per closure; a cost per
// closure never goes quiet, so it reaches the cap and is counted in the loop as before.
constexpr int min_warm_steps = 200;
constexpr int quiet_steps = 1000;
constexpr int max_warm_steps = 5000;

/// One iteration: `steps_per_flush` steps of `per_step` (argument 2) closures, then `flush` (a
/// no-op for sync). Counts allocations over the loop, after the warm-up.
template <std::size_t Bytes, class AddOne, class EndStep, class Flush>
void run_alloc_loop(benchmark::State& state, sink& s, AddOne add_one, EndStep end_step,
                    Flush flush) {
  const auto per_step = static_cast<std::uint64_t>(state.range(2));
  const work<Bytes> w = make_work<Bytes>(s);
  std::uint64_t seen = heap_allocations.load();
  int quiet = 0;
  int warm_steps = 0;
  for (; warm_steps < max_warm_steps && (warm_steps < min_warm_steps || quiet < quiet_steps);
       ++warm_steps) {
    for (std::uint64_t i = 0; i < per_step; ++i) add_one(w);
    end_step();
    const std::uint64_t now = heap_allocations.load();
    quiet = now == seen ? quiet + 1 : 0;
    seen = now;
  }
  flush();
  state.counters["warm_up_steps"] = warm_steps;
  const std::uint64_t warm = s.get() / 2;

  allocation_probe probe;
  probe.start();
  for (auto _ : state) {
    for (std::uint64_t step = 0; step < steps_per_flush; ++step) {
      for (std::uint64_t i = 0; i < per_step; ++i) add_one(w);
      end_step();
    }
    flush();
  }
  const std::uint64_t closures =
      static_cast<std::uint64_t>(state.iterations()) * steps_per_flush * per_step;
  probe.report(state, closures);
  check_sink(state, s, warm + closures);
}

void alloc_stepflow(benchmark::State& state) {
  const bool async = state.range(1) != 0;
  with_capture(state, state.range(0), [&]<std::size_t Bytes>() {
    stepflow::options opts;
    opts.max_queue_size = 100;
    stepflow::scheduler sched(opts);
    stepflow::device_context& dev = sched.device("bench");
    sink s;
    if (async) {
      run_alloc_loop<Bytes>(
          state, s, [&](const work<Bytes>& w) { dev.add_step_closure(stepflow::run_async, w); },
          [&] { dev.run_step_closures(); }, [&] { dev.flush(); });
    } else {
      run_alloc_loop<Bytes>(
          state, s, [&](const work<Bytes>& w) { dev.add_step_closure(w); },
          [&] { dev.run_step_closures(); }, [] {});
    }
  });
}

void alloc_vector_function(benchmark::State& state) {
  with_capture(state, state.range(0), [&]<std::size_t Bytes>() {
    std::vector<std::function<void()>> closures;
    sink s;
    run_alloc_loop<Bytes>(
        state, s, [&](const work<Bytes>& w) { closures.emplace_back(w); },
        [&] {
          for (auto& f : closures) f();
          closures.clear();
        },
        [] {});
  });
}

void alloc_torch_port(benchmark::State& state) {
  with_capture(state, state.range(0), [&]<std::size_t Bytes>() {
    torch_port_device dev(100);
    sink s;
    run_alloc_loop<Bytes>(
        state, s, [&](const work<Bytes>& w) { dev.add(w); }, [&] { dev.run_step_closures(); },
        [&] { dev.flush(); });
  });
}

/// 100 closures per step (the size) for everything; stepflow also at 1,000 per step,
/// where a step spans several lane chunks, and at 10,000, more chunks (up to 69) than a fixed
/// pool of 16 spares kept before the eighth session.
void alloc_args(benchmark::internal::Benchmark* b, std::int64_t async, bool large_steps) {
  b->ArgNames({"capture", "async", "per_step"});
  for (std::int64_t capture : {16, 48}) b->Args({capture, async, 100});
  if (large_steps) {
    for (std::int64_t per_step : {1000, 10000}) {
      for (std::int64_t capture : {16, 48}) b->Args({capture, async, per_step});
    }
  }
  b->UseRealTime();
}

bool tbbmalloc_loaded() {
  std::FILE* maps = std::fopen("/proc/self/maps", "r");
  if (maps == nullptr) return false;
  char line[512];
  bool found = false;
  while (!found && std::fgets(line, sizeof line, maps) != nullptr) {
    found = std::strstr(line, "libtbbmalloc") != nullptr;
  }
  std::fclose(maps);
  return found;
}

// Registered from main, after the context: the tbbmalloc check needs oneTBB to have started.
void register_all() {
  alloc_args(benchmark::RegisterBenchmark("B7_alloc/stepflow_sync", alloc_stepflow), 0, true);
  alloc_args(benchmark::RegisterBenchmark("B7_alloc/vector_function", alloc_vector_function), 0,
             false);
  alloc_args(benchmark::RegisterBenchmark("B7_alloc/stepflow_async", alloc_stepflow), 1, true);
  alloc_args(benchmark::RegisterBenchmark("B7_alloc/torch_port", alloc_torch_port), 1, false);
}

}  // namespace

int main(int argc, char** argv) {
  stepflow_bench::add_context();
  {
    // Start oneTBB (its allocator is chosen on first use) before looking for libtbbmalloc.
    stepflow::options opts;
    opts.max_queue_size = 100;
    stepflow::scheduler sched(opts);
    sched.default_device().add_step_closure(stepflow::run_async, [] {});
    sched.default_device().run_step_closures();
    sched.flush();
  }
  benchmark::AddCustomContext("tbbmalloc_loaded", tbbmalloc_loaded() ? "yes" : "no");
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
