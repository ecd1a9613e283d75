#pragma once
// Where the timeline trace goes, and how each version of it gets there.
//
// Why a file is replaced, not rewritten in place: the trace is rewritten whole at every
// `scheduler::flush()`, often while someone has it open in Perfetto, and a trace is most wanted
// after a crash. Written in place, a reader could see half a file, and a process killed while
// writing left one. So each version goes to a temporary file next to the trace, which is renamed
// over it when complete: a reader sees the previous version or the new one, never a mix.
//
// Why streams get one document: a pipe, a terminal or /dev/stdout cannot be rewritten, so a
// document per write would pile up into something no viewer reads. They get the last version
// only (`trace_recorder::write_final`).
//
// Why a claim per file: two schedulers of one process given the same path (say, both built with
// `options::from_env()` under one `STEPFLOW_TRACE`) would replace each other's trace. The second
// one to open a file gets a numbered sibling ("trace.json" -> "trace.2.json") instead, so both
// timelines are kept; `scheduler::trace_path()` says which file a scheduler writes.

#include <cstddef>
#include <string>

namespace stepflow::detail {

class trace_file {
 public:
  /// Claims `requested` (or its first free numbered sibling) for this process; opens a stream
  /// now, a file's directory only (the first `begin()` shows whether a file can be written
  /// there). Throws `config_error` naming the path and the system's reason when it cannot.
  explicit trace_file(const std::string& requested);
  ~trace_file();
  trace_file(const trace_file&) = delete;
  trace_file& operator=(const trace_file&) = delete;

  /// The file written: the requested path, or the numbered sibling claimed instead.
  const std::string& path() const noexcept { return path_; }

  /// A pipe, terminal or device, or a name of an open descriptor (/dev/stdout, /proc/self/fd/N)
  /// even when that is a regular file: each version is appended, so only one should be written.
  bool is_stream() const noexcept { return dir_fd_ < 0; }

  /// Starts a new version of the file. Not thread-safe (the recorder serialises writes).
  void begin();
  /// Appends to the version begun.
  void append(const char* data, std::size_t size);
  /// Makes the version begun the file's content.
  void commit();
  /// Drops the version begun (after a failed append). Never throws.
  void abandon() noexcept;

 private:
  [[noreturn]] void fail(const char* doing, int err) const;

  std::string path_;       // for messages and `path()`
  std::string name_;       // the file's name in its directory (files only)
  std::string temp_name_;  // the version being written, next to it (files only)
  int dir_fd_ = -1;        // the file's directory; -1 for a stream
  int fd_ = -1;            // the stream, or the version being written
  std::string claim_;      // the process-wide claim held (files only)
};

}  // namespace stepflow::detail
