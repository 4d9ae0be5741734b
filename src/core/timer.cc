#include "core/timer.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace cachette {
namespace {

#if defined(__x86_64__)
__attribute__((target("avx2"))) uint64_t SumAvx2(const uint64_t* p, size_t n) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    a0 = _mm256_add_epi64(a0, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i)));
    a1 = _mm256_add_epi64(a1, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 4)));
    a2 = _mm256_add_epi64(a2, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 8)));
    a3 = _mm256_add_epi64(a3, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 12)));
  }
  a0 = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), a0);
  uint64_t s = lanes[0] + lanes[1] + lanes[2] + lanes[3];
  for (; i < n; ++i) s += p[i];
  return s;
}
#endif

uint64_t Sum(const uint64_t* p, size_t n) {
#if defined(__x86_64__)
  if (__builtin_cpu_supports("avx2")) return SumAvx2(p, n);
#endif
  uint64_t s = 0;
  for (size_t i = 0; i < n; ++i) s += p[i];
  return s;
}

}  // namespace

double MeasureMemoryReadBandwidth(size_t buffer_bytes, int threads) {
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const size_t n = buffer_bytes / sizeof(uint64_t);
  const size_t per = (n / threads) & ~size_t{15};
  if (per == 0) return 0;
  // aligned_alloc wants a size that is a multiple of the alignment.
  auto* raw =
      static_cast<uint64_t*>(std::aligned_alloc(64, (n * sizeof(uint64_t) + 63) / 64 * 64));
  if (raw == nullptr) return 0;  // no room for the buffer: not measured
  std::unique_ptr<uint64_t, decltype(&std::free)> buf(raw, &std::free);
  for (size_t i = 0; i < n; ++i) raw[i] = i;  // touch every page
  double best = 0;
  volatile uint64_t sink = 0;
  for (int pass = 0; pass < 5; ++pass) {
    // The threads start together once all exist, and a pass runs from that start to the last
    // one's end: creating the threads is not part of it.
    std::vector<std::thread> ts;
    std::vector<uint64_t> sums(threads);
    std::vector<int64_t> ends(threads);
    std::atomic<int> ready{0};
    std::atomic<bool> go{false};
    for (int t = 0; t < threads; ++t) {
      ts.emplace_back([&, t] {
        ready.fetch_add(1);
        while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
        sums[t] = Sum(raw + t * per, per);
        ends[t] = NowNanos();
      });
    }
    while (ready.load() < threads) std::this_thread::yield();
    const int64_t start = NowNanos();
    go.store(true, std::memory_order_release);
    for (auto& t : ts) t.join();
    const int64_t end = *std::max_element(ends.begin(), ends.end());
    const double s = static_cast<double>(end - start) * 1e-9;
    for (uint64_t v : sums) sink = sink + v;
    if (s > 0) best = std::max(best, static_cast<double>(per * threads * sizeof(uint64_t)) / s);
  }
  (void)sink;
  return best;
}

}  // namespace cachette
