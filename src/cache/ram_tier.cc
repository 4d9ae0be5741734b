#include "cache/ram_tier.h"

#include <algorithm>
#include <string>

namespace cachette::cache {

RamTier::RamTier(uint64_t budget_bytes)
    : budget_bytes_(budget_bytes),
      pool_(BufferPool::Create(budget_bytes == 0 ? kMaxIdleBytes
                                                 : std::min(budget_bytes / 4, kMaxIdleBytes))) {}

Status RamTier::Put(const ChunkKey& key, std::span<const std::byte> record, uint32_t) {
  return PutShared(key, pool_->Share(pool_->TakeCopy(record)));
}

Status RamTier::PutShared(const ChunkKey& key, SharedBytes record) {
  std::lock_guard lock(mu_);
  auto it = map_.find(key);
  const uint64_t old_bytes = it == map_.end() ? 0 : it->second->size();
  if (budget_bytes_ != 0 && stats_.bytes_used - old_bytes + record->size() > budget_bytes_) {
    return ResourceExhausted("ram tier: " + std::to_string(record->size()) +
                             " bytes do not fit the budget of " + std::to_string(budget_bytes_));
  }
  stats_.bytes_used += record->size() - old_bytes;
  stats_.bytes_in += record->size();
  ++stats_.puts;
  if (it == map_.end()) {
    map_.emplace(key, std::move(record));
  } else {
    it->second = std::move(record);
  }
  return Status::Ok();
}

SharedBytes RamTier::GetShared(const ChunkKey& key) {
  std::lock_guard lock(mu_);
  ++stats_.gets;
  auto it = map_.find(key);
  if (it == map_.end()) {
    ++stats_.misses;
    return nullptr;
  }
  ++stats_.hits;
  stats_.bytes_out += it->second->size();
  return it->second;
}

Result<std::vector<std::byte>> RamTier::Get(const ChunkKey& key, Deadline) {
  SharedBytes r = GetShared(key);  // copy outside the lock
  if (r == nullptr) return NotFound("ram tier: " + key.ToHex());
  return std::vector<std::byte>(r->begin(), r->end());
}

std::vector<bool> RamTier::ContainsMany(std::span<const ChunkKey> keys, Deadline) {
  std::vector<bool> out(keys.size());
  std::lock_guard lock(mu_);
  for (size_t i = 0; i < keys.size(); ++i) out[i] = map_.count(keys[i]) != 0;
  return out;
}

Status RamTier::Erase(const ChunkKey& key) {
  SharedBytes victim;  // released after the lock: the last owner frees the buffer
  std::lock_guard lock(mu_);
  auto it = map_.find(key);
  if (it == map_.end()) return Status::Ok();
  stats_.bytes_used -= it->second->size();
  victim = std::move(it->second);
  map_.erase(it);
  return Status::Ok();
}

TierStats RamTier::Stats() const {
  std::lock_guard lock(mu_);
  TierStats s = stats_;
  s.entries = map_.size();
  s.bytes_capacity = budget_bytes_;
  return s;
}

uint64_t RamTier::bytes_used() const {
  std::lock_guard lock(mu_);
  return stats_.bytes_used;
}

}  // namespace cachette::cache
