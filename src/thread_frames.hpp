#pragma once
// What the calling thread is in the middle of, so that re-entrant calls can be told apart from
// ordinary ones without locks: a step end inside an asynchronous closure must not block, a flush
// there must be refused, and a step end inside its own device's synchronous closures is an error.
//
// Frames live on the C++ stack and link to the previous frame of their kind, so nesting across
// devices (a closure of A ending B's step) is handled.

#include <cstdint>

#include "stepflow/detail/thread_id.hpp"

namespace stepflow::detail {

class device_state;
class sync_frame;

/// While alive, the calling thread runs asynchronous closures (of any device).
class async_frame {
 public:
  async_frame() noexcept;
  ~async_frame();
  async_frame(const async_frame&) = delete;
  async_frame& operator=(const async_frame&) = delete;

  /// True when the calling thread is inside an asynchronous closure of any device.
  static bool active() noexcept;

 private:
  async_frame* previous_;
  sync_frame* hidden_sync_;
};

/// While alive, the calling thread runs synchronous closures of `device`.
class sync_frame {
 public:
  explicit sync_frame(const device_state* device) noexcept;
  ~sync_frame();
  sync_frame(const sync_frame&) = delete;
  sync_frame& operator=(const sync_frame&) = delete;

  /// True when the calling thread is inside a synchronous closure of `device`, at any depth.
  static bool inside(const device_state* device) noexcept;

 private:
  const device_state* device_;
  sync_frame* previous_;
};

/// While alive, the calling thread runs the joined closures of global step `step`.
class joined_step_frame {
 public:
  explicit joined_step_frame(std::uint64_t step) noexcept;
  ~joined_step_frame();
  joined_step_frame(const joined_step_frame&) = delete;
  joined_step_frame& operator=(const joined_step_frame&) = delete;

 private:
  std::uint64_t previous_;
};

}  // namespace stepflow::detail
