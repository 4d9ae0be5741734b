// A simulated link for the benchmarks that read KV from Redis (`bench cache`, `bench
// segment-load`): a tier whose reads take as long as their bytes would on a link of a given
// bandwidth (latency not modelled).
//
// Thread-safety: as the tier it wraps; the sleep is per calling thread.
#pragma once

#include <chrono>
#include <span>
#include <string_view>
#include <thread>
#include <vector>

#include "cache/redis/redis_tier.h"
#include "cache/tier.h"

namespace cachette::cli {

// A remote tier whose reads take as long as their bytes would on a link of `bytes_per_s`.
class SlowLink final : public cache::Tier {
 public:
  SlowLink(cache::Tier& inner, double bytes_per_s) : inner_(inner), bytes_per_s_(bytes_per_s) {}
  std::string_view name() const override { return inner_.name(); }
  Status Put(const cache::ChunkKey& k, std::span<const std::byte> r, uint32_t ttl) override {
    return inner_.Put(k, r, ttl);
  }
  Result<std::vector<std::byte>> Get(const cache::ChunkKey& k, cache::Deadline d) override {
    return Slow(inner_.Get(k, d));
  }
  std::vector<bool> ContainsMany(std::span<const cache::ChunkKey> k, cache::Deadline d) override {
    return inner_.ContainsMany(k, d);
  }
  Status Erase(const cache::ChunkKey& k) override { return inner_.Erase(k); }
  cache::TierStats Stats() const override { return inner_.Stats(); }
  Status PutIn(const Hash128& ns, const cache::ChunkKey& k, std::span<const std::byte> r,
               uint32_t ttl) override {
    return inner_.PutIn(ns, k, r, ttl);
  }
  Result<std::vector<std::byte>> GetIn(const Hash128& ns, const cache::ChunkKey& k,
                                       cache::Deadline d) override {
    return Slow(inner_.GetIn(ns, k, d));
  }
  std::vector<bool> ContainsManyIn(const Hash128& ns, std::span<const cache::ChunkKey> k,
                                   cache::Deadline d) override {
    return inner_.ContainsManyIn(ns, k, d);
  }
  Status EraseIn(const Hash128& ns, const cache::ChunkKey& k) override {
    return inner_.EraseIn(ns, k);
  }
  Status ClearNamespace(const Hash128& ns) override { return inner_.ClearNamespace(ns); }

 private:
  Result<std::vector<std::byte>> Slow(Result<std::vector<std::byte>> got) {
    if (got.ok()) {
      std::this_thread::sleep_for(
          std::chrono::duration<double>(static_cast<double>(got->size()) / bytes_per_s_));
    }
    return got;
  }
  cache::Tier& inner_;
  const double bytes_per_s_;
};

// The Redis tier at `urls` (a standalone server, or cluster seeds), for a benchmark to read
// from, wrapped in a SlowLink of `link_mbps` Mbit/s when that is > 0 (*inner then holds the
// tier itself, which must outlive the link).
inline Result<std::unique_ptr<cache::Tier>> OpenBenchRedis(const std::vector<std::string>& urls,
                                                           double link_mbps,
                                                           std::unique_ptr<cache::Tier>* inner) {
  cache::RedisTierOptions ro;
  ro.urls = urls;
  CT_ASSIGN_OR_RETURN(*inner, cache::RedisTier::Open(ro));
  if (link_mbps <= 0) return std::unique_ptr<cache::Tier>();
  return std::unique_ptr<cache::Tier>(std::make_unique<SlowLink>(**inner, link_mbps * 1e6 / 8));
}

}  // namespace cachette::cli
