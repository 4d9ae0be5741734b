// What `cachette route` knows of each backend's KV cache: which blocks it holds, in which medium.
//
// Blocks are named by chained content hashes (core/kv_events.h): the hash of a block names the
// whole prefix up to its end in one namespace, so a flat set of hashes per backend is a radix
// tree in disguise: a request's leading blocks are found by walking its own chain of hashes and
// stopping at the first one a backend lacks, exactly as a walk down a radix tree would.
//
// Two ways to fill it:
//   events  (--policy kv)     Apply() from each backend's KV events: "memory" pages, "ram" and
//                              "disk" chunks per backend; "redis" chunks go to one shared set,
//                              reachable from every backend (they share the Redis tier).
//   approx  (--policy approx) Record() the pages of each request where the router sent it, in
//                              a least-recently-used set as large as the backend's KV pool. No
//                              events: it cannot see evictions, restarts or other routers.
//
// Scoring (Score): walk the request's pages in order; a page counts `page_tokens` tokens,
// weighted by the fastest medium that holds it: the page itself in memory, else the chunk that
// contains it in RAM, on disk, or in Redis; the walk stops at the first page held nowhere
// (prefix reuse cannot skip a gap).
//
// Thread-safety: all methods are safe from any thread (one shared mutex: event appliers write,
// request threads read).
#pragma once

#include <cstdint>
#include <list>
#include <map>
#include <shared_mutex>
#include <span>
#include <unordered_map>
#include <unordered_set>

#include "core/kv_events.h"

namespace cachette::route {

// How much a held token is worth by where it is: restoring from a slower tier costs part of a
// recompute, so a block in memory outweighs one on disk.
struct TierWeights {
  double memory = 1.0;
  double ram = 0.7;
  double disk = 0.4;
  double redis = 0.25;
};

struct Overlap {
  int64_t tokens = 0;         // leading tokens held in any medium
  int64_t memory_tokens = 0;  // of which in the attention cache
  double weighted = 0;        // sum of tokens x the weight of their medium
};

class BlockIndex {
 public:
  // `shared_cap`: most Redis blocks remembered (the oldest are forgotten beyond it).
  explicit BlockIndex(size_t shared_cap = size_t{1} << 22) : shared_cap_(shared_cap) {}

  // Events of `backend` (any id the caller chooses). A snapshot is Reset then Apply.
  void Apply(int backend, const KvEvent& e);
  // Forgets what `backend` holds in memory, RAM and disk (Redis blocks stay: they are shared).
  void Reset(int backend);
  // Forgets `backend` entirely (removed from the router).
  void Remove(int backend) { Reset(backend); }

  // Approximate mode: `backend` now holds `pages` (most recent last); at most `capacity` pages
  // are remembered per backend, least recently recorded forgotten first.
  void Record(int backend, std::span<const uint64_t> pages, size_t capacity);

  Overlap Score(int backend, std::span<const uint64_t> pages, int page_tokens,
                std::span<const uint64_t> chunks, int chunk_tokens,
                const TierWeights& w) const;

  size_t blocks(int backend, KvMedium m) const;

 private:
  struct Backend {
    std::unordered_set<uint64_t> held[3];  // memory, ram, disk
    // Approximate mode's recency order of the memory set.
    std::list<uint64_t> lru;
    std::unordered_map<uint64_t, std::list<uint64_t>::iterator> lru_pos;
  };

  const size_t shared_cap_;
  mutable std::shared_mutex mu_;
  std::map<int, Backend> backends_;
  // Redis blocks in insertion order (for the cap), and where each is in that order.
  std::list<uint64_t> redis_order_;
  std::unordered_map<uint64_t, std::list<uint64_t>::iterator> redis_;
};

}  // namespace cachette::route
