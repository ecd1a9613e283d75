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

class closure {
 public:
  /// Bytes of callable stored without allocating. Callables that are larger, over-aligned or
  /// whose move constructor may throw live on the heap instead.
  static constexpr std::size_t inline_size = 56;

  closure() noexcept = default;

  /// Wraps `f` (decay-copied). Precondition: `f` is callable as an rvalue or lvalue with no
  /// arguments. Null checks are the caller's job (see `detail::check_not_null`).
  template <class F, class D = std::decay_t<F>>
  requires(!std::is_same_v<D, closure> && std::is_constructible_v<D, F&&>) explicit closure(F&& f) {
    if constexpr (stored_inline<D>) {
      ::new (static_cast<void*>(storage_)) D(std::forward<F>(f));
      ops_ = &inline_ops<D>;
    } else {
      D* p = new D(std::forward<F>(f));
      std::memcpy(storage_, &p, sizeof p);
      ops_ = &heap_ops<D>;
    }
  }

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

  /// Calls the stored callable. Precondition: not empty. May be called more than once; stepflow
  /// calls each closure exactly once and then destroys it.
  void operator()() { ops_->invoke(storage_); }

  /// Destroys the stored callable; the closure becomes empty.
  void reset() noexcept {
    if (ops_ != nullptr) {
      if (ops_->destroy != nullptr) ops_->destroy(storage_);
      ops_ = nullptr;
    }
  }

 private:
  struct ops_table {
    void (*invoke)(void*);
    // nullptr: trivially relocatable, a memcpy of the storage moves it.
    void (*relocate)(void* from, void* to) noexcept;
    // nullptr: nothing to do.
    void (*destroy)(void*) noexcept;
    // nullptr: no label.
    const char* (*label)(const void*) noexcept;
  };

  // A callable names itself with a `stepflow_label()` member (see `stepflow::labeled`).
  template <class D>
  static constexpr bool has_label = requires(const D& d) {
    { d.stepflow_label() } -> std::convertible_to<const char*>;
  };

  template <class D>
  static constexpr bool stored_inline = sizeof(D) <= inline_size &&
                                        alignof(D) <= alignof(std::max_align_t) &&
                                        alignof(D) <= 8 && std::is_nothrow_move_constructible_v<D>;

  template <class D, bool on_heap>
  static constexpr const char* (*label_of())(const void*) noexcept {
    if constexpr (has_label<D>) {
      return +[](const void* s) noexcept -> const char* {
        if constexpr (on_heap) {
          const D* p;
          std::memcpy(&p, s, sizeof p);
          return p->stepflow_label();
        } else {
          return std::launder(static_cast<const D*>(s))->stepflow_label();
        }
      };
    } else {
      return nullptr;
    }
  }

  template <class D>
  static void call(D& f) {
    if constexpr (std::is_invocable_v<D&&>) {
      static_cast<void>(std::move(f)());
    } else {
      static_cast<void>(f());
    }
  }

  template <class D>
  static constexpr ops_table inline_ops{
      [](void* s) { call(*std::launder(static_cast<D*>(s))); },
      std::is_trivially_copyable_v<D>
          ? nullptr
          : +[](void* from, void* to) noexcept {
              D* src = std::launder(static_cast<D*>(from));
              ::new (to) D(std::move(*src));
              src->~D();
            },
      std::is_trivially_destructible_v<D>
          ? nullptr
          : +[](void* s) noexcept { std::launder(static_cast<D*>(s))->~D(); },
      label_of<D, false>()};

  template <class D>
  static D* heap_pointer(void* s) noexcept {
    D* p;
    std::memcpy(&p, s, sizeof p);
    return p;
  }

  template <class D>
  static constexpr ops_table heap_ops{[](void* s) { call(*heap_pointer<D>(s)); }, nullptr,
                                      [](void* s) noexcept { delete heap_pointer<D>(s); },
                                      label_of<D, true>()};

  void take(closure& other) noexcept {
    ops_ = other.ops_;
    if (ops_ == nullptr) return;
    if (ops_->relocate == nullptr) {
      std::memcpy(storage_, other.storage_, inline_size);
    } else {
      ops_->relocate(other.storage_, storage_);
    }
    other.ops_ = nullptr;
  }

  const ops_table* ops_ = nullptr;
  alignas(8) unsigned char storage_[inline_size];
};

static_assert(sizeof(closure) == 64, "a closure is meant to fill one cache line");

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
