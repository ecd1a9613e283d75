// The hazards H1-H10 of torch._lazy's step closures (../shared/SEMANTICS.md, docs/semantics.md),
// each as a test that hangs or fails on the original design, plus the full-queue cases of the
// contract (one TBB thread, step ends from parallel_for bodies and parallel_pipeline filters).
//
// Everything that could hang runs under a `watchdog`, so a regression aborts with the test's
// name instead of hanging the suite. Scheduler tests run at 1, 2 and 4 oneTBB threads. No test
// synchronises by sleeping or asserts on timing; the only clock reads are generous hang bounds.
//
// Observing "the failure has been recorded" without reporting it: an asynchronous closure
// queued behind the failing one (a `probe`) is discarded, and it is destroyed only once the
// failure is recorded. Waiting for its destruction therefore orders the failure before the
// next call, with no flush() (which would report it) and no sleep.

#include <stepflow/stepflow.hpp>

#include <gtest/gtest.h>
#include <oneapi/tbb/parallel_for.h>
#include <oneapi/tbb/parallel_pipeline.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <latch>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <regex>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "support/occupy_workers.hpp"
#include "support/tbb_threads.hpp"
#include "support/test_options.hpp"
#include "support/tsan_handoff.hpp"
#include "support/watchdog.hpp"

namespace {

using namespace std::chrono_literals;
using stepflow::run_async;
using stepflow::testing::probe;
using stepflow::testing::watchdog;

// --- helpers ------------------------------------------------------------------------------------

/// What the failing asynchronous closures throw.
struct closure_failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

stepflow::options test_options(std::size_t max_queue_size = 100) {
  return stepflow::testing::quiet_options(max_queue_size);
}

/// Runs `call`; returns the `async_closure_error` it threw, or nothing. Other exceptions escape
/// (and fail the test).
template <class Call>
std::optional<stepflow::async_closure_error> async_error_from(Call&& call) {
  try {
    std::forward<Call>(call)();
  } catch (const stepflow::async_closure_error& e) {
    return e;
  }
  return std::nullopt;
}

/// Checks a report of an asynchronous failure against the contract: torch's prefix, the device,
/// the discard count (in `discarded()` and in the message), and the closure's own exception
/// nested inside.
void expect_report(const stepflow::async_closure_error& e, std::string_view device,
                   std::size_t discarded, std::string_view original_what) {
  const std::string what = e.what();
  EXPECT_TRUE(std::string_view(what).starts_with(
      "Cannot run asynchronous closure due to previously raised exception"))
      << what;
  EXPECT_EQ(e.device(), device);
  EXPECT_EQ(e.discarded(), discarded) << what;
  EXPECT_TRUE(std::regex_search(what, std::regex("\\b" + std::to_string(discarded) + "\\b")))
      << "the message must give the number of discarded closures (" << discarded << "): " << what;
  try {
    std::rethrow_if_nested(e);
    ADD_FAILURE() << "no nested exception in: " << what;
  } catch (const closure_failure& original) {
    EXPECT_EQ(std::string_view(original.what()), original_what);
  } catch (...) {
    ADD_FAILURE() << "the nested exception is not the closure's own: " << what;
  }
}

/// Makes `dev` record an asynchronous failure without reporting it, at any thread count: with a
/// queue bound of 1, the step end hands `thrower` over and waits for room, so it has run (on a
/// worker, or on this thread) before the `behind` probes could follow; they are queued behind the
/// failure and discarded. Returns once all of them are destroyed, i.e. the failure is recorded.
/// Precondition: `dev`'s scheduler has max_queue_size 1.
void record_unreported_failure(stepflow::device_context& dev, int behind, const char* message,
                               std::atomic<int>& behind_runs) {
  std::latch gone(behind);
  dev.add_step_closure(run_async, [message] { throw closure_failure(message); });
  for (int i = 0; i < behind; ++i) dev.add_step_closure(run_async, probe(behind_runs, gone));
  ASSERT_NO_THROW(dev.run_step_closures())
      << "a failure recorded while a step end hands its batch over is reported by the next call";
  gone.wait();
}

/// Shutdown reports handed to `options::on_shutdown_report`.
struct report_sink {
  std::vector<stepflow::shutdown_report> reports;
  stepflow::options attach(stepflow::options opts) {
    opts.on_shutdown_report = [this](const stepflow::shutdown_report& r) { reports.push_back(r); };
    return opts;
  }
  const stepflow::device_shutdown_report* device(std::string_view name) const {
    for (const auto& r : reports) {
      for (const auto& d : r.devices) {
        if (d.device == name) return &d;
      }
    }
    return nullptr;
  }
};

/// Runs `call`. If it has not returned within `bound` (a generous hang bound, not a timing
/// claim), calls `unblock` from a helper thread so the test can fail instead of hanging.
/// Returns true when `call` returned without that help.
template <class Call, class Unblock>
bool returns_without_help(Call&& call, Unblock&& unblock, std::chrono::seconds bound = 4s) {
  std::mutex m;
  std::condition_variable cv;
  bool returned = false;
  bool helped = false;
  std::thread helper([&] {
    std::unique_lock lock(m);
    if (!cv.wait_for(lock, bound, [&] { return returned; })) {
      helped = true;
      lock.unlock();
      unblock();
    }
  });
  std::forward<Call>(call)();
  {
    std::lock_guard lock(m);
    returned = true;
  }
  cv.notify_one();
  helper.join();
  return !helped;
}

unsigned test_seed() {
  if (const char* s = std::getenv("STEPFLOW_TEST_SEED")) {
    return static_cast<unsigned>(std::strtoul(s, nullptr, 10));
  }
  return std::random_device{}();
}

class Hazards : public stepflow::testing::with_tbb_threads {};
STEPFLOW_AT_1_2_4_THREADS(Hazards);

// --- H1: an async closure throws while the queue is full; torch's producer blocks forever ------

// Same step: the failing closure and the closures behind it do not fit the queue.
TEST_P(Hazards, H1_FailureWithFullQueueNeverHangs) {
  watchdog dog("a step end handing over a batch behind a failure, queue bound 1");
  stepflow::scheduler sched(test_options(/*max_queue_size=*/1));
  stepflow::device_context& dev = sched.device("h1");

  std::atomic<int> behind_runs{0};
  std::latch gone(9);
  dev.add_step_closure(run_async, [] { throw closure_failure("h1 failure"); });
  for (int i = 0; i < 9; ++i) dev.add_step_closure(run_async, probe(behind_runs, gone));
  ASSERT_NO_THROW(dev.run_step_closures());
  gone.wait();
  EXPECT_EQ(behind_runs.load(), 0) << "closures queued behind the failure ran";

  auto e = async_error_from([&] { dev.flush(); });
  ASSERT_TRUE(e) << "flush() did not report the failure";
  expect_report(*e, "h1", 9, "h1 failure");

  // The device accepts and runs closures again.
  std::atomic<int> after{0};
  dev.add_step_closure(run_async, [&] { after.fetch_add(1); });
  dev.run_step_closures();
  dev.flush();
  EXPECT_EQ(after.load(), 1);
}

// The next step's single closure meets a full queue while the closure ahead of it fails (torch's
// second reproduction). Whether the failure is recorded before the second step end starts is a
// race; both outcomes are specified, and either way exactly one call reports it and nothing hangs.
TEST_P(Hazards, H1_FailureAheadOfTheNextStepsSingleClosureNeverHangs) {
  watchdog dog("the next step end with a full queue whose head fails");
  int reported_by_step = 0;
  int reported_by_flush = 0;
  for (int round = 0; round < 50; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    stepflow::scheduler sched(test_options(/*max_queue_size=*/1));
    stepflow::device_context& dev = sched.device("h1");

    dev.add_step_closure(run_async, [] { throw closure_failure("h1 head"); });
    dev.run_step_closures();
    std::atomic<int> single_runs{0};
    dev.add_step_closure(run_async, [&] { single_runs.fetch_add(1); });

    auto by_step = async_error_from([&] { dev.run_step_closures(); });
    EXPECT_EQ(single_runs.load(), 0);
    auto by_flush = async_error_from([&] { dev.flush(); });
    ASSERT_NE(by_step.has_value(), by_flush.has_value())
        << "the failure must be reported exactly once, by the step end or by the flush after it";
    if (by_step) {
      // Recorded before the step end started: that call reports it and does nothing else; the
      // single closure stays pending for the next step end.
      ++reported_by_step;
      expect_report(*by_step, "h1", 0, "h1 head");
      EXPECT_EQ(dev.step(), 1u);
      dev.run_step_closures();
      dev.flush();
      EXPECT_EQ(single_runs.load(), 1);
    } else {
      // Recorded while the step end waited for room: the single closure was queued behind it.
      ++reported_by_flush;
      expect_report(*by_flush, "h1", 1, "h1 head");
      EXPECT_EQ(dev.step(), 2u);
      EXPECT_EQ(single_runs.load(), 0);
    }
  }
  std::printf("  reported by the step end %d times, by the flush after it %d times\n",
              reported_by_step, reported_by_flush);
}

// Whatever the fill: bounds 1, 2 and 5, batches smaller than, equal to and larger than the bound.
TEST_P(Hazards, H1_FailureIsReportedWhateverTheQueueFill) {
  watchdog dog("failures at every queue fill");
  for (const std::size_t bound : {1u, 2u, 5u}) {
    for (const int behind : {0, 1, static_cast<int>(bound) - 1, static_cast<int>(bound),
                             static_cast<int>(bound) + 3, 3 * static_cast<int>(bound)}) {
      if (behind < 0) continue;
      SCOPED_TRACE("bound " + std::to_string(bound) + ", behind " + std::to_string(behind));
      stepflow::scheduler sched(test_options(bound));
      stepflow::device_context& dev = sched.device("fill");
      std::atomic<int> behind_runs{0};
      std::latch gone(behind);
      dev.add_step_closure(run_async, [] { throw closure_failure("fill"); });
      for (int i = 0; i < behind; ++i) dev.add_step_closure(run_async, probe(behind_runs, gone));
      // May report nothing (the failure is recorded after it started): it must just return.
      ASSERT_NO_THROW(dev.run_step_closures());
      auto e = async_error_from([&] { dev.flush(); });
      ASSERT_TRUE(e);
      expect_report(*e, "fill", static_cast<std::size_t>(behind), "fill");
      gone.wait();
      EXPECT_EQ(behind_runs.load(), 0);
      EXPECT_NO_THROW(dev.flush()) << "reported twice";
    }
  }
}

// --- H2: an async failure followed only by sync-only steps is never reported by torch ----------

TEST_P(Hazards, H2_FailureFollowedBySyncOnlyStepsIsReportedByTheNextStepEnd) {
  watchdog dog("sync-only steps after an async failure");
  stepflow::scheduler sched(test_options(/*max_queue_size=*/1));
  stepflow::device_context& dev = sched.device("h2");
  std::atomic<int> behind_runs{0};
  record_unreported_failure(dev, 1, "h2 failure", behind_runs);

  std::atomic<int> sync_runs{0};
  dev.add_step_closure([&] { sync_runs.fetch_add(1); });
  auto e = async_error_from([&] { dev.run_step_closures(); });
  ASSERT_TRUE(e) << "a sync-only step end did not report the recorded async failure";
  expect_report(*e, "h2", 1, "h2 failure");
  // Reported once; the sync-only steps then go on.
  for (int i = 0; i < 3; ++i) {
    dev.add_step_closure([&] { sync_runs.fetch_add(1); });
    EXPECT_NO_THROW(dev.run_step_closures());
  }
  EXPECT_EQ(sync_runs.load(), 4);
  EXPECT_EQ(behind_runs.load(), 0);
}

TEST_P(Hazards, H2_FailureIsReportedByFlush) {
  watchdog dog("flush after an async failure");
  stepflow::scheduler sched(test_options());
  stepflow::device_context& dev = sched.device("h2");
  dev.add_step_closure(run_async, [] { throw closure_failure("h2 flush"); });
  dev.add_step_closure([] {});
  dev.run_step_closures();
  auto e = async_error_from([&] { dev.flush(); });
  ASSERT_TRUE(e) << "flush() did not report the async failure";
  expect_report(*e, "h2", 0, "h2 flush");
  EXPECT_NO_THROW(dev.flush()) << "reported twice";
  dev.add_step_closure([] {});
  EXPECT_NO_THROW(dev.run_step_closures()) << "reported twice";
}

// scheduler::flush reports the first failure; the other failed devices keep theirs.
TEST_P(Hazards, H2_SchedulerFlushLosesNoDevicesFailure) {
  watchdog dog("scheduler::flush with two failed devices");
  stepflow::scheduler sched(test_options());
  stepflow::device_context& a = sched.device("a");
  stepflow::device_context& b = sched.device("b");
  a.add_step_closure(run_async, [] { throw closure_failure("a failed"); });
  b.add_step_closure(run_async, [] { throw closure_failure("b failed"); });
  a.run_step_closures();
  b.run_step_closures();

  auto first = async_error_from([&] { sched.flush(); });
  ASSERT_TRUE(first) << "scheduler::flush() did not report either failure";
  ASSERT_TRUE(first->device() == "a" || first->device() == "b") << first->device();
  stepflow::device_context& other = first->device() == "a" ? b : a;
  const std::string other_what = first->device() == "a" ? "b failed" : "a failed";
  expect_report(*first, first->device(), 0, first->device() == "a" ? "a failed" : "b failed");

  auto second = async_error_from([&] { other.flush(); });
  ASSERT_TRUE(second) << "the other device's failure was lost by scheduler::flush()";
  expect_report(*second, other.name(), 0, other_what);
  EXPECT_NO_THROW(sched.flush());
}

TEST_P(Hazards, H2_UnreportedFailureIsReportedAtShutdown) {
  watchdog dog("destroying a scheduler with an unreported failure");
  report_sink sink;
  {
    stepflow::scheduler sched(sink.attach(test_options()));
    stepflow::device_context& dev = sched.device("h2");
    sched.device("quiet").run_step_closures();  // a device with nothing to report
    std::atomic<int> behind_runs{0};
    std::latch gone(2);
    dev.add_step_closure(run_async, [] { throw closure_failure("h2 shutdown"); });
    dev.add_step_closure(run_async, probe(behind_runs, gone));
    dev.add_step_closure(run_async, probe(behind_runs, gone));
    dev.run_step_closures();
    // No flush, no further step end: only the destructor can report it.
  }
  ASSERT_EQ(sink.reports.size(), 1u) << "the destructor did not report the unreported failure";
  ASSERT_EQ(sink.reports[0].devices.size(), 1u) << "only devices with something to report";
  const stepflow::device_shutdown_report* d = sink.device("h2");
  ASSERT_NE(d, nullptr);
  ASSERT_TRUE(d->unreported_error);
  EXPECT_EQ(d->discarded, 2u);
  EXPECT_EQ(d->never_run, 0u);
  try {
    std::rethrow_exception(d->unreported_error);
  } catch (const closure_failure& e) {
    EXPECT_STREQ(e.what(), "h2 shutdown");
  } catch (...) {
    ADD_FAILURE() << "the shutdown report does not carry the closure's own exception";
  }
}

// The same report on stderr (the default channel), formatted with fmt.
TEST_P(Hazards, H2_UnreportedFailureIsWrittenToStderrAtShutdown) {
  watchdog dog("destroying a scheduler with an unreported failure, stderr report");
  stepflow::options opts = test_options();
  opts.report_to_stderr = true;
  ::testing::internal::CaptureStderr();
  {
    stepflow::scheduler sched(opts);
    stepflow::device_context& dev = sched.device("h2-stderr");
    dev.add_step_closure(run_async, [] { throw closure_failure("h2 written to stderr"); });
    dev.run_step_closures();
  }
  const std::string text = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(text.find("h2-stderr"), std::string::npos) << text;
  EXPECT_NE(text.find("h2 written to stderr"), std::string::npos) << text;
}

// --- H3: torch reports only if its worker thread had already died ------------------------------

// A failure recorded before a step end (or flush) starts is reported by that very call, every
// time: 25 rounds each, at the bound-1 recipe and (workers running the queue by themselves) at the
// default bound.
TEST_P(Hazards, H3_FailureRecordedBeforeACallIsReportedByThatCall) {
  watchdog dog("deterministic reporting rounds");
  for (int round = 0; round < 25; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    {
      stepflow::scheduler sched(test_options(/*max_queue_size=*/1));
      stepflow::device_context& dev = sched.device("h3");
      std::atomic<int> behind_runs{0};
      record_unreported_failure(dev, 1, "h3 step", behind_runs);
      auto e = async_error_from([&] { dev.run_step_closures(); });
      ASSERT_TRUE(e) << "the first step end after the recorded failure did not report it";
      expect_report(*e, "h3", 1, "h3 step");

      record_unreported_failure(dev, 2, "h3 flush", behind_runs);
      auto f = async_error_from([&] { dev.flush(); });
      ASSERT_TRUE(f) << "the first flush after the recorded failure did not report it";
      expect_report(*f, "h3", 2, "h3 flush");
      EXPECT_EQ(behind_runs.load(), 0);
    }
    {
      // Default bound: the step end returns at once and oneTBB runs the closures by itself
      // (with one thread too: oneTBB keeps a worker for enqueued work).
      stepflow::scheduler sched(test_options());
      stepflow::device_context& dev = sched.device("h3");
      std::atomic<int> behind_runs{0};
      std::latch gone(1);
      dev.add_step_closure(run_async, [] { throw closure_failure("h3 idle"); });
      dev.add_step_closure(run_async, probe(behind_runs, gone));
      dev.run_step_closures();
      gone.wait();
      auto e = async_error_from([&] { dev.run_step_closures(); });
      ASSERT_TRUE(e) << "the first step end after the recorded failure did not report it";
      expect_report(*e, "h3", 1, "h3 idle");
      EXPECT_EQ(behind_runs.load(), 0);
    }
  }
}

// flush() waits until the closures handed over before it have run, then reports: when one of
// them failed, that flush reports it, every time. Stress: the test thread calls flush() while
// a worker is inside the failing closure, 10000 rounds.
TEST_P(Hazards, H3_FlushReportsTheFailureOfAClosureItWaitedFor) {
  watchdog dog("flush racing a failing closure");
  stepflow::scheduler sched(test_options());
  stepflow::device_context& dev = sched.device("h3");
  constexpr int rounds = 10000;
  std::atomic<int> started{-1};
  int missed = 0;
  for (int round = 0; round < rounds; ++round) {
    dev.add_step_closure(run_async, [&started, round] {
      started.store(round);
      throw closure_failure("h3 racing flush");
    });
    if (async_error_from([&] { dev.run_step_closures(); })) {
      ++missed;  // the previous round's failure surfaced only now
      dev.run_step_closures();
    }
    while (started.load() < round) std::this_thread::yield();
    if (!async_error_from([&] { dev.flush(); })) {
      ++missed;
      // Recorded after that flush returned: wait until some call reports it.
      while (!async_error_from([&] { dev.flush(); })) std::this_thread::yield();
    }
  }
  EXPECT_EQ(missed, 0) << "flush() returned normally although a closure it waited for had failed "
                          "(the failure was reported by a later call)";
}

// --- H4: torch's idle worker can exit just as a closure is enqueued -----------------------------

// Closures handed over to a queue that just went idle run with no further call: no flush, no
// next step end. 300 rounds alternate handing over right away and after yielding, to hit the
// moment the previous drainer ends.
TEST_P(Hazards, H4_ClosureHandedToAnIdleQueueIsNotStranded) {
  watchdog dog("a closure handed to an idle queue (stranded if this fires)");
  stepflow::scheduler sched(test_options());
  stepflow::device_context& dev = sched.device("h4");
  std::atomic<int> runs{0};
  for (int round = 0; round < 300; ++round) {
    auto ran = std::make_shared<std::latch>(1);
    dev.add_step_closure(run_async, [ran, &runs] {
      runs.fetch_add(1);
      ran->count_down();
    });
    dev.run_step_closures();
    ran->wait();  // no flush: the closure must run by itself
    if (round % 2 == 0) std::this_thread::yield();
  }
  EXPECT_EQ(runs.load(), 300);
}

// --- H5: torch runs closures queued behind a failure ("should never execute") ------------------

// Closures queued behind the failure, from the same step and from a later one, are discarded and
// counted, never run.
TEST_P(Hazards, H5_ClosuresQueuedBehindAFailureAreDiscardedAndCounted) {
  watchdog dog("fail-stop discard");
  stepflow::scheduler sched(test_options());
  stepflow::device_context& dev = sched.device("h5");
  std::latch release(1);
  std::atomic<int> behind_runs{0};
  std::latch gone(4);
  dev.add_step_closure(run_async, [&] {
    release.wait();
    throw closure_failure("h5 failure");
  });
  dev.add_step_closure(run_async, probe(behind_runs, gone));
  dev.run_step_closures();
  dev.add_step_closure(run_async, probe(behind_runs, gone));
  dev.add_step_closure(run_async, probe(behind_runs, gone));
  dev.run_step_closures();
  dev.add_step_closure(run_async, probe(behind_runs, gone));
  dev.run_step_closures();
  release.count_down();

  auto e = async_error_from([&] { dev.flush(); });
  ASSERT_TRUE(e);
  expect_report(*e, "h5", 4, "h5 failure");
  gone.wait();
  EXPECT_EQ(behind_runs.load(), 0) << "a closure queued behind the failure ran";
}

// The call that reports a failure has no other effect: that step's closures (sync and async)
// stay pending and run at the next step end, and step() does not count it.
TEST_P(Hazards, H5_TheReportingCallHasNoOtherEffect) {
  watchdog dog("the reporting step end");
  stepflow::scheduler sched(test_options(/*max_queue_size=*/1));
  stepflow::device_context& dev = sched.device("h5");
  std::atomic<int> behind_runs{0};
  record_unreported_failure(dev, 3, "h5 report", behind_runs);
  ASSERT_EQ(dev.step(), 1u);

  std::atomic<int> sync_runs{0};
  std::atomic<int> async_runs{0};
  dev.add_step_closure([&] { sync_runs.fetch_add(1); });
  dev.add_step_closure(run_async, [&] { async_runs.fetch_add(1); });
  auto e = async_error_from([&] { dev.run_step_closures(); });
  ASSERT_TRUE(e);
  expect_report(*e, "h5", 3, "h5 report");
  EXPECT_EQ(sync_runs.load(), 0) << "the reporting step end ran this step's sync closure";
  EXPECT_EQ(dev.step(), 1u) << "the reporting step end was counted";
  EXPECT_NO_THROW(dev.flush());
  EXPECT_EQ(async_runs.load(), 0) << "the reporting step end handed this step's async closure over";

  dev.run_step_closures();  // the next step end takes them
  EXPECT_EQ(sync_runs.load(), 1);
  EXPECT_EQ(dev.step(), 2u);
  dev.flush();
  EXPECT_EQ(async_runs.load(), 1);
  EXPECT_EQ(behind_runs.load(), 0);
}

// --- H6: torch records nothing for a non-Exception error ---------------------------------------

TEST_P(Hazards, H6_NonStdExceptionIsCapturedAndNested) {
  watchdog dog("non-std exceptions");
  struct not_a_std_exception {
    int code;
  };
  report_sink sink;
  {
    stepflow::scheduler sched(sink.attach(test_options()));
    stepflow::device_context& dev = sched.device("h6");
    std::atomic<int> after{0};
    dev.add_step_closure(run_async, [] { throw 42; });
    dev.add_step_closure(run_async, [&] { after.fetch_add(1); });
    dev.run_step_closures();
    bool reported = false;
    try {
      dev.flush();
    } catch (const stepflow::async_closure_error& e) {
      reported = true;
      EXPECT_TRUE(std::string_view(e.what()).starts_with(stepflow::async_failure_prefix))
          << e.what();
      EXPECT_EQ(e.discarded(), 1u);
      try {
        std::rethrow_if_nested(e);
        ADD_FAILURE() << "nothing nested";
      } catch (int v) {
        EXPECT_EQ(v, 42);
      } catch (...) {
        ADD_FAILURE() << "the nested exception is not the int thrown";
      }
    }
    EXPECT_TRUE(reported) << "`throw 42;` in an async closure was not captured and reported";
    EXPECT_EQ(after.load(), 0);

    // A synchronous closure's non-std exception propagates unchanged.
    dev.add_step_closure([] { throw not_a_std_exception{7}; });
    try {
      dev.run_step_closures();
      ADD_FAILURE() << "nothing propagated";
    } catch (const not_a_std_exception& x) {
      EXPECT_EQ(x.code, 7);
    }

    // Left unreported: the shutdown report carries it.
    dev.add_step_closure(run_async, [] { throw not_a_std_exception{8}; });
    dev.run_step_closures();
  }
  const stepflow::device_shutdown_report* d = sink.device("h6");
  ASSERT_NE(d, nullptr);
  ASSERT_TRUE(d->unreported_error);
  try {
    std::rethrow_exception(d->unreported_error);
  } catch (const not_a_std_exception& x) {
    EXPECT_EQ(x.code, 8);
  } catch (...) {
    ADD_FAILURE() << "the shutdown report lost the non-std exception";
  }
}

// --- H7: torch's process exit waits 3 s for its idle worker ------------------------------------

TEST_P(Hazards, H7_DestroyingAnIdleSchedulerIsPrompt) {
  watchdog dog("destroying an idle scheduler");
  // Workers that linger for 1 s after the last closure: a destructor that waited for them to
  // leave by themselves, instead of sending them away, would take that second.
  stepflow::options o = test_options();
  o.worker_linger = std::chrono::seconds(1);
  std::vector<std::chrono::steady_clock::duration> took;
  for (int round = 0; round < 5; ++round) {
    auto sched = std::make_unique<stepflow::scheduler>(o);
    std::atomic<int> runs{0};
    for (const char* name : {"a", "b", "c"}) {
      stepflow::device_context& dev = sched->device(name);
      for (int i = 0; i < 10; ++i) dev.add_step_closure(run_async, [&] { runs.fetch_add(1); });
      dev.run_step_closures();
    }
    sched->flush();
    ASSERT_EQ(runs.load(), 30);
    const auto start = std::chrono::steady_clock::now();
    sched.reset();
    took.push_back(std::chrono::steady_clock::now() - start);
  }
  // A generous bound, not a timing claim (it takes tens of microseconds): torch's idle wait
  // alone is 3 s, and a lingering worker left to time out makes every round take 1 s. The
  // median, so that one round descheduled on a loaded machine (a TSan run once took 501 ms)
  // does not decide.
  std::sort(took.begin(), took.end());
  const auto median = took[took.size() / 2];
  EXPECT_LT(median, 500ms) << "destroying an idle scheduler took "
                           << std::chrono::duration_cast<std::chrono::milliseconds>(median).count()
                           << " ms (median of 5): shutdown must cost the pending work, not a "
                              "timeout";
}

TEST_P(Hazards, H7_DestructorFinishesPendingAsyncClosures) {
  watchdog dog("destroying a scheduler with pending async closures");
  auto token = std::make_shared<int>(0);
  std::atomic<int> runs{0};
  std::vector<int> order;  // one device: its closures run one at a time, in order
  {
    stepflow::scheduler sched(test_options(/*max_queue_size=*/8));
    stepflow::device_context& dev = sched.device("h7");
    for (int step = 0; step < 8; ++step) {
      for (int i = 0; i < 8; ++i) {
        dev.add_step_closure(run_async, [&, token, n = step * 8 + i] {
          order.push_back(n);
          runs.fetch_add(1);
        });
      }
      dev.run_step_closures();
    }
    // No flush: the destructor must run all of them.
  }
  EXPECT_EQ(runs.load(), 64) << "the destructor returned before every pending closure ran";
  ASSERT_EQ(order.size(), 64u);
  for (int n = 0; n < 64; ++n) EXPECT_EQ(order[static_cast<std::size_t>(n)], n);
  EXPECT_EQ(token.use_count(), 1) << "a closure outlived its scheduler";
}

// --- H8: torch deadlocks when an async closure ends a step while the queue is full -------------

// Each closure adds two more async closures and a sync one to its own device and ends that
// device's step, with a queue bound of 1: a tree of 127 async closures.
TEST_P(Hazards, H8_AsyncClosureEndingItsOwnDevicesStepWithFullQueueNeverDeadlocks) {
  watchdog dog("async closures ending their own device's step, queue bound 1");
  struct node {
    stepflow::device_context* dev;
    std::atomic<int>* async_runs;
    std::atomic<int>* sync_runs;
    int depth;
    void operator()() const {
      async_runs->fetch_add(1);
      if (depth == 0) return;
      dev->add_step_closure(run_async, node{dev, async_runs, sync_runs, depth - 1});
      dev->add_step_closure(run_async, node{dev, async_runs, sync_runs, depth - 1});
      dev->add_step_closure([s = sync_runs] { s->fetch_add(1); });
      dev->run_step_closures();
    }
  };
  std::atomic<int> async_runs{0};
  std::atomic<int> sync_runs{0};
  stepflow::scheduler sched(test_options(/*max_queue_size=*/1));
  stepflow::device_context& dev = sched.device("h8");
  dev.add_step_closure(run_async, node{&dev, &async_runs, &sync_runs, 6});
  std::atomic<int> filler_runs{0};
  for (int i = 0; i < 3; ++i) dev.add_step_closure(run_async, [&] { filler_runs.fetch_add(1); });
  dev.run_step_closures();
  // flush() covers what was handed over before it; the closures hand over more meanwhile.
  while (async_runs.load() < 127 || sync_runs.load() < 63 || filler_runs.load() < 3) dev.flush();
  dev.flush();
  EXPECT_EQ(async_runs.load(), 127);
  EXPECT_EQ(sync_runs.load(), 63);
  EXPECT_EQ(filler_runs.load(), 3);
}

// A closure of device A ends device B's step while B's queue is over its bound and B's head
// closure is blocked: the step end must return (it is inside an async closure), not wait for B.
TEST_P(Hazards, H8_AsyncClosureEndingAnotherDevicesStepWithFullQueueNeverDeadlocks) {
  watchdog dog("an async closure of A ending B's step while B is full and blocked");
  stepflow::scheduler sched(test_options(/*max_queue_size=*/1));
  stepflow::device_context& a = sched.device("a");
  stepflow::device_context& b = sched.device("b");
  std::latch release_b(1);
  std::vector<int> b_order;  // B's closures run one at a time
  std::atomic<int> a_runs{0};
  a.add_step_closure(run_async, [&] {
    b.add_step_closure(run_async, [&] {
      release_b.wait();
      b_order.push_back(0);
    });
    b.add_step_closure(run_async, [&] { b_order.push_back(1); });
    b.run_step_closures();  // over B's bound by its own batch: allowed inside an async closure
    a_runs.fetch_add(1);
  });
  a.add_step_closure(run_async, [&] {
    b.add_step_closure(run_async, [&] { b_order.push_back(2); });
    b.run_step_closures();  // B is full and its head waits for release_b: must not block
    a_runs.fetch_add(1);
  });
  a.run_step_closures();
  a.flush();  // A's closures finish although B stays blocked
  EXPECT_EQ(a_runs.load(), 2);
  release_b.count_down();
  b.flush();
  EXPECT_EQ(b_order, (std::vector<int>{0, 1, 2}));
}

// Two devices whose async closures end each other's steps, both queues over their bound of 1.
TEST_P(Hazards, H8_TwoDevicesEndingEachOthersStepsWithFullQueuesNeverDeadlock) {
  watchdog dog("two devices ending each other's steps, queue bound 1");
  struct ping {
    stepflow::device_context* self;
    stepflow::device_context* other;
    std::atomic<int>* pings;
    std::atomic<int>* fillers;
    int n;
    void operator()() const {
      pings->fetch_add(1);
      if (n == 0) return;
      other->add_step_closure(run_async, ping{other, self, pings, fillers, n - 1});
      other->add_step_closure(run_async, [f = fillers] { f->fetch_add(1); });
      other->run_step_closures();
    }
  };
  constexpr int rounds = 50;
  std::atomic<int> pings{0};
  std::atomic<int> fillers{0};
  stepflow::scheduler sched(test_options(/*max_queue_size=*/1));
  stepflow::device_context& a = sched.device("a");
  stepflow::device_context& b = sched.device("b");
  for (auto [self, other] : {std::pair{&a, &b}, std::pair{&b, &a}}) {
    self->add_step_closure(run_async, ping{self, other, &pings, &fillers, rounds});
    for (int i = 0; i < 2; ++i) self->add_step_closure(run_async, [&] { fillers.fetch_add(1); });
  }
  a.run_step_closures();
  b.run_step_closures();
  constexpr int expected_pings = 2 * (rounds + 1);
  constexpr int expected_fillers = 2 * rounds + 4;
  while (pings.load() < expected_pings || fillers.load() < expected_fillers) sched.flush();
  EXPECT_EQ(pings.load(), expected_pings);
  EXPECT_EQ(fillers.load(), expected_fillers);
}

// Re-entrant calls that cannot complete are refused with stepflow::error, never a deadlock: a
// sync closure ending its own device's step (documented in device_context.hpp) and flush()
// inside an async closure.
TEST_P(Hazards, H8_ReentrantCallsThatCannotCompleteThrowInsteadOfDeadlocking) {
  watchdog dog("re-entrant step end and flush");
  stepflow::scheduler sched(test_options(/*max_queue_size=*/1));
  stepflow::device_context& dev = sched.device("h8");

  std::atomic<int> refused{0};
  dev.add_step_closure([&] {
    try {
      dev.run_step_closures();
    } catch (const stepflow::error&) {
      refused.fetch_add(1);
    }
  });
  dev.run_step_closures();
  EXPECT_EQ(refused.load(), 1) << "a step end inside its own sync closure was not refused";

  dev.add_step_closure(run_async, [&] {
    try {
      dev.flush();
    } catch (const stepflow::error&) {
      refused.fetch_add(1);
    }
    try {
      dev.scheduler().flush();
    } catch (const stepflow::error&) {
      refused.fetch_add(1);
    }
  });
  dev.run_step_closures();
  dev.flush();
  EXPECT_EQ(refused.load(), 3) << "flush() inside an async closure was not refused";
}

// An async closure may end any device's step (the contract's H8 row). That stays true when the
// closure happens to run on a thread that is waiting for room inside one of that device's own
// sync closures: the waiting thread runs the queued closure itself when no worker drains it.
// Every oneTBB worker is occupied (occupy_workers: at each thread limit, the mandatory worker at
// 1 included), so that B's head closure can only be run by the waiting thread.
TEST_P(Hazards, H8_AsyncClosureRunByAWaitingThreadMayEndThatThreadsDevice) {
  watchdog dog("an async closure of B ending A's step, run inside A's sync closure");
  stepflow::scheduler sched(test_options(/*max_queue_size=*/1));
  stepflow::device_context& a = sched.device("a");
  stepflow::device_context& b = sched.device("b");
  stepflow::testing::occupy_workers busy;

  std::atomic<int> b_ended_a{0};
  std::atomic<int> b_failed{0};
  std::atomic<std::thread::id> b_head_thread;
  b.add_step_closure(run_async, [&] {
    b_head_thread = std::this_thread::get_id();
    try {
      a.run_step_closures();
      b_ended_a.fetch_add(1);
    } catch (const stepflow::error&) {
      b_failed.fetch_add(1);
      throw;
    }
  });
  b.run_step_closures();  // B now holds one pending closure: full
  std::atomic<int> b_tail_runs{0};
  a.add_step_closure([&] {
    b.add_step_closure(run_async, [&] { b_tail_runs.fetch_add(1); });
    b.run_step_closures();  // waits for room: nobody else can run B's head closure
  });
  a.run_step_closures();
  EXPECT_EQ(b_head_thread.load(), std::this_thread::get_id())
      << "premise: B's head closure ran on the thread waiting inside A's sync closure";
  busy.release();
  auto e = async_error_from([&] { b.flush(); });
  EXPECT_FALSE(e) << "B's closure failed ending A's step: " << (e ? e->what() : "");
  EXPECT_EQ(b_failed.load(), 0);
  EXPECT_EQ(b_ended_a.load(), 1);
  EXPECT_EQ(b_tail_runs.load(), 1);
  sched.flush();
}

// --- H9: concurrent add_step_closure loses closures in torch (free-threaded Python) ------------

TEST_P(Hazards, H9_ConcurrentAddsLoseNothingAndKeepPerThreadOrder) {
  constexpr int producers = 8;
  constexpr int per_producer = 1500;
  const unsigned seed = test_seed();
  std::printf("  seed %u (set STEPFLOW_TEST_SEED to repeat)\n", seed);
  RecordProperty("seed", std::to_string(seed));
  watchdog dog("8 producers and a step-ending thread on one device");

  stepflow::scheduler sched(test_options(/*max_queue_size=*/8));
  stepflow::device_context& dev = sched.device("h9");
  std::vector<std::atomic<int>> runs(producers * per_producer);
  // Plain ints: sync closures run on the step-ending thread, async ones one at a time, so the
  // library's own ordering must make these accesses race-free (TSan checks it).
  std::vector<int> last_sync(producers, -1);
  std::vector<int> last_async(producers, -1);
  std::atomic<int> order_violations{0};
  std::atomic<int> producers_done{0};
  std::latch start(producers + 1);

  std::vector<std::thread> threads;
  for (int t = 0; t < producers; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(seed + static_cast<unsigned>(t));
      start.arrive_and_wait();
      for (int i = 0; i < per_producer; ++i) {
        const int id = t * per_producer + i;
        if (rng() % 2 == 0) {
          dev.add_step_closure(run_async, [&runs, &last_async, &order_violations, t, i, id] {
            runs[static_cast<std::size_t>(id)].fetch_add(1);
            if (last_async[static_cast<std::size_t>(t)] >= i) order_violations.fetch_add(1);
            last_async[static_cast<std::size_t>(t)] = i;
          });
        } else {
          dev.add_step_closure([&runs, &last_sync, &order_violations, t, i, id] {
            runs[static_cast<std::size_t>(id)].fetch_add(1);
            if (last_sync[static_cast<std::size_t>(t)] >= i) order_violations.fetch_add(1);
            last_sync[static_cast<std::size_t>(t)] = i;
          });
        }
        if (rng() % 64 == 0) std::this_thread::yield();
      }
      producers_done.fetch_add(1);
    });
  }
  std::thread stepper([&] {
    start.arrive_and_wait();
    while (producers_done.load() < producers) dev.run_step_closures();
  });
  for (std::thread& t : threads) t.join();
  stepper.join();
  dev.run_step_closures();  // whatever the stepper's last step end did not take
  dev.flush();

  int lost = 0;
  int repeated = 0;
  for (const std::atomic<int>& r : runs) {
    if (r.load() == 0) ++lost;
    if (r.load() > 1) ++repeated;
  }
  EXPECT_EQ(lost, 0) << "closures never ran (seed " << seed << ")";
  EXPECT_EQ(repeated, 0) << "closures ran more than once (seed " << seed << ")";
  EXPECT_EQ(order_violations.load(), 0)
      << "a thread's closures ran out of the order it added them (seed " << seed << ")";
  EXPECT_GE(dev.step(), 2u);
}

// --- H10: torch says nothing about closures added after the last step ------------------------

TEST_P(Hazards, H10_ClosuresAddedAfterTheLastStepEndAreReportedAtShutdown) {
  watchdog dog("shutdown with never-run closures");
  report_sink sink;
  auto token = std::make_shared<int>(0);
  std::atomic<int> runs{0};
  {
    stepflow::scheduler sched(sink.attach(test_options()));
    stepflow::device_context& late = sched.device("late");
    stepflow::device_context& done = sched.device("done");
    for (int i = 0; i < 2; ++i) late.add_step_closure([&] { runs.fetch_add(1); });
    for (int i = 0; i < 3; ++i) late.add_step_closure(run_async, [&] { runs.fetch_add(1); });
    done.add_step_closure([&] { runs.fetch_add(1); });
    late.run_step_closures();
    done.run_step_closures();
    sched.flush();
    ASSERT_EQ(runs.load(), 6);
    // After the last step end: never run.
    late.add_step_closure([&, token] { runs.fetch_add(100); });
    late.add_step_closure(run_async, [&, token] { runs.fetch_add(100); });
    late.add_step_closure(run_async, [&, token] { runs.fetch_add(100); });
  }
  EXPECT_EQ(runs.load(), 6) << "a closure added after the last step end ran";
  EXPECT_EQ(token.use_count(), 1) << "never-run closures were not destroyed by the scheduler";
  ASSERT_EQ(sink.reports.size(), 1u) << "nothing reported the never-run closures";
  ASSERT_EQ(sink.reports[0].devices.size(), 1u) << "only devices with something to report";
  const stepflow::device_shutdown_report* d = sink.device("late");
  ASSERT_NE(d, nullptr);
  EXPECT_EQ(d->never_run, 3u);
  EXPECT_FALSE(d->unreported_error);
  EXPECT_EQ(d->discarded, 0u);
}

TEST_P(Hazards, H10_NeverRunClosuresAreWrittenToStderrAtShutdown) {
  watchdog dog("shutdown with never-run closures, stderr report");
  stepflow::options opts = test_options();
  opts.report_to_stderr = true;
  ::testing::internal::CaptureStderr();
  {
    stepflow::scheduler sched(opts);
    stepflow::device_context& dev = sched.device("h10-stderr");
    for (int i = 0; i < 7; ++i) dev.add_step_closure(run_async, [] {});
  }
  const std::string text = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(text.find("h10-stderr"), std::string::npos) << text;
  EXPECT_TRUE(std::regex_search(text, std::regex("\\b7\\b"))) << text;
}

// --- full queue: the blocking step end never deadlocks ----------------------------------------

// Queue bound 1 (at 1 TBB thread the waiting step end must run closures itself): 50 steps of
// 5 async closures, all run, in order.
TEST_P(Hazards, FullQueue_BoundOneNeverDeadlocksAndKeepsOrder) {
  watchdog dog("50 step ends against a queue bound of 1");
  stepflow::scheduler sched(test_options(/*max_queue_size=*/1));
  stepflow::device_context& dev = sched.device("full");
  std::vector<int> order;
  for (int step = 0; step < 50; ++step) {
    for (int i = 0; i < 5; ++i) {
      dev.add_step_closure(run_async, [&order, n = step * 5 + i] { order.push_back(n); });
    }
    dev.run_step_closures();
  }
  dev.flush();
  ASSERT_EQ(order.size(), 250u);
  for (int n = 0; n < 250; ++n) ASSERT_EQ(order[static_cast<std::size_t>(n)], n);
}

// Pending means handed over and not yet started: a running closure leaves room. With bound 1, a
// step end while the only closure handed over is running (blocked on the caller's next move,
// as a closure waiting for the training loop may be) must not wait for it.
TEST_P(Hazards, FullQueue_RunningClosureIsNotPending) {
  watchdog dog("a step end while the single running closure waits for it");
  stepflow::scheduler sched(test_options(/*max_queue_size=*/1));
  stepflow::device_context& dev = sched.device("running");
  std::latch started(1);
  std::latch release(1);
  std::vector<int> order;
  dev.add_step_closure(run_async, [&] {
    started.count_down();
    release.wait();
    order.push_back(0);
  });
  dev.run_step_closures();
  started.wait();  // running now: no longer pending, the queue is empty
  dev.add_step_closure(run_async, [&] { order.push_back(1); });
  const bool returned =
      returns_without_help([&] { dev.run_step_closures(); }, [&] { release.count_down(); });
  EXPECT_TRUE(returned)
      << "the step end blocked on a full queue although the only closure handed over had started "
         "(bound 1; \"pending\" is handed over and not yet started)";
  if (returned) release.count_down();
  dev.flush();
  EXPECT_EQ(order, (std::vector<int>{0, 1}));
}

// The same with closures that have finished: bound 2, the first of a step's two closures has
// returned and the second is running; nothing is pending, so the next step end has room.
TEST_P(Hazards, FullQueue_FinishedClosuresAreNotPending) {
  watchdog dog("a step end after one closure finished and one is running");
  stepflow::scheduler sched(test_options(/*max_queue_size=*/2));
  stepflow::device_context& dev = sched.device("finished");
  std::latch started(1);
  std::latch release(1);
  std::vector<int> order;
  dev.add_step_closure(run_async, [&] { order.push_back(0); });
  dev.add_step_closure(run_async, [&] {
    started.count_down();
    release.wait();
    order.push_back(1);
  });
  dev.run_step_closures();
  started.wait();  // the first returned, the second runs: nothing pending
  dev.add_step_closure(run_async, [&] { order.push_back(2); });
  const bool returned =
      returns_without_help([&] { dev.run_step_closures(); }, [&] { release.count_down(); });
  EXPECT_TRUE(returned)
      << "the step end blocked on a full queue although nothing was pending (bound 2: one closure "
         "finished, one running)";
  if (returned) release.count_down();
  dev.flush();
  EXPECT_EQ(order, (std::vector<int>{0, 1, 2}));
}

// Step ends from inside tbb::parallel_for bodies (TBB workers), bound 1, four devices shared by
// the bodies, sync and async closures.
TEST_P(Hazards, FullQueue_StepEndFromParallelForBodyNeverDeadlocks) {
  watchdog dog("step ends from parallel_for bodies, queue bound 1");
  stepflow::scheduler sched(test_options(/*max_queue_size=*/1));
  std::vector<stepflow::device_context*> devs;
  for (int i = 0; i < 4; ++i) devs.push_back(&sched.device("pf" + std::to_string(i)));
  std::atomic<int> async_runs{0};
  std::atomic<int> sync_runs{0};
  const auto body = [&](int i) {
    stepflow::testing::tbb_body_scope scope;
    stepflow::device_context& dev = *devs[static_cast<std::size_t>(i % 4)];
    for (int k = 0; k < 3; ++k) dev.add_step_closure(run_async, [&] { async_runs.fetch_add(1); });
    dev.add_step_closure([&] { sync_runs.fetch_add(1); });
    dev.run_step_closures();
  };
  stepflow::testing::before_tbb_algorithm();  // after `body` exists: TSan sees it built first
  tbb::parallel_for(0, 400, body);
  stepflow::testing::after_tbb_algorithm();
  for (stepflow::device_context* dev : devs) dev->run_step_closures();
  sched.flush();
  EXPECT_EQ(async_runs.load(), 1200);
  EXPECT_EQ(sync_runs.load(), 400);
}

// Step ends from parallel_pipeline filters, bound 1: a parallel filter and a serial_in_order
// one. The serial filter must never be re-entered (the step end isolates its waiting), and
// keeps its order.
TEST_P(Hazards, FullQueue_StepEndFromParallelPipelineFilterNeverDeadlocks) {
  watchdog dog("step ends from parallel_pipeline filters, queue bound 1");
  stepflow::scheduler sched(test_options(/*max_queue_size=*/1));
  stepflow::device_context& middle = sched.device("middle");
  stepflow::device_context& sink = sched.device("sink");
  constexpr int tokens = 300;
  int next = 0;
  int last_sunk = -1;
  std::atomic<int> async_runs{0};
  std::atomic<int> sync_runs{0};
  std::atomic<bool> in_sink{false};
  std::atomic<int> reentered{0};
  std::atomic<int> out_of_order{0};
  const auto source = [&](tbb::flow_control& fc) {
    stepflow::testing::tbb_body_scope scope;
    if (next == tokens) {
      fc.stop();
      return 0;
    }
    return next++;
  };
  const auto parallel_stage = [&](int i) {
    stepflow::testing::tbb_body_scope scope;
    for (int k = 0; k < 2; ++k)
      middle.add_step_closure(run_async, [&] { async_runs.fetch_add(1); });
    middle.add_step_closure([&] { sync_runs.fetch_add(1); });
    middle.run_step_closures();
    return i;
  };
  const auto serial_sink = [&](int i) {
    stepflow::testing::tbb_body_scope scope;
    if (in_sink.exchange(true)) reentered.fetch_add(1);
    if (i <= last_sunk) out_of_order.fetch_add(1);
    last_sunk = i;
    sink.add_step_closure(run_async, [&] { async_runs.fetch_add(1); });
    sink.add_step_closure(run_async, [&] { async_runs.fetch_add(1); });
    sink.add_step_closure([&] { sync_runs.fetch_add(1); });
    sink.run_step_closures();
    in_sink.store(false);
  };
  const auto filters = tbb::make_filter<void, int>(tbb::filter_mode::serial_in_order, source) &
                       tbb::make_filter<int, int>(tbb::filter_mode::parallel, parallel_stage) &
                       tbb::make_filter<int, void>(tbb::filter_mode::serial_in_order, serial_sink);
  stepflow::testing::before_tbb_algorithm();  // after `filters` exist: TSan sees them built first
  tbb::parallel_pipeline(8, filters);
  stepflow::testing::after_tbb_algorithm();
  middle.run_step_closures();
  sched.flush();
  EXPECT_EQ(reentered.load(), 0) << "a serial filter was re-entered while it ended a step";
  EXPECT_EQ(out_of_order.load(), 0);
  EXPECT_EQ(last_sunk, tokens - 1);
  EXPECT_EQ(async_runs.load(), 4 * tokens);
  EXPECT_EQ(sync_runs.load(), 2 * tokens);
}

}  // namespace
