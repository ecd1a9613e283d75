#pragma once
// The timeline trace: closures and queue depths recorded as Chrome trace events and written as
// one JSON object ({"traceEvents": [...], ...}), the format chrome://tracing and Perfetto open.
//
// Memory is bounded: events go to a ring of `max_events` fixed-size (64-byte) records, allocated
// in 64 KiB chunks as it fills, that keeps the MOST RECENT events; older ones are overwritten and
// counted by `dropped()`. A full ring of the default 2^20 events holds 64 MiB.
//
// Cost: recording takes a small spin lock (test-and-test-and-set, yields after a short spin)
// around a 64-byte copy; no allocation except one chunk per 1024 events while the ring first
// fills. Every recorder thread shares that lock: tracing is opt-in, and one uncontended
// lock/unlock is a single atomic exchange plus a store, cheaper than a std::mutex.
//
// Writing never holds the spin lock for long: `write()` copies the ring out in batches of 1024
// events, formats them outside the lock and streams them to the file, so recording goes on while
// a write is in progress (events recorded after `write()` started are left for the next write).
//
// Time: callers pass `now_ns()` values (steady_clock); the file shows microseconds since the
// recorder was created.

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "stepflow/metrics.hpp"

namespace stepflow::detail {

class trace_file;

/// A tiny test-and-test-and-set lock for critical sections of a few nanoseconds. Spins with a
/// pause instruction, then yields the CPU to a preempted holder. Not fair, not recursive.
class spin_lock {
 public:
  void lock() noexcept {
    while (locked_.exchange(true, std::memory_order_acquire)) wait_until_free();
  }
  void unlock() noexcept { locked_.store(false, std::memory_order_release); }

 private:
  void wait_until_free() const noexcept;
  std::atomic<bool> locked_{false};
};

class trace_recorder {
 public:
  /// Labels longer than this many bytes are cut (at a UTF-8 character boundary) and shown with
  /// a trailing "…".
  static constexpr std::size_t max_label_bytes = 32;
  /// Counter names kept at most; a counter event with a further new name is dropped.
  static constexpr std::size_t max_counter_names = 4096;

  /// Claims `path` for this recorder (a numbered sibling when another recorder of this process
  /// has it: `path()`; see trace_file.hpp) and writes an empty but valid trace there, so the
  /// file is valid JSON even if `write()` is never called; a stream (pipe, /dev/stdout) is only
  /// opened. The path is resolved now, so a later change of working directory does not move it.
  /// `max_events` bounds the events kept (the most recent); 0 keeps none.
  /// Throws `config_error` naming `path` and the system's reason (e.g. "No such file or
  /// directory" for a missing directory) when the file cannot be created or written.
  explicit trace_recorder(std::string path, std::size_t max_events = std::size_t{1} << 20);

  /// Releases the file without writing: call `write_final()` first to keep the events.
  ~trace_recorder();
  trace_recorder(const trace_recorder&) = delete;
  trace_recorder& operator=(const trace_recorder&) = delete;

  /// What a track shows. A device has two: its asynchronous closures run while its step end
  /// runs the synchronous ones, and complete events on one track must nest (Perfetto drops
  /// overlapping ones), so each kind gets a track of its own.
  enum class track_kind : char { sync, async, joined };

  /// A stable track id (the events' "tid", 1, 2, ...) for `device`'s closures of `kind`: the
  /// same id every time for the same pair. The first call for a pair adds metadata naming the
  /// track "device <name>", "device <name> async" or "joined closures". Thread-safe (takes a
  /// mutex: call it once per device, not per event). May throw `std::bad_alloc`.
  std::uint32_t track(std::string_view device, track_kind kind = track_kind::sync);

  /// Records one closure as a complete event ("ph":"X"): name `label` (or the kind's name when
  /// `label` is null or empty), category and args.kind the kind, args.step `step`, on `track`,
  /// starting at `start_ns` (a `now_ns()` value) and lasting `duration_ns`. `label` is copied
  /// (up to `max_label_bytes`), so it need not outlive the call.
  /// Thread-safe, never blocks for long (spin lock), never throws; when the ring is full the
  /// oldest event is overwritten and counted in `dropped()`.
  void complete(std::uint32_t track, closure_kind kind, const char* label, std::uint64_t step,
                std::uint64_t start_ns, std::uint64_t duration_ns) noexcept;

  /// Records a counter sample ("ph":"C", args {"value": value}) named `name` (for example
  /// "queue depth <device>") at `ts_ns` (a `now_ns()` value). Viewers draw one counter track per
  /// name. Names are interned (copied once each, at most `max_counter_names`), so use a small set
  /// of names. Thread-safe (a mutex for the name, then the spin lock), never throws: an event
  /// that cannot be recorded is counted in `dropped()`.
  void counter(std::uint32_t track, std::string_view name, std::uint64_t value,
               std::uint64_t ts_ns) noexcept;

  /// Replaces the file with the track metadata and the events kept so far, as one valid JSON
  /// object; "otherData" holds the producer, `max_events` and the number of events recorded
  /// before this write but not in the file ("dropped_events"). The new version is written next
  /// to the file and renamed over it, so readers never see a partial trace. Does nothing when
  /// nothing was recorded since the last write, and nothing for a stream, which gets one
  /// document only, from `write_final()`. Thread-safe: concurrent writes are serialised, and
  /// recording goes on meanwhile. Blocks for the file I/O.
  /// Throws `config_error` naming the path and the system's reason if writing fails.
  void write();

  /// `write()`, and for a stream its one document (later calls do nothing). For the end.
  void write_final();

  /// The file written: the path given, or the numbered sibling claimed instead.
  const std::string& path() const noexcept;

  /// Events not kept: overwritten because the ring was full, or not recorded for lack of memory
  /// or of room for a counter name. Thread-safe.
  std::uint64_t dropped() const noexcept;

  /// Nanoseconds on `std::chrono::steady_clock` (about 20 ns per call via the vDSO). Event times
  /// are given in these units; the file shows them relative to the recorder's creation.
  static std::uint64_t now_ns() noexcept;

 private:
  struct event;
  // What a write put in the file, to skip a write that would change nothing.
  struct written_state {
    std::uint64_t recorded;
    std::uint64_t failed;
    std::size_t tracks;
    bool operator==(const written_state&) const = default;
  };

  void record(const event& e) noexcept;
  void write_version();  // under write_mutex_
  void write_events(std::uint64_t first, std::uint64_t end, std::uint64_t failed,
                    const std::vector<std::string>& track_names,
                    const std::vector<std::string>& counter_names);

  const std::size_t capacity_;
  const std::uint64_t origin_ns_;

  mutable spin_lock lock_;
  std::vector<std::unique_ptr<event[]>> chunks_;  // guarded by lock_; reserved up front
  std::uint64_t recorded_ = 0;                    // guarded by lock_: events ever stored
  std::size_t next_slot_ = 0;                     // guarded by lock_: ring position of the next
  std::uint64_t failed_ = 0;                      // guarded by lock_: events not stored at all

  mutable std::mutex tracks_mutex_;
  std::map<std::string, std::uint32_t, std::less<>> track_ids_;  // guarded by tracks_mutex_
  std::vector<std::string> track_names_;  // guarded by tracks_mutex_; [tid - 1]

  mutable std::mutex names_mutex_;
  std::map<std::string, std::uint32_t, std::less<>> counter_ids_;  // guarded by names_mutex_
  std::vector<std::string> counter_names_;                         // guarded by names_mutex_

  std::mutex write_mutex_;                // serialises writes; held for the whole file I/O
  std::unique_ptr<trace_file> file_;      // written under write_mutex_
  std::optional<written_state> written_;  // guarded by write_mutex_
  bool stream_written_ = false;           // guarded by write_mutex_
};

}  // namespace stepflow::detail
