// Named executors for the cache layer: a fixed set of threads draining a bounded FIFO.
//
// The store runs write-behind on an `io` executor (one thread, so writes to a tier are
// serialized and a full queue sheds load instead of growing) and loads on a `load` executor.
// TrySubmit never blocks: when the queue is full it returns false and the caller counts a drop.
// Threads are joined by the destructor after the queue is drained; nothing is detached.
//
// A task that throws does not end the process: the exception stops at the task boundary, is
// logged (once per executor at kError, then at kDebug) and counted in tasks_failed(); the
// thread goes on with the next task. Tasks should still report errors as Status values to
// whoever waits on them: a task that throws has not run to its end, so anything it was to
// complete (a promise, a load handle) must be completed by the caller's own guard.
// Thread-safety: all methods are safe to call concurrently, except that a task must not call
// Drain() on its own executor (it would wait for itself).
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace cachette::cache {

class ThreadExecutor {
 public:
  // `name` (at most 15 characters) names the threads, e.g. "ct-io".
  ThreadExecutor(std::string name, int threads, size_t queue_capacity);
  ~ThreadExecutor();  // runs what is queued, then joins
  ThreadExecutor(const ThreadExecutor&) = delete;
  ThreadExecutor& operator=(const ThreadExecutor&) = delete;

  // Queues `task`; false (and `task` is dropped) if the queue holds queue_capacity tasks.
  bool TrySubmit(std::function<void()> task);
  // Waits until every task queued before the call has run.
  void Drain();
  size_t queued() const;
  // Tasks that ended by throwing (caught, logged and counted; see above).
  uint64_t tasks_failed() const;

 private:
  void Loop();
  // Runs `task`, catching whatever it throws. False if it threw.
  bool RunGuarded(const std::function<void()>& task);

  const std::string name_;
  const size_t capacity_;
  mutable std::mutex mu_;
  std::condition_variable work_cv_;
  std::condition_variable idle_cv_;
  std::deque<std::function<void()>> queue_;  // GUARDED_BY(mu_)
  int running_ = 0;                          // GUARDED_BY(mu_)
  bool stop_ = false;                        // GUARDED_BY(mu_)
  uint64_t tasks_failed_ = 0;                // GUARDED_BY(mu_)
  std::vector<std::thread> threads_;
};

}  // namespace cachette::cache
