// KV block events: what a server's KV tiers gained and lost, for routers that send each request
// where its cache is (issue 14; wire format in docs/formats/kv-events.md).
//
// A block is a run of `block_size` tokens at a fixed position of one cached token sequence,
// named by the low 64 bits of its chained content key (cache::ComputeChunkKeys): key[i] hashes
// key[i-1], the namespace and the block's tokens, so one block hash names the whole prefix up
// to the block's end, in one namespace (model, KV type, adapter, tenant salt). Blocks of the
// attention cache ("memory") are pages (page_tokens long); blocks of the chunk store's tiers
// ("ram", "disk", "redis") are chunks (chunk_tokens long). Whoever knows a request's tokens and
// namespace computes the same hashes, so a router can count how many leading blocks each server
// holds without asking it.
//
// The producers (RadixIndex, StoreIndex) call a sink under their own locks: a sink queues and
// returns, it never blocks or calls back.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

#include "core/hash.h"

namespace cachette {

enum class KvMedium : uint8_t {
  kMemory = 0,  // the attention cache's pages (radix index)
  kRam = 1,     // the chunk store's RAM tier
  kDisk = 2,    // the chunk store's disk tier
  kRedis = 3,   // the shared Redis tier (every server sharing it can restore these)
};
inline constexpr int kKvMediums = 4;

// "memory", "ram", "disk", "redis".
std::string_view KvMediumName(KvMedium m);

struct KvEvent {
  enum class Kind : uint8_t { kStored, kRemoved, kAllCleared };
  Kind kind = Kind::kStored;
  KvMedium medium = KvMedium::kMemory;
  std::vector<uint64_t> block_hashes;  // consecutive blocks of one sequence for kStored
  // kStored only:
  std::optional<uint64_t> parent;  // the hash of the block before the first; none at position 0
  std::vector<int32_t> token_ids;  // the blocks' tokens, or empty where the producer has none
  int32_t block_size = 0;          // tokens per block
};

// The block hash of a chained content key.
inline uint64_t KvBlockHash(const Hash128& key) { return key.lo; }

class KvEventSink {
 public:
  virtual ~KvEventSink() = default;
  // Takes one event. Called under the producer's locks: must queue and return at once.
  virtual void Emit(KvEvent event) = 0;
};

}  // namespace cachette
