#include "core/thread_pool.h"

#include <algorithm>
#include <chrono>
#include <memory>

#if defined(__x86_64__)
#include <immintrin.h>
#define CT_PAUSE() _mm_pause()
#else
#define CT_PAUSE() std::this_thread::yield()
#endif

namespace cachette {
namespace {
constexpr int kSpinIterations = 1 << 16;  // ~100-300 us of polling before sleeping
constexpr int64_t kChunksPerThread = 4;    // ParallelFor's chunks per thread
}  // namespace

ThreadPool::ThreadPool(int n_threads) {
  if (n_threads <= 0) n_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  n_threads_ = n_threads;
  workers_.reserve(n_threads - 1);
  for (int i = 1; i < n_threads; ++i) workers_.emplace_back([this, i] { WorkerLoop(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_.store(true);
    generation_.fetch_add(1);
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::WorkerLoop(int index) {
  uint64_t seen = 0;
  for (;;) {
    uint64_t gen = generation_.load(std::memory_order_acquire);
    for (int spin = 0; gen == seen && spin < kSpinIterations; ++spin) {
      if (spin < kSpinIterations / 16) {
        CT_PAUSE();
      } else {
        std::this_thread::yield();
      }
      gen = generation_.load(std::memory_order_acquire);
    }
    if (gen == seen) {
      std::unique_lock<std::mutex> lock(mu_);
      sleepers_.fetch_add(1);
      cv_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
      sleepers_.fetch_sub(1);
      gen = generation_.load(std::memory_order_acquire);
    }
    seen = gen;
    if (stop_.load()) return;
    (*job_)(index, n_threads_);
    pending_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

void ThreadPool::RunOnAll(const std::function<void(int, int)>& fn) {
  if (n_threads_ == 1) {
    fn(0, 1);
    return;
  }
  std::lock_guard<std::mutex> call_lock(call_mu_);
  pending_.store(n_threads_ - 1, std::memory_order_relaxed);
  {
    // job_ is published before the generation bump; workers read it after seeing the bump.
    std::lock_guard<std::mutex> lock(mu_);
    job_ = &fn;
    generation_.fetch_add(1, std::memory_order_acq_rel);
  }
  if (sleepers_.load() > 0) cv_.notify_all();
  fn(0, n_threads_);
  // Spin while the workers are likely running; yield once they may have been descheduled (an
  // oversubscribed machine), so a waiting caller does not burn the core a worker needs.
  for (int spin = 0; pending_.load(std::memory_order_acquire) != 0; ++spin) {
    if (spin < kSpinIterations / 16) {
      CT_PAUSE();
    } else {
      std::this_thread::yield();
    }
  }
}

void ThreadPool::ParallelFor(int64_t n, const RangeFn& fn, int64_t grain) {
  ParallelRanges(n, fn, grain, false);
}

void ThreadPool::ParallelForStreaming(int64_t n, const RangeFn& fn, int64_t grain) {
  ParallelRanges(n, fn, grain, true);
}

void ThreadPool::ParallelRanges(int64_t n, const RangeFn& fn, int64_t grain, bool streaming) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int64_t units = (n + grain - 1) / grain;
  const int threads = static_cast<int>(std::min<int64_t>(n_threads_, units));
  if (threads <= 1) {
    fn(0, n, 0);
  } else if (streaming && units <= int64_t{0xffffffff}) {  // RunShares packs 32-bit bounds
    RunShares(n, fn, grain, units, threads);
  } else {
    RunChunks(n, fn, grain, units, threads);
  }
}

void ThreadPool::RunChunks(int64_t n, const RangeFn& fn, int64_t grain, int64_t units,
                           int threads) {
  // Chunks taken from a shared counter, not one fixed range per thread: a thread that the OS
  // or the hypervisor deschedules mid-call (a 2-vCPU VM with steal time, a busy core) leaves
  // its chunks to the others instead of holding the whole call up. A few chunks per thread
  // keep the counter's cost out of sight.
  const int64_t chunks = std::min<int64_t>(units, int64_t{threads} * kChunksPerThread);
  const int64_t per = units / chunks, extra = units % chunks;
  std::atomic<int64_t> next{0};
  RunOnAll([&](int t, int) {
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < chunks;
         c = next.fetch_add(1, std::memory_order_relaxed)) {
      const int64_t u0 = c * per + std::min<int64_t>(c, extra);
      const int64_t u1 = u0 + per + (c < extra ? 1 : 0);
      const int64_t b = std::min(n, u0 * grain), e = std::min(n, u1 * grain);
      if (b < e) fn(b, e, t);
    }
  });
}

void ThreadPool::RunShares(int64_t n, const RangeFn& fn, int64_t grain, int64_t units,
                           int threads) {
  // Each share's unclaimed units [lo, hi) packed in one word (lo high, hi low) so that the
  // owner (lo up) and the others (hi down) claim with one compare-and-swap and never overlap.
  struct alignas(64) Share {
    std::atomic<uint64_t> span;
  };
  constexpr int kLocal = 8;
  Share local[kLocal];
  std::unique_ptr<Share[]> heap;
  Share* shares = local;
  if (threads > kLocal) {
    heap = std::make_unique<Share[]>(threads);
    shares = heap.get();
  }
  for (int t = 0; t < threads; ++t) {
    const uint64_t lo = static_cast<uint64_t>(units * t / threads);
    const uint64_t hi = static_cast<uint64_t>(units * (t + 1) / threads);
    shares[t].span.store(lo << 32 | hi, std::memory_order_relaxed);
  }
  // Claims a quarter of what is left of share s (at least one unit), from the front or the
  // back; false once it is empty.
  auto claim = [&](int s, bool front, int64_t* u0, int64_t* u1) {
    uint64_t w = shares[s].span.load(std::memory_order_relaxed);
    for (;;) {
      const auto lo = static_cast<int64_t>(w >> 32);
      const auto hi = static_cast<int64_t>(w & 0xffffffffu);
      if (lo >= hi) return false;
      const int64_t take = std::max<int64_t>(1, (hi - lo) / 4);
      const int64_t nlo = front ? lo + take : lo, nhi = front ? hi : hi - take;
      const uint64_t nw = static_cast<uint64_t>(nlo) << 32 | static_cast<uint64_t>(nhi);
      if (shares[s].span.compare_exchange_weak(w, nw, std::memory_order_relaxed)) {
        *u0 = front ? lo : nhi;
        *u1 = front ? nlo : hi;
        return true;
      }
    }
  };
  auto run = [&](int64_t u0, int64_t u1, int t) {
    const int64_t b = u0 * grain, e = std::min(n, u1 * grain);
    if (b < e) fn(b, e, t);
  };
  RunOnAll([&](int t, int) {
    int64_t u0 = 0, u1 = 0;
    if (t < threads) {
      while (claim(t, true, &u0, &u1)) run(u0, u1, t);
    }
    // Then the others' shares from the back; a thread without a share (more threads than
    // units) visits them all.
    for (int k = t < threads ? 1 : 0; k < threads; ++k) {
      const int s = (t + k) % threads;
      while (claim(s, false, &u0, &u1)) run(u0, u1, t);
    }
  });
}

}  // namespace cachette
