#include "cache/executor.h"

#include <gtest/gtest.h>

#include <atomic>
#include <new>
#include <stdexcept>
#include <thread>

namespace cachette::cache {
namespace {

TEST(ThreadExecutorTest, RunsEveryQueuedTaskBeforeDrainReturns) {
  ThreadExecutor ex("ct-test", 2, 64);
  std::atomic<int> ran{0};
  for (int i = 0; i < 50; ++i) ASSERT_TRUE(ex.TrySubmit([&] { ran.fetch_add(1); }));
  ex.Drain();
  EXPECT_EQ(ran.load(), 50);
  EXPECT_EQ(ex.queued(), 0u);
  EXPECT_EQ(ex.tasks_failed(), 0u);
}

TEST(ThreadExecutorTest, FullQueueRefusesInsteadOfBlocking) {
  ThreadExecutor ex("ct-test", 1, 1);
  std::atomic<bool> release{false};
  ASSERT_TRUE(ex.TrySubmit([&] {
    while (!release.load()) std::this_thread::yield();
  }));
  // The worker may not have taken the first task yet: fill the queue until refused.
  int accepted = 0;
  while (ex.TrySubmit([] {})) ++accepted;
  EXPECT_LE(accepted, 1);
  release = true;
  ex.Drain();
}

// Regression: a task that threw escaped the worker thread and std::terminate ended the server.
TEST(ThreadExecutorTest, ThrowingTaskIsCaughtCountedAndTheThreadGoesOn) {
  ThreadExecutor ex("ct-test", 1, 64);
  std::atomic<int> ran{0};
  ASSERT_TRUE(ex.TrySubmit([] { throw std::runtime_error("boom"); }));
  ASSERT_TRUE(ex.TrySubmit([&] { ran.fetch_add(1); }));
  ASSERT_TRUE(ex.TrySubmit([] { throw std::bad_alloc(); }));
  ASSERT_TRUE(ex.TrySubmit([] { throw 42; }));  // not a std::exception
  ASSERT_TRUE(ex.TrySubmit([&] { ran.fetch_add(1); }));
  ex.Drain();  // returns: the failed tasks were accounted as finished
  EXPECT_EQ(ran.load(), 2);
  EXPECT_EQ(ex.tasks_failed(), 3u);
  EXPECT_EQ(ex.queued(), 0u);
}

TEST(ThreadExecutorTest, DestructorRunsQueuedTasksEvenAfterAThrow) {
  std::atomic<int> ran{0};
  {
    ThreadExecutor ex("ct-test", 1, 64);
    ASSERT_TRUE(ex.TrySubmit([] { throw std::logic_error("first"); }));
    for (int i = 0; i < 10; ++i) ASSERT_TRUE(ex.TrySubmit([&] { ran.fetch_add(1); }));
  }
  EXPECT_EQ(ran.load(), 10);
}

}  // namespace
}  // namespace cachette::cache
