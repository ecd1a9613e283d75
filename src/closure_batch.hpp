#pragma once
// A batch of closures (one step's, of one kind) and a pool that recycles their buffers, so that
// steady-state steps allocate nothing.

#include <cstddef>
#include <mutex>
#include <utility>
#include <vector>

#include "stepflow/closure.hpp"

namespace stepflow::detail {

using closure_batch = std::vector<closure>;

/// Destroys every closure of `batch` from `first` on without running it; returns how many.
inline std::size_t discard(closure_batch& batch, std::size_t first = 0) noexcept {
  const std::size_t n = batch.size() > first ? batch.size() - first : 0;
  for (std::size_t i = first; i < batch.size(); ++i) batch[i].reset();
  return n;
}

/// Empty batches with capacity. Thread-safe; a lock per batch, never per closure.
class batch_pool {
 public:
  batch_pool() { spare_.reserve(max_spare); }

  closure_batch acquire() {
    std::lock_guard lock(mutex_);
    if (spare_.empty()) return {};
    closure_batch b = std::move(spare_.back());
    spare_.pop_back();
    return b;
  }

  /// Destroys what is left in `b`, then keeps its buffer unless the pool is full.
  void release(closure_batch&& b) noexcept {
    b.clear();
    if (b.capacity() == 0) return;
    std::lock_guard lock(mutex_);
    if (spare_.size() < max_spare) spare_.push_back(std::move(b));
  }

 private:
  // Enough for a step's sync and async batches plus the pieces of a step larger than the queue
  // bound in flight (B7: 8 were too few at 1,000 closures per step with a bound of 100); more
  // would only pin memory after a burst.
  static constexpr std::size_t max_spare = 32;
  std::mutex mutex_;
  std::vector<closure_batch> spare_;
};

}  // namespace stepflow::detail
