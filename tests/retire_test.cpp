// scheduler::retire(name): a lockstep participant that stopped stepping holds the others back
// (their flush waits, their step ends block once their queues are full); retiring it releases
// them, and a retired device's own closures are no longer held back either.

#include <stepflow/stepflow.hpp>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "support/tbb_threads.hpp"
#include "support/test_options.hpp"
#include "support/watchdog.hpp"

namespace stepflow {
namespace {

using namespace std::chrono_literals;

options lockstep(std::size_t max_queue) {
  options o = testing::quiet_options(max_queue);
  o.ordering = step_ordering::lockstep;
  o.participants = {"fast", "stopped"};
  return o;
}

// Spins until `done` holds; the watchdog of the test bounds it.
template <class Done>
void wait_until(Done done) {
  while (!done()) std::this_thread::yield();
}

// Ends `steps` steps of `d`, each with one async closure that counts into `ran`.
void end_counted_steps(device_context& d, int steps, std::atomic<int>& ran) {
  for (int step = 1; step <= steps; ++step) {
    d.add_step_closure(run_async, [&ran] { ++ran; });
    d.run_step_closures();
  }
}

class Retire : public testing::with_tbb_threads {};

TEST_P(Retire, ReleasesAStepEndBlockedOnAQueueFullBehindAStoppedParticipant) {
  testing::watchdog dog("a step end blocked behind a stopped participant, then retire");
  scheduler s(lockstep(1));
  device_context& fast = s.device("fast");
  std::atomic<int> ran{0};
  // Step 1 runs (nothing precedes it). Step 2's closure waits for "stopped" to finish step 1 and
  // fills the queue (bound 1).
  end_counted_steps(fast, 2, ran);
  // Step 3's closure does not fit: its step end blocks until step 2's closure starts.
  fast.add_step_closure(run_async, [&] { ++ran; });
  std::atomic<bool> returned{false};
  std::atomic<bool> threw{false};
  std::thread third([&] {
    try {
      fast.run_step_closures();
    } catch (...) {
      threw = true;
    }
    returned = true;
  });
  // The step counts once it took its closures, before it waits for room.
  wait_until([&] { return fast.step() == 3; });
  std::this_thread::sleep_for(50ms);
  EXPECT_FALSE(returned.load()) << "the step end did not wait for room behind the stopped device";
  EXPECT_LE(ran.load(), 1);

  EXPECT_TRUE(s.retire("stopped"));
  third.join();  // the watchdog ends a hang: retire must release the blocked step end
  EXPECT_TRUE(returned.load());
  EXPECT_FALSE(threw.load()) << "the released step end must return normally";
  EXPECT_TRUE(fast.flush_for(30s));
  EXPECT_EQ(ran.load(), 3);
  const metrics_snapshot m = s.metrics();
  for (const device_metrics& d : m.devices) {
    if (d.device == "fast") {
      EXPECT_EQ(d.steps, 3u);
      EXPECT_GT(d.blocked_ns, 0u) << "the time the step end was blocked is counted";
      EXPECT_EQ(d.pending, 0u);
    }
  }
  EXPECT_FALSE(s.retire("stopped")) << "already retired";
}

TEST_P(Retire, ReleasesAFlushWaitingForAStoppedParticipant) {
  testing::watchdog dog("a flush waiting for a stopped participant, then retire");
  scheduler s(lockstep(100));
  device_context& fast = s.device("fast");
  std::atomic<int> ran{0};
  end_counted_steps(fast, 3, ran);
  std::atomic<bool> flushing{false};
  std::atomic<bool> returned{false};
  std::thread flusher([&] {
    flushing = true;
    fast.flush();  // no deadline: only retire (or the closures running) ends it
    returned = true;
  });
  wait_until([&] { return flushing.load(); });
  std::this_thread::sleep_for(50ms);
  EXPECT_FALSE(returned.load()) << "the flush did not wait for the closures held back";
  EXPECT_LE(ran.load(), 1);

  EXPECT_TRUE(s.retire("stopped"));
  flusher.join();  // the watchdog ends a hang: retire must release the waiting flush
  EXPECT_TRUE(returned.load());
  EXPECT_EQ(ran.load(), 3);
}

// Retiring the device that does step (its partner stopped) frees its own closures: it no longer
// waits for anybody.
TEST_P(Retire, ARetiredDevicesOwnClosuresAreNoLongerHeldBack) {
  testing::watchdog dog(std::chrono::seconds(60), "a retired device's own closures");
  scheduler s(lockstep(100));
  device_context& fast = s.device("fast");
  std::atomic<int> ran{0};
  end_counted_steps(fast, 3, ran);
  EXPECT_FALSE(fast.flush_for(50ms)) << "steps 2 and 3 must wait for the stopped participant";
  EXPECT_TRUE(s.retire("fast"));
  // 20 s bound a hang (below the watchdog's), not a timing claim: it takes microseconds.
  EXPECT_TRUE(fast.flush_for(20s)) << "the retired device's closures are still held back";
  EXPECT_EQ(ran.load(), 3);
  // And it stays out: later steps run without waiting for anybody.
  fast.add_step_closure(run_async, [&] { ++ran; });
  fast.run_step_closures();
  EXPECT_TRUE(fast.flush_for(20s));
  EXPECT_EQ(ran.load(), 4);
}

TEST_P(Retire, ReturnsFalseForADeviceThatIsNotParticipating) {
  options o = testing::quiet_options();
  o.ordering = step_ordering::lockstep;
  scheduler s(o);
  device_context& a = s.device("a");
  a.run_step_closures();  // the first step end fixes the participants: only "a"
  s.device("late");
  EXPECT_FALSE(s.retire("nobody")) << "no such device";
  EXPECT_FALSE(s.retire("late")) << "created after the first step end: not a participant";
  EXPECT_TRUE(s.retire("a"));
  EXPECT_FALSE(s.retire("a")) << "already retired";
}

STEPFLOW_AT_1_2_4_THREADS(Retire);

}  // namespace
}  // namespace stepflow
