// The RAM tier: chunk records in process memory, the hot tier.
//
// A record is held as an immutable shared buffer so a hit can be handed out without a copy
// (GetShared) and a demotion can hand the same bytes to the disk writer. The tier enforces its
// byte budget only as a safety net (Put past it is kResourceExhausted); which record to evict
// is the store's decision (policy.h).
//
// Buffers come from a BufferPool (buffer_pool.h): a record released by eviction is reused by a
// later put, so a put at the budget is a plain copy into mapped memory, not page faults.
// Thread-safety: every method is safe to call concurrently (one mutex; no I/O under it).
#pragma once

#include <memory>
#include <mutex>
#include <unordered_map>

#include "cache/buffer_pool.h"
#include "cache/tier.h"

namespace cachette::cache {

struct ChunkKeyHash {
  size_t operator()(const ChunkKey& k) const noexcept { return static_cast<size_t>(k.lo); }
};

class RamTier final : public Tier {
 public:
  // budget_bytes = 0: unbounded. The pool keeps at most a quarter of the budget (and at most
  // kMaxIdleBytes) of released buffers for reuse.
  explicit RamTier(uint64_t budget_bytes);
  static constexpr uint64_t kMaxIdleBytes = uint64_t{256} << 20;

  std::string_view name() const override { return "ram"; }
  // Copies `record` into a pooled buffer. kResourceExhausted if it would take the tier past
  // its budget.
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
  // The pool this tier's buffers come from; callers that build records for PutShared (the
  // store, disk reads being promoted) take their buffers here too.
  BufferPool& pool() { return *pool_; }

 private:
  const uint64_t budget_bytes_;
  const std::shared_ptr<BufferPool> pool_;
  mutable std::mutex mu_;
  std::unordered_map<ChunkKey, SharedBytes, ChunkKeyHash> map_;  // GUARDED_BY(mu_)
  TierStats stats_;                                              // GUARDED_BY(mu_)
};

}  // namespace cachette::cache
