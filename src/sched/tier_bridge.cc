#include "sched/tier_bridge.h"

#include <algorithm>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>

#include "core/log.h"
#include "sched/segment_tier.h"

namespace cachette::sched {

// A restore in flight. States, in order:
//   1. queued: the lookup task has not run (looked_up false);
//   2. looked up: tier_tokens known; `handle` set when there is something to load;
//   3. applying: ApplyLoad copies chunks [0, next) of the handle into the sequence;
//   4. done: the last chunk, a miss, a failed reservation or the deadline (finished true).
// The lookup task holds `shared` only, so the Load may be destroyed at any state.
struct TierBridge::Load final : PendingLoad {
  struct Shared {
    std::mutex mu;
    bool looked_up = false;               // GUARDED_BY(mu)
    int64_t tier_tokens = 0;              // GUARDED_BY(mu)
    size_t first_chunk = 0;               // GUARDED_BY(mu)
    std::unique_ptr<LoadHandle> handle;   // GUARDED_BY(mu); null: nothing to load
  };
  std::shared_ptr<Shared> shared = std::make_shared<Shared>();
  SteadyTime deadline;
  size_t next = 0;        // loop thread only
  bool finished = false;  // loop thread only
  int64_t tier_tokens = 0;
};

namespace {

// Copies positions [from, to) of one chunk (starting at position `chunk_start`) between the
// chunk's layer-major bytes and the sequence's pages. to_pages selects the direction.
void CopyChunk(PagedSequence& seq, const KvShape& shape, int page_tokens, int chunk_tokens,
               int64_t chunk_start, int64_t from, int64_t to, std::byte* chunk, bool to_pages) {
  const size_t tb = shape.token_bytes();
  for (int l = 0; l < shape.n_layer; ++l) {
    for (int kv = 0; kv < 2; ++kv) {
      std::byte* block = chunk + (static_cast<size_t>(2 * l + kv) * chunk_tokens) * tb;
      for (int64_t p = from; p < to;) {
        // A run of positions inside one page is contiguous on both sides.
        const int64_t run = std::min<int64_t>(to - p, page_tokens - p % page_tokens);
        auto* slot = static_cast<std::byte*>(kv == 0 ? seq.KSlot(l, p) : seq.VSlot(l, p));
        std::byte* c = block + static_cast<size_t>(p - chunk_start) * tb;
        if (to_pages) {
          std::memcpy(slot, c, run * tb);
        } else {
          std::memcpy(c, slot, run * tb);
        }
        p += run;
      }
    }
  }
}

// Whether the store has a disk or a Redis tier (fixed when it is opened).
bool HasSlowerTier(const Cache& cache) {
  const CacheStats stats = cache.Stats();
  return stats.tier[static_cast<int>(CacheTier::kDisk)].enabled ||
         stats.tier[static_cast<int>(CacheTier::kRedis)].enabled;
}

std::vector<TierTokens> ByTier(const int64_t (&tokens)[kCacheTierCount]) {
  std::vector<TierTokens> out;
  for (int t = 0; t < kCacheTierCount; ++t) {
    if (tokens[t] > 0) {
      out.push_back({std::string(CacheTierName(static_cast<CacheTier>(t))), tokens[t]});
    }
  }
  return out;
}

}  // namespace

TierBridge::TierBridge(KvManager& kv, Cache& cache, int lookup_threads)
    : kv_(kv),
      cache_(cache),
      chunk_tokens_(cache.chunk_tokens()),
      files_segments_(HasSlowerTier(cache)),
      lookups_(std::make_unique<cache::ThreadExecutor>("ct-lookup", std::max(1, lookup_threads),
                                                       1024)) {}

TierBridge::~TierBridge() = default;

Status TierBridge::Validate(const Cache& cache, const KvManager& kv) {
  if (cache.chunk_tokens() <= 0 || cache.chunk_tokens() % kv.page_tokens() != 0) {
    return InvalidArgument("chunk size " + std::to_string(cache.chunk_tokens()) +
                           " tokens must be a multiple of the page size " +
                           std::to_string(kv.page_tokens()));
  }
  return Status::Ok();
}

ChunkLayout TierBridge::Layout(const KvShape& s) const {
  ChunkLayout l;
  l.n_layer = static_cast<uint32_t>(s.n_layer);
  l.n_kv_head = static_cast<uint32_t>(s.n_kv_head);
  l.head_dim = static_cast<uint32_t>(s.head_dim);
  l.n_tokens = static_cast<uint32_t>(chunk_tokens_);
  l.kv_type = static_cast<uint32_t>(s.type);
  return l;
}

std::unique_ptr<PendingLoad> TierBridge::StartLoad(const Hash128& ns,
                                                   std::span<const TokenId> prompt, int64_t have,
                                                   SteadyTime deadline) {
  auto load = std::make_unique<Load>();
  load->deadline = deadline;
  // Only whole chunks can come from the tiers; a prompt shorter than one has nothing to load.
  if (static_cast<int64_t>(prompt.size()) < chunk_tokens_) {
    load->finished = true;
    return load;
  }
  auto tokens = std::make_shared<std::vector<TokenId>>(prompt.begin(), prompt.end());
  const int64_t C = chunk_tokens_;
  const bool queued = lookups_->TrySubmit([this, shared = load->shared, tokens, ns, have, C,
                                           deadline] {
    // Runs on a lookup thread: the only place a restore may wait for a tier.
    if (std::chrono::steady_clock::now() >= deadline) {
      std::lock_guard lock(shared->mu);
      shared->looked_up = true;
      return;
    }
    const LookupResult hit = cache_.Lookup(*tokens, ns);
    std::unique_ptr<LoadHandle> handle;
    const size_t first = static_cast<size_t>(have / C);
    const int64_t tier_tokens = static_cast<int64_t>(hit.tokens);
    if (tier_tokens > have) {
      const size_t n_chunks = static_cast<size_t>(tier_tokens / C) - first;
      handle = cache_.Get(ns, *tokens, first, n_chunks, deadline);
    }
    std::lock_guard lock(shared->mu);
    shared->tier_tokens = tier_tokens;
    shared->first_chunk = first;
    shared->handle = std::move(handle);
    shared->looked_up = true;
  });
  if (!queued) {
    CT_LOG(kWarning) << "tier restore skipped: the lookup queue is full";
    load->finished = true;
  }
  return load;
}

LoadProgress TierBridge::ApplyLoad(PendingLoad& pending, PagedSequence& seq) {
  Load& load = static_cast<Load&>(pending);
  LoadProgress p;
  p.tier_tokens = load.tier_tokens;
  if (load.finished) {
    p.done = true;
    return p;
  }
  const bool late = std::chrono::steady_clock::now() >= load.deadline;
  std::unique_lock lock(load.shared->mu);
  if (!load.shared->looked_up) {
    p.done = load.finished = late;  // a lookup that misses the deadline: recompute everything
    return p;
  }
  load.tier_tokens = p.tier_tokens = load.shared->tier_tokens;
  LoadHandle* handle = load.shared->handle.get();
  const size_t first = load.shared->first_chunk;
  lock.unlock();  // the handle has its own lock; the task no longer touches `shared`
  if (handle == nullptr) {
    p.done = load.finished = true;
    return p;
  }

  const int64_t C = chunk_tokens_;
  const ChunkLayout layout = Layout(seq.shape());
  int64_t added[kCacheTierCount] = {};
  const size_t resolved = handle->resolved_chunks();
  bool stop = false;
  while (load.next < resolved) {
    const ChunkData& d = handle->chunk(load.next);
    if (!d.status.ok() || !(d.layout == layout) || d.tier == CacheTier::kNone) {
      stop = true;
      break;
    }
    const int64_t start = static_cast<int64_t>(first + load.next) * C;
    const int64_t have = seq.n_tokens();
    int64_t to = std::min(start + C, seq.capacity());
    // kivi4 keys are quantized by groups of 32 tokens: a group is restored whole, from the
    // chunk alone (its start overwrites the group's copy from the index, which holds the same
    // tokens), and a group the capacity cuts is left to the prefill.
    const bool kivi = seq.shape().type == kernels::KvType::kKivi4;
    const int64_t from = kivi ? std::max(start, have - have % kernels::kKiviGroup) : have;
    if (kivi) to -= to % kernels::kKiviGroup;
    if (start > have || to <= have) {  // not contiguous, or nothing before the capacity
      stop = true;
      break;
    }
    if (Status s = seq.Reserve(to); !s.ok()) {
      CT_LOG(kWarning) << "tier restore stopped: " << s.ToString();
      stop = true;
      break;
    }
    CopyChunk(seq, seq.shape(), seq.manager().page_tokens(), static_cast<int>(C), start, from, to,
              const_cast<std::byte*>(d.bytes().data()), /*to_pages=*/true);
    seq.SetTokens(to);
    added[static_cast<int>(d.tier)] += to - have;
    ++load.next;
  }
  p.added = ByTier(added);
  if (stop || load.next == handle->size()) {
    p.done = load.finished = true;
  } else if (late) {
    handle->Wait();  // the deadline passed: marks the unresolved chunks as misses and counts them
    p.done = load.finished = true;
  }
  return p;
}

LoadProgress TierBridge::RestoreNow(PagedSequence& seq, std::span<const TokenId> prompt,
                                    SteadyTime deadline) {
  LoadProgress total;
  std::unique_ptr<PendingLoad> load = StartLoad(seq.ns(), prompt, seq.n_tokens(), deadline);
  int64_t by_tier[kCacheTierCount] = {};
  for (;;) {
    LoadProgress p = ApplyLoad(*load, seq);
    for (const TierTokens& t : p.added) {
      for (int i = 0; i < kCacheTierCount; ++i) {
        if (t.tier == CacheTierName(static_cast<CacheTier>(i))) by_tier[i] += t.tokens;
      }
    }
    total.tier_tokens = p.tier_tokens;
    if (p.done) break;
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  total.added = ByTier(by_tier);
  total.done = true;
  return total;
}

int64_t TierBridge::Save(PagedSequence& seq, std::span<const TokenId> tokens,
                         int64_t skip_tokens) {
  const int64_t C = chunk_tokens_;
  // Only slots holding their tokens' exact stored KV (not a kivi4 sequence's f16 window).
  const int64_t n = std::min<int64_t>(static_cast<int64_t>(tokens.size()), seq.exact_tokens());
  const size_t first = static_cast<size_t>(std::max<int64_t>(0, skip_tokens) / C);
  const size_t last = static_cast<size_t>(n / C);
  if (last <= first) return skip_tokens;
  const ChunkLayout layout = Layout(seq.shape());
  std::vector<std::vector<std::byte>> bufs(last - first,
                                           std::vector<std::byte>(layout.raw_bytes()));
  std::vector<ByteSpan> spans;
  for (size_t i = first; i < last; ++i) {
    const int64_t start = static_cast<int64_t>(i) * C;
    CopyChunk(seq, seq.shape(), seq.manager().page_tokens(), static_cast<int>(C), start, start,
              start + C, bufs[i - first].data(), /*to_pages=*/false);
    spans.emplace_back(bufs[i - first].data(), bufs[i - first].size());
  }
  Status s = cache_.Put(seq.ns(), tokens.first(last * C), first, layout, spans);
  if (!s.ok()) {
    CT_LOG(kWarning) << "tier save failed: " << s.ToString();
    return skip_tokens;
  }
  return static_cast<int64_t>(last) * C;
}

std::vector<TierTokens> TierBridge::Lookup(const Hash128& ns, std::span<const TokenId> prompt) {
  LookupResult r = cache_.Lookup(prompt, ns);
  int64_t by_tier[kCacheTierCount] = {};
  for (CacheTier t : r.chunk_tiers) {
    if (t != CacheTier::kNone) by_tier[static_cast<int>(t)] += cache_.chunk_tokens();
  }
  return ByTier(by_tier);
}

uint64_t TierBridge::Pin(const Hash128& ns, std::span<const TokenId> tokens, int64_t ttl_ms) {
  if (static_cast<int64_t>(tokens.size()) < chunk_tokens_ || ttl_ms <= 0) return 0;
  Result<Cache::PinId> id = cache_.Pin(tokens, ns, std::chrono::milliseconds(ttl_ms));
  return id.ok() ? *id : 0;
}

void TierBridge::Unpin(uint64_t pin) {
  if (pin != 0) (void)cache_.Unpin(pin);  // kNotFound once its TTL passed: nothing to do
}

Status TierBridge::Clear(const Hash128& ns) {
  Status prompts = cache_.Clear(ns);
  Status segments = cache_.Clear(SegmentNamespace(ns));
  return prompts.ok() ? segments : prompts;
}

void TierBridge::SaveSegment(const Hash128& ns, const SegmentKv& seg) {
  // A relay segment's position is the request's; nothing else could place it again.
  // The segment cache holds it in memory: only the disk and Redis tiers take a copy.
  if (!files_segments_ || seg.context == kRelayContext || seg.tokens.empty()) return;
  const ChunkLayout full = Layout(kv_.shape());
  for (const LayerBand& band : SegmentBands(kv_.shape().n_layer)) {
    const ChunkLayout layout = BandLayout(full, band);
    const SegmentChunks packed = PackSegment(seg, layout, band);
    const std::vector<TokenId> chain =
        SegmentChainTokens(seg.tokens, seg.context, chunk_tokens_, band);
    std::vector<ByteSpan> chunks, aux;
    for (size_t i = 0; i < packed.chunks.size(); ++i) {
      chunks.emplace_back(packed.chunks[i]);
      aux.emplace_back(packed.aux[i]);
    }
    const Status st = cache_.Put(SegmentNamespace(ns), chain, 0, layout, chunks, aux,
                                 /*slower_tiers_only=*/true);
    if (!st.ok()) {
      CT_LOG(kWarning) << "filing a segment in the tiers: " << st.ToString();
      return;
    }
  }
  segments_saved_.fetch_add(1, std::memory_order_relaxed);
}

bool TierBridge::LoadSegmentBand(const Hash128& sns, const SegmentRef& ref, LayerBand band,
                                 SteadyTime deadline, SegmentKv& seg) {
  const std::vector<TokenId> chain =
      SegmentChainTokens(ref.tokens, ref.context, chunk_tokens_, band);
  const LookupResult hit = cache_.Lookup(chain, sns);
  if (hit.tokens < chain.size()) return false;
  const size_t n = chain.size() / static_cast<size_t>(chunk_tokens_);
  // Not promoted: the segment cache is its copy in memory (a second, padded one in the RAM
  // tier would only crowd out prompt prefixes).
  std::unique_ptr<LoadHandle> load = cache_.Get(sns, chain, 0, n, deadline, /*promote=*/false);
  load->Wait();
  std::vector<const ChunkData*> chunks;
  for (size_t i = 0; i < n; ++i) {
    if (!load->chunk(i).status.ok()) return false;
    chunks.push_back(&load->chunk(i));
  }
  const Status st = UnpackSegmentBand(chunks, ref.tokens, ref.context, kv_.shape(), band, seg);
  if (!st.ok()) {
    CT_LOG(kWarning) << "a segment from the tiers is refused: " << st.ToString();
    return false;
  }
  return true;
}

void TierBridge::LoadSegments(const Hash128& ns, PendingSegments& pending,
                              SteadyTime deadline) {
  const Hash128 sns = SegmentNamespace(ns);
  const std::vector<SegmentRef>& refs = pending.refs();
  std::vector<std::shared_ptr<SegmentKv>> found(refs.size());
  const std::vector<LayerBand> bands = SegmentBands(kv_.shape().n_layer);
  const auto t0 = std::chrono::steady_clock::now();
  auto elapsed_us = [&] {
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0)
        .count();
  };
  // The first band of every segment, then each later band of the segments found.
  for (size_t i = 0; i < refs.size(); ++i) {
    if (std::chrono::steady_clock::now() >= deadline) break;
    auto seg = std::make_shared<SegmentKv>();
    if (LoadSegmentBand(sns, refs[i], bands[0], deadline, *seg)) found[i] = std::move(seg);
  }
  size_t hits = 0;
  for (const auto& f : found) hits += f != nullptr;
  segments_loaded_.fetch_add(hits, std::memory_order_relaxed);
  segment_misses_.fetch_add(refs.size() - hits, std::memory_order_relaxed);
  if (hits > 0) {
    // The SegmentKv objects are not written but through their layer arrays from here on: the
    // consumer reads band b's layers only after Advance says they are in.
    pending.Publish(found, elapsed_us());
    for (size_t b = 1; b < bands.size(); ++b) {
      for (size_t i = 0; i < refs.size(); ++i) {
        if (found[i] == nullptr) continue;
        if (std::chrono::steady_clock::now() >= deadline) {
          pending.Finish();  // the layers from here on never come: AwaitLayer says so
          return;
        }
        if (!LoadSegmentBand(sns, refs[i], bands[b], deadline, *found[i])) {
          segment_band_misses_.fetch_add(1, std::memory_order_relaxed);
          pending.Fail();
          pending.Finish();
          return;
        }
      }
      pending.Advance(elapsed_us());
    }
  }
  pending.Finish();
}

std::shared_ptr<PendingSegments> TierBridge::StartSegmentLoad(const Hash128& ns,
                                                              std::vector<SegmentRef> refs,
                                                              SteadyTime deadline) {
  if (!files_segments_) return nullptr;  // segments are filed on disk and in Redis only
  std::vector<int> band_ends;
  for (const LayerBand& b : SegmentBands(kv_.shape().n_layer)) band_ends.push_back(b.end);
  auto pending = std::make_shared<PendingSegments>(std::move(refs), std::move(band_ends));
  const bool queued = lookups_->TrySubmit([this, pending, ns, deadline] {
    // Runs on a lookup thread: the only place a segment load may wait for a tier.
    LoadSegments(ns, *pending, deadline);
  });
  if (!queued) {
    CT_LOG(kWarning) << "segment load skipped: the lookup queue is full";
    pending->Finish();
  }
  return pending;
}

std::string TierBridge::PrometheusText() { return cachette::PrometheusText(cache_.Stats()); }

nlohmann::json TierBridge::Stats() {
  const CacheStats s = cache_.Stats();
  nlohmann::json j;
  for (int t = 0; t < kCacheTierCount; ++t) {
    const CacheTierMetrics& m = s.tier[t];
    if (!m.enabled) continue;
    j["tiers"][std::string(CacheTierName(static_cast<CacheTier>(t)))] = {
        {"hit_chunks", m.hit_chunks},     {"hit_tokens", m.hit_tokens},
        {"miss_chunks", m.miss_chunks},   {"miss_tokens", m.miss_tokens},
        {"bytes_in", m.bytes_in},         {"bytes_out", m.bytes_out},
        {"entries", m.entries},           {"bytes_used", m.bytes_used},
        {"bytes_budget", m.bytes_budget}, {"evictions", m.evictions},
        {"corruptions", m.corruptions},   {"errors", m.errors}};
  }
  j["puts"] = s.puts;
  j["puts_dropped"] = s.puts_dropped;
  j["promotions"] = s.promotions;
  j["demotions"] = s.demotions;
  j["collisions"] = s.collisions;
  j["corruptions"] = s.corruptions;
  j["deadline_misses"] = s.deadline_misses;
  j["remote_lower_level_chunks"] = s.remote_lower_level_chunks;
  j["remote_recompute_chunks"] = s.remote_recompute_chunks;
  j["disk_lower_level_chunks"] = s.disk_lower_level_chunks;
  j["disk_recompute_chunks"] = s.disk_recompute_chunks;
  j["io_queue_depth"] = s.io_queue_depth;
  j["lookup_queue_depth"] = lookups_->queued();
  j["segments"] = {{"saved", segments_saved_.load(std::memory_order_relaxed)},
                   {"loaded", segments_loaded_.load(std::memory_order_relaxed)},
                   {"misses", segment_misses_.load(std::memory_order_relaxed)},
                   {"band_misses", segment_band_misses_.load(std::memory_order_relaxed)}};
  return j;
}

}  // namespace cachette::sched
