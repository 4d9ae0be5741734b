// A storage tier of the KV cache layer: a byte store of chunk records under chunk keys.
//
// Tiers are deliberately dumb (RocksDB SecondaryCache-like): Put/Get/Erase/Contains plus byte
// accounting. Admission, promotion, demotion and eviction policy live in the store above them.
// Records are opaque here (the store encodes and verifies them; see record.h), so a tier
// never needs to understand KV.
//
// Error model: a miss is kNotFound, not a failure. A tier that cannot answer (Redis down, a
// deadline passed, disk error) returns kUnavailable / kDeadlineExceeded / kIOError, and the
// store treats that as a miss plus a counter. No call blocks past its deadline.
// Thread-safety: every method is safe to call concurrently.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "cache/chunk.h"
#include "cachette/status.h"

namespace cachette::cache {

using Clock = std::chrono::steady_clock;
using Deadline = Clock::time_point;
inline Deadline NoDeadline() { return Deadline::max(); }

struct TierStats {
  uint64_t entries = 0;
  uint64_t bytes_used = 0;
  uint64_t bytes_capacity = 0;  // 0 = unbounded / managed elsewhere (e.g. Redis maxmemory)
  uint64_t gets = 0, hits = 0, misses = 0;
  uint64_t puts = 0, bytes_in = 0, bytes_out = 0;
  uint64_t errors = 0;            // I/O errors, timeouts, connection failures
  uint64_t deadline_misses = 0;
  uint64_t corruptions = 0;       // records detected corrupt by the tier itself (disk)
};

class Tier {
 public:
  virtual ~Tier() = default;

  virtual std::string_view name() const = 0;  // "ram", "disk", "redis"

  // Stores `record` under `key`, replacing any previous value. ttl_seconds = 0: no expiry
  // (tiers without expiry ignore it).
  virtual Status Put(const ChunkKey& key, std::span<const std::byte> record,
                     uint32_t ttl_seconds = 0) = 0;

  // The record under `key`: kNotFound on a miss; kDeadlineExceeded if not answered in time.
  virtual Result<std::vector<std::byte>> Get(const ChunkKey& key, Deadline deadline) = 0;

  // Which of `keys` are present (one round trip for remote tiers). On failure to answer, all
  // false (and the error counted).
  virtual std::vector<bool> ContainsMany(std::span<const ChunkKey> keys, Deadline deadline) = 0;

  // Removes `key` if present (OK either way).
  virtual Status Erase(const ChunkKey& key) = 0;

  virtual TierStats Stats() const = 0;

  // ---- Namespaces, for tiers shared between processes (Redis) ----
  // The store knows which keys its own process put in RAM and on disk, but not what other
  // processes wrote to a shared tier, so a shared tier keeps each namespace findable by itself
  // (Redis: the namespace is part of every key). The store reaches its remote tier through the
  // *In forms. Defaults, for tiers keyed by chunk key alone: ignore `ns`; ClearNamespace is
  // kUnimplemented (the store then erases the keys it knows).
  virtual Status PutIn(const Hash128& ns, const ChunkKey& key, std::span<const std::byte> record,
                       uint32_t ttl_seconds) {
    (void)ns;
    return Put(key, record, ttl_seconds);
  }
  virtual Result<std::vector<std::byte>> GetIn(const Hash128& ns, const ChunkKey& key,
                                               Deadline deadline) {
    (void)ns;
    return Get(key, deadline);
  }
  virtual std::vector<bool> ContainsManyIn(const Hash128& ns, std::span<const ChunkKey> keys,
                                           Deadline deadline) {
    (void)ns;
    return ContainsMany(keys, deadline);
  }
  virtual Status EraseIn(const Hash128& ns, const ChunkKey& key) {
    (void)ns;
    return Erase(key);
  }
  // Removes every record of `ns`, whoever wrote it. OK when none exist.
  virtual Status ClearNamespace(const Hash128& ns) {
    (void)ns;
    return Unimplemented("tier " + std::string(name()) + " cannot list a namespace");
  }
};

}  // namespace cachette::cache
