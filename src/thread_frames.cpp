#include "thread_frames.hpp"

#include "stepflow/detail/joined_step.hpp"

#include <atomic>

namespace stepflow::detail {
namespace {
thread_local async_frame* innermost_async = nullptr;
thread_local sync_frame* innermost_sync = nullptr;
thread_local std::uint64_t joined_step = 0;
std::atomic<std::uint64_t> next_thread_id_value{1};
}  // namespace

std::uint64_t next_thread_id() noexcept {
  return next_thread_id_value.fetch_add(1, std::memory_order_relaxed);
}

async_frame::async_frame() noexcept : previous_(innermost_async), hidden_sync_(innermost_sync) {
  innermost_async = this;
  // An asynchronous closure run by a thread that waits inside a sync closure (it drains a full
  // queue itself) is not inside that sync closure: hide those frames while it runs.
  innermost_sync = nullptr;
}
async_frame::~async_frame() {
  innermost_async = previous_;
  innermost_sync = hidden_sync_;
}
bool async_frame::active() noexcept { return innermost_async != nullptr; }

sync_frame::sync_frame(const device_state* device) noexcept
    : device_(device), previous_(innermost_sync) {
  innermost_sync = this;
}
sync_frame::~sync_frame() { innermost_sync = previous_; }
bool sync_frame::inside(const device_state* device) noexcept {
  for (const sync_frame* f = innermost_sync; f != nullptr; f = f->previous_) {
    if (f->device_ == device) return true;
  }
  return false;
}

joined_step_frame::joined_step_frame(std::uint64_t step) noexcept : previous_(joined_step) {
  joined_step = step;
}
joined_step_frame::~joined_step_frame() { joined_step = previous_; }

std::uint64_t current_joined_step() noexcept { return joined_step; }

}  // namespace stepflow::detail
