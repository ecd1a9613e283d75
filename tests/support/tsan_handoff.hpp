#pragma once
// Test-side ThreadSanitizer annotations for work handed to oneTBB algorithms.
//
// Why: libtbb is not built with TSan, so TSan cannot see that starting a parallel_for or a
// parallel_pipeline happens before its bodies run, or that the bodies finish before the call
// returns. Tests that run stepflow from inside such bodies wrap each body in `tbb_body_scope`
// and bracket the algorithm call with `before_tbb_algorithm()` / `after_tbb_algorithm()`. The
// key is the one stepflow's flow adapters use, so a user graph of adapters is covered too.
// Outside TSan builds all of this is empty.

#include "stepflow/detail/tsan.hpp"

namespace stepflow::testing {

inline void before_tbb_algorithm() { detail::tsan_release(&detail::tsan_tbb_handoff_key); }
inline void after_tbb_algorithm() { detail::tsan_acquire(&detail::tsan_tbb_handoff_key); }
using tbb_body_scope = detail::tsan_body_scope;

}  // namespace stepflow::testing
