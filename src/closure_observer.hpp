#pragma once
// What one device's closures (or the joined closures) feed to metrics and the timeline trace.
//
// Why this shape: run time may be measured in production, so the hot path may only pay a few
// ns per closure for it. The run time of a whole batch is measured with two clock reads (exact
// count and sum), and about one closure in `run_time_sample_every` is timed on its own for the
// distribution (p50, p99, max). Even that is done only with `options::measure_run_time` (off by
// default): a clock read costs 20-40 ns on a VM, more than 10% of a step end with few closures,
// and the countdown ~1 ns per closure (docs/benchmarks.md, "Metrics overhead"). A trace, when
// one is recorded, times every closure either way.

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <string>

#include "closure_batch.hpp"
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
  // Closures until the next one timed alone, carried from batch to batch. The sync step end and
  // the drainer may both run batches of one device at once; then one of them overwrites the
  // other's count, which only moves the next sample. The first closure ever run is sampled.
  std::atomic<std::uint32_t> until_sample{1};
  bool measure_run_time = false;    // options::measure_run_time
  trace_recorder* trace = nullptr;  // null: no trace
  std::uint32_t track = 0;          // sync closures (or joined ones) and the queue depth
  std::uint32_t async_track = 0;    // async closures, which overlap the sync ones in time
  std::string depth_counter;        // the trace's queue-depth counter name

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
        measuring_(observer.measure_run_time),
        tracing_(observer.trace != nullptr) {
    if (!measuring_) return;
    start_ = trace_recorder::now_ns();
    until_sample_ = observer.until_sample.load(std::memory_order_relaxed);
  }

  ~observed_batch() {
    if (!measuring_) return;
    observer_.until_sample.store(until_sample_, std::memory_order_relaxed);
    observer_.timed.fetch_add(ran_, std::memory_order_relaxed);
    observer_.sum_ns.fetch_add(trace_recorder::now_ns() - start_, std::memory_order_relaxed);
  }

  observed_batch(const observed_batch&) = delete;
  observed_batch& operator=(const observed_batch&) = delete;

  /// Calls `c`. When it throws (any type), stores what it threw in `error` and returns false.
  /// The exception_ptr is made inside the handler but outlives it, so the caller records the
  /// failure after the handler ended.
  bool run(closure_ref c, std::exception_ptr& error) noexcept {
    ++ran_;
    return with_mode([&]<bool Tracing, bool Sampling>() {
      return run_counted<Tracing, Sampling>(c, error, until_sample_);
    });
  }
  bool run(closure& c, std::exception_ptr& error) noexcept {
    return run(closure_access::ref(c), error);
  }

  /// Runs the closures of `batch` in order, calling `before_each()` before each one, until one
  /// throws: what it threw goes to `error`, then `on_failure(left)` is called with the number of
  /// closures after the failed one, which are then destroyed unrun (so their destructors see
  /// the failure recorded). Returns how many were destroyed unrun. Leaves `batch` empty.
  ///
  /// One loop, not `run` per closure: the per-closure work is the call, the sampling countdown
  /// and `before_each`, with the batch's bookkeeping (ran count, countdown write-back) done once.
  /// The countdown still lives in memory across the closures' opaque calls (~1 ns per closure
  /// in B1 with sampling against without; docs/benchmarks.md, B1).
  template <class BeforeEach, class OnFailure>
  std::size_t run_all(closure_batch& batch, std::exception_ptr& error, BeforeEach&& before_each,
                      OnFailure&& on_failure) noexcept {
    const std::size_t n = batch.size();
    std::uint32_t until_sample = until_sample_;
    // One loop per mode, so that none tests the mode per closure.
    const std::size_t unrun = with_mode([&]<bool Tracing, bool Sampling>() {
      return batch.consume(
          [&](closure_ref c) noexcept {
            before_each();
            return run_counted<Tracing, Sampling>(c, error, until_sample);
          },
          on_failure);
    });
    until_sample_ = until_sample;
    // The failed closure ran too.
    ran_ += n - unrun;
    return unrun;
  }

  /// Closures run so far.
  std::uint64_t ran() const noexcept { return ran_; }

 private:
  /// `f.template operator()<Tracing, Sampling>()` for this batch's `tracing_` and `measuring_`.
  template <class F>
  auto with_mode(F&& f) -> decltype(f.template operator()<false, false>()) {
    if (measuring_) {
      return tracing_ ? f.template operator()<true, true>() : f.template operator()<false, true>();
    }
    return tracing_ ? f.template operator()<true, false>() : f.template operator()<false, false>();
  }

  /// Calls `c`, timed alone when sampling and `until_sample` counts down to zero (then
  /// restarted with `next_sample_gap`), or when tracing.
  template <bool Tracing, bool Sampling>
  bool run_counted(closure_ref c, std::exception_ptr& error, std::uint32_t& until_sample) noexcept {
    bool sampled = false;
    if constexpr (Sampling) sampled = --until_sample == 0;
    if (!sampled && !Tracing) [[likely]]
      return call(c, error);
    return run_timed(c, error, sampled ? &until_sample : nullptr);
  }

  /// `restart_sample_count`: null, or the countdown to restart because `c` is a sample.
  [[gnu::noinline]] bool run_timed(closure_ref c, std::exception_ptr& error,
                                   std::uint32_t* restart_sample_count) noexcept {
    const std::uint64_t begin = trace_recorder::now_ns();
    const bool ok = call(c, error);
    const std::uint64_t end = trace_recorder::now_ns();
    const std::uint64_t took = end - begin;
    if (restart_sample_count != nullptr) {
      observer_.histogram.record(took);
      *restart_sample_count = next_sample_gap(end);
    }
    if (tracing_) {
      const std::uint32_t track =
          kind_ == closure_kind::async ? observer_.async_track : observer_.track;
      observer_.trace->complete(track, kind_, c.label(), step_, begin, took);
    }
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
  std::uint64_t start_ = 0;
  std::uint64_t ran_ = 0;
  std::uint32_t until_sample_ = 0;
  bool measuring_;
  bool tracing_;
};

}  // namespace stepflow::detail
