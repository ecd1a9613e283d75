#pragma once
// A mutex that spins briefly before it sleeps, for locks held for a few hundred nanoseconds by
// two threads on different CPUs.
//
// Why: a device queue's lock is taken by the thread that ends the device's steps (to hand a batch
// over) and by the thread that runs its closures (to take one), each time for well under a
// microsecond. std::mutex (glibc's default type) sleeps in the kernel at the first contention,
// and then the holder pays a futex wake as it unlocks. Measured in B6 lockstep with one thread
// ending all 8 devices' steps: the wave's thread spent 11% of its time in futex calls on these
// locks, and a global step took 7.5-7.7 us against 5.4-6.3 us with this mutex (medians of 5
// alternating runs, twice; B2 at 16 B: 17.4-20.4 -> 15.8-18.4 ns per closure). glibc's adaptive
// type retries the lock for a bounded, self-tuning number of rounds before it sleeps; other C
// libraries get their default type.
//
// Meets Lockable, so it works with std::unique_lock and std::condition_variable_any.

#include <pthread.h>

#include <system_error>

namespace stepflow::detail {

class adaptive_mutex {
 public:
  adaptive_mutex() {
    pthread_mutexattr_t attr;
    pthread_mutexattr_init(&attr);
#ifdef __GLIBC__
    pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ADAPTIVE_NP);
#endif
    const int rc = pthread_mutex_init(&mutex_, &attr);
    pthread_mutexattr_destroy(&attr);
    if (rc != 0) throw std::system_error(rc, std::generic_category(), "pthread_mutex_init");
  }
  ~adaptive_mutex() { pthread_mutex_destroy(&mutex_); }
  adaptive_mutex(const adaptive_mutex&) = delete;
  adaptive_mutex& operator=(const adaptive_mutex&) = delete;

  void lock() {
    // As std::mutex::lock reports a failure of pthread_mutex_lock.
    const int rc = pthread_mutex_lock(&mutex_);
    if (rc != 0) throw std::system_error(rc, std::generic_category(), "pthread_mutex_lock");
  }
  bool try_lock() noexcept { return pthread_mutex_trylock(&mutex_) == 0; }
  void unlock() noexcept { pthread_mutex_unlock(&mutex_); }

 private:
  pthread_mutex_t mutex_;
};

}  // namespace stepflow::detail
