#include "pending_closures.hpp"

#include <algorithm>
#include <array>
#include <new>

namespace stepflow::detail {

namespace {
// The most chunks (8 KiB each) a lane adds beyond the one it needs when it grows.
constexpr std::size_t max_headroom_chunks = 64;
}  // namespace

void closure_lane_tail::push(closure&& c) {
  static_cast<pending_closures*>(this)->push_any(std::move(c));
}

pending_closures::pending_closures() : tail_chunk_(new lane_chunk), head_(tail_chunk_) {
  static_assert(count_shift == 34);
  // The owner is not yet known: the first add takes the slow path, which claims the lane.
  chunk_records_ = tail_chunk_->records;
  spare_chunks_.reserve(chunks_);  // recycling never allocates: see new_chunk
}

pending_closures::~pending_closures() {
  // Precondition: every batch taken from this lane was consumed (the device drains first), and
  // everything added since was taken and discarded (device_state::finish_shutdown).
  for (lane_chunk* c = head_; c != nullptr;) {
    lane_chunk* next = c->next;
    delete c;
    c = next;
  }
  for (lane_chunk* c : spare_chunks_) delete c;
}

void pending_closures::push_any(closure&& c) {
  const std::uint64_t me = this_thread_id();
  std::uint64_t owner = owner_.load(std::memory_order_relaxed);
  if (owner == me ||
      (owner == 0 && owner_.compare_exchange_strong(owner, me, std::memory_order_relaxed))) {
    push_owned(std::move(c));
    return;
  }
  std::lock_guard lock(shared_mutex_);
  // Read under the lock: a step end reads the owner's word after taking this lock, so every
  // tag it sees is at most that word (no shared closure overtakes an owner closure that was
  // added before it).
  shared_.push_back(tagged{std::move(c), published_.load(std::memory_order_acquire)});
  shared_count_.store(shared_count_.load(std::memory_order_relaxed) + 1, std::memory_order_release);
}

void pending_closures::push_owned(closure&& c) {
  const std::size_t size = closure_access::ref(c).ops->record_size;
  std::uint64_t word = published_.load(std::memory_order_relaxed);
  if (offset_of(word) > chunk_record_bytes - size) word = start_chunk(word);
  closure_access::move_to_record(c, chunk_records_ + offset_of(word));
  published_.store(word + count_one + size, std::memory_order_release);
}

std::uint64_t pending_closures::start_chunk(std::uint64_t word) {
  lane_chunk* next = new_chunk();
  if (chunk_record_bytes - offset_of(word) >= sizeof(closure_ops*)) {
    const closure_ops* none = nullptr;
    std::memcpy(chunk_records_ + offset_of(word), &none, sizeof none);
  }
  tail_chunk_->sealed_records =
      static_cast<std::uint32_t>((count_of(word) - count_of(tail_chunk_word_)) & count_mask);
  tail_chunk_->next = next;  // published with the next record's word
  tail_chunk_ = next;
  chunk_records_ = next->records;
  // Not published here: the word for the new chunk goes out with its first record.
  tail_chunk_word_ = (word & ~((std::uint64_t{1} << count_shift) - 1)) |
                     (std::uint64_t{(sequence_of(word) + 1) & sequence_mask} << offset_bits);
  return tail_chunk_word_;
}

pending_closures::take_plan pending_closures::prepare_take(closure_batch& out) {
  take_plan plan;
  // The owner's word first: a shared closure added before an owner closure that this step end
  // sees is then seen too (its count was raised before that owner closure was published).
  plan.owner_end = published_.load(std::memory_order_acquire);
  if (shared_count_.load(std::memory_order_acquire) != shared_taken_) {
    plan.shared = std::unique_lock(shared_mutex_);
    // Room for each shared closure and for the owner's records before it and at the end, a
    // segment each. (Allocates only when `out` is new or must grow.)
    out.reserve(shared_.size(), 2 * shared_.size() + 1);
  } else {
    out.reserve(0, 1);
  }
  return plan;
}

void pending_closures::take(closure_batch& out, take_plan& plan) noexcept {
  if (plan.nothing) return;
  std::uint64_t owner_end = plan.owner_end;
  if (plan.shared.owns_lock()) {
    shared_.swap(shared_spare_);
    shared_taken_ = shared_count_.load(std::memory_order_relaxed);
    // Under the lock, so every tag taken is at most this word.
    owner_end = published_.load(std::memory_order_acquire);
    plan.shared.unlock();
  }
  for (tagged& t : shared_spare_) {
    // A tag behind what was taken already: that closure was added while the previous step end
    // ran (it skips the lock when it sees no shared closure), concurrently with the owner
    // closures that step took, so it comes after them.
    const std::uint32_t taken =
        static_cast<std::uint32_t>(owner_taken_.load(std::memory_order_relaxed));
    if (((count_of(t.owner_word) - taken) & count_mask) <=
        ((count_of(owner_end) - taken) & count_mask)) {
      take_owned_upto(t.owner_word, out);
    }
    out.add(std::move(t.c));
  }
  shared_spare_.clear();
  take_owned_upto(owner_end, out);
}

void pending_closures::take_owned_upto(std::uint64_t word, closure_batch& out) noexcept {
  const std::uint64_t taken = owner_taken_.load(std::memory_order_relaxed);
  const std::uint32_t n = (count_of(word) - static_cast<std::uint32_t>(taken)) & count_mask;
  if (n == 0) return;
  const std::uint32_t sequence = sequence_of(word);
  // A chunk the owner has left (it published a record past it) has a final `sealed_records`.
  // Once the step end has taken all of them it passes the chunk, adding the bias that lets the
  // last record done recycle it. Never start a segment in a passed chunk.
  auto pass_head = [&] {
    lane_chunk* left = head_;
    head_ = left->next;
    head_sequence_ = (head_sequence_ + 1) & sequence_mask;
    head_offset_ = 0;
    head_taken_ = 0;
    records_done(left, lane_chunk::all_done - left->sealed_records);
  };
  while (head_sequence_ != sequence && head_taken_ == head_->sealed_records) pass_head();
  out.add_records(this, head_, head_offset_, n);
  std::uint32_t rest = n;
  while (head_sequence_ != sequence) {
    rest -= head_->sealed_records - head_taken_;
    pass_head();
  }
  head_offset_ = offset_of(word);
  head_taken_ += rest;
  owner_taken_.store(taken + n, std::memory_order_release);
}

void pending_closures::records_done(lane_chunk* chunk, std::uint32_t records) noexcept {
  if (chunk->done.fetch_add(records, std::memory_order_acq_rel) + records == lane_chunk::all_done) {
    recycle(chunk);
  }
}

void records_done(pending_closures* lane, lane_chunk* chunk, std::uint32_t records) noexcept {
  lane->records_done(chunk, records);
}

std::uint64_t pending_closures::pushed() const noexcept {
  const std::uint64_t shared = shared_count_.load(std::memory_order_acquire);
  // Taken first: the owner's word read afterwards counts at least as many records.
  const std::uint64_t taken = owner_taken_.load(std::memory_order_acquire);
  const std::uint32_t count = count_of(published_.load(std::memory_order_acquire));
  return taken + ((count - static_cast<std::uint32_t>(taken)) & count_mask) + shared;
}

lane_chunk* pending_closures::new_chunk() {
  std::size_t headroom = 0;
  {
    std::lock_guard lock(spare_mutex_);
    if (!spare_chunks_.empty()) {
      lane_chunk* c = spare_chunks_.back();
      spare_chunks_.pop_back();
      return c;
    }
    // Every chunk is in use: demand reached a new high. How many chunks are in use at once
    // depends on where a step's records start in a chunk and how far the runner is behind, so
    // steps of a fixed size reach new highs long after they settled. Growing one chunk at a
    // time would allocate at each of them; doubling (up to a limit, as the high may be one huge
    // step) leaves room for the next ones.
    headroom = std::min(chunks_, max_headroom_chunks);
    // Room for every chunk the lane will own, so that `recycle` (noexcept, on any thread) never
    // allocates. If this throws, nothing has changed.
    spare_chunks_.reserve(chunks_ + 1 + headroom);
  }
  lane_chunk* const c = new lane_chunk;
  // The headroom is optional: without memory for it the lane still works, one chunk at a time.
  std::size_t added = 0;
  std::array<lane_chunk*, max_headroom_chunks> extra{};
  try {
    for (; added < headroom; ++added) extra[added] = new lane_chunk;
  } catch (const std::bad_alloc&) {
    // Keep the ones allocated so far.
  }
  std::lock_guard lock(spare_mutex_);
  chunks_ += 1 + added;
  spare_chunks_.insert(spare_chunks_.end(), extra.begin(), extra.begin() + added);
  return c;
}

void pending_closures::recycle(lane_chunk* c) noexcept {
  c->next = nullptr;
  c->sealed_records = 0;
  c->done.store(0, std::memory_order_relaxed);
  std::lock_guard lock(spare_mutex_);
  spare_chunks_.push_back(c);  // within the capacity new_chunk reserved
}

}  // namespace stepflow::detail
