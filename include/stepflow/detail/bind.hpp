#pragma once
/// \file
/// Turning `add_step_closure(f, args...)` into one `closure`. Not part of the public API.

#include <functional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "stepflow/closure.hpp"

namespace stepflow::detail {

template <class T>
struct is_std_function : std::false_type {};
template <class Sig>
struct is_std_function<std::function<Sig>> : std::true_type {};

template <class T>
struct is_labeled : std::false_type {};
template <class F>
struct is_labeled<labeled_callable<F>> : std::true_type {};

/// Rejects what would only fail later, on a worker thread: a null function or member pointer,
/// an empty `std::function` or an empty `stepflow::closure`, also inside `stepflow::labeled`.
/// `who` names the call in the message ("stepflow: <who> got ...").
template <class D>
void check_not_null(const D& f, const char* who = "add_step_closure") {
  const auto refuse = [who](const char* what) {
    throw std::invalid_argument(std::string("stepflow: ") + who + " got " + what);
  };
  if constexpr (std::is_pointer_v<D> || std::is_member_pointer_v<D>) {
    if (f == nullptr) refuse("a null function pointer");
  } else if constexpr (is_std_function<D>::value) {
    if (!f) refuse("an empty std::function");
  } else if constexpr (std::is_same_v<D, closure>) {
    if (!f) refuse("an empty stepflow::closure");
  } else if constexpr (is_labeled<D>::value) {
    check_not_null(f.f, who);
  }
}

/// `f` with its decay-copied arguments. Called once, so arguments are passed as rvalues when `f`
/// accepts them (move-only arguments work) and as lvalues otherwise (parameters of type `T&`).
template <class F, class... Args>
struct bound_call {
  F f;
  std::tuple<Args...> args;

  template <class G, class... A>
  requires(sizeof...(A) == sizeof...(Args) &&
           !std::is_same_v<std::decay_t<G>, bound_call>) explicit bound_call(G&& g, A&&... a)
      : f(std::forward<G>(g)), args(std::forward<A>(a)...) {}

  // The label of a `stepflow::labeled` callable survives binding its arguments.
  const char* stepflow_label() const noexcept requires requires(const F& g) { g.stepflow_label(); }
  { return f.stepflow_label(); }

  void operator()() {
    if constexpr (std::is_invocable_v<F&&, Args&&...>) {
      std::apply([this](Args&... a) { std::invoke(std::move(f), std::move(a)...); }, args);
    } else {
      std::apply([this](Args&... a) { std::invoke(f, a...); }, args);
    }
  }
};

template <class F, class... Args>
inline constexpr bool is_step_closure_v =
    std::is_invocable_v<std::decay_t<F>&&, std::decay_t<Args>&&...> ||
    std::is_invocable_v<std::decay_t<F>&, std::decay_t<Args>&...>;

/// The callable type stored for `add_step_closure(f, args...)`.
template <class F, class... Args>
using stored_callable_t =
    std::conditional_t<sizeof...(Args) == 0 && !std::is_member_pointer_v<std::decay_t<F>>,
                       std::decay_t<F>, bound_call<std::decay_t<F>, std::decay_t<Args>...>>;

/// Checks `f`, then hands `f(args...)` to `sink`: a `closure` is moved in with `sink.push`, any
/// other callable is constructed in place with `sink.template emplace<Stored>(f, args...)`.
template <class Sink, class F, class... Args>
void add_closure_to(Sink& sink, F&& f, Args&&... args) {
  static_assert(is_step_closure_v<F, Args...>,
                "stepflow: the step closure cannot be called with these arguments "
                "(they are decay-copied when added and passed to it once)");
  using D = std::decay_t<F>;
  check_not_null<D>(f);
  if constexpr (sizeof...(Args) == 0 && std::is_same_v<D, closure>) {
    sink.push(closure(std::forward<F>(f)));
  } else {
    sink.template emplace<stored_callable_t<F, Args...>>(std::forward<F>(f),
                                                         std::forward<Args>(args)...);
  }
}

/// The sink of `make_closure`: keeps what it is given as one `closure`.
struct closure_maker {
  closure made;
  void push(closure&& c) { made = std::move(c); }
  template <class Stored, class... A>
  void emplace(A&&... a) {
    made = closure(std::in_place_type<Stored>, std::forward<A>(a)...);
  }
};

template <class F, class... Args>
closure make_closure(F&& f, Args&&... args) {
  closure_maker sink;
  add_closure_to(sink, std::forward<F>(f), std::forward<Args>(args)...);
  return std::move(sink.made);
}

}  // namespace stepflow::detail
