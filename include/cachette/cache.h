// cachette's KV cache layer: a tiered store of KV chunks (RAM, local disk, Redis), keyed by
// content, independent of any engine.
//
// A chunk is the KV of `chunk_tokens` consecutive tokens (default 256), all layers, layer-major:
//   [n_layer][2 (K, V)][n_tokens][n_kv_head][head_dim] elements of layout.kv_type
// Chunk i of a token sequence is named by a key that chains every token before it (see
// src/cache/chunk.h), so a key names a whole prefix. Every stored chunk carries its namespace and
// token ids and is verified on every load: a hash collision costs a miss, never wrong data.
//
// Typical use (the engine before and after prefill):
//   auto cache = Cache::Open(options);                        // once
//   LookupResult hit = (*cache)->Lookup(tokens, ns);          // how much is cached, where
//   auto load = (*cache)->Get(ns, tokens, 0, hit.tokens / C, deadline);
//   load->Wait();                                             // chunk(i).bytes() are the KV
//   (*cache)->Put(ns, tokens, first_new_chunk, layout, new_chunks);  // write-behind
//
// Errors: a miss is never an error (Lookup returns 0 tokens; a chunk comes back kNotFound).
// Nothing on the load path waits for a slow tier past its deadline.
// Thread-safety: every method of Cache is safe to call concurrently. A LoadHandle is used by
// one thread at a time.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "cache/chunk.h"  // ChunkKey, ChunkLayout, NamespaceSpec, NamespaceId
#include "cachette/status.h"
#include "cachette/types.h"

namespace cachette {

namespace cache {
class Tier;
}  // namespace cache
class KvEventSink;  // core/kv_events.h (not installed: engine authors leave event_sink null)

using cache::ChunkLayout;

enum class CacheTier : uint8_t { kRam = 0, kDisk = 1, kRedis = 2, kNone = 255 };
inline constexpr int kCacheTierCount = 3;
std::string_view CacheTierName(CacheTier tier);  // "ram", "disk", "redis", "none"

// When chunks are written to Redis.
enum class RedisWriteMode : uint8_t {
  kWriteThrough = 0,  // every put (write-behind, after admission)
  kOnEviction = 1,    // when RAM evicts the chunk
};

// A byte quota for one namespace (a tenant, a model); 0 = no quota for that tier.
struct NamespaceQuota {
  Hash128 ns;
  uint64_t ram_bytes = 0;
  uint64_t disk_bytes = 0;
};

struct CacheOptions {
  int chunk_tokens = 256;                     // every chunk put must have this many tokens

  uint64_t ram_budget_bytes = uint64_t{1} << 30;   // 0 = no RAM tier
  std::string disk_dir;                            // "" = no disk tier
  uint64_t disk_budget_bytes = uint64_t{10} << 30;
  bool disk_sync = true;            // fdatasync every record (durable across power loss)
  bool disk_write_through = true;   // write each put to disk; false: only RAM evictions demote

  // Redis: "redis://host:port" URLs (several = a cluster's seed nodes); "" = none.
  std::vector<std::string> redis_urls;
  RedisWriteMode redis_write = RedisWriteMode::kWriteThrough;
  uint32_t redis_ttl_seconds = 0;   // 0 = no expiry
  // A remote tier supplied by the caller instead of redis_urls (borrowed; must outlive the
  // Cache). Reported as the "redis" tier.
  cache::Tier* remote_tier = nullptr;
  std::chrono::milliseconds remote_lookup_timeout{50};

  std::string codec = "raw";        // applied to disk and Redis records; RAM keeps raw bytes
  // Adaptive loading (CacheGen's controller): more encodings of each chunk written to the
  // remote tier beside the `codec` one, best quality first (e.g. {"cachegen", "cachegen-low"});
  // empty = off. A load from the remote tier picks, per chunk, the best encoding (`codec`
  // first, then these) whose transfer of the chunks still to load fits the time left before
  // the load's deadline at the measured link bandwidth, and gives the chunk up (the caller
  // recomputes it from its tokens) when even the smallest does not fit. Chunks loaded at a
  // lower level serve that load only: they are not promoted to RAM.
  std::vector<std::string> remote_levels;
  // The same for the disk tier (at most 8 levels): each chunk's encodings in these codecs are
  // filed beside its disk record (docs/formats/chunk.md) and leave the disk with it; a load
  // from disk picks the level by the disk read bandwidth it measured, as above. Empty = off.
  std::vector<std::string> disk_levels;
  std::string policy = "lru";       // lru | lfu | s3fifo | cost (see src/cache/policy.h)
  uint32_t admit_after_hits = 0;    // slower tiers take a chunk only once it was hit N times
  std::vector<NamespaceQuota> quotas;
  // The RAM and disk quota (each) of every namespace without an entry in `quotas`; 0 = none.
  // With one namespace per tenant, no tenant can fill a tier and evict everyone else.
  uint64_t default_quota_bytes = 0;

  size_t io_queue_capacity = 256;   // pending write-behind jobs; beyond it puts are dropped
  int load_threads = 2;
  // Clock for pin TTLs (nanoseconds, monotonic); empty = steady_clock. Tests inject one.
  std::function<int64_t()> now_nanos;
  // Where the store reports chunks entering and leaving RAM, disk and (the writes and erases
  // of this process) Redis, as KV events (core/kv_events.h); borrowed, must outlive the Cache.
  // Null = no events.
  KvEventSink* event_sink = nullptr;
};

// Which leading tokens of a sequence the cache holds.
struct LookupResult {
  size_t tokens = 0;                    // a multiple of chunk_tokens; 0 = nothing cached
  std::vector<CacheTier> chunk_tiers;   // the fastest tier holding each of those chunks
};

// One loaded chunk.
class ChunkData {
 public:
  // OK; kNotFound (a miss: absent, failed verification, or after an earlier miss);
  // kDeadlineExceeded (not loaded in time). Never anything that would be wrong data.
  Status status = NotFound("not loaded");
  CacheTier tier = CacheTier::kNone;    // where it came from
  ChunkLayout layout;
  // The raw KV bytes (layout.raw_bytes() of them); empty unless status is OK. Valid while this
  // ChunkData (its LoadHandle) lives.
  ByteSpan bytes() const { return bytes_; }

  std::shared_ptr<const std::vector<std::byte>> owner_;  // internal: keeps bytes_ alive
  ByteSpan bytes_;                                        // internal
  // The aux bytes Put filed with this chunk (empty when none).
  std::vector<std::byte> aux;
};

// An asynchronous load (RocksDB SecondaryCache style). Destroying it before it is ready is
// fine: late results are discarded.
class LoadHandle {
 public:
  virtual ~LoadHandle() = default;
  // True once every chunk is resolved (or the deadline passed).
  virtual bool IsReady() const = 0;
  // Blocks until IsReady(). Chunks unresolved at the deadline become kDeadlineExceeded.
  virtual void Wait() = 0;
  virtual size_t size() const = 0;
  // Chunk i of the request (0 = first_chunk). Only after Wait() (or IsReady()).
  virtual const ChunkData& chunk(size_t i) const = 0;
  // Tokens covered by the leading run of OK chunks. Only after Wait().
  virtual size_t ready_tokens() const = 0;
  // How many leading chunks are resolved (OK or a miss) so far, without blocking: chunk(i) may
  // be read for i below it before IsReady(), so a caller can use chunks as they arrive.
  virtual size_t resolved_chunks() const = 0;
};

// Latency of loads (Get to resolution, per chunk), in microsecond buckets.
struct LatencyHistogram {
  static constexpr int kBuckets = 14;
  static constexpr uint64_t kUpperUs[kBuckets] = {50,    100,    250,    500,    1000,
                                                  2500,  5000,   10000,  25000,  50000,
                                                  100000, 250000, 1000000, UINT64_MAX};
  uint64_t counts[kBuckets] = {};
  uint64_t sum_us = 0;
  uint64_t count = 0;
  void Add(uint64_t us);
};

struct CacheTierMetrics {
  bool enabled = false;
  uint64_t hit_chunks = 0, hit_tokens = 0;    // loads served by this tier
  uint64_t miss_chunks = 0, miss_tokens = 0;  // loads this tier was asked for and did not serve
  uint64_t bytes_in = 0, bytes_out = 0;       // written to / read from the tier
  uint64_t entries = 0, bytes_used = 0, bytes_budget = 0;
  uint64_t evictions = 0;
  uint64_t corruptions = 0;
  uint64_t errors = 0;  // I/O errors, timeouts, connection failures
};

struct CacheStats {
  CacheTierMetrics tier[kCacheTierCount];
  uint64_t lookups = 0, lookup_tokens = 0, lookup_hit_tokens = 0;
  uint64_t puts = 0;            // chunks accepted by Put
  uint64_t puts_dropped = 0;    // write-behind jobs dropped (queue full)
  uint64_t puts_rejected = 0;   // chunks no tier had room for (everything pinned)
  uint64_t promotions = 0;      // disk/Redis hits copied to RAM
  uint64_t demotions = 0;       // RAM evictions written to a slower tier
  uint64_t collisions = 0;      // a key's record had other tokens/namespace: served as a miss
  uint64_t corruptions = 0;     // all tiers
  uint64_t deadline_misses = 0;
  // Adaptive loading (remote_levels, disk_levels): chunks loaded at a level below `codec`, and
  // chunks given up for recompute because no level's transfer fit the deadline, per tier.
  uint64_t remote_lower_level_chunks = 0;
  uint64_t remote_recompute_chunks = 0;
  uint64_t disk_lower_level_chunks = 0;
  uint64_t disk_recompute_chunks = 0;
  uint64_t pins_active = 0;
  uint64_t io_queue_depth = 0;
  LatencyHistogram load_latency;
};

// Prometheus text exposition lines ("# TYPE ..." and samples, prefix cachette_cache_).
std::string PrometheusText(const CacheStats& stats);

class Cache {
 public:
  using PinId = uint64_t;

  // Opens the tiers named in `options`: recovers the disk tier's index from `disk_dir`
  // (creating it), connects to Redis. kInvalidArgument for bad options (unknown codec or policy,
  // chunk_tokens <= 0); kUnavailable if the disk directory is owned by another process or Redis
  // cannot be reached; kIOError for disk errors. The caller owns the result.
  static Result<std::unique_ptr<Cache>> Open(const CacheOptions& options);

  // Waits for write-behind to finish (as Flush), then closes the tiers.
  virtual ~Cache() = default;

  virtual int chunk_tokens() const = 0;

  // How many leading tokens of `tokens` are cached in namespace `ns`, and the fastest tier of
  // each chunk: stops at the first chunk no tier holds. One batched query per remote tier
  // (bounded by remote_lookup_timeout; a slow Redis shortens the answer, never delays it
  // further). A hint: Get verifies.
  virtual LookupResult Lookup(std::span<const TokenId> tokens, const Hash128& ns) = 0;

  // Starts loading chunks [first_chunk, first_chunk + n_chunks) of `tokens` (which must hold
  // them in full; kInvalidArgument chunks otherwise). RAM hits resolve before Get returns;
  // others load on the `load` executor, in order, stopping at the first miss. Each chunk is
  // verified (checksums, namespace, token ids, parent key) and decoded to raw bytes; disk and
  // Redis hits are promoted to RAM unless `promote` is false: then they serve this load only,
  // as chunks loaded at a lower level do, for a caller that keeps what it loads in memory
  // itself (the counterpart of Put's slower_tiers_only). The caller owns the handle.
  virtual std::unique_ptr<LoadHandle> Get(const Hash128& ns, std::span<const TokenId> tokens,
                                          size_t first_chunk, size_t n_chunks,
                                          std::chrono::steady_clock::time_point deadline,
                                          bool promote = true) = 0;

  // Stores chunks [first_chunk, first_chunk + chunks.size()) of `tokens`, each chunks[i] being
  // layout.raw_bytes() raw KV bytes of `layout` (layout.n_tokens == chunk_tokens). The bytes
  // are copied before Put returns; RAM takes them at once, slower tiers behind (write-behind
  // on the `io` executor; a full queue drops and counts). kInvalidArgument for a bad layout,
  // size or token count; otherwise OK (a chunk no tier has room for is counted, not an error).
  // `aux`: empty, or one byte string per chunk (each empty or up to 1 MiB) filed with it in
  // every tier and codec and returned as ChunkData::aux; the store never reads it. A chunk
  // already in RAM is not replaced, aux included. `slower_tiers_only`: the chunks go to disk
  // and Redis only, not RAM, for a caller that keeps them in memory itself (a chunk already
  // held locally is not written again); a load promotes them to RAM as any disk or Redis hit
  // unless it asks not to (Get's `promote`).
  virtual Status Put(const Hash128& ns, std::span<const TokenId> tokens, size_t first_chunk,
                     const ChunkLayout& layout, std::span<const ByteSpan> chunks,
                     std::span<const ByteSpan> aux = {}, bool slower_tiers_only = false) = 0;

  // Pins the full chunks of `tokens` (present or put later) in RAM and disk against eviction
  // until Unpin or `ttl` passes (ttl = 0: until Unpin). Pinned chunks count against budgets;
  // when pins fill a tier, new chunks skip it.
  virtual Result<PinId> Pin(std::span<const TokenId> tokens, const Hash128& ns,
                            std::chrono::milliseconds ttl) = 0;
  // kNotFound if `pin` is unknown or expired.
  virtual Status Unpin(PinId pin) = 0;

  // Removes the full chunks of `tokens` from every tier. OK if absent.
  virtual Status Erase(std::span<const TokenId> tokens, const Hash128& ns) = 0;
  // Removes every chunk of namespace `ns` from RAM, disk and Redis, including the Redis copies
  // other processes wrote (the namespace is part of every Redis key; see
  // docs/formats/redis-record.md). Pins stay (they protect chunks of `ns` put again). Errors:
  // kIOError from the disk; kUnavailable / kDeadlineExceeded when a Redis node does not answer
  // (what could be reached is cleared). WART: another process's copy of `ns` in RAM or on its
  // own disk stays until that process clears or evicts it, and a chunk written to Redis while
  // the clear runs may survive it.
  virtual Status Clear(const Hash128& ns) = 0;

  // Waits until every write-behind job queued before the call is done.
  virtual Status Flush() = 0;

  virtual CacheStats Stats() const = 0;
};

}  // namespace cachette
