// Memory for large arrays that a decode step reads in full again and again (KV caches).
//
// Such an array spans thousands of 4 KiB pages, more than the TLB holds, so each step walks
// the page tables for its pages again (in a VM, a two-dimensional walk). Transparent huge
// pages (2 MiB) take most of that away. On an AMD EPYC Zen 5 VM (docs/benchmarks.md): decode
// at 16K tokens of context 31.5 -> 42.5 tok/s with the KV on huge pages (attention 22.0 ->
// 14.0 ms a token), at 4K attention 4.6 -> 3.1 ms; a decode step's attention over the paged
// layout of 24 layers at 4K, f16, 5.1-6.2 -> 3.6-4.0 ms. The kernel gives huge pages to a
// range advised with MADV_HUGEPAGE when THP is "madvise" (as on that VM) or "always";
// elsewhere the advice changes nothing.
#pragma once

#include <cstddef>

namespace cachette {

// Advises the kernel to back the whole 2 MiB ranges of [p, p + bytes) with huge pages.
// p must be page-aligned. Best effort: returns false (and changes nothing) where the kernel
// does not take the advice.
bool AdviseHugePages(void* p, size_t bytes);

// `bytes` of zeroed memory, page-aligned: from 2 MiB up an anonymous mapping that starts on a
// huge-page boundary, advised to use huge pages, which the OS backs as it is touched; below
// that the heap. Throws std::bad_alloc when there is no memory, as new does.
class ZeroedBuffer {
 public:
  ZeroedBuffer() = default;
  explicit ZeroedBuffer(size_t bytes);
  ~ZeroedBuffer();
  ZeroedBuffer(ZeroedBuffer&& o) noexcept;
  ZeroedBuffer& operator=(ZeroedBuffer&& o) noexcept;
  ZeroedBuffer(const ZeroedBuffer&) = delete;
  ZeroedBuffer& operator=(const ZeroedBuffer&) = delete;

  std::byte* get() const { return p_; }
  size_t size() const { return bytes_; }
  bool mapped() const { return mapped_; }  // an anonymous mapping (not the heap)

 private:
  void Release();

  std::byte* p_ = nullptr;
  size_t bytes_ = 0;
  bool mapped_ = false;
};

}  // namespace cachette
