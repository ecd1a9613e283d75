#pragma once
/// \file
/// A unique id for the calling thread, cheap enough for the path that adds a closure. Not part
/// of the public API.

#include <cstdint>

namespace stepflow::detail {

/// Hands out the next id; ids start at 1 and are never reused.
std::uint64_t next_thread_id() noexcept;

// Constant-initialised, so reading it is one thread-local load with no initialisation guard.
inline thread_local std::uint64_t current_thread_id = 0;

/// A unique, never reused id for the calling thread (0 is never an id). Unlike `std::thread::id`
/// or a thread-local's address, an id is never given to a later thread, so an ownership claim
/// made by a thread that has exited cannot be mistaken for a new thread's.
inline std::uint64_t this_thread_id() noexcept {
  std::uint64_t id = current_thread_id;
  if (id == 0) [[unlikely]] {
    id = next_thread_id();
    current_thread_id = id;
  }
  return id;
}

}  // namespace stepflow::detail
