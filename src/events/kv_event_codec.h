// KV event batches as msgpack, in vLLM's layout (docs/formats/kv-events.md), so cachette can sit
// behind routers that read vLLM's events and cachette's router can read vLLM servers.
//
//   batch  [ts (float64 seconds since the epoch), [event, ...]]  or  [ts, [event, ...], dp_rank]
//   events ["BlockStored", block_hashes, parent_block_hash|nil, token_ids, block_size,
//           lora_id|nil, medium|nil]
//          ["BlockRemoved", block_hashes, medium|nil]
//          ["AllBlocksCleared"]
//
// EncodeBatch writes exactly that. DecodeBatch is strict (every field has one type and a range;
// anything else is an error naming the event and the field) but also reads what vLLM versions
// write: mediums "GPU"/"CPU"/"DISK", a BlockStored without medium (older vLLM) or with a
// trailing lora_name (newer vLLM), a BlockRemoved without medium, negative block hashes (vLLM
// that hashed with Python's hash(): read as their 64-bit two's complement), a float32 ts. lora_id
// and lora_name are checked and dropped: a block hash already covers its adapter.
//
// AllBlocksCleared has no medium on the wire: it clears every medium (vLLM's meaning), whatever
// the KvEvent's `medium` says. A producer that empties one tier emits BlockRemoved for its
// blocks instead.
//
// Both functions are pure: safe to call concurrently.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "cachette/status.h"
#include "core/kv_events.h"

namespace cachette::events {

struct KvEventBatch {
  double ts = 0;  // seconds since the Unix epoch, when the batch was published
  std::vector<KvEvent> events;
  std::optional<int64_t> dp_rank;  // the publisher's data-parallel rank, when it has one
};

// Limits DecodeBatch enforces (EncodeBatch does not: the publisher splits what exceeds them).
inline constexpr size_t kMaxBatchEvents = 1'000'000;
inline constexpr size_t kMaxEventBlocks = 1'000'000;  // block_hashes of one event
inline constexpr int32_t kMaxBlockSize = 1 << 20;     // block_size is 0 (unknown) .. this
// Deepest nesting a batch has is 4 (batch, events, event, block_hashes); a little slack.
inline constexpr int kMaxBatchDepth = 8;

// The medium a wire string names: cachette's "memory", "ram", "disk", "redis" and vLLM's "GPU"
// (memory), "CPU" (ram), "DISK" (disk). nullopt for anything else.
std::optional<KvMedium> ParseKvMedium(std::string_view name);

// The msgpack bytes of `batch`. Writes block_size, token ids and mediums as given; see the
// limits above for what a reader accepts.
std::string EncodeBatch(const KvEventBatch& batch);

// Parses one batch. Every malformed input is kCorruption with a message naming the problem and
// where: "kv event batch: event 3 (BlockStored): block_size is a string, not an integer",
// "kv event batch: 2 trailing bytes after the value (which ends at byte 41)". Never trusts a
// declared length: the bytes are bounds-checked (msgpack_scan.h) before msgpack-c parses them.
// Decoded events carry only what the wire has: kRemoved and kAllCleared events have no parent,
// tokens or block_size, and kAllCleared's medium is kMemory.
Result<KvEventBatch> DecodeBatch(std::string_view payload);

// Whether two events say the same thing on the wire: the fields their kind carries (all of a
// kStored's; a kRemoved's hashes and medium; nothing but the kind of a kAllCleared).
bool SameOnWire(const KvEvent& a, const KvEvent& b);
// Whether two batches encode to the same bytes (ts compared exactly).
bool SameOnWire(const KvEventBatch& a, const KvEventBatch& b);

}  // namespace cachette::events
