#pragma once
// Test-side ThreadSanitizer annotations for work handed to oneTBB algorithms.
//
// Why: libtbb is not built with TSan, so TSan cannot see that starting a parallel_for or a
// parallel_pipeline happens before its bodies run, or that the bodies finish before the call
// returns. Tests that run stepflow from inside such bodies wrap each body in `tbb_body_scope`
// and bracket the algorithm call with `before_tbb_algorithm()` / `after_tbb_algorithm()`.
// Outside TSan builds all of this is empty.

#if defined(__SANITIZE_THREAD__)
#define STEPFLOW_TEST_TSAN 1
extern "C" void __tsan_acquire(void* addr);
extern "C" void __tsan_release(void* addr);
#endif

namespace stepflow::testing {

#ifdef STEPFLOW_TEST_TSAN
inline char tbb_handoff_key;
inline void before_tbb_algorithm() { __tsan_release(&tbb_handoff_key); }
inline void after_tbb_algorithm() { __tsan_acquire(&tbb_handoff_key); }
struct tbb_body_scope {
  tbb_body_scope() { __tsan_acquire(&tbb_handoff_key); }
  ~tbb_body_scope() { __tsan_release(&tbb_handoff_key); }
};
#else
inline void before_tbb_algorithm() {}
inline void after_tbb_algorithm() {}
struct tbb_body_scope {
  tbb_body_scope() {}  // user-provided so `tbb_body_scope scope;` is not an unused-variable warning
};
#endif

}  // namespace stepflow::testing
