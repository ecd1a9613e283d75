// device_context: capture rules, step membership, sync and async semantics, failure reporting.

#include <stepflow/stepflow.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "support/occupy_workers.hpp"
#include "support/tbb_threads.hpp"
#include "support/test_options.hpp"
#include "support/watchdog.hpp"

namespace stepflow {
namespace {

options quiet_options(std::size_t max_queue = 100) { return testing::quiet_options(max_queue); }

// ---------------------------------------------------------------------------------------------
// Capture

TEST(Capture, ArgumentsAreDecayCopiedWhenAdded) {
  scheduler s(quiet_options());
  device_context& d = s.device("d");
  int value = 1;
  int seen = 0;
  d.add_step_closure([&seen](int v) { seen = v; }, value);
  value = 2;
  d.run_step_closures();
  EXPECT_EQ(seen, 1);
}

TEST(Capture, StdRefPassesAReference) {
  scheduler s(quiet_options());
  device_context& d = s.device("d");
  int counter = 0;
  d.add_step_closure([](int& c) { c += 5; }, std::ref(counter));
  d.run_step_closures();
  EXPECT_EQ(counter, 5);
}

TEST(Capture, MoveOnlyCallablesAndArgumentsWork) {
  scheduler s(quiet_options());
  device_context& d = s.device("d");
  int seen = 0;
  std::atomic<int> seen_async{0};  // written on a worker while the sync closures run
  d.add_step_closure([p = std::make_unique<int>(3), &seen] { seen += *p; });
  d.add_step_closure([&seen](std::unique_ptr<int> p) { seen += *p; }, std::make_unique<int>(4));
  d.add_step_closure(
      run_async, [&seen_async](std::unique_ptr<int> p) { seen_async += *p; },
      std::make_unique<int>(10));
  d.run_step_closures();
  d.flush();
  EXPECT_EQ(seen, 7);
  EXPECT_EQ(seen_async.load(), 10);
}

TEST(Capture, ReturnValueIsIgnoredAndFunctionPointersWork) {
  scheduler s(quiet_options());
  device_context& d = s.device("d");
  static int calls = 0;
  calls = 0;
  int (*fn)(int) = [](int x) { return calls += x; };
  d.add_step_closure(fn, 2);
  d.add_step_closure([] { return std::string("ignored"); });
  d.run_step_closures();
  EXPECT_EQ(calls, 2);
}

TEST(Capture, MemberFunctionsTakeTheObjectAsFirstArgument) {
  struct counter {
    int n = 0;
    void add(int k) { n += k; }
  };
  scheduler s(quiet_options());
  device_context& d = s.device("d");
  counter c;
  d.add_step_closure(&counter::add, &c, 4);
  d.run_step_closures();
  EXPECT_EQ(c.n, 4);
}

TEST(Capture, NullCallablesAreRejectedWhenAdded) {
  scheduler s(quiet_options());
  device_context& d = s.device("d");
  void (*null_fn)() = nullptr;
  std::function<void()> empty;
  void (std::string::*null_member)() = nullptr;
  EXPECT_THROW(d.add_step_closure(null_fn), std::invalid_argument);
  EXPECT_THROW(d.add_step_closure(empty), std::invalid_argument);
  EXPECT_THROW(d.add_step_closure(run_async, null_fn), std::invalid_argument);
  EXPECT_THROW(d.add_step_closure(run_async, empty), std::invalid_argument);
  EXPECT_THROW(d.add_step_closure(null_member, std::string()), std::invalid_argument);
  EXPECT_THROW(d.add_step_closure(closure{}), std::invalid_argument);
  // Inside `labeled` too: otherwise the null pointer would only be called on a worker.
  EXPECT_THROW(d.add_step_closure(run_async, labeled("null", null_fn)), std::invalid_argument);
  EXPECT_THROW(d.add_step_closure(labeled("empty", empty)), std::invalid_argument);
  // Nothing was queued: the step end runs nothing and the device still works.
  int ran = 0;
  d.add_step_closure([&] { ++ran; });
  d.run_step_closures();
  d.flush();
  EXPECT_EQ(ran, 1);
}

TEST(Capture, ACopyThatThrowsAddsNothing) {
  // The callable is copied straight into stepflow's storage: a copy that throws must leave
  // nothing behind, on the owner thread's inline path, on its first add (the slow path that
  // claims the lane) and from another thread.
  struct throws_on_copy {
    std::atomic<int>* ran;  // the async closure runs on a worker
    bool fail;
    throws_on_copy(std::atomic<int>* r, bool f) : ran(r), fail(f) {}
    throws_on_copy(const throws_on_copy& o) : ran(o.ran), fail(o.fail) {
      if (fail) throw std::runtime_error("copy failed");
    }
    void operator()() const { ++*ran; }
  };
  scheduler s(quiet_options());
  device_context& d = s.device("d");
  std::atomic<int> ran{0};
  const throws_on_copy bad(&ran, true);
  const throws_on_copy good(&ran, false);
  EXPECT_THROW(d.add_step_closure(bad), std::runtime_error);  // first add: claims the lane
  d.add_step_closure(good);
  EXPECT_THROW(d.add_step_closure(bad), std::runtime_error);  // owner, inline path
  EXPECT_THROW(d.add_step_closure(run_async, bad), std::runtime_error);
  d.add_step_closure(run_async, good);
  EXPECT_THROW(d.add_step_closure(run_async, bad), std::runtime_error);
  std::thread other([&] {
    EXPECT_THROW(d.add_step_closure(bad), std::runtime_error);  // shared lane
    d.add_step_closure(good);
  });
  other.join();
  d.run_step_closures();
  d.flush();
  EXPECT_EQ(ran.load(), 3);
}

// ---------------------------------------------------------------------------------------------
// Sync closures

TEST(Sync, RunInOrderOnTheCallingThreadBeforeTheStepEndReturns) {
  scheduler s(quiet_options());
  device_context& d = s.device("d");
  std::vector<int> order;
  const auto caller = std::this_thread::get_id();
  bool all_on_caller = true;
  for (int i = 0; i < 1000; ++i) {
    d.add_step_closure([&, i] {
      order.push_back(i);
      all_on_caller = all_on_caller && std::this_thread::get_id() == caller;
    });
  }
  d.run_step_closures();
  ASSERT_EQ(order.size(), 1000u);
  for (int i = 0; i < 1000; ++i) EXPECT_EQ(order[static_cast<std::size_t>(i)], i);
  EXPECT_TRUE(all_on_caller);
  EXPECT_EQ(d.step(), 1u);
}

struct tagged_error {
  int tag;
};

TEST(Sync, FirstExceptionPropagatesUnchangedAndTheRestAreDropped) {
  scheduler s(quiet_options());
  device_context& d = s.device("d");
  const tagged_error* thrown = nullptr;
  int after = 0;
  int destroyed_unrun = 0;
  struct on_destroy {
    int* counter;
    on_destroy(int* c) : counter(c) {}
    on_destroy(on_destroy&& o) noexcept : counter(std::exchange(o.counter, nullptr)) {}
    ~on_destroy() {
      if (counter != nullptr) ++*counter;
    }
  };
  d.add_step_closure([&] {
    try {
      throw tagged_error{7};
    } catch (tagged_error& e) {
      thrown = &e;
      throw;
    }
  });
  d.add_step_closure([&, guard = on_destroy(&destroyed_unrun)] { ++after; });
  try {
    d.run_step_closures();
    ADD_FAILURE() << "no exception";
  } catch (tagged_error& e) {
    EXPECT_EQ(e.tag, 7);
    EXPECT_EQ(&e, thrown) << "not the same exception object";
  }
  EXPECT_EQ(after, 0);
  EXPECT_EQ(destroyed_unrun, 1) << "dropped closures must be destroyed";
  EXPECT_EQ(d.step(), 1u) << "a step whose sync closure threw still counts";
  // Dropped, not deferred: the next step does not run it.
  d.run_step_closures();
  EXPECT_EQ(after, 0);
}

TEST(Sync, ClosuresAddedDuringAStepEndBelongToTheNextOne) {
  scheduler s(quiet_options());
  device_context& d = s.device("d");
  std::vector<std::string> log;
  d.add_step_closure([&] {
    log.push_back("first");
    d.add_step_closure([&] { log.push_back("added by first"); });
  });
  d.run_step_closures();
  EXPECT_EQ(log, std::vector<std::string>{"first"});
  d.run_step_closures();
  EXPECT_EQ(log, (std::vector<std::string>{"first", "added by first"}));
}

TEST(Sync, EndingItsOwnStepFromInsideIsAnError) {
  scheduler s(quiet_options());
  device_context& d = s.device("d");
  d.add_step_closure([&] { d.run_step_closures(); });
  try {
    d.run_step_closures();
    ADD_FAILURE() << "no exception";
  } catch (const error& e) {
    EXPECT_NE(std::string(e.what()).find("inside"), std::string::npos) << e.what();
  }
  // The device still works afterwards.
  int ran = 0;
  d.add_step_closure([&] { ++ran; });
  d.run_step_closures();
  EXPECT_EQ(ran, 1);
}

TEST(Sync, EndingAnotherDevicesStepFromInsideWorks) {
  scheduler s(quiet_options());
  device_context& a = s.device("a");
  device_context& b = s.device("b");
  int ran_b = 0;
  b.add_step_closure([&] { ++ran_b; });
  a.add_step_closure([&] { b.run_step_closures(); });
  a.run_step_closures();
  EXPECT_EQ(ran_b, 1);
  EXPECT_EQ(b.step(), 1u);
}

// ---------------------------------------------------------------------------------------------
// Async closures

class Async : public testing::with_tbb_threads {};

TEST_P(Async, RunFifoAcrossStepsOneAtATime) {
  scheduler s(quiet_options(7));
  device_context& d = s.device("d");
  std::vector<int> order;  // written only by the one closure running at a time
  std::atomic<int> running{0};
  std::atomic<bool> overlapped{false};
  int next = 0;
  for (int step = 0; step < 200; ++step) {
    for (int k = 0; k < 5; ++k) {
      d.add_step_closure(run_async, [&, i = next++] {
        if (running.fetch_add(1) != 0) overlapped = true;
        order.push_back(i);
        running.fetch_sub(1);
      });
    }
    d.run_step_closures();
  }
  d.flush();
  ASSERT_EQ(order.size(), 1000u);
  for (int i = 0; i < 1000; ++i) ASSERT_EQ(order[static_cast<std::size_t>(i)], i);
  EXPECT_FALSE(overlapped);
}

// Counts its live copies in `*alive`: captured by closures, it tells whether each closure was
// destroyed exactly once.
struct counted {
  std::atomic<int>* alive;
  explicit counted(std::atomic<int>* a) : alive(a) { alive->fetch_add(1); }
  counted(const counted& o) : alive(o.alive) { alive->fetch_add(1); }
  ~counted() { alive->fetch_sub(1); }
};

// `d.add_step_closure(f)`, asynchronous if `async`.
template <class F>
void add_either(device_context& d, bool async, F f) {
  if (async) {
    d.add_step_closure(run_async, std::move(f));
  } else {
    d.add_step_closure(std::move(f));
  }
}

TEST_P(Async, ClosuresOfEverySizeCrossChunksInOrderAndAreDestroyedOnce) {
  // Closures are stored as records of 16 to 64 bytes end to end in 8 KiB chunks (callables
  // over 56 bytes on the heap), so steps of varied sizes put record ends and step ends at every
  // offset of a chunk, including its last bytes. Sync and async lanes, with steps from empty to
  // several chunks long.
  scheduler s(quiet_options(50));
  device_context& d = s.device("d");
  std::atomic<int> alive{0};
  std::vector<int> sync_order;   // the step-ending thread only
  std::vector<int> async_order;  // one async closure at a time
  int next_sync = 0;
  int next_async = 0;
  auto add = [&](bool async, int size_class) {
    int& next = async ? next_async : next_sync;
    std::vector<int>& order = async ? async_order : sync_order;
    const int i = next++;
    const counted c(&alive);
    auto push = [&order, i] { order.push_back(i); };
    auto add_one = [&](auto f) { add_either(d, async, std::move(f)); };
    switch (size_class) {
      case 0:
        add_one([push] { push(); });
        break;  // 16-byte record
      case 1:
        add_one([push, c, pad = std::array<char, 13>{}] { push(); });
        break;
      case 2:
        add_one([push, c, pad = std::array<char, 32>{}] { push(); });
        break;  // 56 bytes
      default:
        add_one([push, c, pad = std::array<char, 200>{}] { push(); });
        break;  // heap
    }
  };
  std::uint32_t seed = 12345;
  auto random = [&seed](std::uint32_t n) {
    seed = seed * 1664525u + 1013904223u;
    return (seed >> 8) % n;
  };
  for (int step = 0; step < 400; ++step) {
    const std::uint32_t n = random(step % 50 == 0 ? 700 : 40);
    for (std::uint32_t k = 0; k < n; ++k) {
      add(random(2) == 0, static_cast<int>(random(4)));
    }
    d.run_step_closures();
  }
  d.flush();
  ASSERT_EQ(sync_order.size(), static_cast<std::size_t>(next_sync));
  ASSERT_EQ(async_order.size(), static_cast<std::size_t>(next_async));
  for (int i = 0; i < next_sync; ++i) ASSERT_EQ(sync_order[static_cast<std::size_t>(i)], i);
  for (int i = 0; i < next_async; ++i) ASSERT_EQ(async_order[static_cast<std::size_t>(i)], i);
  EXPECT_EQ(alive.load(), 0);
}

// A step of mixed record sizes spanning several chunks, with closures from another thread in
// the middle (held by the batch itself, not in the lane), and one closure that throws at a
// given position: everything before it ran once, everything after it is destroyed once without
// running, the counts say so, and the lane's chunks are given back (the next steps reuse them:
// were one given back early, its records would be overwritten before they ran; never, and the
// leak checker of the asan preset reports it).
struct failing_step_fixture {
  std::atomic<int> alive{0};
  std::vector<int> ran;  // one thread at a time: the step end (sync) or the drainer (async)
  int next = 0;

  // Adds closure number `next` (from the calling thread); it throws if it is `failing`.
  void add(device_context& d, bool async, int failing, int size_class) {
    const int i = next++;
    const counted c(&alive);
    auto body = [this, i, failing] {
      if (i == failing) throw tagged_error{i};
      ran.push_back(i);
    };
    auto add_one = [&](auto f) { add_either(d, async, std::move(f)); };
    switch (size_class) {
      case 0:
        add_one([body, c] { body(); });
        break;
      case 1:
        add_one([body, c, pad = std::array<char, 24>{}] { body(); });
        break;
      default:
        add_one([body, c, pad = std::array<char, 200>{}] { body(); });  // on the heap
        break;
    }
  }

  // Five steps of 1,000 closures (24-64-byte records: 4-7 chunks), failing first, in the first
  // chunk, in the other thread's closures, in a later chunk and last, then one that does not
  // fail. `end_failing_step(unrun)` ends a step and returns the tag of the error it reports;
  // `end_step()` ends one that does not fail. Returns the closures left unrun.
  template <class EndFailingStep, class EndStep>
  std::uint64_t run_failing_steps(device_context& d, bool async, EndFailingStep end_failing_step,
                                  EndStep end_step) {
    std::uint64_t unrun = 0;
    std::size_t expected_ran = 0;
    for (const int fail_at : {0, 100, 502, 900, 999}) {
      const int first = next;
      add_step(d, async, 1000, fail_at);
      EXPECT_EQ(end_failing_step(static_cast<std::size_t>(999 - fail_at)), first + fail_at);
      expected_ran += static_cast<std::size_t>(fail_at);
      unrun += static_cast<std::uint64_t>(999 - fail_at);
      EXPECT_EQ(ran.size(), expected_ran);
      EXPECT_EQ(alive.load(), 0) << "every closure destroyed once, run or not";
    }
    for (int k = 0; k < 300; ++k) add(d, async, -1, k % 3);
    end_step();
    EXPECT_EQ(ran.size(), expected_ran + 300);
    EXPECT_TRUE(std::is_sorted(ran.begin(), ran.end())) << "closures ran out of order";
    EXPECT_EQ(alive.load(), 0);
    return unrun;
  }

  // One step of `n` closures, the one at `fail_at` throwing; closures [n/2, n/2 + 5) are added by
  // another thread.
  void add_step(device_context& d, bool async, int n, int fail_at) {
    const int failing = next + fail_at;
    for (int k = 0; k < n; ++k) {
      if (k == n / 2) {
        std::thread other([&] {
          for (int j = 0; j < 5; ++j) add(d, async, failing, j % 3);
        });
        other.join();
        k += 4;
        continue;
      }
      add(d, async, failing, k % 3);
    }
  }
};

TEST(Sync, AFailureInAStepSpanningChunksRunsWhatCameBeforeAndDestroysTheRestOnce) {
  scheduler s(quiet_options());
  device_context& d = s.device("d");
  failing_step_fixture f;
  const std::uint64_t dropped = f.run_failing_steps(
      d, false,
      [&](std::size_t) {
        try {
          d.run_step_closures();
        } catch (const tagged_error& e) {
          return e.tag;
        }
        ADD_FAILURE() << "no exception";
        return -1;
      },
      [&] { d.run_step_closures(); });
  const device_metrics m = s.metrics().devices.at(0);
  EXPECT_EQ(m.dropped_sync, dropped);
  EXPECT_EQ(m.failed_sync, 5u);
}

TEST_P(Async, AFailureInAStepSpanningChunksRunsWhatCameBeforeAndDiscardsTheRestOnce) {
  scheduler s(quiet_options(2000));
  device_context& d = s.device("d");
  failing_step_fixture f;
  const std::uint64_t discarded = f.run_failing_steps(
      d, true,
      [&](std::size_t unrun) {
        d.run_step_closures();
        try {
          d.flush();
        } catch (const async_closure_error& e) {
          EXPECT_EQ(e.discarded(), unrun);
          try {
            std::rethrow_exception(e.original());
          } catch (const tagged_error& original) {
            return original.tag;
          }
        }
        ADD_FAILURE() << "no failure reported";
        return -1;
      },
      [&] {
        d.run_step_closures();
        d.flush();
      });
  const device_metrics m = s.metrics().devices.at(0);
  EXPECT_EQ(m.discarded_async, discarded);
  EXPECT_EQ(m.failed_async, 5u);
}

TEST_P(Async, FailureIsReportedOnceByTheNextStepEndWithTheOriginalNested) {
  scheduler s(quiet_options());
  device_context& d = s.device("gpu0");
  std::atomic<int> later_ran{0};
  d.add_step_closure(run_async, [] { throw std::runtime_error("loss is NaN"); });
  d.add_step_closure(run_async, [&] { ++later_ran; });
  d.add_step_closure(run_async, [&] { ++later_ran; });
  d.run_step_closures();
  try {
    d.flush();
    ADD_FAILURE() << "flush did not report";
  } catch (const async_closure_error& e) {
    const std::string what = e.what();
    EXPECT_EQ(what.rfind(async_failure_prefix, 0), 0u) << what;
    EXPECT_NE(what.find("loss is NaN"), std::string::npos) << what;
    EXPECT_NE(what.find("2 queued"), std::string::npos) << what;
    EXPECT_EQ(e.discarded(), 2u);
    EXPECT_EQ(e.device(), "gpu0");
    try {
      std::rethrow_if_nested(e);
      ADD_FAILURE() << "nothing nested";
    } catch (const std::runtime_error& original) {
      EXPECT_STREQ(original.what(), "loss is NaN");
    }
  }
  EXPECT_EQ(later_ran.load(), 0) << "closures queued behind a failure must not run";
  // Exactly once: the device works again.
  d.add_step_closure(run_async, [&] { ++later_ran; });
  EXPECT_NO_THROW(d.run_step_closures());
  EXPECT_NO_THROW(d.flush());
  EXPECT_EQ(later_ran.load(), 1);
}

// Sets a flag when destroyed. Queued behind a failing closure, it is discarded (destroyed)
// only after the failure was recorded, so the flag tells a test "recorded" without reporting it.
struct signal_on_destroy {
  std::atomic<bool>* flag;
  explicit signal_on_destroy(std::atomic<bool>* f) : flag(f) {}
  signal_on_destroy(signal_on_destroy&& o) noexcept : flag(std::exchange(o.flag, nullptr)) {}
  ~signal_on_destroy() {
    if (flag != nullptr) flag->store(true);
  }
};

void wait_for(const std::atomic<bool>& flag) {
  while (!flag.load()) std::this_thread::yield();
}

TEST_P(Async, TheReportingStepEndHasNoOtherEffect) {
  scheduler s(quiet_options());
  device_context& d = s.device("d");
  std::atomic<bool> recorded{false};
  d.add_step_closure(run_async, [] { throw 42; });
  d.add_step_closure(run_async, [guard = signal_on_destroy(&recorded)] {});
  d.run_step_closures();
  ASSERT_EQ(d.step(), 1u);
  int sync_ran = 0;
  std::atomic<int> async_ran{0};
  d.add_step_closure([&] { ++sync_ran; });
  d.add_step_closure(run_async, [&] { ++async_ran; });
  wait_for(recorded);
  try {
    d.run_step_closures();
    ADD_FAILURE() << "the failure was not reported";
  } catch (const async_closure_error& e) {
    EXPECT_EQ(e.discarded(), 1u);
    try {
      std::rethrow_exception(e.original());
    } catch (int v) {
      EXPECT_EQ(v, 42) << "a non-std exception is carried as is";
    }
  }
  EXPECT_EQ(sync_ran, 0) << "the reporting call must not run the step's closures";
  EXPECT_EQ(d.step(), 1u) << "a reporting call is not a step";
  d.run_step_closures();
  d.flush();
  EXPECT_EQ(sync_ran, 1);
  EXPECT_EQ(async_ran.load(), 1);
  EXPECT_EQ(d.step(), 2u);
}

TEST_P(Async, StepEndReportsAFailureRecordedBeforeItStarted) {
  scheduler s(quiet_options());
  device_context& d = s.device("d");
  for (int round = 0; round < 50; ++round) {
    std::atomic<bool> recorded{false};
    d.add_step_closure(run_async, [] { throw std::logic_error("recorded"); });
    d.add_step_closure(run_async, [guard = signal_on_destroy(&recorded)] {});
    d.run_step_closures();
    wait_for(recorded);
    EXPECT_THROW(d.run_step_closures(), async_closure_error) << "round " << round;
  }
}

TEST_P(Async, FlushFromInsideAnAsynchronousClosureIsRefused) {
  scheduler s(quiet_options());
  device_context& a = s.device("a");
  device_context& b = s.device("b");
  std::atomic<int> refused{0};
  a.add_step_closure(run_async, [&] {
    try {
      a.flush();
    } catch (const error&) {
      ++refused;
    }
    try {
      b.flush();
    } catch (const error&) {
      ++refused;
    }
    try {
      s.flush();
    } catch (const error&) {
      ++refused;
    }
  });
  a.run_step_closures();
  a.flush();
  EXPECT_EQ(refused.load(), 3);
}

TEST_P(Async, AClosureMayEndItsOwnStepAndNeverBlocks) {
  scheduler s(quiet_options(1));
  device_context& d = s.device("d");
  std::atomic<int> ran{0};
  std::function<void(int)> chain = [&](int depth) {
    ++ran;
    if (depth == 0) return;
    for (int k = 0; k < 3; ++k) d.add_step_closure(run_async, chain, depth - 1);
    d.run_step_closures();  // from inside an async closure of the same, full device
  };
  d.add_step_closure(run_async, chain, 4);
  d.run_step_closures();
  // Each flush waits for what was handed over before it; nested step ends hand over more.
  while (d.step() < 1 + 1 + 3 + 9 + 27) d.flush();
  d.flush();
  EXPECT_EQ(ran.load(), 1 + 3 + 9 + 27 + 81);
}

TEST_P(Async, FullQueueBlocksTheStepEndButNeverDeadlocks) {
  scheduler s(quiet_options(1));
  device_context& d = s.device("d");
  std::atomic<int> ran{0};
  for (int step = 0; step < 300; ++step) {
    for (int k = 0; k < 4; ++k) d.add_step_closure(run_async, [&] { ++ran; });
    d.run_step_closures();
  }
  d.flush();
  EXPECT_EQ(ran.load(), 1200);
}

TEST_P(Async, DevicesRunInParallelAndIndependently) {
  scheduler s(quiet_options());
  device_context& slow = s.device("slow");
  device_context& fast = s.device("fast");
  std::atomic<bool> release{false};
  std::atomic<int> fast_ran{0};
  slow.add_step_closure(run_async, [&] {
    while (!release.load()) std::this_thread::yield();
  });
  slow.run_step_closures();
  for (int i = 0; i < 10; ++i) fast.add_step_closure(run_async, [&] { ++fast_ran; });
  fast.run_step_closures();
  if (GetParam() >= 4) {
    // Workers to spare (the slow device holds one): fast's closures run with nobody flushing.
    // (The 10 s are a hang bound, not a timing claim: they take microseconds.)
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (fast_ran.load() < 10 && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::yield();
    }
    EXPECT_EQ(fast_ran.load(), 10) << "fast's closures waited behind the blocked device";
  }
  // With fewer oneTBB threads the flush may have to drain the fast device itself.
  fast.flush();
  EXPECT_EQ(fast_ran.load(), 10) << "a blocked device must not stall another";
  release = true;
  slow.flush();
}

// With one worker, a's closure holds it while it waits for b's closure, whose drainer task never
// gets a worker. a's flush waits for a's drainer: after a while it runs b's stalled closures
// itself, or it would wait forever (so would a full queue's step end, and the destructor). One
// worker at every thread limit: stepflow's arena has one at 1 and 2 threads, and at 4 all but
// one of its three are occupied (occupy_workers), or b's closure would simply run on another.
TEST_P(Async, AFlushOutlastsAClosureWaitingForAnotherDevicesClosure) {
  testing::watchdog dog(std::chrono::seconds(60), "closure waiting for another device");
  scheduler s(quiet_options());
  device_context& a = s.device("a");
  device_context& b = s.device("b");
  testing::occupy_workers all_but_one(testing::occupy_workers::worker_count() - 1);
  std::atomic<bool> a_started{false};
  std::atomic<bool> produced{false};
  a.add_step_closure(run_async, [&] {
    a_started = true;
    while (!produced) std::this_thread::sleep_for(std::chrono::microseconds(100));
  });
  b.add_step_closure(run_async, [&] { produced = true; });
  a.run_step_closures();
  // a's closure holds the worker from here. (The 10 s are a hang bound, not a timing claim.)
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!a_started.load() && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::yield();
  }
  ASSERT_TRUE(a_started.load()) << "premise: the one free worker runs a's closure";
  b.run_step_closures();
  a.flush();  // the watchdog ends a hang
  EXPECT_TRUE(produced.load());
  b.flush();
}

STEPFLOW_AT_1_2_4_THREADS(Async);

// ---------------------------------------------------------------------------------------------
// Sync mode

TEST(SyncMode, AsyncClosuresRunInlineFirstAndTheirExceptionsPropagate) {
  options o = quiet_options();
  o.sync_mode = true;
  scheduler s(o);
  device_context& d = s.device("d");
  std::vector<std::string> order;
  d.add_step_closure([&] { order.push_back("sync1"); });
  d.add_step_closure(run_async, [&] { order.push_back("async1"); });
  d.add_step_closure([&] { order.push_back("sync2"); });
  d.add_step_closure(run_async, [&] { order.push_back("async2"); });
  d.run_step_closures();
  EXPECT_EQ(order, (std::vector<std::string>{"async1", "async2", "sync1", "sync2"}));
  d.add_step_closure(run_async, [] { throw std::domain_error("inline"); });
  EXPECT_THROW(d.run_step_closures(), std::domain_error);
  EXPECT_NO_THROW(d.flush());
}

TEST(SyncMode, AStepIsDoneOnlyOnceEveryEarlierStepOfItsDeviceReturned) {
  testing::watchdog dog("two overlapping sync-mode step ends of one device");
  options o = quiet_options();
  o.sync_mode = true;
  scheduler s(o);
  device_context& d = s.device("d");
  std::atomic<bool> step1_running{false};
  std::atomic<bool> release{false};
  std::atomic<bool> step1_returned{false};
  std::atomic<int> joined_saw{-1};  // then 1 if step 1's closure had returned, else 0
  s.add_joined_step_closure([&] { joined_saw = step1_returned.load() ? 1 : 0; });
  d.add_step_closure([&] {
    step1_running = true;
    while (!release.load()) std::this_thread::yield();
    step1_returned = true;
  });
  std::thread first([&] { d.run_step_closures(); });
  while (!step1_running.load()) std::this_thread::yield();
  d.run_step_closures();  // step 2 returns while step 1's closure still runs
  // Reporting step 2 done here would start step 1's joined closure at once.
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_EQ(joined_saw.load(), -1) << "the joined closure of step 1 ran before step 1's closures";
  release = true;
  first.join();
  s.flush();
  EXPECT_EQ(joined_saw.load(), 1);
}

// ---------------------------------------------------------------------------------------------
// Identity

TEST(Device, NamesAreStableAndReferencesAreTheSame) {
  scheduler s(quiet_options());
  device_context& a = s.device("gpu0");
  for (int i = 0; i < 100; ++i) s.device("other" + std::to_string(i));
  EXPECT_EQ(&a, &s.device("gpu0"));
  EXPECT_EQ(a.name(), "gpu0");
  EXPECT_EQ(&a.scheduler(), &s);
  EXPECT_EQ(&s.default_device(), &s.device(s.options().default_device));
}

}  // namespace
}  // namespace stepflow
