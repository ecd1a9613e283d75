#include "run_time_histogram.hpp"

#include <algorithm>

namespace stepflow::detail {

run_time_stats run_time_histogram::stats(std::uint64_t exact_count,
                                         std::uint64_t exact_sum_ns) const noexcept {
  counts c{};
  add_to(c);
  return run_time_stats_from(c, max_ns(), exact_count, exact_sum_ns);
}

void run_time_histogram::add_to(counts& totals) const noexcept {
  for (std::size_t i = 0; i < bucket_count; ++i) {
    totals[i] += buckets_[i].load(std::memory_order_relaxed);
  }
}

std::uint64_t percentile_ns(const run_time_histogram::counts& counts, unsigned q,
                            std::uint64_t max_ns) noexcept {
  std::uint64_t total = 0;
  for (const std::uint64_t n : counts) total += n;
  if (total == 0) return 0;
  q = std::clamp(q, 1u, 100u);
  // rank = ceil(total * q / 100), without overflowing for any total.
  std::uint64_t rank = total / 100 * q + (total % 100 * q + 99) / 100;
  rank = std::clamp<std::uint64_t>(rank, 1, total);
  std::uint64_t seen = 0;
  for (std::size_t i = 0; i < counts.size(); ++i) {
    seen += counts[i];
    if (seen >= rank) return std::min(run_time_histogram::upper_bound(i), max_ns);
  }
  return max_ns;  // unreachable: seen reaches total >= rank
}

run_time_stats run_time_stats_from(const run_time_histogram::counts& counts, std::uint64_t max_ns,
                                   std::uint64_t exact_count, std::uint64_t exact_sum_ns) noexcept {
  run_time_stats s;
  s.count = exact_count;
  s.sum_ns = exact_sum_ns;
  for (const std::uint64_t n : counts) s.sampled += n;
  if (s.sampled != 0) {
    s.max_ns = max_ns;
    s.p50_ns = percentile_ns(counts, 50, max_ns);
    s.p99_ns = percentile_ns(counts, 99, max_ns);
  }
  return s;
}

device_metrics total_of(const std::vector<device_metrics>& devices,
                        const run_time_histogram::counts& merged) {
  device_metrics t;
  t.device = "total";
  std::uint64_t run_count = 0;
  std::uint64_t run_sum = 0;
  std::uint64_t run_max = 0;
  for (const device_metrics& d : devices) {
    t.steps += d.steps;
    t.added_sync += d.added_sync;
    t.added_async += d.added_async;
    t.added_joined += d.added_joined;
    t.ran_sync += d.ran_sync;
    t.ran_async += d.ran_async;
    t.ran_joined += d.ran_joined;
    t.failed_sync += d.failed_sync;
    t.failed_async += d.failed_async;
    t.failed_joined += d.failed_joined;
    t.dropped_sync += d.dropped_sync;
    t.discarded_async += d.discarded_async;
    t.waiting += d.waiting;
    t.pending += d.pending;
    t.queue_high_water = std::max(t.queue_high_water, d.queue_high_water);
    t.blocked_ns += d.blocked_ns;
    t.async_tasks += d.async_tasks;
    run_count += d.run_time.count;
    run_sum += d.run_time.sum_ns;
    run_max = std::max(run_max, d.run_time.max_ns);
  }
  t.run_time = run_time_stats_from(merged, run_max, run_count, run_sum);
  return t;
}

}  // namespace stepflow::detail
