#pragma once
/// \file
/// ThreadSanitizer annotations shared by stepflow's headers, sources and tests. Not part of the
/// API.
///
/// Why: Debian's libtbb is not built with TSan, so TSan cannot see the happens-before edges that
/// oneTBB creates (spawning or enqueueing a task, a flow-graph put, `wait()` returning). Each such
/// hand-over that stepflow relies on is announced with `release` before it and `acquire` after it,
/// on one of the keys below. Outside TSan builds everything here is empty.

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

/// Key for work handed to oneTBB algorithms and flow graphs that run stepflow code (the flow
/// adapters, tests): released before the hand-over, acquired when the body starts and released
/// when it ends, acquired after the wait.
inline char tsan_tbb_handoff_key;

/// Acquires the hand-over key for a body's lifetime and releases it at the end.
struct tsan_body_scope {
  tsan_body_scope() noexcept { tsan_acquire(&tsan_tbb_handoff_key); }
  ~tsan_body_scope() { tsan_release(&tsan_tbb_handoff_key); }
  tsan_body_scope(const tsan_body_scope&) = delete;
  tsan_body_scope& operator=(const tsan_body_scope&) = delete;
};

}  // namespace stepflow::detail
