#pragma once
// Runs a test body under a oneTBB thread limit (tbb::global_control::max_allowed_parallelism).
//
// What the limit changes, and what it does not: stepflow runs its drainer tasks in an arena of
// its own, sized max(2, limit) - 1 with no slot reserved for an application thread
// (src/scheduler.cpp, worker_pool_size()), and oneTBB grants an arena with enqueued tasks one
// worker even at a limit of 1 ("mandatory concurrency"). So stepflow's closures get one worker at
// 1 thread as at 2, and three at 4; 1 thread is not a case without workers. What 1 adds is a
// test thread whose own oneTBB work (parallel_for, parallel_pipeline, a flow graph) gets no worker
// (spawned tasks get none at that limit) and runs on it alone.
//
// A test that needs nobody draining a queue, so that a waiting thread (a flush, a step end short
// of room, the destructor) must run the closures itself, occupies the workers with
// `occupy_workers` (occupy_workers.hpp) at every thread count.

#include <gtest/gtest.h>
#include <oneapi/tbb/global_control.h>

#include <optional>
#include <string>

namespace stepflow::testing {

/// Fixture parametrised by the oneTBB thread limit (the caller plus workers; see above for what
/// stepflow's arena gets at each).
class with_tbb_threads : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override {
    limit_.emplace(tbb::global_control::max_allowed_parallelism,
                   static_cast<std::size_t>(GetParam()));
  }
  void TearDown() override { limit_.reset(); }

 private:
  std::optional<tbb::global_control> limit_;
};

inline std::string thread_count_name(const ::testing::TestParamInfo<int>& info) {
  return std::to_string(info.param) + "_threads";
}

}  // namespace stepflow::testing

/// Instantiates a `with_tbb_threads`-derived suite at 1, 2 and 4 threads.
#define STEPFLOW_AT_1_2_4_THREADS(suite)                               \
  INSTANTIATE_TEST_SUITE_P(Threads, suite, ::testing::Values(1, 2, 4), \
                           ::stepflow::testing::thread_count_name)
