// The engine side of the tiered chunk store: restores cached chunks into a sequence's pages
// before prefill, and saves a finished sequence's new full chunks after it (write-behind).
//
// Order of lookups for a prompt: the in-memory radix index first (KvManager::Start), then the
// tiers (RAM, disk, Redis) for what lies beyond it. Chunks are `chunk_tokens` long (a multiple
// of the page size), aligned to position 0, in the store's layer-major layout:
//   [n_layer][2 (K, V)][chunk_tokens][n_kv_head][head_dim]   elements of the KV type
// which is the page layout with the token axis extended, so a restore is one memcpy per layer,
// K/V and page. Restored bytes are the bytes an earlier run wrote (raw codec), so greedy output
// equals a cold run; lossy codecs are opt-in at the store.
//
// Nothing waits past `deadline`: chunks not loaded by then are recomputed.
// Thread-safety: as KvManager (one caller per sequence); the Cache is thread-safe.
#pragma once

#include <chrono>
#include <cstdint>
#include <span>

#include "cachette/cache.h"
#include "kv/kv_manager.h"
#include "model/model.h"

namespace cachette {

// The store namespace for a model, KV type and tenant salt: every field that changes the bytes.
Hash128 CacheNamespace(const Model& model, kernels::KvType kv_type,
                       std::string_view tenant_salt = {});

class TieredPrefix {
 public:
  // `cache` is borrowed and must outlive this object. Its chunk size must be a multiple of the
  // manager's page size (kInvalidArgument from Validate otherwise).
  TieredPrefix(Cache& cache, KvManager& kv);
  static Status Validate(const Cache& cache, const KvManager& kv);

  struct Restored {
    int64_t tokens = 0;                      // added to the sequence from the tiers
    int64_t tokens_by_tier[kCacheTierCount] = {};
    int64_t tier_tokens = 0;                 // leading tokens the tiers hold (pass to Save)
  };
  // Extends `seq` (started from the radix index) with chunks from the tiers covering
  // prompt[seq.n_tokens():]. On any failure (a miss, a late chunk, no free pages) it restores
  // less, never wrong data, and the rest is simply recomputed.
  Restored Restore(PagedSequence& seq, std::span<const TokenId> prompt, const Hash128& store_ns,
                   std::chrono::steady_clock::time_point deadline);

  // Puts the full chunks of `tokens` (the sequence's ids, whose KV `seq` holds) from chunk
  // `skip_tokens / chunk_tokens` on: chunks the tiers already had need not be written again.
  // Returns the chunks handed to the store.
  size_t Save(PagedSequence& seq, std::span<const TokenId> tokens, const Hash128& store_ns,
              int64_t skip_tokens = 0);

 private:
  ChunkLayout Layout() const;

  Cache& cache_;
  KvManager& kv_;
  int chunk_tokens_;
};

}  // namespace cachette
