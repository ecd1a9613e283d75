// async_closure_error::what(): torch's prefix, then the device whose closure failed, the
// closure's own message and the number of closures discarded behind it, in that order
// (docs/semantics.md; README: "... exception on device 'gpu0': disk full ... (2 queued
// asynchronous closures were discarded)"). Joined closures are named "joined".

#include <stepflow/stepflow.hpp>

#include <gtest/gtest.h>

#include <cstddef>
#include <functional>
#include <stdexcept>
#include <string>

#include "support/test_options.hpp"

namespace stepflow {
namespace {

// The async_closure_error that `call` throws. Fails the test when it throws nothing.
async_closure_error reported_by(const std::function<void()>& call) {
  try {
    call();
  } catch (const async_closure_error& e) {
    return e;
  }
  ADD_FAILURE() << "no async_closure_error was thrown";
  throw std::logic_error("no async_closure_error was thrown");
}

// Checks the message of `e` names `device`, then `original`, then `discarded`, after the prefix.
void expect_message(const async_closure_error& e, const std::string& device,
                    const std::string& original, std::size_t discarded) {
  const std::string what = e.what();
  EXPECT_EQ(e.device(), device);
  ASSERT_EQ(what.rfind(async_failure_prefix, 0), 0u) << what;
  const std::size_t named = what.find("on device '" + device + "'");
  ASSERT_NE(named, std::string::npos)
      << "the message does not name device '" << device << "': " << what;
  const std::size_t message = what.find(original, named);
  ASSERT_NE(message, std::string::npos) << "no original message after the device: " << what;
  const std::string count = "(" + std::to_string(discarded) + " queued asynchronous closure";
  EXPECT_NE(what.find(count, message + original.size()), std::string::npos)
      << "no discarded count after the original message: " << what;
}

TEST(AsyncFailureMessage, NamesTheDeviceWhoseClosureFailed) {
  scheduler s(testing::quiet_options());
  device_context& alpha = s.device("alpha");
  device_context& gpu = s.device("gpu:7");
  alpha.add_step_closure(run_async, [] { throw std::runtime_error("disk full"); });
  alpha.add_step_closure(run_async, [] {});
  alpha.add_step_closure(run_async, [] {});
  alpha.run_step_closures();
  gpu.add_step_closure(run_async, [] { throw std::runtime_error("metrics upload failed"); });
  gpu.run_step_closures();

  // The scheduler's flush reports the first failed device in name order: alpha's.
  const async_closure_error first = reported_by([&] { s.flush(); });
  expect_message(first, "alpha", "disk full", 2);
  EXPECT_EQ(std::string(first.what()).find("gpu:7"), std::string::npos)
      << "alpha's report names the other device: " << first.what();

  // gpu:7 kept its own, for its next step end.
  const async_closure_error second = reported_by([&] { gpu.run_step_closures(); });
  expect_message(second, "gpu:7", "metrics upload failed", 0);
  EXPECT_EQ(std::string(second.what()).find("alpha"), std::string::npos) << second.what();
}

TEST(AsyncFailureMessage, AJoinedClosuresFailureIsNamedJoined) {
  scheduler s(testing::quiet_options());
  device_context& d = s.device("gpu0");
  s.add_joined_step_closure([] { throw std::runtime_error("mean loss is NaN"); });
  s.add_joined_step_closure([] {});
  d.run_step_closures();
  const async_closure_error e = reported_by([&] { s.flush(); });
  expect_message(e, "joined", "mean loss is NaN", 1);
  EXPECT_EQ(std::string(e.what()).find("gpu0"), std::string::npos) << e.what();
}

TEST(AsyncFailureMessage, AFailureThatIsNoStdExceptionStillNamesTheDevice) {
  scheduler s(testing::quiet_options());
  device_context& d = s.device("tpu-3");
  d.add_step_closure(run_async, [] { throw 42; });
  d.run_step_closures();
  const async_closure_error e = reported_by([&] { d.flush(); });
  expect_message(e, "tpu-3", "", 0);  // no message of its own to give
}

}  // namespace
}  // namespace stepflow
