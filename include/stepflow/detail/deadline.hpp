#pragma once
/// \file
/// Turning a `flush_for` timeout into a deadline. Not part of the public API.

#include <chrono>

namespace stepflow::detail {

/// `now + timeout` on the steady clock, saturated instead of overflowing (undefined behaviour)
/// in the conversion: a timeout beyond the clock's range, such as `std::chrono::seconds::max()`,
/// waits without end, and one of zero or less gives up at once.
template <class Rep, class Period>
std::chrono::steady_clock::time_point deadline_after(
    const std::chrono::duration<Rep, Period>& timeout) {
  using clock = std::chrono::steady_clock;
  const clock::time_point now = clock::now();
  if (!(timeout > timeout.zero())) return now;
  // Compared in floating-point seconds, where neither side overflows; the second of margin
  // covers their rounding.
  const std::chrono::duration<double> left = clock::time_point::max() - now;
  if (std::chrono::duration<double>(timeout) >= left - std::chrono::seconds(1)) {
    return clock::time_point::max();
  }
  return now + std::chrono::duration_cast<clock::duration>(timeout);
}

}  // namespace stepflow::detail
