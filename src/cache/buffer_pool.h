// BufferPool: recycled record buffers for the RAM tier, so a put copies into memory that is
// already mapped instead of paying a page fault per 4 KiB of a freshly allocated buffer.
//
// Why: a RAM put of a 3 MiB chunk into new memory ran at ~22% of memcpy bandwidth, almost all
// of it page faults (docs/benchmarks.md, "Tiered store"). Chunk records of one model all have
// the same size, and the store frees one (eviction) for every one it allocates once the RAM
// tier is at its budget, so a small free list turns nearly every put into a plain copy.
//
// Life of a buffer:
//   1. Take(size): popped from the free list (the smallest idle buffer whose capacity fits and
//      is not more than 2x oversized), else freshly allocated and pre-faulted in one madvise;
//   2. owned by the caller as a plain std::vector (written, e.g. by EncodeRecordInto or read());
//   3. Share(): published as an immutable SharedBytes whose deleter is this pool; readers hold
//      it as long as they like (zero-copy RAM hits are unchanged);
//   4. when the last owner lets go, it goes back to the free list, or is freed if the free
//      list holds max_idle_bytes already or the pool is gone.
// Bounds: the memory in use is bounded by whoever holds the shared buffers (the RAM tier's
// budget); idle memory by max_idle_bytes.
//
// Thread-safety: every method is safe to call concurrently; a buffer may be released on any
// thread, before or after the pool is destroyed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

namespace cachette::cache {

using SharedBytes = std::shared_ptr<const std::vector<std::byte>>;

struct BufferPoolStats {
  uint64_t takes = 0;       // Take calls
  uint64_t recycled = 0;    // of which served from the free list
  uint64_t idle_bytes = 0;  // capacity held by the free list now
  uint64_t idle_buffers = 0;
};

class BufferPool : public std::enable_shared_from_this<BufferPool> {
 public:
  // max_idle_bytes: capacity the free list may hold; released buffers beyond it are freed.
  static std::shared_ptr<BufferPool> Create(uint64_t max_idle_bytes);
  ~BufferPool();
  BufferPool(const BufferPool&) = delete;
  BufferPool& operator=(const BufferPool&) = delete;

  // A buffer of exactly `size` bytes whose contents are unspecified (a recycled buffer keeps
  // its old bytes): the caller overwrites all of it. Never fails (allocation failure throws
  // std::bad_alloc, as a std::vector would).
  std::vector<std::byte> Take(size_t size);
  // A buffer holding a copy of `bytes`. Cheaper than Take + memcpy when no buffer is idle: a
  // fresh one is written once by the copy instead of zero-filled first.
  std::vector<std::byte> TakeCopy(std::span<const std::byte> bytes);

  // Publishes `buffer` read-only; it returns to this pool when the last owner releases it.
  SharedBytes Share(std::vector<std::byte> buffer);

  // Returns `buffer` to the free list now (for a buffer that was never shared).
  void Give(std::vector<std::byte> buffer);

  BufferPoolStats Stats() const;

 private:
  explicit BufferPool(uint64_t max_idle_bytes) : max_idle_bytes_(max_idle_bytes) {}
  // An idle buffer of capacity >= size (not wastefully larger), or an empty vector.
  std::vector<std::byte> PopIdle(size_t size);

  const uint64_t max_idle_bytes_;
  mutable std::mutex mu_;
  // Idle buffers by capacity (a multimap: records of one layout share a size).
  std::multimap<size_t, std::vector<std::byte>> idle_;  // GUARDED_BY(mu_)
  BufferPoolStats stats_;                                // GUARDED_BY(mu_)
};

}  // namespace cachette::cache
