// The segment cache: KV of segments (documents, tool outputs) computed on their own, kept in
// memory so that later prompts can place them anywhere (engine/segment_reuse.h, issue 11).
// It is the segments' first tier: the scheduler also files them in the chunk store (disk,
// Redis; sched/segment_tier.h) and reads them back from there into this cache.
//
// Key: (namespace, the segment's tokens, the context it was computed after). The namespace is
// the request's KvNamespace (the radix index's: model, KV layout, RoPE, adapter, cache_salt),
// so tenants never see each other's segments. The tokens are hashed (XXH3-128) and compared on
// every hit: a collision costs a miss, never a wrong answer. The context is SegmentKv::context
// (ContextId of what preceded the segment when it was computed: BOS, or BOS + a shared prefix);
// the same document after another prefix is another entry.
//
// Life of an entry:
//   1. Insert(): stored (replacing one under the same key), then least recently used entries
//      are evicted until the cache holds at most budget_bytes. An entry larger than the whole
//      budget is not stored.
//   2. Lookup(): a hit returns the entry (shared: eviction or Clear never frees KV a caller
//      still holds) and makes it the most recently used; an expired one (ttl_ms > 0, past it)
//      is dropped and reported as a miss.
//   3. Evicted (LRU), expired, or dropped by Clear(ns) / Clear().
//
// Thread-safety: every method is safe from any thread (one mutex). The scheduler loop inserts
// and looks up; HTTP threads read Stats() and clear tenants.
#pragma once

#include <cstdint>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <span>

#include "core/hash.h"
#include "engine/segment_reuse.h"

namespace cachette::sched {

class SegmentCache {
 public:
  struct Options {
    size_t budget_bytes = size_t{256} << 20;  // K and V bytes of every entry together
    std::function<int64_t()> clock_ms;        // default: steady clock, milliseconds
  };
  explicit SegmentCache(Options options);
  SegmentCache(const SegmentCache&) = delete;
  SegmentCache& operator=(const SegmentCache&) = delete;

  // The entry for `tokens` computed after `context` in `ns`; null on a miss (counted).
  std::shared_ptr<const SegmentKv> Lookup(const Hash128& ns, std::span<const TokenId> tokens,
                                          uint64_t context);
  // Whether an unexpired entry exists; counts nothing and changes no recency.
  bool Contains(const Hash128& ns, std::span<const TokenId> tokens, uint64_t context);
  // Stores `seg` under (ns, seg.tokens, seg.context), expiring after ttl_ms (0: never), and
  // returns it (shared) for the caller to use; a segment larger than the whole budget is
  // returned but not stored.
  std::shared_ptr<const SegmentKv> Insert(const Hash128& ns, SegmentKv seg, int64_t ttl_ms = 0);
  // Drops every entry of `ns`; returns how many.
  size_t Clear(const Hash128& ns);
  size_t Clear();

  struct Stats {
    size_t entries = 0, bytes = 0, budget_bytes = 0;
    uint64_t hits = 0, misses = 0, inserts = 0, evictions = 0, expirations = 0;
  };
  Stats GetStats() const;

 private:
  struct Key {
    Hash128 ns;
    Hash128 tokens;
    uint64_t context = 0;
    auto operator<=>(const Key&) const = default;
  };
  struct Entry {
    std::shared_ptr<const SegmentKv> seg;
    size_t bytes = 0;
    int64_t expires_ms = 0;  // 0: never
    std::list<Key>::iterator lru;  // position in lru_ (front: most recent)
  };
  static Key KeyOf(const Hash128& ns, std::span<const TokenId> tokens, uint64_t context);
  // The live entry for `key` holding exactly `tokens`, or end(); drops an expired one. REQUIRES mu_.
  std::map<Key, Entry>::iterator FindLocked(const Key& key, std::span<const TokenId> tokens);
  void EraseLocked(std::map<Key, Entry>::iterator it);  // REQUIRES mu_

  Options options_;
  mutable std::mutex mu_;
  std::map<Key, Entry> entries_;  // GUARDED_BY(mu_)
  std::list<Key> lru_;            // GUARDED_BY(mu_)
  size_t bytes_ = 0;              // GUARDED_BY(mu_)
  Stats stats_;                   // GUARDED_BY(mu_): the counters
};

}  // namespace cachette::sched
