// flow_graph: stepflow inside a user's own tbb::flow::graph, wired with the adapters of the opt-in
// header <stepflow/flow.hpp>: no glue code between the graph and the device.
//
//   source ------> train ---------> reorder ---------> log --------------> end_step
//   input_node     function_node    sequencer_node     flow::closure_node  flow::step_end_node
//   (batch ids)    (unlimited:      (back in batch     (queues an async    (ends the device's
//                   parallel_for)    order)             log per batch)      step per batch)
//
// source numbers the batches; train "trains" on each one with a small tbb::parallel_for, several
// batches at once; reorder puts the batches back in order (the graph's nodes run concurrently, and
// even chained serial nodes alone may reorder messages, so anything order-sensitive gets a
// sequencer_node in front); log queues an asynchronous step closure per batch, which logs the
// batch later on a oneTBB worker; end_step ends the device's step for every batch that passes.
// Both adapters are serial function_nodes that forward the message unchanged. The step ends run
// inside a node body, on a oneTBB worker: that is safe, and with a full async queue (--queue) the
// body waits for room without deadlocking, back-pressuring the graph.
//
// Which step a closure belongs to: the first step end of the device that starts after the closure
// was queued. log and end_step are pipelined like any two nodes: while batch k still waits in
// front of end_step, log may already queue batch k+1's closure, which then runs after batch k's
// step end. The closures still run in batch order, one at a time, and every batch ends exactly one
// step. When a closure must belong to its own batch's step, queue it and end the step in one node
// body (as the pipeline example's step filter does).
//
// The example checks what it prints and exits non-zero if a check fails, so it also runs as a test.
//
//   flow_graph [--batches N] [--queue N] [--log-every K]

#include <stepflow/flow.hpp>  // opt-in: the flow-graph adapters (includes oneTBB's flow graph)
#include <stepflow/stepflow.hpp>

#include <oneapi/tbb/blocked_range.h>
#include <oneapi/tbb/flow_graph.h>
#include <oneapi/tbb/parallel_for.h>

#include <fmt/core.h>

#include <charconv>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <numeric>
#include <span>
#include <string_view>
#include <system_error>
#include <thread>
#include <vector>

namespace {

struct config {
  std::size_t batches = 32;
  std::size_t queue = 4;  // max_queue_size: small, so the back-pressure actually happens
  std::size_t log_every = 8;
};

void print_usage(std::FILE* to) {
  fmt::print(to,
             "usage: flow_graph [--batches N] [--queue N] [--log-every K]\n"
             "  --batches N     batches through the graph, >= 1 (default 32)\n"
             "  --queue N       async closures pending per device, 0 = unbounded (default 4)\n"
             "  --log-every K   print every K-th batch's log line, >= 1 (default 8)\n"
             "  --help          print this help and exit\n");
}

// Parses "--flag value" pairs; returns false (after printing why) on a bad command line.
bool parse_command_line(std::span<char* const> args, config& cfg, bool& help) {
  for (std::size_t i = 1; i < args.size(); ++i) {
    const std::string_view flag = args[i];
    if (flag == "--help" || flag == "-h") {
      help = true;
      return true;
    }
    if (flag != "--batches" && flag != "--queue" && flag != "--log-every") {
      fmt::print(stderr, "flow_graph: error: unknown flag '{}'\n", flag);
      return false;
    }
    if (i + 1 >= args.size()) {
      fmt::print(stderr, "flow_graph: error: {} needs a value\n", flag);
      return false;
    }
    const std::string_view text = args[++i];
    const std::size_t min = flag == "--queue" ? 0 : 1;
    std::size_t value = 0;
    const char* last = text.data() + text.size();
    auto [end, ec] = std::from_chars(text.data(), last, value);
    if (ec != std::errc{} || end != last || value < min || value > 1'000'000) {
      fmt::print(stderr, "flow_graph: error: {} expects an integer in [{}, 1000000], got '{}'\n",
                 flag, min, text);
      return false;
    }
    if (flag == "--batches") {
      cfg.batches = value;
    } else if (flag == "--queue") {
      cfg.queue = value;
    } else {
      cfg.log_every = value;
    }
  }
  return true;
}

// The message that flows from train to end_step: small, copied from node to node (closure_node
// captures a copy for its closure).
struct batch {
  std::size_t index = 0;
  double loss = 0.0;
};

// A fake training step on batch `index`: a parallel loop over the batch's samples, then the mean
// squared error, which shrinks as the batches go by. Deterministic: the same index, the same loss.
double train_on(std::size_t index) {
  std::vector<double> errors(4096);
  const double scale = 1.0 / (1.0 + 0.1 * static_cast<double>(index));
  tbb::parallel_for(tbb::blocked_range<std::size_t>(0, errors.size()),
                    [&](const tbb::blocked_range<std::size_t>& r) {
                      for (std::size_t i = r.begin(); i != r.end(); ++i) {
                        const double diff =
                            scale * static_cast<double>((i * 7 + index) % 101) / 101.0;
                        errors[i] = diff * diff;
                      }
                    });
  return std::reduce(errors.begin(), errors.end()) / static_cast<double>(errors.size());
}

// What the async log closures saw, read by main after flush(). No lock or atomic: one device's
// async closures run one at a time, in the order queued, and flush() publishes their writes.
struct log_record {
  std::vector<std::size_t> indices;  // the batches logged, in the order the closures ran
  double loss_sum = 0.0;
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
    log_record record;

    stepflow::options opts;  // the defaults (no environment), then our own queue size
    opts.max_queue_size = cfg.queue;
    stepflow::scheduler sched(opts);
    stepflow::device_context& gpu = sched.device("gpu0");

    // The user's graph. Declared after the scheduler (so destroyed before it): the adapters keep
    // a reference to the device.
    tbb::flow::graph g;

    // source: batch ids 0, 1, ..., batches-1. An input_node calls its body one message at a time.
    std::size_t next = 0;
    tbb::flow::input_node<std::size_t> source(g, [&](tbb::flow_control& fc) -> std::size_t {
      if (next == cfg.batches) {
        fc.stop();
        return 0;
      }
      return next++;
    });

    // train: any number of batches at once, each with a parallel loop of its own.
    tbb::flow::function_node<std::size_t, batch> train(g, tbb::flow::unlimited,
                                                       [](std::size_t index) {
                                                         return batch{index, train_on(index)};
                                                       });

    // reorder: releases batch k only after batches 0..k-1.
    tbb::flow::sequencer_node<batch> reorder(g, [](const batch& b) { return b.index; });

    // log: queues one async step closure per batch, a copy of the batch bound to it. It runs on a
    // oneTBB worker after a step end of gpu0, while the graph goes on. stepflow::labeled names it
    // in the timeline trace (options::trace_path, or STEPFLOW_TRACE with options::from_env()).
    auto log = stepflow::flow::closure_node<batch>(
        g, gpu,
        stepflow::labeled("log_batch",
                          [&record, &cfg](const batch& b) {
                            // Stands in for a slow write (a metrics server, a file): the graph
                            // does not wait for it.
                            std::this_thread::sleep_for(std::chrono::microseconds(200));
                            record.indices.push_back(b.index);
                            record.loss_sum += b.loss;
                            if (b.index % cfg.log_every == 0) {
                              fmt::print("[gpu0] batch {:3} loss {:.4f} (logged asynchronously)\n",
                                         b.index, b.loss);
                            }
                          }),
        stepflow::flow::closure_mode::async);

    // end_step: gpu0's step barrier, once per batch.
    auto end_step = stepflow::flow::step_end_node<batch>(g, gpu);

    tbb::flow::make_edge(source, train);
    tbb::flow::make_edge(train, reorder);
    tbb::flow::make_edge(reorder, log);
    tbb::flow::make_edge(log, end_step);

    const auto start = std::chrono::steady_clock::now();
    source.activate();
    // Every batch went through every node. An exception from a node body (a step end reporting an
    // async failure, stepflow::async_closure_error) would come out of wait_for_all().
    g.wait_for_all();
    const std::uint64_t steps_after_graph = gpu.step();
    // The graph is done; the last async logs may still be running: wait for them.
    sched.flush();
    const double wall_ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();

    bool in_order = record.indices.size() == cfg.batches;
    for (std::size_t i = 0; in_order && i < record.indices.size(); ++i) {
      in_order = record.indices[i] == i;
    }
    double expected_sum = 0.0;
    for (std::size_t i = 0; i < cfg.batches; ++i) expected_sum += train_on(i);

    const stepflow::device_metrics m = sched.metrics().total;
    fmt::print("summary: {} batches, {} steps, {} async logs (in batch order: {}), {:.1f} ms\n",
               cfg.batches, steps_after_graph, record.indices.size(), in_order ? "yes" : "no",
               wall_ms);
    fmt::print(
        "  metrics: {} async closures ran, queue high-water {} (max {}), step ends blocked "
        "{:.2f} ms\n",
        m.ran_async, m.queue_high_water, cfg.queue, static_cast<double>(m.blocked_ns) / 1e6);

    // Each check: every batch ended exactly one step, every async log ran once and in batch
    // order, with the loss train computed for that batch (the same additions in the same order,
    // so exactly equal), and the metrics agree.
    int failed = 0;
    const auto expect = [&failed](bool ok, std::string_view claim) {
      if (!ok) {
        ++failed;
        fmt::print(stderr, "CHECK FAILED: {}\n", claim);
      }
    };
    expect(steps_after_graph == cfg.batches, "every batch ended one step of gpu0");
    expect(in_order, "every batch was logged once, in batch order");
    expect(record.loss_sum == expected_sum, "the logs saw the losses train computed");
    expect(m.ran_async == cfg.batches && m.failed_async == 0, "the metrics count every log");
    expect(cfg.queue == 0 || m.queue_high_water <= cfg.queue,
           "the async queue never exceeded --queue");
    if (failed != 0) {
      fmt::print(stderr, "flow_graph: {} check(s) failed\n", failed);
      return 1;
    }
    return 0;
  } catch (const std::exception& e) {
    fmt::print(stderr, "flow_graph: error: {}\n", e.what());
    return 1;
  }
}
