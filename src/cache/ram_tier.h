// The RAM tier: chunk records in process memory, the hot tier.
//
// A record is held as an immutable shared buffer so a hit can be handed out without a copy
// (GetShared) and a demotion can hand the same bytes to the disk writer. The tier enforces its
// byte budget only as a safety net (Put past it is kResourceExhausted); which record to evict
// is the store's decision (policy.h).
// Thread-safety: every method is safe to call concurrently (one mutex; no I/O under it).
#pragma once

#include <memory>
#include <mutex>
#include <unordered_map>

#include "cache/tier.h"

namespace cachette::cache {

struct ChunkKeyHash {
  size_t operator()(const ChunkKey& k) const noexcept { return static_cast<size_t>(k.lo); }
};

using SharedBytes = std::shared_ptr<const std::vector<std::byte>>;

class RamTier final : public Tier {
 public:
  // budget_bytes = 0: unbounded.
  explicit RamTier(uint64_t budget_bytes) : budget_bytes_(budget_bytes) {}

  std::string_view name() const override { return "ram"; }
  // Copies `record`. kResourceExhausted if it would take the tier past its budget.
  Status Put(const ChunkKey& key, std::span<const std::byte> record,
             uint32_t ttl_seconds = 0) override;
  // Returns a copy of the record, or kNotFound. Never blocks on I/O, so `deadline` is unused.
  Result<std::vector<std::byte>> Get(const ChunkKey& key, Deadline deadline) override;
  std::vector<bool> ContainsMany(std::span<const ChunkKey> keys, Deadline deadline) override;
  Status Erase(const ChunkKey& key) override;
  TierStats Stats() const override;

  // Zero-copy forms: the tier shares ownership of `record` (non-null).
  Status PutShared(const ChunkKey& key, SharedBytes record);
  // The shared record, or null on a miss.
  SharedBytes GetShared(const ChunkKey& key);

  uint64_t bytes_used() const;

 private:
  const uint64_t budget_bytes_;
  mutable std::mutex mu_;
  std::unordered_map<ChunkKey, SharedBytes, ChunkKeyHash> map_;  // GUARDED_BY(mu_)
  TierStats stats_;                                              // GUARDED_BY(mu_)
};

}  // namespace cachette::cache
