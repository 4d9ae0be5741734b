#include "core/timer.h"

#include <algorithm>
#include <atomic>
#include <cmath>
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

// One pass: `threads` threads each sum their share of raw `sweeps` times, starting together once
// all exist (creating them is not timed); the pass runs from that start to the last one's end.
// Bytes/s, or 0 if the clock did not move.
double ReadPass(const uint64_t* raw, size_t per, int threads, int sweeps) {
  std::vector<std::thread> ts;
  std::vector<uint64_t> sums(threads);
  std::vector<int64_t> ends(threads);
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  for (int t = 0; t < threads; ++t) {
    ts.emplace_back([&, t] {
      ready.fetch_add(1);
      while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
      uint64_t s = 0;
      for (int k = 0; k < sweeps; ++k) s += Sum(raw + t * per, per);
      sums[t] = s;
      ends[t] = NowNanos();
    });
  }
  while (ready.load() < threads) std::this_thread::yield();
  const int64_t start = NowNanos();
  go.store(true, std::memory_order_release);
  for (auto& t : ts) t.join();
  const int64_t end = *std::max_element(ends.begin(), ends.end());
  volatile uint64_t sink = 0;
  for (uint64_t v : sums) sink = sink + v;
  (void)sink;
  const double seconds = static_cast<double>(end - start) * 1e-9;
  return seconds > 0 ? static_cast<double>(per * threads * sizeof(uint64_t)) * sweeps / seconds
                     : 0;
}

}  // namespace

MemoryReadProbe::MemoryReadProbe(size_t buffer_bytes, int threads) {
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  threads_ = threads;
  const size_t n = buffer_bytes / sizeof(uint64_t);
  per_ = (n / threads) & ~size_t{15};
  if (per_ == 0) return;
  // aligned_alloc wants a size that is a multiple of the alignment.
  buf_ = static_cast<uint64_t*>(std::aligned_alloc(64, (n * sizeof(uint64_t) + 63) / 64 * 64));
  if (buf_ == nullptr) return;  // no room for the buffer: not measured
  for (size_t i = 0; i < n; ++i) buf_[i] = i;  // touch every page
}

MemoryReadProbe::~MemoryReadProbe() { std::free(buf_); }

double MemoryReadProbe::Pass(double seconds) {
  if (!ok()) return 0;
  int sweeps = 1;
  if (seconds > 0 && last_rate_ > 0) {
    const double bytes = static_cast<double>(per_ * threads_ * sizeof(uint64_t));
    // Capped so that a slow last pass cannot make the next one run for minutes.
    sweeps = static_cast<int>(std::clamp(std::ceil(seconds * last_rate_ / bytes), 1.0, 1000.0));
  }
  const double rate = ReadPass(buf_, per_, threads_, sweeps);
  if (rate > 0) last_rate_ = rate;
  return rate;
}

ReadBandwidth MeasureMemoryReadBandwidth(size_t buffer_bytes, int threads, double pass_seconds) {
  MemoryReadProbe probe(buffer_bytes, threads);
  return MeasureMemoryReadBandwidth(probe, pass_seconds);
}

ReadBandwidth MeasureMemoryReadBandwidth(MemoryReadProbe& probe, double pass_seconds) {
  if (!probe.ok()) return {};
  // A first, untimed sweep sets the rate from which the passes' sweeps are counted.
  if (pass_seconds > 0) probe.Pass(0);
  constexpr int kPasses = 5;
  std::vector<double> rates;
  for (int pass = 0; pass < kPasses; ++pass) {
    const double rate = probe.Pass(pass_seconds);
    if (rate > 0) rates.push_back(rate);
  }
  if (rates.empty()) return {};
  std::sort(rates.begin(), rates.end());
  return {rates.back(), rates[rates.size() / 2]};
}

}  // namespace cachette
