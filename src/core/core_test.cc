#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <random>
#include <utility>
#include <vector>

#include <immintrin.h>

#include "cachette/status.h"
#include "core/fp16.h"
#include "core/hash.h"
#include "core/huge_pages.h"
#include "core/thread_pool.h"
#include "core/timer.h"

namespace cachette {
namespace {

Result<int> Half(int x) {
  if (x % 2) return InvalidArgument("odd: " + std::to_string(x));
  return x / 2;
}

Result<int> Quarter(int x) {
  CT_ASSIGN_OR_RETURN(int h, Half(x));
  CT_ASSIGN_OR_RETURN(int q, Half(h));
  return q;
}

TEST(StatusTest, ResultPropagatesErrors) {
  EXPECT_EQ(*Quarter(8), 2);
  Result<int> r = Quarter(6);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(r.status().ToString(), "InvalidArgument: odd: 3");
  EXPECT_EQ(r.status().WithContext("quarter").message(), "quarter: odd: 3");
}

__attribute__((target("f16c"))) uint16_t HwToHalf(float f) {
  return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
}
__attribute__((target("f16c"))) float HwFromHalf(uint16_t h) { return _cvtsh_ss(h); }

// Both kinds of ZeroedBuffer: zeroed, page-aligned (a mapped one on a huge page), writable to
// the last byte, and owned by exactly one object through moves (ASan would catch a double
// free or a leak of the heap kind).
TEST(ZeroedBufferTest, HeapAndMappedBuffersAreZeroedAlignedAndMoveOwnership) {
  for (size_t bytes : {size_t{2}, size_t{4097}, (size_t{2} << 20) - 1, size_t{2} << 20,
                       (size_t{5} << 20) + 123}) {
    SCOPED_TRACE(bytes);
    ZeroedBuffer b(bytes);
    ASSERT_NE(b.get(), nullptr);
    EXPECT_EQ(b.size(), bytes);
    EXPECT_EQ(b.mapped(), bytes >= (size_t{2} << 20));
    EXPECT_EQ(reinterpret_cast<uintptr_t>(b.get()) % (b.mapped() ? size_t{2} << 20 : 4096), 0u);
    size_t nonzero = 0;
    for (size_t i = 0; i < bytes; ++i) nonzero += b.get()[i] != std::byte{0};
    EXPECT_EQ(nonzero, 0u);
    b.get()[0] = std::byte{1};
    b.get()[bytes - 1] = std::byte{2};
    std::byte* p = b.get();
    ZeroedBuffer moved(std::move(b));
    EXPECT_EQ(b.get(), nullptr);
    EXPECT_EQ(b.size(), 0u);
    EXPECT_EQ(moved.get(), p);
    EXPECT_EQ(moved.get()[bytes - 1], std::byte{2});
    ZeroedBuffer assigned(64);
    assigned = std::move(moved);
    EXPECT_EQ(assigned.get(), p);
    EXPECT_EQ(assigned.get()[0], std::byte{1});
  }
  ZeroedBuffer empty(0);
  EXPECT_EQ(empty.get(), nullptr);
}

TEST(ZeroedBufferTest, HugePageAdviceNeedsAWholeHugePage) {
  ZeroedBuffer small(4096);
  EXPECT_FALSE(AdviseHugePages(small.get(), 4096));
}

TEST(Fp16Test, AllHalvesRoundTripAndMatchHardware) {
  if (!__builtin_cpu_supports("f16c")) GTEST_SKIP() << "no F16C on this CPU";
  for (uint32_t h = 0; h < 65536; ++h) {
    float f = Fp16ToFp32(static_cast<uint16_t>(h));
    float hw = HwFromHalf(static_cast<uint16_t>(h));
    if (f != f) {
      ASSERT_NE(hw, hw);
      continue;
    }
    ASSERT_EQ(f, hw) << h;
    ASSERT_EQ(Fp32ToFp16(f), h);
  }
}

TEST(Fp16Test, RandomFloatsRoundLikeHardware) {
  if (!__builtin_cpu_supports("f16c")) GTEST_SKIP() << "no F16C on this CPU";
  std::mt19937 rng(7);
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 1000000; ++i) {
    uint32_t b = bits(rng);
    float f;
    std::memcpy(&f, &b, 4);
    if (f != f) continue;
    ASSERT_EQ(Fp32ToFp16(f), HwToHalf(f)) << std::hex << b;
  }
}

TEST(Bf16Test, RoundsToNearestEven) {
  EXPECT_EQ(Bf16ToFp32(Fp32ToBf16(1.0f)), 1.0f);
  EXPECT_EQ(Fp32ToBf16(1.00390625f), 0x3f80);  // exactly half an ulp above 1: ties to even
  EXPECT_EQ(Fp32ToBf16(1.01171875f), 0x3f82);  // 1.5 ulp: ties to even (up)
}

TEST(HashTest, DeterministicAndIncrementalMatchesOneShot) {
  std::string s = "the same bytes hash the same everywhere";
  ByteSpan bytes(reinterpret_cast<const std::byte*>(s.data()), s.size());
  Hasher128 h;
  h.Update(s.data(), 10);
  h.Update(s.data() + 10, s.size() - 10);
  EXPECT_EQ(h.Digest(), Hash128Of(bytes));
  EXPECT_EQ(Hash64(bytes), Hash64(bytes));
  EXPECT_EQ(Hash128Of(bytes).ToHex().size(), 32u);
}

// ParseHex64 reads back each half of ToHex and nothing but 16 lowercase hex digits.
TEST(HashTest, ParseHex64ReadsToHexHalvesOnly) {
  const Hash128 h{0x0123456789abcdefULL, 0xfedcba9876543210ULL};
  const std::string hex = h.ToHex();
  uint64_t hi = 0, lo = 0;
  ASSERT_TRUE(ParseHex64(std::string_view(hex).substr(0, 16), &hi));
  ASSERT_TRUE(ParseHex64(std::string_view(hex).substr(16), &lo));
  EXPECT_EQ(hi, h.hi);
  EXPECT_EQ(lo, h.lo);
  uint64_t v = 7;
  for (const char* bad : {"", "0123456789abcde", "0123456789abcdef0", "0123456789ABCDEF",
                          "0123456789abcdeg", " 123456789abcdef"}) {
    EXPECT_FALSE(ParseHex64(bad, &v)) << bad;
    EXPECT_EQ(v, 7u) << bad;
  }
}

TEST(ThreadPoolTest, ParallelForCoversRangeOnce) {
  for (int threads : {1, 2, 3, 5}) {
    ThreadPool pool(threads);
    for (int64_t n : {0, 1, 7, 64, 1000}) {
      for (int64_t grain : {1, 4, 16}) {
        std::vector<std::atomic<int>> hits(n);
        pool.ParallelFor(
            n,
            [&](int64_t b, int64_t e, int) {
              EXPECT_TRUE(b % grain == 0);
              for (int64_t i = b; i < e; ++i) hits[i]++;
            },
            grain);
        for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << i;
      }
    }
  }
}

// A thread stalled inside its first range (as when the hypervisor deschedules a vCPU) holds
// up only that range: the others take the rest.
TEST(ThreadPoolTest, AStalledThreadLeavesItsRangesToTheOthers) {
  ThreadPool pool(2);
  constexpr int64_t kN = 800;
  std::atomic<int64_t> by_caller{0};
  std::atomic<bool> stalled{false};
  pool.ParallelFor(kN, [&](int64_t b, int64_t e, int t) {
    if (t == 0) {
      by_caller += e - b;
    } else if (!stalled.exchange(true)) {
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
  });
  // With one fixed range per thread the caller would cover exactly half.
  EXPECT_GE(by_caller.load(), kN * 3 / 4);
}

TEST(ThreadPoolTest, ParallelForStreamingCoversRangeOnce) {
  for (int threads : {1, 2, 3, 5}) {
    ThreadPool pool(threads);
    for (int64_t n : {0, 1, 7, 64, 1000, 4864}) {
      for (int64_t grain : {1, 4, 16}) {
        std::vector<std::atomic<int>> hits(n);
        pool.ParallelForStreaming(
            n,
            [&](int64_t b, int64_t e, int t) {
              EXPECT_TRUE(b % grain == 0);
              EXPECT_TRUE(e % grain == 0 || e == n) << e;
              EXPECT_LT(b, e);
              EXPECT_TRUE(t >= 0 && t < threads) << t;
              for (int64_t i = b; i < e; ++i) hits[i]++;
            },
            grain);
        for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << i;
      }
    }
  }
}

// Each thread reads its own share front to back in one run: its calls inside its share are
// contiguous and ascending from the share's start (others only take from the back).
TEST(ThreadPoolTest, ParallelForStreamingTakesEachShareInAddressOrder) {
  constexpr int kThreads = 3;
  constexpr int64_t kN = 3000, kGrain = 4;
  ThreadPool pool(kThreads);
  const int64_t units = kN / kGrain;
  for (int rep = 0; rep < 50; ++rep) {
    std::mutex mu;
    std::vector<std::vector<std::pair<int64_t, int64_t>>> calls(kThreads);
    pool.ParallelForStreaming(
        kN,
        [&](int64_t b, int64_t e, int t) {
          std::lock_guard<std::mutex> lock(mu);
          calls[t].push_back({b, e});
        },
        kGrain);
    for (int t = 0; t < kThreads; ++t) {
      const int64_t lo = units * t / kThreads * kGrain, hi = units * (t + 1) / kThreads * kGrain;
      int64_t at = lo;
      for (auto [b, e] : calls[t]) {
        if (b < lo || b >= hi) continue;  // taken from another share's back
        ASSERT_EQ(b, at) << "thread " << t << " rep " << rep;
        at = e;
      }
    }
  }
}

// As with ParallelFor, a stalled thread holds up only the piece it is in.
TEST(ThreadPoolTest, ParallelForStreamingLeavesAStalledThreadsShareToTheOthers) {
  ThreadPool pool(2);
  constexpr int64_t kN = 800;
  std::atomic<int64_t> by_caller{0};
  std::atomic<bool> stalled{false};
  const auto start = std::chrono::steady_clock::now();
  pool.ParallelForStreaming(kN, [&](int64_t b, int64_t e, int t) {
    if (t == 0) {
      // Let the worker take its first piece (and stall in it) before going on.
      const auto limit = start + std::chrono::seconds(2);
      while (!stalled.load() && std::chrono::steady_clock::now() < limit) {
        std::this_thread::yield();
      }
      by_caller += e - b;
    } else if (!stalled.exchange(true)) {
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
  });
  ASSERT_TRUE(stalled.load());
  // The worker's first piece is a quarter of its half; the caller takes the rest.
  EXPECT_EQ(by_caller.load(), kN - kN / 2 / 4);
}

TEST(TimerTest, MemoryReadBandwidthIsPositiveOrZeroWhenItCannotMeasure) {
  const ReadBandwidth bw = MeasureMemoryReadBandwidth(size_t{32} << 20, 2);
  EXPECT_GT(bw.median, 1e8);  // any machine reads more than 100 MB/s
  EXPECT_GE(bw.best, bw.median);
  EXPECT_LT(bw.best, 1e13);
  // Passes of several sweeps (about 20 ms each) measure the same kind of figure.
  const ReadBandwidth longer = MeasureMemoryReadBandwidth(size_t{32} << 20, 2, 0.02);
  EXPECT_GT(longer.median, 1e8);
  EXPECT_GE(longer.best, longer.median);
  EXPECT_LT(longer.best, 1e13);
  // 8 words over 4 threads: less than a 16-word pass each, nothing to measure.
  const ReadBandwidth none = MeasureMemoryReadBandwidth(64, 4, 1.0);
  EXPECT_EQ(none.best, 0.0);
  EXPECT_EQ(none.median, 0.0);
}

TEST(TimerTest, MemoryReadProbePassesLastAboutAsLongAsAskedAndReadTheSameKindOfFigure) {
  MemoryReadProbe probe(size_t{32} << 20, 2);
  ASSERT_TRUE(probe.ok());
  const double first = probe.Pass(0);  // one sweep
  EXPECT_GT(first, 1e8);
  EXPECT_LT(first, 1e13);
  // A pass of 50 ms is as many sweeps as the last rate fits into 50 ms: it lasts at least about
  // one sweep and, on any machine not stalled for the whole pass, not many times 50 ms.
  Stopwatch sw;
  const double longer = probe.Pass(0.05);
  const double took = sw.Seconds();
  EXPECT_GT(longer, 1e8);
  EXPECT_LT(longer, 1e13);
  EXPECT_LT(took, 5.0);
  // 8 words over 4 threads: nothing to split, no buffer, no figure.
  MemoryReadProbe none(64, 4);
  EXPECT_FALSE(none.ok());
  EXPECT_EQ(none.Pass(1.0), 0.0);
  const ReadBandwidth over = MeasureMemoryReadBandwidth(probe, 0.01);
  EXPECT_GT(over.median, 1e8);
  EXPECT_GE(over.best, over.median);
}

TEST(ThreadPoolTest, ManyShortJobs) {
  ThreadPool pool(2);
  std::atomic<int64_t> total{0};
  for (int j = 0; j < 20000; ++j) {
    pool.RunOnAll([&](int t, int nt) { total += t + 1; });
  }
  EXPECT_EQ(total.load(), 20000 * 3);
}

}  // namespace
}  // namespace cachette

#include "core/units.h"

namespace cachette {
namespace {

TEST(UnitsTest, ParseBytes) {
  EXPECT_EQ(*ParseBytes("512MiB"), 512ull << 20);
  EXPECT_EQ(*ParseBytes("4GiB"), 4ull << 30);
  EXPECT_EQ(*ParseBytes("4g"), 4ull << 30);
  EXPECT_EQ(*ParseBytes("1.5K"), 1536u);
  EXPECT_EQ(*ParseBytes("65536"), 65536u);
  for (const char* bad : {"", "MiB", "-1G", "0", "12 parsecs", "1e30T", "nan"}) {
    Result<uint64_t> r = ParseBytes(bad);
    EXPECT_FALSE(r.ok()) << bad;
    if (!r.ok()) {
      EXPECT_NE(r.status().message().find("byte size"), std::string::npos);
    }
  }
  EXPECT_EQ(FormatBytes(1536), "1.5 KiB");
  EXPECT_EQ(FormatBytes(100), "100 B");
}

}  // namespace
}  // namespace cachette
