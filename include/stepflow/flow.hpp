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
#include <memory>
#include <type_traits>
#include <utility>

#include "stepflow/detail/bind.hpp"
#include "stepflow/detail/tsan.hpp"
#include "stepflow/device_context.hpp"

namespace stepflow::detail {

/// One message's closure of a `closure_node`: the node's shared `f` and a copy of the message.
/// Keeps the label of a `stepflow::labeled` `f` for the trace.
template <class F, class T>
struct shared_call {
  std::shared_ptr<F> f;
  T message;

  void operator()() { (*f)(std::as_const(message)); }
  const char* stepflow_label() const noexcept requires requires(const F& g) { g.stepflow_label(); }
  { return f->stepflow_label(); }
};

}  // namespace stepflow::detail

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
///
/// `f` is moved into the node once and shared by the closures of every message, not copied per
/// message: it may be move-only and may keep state from message to message, like a node body.
/// With the default `closure_mode::async` (outside sync mode) its calls never overlap, since a
/// device's asynchronous closures run one at a time. Synchronous closures run on the thread
/// that ends the step, so two step ends of the device at once (two threads, or a `step_end_node`
/// with more than serial concurrency) call `f` at the same time: keep its state thread-safe
/// then. It is destroyed after the node and the last closure that calls it. A null `f` (function
/// pointer, empty `std::function` or `stepflow::closure`) gets `std::invalid_argument` here, not at
/// the first message.
template <class T, class F>
tbb::flow::function_node<T, T> closure_node(tbb::flow::graph& g, device_context& device, F f,
                                            closure_mode mode = closure_mode::async,
                                            std::size_t concurrency = tbb::flow::serial) {
  static_assert(std::is_invocable_v<F&, const T&>,
                "stepflow::flow::closure_node: f must be callable with const T&");
  static_assert(std::is_copy_constructible_v<T>,
                "stepflow::flow::closure_node: each closure keeps a copy of the message");
  detail::check_not_null(f, "flow::closure_node");
  // Shared, so that a node body copied by oneTBB and every queued closure call the one `f`.
  return tbb::flow::function_node<T, T>(
      g, concurrency, [&device, f = std::make_shared<F>(std::move(f)), mode](const T& message) {
        detail::tsan_body_scope handoff;  // ThreadSanitizer only: see detail/tsan.hpp
        if (mode == closure_mode::async) {
          device.add_step_closure(run_async, detail::shared_call<F, T>{f, message});
        } else {
          device.add_step_closure(detail::shared_call<F, T>{f, message});
        }
        return message;
      });
}

}  // namespace stepflow::flow
