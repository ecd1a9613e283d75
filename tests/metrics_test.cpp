// metrics: the run-time histogram (buckets, percentiles, concurrent recording, merging), the
// total row, metrics_report() and the opt-in fmt formatter.

#include <stepflow/fmt.hpp>
#include <stepflow/metrics.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "run_time_histogram.hpp"

namespace stepflow {
namespace {

using detail::run_time_histogram;

// ---------------------------------------------------------------------------------------------
// closure_kind

TEST(ClosureKind, ToStringNamesEachKind) {
  EXPECT_EQ(to_string(closure_kind::sync), "sync");
  EXPECT_EQ(to_string(closure_kind::async), "async");
  EXPECT_EQ(to_string(closure_kind::joined), "joined");
  EXPECT_EQ(to_string(static_cast<closure_kind>(7)), "unknown");
}

// ---------------------------------------------------------------------------------------------
// Buckets

TEST(RunTimeHistogram, EveryValueLiesInItsBucketAndBucketsAreAtMostAQuarterWide) {
  std::vector<std::uint64_t> values;
  for (std::uint64_t v = 0; v < 5000; ++v) values.push_back(v);
  for (unsigned e = 12; e < 64; ++e) {
    const std::uint64_t p = std::uint64_t{1} << e;
    values.insert(values.end(), {p - 1, p, p + 1, p + p / 3, p + p / 2, p + p / 4 * 3});
  }
  values.push_back(std::numeric_limits<std::uint64_t>::max());
  for (const std::uint64_t v : values) {
    const std::size_t b = run_time_histogram::bucket_of(v);
    ASSERT_LT(b, run_time_histogram::bucket_count) << v;
    EXPECT_LE(v, run_time_histogram::upper_bound(b)) << v;
    if (b > 0) {
      EXPECT_GT(v, run_time_histogram::upper_bound(b - 1)) << v;
    }
    if (b != run_time_histogram::overflow_bucket && v >= 8) {
      // The upper bound overstates v by at most 25%.
      EXPECT_LE(run_time_histogram::upper_bound(b) - v, v / 4) << v;
    }
  }
}

TEST(RunTimeHistogram, SmallValuesAreExactAndTheRangeReachesAboutAMinute) {
  for (std::uint64_t v = 0; v < 8; ++v) {
    EXPECT_EQ(run_time_histogram::upper_bound(run_time_histogram::bucket_of(v)), v);
  }
  const std::uint64_t minute = 60'000'000'000;
  EXPECT_LT(run_time_histogram::bucket_of(minute), run_time_histogram::overflow_bucket);
  EXPECT_EQ(run_time_histogram::bucket_of(std::uint64_t{1} << 36),
            run_time_histogram::overflow_bucket);
  EXPECT_EQ(run_time_histogram::upper_bound(run_time_histogram::overflow_bucket - 1),
            (std::uint64_t{1} << 36) - 1);
}

TEST(RunTimeHistogram, BucketsAreContiguousAndIncreasing) {
  for (std::size_t b = 1; b + 1 < run_time_histogram::bucket_count; ++b) {
    const std::uint64_t first = run_time_histogram::upper_bound(b - 1) + 1;
    EXPECT_EQ(run_time_histogram::bucket_of(first), b);
    EXPECT_EQ(run_time_histogram::bucket_of(run_time_histogram::upper_bound(b)), b);
  }
}

// ---------------------------------------------------------------------------------------------
// Percentiles on known distributions

TEST(RunTimeHistogram, EmptyGivesZerosButKeepsTheExactCountAndSum) {
  run_time_histogram h;
  const run_time_stats s = h.stats(5, 500);
  EXPECT_EQ(s.count, 5u);
  EXPECT_EQ(s.sum_ns, 500u);
  EXPECT_EQ(s.sampled, 0u);
  EXPECT_EQ(s.max_ns, 0u);
  EXPECT_EQ(s.p50_ns, 0u);
  EXPECT_EQ(s.p99_ns, 0u);
}

TEST(RunTimeHistogram, ConstantDistributionReportsTheValueItself) {
  run_time_histogram h;
  for (int i = 0; i < 1000; ++i) h.record(1000);
  const run_time_stats s = h.stats(64'000, 64'000'000);
  EXPECT_EQ(s.count, 64'000u);
  EXPECT_EQ(s.sum_ns, 64'000'000u);
  EXPECT_EQ(s.sampled, 1000u);
  EXPECT_EQ(s.max_ns, 1000u);
  // The bucket [896, 1023] holds 1000; its upper bound is capped at the maximum.
  EXPECT_EQ(s.p50_ns, 1000u);
  EXPECT_EQ(s.p99_ns, 1000u);
}

TEST(RunTimeHistogram, UniformDistributionPercentilesAreWithinTheBucketError) {
  run_time_histogram h;
  for (std::uint64_t v = 1; v <= 10'000; ++v) h.record(v);
  const run_time_stats s = h.stats(10'000, 50'005'000);
  EXPECT_EQ(s.sampled, 10'000u);
  EXPECT_EQ(s.max_ns, 10'000u);
  EXPECT_GE(s.p50_ns, 5'000u);
  EXPECT_LE(s.p50_ns, 5'000u * 5 / 4);
  EXPECT_GE(s.p99_ns, 9'900u);
  EXPECT_LE(s.p99_ns, 10'000u);
  // The exact bucket bound: 5000 lies in [4096, 5119].
  EXPECT_EQ(s.p50_ns, 5'119u);
}

TEST(RunTimeHistogram, TailShowsInP99NotInP50) {
  run_time_histogram h;
  for (int i = 0; i < 980; ++i) h.record(100);       // 98%: 100 ns
  for (int i = 0; i < 20; ++i) h.record(2'000'000);  // 2%: 2 ms
  const run_time_stats s = h.stats(1000, 0);
  EXPECT_EQ(s.p50_ns, run_time_histogram::upper_bound(run_time_histogram::bucket_of(100)));
  EXPECT_LE(s.p50_ns, 125u);
  EXPECT_EQ(s.p99_ns, 2'000'000u);  // bucket bound capped at the maximum
  EXPECT_EQ(s.max_ns, 2'000'000u);
}

TEST(RunTimeHistogram, PercentileRankIsTheCeiling) {
  run_time_histogram::counts c{};
  c[run_time_histogram::bucket_of(1)] = 1;
  c[run_time_histogram::bucket_of(2)] = 1;
  // Two samples: p50 is the first (rank ceil(1.0) = 1), p99 the second (rank ceil(1.98) = 2).
  EXPECT_EQ(detail::percentile_ns(c, 50, 2), 1u);
  EXPECT_EQ(detail::percentile_ns(c, 99, 2), 2u);
  EXPECT_EQ(detail::percentile_ns(c, 100, 2), 2u);
  run_time_histogram::counts single{};
  single[run_time_histogram::bucket_of(7)] = 1;
  EXPECT_EQ(detail::percentile_ns(single, 1, 7), 7u);
  EXPECT_EQ(detail::percentile_ns(single, 99, 7), 7u);
}

TEST(RunTimeHistogram, OverflowValuesReportTheMaximum) {
  run_time_histogram h;
  const std::uint64_t two_minutes = 120'000'000'000;
  h.record(two_minutes);
  const run_time_stats s = h.stats(1, two_minutes);
  EXPECT_EQ(s.p50_ns, two_minutes);
  EXPECT_EQ(s.p99_ns, two_minutes);
  EXPECT_EQ(s.max_ns, two_minutes);
}

TEST(RunTimeHistogram, RandomSamplesAgreeWithExactPercentilesWithinTheBucketError) {
  const auto seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  std::lognormal_distribution<double> dist(8.0, 1.5);  // median ~3 us, long tail
  run_time_histogram h;
  std::vector<std::uint64_t> values;
  for (int i = 0; i < 20'000; ++i) {
    const auto v = static_cast<std::uint64_t>(dist(rng));
    values.push_back(v);
    h.record(v);
  }
  std::sort(values.begin(), values.end());
  const run_time_stats s = h.stats(values.size(), 0);
  const std::uint64_t p50 = values[values.size() / 2 - 1];  // rank ceil(0.5 n)
  const std::uint64_t p99 = values[values.size() * 99 / 100 - 1];
  EXPECT_GE(s.p50_ns, p50);
  EXPECT_LE(s.p50_ns, p50 + p50 / 4);
  EXPECT_GE(s.p99_ns, p99);
  EXPECT_LE(s.p99_ns, p99 + p99 / 4);
  EXPECT_EQ(s.max_ns, values.back());
}

// ---------------------------------------------------------------------------------------------
// Concurrency and merging

TEST(RunTimeHistogram, ConcurrentRecordFromFourThreadsLosesNothing) {
  run_time_histogram h;
  constexpr int threads = 4;
  constexpr std::uint64_t per_thread = 100'000;
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&h, t] {
      for (std::uint64_t i = 0; i < per_thread; ++i) {
        h.record(i % 1000 + static_cast<std::uint64_t>(t));  // max: 999 + 3
      }
    });
  }
  // Readers may run concurrently with writers.
  std::uint64_t observed = 0;
  for (int i = 0; i < 100; ++i) observed = std::max(observed, h.stats(0, 0).sampled);
  for (std::thread& th : pool) th.join();
  EXPECT_LE(observed, threads * per_thread);
  const run_time_stats s = h.stats(threads * per_thread, 0);
  EXPECT_EQ(s.sampled, threads * per_thread);
  EXPECT_EQ(s.max_ns, 1002u);
  run_time_histogram::counts c{};
  h.add_to(c);
  std::uint64_t in_bucket_0_to_3 = 0;
  for (std::size_t b = 0; b < 4; ++b) in_bucket_0_to_3 += c[b];
  // Values 0..3: thread t contributes (4 - t) of every 1000, each 100 times.
  EXPECT_EQ(in_bucket_0_to_3, (4u + 3u + 2u + 1u) * 100u);
}

TEST(RunTimeHistogram, MergedHistogramsEqualOneHistogramOfEverySample) {
  run_time_histogram a;
  run_time_histogram b;
  run_time_histogram both;
  for (std::uint64_t v = 1; v <= 3000; ++v) {
    (v % 3 == 0 ? a : b).record(v * 7);
    both.record(v * 7);
  }
  run_time_histogram::counts merged{};
  a.add_to(merged);
  b.add_to(merged);
  const run_time_stats m =
      detail::run_time_stats_from(merged, std::max(a.max_ns(), b.max_ns()), 3000, 123);
  const run_time_stats expected = both.stats(3000, 123);
  EXPECT_EQ(m.sampled, expected.sampled);
  EXPECT_EQ(m.p50_ns, expected.p50_ns);
  EXPECT_EQ(m.p99_ns, expected.p99_ns);
  EXPECT_EQ(m.max_ns, expected.max_ns);
  EXPECT_EQ(m.count, 3000u);
  EXPECT_EQ(m.sum_ns, 123u);
}

TEST(RunTimeHistogram, SampleIntervalIs256) { EXPECT_EQ(detail::run_time_sample_every, 256u); }

// ---------------------------------------------------------------------------------------------
// The total row

device_metrics sample_device(const std::string& name, std::uint64_t scale) {
  device_metrics d;
  d.device = name;
  d.steps = 10 * scale;
  d.added_sync = 1 * scale;
  d.added_async = 2 * scale;
  d.added_joined = 3 * scale;
  d.ran_sync = 4 * scale;
  d.ran_async = 5 * scale;
  d.ran_joined = 6 * scale;
  d.failed_sync = 7 * scale;
  d.failed_async = 8 * scale;
  d.failed_joined = 9 * scale;
  d.dropped_sync = 11 * scale;
  d.discarded_async = 12 * scale;
  d.waiting = 13 * scale;
  d.pending = 14 * scale;
  d.queue_high_water = 15 * scale;
  d.blocked_ns = 1'500'000 * scale;
  d.async_tasks = 16 * scale;
  d.run_time.count = 100 * scale;
  d.run_time.sum_ns = 250'000 * scale;
  d.run_time.max_ns = 40'000 * scale;
  d.run_time.p50_ns = 2'000 * scale;
  d.run_time.p99_ns = 30'000 * scale;
  d.run_time.sampled = 2 * scale;
  return d;
}

TEST(TotalOf, SumsCountersAndTakesMaximaAndMergesPercentiles) {
  run_time_histogram ha;
  run_time_histogram hb;
  for (int i = 0; i < 99; ++i) ha.record(1000);
  hb.record(5'000'000);
  device_metrics a = sample_device("a", 1);
  device_metrics b = sample_device("b", 3);
  a.run_time = ha.stats(a.run_time.count, a.run_time.sum_ns);
  b.run_time = hb.stats(b.run_time.count, b.run_time.sum_ns);
  run_time_histogram::counts merged{};
  ha.add_to(merged);
  hb.add_to(merged);
  const device_metrics t = detail::total_of({a, b}, merged);
  EXPECT_EQ(t.device, "total");
  EXPECT_EQ(t.steps, 40u);
  EXPECT_EQ(t.added_sync, 4u);
  EXPECT_EQ(t.added_async, 8u);
  EXPECT_EQ(t.added_joined, 12u);
  EXPECT_EQ(t.ran_sync, 16u);
  EXPECT_EQ(t.ran_async, 20u);
  EXPECT_EQ(t.ran_joined, 24u);
  EXPECT_EQ(t.failed_sync, 28u);
  EXPECT_EQ(t.failed_async, 32u);
  EXPECT_EQ(t.failed_joined, 36u);
  EXPECT_EQ(t.dropped_sync, 44u);
  EXPECT_EQ(t.discarded_async, 48u);
  EXPECT_EQ(t.waiting, 52u);
  EXPECT_EQ(t.pending, 56u);
  EXPECT_EQ(t.queue_high_water, 45u);  // max, not sum
  EXPECT_EQ(t.blocked_ns, 6'000'000u);
  EXPECT_EQ(t.async_tasks, 64u);
  EXPECT_EQ(t.run_time.count, 400u);
  EXPECT_EQ(t.run_time.sum_ns, 1'000'000u);
  EXPECT_EQ(t.run_time.sampled, 100u);
  EXPECT_EQ(t.run_time.max_ns, 5'000'000u);
  // Merged: 99 samples of 1 us and one of 5 ms. p99 (rank 99) is in 1 us's bucket [896, 1023];
  // a max of the devices' p99 would have said 5 ms.
  EXPECT_EQ(t.run_time.p50_ns, 1023u);
  EXPECT_EQ(t.run_time.p99_ns, 1023u);
  EXPECT_EQ(a.run_time.p99_ns, 1000u);  // alone, capped at the device's own maximum
  EXPECT_EQ(b.run_time.p99_ns, 5'000'000u);
}

TEST(TotalOf, NoDevicesGivesAZeroTotal) {
  const device_metrics t = detail::total_of({}, run_time_histogram::counts{});
  EXPECT_EQ(t.device, "total");
  EXPECT_EQ(t.steps, 0u);
  EXPECT_EQ(t.run_time.sampled, 0u);
  EXPECT_EQ(t.run_time.p99_ns, 0u);
}

// ---------------------------------------------------------------------------------------------
// The report

metrics_snapshot sample_snapshot() {
  metrics_snapshot s;
  s.devices.push_back(sample_device("cpu:0", 1));
  s.devices.push_back(sample_device("a-rather-long-device-name:1", 2));
  device_metrics idle;
  idle.device = "idle";
  s.devices.push_back(idle);
  s.total = detail::total_of(s.devices, run_time_histogram::counts{});
  return s;
}

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> lines;
  std::string::size_type start = 0;
  while (start < text.size()) {
    const auto end = text.find('\n', start);
    lines.push_back(text.substr(start, end - start));
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return lines;
}

TEST(MetricsReport, HasARowForEveryDeviceAndTheTotalInBothTables) {
  const metrics_snapshot s = sample_snapshot();
  const std::string report = metrics_report(s);
  SCOPED_TRACE(report);
  ASSERT_FALSE(report.empty());
  EXPECT_EQ(report.back(), '\n');
  const std::vector<std::string> lines = lines_of(report);
  for (const std::string name : {"cpu:0", "a-rather-long-device-name:1", "idle", "total"}) {
    const auto rows = std::count_if(lines.begin(), lines.end(), [&](const std::string& l) {
      return l.rfind("  " + name + " ", 0) == 0;
    });
    EXPECT_EQ(rows, 2) << name;  // one in the closures table, one in the run-time table
  }
  EXPECT_NE(report.find("stepflow metrics: 3 devices"), std::string::npos);
  for (const char* column :
       {"steps", "added", "ran", "failed", "dropped", "discarded", "waiting", "pending",
        "queue max", "blocked", "closures", "mean", "p50", "p99", "max", "sampled"}) {
    EXPECT_NE(report.find(column), std::string::npos) << column;
  }
}

TEST(MetricsReport, RowsOfATableAreTheSameWidthAndHaveNoTrailingBlanks) {
  const std::string report = metrics_report(sample_snapshot());
  SCOPED_TRACE(report);
  const std::vector<std::string> lines = lines_of(report);
  // The closures table's header, 3 device rows, the rule and the total row.
  std::size_t header = 0;
  while (header < lines.size() && lines[header].rfind("  device", 0) != 0) ++header;
  ASSERT_LT(header + 5, lines.size());
  for (std::size_t i = header; i <= header + 5; ++i) {
    EXPECT_EQ(lines[i].size(), lines[header].size()) << lines[i];
  }
  EXPECT_EQ(lines[header + 4].find_first_not_of(" -"), std::string::npos);  // the rule
  for (const std::string& l : lines) {
    if (!l.empty()) {
      EXPECT_NE(l.back(), ' ') << l;
    }
  }
}

TEST(MetricsReport, ShowsCountsAndHumanReadableDurations) {
  metrics_snapshot s;
  device_metrics d;
  d.device = "gpu";
  d.added_sync = 12;
  d.added_async = 34;
  d.added_joined = 5;
  d.blocked_ns = 1'500'000;  // 1.50 ms
  d.run_time.count = 4;
  d.run_time.sum_ns = 48'000;  // 48.0 us, mean 12.0 us
  d.run_time.sampled = 1;
  d.run_time.p50_ns = 734;            // 734 ns
  d.run_time.p99_ns = 2'500'000'000;  // 2.50 s
  d.run_time.max_ns = 999'999;        // rounds to 1000 us: shown as 1.00 ms
  s.devices.push_back(d);
  s.total = d;
  s.total.device = "total";
  const std::string report = metrics_report(s);
  SCOPED_TRACE(report);
  for (const char* text : {"12/34/5", "1.50 ms", "48.0 us", "12.0 us", "734 ns", "2.50 s",
                           "1.00 ms", "stepflow metrics: 1 device\n"}) {
    EXPECT_NE(report.find(text), std::string::npos) << text;
  }
  EXPECT_EQ(report.find("1000 us"), std::string::npos);
}

TEST(MetricsReport, UntimedDevicesShowDashes) {
  metrics_snapshot s;
  s.devices.push_back(device_metrics{});
  s.devices.back().device = "fresh";
  const std::string report = metrics_report(s);
  SCOPED_TRACE(report);
  // The total row is labelled even when the snapshot's total has no name.
  EXPECT_NE(report.find("  total "), std::string::npos);
  EXPECT_NE(report.find(" -"), std::string::npos);
  EXPECT_NE(report.find("0 ns"), std::string::npos);  // blocked
}

TEST(MetricsReport, FmtFormatterPrintsTheReport) {
  const metrics_snapshot s = sample_snapshot();
  EXPECT_EQ(fmt::format("{}", s), metrics_report(s));
  EXPECT_EQ(fmt::format("before\n{}after", s), "before\n" + metrics_report(s) + "after");
}

}  // namespace
}  // namespace stepflow
