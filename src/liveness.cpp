#include "liveness.hpp"

#ifndef NDEBUG
#include <mutex>
#include <unordered_set>

#include <fmt/format.h>

#include "stepflow/errors.hpp"

namespace stepflow::detail {
namespace {
std::mutex& registry_mutex() {
  static std::mutex m;
  return m;
}
std::unordered_set<const void*>& registry() {
  static auto* live = new std::unordered_set<const void*>;  // leaked: usable during exit
  return *live;
}
}  // namespace

void mark_alive(const void* object) {
  std::lock_guard lock(registry_mutex());
  registry().insert(object);
}

void mark_dead(const void* object) noexcept {
  std::lock_guard lock(registry_mutex());
  registry().erase(object);
}

void check_alive(const void* object, const char* operation) {
  std::lock_guard lock(registry_mutex());
  if (registry().count(object) == 0) {
    throw error(
        fmt::format("stepflow: device_context::{} called on a device whose scheduler was "
                    "destroyed (dangling reference)",
                    operation));
  }
}

}  // namespace stepflow::detail
#endif
