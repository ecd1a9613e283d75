// error_handling: what happens when an asynchronous step closure throws.
//
// An async closure runs on a oneTBB worker after its step has ended, so its exception cannot
// propagate out of the run_step_closures() call that queued it: that call has long returned.
// stepflow records it instead and reports it, exactly once, as stepflow::async_closure_error from
// the next run_step_closures() or flush() on that device, with the closure's own exception nested
// inside. The device's async closures queued behind the failure are discarded (fail-stop) and
// counted. After the report the device works normally again.
//
//   part 1  an async closure throws at step 3; the error arrives at the next step end
//   part 2  the error arrives at flush()
//   part 3  nobody asks: the scheduler reports it when it is destroyed
//   part 4  not an exception, a device that stops stepping: in lockstep ordering it holds the
//           others back; flush_for() gives up instead of hanging, retire() releases them
//
// The example checks every claim it prints and exits non-zero if one does not hold, so it also
// runs as a test.

#include <stepflow/stepflow.hpp>

#include <fmt/core.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <future>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>

namespace {

int failed_checks = 0;

// Records a claim that did not hold; the example's exit status reports it.
void expect(bool ok, std::string_view claim) {
  if (!ok) {
    ++failed_checks;
    fmt::print(stderr, "CHECK FAILED: {}\n", claim);
  }
}

// The closure's own exception type, to show it comes back unchanged.
struct checkpoint_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Prints an async_closure_error and returns the message of the exception nested inside it.
std::string show(const stepflow::async_closure_error& e) {
  fmt::print("  caught stepflow::async_closure_error\n");
  fmt::print("    what():      {}\n", e.what());
  fmt::print("    device():    {}\n", e.device());
  fmt::print("    discarded(): {}\n", e.discarded());
  // The original exception, rethrown with its own type. (e.original() is the same exception as an
  // std::exception_ptr, for code that wants to store or forward it.)
  try {
    std::rethrow_if_nested(e);
  } catch (const checkpoint_error& original) {
    fmt::print("    nested:      checkpoint_error: {}\n", original.what());
    return original.what();
  } catch (const std::exception& original) {
    fmt::print("    nested:      {}\n", original.what());
    return original.what();
  }
  return {};
}

std::uint64_t failed_async(const stepflow::scheduler& sched, std::string_view device) {
  for (const stepflow::device_metrics& m : sched.metrics().devices) {
    if (m.device == device) return m.failed_async;
  }
  return 0;
}

bool starts_with_prefix(const stepflow::async_closure_error& e) {
  return std::string_view(e.what()).starts_with(stepflow::async_failure_prefix);
}

void part1_reported_at_next_step_end(stepflow::scheduler& sched) {
  fmt::print("part 1: an async closure throws at step 3\n");
  stepflow::device_context& gpu = sched.device("gpu0");
  std::atomic<int> async_ran{0};
  std::atomic<bool> behind_ran{false};

  for (int step = 1; step <= 2; ++step) {
    gpu.add_step_closure(stepflow::run_async, [&] { ++async_ran; });
    gpu.run_step_closures();
  }

  // Step 3. The failing closure first waits for `go`, so that we can watch step 3 end before it
  // throws. (The wait has a timeout only so that a bug cannot hang the example.)
  std::promise<void> go, thrown;
  std::shared_future<void> go_signal = go.get_future().share();
  std::future<void> thrown_signal = thrown.get_future();
  gpu.add_step_closure(stepflow::run_async, [&] {
    go_signal.wait_for(std::chrono::seconds(10));
    thrown.set_value();
    throw checkpoint_error("disk full while writing the step 3 checkpoint");
  });
  // Two more async closures of the same step, queued behind the failing one: never run.
  gpu.add_step_closure(stepflow::run_async, [&] { behind_ran = true; });
  gpu.add_step_closure(stepflow::run_async, [&] { behind_ran = true; });

  gpu.run_step_closures();  // returns normally: the async closures have not even started
  fmt::print("  step 3: run_step_closures() returned normally\n");
  expect(gpu.step() == 3, "three step ends completed");
  go.set_value();

  // Wait until stepflow has recorded the failure (the metrics count it once it is recorded), so
  // that step 4 reports it and the output is the same on every run. (Were it recorded later,
  // step 4 would end normally, its async closure would be discarded behind the failure and a
  // later step would report it: the checks below accept that too.)
  expect(thrown_signal.wait_for(std::chrono::seconds(10)) == std::future_status::ready,
         "the failing closure ran");
  const auto recorded_by = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (failed_async(sched, "gpu0") == 0 && std::chrono::steady_clock::now() < recorded_by) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }

  // Step 4 (and on, until the error arrives). Each step queues a sync and an async closure.
  int reported_at = 0;
  std::atomic<int> later_async_ran{0};
  for (int step = 4; step <= 6 && reported_at == 0; ++step) {
    if (step > 4) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    bool sync_ran = false;
    gpu.add_step_closure([&sync_ran, step] {
      sync_ran = true;
      fmt::print("  step {}: sync closure ran\n", step);
    });
    gpu.add_step_closure(stepflow::run_async, [&] { ++later_async_ran; });

    const auto steps_before = gpu.step();
    try {
      gpu.run_step_closures();
      fmt::print("  step {}: run_step_closures() returned normally\n", step);
    } catch (const stepflow::async_closure_error& e) {
      reported_at = step;
      fmt::print("  step {}: run_step_closures() threw\n", step);
      const std::string original = show(e);
      expect(starts_with_prefix(e), "what() starts with torch._lazy's message");
      expect(e.device() == "gpu0", "device() names the failed device");
      expect(original == "disk full while writing the step 3 checkpoint", "the original is nested");
      // The two closures behind it at step 3, plus step 4's async closure if step 4 handed it over
      // before the failure was recorded.
      expect(e.discarded() == static_cast<std::size_t>(2 + (step - 4)),
             "discarded() counts the closures behind it");

      // The call that reports the error does nothing else: this step's closures are still
      // pending, and the step did not count.
      expect(!sync_ran, "the reporting call ran no closure");
      expect(gpu.step() == steps_before, "the reporting call did not count as a step end");

      fmt::print(
          "  step {}: run_step_closures() again: the step's closures, still pending, run now\n",
          step);
      gpu.run_step_closures();  // ends the step for real: the pending closures run now
      expect(sync_ran, "the pending sync closure ran at the next step end");
    }
  }
  expect(reported_at >= 4, "the error was reported by a step end after step 3");

  gpu.flush();  // the error was reported once; nothing left to report
  expect(!behind_ran, "the closures queued behind the failure never ran");
  expect(async_ran == 2, "steps 1 and 2 ran their async closures");
  expect(later_async_ran >= 1, "async closures queued after the report run");
  fmt::print("  flush(): no error; {} step ends completed\n", gpu.step());
}

void part2_reported_at_flush(stepflow::scheduler& sched) {
  fmt::print("part 2: the error arrives at flush()\n");
  stepflow::device_context& gpu = sched.device("gpu1");

  gpu.add_step_closure(stepflow::run_async,
                       [] { throw checkpoint_error("checkpoint server unreachable"); });
  gpu.run_step_closures();

  bool reported = false;
  try {
    gpu.flush();  // waits for the closure, then reports its failure
  } catch (const stepflow::async_closure_error& e) {
    reported = true;
    fmt::print("  flush() threw\n");
    expect(show(e) == "checkpoint server unreachable", "the original is nested");
    expect(e.discarded() == 0, "nothing was queued behind it");
    // original(): the same exception as an exception_ptr.
    try {
      std::rethrow_exception(e.original());
    } catch (const checkpoint_error&) {
      // the closure's own type, unchanged
    } catch (...) {
      expect(false, "original() holds the checkpoint_error");
    }
  }
  expect(reported, "flush() reported the failure");

  bool ran = false;
  gpu.add_step_closure(stepflow::run_async, [&ran] { ran = true; });
  gpu.run_step_closures();
  gpu.flush();
  expect(ran, "the device runs async closures again");
  fmt::print("  the next step's async closure ran; flush(): no error\n");
}

void part3_reported_at_shutdown() {
  fmt::print("part 3: nobody asks; the scheduler reports it when destroyed\n");
  std::size_t devices_reported = 0;
  std::size_t never_run = 0;
  std::string original;
  {
    stepflow::options opts;
    // The report goes to stderr by default; this example takes it through the callback instead.
    opts.report_to_stderr = false;
    opts.on_shutdown_report = [&](const stepflow::shutdown_report& report) {
      for (const stepflow::device_shutdown_report& d : report.devices) {
        ++devices_reported;
        never_run += d.never_run;
        try {
          if (d.unreported_error) std::rethrow_exception(d.unreported_error);
        } catch (const std::exception& e) {
          original = e.what();
        }
        fmt::print("  shutdown report for {}: error '{}', {} discarded, {} never run\n", d.device,
                   original, d.discarded, d.never_run);
      }
    };
    stepflow::scheduler sched(opts);
    stepflow::device_context& gpu = sched.device("gpu2");
    gpu.add_step_closure(stepflow::run_async,
                         [] { throw checkpoint_error("metrics upload failed"); });
    gpu.run_step_closures();
    gpu.add_step_closure([] {});  // added, but no step end ever takes it
  }                               // ~scheduler: waits for the async closure, then reports
  expect(devices_reported == 1, "one device had something to report");
  expect(original == "metrics upload failed", "the unreported error is in the report");
  expect(never_run == 1, "the closure no step end took is counted");
}

void part4_lockstep_device_that_stopped() {
  fmt::print("part 4: lockstep; a device stops stepping\n");
  stepflow::options opts;
  opts.ordering = stepflow::step_ordering::lockstep;
  // Both devices take part in lockstep (and joined closures) from the start.
  opts.participants = {"fast", "stalled"};
  stepflow::scheduler sched(opts);
  stepflow::device_context& fast = sched.device("fast");
  stepflow::device_context& stalled = sched.device("stalled");

  std::atomic<int> fast_ran{0};  // steps whose async closure of `fast` ran
  std::atomic<bool> joined_ran{false};

  // Step 1: both devices end it.
  stalled.add_step_closure(stepflow::run_async, [] {});
  fast.add_step_closure(stepflow::run_async, [&] { ++fast_ran; });
  fast.run_step_closures();
  stalled.run_step_closures();

  // Step 2 and 3: only `fast` steps; `stalled` has stopped (a hung data loader, say). A joined
  // closure for step 2 (the current global step: every device ended step 1, not all step 2).
  sched.add_joined_step_closure([&joined_ran](std::uint64_t step) {
    joined_ran = true;
    fmt::print("  the joined closure of step {} ran\n", step);
  });
  for (int step = 2; step <= 3; ++step) {
    fast.add_step_closure(stepflow::run_async, [&] { ++fast_ran; });
    fast.run_step_closures();  // never blocks here: fast's queue has room
  }
  fmt::print("  'fast' ended steps 1-3, 'stalled' stopped after step 1\n");

  // Lockstep: fast's closures of step 3 wait until every device's closures of step 2 ran, and
  // stalled never ends step 2. flush() would wait forever; flush_for() gives up.
  const bool flushed = fast.flush_for(std::chrono::milliseconds(200));
  fmt::print("  fast.flush_for(200ms) -> {}: async closures of fast that ran: {}\n", flushed,
             fast_ran.load());
  expect(!flushed, "flush_for() gave up while a participant stopped stepping");
  expect(fast_ran <= 2, "fast's closure of step 3 waited for the stopped device");
  expect(!joined_ran, "the joined closure of step 2 waited for the stopped device");
  expect(!sched.flush_for(std::chrono::milliseconds(0)), "scheduler::flush_for() gives up too");

  // retire(): `stalled` no longer takes part, so nobody waits for it any more.
  const bool retired = sched.retire("stalled");
  fmt::print("  sched.retire(\"stalled\") -> {}\n", retired);
  expect(retired, "retire() took the stopped device out");
  const bool flushed_after = sched.flush_for(std::chrono::seconds(10));
  fmt::print("  sched.flush_for(10s) -> {}: async closures of fast that ran: {}\n", flushed_after,
             fast_ran.load());
  expect(flushed_after, "after retire(), the flush finished");
  expect(fast_ran == 3, "after retire(), fast's closures of every step ran");
  expect(joined_ran, "after retire(), the joined closure of step 2 ran");
  expect(!sched.retire("stalled"), "retire() of a device that no longer takes part returns false");
}

}  // namespace

int main() {
  try {
    stepflow::scheduler sched(stepflow::options{});
    part1_reported_at_next_step_end(sched);
    part2_reported_at_flush(sched);
    part3_reported_at_shutdown();
    part4_lockstep_device_that_stopped();
  } catch (const std::exception& e) {
    fmt::print(stderr, "error_handling: unexpected exception: {}\n", e.what());
    return 1;
  }
  if (failed_checks != 0) {
    fmt::print(stderr, "error_handling: {} check(s) failed\n", failed_checks);
    return 1;
  }
  fmt::print("all checks passed\n");
  return 0;
}
