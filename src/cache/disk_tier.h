// The disk tier: one chunk record per file under a directory, crash-safe and recovered at
// start-up. The directory format (FORMAT, LOCK, tmp/, chunks/xx/<key>.ctk), the atomic
// publication protocol and the recovery rules are specified in docs/formats/chunk.md.
//
// Records are verified on every read (both checksums, the key against the file name); a
// corrupt or truncated record is deleted, counted and reported as kCorruption, never served.
// The tier enforces its byte budget only as a safety net; eviction is the store's decision.
//
// Thread-safety: every method is safe to call concurrently. File contents are written and read
// outside the lock; publication (rename) and removal (unlink) happen under it, so the index and
// the set of published files always agree.
#pragma once

#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "cache/ram_tier.h"
#include "cache/record.h"
#include "cache/tier.h"

namespace cachette::cache {

struct DiskTierOptions {
  std::string dir;             // created if absent
  uint64_t budget_bytes = 0;   // 0 = unbounded
  bool sync = true;            // fdatasync each record and fsync its directory (durability)
  // Inspect without owning: no LOCK, no temp-file cleanup, nothing deleted (corrupt records
  // are counted and skipped). Put/Erase/Clear return kInvalidArgument.
  bool read_only = false;
};

// Adaptive loading (store.h) may file a chunk's encoding at level j = 1 .. kMaxChunkLevels
// beside its record, under LevelKey(chunk, j). The record inside is an ordinary chunk record
// whose own key is the chunk's, so the tier takes a record under its own key or under one of
// its level keys, tells which (DiskEntry::level), and refuses any other name.
inline constexpr int kMaxChunkLevels = 8;
// The key of `key`'s encoding at `level` (level 0: `key` itself): XXH3-128 (seed 0x1e7e1) of
// the 24 bytes key.lo, key.hi, level, a key no chunk has. The one definition for every tier
// (docs/formats/chunk.md, docs/formats/redis-record.md).
ChunkKey LevelKey(const ChunkKey& key, int level);

// What the index knows of a published record (from its header).
struct DiskEntry {
  ChunkKey key;            // the name the record is filed under
  ChunkKey chunk;          // the chunk it holds (its header's key): `key` at level 0
  int level = 0;           // 0: the chunk's record; j: its encoding at level j (LevelKey)
  Hash128 ns;
  uint32_t n_tokens = 0;
  uint32_t chunk_index = 0;
  uint32_t codec_id = 0;
  uint64_t bytes = 0;      // file size = record size
  int64_t mtime_ns = 0;    // last modification (write) time
};

// What Open found and did.
struct DiskRecovery {
  uint64_t records = 0;             // published records indexed
  uint64_t temp_files_removed = 0;  // left in tmp/ by a crash
  uint64_t corrupt_removed = 0;     // bad name, header, key or size (counted, not removed if
                                    // read_only)
  uint64_t foreign_files = 0;       // files that are not ours; left alone
};

class DiskTier final : public Tier {
 public:
  // Opens (creating if needed) and recovers `options.dir`. kUnavailable if another process
  // owns it; kInvalidArgument if it holds another FORMAT; kIOError on file system errors.
  static Result<std::unique_ptr<DiskTier>> Open(const DiskTierOptions& options);
  ~DiskTier() override;

  std::string_view name() const override { return "disk"; }
  // Publishes `record` atomically (temp file, fdatasync, rename). The record must be a valid
  // chunk record for `key`, or for a chunk whose level key `key` is (kInvalidArgument
  // otherwise: the tier never publishes what its reader would refuse). kResourceExhausted
  // past the budget; kIOError on write errors.
  Status Put(const ChunkKey& key, std::span<const std::byte> record,
             uint32_t ttl_seconds = 0) override;
  // The verified record; kNotFound, or kCorruption (the file is then deleted and counted).
  // Nothing is allocated from what the file says until it is checked: a file whose size is
  // not the one indexed from its verified header is corruption before any of it is read.
  // Local disk reads are not interruptible: `deadline` is checked before the read only.
  Result<std::vector<std::byte>> Get(const ChunkKey& key, Deadline deadline) override;
  // As Get, reading into a buffer taken from `pool` (null: a new one), so the caller can
  // publish it with pool->Share and have it recycled.
  Result<std::vector<std::byte>> Get(const ChunkKey& key, Deadline deadline, BufferPool* pool);
  // Asks the kernel to start reading the record of `key` into the page cache and returns
  // without waiting (posix_fadvise WILLNEED). A loader that will read chunks in order calls it
  // for the next few, so several reads are in flight while it verifies the current one. A
  // no-op for keys not indexed; best effort (errors are ignored: the later Get reports them).
  void Prefetch(const ChunkKey& key);
  std::vector<bool> ContainsMany(std::span<const ChunkKey> keys, Deadline deadline) override;
  Status Erase(const ChunkKey& key) override;
  TierStats Stats() const override;

  // A snapshot of the index.
  std::vector<DiskEntry> Entries() const;
  const DiskRecovery& recovery() const { return recovery_; }
  const std::string& dir() const { return options_.dir; }
  // Path of the published file for `key` (whether or not it exists).
  std::string PathOf(const ChunkKey& key) const;
  // Reads and fully verifies the record of `key` (as Get, counting and removing corruption).
  Status Verify(const ChunkKey& key);
  // Removes every published record (of namespace `ns` only, if given), levels included.
  Status Clear(const Hash128* ns = nullptr);
  // Tests: called with the size of every record read, after it was read and verified (a
  // simulated slow disk sleeps here). Not synchronized: set it before the tier is shared.
  void SetReadHookForTesting(std::function<void(uint64_t bytes)> hook) {
    read_hook_ = std::move(hook);
  }

 private:
  explicit DiskTier(DiskTierOptions options) : options_(std::move(options)) {}
  Status Recover();
  // Deletes the published file of `key` if it is still the inode `ino` that was found corrupt.
  void RemoveCorrupt(const ChunkKey& key, uint64_t ino);

  const DiskTierOptions options_;
  std::function<void(uint64_t bytes)> read_hook_;
  int lock_fd_ = -1;
  DiskRecovery recovery_;

  mutable std::mutex mu_;
  std::unordered_map<ChunkKey, DiskEntry, ChunkKeyHash> index_;  // GUARDED_BY(mu_)
  uint64_t reserved_bytes_ = 0;  // GUARDED_BY(mu_): being written, not yet published
  uint64_t temp_seq_ = 0;        // GUARDED_BY(mu_)
  TierStats stats_;              // GUARDED_BY(mu_)
};

// Parses 32 lowercase hex digits (Hash128::ToHex) into a key.
bool ParseKeyHex(std::string_view hex, ChunkKey* key);

}  // namespace cachette::cache
