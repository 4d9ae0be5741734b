#include "core/huge_pages.h"

#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>

namespace cachette {
namespace {
constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kPage = 4096;
}  // namespace

bool AdviseHugePages(void* p, size_t bytes) {
#ifdef MADV_HUGEPAGE
  return bytes >= kHugePage && madvise(p, bytes, MADV_HUGEPAGE) == 0;
#else
  (void)p;
  (void)bytes;
  return false;
#endif
}

ZeroedBuffer::ZeroedBuffer(size_t bytes) : bytes_(bytes) {
  if (bytes == 0) return;
  if (bytes >= kHugePage) {
    // Mapped with a huge page of slack and trimmed to start on a huge-page boundary: the
    // kernel backs only whole aligned 2 MiB ranges with huge pages, and it does not align
    // anonymous mappings itself before Linux 6.7 (Debian 12 runs 6.1).
    const size_t span = bytes + kHugePage;
    void* m = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) throw std::bad_alloc();
    const auto start = reinterpret_cast<uintptr_t>(m);
    const uintptr_t aligned = (start + kHugePage - 1) & ~(kHugePage - 1);
    const uintptr_t end = (aligned + bytes + kPage - 1) & ~(kPage - 1);
    if (aligned > start) munmap(m, aligned - start);
    if (start + span > end) munmap(reinterpret_cast<void*>(end), start + span - end);
    p_ = reinterpret_cast<std::byte*>(aligned);
    AdviseHugePages(p_, bytes);
    mapped_ = true;
    return;
  }
  void* m = std::aligned_alloc(kPage, (bytes + kPage - 1) / kPage * kPage);
  if (m == nullptr) throw std::bad_alloc();
  std::memset(m, 0, bytes);
  p_ = static_cast<std::byte*>(m);
}

ZeroedBuffer::~ZeroedBuffer() { Release(); }

ZeroedBuffer::ZeroedBuffer(ZeroedBuffer&& o) noexcept
    : p_(std::exchange(o.p_, nullptr)),
      bytes_(std::exchange(o.bytes_, 0)),
      mapped_(std::exchange(o.mapped_, false)) {}

ZeroedBuffer& ZeroedBuffer::operator=(ZeroedBuffer&& o) noexcept {
  if (this != &o) {
    Release();
    p_ = std::exchange(o.p_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
    mapped_ = std::exchange(o.mapped_, false);
  }
  return *this;
}

void ZeroedBuffer::Release() {
  if (p_ == nullptr) return;
  if (mapped_) {
    munmap(p_, bytes_);
  } else {
    std::free(p_);
  }
  p_ = nullptr;
}

}  // namespace cachette
