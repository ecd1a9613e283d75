#pragma once
/// \file
/// The adding end of one device's closures of one kind (sync or async). Not part of the public
/// API: it is in a header only so that adding a closure from the thread that usually adds them
/// is inline and builds the callable in its final place.

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "stepflow/closure.hpp"
#include "stepflow/detail/thread_id.hpp"

namespace stepflow::detail {

/// Bytes of records in one chunk of a lane (an 8 KiB allocation with its header).
inline constexpr std::size_t chunk_record_bytes = 8192 - 64;

/// Why a lane: an atomic read-modify-write costs about 8 ns on this project's machines, as much
/// as the rest of adding a closure. Nearly always one thread adds a device's closures and ends
/// its steps, so the first thread that adds becomes the lane's *owner*: it constructs each
/// closure as a record (its `closure_ops` address, then the callable) directly in a chunk of
/// memory and publishes it with one release store. The step end hands those records to the
/// closures' runner where they are, without copying them. Other threads go through
/// `push` (src/pending_closures.cpp), which takes a lock. The rest of the lane is
/// `pending_closures` in src/.
class closure_lane_tail {
 public:
  /// Builds `Stored(args...)` at the end of the lane. Thread-safe; lock-free and RMW-free for
  /// the owner while its chunk has room. The callable's constructor must not add closures to
  /// the same lane.
  template <class Stored, class... Args>
  void emplace(Args&&... args) {
    constexpr std::size_t size = record_size_of<Stored>;
    static_assert(size <= chunk_record_bytes);
    // The published word is also the owner's record of where it is: adding a record is one
    // load and one store of it besides the record's own stores.
    const std::uint64_t word = published_.load(std::memory_order_relaxed);
    const std::size_t offset = offset_of(word);
    if (owner_.load(std::memory_order_relaxed) == this_thread_id() &&
        offset <= chunk_record_bytes - size) [[likely]] {
      unsigned char* const at = chunk_records_ + offset;
      const closure_ops* ops =
          construct_callable<Stored>(at + sizeof ops, std::forward<Args>(args)...);
      std::memcpy(at, &ops, sizeof ops);
      published_.store(word + count_one + size, std::memory_order_release);
    } else {
      push(closure(std::in_place_type<Stored>, std::forward<Args>(args)...));
    }
  }

  /// Appends `c`'s callable; `c` becomes empty. Thread-safe.
  void push(closure&& c);

 protected:
  closure_lane_tail() = default;
  ~closure_lane_tail() = default;
  closure_lane_tail(const closure_lane_tail&) = delete;
  closure_lane_tail& operator=(const closure_lane_tail&) = delete;

  // The published word: [records added, mod 2^30 | chunk sequence number, mod 2^20 | byte
  // offset of the end in that chunk]. One store publishes where the records end and how many
  // there are, so a step end knows both without walking the records. Adding a record adds
  // `count_one + size`: the count wraps off the top, the offset never reaches bit 14 (chunks
  // are smaller than 16 KiB), and the sequence number changes only when a new chunk starts.
  static constexpr unsigned offset_bits = 14;
  static constexpr unsigned sequence_bits = 20;
  static constexpr unsigned count_shift = offset_bits + sequence_bits;
  static constexpr std::uint64_t count_one = std::uint64_t{1} << count_shift;
  static constexpr std::uint64_t offset_mask = (std::uint64_t{1} << offset_bits) - 1;
  static constexpr std::uint64_t sequence_mask = (std::uint64_t{1} << sequence_bits) - 1;
  static constexpr std::uint32_t count_mask = (std::uint32_t{1} << (64 - count_shift)) - 1;
  static_assert(chunk_record_bytes < (std::size_t{1} << offset_bits), "offsets must fit");

  static constexpr std::uint32_t offset_of(std::uint64_t word) noexcept {
    return static_cast<std::uint32_t>(word & offset_mask);
  }
  static constexpr std::uint32_t sequence_of(std::uint64_t word) noexcept {
    return static_cast<std::uint32_t>((word >> offset_bits) & sequence_mask);
  }
  static constexpr std::uint32_t count_of(std::uint64_t word) noexcept {
    return static_cast<std::uint32_t>(word >> count_shift);
  }

  std::atomic<std::uint64_t> owner_{0};  // this_thread_id() of the owner, 0 until claimed
  // Written by the owner only. Aligned so the step end's fields do not share its line.
  alignas(64) unsigned char* chunk_records_ = nullptr;  // the records of the chunk being filled
  std::atomic<std::uint64_t> published_{0};
};

}  // namespace stepflow::detail
