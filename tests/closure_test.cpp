// stepflow::closure: storage, ownership and relocation.

#include <stepflow/closure.hpp>

#include <gtest/gtest.h>

#include <array>
#include <cstdlib>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>

namespace {

// Counts allocations of this binary so "no allocation" is a checked claim.
std::size_t allocations = 0;

struct lifetime_counter {
  int* destroyed;
  explicit lifetime_counter(int* d) : destroyed(d) {}
  lifetime_counter(lifetime_counter&& o) noexcept
      : destroyed(std::exchange(o.destroyed, nullptr)) {}
  lifetime_counter(const lifetime_counter&) = delete;
  ~lifetime_counter() {
    if (destroyed != nullptr) ++*destroyed;
  }
};

}  // namespace

void* operator new(std::size_t n) {
  ++allocations;
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }

namespace stepflow {
namespace {

TEST(Closure, EmptyByDefault) {
  closure c;
  EXPECT_FALSE(c);
  c.reset();  // harmless on an empty closure
  EXPECT_FALSE(c);
}

TEST(Closure, CapturesUpTo48BytesWithoutAllocating) {
  std::array<long, 6> payload{1, 2, 3, 4, 5, 6};  // 48 bytes
  long sum = 0;
  const std::size_t before = allocations;
  closure c([payload, out = &sum] {
    for (long v : payload) *out += v;
  });
  closure moved(std::move(c));
  moved();
  EXPECT_EQ(allocations, before);
  EXPECT_EQ(sum, 21);
  EXPECT_FALSE(c);  // NOLINT(bugprone-use-after-move): moved-from is empty by contract
}

TEST(Closure, LargeCallableLivesOnTheHeapAndStillWorks) {
  std::array<long, 16> payload{};
  payload[15] = 7;
  long seen = 0;
  const std::size_t before = allocations;
  closure c([payload, out = &seen] { *out = payload[15]; });
  EXPECT_EQ(allocations, before + 1);
  closure moved(std::move(c));
  moved();
  EXPECT_EQ(seen, 7);
}

TEST(Closure, MoveOnlyCaptureIsDestroyedExactlyOnce) {
  int destroyed = 0;
  {
    closure a([counter = lifetime_counter(&destroyed), p = std::make_unique<int>(5)] {
      EXPECT_EQ(*p, 5);
    });
    closure b(std::move(a));
    closure c;
    c = std::move(b);
    c();
    EXPECT_EQ(destroyed, 0);
  }
  EXPECT_EQ(destroyed, 1);
}

TEST(Closure, NonTriviallyRelocatableCaptureSurvivesMoves) {
  std::string text(100, 'x');  // heap-backed string: relocation must move it properly
  std::string seen;
  closure a([text, out = &seen] { *out = text; });
  closure b(std::move(a));
  closure c(std::move(b));
  c();
  EXPECT_EQ(seen, std::string(100, 'x'));
}

TEST(Closure, ResetDestroysTheCallableWithoutCallingIt) {
  int destroyed = 0;
  bool called = false;
  closure c([counter = lifetime_counter(&destroyed), &called] { called = true; });
  c.reset();
  EXPECT_EQ(destroyed, 1);
  EXPECT_FALSE(called);
  EXPECT_FALSE(c);
}

TEST(Closure, MoveAssignmentDestroysThePreviousCallable) {
  int first = 0;
  int second = 0;
  closure a([c = lifetime_counter(&first)] {});
  closure b([c = lifetime_counter(&second)] {});
  a = std::move(b);
  EXPECT_EQ(first, 1);
  EXPECT_EQ(second, 0);
}

TEST(Closure, ExceptionsPropagateFromTheCall) {
  closure c([] { throw std::runtime_error("from closure"); });
  EXPECT_THROW(c(), std::runtime_error);
}

TEST(Closure, RvalueOnlyCallableIsCalledAsRvalue) {
  struct rvalue_only {
    int* out;
    void operator()() && { *out = 1; }
  };
  int out = 0;
  closure c(rvalue_only{&out});
  c();
  EXPECT_EQ(out, 1);
}

}  // namespace
}  // namespace stepflow
