#pragma once
// Debug-build detection of a device_context used after its scheduler was destroyed.
//
// Why a registry: the context's memory is gone by then, so the check must not read it; it only
// looks the address up. Release builds (NDEBUG) compile all of this away: using a dangling
// reference there is undefined behaviour, as with any destroyed object.

namespace stepflow::detail {

#ifndef NDEBUG
void mark_alive(const void* object);
void mark_dead(const void* object) noexcept;
/// Throws `stepflow::error` when `object` is not alive.
void check_alive(const void* object, const char* operation);
#else
inline void mark_alive(const void*) {}
inline void mark_dead(const void*) noexcept {}
inline void check_alive(const void*, const char*) {}
#endif

}  // namespace stepflow::detail
