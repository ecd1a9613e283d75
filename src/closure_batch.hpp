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
#include <new>
#include <utility>
#include <vector>

#include "stepflow/closure.hpp"
#include "stepflow/detail/closure_lane.hpp"

namespace stepflow::detail {

class pending_closures;

/// A piece of a lane: records laid end to end, each a `closure_ops*` then the callable's storage
/// (`closure_ops::record_size` bytes in all). A null table address marks the end of the records
/// in a chunk the owner has left; so does too little room for one.
struct lane_chunk {
  static constexpr std::size_t record_bytes = chunk_record_bytes;

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

  /// Makes room for `closures` more `add`s and `segments` more segments (from `add` or
  /// `add_records`), so that those cannot throw. Changes nothing if it throws.
  void reserve(std::size_t closures, std::size_t segments) {
    if (closures != 0) held_.reserve(held_.size() + closures);
    const std::size_t in_use = inline_count_ + more_.size();
    if (in_use + segments > inline_segments) {
      more_.reserve(in_use + segments - inline_segments);
    }
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

  /// Calls `run(closure_ref) -> bool` for every closure in order, destroying each right after
  /// its call, until `run` returns false (that closure failed). Then calls `after_failure(left)`
  /// with the number of closures after the failed one and destroys those without running them.
  /// Returns that number (0 when none failed) and leaves the batch empty, keeping its buffers.
  /// Neither callback may throw.
  template <class Run, class AfterFailure>
  [[gnu::always_inline]] std::size_t consume(Run&& run, AfterFailure&& after_failure) noexcept;

  /// Destroys every closure without running it; returns how many there were.
  std::size_t discard() noexcept {
    const std::size_t n = size_;
    if (n != 0) consume(destroy_only, no_failure);
    return n;
  }

 private:
  struct segment {
    pending_closures* lane;  // null: `count` closures of `held_` from index `offset`
    lane_chunk* chunk;
    std::uint32_t offset;
    std::uint32_t count;
  };

  // Callbacks of a walk that only destroys closures.
  static constexpr auto destroy_only = [](closure_ref) noexcept { return true; };
  static constexpr auto no_failure = [](std::size_t) noexcept {};

  // Where a walk through one segment's records stands: lets the walk stop at a failed closure
  // and go on discarding from the same place.
  struct record_cursor {
    pending_closures* lane;
    lane_chunk* chunk;
    unsigned char* at;                // the next record
    std::uint32_t left;               // records of the segment not yet visited
    std::uint32_t left_when_entered;  // `left` when the walk entered `chunk`
  };

  // Always inlined, so that each callback is inlined into the loop that walks the records. (Not
  // that its state then stays in registers: the closures are opaque calls, and the sampling
  // countdown that observed_batch keeps is still decremented in memory per closure, as the
  // disassembly shows; docs/benchmarks.md, B1, measures what that costs.) A failure ends the
  // running walk, and a second walk discards the rest, so the loop that runs closures carries no
  // "failed" flag; the records done in a chunk are derived from the count left, not counted.
  template <class Visit>
  [[gnu::always_inline]] static bool walk_records(record_cursor& c, Visit& visit) noexcept;
  template <class Visit>
  [[gnu::always_inline]] bool walk_held(std::uint32_t& index, std::uint32_t end,
                                        Visit& visit) noexcept;
  template <class Run, class AfterFailure>
  [[gnu::always_inline]] bool consume_segment(const segment& s, std::size_t later, Run& run,
                                              AfterFailure& after_failure) noexcept;

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

/// `v`, through an empty volatile asm: the compiler can neither see that the result is `v` nor
/// execute it speculatively, so `if (x != y) y = opaque(x);` stays a branch instead of becoming
/// `y = x` or a conditional move (both of which make `y` wait for `x`).
[[gnu::always_inline]] inline std::size_t opaque(std::size_t v) noexcept {
  asm volatile("" : "+r"(v));
  return v;
}

/// Tells `lane` that `records` records of `chunk` are done (pending_closures.cpp).
void records_done(pending_closures* lane, lane_chunk* chunk, std::uint32_t records) noexcept;

template <class Run, class AfterFailure>
inline std::size_t closure_batch::consume(Run&& run, AfterFailure&& after_failure) noexcept {
  std::size_t later = size_;  // closures in the segments after the current one
  std::size_t unrun = 0;
  bool failed = false;
  auto note_failure = [&](std::size_t left) noexcept {
    unrun = left;
    after_failure(left);
  };
  auto each = [&](const segment& s) {
    later -= s.count;
    if (!failed) {
      failed = !consume_segment(s, later, run, note_failure);
    } else {
      consume_segment(s, later, destroy_only, no_failure);
    }
  };
  for (std::uint32_t i = 0; i < inline_count_; ++i) each(inline_[i]);
  for (const segment& s : more_) each(s);
  inline_count_ = 0;
  more_.clear();
  held_.clear();
  size_ = 0;
  return unrun;
}

template <class Run, class AfterFailure>
inline bool closure_batch::consume_segment(const segment& s, std::size_t later, Run& run,
                                           AfterFailure& after_failure) noexcept {
  if (s.lane == nullptr) {
    std::uint32_t index = s.offset;
    const std::uint32_t end = s.offset + s.count;
    if (walk_held(index, end, run)) return true;
    after_failure(end - index + later);
    walk_held(index, end, destroy_only);
    return false;
  }
  record_cursor c{s.lane, s.chunk, s.chunk->records + s.offset, s.count, s.count};
  const bool ok = walk_records(c, run);
  if (!ok) {
    after_failure(c.left + later);
    walk_records(c, destroy_only);
  }
  if (c.left_when_entered != c.left) records_done(c.lane, c.chunk, c.left_when_entered - c.left);
  return ok;
}

template <class Visit>
inline bool closure_batch::walk_held(std::uint32_t& index, std::uint32_t end,
                                     Visit& visit) noexcept {
  while (index != end) {
    closure& c = held_[index++];
    const bool go_on = visit(closure_access::ref(c));
    c.reset();
    if (!go_on) [[unlikely]]
      return false;
  }
  return true;
}

// Visits records until `visit` returns false (after destroying that record) or the segment
// ends; the records done in every chunk left behind are given back to the lane. The caller gives
// back those of the last chunk (`left_when_entered - left` of them) once the walks are over.
template <class Visit>
inline bool closure_batch::walk_records(record_cursor& c, Visit& visit) noexcept {
  constexpr std::size_t prefetch_distance = 4 * 64;
  unsigned char* at = c.at;
  std::uint32_t left = c.left;
  bool go_on = true;
  // The next record's address must not wait for this one's table: `at` -> table -> size is two
  // dependent loads (~10 cycles) per closure, more than the rest of the loop. A step's records
  // are nearly always of one type, so the address advances by the size seen last and a branch,
  // which the CPU predicts instead of waiting for, checks it against the table's.
  std::size_t size = 0;
  while (left != 0) {
    unsigned char* const chunk_end = c.chunk->records + lane_chunk::record_bytes;
    const closure_ops* ops = nullptr;
    if (static_cast<std::size_t>(chunk_end - at) >= sizeof ops) std::memcpy(&ops, at, sizeof ops);
    if (ops == nullptr) [[unlikely]] {
      // The owner went on to the next chunk here. Read `next` before giving records back: the
      // last give-back may recycle the chunk.
      lane_chunk* next = c.chunk->next;
      if (c.left_when_entered != left) records_done(c.lane, c.chunk, c.left_when_entered - left);
      c.chunk = next;
      c.left_when_entered = left;
      at = next->records;
      continue;
    }
    // The records were just written by another core: ask for a few lines ahead now, so that
    // their transfers overlap with running this one instead of each stalling its own closure.
    if (static_cast<std::size_t>(chunk_end - at) > prefetch_distance) {
      __builtin_prefetch(at + prefetch_distance);
    }
    const closure_ref ref{ops, at + sizeof ops};
    go_on = visit(ref);
    ref.destroy();
    if (ops->record_size != size) [[unlikely]]
      size = opaque(ops->record_size);
    at += size;
    --left;
    if (!go_on) [[unlikely]]
      break;
  }
  c.at = at;
  c.left = left;
  return go_on;
}

/// Empty batches with capacity. Thread-safe; a lock per batch, never per closure. It keeps every
/// batch that comes back with buffers, as many as were ever in flight at once (with a bounded
/// queue, at most its capacity plus the step ends running): a fixed number would make a steady
/// state with more batches in flight than that allocate at every step.
class batch_pool {
 public:
  batch_pool() { spare_.reserve(initial_capacity); }

  closure_batch acquire() {
    std::lock_guard lock(mutex_);
    if (spare_.empty()) return {};
    closure_batch b = std::move(spare_.back());
    spare_.pop_back();
    return b;
  }

  /// Destroys what is left in `b`, then keeps it (its buffers are what is worth keeping).
  void release(closure_batch&& b) noexcept {
    b.discard();
    if (!b.has_buffers()) return;
    std::lock_guard lock(mutex_);
    if (spare_.size() == spare_.capacity()) {
      // Doubling the list, so that it stops growing at the most batches ever in flight.
      try {
        spare_.reserve(2 * spare_.capacity());
      } catch (const std::bad_alloc&) {
        return;  // the caller destroys `b`; the pool works without it
      }
    }
    spare_.push_back(std::move(b));
  }

 private:
  static constexpr std::size_t initial_capacity = 32;
  std::mutex mutex_;
  std::vector<closure_batch> spare_;
};

}  // namespace stepflow::detail
