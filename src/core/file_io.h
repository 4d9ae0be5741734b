// Small POSIX file helpers: the files the cache layer owns on disk (the disk tier's chunk
// records, the session journal) and the model files read whole. Every error is a kIOError
// naming the call and the path. Internal; not installed.
#pragma once

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "cachette/status.h"
#include "cachette/types.h"

namespace cachette {

// kIOError "<what> <path>: <strerror(errno)>".
Status Errno(const std::string& what, const std::string& path);

// Closes a file descriptor on scope exit.
class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  // Closes now, reporting the error a deferred write-back may surface at close.
  int Close() {
    const int rc = ::close(fd_);
    fd_ = -1;
    return rc;
  }

 private:
  int fd_;
};

// Creates `path` (mode 0755) unless it exists.
Status MakeDir(const std::string& path);
// Writes all of `bytes` to `fd` (retrying short writes and EINTR).
Status WriteAll(int fd, ByteSpan bytes, const std::string& path);
// Reads up to `n` bytes at `offset`; fewer only at end of file.
Result<size_t> ReadAt(int fd, std::byte* dst, size_t n, uint64_t offset, const std::string& path);
Status FsyncDir(const std::string& path);
// Names in `dir` (not . and ..); kIOError if it cannot be listed.
Result<std::vector<std::string>> ListDir(const std::string& dir);
bool EndsWith(std::string_view s, std::string_view suffix);

}  // namespace cachette
