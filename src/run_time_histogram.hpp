#pragma once
// The distribution of closure run times: a log-scale histogram fed with a sample of closures.
//
// Why a sample: reading the clock costs 20-35 ns (two reads per closure would double the cost
// of a small closure), so a step's closures are timed as a batch (count and sum are exact) and
// only about one closure in `run_time_sample_every` is timed on its own for the distribution.
//
// Why log-scale buckets of atomics: recording is one relaxed `fetch_add` and, rarely, a CAS for
// the maximum; no lock, no allocation, fixed memory (about 1 KiB per histogram), and histograms
// of several devices merge by adding their buckets, which gives true percentiles for the total.

#include <array>
#include <atomic>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "stepflow/metrics.hpp"

namespace stepflow::detail {

/// One closure in 256, on average, is timed individually for the distribution; count and sum come
/// from batch timing. The count runs across batches (`closure_observer::until_sample`), so a
/// device whose steps have one closure each is not timed at every step.
inline constexpr std::uint32_t run_time_sample_every = 256;

/// The closures from one sample to the next, given the clock (`now_ns()`) when the first ended:
/// 128 to 383, 256 on average. Why not always 256: with steps of k closures where k divides 256,
/// every sample would be the same closure of its step (the first of every 4, say), so p50 and
/// p99 would describe that one closure. The clock's low bits, hashed, vary enough for this and
/// cost nothing.
constexpr std::uint32_t next_sample_gap(std::uint64_t clock_ns) noexcept {
  return run_time_sample_every / 2 +
         static_cast<std::uint32_t>((clock_ns * 0x9E3779B97F4A7C15ull) >> 56);
}

/// A histogram of durations in nanoseconds: 4 buckets per power of two (each at most 25% wide
/// relative to its lower bound), exact below 8 ns, covering 0 ns to 2^36 ns (about 68.7 s), and one
/// overflow bucket above that. Thread-safety: `record` may run concurrently with itself and with
/// every reader; readers see each bucket's value at some moment of the read, not one consistent
/// cut of all buckets, which is exact once recording has stopped.
class run_time_histogram {
 public:
  static constexpr unsigned sub_bucket_bits = 2;  // 4 sub-buckets per power of two
  static constexpr unsigned sub_buckets = 1u << sub_bucket_bits;
  static constexpr unsigned max_exponent = 35;  // the largest power of two covered: [2^35, 2^36)
  /// Regular buckets, then the overflow bucket (durations of 2^36 ns and more).
  static constexpr std::size_t bucket_count = sub_buckets * max_exponent + 1;
  static constexpr std::size_t overflow_bucket = bucket_count - 1;

  using counts = std::array<std::uint64_t, bucket_count>;

  /// The bucket that holds `ns`. Constant-time (a bit scan).
  static constexpr std::size_t bucket_of(std::uint64_t ns) noexcept {
    if (ns < sub_buckets) return static_cast<std::size_t>(ns);
    const auto exponent = static_cast<unsigned>(std::bit_width(ns)) - 1;  // >= sub_bucket_bits
    if (exponent > max_exponent) return overflow_bucket;
    const auto sub = static_cast<unsigned>(ns >> (exponent - sub_bucket_bits)) & (sub_buckets - 1);
    return static_cast<std::size_t>(sub_buckets * (exponent - 1) + sub);
  }

  /// The largest duration that falls in `bucket` (`UINT64_MAX` for the overflow bucket).
  /// Precondition: `bucket < bucket_count`.
  static constexpr std::uint64_t upper_bound(std::size_t bucket) noexcept {
    if (bucket < sub_buckets) return bucket;
    if (bucket >= overflow_bucket) return std::numeric_limits<std::uint64_t>::max();
    const auto exponent = static_cast<unsigned>(bucket / sub_buckets) + 1;
    const auto sub = static_cast<std::uint64_t>(bucket % sub_buckets);
    return ((sub_buckets + sub + 1) << (exponent - sub_bucket_bits)) - 1;
  }

  run_time_histogram() noexcept = default;
  run_time_histogram(const run_time_histogram&) = delete;
  run_time_histogram& operator=(const run_time_histogram&) = delete;

  /// Adds one sampled duration. Lock-free, never blocks, never allocates; thread-safe.
  /// Costs one relaxed atomic add (plus a CAS when `ns` is a new maximum).
  void record(std::uint64_t ns) noexcept {
    buckets_[bucket_of(ns)].fetch_add(1, std::memory_order_relaxed);
    // Relaxed: the maximum is a statistic, ordered with nothing else.
    std::uint64_t seen = max_.load(std::memory_order_relaxed);
    while (ns > seen && !max_.compare_exchange_weak(seen, ns, std::memory_order_relaxed)) {
    }
  }

  /// `count` and `sum_ns` as given (exact, from batch timing), `sampled`, `max_ns`, `p50_ns` and
  /// `p99_ns` from this histogram. Thread-safe.
  run_time_stats stats(std::uint64_t exact_count, std::uint64_t exact_sum_ns) const noexcept;

  /// Adds this histogram's bucket counts to `totals` (to merge devices for the total row).
  /// Thread-safe.
  void add_to(counts& totals) const noexcept;

  /// The largest sampled duration, 0 if none. Thread-safe.
  std::uint64_t max_ns() const noexcept { return max_.load(std::memory_order_relaxed); }

 private:
  std::array<std::atomic<std::uint64_t>, bucket_count> buckets_{};
  std::atomic<std::uint64_t> max_{0};
};

/// The `q`-th percentile (0 < q <= 100) of the durations counted in `counts`: the upper bound of
/// the bucket that holds the sample of rank ceil(q% of the total), capped at `max_ns` (so a
/// percentile never exceeds the largest duration seen). 0 when `counts` is empty.
std::uint64_t percentile_ns(const run_time_histogram::counts& counts, unsigned q,
                            std::uint64_t max_ns) noexcept;

/// `run_time_stats` from bucket counts (one histogram's, or several merged with `add_to`) and the
/// largest sampled duration among them; `count` and `sum_ns` are copied from the exact values.
run_time_stats run_time_stats_from(const run_time_histogram::counts& counts, std::uint64_t max_ns,
                                   std::uint64_t exact_count, std::uint64_t exact_sum_ns) noexcept;

/// The `total` row of a snapshot (`device == "total"`): every counter, gauge and duration summed;
/// `queue_high_water` the maximum over `devices`; `run_time` from `merged` (every device's
/// histogram added with `add_to`): `count`, `sum_ns` summed, `max_ns` the maximum, percentiles
/// over all samples together. May throw `std::bad_alloc` (the name).
device_metrics total_of(const std::vector<device_metrics>& devices,
                        const run_time_histogram::counts& merged);

}  // namespace stepflow::detail
