// training_loop: a simulated multi-device training loop that logs post-step metrics.
//
// Each device is one std::thread running its own loop, as a data-parallel trainer runs one loop per
// accelerator. Every step
//   1. computes a fake loss with tbb::parallel_for (one step of gradient descent on a small array),
//   2. queues a *sync* step closure that prints the loss every --log-every steps,
//   3. queues an *async* step closure that appends a JSON-lines metrics record to --out,
//   4. the last device to reach the step queues the step's *joined* closure, which runs once every
//      device's async closures of that step have run: it averages the losses they stored and
//      prints the mean every --log-every steps,
//   5. ends the step with run_step_closures(): the async closure is handed to oneTBB's workers and
//      the sync one runs right here, on the device's thread, before the call returns.
// The file writes happen in the background, one at a time per device and in step order, while the
// device thread goes on computing. At most --queue of them wait per device; when a device's queue
// is full, run_step_closures() waits for room (back-pressure instead of unbounded memory).
//
// With --lockstep no device's async closures of step N+1 start before every device's async
// closures of step N, and step N's joined closure, have run. With --trace PATH the scheduler
// records a timeline of every closure (open the file in https://ui.perfetto.dev or
// chrome://tracing). At the end the example prints stepflow's metrics report.
//
//   training_loop [--devices N] [--steps N] [--log-every K] [--queue N] [--out PATH]
//                 [--lockstep] [--trace PATH]

#include <stepflow/stepflow.hpp>

#include <oneapi/tbb/blocked_range.h>
#include <oneapi/tbb/parallel_for.h>

#include <fmt/core.h>
#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <fstream>
#include <iterator>
#include <map>
#include <mutex>
#include <numeric>
#include <optional>
#include <random>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

namespace {

// --- command line
// ----------------------------------------------------------------------------------

struct config {
  int devices = 2;
  int steps = 100;
  int log_every = 10;
  std::optional<std::size_t>
      queue;  // unset: options::from_env() decides (LTC_MAX_ASYNC_QUEUE or 100)
  std::string out = "training_metrics.jsonl";
  bool lockstep = false;
  std::string trace;  // empty: options::from_env() decides (STEPFLOW_TRACE, else no trace)
};

void print_usage(std::FILE* to) {
  fmt::print(
      to,
      "usage: training_loop [--devices N] [--steps N] [--log-every K] [--queue N] [--out PATH]\n"
      "                     [--lockstep] [--trace PATH]\n"
      "\n"
      "Simulates --devices devices, one thread each, each training for --steps steps. Every\n"
      "--log-every steps a sync step closure prints the device's loss; every step an async\n"
      "step closure appends a metrics record to the --out file (JSON lines), and a joined\n"
      "step closure, run once every device's async closures of the step have run, computes\n"
      "the mean loss across devices (printed every --log-every steps). Ends with stepflow's\n"
      "metrics report.\n"
      "\n"
      "  --devices N     simulated devices, 1..64 (default 2)\n"
      "  --steps N       steps per device, >= 1 (default 100)\n"
      "  --log-every K   print the loss every K steps, >= 1 (default 10)\n"
      "  --queue N       async closures pending per device before a step end waits;\n"
      "                  0 = unbounded (default: LTC_MAX_ASYNC_QUEUE, else 100)\n"
      "  --out PATH      metrics file (default ./training_metrics.jsonl)\n"
      "  --lockstep      no device's async closures of step N+1 start before every device's\n"
      "                  (and the joined closure) of step N have run (default: per device)\n"
      "  --trace PATH    write a timeline of every closure to PATH, as Chrome trace-event\n"
      "                  JSON for https://ui.perfetto.dev (default: $STEPFLOW_TRACE)\n"
      "  --help          print this help and exit\n");
}

struct usage_error {
  std::string message;
};

template <class Int>
Int parse_int(std::string_view flag, std::string_view text, Int min, Int max) {
  Int value{};
  const char* last = text.data() + text.size();
  auto [end, ec] = std::from_chars(text.data(), last, value);
  if (ec != std::errc{} || end != last || value < min || value > max) {
    throw usage_error{
        fmt::format("{} expects an integer in [{}, {}], got '{}'", flag, min, max, text)};
  }
  return value;
}

// Returns the configuration, or nothing when --help was given. Throws usage_error.
std::optional<config> parse_command_line(std::span<char* const> args) {
  config cfg;
  for (std::size_t i = 1; i < args.size(); ++i) {
    std::string_view flag = args[i];
    if (flag == "--help" || flag == "-h") return std::nullopt;

    if (!flag.starts_with("--")) throw usage_error{fmt::format("unexpected argument '{}'", flag)};
    if (flag == "--lockstep") {  // the only flag without a value
      cfg.lockstep = true;
      continue;
    }

    // Both "--flag value" and "--flag=value".
    std::string_view value;
    bool has_value = false;
    if (auto eq = flag.find('='); eq != std::string_view::npos) {
      value = flag.substr(eq + 1);
      flag = flag.substr(0, eq);
      has_value = true;
    }
    constexpr std::string_view known[] = {"--devices", "--steps", "--log-every",
                                          "--queue",   "--out",   "--trace"};
    if (std::find(std::begin(known), std::end(known), flag) == std::end(known)) {
      throw usage_error{fmt::format("unknown flag '{}'", flag)};
    }
    if (!has_value) {
      if (i + 1 == args.size()) throw usage_error{fmt::format("{} needs a value", flag)};
      value = args[++i];
    }

    if (flag == "--devices") {
      cfg.devices = parse_int(flag, value, 1, 64);
    } else if (flag == "--steps") {
      cfg.steps = parse_int(flag, value, 1, 100'000'000);
    } else if (flag == "--log-every") {
      cfg.log_every = parse_int(flag, value, 1, 100'000'000);
    } else if (flag == "--queue") {
      cfg.queue = parse_int<std::size_t>(flag, value, 0, 1'000'000'000);
    } else if (flag == "--out") {
      if (value.empty()) throw usage_error{"--out needs a path"};
      cfg.out = value;
    } else {  // --trace
      if (value.empty()) throw usage_error{"--trace needs a path"};
      cfg.trace = value;
    }
  }
  return cfg;
}

// --- the fake model
// --------------------------------------------------------------------------------

// A linear "model" fitted to a noisy target by gradient descent: each step moves every weight
// towards its target and returns the mean squared error. Only the shape of the work matters here:
// a parallel loop over a small array per step, as a real step launches kernels.
class fake_model {
 public:
  explicit fake_model(unsigned seed, std::size_t size = 4096)
      : weights_(size), targets_(size), errors_(size) {
    std::mt19937 rng(seed);
    std::normal_distribution<double> dist(0.0, 1.0);
    for (double& t : targets_) t = dist(rng);
    // A different starting point per device, so the devices report different losses.
    for (double& w : weights_) w = dist(rng) * (1.0 + 0.1 * seed);
  }

  double step(double learning_rate) {
    tbb::parallel_for(tbb::blocked_range<std::size_t>(0, weights_.size()),
                      [&](const tbb::blocked_range<std::size_t>& r) {
                        for (std::size_t i = r.begin(); i != r.end(); ++i) {
                          const double diff = weights_[i] - targets_[i];
                          errors_[i] = diff * diff;
                          weights_[i] -= learning_rate * 2.0 * diff;
                        }
                      });
    return std::reduce(errors_.begin(), errors_.end()) / static_cast<double>(errors_.size());
  }

 private:
  std::vector<double> weights_, targets_, errors_;
};

// --- the metrics file
// --------------------------------------------------------------------------------

// One JSON-lines file shared by every device. Async closures of *different* devices run in
// parallel, so writes take the mutex; those of *one* device run one at a time and in the order
// added, so each device's records appear in step order without any extra care.
struct metrics_file {
  std::mutex mutex;
  std::ofstream out;  // guarded by mutex
};

// --- the mean loss across devices
// ---------------------------------------------------------------------

// One slot per step in flight: how many devices reached the step, and each device's loss, stored
// by that device's async closure of the step. The step's joined closure runs once every device's
// async closures of the step have run, so it finds every loss there; it averages them and drops
// the slot. Device threads and async closures of different devices touch the slots at the same
// time, hence the mutex.
class mean_loss_log {
 public:
  explicit mean_loss_log(int devices) : devices_(devices) {}

  // A device thread reached `step` (before ending it). True for the last device to arrive: that
  // one queues the step's joined closure.
  bool arrive(std::uint64_t step) {
    std::lock_guard lock(mutex_);
    return ++slot_locked(step).arrived == devices_;
  }

  // Device `device`'s async closure of `step` stores the step's loss.
  void store(std::uint64_t step, std::size_t device, double loss) {
    std::lock_guard lock(mutex_);
    slot& s = slot_locked(step);
    s.losses[device] = loss;
    ++s.stored;
  }

  // The joined closure of `step`: the mean of every device's loss. Throws if one is missing,
  // which would mean the joined closure ran before some device's async closure of its step.
  double take_mean(std::uint64_t step) {
    std::lock_guard lock(mutex_);
    const auto it = slots_.find(step);
    if (it == slots_.end() || it->second.stored != devices_) {
      throw std::logic_error(fmt::format("step {}: the joined closure found {} of {} losses", step,
                                         it == slots_.end() ? 0 : it->second.stored, devices_));
    }
    const std::vector<double>& losses = it->second.losses;
    const double mean = std::reduce(losses.begin(), losses.end()) / static_cast<double>(devices_);
    slots_.erase(it);
    ++joined_ran_;
    last_step_ = step;
    last_mean_ = mean;
    return mean;
  }

  std::uint64_t joined_ran() const {
    std::lock_guard lock(mutex_);
    return joined_ran_;
  }
  // The step and mean of the last joined closure that ran.
  std::pair<std::uint64_t, double> last() const {
    std::lock_guard lock(mutex_);
    return {last_step_, last_mean_};
  }

 private:
  struct slot {
    int arrived = 0;
    int stored = 0;
    std::vector<double> losses;
  };

  slot& slot_locked(std::uint64_t step) {
    slot& s = slots_[step];
    if (s.losses.empty()) s.losses.resize(static_cast<std::size_t>(devices_));
    return s;
  }

  const int devices_;
  mutable std::mutex mutex_;
  std::map<std::uint64_t, slot> slots_;  // guarded by mutex_, as are the three below
  std::uint64_t joined_ran_ = 0;
  std::uint64_t last_step_ = 0;
  double last_mean_ = 0.0;
};

// What one device thread leaves behind for the summary.
struct device_result {
  std::string name;
  std::size_t index = 0;            // gpu<index>
  std::uint64_t steps = 0;          // device_context::step() after the loop
  std::uint64_t lines_written = 0;  // only touched by this device's async closures (see below)
  std::vector<double> losses;       // only touched by this device's thread
  std::exception_ptr error;         // an exception that ended the device's loop
};

void train(stepflow::device_context& device, const config& cfg, metrics_file& metrics,
           mean_loss_log& means, device_result& result) {
  const std::string_view name = device.name();  // stable for the scheduler's lifetime
  const auto start = std::chrono::steady_clock::now();
  fake_model model(static_cast<unsigned>(result.index));

  for (int step = 1; step <= cfg.steps; ++step) {
    // (1) The step's own work: a parallel loop on oneTBB's workers.
    const double loss = model.step(0.01);
    result.losses.push_back(loss);

    // (2) Sync: runs inline at this step's end, on this thread, before run_step_closures returns.
    // Arguments are copied when the closure is added, as torch._lazy's closures capture values.
    // stepflow::labeled names the closure in the timeline trace (--trace).
    if (step % cfg.log_every == 0) {
      device.add_step_closure(
          stepflow::labeled(
              "print_loss",
              [name](int s, double l) { fmt::print("[{}] step {:4} loss {:.4f}\n", name, s, l); }),
          step, loss);
    }

    // (3) Async: runs later on a oneTBB worker. It appends the step's metrics record and stores
    // the loss in the step's slot, for the joined closure (4). It captures the values it needs by
    // copy and the long-lived objects (the file, the slots, this device's result) by reference:
    // they outlive the scheduler. lines_written needs no atomic: this device's async closures
    // never run concurrently, and flush() (below, in main) makes their writes visible to the
    // thread that reads the summary.
    const double elapsed_ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    auto write_metrics = [step, loss, elapsed_ms, &metrics, &means, &result] {
      const std::string line =
          fmt::format(R"({{"device":"{}","step":{},"loss":{:.6f},"elapsed_ms":{:.3f}}})",
                      result.name, step, loss, elapsed_ms);
      {
        std::lock_guard lock(metrics.mutex);
        metrics.out << line << '\n';
        if (!metrics.out) throw std::runtime_error("cannot write the metrics file");
      }
      ++result.lines_written;
      means.store(static_cast<std::uint64_t>(step), result.index, loss);
    };
    device.add_step_closure(stepflow::run_async,
                            stepflow::labeled("write_metrics", std::move(write_metrics)));

    // (4) Joined: one closure per step, for all devices together, so the last device to reach
    // the step queues it. add_joined_step_closure attaches it to the current global step, the
    // first one that not every device has ended: this one, since every device has ended the
    // previous step (they all reached this one) and this device has not ended this one yet.
    // stepflow passes that step number to a closure that takes one; it runs on a oneTBB worker
    // once every device's async closures of the step have run, so every loss is in its slot.
    const auto global_step = static_cast<std::uint64_t>(step);
    if (means.arrive(global_step)) {
      device.scheduler().add_joined_step_closure(
          stepflow::labeled("mean_loss", [&means, &cfg, global_step](std::uint64_t joined_step) {
            if (joined_step != global_step) {
              throw std::logic_error(fmt::format("the joined closure of step {} ran for step {}",
                                                 global_step, joined_step));
            }
            const double mean = means.take_mean(joined_step);
            if (joined_step % static_cast<std::uint64_t>(cfg.log_every) == 0) {
              fmt::print("[mean] step {:4} loss {:.4f}\n", joined_step, mean);
            }
          }));
    }

    // (5) The step barrier. If an earlier async closure of this device threw (say, the disk is
    // full), this is where stepflow::async_closure_error arrives; see error_handling.cpp.
    device.run_step_closures();
  }
  result.steps = device.step();
}

}  // namespace

int main(int argc, char** argv) {
  config cfg;
  try {
    auto parsed = parse_command_line(std::span<char* const>(argv, static_cast<std::size_t>(argc)));
    if (!parsed) {
      print_usage(stdout);
      return 0;
    }
    cfg = std::move(*parsed);
  } catch (const usage_error& e) {
    fmt::print(stderr, "training_loop: error: {}\n\n", e.message);
    print_usage(stderr);
    return 2;
  }

  try {
    // Defaults, then the environment (LTC_MAX_ASYNC_QUEUE, STEPFLOW_SYNC), then the command line.
    stepflow::options opts = stepflow::options::from_env();
    if (cfg.queue) opts.max_queue_size = *cfg.queue;
    if (cfg.lockstep) opts.ordering = stepflow::step_ordering::lockstep;
    if (!cfg.trace.empty()) opts.trace_path = cfg.trace;
    // The report at the end shows how long closures ran. Measuring that is off by default: its
    // clock reads cost more than 10% of a step with a few tiny closures, nothing next to a
    // training step.
    opts.measure_run_time = true;
    // The devices that take part in joined closures (and lockstep), declared up front: otherwise
    // they would be those created before the first step end, and a fast first thread could end
    // its first step before the last device is created.
    for (int d = 0; d < cfg.devices; ++d) opts.participants.push_back(fmt::format("gpu{}", d));

    metrics_file metrics;
    metrics.out.open(cfg.out, std::ios::out | std::ios::trunc);
    if (!metrics.out) {
      fmt::print(stderr, "training_loop: error: cannot open '{}' for writing\n", cfg.out);
      return 1;
    }

    fmt::print(
        "training {} device(s) x {} steps, async queue {}, {}{}\n", cfg.devices, cfg.steps,
        opts.max_queue_size == 0 ? std::string("unbounded") : std::to_string(opts.max_queue_size),
        opts.ordering == stepflow::step_ordering::lockstep ? "lockstep" : "per-device ordering",
        opts.sync_mode ? " (sync mode)" : "");

    const auto start = std::chrono::steady_clock::now();
    std::vector<device_result> results(static_cast<std::size_t>(cfg.devices));
    mean_loss_log means(cfg.devices);  // outlives the scheduler, hence every closure using it
    stepflow::metrics_snapshot metrics_at_end;
    std::string trace_path;
    {
      // The scheduler owns the devices and their queues; it starts no thread of its own. With a
      // trace path it creates the trace file now (stepflow::config_error if it cannot).
      stepflow::scheduler sched(opts);

      std::vector<std::thread> threads;
      for (int d = 0; d < cfg.devices; ++d) {
        // device() is thread-safe and the reference stays valid until the scheduler is destroyed.
        stepflow::device_context& device = sched.device(fmt::format("gpu{}", d));
        device_result& result = results[static_cast<std::size_t>(d)];
        result.name = device.name();
        result.index = static_cast<std::size_t>(d);
        threads.emplace_back([&device, &cfg, &metrics, &means, &result] {
          // An exception must not escape a std::thread (that calls std::terminate): keep it for
          // main.
          try {
            train(device, cfg, metrics, means, result);
          } catch (...) {
            result.error = std::current_exception();
            // This device ends no more steps: in lockstep the others would wait for it forever
            // (and so would the joined closures), so it stops taking part.
            device.scheduler().retire(device.name());
          }
        });
      }
      for (std::thread& t : threads) t.join();

      // Every step has ended, but the last async closures may still be writing: wait for all of
      // them, and for the joined closures. flush() also reports a failure no step end reported
      // yet (async_closure_error), and writes the trace, if any.
      sched.flush();
      metrics_at_end = sched.metrics();
      trace_path = sched.trace_path();  // a numbered sibling if another scheduler had the path
    }  // ~scheduler: nothing is left to wait for; it would report closures that never ran.
    // The last lines may still be in the stream's buffer: a full disk shows only now.
    metrics.out.close();
    if (!metrics.out) throw std::runtime_error(fmt::format("cannot write {}", cfg.out));
    const double wall_s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

    for (const device_result& r : results) {
      if (r.error) std::rethrow_exception(r.error);
    }

    // The last step's mean loss, as its joined closure computed it, and the same mean computed
    // here from each device's own record of its losses.
    const std::size_t last = static_cast<std::size_t>(cfg.steps) - 1;
    std::vector<double> final_losses;
    for (const device_result& r : results) final_losses.push_back(r.losses[last]);
    const double expected_mean =
        std::reduce(final_losses.begin(), final_losses.end()) / static_cast<double>(cfg.devices);
    const auto [mean_step, mean] = means.last();

    std::uint64_t lines = 0;
    fmt::print("summary: {} device(s) x {} steps in {:.3f} s\n", cfg.devices, cfg.steps, wall_s);
    for (const device_result& r : results) {
      fmt::print("  {:<6} {:5} steps  {:5} metrics lines  final loss {:.4f}\n", r.name, r.steps,
                 r.lines_written, r.losses[last]);
      lines += r.lines_written;
    }
    fmt::print("  {} joined closures; mean loss across devices at step {}: {:.4f}\n",
               means.joined_ran(), mean_step, mean);
    fmt::print("  {} lines written to {}\n", lines, cfg.out);
    if (!trace_path.empty()) {
      fmt::print("  trace written to {} (open it in https://ui.perfetto.dev or chrome://tracing)\n",
                 trace_path);
    }
    fmt::print("\n{}", stepflow::metrics_report(metrics_at_end));

    // Every step wrote exactly one line, and every step's joined closure ran, the last one
    // computing the same mean as above (the same additions in the same order: exactly equal).
    const auto steps = static_cast<std::uint64_t>(cfg.steps);
    bool ok = true;
    if (lines != static_cast<std::uint64_t>(cfg.devices) * steps) {
      fmt::print(stderr, "training_loop: error: expected {} metrics lines, wrote {}\n",
                 static_cast<std::uint64_t>(cfg.devices) * steps, lines);
      ok = false;
    }
    if (means.joined_ran() != steps || mean_step != steps || mean != expected_mean) {
      fmt::print(stderr,
                 "training_loop: error: expected {} joined closures, the last one of step {} with "
                 "mean {:.6f}; got {}, the last one of step {} with mean {:.6f}\n",
                 steps, steps, expected_mean, means.joined_ran(), mean_step, mean);
      ok = false;
    }
    return ok ? 0 : 1;
  } catch (const stepflow::async_closure_error& e) {
    // An async closure threw (e.g. the metrics file became unwritable); the original is nested.
    fmt::print(stderr, "training_loop: error on {}: {}\n", e.device(), e.what());
    try {
      std::rethrow_if_nested(e);
    } catch (const std::exception& original) {
      fmt::print(stderr, "  caused by: {}\n", original.what());
    } catch (...) {
    }
    return 1;
  } catch (const std::exception& e) {
    // Also stepflow::config_error from options::from_env() (a bad LTC_MAX_ASYNC_QUEUE, say).
    fmt::print(stderr, "training_loop: error: {}\n", e.what());
    return 1;
  }
}
