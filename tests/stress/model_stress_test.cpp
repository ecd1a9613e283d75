// Model-based randomized stress: random interleavings of adds (sync, async and joined, random
// devices, several threads), step ends, flushes, failing closures (std and non-std exceptions),
// closures that re-enter (add, or end a step, from inside), per-device and lockstep ordering, and
// scheduler destruction with pending work.
//
// Invariants, checked on the main thread after each round against a simple sequential model:
//   - every accepted closure is destroyed exactly once and runs at most once;
//   - closures that did not run == discarded closures reported + never-run closures reported;
//   - every failure is reported exactly once (by a step end, a flush or the shutdown report);
//   - per device, the async closures of one adding thread run in the order that thread added them;
//   - a joined closure is given its global step (never 0);
//   - flush() inside an asynchronous closure is refused with stepflow::error (it neither returns
//     nor reports a failure);
//   - nothing hangs (a watchdog aborts and prints the seed).
// The invariants checked where a closure runs each have their own record and message, so a
// failure says which one broke, and the first closure that saw it.
//
// Budget: STEPFLOW_STRESS_SECONDS (default 3). Seed: STEPFLOW_STRESS_SEED (default: time), always
// printed; a failing seed reproduces the same operation sequences (thread interleavings differ).

#include <stepflow/stepflow.hpp>

#include <gtest/gtest.h>
#include <oneapi/tbb/global_control.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "../support/watchdog.hpp"

namespace stepflow {
namespace {

struct failure_id {
  std::size_t id;
};

/// An invariant checked where a closure runs, from any thread: the first closure that saw it
/// broken, if any.
class violation {
 public:
  void saw(std::size_t closure) {
    std::size_t none = 0;
    first_.compare_exchange_strong(none, closure + 1);
  }
  /// Fails the test with `what` if the invariant was ever broken.
  void expect_never(const char* what, std::uint64_t seed) const {
    const std::size_t first = first_.load();
    if (first != 0) {
      ADD_FAILURE() << what << " (first seen by closure " << first - 1 << "); seed " << seed;
    }
  }

 private:
  std::atomic<std::size_t> first_{0};  // closure id + 1; 0: never seen
};

class model {
 public:
  explicit model(std::size_t capacity)
      : runs_(capacity), destroys_(capacity), reports_(capacity), threw_(capacity) {}

  std::size_t new_closure() {
    const std::size_t id = next_.fetch_add(1);
    if (id >= runs_.size()) throw std::length_error("stress model: raise its capacity");
    return id;
  }
  void ran(std::size_t id) { runs_[id].fetch_add(1); }
  void destroyed(std::size_t id) { destroys_[id].fetch_add(1); }
  void thrown(std::size_t id) {
    thrown_.fetch_add(1);
    threw_[id].store(true);
  }

  // Records one report of the failure carried by `error`.
  void reported(const std::exception_ptr& error, std::size_t discarded) {
    discarded_reported_.fetch_add(discarded);
    try {
      std::rethrow_exception(error);
    } catch (const failure_id& f) {
      reports_[f.id].fetch_add(1);
    } catch (const std::runtime_error& e) {
      reports_[std::stoul(e.what())].fetch_add(1);
    }
  }
  void reported(const async_closure_error& e) { reported(e.original(), e.discarded()); }
  void never_run(std::size_t n) { never_run_reported_.fetch_add(n); }

  // Invariants checked where closure `id` runs.
  void fifo_broken(std::size_t id) { fifo_broken_.saw(id); }
  void joined_without_step(std::size_t id) { joined_without_step_.saw(id); }
  void flush_inside_async_returned(std::size_t id) { flush_inside_async_returned_.saw(id); }
  void flush_inside_async_reported(std::size_t id) { flush_inside_async_reported_.saw(id); }

  void check(std::uint64_t seed) const {
    const std::size_t n = next_.load();
    std::size_t not_run = 0;
    std::size_t thrown_reports = 0;
    for (std::size_t i = 0; i < n; ++i) {
      ASSERT_EQ(destroys_[i].load(), 1) << "closure " << i << " destroyed wrongly; seed " << seed;
      ASSERT_LE(runs_[i].load(), 1) << "closure " << i << " ran twice; seed " << seed;
      if (runs_[i].load() == 0) ++not_run;
      thrown_reports += static_cast<std::size_t>(reports_[i].load());
      if (threw_[i].load()) {
        ASSERT_EQ(reports_[i].load(), 1) << "failure of closure " << i << " reported "
                                         << reports_[i].load() << " times; seed " << seed;
      }
    }
    EXPECT_EQ(thrown_reports, thrown_.load()) << "seed " << seed;
    EXPECT_EQ(not_run, discarded_reported_.load() + never_run_reported_.load())
        << "closures lost or miscounted; seed " << seed;
    fifo_broken_.expect_never(
        "per-thread FIFO broken: an async closure ran after one its thread added later to the "
        "same device",
        seed);
    joined_without_step_.expect_never("a joined closure was given step 0, not its global step",
                                      seed);
    flush_inside_async_returned_.expect_never(
        "flush() inside an async closure returned instead of throwing stepflow::error", seed);
    flush_inside_async_reported_.expect_never(
        "flush() inside an async closure reported a failure (async_closure_error) instead of "
        "being refused with stepflow::error",
        seed);
  }

  std::size_t closures() const { return next_.load(); }

  // Per (device, adding thread): the last sequence number that ran. Touched only by the one
  // drainer of that device at a time.
  std::vector<std::vector<std::int64_t>> last_seq;

 private:
  std::atomic<std::size_t> next_{0};
  std::vector<std::atomic<int>> runs_;
  std::vector<std::atomic<int>> destroys_;
  std::vector<std::atomic<int>> reports_;
  std::vector<std::atomic<bool>> threw_;
  std::atomic<std::size_t> thrown_{0};
  std::atomic<std::size_t> discarded_reported_{0};
  std::atomic<std::size_t> never_run_reported_{0};
  violation fifo_broken_;
  violation joined_without_step_;
  violation flush_inside_async_returned_;
  violation flush_inside_async_reported_;
};

// Marks its closure destroyed exactly when the closure object is.
struct token {
  model* m;
  std::size_t id;
  token(model* mm, std::size_t i) : m(mm), id(i) {}
  token(token&& o) noexcept : m(std::exchange(o.m, nullptr)), id(o.id) {}
  token(const token&) = delete;
  ~token() {
    if (m != nullptr) m->destroyed(id);
  }
};

struct round_config {
  int devices;
  std::size_t max_queue;
  int threads;
  int ops_per_thread;
  // Lockstep: a device that stops stepping holds the others back by design, so lockstep rounds
  // use an unbounded queue (step ends never wait) and bounded flushes.
  bool lockstep;
};

class stress_round {
 public:
  stress_round(const round_config& c, std::uint64_t seed)
      : config_(c), seed_(seed), model_(200000) {
    model_.last_seq.assign(static_cast<std::size_t>(c.devices),
                           std::vector<std::int64_t>(static_cast<std::size_t>(c.threads) + 1, -1));
  }

  void run() {
    {
      options o;
      o.max_queue_size = config_.lockstep ? 0 : config_.max_queue;
      o.ordering = config_.lockstep ? step_ordering::lockstep : step_ordering::per_device;
      o.report_to_stderr = false;
      o.measure_run_time = (seed_ & 1) == 0;  // both modes of the closures' run loop
      // A drainer that never lingers, the default, and one that outlasts any pause here.
      constexpr std::chrono::microseconds lingers[] = {std::chrono::microseconds(0),
                                                       std::chrono::microseconds(100),
                                                       std::chrono::microseconds(1'000'000)};
      o.worker_linger = lingers[(seed_ >> 1) % 3];
      o.on_shutdown_report = [this](const shutdown_report& r) {
        for (const device_shutdown_report& d : r.devices) {
          if (d.unreported_error) model_.reported(d.unreported_error, d.discarded);
          model_.never_run(d.never_run);
        }
      };
      scheduler s(o);
      scheduler_ = &s;
      for (int d = 0; d < config_.devices; ++d)
        devices_.push_back(&s.device("d" + std::to_string(d)));
      std::vector<std::thread> threads;
      for (int t = 0; t < config_.threads; ++t) {
        threads.emplace_back([this, t] { drive(t); });
      }
      for (std::thread& t : threads) t.join();
      // Destroyed with whatever is pending: queued work, unreported failures, unended steps.
    }
    model_.check(seed_);
  }

  std::size_t closures() const { return model_.closures(); }

 private:
  void drive(int thread) {
    std::mt19937_64 rng(seed_ * 7919 + static_cast<std::uint64_t>(thread));
    std::int64_t seq = 0;
    for (int op = 0; op < config_.ops_per_thread; ++op) {
      device_context& d = *devices_[rng() % devices_.size()];
      const unsigned dice = static_cast<unsigned>(rng() % 100);
      if (dice < 40) {
        add_async(d, thread, seq++, rng());
      } else if (dice < 65) {
        add_sync(d, rng());
      } else if (dice < 70) {
        add_joined(rng());
      } else if (dice < 95) {
        end_step(d);
      } else {
        try {
          if (config_.lockstep) {
            d.flush_for(std::chrono::milliseconds(20));
          } else {
            d.flush();
          }
        } catch (const async_closure_error& e) {
          model_.reported(e);
        }
      }
    }
  }

  void end_step(device_context& d) {
    try {
      d.run_step_closures();
    } catch (const async_closure_error& e) {
      model_.reported(e);
    }
  }

  // Joined closures: run once per global step; some throw, some take the step, some end a step.
  void add_joined(std::uint64_t r) {
    const std::size_t id = model_.new_closure();
    scheduler_->add_joined_step_closure([this, t = token(&model_, id), r](std::uint64_t step) {
      model_.ran(t.id);
      if (step == 0) model_.joined_without_step(t.id);  // a joined closure always knows its step
      switch (r % 8) {
        case 0:
          model_.thrown(t.id);
          throw std::runtime_error(std::to_string(t.id));
        case 1:
          end_step(*devices_[(r / 8) % devices_.size()]);  // never blocks in a joined closure
          break;
        default:
          break;
      }
    });
  }

  void add_sync(device_context& d, std::uint64_t r) {
    const std::size_t id = model_.new_closure();
    d.add_step_closure([this, t = token(&model_, id), r] {
      model_.ran(t.id);
      if (r % 10 == 0) add_inner(*devices_[r % devices_.size()], r / 10);
    });
  }

  // `thread` == config_.threads means "added from inside a closure": no order is checked.
  void add_async(device_context& d, int thread, std::int64_t seq, std::uint64_t r) {
    const std::size_t id = model_.new_closure();
    const std::size_t dev = device_index(d);
    d.add_step_closure(run_async, [this, t = token(&model_, id), r, thread, seq, dev] {
      model_.ran(t.id);
      if (thread < config_.threads) {
        std::int64_t& last = model_.last_seq[dev][static_cast<std::size_t>(thread)];
        if (last >= seq) model_.fifo_broken(t.id);
        last = seq;
      }
      switch (r % 20) {
        case 0:
          model_.thrown(t.id);
          throw failure_id{t.id};  // not a std::exception
        case 1:
          model_.thrown(t.id);
          throw std::runtime_error(std::to_string(t.id));
        case 2:
          add_inner(*devices_[(r / 20) % devices_.size()], r / 400);
          break;
        case 3:
          // Ending a step (own device or another) from inside never blocks.
          end_step(*devices_[(r / 20) % devices_.size()]);
          break;
        case 4:
          // flush() inside an async closure must be refused with stepflow::error.
          try {
            devices_[dev]->flush();
            model_.flush_inside_async_returned(t.id);
          } catch (const async_closure_error&) {
            model_.flush_inside_async_reported(t.id);
          } catch (const error&) {
          }
          break;
        default:
          break;
      }
    });
  }

  void add_inner(device_context& d, std::uint64_t r) {
    if (r % 2 == 0) {
      add_async(d, config_.threads, 0, r / 2 * 20 + 5);  // a plain async closure
    } else {
      const std::size_t id = model_.new_closure();
      d.add_step_closure([this, t = token(&model_, id)] { model_.ran(t.id); });
    }
  }

  std::size_t device_index(const device_context& d) const {
    for (std::size_t i = 0; i < devices_.size(); ++i) {
      if (devices_[i] == &d) return i;
    }
    return 0;
  }

  round_config config_;
  std::uint64_t seed_;
  model model_;
  std::vector<device_context*> devices_;
  scheduler* scheduler_ = nullptr;
};

std::uint64_t env_or(const char* name, std::uint64_t fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::stoull(v) : fallback;
}

TEST(ModelStress, RandomInterleavingsKeepEveryInvariant) {
  const std::uint64_t seconds = env_or("STEPFLOW_STRESS_SECONDS", 3);
  const std::uint64_t seed = env_or(
      "STEPFLOW_STRESS_SEED",
      static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()));
  std::printf("stress seed %llu (STEPFLOW_STRESS_SEED=%llu reproduces), budget %llu s\n",
              static_cast<unsigned long long>(seed), static_cast<unsigned long long>(seed),
              static_cast<unsigned long long>(seconds));
  testing::watchdog dog(std::chrono::seconds(seconds + 120),
                        "stress round (seed " + std::to_string(seed) + ")");
  std::mt19937_64 rng(seed);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(seconds);
  int rounds = 0;
  std::size_t closures = 0;
  do {
    const std::size_t queues[] = {1, 2, 7, 100, 0};
    const round_config config{1 + static_cast<int>(rng() % 4), queues[rng() % 5],
                              1 + static_cast<int>(rng() % 3), 200 + static_cast<int>(rng() % 800),
                              rng() % 3 == 0};
    const int tbb_threads = 1 + static_cast<int>(rng() % 4);
    tbb::global_control limit(tbb::global_control::max_allowed_parallelism,
                              static_cast<std::size_t>(tbb_threads));
    const std::uint64_t round_seed = rng();
    SCOPED_TRACE("round " + std::to_string(rounds) + " seed " + std::to_string(round_seed));
    stress_round round(config, round_seed);
    round.run();
    closures += round.closures();
    ++rounds;
    if (HasFatalFailure() || HasNonfatalFailure()) break;
  } while (std::chrono::steady_clock::now() < deadline);
  std::printf("%d rounds, %zu closures\n", rounds, closures);
}

}  // namespace
}  // namespace stepflow
