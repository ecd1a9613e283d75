#include "pending_closures.hpp"

#include <cassert>

#include "thread_frames.hpp"

namespace stepflow::detail {

struct pending_closures::chunk {
  // 64 closures of 64 bytes: one 4 KiB page per chunk.
  static constexpr std::size_t capacity = 64;
  closure slots[capacity];
  chunk* next = nullptr;  // written by the owner before it publishes a slot of the next chunk
};

namespace {
// Spare chunks kept per lane (64 closures each): a step of up to 2,000 closures reuses them
// without allocating (B7 found 8 too few at 1,000 per step); at most 128 KiB per lane.
constexpr std::size_t max_spare_chunks = 32;
}  // namespace

pending_closures::pending_closures() : tail_(new chunk), head_(tail_) {
  spare_chunks_.reserve(max_spare_chunks);
}

pending_closures::~pending_closures() {
  for (chunk* c = head_; c != nullptr;) {
    chunk* next = c->next;
    delete c;
    c = next;
  }
  for (chunk* c : spare_chunks_) delete c;
}

void pending_closures::push(closure&& c) {
  const std::uint64_t me = this_thread_id();
  std::uint64_t owner = owner_.load(std::memory_order_relaxed);
  if (owner == me) {
    push_owned(std::move(c));
    return;
  }
  if (owner == 0 && owner_.compare_exchange_strong(owner, me, std::memory_order_relaxed)) {
    push_owned(std::move(c));
    return;
  }
  push_shared(std::move(c));
}

void pending_closures::push_owned(closure&& c) {
  if (tail_index_ == chunk::capacity) {
    chunk* next = new_chunk();
    tail_->next = next;
    tail_ = next;
    tail_index_ = 0;
  }
  tail_->slots[tail_index_++] = std::move(c);
  owner_published_.store(++owner_pushed_, std::memory_order_release);
}

void pending_closures::push_shared(closure&& c) {
  std::lock_guard lock(shared_mutex_);
  // Read under the lock: a step end reads the owner's count after taking this lock, so every
  // tag it sees is at most that count (no shared closure overtakes an owner closure that was
  // added before it).
  const std::uint64_t position = owner_published_.load(std::memory_order_acquire);
  shared_.push_back(tagged{std::move(c), position});
  ++shared_pushed_;
}

void pending_closures::take(closure_batch& out) {
  std::uint64_t owner_end;
  {
    std::lock_guard lock(shared_mutex_);
    shared_.swap(shared_spare_);
    owner_end = owner_published_.load(std::memory_order_acquire);
  }
  out.reserve(out.size() + shared_spare_.size() + (owner_end - owner_taken_));
  for (tagged& t : shared_spare_) {
    assert(t.owner_position <= owner_end);
    take_owned_upto(t.owner_position, out);
    out.push_back(std::move(t.c));
  }
  shared_spare_.clear();
  take_owned_upto(owner_end, out);
}

void pending_closures::take_owned_upto(std::uint64_t end, closure_batch& out) {
  while (owner_taken_ < end) {
    if (head_index_ == chunk::capacity) {
      // The owner has published a slot past this chunk, so it has moved on to `next` for good.
      chunk* done = head_;
      head_ = done->next;
      head_index_ = 0;
      recycle(done);
    }
    out.push_back(std::move(head_->slots[head_index_++]));
    ++owner_taken_;
  }
}

std::uint64_t pending_closures::pushed() const noexcept {
  std::uint64_t shared;
  {
    std::lock_guard lock(shared_mutex_);
    shared = shared_pushed_;
  }
  return owner_published_.load(std::memory_order_acquire) + shared;
}

pending_closures::chunk* pending_closures::new_chunk() {
  {
    std::lock_guard lock(spare_mutex_);
    if (!spare_chunks_.empty()) {
      chunk* c = spare_chunks_.back();
      spare_chunks_.pop_back();
      return c;
    }
  }
  return new chunk;
}

void pending_closures::recycle(chunk* c) noexcept {
  c->next = nullptr;
  {
    std::lock_guard lock(spare_mutex_);
    if (spare_chunks_.size() < max_spare_chunks) {
      spare_chunks_.push_back(c);
      return;
    }
  }
  delete c;
}

}  // namespace stepflow::detail
