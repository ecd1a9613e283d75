#pragma once
// Raising an atomic to a value, never lowering it: for counters that several threads may
// report out of order (a queue's finished step, a lockstep gate, a participant's done step).

#include <atomic>
#include <cstdint>

namespace stepflow::detail {

/// Sets `a` to `value` unless it already holds as much. Sequentially consistent, like a plain
/// store to `a` would be.
inline void raise_to(std::atomic<std::uint64_t>& a, std::uint64_t value) noexcept {
  std::uint64_t seen = a.load();
  while (seen < value && !a.compare_exchange_weak(seen, value)) {
  }
}

}  // namespace stepflow::detail
