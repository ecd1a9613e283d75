#pragma once
/// \file
/// `stepflow::closure`: a move-only, type-erased `void()` callable with inline storage.
///
/// Why not `std::function`: it must be copyable (so move-only captures are impossible) and
/// libstdc++ allocates for any capture over 16 bytes. A step's closures are small and numerous;
/// `closure` keeps callables of up to `closure::inline_size` bytes inside itself, so adding one
/// costs no allocation, and relocating a trivially copyable one is a `memcpy`.

#include <concepts>
#include <cstddef>
#include <cstring>
#include <functional>
#include <new>
#include <type_traits>
#include <utility>

namespace stepflow {

class closure;

namespace detail {

/// How a stored callable is called, moved and destroyed: one table per callable type. A
/// `closure` is this table's address followed by the callable's storage; a closure record in a
/// device's lane (src/pending_closures.hpp) is the same, cut to `record_size` bytes.
struct closure_ops {
  void (*invoke)(void*);
  // nullptr: trivially relocatable, a memcpy of the storage moves it.
  void (*relocate)(void* from, void* to) noexcept;
  // nullptr: nothing to do.
  void (*destroy)(void*) noexcept;
  // nullptr: no label.
  const char* (*label)(const void*) noexcept;
  // Bytes of a lane record: the table's address plus the storage rounded up to 8.
  std::size_t record_size;
};

/// Bytes of callable stored inline in a `closure` (and the most a lane record stores inline).
inline constexpr std::size_t closure_inline_size = 56;

// A callable names itself with a `stepflow_label()` member (see `stepflow::labeled`).
template <class D>
inline constexpr bool has_label = requires(const D& d) {
  { d.stepflow_label() } -> std::convertible_to<const char*>;
};

/// Whether `D` lives inside the storage (else on the heap, the storage holding a pointer).
template <class D>
inline constexpr bool stored_inline = sizeof(D) <= closure_inline_size &&
                                      alignof(D) <= alignof(std::max_align_t) &&
                                      alignof(D) <= 8 && std::is_nothrow_move_constructible_v<D>;

template <class D>
void call_stored(D& f) {
  if constexpr (std::is_invocable_v<D&&>) {
    static_cast<void>(std::move(f)());
  } else {
    static_cast<void>(f());
  }
}

template <class D>
D* heap_pointer(const void* s) noexcept {
  D* p;
  std::memcpy(&p, s, sizeof p);
  return p;
}

template <class D, bool on_heap>
constexpr const char* (*label_of())(const void*) noexcept {
  if constexpr (has_label<D>) {
    return +[](const void* s) noexcept -> const char* {
      if constexpr (on_heap) {
        return heap_pointer<D>(s)->stepflow_label();
      } else {
        return std::launder(static_cast<const D*>(s))->stepflow_label();
      }
    };
  } else {
    return nullptr;
  }
}

constexpr std::size_t round_up_8(std::size_t n) noexcept { return (n + 7) / 8 * 8; }

template <class D>
inline constexpr closure_ops inline_ops{
    [](void* s) { call_stored(*std::launder(static_cast<D*>(s))); },
    std::is_trivially_copyable_v<D> ? nullptr : +[](void* from, void* to) noexcept {
      D* src = std::launder(static_cast<D*>(from));
      ::new (to) D(std::move(*src));
      src->~D();
    },
    std::is_trivially_destructible_v<D>
        ? nullptr
        : +[](void* s) noexcept { std::launder(static_cast<D*>(s))->~D(); },
    label_of<D, false>(), sizeof(void*) + round_up_8(sizeof(D))};

template <class D>
inline constexpr closure_ops heap_ops{[](void* s) { call_stored(*heap_pointer<D>(s)); }, nullptr,
                                      [](void* s) noexcept { delete heap_pointer<D>(s); },
                                      label_of<D, true>(), 2 * sizeof(void*)};

/// Constructs `D(args...)` into `storage` (inline or on the heap) and returns its table.
template <class D, class... Args>
const closure_ops* construct_callable(void* storage, Args&&... args) {
  if constexpr (stored_inline<D>) {
    if constexpr (round_up_8(sizeof(D)) != sizeof(D)) {
      // A trivially copyable callable is relocated by copying its whole rounded-up size.
      // Copying the padding is fine, but GCC (-O2, -Wmaybe-uninitialized) warns when a word of
      // it was never written, as for an empty lambda; the padding word is zeroed first.
      std::memset(static_cast<char*>(storage) + round_up_8(sizeof(D)) - 8, 0, 8);
    }
    ::new (storage) D(std::forward<Args>(args)...);
    return &inline_ops<D>;
  } else {
    D* p = new D(std::forward<Args>(args)...);
    std::memcpy(storage, &p, sizeof p);
    return &heap_ops<D>;
  }
}

/// Bytes a `D` takes as a lane record.
template <class D>
inline constexpr std::size_t record_size_of =
    stored_inline<D> ? inline_ops<D>.record_size : heap_ops<D>.record_size;

/// Moves the callable of `from` (storage only, `ops` describes it) to `to`.
inline void relocate_callable(const closure_ops* ops, void* from, void* to) noexcept {
  if (ops->relocate == nullptr) {
    std::memcpy(to, from, ops->record_size - sizeof(void*));
  } else {
    ops->relocate(from, to);
  }
}

/// What stepflow's internals need of a closure beyond its public interface.
struct closure_access;

}  // namespace detail

class closure {
 public:
  /// Bytes of callable stored without allocating. Callables that are larger, over-aligned or
  /// whose move constructor may throw live on the heap instead.
  static constexpr std::size_t inline_size = detail::closure_inline_size;

  closure() noexcept = default;

  /// Wraps `f` (decay-copied). Precondition: `f` is callable as an rvalue or lvalue with no
  /// arguments. Null checks are the caller's job (see `detail::check_not_null`).
  template <class F, class D = std::decay_t<F>>
  requires(!std::is_same_v<D, closure> && std::is_constructible_v<D, F&&>) explicit closure(F&& f)
      : ops_(detail::construct_callable<D>(storage_, std::forward<F>(f))) {}

  /// Constructs the callable `D(args...)` in place.
  template <class D, class... Args>
  explicit closure(std::in_place_type_t<D>, Args&&... args)
      : ops_(detail::construct_callable<D>(storage_, std::forward<Args>(args)...)) {}

  closure(closure&& other) noexcept { take(other); }
  closure& operator=(closure&& other) noexcept {
    if (this != &other) {
      reset();
      take(other);
    }
    return *this;
  }
  closure(const closure&) = delete;
  closure& operator=(const closure&) = delete;
  ~closure() { reset(); }

  explicit operator bool() const noexcept { return ops_ != nullptr; }

  /// The name given with `stepflow::labeled`, or null. Shown in the timeline trace.
  const char* label() const noexcept {
    return ops_ != nullptr && ops_->label != nullptr ? ops_->label(storage_) : nullptr;
  }

  /// Calls the stored callable, as an rvalue when it can be called so (and a bound call passes
  /// its arguments as rvalues when it can). Precondition: not empty. stepflow calls each closure
  /// exactly once and then destroys it; a second call may see what the first moved from.
  void operator()() { ops_->invoke(storage_); }

  /// Destroys the stored callable; the closure becomes empty.
  void reset() noexcept {
    if (ops_ != nullptr) {
      if (ops_->destroy != nullptr) ops_->destroy(storage_);
      ops_ = nullptr;
    }
  }

 private:
  friend struct detail::closure_access;

  void take(closure& other) noexcept {
    ops_ = other.ops_;
    if (ops_ == nullptr) return;
    detail::relocate_callable(ops_, other.storage_, storage_);
    other.ops_ = nullptr;
  }

  const detail::closure_ops* ops_ = nullptr;
  alignas(8) unsigned char storage_[inline_size];
};

static_assert(sizeof(closure) == 64, "a closure is meant to fill one cache line");

namespace detail {
/// One callable where it is stored (a `closure` or a lane record), without owning it.
struct closure_ref {
  const closure_ops* ops;
  void* storage;

  void operator()() const { ops->invoke(storage); }
  const char* label() const noexcept {
    return ops->label != nullptr ? ops->label(storage) : nullptr;
  }
  void destroy() const noexcept {
    if (ops->destroy != nullptr) ops->destroy(storage);
  }
};

struct closure_access {
  /// `c`'s callable. Precondition: `c` is not empty.
  static closure_ref ref(closure& c) noexcept { return {c.ops_, c.storage_}; }

  /// Moves `c`'s callable into a record at `record` (table address, then storage); `c` becomes
  /// empty. Returns the record's size. Precondition: `c` is not empty.
  static std::size_t move_to_record(closure& c, unsigned char* record) noexcept {
    const closure_ops* ops = c.ops_;
    std::memcpy(record, &ops, sizeof ops);
    relocate_callable(ops, c.storage_, record + sizeof ops);
    c.ops_ = nullptr;
    return ops->record_size;
  }
};
}  // namespace detail

/// Wraps a callable with a name for the timeline trace: `labeled("log_loss", f)`. `name` is not
/// copied: pass a string that outlives the closure (a string literal).
template <class F>
struct labeled_callable {
  const char* name;
  F f;

  const char* stepflow_label() const noexcept { return name; }

  template <class... Args>
  requires std::is_invocable_v<F&, Args...>
  decltype(auto) operator()(Args&&... args) { return std::invoke(f, std::forward<Args>(args)...); }
};

template <class F>
labeled_callable<std::decay_t<F>> labeled(const char* name, F&& f) {
  return {name, std::forward<F>(f)};
}

}  // namespace stepflow
