#include "sched/segment_cache.h"

#include <gtest/gtest.h>

namespace cachette::sched {
namespace {

// A segment of `tokens` after context `context` whose K and V take `kv_bytes` bytes each
// (one layer); the cache counts these bytes plus the tokens' (no attention profile here).
SegmentKv Seg(std::vector<TokenId> tokens, uint64_t context, size_t kv_bytes = 1000) {
  SegmentKv s;
  s.tokens = std::move(tokens);
  s.context = context;
  s.k.assign(1, std::vector<std::byte>(kv_bytes));
  s.v.assign(1, std::vector<std::byte>(kv_bytes));
  return s;
}

size_t Bytes(const SegmentKv& s) { return s.bytes() + s.tokens.size() * sizeof(TokenId); }

SegmentCache::Options Budget(size_t bytes) {
  SegmentCache::Options o;
  o.budget_bytes = bytes;
  return o;
}

const Hash128 kTenantA{1, 2};
const Hash128 kTenantB{3, 4};

TEST(SegmentCacheTest, HitNeedsTheSameNamespaceTokensAndContext) {
  SegmentCache cache({});
  ASSERT_NE(cache.Insert(kTenantA, Seg({5, 6, 7}, 42)), nullptr);
  const std::vector<TokenId> toks = {5, 6, 7};
  auto hit = cache.Lookup(kTenantA, toks, 42);
  ASSERT_NE(hit, nullptr);
  EXPECT_EQ(hit->tokens, toks);
  EXPECT_EQ(cache.Lookup(kTenantA, toks, 43), nullptr) << "another context";
  EXPECT_EQ(cache.Lookup(kTenantB, toks, 42), nullptr) << "another tenant";
  EXPECT_EQ(cache.Lookup(kTenantA, std::vector<TokenId>{5, 6}, 42), nullptr) << "a prefix";
  const SegmentCache::Stats st = cache.GetStats();
  EXPECT_EQ(st.hits, 1u);
  EXPECT_EQ(st.misses, 3u);
  EXPECT_EQ(st.entries, 1u);
  EXPECT_EQ(st.inserts, 1u);
}

TEST(SegmentCacheTest, EvictsLeastRecentlyUsedToStayWithinBudget) {
  const size_t one = Bytes(Seg({1}, 0));
  SegmentCache cache(Budget(2 * one + one / 2));
  cache.Insert(kTenantA, Seg({1}, 0));
  cache.Insert(kTenantA, Seg({2}, 0));
  ASSERT_NE(cache.Lookup(kTenantA, std::vector<TokenId>{1}, 0), nullptr);  // 1 is now recent
  cache.Insert(kTenantA, Seg({3}, 0));                                    // evicts 2
  EXPECT_NE(cache.Lookup(kTenantA, std::vector<TokenId>{1}, 0), nullptr);
  EXPECT_EQ(cache.Lookup(kTenantA, std::vector<TokenId>{2}, 0), nullptr);
  EXPECT_NE(cache.Lookup(kTenantA, std::vector<TokenId>{3}, 0), nullptr);
  const SegmentCache::Stats st = cache.GetStats();
  EXPECT_EQ(st.evictions, 1u);
  EXPECT_EQ(st.entries, 2u);
  EXPECT_LE(st.bytes, st.budget_bytes);
}

TEST(SegmentCacheTest, EntryLargerThanTheBudgetIsNotStored) {
  SegmentCache cache(Budget(100));
  EXPECT_NE(cache.Insert(kTenantA, Seg({1}, 0, 1000)), nullptr) << "returned for use";
  EXPECT_EQ(cache.GetStats().entries, 0u);
  EXPECT_EQ(cache.GetStats().bytes, 0u);
}

TEST(SegmentCacheTest, HeldEntrySurvivesEviction) {
  const size_t one = Bytes(Seg({1}, 0));
  SegmentCache cache(Budget(one));
  auto held = cache.Insert(kTenantA, Seg({1}, 0));
  cache.Insert(kTenantA, Seg({2}, 0));  // evicts {1} from the cache, not from `held`
  ASSERT_NE(held, nullptr);
  EXPECT_EQ(held->tokens, std::vector<TokenId>{1});
  EXPECT_EQ(held->k[0].size(), 1000u);
}

TEST(SegmentCacheTest, ReinsertReplacesWithoutDoubleCounting) {
  SegmentCache cache({});
  cache.Insert(kTenantA, Seg({1, 2}, 7));
  cache.Insert(kTenantA, Seg({1, 2}, 7));
  EXPECT_EQ(cache.GetStats().entries, 1u);
  EXPECT_EQ(cache.GetStats().bytes, Bytes(Seg({1, 2}, 7)));
}

TEST(SegmentCacheTest, ClearOfOneTenantLeavesTheOthers) {
  SegmentCache cache({});
  cache.Insert(kTenantA, Seg({1}, 0));
  cache.Insert(kTenantA, Seg({2}, 9));
  cache.Insert(kTenantB, Seg({1}, 0));
  EXPECT_EQ(cache.Clear(kTenantA), 2u);
  EXPECT_EQ(cache.Lookup(kTenantA, std::vector<TokenId>{1}, 0), nullptr);
  EXPECT_NE(cache.Lookup(kTenantB, std::vector<TokenId>{1}, 0), nullptr);
  EXPECT_EQ(cache.GetStats().entries, 1u);
  EXPECT_EQ(cache.GetStats().bytes, Bytes(Seg({1}, 0)));
  EXPECT_EQ(cache.Clear(), 1u);
  EXPECT_EQ(cache.GetStats().bytes, 0u);
}

TEST(SegmentCacheTest, EntryExpiresAfterItsTtl) {
  int64_t now = 1000;
  SegmentCache::Options o;
  o.clock_ms = [&] { return now; };
  SegmentCache cache(o);
  cache.Insert(kTenantA, Seg({1}, 0), /*ttl_ms=*/500);
  cache.Insert(kTenantA, Seg({2}, 0));  // no TTL
  now = 1499;
  EXPECT_TRUE(cache.Contains(kTenantA, std::vector<TokenId>{1}, 0));
  now = 1500;
  EXPECT_FALSE(cache.Contains(kTenantA, std::vector<TokenId>{1}, 0));
  EXPECT_EQ(cache.Lookup(kTenantA, std::vector<TokenId>{1}, 0), nullptr);
  now = 1000000;
  EXPECT_NE(cache.Lookup(kTenantA, std::vector<TokenId>{2}, 0), nullptr);
  const SegmentCache::Stats st = cache.GetStats();
  EXPECT_EQ(st.expirations, 1u);
  EXPECT_EQ(st.entries, 1u);
}

}  // namespace
}  // namespace cachette::sched
