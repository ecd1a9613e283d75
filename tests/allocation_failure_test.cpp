// Running out of memory: a step end or a report that gets std::bad_alloc loses no closure and
// no failure. Each test arms a failure of the n-th allocation of the thread that ends the step,
// for every n that the call reaches, and checks the outcome either way: the call threw
// std::bad_alloc having changed nothing, or it did its job.

#include <stepflow/stepflow.hpp>

#include <gtest/gtest.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>

#include "support/counting_new.hpp"
#include "support/test_options.hpp"
#include "support/watchdog.hpp"

namespace stepflow {
namespace {

using stepflow::testing::failing_allocation;

// Records which closures ran, in order, without allocating.
struct run_log {
  std::array<int, 64> order{};
  std::atomic<int> count{0};
  void ran(int id) { order[static_cast<std::size_t>(count.fetch_add(1))] = id; }
};

// One thread that is not the device's owner adds closures: those are the ones a step end must
// copy into buffers of its own, the allocations that can fail while it takes them.
template <class Add>
void from_another_thread(Add add) {
  std::thread(add).join();
}

TEST(OutOfMemory, AStepEndThatCannotTakeItsClosuresTakesNoneAndCountsNoStep) {
  testing::watchdog dog("step ends running out of memory");
  bool reached_every_allocation = false;
  for (std::size_t nth = 1; !reached_every_allocation && nth <= 16; ++nth) {
    SCOPED_TRACE("allocation " + std::to_string(nth) + " fails");
    run_log log;
    scheduler s(testing::quiet_options());
    device_context& d = s.device("d");
    d.add_step_closure([] {});  // this thread owns the device's lanes from here on
    d.run_step_closures();
    d.add_step_closure([&log] { log.ran(1); });
    from_another_thread([&] {
      d.add_step_closure([&log] { log.ran(2); });
      d.add_step_closure([&log] { log.ran(3); });
      d.add_step_closure([&log] { log.ran(4); });
    });
    d.add_step_closure([&log] { log.ran(5); });
    d.add_step_closure(run_async, [&log] { log.ran(6); });
    from_another_thread([&] { d.add_step_closure(run_async, [&log] { log.ran(7); }); });
    bool threw = false;
    {
      failing_allocation fail(nth);
      try {
        d.run_step_closures();
      } catch (const std::bad_alloc&) {
        threw = true;
      }
      reached_every_allocation = !failing_allocation::happened();
    }
    if (threw) {
      // Nothing was taken: the step did not count and every closure is still pending.
      EXPECT_EQ(d.step(), 1u);
      EXPECT_EQ(log.count.load(), 0);
      d.run_step_closures();
    }
    d.flush();
    EXPECT_EQ(d.step(), 2u);
    ASSERT_EQ(log.count.load(), 7);
    // The sync closures in the order added, each once; the async ones (on a worker) in theirs.
    std::array<int, 5> sync{};
    std::array<int, 2> async{};
    std::size_t ns = 0;
    std::size_t na = 0;
    for (int i = 0; i < 7; ++i) {
      const int id = log.order[static_cast<std::size_t>(i)];
      if (id <= 5) {
        sync.at(ns++) = id;
      } else {
        async.at(na++) = id;
      }
    }
    EXPECT_EQ(sync, (std::array<int, 5>{1, 2, 3, 4, 5}));
    EXPECT_EQ(async, (std::array<int, 2>{6, 7}));
  }
  EXPECT_TRUE(reached_every_allocation) << "the step end allocates more than 16 times";
}

TEST(OutOfMemory, AFailureWhoseReportCannotBeBuiltIsReportedLater) {
  testing::watchdog dog("reports running out of memory");
  const std::string long_message(200, 'x');  // its copy into the report allocates
  bool reached_every_allocation = false;
  for (std::size_t nth = 1; !reached_every_allocation && nth <= 16; ++nth) {
    SCOPED_TRACE("allocation " + std::to_string(nth) + " fails");
    scheduler s(testing::quiet_options());
    device_context& d = s.device("d");
    d.add_step_closure(run_async, [&] { throw std::runtime_error(long_message); });
    d.run_step_closures();
    // Recorded once the metrics count it.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (s.metrics().total.failed_async == 0 && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    ASSERT_EQ(s.metrics().total.failed_async, 1u);
    bool reported = false;
    bool threw_bad_alloc = false;
    {
      failing_allocation fail(nth);
      try {
        d.run_step_closures();
      } catch (const async_closure_error&) {
        reported = true;
      } catch (const std::bad_alloc&) {
        threw_bad_alloc = true;
      }
      reached_every_allocation = !failing_allocation::happened();
    }
    if (threw_bad_alloc) {
      // Still there for the next report, with the original nested.
      try {
        d.flush();
        ADD_FAILURE() << "the failure was lost";
      } catch (const async_closure_error& e) {
        reported = true;
        try {
          std::rethrow_if_nested(e);
        } catch (const std::runtime_error& original) {
          EXPECT_EQ(original.what(), long_message);
        }
      }
    }
    EXPECT_TRUE(reported);
    EXPECT_NO_THROW(d.flush());  // reported once
  }
  EXPECT_TRUE(reached_every_allocation) << "the report allocates more than 16 times";
}

TEST(OutOfMemory, AQueueThatCannotGrowLosesNoStepsClosures) {
  testing::watchdog dog("a queue growing while memory runs out");
  options o = testing::quiet_options(0);  // unbounded: every step's batch waits in the queue
  scheduler s(o);
  device_context& d = s.device("d");
  std::atomic<bool> release{false};
  std::atomic<bool> started{false};
  run_log log;
  d.add_step_closure(run_async, [&] {
    started = true;
    while (!release.load()) std::this_thread::yield();
  });
  d.run_step_closures();
  while (!started.load()) std::this_thread::yield();
  // The first closure holds the queue: the next steps' batches pile up, past the queue's first
  // few slots. Every step end gets an allocation failure, the first it makes (if any).
  constexpr int steps = 40;
  int refused = 0;  // step ends that threw: the scenario was reached
  for (int i = 1; i <= steps; ++i) {
    d.add_step_closure(run_async, [&log, i] { log.ran(i); });
    const std::uint64_t before = d.step();
    failing_allocation fail(1);
    try {
      d.run_step_closures();
    } catch (const std::bad_alloc&) {
      // Allowed only when nothing was taken: the closure is still pending.
      EXPECT_EQ(d.step(), before) << "step " << i << " counted, its closure lost";
      ++refused;
      d.run_step_closures();
    }
  }
  release = true;
  d.flush();
  EXPECT_GT(refused, 0) << "no step end ran out of memory: the queue never had to grow";
  ASSERT_EQ(log.count.load(), steps);
  for (int i = 0; i < steps; ++i) EXPECT_EQ(log.order[static_cast<std::size_t>(i)], i + 1);
}

// A step end that waits for room, and meanwhile runs other devices' stalled closures every
// millisecond (the stall helper), allocates nothing: steady state must not allocate (B7), and a
// wait must not depend on memory. Before the fifteenth session the helper copied the device
// list into a new vector each time.
TEST(OutOfMemory, AStepEndWaitingForRoomAndHelpingOtherDevicesAllocatesNothing) {
  testing::watchdog dog("a step end waiting for room");
  scheduler s(testing::quiet_options(/*max_queue_size=*/1));
  device_context& a = s.device("a");
  s.device("b");                          // another device: the helper looks at it
  for (int step = 0; step < 4; ++step) {  // the ring, the pool and the lane grown once
    a.add_step_closure(run_async, [] {});
    a.add_step_closure(run_async, [] {});
    a.run_step_closures();
  }
  s.flush();
  std::atomic<bool> started{false};
  std::atomic<bool> release{false};
  a.add_step_closure(run_async, [&] {
    started = true;
    while (!release.load()) std::this_thread::sleep_for(std::chrono::microseconds(100));
  });
  a.run_step_closures();
  while (!started.load()) std::this_thread::yield();  // the watchdog bounds it
  a.add_step_closure(run_async, [] {});
  a.add_step_closure(run_async, [] {});
  // Lets the step end wait 20 ms: about 20 of the helper's slices. Not a timing claim: a
  // shorter wait only makes the test weaker.
  std::thread releaser([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    release = true;
  });
  bool allocated = false;
  {
    // The helper swallows std::bad_alloc (the waiter just waits another slice), so what is
    // checked is whether the armed allocation happened at all.
    const failing_allocation first(1);
    a.run_step_closures();
    allocated = failing_allocation::happened();
  }
  releaser.join();
  EXPECT_FALSE(allocated) << "the step end allocated while it waited for room";
  s.flush();
}

}  // namespace
}  // namespace stepflow
