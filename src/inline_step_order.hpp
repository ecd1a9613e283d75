#pragma once
// Sync mode: when a device's steps count as done.
//
// Why: in sync mode a step's closures run on the thread that ends the step, so two threads
// ending steps of one device at once finish them in either order. Joined closures and flushes
// take "step N done" to mean every step up to N ran; reporting the later step when it finished
// first would start a joined closure of the earlier step while that step's closures still run.
// So a step is done only once it and every earlier step of the device returned.
//
// The steps in flight are a list of nodes on their step ends' stacks: no allocation, so ending
// one cannot throw (it runs in a destructor, also while a closure's exception propagates).

#include <cstdint>
#include <mutex>

namespace stepflow::detail {

class inline_step_order {
 public:
  /// One step end's place in the order; lives on that step end's stack.
  class entry {
   public:
    entry() = default;
    entry(const entry&) = delete;
    entry& operator=(const entry&) = delete;

   private:
    friend class inline_step_order;
    std::uint64_t step_ = 0;  // 0: never began
    entry* next_ = nullptr;
    entry* prev_ = nullptr;
  };

  /// Step `step` of the device began. Call in step order (under the device's take lock).
  void begin(entry& e, std::uint64_t step) noexcept {
    std::lock_guard lock(mutex_);
    e.step_ = step;
    e.prev_ = tail_;
    (tail_ != nullptr ? tail_->next_ : head_) = &e;
    tail_ = &e;
    last_begun_ = step;
  }

  /// The step of `e` returned. Returns the latest step now done that was not returned before
  /// (0 when none: an earlier step still runs). Does nothing for an entry that never began.
  std::uint64_t end(entry& e) noexcept {
    if (e.step_ == 0) return 0;
    std::lock_guard lock(mutex_);
    (e.prev_ != nullptr ? e.prev_->next_ : head_) = e.next_;
    (e.next_ != nullptr ? e.next_->prev_ : tail_) = e.prev_;
    const std::uint64_t done = head_ != nullptr ? head_->step_ - 1 : last_begun_;
    if (done <= reported_) return 0;
    reported_ = done;
    return done;
  }

 private:
  std::mutex mutex_;
  entry* head_ = nullptr;  // steps in flight, oldest first
  entry* tail_ = nullptr;
  std::uint64_t last_begun_ = 0;
  std::uint64_t reported_ = 0;
};

}  // namespace stepflow::detail
