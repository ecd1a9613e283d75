#pragma once
// Runs a test body under a oneTBB thread limit, so scheduler tests see both the serial case
// (1 thread: no worker, the waiting thread must do the work itself) and contended ones.

#include <gtest/gtest.h>
#include <oneapi/tbb/global_control.h>

#include <optional>
#include <string>

namespace stepflow::testing {

/// Fixture parametrised by the number of oneTBB threads (the caller plus workers).
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
