#pragma once
// What one device's closures (or the joined closures) feed to metrics and the timeline trace.
//
// Why this shape: metrics are always on, so the hot path may only pay a few ns per closure. The
// run time of a whole batch is measured with two clock reads (exact count and sum), and one
// closure in `run_time_sample_every` is timed on its own for the distribution (p50, p99, max).
// Only when a trace is being recorded is every closure timed.

#include <atomic>
#include <cstdint>
#include <exception>
#include <string>

#include "run_time_histogram.hpp"
#include "stepflow/closure.hpp"
#include "stepflow/metrics.hpp"
#include "trace_recorder.hpp"

namespace stepflow::detail {

struct closure_observer {
  run_time_histogram histogram;
  std::atomic<std::uint64_t> timed{0};  // closures whose batch time is in sum_ns
  std::atomic<std::uint64_t> sum_ns{0};
  std::atomic<std::uint64_t> blocked_ns{0};  // step ends waiting for room
  trace_recorder* trace = nullptr;           // null: no trace
  std::uint32_t track = 0;
  std::string depth_counter;  // the trace's queue-depth counter name

  run_time_stats run_time() const noexcept {
    return histogram.stats(timed.load(std::memory_order_relaxed),
                           sum_ns.load(std::memory_order_relaxed));
  }
};

/// Runs the closures of one batch through `run`, one at a time, for the observer. Not
/// thread-safe: one batch, one thread.
class observed_batch {
 public:
  observed_batch(closure_observer& observer, closure_kind kind, std::uint64_t step) noexcept
      : observer_(observer),
        kind_(kind),
        step_(step),
        start_(trace_recorder::now_ns()),
        tracing_(observer.trace != nullptr) {}

  ~observed_batch() {
    observer_.timed.fetch_add(ran_, std::memory_order_relaxed);
    observer_.sum_ns.fetch_add(trace_recorder::now_ns() - start_, std::memory_order_relaxed);
  }

  observed_batch(const observed_batch&) = delete;
  observed_batch& operator=(const observed_batch&) = delete;

  /// Calls `c`. When it throws (any type), stores what it threw in `error` and returns false.
  /// The exception_ptr is made inside the handler but outlives it, so the caller records the
  /// failure after the handler ended.
  bool run(closure_ref c, std::exception_ptr& error) noexcept {
    if (ran_++ % run_time_sample_every != 0 && !tracing_) [[likely]]
      return call(c, error);
    return run_timed(c, error);
  }
  bool run(closure& c, std::exception_ptr& error) noexcept {
    return run(closure_access::ref(c), error);
  }

  /// Closures run so far.
  std::uint64_t ran() const noexcept { return ran_; }

 private:
  bool run_timed(closure_ref c, std::exception_ptr& error) noexcept {
    const bool sampled = (ran_ - 1) % run_time_sample_every == 0;
    const std::uint64_t begin = trace_recorder::now_ns();
    const bool ok = call(c, error);
    const std::uint64_t took = trace_recorder::now_ns() - begin;
    if (sampled) observer_.histogram.record(took);
    if (tracing_) observer_.trace->complete(observer_.track, kind_, c.label(), step_, begin, took);
    return ok;
  }

  static bool call(closure_ref c, std::exception_ptr& error) noexcept {
    try {
      c();
    } catch (...) {  // any exception, not only std::exception (H6)
      error = std::current_exception();
      return false;
    }
    return true;
  }

  closure_observer& observer_;
  closure_kind kind_;
  std::uint64_t step_;
  std::uint64_t start_;
  std::uint64_t ran_ = 0;
  bool tracing_;
};

}  // namespace stepflow::detail
