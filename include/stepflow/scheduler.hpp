#pragma once
/// \file
/// `stepflow::scheduler`: owns the devices, their queues and the oneTBB arena they run in.

#include <memory>
#include <string_view>

#include "stepflow/device_context.hpp"
#include "stepflow/options.hpp"

namespace stepflow {

namespace detail {
class scheduler_state;
}

class scheduler {
 public:
  /// Reads nothing but `opts`; `options::from_env()` is the default (and may throw
  /// `config_error`). Starts no thread: asynchronous closures run on oneTBB's worker pool.
  explicit scheduler(const options& opts = options::from_env());

  /// Waits for every queued asynchronous closure (running them itself if no worker does), then
  /// reports what nobody saw: unreported asynchronous failures and closures added but never taken
  /// by a step end (which are destroyed without running). The report goes to stderr and to
  /// `options::on_shutdown_report`. Never throws; leaves no task behind.
  /// Precondition: no other thread is using the scheduler or its devices.
  ~scheduler();

  scheduler(const scheduler&) = delete;
  scheduler& operator=(const scheduler&) = delete;

  /// The device named `name`, created on first use. Thread-safe; the reference is stable until
  /// the scheduler is destroyed.
  device_context& device(std::string_view name);

  /// The device named `options::default_device`.
  device_context& default_device();

  /// Flushes every device (see `device_context::flush`), then reports the first failure found;
  /// other failed devices keep theirs for their own next call. Same restrictions as
  /// `device_context::flush`.
  void flush();

  const stepflow::options& options() const noexcept;

 private:
  std::unique_ptr<detail::scheduler_state> state_;
};

}  // namespace stepflow
