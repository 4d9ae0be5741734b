// The router's block index and policy parsing. The router end to end (three real backends,
// events, retries, a killed backend) is tests/e2e/route_test.py.
#include <gtest/gtest.h>

#include <random>

#include "cache/chunk.h"
#include "events/block_mirror.h"
#include "events/events_test_util.h"
#include "events/kv_event_codec.h"
#include "route/block_index.h"
#include "route/router.h"

namespace cachette::route {
namespace {

using events::test::Cleared;
using events::test::Removed;
using events::test::Stored;

constexpr int kP = 4, kC = 8;

std::vector<uint64_t> Hashes(const Hash128& ns, const std::vector<TokenId>& t, int size) {
  std::vector<uint64_t> out;
  for (const auto& k : cache::ComputeChunkKeys(ns, t, size)) out.push_back(KvBlockHash(k));
  return out;
}

// A 32-token sequence and its blocks in one namespace: 8 pages of kP tokens, 4 chunks of kC.
struct Sequence {
  std::vector<TokenId> tokens;
  std::vector<uint64_t> pages, chunks;
};

Sequence SequenceIn(const Hash128& ns) {
  Sequence s;
  s.tokens.resize(32);
  for (size_t i = 0; i < s.tokens.size(); ++i) s.tokens[i] = static_cast<TokenId>(i * 3 + 1);
  s.pages = Hashes(ns, s.tokens, kP);
  s.chunks = Hashes(ns, s.tokens, kC);
  return s;
}

TEST(BlockIndexTest, ScoreWalksTheChainAndWeighsByMedium) {
  const Hash128 ns{7, 9};
  const auto [t, pages, chunks] = SequenceIn(ns);
  const TierWeights w;
  BlockIndex idx;
  // Backend 0: pages 0-2 in memory, chunk 1 (pages 2-3) in RAM, chunk 2 on disk.
  idx.Apply(0, Stored(KvMedium::kMemory, {pages[0], pages[1], pages[2]}, std::nullopt, kP));
  idx.Apply(0, Stored(KvMedium::kRam, {chunks[1]}, std::nullopt, kC));
  idx.Apply(0, Stored(KvMedium::kDisk, {chunks[2]}, std::nullopt, kC));
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
  idx.Apply(2, Stored(KvMedium::kRedis, {chunks[0], chunks[1]}, std::nullopt, kC));
  o = idx.Score(1, pages, kP, chunks, kC, w);
  EXPECT_EQ(o.tokens, 16);
  EXPECT_DOUBLE_EQ(o.weighted, 16 * w.redis);
  // Another namespace (tenant salt) shares nothing.
  const Hash128 other{7, 10};
  EXPECT_EQ(idx.Score(0, Hashes(other, t, kP), kP, Hashes(other, t, kC), kC, w).tokens, 0);
}

// A stored event with no parent (nil on the wire) is a root: vLLM sends one for a sequence's first
// blocks, and a snapshot (docs/formats/kv-events.md "Snapshots") names every block that way, in
// no order. The index looks hashes up one by one, so each is held as any chained block is, and
// a snapshot taken through the wire scores exactly as the live events it stands for.
TEST(BlockIndexTest, StoredEventsWithoutAParentAreIndexedAsRoots) {
  const auto [t, pages, chunks] = SequenceIn(Hash128{5, 8});
  const TierWeights w;
  const std::vector<KvEvent> live = {
      Stored(KvMedium::kMemory, {pages[0], pages[1], pages[2]}, std::nullopt, kP),  // a root
      Stored(KvMedium::kMemory, {pages[3]}, pages[2], kP),                          // chained
      Stored(KvMedium::kDisk, {chunks[2]}, std::nullopt, kC),
  };
  BlockIndex idx;
  events::KvBlockMirror mirror;
  // The root alone: its pages count from position 0.
  idx.Apply(0, live[0]);
  EXPECT_EQ(idx.Score(0, pages, kP, chunks, kC, w).tokens, 12);
  for (const KvEvent& e : live) mirror.Apply(e);
  for (size_t i = 1; i < live.size(); ++i) idx.Apply(0, live[i]);
  const Overlap want = idx.Score(0, pages, kP, chunks, kC, w);
  EXPECT_EQ(want.tokens, 24);  // pages 0-3 in memory, 4-5 in chunk 2 on disk
  EXPECT_EQ(want.memory_tokens, 16);

  // The snapshot the router gets from a late start, encoded and decoded as on the wire.
  Result<events::KvEventBatch> snap =
      events::DecodeBatch(events::EncodeBatch({1.0, mirror.SnapshotEvents(), std::nullopt}));
  ASSERT_TRUE(snap.ok()) << snap.status().ToString();
  for (const KvEvent& e : snap->events) EXPECT_FALSE(e.parent.has_value());
  BlockIndex restored;
  restored.Apply(0, Stored(KvMedium::kMemory, {99}, std::nullopt, kP));  // cleared by it
  for (const KvEvent& e : snap->events) restored.Apply(0, e);
  EXPECT_EQ(restored.blocks(0, KvMedium::kMemory), 4u);
  EXPECT_EQ(restored.blocks(0, KvMedium::kDisk), 1u);
  const Overlap got = restored.Score(0, pages, kP, chunks, kC, w);
  EXPECT_EQ(got.tokens, want.tokens);
  EXPECT_EQ(got.memory_tokens, want.memory_tokens);
  EXPECT_DOUBLE_EQ(got.weighted, want.weighted);
}

TEST(BlockIndexTest, ResetAndClearForgetOneBackendOnly) {
  const Hash128 ns{1, 2};
  std::vector<TokenId> t = {1, 2, 3, 4, 5, 6, 7, 8};
  const auto pages = Hashes(ns, t, kP);
  const auto chunks = Hashes(ns, t, kC);
  BlockIndex idx;
  for (int b : {0, 1}) idx.Apply(b, Stored(KvMedium::kMemory, pages, std::nullopt, kP));
  idx.Apply(0, Stored(KvMedium::kRedis, chunks, std::nullopt, kC));
  idx.Apply(0, Cleared());
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
      idx.Apply(b, Stored(static_cast<KvMedium>(m), hs, std::nullopt, kP));
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
  for (uint64_t h = 0; h < 25; ++h) {
    idx.Apply(0, Stored(KvMedium::kRedis, {h}, std::nullopt, kC));
  }
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

// The staged lag of route_e2e's flake: a backend's /metrics, asked after the router saw its
// answer, still counts the request that ended. That is not foreign load; a request the router
// did not send is, once two samples have passed.
TEST(ReportedLoadTest, ALaggingSampleIsNotForeignLoad) {
  ReportedLoad load;
  load.Sampled(load.Sending(), 0);  // an idle backend
  EXPECT_EQ(load.Foreign(0), 0);
  // One request of the router's: in flight, and the backend reports it.
  load.Sampled(load.Sending(), 1);
  EXPECT_EQ(load.Foreign(1), 0);
  load.Finished();  // its answer is complete...
  EXPECT_EQ(load.Foreign(0), 0);
  load.Sampled(load.Sending(), 1);  // ...and a sample sent after that still counts it
  EXPECT_EQ(load.Foreign(0), 0);
  EXPECT_EQ(load.reported(), 1);
  // The backend catches up; then another client's request arrives there.
  load.Sampled(load.Sending(), 0);
  EXPECT_EQ(load.Foreign(0), 0);
  load.Sampled(load.Sending(), 1);
  EXPECT_EQ(load.Foreign(0), 1);
  // Still foreign however many samples see it, and beside the router's own requests.
  load.Sampled(load.Sending(), 3);
  EXPECT_EQ(load.Foreign(2), 1);
  // A sample in transit while a router request ends: mark taken before, answer stored after.
  const int64_t mark = load.Sending();
  load.Finished();
  load.Sampled(mark, 3);  // counted the one that ended
  EXPECT_EQ(load.Foreign(1), 1);
}

}  // namespace
}  // namespace cachette::route
