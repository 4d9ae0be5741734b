// Eviction policies as priority functions over per-entry statistics (SGLang's shape): the
// entry with the lowest priority is evicted first. A policy never sees pinned entries; the
// store filters them out before asking (pins are not a policy, they are a constraint).
//
// Ticks are a logical clock (one per store operation), so orderings are deterministic.
//
//   LRU (default)  evict the least recently used.
//     Benefits: simple, good for chat turns and agents (recency is reuse). Costs: one scan of
//     a large document flushes everything.
//   LFU            evict the least frequently hit; ties by recency.
//     Benefits: keeps shared system prompts. Costs: old popular entries linger (no aging).
//   S3-FIFO        a small FIFO for new entries, a main FIFO for entries hit at least once (or
//                  re-inserted while remembered in the ghost set); small drains first.
//     Benefits: one-hit wonders (most chunks of one-off prompts) leave quickly without
//     disturbing the working set. Costs: a re-hit entry stays in main in FIFO order, so a
//     burst of promotions can push out an older hot entry.
//   cost           evict the lowest (prefill compute saved x (1 + hits)) / bytes; ties LRU.
//     Benefits: keeps chunks deep in long prompts (attention makes them dearest to recompute)
//     and compressed chunks (more compute saved per byte). Costs: no aging.
//     WART: the compute model is relative (token-equivalents, below), not measured FLOPs.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "cachette/status.h"

namespace cachette::cache {

enum class PolicyKind : uint8_t { kLru = 0, kLfu = 1, kS3Fifo = 2, kCost = 3 };

std::string_view PolicyName(PolicyKind p);
// "lru", "lfu", "s3fifo", "cost"; kInvalidArgument otherwise.
Result<PolicyKind> ParsePolicy(std::string_view name);

// What a policy may look at.
struct EntryStats {
  uint64_t bytes = 0;             // in the tier being evicted from
  uint32_t n_tokens = 0;
  uint32_t chunk_index = 0;       // position of the chunk in its sequence
  uint64_t hits = 0;              // since insertion
  uint64_t insert_tick = 0;
  uint64_t last_access_tick = 0;  // insert or hit
  uint64_t main_tick = 0;         // S3-FIFO: when it entered the main queue; 0 = in small
};

// Lexicographic: klass first, then value. Lower = evicted first.
struct Priority {
  int64_t klass = 0;
  double value = 0;
  bool operator<(const Priority& o) const {
    return klass != o.klass ? klass < o.klass : value < o.value;
  }
};

// Prefill compute the chunk saves, in token-equivalents: each token costs its projections and
// MLP (kTokenCost) plus attention over every earlier position.
inline constexpr double kTokenCost = 2048;
double PrefillCostSaved(const EntryStats& e);

Priority EvictionPriority(PolicyKind policy, const EntryStats& e);

// Plan, then apply: the indices into `candidates` to evict, in eviction order, so that at least
// `bytes_to_free` bytes are freed. Returns false (and no victims) if even evicting every
// candidate would not free enough.
bool SelectVictims(PolicyKind policy, std::span<const EntryStats> candidates,
                   uint64_t bytes_to_free, std::vector<size_t>* victims);

}  // namespace cachette::cache
