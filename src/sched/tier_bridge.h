// The one bridge between the scheduler and the tiered chunk store (RAM, disk, Redis): it starts
// a request's restore off the loop thread, copies chunks into the request's pages as they
// arrive, writes a finished request's new full chunks behind, and carries pins and clears to
// every tier.
//
// Layout. Chunks are `chunk_tokens` long (a multiple of the page size), aligned to position 0,
// in the store's layer-major layout
//   [n_layer][2 (K, V)][chunk_tokens][n_kv_head][head_dim]   elements of the KV type
// which is the page layout with the token axis extended, so a chunk moves with one memcpy per
// layer, K/V and page. Restored bytes are the bytes an earlier run wrote (raw codec), so greedy
// output equals a cold run; lossy codecs are opt-in at the store.
//
// A restore (see PrefixSource for how the scheduler drives it):
//   1. StartLoad queues a task on the bridge's `ct-lookup` threads: Cache::Lookup (which may
//      ask Redis, bounded by the store's remote_lookup_timeout), then Cache::Get of the chunks
//      beyond the radix hit, with the request's deadline. The loop thread never waits for it.
//   2. ApplyLoad copies every chunk resolved so far, in order, into the sequence's pages
//      (reserving them first) and advances the sequence. It is done after the last chunk, at a
//      miss, a layout mismatch or a failed reservation, or once the deadline passed.
// Namespaces: the request's one namespace (KvNamespace) is the store namespace too; its
// segments have a namespace of their own (SegmentNamespace), cleared with it.
// Segments (SaveSegment, StartSegmentLoad): filed as sched/segment_tier.h says, in bands of
// layers; a load reads them on the `ct-lookup` threads, the first band of every segment, then
// each later band, publishing each band to the PendingSegments as it completes (so a prefill
// can start on the first layers: CacheBlend's pipeline), until the deadline. Segments live in
// the disk and Redis tiers only, never in RAM: the scheduler's segment cache is their copy in
// memory, so a save skips RAM and a load does not promote.
//
// Thread-safety: StartLoad/ApplyLoad/Save on the scheduler loop (one caller per sequence);
// Lookup, Pin, Unpin, Clear and Stats from any thread. The Cache and KvManager are
// thread-safe on their own.
#pragma once

#include <atomic>
#include <memory>

#include "cache/executor.h"
#include "cachette/cache.h"
#include "sched/prefix_source.h"
#include "sched/segment_tier.h"

namespace cachette::sched {

class TierBridge final : public PrefixSource {
 public:
  // `kv` and `cache` are borrowed and must outlive the bridge. Call Validate first. Prompt
  // chunks take each sequence's own layout (its pool's: --session-kv-type runs a second one,
  // with the same page size); segments take kv's.
  TierBridge(KvManager& kv, Cache& cache, int lookup_threads = 2);
  ~TierBridge() override;  // lookups already queued run (briefly) before the threads join

  // kInvalidArgument unless the store's chunk size is a multiple of the page size.
  static Status Validate(const Cache& cache, const KvManager& kv);

  std::unique_ptr<PendingLoad> StartLoad(const Hash128& ns, std::span<const TokenId> prompt,
                                         int64_t have, SteadyTime deadline) override;
  LoadProgress ApplyLoad(PendingLoad& load, PagedSequence& seq) override;
  int64_t Save(PagedSequence& seq, std::span<const TokenId> tokens,
               int64_t skip_tokens) override;
  std::shared_ptr<PendingSegments> StartSegmentLoad(const Hash128& ns,
                                                    std::vector<SegmentRef> refs,
                                                    SteadyTime deadline) override;
  void SaveSegment(const Hash128& ns, const SegmentKv& seg) override;
  std::vector<TierTokens> Lookup(const Hash128& ns, std::span<const TokenId> prompt) override;
  uint64_t Pin(const Hash128& ns, std::span<const TokenId> tokens, int64_t ttl_ms) override;
  void Unpin(uint64_t pin) override;
  Status Clear(const Hash128& ns) override;
  nlohmann::json Stats() override;
  std::string PrometheusText() override;

  // For tools and tests: StartLoad, then ApplyLoad until done (sleeping between polls).
  // Returns the tokens added per tier (summed) and tier_tokens.
  LoadProgress RestoreNow(PagedSequence& seq, std::span<const TokenId> prompt,
                          SteadyTime deadline);
  Cache& cache() { return cache_; }

 private:
  struct Load;
  // The chunk layout of KV of `shape` (each sequence's own: a server may run two pools).
  ChunkLayout Layout(const KvShape& shape) const;
  // Band `band` of a segment from the tiers (segment namespace `sns`) into `seg`; false for a
  // miss, a refused chunk, or not in time.
  bool LoadSegmentBand(const Hash128& sns, const SegmentRef& ref, LayerBand band,
                       SteadyTime deadline, SegmentKv& seg);
  // The body of a segment load: band by band, publishing to `pending` as they come.
  void LoadSegments(const Hash128& ns, PendingSegments& pending, SteadyTime deadline);

  KvManager& kv_;
  Cache& cache_;
  const int chunk_tokens_;
  const bool files_segments_;  // the store has a disk or Redis tier, where segments are filed
  std::atomic<uint64_t> segments_saved_{0}, segments_loaded_{0}, segment_misses_{0};
  // Segments found whose later band could not be read (evicted or refused meanwhile).
  std::atomic<uint64_t> segment_band_misses_{0};
  // Declared last: destroyed (drained and joined) first, while the members above are alive.
  std::unique_ptr<cache::ThreadExecutor> lookups_;
};

}  // namespace cachette::sched
