// Cross-device ordering: lockstep, joined step closures, flush_for, participants, flow-graph
// adapters.

#include <stepflow/flow.hpp>
#include <stepflow/stepflow.hpp>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "support/occupy_workers.hpp"
#include "support/tbb_threads.hpp"
#include "support/tsan_handoff.hpp"
#include "support/watchdog.hpp"

namespace stepflow {
namespace {

using namespace std::chrono_literals;

options lockstep_options(std::size_t max_queue = 100) {
  options o;
  o.max_queue_size = max_queue;
  o.report_to_stderr = false;
  o.ordering = step_ordering::lockstep;
  return o;
}

void busy_wait(std::chrono::microseconds d) {
  const auto until = std::chrono::steady_clock::now() + d;
  while (std::chrono::steady_clock::now() < until) {
  }
}

// Every event that ran, in the order it started: (step, device) with device -1 for a joined
// closure.
class global_log {
 public:
  explicit global_log(std::size_t capacity) : entries_(capacity) {}
  void record(std::uint64_t step, int device) {
    const std::size_t i = next_.fetch_add(1);
    if (i < entries_.size()) entries_[i] = {step, device};
  }
  std::size_t size() const { return std::min(next_.load(), entries_.size()); }
  const std::pair<std::uint64_t, int>& operator[](std::size_t i) const { return entries_[i]; }

 private:
  std::vector<std::pair<std::uint64_t, int>> entries_;
  std::atomic<std::size_t> next_{0};
};

class Lockstep : public testing::with_tbb_threads {};

TEST_P(Lockstep, EightDevicesThousandStepsNeverOverlapSteps) {
  constexpr int devices = 8;
  constexpr int steps = 1000;
  const std::uint64_t seed = std::random_device{}();
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  testing::watchdog dog(std::chrono::seconds(120), "8 devices x 1000 lockstep steps");
  global_log log(devices * steps * 3 + steps);
  // Closures of each step not finished yet, counted up when added: the start order in `log`
  // alone would not notice a step starting while the one before still runs.
  std::vector<std::atomic<int>> unfinished(steps + 1);
  std::atomic<int> started_early{0};  // a step whose closure started before the step before ended
  {
    scheduler s(lockstep_options(16));
    std::vector<device_context*> ds;
    for (int d = 0; d < devices; ++d) ds.push_back(&s.device("gpu" + std::to_string(d)));
    std::vector<std::thread> threads;
    for (int d = 0; d < devices; ++d) {
      threads.emplace_back([&, d] {
        std::mt19937 rng(static_cast<std::uint32_t>(seed + static_cast<std::uint64_t>(d)));
        device_context& dev = *ds[static_cast<std::size_t>(d)];
        for (int step = 1; step <= steps; ++step) {
          const int closures = 1 + static_cast<int>(rng() % 3);
          for (int k = 0; k < closures; ++k) {
            const auto cost = std::chrono::microseconds(rng() % 20);
            unfinished[static_cast<std::size_t>(step)].fetch_add(1);
            dev.add_step_closure(run_async, [&log, &unfinished, &started_early, step, d, cost] {
              log.record(static_cast<std::uint64_t>(step), d);
              if (step > 1 && unfinished[static_cast<std::size_t>(step - 1)].load() != 0) {
                started_early.store(step);
              }
              busy_wait(cost);
              unfinished[static_cast<std::size_t>(step)].fetch_sub(1);
            });
          }
          dev.run_step_closures();
        }
      });
    }
    for (std::thread& t : threads) t.join();
    s.flush();
  }
  ASSERT_GT(log.size(), static_cast<std::size_t>(devices * steps));
  EXPECT_EQ(started_early.load(), 0)
      << "a closure of step " << started_early.load()
      << " started while a closure of the step before still ran; seed " << seed;
  for (std::size_t i = 1; i < log.size(); ++i) {
    ASSERT_LE(log[i - 1].first, log[i].first)
        << "step " << log[i].first << " of device " << log[i].second << " started before step "
        << log[i - 1].first << " of device " << log[i - 1].second << " finished; seed " << seed;
  }
}

TEST_P(Lockstep, JoinedClosureRunsBetweenStepsAndSeesEveryDevicesWork) {
  constexpr int devices = 4;
  constexpr int steps = 200;
  global_log log(devices * steps * 2 + steps * 2);
  std::vector<std::atomic<int>> work(steps + 2);
  std::atomic<int> wrong_view{0};
  std::atomic<int> joined_ran{0};
  {
    scheduler s(lockstep_options(4));
    std::vector<device_context*> ds;
    for (int d = 0; d < devices; ++d) ds.push_back(&s.device("gpu" + std::to_string(d)));
    for (int step = 1; step <= steps; ++step) {
      for (int d = 0; d < devices; ++d) {
        ds[static_cast<std::size_t>(d)]->add_step_closure(run_async, [&, step, d] {
          log.record(static_cast<std::uint64_t>(step), d);
          work[static_cast<std::size_t>(step)].fetch_add(1);
        });
      }
      s.add_joined_step_closure([&, step](std::uint64_t joined_step) {
        log.record(joined_step, -1);
        if (joined_step != static_cast<std::uint64_t>(step) ||
            work[static_cast<std::size_t>(step)].load() != devices) {
          ++wrong_view;
        }
        ++joined_ran;
      });
      for (device_context* d : ds) d->run_step_closures();
    }
    s.flush();
    EXPECT_EQ(joined_ran.load(), steps) << "flush must wait for the joined closures";
  }
  EXPECT_EQ(wrong_view.load(), 0);
  // Lockstep: step N's joined closure starts after every step N closure and before any N+1 one.
  std::uint64_t current = 1;
  bool joined_seen = false;
  for (std::size_t i = 0; i < log.size(); ++i) {
    const auto [step, device] = log[i];
    if (device == -1) {
      ASSERT_EQ(step, current) << "joined closure out of order at " << i;
      joined_seen = true;
    } else if (step != current) {
      ASSERT_TRUE(joined_seen) << "step " << step << " started before step " << current
                               << "'s joined closure ran";
      ASSERT_EQ(step, current + 1);
      current = step;
      joined_seen = false;
    }
  }
}

TEST_P(Lockstep, FlushForGivesUpOnADeviceThatStoppedAndRetireReleasesTheOthers) {
  testing::watchdog dog(std::chrono::seconds(60), "lockstep with a stopped device");
  options o = lockstep_options();
  o.participants = {"fast", "stopped"};
  scheduler s(o);
  device_context& fast = s.device("fast");
  s.device("stopped");  // never ends a step
  std::atomic<int> ran{0};
  for (int step = 0; step < 3; ++step) {
    fast.add_step_closure(run_async, [&] { ++ran; });
    fast.run_step_closures();
  }
  // Step 1 may run (nothing precedes it); steps 2 and 3 wait for "stopped" to finish step 1.
  EXPECT_FALSE(fast.flush_for(50ms));
  EXPECT_FALSE(s.flush_for(50ms));
  EXPECT_EQ(ran.load(), 1);
  EXPECT_TRUE(s.retire("stopped"));
  EXPECT_FALSE(s.retire("stopped")) << "already retired";
  EXPECT_TRUE(fast.flush_for(30s));
  EXPECT_EQ(ran.load(), 3);
}

TEST_P(Lockstep, DestroyingTheSchedulerNeverWaitsForAStoppedDevice) {
  testing::watchdog dog(std::chrono::seconds(60), "shutdown with a stopped participant");
  std::atomic<int> ran{0};
  {
    options o = lockstep_options();
    o.participants = {"a", "b"};
    scheduler s(o);
    device_context& a = s.device("a");
    for (int step = 0; step < 5; ++step) {
      a.add_step_closure(run_async, [&] { ++ran; });
      a.run_step_closures();
    }
  }
  EXPECT_EQ(ran.load(), 5) << "shutdown lifts the gates and runs what was queued";
}

TEST_P(Lockstep, AClosureWaitingForAnotherParticipantsClosureOfItsStepDoesNotStallThatOne) {
  // The thread that completes a global step may run the next step's closures of every device
  // itself, one device after another. Device a's closure, first in every step, holds that thread
  // until device b's closure of the same step ran: b's gate must already be open then, so that
  // b.flush() below runs b's closure itself if nobody else does (a closed gate would hang here).
  testing::watchdog dog(testing::default_hang_bound, "lockstep closures waiting across devices");
  constexpr std::uint64_t steps = 20;
  std::atomic<std::uint64_t> a_done{0};
  std::atomic<std::uint64_t> b_done{0};
  {
    scheduler s(lockstep_options());
    device_context& a = s.device("a");
    device_context& b = s.device("b");
    for (std::uint64_t step = 1; step <= steps; ++step) {
      a.add_step_closure(run_async, [&a_done, &b_done, step] {
        while (b_done.load() < step) std::this_thread::yield();
        a_done.store(step);
      });
      b.add_step_closure(run_async, [&b_done] { b_done.fetch_add(1); });
      a.run_step_closures();
      b.run_step_closures();
      b.flush();
      EXPECT_EQ(b_done.load(), step);
    }
    s.flush();
  }
  EXPECT_EQ(a_done.load(), steps);
  EXPECT_EQ(b_done.load(), steps);
}

TEST_P(Lockstep, WithSeveralWorkersTheDevicesOfAStepRunInParallel) {
  // With more than one worker in stepflow's arena, the thread that completes a global step hands
  // all devices but one to other workers (spawned drainer tasks) instead of running them one
  // after another. Each step's two closures meet: each waits until the other has started, which
  // only ends if they run at the same time, and nobody here waits on a queue that could run them
  // itself. Bounded, so that a regression fails instead of hanging.
  if (GetParam() < 4) GTEST_SKIP() << "needs at least two workers in stepflow's arena";
  testing::watchdog dog(testing::default_hang_bound, "lockstep devices meeting in each step");
  constexpr std::uint64_t steps = 20;
  std::atomic<std::uint64_t> a_started{0};
  std::atomic<std::uint64_t> b_started{0};
  std::atomic<int> missed{0};
  const auto meet = [&missed](std::atomic<std::uint64_t>& mine,
                              const std::atomic<std::uint64_t>& other, std::uint64_t step) {
    mine.store(step);
    const auto give_up = std::chrono::steady_clock::now() + 10s;
    while (other.load() < step) {
      if (std::chrono::steady_clock::now() > give_up) {
        missed.fetch_add(1);
        return;
      }
      std::this_thread::yield();
    }
  };
  {
    scheduler s(lockstep_options());
    device_context& a = s.device("a");
    device_context& b = s.device("b");
    for (std::uint64_t step = 1; step <= steps; ++step) {
      a.add_step_closure(run_async, [&, step] { meet(a_started, b_started, step); });
      b.add_step_closure(run_async, [&, step] { meet(b_started, a_started, step); });
      a.run_step_closures();
      b.run_step_closures();
    }
    s.flush();
  }
  EXPECT_EQ(missed.load(), 0) << "closures of one step never ran at the same time";
  EXPECT_EQ(a_started.load(), steps);
  EXPECT_EQ(b_started.load(), steps);
}

TEST_P(Lockstep, DevicesCreatedAfterTheFirstStepDoNotParticipate) {
  testing::watchdog dog(std::chrono::seconds(60), "late device");
  scheduler s(lockstep_options());
  device_context& a = s.device("a");
  s.device("b");          // participates, never steps
  a.run_step_closures();  // freezes participation
  device_context& late = s.device("late");
  std::atomic<int> ran{0};
  for (int step = 0; step < 5; ++step) {
    late.add_step_closure(run_async, [&] { ++ran; });
    late.run_step_closures();
  }
  EXPECT_TRUE(late.flush_for(30s)) << "a non-participant is never held back";
  EXPECT_EQ(ran.load(), 5);
  s.retire("b");
}

STEPFLOW_AT_1_2_4_THREADS(Lockstep);

class Joined : public testing::with_tbb_threads {};

TEST_P(Joined, PerDeviceModeRunsJoinedClosuresInStepOrderAfterTheirStep) {
  options o;
  o.report_to_stderr = false;
  scheduler s(o);
  device_context& a = s.device("a");
  device_context& b = s.device("b");
  std::vector<std::uint64_t> joined_steps;  // written by one joined closure at a time
  std::atomic<int> a_work{0};
  std::atomic<int> b_work{0};
  std::atomic<int> wrong{0};
  for (int step = 1; step <= 50; ++step) {
    a.add_step_closure(run_async, [&] { ++a_work; });
    b.add_step_closure(run_async, [&] { ++b_work; });
    s.add_joined_step_closure([&, step] {
      joined_steps.push_back(static_cast<std::uint64_t>(step));
      if (a_work.load() < step || b_work.load() < step) ++wrong;
    });
    a.run_step_closures();
    b.run_step_closures();
  }
  s.flush();
  ASSERT_EQ(joined_steps.size(), 50u);
  for (std::size_t i = 0; i < joined_steps.size(); ++i) EXPECT_EQ(joined_steps[i], i + 1);
  EXPECT_EQ(wrong.load(), 0);
}

TEST_P(Joined, AJoinedClosureAddedAfterSomeDevicesEndedTheStepStillWaitsForTheOthers) {
  options o;
  o.report_to_stderr = false;
  scheduler s(o);
  device_context& a = s.device("a");
  device_context& b = s.device("b");
  std::atomic<bool> b_done{false};
  std::atomic<int> wrong{0};
  std::atomic<int> ran{0};
  a.run_step_closures();  // a ended step 1; b has not: the current global step is 1
  s.add_joined_step_closure([&](std::uint64_t step) {
    if (step != 1 || !b_done.load()) ++wrong;
    ++ran;
  });
  b.add_step_closure(run_async, [&] { b_done = true; });
  b.run_step_closures();
  s.flush();
  EXPECT_EQ(ran.load(), 1);
  EXPECT_EQ(wrong.load(), 0);
}

// A step without async closures is done only once every earlier step is: while a closure of an
// earlier step still runs, the joined closure of the empty step waits for it.
TEST_P(Joined, AStepWithoutAsyncClosuresIsNotDoneBeforeTheStepsBeforeIt) {
  testing::watchdog dog(std::chrono::seconds(60), "empty steps behind a running closure");
  options o;
  o.report_to_stderr = false;
  scheduler s(o);
  device_context& a = s.device("a");
  std::atomic<bool> release{false};
  std::atomic<bool> first_done{false};
  std::atomic<int> wrong{0};
  std::atomic<int> ran{0};
  a.add_step_closure(run_async, [&] {
    while (!release.load()) std::this_thread::sleep_for(100us);
    first_done = true;
  });
  a.run_step_closures();  // step 1: its closure runs until `release`
  s.add_joined_step_closure([&](std::uint64_t step) {
    if (step != 2 || !first_done.load()) ++wrong;
    ++ran;
  });
  a.run_step_closures();              // step 2, nothing async
  a.run_step_closures();              // step 3, nothing async
  std::this_thread::sleep_for(20ms);  // time for a wrong early start
  EXPECT_EQ(ran.load(), 0);
  release = true;
  s.flush();
  EXPECT_EQ(ran.load(), 1);
  EXPECT_EQ(wrong.load(), 0);
  // Every step is done now: the next empty step is done at its step end.
  s.add_joined_step_closure([&](std::uint64_t step) {
    if (step != 4) ++wrong;
    ++ran;
  });
  a.run_step_closures();
  s.flush();
  EXPECT_EQ(ran.load(), 2);
  EXPECT_EQ(wrong.load(), 0);
}

TEST_P(Joined, FailureIsReportedOnceAndDiscardsTheJoinedClosuresBehindIt) {
  options o;
  o.report_to_stderr = false;
  scheduler s(o);
  device_context& a = s.device("a");
  std::atomic<int> later{0};
  s.add_joined_step_closure([] { throw std::runtime_error("mean loss is NaN"); });
  s.add_joined_step_closure([&] { ++later; });
  a.run_step_closures();
  try {
    s.flush();
    ADD_FAILURE() << "not reported";
  } catch (const async_closure_error& e) {
    EXPECT_EQ(e.device(), "joined");
    EXPECT_EQ(e.discarded(), 1u);
    EXPECT_NE(std::string(e.what()).find("mean loss is NaN"), std::string::npos) << e.what();
  }
  EXPECT_EQ(later.load(), 0);
  EXPECT_NO_THROW(s.flush()) << "reported once";
  s.add_joined_step_closure([&] { ++later; });
  a.run_step_closures();
  s.flush();
  EXPECT_EQ(later.load(), 1);
}

TEST_P(Joined, TakesTheStepAndMoveOnlyArgumentsLikeADevicesClosures) {
  options o;
  o.report_to_stderr = false;
  scheduler s(o);
  device_context& a = s.device("a");
  std::atomic<std::uint64_t> seen_step{0};
  std::atomic<int> seen_value{0};
  int by_reference = 0;
  // Until the twelfth session the stored arguments were passed as lvalues only, so a callable
  // taking a move-only argument by value did not compile (it does for add_step_closure).
  s.add_joined_step_closure(
      [&](std::uint64_t step, std::unique_ptr<int> p) {
        seen_step = step;
        seen_value = *p;
      },
      std::make_unique<int>(7));
  s.add_joined_step_closure([](std::uint64_t, int& r) { r = 3; }, std::ref(by_reference));
  a.run_step_closures();
  s.flush();
  EXPECT_EQ(seen_step.load(), 1u);
  EXPECT_EQ(seen_value.load(), 7);
  EXPECT_EQ(by_reference, 3);
}

TEST_P(Joined, NullCallableIsRejected) {
  options o;
  o.report_to_stderr = false;
  scheduler s(o);
  void (*null_fn)() = nullptr;
  try {
    s.add_joined_step_closure(null_fn);
    ADD_FAILURE() << "a null joined closure was accepted";
  } catch (const std::invalid_argument& e) {
    // The message names the call the user made.
    EXPECT_NE(std::string(e.what()).find("add_joined_step_closure"), std::string::npos) << e.what();
  }
}

TEST_P(Joined, NeverRunJoinedClosuresAreReportedAtShutdown) {
  std::optional<shutdown_report> seen;
  {
    options o;
    o.report_to_stderr = false;
    o.on_shutdown_report = [&](const shutdown_report& r) { seen = r; };
    o.participants = {"a", "b"};
    scheduler s(o);
    s.device("a").run_step_closures();  // b never ends step 1
    s.add_joined_step_closure([] {});
  }
  ASSERT_TRUE(seen.has_value());
  ASSERT_EQ(seen->devices.size(), 1u);
  EXPECT_EQ(seen->devices[0].device, "joined");
  EXPECT_EQ(seen->devices[0].never_run, 1u);
}

// Per device, a step's joined closure may run while the device's later steps run; it must not
// wait until the device's queue runs dry. With one worker, the wave's task was spawned on the
// very thread that went on to run the device's next batch, and a later closure waiting for the
// joined closure waited for itself.
TEST_P(Joined, AJoinedClosureDoesNotWaitForItsDevicesLaterSteps) {
  testing::watchdog dog(std::chrono::seconds(60), "joined closure behind later steps");
  options o;
  o.report_to_stderr = false;
  scheduler s(o);
  device_context& a = s.device("a");
  std::atomic<bool> joined_ran{false};
  a.add_step_closure(run_async, [] { std::this_thread::sleep_for(50ms); });
  s.add_joined_step_closure([&] { joined_ran = true; });
  a.run_step_closures();
  std::this_thread::sleep_for(10ms);  // the drainer (a worker, or this thread) runs step 1
  std::atomic<bool> saw_joined{false};
  a.add_step_closure(run_async, [&] {
    const auto give_up = std::chrono::steady_clock::now() + 10s;
    while (!joined_ran && std::chrono::steady_clock::now() < give_up) {
      std::this_thread::sleep_for(100us);
    }
    saw_joined = joined_ran.load();
  });
  a.run_step_closures();
  a.flush();
  s.flush();
  EXPECT_TRUE(saw_joined.load()) << "step 1's joined closure waited for step 2's closure";
}

// The end of training: every device retires after its last step end. Nobody is left to wait
// for, so the last step's joined closure runs (it was lost, and flush() returned without it).
TEST_P(Joined, WhenTheLastParticipantRetiresThePendingJoinedClosuresStillRun) {
  testing::watchdog dog(std::chrono::seconds(60), "joined closures after every device retired");
  for (const auto ordering : {step_ordering::per_device, step_ordering::lockstep}) {
    options o;
    o.report_to_stderr = false;
    o.ordering = ordering;
    o.participants = {"a", "b"};
    scheduler s(o);
    device_context& a = s.device("a");
    device_context& b = s.device("b");
    std::atomic<int> joined{0};
    a.run_step_closures();
    EXPECT_TRUE(s.retire("a"));
    b.add_step_closure(run_async, [] { std::this_thread::sleep_for(20ms); });
    s.add_joined_step_closure([&] { ++joined; });  // joined to step 1
    b.run_step_closures();
    EXPECT_TRUE(s.retire("b"));
    s.flush();
    EXPECT_EQ(joined.load(), 1);
    // Added with nobody left: nobody to wait for either.
    s.add_joined_step_closure([&] { ++joined; });
    s.flush();
    EXPECT_EQ(joined.load(), 2);
    // One added from inside another: not to the wave running (its closures were taken), which
    // made waves without closures follow each other forever.
    s.add_joined_step_closure([&] {
      ++joined;
      s.add_joined_step_closure([&] { ++joined; });
    });
    s.flush();
    EXPECT_EQ(joined.load(), 4);
    EXPECT_EQ(s.metrics().devices.back().ran_joined, 4u);
  }
}

options only_participant_a() {
  options o;
  o.report_to_stderr = false;
  o.participants = {"a"};
  return o;
}

// A joined closure that holds the waves back (it is the step's) until released.
struct holding_joined_closure {
  std::atomic<bool> started{false};
  std::atomic<bool> go{false};

  void add_to(scheduler& s) {
    s.add_joined_step_closure([this] {
      started = true;
      while (!go) std::this_thread::sleep_for(1ms);
    });
  }
  void wait_until_running() const {
    while (!started) std::this_thread::sleep_for(1ms);
  }
  void release() { go = true; }
};

// With nobody left to wait for, a joined closure still runs after those added before it.
TEST_P(Joined, AfterTheLastParticipantRetiredJoinedClosuresStillRunInTheOrderAdded) {
  testing::watchdog dog(std::chrono::seconds(60), "joined order after every device retired");
  scheduler s(only_participant_a());
  device_context& a = s.device("a");
  std::vector<int> order;  // joined closures run one at a time
  holding_joined_closure step1;
  step1.add_to(s);
  for (int step = 0; step < 3; ++step) a.run_step_closures();
  step1.wait_until_running();
  s.add_joined_step_closure([&] { order.push_back(1); });  // step 4's
  EXPECT_TRUE(s.retire("a"));
  s.add_joined_step_closure([&] { order.push_back(2); });  // not step 2's: after the one above
  step1.release();
  s.flush();
  EXPECT_EQ(order, (std::vector<int>{1, 2}));
}

// flush() waits for the joined closures of the steps every participant finished when it was
// called. The last participant retiring meanwhile must not leave it waiting for a step that can
// no longer complete.
TEST_P(Joined, AFlushWaitingWhenTheLastParticipantRetiresReturns) {
  testing::watchdog dog(std::chrono::seconds(60), "flush while the last participant retires");
  scheduler s(only_participant_a());
  device_context& a = s.device("a");
  holding_joined_closure step1;
  step1.add_to(s);
  a.run_step_closures();
  a.run_step_closures();  // step 2: completes only after step 1's joined closure
  step1.wait_until_running();
  std::atomic<bool> flushed{false};
  std::thread flusher([&] {
    s.flush();
    flushed = true;
  });
  std::this_thread::sleep_for(20ms);
  EXPECT_FALSE(flushed.load()) << "step 1's joined closure is still running";
  EXPECT_TRUE(s.retire("a"));
  step1.release();
  flusher.join();  // the watchdog ends a hang
  EXPECT_TRUE(flushed.load());
}

STEPFLOW_AT_1_2_4_THREADS(Joined);

class FlowAdapters : public testing::with_tbb_threads {};

TEST_P(FlowAdapters, AUserGraphQueuesClosuresAndEndsStepsWithAFullQueue) {
  testing::watchdog dog(std::chrono::seconds(60), "flow graph adapters");
  options o;
  o.report_to_stderr = false;
  o.max_queue_size = 1;
  scheduler s(o);
  device_context& gpu = s.device("gpu");
  std::vector<int> seen;  // async closures of one device: one at a time
  tbb::flow::graph g;
  auto queue = flow::closure_node<int>(g, gpu, [&seen](const int& i) { seen.push_back(i); });
  auto step = flow::step_end_node<int>(g, gpu);
  tbb::flow::make_edge(queue, step);
  testing::before_tbb_algorithm();
  for (int i = 0; i < 200; ++i) queue.try_put(i);
  g.wait_for_all();
  testing::after_tbb_algorithm();
  gpu.flush();
  ASSERT_EQ(seen.size(), 200u);
  for (int i = 0; i < 200; ++i) EXPECT_EQ(seen[static_cast<std::size_t>(i)], i);
  EXPECT_EQ(gpu.step(), 200u);
}

TEST_P(FlowAdapters, AClosureNodeCallsOneMoveOnlyFunctionThatKeepsItsStateAcrossMessages) {
  testing::watchdog dog(std::chrono::seconds(60), "flow closure_node state");
  options o;
  o.report_to_stderr = false;
  scheduler s(o);
  device_context& gpu = s.device("gpu");
  // Move-only, and counts its own calls: a copy per message would start every count at 0.
  struct running_sum {
    std::unique_ptr<int> calls = std::make_unique<int>(0);
    std::vector<int>* seen;
    void operator()(const int& i) { seen->push_back(i * 1000 + ++*calls); }
  };
  for (const auto mode : {flow::closure_mode::async, flow::closure_mode::sync}) {
    std::vector<int> seen;  // one device's closures of one kind: one at a time
    tbb::flow::graph g;
    auto queue = flow::closure_node<int>(g, gpu, running_sum{.seen = &seen}, mode);
    auto step = flow::step_end_node<int>(g, gpu);
    tbb::flow::make_edge(queue, step);
    testing::before_tbb_algorithm();
    for (int i = 0; i < 50; ++i) queue.try_put(i);
    g.wait_for_all();
    testing::after_tbb_algorithm();
    gpu.flush();
    ASSERT_EQ(seen.size(), 50u);
    for (int i = 0; i < 50; ++i) EXPECT_EQ(seen[static_cast<std::size_t>(i)], i * 1000 + i + 1);
  }
}

TEST_P(FlowAdapters, AClosureNodeRefusesANullFunctionWhenBuilt) {
  options o;
  o.report_to_stderr = false;
  scheduler s(o);
  device_context& gpu = s.device("gpu");
  tbb::flow::graph g;
  void (*null_function)(const int&) = nullptr;
  EXPECT_THROW(flow::closure_node<int>(g, gpu, null_function), std::invalid_argument);
  EXPECT_THROW(flow::closure_node<int>(g, gpu, std::function<void(const int&)>{}),
               std::invalid_argument);
  EXPECT_THROW(flow::closure_node<int>(g, gpu, labeled("log", null_function)),
               std::invalid_argument);
  try {
    flow::closure_node<int>(g, gpu, null_function);
  } catch (const std::invalid_argument& e) {
    EXPECT_STREQ(e.what(), "stepflow: flow::closure_node got a null function pointer");
  }
  EXPECT_EQ(gpu.step(), 0u);
}

// The user's graph is cancelled (a body throws) while stepflow's drainer task is still waiting
// for a worker: every worker is occupied, so the bodies run on this thread, in wait_for_all, and
// the task started by the first step end cannot have started yet. Were that task bound to the
// graph's context, the cancellation would skip it and the closures would wait for a flush; they
// must run with nobody flushing.
TEST_P(FlowAdapters, ACancelledUserGraphLeavesQueuedClosuresRunning) {
  options o;
  o.report_to_stderr = false;
  scheduler s(o);
  device_context& gpu = s.device("gpu");
  std::atomic<int> started{0};
  std::atomic<int> ran{0};
  std::atomic<bool> release{false};
  tbb::flow::graph g;
  tbb::flow::function_node<int, int> work(g, tbb::flow::serial, [&](int i) {
    testing::tbb_body_scope scope;
    gpu.add_step_closure(run_async, [&] {
      ++started;
      while (!release.load()) std::this_thread::yield();
      ++ran;
    });
    gpu.run_step_closures();
    if (i == 3) throw std::runtime_error("user graph failed");
    return i;
  });
  bool threw = false;
  {
    testing::occupy_workers busy;
    testing::before_tbb_algorithm();
    for (int i = 0; i < 4; ++i) work.try_put(i);
    try {
      g.wait_for_all();
    } catch (const std::runtime_error&) {
      testing::after_tbb_algorithm();  // before touching the exception, thrown in a body
      threw = true;
    }
    testing::after_tbb_algorithm();
    EXPECT_EQ(started.load(), 0) << "premise: no closure started before the graph was cancelled";
  }
  EXPECT_TRUE(threw);
  release = true;
  // No flush: a worker must run them. (The 10 s are a hang bound, not a timing claim.)
  const auto give_up = std::chrono::steady_clock::now() + 10s;
  while (ran.load() < 4 && std::chrono::steady_clock::now() < give_up) std::this_thread::yield();
  EXPECT_EQ(ran.load(), 4) << "the queued closures were cancelled with the user's graph: only a "
                              "flush would run them";
  gpu.flush();
  EXPECT_EQ(ran.load(), 4);
}

STEPFLOW_AT_1_2_4_THREADS(FlowAdapters);

}  // namespace
}  // namespace stepflow
