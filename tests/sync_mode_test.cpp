// Sync mode (options::sync_mode) beyond its basic order (device_context_test): lockstep ordering
// does not apply to it while joined closures still wait for every participant, and its metrics
// count the inline asynchronous closures as synchronous ones.

#include <stepflow/stepflow.hpp>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "support/tbb_threads.hpp"
#include "support/test_options.hpp"
#include "support/watchdog.hpp"

namespace stepflow {
namespace {

using namespace std::chrono_literals;

options sync_lockstep() {
  options o = testing::quiet_options();
  o.sync_mode = true;
  o.ordering = step_ordering::lockstep;
  o.participants = {"a", "b"};
  return o;
}

const device_metrics& row(const metrics_snapshot& m, const std::string& device) {
  for (const device_metrics& d : m.devices) {
    if (d.device == device) return d;
  }
  throw std::runtime_error("no metrics row for " + device);
}

class SyncModeLockstep : public testing::with_tbb_threads {};

// Lockstep would hold device a's closures of step 2 until b finished step 1. Sync mode runs them
// at a's step end anyway, on the thread that ends it, before it returns.
TEST_P(SyncModeLockstep, ADevicesClosuresRunAtItsStepEndWhateverTheOthersDid) {
  testing::watchdog dog("sync-mode step ends of a lockstep participant");
  scheduler s(sync_lockstep());
  device_context& a = s.device("a");
  s.device("b");  // a participant that never ends a step
  const std::thread::id caller = std::this_thread::get_id();
  std::vector<std::pair<std::uint64_t, std::thread::id>> ran;  // (step, thread), this thread only
  for (std::uint64_t step = 1; step <= 3; ++step) {
    a.add_step_closure(run_async,
                       [&ran, step] { ran.emplace_back(step, std::this_thread::get_id()); });
    a.run_step_closures();
    ASSERT_EQ(ran.size(), step) << "step " << step
                                << "'s async closure did not run at its step end";
    EXPECT_EQ(ran.back().first, step);
    EXPECT_EQ(ran.back().second, caller);
  }
  // Nothing was queued, so nothing is held back for b either.
  EXPECT_TRUE(a.flush_for(30s));
  const device_metrics m = row(s.metrics(), "a");
  EXPECT_EQ(m.steps, 3u);
  EXPECT_EQ(m.pending, 0u);
}

// Joined closures still need every participant's step: a's three steps do not run step 1's
// joined closure; b's first step end does, on a oneTBB worker (not the thread that flushes).
TEST_P(SyncModeLockstep, JoinedClosuresStillWaitForEveryParticipantAndRunOnAWorker) {
  testing::watchdog dog("sync-mode joined closures");
  scheduler s(sync_lockstep());
  device_context& a = s.device("a");
  device_context& b = s.device("b");
  std::atomic<int> joined_ran{0};
  std::atomic<std::uint64_t> joined_step{0};
  std::atomic<std::thread::id> joined_on{};
  s.add_joined_step_closure([&](std::uint64_t step) {
    joined_step = step;
    joined_on = std::this_thread::get_id();
    joined_ran.fetch_add(1);
  });
  for (int step = 0; step < 3; ++step) {
    a.add_step_closure(run_async, [] {});
    a.run_step_closures();
  }
  s.flush();  // waits only for global steps every participant finished: none yet
  EXPECT_EQ(joined_ran.load(), 0) << "step 1's joined closure ran before b ended step 1";
  b.run_step_closures();
  s.flush();  // global step 1 is finished now: waits for its joined closure
  EXPECT_EQ(joined_ran.load(), 1);
  EXPECT_EQ(joined_step.load(), 1u);
  EXPECT_NE(joined_on.load(), std::this_thread::get_id());
}

STEPFLOW_AT_1_2_4_THREADS(SyncModeLockstep);

// In sync mode an asynchronous closure is a synchronous one in every respect but its order: the
// metrics count it under ran_sync, failed_sync and dropped_sync; added_async counts its adding.
TEST(SyncModeMetrics, InlineAsyncClosuresCountAsSyncClosuresOnceAdded) {
  options o = testing::quiet_options();
  o.sync_mode = true;
  o.measure_run_time = true;
  scheduler s(o);
  device_context& d = s.device("d");

  // Step 1: 3 async and 2 sync closures, all run.
  for (int i = 0; i < 3; ++i) d.add_step_closure(run_async, [] {});
  for (int i = 0; i < 2; ++i) d.add_step_closure([] {});
  d.run_step_closures();
  // Step 2: the second async closure throws; the async one behind it and the step's sync one are
  // dropped, as behind a sync failure.
  d.add_step_closure(run_async, [] {});
  d.add_step_closure(run_async, [] { throw std::runtime_error("inline"); });
  d.add_step_closure(run_async, [] {});
  d.add_step_closure([] {});
  EXPECT_THROW(d.run_step_closures(), std::runtime_error);
  // One of each kind waiting for a step end.
  d.add_step_closure(run_async, [] {});
  d.add_step_closure([] {});

  const metrics_snapshot snapshot = s.metrics();
  const device_metrics& m = row(snapshot, "d");
  EXPECT_EQ(m.steps, 2u);
  EXPECT_EQ(m.added_async, 7u);
  EXPECT_EQ(m.added_sync, 4u);
  EXPECT_EQ(m.ran_sync, 7u);  // 5 in step 1, 2 in step 2 (one of which threw)
  EXPECT_EQ(m.failed_sync, 1u);
  EXPECT_EQ(m.dropped_sync, 2u);
  EXPECT_EQ(m.ran_async, 0u);
  EXPECT_EQ(m.failed_async, 0u);
  EXPECT_EQ(m.discarded_async, 0u);
  EXPECT_EQ(m.waiting, 2u);
  EXPECT_EQ(m.pending, 0u);
  EXPECT_EQ(m.queue_high_water, 0u);
  EXPECT_EQ(m.blocked_ns, 0u);
  EXPECT_EQ(m.async_tasks, 0u) << "no oneTBB task runs a sync-mode closure";
  EXPECT_EQ(m.run_time.count, 7u) << "every closure that ran is timed";
  EXPECT_EQ(snapshot.total.ran_sync, 7u);
  EXPECT_EQ(snapshot.total.ran_async, 0u);
  EXPECT_EQ(snapshot.total.added_async, 7u);
  EXPECT_EQ(snapshot.total.dropped_sync, 2u);
  // The device reports no asynchronous failure afterwards: the exception propagated already.
  EXPECT_NO_THROW(d.flush());
}

}  // namespace
}  // namespace stepflow
