// options::low_priority: asynchronous closures run in an arena of low priority. Everything the
// contract promises of them still holds: they run on oneTBB's workers with nobody waiting, in
// order, one at a time; step ends on a full queue, flushes and the destructor finish.

#include <stepflow/stepflow.hpp>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include "support/tbb_threads.hpp"
#include "support/test_options.hpp"
#include "support/watchdog.hpp"

namespace stepflow {
namespace {

options low_priority(std::size_t max_queue = 100) {
  options o = testing::quiet_options(max_queue);
  o.low_priority = true;
  return o;
}

class LowPriority : public testing::with_tbb_threads {};

TEST_P(LowPriority, ClosuresRunInOrderAndStepEndsOnAFullQueueAndFlushFinish) {
  testing::watchdog dog("a low-priority scheduler's step ends and flush");
  scheduler s(low_priority(2));
  ASSERT_TRUE(s.options().low_priority);
  device_context& d = s.device("d");
  constexpr int steps = 50;
  std::vector<int> order;  // async closures of one device run one at a time
  std::atomic<int> in_flight{0};
  std::atomic<int> overlapped{0};
  int sync_ran = 0;
  for (int step = 0; step < steps; ++step) {
    for (int k = 0; k < 3; ++k) {
      d.add_step_closure(run_async, [&, n = step * 3 + k] {
        if (in_flight.fetch_add(1) != 0) overlapped.fetch_add(1);
        order.push_back(n);
        in_flight.fetch_sub(1);
      });
    }
    d.add_step_closure([&] { ++sync_ran; });
    d.run_step_closures();  // 3 closures into a queue of 2: blocks for room
  }
  d.flush();
  EXPECT_EQ(sync_ran, steps);
  EXPECT_EQ(overlapped.load(), 0);
  ASSERT_EQ(order.size(), static_cast<std::size_t>(steps * 3));
  for (int i = 0; i < steps * 3; ++i) ASSERT_EQ(order[i], i) << "out of order at " << i;
  const device_metrics m = s.metrics().devices.at(0);
  EXPECT_EQ(m.ran_async, static_cast<std::uint64_t>(steps * 3));
  EXPECT_EQ(m.pending, 0u);
}

// A low-priority arena still gets a worker while the application's arenas are idle (at a thread
// limit of 1 too: oneTBB grants an arena with enqueued tasks one worker, see
// support/occupy_workers.hpp): the closure runs in the background, with no step end, flush or
// destructor waiting for it.
TEST_P(LowPriority, ClosuresRunOnAWorkerWithNobodyWaitingForThem) {
  testing::watchdog dog("a low-priority scheduler's background closure");
  scheduler s(low_priority());
  device_context& d = s.device("d");
  std::atomic<bool> ran{false};
  std::atomic<std::thread::id> ran_on{};
  d.add_step_closure(run_async, [&] {
    ran_on = std::this_thread::get_id();
    ran = true;
  });
  d.run_step_closures();  // room to spare: hands the closure over and returns
  // 20 s bound a hang, not a timing claim: it takes microseconds.
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (!ran.load() && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_TRUE(ran.load()) << "the closure never ran on a worker of the low-priority arena";
  if (ran.load()) {
    EXPECT_NE(ran_on.load(), std::this_thread::get_id());
  }
  d.flush();
}

TEST_P(LowPriority, TheDestructorRunsEveryQueuedClosure) {
  testing::watchdog dog("destroying a low-priority scheduler");
  std::atomic<int> ran{0};
  {
    scheduler s(low_priority(0));
    for (int dev = 0; dev < 3; ++dev) {
      device_context& d = s.device("d" + std::to_string(dev));
      for (int i = 0; i < 200; ++i) d.add_step_closure(run_async, [&] { ++ran; });
      d.run_step_closures();
    }
  }
  EXPECT_EQ(ran.load(), 600);
}

TEST_P(LowPriority, LockstepAndJoinedClosuresStillRun) {
  testing::watchdog dog("a low-priority lockstep scheduler");
  options o = low_priority(4);
  o.ordering = step_ordering::lockstep;
  scheduler s(o);
  device_context& a = s.device("a");
  device_context& b = s.device("b");
  std::atomic<int> ran{0};
  std::vector<std::uint64_t> joined;  // joined closures run one at a time
  for (int step = 0; step < 20; ++step) {
    a.add_step_closure(run_async, [&] { ++ran; });
    b.add_step_closure(run_async, [&] { ++ran; });
    s.add_joined_step_closure([&](std::uint64_t global_step) { joined.push_back(global_step); });
    a.run_step_closures();
    b.run_step_closures();
  }
  s.flush();
  EXPECT_EQ(ran.load(), 40);
  ASSERT_EQ(joined.size(), 20u);
  for (std::uint64_t i = 0; i < 20; ++i) EXPECT_EQ(joined[i], i + 1);
}

STEPFLOW_AT_1_2_4_THREADS(LowPriority);

}  // namespace
}  // namespace stepflow
