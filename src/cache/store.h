// TieredStore: the implementation of cachette::Cache (include/cachette/cache.h).
//
// Shape. The store owns a RAM tier and a disk tier and borrows or owns a remote (Redis) tier.
// Tiers are dumb byte stores; the store holds the one index of what the local tiers contain
// (StoreIndex, store_index.h, with all byte accounting), the policy statistics, pins and
// quotas, and decides every eviction, promotion and demotion. Budgets are kept by planning
// first (SelectVictims over the unpinned entries of a tier), evicting, then inserting, so a
// tier's used bytes never exceed its budget.
//
// The class is spread over files by concern:
//   store.cc            Open, Put, pins, Erase, Clear, Flush, Stats
//   store_placement.cc  where chunks go: WriteTargetsFor (the one decision of which slower
//                       tiers a write goes to), room planning and eviction, demotion,
//                       admission, and the write-behind job (RunWrite)
//   store_load.cc       Lookup and Get: the load path (RunLoad, LoadOne, Accept, Promote)
//   store_index.{h,cc}  entries and byte accounting
//
// Life of an entry (one per chunk key held by a local tier or being written to disk):
//   1. created by Put (RAM insert, optional write-behind job) or by a promotion from Redis;
//   2. in RAM and/or on disk; `disk_pending` while the io executor writes it;
//   3. RAM eviction -> demoted (disk/Redis job) or dropped; disk eviction -> file removed;
//   4. erased from the index once in no local tier and not pending. A write job that finds
//      its entry gone or re-created (generation mismatch) removes the file it wrote.
//
// Adaptive loading (options disk_levels, remote_levels): a slower tier may also hold a chunk's
// encodings at levels 1.., each an ordinary record filed under LevelKey(key, level)
// (disk_tier.h). They follow their chunk: written by the same job after its record, charged to
// its entry (an entry's disk bytes are its record's plus its level files'), and removed with it
// (EraseFromDisk: Erase, Clear, eviction, a corrupt read). They are never index entries of their
// own. Before a read from such a tier, PickLevel chooses the encoding from that tier's averages
// (TierLevels); a chunk read at a level other than 0 serves that load only, never promoted,
// as does every chunk of a Get that asks for no promotion.
//
// Namespaces in Redis: the remote tier is reached through Tier's *In methods, so a shared
// tier (Redis) files every chunk under its namespace and Clear(ns) removes the namespace's
// chunks whoever wrote them (Tier::ClearNamespace).
//
// Threads: callers; `io` (one thread: all disk and Redis writes, so disk eviction planning is
// serialized); `load` (disk and Redis reads). Lock order: mu_ -> tier locks -> executor locks.
// No file I/O is done under mu_ except unlinks on Erase, on stale write jobs and of a disk
// record found gone or corrupt on a read (with its level files). The store's own jobs
// (RunWrite, RunLoad) catch every exception at their boundary: a failure there (std::bad_alloc
// included) is a failed chunk and a counted error, never the end of a thread.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <unordered_set>

#include "cache/codecs/codec.h"
#include "cache/disk_tier.h"
#include "cache/executor.h"
#include "cache/policy.h"
#include "cache/ram_tier.h"
#include "cache/store_index.h"
#include "cachette/cache.h"

namespace cachette::cache {

class TieredStore final : public Cache {
 public:
  static Result<std::unique_ptr<TieredStore>> Create(const CacheOptions& options);
  ~TieredStore() override;

  int chunk_tokens() const override { return chunk_tokens_; }
  LookupResult Lookup(std::span<const TokenId> tokens, const Hash128& ns) override;
  std::unique_ptr<LoadHandle> Get(const Hash128& ns, std::span<const TokenId> tokens,
                                  size_t first_chunk, size_t n_chunks,
                                  std::chrono::steady_clock::time_point deadline,
                                  bool promote = true) override;
  Status Put(const Hash128& ns, std::span<const TokenId> tokens, size_t first_chunk,
             const ChunkLayout& layout, std::span<const ByteSpan> chunks,
             std::span<const ByteSpan> aux = {}, bool slower_tiers_only = false) override;
  Result<PinId> Pin(std::span<const TokenId> tokens, const Hash128& ns,
                    std::chrono::milliseconds ttl) override;
  Status Unpin(PinId pin) override;
  Status Erase(std::span<const TokenId> tokens, const Hash128& ns) override;
  Status Clear(const Hash128& ns) override;
  Status Flush() override;
  CacheStats Stats() const override;

  // For tests and tools.
  RamTier* ram_tier() { return ram_.get(); }
  DiskTier* disk_tier() { return disk_.get(); }

  struct LoadState;  // shared by a LoadHandle and its load job

 private:
  static constexpr int kRam = kStoreRam, kDisk = kStoreDisk, kRemote = 2;
  // Disk chunks a load asks the kernel to read ahead of the one it verifies (RunLoad). 8 x 3 MiB
  // keeps a virtio disk busy; more only fills the page cache sooner. See docs/benchmarks.md.
  static constexpr size_t kReadAheadChunks = 8;
  // The largest raw chunk a load accepts from a tier (a 256-token chunk of a 70B-class model
  // with an 8-head GQA cache in F16 is about 84 MiB).
  static constexpr uint64_t kMaxChunkRawBytes = uint64_t{1} << 30;

  using Entry = StoreEntry;
  // Why a chunk is being written to the slower tiers (WriteTargetsFor).
  enum class WriteCause {
    kPut,          // a Put that RAM took
    kPutRamFull,   // a Put that RAM could not take: a slower tier must, or it is lost
    kAdmitted,     // reached admit_after_hits
    kDemoted,      // evicted from RAM
  };
  struct WriteTargets {
    bool disk = false;
    bool remote = false;
    bool any() const { return disk || remote; }
  };
  struct WriteJob {
    Hash128 ns;
    ChunkKey key;
    uint64_t gen = 0;
    SharedBytes raw_record;  // the RAM form (codec raw)
    WriteTargets to;
    uint64_t erase_seq = 0;  // erase_seq_ when it was queued (ErasedSince)
  };
  // One chunk to load, with what verifies it.
  struct ChunkRequest {
    Hash128 ns;
    ChunkKey key, parent;
    uint32_t chunk_index = 0;
    std::vector<TokenId> tokens;
    size_t remaining = 1;  // chunks of its load from this one on (the adaptive controller's)
    bool promote = true;   // a disk or Redis hit is copied to RAM (Get's `promote`)
    uint64_t erase_seq = 0;  // erase_seq_ when the load was queued (Promote, ErasedSince)
  };

  explicit TieredStore(const CacheOptions& options);
  int64_t NowNanos() const;

  // All REQUIRES(mu_).
  bool Pinned(const ChunkKey& key) const;
  void ExpirePins();
  uint64_t QuotaOf(const Hash128& ns, int tier) const;
  WriteTargets WriteTargetsFor(const Entry& e, WriteCause cause) const;
  bool PlanRoom(int tier, const Hash128& ns, uint64_t bytes, const ChunkKey& incoming,
                std::vector<ChunkKey>* victims);
  void EvictFromRam(const std::vector<ChunkKey>& victims);
  bool InsertRam(const ChunkKey& key, Entry& e, SharedBytes record);
  void Touch(const ChunkKey& key, Entry& e, const SharedBytes& record);
  // Queues a write of `record` to `cause`'s targets, if any (counted as dropped when full).
  void SubmitWrite(const ChunkKey& key, Entry& e, const SharedBytes& record, WriteCause cause);

  void RunWrite(const WriteJob& job);  // on the io executor; never throws
  // Whether an Erase or Clear took chunk `key` of `ns` after erase sequence number `seq`, when
  // a job (write or load) touching it was queued. A write's remote copy is then not made, or
  // erased again once made: a write queued before a tenant's clear and landing in Redis after
  // it would bring the cleared KV back for every server (the disk copy has the entry's
  // generation for this). A load's chunk is then not promoted to RAM. REQUIRES(mu_).
  bool ErasedSince(const Hash128& ns, const ChunkKey& key, uint64_t seq) const;
  // Notes an Erase of `key` or a Clear of `ns` for the jobs in flight. REQUIRES(mu_).
  void NoteErased(const ChunkKey* key, const Hash128* ns);
  // Ends a job counted in jobs_in_flight_; the erasure notes go with the last one. Takes mu_.
  void EndJob();
  // Removes `key` and its level keys (LevelKey) from the remote tier.
  void EraseFromRemote(const Hash128& ns, const ChunkKey& key);
  SharedBytes EncodeForSlowTiers(const SharedBytes& raw_record);
  void WriteToDisk(const WriteJob& job, const SharedBytes& bytes);
  void RunLoad(const std::shared_ptr<LoadState>& st, std::vector<ChunkRequest> reqs,
               size_t first);       // on the load executor; never throws
  ChunkData LoadOne(const ChunkRequest& r, std::chrono::steady_clock::time_point deadline);
  // LoadOne, with an exception turned into a failed chunk and a counted error. Used by RunLoad
  // and by Get's synchronous RAM path, so no exception leaves the store.
  ChunkData LoadOneNoThrow(const ChunkRequest& r,
                           std::chrono::steady_clock::time_point deadline);
  // One slower tier's attempt at `r` (part of LoadOne): OK with `d` filled, or why not.
  Status LoadFrom(int tier, const ChunkRequest& r,
                  std::chrono::steady_clock::time_point deadline, ChunkData* d);
  // Verifies `record` against the request and produces the raw chunk; sets `raw_record` to the
  // RAM form for promotion. kNotFound (collision) or kCorruption/kUnimplemented.
  Status Accept(const ChunkRequest& r, SharedBytes record, ChunkData* out,
                SharedBytes* raw_record, bool trusted);
  void Promote(const ChunkRequest& r, const SharedBytes& raw_record);
  void RecordLatency(int64_t start_ns);
  // Adaptive loading: folds `x` into the moving average `mean` (0 = none yet) as
  // keep * mean + weight * x. REQUIRES(mu_) for the store's averages.
  static void Average(double& mean, double x, double keep, double weight) {
    mean = mean == 0 ? x : keep * mean + weight * x;
  }
  // Adaptive loading on `tier` (kDisk or kRemote): the level whose transfer of `r.remaining`
  // chunks fits before `deadline` at the tier's measured bandwidth (0 while nothing is
  // measured), or -1 when none does.
  int PickLevel(int tier, const ChunkRequest& r, std::chrono::steady_clock::time_point deadline);
  // Folds a read of `bytes` at `level` from `tier`, started at `start_ns`, into its averages.
  void MeasureRead(int tier, int level, uint64_t bytes, int64_t start_ns);
  // The records of `raw_record`'s encodings at `tier`'s levels 1.. (element j-1: level j);
  // null for a level whose codec refused the chunk (loads fall back to level 0 there).
  std::vector<SharedBytes> EncodeLevels(int tier, const SharedBytes& raw_record);
  // Writes `raw_record`'s encodings at levels 1.. to the remote tier (io thread).
  void WriteRemoteLevels(const WriteJob& job);
  // Removes `key`'s disk file and its level files (LevelKey); the first error, if any. Takes
  // no store lock: Erase and a corrupt read call it under mu_ to keep index and files in step.
  Status EraseFromDisk(const ChunkKey& key);
  // Reports `keys` stored in or removed from Redis by this process (no-op without a sink).
  void EmitRemote(KvEvent::Kind kind, const std::vector<ChunkKey>& keys);

  const CacheOptions options_;
  const int chunk_tokens_;
  PolicyKind policy_ = PolicyKind::kLru;
  std::unique_ptr<Codec> codec_;  // null = raw
  // Adaptive loading state of one slower tier: the codecs of its levels 1.. (level 0 is
  // codec_; none = off) and the estimates the controller picks from, each a moving average.
  struct TierLevels {
    std::vector<std::unique_ptr<Codec>> codecs;  // options_.disk_levels / remote_levels
    std::vector<double> bytes;  // GUARDED_BY(mu_): mean record bytes per level (0 = none seen)
    double bytes_per_s = 0;     // GUARDED_BY(mu_): read bandwidth (0 = not measured yet)
    bool on() const { return !codecs.empty(); }
  };
  TierLevels levels_[kCacheTierCount];  // by tier; kRam's is always off
  std::unique_ptr<RamTier> ram_;
  std::unique_ptr<DiskTier> disk_;
  std::unique_ptr<Tier> remote_owned_;
  Tier* remote_ = nullptr;

  mutable std::mutex mu_;
  StoreIndex index_;                                             // GUARDED_BY(mu_)
  struct PinInfo {
    std::vector<ChunkKey> keys;
    int64_t expiry_ns = 0;  // 0 = none
  };
  std::map<PinId, PinInfo> pins_;                                // GUARDED_BY(mu_)
  std::unordered_map<ChunkKey, int, ChunkKeyHash> pin_count_;    // GUARDED_BY(mu_)
  PinId next_pin_ = 1;                                           // GUARDED_BY(mu_)
  std::deque<ChunkKey> ghost_fifo_;                              // GUARDED_BY(mu_)
  std::unordered_set<ChunkKey, ChunkKeyHash> ghost_;             // GUARDED_BY(mu_)
  CacheStats counters_;                                          // GUARDED_BY(mu_)
  // Erasures the jobs in flight must see (ErasedSince): each Erase and Clear takes the next
  // erase_seq_ and, while writes or loads are queued or running, is noted by key or namespace;
  // the notes go when the last job in flight ends, so they stay few.
  uint64_t erase_seq_ = 0;                                       // GUARDED_BY(mu_)
  uint64_t jobs_in_flight_ = 0;                                  // GUARDED_BY(mu_)
  std::unordered_map<ChunkKey, uint64_t, ChunkKeyHash> key_erased_at_;  // GUARDED_BY(mu_)
  std::unordered_map<Hash128, uint64_t, ChunkKeyHash> ns_cleared_at_;   // GUARDED_BY(mu_)
  std::shared_ptr<std::atomic<uint64_t>> deadline_misses_ =
      std::make_shared<std::atomic<uint64_t>>(0);

  // Declared last: destroyed first, so queued jobs run while every member above is alive.
  std::unique_ptr<ThreadExecutor> io_;
  std::unique_ptr<ThreadExecutor> load_;
};

}  // namespace cachette::cache
