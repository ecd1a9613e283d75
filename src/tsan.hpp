#pragma once
// ThreadSanitizer annotations for hand-overs that go through oneTBB's queues.
//
// Why: Debian's libtbb is not built with TSan, so TSan cannot see that enqueueing a task happens
// before a worker runs it. Every hand-over from a producer to a drainer task is therefore
// announced with release (before the enqueue) and acquire (when the task starts) on the queue's
// address. Outside TSan builds these compile to nothing.

#if defined(__SANITIZE_THREAD__)
#define STEPFLOW_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define STEPFLOW_TSAN 1
#endif
#endif

#ifdef STEPFLOW_TSAN
extern "C" void __tsan_acquire(void* addr);
extern "C" void __tsan_release(void* addr);
#endif

namespace stepflow::detail {

inline void tsan_release([[maybe_unused]] void* addr) noexcept {
#ifdef STEPFLOW_TSAN
  __tsan_release(addr);
#endif
}

inline void tsan_acquire([[maybe_unused]] void* addr) noexcept {
#ifdef STEPFLOW_TSAN
  __tsan_acquire(addr);
#endif
}

}  // namespace stepflow::detail
