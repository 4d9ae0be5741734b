// The blocks a KV event stream says are stored, per medium: what a publisher answers snapshots
// from, and what a subscriber can rebuild from the batches it applies.
//
// A set of (medium, block hash), each with its block_size. Stored events add (or update the
// block_size of) their blocks, removed events erase theirs, AllBlocksCleared empties every
// medium. Parents and token ids are not kept, so a snapshot names blocks without their chains:
// enough for a router that looks hashes up one by one (route/block_index.h), not for one that
// rebuilds vLLM's tree from parent links (docs/formats/kv-events.md, "Snapshots").
//
// Bounded: at most `max_blocks` blocks; a stored block beyond that is not kept and is counted
// in truncated(). A snapshot then names fewer blocks than the server holds (a router scores it
// lower than it should), never a block the server does not hold.
//
// Not thread-safe: one owner (the publisher's thread), or the caller's lock.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <unordered_map>
#include <vector>

#include "core/kv_events.h"

namespace cachette::events {

inline constexpr size_t kDefaultMirrorMaxBlocks = 4'000'000;

struct KvBlockRef {
  KvMedium medium = KvMedium::kMemory;
  uint64_t hash = 0;
  int32_t block_size = 0;
};

class KvBlockMirror {
 public:
  explicit KvBlockMirror(size_t max_blocks = kDefaultMirrorMaxBlocks) : max_blocks_(max_blocks) {}

  void Apply(const KvEvent& event);
  void Clear();

  // The events that rebuild this mirror from nothing: AllBlocksCleared, then one BlockStored per
  // (medium, block_size) and up to kMaxEventBlocks hashes (kv_event_codec.h), with no parent
  // and no token ids. Order of the hashes within an event is unspecified.
  // WART: one event per distinct block_size, so a mirror of more than kMaxBatchEvents distinct
  // sizes would make a snapshot readers refuse. Producers use one or two sizes per medium.
  std::vector<KvEvent> SnapshotEvents() const;

  bool Contains(KvMedium medium, uint64_t hash) const;
  size_t size() const { return size_; }
  size_t size(KvMedium medium) const { return blocks_[static_cast<size_t>(medium)].size(); }
  // Stored blocks not kept because the mirror was full (cumulative).
  uint64_t truncated() const { return truncated_; }
  // Every block, in no particular order.
  std::vector<KvBlockRef> Blocks() const;

 private:
  const size_t max_blocks_;
  // Per medium: block hash -> block_size.
  std::array<std::unordered_map<uint64_t, int32_t>, kKvMediums> blocks_;
  size_t size_ = 0;
  uint64_t truncated_ = 0;
};

}  // namespace cachette::events
