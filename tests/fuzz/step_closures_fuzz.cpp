// libFuzzer target: decodes an operation sequence from the input, runs it against a scheduler on
// one driving thread (oneTBB's workers run the asynchronous and joined closures concurrently), and
// checks the model-based stress test's invariants (tests/stress/model_stress_test.cpp) after every
// scheduler's destruction, plus a few that a single driving thread makes exact.
//
// Input format (every byte sequence is a valid program; missing bytes read as 0):
//
//   byte 0            configuration of the first scheduler (see decode_config)
//   then operations,  at most max_ops of them, each an opcode byte and 0-1 operand bytes:
//
//     opcode & 15     operation                                     operand byte
//     0, 1            add a sync closure to device (op>>4)&3         closure spec
//     2, 3, 4         add an async closure to device (op>>4)&3       closure spec
//     5               add a joined closure                           closure spec
//     6               add a burst of plain closures to a device      burst spec
//     7, 8, 9         run_step_closures() on device (op>>4)&3        -
//     10              flush() on the device                          -
//     11              flush_for({0,1,2,5} ms: op>>6) on the device   -
//     12              scheduler::flush()                             -
//     13              scheduler::retire(the device)                  -
//     14              destroy the scheduler, build a new one         configuration
//     15              run_step_closures() on every device in turn    -
//
//   configuration:  bits 0-1 devices-1 (1..4); bits 2-3 max_queue_size {1, 2, 7, 0=unbounded};
//                   bit 4 sync_mode; bit 5 lockstep ordering (every device a participant, which
//                   they are in per-device ordering too);
//                   bits 6-7 oneTBB threads {default, 1, 2, 4};
//                   not in the byte (it is full, and the corpus keeps its meaning): the worker's
//                   linger, 100 us (the default) for the first scheduler of a program, then
//                   0, 1 s and 100 us in turn for the ones opcode 14 builds
//   closure spec:   bits 0-2 behaviour: 0,1 plain; 2 throw std::runtime_error; 3 throw int;
//                   4 add a plain closure (bit 5: async, else sync) to device (spec>>3)&3;
//                   5 run_step_closures() on device (spec>>3)&3 from inside; 6 flush that device
//                   from inside; 7 add a plain joined closure from inside
//   burst spec:     bits 0-3 count-1 (1..16); bit 4 sync (else async); bit 5 the last one throws
//
// Device numbers are taken modulo the number of devices. Closures added from inside closures are
// always plain, so the program bounds the number of closures and of step ends.
//
// Invariants (a violation prints what failed and the input in hex, then traps):
//   - every closure is destroyed exactly once and runs at most once;
//   - closures that did not run == discarded closures reported (async_closure_error::discarded()
//     and the shutdown report) + never-run closures reported (shutdown report) + sync closures
//     dropped behind a sync failure in their step (counted exactly: a dropped closure is one
//     destroyed unrun inside the step end, on this thread, after a closure of its step threw);
//   - every thrown exception is reported exactly once: a sync one (or an async one in sync mode)
//     propagates unchanged out of the run_step_closures() that ran it and is the first failure of
//     that step; an async or joined one comes back once, as async_closure_error naming its device
//     ("joined" for joined closures), or in the shutdown report; nothing else is reported;
//   - no sync closure runs outside its device's step end or after a failure in its step;
//   - per device, the async closures added by the driver run in the order added (not in sync
//     mode, where concurrent step ends of one device may run their batches concurrently); the
//     driver's joined closures run in the order added;
//   - a joined closure of global step w runs only once every non-retired device ended step w;
//     in lockstep (without sync mode) a driver-added async closure added while its device was at
//     step s runs only once every non-retired device ended step s (unless its own is retired, or
//     the scheduler is being destroyed: the destructor lifts the gates);
//   - run_step_closures() from inside a sync closure of the same device (with no async closure in
//     between on that thread) is refused with stepflow::error, and only then; flush() from inside
//     an async or joined closure is refused with stepflow::error, and only then;
//   - scheduler::retire() returns true exactly the first time for each device;
//   - in lockstep, a flush the driver knows can complete (every other non-retired device is at
//     most one step behind everything this device can have handed over) completes within 5 s;
//   - no input runs for more than 20 s (a watchdog aborts and prints the input).
//
// Lockstep without sync mode: a device that never steps holds the others back, so the driver only
// ends a step on a bounded queue when it cannot block forever (every other non-retired device has
// ended at least as many steps as this step end can be preceded by; skipped otherwise), and its
// flushes are flush_for() with a short timeout unless it knows they complete.
//
// Built twice from this file: step_closures_fuzz (-fsanitize=fuzzer) and, with
// STEPFLOW_FUZZ_REPLAY, step_closures_fuzz_replay, a plain program that runs the files and
// directories given as arguments (`--repeat=N` runs each N times).
//
// Environment: STEPFLOW_FUZZ_TRACE=1 prints every operation and closure event (for reproducers).

#include <stepflow/stepflow.hpp>

#include <oneapi/tbb/global_control.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#ifdef STEPFLOW_FUZZ_REPLAY
#include <filesystem>
#include <fstream>
#include <iterator>
#endif

namespace {

using namespace std::chrono_literals;
using stepflow::async_closure_error;
using stepflow::device_context;
using stepflow::run_async;
using stepflow::scheduler;

constexpr std::size_t max_ops = 512;
constexpr int max_devices = 4;
constexpr std::size_t max_burst = 16;
constexpr auto hang_limit = 20s;
constexpr auto known_complete_flush_limit = 5s;
constexpr auto short_flush = 1ms;

// --- the input being run, for failure messages and the watchdog ----------------------------------

struct current_input {
  std::mutex mutex;
  std::vector<std::uint8_t> bytes;          // guarded by mutex
  std::atomic<std::int64_t> started_ns{0};  // 0: no input running
  std::atomic<int> op{-1};                  // index of the operation being run
};

current_input& input() {
  static current_input* in = new current_input;  // never destroyed: the watchdog may read it
  return *in;
}

// STEPFLOW_FUZZ_TRACE=1: print every operation and closure event to stderr (for reproducers).
bool tracing() {
  static const bool on = [] {
    const char* v = std::getenv("STEPFLOW_FUZZ_TRACE");
    return v != nullptr && *v != '\0' && *v != '0';
  }();
  return on;
}

void trace(const char* format, ...) __attribute__((format(printf, 1, 2)));
void trace(const char* format, ...) {
  if (!tracing()) return;
  static std::mutex m;
  std::lock_guard lock(m);
  va_list args;
  va_start(args, format);
  std::vfprintf(stderr, format, args);
  va_end(args);
  std::fputc('\n', stderr);
}

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void print_input_locked(const std::vector<std::uint8_t>& bytes) {
  std::fprintf(stderr, "input (%zu bytes, hex):", bytes.size());
  for (std::size_t i = 0; i < bytes.size() && i < 4096; ++i) {
    std::fprintf(stderr, "%s%02x", i % 32 == 0 ? "\n  " : "", bytes[i]);
  }
  std::fprintf(stderr, "%s\n", bytes.size() > 4096 ? "\n  ..." : "");
}

[[noreturn]] void fail(const char* format, ...) __attribute__((format(printf, 1, 2)));
[[noreturn]] void fail(const char* format, ...) {
  static std::mutex once;
  std::lock_guard lock(once);  // one report even if several threads fail at once
  std::fprintf(stderr,
               "\nstep_closures_fuzz: invariant violated (operation %d): ", input().op.load());
  va_list args;
  va_start(args, format);
  std::vfprintf(stderr, format, args);
  va_end(args);
  std::fprintf(stderr, "\n");
  {
    std::lock_guard in(input().mutex);
    print_input_locked(input().bytes);
  }
  std::fflush(stderr);
  __builtin_trap();
}

void start_watchdog_once() {
  static std::once_flag started;
  std::call_once(started, [] {
    std::thread([] {
      const auto limit = std::chrono::duration_cast<std::chrono::nanoseconds>(hang_limit).count();
      for (;;) {
        std::this_thread::sleep_for(250ms);
        const std::int64_t began = input().started_ns.load();
        if (began != 0 && now_ns() - began > limit) {
          std::fprintf(stderr,
                       "\nstep_closures_fuzz: [watchdog] one input ran for more than %lld s "
                       "(a hang or deadlock) at operation %d; aborting\n",
                       static_cast<long long>(
                           std::chrono::duration_cast<std::chrono::seconds>(hang_limit).count()),
                       input().op.load());
          {
            std::lock_guard in(input().mutex);
            print_input_locked(input().bytes);
          }
          std::fflush(stderr);
          std::abort();
        }
      }
    }).detach();
  });
}

// --- the program ---------------------------------------------------------------------------------

struct config {
  int devices = 1;
  std::size_t max_queue = 1;
  bool sync_mode = false;
  bool lockstep = false;
  int tbb_threads = 0;  // 0: oneTBB's default
  std::chrono::microseconds linger{100};
};

/// The linger of a program's `index`-th scheduler (0 for the first; see decode_config).
std::chrono::microseconds linger_of(std::size_t index) {
  static constexpr std::array<std::chrono::microseconds, 3> lingers{
      std::chrono::microseconds(100), std::chrono::microseconds(0), std::chrono::seconds(1)};
  return lingers[index % lingers.size()];
}

config decode_config(std::uint8_t b) {
  static constexpr std::array<std::size_t, 4> queues{1, 2, 7, 0};
  static constexpr std::array<int, 4> threads{0, 1, 2, 4};
  config c;
  c.devices = 1 + (b & 3);
  c.max_queue = queues[(b >> 2) & 3];
  c.sync_mode = ((b >> 4) & 1) != 0;
  c.lockstep = ((b >> 5) & 1) != 0;
  c.tbb_threads = threads[(b >> 6) & 3];
  return c;
}

enum class behaviour : std::uint8_t {
  plain,
  throw_std,
  throw_int,
  add_inner,
  end_step,
  flush_inside,
  add_joined_inner,
};

struct closure_spec {
  behaviour what = behaviour::plain;
  int target = 0;            // raw device number (taken modulo the device count)
  bool inner_async = false;  // add_inner: async, else sync
};

closure_spec decode_spec(std::uint8_t s) {
  static constexpr std::array<behaviour, 8> table{
      behaviour::plain,        behaviour::plain,           behaviour::throw_std,
      behaviour::throw_int,    behaviour::add_inner,       behaviour::end_step,
      behaviour::flush_inside, behaviour::add_joined_inner};
  return {table[s & 7], (s >> 3) & 3, ((s >> 5) & 1) != 0};
}

enum class op_code : std::uint8_t {
  add_sync,
  add_async,
  add_joined,
  burst,
  end_step,
  flush,
  flush_for,
  scheduler_flush,
  retire,
  recreate,
  end_all,
};

struct operation {
  op_code code = op_code::end_step;
  int device = 0;  // raw
  closure_spec spec;
  std::size_t count = 0;  // burst
  bool burst_sync = false;
  bool burst_throws = false;
  int timeout_ms = 0;
  config cfg;  // recreate
};

struct program {
  config first;
  std::vector<operation> ops;
  std::size_t max_closures = 0;  // an upper bound, for the model's capacity
};

class reader {
 public:
  reader(const std::uint8_t* data, std::size_t size) : data_(data), size_(size) {}
  bool more() const { return pos_ < size_; }
  std::uint8_t next() { return pos_ < size_ ? data_[pos_++] : 0; }

 private:
  const std::uint8_t* data_;
  std::size_t size_;
  std::size_t pos_ = 0;
};

program decode(const std::uint8_t* data, std::size_t size) {
  reader r(data, size);
  program p;
  p.first = decode_config(r.next());
  while (r.more() && p.ops.size() < max_ops) {
    const std::uint8_t b = r.next();
    operation o;
    o.device = (b >> 4) & 3;
    std::size_t closures = 0;
    switch (b & 15) {
      case 0:
      case 1:
        o.code = op_code::add_sync;
        o.spec = decode_spec(r.next());
        closures = 1;
        break;
      case 2:
      case 3:
      case 4:
        o.code = op_code::add_async;
        o.spec = decode_spec(r.next());
        closures = 1;
        break;
      case 5:
        o.code = op_code::add_joined;
        o.spec = decode_spec(r.next());
        closures = 1;
        break;
      case 6: {
        const std::uint8_t s = r.next();
        o.code = op_code::burst;
        o.count = 1 + (s & 15);
        o.burst_sync = ((s >> 4) & 1) != 0;
        o.burst_throws = ((s >> 5) & 1) != 0;
        closures = o.count;
        break;
      }
      case 7:
      case 8:
      case 9:
        o.code = op_code::end_step;
        break;
      case 10:
        o.code = op_code::flush;
        break;
      case 11: {
        static constexpr std::array<int, 4> timeouts{0, 1, 2, 5};
        o.code = op_code::flush_for;
        o.timeout_ms = timeouts[(b >> 6) & 3];
        break;
      }
      case 12:
        o.code = op_code::scheduler_flush;
        break;
      case 13:
        o.code = op_code::retire;
        break;
      case 14:
        o.code = op_code::recreate;
        o.cfg = decode_config(r.next());
        break;
      default:
        o.code = op_code::end_all;
        break;
    }
    // Each closure the driver adds can add at most one more from inside.
    p.max_closures += 2 * closures;
    p.ops.push_back(o);
  }
  static_assert(max_burst == 16);
  return p;
}

// --- the model -----------------------------------------------------------------------------------

enum class kind : std::uint8_t { sync, async, joined };

struct record {
  // Written by the creating thread before the closure is handed to stepflow.
  kind k = kind::sync;
  int device = 0;  // joined: -1
  closure_spec spec;
  std::int64_t seq = -1;       // driver-added async or joined closures: their add order
  std::uint64_t added_at = 0;  // async: the device's step() when added
  // Updated by whoever runs, destroys or reports the closure.
  std::atomic<int> runs{0};
  std::atomic<int> destroys{0};
  std::atomic<int> reports{0};
  std::atomic<bool> threw{false};
  std::atomic<bool> dropped{false};
};

struct totals {
  std::atomic<std::uint64_t> inputs{0}, schedulers{0}, closures{0}, ran{0}, steps{0}, failures{0},
      skipped_step_ends{0}, flush_timeouts{0};
};
totals& stats() {
  static totals* t = new totals;
  return *t;
}

class harness;

// Per thread: the step ends this thread is inside (innermost last), and markers for the async or
// joined closures it is running, which hide the step ends below them the way stepflow's own
// frames do.
struct frame {
  const harness* owner;
  int device;  // -1: an async/joined closure marker
  bool failed = false;
  std::int64_t first_failure = -1;
};
thread_local std::vector<frame> frames;

class frame_guard {
 public:
  frame_guard(const harness* owner, int device) : index_(frames.size()) {
    frames.push_back(frame{owner, device});
  }
  ~frame_guard() { frames.pop_back(); }
  frame_guard(const frame_guard&) = delete;
  frame_guard& operator=(const frame_guard&) = delete;
  frame& get() const { return frames[index_]; }

 private:
  std::size_t index_;
};

struct failure_id {
  std::size_t id;
  bool ok;
};

// Which closure an exception came from: std::runtime_error("fuzz:<id>") or an int.
failure_id identify(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const stepflow::error&) {
    return {0, false};
  } catch (const std::runtime_error& r) {
    const char* w = r.what();
    if (std::strncmp(w, "fuzz:", 5) != 0) return {0, false};
    return {static_cast<std::size_t>(std::strtoull(w + 5, nullptr, 10)), true};
  } catch (int id) {
    return {static_cast<std::size_t>(id), id >= 0};
  } catch (...) {
    return {0, false};
  }
}

std::string describe(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& x) {
    return std::string("std::exception: ") + x.what();
  } catch (int i) {
    return "int " + std::to_string(i);
  } catch (...) {
    return "an unknown type";
  }
}

class harness {
 public:
  harness(const config& c, std::size_t capacity) : cfg_(c), records_(capacity) {
    if (c.tbb_threads != 0) {
      limit_.emplace(tbb::global_control::max_allowed_parallelism,
                     static_cast<std::size_t>(c.tbb_threads));
    }
    stepflow::options o;
    o.max_queue_size = c.max_queue;
    o.worker_linger = c.linger;
    o.sync_mode = c.sync_mode;
    o.ordering =
        c.lockstep ? stepflow::step_ordering::lockstep : stepflow::step_ordering::per_device;
    for (int d = 0; d < c.devices; ++d) o.participants.push_back(name(d));
    o.report_to_stderr = false;
    o.on_shutdown_report = [this](const stepflow::shutdown_report& r) { shutdown_report(r); };
    sched_ = std::make_unique<scheduler>(o);
    s_ = sched_.get();
    for (int d = 0; d < c.devices; ++d)
      devices_[static_cast<std::size_t>(d)] = &s_->device(name(d));
    stats().schedulers.fetch_add(1, std::memory_order_relaxed);
    trace(
        "scheduler: %d devices, max_queue_size %zu, sync_mode %d, lockstep %d, tbb threads %d, "
        "linger %lld us",
        c.devices, c.max_queue, c.sync_mode, c.lockstep, c.tbb_threads,
        static_cast<long long>(c.linger.count()));
  }

  harness(const harness&) = delete;
  harness& operator=(const harness&) = delete;

  ~harness() {
    if (sched_) finish();
  }

  /// Destroys the scheduler (with whatever is pending), then checks every invariant.
  void finish() {
    trace("destroying the scheduler");
    // The destructor lifts the lockstep gates: a device that stopped stepping must not hold the
    // others' closures back forever.
    destroying_.store(true);
    sched_.reset();
    check();
    limit_.reset();
  }

  void run(const operation& o) {
    const int d = o.device % cfg_.devices;
    static constexpr std::array<const char*, 11> names{
        "add_sync",  "add_async",       "add_joined", "burst",    "end_step", "flush",
        "flush_for", "scheduler_flush", "retire",     "recreate", "end_all"};
    trace("op %d: %s d%d", input().op.load(), names[static_cast<std::size_t>(o.code)], d);
    switch (o.code) {
      case op_code::add_sync:
        add(kind::sync, d, o.spec, true);
        break;
      case op_code::add_async:
        add(kind::async, d, o.spec, true);
        break;
      case op_code::add_joined:
        add(kind::joined, -1, o.spec, true);
        break;
      case op_code::burst:
        for (std::size_t i = 0; i < o.count; ++i) {
          closure_spec s;
          if (o.burst_throws && i + 1 == o.count) s.what = behaviour::throw_std;
          add(o.burst_sync ? kind::sync : kind::async, d, s, true);
        }
        break;
      case op_code::end_step:
        end_step(d);
        break;
      case op_code::end_all:
        for (int i = 0; i < cfg_.devices; ++i) end_step(i);
        break;
      case op_code::flush:
        flush_device(d);
        break;
      case op_code::flush_for:
        try {
          if (!device(d).flush_for(std::chrono::milliseconds(o.timeout_ms))) {
            stats().flush_timeouts.fetch_add(1, std::memory_order_relaxed);
          }
        } catch (const async_closure_error& e) {
          reported(e, d);
        }
        break;
      case op_code::scheduler_flush:
        flush_scheduler();
        break;
      case op_code::retire: {
        const bool first = !retired_[static_cast<std::size_t>(d)].exchange(true);
        const bool result = s_->retire(name(d));
        if (result != first) {
          fail("scheduler::retire(\"%s\") returned %d, expected %d", name(d).c_str(), result,
               first);
        }
        break;
      }
      case op_code::recreate:
        break;  // the driver replaces the whole harness
    }
  }

  // Called by the closures (on any thread).
  void run_closure(std::size_t id, std::uint64_t joined_step);
  void destroyed(std::size_t id);

 private:
  static std::string name(int d) { return "d" + std::to_string(d); }
  std::string steps_string() const {
    std::string out;
    for (int d = 0; d < cfg_.devices; ++d) {
      out += " d" + std::to_string(d) + "=" +
             std::to_string(devices_[static_cast<std::size_t>(d)]->step());
    }
    return out;
  }
  device_context& device(int d) { return *devices_[static_cast<std::size_t>(d)]; }
  record& rec(std::size_t id) { return records_[id]; }

  bool inline_kind(const record& r) const {
    return r.k == kind::sync || (r.k == kind::async && cfg_.sync_mode);
  }
  // Whether blocking calls (flush, step ends on a bounded queue) can wait for another device.
  bool held_back() const { return cfg_.lockstep && !cfg_.sync_mode; }
  bool retired(int d) const { return retired_[static_cast<std::size_t>(d)].load(); }

  std::size_t new_record(kind k, int dev, const closure_spec& spec, bool from_driver) {
    const std::size_t id = next_.fetch_add(1);
    if (id >= records_.size()) fail("model capacity %zu exceeded (a decoder bug)", records_.size());
    record& r = rec(id);
    r.k = k;
    r.device = dev;
    r.spec = spec;
    if (from_driver && k == kind::async) {
      r.seq = next_seq_[static_cast<std::size_t>(dev)]++;
      r.added_at = device(dev).step();
    } else if (from_driver && k == kind::joined) {
      r.seq = next_joined_seq_++;
    }
    if (spec.what == behaviour::end_step) {
      pending_enders_[static_cast<std::size_t>(spec.target % cfg_.devices)].fetch_add(1);
    }
    stats().closures.fetch_add(1, std::memory_order_relaxed);
    trace("  new #%zu: kind %d, device %d, behaviour %d (target %d), seq %lld, added at step %llu",
          id, static_cast<int>(k), dev, static_cast<int>(spec.what), spec.target,
          static_cast<long long>(r.seq), static_cast<unsigned long long>(r.added_at));
    return id;
  }

  // Marks its closure destroyed exactly when the closure object is.
  struct token {
    harness* h;
    std::size_t id;
    token(harness* hh, std::size_t i) : h(hh), id(i) {}
    token(token&& o) noexcept : h(std::exchange(o.h, nullptr)), id(o.id) {}
    token(const token&) = delete;
    token& operator=(const token&) = delete;
    token& operator=(token&&) = delete;
    ~token() {
      if (h != nullptr) h->destroyed(id);
    }
  };

  void add(kind k, int dev, const closure_spec& spec, bool from_driver) {
    const std::size_t id = new_record(k, dev, spec, from_driver);
    switch (k) {
      case kind::sync:
        device(dev).add_step_closure([t = token(this, id)] { t.h->run_closure(t.id, 0); });
        break;
      case kind::async:
        device(dev).add_step_closure(run_async,
                                     [t = token(this, id)] { t.h->run_closure(t.id, 0); });
        break;
      case kind::joined:
        s_->add_joined_step_closure(
            [t = token(this, id)](std::uint64_t step) { t.h->run_closure(t.id, step); });
        break;
    }
  }

  // The innermost step end of `dev` on this thread, or -1.
  static std::ptrdiff_t innermost_step(const harness* h, int dev) {
    for (std::size_t i = frames.size(); i-- > 0;) {
      if (frames[i].owner == h && frames[i].device == dev) return static_cast<std::ptrdiff_t>(i);
    }
    return -1;
  }
  // Inside an async or joined closure (stepflow: async_frame::active()).
  static bool in_async() {
    return std::any_of(frames.begin(), frames.end(), [](const frame& f) { return f.device < 0; });
  }
  // Inside a sync closure of `dev` not hidden by an async closure (stepflow: sync_frame::inside).
  bool inside_sync_of(int dev) const {
    for (std::size_t i = frames.size(); i-- > 0;) {
      if (frames[i].device < 0) return false;
      if (frames[i].owner == this && frames[i].device == dev) return true;
    }
    return false;
  }

  // In lockstep: the most step ends device `d` can have started or will start besides one the
  // driver is about to make (reads the in-flight enders first, so the sum never undercounts).
  std::uint64_t step_upper_bound(int d) const {
    const std::int64_t pending = pending_enders_[static_cast<std::size_t>(d)].load();
    if (pending < 0) fail("pending step enders of d%d went negative", d);
    return devices_[static_cast<std::size_t>(d)]->step() + static_cast<std::uint64_t>(pending);
  }
  // Every other non-retired device has ended at least `steps` steps.
  bool others_reached(int d, std::uint64_t steps) const {
    for (int p = 0; p < cfg_.devices; ++p) {
      if (p != d && !retired(p) && devices_[static_cast<std::size_t>(p)]->step() < steps) {
        return false;
      }
    }
    return true;
  }
  // A step end of `d` (by the driver, or from a sync closure it runs) cannot wait forever for
  // room: the batches ahead of its own (steps up to its own) start once every other non-retired
  // participant ended the step before it.
  bool step_end_cannot_hang(int d) const {
    if (!held_back() || cfg_.max_queue == 0 || retired(d)) return true;
    return others_reached(d, step_upper_bound(d));
  }
  // A flush of `d` completes: its last handed-over step can start once every other non-retired
  // participant ended the step before it.
  bool flush_completes(int d) const {
    if (!held_back() || retired(d)) return true;
    const std::uint64_t upper = step_upper_bound(d);
    return others_reached(d, upper == 0 ? 0 : upper - 1);
  }

  void end_step(int d) {
    device_context& dc = device(d);
    const bool refused = inside_sync_of(d);
    if (!refused && !in_async() && !step_end_cannot_hang(d)) {
      stats().skipped_step_ends.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    frame_guard g(this, d);
    trace("  step end d%d (from step %llu)", d, static_cast<unsigned long long>(dc.step()));
    try {
      dc.run_step_closures();
      if (refused)
        fail("run_step_closures() on d%d inside its own sync closure was not refused", d);
      stats().steps.fetch_add(1, std::memory_order_relaxed);
    } catch (const async_closure_error& e) {
      if (refused)
        fail("run_step_closures() on d%d inside its own sync closure reported instead", d);
      reported(e, d);
    } catch (const stepflow::error& e) {
      if (!refused) fail("run_step_closures() on d%d threw stepflow::error: %s", d, e.what());
    } catch (...) {
      sync_failure(std::current_exception(), d, g.get());
    }
  }

  void flush_device(int d) {
    try {
      if (!held_back()) {
        device(d).flush();
      } else if (flush_completes(d)) {
        if (!device(d).flush_for(known_complete_flush_limit)) {
          fail("flush of d%d, which can complete, did not within %lld s", d,
               static_cast<long long>(known_complete_flush_limit.count()));
        }
      } else if (!device(d).flush_for(short_flush)) {
        stats().flush_timeouts.fetch_add(1, std::memory_order_relaxed);
      }
    } catch (const async_closure_error& e) {
      reported(e, d);
    }
  }

  void flush_scheduler() {
    try {
      if (!held_back()) {
        s_->flush();
        return;
      }
      bool completes = true;
      for (int d = 0; d < cfg_.devices; ++d) completes = completes && flush_completes(d);
      if (completes) {
        if (!s_->flush_for(known_complete_flush_limit)) {
          fail("scheduler::flush, which can complete, did not within %lld s",
               static_cast<long long>(known_complete_flush_limit.count()));
        }
      } else if (!s_->flush_for(short_flush)) {
        stats().flush_timeouts.fetch_add(1, std::memory_order_relaxed);
      }
    } catch (const async_closure_error& e) {
      reported(e, -1);
    }
  }

  void flush_inside(int d) {
    const bool refused = in_async();
    try {
      if (!held_back()) {
        device(d).flush();
      } else if (!device(d).flush_for(short_flush)) {
        stats().flush_timeouts.fetch_add(1, std::memory_order_relaxed);
      }
      if (refused) fail("flush() on d%d inside an async closure was not refused", d);
    } catch (const async_closure_error& e) {
      if (refused) fail("flush() on d%d inside an async closure reported instead of refusing", d);
      reported(e, d);
    } catch (const stepflow::error& e) {
      if (!refused)
        fail("flush() on d%d inside a sync closure threw stepflow::error: %s", d, e.what());
    }
  }

  // An exception propagated out of run_step_closures() on `d`: the first failure of its step.
  void sync_failure(const std::exception_ptr& e, int d, const frame& f) {
    const failure_id fid = identify(e);
    if (!fid.ok || fid.id >= next_.load()) {
      fail("run_step_closures() on d%d threw %s", d, describe(e).c_str());
    }
    record& r = rec(fid.id);
    if (!inline_kind(r) || r.device != d) {
      fail("run_step_closures() on d%d threw the exception of closure %zu (kind %d, device %d)", d,
           fid.id, static_cast<int>(r.k), r.device);
    }
    if (f.first_failure != static_cast<std::int64_t>(fid.id)) {
      fail(
          "run_step_closures() on d%d threw closure %zu's exception; its step's first failure "
          "was %lld",
          d, fid.id, static_cast<long long>(f.first_failure));
    }
    if (!r.threw.load()) fail("closure %zu reported but never threw", fid.id);
    r.reports.fetch_add(1);
    stats().failures.fetch_add(1, std::memory_order_relaxed);
  }

  // One report of an async or joined failure; `d` is the device asked (-1: scheduler::flush).
  void reported(const std::exception_ptr& original, const std::string& device_name,
                std::size_t discarded, int d, const char* how) {
    const failure_id fid = identify(original);
    if (!fid.ok || fid.id >= next_.load()) {
      fail("%s named device '%s' and carried %s", how, device_name.c_str(),
           describe(original).c_str());
    }
    record& r = rec(fid.id);
    const bool async = r.k == kind::async && !cfg_.sync_mode;
    if (!async && r.k != kind::joined) {
      fail("%s carried closure %zu, which is not asynchronous", how, fid.id);
    }
    const std::string expected = r.k == kind::joined ? std::string("joined") : name(r.device);
    if (device_name != expected) {
      fail("%s named device '%s' for closure %zu of '%s'", how, device_name.c_str(), fid.id,
           expected.c_str());
    }
    if (d >= 0 && device_name != name(d) && device_name != "joined") {
      fail("%s on d%d reported device '%s'", how, d, device_name.c_str());
    }
    if (!r.threw.load()) fail("%s carried closure %zu, which never threw", how, fid.id);
    r.reports.fetch_add(1);
    discarded_.fetch_add(discarded);
    stats().failures.fetch_add(1, std::memory_order_relaxed);
  }
  void reported(const async_closure_error& e, int d) {
    reported(e.original(), e.device(), e.discarded(), d, "async_closure_error");
  }

  void shutdown_report(const stepflow::shutdown_report& report) {
    for (const stepflow::device_shutdown_report& d : report.devices) {
      if (d.unreported_error) {
        reported(d.unreported_error, d.device, d.discarded, -1, "the shutdown report");
      } else if (d.discarded != 0) {
        fail("the shutdown report has %zu discarded closures on '%s' and no failure", d.discarded,
             d.device.c_str());
      }
      never_run_.fetch_add(d.never_run);
    }
  }

  void check() {
    const std::size_t n = next_.load();
    std::size_t not_run = 0;
    std::size_t dropped = 0;
    for (std::size_t i = 0; i < n; ++i) {
      const record& r = rec(i);
      if (r.destroys.load() != 1) fail("closure %zu destroyed %d times", i, r.destroys.load());
      if (r.runs.load() > 1) fail("closure %zu ran %d times", i, r.runs.load());
      const int expected_reports = r.threw.load() ? 1 : 0;
      if (r.reports.load() != expected_reports) {
        fail("closure %zu (kind %d, device %d) threw %d and was reported %d times", i,
             static_cast<int>(r.k), r.device, r.threw.load(), r.reports.load());
      }
      if (r.runs.load() == 0) ++not_run;
      if (r.dropped.load()) ++dropped;
    }
    const std::size_t accounted = discarded_.load() + never_run_.load() + dropped;
    if (not_run != accounted) {
      fail(
          "%zu closures did not run, but %zu discarded + %zu never run + %zu dropped = %zu were "
          "reported (config: %d devices, queue %zu, sync_mode %d, lockstep %d, tbb threads %d)",
          not_run, discarded_.load(), never_run_.load(), dropped, accounted, cfg_.devices,
          cfg_.max_queue, cfg_.sync_mode, cfg_.lockstep, cfg_.tbb_threads);
    }
  }

  const config cfg_;
  std::optional<tbb::global_control> limit_;
  std::vector<record> records_;
  std::atomic<std::size_t> next_{0};
  std::array<std::int64_t, max_devices> next_seq_{};  // driver only
  std::int64_t next_joined_seq_ = 0;                  // driver only
  std::array<std::atomic<std::int64_t>, max_devices> last_seq_{{{-1}, {-1}, {-1}, {-1}}};
  std::atomic<std::int64_t> last_joined_seq_{-1};
  // Closures that end a device's step from inside and have not finished doing so.
  std::array<std::atomic<std::int64_t>, max_devices> pending_enders_{};
  std::array<std::atomic<bool>, max_devices> retired_{};
  std::atomic<bool> destroying_{false};
  std::atomic<std::size_t> discarded_{0};
  std::atomic<std::size_t> never_run_{0};
  std::array<device_context*, max_devices> devices_{};
  std::unique_ptr<scheduler> sched_;  // last: destroyed first, while the model is alive
  // The scheduler, also while its destructor runs closures (unique_ptr::reset nulls sched_ first).
  scheduler* s_ = nullptr;
};

void harness::destroyed(std::size_t id) {
  record& r = rec(id);
  r.destroys.fetch_add(1);
  trace("  destroyed #%zu", id);
  if (r.runs.load() != 0) return;
  // Unrun: it will never end a step now.
  if (r.spec.what == behaviour::end_step) {
    pending_enders_[static_cast<std::size_t>(r.spec.target % cfg_.devices)].fetch_sub(1);
  }
  // Destroyed unrun inside a step end of its device after a closure of that step threw: dropped.
  if (inline_kind(r)) {
    const std::ptrdiff_t f = innermost_step(this, r.device);
    if (f >= 0 && frames[static_cast<std::size_t>(f)].failed) r.dropped.store(true);
  }
}

void harness::run_closure(std::size_t id, std::uint64_t joined_step) {
  record& r = rec(id);
  if (r.runs.fetch_add(1) != 0) fail("closure %zu ran twice", id);
  trace("  run #%zu (joined step %llu); steps:%s", id, static_cast<unsigned long long>(joined_step),
        steps_string().c_str());
  stats().ran.fetch_add(1, std::memory_order_relaxed);
  std::optional<frame_guard> marker;
  std::ptrdiff_t step_frame = -1;
  if (inline_kind(r)) {
    step_frame = innermost_step(this, r.device);
    if (step_frame < 0) {
      fail("sync closure %zu of d%d ran outside a step end of its device", id, r.device);
    }
    const frame& f = frames[static_cast<std::size_t>(step_frame)];
    if (f.failed) {
      fail("sync closure %zu of d%d ran after closure %lld of its step threw", id, r.device,
           static_cast<long long>(f.first_failure));
    }
  } else {
    marker.emplace(this, -1);
    if (r.k == kind::async && r.seq >= 0) {
      std::atomic<std::int64_t>& last = last_seq_[static_cast<std::size_t>(r.device)];
      if (r.seq <= last.load()) {
        fail("async closure %zu (#%lld added to d%d) ran after #%lld: FIFO broken", id,
             static_cast<long long>(r.seq), r.device, static_cast<long long>(last.load()));
      }
      last.store(r.seq);
      if (cfg_.lockstep && !retired(r.device) && !destroying_.load()) {
        for (int p = 0; p < cfg_.devices; ++p) {
          const std::uint64_t s = devices_[static_cast<std::size_t>(p)]->step();
          if (!retired(p) && s < r.added_at) {
            fail(
                "lockstep: async closure %zu, added to d%d at its step %llu, ran while d%d had "
                "ended only %llu steps",
                id, r.device, static_cast<unsigned long long>(r.added_at), p,
                static_cast<unsigned long long>(s));
          }
        }
      }
    }
    if (r.k == kind::joined) {
      if (r.seq >= 0) {
        if (r.seq <= last_joined_seq_.load()) {
          fail("joined closure %zu (#%lld) ran after #%lld: order broken", id,
               static_cast<long long>(r.seq), static_cast<long long>(last_joined_seq_.load()));
        }
        last_joined_seq_.store(r.seq);
      }
      if (joined_step == 0) fail("joined closure %zu ran with step 0", id);
      for (int p = 0; p < cfg_.devices; ++p) {
        const std::uint64_t s = devices_[static_cast<std::size_t>(p)]->step();
        if (!retired(p) && s < joined_step) {
          fail("joined closure %zu of global step %llu ran while d%d had ended only %llu steps", id,
               static_cast<unsigned long long>(joined_step), p, static_cast<unsigned long long>(s));
        }
      }
    }
  }

  const int target = r.spec.target % cfg_.devices;
  switch (r.spec.what) {
    case behaviour::plain:
      break;
    case behaviour::throw_std:
    case behaviour::throw_int:
      r.threw.store(true);
      if (step_frame >= 0) {
        frame& f = frames[static_cast<std::size_t>(step_frame)];
        f.failed = true;
        f.first_failure = static_cast<std::int64_t>(id);
      }
      if (r.spec.what == behaviour::throw_std)
        throw std::runtime_error("fuzz:" + std::to_string(id));
      throw static_cast<int>(id);
    case behaviour::add_inner:
      add(r.spec.inner_async ? kind::async : kind::sync, target, closure_spec{}, false);
      break;
    case behaviour::end_step:
      end_step(target);
      pending_enders_[static_cast<std::size_t>(target)].fetch_sub(1);
      break;
    case behaviour::flush_inside:
      flush_inside(target);
      break;
    case behaviour::add_joined_inner:
      add(kind::joined, -1, closure_spec{}, false);
      break;
  }
}

void run_program(const program& p) {
  try {
    auto h = std::make_unique<harness>(p.first, p.max_closures);
    std::size_t schedulers = 1;
    for (std::size_t i = 0; i < p.ops.size(); ++i) {
      input().op.store(static_cast<int>(i));
      const operation& o = p.ops[i];
      if (o.code == op_code::recreate) {
        h->finish();
        h.reset();
        config next = o.cfg;
        next.linger = linger_of(schedulers++);
        h = std::make_unique<harness>(next, p.max_closures);
      } else {
        h->run(o);
      }
    }
    input().op.store(static_cast<int>(p.ops.size()));
    h->finish();
  } catch (...) {
    fail("an operation threw %s", describe(std::current_exception()).c_str());
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  start_watchdog_once();
  {
    std::lock_guard lock(input().mutex);
    input().bytes.assign(data, data + size);
  }
  input().op.store(-1);
  input().started_ns.store(now_ns());
  stats().inputs.fetch_add(1, std::memory_order_relaxed);
  run_program(decode(data, size));
  input().started_ns.store(0);
  return 0;
}

#ifdef STEPFLOW_FUZZ_REPLAY
// A plain program: runs every file given, and every file in every directory given (sorted).
int main(int argc, char** argv) {
  namespace fs = std::filesystem;
  int repeat = 1;
  std::vector<fs::path> files;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--repeat=", 0) == 0) {
      repeat = std::max(1, std::atoi(arg.c_str() + 9));
    } else if (fs::is_directory(arg)) {
      std::vector<fs::path> in_dir;
      for (const fs::directory_entry& e : fs::directory_iterator(arg)) {
        if (e.is_regular_file()) in_dir.push_back(e.path());
      }
      std::sort(in_dir.begin(), in_dir.end());
      files.insert(files.end(), in_dir.begin(), in_dir.end());
    } else if (fs::is_regular_file(arg)) {
      files.emplace_back(arg);
    } else {
      std::fprintf(stderr, "step_closures_fuzz_replay: no such file or directory: %s\n",
                   arg.c_str());
      return 2;
    }
  }
  if (files.empty()) {
    std::fprintf(stderr,
                 "usage: step_closures_fuzz_replay [--repeat=N] <file or directory>...\n"
                 "runs each input (N times) through the fuzz target's program and checks\n");
    return 2;
  }
  const auto began = std::chrono::steady_clock::now();
  for (const fs::path& f : files) {
    std::ifstream in(f, std::ios::binary);
    const std::vector<std::uint8_t> bytes{std::istreambuf_iterator<char>(in),
                                          std::istreambuf_iterator<char>()};
    std::printf("%s (%zu bytes)\n", f.string().c_str(), bytes.size());
    std::fflush(stdout);
    for (int r = 0; r < repeat; ++r) LLVMFuzzerTestOneInput(bytes.data(), bytes.size());
  }
  const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                      std::chrono::steady_clock::now() - began)
                      .count();
  const totals& t = stats();
  std::printf(
      "replayed %zu inputs x %d in %lld ms: %llu schedulers, %llu closures (%llu ran), %llu step "
      "ends, %llu failures reported, %llu step ends skipped (lockstep), %llu flush timeouts; "
      "every invariant held\n",
      files.size(), repeat, static_cast<long long>(ms),
      static_cast<unsigned long long>(t.schedulers.load()),
      static_cast<unsigned long long>(t.closures.load()),
      static_cast<unsigned long long>(t.ran.load()),
      static_cast<unsigned long long>(t.steps.load()),
      static_cast<unsigned long long>(t.failures.load()),
      static_cast<unsigned long long>(t.skipped_step_ends.load()),
      static_cast<unsigned long long>(t.flush_timeouts.load()));
  return 0;
}
#endif
