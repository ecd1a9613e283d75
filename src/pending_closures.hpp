#pragma once
// The closures of one kind (sync or async) added to one device and not yet taken by a step end.
//
// Why two lanes: an atomic read-modify-write costs about 8 ns on this project's machines, as much
// as all the rest of adding a closure. Nearly always one thread adds a device's closures and ends
// its steps, so the first thread that adds becomes the lane's *owner* and appends to a
// single-producer chunked queue with plain stores and one release store. Any other thread
// appends to a mutex-protected list, tagging each closure with how many owner closures preceded
// it; the step end merges the two by that tag, so closures whose adds are ordered by
// happens-before (on any threads) run in that order.

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

#include "closure_batch.hpp"

namespace stepflow::detail {

class pending_closures {
 public:
  pending_closures();
  ~pending_closures();
  pending_closures(const pending_closures&) = delete;
  pending_closures& operator=(const pending_closures&) = delete;

  /// Appends `c`. Thread-safe; lock-free and RMW-free for the owner thread.
  void push(closure&& c);

  /// Moves every closure added before the call into `out`, in order. One caller at a time
  /// (the device's take lock); concurrent pushes are fine.
  void take(closure_batch& out);

  /// Closures ever pushed. Exact once pushes have stopped; a lower bound while they go on.
  std::uint64_t pushed() const noexcept;

 private:
  struct chunk;
  struct tagged {
    closure c;
    std::uint64_t owner_position;  // owner closures pushed before this one
  };

  void push_owned(closure&& c);
  void push_shared(closure&& c);
  void take_owned_upto(std::uint64_t end, closure_batch& out);
  chunk* new_chunk();
  void recycle(chunk* c) noexcept;

  std::atomic<std::uint64_t> owner_{0};  // this_thread_id() of the owner, 0 until claimed

  // Owner (producer) side. Aligned so the consumer's fields do not share its cache line.
  alignas(64) chunk* tail_;
  std::size_t tail_index_ = 0;
  std::uint64_t owner_pushed_ = 0;
  std::atomic<std::uint64_t> owner_published_{0};  // release: slots below it are written

  // Consumer side, touched only under the device's take lock.
  alignas(64) chunk* head_;
  std::size_t head_index_ = 0;
  std::uint64_t owner_taken_ = 0;
  std::vector<tagged> shared_spare_;

  // Other threads' closures.
  alignas(64) mutable std::mutex shared_mutex_;
  std::vector<tagged> shared_;       // guarded by shared_mutex_
  std::uint64_t shared_pushed_ = 0;  // guarded by shared_mutex_

  // Chunks the consumer finished, for the owner to reuse.
  std::mutex spare_mutex_;
  std::vector<chunk*> spare_chunks_;  // guarded by spare_mutex_
};

}  // namespace stepflow::detail
