#include "cache/buffer_pool.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14; older kernels answer EINVAL and we fall back
#endif

namespace cachette::cache {
namespace {

// Maps the pages of [p, p + n) writable in one system call instead of one fault per page. Best
// effort: on kernels without MADV_POPULATE_WRITE the first write faults them in as before.
void Prefault(std::byte* p, size_t n) {
  static const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + page - 1) & ~(page - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + n) & ~(page - 1);
  if (end > begin) {
    (void)::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_POPULATE_WRITE);
  }
}

// The deleter of a shared buffer: hands the vector back to its pool if the pool still exists.
struct ReturnToPool {
  std::weak_ptr<BufferPool> pool;
  void operator()(const std::vector<std::byte>* v) const {
    // Created non-const by Share, so taking ownership back as non-const is sound.
    std::unique_ptr<std::vector<std::byte>> owned(const_cast<std::vector<std::byte>*>(v));
    if (std::shared_ptr<BufferPool> p = pool.lock()) p->Give(std::move(*owned));
  }
};

}  // namespace

std::shared_ptr<BufferPool> BufferPool::Create(uint64_t max_idle_bytes) {
  return std::shared_ptr<BufferPool>(new BufferPool(max_idle_bytes));
}

BufferPool::~BufferPool() = default;

std::vector<std::byte> BufferPool::PopIdle(size_t size) {
  std::lock_guard lock(mu_);
  ++stats_.takes;
  // The smallest idle buffer that fits, unless it would waste more than it holds.
  auto it = idle_.lower_bound(size);
  if (it == idle_.end() || it->first / 2 > size) return {};
  stats_.idle_bytes -= it->first;
  --stats_.idle_buffers;
  ++stats_.recycled;
  return std::move(idle_.extract(it).mapped());
}

std::vector<std::byte> BufferPool::Take(size_t size) {
  std::vector<std::byte> v = PopIdle(size);
  if (v.capacity() == 0 && size > 0) {
    v.reserve(size);
    Prefault(v.data(), size);
  }
  v.resize(size);  // a no-op for a recycled buffer of the same size (the common case)
  return v;
}

std::vector<std::byte> BufferPool::TakeCopy(std::span<const std::byte> bytes) {
  std::vector<std::byte> v = PopIdle(bytes.size());
  if (v.capacity() == 0 && !bytes.empty()) {
    v.reserve(bytes.size());
    Prefault(v.data(), bytes.size());
  }
  v.assign(bytes.begin(), bytes.end());  // within capacity: one memmove, no fill, no realloc
  return v;
}

SharedBytes BufferPool::Share(std::vector<std::byte> buffer) {
  auto owned = std::make_unique<std::vector<std::byte>>(std::move(buffer));
  return SharedBytes(owned.release(), ReturnToPool{weak_from_this()});
}

void BufferPool::Give(std::vector<std::byte> buffer) {
  const size_t cap = buffer.capacity();
  if (cap == 0) return;
  std::lock_guard lock(mu_);
  if (stats_.idle_bytes + cap > max_idle_bytes_) return;  // freed as `buffer` goes
  stats_.idle_bytes += cap;
  ++stats_.idle_buffers;
  idle_.emplace(cap, std::move(buffer));
}

BufferPoolStats BufferPool::Stats() const {
  std::lock_guard lock(mu_);
  return stats_;
}

}  // namespace cachette::cache
