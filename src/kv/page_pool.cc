#include "kv/page_pool.h"

#include <new>

#include "core/check.h"
#include "core/huge_pages.h"

namespace cachette {

size_t PagePool::PageBytes(const KvShape& shape, int page_tokens) {
  return static_cast<size_t>(shape.n_layer) * 2 * page_tokens * shape.token_bytes();
}

PagePool::PagePool(const KvShape& shape, int page_tokens, size_t budget_bytes)
    : shape_(shape),
      page_tokens_(page_tokens),
      page_bytes_(PageBytes(shape, page_tokens)),
      layer_block_bytes_(static_cast<size_t>(page_tokens) * shape.token_bytes()) {
  CT_CHECK(page_tokens > 0) << "page_tokens " << page_tokens;
  const size_t n = budget_bytes / page_bytes_;
  CT_CHECK(n >= 1 && n < (size_t{1} << 31)) << "budget of " << budget_bytes << " bytes gives "
                                            << n << " pages of " << page_bytes_ << " bytes";
  n_pages_ = static_cast<uint32_t>(n);
  // Zeroed memory the OS backs lazily, so budget never touched costs no memory; on huge pages
  // (core/huge_pages.h): a decode step reads every page of its sequence, each layer's block
  // of a page in 4 KiB pages of its own, far more pages than the TLB holds. Pages are handed
  // out lowest first and freed ones reused first, so the memory touched stays compact and huge
  // pages add at most 2 MiB to it.
  try {
    mem_ = ZeroedBuffer(static_cast<size_t>(n_pages_) * page_bytes_);
  } catch (const std::bad_alloc&) {
    CT_CHECK(false) << "cannot map " << static_cast<size_t>(n_pages_) * page_bytes_
                    << " bytes of KV pages";
  }
  refs_.assign(n_pages_, 0);
  free_.reserve(n_pages_);
  for (uint32_t i = n_pages_; i-- > 0;) free_.push_back(PageId(i));  // page 0 handed out first
}

PagePool::~PagePool() = default;

bool PagePool::Allocate(PageId* out) {
  if (free_.empty()) return false;
  *out = free_.back();
  free_.pop_back();
  CT_CHECK_EQ(refs_[out->value], 0u);
  refs_[out->value] = 1;
  return true;
}

void PagePool::Ref(PageId p) {
  CT_CHECK(refs_[p.value] > 0) << "Ref of free page " << p.value;
  ++refs_[p.value];
}

void PagePool::Unref(PageId p) {
  CT_CHECK(refs_[p.value] > 0) << "Unref of free page " << p.value;
  if (--refs_[p.value] == 0) free_.push_back(p);
}

}  // namespace cachette
