// Ports of PyTorch's own step-closure test (test/lazy/test_step_closures.py, class ClosuresTest):
// test_synchronous, test_asynchronous, test_synchronous_exception, test_asynchronous_exception.
//
// torch's versions synchronise with sleep(1); these use latches instead, so each one fails (or
// hangs into the watchdog) exactly when the behaviour it checks is broken, never by timing.
// Every scenario runs at 1, 2 and 4 oneTBB threads; one more runs the torch._lazy-style free
// functions on the default scheduler, the literal `add_step_closure` / `mark_step` calls.

#include <stepflow/stepflow.hpp>

#include <gtest/gtest.h>

#include <atomic>
#include <cstddef>
#include <exception>
#include <latch>
#include <regex>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "support/tbb_threads.hpp"
#include "support/test_options.hpp"
#include "support/watchdog.hpp"

namespace {

using stepflow::testing::probe;
using stepflow::testing::watchdog;

/// torch's tests raise RuntimeError; a type of our own shows the exception is not re-wrapped.
struct simulated_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

stepflow::options test_options(std::size_t max_queue_size = 100) {
  return stepflow::testing::quiet_options(max_queue_size);
}

class TorchParity : public stepflow::testing::with_tbb_threads {};
STEPFLOW_AT_1_2_4_THREADS(TorchParity);

// test_synchronous: "should not get to this part before closure is finished running".
TEST_P(TorchParity, SynchronousStepEndReturnsAfterTheClosureFinished) {
  watchdog dog("a step end with one synchronous closure");
  stepflow::scheduler sched(test_options());
  stepflow::device_context& dev = sched.device("lazy");

  std::atomic<bool> flag{false};
  std::atomic<bool> flag_was_set_on_entry{true};
  std::thread::id ran_on;
  dev.add_step_closure([&] {
    flag_was_set_on_entry = flag.load();
    ran_on = std::this_thread::get_id();
    flag = true;  // last thing the closure does
  });
  EXPECT_FALSE(flag.load()) << "adding a closure must not run it";

  dev.run_step_closures();

  EXPECT_TRUE(flag.load()) << "the step end returned before its synchronous closure finished";
  EXPECT_FALSE(flag_was_set_on_entry.load());
  EXPECT_EQ(ran_on, std::this_thread::get_id())
      << "a synchronous closure must run inline on the thread that ends the step";
  EXPECT_EQ(dev.step(), 1u);
}

// test_asynchronous: "should get to this part and complete before closure is finished running".
// The closure waits for a latch that is released only after the step end returned, so a step
// end that waited for it would hang (and the watchdog would name it).
TEST_P(TorchParity, AsynchronousStepEndReturnsBeforeTheClosureFinished) {
  watchdog dog(
      "a step end that waited for its asynchronous closure (which waits for the step end)");
  stepflow::scheduler sched(test_options());
  stepflow::device_context& dev = sched.device("lazy");

  std::atomic<bool> flag{false};
  std::atomic<bool> closure_saw_flag{false};
  std::atomic<int> finished{0};
  std::latch step_end_returned(1);
  dev.add_step_closure(stepflow::run_async, [&] {
    step_end_returned.wait();
    closure_saw_flag = flag.load();
    finished.fetch_add(1);
  });

  dev.run_step_closures();

  EXPECT_EQ(finished.load(), 0) << "the closure cannot have finished: it waits for this thread";
  flag = true;
  step_end_returned.count_down();
  dev.flush();
  EXPECT_EQ(finished.load(), 1) << "flush() returned before the asynchronous closure ran";
  EXPECT_TRUE(closure_saw_flag.load());
  EXPECT_EQ(dev.step(), 1u);
}

// test_synchronous_exception: the closure's exception propagates out of the step end, unchanged:
// same type and the very same object (no copy, no wrapper).
TEST_P(TorchParity, SynchronousExceptionPropagatesUnchanged) {
  watchdog dog("a step end whose synchronous closure throws");
  stepflow::scheduler sched(test_options());
  stepflow::device_context& dev = sched.device("lazy");

  std::atomic<bool> flag{false};
  const simulated_error* thrown = nullptr;
  std::atomic<int> later_runs{0};
  dev.add_step_closure([&] {
    flag = true;
    try {
      throw simulated_error("Simulating exception in closure");
    } catch (const simulated_error& e) {
      thrown = &e;
      throw;  // rethrows this very object
    }
  });
  dev.add_step_closure([&] { later_runs.fetch_add(1); });

  bool caught = false;
  try {
    dev.run_step_closures();
  } catch (const simulated_error& e) {
    caught = true;
    EXPECT_EQ(&e, thrown) << "the exception object was copied or replaced on its way out";
    EXPECT_STREQ(e.what(), "Simulating exception in closure");
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type came out of the step end: " << e.what();
  } catch (...) {
    ADD_FAILURE() << "wrong exception type came out of the step end";
  }
  EXPECT_TRUE(caught) << "the closure's exception did not propagate";
  EXPECT_TRUE(flag.load()) << "should have caught exception from closure";
  // stepflow's policy (unlike torch, where they silently move to the next step): the rest of
  // that step's synchronous closures are dropped.
  EXPECT_EQ(later_runs.load(), 0);
  EXPECT_EQ(dev.step(), 1u) << "a step end whose sync closure threw still counts";
  dev.run_step_closures();
  EXPECT_EQ(later_runs.load(), 0) << "a dropped closure ran at the next step end";
}

// test_asynchronous_exception: closure1 raises; the failure is reported at the next step end as
// RuntimeError("Cannot run asynchronous closure due to previously raised exception") chained to
// the original, and the closure queued after the failing one never runs.
//
// A queue bound of 1 makes "the failure has been recorded" observable at every thread count
// without flush() (which would report it): the step end hands closure1 over and waits for room,
// so closure1 runs (on a worker, or on this thread when there is none) before `behind` can
// follow; `behind` is queued behind the failure and discarded, and its destruction (counted by
// `behind_gone`) happens only once the failure is recorded.
TEST_P(TorchParity, AsynchronousExceptionIsReportedAtTheNextStepEnd) {
  watchdog dog("an asynchronous failure and the step end that reports it");
  std::vector<stepflow::shutdown_report> reports;
  stepflow::options opts = test_options(/*max_queue_size=*/1);
  opts.on_shutdown_report = [&](const stepflow::shutdown_report& r) { reports.push_back(r); };
  {
    stepflow::scheduler sched(opts);
    stepflow::device_context& dev = sched.device("lazy");

    std::atomic<bool> flag{false};
    std::atomic<int> behind_runs{0};
    std::latch behind_gone(1);
    dev.add_step_closure(stepflow::run_async, [&] {
      flag = true;
      throw simulated_error("Simulating exception in closure1");
    });
    dev.add_step_closure(stepflow::run_async, probe(behind_runs, behind_gone));
    ASSERT_NO_THROW(dev.run_step_closures())
        << "the failure was recorded after this step end started; it must not report it";

    behind_gone.wait();  // torch: flag.wait(timeout=5)
    EXPECT_TRUE(flag.load());
    EXPECT_EQ(behind_runs.load(), 0) << "a closure queued behind the failing one ran";

    std::atomic<int> closure2_runs{0};
    bool reported = false;
    try {
      dev.add_step_closure(stepflow::run_async,
                           [&] { closure2_runs.fetch_add(1); });  // should never execute
      dev.run_step_closures();
    } catch (const stepflow::async_closure_error& e) {
      reported = true;
      EXPECT_TRUE(std::string_view(e.what()).starts_with(
          "Cannot run asynchronous closure due to previously raised exception"))
          << e.what();
      EXPECT_TRUE(std::string_view(e.what()).starts_with(stepflow::async_failure_prefix));
      EXPECT_TRUE(std::regex_search(std::string(e.what()), std::regex(R"(\b1\b)")))
          << "the message must give the number of discarded closures: " << e.what();
      EXPECT_EQ(e.device(), "lazy");
      EXPECT_EQ(e.discarded(), 1u);
      // "Should have caught exception from closure1": the original, nested.
      try {
        std::rethrow_if_nested(e);
        ADD_FAILURE() << "async_closure_error carries no nested exception";
      } catch (const simulated_error& original) {
        EXPECT_STREQ(original.what(), "Simulating exception in closure1");
      } catch (...) {
        ADD_FAILURE() << "the nested exception is not the closure's own";
      }
      EXPECT_TRUE(e.original() != nullptr);
    }
    EXPECT_TRUE(reported) << "the next step end did not report the asynchronous failure";
    EXPECT_EQ(closure2_runs.load(), 0) << "closure2 ran although the step end reported a failure";
    EXPECT_EQ(behind_runs.load(), 0);
    EXPECT_TRUE(flag.load());

    // Reported exactly once.
    EXPECT_NO_THROW(dev.flush());
    EXPECT_EQ(closure2_runs.load(), 0);
  }
  // closure2 was never taken by a step end: it never executed, and the shutdown report says so.
  ASSERT_EQ(reports.size(), 1u);
  ASSERT_EQ(reports[0].devices.size(), 1u);
  EXPECT_EQ(reports[0].devices[0].device, "lazy");
  EXPECT_EQ(reports[0].devices[0].never_run, 1u);
  EXPECT_FALSE(reports[0].devices[0].unreported_error) << "the failure was already reported";
}

// The same scenarios through the torch._lazy-style free functions on the default scheduler:
// stepflow::add_step_closure(...) is torch._lazy.add_step_closure, stepflow::run_step_closures()
// is the closure half of torch._lazy.mark_step(). Leaves nothing pending, so the default
// scheduler's shutdown report stays empty.
TEST(TorchParityFreeFunctions, SynchronousAndAsynchronous) {
  watchdog dog("the free functions on the default scheduler");
  std::atomic<bool> sync_flag{false};
  stepflow::add_step_closure([&] { sync_flag = true; });
  stepflow::device_context& dev = stepflow::run_step_closures();
  EXPECT_TRUE(sync_flag.load());
  EXPECT_EQ(&dev, &stepflow::get_device_context());
  EXPECT_EQ(&dev, &stepflow::default_scheduler().default_device());

  std::latch step_end_returned(1);
  std::atomic<int> async_runs{0};
  stepflow::add_step_closure(stepflow::run_async, [&] {
    step_end_returned.wait();
    async_runs.fetch_add(1);
  });
  stepflow::run_step_closures();
  EXPECT_EQ(async_runs.load(), 0);
  step_end_returned.count_down();
  stepflow::get_device_context().flush();
  EXPECT_EQ(async_runs.load(), 1);
}

}  // namespace
