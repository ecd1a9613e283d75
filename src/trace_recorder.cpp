#include "trace_recorder.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <new>
#include <thread>
#include <utility>

#include <fmt/format.h>

#include "stepflow/version.hpp"
#include "trace_file.hpp"

namespace stepflow::detail {

namespace {

inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

constexpr std::uint8_t phase_complete = 0;
constexpr std::uint8_t phase_counter = 1;

// Events per ring chunk: 64 KiB, below glibc's mmap threshold, so a new chunk is a cheap malloc.
constexpr std::size_t chunk_events = 1024;

// Events copied out of the ring per spin-lock hold while writing.
constexpr std::size_t write_batch = 1024;

// Bytes of JSON buffered before they go to the file.
constexpr std::size_t flush_bytes = std::size_t{1} << 20;

// Appends `s` as a JSON string (with quotes). Escapes '"', '\\' and control characters; copies
// valid UTF-8 as is and replaces each byte of an invalid sequence with U+FFFD, so the output is
// always valid JSON whatever bytes a label or device name holds.
void append_json_string(fmt::memory_buffer& out, std::string_view s) {
  out.push_back('"');
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const std::size_t n = s.size();
  std::size_t i = 0;
  while (i < n) {
    const unsigned char c = p[i];
    if (c < 0x80) {
      switch (c) {
        case '"':
          out.append(std::string_view("\\\""));
          break;
        case '\\':
          out.append(std::string_view("\\\\"));
          break;
        case '\n':
          out.append(std::string_view("\\n"));
          break;
        case '\r':
          out.append(std::string_view("\\r"));
          break;
        case '\t':
          out.append(std::string_view("\\t"));
          break;
        case '\b':
          out.append(std::string_view("\\b"));
          break;
        case '\f':
          out.append(std::string_view("\\f"));
          break;
        default:
          if (c < 0x20) {
            fmt::format_to(fmt::appender(out), "\\u{:04x}", static_cast<unsigned>(c));
          } else {
            out.push_back(static_cast<char>(c));
          }
      }
      ++i;
      continue;
    }
    // A multi-byte sequence: its length from the lead byte, and the range its second byte must
    // be in to exclude overlong forms, surrogates and code points above U+10FFFF (RFC 3629).
    std::size_t len = 0;
    unsigned char lo = 0x80;
    unsigned char hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    }
    bool valid = len != 0 && i + len <= n && p[i + 1] >= lo && p[i + 1] <= hi;
    for (std::size_t k = 2; valid && k < len; ++k) valid = p[i + k] >= 0x80 && p[i + k] <= 0xBF;
    if (valid) {
      out.append(s.substr(i, len));
      i += len;
    } else {
      out.append(std::string_view("\\ufffd"));
      ++i;
    }
  }
  out.push_back('"');
}

// Appends without parsing a format string: write() emits up to millions of events, and
// fmt::format_to's run-time format parsing was most of its time.
void append(fmt::memory_buffer& out, std::string_view s) { out.append(s); }

void append_uint(fmt::memory_buffer& out, std::uint64_t v) {
  const fmt::format_int digits(v);
  out.append(digits.data(), digits.data() + digits.size());
}

// Nanoseconds as microseconds with three decimals ("12.345"): exact, no floating point.
void append_us(fmt::memory_buffer& out, std::uint64_t ns) {
  append_uint(out, ns / 1000);
  const auto frac = static_cast<unsigned>(ns % 1000);
  const char decimals[4] = {'.', static_cast<char>('0' + frac / 100),
                            static_cast<char>('0' + frac / 10 % 10),
                            static_cast<char>('0' + frac % 10)};
  out.append(decimals, decimals + 4);
}

}  // namespace

void spin_lock::wait_until_free() const noexcept {
  for (int spins = 0; locked_.load(std::memory_order_relaxed); ++spins) {
    if (spins < 64) {
      cpu_relax();
    } else {
      std::this_thread::yield();  // the holder may have been preempted
    }
  }
}

// 64 bytes, trivially copyable: the ring is plain memory and copying out is a memcpy.
struct trace_recorder::event {
  std::uint64_t ts_ns;  // start (X) or sample time (C), now_ns() units
  std::uint64_t value;  // duration (X) or counter value (C)
  std::uint64_t step;   // step (X) or counter name id (C)
  std::uint32_t track;  // tid
  std::uint8_t phase;   // phase_complete or phase_counter
  std::uint8_t kind;    // closure_kind (X)
  std::uint8_t label_size;
  bool label_cut;
  char label[max_label_bytes];  // not NUL-terminated; label_size bytes
};

trace_recorder::trace_recorder(std::string path, std::size_t max_events)
    : capacity_(max_events), origin_ns_(now_ns()), file_(std::make_unique<trace_file>(path)) {
  chunks_.reserve((capacity_ + chunk_events - 1) / chunk_events);
  write();
}

trace_recorder::~trace_recorder() = default;

std::uint64_t trace_recorder::now_ns() noexcept {
  const auto t = std::chrono::steady_clock::now().time_since_epoch();
  return static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(t).count());
}

std::uint32_t trace_recorder::track(std::string_view device, track_kind kind) {
  // Keyed by the kind, then the name: no device name can make another pair's key.
  std::string key(1, static_cast<char>(kind));
  key.append(device);
  const std::lock_guard lock(tracks_mutex_);
  if (const auto it = track_ids_.find(key); it != track_ids_.end()) return it->second;
  switch (kind) {
    case track_kind::sync:
      track_names_.push_back(fmt::format("device {}", device));
      break;
    case track_kind::async:
      track_names_.push_back(fmt::format("device {} async", device));
      break;
    case track_kind::joined:
      track_names_.emplace_back("joined closures");
      break;
  }
  const auto id = static_cast<std::uint32_t>(track_names_.size());
  try {
    track_ids_.emplace(std::move(key), id);
  } catch (...) {
    track_names_.pop_back();
    throw;
  }
  return id;
}

void trace_recorder::record(const event& e) noexcept {
  static_assert(sizeof(event) == 64 || sizeof(void*) != 8, "a ring slot is one cache line");
  const std::lock_guard lock(lock_);
  if (capacity_ == 0) {
    ++failed_;
    return;
  }
  const std::size_t chunk = next_slot_ / chunk_events;
  if (chunk == chunks_.size()) {  // only while the ring fills for the first time
    const std::size_t size = std::min(chunk_events, capacity_ - chunk * chunk_events);
    auto* storage = new (std::nothrow) event[size];
    if (storage == nullptr) {
      ++failed_;
      return;
    }
    chunks_.emplace_back(storage);  // no reallocation: reserved in the constructor
  }
  chunks_[chunk][next_slot_ % chunk_events] = e;
  ++recorded_;
  if (++next_slot_ == capacity_) next_slot_ = 0;
}

void trace_recorder::complete(std::uint32_t track, closure_kind kind, const char* label,
                              std::uint64_t step, std::uint64_t start_ns,
                              std::uint64_t duration_ns) noexcept {
  event e{};
  e.ts_ns = start_ns;
  e.value = duration_ns;
  e.step = step;
  e.track = track;
  e.phase = phase_complete;
  e.kind = static_cast<std::uint8_t>(kind);
  std::size_t size = 0;
  if (label != nullptr) {
    while (size < max_label_bytes && label[size] != '\0') ++size;
  }
  e.label_cut = size == max_label_bytes && label[size] != '\0';
  if (e.label_cut) {
    // Cut before a UTF-8 continuation byte, so the kept part ends on a whole character.
    while (size > 0 && (static_cast<unsigned char>(label[size]) & 0xC0) == 0x80) --size;
  }
  if (size != 0) std::memcpy(e.label, label, size);
  e.label_size = static_cast<std::uint8_t>(size);
  record(e);
}

void trace_recorder::counter(std::uint32_t track, std::string_view name, std::uint64_t value,
                             std::uint64_t ts_ns) noexcept {
  std::uint32_t id = 0;
  bool named = false;
  try {
    const std::lock_guard lock(names_mutex_);
    if (const auto it = counter_ids_.find(name); it != counter_ids_.end()) {
      id = it->second;
      named = true;
    } else if (counter_names_.size() < max_counter_names) {
      counter_names_.emplace_back(name);
      id = static_cast<std::uint32_t>(counter_names_.size() - 1);
      try {
        counter_ids_.emplace(std::string(name), id);
        named = true;
      } catch (...) {
        counter_names_.pop_back();
      }
    }
  } catch (...) {  // std::bad_alloc, std::system_error from the mutex: not recorded
  }
  if (!named) {
    const std::lock_guard lock(lock_);
    ++failed_;
    return;
  }
  event e{};
  e.ts_ns = ts_ns;
  e.value = value;
  e.step = id;
  e.track = track;
  e.phase = phase_counter;
  record(e);
}

std::uint64_t trace_recorder::dropped() const noexcept {
  const std::lock_guard lock(lock_);
  return (recorded_ > capacity_ ? recorded_ - capacity_ : 0) + failed_;
}

const std::string& trace_recorder::path() const noexcept { return file_->path(); }

void trace_recorder::write() {
  if (file_->is_stream()) return;
  const std::lock_guard write_lock(write_mutex_);
  write_version();
}

void trace_recorder::write_final() {
  const std::lock_guard write_lock(write_mutex_);
  if (file_->is_stream()) {
    if (stream_written_) return;
    stream_written_ = true;  // even if writing fails: a second try would add a second document
  }
  write_version();
}

void trace_recorder::write_version() {
  // The events to write: those recorded before this point (sequence numbers [first, end)).
  std::uint64_t end = 0;
  std::uint64_t first = 0;
  std::uint64_t failed = 0;
  {
    const std::lock_guard lock(lock_);
    end = recorded_;
    first = end - std::min<std::uint64_t>(end, capacity_);
    failed = failed_;
  }
  // Every event before `end` has its counter name interned already; tracks may be newer.
  std::vector<std::string> counter_names;
  {
    const std::lock_guard lock(names_mutex_);
    counter_names = counter_names_;
  }
  std::vector<std::string> track_names;
  {
    const std::lock_guard lock(tracks_mutex_);
    track_names = track_names_;
  }
  // A full ring is a file of 100 MiB or more: not rewritten when nothing changed (a flush
  // after a quiet period, a scheduler with no devices). Counter names come with their events.
  const written_state now{end, failed, track_names.size()};
  if (written_ && *written_ == now) return;

  file_->begin();
  try {
    write_events(first, end, failed, track_names, counter_names);
    file_->commit();
  } catch (...) {
    file_->abandon();
    throw;
  }
  written_ = now;
}

void trace_recorder::write_events(std::uint64_t first, std::uint64_t end, std::uint64_t failed,
                                  const std::vector<std::string>& track_names,
                                  const std::vector<std::string>& counter_names) {
  fmt::memory_buffer out;
  const fmt::appender it(out);
  const auto flush = [&](bool force) {
    if (force || out.size() >= flush_bytes) {
      file_->append(out.data(), out.size());
      out.clear();
    }
  };

  out.append(
      std::string_view("{\"displayTimeUnit\":\"ns\",\"traceEvents\":[\n"
                       "{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":1,\"tid\":0,"
                       "\"args\":{\"name\":\"stepflow\"}}"));
  for (std::size_t i = 0; i < track_names.size(); ++i) {
    const std::size_t tid = i + 1;
    out.append(std::string_view(",\n{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":1,\"tid\":"));
    fmt::format_to(it, "{},\"args\":{{\"name\":", tid);
    append_json_string(out, track_names[i]);
    fmt::format_to(it,
                   "}}}},\n{{\"name\":\"thread_sort_index\",\"ph\":\"M\",\"pid\":1,\"tid\":{},"
                   "\"args\":{{\"sort_index\":{}}}}}",
                   tid, tid);
  }

  const auto relative = [this](std::uint64_t ns) { return ns > origin_ns_ ? ns - origin_ns_ : 0; };
  std::vector<event> batch;
  batch.reserve(write_batch);
  std::uint64_t written = 0;
  std::uint64_t seq = first;
  while (seq < end) {
    batch.clear();
    {
      const std::lock_guard lock(lock_);
      // Events the ring overwrote while we were writing are lost; skip to the oldest kept.
      seq = std::max(seq, recorded_ - std::min<std::uint64_t>(recorded_, capacity_));
      if (seq >= end) break;  // everything up to `end` was overwritten meanwhile
      const std::uint64_t n = std::min<std::uint64_t>(end - seq, write_batch);
      for (std::uint64_t k = 0; k < n; ++k) {
        const std::size_t slot = static_cast<std::size_t>((seq + k) % capacity_);
        batch.push_back(chunks_[slot / chunk_events][slot % chunk_events]);
      }
      seq += n;
    }
    for (const event& e : batch) {
      if (e.phase == phase_complete) {
        const auto kind = to_string(static_cast<closure_kind>(e.kind));
        append(out, ",\n{\"name\":");
        if (e.label_size != 0) {
          std::string_view label(e.label, e.label_size);
          if (e.label_cut) {
            append_json_string(out, std::string(label) + "\xE2\x80\xA6");  // "…"
          } else {
            append_json_string(out, label);
          }
        } else {
          append_json_string(out, kind);
        }
        append(out, ",\"cat\":\"");
        append(out, kind);
        append(out, "\",\"ph\":\"X\",\"ts\":");
        append_us(out, relative(e.ts_ns));
        append(out, ",\"dur\":");
        append_us(out, e.value);
        append(out, ",\"pid\":1,\"tid\":");
        append_uint(out, e.track);
        append(out, ",\"args\":{\"step\":");
        append_uint(out, e.step);
        append(out, ",\"kind\":\"");
        append(out, kind);
        append(out, "\"}}");
      } else {
        append(out, ",\n{\"name\":");
        append_json_string(out, e.step < counter_names.size()
                                    ? std::string_view(counter_names[e.step])
                                    : std::string_view("counter"));
        append(out, ",\"ph\":\"C\",\"ts\":");
        append_us(out, relative(e.ts_ns));
        append(out, ",\"pid\":1,\"tid\":");
        append_uint(out, e.track);
        append(out, ",\"args\":{\"value\":");
        append_uint(out, e.value);
        append(out, "}}");
      }
      ++written;
    }
    flush(false);
  }

  fmt::format_to(it,
                 "\n],\"otherData\":{{\"producer\":\"stepflow {}\",\"max_events\":{},"
                 "\"dropped_events\":{}}}}}\n",
                 version_string, capacity_, end - written + failed);
  flush(true);
}

}  // namespace stepflow::detail
