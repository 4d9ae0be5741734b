#include "cache/store_index.h"

#include "core/check.h"

namespace cachette::cache {

EntryStats StoreEntry::StatsIn(int tier) const {
  EntryStats s;
  s.bytes = bytes[tier];
  s.n_tokens = n_tokens;
  s.chunk_index = chunk_index;
  s.hits = hits;
  s.insert_tick = insert_tick;
  s.last_access_tick = last_tick;
  s.main_tick = main_tick;
  return s;
}

StoreEntry* StoreIndex::Find(const ChunkKey& key) {
  auto it = entries_.find(key);
  return it == entries_.end() ? nullptr : &it->second;
}

const StoreEntry* StoreIndex::Find(const ChunkKey& key) const {
  auto it = entries_.find(key);
  return it == entries_.end() ? nullptr : &it->second;
}

StoreEntry& StoreIndex::FindOrCreate(const ChunkKey& key, const Hash128& ns, uint32_t n_tokens,
                                     uint32_t chunk_index, bool* created) {
  auto [it, fresh] = entries_.try_emplace(key);
  StoreEntry& e = it->second;
  if (fresh) {
    e.key = key;
    e.ns = ns;
    e.n_tokens = n_tokens;
    e.chunk_index = chunk_index;
    e.gen = ++gen_;
    e.insert_tick = e.last_tick = ++tick_;
  }
  if (created != nullptr) *created = fresh;
  return e;
}

void StoreIndex::Charge(const Hash128& ns, int tier, int64_t delta) {
  CT_CHECK(delta >= 0 || used_[tier] >= static_cast<uint64_t>(-delta))
      << "tier " << tier << " accounting underflow";
  used_[tier] += static_cast<uint64_t>(delta);
  ns_usage_[ns].bytes[tier] += static_cast<uint64_t>(delta);
}

void StoreIndex::SetBytes(StoreEntry& e, int tier, uint64_t bytes) {
  Charge(e.ns, tier, static_cast<int64_t>(bytes) - static_cast<int64_t>(e.bytes[tier]));
  const bool was = e.bytes[tier] != 0;
  e.bytes[tier] = bytes;
  if (events_ == nullptr || was == (bytes != 0)) return;
  KvEvent ev;
  ev.kind = bytes != 0 ? KvEvent::Kind::kStored : KvEvent::Kind::kRemoved;
  ev.medium = tier == kStoreRam ? KvMedium::kRam : KvMedium::kDisk;
  ev.block_hashes.push_back(KvBlockHash(e.key));
  ev.block_size = static_cast<int32_t>(e.n_tokens);
  events_->Emit(std::move(ev));
}

void StoreIndex::Reserve(const Hash128& ns, int tier, uint64_t bytes) {
  Charge(ns, tier, static_cast<int64_t>(bytes));
}

void StoreIndex::Release(const Hash128& ns, int tier, uint64_t bytes) {
  Charge(ns, tier, -static_cast<int64_t>(bytes));
}

void StoreIndex::MaybeForget(const ChunkKey& key) {
  auto it = entries_.find(key);
  if (it == entries_.end()) return;
  const StoreEntry& e = it->second;
  if (e.ram_bytes() == 0 && e.disk_bytes() == 0 && !e.disk_pending) entries_.erase(it);
}

StoreEntry StoreIndex::Remove(const ChunkKey& key) {
  auto it = entries_.find(key);
  if (it == entries_.end()) return StoreEntry();
  StoreEntry e = it->second;
  for (int t : {kStoreRam, kStoreDisk}) SetBytes(it->second, t, 0);
  entries_.erase(it);
  return e;
}

std::vector<std::pair<ChunkKey, StoreEntry>> StoreIndex::RemoveNamespace(const Hash128& ns) {
  std::vector<std::pair<ChunkKey, StoreEntry>> removed;
  for (auto it = entries_.begin(); it != entries_.end();) {
    if (it->second.ns != ns) {
      ++it;
      continue;
    }
    removed.emplace_back(it->first, it->second);
    for (int t : {kStoreRam, kStoreDisk}) SetBytes(it->second, t, 0);
    it = entries_.erase(it);
  }
  return removed;
}

uint64_t StoreIndex::ns_used(const Hash128& ns, int tier) const {
  auto it = ns_usage_.find(ns);
  return it == ns_usage_.end() ? 0 : it->second.bytes[tier];
}

}  // namespace cachette::cache
