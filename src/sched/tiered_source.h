// The tiered chunk store (RAM, disk, Redis) as the scheduler's PrefixSource: before prefill it
// restores what lies beyond the radix index's hit from the tiers; when a request finishes it
// writes the request's new full chunks behind.
//
// Store namespaces: every field that changes the KV bytes (model fingerprint, architecture and
// dims, KV type and layout, RoPE) plus the tenant, taken as the sequence's radix namespace id
// (itself a hash of fingerprint, KV type and cache_salt), so tenants stay apart in every tier
// and instances sharing Redis share chunks exactly when they share a radix namespace.
//
// Thread-safety: Restore/Save on the scheduler loop; Lookup/Stats from any thread.
#pragma once

#include <chrono>
#include <mutex>
#include <unordered_map>

#include "cachette/cache.h"
#include "kv/tiered_prefix.h"
#include "sched/prefix_source.h"

namespace cachette::sched {

class TieredSource final : public PrefixSource {
 public:
  // `model`, `kv` and `cache` are borrowed and must outlive this object. `load_budget` bounds
  // how long a restore may wait for slow tiers before the rest is recomputed.
  TieredSource(const Model& model, KvManager& kv, Cache& cache,
               std::chrono::milliseconds load_budget);

  std::vector<TierTokens> Restore(PagedSequence& seq, std::span<const TokenId> prompt) override;
  void Save(PagedSequence& seq, std::span<const TokenId> tokens) override;
  std::vector<TierTokens> Lookup(const Hash128& ns, std::span<const TokenId> prompt) override;
  nlohmann::json Stats() override;
  std::string PrometheusText() override { return cachette::PrometheusText(cache_.Stats()); }

  Hash128 StoreNamespace(const Hash128& kv_ns) const;
  Cache& cache() { return cache_; }

 private:
  const Model& model_;
  kernels::KvType kv_type_;
  Cache& cache_;
  TieredPrefix tiers_;
  std::chrono::milliseconds load_budget_;
  std::mutex mu_;
  // Leading tokens the tiers already held at restore time, per running sequence, so Save
  // writes only chunks past them.
  std::unordered_map<const PagedSequence*, int64_t> tier_tokens_;
};

}  // namespace cachette::sched
