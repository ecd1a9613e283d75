#include "stepflow/step_closures.hpp"

#include <atomic>

#include "stepflow/errors.hpp"

namespace stepflow {
namespace {

// Trivially destructible, so it can still be read after the scheduler below is destroyed at exit.
std::atomic<bool> default_scheduler_destroyed{false};

struct default_scheduler_holder {
  scheduler instance{options::from_env()};
  ~default_scheduler_holder() { default_scheduler_destroyed.store(true); }
};

}  // namespace

scheduler& default_scheduler() {
  if (default_scheduler_destroyed.load()) {
    throw error(
        "stepflow::default_scheduler() was used after it was destroyed at program exit "
        "(from a static destructor or an exit handler)");
  }
  // If options::from_env() throws, initialisation is retried on the next call.
  static default_scheduler_holder holder;
  return holder.instance;
}

device_context& get_device_context(std::string_view device) {
  scheduler& s = default_scheduler();
  return device.empty() ? s.default_device() : s.device(device);
}

device_context& run_step_closures(std::string_view device) {
  device_context& d = get_device_context(device);
  d.run_step_closures();
  return d;
}

}  // namespace stepflow
