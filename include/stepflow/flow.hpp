#pragma once
/// \file
/// Adapters that connect a user's `tbb::flow::graph` to stepflow without glue code. Opt-in: this
/// header includes oneTBB's flow graph (the rest of stepflow's public headers do not).
///
///   tbb::flow::graph g;
///   auto log  = stepflow::flow::closure_node<batch>(g, gpu, [](const batch& b) { ... });
///   auto step = stepflow::flow::step_end_node<batch>(g, gpu);
///   tbb::flow::make_edge(train, log);  tbb::flow::make_edge(log, step);
///
/// Both nodes are serial by default, so messages reach stepflow in arrival order; both forward
/// the message unchanged. Exceptions (a closure's from a step end, `async_closure_error`) leave
/// the node body, so the user's graph is cancelled and `wait_for_all()` rethrows them, as for any
/// node body.

#include <oneapi/tbb/flow_graph.h>

#include <cstddef>
#include <type_traits>
#include <utility>

#include "stepflow/detail/tsan.hpp"
#include "stepflow/device_context.hpp"

namespace stepflow::flow {

/// Whether `closure_node` queues synchronous or asynchronous closures.
enum class closure_mode { sync, async };

/// A node that ends `device`'s step (`run_step_closures()`) for every message passing through
/// it, then forwards the message. `device` must outlive the graph's use of the node.
template <class T>
tbb::flow::function_node<T, T> step_end_node(tbb::flow::graph& g, device_context& device,
                                             std::size_t concurrency = tbb::flow::serial) {
  return tbb::flow::function_node<T, T>(g, concurrency, [&device](const T& message) {
    detail::tsan_body_scope handoff;  // ThreadSanitizer only: see detail/tsan.hpp
    device.run_step_closures();
    return message;
  });
}

/// A node that queues `f(message)` on `device` for every message (a copy of the message is
/// captured), then forwards the message. Asynchronous closures by default.
template <class T, class F>
tbb::flow::function_node<T, T> closure_node(tbb::flow::graph& g, device_context& device, F f,
                                            closure_mode mode = closure_mode::async,
                                            std::size_t concurrency = tbb::flow::serial) {
  static_assert(std::is_invocable_v<F&, const T&>,
                "stepflow::flow::closure_node: f must be callable with const T&");
  return tbb::flow::function_node<T, T>(g, concurrency,
                                        [&device, f = std::move(f), mode](const T& message) {
                                          // ThreadSanitizer only: see detail/tsan.hpp
                                          detail::tsan_body_scope handoff;
                                          if (mode == closure_mode::async) {
                                            device.add_step_closure(run_async, f, message);
                                          } else {
                                            device.add_step_closure(f, message);
                                          }
                                          return message;
                                        });
}

}  // namespace stepflow::flow
