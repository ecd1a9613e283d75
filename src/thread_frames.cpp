#include "thread_frames.hpp"

#include <atomic>

namespace stepflow::detail {
namespace {
thread_local async_frame* innermost_async = nullptr;
thread_local sync_frame* innermost_sync = nullptr;
std::atomic<std::uint64_t> next_thread_id{1};
}  // namespace

std::uint64_t this_thread_id() noexcept {
  // Ids are never reused, unlike std::thread::id, so an ownership claim made by a thread that
  // has exited can never be mistaken for a new thread's.
  thread_local const std::uint64_t id = next_thread_id.fetch_add(1, std::memory_order_relaxed);
  return id;
}

async_frame::async_frame() noexcept : previous_(innermost_async) { innermost_async = this; }
async_frame::~async_frame() { innermost_async = previous_; }
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

}  // namespace stepflow::detail
