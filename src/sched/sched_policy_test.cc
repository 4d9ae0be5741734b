// The scheduler's two learned models against slow, obvious references: the step cost fit
// (least squares recovers a known linear cost) and Continuum's TTL choice (a brute-force scan
// of the objective over a fine grid of TTLs never beats the chosen one).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "sched/program_ttl.h"
#include "sched/step_cost.h"

namespace cachette::sched {
namespace {

TEST(StepCostModelTest, RecoversALinearCostAndSizesThePrefill) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> dec(0, 16), pre(0, 512);
  std::normal_distribution<double> noise(0, 0.0002);
  const double a = 0.004, b = 0.0015, c = 0.00012;
  StepCostModel m;
  EXPECT_FALSE(m.ready());
  EXPECT_EQ(m.PrefillBudget(4, 0.02, 16, 256), 256) << "not ready: the fixed budget";
  for (int i = 0; i < 400; ++i) {
    const int d = dec(rng), p = i % 3 == 0 ? 0 : pre(rng);
    m.Observe(d, p, a + b * d + c * p + noise(rng));
  }
  ASSERT_TRUE(m.ready());
  EXPECT_NEAR(m.fixed_s(), a, 5e-4);
  EXPECT_NEAR(m.decode_s(), b, 1e-4);
  EXPECT_NEAR(m.prefill_token_s(), c, 1e-5);
  // 8 decodes, 30 ms: (0.030 - 0.004 - 0.012) / 0.00012 = 116 tokens.
  EXPECT_NEAR(static_cast<double>(m.PrefillBudget(8, 0.030, 16, 256)), 116.0, 8.0);
  EXPECT_EQ(m.PrefillBudget(8, 0.005, 16, 256), 16) << "no room: one page still goes";
  EXPECT_EQ(m.PrefillBudget(0, 10.0, 16, 256), 256) << "capped by step_tokens";
  // Garbage in (negative or NaN times) leaves the fit as it was.
  m.Observe(1, 1, -1.0);
  m.Observe(1, 1, std::nan(""));
  EXPECT_NEAR(m.prefill_token_s(), c, 1e-5);
}

TEST(StepCostModelTest, FollowsADriftingCost) {
  StepCostModel m;
  auto step = [&](int i, double c) {
    const int d = i % 5, p = (i % 2) * 100;
    m.Observe(d, p, 0.001 + 0.001 * d + c * p);
  };
  for (int i = 0; i < 200; ++i) step(i, 1e-4);
  for (int i = 0; i < 400; ++i) step(i, 3e-4);
  EXPECT_NEAR(m.prefill_token_s(), 3e-4, 2e-5) << "old steps are forgotten";
}

TEST(StepCostModelTest, NeverFitsANegativeCost) {
  // Steps where more decodes look cheaper (noise, or a machine warming up): the per-decode cost
  // is dropped, not used negative, and the others still fit.
  StepCostModel m;
  for (int i = 0; i < 100; ++i) {
    const int d = i % 5, p = (i % 3) * 64;
    m.Observe(d, p, 0.010 - 0.001 * d + 0.0002 * p);
  }
  ASSERT_TRUE(m.ready());
  EXPECT_EQ(m.decode_s(), 0.0);
  EXPECT_GE(m.fixed_s(), 0.0);
  EXPECT_NEAR(m.prefill_token_s(), 0.0002, 2e-5);
  EXPECT_GE(m.Predict(16, 0), m.Predict(0, 0));
}

// The objective, computed the slow way.
double Net(const std::vector<double>& d, double tau, double benefit, double hold) {
  double p = 0, held = 0;
  for (double x : d) {
    p += x <= tau ? 1 : 0;
    held += std::min(x, tau);
  }
  return p / d.size() * benefit - hold * held / d.size();
}

TEST(ToolTtlEstimatorTest, ChoosesTheBestTtlOfTheObjective) {
  ToolTtlEstimator::Options o;
  o.margin = 1.0;
  o.margin_s = 0;
  std::mt19937 rng(3);
  for (int trial = 0; trial < 50; ++trial) {
    ToolTtlEstimator est(o);
    std::lognormal_distribution<double> dur(std::log(0.5 + trial % 5), 0.8);
    const int n = 1 + static_cast<int>(rng() % 60);
    for (int i = 0; i < n; ++i) est.Observe("search", dur(rng));
    const double benefit = 0.1 + (rng() % 100) / 20.0;
    const double hold = (rng() % 100) / 50.0;
    const double ttl = est.Ttl("search", benefit, hold, 1e9);
    const std::vector<double> d = est.Samples("search");
    const double chosen = ttl > 0 ? Net(d, ttl, benefit, hold) : 0.0;
    double best = 0;
    for (double tau = 0; tau <= d.back() * 1.01; tau += d.back() / 20000) {
      best = std::max(best, Net(d, tau, benefit, hold));
    }
    EXPECT_GE(chosen, best - 1e-9) << "trial " << trial;
  }
}

TEST(ToolTtlEstimatorTest, ColdStartPressureAndCaps) {
  ToolTtlEstimator est;
  // Nothing observed: the exponential prior (mean 2 s) still gives a pin on an idle server.
  const double cold = est.Ttl("new-tool", 1.0, 0.0, 3600);
  EXPECT_GT(cold, 2.0);
  EXPECT_LT(cold, 10.0);
  // An idle server keeps a pin to the longest duration it expects; a crowded one not at all.
  for (int i = 0; i < 100; ++i) est.Observe("code", 0.2 + 0.01 * i);
  const double idle = est.Ttl("code", 0.5, 0.0, 3600);
  EXPECT_GE(idle, 1.19);
  EXPECT_EQ(est.Ttl("code", 0.5, 100.0, 3600), 0.0);
  EXPECT_LE(est.Ttl("code", 0.5, 0.0, 0.3), 0.3) << "capped by the longest pin";
  EXPECT_EQ(est.Ttl("code", 0.0, 0.0, 3600), 0.0) << "nothing to gain";
  // A new tool's prior follows what was seen of the others.
  const double warm_prior = est.Ttl("other", 1.0, 0.0, 3600);
  EXPECT_LT(warm_prior, cold);
  const nlohmann::json j = est.Stats();
  EXPECT_EQ(j["tools"]["code"]["calls"], 100);
  EXPECT_NEAR(j["tools"]["code"]["mean_s"].get<double>(), 0.695, 1e-9);
}

TEST(ToolTtlEstimatorTest, ForgetsBeyondItsBounds) {
  ToolTtlEstimator::Options o;
  o.window = 10;
  o.max_tools = 3;
  ToolTtlEstimator est(o);
  const char* names[] = {"t0", "t1", "t2", "t3", "t4"};
  for (int i = 0; i < 100; ++i) est.Observe(names[i % 5], i);
  EXPECT_EQ(est.Stats()["tools"].size(), 3u);
  EXPECT_LE(est.Samples("t4").size(), 10u + o.prior_samples);
}

}  // namespace
}  // namespace cachette::sched
