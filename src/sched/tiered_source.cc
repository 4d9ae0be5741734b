#include "sched/tiered_source.h"

namespace cachette::sched {

TieredSource::TieredSource(const Model& model, KvManager& kv, Cache& cache,
                           std::chrono::milliseconds load_budget)
    : model_(model),
      kv_type_(kv.shape().type),
      cache_(cache),
      tiers_(cache, kv),
      load_budget_(load_budget) {}

Hash128 TieredSource::StoreNamespace(const Hash128& kv_ns) const {
  return CacheNamespace(model_, kv_type_, kv_ns.ToHex());
}

std::vector<TierTokens> TieredSource::Restore(PagedSequence& seq,
                                              std::span<const TokenId> prompt) {
  const auto deadline = std::chrono::steady_clock::now() + load_budget_;
  TieredPrefix::Restored r = tiers_.Restore(seq, prompt, StoreNamespace(seq.ns()), deadline);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (tier_tokens_.size() > 100000) tier_tokens_.clear();  // sequences that never saved
    tier_tokens_[&seq] = r.tier_tokens;
  }
  std::vector<TierTokens> out;
  for (int t = 0; t < kCacheTierCount; ++t) {
    if (r.tokens_by_tier[t] > 0) {
      out.push_back({std::string(CacheTierName(static_cast<CacheTier>(t))), r.tokens_by_tier[t]});
    }
  }
  return out;
}

void TieredSource::Save(PagedSequence& seq, std::span<const TokenId> tokens) {
  int64_t skip = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = tier_tokens_.find(&seq);
    if (it != tier_tokens_.end()) {
      skip = it->second;
      tier_tokens_.erase(it);
    }
  }
  tiers_.Save(seq, tokens, StoreNamespace(seq.ns()), skip);
}

std::vector<TierTokens> TieredSource::Lookup(const Hash128& ns, std::span<const TokenId> prompt) {
  LookupResult r = cache_.Lookup(prompt, StoreNamespace(ns));
  int64_t by_tier[kCacheTierCount] = {};
  for (CacheTier t : r.chunk_tiers) {
    if (t != CacheTier::kNone) by_tier[static_cast<int>(t)] += cache_.chunk_tokens();
  }
  std::vector<TierTokens> out;
  for (int t = 0; t < kCacheTierCount; ++t) {
    if (by_tier[t] > 0) out.push_back({std::string(CacheTierName(static_cast<CacheTier>(t))), by_tier[t]});
  }
  return out;
}

nlohmann::json TieredSource::Stats() {
  const CacheStats s = cache_.Stats();
  nlohmann::json j;
  for (int t = 0; t < kCacheTierCount; ++t) {
    const CacheTierMetrics& m = s.tier[t];
    if (!m.enabled) continue;
    j["tiers"][std::string(CacheTierName(static_cast<CacheTier>(t)))] = {
        {"hit_chunks", m.hit_chunks},   {"hit_tokens", m.hit_tokens},
        {"miss_chunks", m.miss_chunks}, {"miss_tokens", m.miss_tokens},
        {"bytes_in", m.bytes_in},       {"bytes_out", m.bytes_out},
        {"entries", m.entries},         {"bytes_used", m.bytes_used},
        {"bytes_budget", m.bytes_budget}, {"evictions", m.evictions},
        {"corruptions", m.corruptions}, {"errors", m.errors}};
  }
  j["puts"] = s.puts;
  j["puts_dropped"] = s.puts_dropped;
  j["promotions"] = s.promotions;
  j["demotions"] = s.demotions;
  j["collisions"] = s.collisions;
  j["corruptions"] = s.corruptions;
  j["deadline_misses"] = s.deadline_misses;
  j["io_queue_depth"] = s.io_queue_depth;
  return j;
}

}  // namespace cachette::sched
