// Past-Future admission's peak estimate against a step-by-step simulation, and its sampling.
#include "sched/admission.h"

#include <gtest/gtest.h>

#include <random>

namespace cachette::sched {
namespace {

// The naive twin: walk time one token at a time; at time t a sequence with remaining r >= t
// holds pages(tokens + t), one with r < t has finished and given back what it held.
int64_t NaivePeak(const std::vector<SeqLoad>& seqs, const std::vector<int64_t>& remaining,
                  int P) {
  auto pages = [P](int64_t n) { return (n + P - 1) / P; };
  int64_t horizon = 0;
  for (int64_t r : remaining) horizon = std::max(horizon, r);
  int64_t peak = 0;
  for (int64_t t = 1; t <= horizon; ++t) {
    int64_t need = 0;
    for (size_t i = 0; i < seqs.size(); ++i) {
      need += remaining[i] >= t ? pages(seqs[i].tokens + t) - seqs[i].held_pages
                                : -seqs[i].held_pages;
    }
    peak = std::max(peak, need);
  }
  return peak;
}

TEST(PastFutureTest, PeakMatchesAStepByStepSimulation) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 500; ++trial) {
    const int P = 1 + static_cast<int>(rng() % 32);
    const size_t n = 1 + rng() % 8;
    std::vector<SeqLoad> seqs(n);
    std::vector<int64_t> remaining(n);
    for (size_t i = 0; i < n; ++i) {
      seqs[i].tokens = static_cast<int64_t>(rng() % 300);
      seqs[i].held_pages = (seqs[i].tokens + P - 1) / P - static_cast<int64_t>(rng() % 2);
      seqs[i].held_pages = std::max<int64_t>(0, seqs[i].held_pages);
      remaining[i] = 1 + static_cast<int64_t>(rng() % 200);
    }
    ASSERT_EQ(PeakExtraPages(seqs, remaining, P), NaivePeak(seqs, remaining, P))
        << "trial " << trial;
  }
}

TEST(PastFutureTest, ShortHistoryMeansWorstCaseAndLongOutputsUseTheirBudget) {
  PastFutureAdmission pf;
  std::vector<SeqLoad> seqs = {{16, 0, 512, 1}};
  for (int i = 0; i < 9; ++i) pf.Finished(8);
  EXPECT_EQ(pf.EstimateExtraPages(seqs, 16), -1);  // too little history: not an estimate
  pf.Finished(8);
  // Every past output was 8 tokens: 16 + 8 tokens need 2 pages, one more than held.
  EXPECT_EQ(pf.EstimateExtraPages(seqs, 16), 1);
  // A request that already generated more than anything seen is assumed to run to its budget.
  seqs[0] = {16 + 100, 100, 512, 8};
  EXPECT_EQ(pf.EstimateExtraPages(seqs, 16), (16 + 512 + 15) / 16 - 8);
  // The history window keeps the last values only.
  PastFutureAdmission small(10);
  for (int i = 0; i < 10; ++i) small.Finished(1000);
  for (int i = 0; i < 10; ++i) small.Finished(4);
  EXPECT_EQ(small.history_size(), 10u);
  EXPECT_EQ(small.EstimateExtraPages(std::vector<SeqLoad>{{0, 0, 2000, 0}}, 16), 1);
}

}  // namespace
}  // namespace cachette::sched
