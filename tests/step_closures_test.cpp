// The torch-style free functions on the process-wide default scheduler.

#include <stepflow/stepflow.hpp>

#include <gtest/gtest.h>

#include <atomic>

namespace stepflow {
namespace {

TEST(DefaultScheduler, FreeFunctionsUseTheDefaultDevice) {
  device_context& d = get_device_context();
  EXPECT_EQ(&d, &default_scheduler().device(default_scheduler().options().default_device));
  EXPECT_EQ(&d, &get_device_context(default_scheduler().options().default_device));
  const std::uint64_t before = d.step();
  int sync_ran = 0;
  std::atomic<int> async_ran{0};
  add_step_closure([&](int k) { sync_ran += k; }, 2);
  add_step_closure(run_async, [&] { ++async_ran; });
  device_context& ended = run_step_closures();
  EXPECT_EQ(&ended, &d);
  ended.flush();
  EXPECT_EQ(sync_ran, 2);
  EXPECT_EQ(async_ran.load(), 1);
  EXPECT_EQ(d.step(), before + 1);
}

TEST(DefaultScheduler, NamedDevicesAreSeparate) {
  device_context& a = get_device_context("xla:0");
  device_context& b = get_device_context("xla:1");
  EXPECT_NE(&a, &b);
  int ran = 0;
  a.add_step_closure([&] { ++ran; });
  run_step_closures("xla:1");
  EXPECT_EQ(ran, 0);
  run_step_closures("xla:0");
  EXPECT_EQ(ran, 1);
}

}  // namespace
}  // namespace stepflow
