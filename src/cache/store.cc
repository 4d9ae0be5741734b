// TieredStore, part 1 of 3: opening, Put, pins, Erase, Clear, Flush, Stats. Where chunks go is
// in store_placement.cc, the load path in store_load.cc (see store.h).
#include "cache/store.h"

#include <algorithm>
#include <tuple>

#include "core/check.h"
#include "core/timer.h"

#include "cache/redis/redis_tier.h"

namespace cachette {

Result<std::unique_ptr<Cache>> Cache::Open(const CacheOptions& options) {
  CT_ASSIGN_OR_RETURN(std::unique_ptr<cache::TieredStore> store,
                      cache::TieredStore::Create(options));
  return std::unique_ptr<Cache>(std::move(store));
}

namespace cache {

TieredStore::TieredStore(const CacheOptions& options)
    : options_(options), chunk_tokens_(options.chunk_tokens) {}

Result<std::unique_ptr<TieredStore>> TieredStore::Create(const CacheOptions& options) {
  if (options.chunk_tokens <= 0 || options.chunk_tokens > static_cast<int>(kRecordMaxTokens)) {
    return InvalidArgument("cache: chunk_tokens " + std::to_string(options.chunk_tokens) +
                           " not in 1.." + std::to_string(kRecordMaxTokens));
  }
  std::unique_ptr<TieredStore> s(new TieredStore(options));
  s->index_.SetEventSink(options.event_sink);  // before the disk's survivors are indexed
  CT_ASSIGN_OR_RETURN(s->policy_, ParsePolicy(options.policy));
  if (options.codec != "raw") {
    CT_ASSIGN_OR_RETURN(s->codec_, MakeCodec(options.codec));
  }
  if (options.disk_levels.size() > static_cast<size_t>(kMaxChunkLevels)) {
    return InvalidArgument("cache: more than " + std::to_string(kMaxChunkLevels) + " disk levels");
  }
  for (auto [tier, names, what] :
       {std::tuple{kDisk, &options.disk_levels, "cache: disk level"},
        std::tuple{kRemote, &options.remote_levels, "cache: remote level"}}) {
    TierLevels& lv = s->levels_[tier];
    for (const std::string& name : *names) {
      auto c = MakeCodec(name);
      if (!c.ok()) return c.status().WithContext(what);
      lv.codecs.push_back(std::move(*c));
    }
    lv.bytes.assign(1 + lv.codecs.size(), 0.0);
  }
  if (options.ram_budget_bytes > 0) s->ram_ = std::make_unique<RamTier>(options.ram_budget_bytes);
  if (!options.disk_dir.empty()) {
    DiskTierOptions d;
    d.dir = options.disk_dir;
    d.budget_bytes = options.disk_budget_bytes;
    d.sync = options.disk_sync;
    CT_ASSIGN_OR_RETURN(s->disk_, DiskTier::Open(d));
    // The index of the disk's survivors, oldest write first so LRU ticks follow write order;
    // then their level files, charged to their chunk's entry. A level file whose chunk did not
    // survive, or of a level this store does not read, is removed: nothing would ever read it.
    std::vector<DiskEntry> found = s->disk_->Entries();
    std::sort(found.begin(), found.end(),
              [](const DiskEntry& a, const DiskEntry& b) { return a.mtime_ns < b.mtime_ns; });
    std::lock_guard lock(s->mu_);
    for (const DiskEntry& de : found) {
      if (de.level != 0) continue;
      Entry& e = s->index_.FindOrCreate(de.key, de.ns, de.n_tokens, de.chunk_index, nullptr);
      s->index_.SetBytes(e, kDisk, de.bytes);
    }
    // Their sizes also seed the controller's per-level estimates (mean bytes per level).
    TierLevels& lv = s->levels_[kDisk];
    std::vector<double> sum(lv.bytes.size(), 0.0), count(lv.bytes.size(), 0.0);
    for (const DiskEntry& de : found) {
      const size_t j = static_cast<size_t>(de.level);
      if (j == 0) {
        if (!lv.on()) continue;
      } else if (Entry* e = s->index_.Find(de.chunk);
                 e != nullptr && e->ns == de.ns && j < lv.bytes.size()) {
        s->index_.SetBytes(*e, kDisk, e->disk_bytes() + de.bytes);
      } else {
        (void)s->disk_->Erase(de.key);
        continue;
      }
      sum[j] += static_cast<double>(de.bytes);
      count[j] += 1;
    }
    for (size_t j = 0; j < lv.bytes.size(); ++j) {
      if (count[j] > 0) lv.bytes[j] = sum[j] / count[j];
    }
  }
  if (options.remote_tier != nullptr) {
    s->remote_ = options.remote_tier;
  } else if (!options.redis_urls.empty()) {
    RedisTierOptions r;
    r.urls = options.redis_urls;
    CT_ASSIGN_OR_RETURN(s->remote_owned_, RedisTier::Open(r));
    s->remote_ = s->remote_owned_.get();
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

// ---- Put ---------------------------------------------------------------------------------

Status TieredStore::Put(const Hash128& ns, std::span<const TokenId> tokens, size_t first_chunk,
                        const ChunkLayout& layout, std::span<const ByteSpan> chunks,
                        std::span<const ByteSpan> aux, bool slower_tiers_only) {
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
  if (!aux.empty() && aux.size() != chunks.size()) {
    return InvalidArgument("cache put: " + std::to_string(aux.size()) + " aux strings for " +
                           std::to_string(chunks.size()) + " chunks");
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
    if (!aux.empty()) m.aux.assign(aux[i].begin(), aux[i].end());
    // Into a recycled buffer of the RAM tier's pool: no page faults once RAM is at its budget.
    std::vector<std::byte> rec =
        ram_ != nullptr ? ram_->pool().Take(RecordHeaderBytes(c, m.aux.size()) + chunks[i].size())
                        : std::vector<std::byte>();
    CT_RETURN_IF_ERROR(EncodeRecordInto(m, tokens.subspan(ci * c, c), chunks[i], rec));
    records.push_back(ram_ != nullptr
                          ? ram_->pool().Share(std::move(rec))
                          : std::make_shared<const std::vector<std::byte>>(std::move(rec)));
  }
  std::lock_guard lock(mu_);
  for (size_t i = 0; i < chunks.size(); ++i) {
    const ChunkKey& key = keys[first_chunk + i];
    bool created = false;
    Entry& e = index_.FindOrCreate(key, ns, static_cast<uint32_t>(c),
                                   static_cast<uint32_t>(first_chunk + i), &created);
    if (!created && e.ram_bytes() != 0) {
      e.last_tick = index_.NextTick();  // already hot: a put of the same content is a no-op
      continue;
    }
    if (slower_tiers_only && !created &&
        (e.ram_bytes() != 0 || e.disk_bytes() != 0 || e.disk_pending)) {
      continue;  // held locally already
    }
    ++counters_.puts;
    if (created && ghost_.erase(key) != 0) e.main_tick = e.insert_tick;  // S3-FIFO: ghost hit
    const bool in_ram = !slower_tiers_only && InsertRam(key, e, records[i]);
    Entry& live = *index_.Find(key);  // InsertRam may have rehashed the index
    SubmitWrite(key, live, records[i], in_ram ? WriteCause::kPut : WriteCause::kPutRamFull);
    if (!in_ram && !live.disk_pending && live.disk_bytes() == 0) ++counters_.puts_rejected;
    index_.MaybeForget(key);
  }
  return Status::Ok();
}

// ---- Pins ----------------------------------------------------------------------------------

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

// ---- Erase, Clear, Flush, Stats ------------------------------------------------------------

Status TieredStore::Erase(std::span<const TokenId> tokens, const Hash128& ns) {
  const std::vector<ChunkKey> keys = ComputeChunkKeys(ns, tokens, chunk_tokens_);
  Status result;
  {
    std::lock_guard lock(mu_);
    for (const ChunkKey& k : keys) {
      // A pending write finds its generation gone and removes its file, and finds the key
      // erased (ErasedSince) and leaves Redis without it.
      NoteErased(&k, nullptr);
      const Entry e = index_.Remove(k);
      if (e.ram_bytes() != 0) (void)ram_->Erase(k);
      if (e.disk_bytes() != 0) {
        Status s = EraseFromDisk(k);
        if (!s.ok()) result = s;
      }
    }
  }
  if (remote_ != nullptr) {
    for (const ChunkKey& k : keys) EraseFromRemote(ns, k);
    EmitRemote(KvEvent::Kind::kRemoved, keys);
  }
  return result;
}

void TieredStore::EraseFromRemote(const Hash128& ns, const ChunkKey& key) {
  (void)remote_->EraseIn(ns, key);
  for (size_t j = 1; j <= levels_[kRemote].codecs.size(); ++j) {
    (void)remote_->EraseIn(ns, LevelKey(key, static_cast<int>(j)));
  }
}

void TieredStore::NoteErased(const ChunkKey* key, const Hash128* ns) {
  ++erase_seq_;
  if (jobs_in_flight_ == 0) return;  // a job queued from now on sees the erasure itself
  if (key != nullptr) key_erased_at_[*key] = erase_seq_;
  if (ns != nullptr) ns_cleared_at_[*ns] = erase_seq_;
}

bool TieredStore::ErasedSince(const Hash128& ns, const ChunkKey& key, uint64_t seq) const {
  const auto k = key_erased_at_.find(key);
  if (k != key_erased_at_.end() && k->second > seq) return true;
  const auto n = ns_cleared_at_.find(ns);
  return n != ns_cleared_at_.end() && n->second > seq;
}

void TieredStore::EndJob() {
  std::lock_guard lock(mu_);
  if (--jobs_in_flight_ == 0) {
    key_erased_at_.clear();
    ns_cleared_at_.clear();
  }
}

Status TieredStore::EraseFromDisk(const ChunkKey& key) {
  Status result = disk_->Erase(key);
  for (size_t j = 1; j <= levels_[kDisk].codecs.size(); ++j) {
    Status s = disk_->Erase(LevelKey(key, static_cast<int>(j)));
    if (!s.ok() && result.ok()) result = s;
  }
  return result;
}

void TieredStore::EmitRemote(KvEvent::Kind kind, const std::vector<ChunkKey>& keys) {
  if (options_.event_sink == nullptr || keys.empty()) return;
  KvEvent ev;
  ev.kind = kind;
  ev.medium = KvMedium::kRedis;
  for (const ChunkKey& k : keys) ev.block_hashes.push_back(KvBlockHash(k));
  ev.block_size = chunk_tokens_;
  options_.event_sink->Emit(std::move(ev));
}

Status TieredStore::Clear(const Hash128& ns) {
  std::vector<ChunkKey> disk_keys, remote_keys;
  {
    std::lock_guard lock(mu_);
    // Pins stay: they name keys, so a chunk of `ns` put again is protected again.
    // A pending write of `ns` finds its generation gone, releases its reservation and removes
    // the file it wrote; it finds `ns` cleared (ErasedSince) and leaves Redis without it.
    // Noted before the remote tier is cleared below: a write landing in between is erased
    // again by its job.
    NoteErased(nullptr, &ns);
    for (const auto& [key, e] : index_.RemoveNamespace(ns)) {
      if (e.ram_bytes() != 0) (void)ram_->Erase(key);
      if (e.disk_bytes() != 0) disk_keys.push_back(key);
      if (e.remote_written) remote_keys.push_back(key);
    }
  }
  Status result;
  for (const ChunkKey& k : disk_keys) {
    Status s = EraseFromDisk(k);
    if (!s.ok()) result = s;
  }
  if (remote_ != nullptr) {
    // Every copy of `ns` in the shared tier, whoever wrote it; a tier that cannot list a
    // namespace (ClearNamespace kUnimplemented) loses the copies this process knows of.
    Status s = remote_->ClearNamespace(ns);
    if (s.code() == StatusCode::kUnimplemented) {
      for (const ChunkKey& k : remote_keys) EraseFromRemote(ns, k);
    } else if (!s.ok() && result.ok()) {
      result = s.WithContext("cache clear: remote tier");
    }
    // Only the keys this process wrote are known here; other writers' go unreported.
    EmitRemote(KvEvent::Kind::kRemoved, remote_keys);
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
