#include "cache/store.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include "cache/test_util.h"

namespace cachette::cache {
namespace {

using namespace std::chrono_literals;
using testing::Bytes;
using testing::SmallLayout;
using testing::TempDir;
using testing::Tokens;

constexpr int kC = 16;  // chunk tokens
const Hash128 kNs1{1, 1}, kNs2{2, 2};

// Deterministic KV bytes of chunk `ci` of `tokens` in `ns`.
std::vector<std::byte> ChunkBytes(const Hash128& ns, std::span<const TokenId> tokens, size_t ci) {
  uint32_t seed = static_cast<uint32_t>(ns.lo * 31 + ci);
  for (int i = 0; i < kC; ++i) seed = seed * 131 + static_cast<uint32_t>(tokens[ci * kC + i]);
  return Bytes(SmallLayout(kC).raw_bytes(), seed);
}

Status PutChunks(Cache& c, const Hash128& ns, const std::vector<TokenId>& tokens,
                 size_t first, size_t n) {
  std::vector<std::vector<std::byte>> data;
  std::vector<ByteSpan> spans;
  for (size_t i = first; i < first + n; ++i) data.push_back(ChunkBytes(ns, tokens, i));
  for (auto& d : data) spans.emplace_back(d);
  return c.Put(ns, tokens, first, SmallLayout(kC), spans);
}

uint64_t RecordSize() { return RecordHeaderBytes(kC) + SmallLayout(kC).raw_bytes(); }

CacheOptions Options(uint64_t ram_chunks, const std::string& dir = "", uint64_t disk_chunks = 0) {
  CacheOptions o;
  o.chunk_tokens = kC;
  o.ram_budget_bytes = ram_chunks * RecordSize();
  o.disk_dir = dir;
  o.disk_budget_bytes = disk_chunks * RecordSize();
  o.disk_sync = false;
  return o;
}

std::unique_ptr<TieredStore> Open(const CacheOptions& o) {
  auto s = TieredStore::Create(o);
  EXPECT_TRUE(s.ok()) << s.status().ToString();
  return s.ok() ? std::move(s).value() : nullptr;
}

// Loads chunks [first, first+n) and checks each OK chunk's bytes; returns the tiers.
std::vector<CacheTier> GetAndCheck(Cache& c, const Hash128& ns, const std::vector<TokenId>& t,
                                   size_t first, size_t n, size_t* ok_tokens = nullptr) {
  auto h = c.Get(ns, t, first, n, std::chrono::steady_clock::now() + 5s);
  h->Wait();
  std::vector<CacheTier> tiers;
  for (size_t i = 0; i < h->size(); ++i) {
    const ChunkData& d = h->chunk(i);
    if (!d.status.ok()) break;
    auto want = ChunkBytes(ns, t, first + i);
    EXPECT_EQ(d.bytes().size(), want.size());
    EXPECT_EQ(std::memcmp(d.bytes().data(), want.data(), want.size()), 0) << "chunk " << i;
    EXPECT_EQ(d.layout, SmallLayout(kC));
    tiers.push_back(d.tier);
  }
  if (ok_tokens != nullptr) *ok_tokens = h->ready_tokens();
  return tiers;
}

TEST(StoreTest, PutLookupGetFromRam) {
  auto c = Open(Options(100));
  auto t = Tokens(4 * kC + 5, 1);
  EXPECT_EQ(c->Lookup(t, kNs1).tokens, 0u);
  ASSERT_TRUE(PutChunks(*c, kNs1, t, 0, 4).ok());
  LookupResult r = c->Lookup(t, kNs1);
  EXPECT_EQ(r.tokens, 4u * kC);
  EXPECT_EQ(r.chunk_tiers, std::vector<CacheTier>(4, CacheTier::kRam));
  EXPECT_EQ(GetAndCheck(*c, kNs1, t, 0, 4), std::vector<CacheTier>(4, CacheTier::kRam));
  EXPECT_EQ(GetAndCheck(*c, kNs1, t, 2, 2), std::vector<CacheTier>(2, CacheTier::kRam));
  CacheStats s = c->Stats();
  EXPECT_EQ(s.tier[0].hit_chunks, 6u);
  EXPECT_EQ(s.tier[0].hit_tokens, 6u * kC);
  EXPECT_EQ(s.load_latency.count, 6u);
}

TEST(StoreTest, BadPutsAreInvalidArgument) {
  auto c = Open(Options(100));
  auto t = Tokens(2 * kC, 1);
  std::vector<std::byte> small(10);
  ByteSpan spans[] = {ByteSpan(small)};
  EXPECT_EQ(c->Put(kNs1, t, 0, SmallLayout(kC), spans).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(c->Put(kNs1, t, 0, SmallLayout(kC + 1), spans).code(), StatusCode::kInvalidArgument);
  auto ok = ChunkBytes(kNs1, t, 0);
  ByteSpan spans3[] = {ok, ok, ok};
  EXPECT_EQ(c->Put(kNs1, t, 0, SmallLayout(kC), spans3).code(), StatusCode::kInvalidArgument);
  EXPECT_FALSE(TieredStore::Create(Options(1)).value()->Get(kNs1, t, 1, 5, {})->chunk(0).status.ok());
  CacheOptions o = Options(1);
  o.policy = "random";
  EXPECT_EQ(TieredStore::Create(o).status().code(), StatusCode::kInvalidArgument);
}

TEST(StoreTest, LookupAndGetStopAtTheFirstGap) {
  auto c = Open(Options(100));
  auto t = Tokens(5 * kC, 2);
  ASSERT_TRUE(PutChunks(*c, kNs1, t, 0, 2).ok());
  ASSERT_TRUE(PutChunks(*c, kNs1, t, 3, 2).ok());  // chunk 2 missing
  EXPECT_EQ(c->Lookup(t, kNs1).tokens, 2u * kC);
  auto h = c->Get(kNs1, t, 0, 5, std::chrono::steady_clock::now() + 5s);
  h->Wait();
  EXPECT_TRUE(h->chunk(1).status.ok());
  EXPECT_EQ(h->chunk(2).status.code(), StatusCode::kNotFound);
  EXPECT_EQ(h->chunk(3).status.code(), StatusCode::kNotFound);  // after the gap: not loaded
  EXPECT_EQ(h->ready_tokens(), 2u * kC);
}

TEST(StoreTest, DemotionToDiskAndPromotionBack) {
  TempDir d;
  CacheOptions o = Options(2, d.path(), 100);
  o.disk_write_through = false;  // only RAM evictions reach the disk
  auto c = Open(o);
  auto t = Tokens(6 * kC, 3);
  ASSERT_TRUE(PutChunks(*c, kNs1, t, 0, 6).ok());
  ASSERT_TRUE(c->Flush().ok());
  CacheStats s = c->Stats();
  EXPECT_EQ(s.tier[0].entries, 2u);
  EXPECT_EQ(s.demotions, 4u);
  EXPECT_EQ(s.tier[1].entries, 4u);
  LookupResult r = c->Lookup(t, kNs1);
  EXPECT_EQ(r.tokens, 6u * kC);
  EXPECT_EQ(r.chunk_tiers[0], CacheTier::kDisk);
  EXPECT_EQ(r.chunk_tiers[5], CacheTier::kRam);
  auto tiers = GetAndCheck(*c, kNs1, t, 0, 1);
  EXPECT_EQ(tiers, std::vector<CacheTier>{CacheTier::kDisk});
  EXPECT_EQ(c->Stats().promotions, 1u);
  EXPECT_EQ(GetAndCheck(*c, kNs1, t, 0, 1), std::vector<CacheTier>{CacheTier::kRam});
  EXPECT_LE(c->Stats().tier[0].bytes_used, o.ram_budget_bytes);
}

TEST(StoreTest, DiskSurvivesRestart) {
  TempDir d;
  auto t = Tokens(3 * kC, 4);
  {
    auto c = Open(Options(10, d.path(), 10));
    ASSERT_TRUE(PutChunks(*c, kNs1, t, 0, 3).ok());
    ASSERT_TRUE(c->Flush().ok());
  }
  auto c = Open(Options(10, d.path(), 10));
  LookupResult r = c->Lookup(t, kNs1);
  EXPECT_EQ(r.tokens, 3u * kC);
  EXPECT_EQ(r.chunk_tiers, std::vector<CacheTier>(3, CacheTier::kDisk));
  EXPECT_EQ(GetAndCheck(*c, kNs1, t, 0, 3), std::vector<CacheTier>(3, CacheTier::kDisk));
  EXPECT_EQ(c->Lookup(t, kNs1).chunk_tiers, std::vector<CacheTier>(3, CacheTier::kRam));
}

TEST(StoreTest, CorruptDiskChunkIsAMissAndCounted) {
  TempDir d;
  auto t = Tokens(2 * kC, 5);
  auto c = Open(Options(0, d.path(), 10));  // disk only
  ASSERT_TRUE(PutChunks(*c, kNs1, t, 0, 2).ok());
  ASSERT_TRUE(c->Flush().ok());
  const ChunkKey k1 = ComputeChunkKeys(kNs1, t, kC)[1];
  {
    FILE* f = std::fopen(c->disk_tier()->PathOf(k1).c_str(), "r+b");
    ASSERT_NE(f, nullptr);
    std::fseek(f, -1, SEEK_END);
    std::fputc(0x5a, f);
    std::fclose(f);
  }
  size_t ok_tokens = 0;
  auto tiers = GetAndCheck(*c, kNs1, t, 0, 2, &ok_tokens);
  EXPECT_EQ(tiers, std::vector<CacheTier>{CacheTier::kDisk});
  EXPECT_EQ(ok_tokens, size_t{kC});
  EXPECT_EQ(c->Stats().corruptions, 1u);
  EXPECT_EQ(c->Lookup(t, kNs1).tokens, size_t{kC});
}

TEST(StoreTest, BudgetsAreNeverExceeded) {
  TempDir d;
  CacheOptions o = Options(5, d.path(), 12);
  o.ram_budget_bytes += RecordSize() / 2;  // budgets that are not multiples of a record
  o.disk_budget_bytes += 7;
  auto c = Open(o);
  for (uint32_t i = 0; i < 60; ++i) {
    auto t = Tokens(2 * kC, 100 + i);
    ASSERT_TRUE(PutChunks(*c, i % 2 ? kNs1 : kNs2, t, 0, 2).ok());
    CacheStats s = c->Stats();
    ASSERT_LE(s.tier[0].bytes_used, o.ram_budget_bytes);
    ASSERT_LE(s.tier[1].bytes_used, o.disk_budget_bytes);
    ASSERT_LE(c->ram_tier()->bytes_used(), o.ram_budget_bytes);
  }
  ASSERT_TRUE(c->Flush().ok());
  CacheStats s = c->Stats();
  EXPECT_LE(s.tier[1].bytes_used, o.disk_budget_bytes);
  EXPECT_EQ(s.tier[1].entries, 12u);
  EXPECT_GT(s.tier[0].evictions, 0u);
  EXPECT_GT(s.tier[1].evictions, 0u);
}

TEST(StoreTest, PinsAreRespectedUntilTheirTtl) {
  std::atomic<int64_t> now{1'000'000'000};
  CacheOptions o = Options(3);
  o.now_nanos = [&] { return now.load(); };
  auto c = Open(o);
  auto pinned = Tokens(kC, 7);
  ASSERT_TRUE(PutChunks(*c, kNs1, pinned, 0, 1).ok());
  auto pin = c->Pin(pinned, kNs1, 1000ms);
  ASSERT_TRUE(pin.ok());
  for (uint32_t i = 0; i < 10; ++i) ASSERT_TRUE(PutChunks(*c, kNs1, Tokens(kC, 200 + i), 0, 1).ok());
  EXPECT_EQ(c->Lookup(pinned, kNs1).tokens, size_t{kC});  // the oldest, yet kept
  EXPECT_EQ(c->Stats().pins_active, 1u);
  now += 2'000'000'000;  // past the TTL
  for (uint32_t i = 0; i < 3; ++i) ASSERT_TRUE(PutChunks(*c, kNs1, Tokens(kC, 300 + i), 0, 1).ok());
  EXPECT_EQ(c->Lookup(pinned, kNs1).tokens, 0u);
  EXPECT_EQ(c->Unpin(*pin).code(), StatusCode::kNotFound);  // expired
  // Pinned before being put, unpinned explicitly; everything pinned = new chunks skip RAM.
  auto a = Tokens(kC, 8), b = Tokens(kC, 9), x = Tokens(kC, 10), y = Tokens(kC, 11);
  auto pa = c->Pin(a, kNs1, 0ms), pb = c->Pin(b, kNs1, 0ms), px = c->Pin(x, kNs1, 0ms);
  for (auto* t : {&a, &b, &x, &y}) ASSERT_TRUE(PutChunks(*c, kNs1, *t, 0, 1).ok());
  EXPECT_EQ(c->Lookup(y, kNs1).tokens, 0u);
  EXPECT_EQ(c->Stats().puts_rejected, 1u);
  ASSERT_TRUE(c->Unpin(*pb).ok());
  ASSERT_TRUE(PutChunks(*c, kNs1, y, 0, 1).ok());
  EXPECT_EQ(c->Lookup(y, kNs1).tokens, size_t{kC});
  EXPECT_EQ(c->Lookup(b, kNs1).tokens, 0u);
  EXPECT_EQ(c->Lookup(a, kNs1).tokens, size_t{kC});
  (void)pa;
  (void)px;
}

// Each policy through the store, on one hand-made sequence over a RAM tier of 3 chunks:
//   put A, put B, put C, get A, get A, get C, put D  -> which of A, B, C does D push out?
//   and then put E -> which next?
struct PolicyCase {
  const char* policy;
  char first, second;
};

class StorePolicyTest : public ::testing::TestWithParam<PolicyCase> {};

TEST_P(StorePolicyTest, EvictionOrder) {
  CacheOptions o = Options(3);
  o.policy = GetParam().policy;
  auto c = Open(o);
  std::map<char, std::vector<TokenId>> t;
  for (char n : {'A', 'B', 'C', 'D', 'E'}) t[n] = Tokens(kC, static_cast<uint32_t>(n));
  for (char n : {'A', 'B', 'C'}) ASSERT_TRUE(PutChunks(*c, kNs1, t[n], 0, 1).ok());
  for (char n : {'A', 'A', 'C'}) GetAndCheck(*c, kNs1, t[n], 0, 1);
  auto gone = [&]() {
    std::string s;
    for (char n : {'A', 'B', 'C', 'D', 'E'}) {
      if (c->Lookup(t[n], kNs1).tokens == 0) s += n;
    }
    return s;
  };
  ASSERT_TRUE(PutChunks(*c, kNs1, t['D'], 0, 1).ok());
  EXPECT_EQ(gone(), std::string{GetParam().first} + "E");
  ASSERT_TRUE(PutChunks(*c, kNs1, t['E'], 0, 1).ok());
  std::string both{GetParam().first, GetParam().second};
  std::sort(both.begin(), both.end());
  EXPECT_EQ(gone(), both);
}

// lru: B (oldest use), then A (used at t5, before C at t6).
// lfu: B (0 hits), then D (0 hits, newer than B but older than E).
// s3fifo: B (small queue), then D (small queue; A and C are in main).
// cost: all chunks cost the same per byte here, hits decide: B, then D.
INSTANTIATE_TEST_SUITE_P(All, StorePolicyTest,
                         ::testing::Values(PolicyCase{"lru", 'B', 'A'},
                                           PolicyCase{"lfu", 'B', 'D'},
                                           PolicyCase{"s3fifo", 'B', 'D'},
                                           PolicyCase{"cost", 'B', 'D'}),
                         [](const auto& info) { return std::string(info.param.policy); });

// A fake remote tier: a RamTier that can be told to be slow.
class FakeRemote final : public Tier {
 public:
  std::string_view name() const override { return "fake-redis"; }
  Status Put(const ChunkKey& k, std::span<const std::byte> r, uint32_t ttl) override {
    return ram.Put(k, r, ttl);
  }
  Result<std::vector<std::byte>> Get(const ChunkKey& k, Deadline d) override {
    if (delay.count() > 0) std::this_thread::sleep_for(delay);
    return ram.Get(k, d);
  }
  std::vector<bool> ContainsMany(std::span<const ChunkKey> k, Deadline d) override {
    return ram.ContainsMany(k, d);
  }
  Status Erase(const ChunkKey& k) override { return ram.Erase(k); }
  TierStats Stats() const override { return ram.Stats(); }
  RamTier ram{0};
  std::chrono::milliseconds delay{0};
};

TEST(StoreTest, RemoteTierIsSharedAndPromotes) {
  FakeRemote remote;
  auto t = Tokens(3 * kC, 12);
  {
    CacheOptions o = Options(10);
    o.remote_tier = &remote;
    auto c = Open(o);
    ASSERT_TRUE(PutChunks(*c, kNs1, t, 0, 3).ok());
    ASSERT_TRUE(c->Flush().ok());
    EXPECT_EQ(remote.ram.Stats().entries, 3u);
  }
  CacheOptions o = Options(10);  // another "process" sharing the remote tier
  o.remote_tier = &remote;
  auto c = Open(o);
  LookupResult r = c->Lookup(t, kNs1);
  EXPECT_EQ(r.chunk_tiers, std::vector<CacheTier>(3, CacheTier::kRedis));
  EXPECT_EQ(GetAndCheck(*c, kNs1, t, 0, 3), std::vector<CacheTier>(3, CacheTier::kRedis));
  EXPECT_EQ(c->Lookup(t, kNs1).chunk_tiers, std::vector<CacheTier>(3, CacheTier::kRam));
  EXPECT_EQ(c->Stats().tier[2].hit_chunks, 3u);
}

// A remote tier like Redis (records by namespace, ClearNamespace) whose writes and reads can be
// held: a held write blocks until Release(), a held read finds its record and then blocks, so
// that a test can erase or clear while one is in flight.
class HeldRemote final : public Tier {
 public:
  std::string_view name() const override { return "held-redis"; }
  Status Put(const ChunkKey& k, std::span<const std::byte> r, uint32_t ttl) override {
    return PutIn(Hash128{}, k, r, ttl);
  }
  Status PutIn(const Hash128& ns, const ChunkKey& k, std::span<const std::byte> r,
               uint32_t) override {
    std::unique_lock lock(mu_);
    ++puts_started_;
    cv_.notify_all();
    cv_.wait(lock, [&] { return !held_; });
    records_[k] = {ns, std::vector<std::byte>(r.begin(), r.end())};
    return Status::Ok();
  }
  Result<std::vector<std::byte>> Get(const ChunkKey& k, Deadline) override {
    std::unique_lock lock(mu_);
    const auto it = records_.find(k);
    if (it == records_.end()) return NotFound("no such record");
    std::vector<std::byte> record = it->second.second;
    ++gets_started_;
    cv_.notify_all();
    cv_.wait(lock, [&] { return !gets_held_; });
    return record;
  }
  std::vector<bool> ContainsMany(std::span<const ChunkKey> keys, Deadline) override {
    std::lock_guard lock(mu_);
    std::vector<bool> out;
    for (const ChunkKey& k : keys) out.push_back(records_.count(k) != 0);
    return out;
  }
  Status Erase(const ChunkKey& k) override {
    std::lock_guard lock(mu_);
    records_.erase(k);
    return Status::Ok();
  }
  Status ClearNamespace(const Hash128& ns) override {
    std::lock_guard lock(mu_);
    std::erase_if(records_, [&](const auto& kv) { return kv.second.first == ns; });
    return Status::Ok();
  }
  TierStats Stats() const override {
    std::lock_guard lock(mu_);
    TierStats st;
    st.entries = records_.size();
    return st;
  }
  void Hold() {
    std::lock_guard lock(mu_);
    held_ = true;
  }
  void HoldReads() {
    std::lock_guard lock(mu_);
    gets_held_ = true;
  }
  void Release() {
    std::lock_guard lock(mu_);
    held_ = gets_held_ = false;
    cv_.notify_all();
  }
  // Wait until `n` writes (reads that found their record) have started, each held if Hold()
  // (HoldReads()) was called.
  void WaitForPuts(int n) {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return puts_started_ >= n; });
  }
  void WaitForReads(int n) {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return gets_started_ >= n; });
  }
  size_t Count() const { return Stats().entries; }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool held_ = false, gets_held_ = false;
  int puts_started_ = 0, gets_started_ = 0;
  std::map<ChunkKey, std::pair<Hash128, std::vector<std::byte>>> records_;
};

// A write-through to the remote tier queued before a tenant's clear (or an Erase) and landing
// after it must not bring the cleared KV back for every server sharing the tier; a write
// queued after the clear lands as usual.
TEST(StoreTest, AWriteInFlightDuringAClearOrEraseLeavesTheRemoteTierWithoutIt) {
  for (const bool clear : {true, false}) {
    SCOPED_TRACE(clear ? "clear" : "erase");
    HeldRemote remote;
    CacheOptions o = Options(10);
    o.remote_tier = &remote;
    auto c = Open(o);
    const auto t = Tokens(3 * kC, 40);
    const auto other = Tokens(2 * kC, 41);
    remote.Hold();
    ASSERT_TRUE(PutChunks(*c, kNs1, t, 0, 3).ok());  // 3 writes: the first held in the tier
    remote.WaitForPuts(1);
    ASSERT_TRUE((clear ? c->Clear(kNs1) : c->Erase(t, kNs1)).ok());
    ASSERT_TRUE(PutChunks(*c, kNs2, other, 0, 2).ok());  // queued after: not affected
    remote.Release();
    ASSERT_TRUE(c->Flush().ok());
    EXPECT_EQ(remote.Count(), 2u) << "only the other namespace's 2 chunks";
    EXPECT_EQ(c->Lookup(t, kNs1).chunk_tiers.size(), 0u);
    // The same chunks put again are written again.
    ASSERT_TRUE(PutChunks(*c, kNs1, t, 0, 3).ok());
    ASSERT_TRUE(c->Flush().ok());
    EXPECT_EQ(remote.Count(), 5u);
  }
}

// Likewise a load: a chunk read from the remote tier before a clear (or an Erase) and
// arriving after it serves that load, but RAM does not take it back.
TEST(StoreTest, ALoadInFlightDuringAClearOrEraseDoesNotPromoteIt) {
  for (const bool clear : {true, false}) {
    SCOPED_TRACE(clear ? "clear" : "erase");
    HeldRemote remote;
    CacheOptions o = Options(10);
    o.remote_tier = &remote;
    const auto t = Tokens(2 * kC, 42);
    {
      auto writer = Open(o);  // another server, which wrote the chunks
      ASSERT_TRUE(PutChunks(*writer, kNs1, t, 0, 2).ok());
      ASSERT_TRUE(writer->Flush().ok());
    }
    ASSERT_EQ(remote.Count(), 2u);
    auto c = Open(o);
    remote.HoldReads();
    auto h = c->Get(kNs1, t, 0, 2, std::chrono::steady_clock::now() + 30s);
    remote.WaitForReads(1);  // chunk 0 read, not yet back
    ASSERT_TRUE((clear ? c->Clear(kNs1) : c->Erase(t, kNs1)).ok());
    remote.Release();
    h->Wait();
    EXPECT_TRUE(h->chunk(0).status.ok()) << "the load in flight is served";
    const LookupResult r = c->Lookup(t, kNs1);
    EXPECT_EQ(r.chunk_tiers.size(), 0u) << "nothing came back into RAM";
    // Loads queued after the erasure promote as usual.
    ASSERT_TRUE(PutChunks(*c, kNs2, t, 0, 2).ok());
    ASSERT_TRUE(c->Flush().ok());
    auto c2 = Open(o);
    EXPECT_EQ(GetAndCheck(*c2, kNs2, t, 0, 2), std::vector<CacheTier>(2, CacheTier::kRedis));
    EXPECT_EQ(c2->Lookup(t, kNs2).chunk_tiers, std::vector<CacheTier>(2, CacheTier::kRam));
  }
}

// A remote tier behind a slow link: every read takes its bytes / bytes_per_s.
class SlowLinkRemote final : public Tier {
 public:
  explicit SlowLinkRemote(double bytes_per_s) : bytes_per_s_(bytes_per_s) {}
  std::string_view name() const override { return "slow-link"; }
  Status Put(const ChunkKey& k, std::span<const std::byte> r, uint32_t ttl) override {
    return ram.Put(k, r, ttl);
  }
  Result<std::vector<std::byte>> Get(const ChunkKey& k, Deadline d) override {
    auto got = ram.Get(k, d);
    if (got.ok()) {
      std::this_thread::sleep_for(std::chrono::duration<double>(got->size() / bytes_per_s_));
    }
    return got;
  }
  std::vector<bool> ContainsMany(std::span<const ChunkKey> k, Deadline d) override {
    return ram.ContainsMany(k, d);
  }
  Status Erase(const ChunkKey& k) override { return ram.Erase(k); }
  TierStats Stats() const override { return ram.Stats(); }
  RamTier ram{0};

 private:
  const double bytes_per_s_;
};

TEST(StoreTest, AdaptiveLoadingPicksTheLevelThatFitsTheDeadlineOrGivesUp) {
  // KV-like chunks big enough for int4 to be ~3.5x smaller than raw: 32 KiB raw each.
  ChunkLayout l;
  l.n_layer = 4;
  l.n_kv_head = 2;
  l.head_dim = 64;
  l.n_tokens = kC;
  l.kv_type = 1;
  constexpr size_t kChunks = 8;
  const auto t = Tokens(kChunks * kC, 77);
  std::mt19937 rng(std::random_device{}());
  std::normal_distribution<float> normal;
  std::vector<std::vector<std::byte>> raw(kChunks);
  std::vector<ByteSpan> spans;
  for (auto& r : raw) {
    std::vector<float> v(l.raw_bytes() / 2);
    for (float& x : v) x = normal(rng);
    r = testing::ToRaw(l, v);
    spans.emplace_back(r);
  }
  // Raw reads take 100 ms a chunk on this link, int4 ones about 28 ms.
  SlowLinkRemote remote(static_cast<double>(l.raw_bytes()) / 0.100);
  auto options = [&] {
    CacheOptions o;
    o.chunk_tokens = kC;
    o.ram_budget_bytes = 64 << 20;
    o.remote_tier = &remote;
    o.remote_levels = {"int4"};
    return o;
  };
  {
    auto writer = Open(options());
    ASSERT_TRUE(writer->Put(kNs1, t, 0, l, spans).ok());
    ASSERT_TRUE(writer->Flush().ok());
  }
  EXPECT_EQ(remote.ram.Stats().entries, 2 * kChunks);  // raw and int4 of each chunk

  auto load = [&](Cache& c, size_t first, std::chrono::milliseconds deadline) {
    auto h = c.Get(kNs1, t, first, kChunks - first, std::chrono::steady_clock::now() + deadline);
    h->Wait();
    return h;
  };
  {  // Time enough for raw: every chunk exact, and promoted.
    auto c = Open(options());
    auto h = load(*c, 0, 5s);
    ASSERT_EQ(h->ready_tokens(), kChunks * kC);
    for (size_t i = 0; i < kChunks; ++i) {
      ASSERT_EQ(std::memcmp(h->chunk(i).bytes().data(), raw[i].data(), raw[i].size()), 0) << i;
    }
    EXPECT_EQ(c->Stats().remote_lower_level_chunks, 0u);
    EXPECT_EQ(c->Lookup(t, kNs1).chunk_tiers, std::vector<CacheTier>(kChunks, CacheTier::kRam));
  }
  auto c = Open(options());
  {  // 600 ms where raw needs 800: the first chunk (raw: nothing measured yet) measures the
     // link, the next ones come as int4 until the time left lets the rest come raw again (the
     // best level whose transfer of all the remaining chunks fits). Those read as int4 are
     // within int4's error and not promoted; the raw ones are exact and promoted.
    const auto t0 = std::chrono::steady_clock::now();
    auto h = load(*c, 0, 600ms);
    ASSERT_EQ(h->ready_tokens(), kChunks * kC);
    EXPECT_LT(std::chrono::steady_clock::now() - t0, 600ms);
    const CacheStats s = c->Stats();
    EXPECT_GE(s.remote_lower_level_chunks, 1u);
    EXPECT_EQ(s.remote_recompute_chunks, 0u);
    size_t exact = 0;
    for (size_t i = 0; i < kChunks; ++i) {
      if (std::memcmp(h->chunk(i).bytes().data(), raw[i].data(), raw[i].size()) == 0) {
        ++exact;
        continue;
      }
      const auto want = testing::FromRaw(l, raw[i]);
      const auto got = testing::FromRaw(l, h->chunk(i).bytes());
      double worst = 0;
      for (size_t k = 0; k < want.size(); ++k) {
        worst = std::max<double>(worst, std::abs(got[k] - want[k]));
      }
      EXPECT_LT(worst, 1.0) << "chunk " << i;  // int4 of N(0,1): a step of ~range/15
    }
    EXPECT_EQ(exact, kChunks - s.remote_lower_level_chunks);
    const LookupResult r = c->Lookup(t, kNs1);
    EXPECT_EQ(static_cast<size_t>(
                  std::count(r.chunk_tiers.begin(), r.chunk_tiers.end(), CacheTier::kRam)),
              exact);
  }
  {  // 100 ms for the ~200 that the seven chunks need even as int4: given up at once, for the
     // caller to recompute. Told by the counts, as on disk (no clock: a loaded machine is slow).
    const int kRedis = static_cast<int>(CacheTier::kRedis);
    const CacheStats before = c->Stats();
    auto h = load(*c, 1, 100ms);  // chunk 0 is in RAM now
    EXPECT_EQ(h->ready_tokens(), 0u);
    EXPECT_EQ(h->chunk(0).status.code(), StatusCode::kDeadlineExceeded);
    const CacheStats after = c->Stats();
    EXPECT_EQ(after.remote_recompute_chunks, before.remote_recompute_chunks + 1);
    EXPECT_EQ(after.tier[kRedis].bytes_out, before.tier[kRedis].bytes_out)
        << "decided without reading";
    EXPECT_EQ(after.tier[kRedis].hit_chunks, before.tier[kRedis].hit_chunks);
    EXPECT_EQ(after.deadline_misses, before.deadline_misses) << "given up, not timed out";
  }
  {  // A clear takes each chunk's level records with it, also from a tier that cannot list a
     // namespace (the chunks this process wrote, as Erase does).
    auto writer = Open(options());
    ASSERT_TRUE(writer->Put(kNs1, t, 0, l, spans).ok());
    ASSERT_TRUE(writer->Flush().ok());
    ASSERT_TRUE(writer->Clear(kNs1).ok());
    EXPECT_EQ(remote.ram.Stats().entries, 0u);
  }
}

// KV-like chunks big enough for int4 to be ~3.5x smaller than raw: 32 KiB raw each, N(0,1).
ChunkLayout LevelsLayout() {
  ChunkLayout l;
  l.n_layer = 4;
  l.n_kv_head = 2;
  l.head_dim = 64;
  l.n_tokens = kC;
  l.kv_type = 1;
  return l;
}

std::vector<std::vector<std::byte>> NormalChunks(const ChunkLayout& l, size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<std::vector<std::byte>> raw(n);
  for (auto& r : raw) {
    std::vector<float> v(l.raw_bytes() / 2);
    for (float& x : v) x = normal(rng);
    r = testing::ToRaw(l, v);
  }
  return raw;
}

// The disk tier's files at `level` (0: chunk records).
size_t DiskFilesAt(TieredStore& c, int level) {
  size_t n = 0;
  for (const DiskEntry& e : c.disk_tier()->Entries()) n += e.level == level ? 1 : 0;
  return n;
}

// The same controller on the disk tier: a restarted store (RAM empty) restores from a disk
// that reads at 100 ms a raw chunk (simulated: every read sleeps its bytes / bandwidth).
TEST(StoreTest, AdaptiveLoadingFromDiskPicksTheLevelThatFitsTheDeadlineOrGivesUp) {
  const ChunkLayout l = LevelsLayout();
  constexpr size_t kChunks = 8;
  const auto t = Tokens(kChunks * kC, 78);
  const auto raw = NormalChunks(l, kChunks, 78);
  std::vector<ByteSpan> spans(raw.begin(), raw.end());
  TempDir dir;
  std::atomic<int> reads{0};  // disk reads, through the simulated disk
  auto open = [&] {
    CacheOptions o;
    o.chunk_tokens = kC;
    o.ram_budget_bytes = 64 << 20;
    o.disk_dir = dir.path();
    o.disk_budget_bytes = 64 << 20;
    o.disk_sync = false;
    o.disk_levels = {"int4"};
    auto c = Open(o);
    const double bytes_per_s = static_cast<double>(l.raw_bytes()) / 0.100;
    if (c != nullptr) {
      c->disk_tier()->SetReadHookForTesting([bytes_per_s, &reads](uint64_t bytes) {
        ++reads;
        std::this_thread::sleep_for(
            std::chrono::duration<double>(static_cast<double>(bytes) / bytes_per_s));
      });
    }
    return c;
  };
  {
    auto writer = open();
    ASSERT_NE(writer, nullptr);
    ASSERT_TRUE(writer->Put(kNs1, t, 0, l, spans).ok());
    ASSERT_TRUE(writer->Flush().ok());
    EXPECT_EQ(DiskFilesAt(*writer, 0), kChunks);  // raw and int4 of each chunk
    EXPECT_EQ(DiskFilesAt(*writer, 1), kChunks);
  }
  auto load = [&](Cache& c, size_t first, std::chrono::milliseconds deadline) {
    auto h = c.Get(kNs1, t, first, kChunks - first, std::chrono::steady_clock::now() + deadline);
    h->Wait();
    return h;
  };
  {  // Time enough for raw: every chunk exact, from disk, and promoted.
    auto c = open();
    ASSERT_NE(c, nullptr);
    EXPECT_EQ(DiskFilesAt(*c, 1), kChunks) << "a restart keeps the levels";
    EXPECT_EQ(c->Lookup(t, kNs1).chunk_tiers, std::vector<CacheTier>(kChunks, CacheTier::kDisk));
    auto h = load(*c, 0, 5s);
    ASSERT_EQ(h->ready_tokens(), kChunks * kC);
    for (size_t i = 0; i < kChunks; ++i) {
      EXPECT_EQ(h->chunk(i).tier, CacheTier::kDisk);
      ASSERT_EQ(std::memcmp(h->chunk(i).bytes().data(), raw[i].data(), raw[i].size()), 0) << i;
    }
    EXPECT_EQ(c->Lookup(t, kNs1).chunk_tiers, std::vector<CacheTier>(kChunks, CacheTier::kRam));
  }
  auto c = open();
  ASSERT_NE(c, nullptr);
  size_t lower = 0;
  {  // 600 ms where raw needs 800: the first chunk (raw: nothing measured yet) measures the
     // disk, then int4 until raw fits the time left again. Lower chunks are within int4's
     // error and stay on disk only; the raw ones are exact and promoted.
    const auto t0 = std::chrono::steady_clock::now();
    auto h = load(*c, 0, 600ms);
    ASSERT_EQ(h->ready_tokens(), kChunks * kC);
    EXPECT_LT(std::chrono::steady_clock::now() - t0, 600ms);
    const LookupResult r = c->Lookup(t, kNs1);
    ASSERT_EQ(r.chunk_tiers.size(), kChunks);
    for (size_t i = 0; i < kChunks; ++i) {
      EXPECT_EQ(h->chunk(i).tier, CacheTier::kDisk);
      if (std::memcmp(h->chunk(i).bytes().data(), raw[i].data(), raw[i].size()) == 0) {
        EXPECT_EQ(r.chunk_tiers[i], CacheTier::kRam) << "exact chunk " << i << " promoted";
        continue;
      }
      ++lower;
      EXPECT_EQ(r.chunk_tiers[i], CacheTier::kDisk) << "lower chunk " << i << " not promoted";
      const auto want = testing::FromRaw(l, raw[i]);
      const auto got = testing::FromRaw(l, h->chunk(i).bytes());
      double worst = 0;
      for (size_t k = 0; k < want.size(); ++k) {
        worst = std::max<double>(worst, std::abs(got[k] - want[k]));
      }
      EXPECT_LT(worst, 1.0) << "chunk " << i;  // int4 of N(0,1): a step of ~range/15
    }
    EXPECT_GE(lower, 1u);
    const CacheStats s = c->Stats();
    EXPECT_EQ(s.remote_lower_level_chunks + s.remote_recompute_chunks, 0u) << "not Redis's";
    EXPECT_EQ(s.disk_lower_level_chunks, lower);
  }
  {  // 20 ms for what needs ~28 a chunk even as int4: given up at once, for a recompute.
    const std::vector<CacheTier> tiers = c->Lookup(t, kNs1).chunk_tiers;
    const size_t first = static_cast<size_t>(
        std::find(tiers.begin(), tiers.end(), CacheTier::kDisk) - tiers.begin());
    ASSERT_LT(first, kChunks);
    const int reads_before = reads.load();
    auto h = load(*c, first, 20ms);
    EXPECT_EQ(h->ready_tokens(), 0u);
    EXPECT_EQ(h->chunk(0).status.code(), StatusCode::kDeadlineExceeded);
    EXPECT_EQ(reads.load(), reads_before) << "decided without reading";
    EXPECT_EQ(c->Stats().disk_recompute_chunks, 1u);
  }
  // A level file whose chunk record is gone is removed at the next start.
  const ChunkKey last = ComputeChunkKeys(kNs1, t, kC).back();
  const std::string last_record = c->disk_tier()->PathOf(last);
  const std::string last_level = c->disk_tier()->PathOf(LevelKey(last, 1));
  ASSERT_TRUE(std::filesystem::exists(last_level));
  c.reset();
  ASSERT_TRUE(std::filesystem::remove(last_record));
  c = open();
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(DiskFilesAt(*c, 0), kChunks - 1);
  EXPECT_EQ(DiskFilesAt(*c, 1), kChunks - 1);
  EXPECT_FALSE(std::filesystem::exists(last_level));
  // Clear removes every file of the namespace, levels included.
  ASSERT_TRUE(c->Clear(kNs1).ok());
  EXPECT_TRUE(c->disk_tier()->Entries().empty());
  EXPECT_EQ(c->Stats().tier[1].bytes_used, 0u);
  size_t files = 0;
  for (const auto& f : std::filesystem::recursive_directory_iterator(dir.path() + "/chunks")) {
    files += f.is_regular_file() ? 1 : 0;
  }
  EXPECT_EQ(files, 0u);
}

TEST(StoreTest, DiskLevelsAreChargedToTheirChunkAndEvictedWithIt) {
  // No RAM tier: every put goes to disk, with its int4 level, into room for about three.
  const ChunkLayout l = LevelsLayout();
  constexpr size_t kChunks = 8;
  const auto t = Tokens(kChunks * kC, 79);
  const auto raw = NormalChunks(l, kChunks, 79);
  std::vector<ByteSpan> spans(raw.begin(), raw.end());
  TempDir dir;
  const uint64_t record = RecordHeaderBytes(kC) + l.raw_bytes();
  CacheOptions o;
  o.chunk_tokens = kC;
  o.ram_budget_bytes = 0;
  o.disk_dir = dir.path();
  // Room for three chunks with their levels (int4 is ~0.3 of a record), not four, and for
  // four records without levels: a store that forgot the levels would overfill the disk.
  o.disk_budget_bytes = 4 * record + record / 2;
  o.disk_sync = false;
  o.disk_levels = {"int4"};
  uint64_t used = 0;
  {
    auto c = Open(o);
    ASSERT_NE(c, nullptr);
    for (size_t i = 0; i < kChunks; ++i) {
      ASSERT_TRUE(c->Put(kNs1, t, i, l, std::span(spans).subspan(i, 1)).ok());
      ASSERT_TRUE(c->Flush().ok());
    }
    const CacheStats s = c->Stats();
    used = s.tier[1].bytes_used;
    EXPECT_LE(used, o.disk_budget_bytes);
    EXPECT_GE(s.tier[1].evictions, kChunks - 3);
    EXPECT_EQ(DiskFilesAt(*c, 0), 3u);
    // Every level file has its chunk's record beside it: none outlived an eviction.
    std::set<ChunkKey> chunks, levels;
    for (const DiskEntry& e : c->disk_tier()->Entries()) {
      (e.level == 0 ? chunks : levels).insert(e.chunk);
    }
    EXPECT_EQ(levels, chunks);
    // The newest chunks are there, and load exactly.
    auto h = c->Get(kNs1, t, kChunks - 3, 3, std::chrono::steady_clock::now() + 5s);
    h->Wait();
    ASSERT_EQ(h->ready_tokens(), 3u * kC);
    EXPECT_EQ(std::memcmp(h->chunk(2).bytes().data(), raw.back().data(), raw.back().size()), 0);
  }
  // After a restart the levels are charged again: a put evicts a whole chunk to fit (had the
  // store forgotten the levels, it would not evict and the disk tier would refuse the write).
  auto c = Open(o);
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->Stats().tier[1].bytes_used, used);
  ASSERT_TRUE(c->Put(kNs1, t, 0, l, std::span(spans).subspan(0, 1)).ok());
  ASSERT_TRUE(c->Flush().ok());
  const CacheStats s = c->Stats();
  EXPECT_LE(s.tier[1].bytes_used, o.disk_budget_bytes);
  EXPECT_EQ(s.tier[1].errors, 0u);
  EXPECT_EQ(s.tier[1].evictions, 1u);
  ASSERT_FALSE(c->Lookup(t, kNs1).chunk_tiers.empty());
  EXPECT_EQ(c->Lookup(t, kNs1).chunk_tiers[0], CacheTier::kDisk);
  EXPECT_EQ(DiskFilesAt(*c, 0), 3u);
  EXPECT_EQ(DiskFilesAt(*c, 1), 3u);
}

// Replays the store's KV events into the set of (medium, block) they say is held, counting
// protocol errors (stored twice, removed while not held, a wrong block size).
struct EventSet final : KvEventSink {
  std::mutex mu;
  std::set<std::pair<KvMedium, uint64_t>> live;
  int errors = 0;
  void Emit(KvEvent e) override {
    std::lock_guard lock(mu);
    for (uint64_t h : e.block_hashes) {
      if (e.kind == KvEvent::Kind::kStored) {
        if (!live.emplace(e.medium, h).second || e.block_size != kC) ++errors;
      } else if (e.kind == KvEvent::Kind::kRemoved && live.erase({e.medium, h}) == 0) {
        ++errors;
      }
    }
  }
  size_t count(KvMedium m) {
    std::lock_guard lock(mu);
    size_t n = 0;
    for (const auto& [medium, h] : live) n += medium == m ? 1 : 0;
    return n;
  }
};

TEST(StoreTest, EventsReportEveryChunkEnteringAndLeavingEachTier) {
  TempDir dir;
  FakeRemote remote;
  EventSet events;
  CacheOptions o = Options(4, dir.path(), 6);  // RAM 4 chunks, disk 6: both evict
  o.event_sink = &events;
  o.remote_tier = &remote;
  std::vector<std::vector<TokenId>> seqs;
  for (uint32_t s = 0; s < 5; ++s) seqs.push_back(Tokens(3 * kC, 100 + s));
  {
    auto c = Open(o);
    for (const auto& t : seqs) {
      ASSERT_TRUE(PutChunks(*c, kNs1, t, 0, 3).ok());
      ASSERT_TRUE(c->Flush().ok());
      GetAndCheck(*c, kNs1, seqs[0], 0, 3);  // promotions and demotions too
    }
    ASSERT_TRUE(c->Flush().ok());
    // The events' view equals each tier's contents, block for block.
    std::set<uint64_t> on_disk;
    for (const DiskEntry& d : c->disk_tier()->Entries()) on_disk.insert(KvBlockHash(d.key));
    size_t in_ram = 0;
    for (const auto& t : seqs) {
      for (const ChunkKey& k : ComputeChunkKeys(kNs1, t, kC)) {
        const bool ram = c->ram_tier()->GetShared(k) != nullptr;
        in_ram += ram ? 1 : 0;
        std::lock_guard lock(events.mu);
        EXPECT_EQ(events.live.count({KvMedium::kRam, KvBlockHash(k)}) != 0, ram);
        EXPECT_EQ(events.live.count({KvMedium::kDisk, KvBlockHash(k)}) != 0,
                  on_disk.count(KvBlockHash(k)) != 0);
        EXPECT_EQ(events.live.count({KvMedium::kRedis, KvBlockHash(k)}) != 0,
                  remote.ram.GetShared(k) != nullptr);
      }
    }
    EXPECT_EQ(events.count(KvMedium::kRam), in_ram);
    EXPECT_EQ(events.count(KvMedium::kDisk), on_disk.size());
    EXPECT_GT(in_ram, 0u);
    EXPECT_GT(on_disk.size(), 0u);
    EXPECT_EQ(events.count(KvMedium::kRedis), 15u);  // every put reached the remote tier
    EXPECT_EQ(events.errors, 0);
  }
  // A restarted store reports the disk's survivors as stored when it opens them.
  EventSet reopened;
  o.event_sink = &reopened;
  {
    auto c = Open(o);
    std::set<uint64_t> on_disk;
    for (const DiskEntry& d : c->disk_tier()->Entries()) on_disk.insert(KvBlockHash(d.key));
    EXPECT_EQ(reopened.count(KvMedium::kDisk), on_disk.size());
    EXPECT_GT(on_disk.size(), 0u);
    // Clear leaves nothing held anywhere, Redis included.
    ASSERT_TRUE(c->Clear(kNs1).ok());
    ASSERT_TRUE(c->Flush().ok());
    EXPECT_EQ(reopened.count(KvMedium::kRam) + reopened.count(KvMedium::kDisk), 0u);
    EXPECT_EQ(reopened.errors, 0);
  }
}

TEST(StoreTest, CollisionIsAMissNeverWrongData) {
  FakeRemote remote;
  CacheOptions o = Options(10);
  o.remote_tier = &remote;
  auto c = Open(o);
  auto t = Tokens(kC, 13), other = Tokens(kC, 14);
  // A valid record of other tokens, filed under the key of `t` (what a collision looks like).
  auto rec = testing::MakeRecord(kNs1, other, 1);
  const ChunkKey k = ComputeChunkKeys(kNs1, t, kC)[0];
  ASSERT_TRUE(remote.Put(k, rec, 0).ok());
  EXPECT_EQ(c->Lookup(t, kNs1).tokens, size_t{kC});  // a hint only
  auto h = c->Get(kNs1, t, 0, 1, std::chrono::steady_clock::now() + 5s);
  h->Wait();
  EXPECT_EQ(h->chunk(0).status.code(), StatusCode::kNotFound);
  EXPECT_EQ(c->Stats().collisions, 1u);
  // A corrupt remote value: a miss, counted, and removed from the remote tier.
  rec = testing::MakeRecord(kNs1, t, 1);
  rec.back() ^= std::byte{1};
  ASSERT_TRUE(remote.Put(k, rec, 0).ok());
  h = c->Get(kNs1, t, 0, 1, std::chrono::steady_clock::now() + 5s);
  h->Wait();
  EXPECT_EQ(h->chunk(0).status.code(), StatusCode::kNotFound);
  EXPECT_EQ(c->Stats().tier[2].corruptions, 1u);
  EXPECT_EQ(remote.ram.Stats().entries, 0u);
}

// A remote tier whose calls throw, as a hostile value's huge allocation would (bad_alloc).
class ThrowingRemote final : public Tier {
 public:
  std::string_view name() const override { return "throwing"; }
  Status Put(const ChunkKey&, std::span<const std::byte>, uint32_t) override {
    ++puts;
    throw std::bad_alloc();
  }
  Result<std::vector<std::byte>> Get(const ChunkKey&, Deadline) override {
    ++gets;
    throw std::bad_alloc();
  }
  std::vector<bool> ContainsMany(std::span<const ChunkKey> k, Deadline) override {
    return std::vector<bool>(k.size(), true);
  }
  Status Erase(const ChunkKey&) override { return Status::Ok(); }
  TierStats Stats() const override { return {}; }
  std::atomic<int> puts{0}, gets{0};
};

TEST(StoreTest, ExceptionInALoadOrWriteJobIsAFailedChunkNotACrash) {
  ThrowingRemote remote;
  CacheOptions o = Options(10);
  o.remote_tier = &remote;
  auto a = Open(o);
  auto t = Tokens(2 * kC, 21);
  ASSERT_TRUE(PutChunks(*a, kNs1, t, 0, 2).ok());
  ASSERT_TRUE(a->Flush().ok());
  EXPECT_EQ(remote.puts.load(), 2);
  EXPECT_EQ(a->Stats().tier[2].errors, 2u);  // both write jobs threw, were caught and counted
  EXPECT_EQ(GetAndCheck(*a, kNs1, t, 0, 2), std::vector<CacheTier>(2, CacheTier::kRam));
  auto b = Open(o);  // nothing in RAM: the load job asks the throwing tier
  for (int round = 1; round <= 2; ++round) {  // the load thread survives the first
    auto h = b->Get(kNs1, t, 0, 2, std::chrono::steady_clock::now() + 5s);
    h->Wait();
    EXPECT_EQ(h->chunk(0).status.code(), StatusCode::kNotFound) << h->chunk(0).status.ToString();
    EXPECT_EQ(h->ready_tokens(), 0u);
    EXPECT_EQ(remote.gets.load(), round);
    EXPECT_EQ(b->Stats().tier[2].errors, static_cast<uint64_t>(round));
  }
  ASSERT_TRUE(PutChunks(*b, kNs1, t, 0, 2).ok());  // and the io thread too
  ASSERT_TRUE(b->Flush().ok());
  EXPECT_EQ(remote.puts.load(), 4);
}

TEST(StoreTest, SlowRemoteMeetsTheDeadline) {
  FakeRemote remote;
  auto t = Tokens(2 * kC, 15);
  {
    CacheOptions o = Options(10);
    o.remote_tier = &remote;
    auto c = Open(o);
    ASSERT_TRUE(PutChunks(*c, kNs1, t, 0, 2).ok());
  }
  remote.delay = 300ms;
  CacheOptions o = Options(10);
  o.remote_tier = &remote;
  auto c = Open(o);
  const auto start = std::chrono::steady_clock::now();
  auto h = c->Get(kNs1, t, 0, 2, start + 50ms);
  h->Wait();
  EXPECT_LT(std::chrono::steady_clock::now() - start, 250ms);
  EXPECT_EQ(h->chunk(0).status.code(), StatusCode::kDeadlineExceeded);
  EXPECT_EQ(h->ready_tokens(), 0u);
  EXPECT_EQ(c->Stats().deadline_misses, 2u);
}

TEST(StoreTest, AdmissionAfterHits) {
  TempDir d;
  CacheOptions o = Options(10, d.path(), 10);
  o.admit_after_hits = 2;
  auto c = Open(o);
  auto t = Tokens(kC, 16);
  ASSERT_TRUE(PutChunks(*c, kNs1, t, 0, 1).ok());
  ASSERT_TRUE(c->Flush().ok());
  EXPECT_EQ(c->Stats().tier[1].entries, 0u);
  GetAndCheck(*c, kNs1, t, 0, 1);
  ASSERT_TRUE(c->Flush().ok());
  EXPECT_EQ(c->Stats().tier[1].entries, 0u);
  GetAndCheck(*c, kNs1, t, 0, 1);
  ASSERT_TRUE(c->Flush().ok());
  EXPECT_EQ(c->Stats().tier[1].entries, 1u);
}

// Puts 5 chunks in each of kNs1 and kNs2 through a store opened with `o`, and returns how many
// of each the store kept.
std::pair<int, int> KeptOfFivePerNamespace(const CacheOptions& o) {
  auto c = Open(o);
  for (uint32_t i = 0; i < 5; ++i) EXPECT_TRUE(PutChunks(*c, kNs1, Tokens(kC, 400 + i), 0, 1).ok());
  for (uint32_t i = 0; i < 5; ++i) EXPECT_TRUE(PutChunks(*c, kNs2, Tokens(kC, 500 + i), 0, 1).ok());
  int ns1 = 0, ns2 = 0;
  for (uint32_t i = 0; i < 5; ++i) {
    ns1 += c->Lookup(Tokens(kC, 400 + i), kNs1).tokens != 0;
    ns2 += c->Lookup(Tokens(kC, 500 + i), kNs2).tokens != 0;
  }
  return {ns1, ns2};
}

TEST(StoreTest, NamespaceQuota) {
  CacheOptions o = Options(10);
  o.quotas.push_back({kNs1, 2 * RecordSize(), 0});
  const auto [ns1, ns2] = KeptOfFivePerNamespace(o);
  EXPECT_EQ(ns1, 2);
  EXPECT_EQ(ns2, 5);
}

TEST(StoreTest, DefaultQuotaBoundsEveryTenantWithoutItsOwn) {
  CacheOptions o = Options(10);
  o.default_quota_bytes = 2 * RecordSize();
  o.quotas.push_back({kNs2, 4 * RecordSize(), 0});
  const auto [ns1, ns2] = KeptOfFivePerNamespace(o);
  EXPECT_EQ(ns1, 2);  // the default
  EXPECT_EQ(ns2, 4);  // its own quota wins
}

TEST(StoreTest, NamespacesAreIsolated) {
  TempDir d;
  auto c = Open(Options(10, d.path(), 10));
  auto t = Tokens(2 * kC, 17);
  ASSERT_TRUE(PutChunks(*c, kNs1, t, 0, 2).ok());
  EXPECT_EQ(c->Lookup(t, kNs2).tokens, 0u);
  ASSERT_TRUE(PutChunks(*c, kNs2, t, 0, 2).ok());
  ASSERT_TRUE(c->Flush().ok());
  GetAndCheck(*c, kNs1, t, 0, 2);  // checks the bytes are ns1's
  GetAndCheck(*c, kNs2, t, 0, 2);
  ASSERT_TRUE(c->Clear(kNs1).ok());
  EXPECT_EQ(c->Lookup(t, kNs1).tokens, 0u);
  EXPECT_EQ(c->Lookup(t, kNs2).tokens, 2u * kC);
  auto h = c->Get(kNs1, t, 0, 2, std::chrono::steady_clock::now() + 5s);
  h->Wait();
  EXPECT_EQ(h->ready_tokens(), 0u);
  EXPECT_EQ(c->Stats().tier[1].entries, 2u);
  ASSERT_TRUE(c->Erase(t, kNs2).ok());
  EXPECT_EQ(c->Lookup(t, kNs2).tokens, 0u);
  EXPECT_EQ(c->Stats().tier[1].entries, 0u);
}

TEST(StoreTest, ConcurrentPutGetLookup) {
  TempDir d;
  CacheOptions o = Options(20, d.path(), 40);
  o.policy = "s3fifo";
  auto c = Open(o);
  std::atomic<int> bad{0};
  std::vector<std::thread> threads;
  for (int th = 0; th < 4; ++th) {
    threads.emplace_back([&, th] {
      for (int i = 0; i < 150; ++i) {
        const uint32_t seq = static_cast<uint32_t>((i * 7 + th) % 30);
        auto t = Tokens(3 * kC, seq);
        const Hash128& ns = seq % 2 ? kNs1 : kNs2;
        switch ((i + th) % 3) {
          case 0:
            if (!PutChunks(*c, ns, t, 0, 3).ok()) ++bad;
            break;
          case 1: {
            auto h = c->Get(ns, t, 0, 3, std::chrono::steady_clock::now() + 5s);
            h->Wait();
            for (size_t k = 0; k < 3; ++k) {
              const ChunkData& cd = h->chunk(k);
              if (!cd.status.ok()) break;
              auto want = ChunkBytes(ns, t, k);
              if (cd.bytes().size() != want.size() ||
                  std::memcmp(cd.bytes().data(), want.data(), want.size()) != 0) {
                ++bad;
              }
            }
            break;
          }
          default:
            if (c->Lookup(t, ns).tokens > 3u * kC) ++bad;
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  ASSERT_TRUE(c->Flush().ok());
  EXPECT_EQ(bad.load(), 0);
  CacheStats s = c->Stats();
  EXPECT_LE(s.tier[0].bytes_used, o.ram_budget_bytes);
  EXPECT_LE(s.tier[1].bytes_used, o.disk_budget_bytes);
}

TEST(StoreTest, PrometheusText) {
  auto c = Open(Options(10));
  auto t = Tokens(kC, 18);
  ASSERT_TRUE(PutChunks(*c, kNs1, t, 0, 1).ok());
  GetAndCheck(*c, kNs1, t, 0, 1);
  const std::string text = PrometheusText(c->Stats());
  EXPECT_NE(text.find("cachette_cache_hit_chunks_total{tier=\"ram\"} 1\n"), std::string::npos);
  EXPECT_NE(text.find("# TYPE cachette_cache_load_latency_seconds histogram"), std::string::npos);
  EXPECT_NE(text.find("cachette_cache_load_latency_seconds_bucket{le=\"+Inf\"} 1\n"),
            std::string::npos);
  EXPECT_EQ(text.find("tier=\"disk\""), std::string::npos);  // not enabled
}

}  // namespace
}  // namespace cachette::cache

namespace cachette::cache {
namespace {

// The real Redis tier behind the store, when a server is given (scripts/redis.sh starts one).
TEST(StoreRedisTest, WriteThroughAndSharedAcrossStores) {
  const char* url = std::getenv("CACHETTE_REDIS_URL");
  if (url == nullptr || *url == '\0') GTEST_SKIP() << "set CACHETTE_REDIS_URL to run";
  // A fresh namespace per run, so earlier runs' chunks do not count.
  const Hash128 ns{static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()), 99};
  auto t = Tokens(3 * kC, 77);
  {
    CacheOptions o = Options(10);
    o.redis_urls = {url};
    auto c = Open(o);
    ASSERT_TRUE(c);
    ASSERT_TRUE(PutChunks(*c, ns, t, 0, 3).ok());
    ASSERT_TRUE(c->Flush().ok());
  }
  CacheOptions o = Options(10);
  o.redis_urls = {url};
  auto c = Open(o);
  ASSERT_TRUE(c);
  EXPECT_EQ(c->Lookup(t, ns).chunk_tiers, std::vector<CacheTier>(3, CacheTier::kRedis));
  EXPECT_EQ(GetAndCheck(*c, ns, t, 0, 3), std::vector<CacheTier>(3, CacheTier::kRedis));
  ASSERT_TRUE(c->Erase(t, ns).ok());
}

// Clear(ns) reaches the Redis copies another store (another process) wrote; other namespaces
// stay. Standalone and cluster.
class StoreRedisClearTest : public ::testing::TestWithParam<const char*> {};

TEST_P(StoreRedisClearTest, ClearRemovesEveryProcesssCopiesOfTheNamespace) {
  const char* url = std::getenv(GetParam());
  if (url == nullptr || *url == '\0') GTEST_SKIP() << "set " << GetParam() << " to run";
  const uint64_t run = static_cast<uint64_t>(
      std::chrono::steady_clock::now().time_since_epoch().count());
  const Hash128 x{run, 1}, y{run, 2};
  auto tx = Tokens(3 * kC, 81), ty = Tokens(2 * kC, 82);
  CacheOptions o = Options(10);
  o.redis_urls = {url};
  auto a = Open(o);
  auto b = Open(o);
  ASSERT_TRUE(a && b);
  ASSERT_TRUE(PutChunks(*a, x, tx, 0, 3).ok());
  ASSERT_TRUE(PutChunks(*a, y, ty, 0, 2).ok());
  ASSERT_TRUE(a->Flush().ok());
  auto pin = a->Pin(tx, x, 0ms);  // pins protect RAM and disk, not Redis: Clear still clears
  ASSERT_TRUE(pin.ok());
  ASSERT_EQ(b->Lookup(tx, x).chunk_tiers, std::vector<CacheTier>(3, CacheTier::kRedis));
  ASSERT_TRUE(b->Clear(x).ok());  // b never wrote x: only the shared tier can find it
  EXPECT_EQ(b->Lookup(tx, x).tokens, 0u);
  EXPECT_TRUE(GetAndCheck(*b, x, tx, 0, 3).empty());
  // a still has x in RAM; a fresh store (a restart of a) must not find it in Redis.
  auto a2 = Open(o);
  ASSERT_TRUE(a2);
  EXPECT_EQ(a2->Lookup(tx, x).tokens, 0u);
  EXPECT_TRUE(GetAndCheck(*a2, x, tx, 0, 3).empty());
  EXPECT_EQ(GetAndCheck(*a2, y, ty, 0, 2), std::vector<CacheTier>(2, CacheTier::kRedis));
  EXPECT_EQ(GetAndCheck(*b, y, ty, 0, 2), std::vector<CacheTier>(2, CacheTier::kRedis));
  // a's own Clear empties its RAM too; the pin is still there and harmless.
  ASSERT_TRUE(a->Clear(x).ok());
  EXPECT_EQ(a->Lookup(tx, x).tokens, 0u);
  EXPECT_TRUE(a->Unpin(*pin).ok());
  ASSERT_TRUE(a->Clear(y).ok());
  EXPECT_EQ(a2->Lookup(ty, y).chunk_tiers.size(), 2u);  // a2's RAM copies are its own
  auto a3 = Open(o);
  EXPECT_EQ(a3->Lookup(ty, y).tokens, 0u);
}

INSTANTIATE_TEST_SUITE_P(Modes, StoreRedisClearTest,
                         ::testing::Values("CACHETTE_REDIS_URL", "CACHETTE_REDIS_CLUSTER_URL"),
                         [](const auto& info) {
                           return std::string(info.index == 0 ? "Standalone" : "Cluster");
                         });

}  // namespace
}  // namespace cachette::cache
