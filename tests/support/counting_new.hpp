#pragma once
// Replaces the global operator new and delete of the test binary that includes this header
// (include it from exactly one source file of that binary). They count every allocation and
// can make one of the calling thread's next allocations fail, to test what stepflow does when
// memory runs out.

#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <new>

namespace stepflow::testing {

/// Every operator new of this binary so far (the array and nothrow forms call these).
inline std::atomic<std::size_t> allocations{0};

namespace detail {
// 0: no failure armed; n: the calling thread's n-th allocation from now throws.
inline thread_local std::size_t allocations_until_failure = 0;
}  // namespace detail

/// While it lives, the calling thread's `nth` allocation from now (1: the next one) throws
/// `std::bad_alloc`, once. Other threads allocate as usual.
class failing_allocation {
 public:
  explicit failing_allocation(std::size_t nth) { detail::allocations_until_failure = nth; }
  ~failing_allocation() { detail::allocations_until_failure = 0; }
  failing_allocation(const failing_allocation&) = delete;
  failing_allocation& operator=(const failing_allocation&) = delete;
  /// Whether the armed allocation happened (and threw).
  static bool happened() noexcept { return detail::allocations_until_failure == 0; }
};

inline void* counted_allocation(std::size_t n, std::size_t alignment) {
  std::size_t& until = detail::allocations_until_failure;
  if (until != 0 && --until == 0) throw std::bad_alloc();
  allocations.fetch_add(1, std::memory_order_relaxed);
  n = n == 0 ? 1 : n;
  void* p = alignment <= alignof(std::max_align_t)
                ? std::malloc(n)
                : std::aligned_alloc(alignment, (n + alignment - 1) / alignment * alignment);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}

}  // namespace stepflow::testing

void* operator new(std::size_t n) { return stepflow::testing::counted_allocation(n, 0); }
void* operator new(std::size_t n, std::align_val_t a) {
  return stepflow::testing::counted_allocation(n, static_cast<std::size_t>(a));
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
