#pragma once
// A batch of closures (one step's, of one kind) and a pool that recycles batches, so that
// steady-state steps allocate nothing.
//
// A batch does not own copies of its closures: it points at the records the owner thread built
// in the lane's chunks (pending_closures.hpp), segment by segment, plus the few closures other
// threads added, which it holds itself. Running a batch calls each record where it lies and then
// destroys it; the lane gets a chunk back once every record in it is done.

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <utility>
#include <vector>

#include "stepflow/closure.hpp"

namespace stepflow::detail {

class pending_closures;

/// A piece of a lane: records laid end to end, each a `closure_ops*` then the callable's storage
/// (`closure_ops::record_size` bytes in all). A null table address marks the end of the records
/// in a chunk the owner has left; so does too little room for one.
struct lane_chunk {
  static constexpr std::size_t record_bytes = 8192 - 64;  // an 8 KiB allocation in all

  lane_chunk* next = nullptr;        // written by the owner before it publishes a record there
  std::uint32_t sealed_records = 0;  // records in this chunk, written with `next`
  // Records run or discarded, plus a bias added by the step end once it has taken the last
  // record (see pending_closures::take_owned_upto): reaching `all_done` recycles the chunk.
  std::atomic<std::uint32_t> done{0};
  static constexpr std::uint32_t all_done = std::uint32_t{1} << 31;
  alignas(64) unsigned char records[record_bytes];
};

/// A step's closures of one kind, in order. Move-only; destroying a batch discards (destroys
/// without running) what it still holds.
class closure_batch {
 public:
  closure_batch() = default;
  closure_batch(closure_batch&& other) noexcept { take(other); }
  closure_batch& operator=(closure_batch&& other) noexcept {
    if (this != &other) {
      discard();
      take(other);
    }
    return *this;
  }
  ~closure_batch() { discard(); }

  std::size_t size() const noexcept { return size_; }
  /// Whether it has buffers worth keeping in a pool.
  bool has_buffers() const noexcept { return more_.capacity() != 0 || held_.capacity() != 0; }
  bool empty() const noexcept { return size_ == 0; }

  /// Appends `count` records of `lane` starting at byte `offset` of `chunk`.
  void add_records(pending_closures* lane, lane_chunk* chunk, std::uint32_t offset,
                   std::uint32_t count) {
    push_segment(segment{lane, chunk, offset, count});
    size_ += count;
  }

  /// Appends `c` (moved from), held by the batch itself.
  void add(closure&& c) {
    held_.push_back(std::move(c));
    segment* last = last_segment();
    if (last != nullptr && last->lane == nullptr) {
      ++last->count;
    } else {
      push_segment(segment{nullptr, nullptr, static_cast<std::uint32_t>(held_.size() - 1), 1});
    }
    ++size_;
  }

  /// Calls `visit(closure_ref)` for every closure in order, destroying each right after its
  /// visit, and leaves the batch empty (keeping its buffers). `visit` must not throw.
  template <class Visit>
  [[gnu::always_inline]] void consume(Visit&& visit) noexcept;

  /// Destroys every closure without running it; returns how many there were.
  std::size_t discard() noexcept {
    const std::size_t n = size_;
    if (n != 0) consume([](closure_ref) noexcept {});
    return n;
  }

 private:
  struct segment {
    pending_closures* lane;  // null: `count` closures of `held_` from index `offset`
    lane_chunk* chunk;
    std::uint32_t offset;
    std::uint32_t count;
  };

  // Always inlined into the caller's loop: then what the visitor keeps per closure (counters,
  // a failure flag) stays in registers across the closures' indirect calls instead of being
  // reloaded through a pointer for every closure (~2 ns per closure in B1).
  template <class Visit>
  [[gnu::always_inline]] static void consume_records(const segment& s, Visit& visit) noexcept;
  template <class Visit>
  [[gnu::always_inline]] void consume_segment(const segment& s, Visit& visit) noexcept;

  // A step's batch is nearly always one or two segments: those live inline, so that a batch
  // costs no allocation even before the pool has warmed up.
  static constexpr std::uint32_t inline_segments = 2;

  void push_segment(const segment& s) {
    if (inline_count_ < inline_segments) {
      inline_[inline_count_++] = s;
    } else {
      more_.push_back(s);
    }
  }
  segment* last_segment() noexcept {
    if (!more_.empty()) return &more_.back();
    return inline_count_ == 0 ? nullptr : &inline_[inline_count_ - 1];
  }
  void take(closure_batch& other) noexcept {
    for (std::uint32_t i = 0; i < other.inline_count_; ++i) inline_[i] = other.inline_[i];
    inline_count_ = std::exchange(other.inline_count_, 0);
    more_ = std::move(other.more_);
    held_ = std::move(other.held_);
    size_ = std::exchange(other.size_, 0);
    other.more_.clear();
    other.held_.clear();
  }

  segment inline_[inline_segments];
  std::uint32_t inline_count_ = 0;
  std::vector<segment> more_;
  std::vector<closure> held_;
  std::size_t size_ = 0;
};

/// Tells `lane` that `records` records of `chunk` are done (pending_closures.cpp).
void records_done(pending_closures* lane, lane_chunk* chunk, std::uint32_t records) noexcept;

template <class Visit>
inline void closure_batch::consume(Visit&& visit) noexcept {
  for (std::uint32_t i = 0; i < inline_count_; ++i) consume_segment(inline_[i], visit);
  for (const segment& s : more_) consume_segment(s, visit);
  inline_count_ = 0;
  more_.clear();
  held_.clear();
  size_ = 0;
}

template <class Visit>
inline void closure_batch::consume_segment(const segment& s, Visit& visit) noexcept {
  if (s.lane != nullptr) {
    consume_records(s, visit);
    return;
  }
  for (std::uint32_t i = s.offset; i < s.offset + s.count; ++i) {
    closure& c = held_[i];
    visit(closure_access::ref(c));
    c.reset();
  }
}

template <class Visit>
inline void closure_batch::consume_records(const segment& s, Visit& visit) noexcept {
  constexpr std::size_t prefetch_distance = 4 * 64;
  lane_chunk* chunk = s.chunk;
  std::size_t offset = s.offset;
  std::uint32_t in_chunk = 0;
  for (std::uint32_t left = s.count; left != 0;) {
    const closure_ops* ops = nullptr;
    if (offset + sizeof ops <= lane_chunk::record_bytes) {
      std::memcpy(&ops, chunk->records + offset, sizeof ops);
    }
    if (ops == nullptr) {
      // The owner went on to the next chunk here. Read `next` before giving records back: the
      // last give-back may recycle the chunk.
      lane_chunk* next = chunk->next;
      if (in_chunk != 0) records_done(s.lane, chunk, in_chunk);
      chunk = next;
      offset = 0;
      in_chunk = 0;
      continue;
    }
    // The records were just written by another core: ask for a few lines ahead now, so that their
    // transfers overlap with running this one instead of each stalling its own closure.
    if (offset + prefetch_distance < lane_chunk::record_bytes) {
      __builtin_prefetch(chunk->records + offset + prefetch_distance);
    }
    const closure_ref ref{ops, chunk->records + offset + sizeof ops};
    visit(ref);
    ref.destroy();
    offset += ops->record_size;
    ++in_chunk;
    --left;
  }
  if (in_chunk != 0) records_done(s.lane, chunk, in_chunk);
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

  /// Destroys what is left in `b`, then keeps it unless the pool is full.
  void release(closure_batch&& b) noexcept {
    b.discard();
    if (!b.has_buffers()) return;
    std::lock_guard lock(mutex_);
    if (spare_.size() < max_spare) spare_.push_back(std::move(b));
  }

 private:
  // Enough for the batches of every step in flight; more would only pin memory after a burst.
  static constexpr std::size_t max_spare = 32;
  std::mutex mutex_;
  std::vector<closure_batch> spare_;
};

}  // namespace stepflow::detail
