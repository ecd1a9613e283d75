#pragma once
// The closures of one kind (sync or async) added to one device and not yet taken by a step end.
//
// The owner thread builds records in place in a chain of chunks (closure_lane_tail, in
// include/stepflow/detail/closure_lane.hpp). Any other thread appends to a mutex-protected list,
// tagging each closure with the owner's published word at the time; the step end merges the two
// by that tag, so closures whose adds are ordered by happens-before (on any threads) run in that
// order. The step end does not copy the owner's records: its batch points at them in their
// chunks (closure_batch.hpp), and a chunk is recycled once every record in it was run or
// discarded.

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

#include "closure_batch.hpp"
#include "stepflow/detail/closure_lane.hpp"

namespace stepflow::detail {

class pending_closures : public closure_lane_tail {
 public:
  pending_closures();
  ~pending_closures();

  /// Whether closures were added since the last `take` (a hint: adds may race with it).
  bool has_untaken() const noexcept {
    const std::uint64_t word = published_.load(std::memory_order_acquire);
    return ((word >> count_shift) - owner_taken_.load(std::memory_order_relaxed)) %
                   (std::uint64_t{1} << (64 - count_shift)) !=
               0 ||
           shared_count_.load(std::memory_order_acquire) != shared_taken_;
  }

  /// Whether closures added by other threads than the owner wait to be taken: only those need
  /// a batch with buffers (the owner's records always make one inline segment).
  bool has_shared_untaken() const noexcept {
    return shared_count_.load(std::memory_order_acquire) != shared_taken_;
  }

  /// A take in two halves, so that a step end can make room for both of its lanes' closures
  /// before it takes any: running out of memory then leaves every closure pending.
  struct take_plan {
    std::unique_lock<std::mutex> shared;  // held: other threads' closures are to be taken
    std::uint64_t owner_end = 0;          // the owner's word read before the shared count
    bool nothing = false;                 // the caller saw nothing to take: `take` does nothing
  };
  /// First half: when other threads' closures wait, locks them in and makes room for them in
  /// `out`. Throws (`std::bad_alloc`) having taken nothing.
  take_plan prepare_take(closure_batch& out);
  /// Second half: appends every closure added before `prepare_take` to `out`, in order (the
  /// owner's added since may come too). Never throws.
  void take(closure_batch& out, take_plan& plan) noexcept;
  /// Both halves. One caller at a time (the device's take lock); concurrent adds are fine.
  void take(closure_batch& out) {
    take_plan plan = prepare_take(out);
    take(out, plan);
  }

  /// Closures ever added. Exact once adds have stopped; a lower bound while they go on.
  std::uint64_t pushed() const noexcept;

  /// Called by a batch for `records` records of `chunk` that it ran or discarded.
  void records_done(lane_chunk* chunk, std::uint32_t records) noexcept;

 private:
  friend class closure_lane_tail;
  struct tagged {
    closure c;
    std::uint64_t owner_word;  // the owner's published word when this one was added
  };

  void push_any(closure&& c);
  void push_owned(closure&& c);
  /// Seals the chunk being filled, whose records end at `word`, and moves to a new one.
  /// Returns the word the new chunk's first record is added to.
  std::uint64_t start_chunk(std::uint64_t word);
  void take_owned_upto(std::uint64_t word, closure_batch& out) noexcept;
  lane_chunk* new_chunk();
  void recycle(lane_chunk* c) noexcept;

  lane_chunk* tail_chunk_;             // owner-only
  std::uint64_t tail_chunk_word_ = 0;  // owner-only: the word `tail_chunk_` started at

  // Step-end side, touched only under the device's take lock (`owner_taken_` is also read by
  // `pushed`).
  alignas(64) lane_chunk* head_;
  std::uint32_t head_offset_ = 0;
  std::uint32_t head_sequence_ = 0;
  std::uint32_t head_taken_ = 0;  // records of `head_` taken so far
  std::atomic<std::uint64_t> owner_taken_{0};
  std::vector<tagged> shared_spare_;
  std::uint64_t shared_taken_ = 0;

  // Other threads' closures.
  alignas(64) mutable std::mutex shared_mutex_;
  std::vector<tagged> shared_;                  // guarded by shared_mutex_
  std::atomic<std::uint64_t> shared_count_{0};  // written under shared_mutex_

  // Chunks whose records all ran, for the owner to reuse. A lane keeps every chunk it
  // allocated until it is destroyed, as a vector keeps its capacity: at most twice the most it
  // had in use at once (that many plus 64 past 64).
  std::mutex spare_mutex_;
  std::vector<lane_chunk*> spare_chunks_;  // guarded by spare_mutex_; capacity >= chunks_
  std::size_t chunks_ = 1;                 // guarded by spare_mutex_: every chunk this lane owns
};

}  // namespace stepflow::detail
