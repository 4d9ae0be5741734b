#include "cache/store.h"

#include <algorithm>
#include <cstring>

#include "core/check.h"
#include "core/timer.h"

#if CACHETTE_HAVE_REDIS
#include "cache/redis/redis_tier.h"
#endif

namespace cachette {

Result<std::unique_ptr<Cache>> Cache::Open(const CacheOptions& options) {
  CT_ASSIGN_OR_RETURN(std::unique_ptr<cache::TieredStore> store,
                      cache::TieredStore::Create(options));
  return std::unique_ptr<Cache>(std::move(store));
}

namespace cache {

using SteadyTime = std::chrono::steady_clock::time_point;

// Shared by a LoadHandle and the load job filling it. States of each chunk:
//   1. pending -> 2. resolved (OK or a miss), by the job or synchronously by Get;
//   1. pending -> 3. timed out (kDeadlineExceeded), by Wait at the deadline; a late result for
//      a timed-out chunk is discarded.
struct TieredStore::LoadState {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<ChunkData> chunks;  // GUARDED_BY(mu)
  std::vector<bool> resolved;     // GUARDED_BY(mu)
  size_t n_resolved = 0;          // GUARDED_BY(mu)
  bool closed = false;            // GUARDED_BY(mu): the deadline passed in Wait
  SteadyTime deadline;
  std::shared_ptr<std::atomic<uint64_t>> deadline_misses;

  // Resolves chunk i (if still pending); after a miss, every later chunk is a miss too.
  void Resolve(size_t i, ChunkData d) {
    std::lock_guard lock(mu);
    if (closed || resolved[i]) return;
    const bool ok = d.status.ok();
    chunks[i] = std::move(d);
    resolved[i] = true;
    ++n_resolved;
    if (!ok) {
      for (size_t j = i + 1; j < chunks.size(); ++j) {
        if (resolved[j]) continue;
        chunks[j].status = NotFound("after a missing chunk");
        resolved[j] = true;
        ++n_resolved;
      }
    }
    if (n_resolved == chunks.size()) cv.notify_all();
  }
};

namespace {

class LoadHandleImpl final : public LoadHandle {
 public:
  LoadHandleImpl(std::shared_ptr<TieredStore::LoadState> st, int chunk_tokens)
      : st_(std::move(st)), chunk_tokens_(chunk_tokens) {}
  bool IsReady() const override {
    std::lock_guard lock(st_->mu);
    return st_->closed || st_->n_resolved == st_->chunks.size();
  }
  void Wait() override {
    std::unique_lock lock(st_->mu);
    if (st_->cv.wait_until(lock, st_->deadline,
                           [&] { return st_->n_resolved == st_->chunks.size(); })) {
      return;
    }
    if (st_->closed) return;
    st_->closed = true;
    for (size_t i = 0; i < st_->chunks.size(); ++i) {
      if (st_->resolved[i]) continue;
      st_->chunks[i].status = DeadlineExceeded("chunk not loaded by the deadline");
      st_->resolved[i] = true;
      ++st_->n_resolved;
      st_->deadline_misses->fetch_add(1, std::memory_order_relaxed);
    }
  }
  size_t size() const override { return st_->chunks.size(); }
  const ChunkData& chunk(size_t i) const override { return st_->chunks.at(i); }
  size_t ready_tokens() const override {
    std::lock_guard lock(st_->mu);
    size_t n = 0;
    while (n < st_->chunks.size() && st_->resolved[n] && st_->chunks[n].status.ok()) ++n;
    return n * static_cast<size_t>(chunk_tokens_);
  }

 private:
  std::shared_ptr<TieredStore::LoadState> st_;
  const int chunk_tokens_;
};

}  // namespace

TieredStore::TieredStore(const CacheOptions& options)
    : options_(options), chunk_tokens_(options.chunk_tokens) {}

Result<std::unique_ptr<TieredStore>> TieredStore::Create(const CacheOptions& options) {
  if (options.chunk_tokens <= 0 || options.chunk_tokens > static_cast<int>(kRecordMaxTokens)) {
    return InvalidArgument("cache: chunk_tokens " + std::to_string(options.chunk_tokens) +
                           " not in 1.." + std::to_string(kRecordMaxTokens));
  }
  std::unique_ptr<TieredStore> s(new TieredStore(options));
  CT_ASSIGN_OR_RETURN(s->policy_, ParsePolicy(options.policy));
  if (options.codec != "raw") {
#if CACHETTE_HAVE_CODECS
    CT_ASSIGN_OR_RETURN(s->codec_, MakeCodec(options.codec));
#else
    return Unimplemented("cache: codec '" + options.codec +
                         "' needs the codecs library, not built yet");
#endif
  }
  if (options.ram_budget_bytes > 0) s->ram_ = std::make_unique<RamTier>(options.ram_budget_bytes);
  if (!options.disk_dir.empty()) {
    DiskTierOptions d;
    d.dir = options.disk_dir;
    d.budget_bytes = options.disk_budget_bytes;
    d.sync = options.disk_sync;
    CT_ASSIGN_OR_RETURN(s->disk_, DiskTier::Open(d));
    // The index of the disk's survivors, oldest write first so LRU ticks follow write order.
    std::vector<DiskEntry> found = s->disk_->Entries();
    std::sort(found.begin(), found.end(),
              [](const DiskEntry& a, const DiskEntry& b) { return a.mtime_ns < b.mtime_ns; });
    std::lock_guard lock(s->mu_);
    for (const DiskEntry& de : found) {
      Entry& e = s->entries_[de.key];
      e.ns = de.ns;
      e.n_tokens = de.n_tokens;
      e.chunk_index = de.chunk_index;
      e.gen = ++s->gen_;
      e.disk_bytes = de.bytes;
      e.insert_tick = e.last_tick = ++s->tick_;
      s->used_[kDisk] += de.bytes;
      s->ns_usage_[de.ns].bytes[kDisk] += de.bytes;
    }
  }
  if (options.remote_tier != nullptr) {
    s->remote_ = options.remote_tier;
  } else if (!options.redis_urls.empty()) {
#if CACHETTE_HAVE_REDIS
    RedisTierOptions r;
    r.urls = options.redis_urls;
    CT_ASSIGN_OR_RETURN(s->remote_owned_, RedisTier::Open(r));
    s->remote_ = s->remote_owned_.get();
#else
    return Unimplemented("cache: Redis URLs given but the Redis tier is not built yet");
#endif
  }
  s->io_ = std::make_unique<ThreadExecutor>("ct-io", 1, std::max<size_t>(options.io_queue_capacity, 1));
  s->load_ = std::make_unique<ThreadExecutor>("ct-load", std::max(options.load_threads, 1), 4096);
  return s;
}

TieredStore::~TieredStore() {
  // Write-behind finishes first (the io executor's destructor drains it too, but loads queued
  // behind it may promote into RAM, so drain both before any member goes).
  if (io_) io_->Drain();
  if (load_) load_->Drain();
}

int64_t TieredStore::NowNanos() const {
  return options_.now_nanos ? options_.now_nanos() : cachette::NowNanos();
}

// ---- Index, pins, quotas, eviction planning (all under mu_) -------------------------------

bool TieredStore::Pinned(const ChunkKey& key) const { return pin_count_.count(key) != 0; }

void TieredStore::ExpirePins() {
  if (pins_.empty()) return;
  const int64_t now = NowNanos();
  for (auto it = pins_.begin(); it != pins_.end();) {
    if (it->second.expiry_ns != 0 && now >= it->second.expiry_ns) {
      for (const ChunkKey& k : it->second.keys) {
        auto c = pin_count_.find(k);
        if (c != pin_count_.end() && --c->second == 0) pin_count_.erase(c);
      }
      it = pins_.erase(it);
    } else {
      ++it;
    }
  }
}

uint64_t TieredStore::QuotaOf(const Hash128& ns, int tier) const {
  for (const NamespaceQuota& q : options_.quotas) {
    if (q.ns == ns) return tier == kRam ? q.ram_bytes : q.disk_bytes;
  }
  return 0;
}

EntryStats TieredStore::StatsOf(const Entry& e, int tier) const {
  EntryStats s;
  s.bytes = tier == kRam ? e.ram_bytes : e.disk_bytes;
  s.n_tokens = e.n_tokens;
  s.chunk_index = e.chunk_index;
  s.hits = e.hits;
  s.insert_tick = e.insert_tick;
  s.last_access_tick = e.last_tick;
  s.main_tick = e.main_tick;
  return s;
}

bool TieredStore::PlanRoom(int tier, const Hash128& ns, uint64_t bytes, const ChunkKey& incoming,
                           std::vector<ChunkKey>* victims) {
  victims->clear();
  const uint64_t budget = tier == kRam ? options_.ram_budget_bytes : options_.disk_budget_bytes;
  if (budget != 0 && bytes > budget) return false;
  ExpirePins();
  // Candidates: unpinned entries present (and not being written) in the tier.
  std::vector<ChunkKey> keys;
  std::vector<EntryStats> stats;
  auto collect = [&](const Hash128* only_ns) {
    keys.clear();
    stats.clear();
    for (const auto& [k, e] : entries_) {
      const uint64_t b = tier == kRam ? e.ram_bytes : e.disk_bytes;
      if (b == 0 || k == incoming || Pinned(k)) continue;
      if (only_ns != nullptr && e.ns != *only_ns) continue;
      if (std::find(victims->begin(), victims->end(), k) != victims->end()) continue;
      keys.push_back(k);
      stats.push_back(StatsOf(e, tier));
    }
  };
  std::vector<size_t> chosen;
  uint64_t freed = 0;
  // Phase 1: the namespace's own quota, from its own entries.
  if (const uint64_t quota = QuotaOf(ns, tier); quota != 0) {
    if (bytes > quota) return false;
    const uint64_t ns_used = ns_usage_[ns].bytes[tier];
    if (ns_used + bytes > quota) {
      collect(&ns);
      if (!SelectVictims(policy_, stats, ns_used + bytes - quota, &chosen)) return false;
      for (size_t i : chosen) {
        victims->push_back(keys[i]);
        freed += stats[i].bytes;
      }
    }
  }
  // Phase 2: the tier's budget, from everyone.
  if (budget != 0 && used_[tier] + bytes > budget + freed) {
    collect(nullptr);
    if (!SelectVictims(policy_, stats, used_[tier] + bytes - budget - freed, &chosen)) {
      victims->clear();
      return false;
    }
    for (size_t i : chosen) victims->push_back(keys[i]);
  }
  return true;
}

void TieredStore::MaybeForget(const ChunkKey& key) {
  auto it = entries_.find(key);
  if (it == entries_.end()) return;
  const Entry& e = it->second;
  if (e.ram_bytes == 0 && e.disk_bytes == 0 && !e.disk_pending) entries_.erase(it);
}

void TieredStore::SubmitWrite(WriteJob job, Entry* e) {
  const bool to_disk = job.to_disk;
  if (!io_->TrySubmit([this, job = std::move(job)] { RunWrite(job); })) {
    ++counters_.puts_dropped;
    return;
  }
  if (to_disk && e != nullptr) e->disk_pending = true;
}

void TieredStore::EvictFromRam(const std::vector<ChunkKey>& victims) {
  for (const ChunkKey& k : victims) {
    auto it = entries_.find(k);
    if (it == entries_.end() || it->second.ram_bytes == 0) continue;
    Entry& e = it->second;
    SharedBytes record = ram_->GetShared(k);
    (void)ram_->Erase(k);
    used_[kRam] -= e.ram_bytes;
    ns_usage_[e.ns].bytes[kRam] -= e.ram_bytes;
    e.ram_bytes = 0;
    ++counters_.tier[kRam].evictions;
    if (policy_ == PolicyKind::kS3Fifo && e.main_tick == 0 && ghost_.insert(k).second) {
      ghost_fifo_.push_back(k);
      if (ghost_fifo_.size() > 4096) {
        ghost_.erase(ghost_fifo_.front());
        ghost_fifo_.pop_front();
      }
    }
    // Demotion: to disk if not there yet, to Redis in on-eviction mode; admission applies.
    if (record != nullptr && e.hits >= options_.admit_after_hits) {
      WriteJob job{k, e.gen, record, false, false};
      job.to_disk = disk_ != nullptr && e.disk_bytes == 0 && !e.disk_pending;
      job.to_remote = remote_ != nullptr && options_.redis_write == RedisWriteMode::kOnEviction &&
                      !e.remote_written;
      if (job.to_disk || job.to_remote) {
        ++counters_.demotions;
        SubmitWrite(std::move(job), &e);
      }
    }
    MaybeForget(k);
  }
}

bool TieredStore::InsertRam(const ChunkKey& key, Entry& e, SharedBytes record) {
  if (ram_ == nullptr) return false;
  std::vector<ChunkKey> victims;
  const uint64_t size = record->size();
  if (!PlanRoom(kRam, e.ns, size, key, &victims)) return false;
  const uint64_t gen = e.gen;
  EvictFromRam(victims);  // may rehash entries_: look `key` up again below
  Entry& live = entries_.at(key);
  CT_CHECK(live.gen == gen) << "the incoming entry was evicted";
  if (!ram_->PutShared(key, std::move(record)).ok()) return false;
  live.ram_bytes = size;
  used_[kRam] += size;
  ns_usage_[live.ns].bytes[kRam] += size;
  return true;
}

void TieredStore::Touch(const ChunkKey& key, Entry& e, const SharedBytes& record) {
  ++e.hits;
  e.last_tick = ++tick_;
  if (e.main_tick == 0) e.main_tick = e.last_tick;
  // Admission after N hits: the chunk has earned its place in the slower tiers.
  if (options_.admit_after_hits > 0 && e.hits == options_.admit_after_hits &&
      record != nullptr) {
    WriteJob job{key, e.gen, record, false, false};
    job.to_disk = disk_ != nullptr && options_.disk_write_through && e.disk_bytes == 0 &&
                  !e.disk_pending;
    job.to_remote = remote_ != nullptr && options_.redis_write == RedisWriteMode::kWriteThrough &&
                    !e.remote_written;
    if (job.to_disk || job.to_remote) SubmitWrite(std::move(job), &e);
  }
}

// ---- Put and write-behind ------------------------------------------------------------------

Status TieredStore::Put(const Hash128& ns, std::span<const TokenId> tokens, size_t first_chunk,
                        const ChunkLayout& layout, std::span<const ByteSpan> chunks) {
  const size_t c = static_cast<size_t>(chunk_tokens_);
  if (layout.n_tokens != c) {
    return InvalidArgument("cache put: layout.n_tokens " + std::to_string(layout.n_tokens) +
                           " != chunk_tokens " + std::to_string(c));
  }
  if (layout.raw_bytes() == 0) return InvalidArgument("cache put: layout has no bytes");
  const size_t end = first_chunk + chunks.size();
  if (tokens.size() < end * c) {
    return InvalidArgument("cache put: " + std::to_string(tokens.size()) +
                           " tokens do not cover chunk " + std::to_string(end - 1));
  }
  for (const ByteSpan& b : chunks) {
    if (b.size() != layout.raw_bytes()) {
      return InvalidArgument("cache put: chunk of " + std::to_string(b.size()) +
                             " bytes, layout needs " + std::to_string(layout.raw_bytes()));
    }
  }
  const std::vector<ChunkKey> keys = ComputeChunkKeys(ns, tokens.first(end * c), chunk_tokens_);
  // Records are built outside the lock (the copy of the KV bytes is the expensive part).
  std::vector<SharedBytes> records;
  records.reserve(chunks.size());
  for (size_t i = 0; i < chunks.size(); ++i) {
    const size_t ci = first_chunk + i;
    RecordMeta m;
    m.ns = ns;
    m.key = keys[ci];
    m.parent = ci == 0 ? ChunkKey{} : keys[ci - 1];
    m.layout = layout;
    m.chunk_index = static_cast<uint32_t>(ci);
    m.raw_bytes = layout.raw_bytes();
    // Into a recycled buffer of the RAM tier's pool: no page faults once RAM is at its budget.
    std::vector<std::byte> rec = ram_ != nullptr
                                     ? ram_->pool().Take(RecordHeaderBytes(c) + chunks[i].size())
                                     : std::vector<std::byte>();
    CT_RETURN_IF_ERROR(EncodeRecordInto(m, tokens.subspan(ci * c, c), chunks[i], rec));
    records.push_back(ram_ != nullptr
                          ? ram_->pool().Share(std::move(rec))
                          : std::make_shared<const std::vector<std::byte>>(std::move(rec)));
  }
  std::lock_guard lock(mu_);
  for (size_t i = 0; i < chunks.size(); ++i) {
    const ChunkKey& key = keys[first_chunk + i];
    auto [it, created] = entries_.try_emplace(key);
    Entry& e = it->second;
    if (!created && e.ram_bytes != 0) {
      e.last_tick = ++tick_;  // already hot: a put of the same content is a no-op
      continue;
    }
    ++counters_.puts;
    if (created) {
      e.ns = ns;
      e.n_tokens = static_cast<uint32_t>(c);
      e.chunk_index = static_cast<uint32_t>(first_chunk + i);
      e.gen = ++gen_;
      e.insert_tick = e.last_tick = ++tick_;
      if (ghost_.erase(key) != 0) e.main_tick = e.insert_tick;  // S3-FIFO: back from the ghost
    }
    const bool in_ram = InsertRam(key, e, records[i]);
    Entry& live = entries_.at(key);
    const bool admitted = options_.admit_after_hits == 0;
    WriteJob job{key, live.gen, records[i], false, false};
    // A chunk RAM could not take goes to disk regardless of write-through (or it is lost).
    job.to_disk = disk_ != nullptr && live.disk_bytes == 0 && !live.disk_pending &&
                  ((options_.disk_write_through && admitted) || !in_ram);
    job.to_remote = remote_ != nullptr && !live.remote_written &&
                    ((options_.redis_write == RedisWriteMode::kWriteThrough && admitted) ||
                     (!in_ram && disk_ == nullptr));
    if (job.to_disk || job.to_remote) SubmitWrite(std::move(job), &live);
    if (!in_ram && !live.disk_pending && live.disk_bytes == 0) ++counters_.puts_rejected;
    MaybeForget(key);
  }
  return Status::Ok();
}

void TieredStore::RunWrite(const WriteJob& job) {
  SharedBytes bytes = job.raw_record;
  if (codec_ != nullptr) {
    // Encode for the slower tiers; our own RAM record needs no payload re-verification.
    auto h = DecodeRecordHeader(*job.raw_record, job.raw_record->size());
    Result<std::vector<std::byte>> enc =
        h.ok() ? codec_->Encode(h->meta.layout,
                                ByteSpan(*job.raw_record).subspan(h->header_bytes))
               : Result<std::vector<std::byte>>(h.status());
    if (enc.ok()) {
      RecordMeta m = h->meta;
      m.codec_id = codec_->id();
      m.codec_version = codec_->version();
      auto rec = EncodeRecord(m, h->tokens, *enc);
      if (rec.ok()) bytes = std::make_shared<const std::vector<std::byte>>(std::move(*rec));
    }
    // On a codec error the raw record is written: slower, never wrong.
  }
  if (job.to_disk) {
    std::vector<ChunkKey> victims;
    bool go = false;
    {
      std::lock_guard lock(mu_);
      auto it = entries_.find(job.key);
      if (it != entries_.end() && it->second.gen == job.gen) {
        Entry& e = it->second;
        if (PlanRoom(kDisk, e.ns, bytes->size(), job.key, &victims)) {
          for (const ChunkKey& v : victims) {
            Entry& ve = entries_.at(v);
            used_[kDisk] -= ve.disk_bytes;
            ns_usage_[ve.ns].bytes[kDisk] -= ve.disk_bytes;
            ve.disk_bytes = 0;
            ++counters_.tier[kDisk].evictions;
            MaybeForget(v);
          }
          used_[kDisk] += bytes->size();  // reserved until published
          ns_usage_[e.ns].bytes[kDisk] += bytes->size();
          go = true;
        } else {
          e.disk_pending = false;
          if (e.ram_bytes == 0) ++counters_.puts_rejected;
          MaybeForget(job.key);
        }
      }
    }
    if (go) {
      for (const ChunkKey& v : victims) (void)disk_->Erase(v);
      const Status s = disk_->Put(job.key, *bytes);
      std::lock_guard lock(mu_);
      auto it = entries_.find(job.key);
      const bool live = it != entries_.end() && it->second.gen == job.gen;
      if (s.ok() && live) {
        it->second.disk_bytes = bytes->size();
        it->second.disk_pending = false;
      } else {
        const Hash128 ns = live ? it->second.ns : DecodeRecordHeader(*bytes, bytes->size())->meta.ns;
        used_[kDisk] -= bytes->size();
        ns_usage_[ns].bytes[kDisk] -= bytes->size();
        if (live) {
          it->second.disk_pending = false;
          MaybeForget(job.key);
        } else if (s.ok()) {
          (void)disk_->Erase(job.key);  // erased or re-created while we wrote: not ours now
        }
      }
    }
  }
  if (job.to_remote) {
    if (remote_->Put(job.key, *bytes, options_.redis_ttl_seconds).ok()) {
      std::lock_guard lock(mu_);
      auto it = entries_.find(job.key);
      if (it != entries_.end() && it->second.gen == job.gen) it->second.remote_written = true;
    }
  }
}

// ---- Lookup and Get ------------------------------------------------------------------------

LookupResult TieredStore::Lookup(std::span<const TokenId> tokens, const Hash128& ns) {
  LookupResult r;
  const std::vector<ChunkKey> keys = ComputeChunkKeys(ns, tokens, chunk_tokens_);
  std::vector<CacheTier> tiers(keys.size(), CacheTier::kNone);
  size_t gap = keys.size();
  {
    std::lock_guard lock(mu_);
    ++counters_.lookups;
    counters_.lookup_tokens += tokens.size();
    for (size_t i = 0; i < keys.size(); ++i) {
      auto it = entries_.find(keys[i]);
      if (it != entries_.end() && it->second.ns == ns) {
        if (it->second.ram_bytes != 0) tiers[i] = CacheTier::kRam;
        else if (it->second.disk_bytes != 0) tiers[i] = CacheTier::kDisk;
      }
      if (tiers[i] == CacheTier::kNone && gap == keys.size()) gap = i;
    }
  }
  if (remote_ != nullptr && gap < keys.size()) {
    // One batched query for every locally absent key from the first gap on.
    std::vector<size_t> idx;
    std::vector<ChunkKey> ask;
    for (size_t i = gap; i < keys.size(); ++i) {
      if (tiers[i] == CacheTier::kNone) {
        idx.push_back(i);
        ask.push_back(keys[i]);
      }
    }
    const std::vector<bool> have = remote_->ContainsMany(
        ask, std::chrono::steady_clock::now() + options_.remote_lookup_timeout);
    for (size_t j = 0; j < idx.size() && j < have.size(); ++j) {
      if (have[j]) tiers[idx[j]] = CacheTier::kRedis;
    }
  }
  while (r.chunk_tiers.size() < tiers.size() && tiers[r.chunk_tiers.size()] != CacheTier::kNone) {
    r.chunk_tiers.push_back(tiers[r.chunk_tiers.size()]);
  }
  r.tokens = r.chunk_tiers.size() * static_cast<size_t>(chunk_tokens_);
  std::lock_guard lock(mu_);
  counters_.lookup_hit_tokens += r.tokens;
  return r;
}

Status TieredStore::Accept(const ChunkRequest& r, SharedBytes record, ChunkData* out,
                           SharedBytes* raw_record, bool trusted) {
  RecordHeader h;
  ByteSpan payload;
  if (trusted) {
    CT_ASSIGN_OR_RETURN(h, DecodeRecordHeader(*record, record->size()));
    payload = ByteSpan(*record).subspan(h.header_bytes, h.payload_bytes);
  } else {
    CT_ASSIGN_OR_RETURN(RecordView v, DecodeRecord(*record));
    h = std::move(v.header);
    payload = v.payload;
  }
  const RecordMeta& m = h.meta;
  if (m.key != r.key || m.ns != r.ns || m.parent != r.parent ||
      m.chunk_index != r.chunk_index || h.tokens != r.tokens) {
    return NotFound("collision: the record under this key is another prefix's");
  }
  out->layout = m.layout;
  if (m.codec_id == 0) {
    out->owner_ = record;
    out->bytes_ = payload;
    *raw_record = std::move(record);
    return Status::Ok();
  }
#if CACHETTE_HAVE_CODECS
  CT_ASSIGN_OR_RETURN(std::unique_ptr<Codec> codec, CodecFor(m.codec_id, m.codec_version));
  RecordMeta raw_meta = m;
  raw_meta.codec_id = 0;
  raw_meta.codec_version = 1;
  // Decode straight into the payload of the RAM record, so promotion costs no extra copy.
  auto raw = std::make_shared<std::vector<std::byte>>();
  std::vector<std::byte> zeros(m.raw_bytes);
  CT_RETURN_IF_ERROR(EncodeRecordInto(raw_meta, h.tokens, zeros, *raw));
  std::span<std::byte> dst(raw->data() + h.header_bytes, m.raw_bytes);
  CT_RETURN_IF_ERROR(codec->Decode(m.layout, payload, dst));
  // Re-seal the payload checksum now that the bytes are real.
  CT_RETURN_IF_ERROR(EncodeRecordInto(raw_meta, h.tokens, ByteSpan(dst.data(), dst.size()),
                                      *raw));
  out->owner_ = raw;
  out->bytes_ = ByteSpan(*raw).subspan(h.header_bytes, m.raw_bytes);
  *raw_record = std::move(raw);
  return Status::Ok();
#else
  return Unimplemented("codec " + std::to_string(m.codec_id) + " not built");
#endif
}

void TieredStore::Promote(const ChunkRequest& r, const SharedBytes& raw_record) {
  if (ram_ == nullptr) return;
  std::lock_guard lock(mu_);
  auto [it, created] = entries_.try_emplace(r.key);
  Entry& e = it->second;
  if (created) {
    e.ns = r.ns;
    e.n_tokens = static_cast<uint32_t>(r.tokens.size());
    e.chunk_index = r.chunk_index;
    e.gen = ++gen_;
    e.insert_tick = ++tick_;
    e.remote_written = true;  // it came from there
  }
  if (e.ram_bytes == 0 && InsertRam(r.key, e, raw_record)) ++counters_.promotions;
  Entry& live = entries_.at(r.key);
  Touch(r.key, live, raw_record);
  MaybeForget(r.key);
}

void TieredStore::RecordLatency(int64_t start_ns) {
  const int64_t us = (cachette::NowNanos() - start_ns) / 1000;
  counters_.load_latency.Add(static_cast<uint64_t>(std::max<int64_t>(us, 0)));
}

ChunkData TieredStore::LoadOne(const ChunkRequest& r, SteadyTime deadline) {
  const int64_t start = cachette::NowNanos();
  ChunkData d;
  const uint64_t tokens = r.tokens.size();
  auto miss = [&](int tier) {
    ++counters_.tier[tier].miss_chunks;
    counters_.tier[tier].miss_tokens += tokens;
  };
  auto hit = [&](int tier) {
    ++counters_.tier[tier].hit_chunks;
    counters_.tier[tier].hit_tokens += tokens;
    RecordLatency(start);
  };
  // 1. RAM: our own bytes, verified against the request but not re-checksummed.
  bool on_disk = false;
  if (ram_ != nullptr) {
    if (SharedBytes rec = ram_->GetShared(r.key)) {
      SharedBytes raw;
      Status s = Accept(r, rec, &d, &raw, /*trusted=*/true);
      std::lock_guard lock(mu_);
      if (s.ok()) {
        d.tier = CacheTier::kRam;
        d.status = Status::Ok();
        if (auto it = entries_.find(r.key); it != entries_.end()) Touch(r.key, it->second, rec);
        hit(kRam);
        return d;
      }
      ++counters_.collisions;
      miss(kRam);
      d.status = NotFound(s.message());
      return d;  // the slower tiers hold the same key's record
    }
    std::lock_guard lock(mu_);
    miss(kRam);
  }
  {
    std::lock_guard lock(mu_);
    auto it = entries_.find(r.key);
    on_disk = it != entries_.end() && it->second.disk_bytes != 0;
  }
  // 2. Disk, then 3. Redis: full verification, then promotion to RAM.
  for (int tier : {kDisk, kRemote}) {
    Tier* t = tier == kDisk ? static_cast<Tier*>(disk_.get()) : remote_;
    if (t == nullptr) continue;
    if (tier == kDisk && !on_disk) {
      std::lock_guard lock(mu_);
      miss(kDisk);
      continue;
    }
    BufferPool* pool = ram_ != nullptr ? &ram_->pool() : nullptr;
    auto got = tier == kDisk ? disk_->Get(r.key, deadline, pool) : t->Get(r.key, deadline);
    if (!got.ok()) {
      std::lock_guard lock(mu_);
      miss(tier);
      const StatusCode code = got.status().code();
      if (code == StatusCode::kDeadlineExceeded) {
        deadline_misses_->fetch_add(1, std::memory_order_relaxed);
        d.status = got.status();
        return d;
      }
      // kCorruption is counted by the tier that found it; a miss is not an error.
      if (code != StatusCode::kNotFound && code != StatusCode::kCorruption) {
        ++counters_.tier[tier].errors;
      }
      if (tier == kDisk) {
        // Gone or corrupt (the tier deleted and counted it): forget the disk copy.
        auto it = entries_.find(r.key);
        if (it != entries_.end() && it->second.disk_bytes != 0) {
          used_[kDisk] -= it->second.disk_bytes;
          ns_usage_[it->second.ns].bytes[kDisk] -= it->second.disk_bytes;
          it->second.disk_bytes = 0;
          MaybeForget(r.key);
        }
      }
      continue;
    }
    SharedBytes rec = pool != nullptr
                          ? pool->Share(std::move(*got))
                          : std::make_shared<const std::vector<std::byte>>(std::move(*got));
    SharedBytes raw;
    // The disk tier verified both checksums of these very bytes (DiskTier::Get), so only the
    // header is decoded again here; a second pass of XXH3 over the payload cost ~20% of a cold
    // load. Remote records are verified here in full.
    Status s = Accept(r, rec, &d, &raw, /*trusted=*/tier == kDisk);
    if (!s.ok()) {
      std::lock_guard lock(mu_);
      miss(tier);
      if (s.code() == StatusCode::kNotFound) {
        ++counters_.collisions;
      } else if (s.code() == StatusCode::kCorruption && tier == kRemote) {
        ++counters_.tier[kRemote].corruptions;
      } else {
        ++counters_.tier[tier].errors;
      }
      if (tier == kRemote && s.code() == StatusCode::kCorruption) (void)remote_->Erase(r.key);
      d = ChunkData();
      continue;
    }
    d.tier = tier == kDisk ? CacheTier::kDisk : CacheTier::kRedis;
    d.status = Status::Ok();
    Promote(r, raw);
    std::lock_guard lock(mu_);
    hit(tier);
    return d;
  }
  d.status = NotFound("no tier holds the chunk");
  return d;
}

std::unique_ptr<LoadHandle> TieredStore::Get(const Hash128& ns, std::span<const TokenId> tokens,
                                             size_t first_chunk, size_t n_chunks,
                                             SteadyTime deadline) {
  auto st = std::make_shared<LoadState>();
  st->chunks.resize(n_chunks);
  st->resolved.assign(n_chunks, false);
  st->deadline = deadline;
  st->deadline_misses = deadline_misses_;
  auto handle = std::make_unique<LoadHandleImpl>(st, chunk_tokens_);
  const size_t c = static_cast<size_t>(chunk_tokens_);
  const size_t end = first_chunk + n_chunks;
  if (n_chunks == 0) return handle;
  if (tokens.size() < end * c) {
    st->Resolve(0, ChunkData{InvalidArgument("cache get: tokens do not cover the chunks"),
                             CacheTier::kNone, {}, nullptr, {}});
    return handle;
  }
  const std::vector<ChunkKey> keys = ComputeChunkKeys(ns, tokens.first(end * c), chunk_tokens_);
  std::vector<ChunkRequest> reqs(n_chunks);
  for (size_t i = 0; i < n_chunks; ++i) {
    const size_t ci = first_chunk + i;
    reqs[i].ns = ns;
    reqs[i].key = keys[ci];
    reqs[i].parent = ci == 0 ? ChunkKey{} : keys[ci - 1];
    reqs[i].chunk_index = static_cast<uint32_t>(ci);
    reqs[i].tokens.assign(tokens.begin() + ci * c, tokens.begin() + (ci + 1) * c);
  }
  // RAM hits resolve here, in order, without a thread hop; the rest go to the load executor.
  size_t i = 0;
  for (; i < n_chunks && ram_ != nullptr; ++i) {
    bool in_ram = false;
    {
      std::lock_guard lock(mu_);
      auto it = entries_.find(reqs[i].key);
      in_ram = it != entries_.end() && it->second.ram_bytes != 0;
    }
    if (!in_ram) break;
    ChunkData d = LoadOne(reqs[i], deadline);
    const bool ok = d.status.ok();
    st->Resolve(i, std::move(d));
    if (!ok) return handle;
  }
  if (i == n_chunks) return handle;
  const size_t first = i;
  if (!load_->TrySubmit([this, st, reqs = std::move(reqs), first]() mutable {
        RunLoad(st, std::move(reqs), first);
      })) {
    st->Resolve(first, ChunkData{Unavailable("load queue full"), CacheTier::kNone, {}, nullptr, {}});
  }
  return handle;
}

void TieredStore::RunLoad(const std::shared_ptr<LoadState>& st, std::vector<ChunkRequest> reqs,
                          size_t first) {
  // Read-ahead across files: chunks are still read, verified and resolved one at a time in
  // prefix order (so the first miss stops the load), but the next kReadAheadChunks disk-only
  // chunks are already being read by the kernel (WILLNEED), so the disk has several requests
  // in flight instead of one 3 MiB file at a time. A miss wastes at most the window.
  size_t prefetched = first;  // chunks [first, prefetched) have been considered
  auto prefetch_up_to = [&](size_t end) {
    end = std::min(end, reqs.size());
    for (; prefetched < end; ++prefetched) {
      const ChunkKey& key = reqs[prefetched].key;
      bool disk_only = false;
      {
        std::lock_guard lock(mu_);
        auto it = entries_.find(key);
        disk_only = it != entries_.end() && it->second.ram_bytes == 0 &&
                    it->second.disk_bytes != 0;
      }
      if (disk_only) disk_->Prefetch(key);
    }
  };
  for (size_t i = first; i < reqs.size(); ++i) {
    {
      std::lock_guard lock(st->mu);
      if (st->closed) return;  // the waiter gave up
    }
    if (std::chrono::steady_clock::now() > st->deadline) return;  // Wait marks the rest
    if (disk_ != nullptr) prefetch_up_to(i + 1 + kReadAheadChunks);
    ChunkData d = LoadOne(reqs[i], st->deadline);
    const bool ok = d.status.ok();
    st->Resolve(i, std::move(d));
    if (!ok) return;
  }
}

// ---- Pins, erase, clear, flush, stats --------------------------------------------------------

Result<Cache::PinId> TieredStore::Pin(std::span<const TokenId> tokens, const Hash128& ns,
                                      std::chrono::milliseconds ttl) {
  if (ttl.count() < 0) return InvalidArgument("cache pin: negative ttl");
  PinInfo p;
  p.keys = ComputeChunkKeys(ns, tokens, chunk_tokens_);
  if (p.keys.empty()) return InvalidArgument("cache pin: fewer tokens than one chunk");
  p.expiry_ns = ttl.count() == 0 ? 0 : NowNanos() + ttl.count() * 1000000;
  std::lock_guard lock(mu_);
  for (const ChunkKey& k : p.keys) ++pin_count_[k];
  const PinId id = next_pin_++;
  pins_.emplace(id, std::move(p));
  return id;
}

Status TieredStore::Unpin(PinId pin) {
  std::lock_guard lock(mu_);
  ExpirePins();
  auto it = pins_.find(pin);
  if (it == pins_.end()) return NotFound("cache unpin: no pin " + std::to_string(pin));
  for (const ChunkKey& k : it->second.keys) {
    auto c = pin_count_.find(k);
    if (c != pin_count_.end() && --c->second == 0) pin_count_.erase(c);
  }
  pins_.erase(it);
  return Status::Ok();
}

Status TieredStore::Erase(std::span<const TokenId> tokens, const Hash128& ns) {
  const std::vector<ChunkKey> keys = ComputeChunkKeys(ns, tokens, chunk_tokens_);
  Status result;
  {
    std::lock_guard lock(mu_);
    for (const ChunkKey& k : keys) {
      auto it = entries_.find(k);
      if (it == entries_.end()) continue;
      Entry& e = it->second;
      if (e.ram_bytes != 0) {
        (void)ram_->Erase(k);
        used_[kRam] -= e.ram_bytes;
        ns_usage_[e.ns].bytes[kRam] -= e.ram_bytes;
      }
      if (e.disk_bytes != 0) {
        Status s = disk_->Erase(k);
        if (!s.ok()) result = s;
        used_[kDisk] -= e.disk_bytes;
        ns_usage_[e.ns].bytes[kDisk] -= e.disk_bytes;
      }
      entries_.erase(it);  // a pending write finds its generation gone and removes its file
    }
  }
  if (remote_ != nullptr) {
    for (const ChunkKey& k : keys) (void)remote_->Erase(k);
  }
  return result;
}

Status TieredStore::Clear(const Hash128& ns) {
  std::vector<ChunkKey> disk_keys, remote_keys;
  {
    std::lock_guard lock(mu_);
    for (auto it = entries_.begin(); it != entries_.end();) {
      Entry& e = it->second;
      if (e.ns != ns) {
        ++it;
        continue;
      }
      if (e.ram_bytes != 0) {
        (void)ram_->Erase(it->first);
        used_[kRam] -= e.ram_bytes;
        ns_usage_[ns].bytes[kRam] -= e.ram_bytes;
      }
      if (e.disk_bytes != 0) {
        disk_keys.push_back(it->first);
        used_[kDisk] -= e.disk_bytes;
        ns_usage_[ns].bytes[kDisk] -= e.disk_bytes;
      }
      if (e.remote_written) remote_keys.push_back(it->first);
      // A pending write of `ns` finds its generation gone, releases its reservation and
      // removes the file it wrote.
      it = entries_.erase(it);
    }
  }
  Status result;
  for (const ChunkKey& k : disk_keys) {
    Status s = disk_->Erase(k);
    if (!s.ok()) result = s;
  }
  if (remote_ != nullptr) {
    for (const ChunkKey& k : remote_keys) (void)remote_->Erase(k);
  }
  return result;
}

Status TieredStore::Flush() {
  io_->Drain();
  return Status::Ok();
}

CacheStats TieredStore::Stats() const {
  CacheStats s;
  {
    std::lock_guard lock(mu_);
    s = counters_;
    s.pins_active = pins_.size();
    const int64_t now = NowNanos();
    for (const auto& [id, p] : pins_) {
      if (p.expiry_ns != 0 && now >= p.expiry_ns) --s.pins_active;
    }
  }
  s.deadline_misses = deadline_misses_->load(std::memory_order_relaxed);
  s.io_queue_depth = io_->queued();
  const Tier* tiers[kCacheTierCount] = {ram_.get(), disk_.get(), remote_};
  for (int t = 0; t < kCacheTierCount; ++t) {
    if (tiers[t] == nullptr) continue;
    const TierStats ts = tiers[t]->Stats();
    CacheTierMetrics& m = s.tier[t];
    m.enabled = true;
    m.bytes_in = ts.bytes_in;
    m.bytes_out = ts.bytes_out;
    m.entries = ts.entries;
    m.bytes_used = ts.bytes_used;
    m.bytes_budget = t == kRam ? options_.ram_budget_bytes
                     : t == kDisk ? options_.disk_budget_bytes : ts.bytes_capacity;
    m.corruptions += ts.corruptions;
    m.errors += ts.errors;
    s.corruptions += m.corruptions;
  }
  return s;
}

}  // namespace cache
}  // namespace cachette
