#include "kv/kv_manager.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstring>
#include <string>

#include "cache/chunk.h"
#include "core/check.h"
#include "core/timer.h"

namespace cachette {

Hash128 KvNamespace(const Model& model, kernels::KvType kv_type, std::string_view tenant_salt,
                    std::string_view adapter) {
  const ModelConfig& c = model.config();
  cache::NamespaceSpec s;
  s.model_fingerprint = model.Fingerprint();
  s.arch = c.arch_name;
  s.n_layer = static_cast<uint32_t>(c.n_layer);
  s.n_kv_head = static_cast<uint32_t>(c.n_kv_head);
  s.head_dim = static_cast<uint32_t>(c.head_dim);
  s.kv_type = std::string(kernels::KvTypeName(kv_type));
  s.rope = std::string(c.rope.style == kernels::RopeStyle::kNeox ? "neox" : "normal") +
           " theta=" + std::to_string(c.rope.theta_base) +
           " scale=" + std::to_string(c.rope.freq_scale);
  s.adapter = std::string(adapter);
  s.tenant_salt = std::string(tenant_salt);
  return cache::NamespaceId(s);
}

// ---- PagedSequence -------------------------------------------------------------------------

PagedSequence::PagedSequence(KvManager* m, const Hash128& ns, int64_t capacity)
    : manager_(m), ns_(ns), capacity_(capacity) {
  k_ptr_.resize(m->shape().n_layer);
  v_ptr_.resize(m->shape().n_layer);
  loc_.resize(m->shape().n_layer);
  if (m->shape().windowed()) tail_ = std::make_unique<KvWindow>(m->shape());
}

PagedSequence::~PagedSequence() {
  if (finished_) return;
  std::lock_guard<std::mutex> lock(manager_->mu_);
  ReleaseAllLocked();
}

void PagedSequence::ReleaseAllLocked() {
  for (PageId p : pages_) manager_->pool_.Unref(p);
  for (const Spill& s : spill_) manager_->pool_.Unref(s.page);
  pages_.clear();
  spill_.clear();
  free_.clear();
  for (auto& v : loc_) v.clear();
  for (auto& v : k_ptr_) v.clear();
  for (auto& v : v_ptr_) v.clear();
}

void PagedSequence::SetPage(size_t block, PageId p) {
  if (block == pages_.size()) {
    CT_CHECK(spill_.empty()) << "the block table grows only before a compaction";
    pages_.push_back(p);
    for (auto& v : k_ptr_) v.push_back(nullptr);
    for (auto& v : v_ptr_) v.push_back(nullptr);
  }
  pages_[block] = p;
  PagePool& pool = manager_->pool_;
  for (size_t l = 0; l < k_ptr_.size(); ++l) {
    k_ptr_[l][block] = pool.K(p, static_cast<int>(l));
    v_ptr_[l][block] = pool.V(p, static_cast<int>(l));
  }
}

Status PagedSequence::Reserve(int64_t n) {
  if (finished_) return InvalidArgument("sequence already finished");
  if (n > capacity_) {
    return ResourceExhausted("sequence needs " + std::to_string(n) +
                             " tokens of KV but its context holds " + std::to_string(capacity_));
  }
  if (n <= n_tokens_) return Status::Ok();
  const int64_t P = manager_->page_tokens();
  std::lock_guard<std::mutex> lock(manager_->mu_);
  if (book_.compacted) {
    return GrowLayersLocked(std::vector<int64_t>(manager_->shape().n_layer, n - n_tokens_));
  }
  PagePool& pool = manager_->pool_;
  // The first position written lies in block b; if that page is shared, copy it first.
  const size_t b = static_cast<size_t>(n_tokens_ / P);
  const bool cow = b < pages_.size() && pool.RefCount(pages_[b]) > 1;
  const size_t blocks = static_cast<size_t>((n + P - 1) / P);
  const size_t need = (blocks > pages_.size() ? blocks - pages_.size() : 0) + (cow ? 1 : 0);
  CT_RETURN_IF_ERROR(manager_->EnsureFreeLocked(need, "the sequence"));
  if (cow) {
    PageId fresh;
    CT_CHECK(pool.Allocate(&fresh));
    std::memcpy(pool.Data(fresh), pool.Data(pages_[b]), pool.page_bytes());
    pool.Unref(pages_[b]);
    SetPage(b, fresh);
    ++manager_->cow_copies_;
  }
  while (pages_.size() < blocks) {
    PageId p;
    CT_CHECK(pool.Allocate(&p));
    SetPage(pages_.size(), p);
  }
  return Status::Ok();
}

void PagedSequence::Point(int layer, size_t block, Loc loc) {
  PagePool& pool = manager_->pool_;
  const PageId p = spill_[loc.spill].page;
  std::vector<const void*>& k = k_ptr_[layer];
  std::vector<const void*>& v = v_ptr_[layer];
  if (block == k.size()) {
    k.push_back(nullptr);
    v.push_back(nullptr);
  }
  k[block] = pool.K(p, static_cast<int>(loc.slot));
  v[block] = pool.V(p, static_cast<int>(loc.slot));
  std::vector<Loc>& locs = loc_[layer];
  const size_t i = block - pages_.size();
  if (i == locs.size()) {
    locs.push_back(loc);
  } else {
    locs[i] = loc;
  }
}

Status PagedSequence::ReserveLayer(int layer, int64_t count) {
  if (finished_) return InvalidArgument("sequence already finished");
  CT_RETURN_IF_ERROR(CheckKvRewritable(manager_->shape(), "reading a layer at a time"));
  const int64_t P = manager_->page_tokens();
  std::lock_guard<std::mutex> lock(manager_->mu_);
  if (!book_.compacted) {
    if (n_tokens_ % P != 0) {
      return InvalidArgument("reading a layer at a time needs whole pages: the sequence holds " +
                             std::to_string(n_tokens_) + " tokens in pages of " +
                             std::to_string(P));
    }
    book_.Start(manager_->shape(), capacity_, n_tokens_);
    book_.compacted = true;
  }
  if (book_.layer_n[layer] + count > capacity_) {
    return ResourceExhausted("layer " + std::to_string(layer) + " needs " +
                             std::to_string(book_.layer_n[layer] + count) +
                             " slots of KV but the sequence holds " + std::to_string(capacity_));
  }
  std::vector<int64_t> extra(manager_->shape().n_layer, 0);
  extra[layer] = count;
  return GrowLayersLocked(extra);
}

void PagedSequence::AppendLayer(int layer, int64_t count) {
  n_tokens_ = book_.AppendLayer(manager_->shape().n_kv_head, capacity_, layer, count);
}

void PagedSequence::AppendPositions(int64_t count) { n_tokens_ = book_.AppendPositions(count); }

Status PagedSequence::GrowLayersLocked(const std::vector<int64_t>& extra) {
  const int64_t P = manager_->page_tokens();
  const int L = manager_->shape().n_layer;
  PagePool& pool = manager_->pool_;
  std::vector<size_t> blocks(L);
  size_t need = 0;
  for (int l = 0; l < L; ++l) {
    blocks[l] = static_cast<size_t>((book_.layer_n[l] + extra[l] + P - 1) / P);
    need += blocks[l] > k_ptr_[l].size() ? blocks[l] - k_ptr_[l].size() : 0;
  }
  const size_t pages = need > free_.size() ? (need - free_.size() + L - 1) / L : 0;
  CT_RETURN_IF_ERROR(manager_->EnsureFreeLocked(pages, "the sequence"));
  for (size_t i = 0; i < pages; ++i) {
    PageId p;
    CT_CHECK(pool.Allocate(&p));
    spill_.push_back(Spill{p, 0});
    const auto s = static_cast<uint32_t>(spill_.size() - 1);
    for (int slot = L - 1; slot >= 0; --slot) free_.push_back(Loc{s, static_cast<uint32_t>(slot)});
  }
  for (int l = 0; l < L; ++l) {
    while (k_ptr_[l].size() < blocks[l]) {
      const Loc loc = free_.back();
      free_.pop_back();
      ++spill_[loc.spill].used;
      Point(l, k_ptr_[l].size(), loc);
    }
  }
  return Status::Ok();
}

void PagedSequence::Repack(size_t natural, std::vector<PageId>* release) {
  PagePool& pool = manager_->pool_;
  const int L = manager_->shape().n_layer;
  const int64_t P = manager_->page_tokens();
  natural = std::min(natural, pages_.size());
  // Every page that may hold blocks past `natural`: the block table's from there on (page b
  // holds block b of layer l in slot l), then the spill pages.
  std::vector<PageId> cand(pages_.begin() + static_cast<std::ptrdiff_t>(natural), pages_.end());
  for (const Spill& s : spill_) cand.push_back(s.page);
  // The blocks the layers keep, where they are now (candidate index, slot).
  struct Block {
    int layer;
    size_t block;
    size_t cand;
    uint32_t slot;
  };
  std::vector<Block> keep;
  std::vector<int> count(cand.size(), 0);
  for (int l = 0; l < L; ++l) {
    const size_t n = static_cast<size_t>((book_.layer_n[l] + P - 1) / P);
    for (size_t b = natural; b < n; ++b) {
      Block k{l, b, 0, 0};
      if (b < pages_.size()) {
        k.cand = b - natural;
        k.slot = static_cast<uint32_t>(l);
      } else {
        const Loc loc = loc_[l][b - pages_.size()];
        k.cand = pages_.size() - natural + loc.spill;
        k.slot = loc.slot;
      }
      ++count[k.cand];
      keep.push_back(k);
    }
  }
  // Keep the fullest pages, as many as hold every kept block; move the blocks of the others
  // into their free slots (sources and destinations in different pages).
  const size_t n_keep = (keep.size() + L - 1) / L;
  std::vector<size_t> order(cand.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return count[a] > count[b]; });
  std::vector<int64_t> spill_of(cand.size(), -1);  // candidate -> new spill index
  std::vector<Spill> spill;
  for (size_t i = 0; i < n_keep; ++i) {
    spill_of[order[i]] = static_cast<int64_t>(spill.size());
    spill.push_back(Spill{cand[order[i]], 0});
  }
  std::vector<std::vector<bool>> taken(spill.size(), std::vector<bool>(L, false));
  for (const Block& k : keep) {
    if (spill_of[k.cand] >= 0) taken[spill_of[k.cand]][k.slot] = true;
  }
  std::vector<Loc> free;
  for (size_t s = spill.size(); s-- > 0;) {
    for (int slot = L - 1; slot >= 0; --slot) {
      if (!taken[s][slot]) {
        free.push_back(Loc{static_cast<uint32_t>(s), static_cast<uint32_t>(slot)});
      }
    }
  }
  const size_t bytes = pool.block_bytes();
  std::vector<std::vector<Loc>> loc(L);
  for (int l = 0; l < L; ++l) {
    loc[l].resize(static_cast<size_t>((book_.layer_n[l] + P - 1) / P) - natural);
  }
  for (const Block& k : keep) {
    Loc to;
    if (spill_of[k.cand] >= 0) {
      to = Loc{static_cast<uint32_t>(spill_of[k.cand]), k.slot};
    } else {
      CT_CHECK(!free.empty());
      to = free.back();
      free.pop_back();
      const PageId src = cand[k.cand];
      const PageId dst = spill[to.spill].page;
      std::memcpy(pool.K(dst, static_cast<int>(to.slot)), pool.K(src, static_cast<int>(k.slot)),
                  bytes);
      std::memcpy(pool.V(dst, static_cast<int>(to.slot)), pool.V(src, static_cast<int>(k.slot)),
                  bytes);
    }
    ++spill[to.spill].used;
    loc[k.layer][k.block - natural] = to;
  }
  for (size_t i = n_keep; i < order.size(); ++i) release->push_back(cand[order[i]]);
  pages_.resize(natural);
  spill_ = std::move(spill);
  free_ = std::move(free);
  for (int l = 0; l < L; ++l) {
    k_ptr_[l].resize(natural + loc[l].size());
    v_ptr_[l].resize(natural + loc[l].size());
    loc_[l].clear();
    for (size_t i = 0; i < loc[l].size(); ++i) Point(l, natural + i, loc[l][i]);
  }
}

void* PagedSequence::KSlot(int layer, int64_t pos) {
  const int64_t P = manager_->page_tokens();
  return static_cast<std::byte*>(const_cast<void*>(k_ptr_[layer][pos / P])) +
         static_cast<size_t>(pos % P) * manager_->shape().token_bytes();
}

void* PagedSequence::VSlot(int layer, int64_t pos) {
  const int64_t P = manager_->page_tokens();
  return static_cast<std::byte*>(const_cast<void*>(v_ptr_[layer][pos / P])) +
         static_cast<size_t>(pos % P) * manager_->shape().token_bytes();
}

void* PagedSequence::KWrite(int layer, int64_t pos) {
  return tail_ ? tail_->K(layer, pos) : KSlot(layer, pos);
}

void* PagedSequence::VWrite(int layer, int64_t pos) {
  return tail_ ? tail_->V(layer, pos) : VSlot(layer, pos);
}

kernels::KvView PagedSequence::View(int layer, int64_t n) const {
  const KvShape& s = manager_->shape();
  kernels::KvView v;
  v.type = s.type;
  v.n_kv_head = s.n_kv_head;
  v.head_dim = s.head_dim;
  v.block_tokens = manager_->page_tokens();
  v.k_blocks = k_ptr_[layer].data();
  v.v_blocks = v_ptr_[layer].data();
  v.n_tokens = n;
  if (tail_) tail_->Fill(layer, &v);
  return v;
}

void PagedSequence::SetTokens(int64_t n) {
  CT_CHECK(!book_.compacted) << "SetTokens on a compacted sequence";
  if (n < n_tokens_) {
    // Drop the pages past the new end (shrinking, e.g. to recompute the last prompt token).
    const int64_t P = manager_->page_tokens();
    const size_t keep = static_cast<size_t>((n + P - 1) / P);
    std::lock_guard<std::mutex> lock(manager_->mu_);
    while (pages_.size() > keep) {
      manager_->pool_.Unref(pages_.back());
      pages_.pop_back();
      for (auto& v : k_ptr_) v.pop_back();
      for (auto& v : v_ptr_) v.pop_back();
    }
  }
  if (tail_ && n > n_tokens_) tail_->Rebase(*this, n);
  if (tail_ && n < n_tokens_) tail_->Truncate(*this, n);
  n_tokens_ = n;
}

void PagedSequence::Append(int64_t count) {
  n_tokens_ = book_.Append(manager_->shape().n_kv_head, capacity_, n_tokens_, count);
  if (tail_) tail_->Flush(*this, n_tokens_);
}

const KvShape& PagedSequence::shape() const { return manager_->shape(); }

int64_t PagedSequence::kept_tokens() const {
  const int64_t layers = manager_->shape().n_layer;
  return (book_.TotalSlots(static_cast<int>(layers), n_tokens_) + layers - 1) / layers;
}

// ---- KvManager ------------------------------------------------------------------------------

Status KvManager::Compact(PagedSequence& seq, const KeepPlan& plan,
                          const kernels::RopeParams& rope, AttentionStats* stats) {
  CT_CHECK(seq.manager_ == this);
  if (seq.finished_) return InvalidArgument("sequence already finished");
  CT_RETURN_IF_ERROR(CheckKvRewritable(options_.shape, "a KV budget policy"));
  const KvShape& s = options_.shape;
  SlotBook book = seq.book_;  // on error nothing changes
  book.Start(s, seq.capacity_, seq.n_tokens_);
  CT_RETURN_IF_ERROR(plan.Validate(book.layer_n, s.n_kv_head));
  const int64_t first = plan.FirstChanged(book.layer_n);
  if (first == INT64_MAX) return Status::Ok();  // keeps everything as it is
  const int64_t P = options_.page_tokens;
  // The plan writes slots [first, end) only (CompactSlots stores nothing at or past a layer's
  // kept count); the pages past them are dropped, not written.
  int64_t end = 0;
  for (int l = 0; l < s.n_layer; ++l) end = std::max(end, plan.kept(l));
  {
    // The pages holding slots [first, end) are written: copy those the index (or another
    // sequence) shares, all or nothing.
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<size_t> shared;
    const size_t written = std::min(seq.pages_.size(), static_cast<size_t>((end + P - 1) / P));
    for (size_t b = static_cast<size_t>(first / P); b < written; ++b) {
      if (pool_.RefCount(seq.pages_[b]) > 1) shared.push_back(b);
    }
    CT_RETURN_IF_ERROR(EnsureFreeLocked(shared.size(), "compacting"));
    for (size_t b : shared) {
      PageId fresh;
      CT_CHECK(pool_.Allocate(&fresh));
      std::memcpy(pool_.Data(fresh), pool_.Data(seq.pages_[b]), pool_.page_bytes());
      pool_.Unref(seq.pages_[b]);
      seq.SetPage(b, fresh);
      ++cow_copies_;
    }
  }
  // The sequence's pages are its own from `first` on: no lock needed to write them.
  CT_RETURN_IF_ERROR(
      CompactSlots(seq, s, book.layer_n, plan, rope, stats, book.weight, seq.capacity_));
  book.compacted = true;
  seq.n_tokens_ = *std::max_element(book.layer_n.begin(), book.layer_n.end());
  book.exact = std::min(book.exact, first);
  if (plan.reassign_positions) book.next_pos = seq.n_tokens_;
  seq.book_ = std::move(book);
  // The exact leading pages stay whole; every layer's other blocks are packed (the sequence's
  // own pages: no lock needed to move them), and the pages left empty go back to the pool.
  std::vector<PageId> release;
  seq.Repack(static_cast<size_t>(seq.book_.exact / P), &release);
  std::lock_guard<std::mutex> lock(mu_);
  for (PageId p : release) pool_.Unref(p);
  // Packed pages take any layer's blocks: never one the index (or another sequence) reads.
  for (const PagedSequence::Spill& sp : seq.spill_) CT_CHECK_EQ(pool_.RefCount(sp.page), 1u);
  return Status::Ok();
}

Status KvManager::EnsureFreeLocked(size_t need, const char* who) {
  if (pool_.pages_free() < need) evictions_ += index_.Evict(need - pool_.pages_free());
  if (pool_.pages_free() >= need) return Status::Ok();
  return ResourceExhausted("KV pool exhausted: " + std::string(who) + " needs " +
                           std::to_string(need) + " pages, " + std::to_string(pool_.pages_free()) +
                           " free of " + std::to_string(pool_.pages_total()) +
                           " (the rest are used by running sequences or pinned)");
}

Status KvManager::Validate(const KvManagerOptions& o) {
  if (o.page_tokens <= 0 || o.page_tokens > 4096) {
    return InvalidArgument("page size must be in [1, 4096] tokens");
  }
  if (o.shape.type == kernels::KvType::kKivi4 && o.page_tokens % kernels::kKiviGroup != 0) {
    return InvalidArgument("kivi4 KV needs a page size that is a multiple of " +
                           std::to_string(kernels::kKiviGroup) + " tokens (its key groups), got " +
                           std::to_string(o.page_tokens));
  }
  const size_t page = PagePool::PageBytes(o.shape, o.page_tokens);
  if (page == 0) return InvalidArgument("KV shape has zero bytes per page");
  if (o.budget_bytes / page < 1) {
    return InvalidArgument("KV budget of " + std::to_string(o.budget_bytes) +
                           " bytes is smaller than one page (" + std::to_string(page) +
                           " bytes)");
  }
  return Status::Ok();
}

namespace {
RadixIndex::ClockFn OrSteady(RadixIndex::ClockFn f) {
  if (f) return f;
  return [] { return NowNanos(); };
}
}  // namespace

KvManager::KvManager(const KvManagerOptions& options)
    : options_(options),
      pool_(options.shape, options.page_tokens, options.budget_bytes),
      index_(pool_, OrSteady(options.clock), options.priority) {
  index_.SetEventSink(options.events);
}

KvManager::~KvManager() = default;

std::unique_ptr<PagedSequence> KvManager::Start(const Hash128& ns,
                                                std::span<const TokenId> prompt,
                                                int64_t capacity) {
  std::unique_ptr<PagedSequence> seq(new PagedSequence(this, ns, capacity));
  std::lock_guard<std::mutex> lock(mu_);
  RadixIndex::Match m = index_.Lookup(ns, prompt.first(std::min<size_t>(prompt.size(), capacity)));
  ++lookups_;
  lookup_tokens_ += prompt.size();
  hit_tokens_ += m.n_tokens;
  for (PageId p : m.pages) seq->SetPage(seq->pages_.size(), p);
  seq->n_tokens_ = m.n_tokens;
  seq->cached_tokens_ = m.n_tokens;
  // The matched pages hold quantized tokens only (commits stop at the f16 window).
  if (seq->tail_) seq->tail_->Rebase(*seq, m.n_tokens);
  return seq;
}

void KvManager::Commit(PagedSequence& seq, std::span<const TokenId> tokens, bool include_partial) {
  CT_CHECK(seq.manager_ == this);
  const int64_t P = options_.page_tokens;
  // A compacted sequence's slots past exact_tokens() are not the KV of its tokens; its exact
  // part goes in whole pages only (the page holding the first changed slot differs).
  const int64_t n = std::min<int64_t>(static_cast<int64_t>(tokens.size()), seq.exact_tokens());
  const int64_t len = include_partial && !seq.book_.compacted ? n : n / P * P;
  if (len <= 0) return;
  const size_t pages = static_cast<size_t>((len + P - 1) / P);
  std::lock_guard<std::mutex> lock(mu_);
  index_.Insert(seq.ns_, tokens.first(len), std::span<const PageId>(seq.pages_).first(pages));
}

void KvManager::Finish(PagedSequence& seq, std::span<const TokenId> tokens) {
  if (seq.finished_) return;
  seq.SealWindow();
  Commit(seq, tokens, /*include_partial=*/true);
  std::lock_guard<std::mutex> lock(mu_);
  seq.ReleaseAllLocked();
  seq.n_tokens_ = 0;
  seq.finished_ = true;
}

int64_t KvManager::CachedPrefix(const Hash128& ns, std::span<const TokenId> tokens) {
  std::lock_guard<std::mutex> lock(mu_);
  RadixIndex::Match m = index_.Lookup(ns, tokens);
  for (PageId p : m.pages) pool_.Unref(p);
  return m.n_tokens;
}

KvManager::Pin& KvManager::Pin::operator=(Pin&& o) noexcept {
  if (this != &o) {
    Reset();
    m_ = o.m_;
    id_ = o.id_;
    tokens_ = o.tokens_;
    o.m_ = nullptr;
  }
  return *this;
}

void KvManager::Pin::Reset() {
  if (m_ == nullptr) return;
  std::lock_guard<std::mutex> lock(m_->mu_);
  m_->index_.Unpin(id_);
  m_ = nullptr;
}

KvManager::Pin KvManager::PinPrefix(const Hash128& ns, std::span<const TokenId> tokens,
                                    int64_t ttl_ms) {
  std::lock_guard<std::mutex> lock(mu_);
  int64_t pinned = 0;
  const uint64_t id = index_.Pin(ns, tokens, ttl_ms * 1000000, &pinned);
  return Pin(this, id, pinned);
}

void KvManager::Clear(const Hash128& ns) {
  std::lock_guard<std::mutex> lock(mu_);
  index_.Clear(ns);
}

KvManager::Stats KvManager::GetStats() {
  std::lock_guard<std::mutex> lock(mu_);
  Stats s;
  s.pages_total = pool_.pages_total();
  s.pages_free = pool_.pages_free();
  s.pages_used = pool_.pages_used();
  s.pages_cached_unreferenced = static_cast<uint32_t>(index_.pages_cached_unreferenced());
  s.pages_pinned = static_cast<uint32_t>(index_.pages_pinned());
  s.page_bytes = pool_.page_bytes();
  s.budget_bytes = options_.budget_bytes;
  s.bytes_reserved = pool_.bytes_reserved();
  s.evictions = evictions_;
  s.cow_copies = cow_copies_;
  s.lookups = lookups_;
  s.lookup_tokens = lookup_tokens_;
  s.hit_tokens = hit_tokens_;
  return s;
}

}  // namespace cachette
