// A persistent fork-join thread pool for compute kernels.
//
// ParallelFor(n, fn) splits [0, n) into a few contiguous ranges per thread and runs
// fn(begin, end, thread_index) on the caller plus the workers, returning when all are done.
// Workers spin briefly after each job before sleeping, because a decode step issues hundreds
// of short jobs back to back and a futex wake per job would cost more than the work.
// Not reentrant: fn must not call ParallelFor on the same pool. One caller at a time
// (calls from several threads are serialized by a mutex).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace cachette {

class ThreadPool {
 public:
  // n_threads counts the calling thread: ThreadPool(1) runs everything inline.
  // n_threads <= 0 means one per online CPU.
  explicit ThreadPool(int n_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }

  using RangeFn = std::function<void(int64_t begin, int64_t end, int thread_index)>;
  // Runs fn over [0, n) split into contiguous ranges whose boundaries are multiples of `grain`
  // (except the last): a few per thread, each taken by whichever thread is free next, so fn
  // may run several times on one thread (thread_index says which). Empty ranges are not called.
  void ParallelFor(int64_t n, const RangeFn& fn, int64_t grain = 1);

  // Like ParallelFor, for work that streams memory (a decode step's matmuls): thread t owns
  // the t-th contiguous share of [0, n) and takes it from the front in pieces that shrink as
  // it empties (a quarter of what is left, at least one grain), so it reads its share in
  // address order; a thread whose share is done takes pieces from the back of the others'.
  // The threads finish within about one grain of each other instead of one chunk, without
  // breaking each thread's stream into chunks interleaved with the others'. fn is called more
  // often than by ParallelFor (about 20 times per thread for a few hundred grains).
  void ParallelForStreaming(int64_t n, const RangeFn& fn, int64_t grain = 1);

  // Runs fn(thread_index, size()) once on every thread.
  void RunOnAll(const std::function<void(int thread_index, int n_threads)>& fn);

 private:
  void WorkerLoop(int index);
  // ParallelFor and ParallelForStreaming: [0, n) in units of grain, run inline when one
  // thread is enough, else by RunChunks or RunShares over `threads` threads.
  void ParallelRanges(int64_t n, const RangeFn& fn, int64_t grain, bool streaming);
  void RunChunks(int64_t n, const RangeFn& fn, int64_t grain, int64_t units, int threads);
  void RunShares(int64_t n, const RangeFn& fn, int64_t grain, int64_t units, int threads);

  int n_threads_;
  std::vector<std::thread> workers_;
  std::mutex call_mu_;  // serializes callers

  std::mutex mu_;
  std::condition_variable cv_;
  const std::function<void(int, int)>* job_ = nullptr;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
  std::atomic<int> sleepers_{0};
};

}  // namespace cachette
