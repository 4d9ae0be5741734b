// The KV budget policies: every plan valid and within budget on random statistics and layer
// lengths, each policy's rule checked against a slow reference that sorts, and the config
// errors naming their field.
#include "kv/kv_policy.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <set>

namespace cachette {
namespace {

using SlotList = std::vector<int64_t>;

KvPolicyConfig Config(const std::string& name, double budget = 32) {
  KvPolicyConfig c;
  c.name = name;
  c.budget = budget;
  return c;
}

std::unique_ptr<KvPolicy> Make(const KvPolicyConfig& c) {
  auto policy = MakeKvPolicy(c);
  EXPECT_TRUE(policy.ok()) << policy.status().ToString();
  return policy.ok() ? std::move(policy).value() : nullptr;
}

KvPolicyInput Input(const std::vector<int64_t>& lengths, int n_kv_head, int64_t budget,
                    const AttentionStats* stats) {
  KvPolicyInput in;
  in.n_layer = static_cast<int>(lengths.size());
  in.n_kv_head = n_kv_head;
  in.layer_tokens = lengths;
  in.budget = budget;
  in.stats = stats;
  in.tokens_seen = lengths.empty() ? 0 : *std::max_element(lengths.begin(), lengths.end());
  return in;
}

// Random statistics; with `ties`, values from a few levels so that equal scores are common.
AttentionStats RandomStats(int n_layer, int n_kv_head, int64_t capacity, bool ties,
                           std::mt19937& rng) {
  AttentionStats s;
  s.Resize(n_layer, n_kv_head, capacity);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  auto value = [&] { return ties ? static_cast<float>(rng() % 4) * 0.25f : u(rng); };
  for (int l = 0; l < n_layer; ++l) {
    s.win_rows[l] = 1 + static_cast<int64_t>(rng() % 16);
    const double rows = static_cast<double>(s.win_rows[l]);
    for (int h = 0; h < n_kv_head; ++h) {
      for (int64_t j = 0; j < capacity; ++j) {
        const double mean = value() / 8, var = value() / 64;
        s.WinSum(l, h)[j] = static_cast<float>(rows * mean);
        s.WinSq(l, h)[j] = static_cast<float>(rows * (mean * mean + var));
        s.Cum(l, h)[j] = value() * 10;
      }
    }
  }
  return s;
}

SlotList Range(int64_t begin, int64_t end) {
  SlotList v(end - begin);
  std::iota(v.begin(), v.end(), begin);
  return v;
}

SlotList Concat(SlotList a, const SlotList& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// The reference selection: the k best of `candidates` by score (higher first, lower slot on
// ties) by a full sort.
SlotList TopBySort(SlotList candidates, const std::function<double(int64_t)>& score, int64_t k) {
  std::sort(candidates.begin(), candidates.end(), [&](int64_t a, int64_t b) {
    const double sa = score(a), sb = score(b);
    return sa != sb ? sa > sb : a < b;
  });
  candidates.resize(std::min<size_t>(k, candidates.size()));
  std::sort(candidates.begin(), candidates.end());
  return candidates;
}

int64_t Kept(const KeepPlan& plan, int layer) { return plan.kept(layer); }

int64_t TotalKept(const KeepPlan& plan) {
  int64_t total = 0;
  for (size_t l = 0; l < plan.slots.size(); ++l) total += plan.kept(static_cast<int>(l));
  return total;
}

bool PerLayerBudgets(const std::string& name) { return name == "pyramidkv" || name == "cake"; }

// ---- Names, validation, budgets ------------------------------------------------------------

TEST(KvPolicyNames, ListsEveryPolicyInDocumentationOrder) {
  EXPECT_EQ(KvPolicyNames(), (std::vector<std::string>{"streamingllm", "h2o", "snapkv",
                                                       "pyramidkv", "cake", "lacache",
                                                       "elastic", "blockwise"}));
}

TEST(ValidateKvPolicy, DefaultsAreValidForEveryPolicy) {
  for (const std::string& name : KvPolicyNames()) {
    EXPECT_TRUE(ValidateKvPolicy(Config(name, 0.2)).ok()) << name;
    EXPECT_TRUE(ValidateKvPolicy(Config(name, 512)).ok()) << name;
  }
}

TEST(ValidateKvPolicy, UnknownNameNamesTheFieldAndListsTheKnownOnes) {
  const Status s = ValidateKvPolicy(Config("lru"));
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(),
            "kv_policy.name: unknown policy 'lru' (known: streamingllm, h2o, snapkv, pyramidkv, "
            "cake, lacache, elastic, blockwise)");
  EXPECT_EQ(ValidateKvPolicy(Config("")).code(), StatusCode::kInvalidArgument);
  EXPECT_FALSE(MakeKvPolicy(Config("SnapKV")).ok());  // names are exact
}

TEST(ValidateKvPolicy, BudgetMustBeAFiniteNumberAboveZero) {
  for (double b : {0.0, -1.0, -0.5, std::nan(""), std::numeric_limits<double>::infinity()}) {
    const Status s = ValidateKvPolicy(Config("h2o", b));
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << b;
    EXPECT_EQ(s.message().rfind("kv_policy.budget: ", 0), 0u) << s.message();
  }
  EXPECT_TRUE(ValidateKvPolicy(Config("h2o", 1e-6)).ok());
  EXPECT_TRUE(ValidateKvPolicy(Config("h2o", 1.5)).ok());
}

TEST(ValidateKvPolicy, BadParametersNameTheirField) {
  struct Case {
    std::string policy;
    std::function<void(KvPolicyConfig&)> set;
    std::string field;
  };
  const std::vector<Case> cases = {
      {"streamingllm", [](KvPolicyConfig& c) { c.sinks = -1; }, "kv_policy.sinks: "},
      {"lacache", [](KvPolicyConfig& c) { c.sinks = -3; }, "kv_policy.sinks: "},
      {"elastic", [](KvPolicyConfig& c) { c.sinks = -1; }, "kv_policy.sinks: "},
      {"snapkv", [](KvPolicyConfig& c) { c.window = 0; }, "kv_policy.window: "},
      {"pyramidkv", [](KvPolicyConfig& c) { c.window = -4; }, "kv_policy.window: "},
      {"cake", [](KvPolicyConfig& c) { c.window = 0; }, "kv_policy.window: "},
      {"blockwise", [](KvPolicyConfig& c) { c.window = 0; }, "kv_policy.window: "},
      {"snapkv", [](KvPolicyConfig& c) { c.pool = 4; }, "kv_policy.pool: "},
      {"pyramidkv", [](KvPolicyConfig& c) { c.pool = 0; }, "kv_policy.pool: "},
      {"blockwise", [](KvPolicyConfig& c) { c.pool = -1; }, "kv_policy.pool: "},
      {"pyramidkv", [](KvPolicyConfig& c) { c.beta = 0; }, "kv_policy.beta: "},
      {"pyramidkv", [](KvPolicyConfig& c) { c.beta = 0.5; }, "kv_policy.beta: "},
      {"pyramidkv", [](KvPolicyConfig& c) { c.beta = std::nan(""); }, "kv_policy.beta: "},
      {"cake", [](KvPolicyConfig& c) { c.tau1 = 0; }, "kv_policy.tau1: "},
      {"cake", [](KvPolicyConfig& c) { c.tau2 = -1; }, "kv_policy.tau2: "},
      {"cake", [](KvPolicyConfig& c) { c.gamma = -1; }, "kv_policy.gamma: "},
      {"cake", [](KvPolicyConfig& c) { c.gamma = std::nan(""); }, "kv_policy.gamma: "},
      {"lacache", [](KvPolicyConfig& c) { c.lacache_span = -1; }, "kv_policy.lacache_span: "},
      {"lacache", [](KvPolicyConfig& c) { c.lacache_overlap = -1; },
       "kv_policy.lacache_overlap: "},
      {"lacache", [](KvPolicyConfig& c) {
         c.lacache_span = 8;
         c.lacache_overlap = 8;
       },
       "kv_policy.lacache_overlap: "},
  };
  for (const Case& t : cases) {
    KvPolicyConfig c = Config(t.policy);
    t.set(c);
    const Status s = ValidateKvPolicy(c);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << t.policy << " " << t.field;
    EXPECT_EQ(s.message().rfind(t.field, 0), 0u) << s.message();
    EXPECT_FALSE(MakeKvPolicy(c).ok());
  }
}

TEST(ValidateKvPolicy, ParametersAPolicyDoesNotReadAreNotChecked) {
  KvPolicyConfig c = Config("streamingllm");
  c.pool = 4;
  c.window = 0;
  c.beta = 0;
  EXPECT_TRUE(ValidateKvPolicy(c).ok());
  c = Config("snapkv");
  c.sinks = -1;
  c.lacache_span = -1;
  EXPECT_TRUE(ValidateKvPolicy(c).ok());
}

TEST(MakeKvPolicy, EachPolicyAsksForItsStatistics) {
  struct Want {
    std::string name;
    int window;
    bool cumulative, reassigns, blockwise;
  };
  KvPolicyConfig base = Config("");
  base.window = 7;
  for (const Want& w : std::vector<Want>{{"streamingllm", 0, false, true, false},
                                         {"h2o", 0, true, false, false},
                                         {"snapkv", 7, false, false, false},
                                         {"pyramidkv", 7, false, false, false},
                                         {"cake", 7, false, false, false},
                                         {"lacache", 0, false, true, false},
                                         {"elastic", 0, true, false, false},
                                         {"blockwise", 7, false, false, true}}) {
    base.name = w.name;
    auto p = Make(base);
    ASSERT_NE(p, nullptr);
    EXPECT_EQ(p->name(), w.name);
    EXPECT_EQ(p->stats_window(), w.window) << w.name;
    EXPECT_EQ(p->stats_cumulative(), w.cumulative) << w.name;
    EXPECT_EQ(p->reassigns_positions(), w.reassigns) << w.name;
    EXPECT_EQ(p->blockwise_prefill(), w.blockwise) << w.name;
  }
}

TEST(BudgetTokens, TokensAreCappedAtTheLengthAndFractionsRoundUp) {
  EXPECT_EQ(BudgetTokens(64, 1000), 64);
  EXPECT_EQ(BudgetTokens(64, 10), 10);
  EXPECT_EQ(BudgetTokens(1, 10), 1);
  EXPECT_EQ(BudgetTokens(64.9, 1000), 64);  // a token count is truncated
  EXPECT_EQ(BudgetTokens(1e300, 5), 5);
  EXPECT_EQ(BudgetTokens(0.2, 1000), 200);
  EXPECT_EQ(BudgetTokens(0.2, 1001), 201);
  EXPECT_EQ(BudgetTokens(0.07, 100), 7);  // 0.07 * 100 is 7.000000000000001 in doubles
  EXPECT_EQ(BudgetTokens(0.5, 3), 2);
  EXPECT_EQ(BudgetTokens(1e-9, 10), 1);  // at least one token
  EXPECT_EQ(BudgetTokens(0.999999, 10), 10);
  EXPECT_EQ(BudgetTokens(0.5, 1), 1);
  EXPECT_EQ(BudgetTokens(0.5, 0), 0);
  EXPECT_EQ(BudgetTokens(8, 0), 0);
}

// ---- Every policy on random inputs ---------------------------------------------------------

TEST(AllPolicies, PlansAreValidWithinBudgetAndDeterministicOnRandomInputs) {
  std::mt19937 rng(12);
  for (const std::string& name : KvPolicyNames()) {
    for (int iter = 0; iter < 300; ++iter) {
      KvPolicyConfig c = Config(name);
      c.sinks = static_cast<int>(rng() % 6);
      c.window = 1 + static_cast<int>(rng() % 12);
      c.pool = 1 + 2 * static_cast<int>(rng() % 4);
      c.beta = 1 + rng() % 30;
      c.gamma = (rng() % 3) * 100.0;
      c.lacache_span = static_cast<int>(rng() % 3 == 0 ? rng() % 12 : 0);
      c.lacache_overlap = c.lacache_span > 1 ? static_cast<int>(rng() % c.lacache_span) : 0;
      auto policy = Make(c);
      ASSERT_NE(policy, nullptr);

      const int n_layer = 1 + static_cast<int>(rng() % 6);
      const int n_kv_head = 1 + static_cast<int>(rng() % 3);
      const bool same_length = rng() % 2 == 0;
      std::vector<int64_t> lengths(n_layer, 1 + static_cast<int64_t>(rng() % 160));
      if (!same_length) {
        for (auto& n : lengths) n = static_cast<int64_t>(rng() % 160);
      }
      const int64_t capacity = *std::max_element(lengths.begin(), lengths.end()) + rng() % 8;
      const int64_t budget = 1 + static_cast<int64_t>(rng() % 100);
      const AttentionStats stats = RandomStats(n_layer, n_kv_head, capacity, rng() % 2, rng);
      const bool with_stats = rng() % 8 != 0;
      const KvPolicyInput in = Input(lengths, n_kv_head, budget, with_stats ? &stats : nullptr);
      const std::string where = name + " iter " + std::to_string(iter);

      const KeepPlan plan = policy->Select(in);
      const Status valid = plan.Validate(lengths, n_kv_head);
      ASSERT_TRUE(valid.ok()) << where << ": " << valid.ToString();
      EXPECT_EQ(plan.reassign_positions, policy->reassigns_positions()) << where;
      EXPECT_EQ(!plan.merge_into.empty(), name == "elastic") << where;
      if (PerLayerBudgets(name)) {
        int64_t total = 0;
        for (int64_t n : lengths) total += n;
        EXPECT_LE(TotalKept(plan), std::min(total, n_layer * budget)) << where;
      } else if (policy->reassigns_positions()) {
        const int64_t common =
            std::min(budget, *std::min_element(lengths.begin(), lengths.end()));
        for (int l = 0; l < n_layer; ++l) EXPECT_EQ(Kept(plan, l), common) << where;
      } else {
        for (int l = 0; l < n_layer; ++l) {
          EXPECT_EQ(Kept(plan, l), std::min(lengths[l], budget)) << where << " layer " << l;
        }
      }
      // The same input gives the same plan, from this policy and from a fresh one.
      EXPECT_EQ(policy->Select(in).slots, plan.slots) << where;
      const KeepPlan again = Make(c)->Select(in);
      EXPECT_EQ(again.slots, plan.slots) << where;
      EXPECT_EQ(again.merge_into, plan.merge_into) << where;
    }
  }
}

TEST(AllPolicies, AnEmptySequenceKeepsNothing) {
  for (const std::string& name : KvPolicyNames()) {
    const KeepPlan plan = Make(Config(name))->Select(Input({0, 0, 0}, 2, 8, nullptr));
    EXPECT_TRUE(plan.Validate({0, 0, 0}, 2).ok()) << name;
    EXPECT_EQ(TotalKept(plan), 0) << name;
  }
}

TEST(AllPolicies, ScoringWithoutStatisticsKeepsTheMostRecent) {
  // No statistics (or statistics that do not cover the slots): recency is the only score.
  AttentionStats too_small;
  too_small.Resize(1, 1, 10);
  for (const char* name : {"h2o", "snapkv", "blockwise"}) {
    for (const AttentionStats* stats : {static_cast<const AttentionStats*>(nullptr),
                                        static_cast<const AttentionStats*>(&too_small)}) {
      const KeepPlan plan = Make(Config(name))->Select(Input({100}, 1, 40, stats));
      EXPECT_EQ(plan.slots[0][0], Range(60, 100)) << name;
    }
  }
}

// ---- streamingllm --------------------------------------------------------------------------

TEST(StreamingLlm, KeepsTheSinksAndTheMostRecentSlots) {
  auto p = Make(Config("streamingllm"));
  const KeepPlan plan = p->Select(Input({100, 100}, 2, 20, nullptr));
  EXPECT_TRUE(plan.reassign_positions);
  for (int l = 0; l < 2; ++l) {
    for (int h = 0; h < 2; ++h) EXPECT_EQ(plan.slots[l][h], Concat(Range(0, 4), Range(84, 100)));
  }
  // Within budget: everything. A budget no larger than the sinks still keeps the newest slot.
  EXPECT_EQ(p->Select(Input({15}, 1, 20, nullptr)).slots[0][0], Range(0, 15));
  EXPECT_EQ(p->Select(Input({50}, 1, 4, nullptr)).slots[0][0], Concat(Range(0, 3), {49}));
  EXPECT_EQ(p->Select(Input({50}, 1, 1, nullptr)).slots[0][0], SlotList{49});
}

TEST(StreamingLlm, LayersOfDifferentLengthsKeepOneCount) {
  auto p = Make(Config("streamingllm"));
  const KeepPlan plan = p->Select(Input({100, 12, 30}, 1, 20, nullptr));
  ASSERT_TRUE(plan.Validate({100, 12, 30}, 1).ok());
  EXPECT_EQ(plan.slots[0][0], Concat(Range(0, 4), Range(92, 100)));
  EXPECT_EQ(plan.slots[1][0], Range(0, 12));
  EXPECT_EQ(plan.slots[2][0], Concat(Range(0, 4), Range(22, 30)));
}

// ---- h2o -----------------------------------------------------------------------------------

TEST(H2o, KeepsTheRecentHalfAndTheHeaviestCumulativeSlots) {
  std::mt19937 rng(7);
  auto p = Make(Config("h2o"));
  for (int iter = 0; iter < 200; ++iter) {
    const int64_t n = 1 + rng() % 200, budget = 1 + rng() % 80;
    const AttentionStats stats = RandomStats(2, 2, n, iter % 2, rng);
    const KeepPlan plan = p->Select(Input({n, n}, 2, budget, &stats));
    for (int l = 0; l < 2; ++l) {
      for (int h = 0; h < 2; ++h) {
        SlotList want = Range(0, n);
        if (n > budget) {
          const int64_t recent = budget / 2;
          const float* cum = stats.Cum(l, h);
          want = Concat(TopBySort(Range(0, n - recent), [&](int64_t j) { return cum[j]; },
                                  budget - recent),
                        Range(n - recent, n));
        }
        EXPECT_EQ(plan.slots[l][h], want) << "n " << n << " budget " << budget;
      }
    }
  }
}

// ---- snapkv, blockwise ---------------------------------------------------------------------

// SnapKV's rule written out slowly: pooled scores over the slots before the window.
SlotList SnapReference(const AttentionStats& stats, int layer, int head, int64_t n,
                       int64_t budget, int window, int pool, bool max_pool) {
  if (n <= budget) return Range(0, n);
  if (budget <= window) return Range(n - budget, n);
  const int64_t prefix = n - window;
  std::vector<double> pooled(prefix);
  for (int64_t j = 0; j < prefix; ++j) {
    double best = -1, sum = 0;
    for (int64_t i = j - pool / 2; i <= j + pool / 2; ++i) {
      if (i >= 0 && i < prefix) {
        best = std::max<double>(best, stats.WinSum(layer, head)[i]);
        sum += stats.WinSum(layer, head)[i];
      }
    }
    pooled[j] = max_pool ? best : sum / pool;  // average pooling pads with zeros
  }
  return Concat(TopBySort(Range(0, prefix), [&](int64_t j) { return pooled[j]; },
                          budget - window),
                Range(prefix, n));
}

TEST(SnapKv, PooledScoresMatchASlowReference) {
  std::mt19937 rng(3);
  for (int iter = 0; iter < 300; ++iter) {
    KvPolicyConfig c = Config("snapkv");
    c.window = 1 + rng() % 16;
    c.pool = 1 + 2 * (rng() % 5);
    c.max_pool = iter % 3 == 0;
    auto p = Make(c);
    const int64_t n = 1 + rng() % 200, budget = 1 + rng() % 80;
    const AttentionStats stats = RandomStats(2, 3, n + 3, iter % 2, rng);
    const KeepPlan plan = p->Select(Input({n, n}, 3, budget, &stats));
    for (int l = 0; l < 2; ++l) {
      for (int h = 0; h < 3; ++h) {
        EXPECT_EQ(plan.slots[l][h], SnapReference(stats, l, h, n, budget, c.window, c.pool, c.max_pool))
            << "n " << n << " budget " << budget << " window " << c.window << " pool " << c.pool;
      }
    }
  }
}

TEST(SnapKv, PoolingKeepsTheNeighboursOfAPeak) {
  for (bool max_pool : {false, true}) {
    KvPolicyConfig c = Config("snapkv");
    c.window = 4;
    c.pool = 5;
    c.max_pool = max_pool;
    AttentionStats stats;
    stats.Resize(1, 1, 64);
    stats.win_rows[0] = 4;
    stats.WinSum(0, 0)[30] = 3.0f;  // one peak; the rest zero
    const KeepPlan plan = Make(c)->Select(Input({64}, 1, 9, &stats));
    EXPECT_EQ(plan.slots[0][0], Concat(Range(28, 33), Range(60, 64)));
  }
}

TEST(Blockwise, IsSnapKvReadBlockByBlock) {
  std::mt19937 rng(5);
  const AttentionStats stats = RandomStats(3, 2, 90, false, rng);
  const KvPolicyInput in = Input({90, 90, 90}, 2, 40, &stats);
  EXPECT_EQ(Make(Config("blockwise"))->Select(in).slots, Make(Config("snapkv"))->Select(in).slots);
}

// ---- pyramidkv -----------------------------------------------------------------------------

TEST(PyramidKv, LayerBudgetsDecreaseWithDepthAndSumToTheTotal) {
  std::mt19937 rng(9);
  for (int n_layer : {2, 3, 8, 32}) {
    for (int64_t budget : {40, 64, 100, 257}) {
      KvPolicyConfig c = Config("pyramidkv");
      c.window = 8;
      c.beta = 20;
      const int64_t n = 2000;
      const AttentionStats stats = RandomStats(n_layer, 1, n, false, rng);
      const KeepPlan plan =
          Make(c)->Select(Input(std::vector<int64_t>(n_layer, n), 1, budget, &stats));
      ASSERT_TRUE(plan.Validate(std::vector<int64_t>(n_layer, n), 1).ok());
      EXPECT_EQ(TotalKept(plan), n_layer * budget);
      for (int l = 1; l < n_layer; ++l) EXPECT_LE(Kept(plan, l), Kept(plan, l - 1));
      EXPECT_GT(Kept(plan, 0), Kept(plan, n_layer - 1));
      // The ends of the arithmetic sequence: window + max_num and window + min_num.
      const double d = static_cast<double>(budget - c.window);
      EXPECT_NEAR(Kept(plan, 0), c.window + 2 * d - d / c.beta, 1.0);
      EXPECT_NEAR(Kept(plan, n_layer - 1), c.window + d / c.beta, 1.0);
    }
  }
}

TEST(PyramidKv, UniformWhenTheBudgetIsNoMoreThanTheWindowOrOneLayer) {
  KvPolicyConfig c = Config("pyramidkv");
  c.window = 32;
  auto p = Make(c);
  for (const auto& [lengths, budget] : std::vector<std::pair<std::vector<int64_t>, int64_t>>{
           {{500, 500, 500}, 32}, {{500, 500, 500}, 10}, {{500}, 100}}) {
    const KeepPlan plan = p->Select(Input(lengths, 1, budget, nullptr));
    for (size_t l = 0; l < lengths.size(); ++l) EXPECT_EQ(Kept(plan, int(l)), budget);
  }
}

TEST(PyramidKv, AShortLayerKeepsEverythingAndLendsNothing) {
  KvPolicyConfig c = Config("pyramidkv");
  c.window = 4;
  const KeepPlan wide = Make(c)->Select(Input({400, 400, 400, 400}, 1, 50, nullptr));
  // Layer 0's budget is about 4 + 2 * 46 - 2.3 = 93 slots; it holds 30.
  const KeepPlan plan = Make(c)->Select(Input({30, 400, 400, 400}, 1, 50, nullptr));
  EXPECT_EQ(Kept(plan, 0), 30);
  for (int l = 1; l < 4; ++l) EXPECT_EQ(Kept(plan, l), Kept(wide, l));
}

// ---- cake ----------------------------------------------------------------------------------

// One layer's window statistics: mean attention `mean[j]` per slot and the same variance
// `var` at every slot, over `rows` window rows.
void SetWindow(AttentionStats& s, int layer, const std::vector<double>& mean, double var,
               int64_t rows) {
  s.win_rows[layer] = rows;
  for (int h = 0; h < s.n_kv_head; ++h) {
    for (size_t j = 0; j < mean.size(); ++j) {
      s.WinSum(layer, h)[j] = static_cast<float>(rows * mean[j]);
      s.WinSq(layer, h)[j] = static_cast<float>(rows * (mean[j] * mean[j] + var));
    }
  }
}

TEST(Cake, AFlatterLayerGetsMoreBudget) {
  KvPolicyConfig c = Config("cake");
  c.window = 4;
  const int64_t n = 200;
  AttentionStats s;
  s.Resize(2, 2, n);
  std::vector<double> peaked(n, 0.0), flat(n, 1.0 / n);
  peaked[0] = 0.9;
  for (int j = 1; j < 10; ++j) peaked[j] = 0.01;
  SetWindow(s, 0, peaked, 1e-4, 8);
  SetWindow(s, 1, flat, 1e-4, 8);  // same variance: the entropy decides
  const KeepPlan plan = Make(c)->Select(Input({n, n}, 2, 50, &s));
  ASSERT_TRUE(plan.Validate({n, n}, 2).ok());
  EXPECT_GT(Kept(plan, 1), Kept(plan, 0));
  EXPECT_EQ(TotalKept(plan), 100);
  EXPECT_GE(Kept(plan, 0), c.window + 1);
}

TEST(Cake, AMoreVariableLayerGetsMoreBudget) {
  KvPolicyConfig c = Config("cake");
  c.window = 4;
  const int64_t n = 200;
  AttentionStats s;
  s.Resize(3, 1, n);
  const std::vector<double> flat(n, 1.0 / n);
  SetWindow(s, 0, flat, 1e-6, 8);
  SetWindow(s, 1, flat, 4e-6, 8);
  SetWindow(s, 2, flat, 2e-6, 8);
  const KeepPlan plan = Make(c)->Select(Input({n, n, n}, 1, 40, &s));
  EXPECT_LT(Kept(plan, 0), Kept(plan, 2));
  EXPECT_LT(Kept(plan, 2), Kept(plan, 1));
  EXPECT_EQ(TotalKept(plan), 120);
  // tau2 flattens the allocation: a large tau2 brings the layers closer.
  c.tau2 = 8;
  const KeepPlan soft = Make(c)->Select(Input({n, n, n}, 1, 40, &s));
  EXPECT_LT(Kept(soft, 1) - Kept(soft, 0), Kept(plan, 1) - Kept(plan, 0));
}

TEST(Cake, NoUsablePreferenceSharesTheBudgetEvenly) {
  KvPolicyConfig c = Config("cake");
  c.window = 4;
  AttentionStats zeros;  // window rows but no attention: every preference is 0
  zeros.Resize(3, 1, 100);
  for (auto& r : zeros.win_rows) r = 4;
  AttentionStats no_rows;  // no window rows at all
  no_rows.Resize(3, 1, 100);
  for (const AttentionStats* stats : {&zeros, &no_rows, static_cast<AttentionStats*>(nullptr)}) {
    const KeepPlan plan = Make(c)->Select(Input({100, 100, 100}, 1, 30, stats));
    for (int l = 0; l < 3; ++l) EXPECT_EQ(Kept(plan, l), 30);
  }
}

TEST(Cake, KeepsTheWindowAndTheHighestMeanPlusGammaVariance) {
  std::mt19937 rng(21);
  for (int iter = 0; iter < 100; ++iter) {
    KvPolicyConfig c = Config("cake");
    c.window = 1 + rng() % 10;
    c.gamma = (rng() % 3) * 100.0;
    const int64_t n = 20 + rng() % 150, budget = 1 + rng() % 60;
    const AttentionStats s = RandomStats(1, 2, n, iter % 2, rng);
    const KeepPlan plan = Make(c)->Select(Input({n}, 2, budget, &s));  // one layer: all of it
    for (int h = 0; h < 2; ++h) {
      SlotList want = Range(0, n);
      if (n > budget) {
        const int64_t w = std::min<int64_t>(c.window, budget);
        const double rows = static_cast<double>(s.win_rows[0]);
        auto score = [&](int64_t j) {
          const double mean = s.WinSum(0, h)[j] / rows;
          return mean + c.gamma * std::max(0.0, s.WinSq(0, h)[j] / rows - mean * mean);
        };
        want = Concat(TopBySort(Range(0, n - w), score, budget - w), Range(n - w, n));
      }
      EXPECT_EQ(plan.slots[0][h], want) << "n " << n << " budget " << budget;
    }
  }
}

// The cascade's stages (layers_seen = 1..L, each seen layer compacted to its count, the others
// not read yet): the seen layers share the whole L x B, a layer's count never grows from one
// stage to the next, the unread keep their (zero) slots, and the last stage is the one-shot
// allocation within rounding. cascade=false turns it off.
TEST(Cake, CascadeStagesShrinkToTheOneShotAllocation) {
  std::mt19937 rng(std::random_device{}());
  const int L = 8, heads = 2;
  const int64_t n = 300, budget = 30;
  const AttentionStats stats = RandomStats(L, heads, n, false, rng);
  KvPolicyConfig c = Config("cake", budget);
  auto policy = Make(c);
  EXPECT_TRUE(policy->cascades());
  std::vector<int64_t> counts(L, 0);
  for (int seen = 1; seen <= L; ++seen) {
    counts[seen - 1] = n;  // the layer just read
    KvPolicyInput in = Input(counts, heads, budget, &stats);
    in.layers_seen = seen;
    const KeepPlan plan = policy->Select(in);
    ASSERT_TRUE(plan.Validate(counts, heads).ok());
    int64_t total = 0;
    for (int l = 0; l < L; ++l) {
      if (l < seen) {
        EXPECT_LE(Kept(plan, l), counts[l]) << "stage " << seen << " layer " << l;
      } else {
        EXPECT_EQ(Kept(plan, l), 0);
      }
      counts[l] = Kept(plan, l);
      total += counts[l];
    }
    EXPECT_LE(total, L * budget) << "stage " << seen;
  }
  const KeepPlan one_shot = Make(c)->Select(Input(std::vector<int64_t>(L, n), heads, budget,
                                                  &stats));
  for (int l = 0; l < L; ++l) EXPECT_NEAR(counts[l], Kept(one_shot, l), 2) << "layer " << l;
  c.cascade = false;
  EXPECT_FALSE(Make(c)->cascades());
}

TEST(Cake, ShortLayersKeepEverythingAndLendTheirShare) {
  KvPolicyConfig c = Config("cake");
  c.window = 4;
  const KeepPlan plan = Make(c)->Select(Input({400, 20, 400}, 1, 50, nullptr));
  EXPECT_EQ(Kept(plan, 1), 20);
  EXPECT_EQ(Kept(plan, 0), 65);
  EXPECT_EQ(Kept(plan, 2), 65);
}

// ---- lacache -------------------------------------------------------------------------------

TEST(LaCache, BandsMoveBackWithDepthOverlapAndEveryLayerKeepsTheSameCount) {
  KvPolicyConfig c = Config("lacache");  // sinks 4; span 0 = 64/4 = 16; overlap 0 = 8
  const int n_layer = 6;
  const int64_t n = 300, budget = 64, recent = 64 - 4 - 16;
  const KeepPlan plan =
      Make(c)->Select(Input(std::vector<int64_t>(n_layer, n), 2, budget, nullptr));
  ASSERT_TRUE(plan.Validate(std::vector<int64_t>(n_layer, n), 2).ok());
  EXPECT_TRUE(plan.reassign_positions);
  for (int l = 0; l < n_layer; ++l) {
    const int64_t end = n - recent - 8 * l;
    EXPECT_EQ(plan.slots[l][0], Concat(Concat(Range(0, 4), Range(end - 16, end)),
                                       Range(n - recent, n)))
        << "layer " << l;
    EXPECT_EQ(plan.slots[l][1], plan.slots[l][0]);
    if (l > 0) {
      std::set<int64_t> a(plan.slots[l - 1][0].begin() + 4, plan.slots[l - 1][0].begin() + 20);
      int64_t shared = 0;
      for (int64_t s = end - 16; s < end; ++s) shared += a.count(s);
      EXPECT_EQ(shared, 8) << "layer " << l;
    }
  }
}

TEST(LaCache, TheLadderRepeatsWhenItReachesTheSinks) {
  KvPolicyConfig c = Config("lacache");
  c.sinks = 2;
  c.lacache_span = 10;
  c.lacache_overlap = 4;
  const int64_t n = 100, budget = 40, recent = 40 - 2 - 10;
  // The middle [2, 72) holds 1 + (70 - 10) / 6 = 11 rungs; layers 11.. start over.
  const KeepPlan plan = Make(c)->Select(Input(std::vector<int64_t>(24, n), 1, budget, nullptr));
  for (int l = 0; l < 24; ++l) {
    const int64_t end = n - recent - 6 * (l % 11);
    EXPECT_EQ(plan.slots[l][0],
              Concat(Concat(Range(0, 2), Range(end - 10, end)), Range(n - recent, n)))
        << "layer " << l;
    EXPECT_GE(end - 10, 2);
  }
}

TEST(LaCache, SmallBudgetsStillKeepTheNewestSlot) {
  for (int64_t budget : {1, 2, 3, 4, 5, 6}) {
    const KeepPlan plan = Make(Config("lacache"))->Select(Input({50, 50}, 1, budget, nullptr));
    ASSERT_TRUE(plan.Validate({50, 50}, 1).ok());
    for (int l = 0; l < 2; ++l) {
      EXPECT_EQ(Kept(plan, l), budget);
      EXPECT_EQ(plan.slots[l][0].back(), 49);
    }
  }
}

// ---- elastic -------------------------------------------------------------------------------

TEST(Elastic, KeepsSinksRecentAndHeavyAndMergesEveryEvictedSlotIntoTheNearestKept) {
  std::mt19937 rng(33);
  for (int iter = 0; iter < 200; ++iter) {
    KvPolicyConfig c = Config("elastic");
    c.sinks = static_cast<int>(rng() % 5);  // 0 sinks: slot 0 may be evicted
    const int64_t n = 1 + rng() % 150, budget = 1 + rng() % 60;
    const AttentionStats s = RandomStats(1, 2, n, iter % 2, rng);
    const KeepPlan plan = Make(c)->Select(Input({n}, 2, budget, &s));
    ASSERT_TRUE(plan.Validate({n}, 2).ok());
    for (int h = 0; h < 2; ++h) {
      const SlotList& keep = plan.slots[0][h];
      SlotList want = Range(0, n);
      if (n > budget) {
        const int64_t recent = std::max<int64_t>(1, budget / 4);
        const int64_t sinks = std::min<int64_t>(c.sinks, budget - recent);
        const float* cum = s.Cum(0, h);
        want = Concat(Concat(Range(0, sinks),
                             TopBySort(Range(sinks, n - recent), [&](int64_t j) { return cum[j]; },
                                       budget - sinks - recent)),
                      Range(n - recent, n));
      }
      EXPECT_EQ(keep, want) << "n " << n << " budget " << budget;
      const std::set<int64_t> kept(keep.begin(), keep.end());
      for (int64_t e = 0; e < n; ++e) {
        if (kept.count(e)) continue;
        int64_t target = -1;
        for (int64_t k : keep) {
          if (k < e) target = k;  // the last kept slot before e
        }
        if (target < 0) target = keep.front();
        EXPECT_EQ(plan.merge_into[0][h][e], target) << "slot " << e;
      }
    }
  }
}

}  // namespace
}  // namespace cachette
