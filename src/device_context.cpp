// device_context is a thin handle: it checks liveness in debug builds and forwards to
// device_state, which owns the device's machinery.

#include "stepflow/device_context.hpp"

#include "device_state.hpp"
#include "liveness.hpp"

namespace stepflow {

std::string_view device_context::name() const noexcept { return state_->name(); }

void device_context::check_alive_for_add() const { detail::check_alive(this, "add_step_closure"); }

void device_context::run_step_closures() {
  detail::check_alive(this, "run_step_closures");
  state_->run_step_closures();
}

void device_context::flush() {
  detail::check_alive(this, "flush");
  state_->flush();
}

bool device_context::flush_until(std::chrono::steady_clock::time_point deadline) {
  detail::check_alive(this, "flush_for");
  return state_->flush_until(deadline);
}

std::uint64_t device_context::step() const noexcept { return state_->step(); }

stepflow::scheduler& device_context::scheduler() const noexcept { return state_->owner(); }

}  // namespace stepflow
