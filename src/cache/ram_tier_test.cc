#include "cache/ram_tier.h"

#include <gtest/gtest.h>

#include "cache/test_util.h"

namespace cachette::cache {
namespace {

using testing::MakeRecord;
using testing::Tokens;

TEST(RamTierTest, PutGetEraseAndAccounting) {
  RamTier t(0);
  ChunkKey k;
  auto rec = MakeRecord(Hash128{1, 2}, Tokens(4, 1), 1, &k);
  EXPECT_EQ(t.Get(k, NoDeadline()).status().code(), StatusCode::kNotFound);
  ASSERT_TRUE(t.Put(k, rec).ok());
  auto got = t.Get(k, NoDeadline());
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(*got, rec);
  EXPECT_EQ(t.bytes_used(), rec.size());
  ASSERT_TRUE(t.Put(k, rec).ok());  // replace: counted once
  EXPECT_EQ(t.bytes_used(), rec.size());
  const ChunkKey other{9, 9};
  const ChunkKey keys[] = {k, other};
  EXPECT_EQ(t.ContainsMany(keys, NoDeadline()), (std::vector<bool>{true, false}));
  ASSERT_TRUE(t.Erase(k).ok());
  ASSERT_TRUE(t.Erase(k).ok());  // absent: still OK
  EXPECT_EQ(t.bytes_used(), 0u);
  TierStats s = t.Stats();
  EXPECT_EQ(s.hits, 1u);
  EXPECT_EQ(s.misses, 1u);
  EXPECT_EQ(s.entries, 0u);
}

TEST(RamTierTest, BudgetIsASafetyNet) {
  ChunkKey k1, k2;
  auto r1 = MakeRecord(Hash128{1, 2}, Tokens(4, 1), 1, &k1);
  auto r2 = MakeRecord(Hash128{1, 2}, Tokens(4, 2), 2, &k2);
  RamTier t(r1.size() + 10);
  ASSERT_TRUE(t.Put(k1, r1).ok());
  EXPECT_EQ(t.Put(k2, r2).code(), StatusCode::kResourceExhausted);
  EXPECT_LE(t.bytes_used(), r1.size() + 10);
}

TEST(RamTierTest, SharedHitsAreZeroCopy) {
  RamTier t(0);
  ChunkKey k;
  auto rec = std::make_shared<const std::vector<std::byte>>(
      MakeRecord(Hash128{1, 2}, Tokens(4, 1), 1, &k));
  ASSERT_TRUE(t.PutShared(k, rec).ok());
  EXPECT_EQ(t.GetShared(k).get(), rec.get());
  ASSERT_TRUE(t.Erase(k).ok());
  EXPECT_EQ(t.GetShared(k), nullptr);
}

}  // namespace
}  // namespace cachette::cache
