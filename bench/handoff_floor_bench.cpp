// Reference for B2 (issue 5), not a stepflow benchmark: what it costs on this machine to hand
// closures' records from one thread to another at all: 24- and 56-byte records (B2's closures
// with 16- and 48-byte captures, packed as stepflow packs them) and 64-byte ones. A producer
// writes a step's records into a ring and publishes the step with one release store; a consumer
// thread reads every record and publishes its progress; the producer waits while the ring is
// full. Nothing else is shared, no lock, no allocation: the floor any step-batched async queue
// pays per closure. `in_flight` is the most records written and not yet read (a queue bound of
// 100 plus the step being written: 200); `ring` is how many record slots the memory rotates
// through, which decides whether a slot's line is still in the other core's cache when reused.
//
// The `_locked_yield` rows add what a real queue's step end and waits add to that floor and no
// more: one locked read-modify-write per step on the producer (a lock's acquisition; on its own
// line, so the other thread never touches it) and a yield between the polls of both sides (as
// stepflow's waits do). They show how much of B2's distance to the floor those two explain.
//
// B2_floor/line_transfer: what one cache line written by both threads costs per handoff.
//
// The threads are not pinned; on a machine with one CPU this measures time slicing instead.

#include <atomic>
#include <cstdint>
#include <memory>
#include <new>
#include <thread>

#include "bench_support.hpp"

namespace {

using namespace stepflow_bench;

/// One closure's bytes as stepflow stores it: a table pointer and the captures, packed back to
/// back. 3 words: B2's 16-byte captures (24-byte records); 7 words: its 48-byte captures; 8: a
/// whole cache line per record.
template <std::size_t Words>
struct packed_record {
  std::uint64_t words[Words];
};

template <std::size_t Words, bool LockedAndYielding = false>
void handoff_spsc(benchmark::State& state) {
  using record = packed_record<Words>;
  static_assert(sizeof(record) == Words * 8);
  const auto ring = static_cast<std::uint64_t>(state.range(0));
  const auto in_flight = static_cast<std::uint64_t>(state.range(1));
  const auto per_step = static_cast<std::uint64_t>(state.range(2));
  const std::uint64_t total = 1'000'000;
  // Line-aligned, as stepflow's chunks are.
  struct aligned_delete {
    void operator()(record* p) const noexcept { ::operator delete[](p, std::align_val_t{64}); }
  };
  const std::unique_ptr<record[], aligned_delete> storage(new (std::align_val_t{64}) record[ring]);
  record* const buffer = storage.get();
  struct alignas(64) counter {
    std::atomic<std::uint64_t> value{0};
  };
  counter produced;
  counter consumed;
  counter producer_only;
  std::atomic<bool> stop{false};
  std::uint64_t checksum = 0;

  std::thread consumer([&] {
    std::uint64_t next = 0;
    std::uint64_t sum = 0;
    for (;;) {
      std::uint64_t end;
      while ((end = produced.value.load(std::memory_order_acquire)) == next) {
        if constexpr (LockedAndYielding) std::this_thread::yield();
        if (stop.load(std::memory_order_relaxed)) {
          checksum = sum;
          return;
        }
      }
      for (; next < end; ++next) {
        const record& r = buffer[next % ring];
        sum += r.words[0] + r.words[Words - 1];
      }
      consumed.value.store(next, std::memory_order_release);
    }
  });

  std::uint64_t sent = 0;
  closure_timer timer;
  timer.start();
  for (auto _ : state) {
    const std::uint64_t goal = sent + total;
    while (sent < goal) {
      while (sent + per_step - consumed.value.load(std::memory_order_acquire) > in_flight) {
        if constexpr (LockedAndYielding) std::this_thread::yield();
      }
      for (std::uint64_t i = sent; i < sent + per_step; ++i) {
        record& r = buffer[i % ring];
        for (std::uint64_t k = 0; k < Words; ++k) r.words[k] = i + k;
      }
      sent += per_step;
      if constexpr (LockedAndYielding) producer_only.value.fetch_add(1);
      produced.value.store(sent, std::memory_order_release);
    }
    while (consumed.value.load(std::memory_order_acquire) != sent) {  // the "flush"
    }
  }
  timer.stop();
  stop.store(true);
  consumer.join();
  timer.report(state, sent);
  benchmark::DoNotOptimize(checksum);
}

// What one line shared by the two threads costs: two threads take turns writing one counter, each
// waiting to see the other's last write. `ns_per_transfer` is one handoff of the line from one
// core's cache to the other's (half a round trip). A step-batched queue pays this for every line
// both sides write per step, whatever it does per closure.
void line_transfer(benchmark::State& state) {
  struct alignas(64) shared_line {
    std::atomic<std::uint64_t> value{0};
  };
  shared_line line;
  constexpr std::uint64_t rounds = 200'000;
  std::uint64_t transfers = 0;
  std::int64_t total_ns = 0;
  for (auto _ : state) {
    line.value.store(0, std::memory_order_relaxed);
    std::thread other([&] {
      for (std::uint64_t v = 1; v < 2 * rounds; v += 2) {
        while (line.value.load(std::memory_order_acquire) != v) {
        }
        line.value.store(v + 1, std::memory_order_release);
      }
    });
    const std::int64_t begin = now_ns();
    for (std::uint64_t v = 0; v < 2 * rounds; v += 2) {
      while (line.value.load(std::memory_order_acquire) != v) {
      }
      line.value.store(v + 1, std::memory_order_release);
    }
    while (line.value.load(std::memory_order_acquire) != 2 * rounds) {
    }
    const std::int64_t elapsed = now_ns() - begin;
    other.join();
    state.SetIterationTime(static_cast<double>(elapsed) * 1e-9);
    total_ns += elapsed;
    transfers += 2 * rounds;
  }
  state.counters["ns_per_transfer"] =
      static_cast<double>(total_ns) / static_cast<double>(transfers);
}

}  // namespace

void floor_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"ring", "in_flight", "per_step"})
      ->Args({200, 200, 100})
      ->Args({10'000, 200, 100})
      ->Args({10'000, 10'000, 100})
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
}

// B2's own shape only: a bound of 100 plus the step being written.
void queue_like_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"ring", "in_flight", "per_step"})
      ->Args({200, 200, 100})
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
}

BENCHMARK(handoff_spsc<3>)->Name("B2_floor/spsc_24B_records")->Apply(floor_args);
BENCHMARK(handoff_spsc<7>)->Name("B2_floor/spsc_56B_records")->Apply(floor_args);
BENCHMARK(handoff_spsc<8>)->Name("B2_floor/spsc_64B_records")->Apply(floor_args);
BENCHMARK(handoff_spsc<3, true>)
    ->Name("B2_floor/spsc_24B_records_locked_yield")
    ->Apply(queue_like_args);
BENCHMARK(handoff_spsc<7, true>)
    ->Name("B2_floor/spsc_56B_records_locked_yield")
    ->Apply(queue_like_args);
BENCHMARK(line_transfer)
    ->Name("B2_floor/line_transfer")
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

STEPFLOW_BENCHMARK_MAIN();
