// TieredStore, part 2 of 3: where chunks go. The one decision of which slower tiers a write
// goes to (WriteTargetsFor), room planning against budgets and quotas (PlanRoom), RAM eviction
// with demotion, admission after hits, and the write-behind job (RunWrite). See store.h.
#include <algorithm>
#include <exception>

#include "cache/store.h"
#include "core/check.h"

namespace cachette::cache {

uint64_t TieredStore::QuotaOf(const Hash128& ns, int tier) const {
  for (const NamespaceQuota& q : options_.quotas) {
    if (q.ns == ns) return tier == kRam ? q.ram_bytes : q.disk_bytes;
  }
  return options_.default_quota_bytes;
}

// The slower tiers a chunk is written to, by why it is written:
//   kPut         disk if write-through, Redis if write-through; both only when admission
//                needs no hits (admit_after_hits == 0);
//   kPutRamFull  disk always (or the chunk is lost); Redis as kPut, or always without a disk;
//   kAdmitted    disk if write-through, Redis if write-through (the chunk earned its place);
//   kDemoted     disk always, Redis in on-eviction mode; nothing before admission.
// A tier that already holds the chunk (or is being written) is never a target.
TieredStore::WriteTargets TieredStore::WriteTargetsFor(const Entry& e, WriteCause cause) const {
  const bool admit_all = options_.admit_after_hits == 0;
  const bool remote_through = options_.redis_write == RedisWriteMode::kWriteThrough;
  bool want_disk = false, want_remote = false;
  switch (cause) {
    case WriteCause::kPut:
      want_disk = options_.disk_write_through && admit_all;
      want_remote = remote_through && admit_all;
      break;
    case WriteCause::kPutRamFull:
      want_disk = true;
      want_remote = (remote_through && admit_all) || disk_ == nullptr;
      break;
    case WriteCause::kAdmitted:
      want_disk = options_.disk_write_through;
      want_remote = remote_through;
      break;
    case WriteCause::kDemoted:
      if (e.hits < options_.admit_after_hits) return {};
      want_disk = true;
      want_remote = options_.redis_write == RedisWriteMode::kOnEviction;
      break;
  }
  WriteTargets to;
  to.disk = want_disk && disk_ != nullptr && e.disk_bytes() == 0 && !e.disk_pending;
  to.remote = want_remote && remote_ != nullptr && !e.remote_written;
  return to;
}

void TieredStore::SubmitWrite(const ChunkKey& key, Entry& e, const SharedBytes& record,
                              WriteCause cause) {
  if (record == nullptr) return;
  const WriteTargets to = WriteTargetsFor(e, cause);
  if (!to.any()) return;
  if (cause == WriteCause::kDemoted) ++counters_.demotions;
  WriteJob job{e.ns, key, e.gen, record, to, erase_seq_};
  ++jobs_in_flight_;  // ended by RunWrite (EndJob)
  if (!io_->TrySubmit([this, job = std::move(job)] { RunWrite(job); })) {
    --jobs_in_flight_;
    ++counters_.puts_dropped;
    return;
  }
  if (to.disk) e.disk_pending = true;
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
    for (const auto& [k, e] : index_.entries()) {
      if (e.bytes[tier] == 0 || k == incoming || Pinned(k)) continue;
      if (only_ns != nullptr && e.ns != *only_ns) continue;
      if (std::find(victims->begin(), victims->end(), k) != victims->end()) continue;
      keys.push_back(k);
      stats.push_back(e.StatsIn(tier));
    }
  };
  std::vector<size_t> chosen;
  uint64_t freed = 0;
  // Phase 1: the namespace's own quota, from its own entries.
  if (const uint64_t quota = QuotaOf(ns, tier); quota != 0) {
    if (bytes > quota) return false;
    const uint64_t ns_used = index_.ns_used(ns, tier);
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
  const uint64_t used = index_.used(tier);
  if (budget != 0 && used + bytes > budget + freed) {
    collect(nullptr);
    if (!SelectVictims(policy_, stats, used + bytes - budget - freed, &chosen)) {
      victims->clear();
      return false;
    }
    for (size_t i : chosen) victims->push_back(keys[i]);
  }
  return true;
}

void TieredStore::EvictFromRam(const std::vector<ChunkKey>& victims) {
  for (const ChunkKey& k : victims) {
    Entry* e = index_.Find(k);
    if (e == nullptr || e->ram_bytes() == 0) continue;
    SharedBytes record = ram_->GetShared(k);
    (void)ram_->Erase(k);
    index_.SetBytes(*e, kRam, 0);
    ++counters_.tier[kRam].evictions;
    if (policy_ == PolicyKind::kS3Fifo && e->main_tick == 0 && ghost_.insert(k).second) {
      ghost_fifo_.push_back(k);
      if (ghost_fifo_.size() > 4096) {
        ghost_.erase(ghost_fifo_.front());
        ghost_fifo_.pop_front();
      }
    }
    SubmitWrite(k, *e, record, WriteCause::kDemoted);
    index_.MaybeForget(k);
  }
}

bool TieredStore::InsertRam(const ChunkKey& key, Entry& e, SharedBytes record) {
  if (ram_ == nullptr) return false;
  std::vector<ChunkKey> victims;
  const uint64_t size = record->size();
  if (!PlanRoom(kRam, e.ns, size, key, &victims)) return false;
  const uint64_t gen = e.gen;
  EvictFromRam(victims);
  Entry& live = *index_.Find(key);
  CT_CHECK(live.gen == gen) << "the incoming entry was evicted";
  if (!ram_->PutShared(key, std::move(record)).ok()) return false;
  index_.SetBytes(live, kRam, size);
  return true;
}

void TieredStore::Touch(const ChunkKey& key, Entry& e, const SharedBytes& record) {
  ++e.hits;
  e.last_tick = index_.NextTick();
  if (e.main_tick == 0) e.main_tick = e.last_tick;
  // Admission after N hits: the chunk has earned its place in the slower tiers.
  if (options_.admit_after_hits > 0 && e.hits == options_.admit_after_hits) {
    SubmitWrite(key, e, record, WriteCause::kAdmitted);
  }
}

// ---- The write-behind job (io executor) ----------------------------------------------------

SharedBytes TieredStore::EncodeForSlowTiers(const SharedBytes& raw_record) {
  if (codec_ == nullptr) return raw_record;
  // Encode for the slower tiers; our own RAM record needs no payload re-verification.
  auto h = DecodeRecordHeader(*raw_record, raw_record->size());
  if (!h.ok()) return raw_record;
  auto enc = codec_->Encode(h->meta.layout, ByteSpan(*raw_record).subspan(h->header_bytes));
  if (!enc.ok()) return raw_record;  // written raw: slower, never wrong
  RecordMeta m = h->meta;
  m.codec_id = codec_->id();
  m.codec_version = codec_->version();
  auto rec = EncodeRecord(m, h->tokens, *enc);
  if (!rec.ok()) return raw_record;
  return std::make_shared<const std::vector<std::byte>>(std::move(*rec));
}

void TieredStore::WriteToDisk(const WriteJob& job, const SharedBytes& bytes) {
  // Adaptive loading: the chunk's level records go with it, planned and charged as one (its
  // entry's disk bytes are the record's and its levels'), so they leave the disk with it.
  const std::vector<SharedBytes> level_recs =
      levels_[kDisk].on() ? EncodeLevels(kDisk, job.raw_record) : std::vector<SharedBytes>();
  uint64_t size = bytes->size();
  for (const SharedBytes& rec : level_recs) size += rec != nullptr ? rec->size() : 0;
  std::vector<ChunkKey> victims;
  Hash128 ns;
  {
    std::lock_guard lock(mu_);
    Entry* e = index_.Find(job.key);
    if (e == nullptr || e->gen != job.gen) return;  // erased or re-created since
    if (!PlanRoom(kDisk, e->ns, size, job.key, &victims)) {
      e->disk_pending = false;
      if (e->ram_bytes() == 0) ++counters_.puts_rejected;
      index_.MaybeForget(job.key);
      return;
    }
    for (const ChunkKey& v : victims) {
      index_.SetBytes(*index_.Find(v), kDisk, 0);
      ++counters_.tier[kDisk].evictions;
      index_.MaybeForget(v);  // erases only `v`: `e` stays valid
    }
    ns = e->ns;
    index_.Reserve(ns, kDisk, size);  // until published
  }
  for (const ChunkKey& v : victims) (void)EraseFromDisk(v);
  uint64_t written = 0;
  Status s;
  try {
    s = disk_->Put(job.key, *bytes);
    if (s.ok()) written = bytes->size();
    for (size_t j = 0; s.ok() && j < level_recs.size(); ++j) {
      if (level_recs[j] == nullptr) continue;
      // A level that fails to write is only a level less: loads fall back to level 0.
      if (disk_->Put(LevelKey(job.key, static_cast<int>(j + 1)), *level_recs[j]).ok()) {
        written += level_recs[j]->size();
      } else {
        std::lock_guard lock(mu_);
        ++counters_.tier[kDisk].errors;
      }
    }
  } catch (const std::exception& ex) {
    if (s.ok()) (void)EraseFromDisk(job.key);  // whatever of it was published goes
    written = 0;
    s = IOError(std::string("disk put threw: ") + ex.what());
    std::lock_guard lock(mu_);
    ++counters_.tier[kDisk].errors;
  }
  std::lock_guard lock(mu_);
  index_.Release(ns, kDisk, size);
  Entry* e = index_.Find(job.key);
  const bool live = e != nullptr && e->gen == job.gen;
  if (live) {
    e->disk_pending = false;
    if (s.ok()) {
      index_.SetBytes(*e, kDisk, written);
      TierLevels& lv = levels_[kDisk];
      if (lv.on()) Average(lv.bytes[0], static_cast<double>(bytes->size()), 0.9, 0.1);
      for (size_t j = 0; j < level_recs.size(); ++j) {
        if (level_recs[j] == nullptr) continue;
        Average(lv.bytes[j + 1], static_cast<double>(level_recs[j]->size()), 0.9, 0.1);
      }
    } else {
      index_.MaybeForget(job.key);
    }
  } else if (s.ok()) {
    (void)EraseFromDisk(job.key);  // erased or re-created while we wrote: not ours now
  }
}

std::vector<SharedBytes> TieredStore::EncodeLevels(int tier, const SharedBytes& raw_record) {
  const TierLevels& lv = levels_[tier];
  std::vector<SharedBytes> out(lv.codecs.size());
  auto h = DecodeRecordHeader(*raw_record, raw_record->size());
  if (!h.ok()) return out;
  const ByteSpan raw = ByteSpan(*raw_record).subspan(h->header_bytes);
  for (size_t j = 0; j < lv.codecs.size(); ++j) {
    const Codec& codec = *lv.codecs[j];
    auto enc = codec.Encode(h->meta.layout, raw);
    if (!enc.ok()) continue;  // a level this chunk cannot take (e.g. its KV type): loads skip it
    RecordMeta m = h->meta;
    m.codec_id = codec.id();
    m.codec_version = codec.version();
    auto rec = EncodeRecord(m, h->tokens, *enc);
    if (!rec.ok()) continue;
    out[j] = std::make_shared<const std::vector<std::byte>>(std::move(*rec));
  }
  return out;
}

void TieredStore::WriteRemoteLevels(const WriteJob& job) {
  const std::vector<SharedBytes> recs = EncodeLevels(kRemote, job.raw_record);
  for (size_t j = 0; j < recs.size(); ++j) {
    if (recs[j] == nullptr) continue;
    const int level = static_cast<int>(j + 1);
    if (!remote_->PutIn(job.ns, LevelKey(job.key, level), *recs[j], options_.redis_ttl_seconds)
             .ok()) {
      std::lock_guard lock(mu_);
      ++counters_.tier[kRemote].errors;
      continue;
    }
    std::lock_guard lock(mu_);
    Average(levels_[kRemote].bytes[j + 1], static_cast<double>(recs[j]->size()), 0.9, 0.1);
  }
}

void TieredStore::RunWrite(const WriteJob& job) {
  // No exception leaves an io job: one would end the io thread (and the process). A failure
  // here is the write not done, and an error counted against the tier.
  int tier = kDisk;
  try {
    SharedBytes bytes = job.raw_record;
    try {
      bytes = EncodeForSlowTiers(job.raw_record);
    } catch (const std::exception&) {
      bytes = job.raw_record;  // as on a codec error: written raw
    }
    if (job.to.disk) WriteToDisk(job, bytes);
    tier = kRemote;
    bool to_remote = job.to.remote;
    if (to_remote) {
      std::lock_guard lock(mu_);
      // Erased or cleared while queued: not written at all.
      to_remote = !ErasedSince(job.ns, job.key, job.erase_seq);
    }
    if (to_remote && remote_->PutIn(job.ns, job.key, *bytes, options_.redis_ttl_seconds).ok()) {
      if (levels_[kRemote].on()) WriteRemoteLevels(job);
      bool erased = false;
      {
        std::lock_guard lock(mu_);
        // An Erase or Clear noted now came while the copy was being written, and may have
        // cleared the remote tier before it landed: it is erased again below. One noted after
        // this check clears the remote tier after the copy landed.
        erased = ErasedSince(job.ns, job.key, job.erase_seq);
        Entry* e = index_.Find(job.key);
        if (!erased && e != nullptr && e->gen == job.gen) e->remote_written = true;
        if (!erased && levels_[kRemote].on()) {
          Average(levels_[kRemote].bytes[0], static_cast<double>(bytes->size()), 0.9, 0.1);
        }
      }
      if (erased) {
        EraseFromRemote(job.ns, job.key);
      } else {
        EmitRemote(KvEvent::Kind::kStored, {job.key});
      }
    }
  } catch (const std::exception&) {
    std::lock_guard lock(mu_);
    ++counters_.tier[tier].errors;
    // A disk write that threw before its reservation leaves the entry pending: free it.
    Entry* e = index_.Find(job.key);
    if (tier == kDisk && e != nullptr && e->gen == job.gen && e->disk_pending) {
      e->disk_pending = false;
      index_.MaybeForget(job.key);
    }
  }
  EndJob();
}

}  // namespace cachette::cache
