// Paged KV memory with an exact prefix cache: the page pool, the radix index over it, and the
// sequences that read and write pages through block tables.
//
// Life of a sequence:
//   1. Start(ns, prompt): the longest cached prefix of the prompt is looked up; the sequence
//      begins with those pages in its block table and n_tokens() = the matched length. (The
//      caller then prefills only prompt[n_tokens():].)
//   2. The engine calls Reserve(n) before writing positions [n_tokens(), n): pages are
//      allocated (evicting unreferenced cached pages if the pool is full), and a shared page
//      about to be written is first copied (copy-on-write), so a referenced page is never
//      overwritten.
//   3. Commit(seq, tokens): after prefill and from time to time during decode, the sequence's
//      full pages are added to the index, so concurrent and later requests can share them.
//   4. The sequence is destroyed (or Finish()ed): its pages, the last partial one included,
//      are committed, and its references dropped; pages only the index holds stay cached.
// When the pool is exhausted by pinned or running pages, Reserve() fails with
// kResourceExhausted and nothing is overwritten. Memory use is the budget, fixed at start.
//
// Thread-safety: all methods, of the manager and of its sequences, are safe to call from
// several threads (one mutex); a single sequence must not be used by two threads at once.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "cachette/status.h"
#include "core/hash.h"
#include "engine/kv_budget.h"
#include "engine/kv_cache.h"
#include "kv/page_pool.h"
#include "kv/radix_index.h"
#include "model/model.h"

namespace cachette {

class KvManager;

struct KvManagerOptions {
  KvShape shape;
  int page_tokens = 16;
  size_t budget_bytes = size_t{512} << 20;
  RadixIndex::Priority priority = RadixIndex::Lru;
  RadixIndex::ClockFn clock;  // default: steady clock
  // Where the index reports full pages entering and leaving it (borrowed; null = nowhere).
  KvEventSink* events = nullptr;
};

// The one namespace of a request's KV, used by the radix index, the chunk store (every tier)
// and the admin API alike: the chunk store's NamespaceId over every field that changes the
// bytes (model weights fingerprint, architecture and dims, KV type and layout, RoPE settings,
// adapter) plus the tenant salt. Different namespaces never share entries; two processes with
// the same model and salt compute the same id (so servers sharing Redis share chunks).
Hash128 KvNamespace(const Model& model, kernels::KvType kv_type,
                    std::string_view tenant_salt = {}, std::string_view adapter = {});

class PagedSequence final : public SequenceKv {
 public:
  ~PagedSequence() override;  // Finish()es if not done

  int64_t n_tokens() const override { return n_tokens_; }
  int64_t capacity() const override { return capacity_; }
  const KvShape& shape() const override;  // its manager's
  // Compacted: room for n - n_tokens() more slots after each layer's last (SequenceKv).
  Status Reserve(int64_t n) override;
  void* KSlot(int layer, int64_t pos) override;
  void* VSlot(int layer, int64_t pos) override;
  void* KWrite(int layer, int64_t pos) override;
  void* VWrite(int layer, int64_t pos) override;
  kernels::KvView View(int layer, int64_t n) const override;
  // Only before a compaction (a compacted sequence's slots are not its first n tokens). On a
  // kivi4 sequence, slots added this way hold quantized tokens (a restore from a tier).
  void SetTokens(int64_t n) override;
  int64_t layer_tokens(int layer) const override { return book_.LayerTokens(layer, n_tokens_); }
  int64_t next_position() const override { return book_.NextPosition(n_tokens_); }
  void Append(int64_t count) override;
  // A layer at a time (SequenceKv): each layer takes its own blocks, packed as after a
  // compaction, so a cascade that compacts each layer once read holds only what it keeps.
  // The first call needs whole pages (n_tokens() a multiple of the page size; kInvalidArgument
  // otherwise): they stay the exact leading pages.
  Status ReserveLayer(int layer, int64_t count) override;
  void AppendLayer(int layer, int64_t count) override;
  void AppendPositions(int64_t count) override;
  void MarkInexactFrom(int64_t n) override { inexact_from_ = std::min(inexact_from_, n); }

  // KV budget policies (KvManager::Compact) and segment reuse (MarkInexactFrom). Whether a
  // policy has compacted the sequence; the leading slots that still hold the exact KV of the
  // first tokens (all of them when neither happened; on a kivi4 sequence, only its quantized
  // ones: the f16 window is not in the pages), which alone may enter the index; tokens
  // read so far; slots per layer held (summed over layers, divided by their count, rounded
  // up).
  bool compacted() const { return book_.compacted; }
  int64_t exact_tokens() const {
    return std::min({book_.Exact(n_tokens_), inexact_from_, tail_ ? tail_->begin() : INT64_MAX});
  }
  int64_t tokens_seen() const override { return book_.Seen(n_tokens_); }
  int64_t kept_tokens() const;
  // The sequence is ending (nothing will attend to it again): its f16 window, if it has one,
  // goes into its pages (KvWindow::Seal), so exact_tokens() and what Commit and the tiers take
  // reach its end (kivi4: its last whole key group). KvManager::Finish does it too; callers
  // that save to the tiers first call it before.
  void SealWindow() {
    if (tail_) tail_->Seal(*this, n_tokens_);
  }

  const Hash128& ns() const { return ns_; }
  // The pool the sequence's pages belong to.
  KvManager& manager() const { return *manager_; }
  // Tokens reused from the cache when the sequence started.
  int64_t cached_tokens() const { return cached_tokens_; }
  // Pages whose block b holds block b of every layer: all of them until a compaction, then
  // the exact leading ones (the only ones Commit may hand the index).
  const std::vector<PageId>& block_table() const { return pages_; }
  // Pages the sequence holds a reference to: the block table and, once compacted, the pages
  // its layers' other blocks are packed into.
  int64_t held_pages() const { return static_cast<int64_t>(pages_.size() + spill_.size()); }

 private:
  friend class KvManager;
  PagedSequence(KvManager* m, const Hash128& ns, int64_t capacity);
  void SetPage(size_t block, PageId p);  // updates the per-layer pointer tables
  // Where a layer block past the block table lives: spill_[spill], layer slot `slot` (its K
  // at PagePool::K(page, slot), its V at PagePool::V(page, slot)).
  struct Loc {
    uint32_t spill = 0;
    uint32_t slot = 0;
  };
  void Point(int layer, size_t block, Loc loc);  // k_ptr_/v_ptr_[layer][block] at loc
  // Compacted only: gives each layer l the blocks for extra[l] more slots, from free_ first,
  // then from new pages. REQUIRES manager_->mu_; kResourceExhausted leaves it unchanged.
  Status GrowLayersLocked(const std::vector<int64_t>& extra);
  // Compacted only, after the slots moved: keeps the block table's first `natural` pages,
  // and packs every layer's blocks past them (those its slot count uses) into as few pages as
  // hold them, moving blocks out of the pages it gives back. Pages released are returned in
  // `release` (the caller unrefs them under the manager's lock).
  void Repack(size_t natural, std::vector<PageId>* release);
  void ReleaseAllLocked();  // REQUIRES manager_->mu_

  KvManager* manager_;
  Hash128 ns_;
  int64_t capacity_;
  int64_t n_tokens_ = 0;
  int64_t cached_tokens_ = 0;
  bool finished_ = false;
  std::vector<PageId> pages_;                    // block table (see block_table())
  // Per-layer block tables, the attention kernel's (View): [n_layer][block]. Block b < the
  // block table's size is in pages_[b]; past it (compacted sequences), at loc_[layer][b -
  // pages_.size()]. Layers hold different block counts once a per-layer budget compacted them.
  std::vector<std::vector<const void*>> k_ptr_;
  std::vector<std::vector<const void*>> v_ptr_;
  // Pages packed with any layer's blocks (compacted sequences; always the sequence's own, never
  // in the index), how many of their slots are in use, the per-layer locations, and the free
  // slots (taken from the back).
  struct Spill {
    PageId page;
    int used = 0;
  };
  std::vector<Spill> spill_;
  std::vector<std::vector<Loc>> loc_;  // [n_layer][block - pages_.size()]
  std::vector<Loc> free_;
  SlotBook book_;  // after a compaction (n_tokens_ is then its longest layer); stride capacity_
  int64_t inexact_from_ = INT64_MAX;  // MarkInexactFrom's least n
  std::unique_ptr<KvWindow> tail_;    // windowed types only (KvShape::windowed())
};

class KvManager {
 public:
  explicit KvManager(const KvManagerOptions& options);
  ~KvManager();

  // kInvalidArgument if the budget does not hold one page, or for kivi4 KV with pages that do
  // not hold whole key groups (page_tokens % 32 != 0).
  static Status Validate(const KvManagerOptions& options);

  // A sequence of up to `capacity` tokens that starts with the longest cached prefix of
  // `prompt` in `ns` (at most prompt.size() - 0 tokens; callers that need logits of the last
  // prompt token recompute it, see Generate()).
  std::unique_ptr<PagedSequence> Start(const Hash128& ns, std::span<const TokenId> prompt,
                                       int64_t capacity);

  // Adds the sequence's full pages (and, with include_partial, its last partial page) for
  // `tokens` (its token ids, tokens.size() <= seq.n_tokens()) to the index.
  void Commit(PagedSequence& seq, std::span<const TokenId> tokens, bool include_partial = false);

  // Commits everything (partial page included) and releases the sequence's pages; the
  // sequence is empty afterwards. Idempotent.
  void Finish(PagedSequence& seq, std::span<const TokenId> tokens);

  // Compacts `seq` by a KV budget policy's plan (engine/kv_budget.h). The pages it shares with
  // the index from the plan's first changed slot on are copied first, so the index keeps the
  // exact KV; then the plan is applied. The pages holding the exact leading slots stay whole
  // (every layer's block b in page b); past them each layer keeps only the blocks its slots
  // use, packed into as few pages as hold them all (a page is n_layer x 2 blocks, any
  // layer's in any of its slots), so a per-layer budget holds the memory of its total, not
  // of its longest layer; the rest go back to the pool. From then on only the exact leading
  // slots (exact_tokens()) are committed.
  // kResourceExhausted when the copies find no free pages, kInvalidArgument for a plan that
  // does not fit; nothing changes on error.
  Status Compact(PagedSequence& seq, const KeepPlan& plan, const kernels::RopeParams& rope,
                 AttentionStats* stats);

  // Cached tokens of `tokens` in `ns` without taking references (for admission and stats).
  int64_t CachedPrefix(const Hash128& ns, std::span<const TokenId> tokens);

  // A move-only handle keeping a cached prefix from eviction; unpins when destroyed.
  class Pin {
   public:
    Pin() = default;
    Pin(Pin&& o) noexcept : m_(o.m_), id_(o.id_), tokens_(o.tokens_) { o.m_ = nullptr; }
    Pin& operator=(Pin&& o) noexcept;
    ~Pin() { Reset(); }
    void Reset();
    int64_t tokens() const { return tokens_; }  // how much of the prefix was cached and pinned

   private:
    friend class KvManager;
    Pin(KvManager* m, uint64_t id, int64_t tokens) : m_(m), id_(id), tokens_(tokens) {}
    KvManager* m_ = nullptr;
    uint64_t id_ = 0;
    int64_t tokens_ = 0;
  };
  // Pins the cached part of `tokens` for ttl_ms (0 = until the handle is destroyed).
  Pin PinPrefix(const Hash128& ns, std::span<const TokenId> tokens, int64_t ttl_ms = 0);

  void Clear(const Hash128& ns);

  struct Stats {
    uint32_t pages_total = 0, pages_free = 0, pages_used = 0;
    uint32_t pages_cached_unreferenced = 0;  // held only by the index: reusable and evictable
    uint32_t pages_pinned = 0;
    size_t page_bytes = 0, budget_bytes = 0, bytes_reserved = 0;
    uint64_t evictions = 0, cow_copies = 0;
    uint64_t lookups = 0, lookup_tokens = 0, hit_tokens = 0;
  };
  Stats GetStats();

  const KvShape& shape() const { return options_.shape; }
  int page_tokens() const { return options_.page_tokens; }

 private:
  friend class PagedSequence;
  // Evicts unreferenced cached pages until `need` are free; kResourceExhausted naming `who`
  // (what needs them) when the rest are in use. REQUIRES mu_.
  Status EnsureFreeLocked(size_t need, const char* who);

  KvManagerOptions options_;
  std::mutex mu_;
  PagePool pool_;    // GUARDED_BY(mu_)
  RadixIndex index_;  // GUARDED_BY(mu_)
  uint64_t evictions_ = 0, cow_copies_ = 0, lookups_ = 0, lookup_tokens_ = 0, hit_tokens_ = 0;
};

}  // namespace cachette
