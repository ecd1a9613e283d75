// scheduler: devices, flush across devices, shutdown and its report, use after destruction.

#include <stepflow/stepflow.hpp>

#include <gtest/gtest.h>
#include <oneapi/tbb/parallel_for.h>
#include <oneapi/tbb/parallel_pipeline.h>
#include <oneapi/tbb/task_arena.h>
#include <oneapi/tbb/task_group.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <limits>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "support/occupy_workers.hpp"
#include "support/tbb_threads.hpp"
#include "support/test_options.hpp"
#include "support/tsan_handoff.hpp"
#include "support/watchdog.hpp"

namespace stepflow {
namespace {

options quiet_options(std::size_t max_queue = 100) { return testing::quiet_options(max_queue); }

class Scheduler : public testing::with_tbb_threads {};

TEST_P(Scheduler, DestructionRunsEveryQueuedAsyncClosure) {
  std::atomic<int> ran{0};
  {
    scheduler s(quiet_options(0));
    for (int dev = 0; dev < 4; ++dev) {
      device_context& d = s.device("d" + std::to_string(dev));
      for (int i = 0; i < 500; ++i) d.add_step_closure(run_async, [&] { ++ran; });
      d.run_step_closures();
    }
  }
  EXPECT_EQ(ran.load(), 2000);
}

TEST_P(Scheduler, DestructionReportsUnreportedFailuresAndNeverRunClosures) {
  std::optional<shutdown_report> seen;
  std::atomic<int> ran{0};
  {
    options o = quiet_options();
    o.on_shutdown_report = [&](const shutdown_report& r) { seen = r; };
    scheduler s(o);
    device_context& bad = s.device("bad");
    bad.add_step_closure(run_async, [] { throw std::runtime_error("never looked at"); });
    bad.add_step_closure(run_async, [&] { ++ran; });
    bad.run_step_closures();
    device_context& idle = s.device("idle");
    idle.add_step_closure([&] { ++ran; });
    idle.add_step_closure(run_async, [&] { ++ran; });
    // No step end, no flush: both problems are only visible at shutdown.
  }
  ASSERT_TRUE(seen.has_value());
  ASSERT_EQ(seen->devices.size(), 2u);
  const device_shutdown_report& bad = seen->devices[0];
  EXPECT_EQ(bad.device, "bad");
  ASSERT_TRUE(bad.unreported_error);
  EXPECT_EQ(bad.discarded, 1u);
  const device_shutdown_report& idle = seen->devices[1];
  EXPECT_EQ(idle.device, "idle");
  EXPECT_FALSE(idle.unreported_error);
  EXPECT_EQ(idle.never_run, 2u);
  EXPECT_EQ(ran.load(), 0);
}

TEST_P(Scheduler, ShutdownReportGoesToStderr) {
  ::testing::internal::CaptureStderr();
  {
    options o;  // report_to_stderr defaults to true
    scheduler s(o);
    s.device("gpu3").add_step_closure([] {});
  }
  const std::string text = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(text.find("device 'gpu3': 1 closure added after its last step end never ran"),
            std::string::npos)
      << text;
}

TEST_P(Scheduler, NothingToReportPrintsNothing) {
  ::testing::internal::CaptureStderr();
  bool called = false;
  {
    options o;
    o.on_shutdown_report = [&](const shutdown_report&) { called = true; };
    scheduler s(o);
    device_context& d = s.device("d");
    d.add_step_closure(run_async, [] {});
    d.run_step_closures();
  }
  EXPECT_EQ(::testing::internal::GetCapturedStderr(), "");
  EXPECT_FALSE(called);
}

TEST_P(Scheduler, ThrowingReportCallbackIsSwallowed) {
  options o = quiet_options();
  o.on_shutdown_report = [](const shutdown_report&) { throw std::runtime_error("callback"); };
  EXPECT_NO_THROW({
    scheduler s(o);
    s.device("d").add_step_closure([] {});
  });
}

TEST_P(Scheduler, FlushReportsTheFirstFailureAndOthersKeepTheirs) {
  scheduler s(quiet_options());
  // Created out of name order: the first failure is the first device's by name.
  device_context& b = s.device("b");
  device_context& a = s.device("a");
  a.add_step_closure(run_async, [] { throw std::runtime_error("a failed"); });
  b.add_step_closure(run_async, [] { throw std::runtime_error("b failed"); });
  a.run_step_closures();
  b.run_step_closures();
  try {
    s.flush();
    ADD_FAILURE() << "no failure reported";
  } catch (const async_closure_error& e) {
    EXPECT_EQ(e.device(), "a");
  }
  try {
    b.flush();
    ADD_FAILURE() << "b lost its failure";
  } catch (const async_closure_error& e) {
    EXPECT_EQ(e.device(), "b");
  }
  EXPECT_NO_THROW(s.flush());
  EXPECT_NO_THROW(a.flush());
}

TEST_P(Scheduler, FlushReportsEveryDevicesFailureBeforeTheJoinedClosures) {
  scheduler s(quiet_options());
  device_context& a = s.device("a");
  device_context& b = s.device("b");
  s.add_joined_step_closure([] { throw std::runtime_error("joined failed"); });
  b.add_step_closure(run_async, [] { throw std::runtime_error("b failed"); });
  a.run_step_closures();
  b.run_step_closures();
  // The flush waits for both failures before it reports either: devices by name, then joined.
  for (const char* expected : {"b", "joined"}) {
    try {
      s.flush();
      ADD_FAILURE() << "no failure reported where " << expected << "'s was expected";
    } catch (const async_closure_error& e) {
      EXPECT_EQ(e.device(), expected);
    }
  }
  EXPECT_NO_THROW(s.flush());
}

TEST_P(Scheduler, TheDeviceNameJoinedIsReservedForTheJoinedClosures) {
  // Otherwise a device's failure and a joined closure's would both say device() == "joined".
  scheduler s(quiet_options());
  EXPECT_THROW(s.device("joined"), std::invalid_argument);
  EXPECT_NO_THROW(s.device("joined2"));
  options with_participant = quiet_options();
  with_participant.participants = {"a", "joined"};
  EXPECT_THROW(scheduler{with_participant}, config_error);
  options with_default = quiet_options();
  with_default.default_device = "joined";
  EXPECT_THROW(scheduler{with_default}, config_error);
}

TEST_P(Scheduler, AQueueBoundTooLargeToAddToIsUnboundedInEffect) {
  // max_queue_size = -1, as torch's "negative means unbounded" suggests, is SIZE_MAX: room was
  // computed as started + bound, which wrapped around once a closure had started.
  testing::watchdog dog(std::chrono::seconds(60), "step ends with max_queue_size = SIZE_MAX");
  scheduler s(quiet_options(std::numeric_limits<std::size_t>::max()));
  device_context& d = s.device("d");
  std::atomic<int> ran{0};
  for (int step = 0; step < 3; ++step) {
    for (int i = 0; i < 10; ++i) d.add_step_closure(run_async, [&] { ++ran; });
    d.run_step_closures();
    if (step == 0) d.flush();  // closures have started before the next step end
  }
  d.flush();
  EXPECT_EQ(ran.load(), 30);
}

TEST_P(Scheduler, ABoundedFlushGivesUpAtItsDeadlineEvenWhileItRunsClosuresItself) {
  // Every oneTBB worker is occupied, so nobody drains the queue but the flushing thread: it runs
  // the closures itself, and must still stop once the deadline passed, between two steps'
  // batches. (A low thread limit is not enough: oneTBB gives stepflow's arena a worker even at 1
  // thread, and the flush then only waits.)
  testing::watchdog dog(std::chrono::seconds(60), "flush_for behind 20 slow steps");
  scheduler s(quiet_options());
  device_context& d = s.device("d");
  testing::occupy_workers busy;
  constexpr int steps = 20;
  std::atomic<int> ran{0};
  std::atomic<int> ran_on_this_thread{0};
  const std::thread::id flushing_thread = std::this_thread::get_id();
  for (int step = 0; step < steps; ++step) {
    d.add_step_closure(run_async, [&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      if (std::this_thread::get_id() == flushing_thread) ++ran_on_this_thread;
      ++ran;
    });
    d.run_step_closures();
  }
  EXPECT_EQ(ran.load(), 0) << "a closure ran while every worker was occupied and nobody flushed";
  EXPECT_FALSE(d.flush_for(std::chrono::milliseconds(50)));
  EXPECT_GE(ran_on_this_thread.load(), 1) << "the bounded flush did not run closures itself";
  EXPECT_EQ(ran_on_this_thread.load(), ran.load()) << "a closure ran on a worker";
  EXPECT_LT(ran.load(), steps) << "the flush ran every step's closure past its deadline";
  EXPECT_FALSE(s.flush_for(std::chrono::milliseconds(-1))) << "a negative timeout gives up at once";
  busy.release();
  d.flush();
  EXPECT_EQ(ran.load(), steps);
}

TEST_P(Scheduler, AFlushTimeoutBeyondTheClocksRangeWaitsUntilDone) {
  // seconds::max() in nanoseconds overflows: the deadline must saturate, not wrap into the past.
  scheduler s(quiet_options());
  device_context& d = s.device("d");
  std::atomic<int> ran{0};
  const auto slow = [&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    ++ran;
  };
  d.add_step_closure(run_async, slow);
  d.run_step_closures();
  EXPECT_TRUE(d.flush_for(std::chrono::seconds::max()));
  EXPECT_EQ(ran.load(), 1);
  d.add_step_closure(run_async, slow);
  d.run_step_closures();
  EXPECT_TRUE(s.flush_for(std::chrono::hours::max()));
  EXPECT_EQ(ran.load(), 2);
  EXPECT_TRUE(d.flush_for(std::chrono::duration<double>(1e300)));
  EXPECT_TRUE(d.flush_for(std::chrono::seconds(-1))) << "nothing left: done, whatever the timeout";
}

TEST_P(Scheduler, ManyThreadsAddToOneDeviceWhileItsStepsEnd) {
  scheduler s(quiet_options(16));
  device_context& d = s.device("shared");
  constexpr int threads = 4;
  constexpr int per_thread = 5000;
  std::vector<std::atomic<int>> runs(threads * per_thread);
  // Per-thread order: each thread's closures must run in the order that thread added them.
  std::vector<int> last_seen(threads, -1);  // async side: touched by one drainer at a time
  std::atomic<bool> order_broken{false};
  std::atomic<bool> stop{false};
  std::thread ender([&] {
    while (!stop.load()) d.run_step_closures();
  });
  std::vector<std::thread> adders;
  for (int t = 0; t < threads; ++t) {
    adders.emplace_back([&, t] {
      for (int i = 0; i < per_thread; ++i) {
        auto body = [&, t, i] { runs[static_cast<std::size_t>(t * per_thread + i)].fetch_add(1); };
        if (i % 2 == 0) {
          d.add_step_closure(body);
        } else {
          d.add_step_closure(run_async, [&, t, i, body] {
            body();
            if (last_seen[static_cast<std::size_t>(t)] >= i) order_broken = true;
            last_seen[static_cast<std::size_t>(t)] = i;
          });
        }
      }
    });
  }
  for (std::thread& a : adders) a.join();
  stop = true;
  ender.join();
  d.run_step_closures();
  d.flush();
  for (std::size_t i = 0; i < runs.size(); ++i) ASSERT_EQ(runs[i].load(), 1) << "closure " << i;
  EXPECT_FALSE(order_broken.load());
}

TEST_P(Scheduler, StepEndsFromTbbWorkersPipelinesAndArenasWithAFullQueue) {
  scheduler s(quiet_options(1));
  std::atomic<int> ran{0};
  // From parallel_for bodies: each body owns a device.
  // (Bodies and filters are built before before_tbb_algorithm(), which must follow every write
  // the workers will read.)
  const auto for_body = [&](int i) {
    testing::tbb_body_scope scope;
    device_context& d = s.device("pf" + std::to_string(i));
    for (int step = 0; step < 20; ++step) {
      for (int k = 0; k < 3; ++k) d.add_step_closure(run_async, [&] { ++ran; });
      d.run_step_closures();
    }
  };
  testing::before_tbb_algorithm();
  tbb::parallel_for(0, 8, for_body);
  testing::after_tbb_algorithm();
  // From a serial parallel_pipeline filter.
  device_context& p = s.device("pipeline");
  int produced = 0;
  const auto steps = tbb::make_filter<void, int>(tbb::filter_mode::serial_in_order,
                                                 [&](tbb::flow_control& fc) {
                                                   testing::tbb_body_scope scope;
                                                   if (produced == 100) fc.stop();
                                                   return produced++;
                                                 }) &
                     tbb::make_filter<int, void>(tbb::filter_mode::serial_in_order, [&](int) {
                       testing::tbb_body_scope scope;
                       p.add_step_closure(run_async, [&] { ++ran; });
                       p.add_step_closure(run_async, [&] { ++ran; });
                       p.run_step_closures();
                     });
  testing::before_tbb_algorithm();
  tbb::parallel_pipeline(4, steps);
  testing::after_tbb_algorithm();
  // From a user arena.
  tbb::task_arena arena(2);
  const auto in_arena = [&] {
    testing::tbb_body_scope scope;
    device_context& d = s.device("arena");
    for (int step = 0; step < 50; ++step) {
      d.add_step_closure(run_async, [&] { ++ran; });
      d.add_step_closure(run_async, [&] { ++ran; });
      d.run_step_closures();
    }
  };
  testing::before_tbb_algorithm();
  arena.execute(in_arena);
  testing::after_tbb_algorithm();
  s.flush();
  EXPECT_EQ(ran.load(), 8 * 20 * 3 + 100 * 2 + 50 * 2);
}

// The user's pipeline throws while stepflow's drainer task is still waiting for a worker: every
// worker is occupied, so the filters run on this thread and the task started by the first step
// end cannot have started yet. Were that task bound to the pipeline's context, the cancellation
// would skip it and the closures would wait for a flush; they must run with nobody flushing.
TEST_P(Scheduler, AThrowingUserPipelineDoesNotCancelQueuedClosures) {
  scheduler s(quiet_options(0));
  device_context& d = s.device("d");
  std::atomic<int> started{0};
  std::atomic<int> ran{0};
  std::atomic<bool> release{false};
  int produced = 0;
  const auto steps = tbb::make_filter<void, int>(tbb::filter_mode::serial_in_order,
                                                 [&](tbb::flow_control& fc) {
                                                   testing::tbb_body_scope scope;
                                                   if (produced == 10) fc.stop();
                                                   return produced++;
                                                 }) &
                     tbb::make_filter<int, void>(tbb::filter_mode::serial_in_order, [&](int i) {
                       testing::tbb_body_scope scope;
                       d.add_step_closure(run_async, [&] {
                         ++started;
                         while (!release.load()) std::this_thread::yield();
                         ++ran;
                       });
                       d.run_step_closures();
                       if (i == 5) throw std::runtime_error("pipeline");
                     });
  {
    testing::occupy_workers busy;
    testing::before_tbb_algorithm();
    EXPECT_THROW(tbb::parallel_pipeline(2, steps), std::runtime_error);
    testing::after_tbb_algorithm();
    EXPECT_EQ(started.load(), 0) << "premise: no closure started before the pipeline threw";
  }
  release = true;
  // No flush: a worker must run them. (The 10 s are a hang bound, not a timing claim.)
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (ran.load() < 6 && std::chrono::steady_clock::now() < give_up) std::this_thread::yield();
  EXPECT_EQ(ran.load(), 6) << "the queued closures were cancelled with the user's pipeline: only "
                              "a flush would run them";
  d.flush();
  EXPECT_EQ(ran.load(), 6);
}

// A step end inside a oneTBB task whose context the user cancels: the sync closures still run
// under a context of their own, so parallel work they start is not cancelled with the caller's.
// (Outside any task they run as plain calls; inside one, through the device's isolated task
// group: this is the case that tells the two apart.) Checked through the context the closure
// sees, which is what a nested parallel_for or task_group would bind to.
TEST_P(Scheduler, SyncClosuresOfAStepEndInACancelledTaskKeepTheirNestedWork) {
  scheduler s(quiet_options());
  device_context& d = s.device("d");
  std::optional<bool> inside_sees_cancellation;
  std::optional<bool> outside_sees_cancellation;
  tbb::task_group_context user;
  testing::before_tbb_algorithm();
  tbb::parallel_for(
      0, 1,
      [&](int) {
        testing::tbb_body_scope scope;
        user.cancel_group_execution();
        ASSERT_TRUE(tbb::is_current_task_group_canceling());  // the caller's own work is
        d.add_step_closure(
            [&] { inside_sees_cancellation = tbb::is_current_task_group_canceling(); });
        d.run_step_closures();
      },
      user);
  testing::after_tbb_algorithm();
  ASSERT_TRUE(inside_sees_cancellation.has_value());
  EXPECT_FALSE(*inside_sees_cancellation);
  // From the test's own thread, outside any task.
  d.add_step_closure([&] { outside_sees_cancellation = tbb::is_current_task_group_canceling(); });
  d.run_step_closures();
  ASSERT_TRUE(outside_sees_cancellation.has_value());
  EXPECT_FALSE(*outside_sees_cancellation);
}

TEST_P(Scheduler, MemoryStaysFlatWhileTheProducerOutpacesTheClosures) {
  // 5,000 steps of closures much slower than their producer (20 us each): with the default bound
  // the queue never holds more than 100 of them, so the peak number alive stays bounded whatever
  // the step count.
  scheduler s(quiet_options(100));
  device_context& d = s.device("d");
  std::atomic<int> alive{0};
  std::atomic<int> peak{0};
  struct counted {
    std::atomic<int>* alive;
    std::atomic<int>* peak;
    counted(std::atomic<int>* a, std::atomic<int>* p) : alive(a), peak(p) {
      const int now = alive->fetch_add(1) + 1;
      int seen = peak->load();
      while (now > seen && !peak->compare_exchange_weak(seen, now)) {
      }
    }
    counted(counted&& o) noexcept : alive(std::exchange(o.alive, nullptr)), peak(o.peak) {}
    ~counted() {
      if (alive != nullptr) alive->fetch_sub(1);
    }
  };
  for (int step = 0; step < 5000; ++step) {
    d.add_step_closure(run_async, [c = counted(&alive, &peak)] {
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(20);
      while (std::chrono::steady_clock::now() < until) {
      }
    });
    d.run_step_closures();
  }
  d.flush();
  EXPECT_EQ(alive.load(), 0);
  // The premise: the producer did outpace the closures, so the bound was what held them back.
  EXPECT_GE(peak.load(), 100);
  // 100 pending + the one running + the one being added + a step's batch in hand.
  EXPECT_LE(peak.load(), 103);
}

STEPFLOW_AT_1_2_4_THREADS(Scheduler);

// The premise of every test that needs nobody draining (tests/support/occupy_workers.hpp): while
// every oneTBB worker is occupied, a queued asynchronous closure runs only when a waiting thread
// runs it, here the flushing one, at every thread limit (at 1 too, where oneTBB still gives
// stepflow's arena a worker); once released, workers run them again. Three devices, as many as
// stepflow's arena has workers at 4 threads; one of them has just had a drainer task, which may
// still be lingering on its worker when the workers are occupied.
class OccupyWorkers : public testing::with_tbb_threads {};

TEST_P(OccupyWorkers, WhileHeldOnlyAFlushRunsQueuedClosuresAndOnceReleasedWorkersDo) {
  scheduler s(quiet_options());
  std::vector<device_context*> devices;
  for (const char* name : {"a", "b", "c"}) devices.push_back(&s.device(name));
  std::atomic<int> warm{0};
  devices[0]->add_step_closure(run_async, [&] { ++warm; });
  devices[0]->run_step_closures();
  while (warm.load() == 0) std::this_thread::yield();

  const std::thread::id this_thread = std::this_thread::get_id();
  std::vector<std::atomic<int>> ran_here(devices.size());
  std::atomic<int> ran{0};
  {
    testing::occupy_workers busy;
    EXPECT_EQ(busy.count(), std::max(2, GetParam()) - 1) << "oneTBB's workers at this limit";
    for (std::size_t i = 0; i < devices.size(); ++i) {
      devices[i]->add_step_closure(run_async, [&, i] {
        if (std::this_thread::get_id() == this_thread) ++ran_here[i];
        ++ran;
      });
      devices[i]->run_step_closures();
    }
    // Time enough for a free worker, were there one, to run them; with none, no wait is long
    // enough, so this is not a timing claim.
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    EXPECT_EQ(ran.load(), 0) << "a worker ran a queued closure while every worker was occupied";
    for (std::size_t i = 0; i < devices.size(); ++i) {
      devices[i]->flush();
      EXPECT_EQ(ran_here[i].load(), 1) << "device " << i << "'s closure ran on a worker";
    }
  }
  std::atomic<int> ran_on_a_worker{0};
  devices[1]->add_step_closure(run_async, [&] {
    if (std::this_thread::get_id() != this_thread) ++ran_on_a_worker;
  });
  devices[1]->run_step_closures();
  // No flush: released, a worker runs it. (The 10 s are a hang bound, not a timing claim.)
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (ran_on_a_worker.load() == 0 && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::yield();
  }
  EXPECT_EQ(ran_on_a_worker.load(), 1) << "the released workers did not come back";
}

STEPFLOW_AT_1_2_4_THREADS(OccupyWorkers);

TEST(SchedulerLifetime, UseOfADeviceAfterItsSchedulerIsGoneIsCaughtInDebugBuilds) {
#ifdef NDEBUG
  GTEST_SKIP() << "release builds do not check (documented undefined behaviour)";
#else
  device_context* dangling = nullptr;
  {
    scheduler s(quiet_options());
    dangling = &s.device("d");
  }
  EXPECT_THROW(dangling->run_step_closures(), error);
  EXPECT_THROW(dangling->flush(), error);
  EXPECT_THROW(dangling->add_step_closure([] {}), error);
#endif
}

}  // namespace
}  // namespace stepflow
