#include "trace_file.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <mutex>
#include <set>
#include <string_view>
#include <system_error>

#include <fmt/format.h>

#include "stepflow/errors.hpp"

namespace stepflow::detail {

namespace {

// The files claimed by this process's live trace files, as "<dir device>:<dir inode>/<name>", so
// that two spellings of one path are one claim.
struct claim_registry {
  std::mutex mutex;
  std::set<std::string> names;  // guarded by mutex
};
claim_registry& claims() {
  static claim_registry registry;
  return registry;
}

// "trace.json", 2 -> "trace.2.json"; "trace", 2 -> "trace.2".
std::string numbered(const std::string& name, unsigned k) {
  const auto dot = name.rfind('.');
  if (dot == std::string::npos || dot == 0) return fmt::format("{}.{}", name, k);
  return fmt::format("{}.{}{}", std::string_view(name).substr(0, dot), k,
                     std::string_view(name).substr(dot));
}

// A pipe, terminal, device (or a directory, refused when opened); or a name for an open
// descriptor (/dev/stdout, /dev/fd/N, /proc/self/fd/N): when that is a regular file (stdout
// redirected to a log), replacing the name would leave the descriptor's file behind.
bool is_stream_path(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode)) return true;
  if (path.starts_with("/proc/")) return true;
  struct stat link {};
  return path.starts_with("/dev/") && ::lstat(path.c_str(), &link) == 0 && S_ISLNK(link.st_mode);
}

}  // namespace

trace_file::trace_file(const std::string& requested) : path_(requested) {
  if (is_stream_path(requested)) {
    // O_APPEND: a regular file behind /dev/stdout gets the trace after what is there already.
    fd_ = ::open(requested.c_str(), O_WRONLY | O_APPEND | O_CLOEXEC);
    if (fd_ < 0) fail("cannot be opened for writing", errno);
    return;
  }
  // Resolved now: a symbolic link is followed (its target is replaced, not the link), and a
  // later change of the working directory does not move the trace.
  std::error_code ec;
  std::filesystem::path resolved = std::filesystem::weakly_canonical(requested, ec);
  if (ec) resolved = std::filesystem::absolute(requested);
  if (!resolved.has_filename()) fail("cannot be opened for writing", EISDIR);
  dir_fd_ = ::open(resolved.parent_path().c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd_ < 0) fail("cannot be opened for writing", errno);
  struct stat dir {};
  if (::fstat(dir_fd_, &dir) != 0) {
    const int err = errno;
    ::close(dir_fd_);
    fail("cannot be opened for writing", err);
  }
  const std::string base = resolved.filename().string();
  claim_registry& registry = claims();
  const std::lock_guard lock(registry.mutex);
  for (unsigned k = 1;; ++k) {
    name_ = k == 1 ? base : numbered(base, k);
    claim_ = fmt::format("{}:{}/{}", dir.st_dev, dir.st_ino, name_);
    if (!registry.names.contains(claim_)) break;
  }
  if (name_ != base) path_ = (resolved.parent_path() / name_).string();
  temp_name_ = fmt::format(".{}.{}.tmp", name_, ::getpid());
  registry.names.insert(claim_);  // last: nothing after it throws, so the destructor releases it
}

trace_file::~trace_file() {
  abandon();
  if (is_stream()) {
    if (fd_ >= 0) ::close(fd_);
    return;
  }
  {
    const std::lock_guard lock(claims().mutex);
    claims().names.erase(claim_);
  }
  ::close(dir_fd_);
}

void trace_file::begin() {
  if (is_stream()) return;
  abandon();
  fd_ = ::openat(dir_fd_, temp_name_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  if (fd_ < 0) {
    fail("cannot be written (a new version is written next to it, then renamed over it)", errno);
  }
}

void trace_file::append(const char* data, std::size_t size) {
  while (size != 0) {
    const ssize_t n = ::write(fd_, data, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail("cannot be written", errno);
    }
    data += n;
    size -= static_cast<std::size_t>(n);
  }
}

void trace_file::commit() {
  if (is_stream()) return;
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0) {
    const int err = errno;
    ::unlinkat(dir_fd_, temp_name_.c_str(), 0);
    fail("cannot be written", err);
  }
  if (::renameat(dir_fd_, temp_name_.c_str(), dir_fd_, name_.c_str()) != 0) {
    const int err = errno;
    ::unlinkat(dir_fd_, temp_name_.c_str(), 0);
    fail("cannot be replaced", err);
  }
}

void trace_file::abandon() noexcept {
  if (is_stream() || fd_ < 0) return;
  ::close(fd_);
  fd_ = -1;
  ::unlinkat(dir_fd_, temp_name_.c_str(), 0);
}

void trace_file::fail(const char* doing, int err) const {
  throw config_error(
      fmt::format("trace file '{}' {}: {}", path_, doing, std::generic_category().message(err)));
}

}  // namespace stepflow::detail
