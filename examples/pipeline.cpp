// pipeline: step closures inside a oneTBB parallel_pipeline.
//
//   read (serial_in_order) -> transform (parallel) -> step (serial_in_order)
//
// The read filter produces batches, the transform filter normalises them on any number of workers,
// and the step filter, which sees the batches in their original order, "trains" on each one: it
// queues a sync closure (a progress line) and an async closure (a slow "upload" of the batch's
// statistics), then ends the device's step with run_step_closures().
//
// Ending a step inside a filter is safe: the sync closures run isolated
// (tbb::this_task_arena::isolate), so this thread does not pick up another pipeline stage while
// it waits, and when the device's async queue is full the filter waits for room without
// deadlocking, even though it occupies a oneTBB worker itself. The full queue then back-pressures
// the whole pipeline instead of letting pending uploads pile up.
//
//   pipeline [--batches N] [--tokens N] [--queue N]

#include <stepflow/stepflow.hpp>

#include <oneapi/tbb/parallel_pipeline.h>

#include <fmt/core.h>

#include <charconv>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <numeric>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <vector>

namespace {

struct config {
  int batches = 32;
  std::size_t tokens = 8;  // batches in flight in the pipeline at once
  std::size_t queue = 4;   // max_queue_size: small, so the back-pressure actually happens
};

void print_usage(std::FILE* to) {
  fmt::print(to,
             "usage: pipeline [--batches N] [--tokens N] [--queue N]\n"
             "  --batches N   batches to read, >= 1 (default 32)\n"
             "  --tokens N    batches in flight in the pipeline, >= 1 (default 8)\n"
             "  --queue N     async closures pending per device, 0 = unbounded (default 4)\n"
             "  --help        print this help and exit\n");
}

// Parses "--flag value" pairs; returns false (after printing why) on a bad command line.
bool parse_command_line(std::span<char* const> args, config& cfg, bool& help) {
  for (std::size_t i = 1; i < args.size(); ++i) {
    const std::string_view flag = args[i];
    if (flag == "--help" || flag == "-h") {
      help = true;
      return true;
    }
    if (i + 1 >= args.size()) {
      fmt::print(stderr, "pipeline: error: {} needs a value\n", flag);
      return false;
    }
    const std::string_view text = args[++i];
    long long value = 0;
    const char* last = text.data() + text.size();
    auto [end, ec] = std::from_chars(text.data(), last, value);
    if (ec != std::errc{} || end != last || value < 0 || value > 1'000'000) {
      fmt::print(stderr, "pipeline: error: {} expects an integer in [0, 1000000], got '{}'\n", flag,
                 text);
      return false;
    }
    if (flag == "--batches" && value >= 1) {
      cfg.batches = static_cast<int>(value);
    } else if (flag == "--tokens" && value >= 1) {
      cfg.tokens = static_cast<std::size_t>(value);
    } else if (flag == "--queue") {
      cfg.queue = static_cast<std::size_t>(value);
    } else {
      fmt::print(stderr, "pipeline: error: unknown flag or bad value: {} {}\n", flag, text);
      return false;
    }
  }
  return true;
}

// One batch of fake samples. Moved from filter to filter, never copied.
struct batch {
  int index = 0;
  std::vector<float> samples;
};

// What the async closures compute, read by main after flush(). No lock or atomic: one device's
// async closures run one at a time, in the order added, and flush() publishes their writes.
struct upload_totals {
  int batches = 0;
  int last_index = -1;
  bool in_order = true;
  double sum = 0.0;
};

}  // namespace

int main(int argc, char** argv) {
  config cfg;
  bool help = false;
  if (!parse_command_line(std::span<char* const>(argv, static_cast<std::size_t>(argc)), cfg,
                          help)) {
    print_usage(stderr);
    return 2;
  }
  if (help) {
    print_usage(stdout);
    return 0;
  }

  try {
    // Declared before the scheduler, so it outlives every async closure that refers to it: the
    // scheduler's destructor waits for queued closures even when an exception unwinds this scope.
    upload_totals totals;

    stepflow::options opts;  // the defaults (no environment), then our own queue size
    opts.max_queue_size = cfg.queue;
    stepflow::scheduler sched(opts);
    stepflow::device_context& device = sched.device("gpu0");

    // Read: a serial input filter, called until it says stop.
    int next_batch = 0;
    auto read = [&](tbb::flow_control& fc) {
      if (next_batch == cfg.batches) {
        fc.stop();
        return batch{};
      }
      batch b{next_batch++, std::vector<float>(1024)};
      for (std::size_t i = 0; i < b.samples.size(); ++i) {
        b.samples[i] = static_cast<float>((i * 7 + static_cast<std::size_t>(b.index)) % 101);
      }
      return b;
    };

    // Transform: a parallel filter; several batches are normalised at once.
    auto transform = [](batch b) {
      const float mean =
          std::reduce(b.samples.begin(), b.samples.end()) / static_cast<float>(b.samples.size());
      for (float& s : b.samples) s = (s - mean) / 101.0f;
      return b;
    };

    // Step: serial_in_order, so the device sees the batches in the order they were read.
    auto step = [&](batch b) {
      double energy = 0.0;
      for (float s : b.samples) energy += static_cast<double>(s) * s;

      // Sync: a progress line every 8 batches, printed before run_step_closures returns.
      if (b.index % 8 == 0) {
        device.add_step_closure(
            [](int index, double e) { fmt::print("[gpu0] batch {:3} energy {:.3f}\n", index, e); },
            b.index, energy);
      }

      // Async: the slow part (pretend it uploads the statistics somewhere), off the pipeline's
      // critical path: it runs while this filter already works on later batches.
      device.add_step_closure(stepflow::run_async, [&totals, index = b.index, energy] {
        std::this_thread::sleep_for(std::chrono::microseconds(300));
        if (index != totals.last_index + 1) totals.in_order = false;
        totals.last_index = index;
        totals.sum += energy;
        ++totals.batches;
      });

      // The step barrier, from inside a filter: on whichever thread runs it, often a oneTBB worker.
      device.run_step_closures();
    };

    const auto start = std::chrono::steady_clock::now();
    tbb::parallel_pipeline(
        cfg.tokens, tbb::make_filter<void, batch>(tbb::filter_mode::serial_in_order, read) &
                        tbb::make_filter<batch, batch>(tbb::filter_mode::parallel, transform) &
                        tbb::make_filter<batch, void>(tbb::filter_mode::serial_in_order, step));

    // The pipeline has finished; the last uploads may still be running.
    device.flush();
    const double wall_ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();

    fmt::print(
        "summary: {} batches, {} steps, {} uploads (in order: {}), total energy {:.3f}, {:.1f} "
        "ms\n",
        cfg.batches, device.step(), totals.batches, totals.in_order ? "yes" : "no", totals.sum,
        wall_ms);

    const bool ok = totals.batches == cfg.batches && totals.in_order &&
                    device.step() == static_cast<std::uint64_t>(cfg.batches);
    if (!ok) fmt::print(stderr, "pipeline: error: some uploads are missing or out of order\n");
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "pipeline: error: {}\n", e.what());
    return 1;
  }
}
