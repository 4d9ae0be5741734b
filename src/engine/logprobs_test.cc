// LogprobsAt against its naive twin (full sort, long double) on fresh random logits, and the
// properties the API promises: values <= 0, the top list sorted with ties by id, the chosen
// token's value equal to its top entry's, and no overflow on huge logits.
#include "engine/logprobs.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

namespace cachette {
namespace {

// The reference: every token sorted, the normalizer in long double.
PositionLogprobs NaiveLogprobs(const std::vector<float>& logits, TokenId token, int top_n) {
  long double m = logits[0];
  for (float l : logits) m = std::max<long double>(m, l);
  long double sum = 0;
  for (float l : logits) sum += std::exp(static_cast<long double>(l) - m);
  const long double lse = m + std::log(sum);
  std::vector<TokenId> ids(logits.size());
  std::iota(ids.begin(), ids.end(), 0);
  std::stable_sort(ids.begin(), ids.end(),
                   [&](TokenId a, TokenId b) { return logits[a] > logits[b]; });
  PositionLogprobs out;
  out.chosen = {token, static_cast<double>(logits[token] - lse)};
  for (int i = 0; i < top_n && i < static_cast<int>(ids.size()); ++i) {
    out.top.push_back({ids[i], static_cast<double>(logits[ids[i]] - lse)});
  }
  return out;
}

TEST(LogprobsTest, MatchesTheNaiveTwinOnRandomLogits) {
  std::mt19937 rng(20261201);
  for (int round = 0; round < 200; ++round) {
    const int n = 1 + static_cast<int>(rng() % 3000);
    std::normal_distribution<float> dist(0.0f, 1.0f + static_cast<float>(rng() % 10));
    std::vector<float> logits(n);
    for (float& l : logits) l = dist(rng);
    if (round % 4 == 0) {
      // Ties: quantized logits.
      for (float& l : logits) l = std::round(l);
    }
    const TokenId token = static_cast<TokenId>(rng() % n);
    const int top_n = static_cast<int>(rng() % (kMaxTopLogprobs + 1));
    const PositionLogprobs got = LogprobsAt(logits, token, top_n);
    const PositionLogprobs want = NaiveLogprobs(logits, token, top_n);
    ASSERT_EQ(got.chosen.token, token);
    EXPECT_NEAR(got.chosen.logprob, want.chosen.logprob, 1e-9);
    ASSERT_EQ(got.top.size(), want.top.size()) << "n " << n << " top_n " << top_n;
    for (size_t i = 0; i < got.top.size(); ++i) {
      EXPECT_EQ(got.top[i].token, want.top[i].token) << "round " << round << " rank " << i;
      EXPECT_NEAR(got.top[i].logprob, want.top[i].logprob, 1e-9);
      if (got.top[i].token == token) {
        EXPECT_EQ(got.top[i].logprob, got.chosen.logprob);
      }
    }
  }
}

TEST(LogprobsTest, ValuesAreLogProbabilities) {
  std::vector<float> logits = {1.0f, 3.0f, 2.0f, 3.0f, -5.0f};
  const PositionLogprobs lp = LogprobsAt(logits, 4, 5);
  ASSERT_EQ(lp.top.size(), 5u);
  // Ties keep the lower id first.
  EXPECT_EQ(lp.top[0].token, 1);
  EXPECT_EQ(lp.top[1].token, 3);
  EXPECT_EQ(lp.top[2].token, 2);
  EXPECT_EQ(lp.top[4].token, 4);
  double total = 0;
  for (const TokenLogprob& t : lp.top) {
    EXPECT_LE(t.logprob, 0.0);
    total += std::exp(t.logprob);
  }
  EXPECT_NEAR(total, 1.0, 1e-12);
  EXPECT_EQ(lp.chosen.logprob, lp.top[4].logprob);
  EXPECT_TRUE(LogprobsAt(logits, 0, 0).top.empty());
  EXPECT_EQ(LogprobsAt(logits, 0, 99).top.size(), 5u);  // at most the vocabulary
}

TEST(LogprobsTest, HugeLogitsDoNotOverflow) {
  std::vector<float> logits = {1e30f, 1e30f, -1e30f};
  const PositionLogprobs lp = LogprobsAt(logits, 0, 2);
  EXPECT_NEAR(lp.chosen.logprob, -std::log(2.0), 1e-12);
  EXPECT_TRUE(std::isfinite(lp.top[1].logprob));
}

TEST(LogprobsTest, EqualLogitsGiveBitIdenticalValues) {
  std::mt19937 rng(7);
  std::normal_distribution<float> dist(0.0f, 4.0f);
  std::vector<float> a(8192);
  for (float& l : a) l = dist(rng);
  const std::vector<float> b = a;
  const PositionLogprobs x = LogprobsAt(a, 17, 20), y = LogprobsAt(b, 17, 20);
  EXPECT_EQ(x.chosen.logprob, y.chosen.logprob);
  for (size_t i = 0; i < x.top.size(); ++i) EXPECT_EQ(x.top[i].logprob, y.top[i].logprob);
}

}  // namespace
}  // namespace cachette
