// Linked into every unit-test binary (stepflow_add_test): each test runs under a watchdog, so a
// hang anywhere aborts naming the test well before CTest's per-test timeout kills it without a
// word, and no test depends on remembering to arm one. Tests that guard one operation against a
// hang still arm their own, shorter watchdog, which also says which operation hung.
//
// The bound is generous, never a timing claim: STEPFLOW_TEST_HANG_SECONDS, 90 by default (CTest
// gives each test 120 s or more).

#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <optional>

#include "watchdog.hpp"

namespace {

std::chrono::seconds hang_bound() {
  if (const char* v = std::getenv("STEPFLOW_TEST_HANG_SECONDS")) {
    char* end = nullptr;
    const long seconds = std::strtol(v, &end, 10);
    if (end != v && *end == '\0' && seconds > 0) return std::chrono::seconds(seconds);
  }
  return std::chrono::seconds(90);
}

class watchdog_listener : public ::testing::EmptyTestEventListener {
 public:
  void OnTestStart(const ::testing::TestInfo&) override {
    dog_.emplace(hang_bound(), "the test (the watchdog every test runs under)");
  }
  void OnTestEnd(const ::testing::TestInfo&) override { dog_.reset(); }

 private:
  std::optional<stepflow::testing::watchdog> dog_;
};

// gtest owns the listener once appended; UnitTest::GetInstance() is safe during static
// initialisation (a function-local static).
const bool registered = [] {
  ::testing::UnitTest::GetInstance()->listeners().Append(new watchdog_listener);
  return true;
}();

}  // namespace
