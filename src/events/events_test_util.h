// KvEvent values for tests, one line each (test-only, header-only): src/events/events_test.cc and
// src/route/route_test.cc build the events they feed a codec, a mirror or an index with these.
#pragma once

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "core/kv_events.h"

namespace cachette::events::test {

// BlockStored of `hashes` (consecutive blocks of one sequence) in `medium`; `parent` is the block
// before the first, std::nullopt for a root (position 0, and every block of a snapshot).
inline KvEvent Stored(KvMedium medium, std::vector<uint64_t> hashes,
                      std::optional<uint64_t> parent, int32_t block_size,
                      std::vector<int32_t> tokens = {}) {
  KvEvent e;
  e.kind = KvEvent::Kind::kStored;
  e.medium = medium;
  e.block_hashes = std::move(hashes);
  e.parent = parent;
  e.block_size = block_size;
  e.token_ids = std::move(tokens);
  return e;
}

inline KvEvent Removed(KvMedium medium, std::vector<uint64_t> hashes) {
  KvEvent e;
  e.kind = KvEvent::Kind::kRemoved;
  e.medium = medium;
  e.block_hashes = std::move(hashes);
  return e;
}

inline KvEvent Cleared() {
  KvEvent e;
  e.kind = KvEvent::Kind::kAllCleared;
  return e;
}

}  // namespace cachette::events::test
