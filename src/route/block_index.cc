#include "route/block_index.h"

#include <mutex>

namespace cachette::route {

namespace {

int LocalSlot(KvMedium m) {
  switch (m) {
    case KvMedium::kMemory: return 0;
    case KvMedium::kRam: return 1;
    case KvMedium::kDisk: return 2;
    case KvMedium::kRedis: return -1;
  }
  return 0;
}

}  // namespace

void BlockIndex::Apply(int backend, const KvEvent& e) {
  std::unique_lock lock(mu_);
  Backend& b = backends_[backend];
  if (e.kind == KvEvent::Kind::kAllCleared) {
    // A backend's reset says nothing about the shared tier.
    for (auto& s : b.held) s.clear();
    b.lru.clear();
    b.lru_pos.clear();
    return;
  }
  const int slot = LocalSlot(e.medium);
  const bool stored = e.kind == KvEvent::Kind::kStored;
  for (uint64_t h : e.block_hashes) {
    if (slot >= 0) {
      if (stored) {
        b.held[slot].insert(h);
      } else {
        b.held[slot].erase(h);
      }
      continue;
    }
    auto it = redis_.find(h);
    if (stored && it == redis_.end()) {
      redis_order_.push_back(h);
      redis_.emplace(h, std::prev(redis_order_.end()));
      if (redis_.size() > shared_cap_) {
        redis_.erase(redis_order_.front());
        redis_order_.pop_front();
      }
    } else if (!stored && it != redis_.end()) {
      redis_order_.erase(it->second);
      redis_.erase(it);
    }
  }
}

void BlockIndex::Reset(int backend) {
  std::unique_lock lock(mu_);
  backends_.erase(backend);
}

void BlockIndex::Record(int backend, std::span<const uint64_t> pages, size_t capacity) {
  std::unique_lock lock(mu_);
  Backend& b = backends_[backend];
  for (uint64_t h : pages) {
    auto it = b.lru_pos.find(h);
    if (it != b.lru_pos.end()) {
      b.lru.splice(b.lru.end(), b.lru, it->second);  // most recent last
      continue;
    }
    b.lru.push_back(h);
    b.lru_pos.emplace(h, std::prev(b.lru.end()));
    b.held[0].insert(h);
  }
  while (b.lru.size() > capacity) {
    const uint64_t old = b.lru.front();
    b.lru.pop_front();
    b.lru_pos.erase(old);
    b.held[0].erase(old);
  }
}

Overlap BlockIndex::Score(int backend, std::span<const uint64_t> pages, int page_tokens,
                          std::span<const uint64_t> chunks, int chunk_tokens,
                          const TierWeights& w) const {
  Overlap o;
  std::shared_lock lock(mu_);
  auto bit = backends_.find(backend);
  const Backend* b = bit == backends_.end() ? nullptr : &bit->second;
  for (size_t j = 0; j < pages.size(); ++j) {
    double weight = 0;
    if (b != nullptr && b->held[0].count(pages[j]) != 0) {
      weight = w.memory;
      o.memory_tokens += page_tokens;
    } else if (chunk_tokens > 0) {
      // The chunk that holds this whole page (chunks are a multiple of pages, aligned at 0).
      const size_t c = ((j + 1) * static_cast<size_t>(page_tokens) - 1) / chunk_tokens;
      if (c >= chunks.size()) break;
      const uint64_t h = chunks[c];
      if (b != nullptr && b->held[1].count(h) != 0) {
        weight = w.ram;
      } else if (b != nullptr && b->held[2].count(h) != 0) {
        weight = w.disk;
      } else if (redis_.count(h) != 0) {
        weight = w.redis;
      }
    }
    if (weight <= 0) break;
    o.tokens += page_tokens;
    o.weighted += weight * page_tokens;
  }
  return o;
}

size_t BlockIndex::blocks(int backend, KvMedium m) const {
  std::shared_lock lock(mu_);
  if (m == KvMedium::kRedis) return redis_.size();
  auto it = backends_.find(backend);
  return it == backends_.end() ? 0 : it->second.held[LocalSlot(m)].size();
}

}  // namespace cachette::route
