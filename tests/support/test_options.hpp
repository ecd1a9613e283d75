#pragma once
// Helpers shared by the test files: environment-independent options and an observable closure.

#include <stepflow/options.hpp>

#include <atomic>
#include <cstddef>
#include <latch>
#include <utility>

namespace stepflow::testing {

/// Options independent of the environment (LTC_MAX_ASYNC_QUEUE, STEPFLOW_SYNC, STEPFLOW_TRACE),
/// quiet at shutdown unless a test asks otherwise.
inline options quiet_options(std::size_t max_queue_size = 100) {
  options opts;
  opts.max_queue_size = max_queue_size;
  opts.report_to_stderr = false;
  return opts;
}

/// An asynchronous closure whose fate a test can observe: `gone` counts down when the closure is
/// destroyed, after it ran or when it was discarded; `runs` says which.
class probe {
 public:
  probe(std::atomic<int>& runs, std::latch& gone) : runs_(&runs), gone_(&gone) {}
  probe(probe&& other) noexcept : runs_(other.runs_), gone_(std::exchange(other.gone_, nullptr)) {}
  probe(const probe&) = delete;
  probe& operator=(const probe&) = delete;
  probe& operator=(probe&&) = delete;
  ~probe() {
    if (gone_ != nullptr) gone_->count_down();
  }
  void operator()() { runs_->fetch_add(1); }

 private:
  std::atomic<int>* runs_;
  std::latch* gone_;
};

}  // namespace stepflow::testing
