#pragma once
/// \file
/// The global step whose joined closures the calling thread is running. Not part of the API.

#include <cstdint>

namespace stepflow::detail {

/// The global step of the joined closure running on this thread; 0 outside joined closures.
std::uint64_t current_joined_step() noexcept;

}  // namespace stepflow::detail
