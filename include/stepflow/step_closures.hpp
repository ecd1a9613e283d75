#pragma once
/// \file
/// The torch._lazy-style free functions, on a process-wide default scheduler.

#include <string_view>
#include <utility>

#include "stepflow/scheduler.hpp"

namespace stepflow {

/// The process-wide scheduler, created on first use with `options::from_env()` (so it may throw
/// `config_error`). Destroyed at static destruction, which runs its shutdown report; calling this
/// (or a free function below) from then on throws `stepflow::error`, including from an
/// asynchronous closure that the destruction still runs. Thread-safe.
scheduler& default_scheduler();

/// The default scheduler's device `device`, or its default device for `{}`.
device_context& get_device_context(std::string_view device = {});

/// `add_step_closure` on the default device.
template <class F, class... Args>
requires(!std::is_same_v<std::decay_t<F>, run_async_t>) void add_step_closure(F&& f,
                                                                              Args&&... args) {
  get_device_context().add_step_closure(std::forward<F>(f), std::forward<Args>(args)...);
}

/// Asynchronous `add_step_closure` on the default device.
template <class F, class... Args>
void add_step_closure(run_async_t tag, F&& f, Args&&... args) {
  get_device_context().add_step_closure(tag, std::forward<F>(f), std::forward<Args>(args)...);
}

/// Ends the step of `device` (the default device for `{}`) and returns its context.
device_context& run_step_closures(std::string_view device = {});

}  // namespace stepflow
