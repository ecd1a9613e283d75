// Metrics snapshots and the timeline trace, wired into a real scheduler.

#include <stepflow/flow.hpp>
#include <stepflow/fmt.hpp>
#include <stepflow/stepflow.hpp>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <unistd.h>

#include "support/test_options.hpp"
#include "support/tsan_handoff.hpp"

namespace stepflow {
namespace {

options quiet(std::size_t max_queue = 100) { return testing::quiet_options(max_queue); }

options measuring_run_time() {
  options o = quiet();
  o.measure_run_time = true;
  return o;
}

const device_metrics& row(const metrics_snapshot& m, const std::string& device) {
  for (const device_metrics& d : m.devices) {
    if (d.device == device) return d;
  }
  throw std::runtime_error("no row for " + device);
}

TEST(Metrics, CountEveryOutcomeOfEveryKind) {
  scheduler s(measuring_run_time());
  device_context& d = s.device("gpu0");
  // Step 1: 3 sync (the second throws, the third is dropped), 4 async (the second throws, the
  // rest are discarded).
  d.add_step_closure([] {});
  d.add_step_closure([] { throw std::runtime_error("sync"); });
  d.add_step_closure([] {});
  d.add_step_closure(run_async, [] {});
  d.add_step_closure(run_async, [] { throw std::runtime_error("async"); });
  d.add_step_closure(run_async, [] {});
  d.add_step_closure(run_async, [] {});
  EXPECT_THROW(d.run_step_closures(), std::runtime_error);
  EXPECT_THROW(d.flush(), async_closure_error);
  // Two closures waiting for a step end.
  d.add_step_closure([] {});
  d.add_step_closure(run_async, [] {});
  s.add_joined_step_closure([] {});
  s.device("gpu1").add_step_closure(run_async, [] {});
  s.device("gpu1").run_step_closures();
  s.device("gpu1").flush();

  const metrics_snapshot m = s.metrics();
  const device_metrics& g0 = row(m, "gpu0");
  EXPECT_EQ(g0.steps, 1u);
  EXPECT_EQ(g0.added_sync, 4u);
  EXPECT_EQ(g0.added_async, 5u);
  EXPECT_EQ(g0.ran_sync, 2u);
  EXPECT_EQ(g0.failed_sync, 1u);
  EXPECT_EQ(g0.dropped_sync, 1u);
  EXPECT_EQ(g0.ran_async, 2u);
  EXPECT_EQ(g0.failed_async, 1u);
  EXPECT_EQ(g0.discarded_async, 2u);
  EXPECT_EQ(g0.waiting, 2u);
  EXPECT_EQ(g0.pending, 0u);
  EXPECT_GE(g0.queue_high_water, 4u);
  EXPECT_EQ(g0.run_time.count, 4u);  // 2 sync + 2 async ran
  EXPECT_GE(g0.run_time.sampled, 1u);
  const device_metrics& joined = row(m, "joined");
  EXPECT_EQ(joined.added_joined, 1u);
  EXPECT_EQ(m.total.added_sync, 4u);
  EXPECT_EQ(m.total.added_async, 6u);
  EXPECT_EQ(m.total.ran_async, 3u);
  EXPECT_EQ(m.total.added_joined, 1u);

  const std::string report = metrics_report(m);
  EXPECT_NE(report.find("gpu0"), std::string::npos) << report;
  EXPECT_NE(report.find("gpu1"), std::string::npos) << report;
  EXPECT_NE(report.find("total"), std::string::npos) << report;
  EXPECT_EQ(fmt::format("{}", m), report);
}

// One closure in 256 is timed alone, counted across batches: a device whose steps each have one
// closure is not timed at every step (it was, when the count restarted with every batch).
TEST(Metrics, AboutOneClosureIn256IsSampledAcrossSteps) {
  scheduler s(measuring_run_time());
  device_context& d = s.device("d");
  std::uint64_t calls = 0;
  for (int step = 0; step < 1000; ++step) {
    d.add_step_closure([&calls] { ++calls; });
    d.run_step_closures();
  }
  const metrics_snapshot snapshot = s.metrics();
  const device_metrics& m = row(snapshot, "d");
  EXPECT_EQ(calls, 1000u);
  EXPECT_EQ(m.run_time.count, 1000u);
  // The first closure, then one after every gap of 128 to 383 closures, counted across steps
  // (only the step-ending thread runs this device's batches): 1 + 999 / 383 to 1 + 999 / 128.
  EXPECT_GE(m.run_time.sampled, 3u);
  EXPECT_LE(m.run_time.sampled, 8u);
}

// With steps of 64 closures, a gap of exactly 256 would time only the first closure of a step.
// Here that closure is the slow one, so p50 would be the slow closure's time.
TEST(Metrics, SamplesAreNotAlwaysTheSameClosureOfAStep) {
  scheduler s(measuring_run_time());
  device_context& d = s.device("d");
  constexpr auto slow = std::chrono::microseconds(100);
  for (int step = 0; step < 256; ++step) {
    d.add_step_closure([slow] {
      const auto until = std::chrono::steady_clock::now() + slow;
      while (std::chrono::steady_clock::now() < until) {
      }
    });
    for (int i = 1; i < 64; ++i) d.add_step_closure([] {});
    d.run_step_closures();
  }
  const run_time_stats t = row(s.metrics(), "d").run_time;
  EXPECT_EQ(t.count, 256u * 64u);
  ASSERT_GE(t.sampled, 32u);  // 16,384 closures at gaps of at most 383
  // About 1 sample in 64 is a slow closure; the median is an empty one, far below 100 us.
  EXPECT_LT(t.p50_ns, 100'000u) << "samples: " << t.sampled << ", max " << t.max_ns;
  EXPECT_GE(t.max_ns, 100'000u);  // and the first closure ever, a slow one, is sampled
}

// Sync closures count as run whichever thread ends their step: the one that added them or
// another.
TEST(Metrics, SyncClosuresRunByTheOwnerAndByOtherThreadsAreAllCounted) {
  scheduler s(quiet());
  device_context& d = s.device("d");
  for (int i = 0; i < 3; ++i) d.add_step_closure([] {});
  d.run_step_closures();  // by the thread that added them
  for (int i = 0; i < 2; ++i) d.add_step_closure([] {});
  std::thread([&] { d.run_step_closures(); }).join();  // by another thread
  const metrics_snapshot snapshot = s.metrics();
  const device_metrics& m = row(snapshot, "d");
  EXPECT_EQ(m.steps, 2u);
  EXPECT_EQ(m.ran_sync, 5u);
  EXPECT_EQ(m.waiting, 0u);
}

/// `steps` steps of device "d", each with one sync, one async and one joined closure, flushed.
metrics_snapshot one_of_each_kind(const options& o, int steps) {
  scheduler s(o);
  device_context& d = s.device("d");
  for (int step = 0; step < steps; ++step) {
    d.add_step_closure([] {});
    d.add_step_closure(run_async, [] {});
    s.add_joined_step_closure([] {});
    d.run_step_closures();
  }
  s.flush();
  return s.metrics();
}

// By default (options::measure_run_time off) nothing is timed (no clock read, no sample), every
// other counter is exact, and the report says why its run-time table is missing.
TEST(Metrics, ByDefaultRunTimeIsNotMeasuredAndTheCountersAreExact) {
  // More than 256 closures per device: a sampling countdown would fire.
  const metrics_snapshot m = one_of_each_kind(quiet(), 300);
  EXPECT_FALSE(m.run_time_measured);
  const device_metrics& dev = row(m, "d");
  EXPECT_EQ(dev.ran_sync, 300u);
  EXPECT_EQ(dev.ran_async, 300u);
  EXPECT_EQ(row(m, "joined").ran_joined, 300u);
  for (const device_metrics* r : {&dev, &row(m, "joined"), &m.total}) {
    EXPECT_EQ(r->run_time.count, 0u) << r->device;
    EXPECT_EQ(r->run_time.sum_ns, 0u) << r->device;
    EXPECT_EQ(r->run_time.sampled, 0u) << r->device;
    EXPECT_EQ(r->run_time.max_ns, 0u) << r->device;
  }
  const std::string report = metrics_report(m);
  EXPECT_NE(report.find("run time: not measured (turn on with options::measure_run_time"),
            std::string::npos)
      << report;
  EXPECT_EQ(report.find("p99"), std::string::npos) << report;
}

TEST(Metrics, RunTimeIsMeasuredWhenSwitchedOn) {
  const metrics_snapshot m = one_of_each_kind(measuring_run_time(), 300);
  EXPECT_TRUE(m.run_time_measured);
  EXPECT_EQ(row(m, "d").run_time.count, 600u);
  EXPECT_EQ(row(m, "joined").run_time.count, 300u);
  EXPECT_GE(m.total.run_time.sampled, 3u);  // closures 1 and 257 of "d", 1 of "joined"
  EXPECT_NE(metrics_report(m).find("p99"), std::string::npos);
}

TEST(Metrics, TimeBlockedOnAFullQueueIsMeasured) {
  scheduler s(quiet(1));
  device_context& d = s.device("d");
  std::atomic<bool> started{false};
  std::atomic<bool> release{false};
  d.add_step_closure(run_async, [&] {
    started = true;
    while (!release.load()) std::this_thread::yield();
  });
  d.run_step_closures();
  while (!started.load()) std::this_thread::yield();
  // The queue now holds nothing pending but its drainer is busy: fill it, then block.
  d.add_step_closure(run_async, [] {});
  d.run_step_closures();
  d.add_step_closure(run_async, [] {});
  std::thread releaser([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    release = true;
  });
  d.run_step_closures();  // waits for room until the first closure returns
  releaser.join();
  d.flush();
  EXPECT_GT(s.metrics().devices.at(0).blocked_ns, 0u);
}

// Runs `steps` steps of `per_step` asynchronous closures each, `pause` apart, then flushes;
// returns the device's async_tasks. Checks that every closure ran, in order.
std::uint64_t async_tasks_of_paced_steps(std::chrono::microseconds linger, int steps,
                                         std::chrono::microseconds pause) {
  options o = quiet();
  o.worker_linger = linger;
  scheduler s(o);
  device_context& d = s.device("d");
  constexpr int per_step = 3;
  std::vector<int> order;  // written by one closure at a time, in FIFO order
  for (int step = 0; step < steps; ++step) {
    for (int i = 0; i < per_step; ++i) {
      d.add_step_closure(run_async, [&order, n = step * per_step + i] { order.push_back(n); });
    }
    d.run_step_closures();
    std::this_thread::sleep_for(pause);
  }
  d.flush();
  EXPECT_EQ(order.size(), static_cast<std::size_t>(steps * per_step));
  for (std::size_t i = 0; i < order.size(); ++i) {
    if (order[i] != static_cast<int>(i)) {
      ADD_FAILURE() << "closure " << order[i] << " ran in place " << i;
      break;
    }
  }
  const device_metrics m = row(s.metrics(), "d");
  EXPECT_EQ(m.ran_async, static_cast<std::uint64_t>(steps * per_step));
  EXPECT_NE(metrics_report(s.metrics()).find("tasks"), std::string::npos);
  return m.async_tasks;
}

TEST(Metrics, AWorkerLingeringLongerThanTheStepPeriodRunsLaterStepsWithoutNewTasks) {
  // Steps 2 ms apart: far beyond the default linger (100 us), so without the option every step
  // starts a task; with 1 s the worker that ran a step is still watching when the next one comes,
  // and runs it without a new task. Each step is handed over 2 ms after the previous step's
  // closures ran, so that the worker is lingering by then, not still draining.
  //
  // By design a worker stops lingering while other processes keep every CPU busy (a yield that
  // takes over 1 ms stops all spinning for 20 ms), as under a parallel test run, and such a step
  // starts a task. One step run by a lingering worker is what this test asks for, so it steps on
  // until one is (on an idle machine, the second step), and gives up after 20 s: a generous bound,
  // not a timing claim, which only CPUs saturated for all that time could reach; a worker that
  // does not linger across the pause never gets there.
  options o = quiet();
  o.worker_linger = std::chrono::seconds(1);
  scheduler s(o);
  device_context& d = s.device("d");
  constexpr int per_step = 3;
  std::atomic<int> ran{0};
  std::vector<int> order;  // written by one closure at a time, in FIFO order
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  std::uint64_t steps = 0;
  std::uint64_t tasks = 0;
  do {
    for (int i = 0; i < per_step; ++i) {
      d.add_step_closure(run_async, [&, n = static_cast<int>(steps) * per_step + i] {
        order.push_back(n);
        ++ran;
      });
    }
    d.run_step_closures();
    ++steps;
    // Nobody flushes: the closures run on the worker. (A hang bound, not a timing claim.)
    const auto hang_bound = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (ran.load() < static_cast<int>(steps) * per_step &&
           std::chrono::steady_clock::now() < hang_bound) {
      std::this_thread::yield();
    }
    ASSERT_EQ(ran.load(), static_cast<int>(steps) * per_step) << "step " << steps << " never ran";
    tasks = row(s.metrics(), "d").async_tasks;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  } while (tasks >= steps && std::chrono::steady_clock::now() < give_up);
  d.flush();
  EXPECT_GE(tasks, 1u);
  EXPECT_LT(tasks, steps) << "every one of " << steps
                          << " steps 2 ms apart started a task: the worker did not linger";
  ASSERT_EQ(order.size(), steps * per_step);
  for (std::size_t i = 0; i < order.size(); ++i) {
    ASSERT_EQ(order[i], static_cast<int>(i)) << "closures ran out of order";
  }
}

TEST(Metrics, AWorkerThatNeverLingersStillRunsEveryStepInOrder) {
  // Linger 0: every step that finds the queue idle enqueues a task of its own (or a late one
  // from before runs it).
  for (const std::chrono::microseconds pause :
       {std::chrono::microseconds(0), std::chrono::microseconds(500)}) {
    const std::uint64_t tasks = async_tasks_of_paced_steps(std::chrono::microseconds(0), 40, pause);
    EXPECT_GE(tasks, 1u);
    EXPECT_LE(tasks, 40u);
  }
}

std::string temp_path(const char* name) {
  return (std::filesystem::temp_directory_path() /
          (std::string(name) + "-" + std::to_string(::getpid()) + ".json"))
      .string();
}

options tracing_to(const std::string& path) {
  options o = quiet();
  o.trace_path = path;
  return o;
}

// The trace file at `path`, parsed, then removed. Throws (failing the test) when there is none or
// it is not one valid JSON document.
nlohmann::json take_trace(const std::string& path) {
  nlohmann::json trace;
  {
    std::ifstream in(path);
    if (!in) throw std::runtime_error("no trace file " + path);
    trace = nlohmann::json::parse(in);
  }
  std::remove(path.c_str());
  return trace;
}

// The trace times every closure it records, whether or not the metrics measure run time.
class TraceWithRunTime : public ::testing::TestWithParam<bool> {};

TEST_P(TraceWithRunTime, RecordsEveryClosureWithItsKindStepAndLabel) {
  const std::string path = temp_path("stepflow-trace");
  {
    options o = quiet();
    o.trace_path = path;
    o.measure_run_time = GetParam();
    scheduler s(o);
    device_context& d = s.device("gpu0");
    for (int step = 1; step <= 3; ++step) {
      d.add_step_closure(labeled("print_loss", [] {}));
      d.add_step_closure(run_async, labeled("write_metrics", [](int) {}), step);
      s.add_joined_step_closure(labeled("mean_loss", [](std::uint64_t) {}));
      d.run_step_closures();
    }
    s.flush();  // writes the file
  }
  const nlohmann::json trace = take_trace(path);
  const auto& events = trace.at("traceEvents");
  std::multiset<std::string> names;
  std::set<std::uint64_t> async_steps;
  bool depth_counter = false;
  for (const auto& e : events) {
    if (e.at("ph") == "X") {
      names.insert(e.at("name").get<std::string>());
      EXPECT_TRUE(e.contains("ts") && e.contains("dur") && e.contains("tid")) << e.dump();
      if (e.at("name") == "write_metrics") {
        EXPECT_EQ(e.at("cat"), "async");
        async_steps.insert(e.at("args").at("step").get<std::uint64_t>());
      }
      if (e.at("name") == "print_loss") {
        EXPECT_EQ(e.at("cat"), "sync");
      }
      if (e.at("name") == "mean_loss") {
        EXPECT_EQ(e.at("cat"), "joined");
      }
    } else if (e.at("ph") == "C") {
      if (e.at("name").get<std::string>().find("queue depth gpu0") != std::string::npos) {
        depth_counter = true;
      }
    }
  }
  EXPECT_EQ(names.count("print_loss"), 3u);
  EXPECT_EQ(names.count("write_metrics"), 3u);
  EXPECT_EQ(names.count("mean_loss"), 3u);
  EXPECT_EQ(async_steps, (std::set<std::uint64_t>{1, 2, 3}));
  EXPECT_TRUE(depth_counter);
}

INSTANTIATE_TEST_SUITE_P(Trace, TraceWithRunTime, ::testing::Bool(),
                         [](const auto& info) { return info.param ? "Measured" : "NotMeasured"; });

TEST(Trace, ADevicesSyncAndAsyncClosuresRunAtOnceGetTracksOfTheirOwnSoNoEventsOverlap) {
  // A step's async closures run while its step end runs the sync ones. Complete events on one
  // track must nest: Perfetto drops overlapping ones, so both kinds on one track lost events.
  const std::string path = temp_path("stepflow-trace-overlap");
  {
    scheduler s(tracing_to(path));
    device_context& d = s.device("gpu0");
    std::atomic<bool> async_started{false};
    for (int step = 0; step < 3; ++step) {
      async_started = false;
      d.add_step_closure(run_async, [&] {
        async_started = true;
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      });
      // The sync closure waits until the async one runs, so the two overlap in every step.
      d.add_step_closure([&] {
        const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
        while (!async_started && std::chrono::steady_clock::now() < give_up) {
          std::this_thread::yield();
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      });
      d.run_step_closures();
    }
    s.flush();
  }
  const nlohmann::json trace = take_trace(path);
  std::map<std::uint64_t, std::string> track_names;
  std::map<std::uint64_t, std::vector<std::pair<double, double>>> spans;  // tid -> [ts, end)
  std::map<std::string, std::set<std::uint64_t>> tids_by_kind;
  for (const auto& e : trace.at("traceEvents")) {
    if (e.at("ph") == "M" && e.at("name") == "thread_name") {
      track_names[e.at("tid").get<std::uint64_t>()] = e.at("args").at("name").get<std::string>();
    } else if (e.at("ph") == "X") {
      const auto tid = e.at("tid").get<std::uint64_t>();
      const double ts = e.at("ts").get<double>();
      spans[tid].emplace_back(ts, ts + e.at("dur").get<double>());
      tids_by_kind[e.at("cat").get<std::string>()].insert(tid);
    }
  }
  ASSERT_EQ(tids_by_kind["sync"].size(), 1u);
  ASSERT_EQ(tids_by_kind["async"].size(), 1u);
  const std::uint64_t sync_tid = *tids_by_kind["sync"].begin();
  const std::uint64_t async_tid = *tids_by_kind["async"].begin();
  EXPECT_NE(sync_tid, async_tid);
  EXPECT_EQ(track_names[sync_tid], "device gpu0");
  EXPECT_EQ(track_names[async_tid], "device gpu0 async");
  for (auto& [tid, list] : spans) {
    std::sort(list.begin(), list.end());
    for (std::size_t i = 1; i < list.size(); ++i) {
      EXPECT_LE(list[i - 1].second, list[i].first) << "overlapping events on track " << tid;
    }
  }
}

TEST(Trace, AClosureNodeKeepsTheLabelOfItsFunction) {
  const std::string path = temp_path("stepflow-trace-flow");
  {
    scheduler s(tracing_to(path));
    device_context& d = s.device("gpu0");
    tbb::flow::graph g;
    auto log = flow::closure_node<int>(g, d, labeled("log_batch", [](const int&) {}));
    auto end = flow::step_end_node<int>(g, d);
    tbb::flow::make_edge(log, end);
    testing::before_tbb_algorithm();
    for (int i = 0; i < 3; ++i) log.try_put(i);
    g.wait_for_all();
    testing::after_tbb_algorithm();
    s.flush();
  }
  const nlohmann::json trace = take_trace(path);
  int labeled_events = 0;
  for (const auto& e : trace.at("traceEvents")) {
    if (e.at("ph") == "X" && e.at("name") == "log_batch") ++labeled_events;
  }
  EXPECT_EQ(labeled_events, 3);
}

// Two schedulers built from one STEPFLOW_TRACE (the default scheduler and the application's,
// say) would replace each other's trace: the second one writes a numbered sibling instead.
TEST(Trace, TwoSchedulersGivenOneTracePathKeepBothTraces) {
  const std::string path = temp_path("stepflow-trace-shared");  // ends in ".json"
  const std::string sibling = path.substr(0, path.size() - 5) + ".2.json";
  {
    options o = quiet();
    o.trace_path = path;
    scheduler first(o);
    scheduler second(o);
    EXPECT_EQ(first.trace_path(), path);
    EXPECT_EQ(second.trace_path(), sibling);
    first.device("first").add_step_closure(labeled("in first", [] {}));
    first.device("first").run_step_closures();
    second.device("second").add_step_closure(labeled("in second", [] {}));
    second.device("second").run_step_closures();
  }
  for (const auto& [file, label] : {std::pair{path, "in first"}, std::pair{sibling, "in second"}}) {
    const nlohmann::json trace = take_trace(file);
    std::set<std::string> names;
    for (const auto& e : trace.at("traceEvents")) {
      if (e.at("ph") == "X") names.insert(e.at("name").get<std::string>());
    }
    EXPECT_EQ(names, std::set<std::string>{label}) << file;
  }
  EXPECT_EQ(scheduler(quiet()).trace_path(), "");
}

TEST(Trace, AnUnwritablePathFailsTheConstruction) {
  options o = quiet();
  o.trace_path = "/nonexistent-stepflow-dir/trace.json";
  try {
    scheduler s(o);
    ADD_FAILURE() << "no exception";
  } catch (const config_error& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent-stepflow-dir/trace.json"), std::string::npos)
        << e.what();
  }
}

TEST(Trace, StepflowTraceIntoAMissingDirectoryFailsTheDefaultConstruction) {
  ::setenv("STEPFLOW_TRACE", "/nonexistent-stepflow-dir/env.json", 1);
  EXPECT_THROW(scheduler s, config_error);
  ::unsetenv("STEPFLOW_TRACE");
}

}  // namespace
}  // namespace stepflow
