// TieredStore, part 3 of 3: the load path. Lookup (which tiers hold a prefix), Get (RAM hits
// at once, the rest on the load executor: RunLoad, LoadOne), verification (Accept) and
// promotion to RAM (Promote). See store.h.
#include <algorithm>
#include <cstring>
#include <exception>

#include "cache/store.h"
#include "core/check.h"
#include "core/timer.h"

namespace cachette::cache {

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
  size_t resolved_chunks() const override {
    std::lock_guard lock(st_->mu);
    size_t n = 0;
    while (n < st_->chunks.size() && st_->resolved[n]) ++n;
    return n;
  }

 private:
  std::shared_ptr<TieredStore::LoadState> st_;
  const int chunk_tokens_;
};

}  // namespace

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
      const Entry* e = index_.Find(keys[i]);
      if (e != nullptr && e->ns == ns) {
        if (e->ram_bytes() != 0) tiers[i] = CacheTier::kRam;
        else if (e->disk_bytes() != 0) tiers[i] = CacheTier::kDisk;
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
    const std::vector<bool> have = remote_->ContainsManyIn(
        ns, ask, std::chrono::steady_clock::now() + options_.remote_lookup_timeout);
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
  out->aux = m.aux;
  if (m.codec_id == 0) {
    out->owner_ = record;
    out->bytes_ = payload;
    *raw_record = std::move(record);
    return Status::Ok();
  }
  CT_ASSIGN_OR_RETURN(std::unique_ptr<Codec> codec, CodecFor(m.codec_id, m.codec_version));
  // The record's own claims bound what is allocated below, so check them against what this
  // store writes (its chunk size, a sane chunk size) and let the codec check the payload's
  // headers, before anything is allocated.
  if (m.layout.n_tokens != static_cast<uint32_t>(chunk_tokens_) ||
      m.raw_bytes > kMaxChunkRawBytes) {
    return Corruption("record claims a chunk of " + std::to_string(m.layout.n_tokens) +
                      " tokens and " + std::to_string(m.raw_bytes) + " bytes; this store's " +
                      "chunks are " + std::to_string(chunk_tokens_) + " tokens, at most " +
                      std::to_string(kMaxChunkRawBytes) + " bytes");
  }
  CT_RETURN_IF_ERROR(codec->CheckPayload(m.layout, payload));
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
}

void TieredStore::Promote(const ChunkRequest& r, const SharedBytes& raw_record) {
  if (ram_ == nullptr) return;
  std::lock_guard lock(mu_);
  // Erased or cleared since the load was queued (a tenant's clear while its chunks were being
  // read): the bytes serve this load, RAM does not take them back.
  if (ErasedSince(r.ns, r.key, r.erase_seq)) return;
  bool created = false;
  Entry& e = index_.FindOrCreate(r.key, r.ns, static_cast<uint32_t>(r.tokens.size()),
                                 r.chunk_index, &created);
  if (created) e.remote_written = true;  // it came from there
  if (e.ram_bytes() == 0 && InsertRam(r.key, e, raw_record)) ++counters_.promotions;
  Entry& live = *index_.Find(r.key);  // InsertRam may have rehashed the index
  Touch(r.key, live, raw_record);
  index_.MaybeForget(r.key);
}

void TieredStore::RecordLatency(int64_t start_ns) {
  const int64_t us = (cachette::NowNanos() - start_ns) / 1000;
  counters_.load_latency.Add(static_cast<uint64_t>(std::max<int64_t>(us, 0)));
}

ChunkData TieredStore::LoadOneNoThrow(const ChunkRequest& r, SteadyTime deadline) {
  try {
    return LoadOne(r, deadline);
  } catch (const std::exception& ex) {
    // Slower tiers' failures are caught in LoadOne; what is left is the RAM path (decoding our
    // own record, promotion bookkeeping), so it counts against RAM.
    std::lock_guard lock(mu_);
    ++counters_.tier[kRam].errors;
    ChunkData d;
    d.status = Unavailable(std::string("cache load failed: ") + ex.what());
    return d;
  }
}

ChunkData TieredStore::LoadOne(const ChunkRequest& r, SteadyTime deadline) {
  const int64_t start = cachette::NowNanos();
  ChunkData d;
  const uint64_t tokens = r.tokens.size();
  auto miss = [&](int tier) {
    ++counters_.tier[tier].miss_chunks;
    counters_.tier[tier].miss_tokens += tokens;
  };
  // 1. RAM: our own bytes, verified against the request but not re-checksummed.
  if (ram_ != nullptr) {
    if (SharedBytes rec = ram_->GetShared(r.key)) {
      SharedBytes raw;
      Status s = Accept(r, rec, &d, &raw, /*trusted=*/true);
      std::lock_guard lock(mu_);
      if (s.ok()) {
        d.tier = CacheTier::kRam;
        d.status = Status::Ok();
        if (Entry* e = index_.Find(r.key)) Touch(r.key, *e, rec);
        ++counters_.tier[kRam].hit_chunks;
        counters_.tier[kRam].hit_tokens += tokens;
        RecordLatency(start);
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
  // 2. Disk, then 3. Redis: full verification, then promotion to RAM (unless r.promote is off).
  for (int tier : {kDisk, kRemote}) {
    if ((tier == kDisk ? static_cast<Tier*>(disk_.get()) : remote_) == nullptr) continue;
    Status s;
    try {
      s = LoadFrom(tier, r, deadline, &d);
    } catch (const std::exception& ex) {
      // No exception leaves a load job (one would end the load thread and the process): a
      // tier that threw (std::bad_alloc included) is a miss and an error of that tier.
      s = Unavailable(std::string("load threw: ") + ex.what());
      std::lock_guard lock(mu_);
      ++counters_.tier[tier].errors;
    }
    std::lock_guard lock(mu_);
    if (s.ok()) {
      ++counters_.tier[tier].hit_chunks;
      counters_.tier[tier].hit_tokens += tokens;
      RecordLatency(start);
      return d;
    }
    miss(tier);
    d = ChunkData();
    if (s.code() == StatusCode::kDeadlineExceeded) {
      d.status = s;
      return d;
    }
  }
  d.status = NotFound("no tier holds the chunk");
  return d;
}

Status TieredStore::LoadFrom(int tier, const ChunkRequest& r, SteadyTime deadline,
                             ChunkData* d) {
  if (tier == kDisk) {
    std::lock_guard lock(mu_);
    const Entry* e = index_.Find(r.key);
    if (e == nullptr || e->disk_bytes() == 0) return NotFound("not on disk");
  }
  // Adaptive loading: which encoding of the chunk to read from this tier.
  const bool adaptive = levels_[tier].on();
  int level = 0;
  if (adaptive) {
    level = PickLevel(tier, r, deadline);
    if (level < 0) {
      std::lock_guard lock(mu_);
      ++(tier == kRemote ? counters_.remote_recompute_chunks : counters_.disk_recompute_chunks);
      return DeadlineExceeded("no stored level of the chunk loads before the deadline at the "
                              "measured bandwidth: recomputed instead");
    }
  }
  const int64_t read_start = cachette::NowNanos();
  BufferPool* pool = ram_ != nullptr ? &ram_->pool() : nullptr;
  auto read = [&](int at) {
    return tier == kDisk ? disk_->Get(LevelKey(r.key, at), deadline, pool)
                         : remote_->GetIn(r.ns, LevelKey(r.key, at), deadline);
  };
  auto got = read(level);
  if (level > 0 && !got.ok() && (got.status().code() == StatusCode::kNotFound ||
                                 got.status().code() == StatusCode::kCorruption)) {
    // That level was not stored (its codec refused the chunk) or is gone: the primary.
    // WART: a disk level file lost this way stays charged to its chunk's entry until the
    // chunk leaves the disk (the index keeps one byte count per chunk and tier).
    level = 0;
    got = read(0);
  }
  if (adaptive && got.ok()) MeasureRead(tier, level, got->size(), read_start);
  if (!got.ok()) {
    const StatusCode code = got.status().code();
    std::lock_guard lock(mu_);
    if (code == StatusCode::kDeadlineExceeded) {
      deadline_misses_->fetch_add(1, std::memory_order_relaxed);
      return got.status();
    }
    // kCorruption is counted by the tier that found it; a miss is not an error.
    if (code != StatusCode::kNotFound && code != StatusCode::kCorruption) {
      ++counters_.tier[tier].errors;
    }
    if (tier == kDisk) {
      // Gone or corrupt (the tier deleted and counted it): forget the disk copy, and its
      // level files with it (unlinked under mu_, so no new write of the key races them).
      if (Entry* e = index_.Find(r.key); e != nullptr && e->disk_bytes() != 0) {
        index_.SetBytes(*e, kDisk, 0);
        (void)EraseFromDisk(r.key);
        index_.MaybeForget(r.key);
      }
    }
    return got.status();
  }
  SharedBytes rec = pool != nullptr
                        ? pool->Share(std::move(*got))
                        : std::make_shared<const std::vector<std::byte>>(std::move(*got));
  SharedBytes raw;
  // The disk tier verified both checksums of these very bytes (DiskTier::Get), so only the
  // header is decoded again here; a second pass of XXH3 over the payload cost ~20% of a cold
  // load. Remote records are verified here in full.
  Status s = Accept(r, rec, d, &raw, /*trusted=*/tier == kDisk);
  if (!s.ok()) {
    {
      std::lock_guard lock(mu_);
      if (s.code() == StatusCode::kNotFound) {
        ++counters_.collisions;
      } else if (s.code() == StatusCode::kCorruption && tier == kRemote) {
        ++counters_.tier[kRemote].corruptions;
      } else {
        ++counters_.tier[tier].errors;
      }
    }
    if (tier == kRemote && s.code() == StatusCode::kCorruption) {
      (void)remote_->EraseIn(r.ns, LevelKey(r.key, level));
      if (level == 0) EmitRemote(KvEvent::Kind::kRemoved, {r.key});
    }
    return s;
  }
  d->tier = tier == kDisk ? CacheTier::kDisk : CacheTier::kRedis;
  d->status = Status::Ok();
  if (level > 0) {
    std::lock_guard lock(mu_);
    // Serves this load only: RAM keeps the best.
    ++(tier == kRemote ? counters_.remote_lower_level_chunks
                       : counters_.disk_lower_level_chunks);
  } else if (r.promote) {
    Promote(r, raw);
  }
  return Status::Ok();
}

void TieredStore::MeasureRead(int tier, int level, uint64_t bytes, int64_t start_ns) {
  const double b = static_cast<double>(bytes);
  const double s = std::max(1e-6, static_cast<double>(cachette::NowNanos() - start_ns) / 1e9);
  std::lock_guard lock(mu_);
  TierLevels& lv = levels_[tier];
  Average(lv.bytes[static_cast<size_t>(level)], b, 0.9, 0.1);
  Average(lv.bytes_per_s, b / s, 0.7, 0.3);
}

int TieredStore::PickLevel(int tier, const ChunkRequest& r, SteadyTime deadline) {
  std::lock_guard lock(mu_);
  const TierLevels& lv = levels_[tier];
  if (lv.bytes_per_s <= 0) return 0;  // nothing measured yet: the best, and measure it
  const double left_s =
      std::chrono::duration<double>(deadline - std::chrono::steady_clock::now()).count();
  for (size_t j = 0; j < lv.bytes.size(); ++j) {
    const double bytes = lv.bytes[j];
    // A level whose size this process has not seen (another process wrote the chunks, or this
    // one before a restart) is tried when the better ones do not fit: reading it measures it.
    if (bytes == 0) return static_cast<int>(j);
    if (bytes * static_cast<double>(r.remaining) / lv.bytes_per_s <= left_s) {
      return static_cast<int>(j);
    }
  }
  return -1;
}

std::unique_ptr<LoadHandle> TieredStore::Get(const Hash128& ns, std::span<const TokenId> tokens,
                                             size_t first_chunk, size_t n_chunks,
                                             SteadyTime deadline, bool promote) {
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
                             CacheTier::kNone, {}, nullptr, {}, {}});
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
    reqs[i].promote = promote;
  }
  // RAM hits resolve here, in order, without a thread hop; the rest go to the load executor.
  size_t i = 0;
  for (; i < n_chunks && ram_ != nullptr; ++i) {
    bool in_ram = false;
    {
      std::lock_guard lock(mu_);
      const Entry* e = index_.Find(reqs[i].key);
      in_ram = e != nullptr && e->ram_bytes() != 0;
    }
    if (!in_ram) break;
    ChunkData d = LoadOneNoThrow(reqs[i], deadline);
    const bool ok = d.status.ok();
    st->Resolve(i, std::move(d));
    if (!ok) return handle;
  }
  if (i == n_chunks) return handle;
  const size_t first = i;
  {
    std::lock_guard lock(mu_);
    for (ChunkRequest& r : reqs) r.erase_seq = erase_seq_;
    ++jobs_in_flight_;  // ended by RunLoad (EndJob)
  }
  if (!load_->TrySubmit([this, st, reqs = std::move(reqs), first]() mutable {
        RunLoad(st, std::move(reqs), first);
      })) {
    EndJob();
    st->Resolve(first,
                ChunkData{Unavailable("load queue full"), CacheTier::kNone, {}, nullptr, {}, {}});
  }
  return handle;
}

void TieredStore::RunLoad(const std::shared_ptr<LoadState>& st, std::vector<ChunkRequest> reqs,
                          size_t first) {
  struct Ended {  // however the job returns
    TieredStore* store;
    ~Ended() { store->EndJob(); }
  } ended{this};
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
        const Entry* e = index_.Find(key);
        disk_only = e != nullptr && e->ram_bytes() == 0 && e->disk_bytes() != 0;
      }
      if (!disk_only) continue;
      // With disk levels, the one the controller would pick now (a guess: it decides again
      // when the chunk's turn comes).
      int level = 0;
      if (levels_[kDisk].on()) {
        reqs[prefetched].remaining = reqs.size() - prefetched;
        level = std::max(0, PickLevel(kDisk, reqs[prefetched], st->deadline));
      }
      disk_->Prefetch(LevelKey(key, level));
    }
  };
  size_t i = first;
  try {
    for (; i < reqs.size(); ++i) {
      {
        std::lock_guard lock(st->mu);
        if (st->closed) return;  // the waiter gave up
      }
      if (std::chrono::steady_clock::now() > st->deadline) return;  // Wait marks the rest
      if (disk_ != nullptr) prefetch_up_to(i + 1 + kReadAheadChunks);
      reqs[i].remaining = reqs.size() - i;
      ChunkData d = LoadOneNoThrow(reqs[i], st->deadline);
      const bool ok = d.status.ok();
      st->Resolve(i, std::move(d));
      if (!ok) return;
    }
  } catch (const std::exception& ex) {
    // The job's boundary: chunk i and the rest fail (Resolve marks the rest), the thread lives.
    {
      std::lock_guard lock(mu_);
      ++counters_.tier[kDisk].errors;  // only the disk read-ahead runs outside LoadOneNoThrow
    }
    ChunkData d;
    d.status = Unavailable(std::string("cache load failed: ") + ex.what());
    if (i < reqs.size()) st->Resolve(i, std::move(d));
  }
}

}  // namespace cachette::cache
