// The stall helper: a thread that has waited on a device for a while (a step end short of room,
// a flush, the destructor) runs a batch of every other device whose closures wait for a worker.
// With one oneTBB worker, a closure of device a that waits for a closure of device b holds that
// worker, so b's closure runs only if a thread waiting on a runs it. The flush case is
// Async.AFlushOutlastsAClosureWaitingForAnotherDevicesClosure; these are the step end and the
// destructor.
//
// At 4 oneTBB threads stepflow's arena has workers to spare, and b's closure could simply run on
// one of them: the tests occupy all workers but one (support/occupy_workers.hpp), so that a's
// closure holds the last one at every thread limit.
//
// a's closure gives up waiting after a bound (a hang bound, not a timing claim: with the helper
// it waits about a millisecond), so that a missing helper fails the test instead of hanging it.

#include <stepflow/stepflow.hpp>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "support/occupy_workers.hpp"
#include "support/tbb_threads.hpp"
#include "support/test_options.hpp"
#include "support/watchdog.hpp"

namespace stepflow {
namespace {

constexpr auto give_up_after = std::chrono::seconds(10);

// What a's closure, waiting for b's, saw.
struct waiting_closure {
  std::atomic<bool> started{false};
  std::atomic<bool> saw_b{false};
  std::atomic<bool> done{false};
};

// b's closure: marks that it ran, and where.
struct produced {
  std::atomic<bool> ran{false};
  std::atomic<std::thread::id> on{};
};

// Queues on `a` a closure that waits (bounded) for b's closure, and hands it over; returns once
// it runs, on a worker, so that it holds that worker.
void start_waiting_closure(device_context& a, waiting_closure& w, produced& p) {
  a.add_step_closure(run_async, [&w, &p] {
    w.started = true;
    const auto give_up = std::chrono::steady_clock::now() + give_up_after;
    while (!p.ran.load() && std::chrono::steady_clock::now() < give_up) {
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
    w.saw_b = p.ran.load();
    w.done = true;
  });
  a.run_step_closures();
  while (!w.started.load()) std::this_thread::yield();  // the watchdog bounds it
}

// Hands b a closure that no worker is free to run (with one worker: a's closure holds it).
void hand_over_producer(device_context& b, produced& p) {
  b.add_step_closure(run_async, [&p] {
    p.on = std::this_thread::get_id();
    p.ran = true;
  });
  b.run_step_closures();
}

class StallHelper : public testing::with_tbb_threads {};

// a's queue is full behind its waiting closure, so a's next step end blocks for room, waiting for
// a's drainer, which waits for b's closure. The step end runs b's closure itself.
//
// Before the fix, a step end short of room only re-checked its queue every millisecond and never
// helped: at 1 and 2 oneTBB threads b's closure ran only once a's closure gave up.
TEST_P(StallHelper, AStepEndWaitingForRoomRunsAnotherDevicesStalledClosure) {
  testing::watchdog dog(std::chrono::seconds(60), "a step end short of room, helping device b");
  scheduler s(testing::quiet_options(1));
  const testing::occupy_workers others(testing::occupy_workers::worker_count() - 1);
  device_context& a = s.device("a");
  device_context& b = s.device("b");
  waiting_closure w;
  produced p;
  start_waiting_closure(a, w, p);
  hand_over_producer(b, p);
  // Two closures into a queue of one, while a's drainer is held: the step end waits for room.
  a.add_step_closure(run_async, [] {});
  a.add_step_closure(run_async, [] {});
  a.run_step_closures();
  EXPECT_TRUE(w.saw_b.load()) << "nobody ran b's closure while a's step end waited for room";
  // No second worker: the waiting thread itself ran it.
  if (w.saw_b.load()) {
    EXPECT_EQ(p.on.load(), std::this_thread::get_id());
  }
  s.flush();
  EXPECT_TRUE(p.ran.load());
}

// The destructor waits for device a first (devices in name order), whose drainer waits for b's
// closure: it runs b's closure itself rather than wait for a worker that never comes.
TEST_P(StallHelper, TheDestructorRunsAnotherDevicesStalledClosure) {
  testing::watchdog dog(std::chrono::seconds(60), "the destructor, helping device b");
  waiting_closure w;
  produced p;
  {
    // Declared first: the workers stay occupied while the scheduler's destructor runs.
    const testing::occupy_workers others(testing::occupy_workers::worker_count() - 1);
    scheduler s(testing::quiet_options());
    device_context& a = s.device("a");
    device_context& b = s.device("b");
    start_waiting_closure(a, w, p);
    hand_over_producer(b, p);
  }
  EXPECT_TRUE(w.done.load()) << "the destructor returned before a's closure finished";
  EXPECT_TRUE(p.ran.load()) << "the destructor did not run b's closure";
  EXPECT_TRUE(w.saw_b.load()) << "nobody ran b's closure while the destructor waited for a";
  if (w.saw_b.load()) {
    EXPECT_EQ(p.on.load(), std::this_thread::get_id());
  }
}

STEPFLOW_AT_1_2_4_THREADS(StallHelper);

}  // namespace
}  // namespace stepflow
