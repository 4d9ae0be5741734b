#include "kv/kv_manager.h"

#include <gtest/gtest.h>

#include <cstring>
#include <numeric>

namespace cachette {
namespace {

constexpr int kP = 16;
KvShape Shape() { return KvShape{2, 2, 32, kernels::KvType::kF16}; }
size_t PageBytes() { return PagePool::PageBytes(Shape(), kP); }

KvManagerOptions Options(size_t pages, int64_t* clock) {
  KvManagerOptions o;
  o.shape = Shape();
  o.page_tokens = kP;
  o.budget_bytes = PageBytes() * pages + PageBytes() / 2;  // a partial page is not allocated
  o.clock = [clock] { return *clock; };
  return o;
}

std::vector<TokenId> Iota(int n, int start = 0) {
  std::vector<TokenId> t(n);
  std::iota(t.begin(), t.end(), start);
  return t;
}

// Writes a recognizable byte into every K/V slot of positions [from, to).
void Fill(PagedSequence& s, int from, int to, uint8_t tag) {
  const size_t bytes = Shape().token_bytes();
  for (int l = 0; l < Shape().n_layer; ++l) {
    for (int p = from; p < to; ++p) {
      std::memset(s.KSlot(l, p), tag, bytes);
      std::memset(s.VSlot(l, p), tag, bytes);
    }
  }
  s.SetTokens(to);
}

bool Holds(PagedSequence& s, int from, int to, uint8_t tag) {
  const size_t bytes = Shape().token_bytes();
  for (int l = 0; l < Shape().n_layer; ++l) {
    for (int p = from; p < to; ++p) {
      auto* k = static_cast<const uint8_t*>(s.KSlot(l, p));
      auto* v = static_cast<const uint8_t*>(s.VSlot(l, p));
      for (size_t i = 0; i < bytes; ++i) {
        if (k[i] != tag || v[i] != tag) return false;
      }
    }
  }
  return true;
}

TEST(KvManagerTest, BudgetIsNeverExceededAndExhaustionIsAnError) {
  int64_t now = 0;
  KvManager m(Options(8, &now));
  const Hash128 ns{1, 1};
  EXPECT_EQ(m.GetStats().pages_total, 8u);
  EXPECT_LE(m.GetStats().bytes_reserved, m.GetStats().budget_bytes);
  auto a = m.Start(ns, Iota(100), 1000);
  ASSERT_TRUE(a->Reserve(100).ok());  // 7 pages
  Fill(*a, 0, 100, 0xA1);
  auto b = m.Start(ns, Iota(40, 500), 1000);
  Status s = b->Reserve(40);  // needs 3, 1 free, nothing cached to evict
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted) << s.ToString();
  EXPECT_NE(s.message().find("KV pool exhausted"), std::string::npos);
  EXPECT_EQ(b->block_table().size(), 0u);  // a failed Reserve takes nothing
  EXPECT_TRUE(Holds(*a, 0, 100, 0xA1));    // and overwrites nothing
  EXPECT_EQ(m.GetStats().pages_used, 7u);
}

TEST(KvManagerTest, FinishedSequencesAreReusedAndEvictedUnderPressure) {
  int64_t now = 0;
  KvManager m(Options(8, &now));
  const Hash128 ns{1, 1};
  const auto ta = Iota(64);
  {
    auto a = m.Start(ns, ta, 1000);
    ASSERT_TRUE(a->Reserve(64).ok());
    Fill(*a, 0, 64, 0x11);
    m.Finish(*a, ta);
  }
  EXPECT_EQ(m.GetStats().pages_cached_unreferenced, 4u);
  ++now;
  auto hit = m.Start(ns, ta, 1000);
  EXPECT_EQ(hit->cached_tokens(), 64);
  EXPECT_TRUE(Holds(*hit, 0, 64, 0x11));
  m.Finish(*hit, ta);
  // A different prompt needing 6 pages: 4 free + 2 evicted from the cached sequence's tail.
  ++now;
  auto c = m.Start(ns, Iota(96, 1000), 1000);
  ASSERT_TRUE(c->Reserve(96).ok());
  EXPECT_EQ(m.GetStats().evictions, 2u);
  auto again = m.Start(ns, ta, 1000);
  EXPECT_EQ(again->cached_tokens(), 32);  // the leaves went first, the prefix survives
}

TEST(KvManagerTest, CopyOnWriteProtectsSharedPartialPages) {
  int64_t now = 0;
  KvManager m(Options(16, &now));
  const Hash128 ns{1, 1};
  const auto ta = Iota(20);  // one full page + 4 tokens in a partial page
  {
    auto a = m.Start(ns, ta, 1000);
    ASSERT_TRUE(a->Reserve(20).ok());
    Fill(*a, 0, 20, 0x22);
    m.Finish(*a, ta);
  }
  auto tb = ta;
  tb.push_back(999);
  tb.push_back(998);
  auto b = m.Start(ns, tb, 1000);
  ASSERT_EQ(b->cached_tokens(), 20);
  const PageId shared = b->block_table()[1];
  ASSERT_TRUE(b->Reserve(22).ok());
  EXPECT_NE(b->block_table()[1], shared);  // copied before the write
  EXPECT_EQ(m.GetStats().cow_copies, 1u);
  EXPECT_TRUE(Holds(*b, 0, 20, 0x22));     // the copy carries the cached positions
  Fill(*b, 20, 22, 0x33);
  auto c = m.Start(ns, ta, 1000);          // the cached page is untouched
  ASSERT_EQ(c->cached_tokens(), 20);
  EXPECT_TRUE(Holds(*c, 0, 20, 0x22));
  // Sharing a prefix that ends inside a full page also works (partial hit of a full page).
  auto d = m.Start(ns, Iota(10), 1000);
  EXPECT_EQ(d->cached_tokens(), 10);
  EXPECT_TRUE(Holds(*d, 0, 10, 0x22));
}

TEST(KvManagerTest, PinsHoldUntilReleasedOrExpired) {
  int64_t now = 0;
  KvManager m(Options(8, &now));
  const Hash128 ns{1, 1};
  const auto ta = Iota(64);
  {
    auto a = m.Start(ns, ta, 1000);
    ASSERT_TRUE(a->Reserve(64).ok());
    a->SetTokens(64);
    m.Finish(*a, ta);
  }
  KvManager::Pin forever = m.PinPrefix(ns, ta);
  EXPECT_EQ(forever.tokens(), 64);
  EXPECT_EQ(m.GetStats().pages_pinned, 4u);
  auto big = m.Start(ns, Iota(80, 1000), 1000);
  EXPECT_EQ(big->Reserve(80).code(), StatusCode::kResourceExhausted);  // pinned pages stay
  forever.Reset();
  KvManager::Pin ttl = m.PinPrefix(ns, ta, /*ttl_ms=*/5);
  EXPECT_EQ(big->Reserve(80).code(), StatusCode::kResourceExhausted);
  now += 6'000'000;  // past the TTL
  ASSERT_TRUE(big->Reserve(80).ok());
  EXPECT_EQ(m.Start(ns, ta, 1000)->cached_tokens(), 48);  // one page went: just what was needed
  ttl.Reset();  // unpinning an evicted prefix is harmless
  KvManager::Pin moved = std::move(ttl);
}

TEST(KvManagerTest, TenantsDoNotShare) {
  int64_t now = 0;
  KvManager m(Options(8, &now));
  // Namespace ids come from KvNamespace (tested with a model in tier_bridge_test); the manager
  // only needs them to differ.
  const Hash128 a{7, 1};
  const Hash128 b{7, 2};
  const auto t = Iota(32);
  auto s = m.Start(a, t, 100);
  ASSERT_TRUE(s->Reserve(32).ok());
  s->SetTokens(32);
  m.Finish(*s, t);
  EXPECT_EQ(m.Start(a, t, 100)->cached_tokens(), 32);
  EXPECT_EQ(m.Start(b, t, 100)->cached_tokens(), 0);
}

}  // namespace
}  // namespace cachette
