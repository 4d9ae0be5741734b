// The router's block index and policy parsing. The router end to end (three real backends,
// events, retries, a killed backend) is tests/e2e/route_test.py.
#include <gtest/gtest.h>

#include <random>

#include "cache/chunk.h"
#include "route/block_index.h"
#include "route/router.h"

namespace cachette::route {
namespace {

constexpr int kP = 4, kC = 8;

std::vector<uint64_t> Hashes(const Hash128& ns, const std::vector<TokenId>& t, int size) {
  std::vector<uint64_t> out;
  for (const auto& k : cache::ComputeChunkKeys(ns, t, size)) out.push_back(KvBlockHash(k));
  return out;
}

KvEvent Stored(KvMedium m, std::vector<uint64_t> hashes, int size) {
  KvEvent e;
  e.kind = KvEvent::Kind::kStored;
  e.medium = m;
  e.block_hashes = std::move(hashes);
  e.block_size = size;
  return e;
}

KvEvent Removed(KvMedium m, std::vector<uint64_t> hashes) {
  KvEvent e;
  e.kind = KvEvent::Kind::kRemoved;
  e.medium = m;
  e.block_hashes = std::move(hashes);
  return e;
}

TEST(BlockIndexTest, ScoreWalksTheChainAndWeighsByMedium) {
  const Hash128 ns{7, 9};
  std::vector<TokenId> t(32);
  for (size_t i = 0; i < t.size(); ++i) t[i] = static_cast<TokenId>(i * 3 + 1);
  const auto pages = Hashes(ns, t, kP);   // 8 pages
  const auto chunks = Hashes(ns, t, kC);  // 4 chunks
  const TierWeights w;
  BlockIndex idx;
  // Backend 0: pages 0-2 in memory, chunk 1 (pages 2-3) in RAM, chunk 2 on disk.
  idx.Apply(0, Stored(KvMedium::kMemory, {pages[0], pages[1], pages[2]}, kP));
  idx.Apply(0, Stored(KvMedium::kRam, {chunks[1]}, kC));
  idx.Apply(0, Stored(KvMedium::kDisk, {chunks[2]}, kC));
  Overlap o = idx.Score(0, pages, kP, chunks, kC, w);
  EXPECT_EQ(o.memory_tokens, 12);
  EXPECT_EQ(o.tokens, 24);  // pages 0-5: memory x3, RAM (page 3), disk (pages 4, 5)
  EXPECT_DOUBLE_EQ(o.weighted, 12 * w.memory + 4 * w.ram + 8 * w.disk);
  // A gap stops the walk: without page 1 only page 0 counts, whatever follows.
  idx.Apply(0, Removed(KvMedium::kMemory, {pages[1]}));
  o = idx.Score(0, pages, kP, chunks, kC, w);
  EXPECT_EQ(o.tokens, 4);
  // Another backend knows nothing; Redis is shared by all.
  EXPECT_EQ(idx.Score(1, pages, kP, chunks, kC, w).tokens, 0);
  idx.Apply(2, Stored(KvMedium::kRedis, {chunks[0], chunks[1]}, kC));
  o = idx.Score(1, pages, kP, chunks, kC, w);
  EXPECT_EQ(o.tokens, 16);
  EXPECT_DOUBLE_EQ(o.weighted, 16 * w.redis);
  // Another namespace (tenant salt) shares nothing.
  const Hash128 other{7, 10};
  EXPECT_EQ(idx.Score(0, Hashes(other, t, kP), kP, Hashes(other, t, kC), kC, w).tokens, 0);
}

TEST(BlockIndexTest, ResetAndClearForgetOneBackendOnly) {
  const Hash128 ns{1, 2};
  std::vector<TokenId> t = {1, 2, 3, 4, 5, 6, 7, 8};
  const auto pages = Hashes(ns, t, kP);
  const auto chunks = Hashes(ns, t, kC);
  BlockIndex idx;
  for (int b : {0, 1}) idx.Apply(b, Stored(KvMedium::kMemory, pages, kP));
  idx.Apply(0, Stored(KvMedium::kRedis, chunks, kC));
  KvEvent cleared;
  cleared.kind = KvEvent::Kind::kAllCleared;
  idx.Apply(0, cleared);
  EXPECT_EQ(idx.blocks(0, KvMedium::kMemory), 0u);
  EXPECT_EQ(idx.blocks(1, KvMedium::kMemory), 2u);
  EXPECT_EQ(idx.blocks(0, KvMedium::kRedis), 1u);  // the shared tier is not one backend's
  idx.Reset(1);
  EXPECT_EQ(idx.blocks(1, KvMedium::kMemory), 0u);
}

TEST(BlockIndexTest, RandomEventsMatchANaiveSetModel) {
  std::mt19937 rng(std::random_device{}());
  const uint32_t seed = rng();
  rng.seed(seed);
  BlockIndex idx(64);
  std::set<uint64_t> model[3][3];  // backend x local medium
  for (int op = 0; op < 5000; ++op) {
    const int b = static_cast<int>(rng() % 3);
    const int m = static_cast<int>(rng() % 3);
    std::vector<uint64_t> hs;
    for (int k = 0, n = 1 + static_cast<int>(rng() % 4); k < n; ++k) hs.push_back(rng() % 50);
    if (rng() % 2) {
      idx.Apply(b, Stored(static_cast<KvMedium>(m), hs, kP));
      model[b][m].insert(hs.begin(), hs.end());
    } else {
      idx.Apply(b, Removed(static_cast<KvMedium>(m), hs));
      for (uint64_t h : hs) model[b][m].erase(h);
    }
    for (int bb = 0; bb < 3; ++bb) {
      for (int mm = 0; mm < 3; ++mm) {
        ASSERT_EQ(idx.blocks(bb, static_cast<KvMedium>(mm)), model[bb][mm].size())
            << "seed " << seed << " op " << op;
      }
    }
  }
}

TEST(BlockIndexTest, ApproximateRecordKeepsTheMostRecentPagesUpToCapacity) {
  const Hash128 ns{3, 3};
  std::vector<TokenId> a = {1, 1, 1, 1, 2, 2, 2, 2}, b = {5, 5, 5, 5, 6, 6, 6, 6};
  BlockIndex idx;
  idx.Record(0, Hashes(ns, a, kP), 3);
  idx.Record(0, Hashes(ns, b, kP), 3);  // 4 pages recorded, 3 kept: a's first page goes
  EXPECT_EQ(idx.blocks(0, KvMedium::kMemory), 3u);
  EXPECT_EQ(idx.Score(0, Hashes(ns, a, kP), kP, {}, 0, TierWeights()).tokens, 0);
  EXPECT_EQ(idx.Score(0, Hashes(ns, b, kP), kP, {}, 0, TierWeights()).tokens, 8);
  // Recording a page again makes it the most recent.
  idx.Record(0, Hashes(ns, b, kP), 3);
  const std::vector<uint64_t> a1 = {Hashes(ns, a, kP)[1]};
  idx.Record(0, a1, 3);  // order now: b0, b1, a1
  EXPECT_EQ(idx.Score(0, Hashes(ns, b, kP), kP, {}, 0, TierWeights()).tokens, 8);
  const std::vector<uint64_t> c0 = {12345};
  idx.Record(0, c0, 3);  // b0, the least recent, goes
  EXPECT_EQ(idx.Score(0, Hashes(ns, b, kP), kP, {}, 0, TierWeights()).tokens, 0);
}

TEST(BlockIndexTest, SharedRedisSetIsBounded) {
  BlockIndex idx(10);
  for (uint64_t h = 0; h < 25; ++h) idx.Apply(0, Stored(KvMedium::kRedis, {h}, kC));
  EXPECT_EQ(idx.blocks(0, KvMedium::kRedis), 10u);
  idx.Apply(1, Removed(KvMedium::kRedis, {24}));
  EXPECT_EQ(idx.blocks(0, KvMedium::kRedis), 9u);
}

TEST(RouterTest, PolicyNamesRoundTripAndBadOnesNameTheFlag) {
  for (Policy p : {Policy::kKv, Policy::kApprox, Policy::kRoundRobin, Policy::kLeastLoaded}) {
    auto q = ParsePolicy(PolicyName(p));
    ASSERT_TRUE(q.ok());
    EXPECT_EQ(*q, p);
  }
  auto bad = ParsePolicy("random");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("--policy"), std::string::npos);
}

}  // namespace
}  // namespace cachette::route
