#include "stepflow/scheduler.hpp"

#include <algorithm>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <oneapi/tbb/info.h>
#include <oneapi/tbb/task_arena.h>

#include "device_state.hpp"
#include "error_reporting.hpp"
#include "stepflow/errors.hpp"
#include "thread_frames.hpp"

namespace stepflow {
namespace detail {

class scheduler_state {
 public:
  scheduler_state(stepflow::scheduler& owner, const options& opts)
      : owner_(owner),
        options_(opts),
        // Only stepflow's drainer tasks run here, so no slot is reserved for an application
        // thread; sized to the worker pool (cores - 1), since asking for more workers than exist
        // makes oneTBB print a warning.
        arena_(std::max(1, tbb::info::default_concurrency() - 1), 0,
               opts.low_priority ? tbb::task_arena::priority::low
                                 : tbb::task_arena::priority::normal) {
    default_device_ = &device(options_.default_device);
  }

  device_state& device(std::string_view name) {
    std::lock_guard lock(mutex_);
    auto it = devices_.find(name);
    if (it == devices_.end()) {
      it = devices_
               .emplace(std::string(name),
                        std::make_unique<device_state>(owner_, std::string(name), options_, arena_))
               .first;
    }
    return *it->second;
  }

  device_state& default_device() noexcept { return *default_device_; }
  const options& opts() const noexcept { return options_; }

  std::vector<device_state*> snapshot() {
    std::lock_guard lock(mutex_);
    std::vector<device_state*> all;
    all.reserve(devices_.size());
    for (auto& [name, device] : devices_) all.push_back(device.get());
    return all;
  }

  void flush() {
    if (async_frame::active()) {
      throw error(
          "scheduler::flush() was called from inside an asynchronous closure: it could wait for "
          "itself. Flush from outside the closure");
    }
    const std::vector<device_state*> all = snapshot();
    for (device_state* d : all) d->wait_for_async();
    // Only the first failure is thrown; the others stay recorded for their devices' next call.
    for (device_state* d : all) d->report_async_failure();
  }

  shutdown_report shutdown() noexcept {
    // An asynchronous closure may end another device's step and so queue more work there:
    // repeat until a whole pass finds every device idle and nothing new handed over.
    for (;;) {
      const std::vector<device_state*> all = snapshot();
      const std::uint64_t before = total_handed_over(all);
      for (device_state* d : all) d->drain_for_shutdown();
      if (total_handed_over(snapshot()) == before && snapshot().size() == all.size()) break;
    }
    shutdown_report report;
    for (device_state* d : snapshot()) {
      device_shutdown_report r = d->finish_shutdown();
      if (r.unreported_error || r.never_run != 0) report.devices.push_back(std::move(r));
    }
    return report;
  }

 private:
  static std::uint64_t total_handed_over(const std::vector<device_state*>& all) noexcept {
    std::uint64_t total = 0;
    for (device_state* d : all) total += d->async_counts().handed_over;
    return total;
  }

  stepflow::scheduler& owner_;
  const options options_;
  tbb::task_arena arena_;
  std::mutex mutex_;
  // std::map: device addresses (and references handed out) must stay stable.
  std::map<std::string, std::unique_ptr<device_state>, std::less<>> devices_;  // guarded
  device_state* default_device_ = nullptr;
};

}  // namespace detail

scheduler::scheduler(const stepflow::options& opts)
    : state_(std::make_unique<detail::scheduler_state>(*this, opts)) {}

scheduler::~scheduler() {
  const shutdown_report report = state_->shutdown();
  if (!report.empty()) {
    if (state_->opts().report_to_stderr) {
      try {
        fmt::print(stderr, "{}", detail::format_shutdown_report(report));
      } catch (...) {
        // A destructor must not throw; stderr failing leaves the callback as the only channel.
      }
    }
    if (state_->opts().on_shutdown_report) {
      try {
        state_->opts().on_shutdown_report(report);
      } catch (...) {
        // Documented: an exception from the callback is swallowed.
      }
    }
  }
}

device_context& scheduler::device(std::string_view name) { return state_->device(name).context(); }

device_context& scheduler::default_device() { return state_->default_device().context(); }

void scheduler::flush() { state_->flush(); }

const stepflow::options& scheduler::options() const noexcept { return state_->opts(); }

}  // namespace stepflow
