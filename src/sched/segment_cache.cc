#include "sched/segment_cache.h"

#include <algorithm>
#include <chrono>
#include <iterator>
#include <vector>

namespace cachette::sched {

SegmentCache::SegmentCache(Options options) : options_(std::move(options)) {
  if (!options_.clock_ms) {
    options_.clock_ms = [] {
      return std::chrono::duration_cast<std::chrono::milliseconds>(
                 std::chrono::steady_clock::now().time_since_epoch())
          .count();
    };
  }
}

SegmentCache::Key SegmentCache::KeyOf(const Hash128& ns, std::span<const TokenId> tokens,
                                      uint64_t context) {
  return Key{ns,
             Hash128Of(ByteSpan(reinterpret_cast<const std::byte*>(tokens.data()),
                                tokens.size() * sizeof(TokenId))),
             context};
}

std::map<SegmentCache::Key, SegmentCache::Entry>::iterator SegmentCache::FindLocked(
    const Key& key, std::span<const TokenId> tokens) {
  auto it = entries_.find(key);
  if (it == entries_.end()) return it;
  if (it->second.expires_ms > 0 && options_.clock_ms() >= it->second.expires_ms) {
    EraseLocked(it);
    ++stats_.expirations;
    return entries_.end();
  }
  const std::vector<TokenId>& have = it->second.seg->tokens;
  if (!std::equal(have.begin(), have.end(), tokens.begin(), tokens.end())) {
    return entries_.end();  // a hash collision: a miss, never a wrong segment
  }
  return it;
}

void SegmentCache::EraseLocked(std::map<Key, Entry>::iterator it) {
  bytes_ -= it->second.bytes;
  lru_.erase(it->second.lru);
  entries_.erase(it);
}

std::shared_ptr<const SegmentKv> SegmentCache::Lookup(const Hash128& ns,
                                                      std::span<const TokenId> tokens,
                                                      uint64_t context) {
  const Key key = KeyOf(ns, tokens, context);
  std::lock_guard<std::mutex> lock(mu_);
  auto it = FindLocked(key, tokens);
  if (it == entries_.end()) {
    ++stats_.misses;
    return nullptr;
  }
  ++stats_.hits;
  lru_.splice(lru_.begin(), lru_, it->second.lru);
  return it->second.seg;
}

bool SegmentCache::Contains(const Hash128& ns, std::span<const TokenId> tokens,
                            uint64_t context) {
  const Key key = KeyOf(ns, tokens, context);
  std::lock_guard<std::mutex> lock(mu_);
  return FindLocked(key, tokens) != entries_.end();
}

std::shared_ptr<const SegmentKv> SegmentCache::Insert(const Hash128& ns, SegmentKv seg,
                                                      int64_t ttl_ms) {
  const Key key = KeyOf(ns, seg.tokens, seg.context);
  const size_t bytes = seg.bytes() + seg.tokens.size() * sizeof(TokenId) +
                       seg.inter.size() * sizeof(float);
  auto shared = std::make_shared<const SegmentKv>(std::move(seg));
  std::lock_guard<std::mutex> lock(mu_);
  if (auto it = entries_.find(key); it != entries_.end()) EraseLocked(it);
  if (bytes > options_.budget_bytes) return shared;
  while (bytes_ + bytes > options_.budget_bytes && !lru_.empty()) {
    EraseLocked(entries_.find(lru_.back()));
    ++stats_.evictions;
  }
  lru_.push_front(key);
  Entry e;
  e.seg = shared;
  e.bytes = bytes;
  e.expires_ms = ttl_ms > 0 ? options_.clock_ms() + ttl_ms : 0;
  e.lru = lru_.begin();
  entries_.emplace(key, std::move(e));
  bytes_ += bytes;
  ++stats_.inserts;
  return shared;
}

size_t SegmentCache::Clear(const Hash128& ns) {
  std::lock_guard<std::mutex> lock(mu_);
  // Keys sort by namespace first: the tenant's entries are one range.
  auto it = entries_.lower_bound(Key{ns, Hash128{}, 0});
  size_t n = 0;
  while (it != entries_.end() && it->first.ns == ns) {
    auto next = std::next(it);
    EraseLocked(it);
    it = next;
    ++n;
  }
  return n;
}

size_t SegmentCache::Clear() {
  std::lock_guard<std::mutex> lock(mu_);
  const size_t n = entries_.size();
  entries_.clear();
  lru_.clear();
  bytes_ = 0;
  return n;
}

SegmentCache::Stats SegmentCache::GetStats() const {
  std::lock_guard<std::mutex> lock(mu_);
  Stats s = stats_;
  s.entries = entries_.size();
  s.bytes = bytes_;
  s.budget_bytes = options_.budget_bytes;
  return s;
}

}  // namespace cachette::sched
