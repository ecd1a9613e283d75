// What a device recycles so that steady state allocates nothing: a lane's chunks
// (pending_closures) and batches with buffers (batch_pool). Each grows with headroom and keeps
// what it grew, so neither allocates again when what is in use at once reaches a new high or
// exceeds a fixed pool.
//
// The lane and the pool are driven directly from one thread: a step end is `take` into a batch,
// and the batch is run (or discarded) whenever the test says, which is what decides how many
// chunks or batches are in use at once. No scheduler and no threads, so every count is exact.

#include <gtest/gtest.h>

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <new>
#include <utility>
#include <vector>

#include "closure_batch.hpp"
#include "pending_closures.hpp"
#include "support/counting_new.hpp"

namespace stepflow::detail {
namespace {

using stepflow::testing::allocations;

void run_all(closure_batch& batch) {
  batch.consume(
      [](closure_ref c) {
        c();
        return true;
      },
      [](std::size_t) {});
}

struct lane_driver {
  pending_closures lane;
  int ran = 0;

  auto counter() {
    return [this, pad = std::array<char, 8>{}] { ran += 1 + pad[0]; };
  }
  void add(std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) lane.emplace<decltype(counter())>(counter());
  }
  closure_batch take() {
    closure_batch batch;
    lane.take(batch);
    return batch;
  }
  // `count` steps of `per_step` closures, each run as soon as its step ends.
  void steps(int count, std::size_t per_step) {
    for (int i = 0; i < count; ++i) {
      add(per_step);
      closure_batch batch = take();
      run_all(batch);
    }
  }
};

// 16 bytes of capture: a 24-byte record.
constexpr std::size_t record_bytes =
    record_size_of<decltype(std::declval<lane_driver&>().counter())>;
static_assert(record_bytes == 24);
constexpr std::size_t records_per_chunk = lane_chunk::record_bytes / record_bytes;

TEST(PendingClosures, StepsOfTheSameSizeAllocateNothingAfterTheFirst) {
  lane_driver d;
  const std::size_t per_step = 3 * records_per_chunk + 100;
  d.steps(3, per_step);
  const std::size_t before = allocations.load();
  d.steps(200, per_step);
  EXPECT_EQ(allocations.load(), before);
  EXPECT_EQ(d.ran, static_cast<int>(203 * per_step));
}

TEST(PendingClosures, StepsOfMoreChunksThanASmallPoolAllocateNothingAfterTheFirst) {
  // 40 chunks (~13,500 closures of 16 bytes, 320 KiB) in use at every step end.
  lane_driver d;
  const std::size_t per_step = 40 * records_per_chunk;
  d.steps(2, per_step);
  const std::size_t before = allocations.load();
  d.steps(20, per_step);
  EXPECT_EQ(allocations.load(), before);
  EXPECT_EQ(d.ran, static_cast<int>(22 * per_step));
}

// The chunks in use at once depend on how far the runner is behind when a step begins (B7 found
// a new high after thousands of quiet steps in an asynchronous lane). Growing one chunk at a
// time, every new high is an allocation in what looked like steady state; a lane that doubles
// when it grows needs nothing more until the chunks in use at once pass twice the number they
// were when it last grew.
class PendingClosuresBehind : public ::testing::Test {
 protected:
  static constexpr std::size_t per_step = 2 * records_per_chunk;
  lane_driver d;
  std::vector<closure_batch> taken;  // taken and not yet run, oldest first
  int steps = 0;

  void SetUp() override { taken.reserve(8); }
  void TearDown() override {
    for (closure_batch& b : taken) run_all(b);
    EXPECT_EQ(d.ran, static_cast<int>(steps * per_step));
  }
  // `count` steps with the runner `behind` steps behind the step end (0: it keeps up).
  void steps_behind(int count, std::size_t behind) {
    for (int i = 0; i < count; ++i, ++steps) {
      d.add(per_step);
      taken.push_back(d.take());
      while (taken.size() > behind) {
        run_all(taken.front());
        taken.erase(taken.begin());
      }
    }
  }
};

TEST_F(PendingClosuresBehind, AfterGrowingOnceTheLaneHoldsTwiceWhatWasInUse) {
  steps_behind(5, 0);  // about 3 chunks in use at a time
  const std::size_t kept_up = allocations.load();
  steps_behind(5, 1);  // about 5: the lane grows
  const std::size_t one_behind = allocations.load();
  EXPECT_GT(one_behind, kept_up) << "the test no longer reaches a new high";
  steps_behind(50, 2);  // about 7: within twice what was in use when it grew
  steps_behind(50, 1);
  steps_behind(50, 0);
  EXPECT_EQ(allocations.load(), one_behind);
}

// Batches with buffers carry closures added by threads other than the lane's owner. With one such
// closure per step and the runner behind, as many batches are in flight as the queue's capacity
// allows (100 by default): more than a pool of fixed size kept.
TEST(BatchPool, AsManyBatchesInFlightAsEverBeforeAllocateNothing) {
  batch_pool pool;
  int ran = 0;
  auto round = [&](std::size_t in_flight) {
    std::vector<closure_batch> flying;
    flying.reserve(in_flight);
    for (std::size_t i = 0; i < in_flight; ++i) {
      flying.push_back(pool.acquire());
      flying.back().add(closure([&ran] { ++ran; }));
    }
    for (closure_batch& b : flying) {
      run_all(b);
      pool.release(std::move(b));
    }
  };
  round(100);
  const std::size_t before = allocations.load();
  for (int i = 0; i < 5; ++i) round(100);
  // Each round's own list of 100 batches is one allocation.
  EXPECT_EQ(allocations.load(), before + 5);
  EXPECT_EQ(ran, 600);
}

TEST(PendingClosures, TheCounterSeesTheLanesChunkAllocations) {
  // Guards the two tests above against a counter that counts nothing.
  const std::size_t before = allocations.load();
  pending_closures lane;
  EXPECT_GE(allocations.load(), before + 1);
}

}  // namespace
}  // namespace stepflow::detail
