#include "cache/buffer_pool.h"

#include <gtest/gtest.h>

#include <thread>

#include "cache/ram_tier.h"
#include "cache/test_util.h"

namespace cachette::cache {
namespace {

TEST(BufferPoolTest, SharedBufferReturnsWhenTheLastOwnerLetsGo) {
  auto pool = BufferPool::Create(1 << 20);
  std::vector<std::byte> a = pool->Take(1000);
  ASSERT_EQ(a.size(), 1000u);
  const std::byte* where = a.data();
  SharedBytes s1 = pool->Share(std::move(a));
  SharedBytes s2 = s1;
  s1.reset();
  EXPECT_EQ(pool->Stats().idle_buffers, 0u);  // s2 still reads it
  s2.reset();
  EXPECT_EQ(pool->Stats().idle_buffers, 1u);
  std::vector<std::byte> b = pool->Take(900);  // fits, not 2x oversized: recycled
  EXPECT_EQ(b.data(), where);
  EXPECT_EQ(b.size(), 900u);
  EXPECT_EQ(pool->Stats().recycled, 1u);
}

TEST(BufferPoolTest, TakeCopyHoldsTheBytesWhetherFreshOrRecycled) {
  auto pool = BufferPool::Create(1 << 20);
  const std::vector<std::byte> x = testing::Bytes(5000, 1), y = testing::Bytes(4000, 2);
  std::vector<std::byte> a = pool->TakeCopy(x);
  EXPECT_EQ(a, x);
  pool->Give(std::move(a));
  std::vector<std::byte> b = pool->TakeCopy(y);
  EXPECT_EQ(b, y);
  EXPECT_EQ(pool->Stats().recycled, 1u);
}

TEST(BufferPoolTest, TooSmallOrFarTooLargeBuffersAreNotReused) {
  auto pool = BufferPool::Create(1 << 20);
  pool->Give(pool->Take(100));
  pool->Give(pool->Take(10000));
  (void)pool->Take(200);   // 100 is too small, 10000 wastes more than half: fresh
  (void)pool->Take(6000);  // 10000 fits
  EXPECT_EQ(pool->Stats().recycled, 1u);
  EXPECT_EQ(pool->Stats().idle_buffers, 1u);
}

TEST(BufferPoolTest, IdleBytesStayUnderTheCap) {
  auto pool = BufferPool::Create(10000);
  for (int i = 0; i < 5; ++i) pool->Give(pool->Take(4000));
  std::vector<SharedBytes> held;
  for (int i = 0; i < 5; ++i) held.push_back(pool->Share(pool->Take(4000)));
  held.clear();
  EXPECT_LE(pool->Stats().idle_bytes, 10000u);
  EXPECT_EQ(pool->Stats().idle_buffers, 2u);
}

TEST(BufferPoolTest, BufferMayOutliveThePool) {
  SharedBytes s;
  {
    auto pool = BufferPool::Create(1 << 20);
    s = pool->Share(pool->TakeCopy(testing::Bytes(64, 3)));
  }
  EXPECT_EQ(*s, testing::Bytes(64, 3));
  s.reset();  // freed, not returned (ASan would report a use after free otherwise)
}

TEST(BufferPoolTest, ConcurrentTakeShareRelease) {
  auto pool = BufferPool::Create(1 << 16);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 2000; ++i) {
        const std::vector<std::byte> want = testing::Bytes(512 + (i % 7) * 64, t * 10000 + i);
        SharedBytes s = pool->Share(pool->TakeCopy(want));
        ASSERT_EQ(*s, want);
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_LE(pool->Stats().idle_bytes, uint64_t{1} << 16);
}

TEST(RamTierPoolTest, PutAfterEraseReusesTheEvictedBuffer) {
  RamTier ram(0);
  ChunkKey k1, k2;
  const auto r1 = testing::MakeRecord(Hash128{1, 1}, testing::Tokens(8, 1), 1, &k1);
  const auto r2 = testing::MakeRecord(Hash128{1, 1}, testing::Tokens(8, 2), 2, &k2);
  ASSERT_TRUE(ram.Put(k1, r1).ok());
  SharedBytes reader = ram.GetShared(k1);  // a zero-copy hit still being read
  ASSERT_TRUE(ram.Erase(k1).ok());
  ASSERT_TRUE(ram.Put(k2, r2).ok());
  EXPECT_EQ(ram.pool().Stats().recycled, 0u);  // the reader's buffer is not reused under it
  EXPECT_EQ(*reader, r1);
  reader.reset();
  ASSERT_TRUE(ram.Erase(k2).ok());
  ASSERT_TRUE(ram.Put(k1, r1).ok());
  EXPECT_EQ(ram.pool().Stats().recycled, 1u);
  EXPECT_EQ(*ram.GetShared(k1), r1);
}

}  // namespace
}  // namespace cachette::cache
