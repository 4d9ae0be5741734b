#include "cache/policy.h"

#include <gtest/gtest.h>

namespace cachette::cache {
namespace {

EntryStats E(uint64_t insert, uint64_t last, uint64_t hits, uint64_t main_tick = 0,
             uint64_t bytes = 100, uint32_t chunk_index = 0) {
  EntryStats e;
  e.bytes = bytes;
  e.n_tokens = 16;
  e.chunk_index = chunk_index;
  e.insert_tick = insert;
  e.last_access_tick = last;
  e.hits = hits;
  e.main_tick = main_tick;
  return e;
}

std::vector<size_t> EvictionOrder(PolicyKind p, const std::vector<EntryStats>& es) {
  uint64_t all = 0;
  for (auto& e : es) all += e.bytes;
  std::vector<size_t> v;
  EXPECT_TRUE(SelectVictims(p, es, all, &v));
  return v;
}

// A hand-made history over four entries:
//   t1 put A, t2 put B, t3 put C, t4 get A, t5 get A, t6 put D, t7 get C
const std::vector<EntryStats> kHistory = {
    E(1, 5, 2, /*main=*/4),  // A: hit twice, entered main at its first hit (t4)
    E(2, 2, 0),              // B: never hit
    E(3, 7, 1, /*main=*/7),  // C: hit once at t7
    E(6, 6, 0),              // D: new, never hit
};

TEST(PolicyTest, LruOrdersByLastAccess) {
  EXPECT_EQ(EvictionOrder(PolicyKind::kLru, kHistory), (std::vector<size_t>{1, 0, 3, 2}));
}

TEST(PolicyTest, LfuOrdersByHitsThenRecency) {
  EXPECT_EQ(EvictionOrder(PolicyKind::kLfu, kHistory), (std::vector<size_t>{1, 3, 2, 0}));
}

TEST(PolicyTest, S3FifoDrainsSmallQueueFirst) {
  // Small: B (t2), D (t6); then main in order of entry: A (t4), C (t7).
  EXPECT_EQ(EvictionOrder(PolicyKind::kS3Fifo, kHistory), (std::vector<size_t>{1, 3, 0, 2}));
}

TEST(PolicyTest, CostKeepsDeepAndDenseChunks) {
  const std::vector<EntryStats> es = {
      E(1, 1, 0, 0, 100, /*chunk_index=*/0),   // shallow
      E(2, 2, 0, 0, 100, /*chunk_index=*/50),   // deep: more attention to recompute
      E(3, 3, 0, 0, 25, /*chunk_index=*/0),    // shallow but 4x denser (compressed)
      E(4, 4, 1, 0, 100, /*chunk_index=*/0),   // shallow, hit once
  };
  EXPECT_EQ(EvictionOrder(PolicyKind::kCost, es), (std::vector<size_t>{0, 1, 3, 2}));
  EXPECT_GT(PrefillCostSaved(es[1]), PrefillCostSaved(es[0]));
}

TEST(PolicyTest, SelectVictimsFreesJustEnough) {
  std::vector<size_t> v;
  ASSERT_TRUE(SelectVictims(PolicyKind::kLru, kHistory, 150, &v));
  EXPECT_EQ(v, (std::vector<size_t>{1, 0}));
  ASSERT_TRUE(SelectVictims(PolicyKind::kLru, kHistory, 0, &v));
  EXPECT_TRUE(v.empty());
  EXPECT_FALSE(SelectVictims(PolicyKind::kLru, kHistory, 401, &v));
  EXPECT_TRUE(v.empty());
}

TEST(PolicyTest, ParseNames) {
  for (auto p : {PolicyKind::kLru, PolicyKind::kLfu, PolicyKind::kS3Fifo, PolicyKind::kCost}) {
    auto back = ParsePolicy(PolicyName(p));
    ASSERT_TRUE(back.ok());
    EXPECT_EQ(*back, p);
  }
  EXPECT_EQ(ParsePolicy("arc").status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace cachette::cache
