// KV memory in fixed pages, shared by all sequences.
//
// A page holds the K and V of `page_tokens` consecutive positions of one sequence for every
// layer, laid out
//   [n_layer][2 (K, V)][page_tokens][n_kv_head][head_dim]   elements of the KV type
// so that, for one layer, K of the page is a contiguous [page_tokens][n_kv_head][head_dim] block:
// exactly the block the attention kernel walks (kernels::KvView), and a whole page moves to or
// from the chunk store with one copy per layer.
//
// The pool is one allocation of budget_bytes / page_bytes pages. Allocate/Free are O(1) (a free
// stack). Every page carries an intrusive reference count: each block-table entry of a running
// sequence holds one reference, and the radix index holds one for the pages it caches. A page
// returns to the free stack when its count drops to zero; nothing writes a page while another
// holder references it (writers copy first: see PagedSequence::Reserve).
//
// Thread-safety: not synchronized; KvManager serializes access.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "cachette/types.h"
#include "core/huge_pages.h"
#include "engine/kv_cache.h"

namespace cachette {

class PagePool {
 public:
  // Pages of `page_tokens` positions for `shape`, as many as fit in `budget_bytes` (at least
  // one is required: check with PagesFor() first).
  PagePool(const KvShape& shape, int page_tokens, size_t budget_bytes);
  ~PagePool();
  PagePool(const PagePool&) = delete;
  PagePool& operator=(const PagePool&) = delete;

  static size_t PageBytes(const KvShape& shape, int page_tokens);
  static size_t PagesFor(const KvShape& shape, int page_tokens, size_t budget_bytes) {
    return budget_bytes / PageBytes(shape, page_tokens);
  }

  const KvShape& shape() const { return shape_; }
  int page_tokens() const { return page_tokens_; }
  size_t page_bytes() const { return page_bytes_; }
  size_t block_bytes() const { return layer_block_bytes_; }  // one layer's K (or V) of a page
  uint32_t pages_total() const { return n_pages_; }
  uint32_t pages_free() const { return static_cast<uint32_t>(free_.size()); }
  uint32_t pages_used() const { return n_pages_ - pages_free(); }
  size_t bytes_reserved() const { return static_cast<size_t>(n_pages_) * page_bytes_; }

  // A page with reference count 1, or false when none is free.
  bool Allocate(PageId* out);
  void Ref(PageId p);
  // Drops one reference; the page is freed when the count reaches zero.
  void Unref(PageId p);
  uint32_t RefCount(PageId p) const { return refs_[p.value]; }

  std::byte* Data(PageId p) { return mem_.get() + static_cast<size_t>(p.value) * page_bytes_; }
  // K (or V) of `layer` in page p: [page_tokens][n_kv_head][head_dim]. (A compacted sequence
  // may keep any layer's block in any of the n_layer slots: kv/kv_manager.h.)
  std::byte* K(PageId p, int layer) { return Data(p) + (2 * layer) * layer_block_bytes_; }
  std::byte* V(PageId p, int layer) { return Data(p) + (2 * layer + 1) * layer_block_bytes_; }

 private:
  KvShape shape_;
  int page_tokens_;
  size_t page_bytes_;
  size_t layer_block_bytes_;  // one layer's K (or V) of one page
  uint32_t n_pages_;
  ZeroedBuffer mem_;  // n_pages_ * page_bytes_
  std::vector<uint32_t> refs_;
  std::vector<PageId> free_;
};

}  // namespace cachette
