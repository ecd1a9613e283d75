#pragma once
// A RAII hang bound for tests that could deadlock.
//
// Why: a test of "never deadlocks" that does deadlock would otherwise hang until CTest's timeout
// kills it, without saying what hung. The watchdog turns that into a prompt abort that names the
// test and the operation that did not finish. It is a generous bound, never a timing claim: a
// test that passes is far below it, even under ThreadSanitizer.
//
//   stepflow::testing::watchdog dog(std::chrono::seconds(30), "run_step_closures with a full
//   queue");
//   ... code that could hang ...
//   // leaving the scope disarms it

#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <utility>

namespace stepflow::testing {

/// The hang bound the stepflow tests use unless a test needs another one.
inline constexpr std::chrono::seconds default_hang_bound{30};

/// If not destroyed within `limit`, prints the current test's name and `what` to stderr and
/// calls `std::abort()`. Construct it on the test's thread; its own thread only waits.
class watchdog {
 public:
  explicit watchdog(std::chrono::steady_clock::duration limit = default_hang_bound,
                    std::string what = "the test body")
      : test_name_(current_test_name()), what_(std::move(what)) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    const auto seconds = std::chrono::duration_cast<std::chrono::seconds>(limit).count();
    thread_ = std::thread([this, deadline, seconds] {
      std::unique_lock lock(mutex_);
      if (!disarmed_cv_.wait_until(lock, deadline, [this] { return disarmed_; })) {
        std::fprintf(stderr,
                     "\n[watchdog] %s: %s did not finish within %lld s (a hang or deadlock); "
                     "aborting\n",
                     test_name_.c_str(), what_.c_str(), static_cast<long long>(seconds));
        std::fflush(stderr);
        std::abort();
      }
    });
  }

  explicit watchdog(std::string what) : watchdog(default_hang_bound, std::move(what)) {}

  watchdog(const watchdog&) = delete;
  watchdog& operator=(const watchdog&) = delete;

  ~watchdog() {
    {
      std::lock_guard lock(mutex_);
      disarmed_ = true;
    }
    disarmed_cv_.notify_one();
    thread_.join();
  }

 private:
  static std::string current_test_name() {
    const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
    if (info == nullptr) return "(outside any test)";
    return std::string(info->test_suite_name()) + "." + info->name();
  }

  const std::string test_name_;
  const std::string what_;
  std::mutex mutex_;
  std::condition_variable disarmed_cv_;
  bool disarmed_ = false;  // guarded by mutex_
  std::thread thread_;     // last: started after every other member is constructed
};

}  // namespace stepflow::testing
