#include "cache/executor.h"

#include <pthread.h>

#include <exception>
#include <typeinfo>

#include "core/log.h"

namespace cachette::cache {

ThreadExecutor::ThreadExecutor(std::string name, int threads, size_t queue_capacity)
    : name_(std::move(name)), capacity_(queue_capacity) {
  for (int i = 0; i < std::max(threads, 1); ++i) {
    threads_.emplace_back([this] { Loop(); });
    pthread_setname_np(threads_.back().native_handle(), name_.substr(0, 15).c_str());
  }
}

ThreadExecutor::~ThreadExecutor() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  for (std::thread& t : threads_) t.join();
}

bool ThreadExecutor::TrySubmit(std::function<void()> task) {
  {
    std::lock_guard lock(mu_);
    if (stop_ || queue_.size() >= capacity_) return false;
    queue_.push_back(std::move(task));
  }
  work_cv_.notify_one();
  return true;
}

void ThreadExecutor::Drain() {
  std::unique_lock lock(mu_);
  idle_cv_.wait(lock, [&] { return queue_.empty() && running_ == 0; });
}

uint64_t ThreadExecutor::tasks_failed() const {
  std::lock_guard lock(mu_);
  return tasks_failed_;
}

bool ThreadExecutor::RunGuarded(const std::function<void()>& task) {
  const char* kind = "an exception not derived from std::exception";
  std::string what;
  try {
    task();
    return true;
  } catch (const std::exception& e) {
    kind = typeid(e).name();
    try {
      what = e.what();
    } catch (...) {  // out of memory while copying the message: log without it
    }
  } catch (...) {
  }
  uint64_t failed;
  {
    std::lock_guard lock(mu_);
    failed = ++tasks_failed_;
  }
  // The first failure is loud; a task that throws on every call must not flood the log. The
  // log line allocates: if that throws too (std::bad_alloc), the failure stays counted.
  try {
    if (failed == 1) {
      CT_LOG(kError) << "executor " << name_ << ": a task threw " << kind << " (" << what
                     << "); caught and counted, the thread goes on";
    } else {
      CT_LOG(kDebug) << "executor " << name_ << ": a task threw " << kind << " (" << what
                     << "), failure " << failed;
    }
  } catch (...) {
  }
  return false;
}

size_t ThreadExecutor::queued() const {
  std::lock_guard lock(mu_);
  return queue_.size() + static_cast<size_t>(running_);
}

void ThreadExecutor::Loop() {
  std::unique_lock lock(mu_);
  for (;;) {
    work_cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stop_ and drained
    std::function<void()> task = std::move(queue_.front());
    queue_.pop_front();
    ++running_;
    lock.unlock();
    (void)RunGuarded(task);
    task = nullptr;  // destroy captures outside the lock
    lock.lock();
    --running_;
    if (queue_.empty() && running_ == 0) idle_cv_.notify_all();
  }
}

}  // namespace cachette::cache
