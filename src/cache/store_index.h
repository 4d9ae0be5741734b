// StoreIndex: the store's one index of what its local tiers (RAM, disk) hold, and the byte
// accounting that goes with it. Internal to TieredStore (store.h), which holds it under its
// mutex; not thread-safe by itself.
//
// Accounting rule: bytes are charged in exactly one place, SetBytes (an entry's bytes in a
// tier) or Reserve/Release (bytes charged before an entry holds them: a disk write in flight).
// Each moves three numbers together: the entry's bytes, the tier's total (used) and the
// namespace's share (ns_used, for quotas). So used(t) == sum over entries of bytes(t) plus
// reservations, always.
//
// An entry's life (see store.h for the tiers' side):
//   1. Create: a fresh generation (`gen`, told apart from earlier entries of the same key) and
//      insert tick;
//   2. bytes set in RAM and/or disk; `disk_pending` while a write job is queued or running;
//   3. MaybeForget drops it once no local tier holds it and nothing is pending; Remove drops
//      it at once (Erase, Clear), releasing its bytes.
// Pointers returned by Find/Create stay valid until the next Create or removal.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <utility>
#include <vector>

#include "cache/chunk.h"
#include "cache/policy.h"
#include "cache/ram_tier.h"  // ChunkKeyHash
#include "core/kv_events.h"

namespace cachette::cache {

// The local tiers the index accounts for (indices into used() and EntryOf bytes).
inline constexpr int kStoreRam = 0, kStoreDisk = 1;

struct StoreEntry {
  ChunkKey key;
  Hash128 ns;
  uint32_t n_tokens = 0;
  uint32_t chunk_index = 0;
  uint64_t gen = 0;            // distinguishes re-creations of the same key
  // Record bytes in RAM, on disk (with disk levels: the record's and its level files'); 0 =
  // absent.
  uint64_t bytes[2] = {0, 0};
  bool disk_pending = false;   // a write job for the disk is queued or running
  bool remote_written = false;
  uint64_t hits = 0;
  uint64_t insert_tick = 0, last_tick = 0, main_tick = 0;

  uint64_t ram_bytes() const { return bytes[kStoreRam]; }
  uint64_t disk_bytes() const { return bytes[kStoreDisk]; }
  // What an eviction policy sees of this entry in `tier`.
  EntryStats StatsIn(int tier) const;
};

class StoreIndex {
 public:
  using Map = std::unordered_map<ChunkKey, StoreEntry, ChunkKeyHash>;

  StoreEntry* Find(const ChunkKey& key);
  const StoreEntry* Find(const ChunkKey& key) const;
  // The entry of `key`, created (fresh generation, insert tick) if absent; `created` says which.
  StoreEntry& FindOrCreate(const ChunkKey& key, const Hash128& ns, uint32_t n_tokens,
                           uint32_t chunk_index, bool* created);

  // Sets `e`'s bytes in `tier` (0 = absent), moving the tier's and namespace's totals by the
  // difference. The only way entry bytes change, so the one place a chunk enters or leaves a
  // local tier: with an event sink, it reports each such change as a KV event.
  void SetBytes(StoreEntry& e, int tier, uint64_t bytes);
  // Charges / uncharges bytes no entry holds yet (a disk write in flight).
  void Reserve(const Hash128& ns, int tier, uint64_t bytes);
  void Release(const Hash128& ns, int tier, uint64_t bytes);

  // Drops `key`'s entry if no local tier holds it and no write is pending.
  void MaybeForget(const ChunkKey& key);
  // Drops `key`'s entry now, releasing its bytes; returns it (gen 0 if there was none).
  StoreEntry Remove(const ChunkKey& key);
  // Drops every entry of `ns`, releasing their bytes; returns them.
  std::vector<std::pair<ChunkKey, StoreEntry>> RemoveNamespace(const Hash128& ns);

  // Where SetBytes reports chunks entering and leaving RAM and disk (null = nowhere).
  void SetEventSink(KvEventSink* sink) { events_ = sink; }

  uint64_t used(int tier) const { return used_[tier]; }
  uint64_t ns_used(const Hash128& ns, int tier) const;
  uint64_t NextTick() { return ++tick_; }
  const Map& entries() const { return entries_; }

 private:
  void Charge(const Hash128& ns, int tier, int64_t delta);

  Map entries_;
  struct NsUsage {
    uint64_t bytes[2] = {0, 0};
  };
  std::unordered_map<Hash128, NsUsage, ChunkKeyHash> ns_usage_;
  uint64_t used_[2] = {0, 0};  // RAM, disk (disk includes reservations)
  uint64_t tick_ = 0, gen_ = 0;
  KvEventSink* events_ = nullptr;
};

}  // namespace cachette::cache
