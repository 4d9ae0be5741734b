// BatchLLM planning against its naive twins: every partition of a small batch into groups
// (the optimum by exhaustion), and a plain dynamic program over an uncompressed token trie
// for larger batches; plus the invariants every plan must keep and the order it promises.
#include "sched/batch_plan.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <map>
#include <random>
#include <string>

namespace cachette::sched {
namespace {

struct Req {
  std::vector<TokenId> prompt;
  int64_t decode = 16;
  std::string tenant;
};

Req R(std::vector<TokenId> prompt, int64_t decode = 16, std::string tenant = {}) {
  return Req{std::move(prompt), decode, std::move(tenant)};
}

std::vector<BatchItem> Items(const std::vector<Req>& reqs) {
  std::vector<BatchItem> items;
  for (const Req& r : reqs) items.push_back({r.prompt, r.decode, r.tenant});
  return items;
}

int64_t Lcp(const std::vector<TokenId>& a, const std::vector<TokenId>& b) {
  return std::mismatch(a.begin(), a.end(), b.begin(), b.end()).first - a.begin();
}

double Ratio(double decode, double prefill) { return decode / std::max(1.0, prefill); }

// What every plan must satisfy (batch_plan.h), whatever the grouping it chose.
void CheckInvariants(const std::vector<Req>& reqs, const BatchPlan& plan, int64_t min_prefix) {
  std::vector<int> seen(reqs.size(), 0);
  int64_t saved = 0, prompt_tokens = 0;
  for (const Req& r : reqs) prompt_tokens += static_cast<int64_t>(r.prompt.size());
  EXPECT_EQ(plan.prompt_tokens, prompt_tokens);
  for (size_t g = 0; g < plan.groups.size(); ++g) {
    const PrefixGroup& grp = plan.groups[g];
    ASSERT_FALSE(grp.members.empty()) << "group " << g;
    for (size_t i : grp.members) {
      ASSERT_LT(i, reqs.size());
      ++seen[i];
    }
    if (grp.members.size() == 1) {
      EXPECT_EQ(grp.prefix_tokens, 0) << "a singleton shares nothing";
    } else {
      EXPECT_GE(grp.prefix_tokens, std::max<int64_t>(1, min_prefix)) << "group " << g;
      const Req& first = reqs[grp.members.front()];
      for (size_t i : grp.members) {
        const Req& r = reqs[i];
        EXPECT_EQ(r.tenant, first.tenant) << "tenants never share a group";
        EXPECT_LT(grp.prefix_tokens, static_cast<int64_t>(r.prompt.size()))
            << "every member keeps a token to compute";
        EXPECT_GE(Lcp(r.prompt, first.prompt), grp.prefix_tokens)
            << "the prefix is common to all members";
      }
    }
    saved += static_cast<int64_t>(grp.members.size() - 1) * grp.prefix_tokens;
    // The key is what the header says, groups by key descending, members likewise.
    double decode = 0, prefill = static_cast<double>(grp.prefix_tokens);
    for (size_t i : grp.members) {
      decode += static_cast<double>(reqs[i].decode);
      prefill += static_cast<double>(reqs[i].prompt.size() - grp.prefix_tokens);
    }
    EXPECT_DOUBLE_EQ(grp.key, Ratio(decode, prefill));
    if (g > 0) {
      EXPECT_GE(plan.groups[g - 1].key, grp.key) << "groups out of order at " << g;
    }
    for (size_t m = 1; m < grp.members.size(); ++m) {
      const Req& a = reqs[grp.members[m - 1]];
      const Req& b = reqs[grp.members[m]];
      EXPECT_GE(Ratio(static_cast<double>(a.decode), static_cast<double>(a.prompt.size())),
                Ratio(static_cast<double>(b.decode), static_cast<double>(b.prompt.size())))
          << "members out of order in group " << g;
    }
  }
  for (size_t i = 0; i < reqs.size(); ++i) EXPECT_EQ(seen[i], 1) << "request " << i;
  EXPECT_EQ(plan.saved_tokens, saved);
}

// The optimum by exhaustion: every partition of the batch into blocks; a block of k >= 2
// requests of one tenant saves (k - 1) * p, p their common prefix capped at each prompt less
// its last token (0 below min_prefix).
int64_t BestByPartitions(const std::vector<Req>& reqs, int64_t min_prefix) {
  std::vector<std::vector<size_t>> blocks;
  int64_t best = 0;
  auto value = [&]() -> int64_t {
    int64_t v = 0;
    for (const auto& b : blocks) {
      if (b.size() < 2) continue;
      int64_t p = static_cast<int64_t>(reqs[b[0]].prompt.size()) - 1;
      for (size_t i : b) {
        if (reqs[i].tenant != reqs[b[0]].tenant) return -1;  // not a valid grouping
        p = std::min(p, static_cast<int64_t>(reqs[i].prompt.size()) - 1);
        p = std::min(p, Lcp(reqs[i].prompt, reqs[b[0]].prompt));
      }
      if (p >= std::max<int64_t>(1, min_prefix)) v += static_cast<int64_t>(b.size() - 1) * p;
    }
    return v;
  };
  std::function<void(size_t)> assign = [&](size_t i) {
    if (i == reqs.size()) {
      best = std::max(best, value());
      return;
    }
    for (size_t b = 0; b < blocks.size(); ++b) {  // by index: deeper calls grow `blocks`
      blocks[b].push_back(i);
      assign(i + 1);
      blocks[b].pop_back();
    }
    blocks.push_back({i});
    assign(i + 1);
    blocks.pop_back();
  };
  assign(0);
  return best;
}

// The optimum by a plain dynamic program over an uncompressed trie (one node per token):
// best(v, x) = max(not open: hung(v) * x + sum best(c, x), open: hung(v) * d + sum best(c, d)
// - d), memoized on (v, x), x the depth of the deepest open node above.
int64_t BestByTokenTrie(const std::vector<Req>& reqs, int64_t min_prefix) {
  struct TNode {
    int64_t depth = 0;
    int64_t hung = 0;
    std::map<TokenId, int> kids;
  };
  std::vector<TNode> t(1);
  std::map<std::string, int> roots;
  for (const Req& r : reqs) {
    auto [it, added] = roots.emplace(r.tenant, static_cast<int>(t.size()));
    if (added) t.emplace_back();
    int v = it->second;
    const size_t reusable = r.prompt.empty() ? 0 : r.prompt.size() - 1;
    for (size_t k = 0; k < reusable; ++k) {
      const auto [kid, fresh] = t[v].kids.emplace(r.prompt[k], static_cast<int>(t.size()));
      const int next = kid->second;
      if (fresh) {
        const int64_t depth = t[v].depth + 1;
        t.emplace_back();
        t.back().depth = depth;
      }
      v = next;
    }
    ++t[v].hung;
  }
  std::map<std::pair<int, int64_t>, int64_t> memo;
  std::function<int64_t(int, int64_t)> best = [&](int v, int64_t x) -> int64_t {
    auto m = memo.find({v, x});
    if (m != memo.end()) return m->second;
    const TNode& n = t[v];
    int64_t closed = n.hung * x;
    for (const auto& [k, c] : n.kids) closed += best(c, x);
    int64_t result = closed;
    if (n.depth >= std::max<int64_t>(1, min_prefix)) {
      int64_t open = n.hung * n.depth - n.depth;
      for (const auto& [k, c] : n.kids) open += best(c, n.depth);
      result = std::max(result, open);
    }
    memo[{v, x}] = result;
    return result;
  };
  int64_t total = 0;
  for (const auto& [tenant, root] : roots) total += best(root, 0);
  return total;
}

// Prompts over a tiny alphabet with a few shared stems, so that prefixes collide at many
// depths (nested groups, prompts that are prefixes of others, duplicates).
std::vector<Req> RandomBatch(std::mt19937& rng, int n, int max_len, int tenants) {
  std::vector<std::vector<TokenId>> stems;
  for (int s = 0; s < 3; ++s) {
    std::vector<TokenId> stem(rng() % static_cast<unsigned>(max_len));
    for (auto& tok : stem) tok = static_cast<TokenId>(rng() % 3);
    stems.push_back(stem);
  }
  std::vector<Req> reqs;
  for (int i = 0; i < n; ++i) {
    Req r;
    r.prompt = stems[rng() % stems.size()];
    r.prompt.resize(std::min<size_t>(r.prompt.size(), rng() % (max_len + 1)));
    const int extra = static_cast<int>(rng() % 4);
    for (int k = 0; k < extra; ++k) r.prompt.push_back(static_cast<TokenId>(rng() % 3));
    if (r.prompt.empty()) r.prompt.push_back(1);
    r.decode = static_cast<int64_t>(rng() % 40);
    r.tenant = std::to_string(rng() % static_cast<unsigned>(tenants));
    reqs.push_back(std::move(r));
  }
  return reqs;
}

std::vector<TokenId> Seq(TokenId from, int n) {
  std::vector<TokenId> v(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) v[static_cast<size_t>(i)] = from + i;
  return v;
}

std::vector<TokenId> Cat(std::vector<TokenId> a, const std::vector<TokenId>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

TEST(BatchPlanTest, EmptyBatchHasNoGroups) {
  const BatchPlan plan = PlanBatch({});
  EXPECT_TRUE(plan.groups.empty());
  EXPECT_EQ(plan.saved_tokens, 0);
}

TEST(BatchPlanTest, TableOfSmallCases) {
  const auto sys = Seq(100, 8);
  struct Case {
    std::string name;
    std::vector<Req> reqs;
    int64_t min_prefix;
    int64_t saved;
    std::vector<std::vector<size_t>> groups;  // sorted members of each multi-member group
  };
  const std::vector<Case> cases = {
      {"identical prompts share all but the last token",
       {R(Seq(1, 10)), R(Seq(1, 10))},
       1,
       9,
       {{0, 1}}},
      {"nothing shared: singletons", {R(Seq(1, 5)), R(Seq(50, 5))}, 1, 0, {}},
      {"one group of three beats a deeper pair",
       {R(Cat(sys, Seq(1, 6))), R(Cat(sys, Seq(1, 6))), R(Cat(sys, Seq(20, 3)))},
       1,
       16,
       {{0, 1, 2}}},
      {"a long shared prefix makes its own group inside a short one",
       {R(Cat(Seq(1, 4), Seq(200, 100))), R(Cat(Seq(1, 4), Seq(200, 100))),
        R(Cat(Seq(1, 4), Seq(50, 3))), R(Cat(Seq(1, 4), Seq(60, 3)))},
       1,
       103 + 4,
       {{0, 1}, {2, 3}}},
      {"tenants never share", {R(Seq(1, 10), 16, "a"), R(Seq(1, 10), 16, "b")}, 1, 0, {}},
      {"a prefix shorter than min_prefix_tokens is no group",
       {R(Cat(Seq(1, 5), Seq(10, 3))), R(Cat(Seq(1, 5), Seq(20, 3)))},
       16,
       0,
       {}},
      {"a prompt that is the prefix of another keeps its last token",
       {R(Seq(1, 6)), R(Seq(1, 12))},
       1,
       5,
       {{0, 1}}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const auto items = Items(c.reqs);
    const BatchPlan plan = PlanBatch(items, {c.min_prefix});
    CheckInvariants(c.reqs, plan, c.min_prefix);
    EXPECT_EQ(plan.saved_tokens, c.saved);
    EXPECT_EQ(plan.saved_tokens, BestByPartitions(c.reqs, c.min_prefix));
    std::vector<std::vector<size_t>> got;
    for (const PrefixGroup& g : plan.groups) {
      if (g.members.size() < 2) continue;
      auto m = g.members;
      std::sort(m.begin(), m.end());
      got.push_back(m);
    }
    std::sort(got.begin(), got.end());
    EXPECT_EQ(got, c.groups);
  }
}

TEST(BatchPlanTest, DecodeHeavyGroupsRunFirst) {
  // Group A: short outputs; group B: long outputs; a singleton with the longest relative output.
  const auto a = Seq(1, 32), b = Seq(100, 32);
  std::vector<Req> reqs = {R(Cat(a, {7}), 4), R(Cat(b, {7}), 64), R(Cat(a, {8}), 4),
                           R(Cat(b, {8}), 32), R(Seq(500, 4), 64)};
  const BatchPlan plan = PlanBatch(Items(reqs));
  CheckInvariants(reqs, plan, 1);
  ASSERT_EQ(plan.groups.size(), 3u);
  EXPECT_EQ(plan.groups[0].members, std::vector<size_t>({4}));
  EXPECT_EQ(plan.groups[1].members, std::vector<size_t>({1, 3}));  // 64 before 32
  EXPECT_EQ(plan.groups[2].members, std::vector<size_t>({0, 2}));  // tie: input order
  EXPECT_EQ(plan.groups[1].prefix_tokens, 32);
}

TEST(BatchPlanTest, OptimalAgainstEveryPartitionOnRandomSmallBatches) {
  std::mt19937 rng(1234);
  for (int trial = 0; trial < 400; ++trial) {
    const int n = 1 + static_cast<int>(rng() % 7);
    const auto reqs = RandomBatch(rng, n, 8, 1 + static_cast<int>(rng() % 2));
    const int64_t min_prefix = (trial % 3 == 0) ? 3 : 1;
    const BatchPlan plan = PlanBatch(Items(reqs), {min_prefix});
    SCOPED_TRACE("trial " + std::to_string(trial));
    CheckInvariants(reqs, plan, min_prefix);
    ASSERT_EQ(plan.saved_tokens, BestByPartitions(reqs, min_prefix));
  }
}

TEST(BatchPlanTest, OptimalAgainstTokenTrieProgramOnRandomBatches) {
  std::mt19937 rng(99);
  for (int trial = 0; trial < 100; ++trial) {
    const int n = 10 + static_cast<int>(rng() % 190);
    const auto reqs = RandomBatch(rng, n, 14, 1 + static_cast<int>(rng() % 3));
    const int64_t min_prefix = (trial % 4 == 0) ? 5 : 1;
    const BatchPlan plan = PlanBatch(Items(reqs), {min_prefix});
    SCOPED_TRACE("trial " + std::to_string(trial));
    CheckInvariants(reqs, plan, min_prefix);
    ASSERT_EQ(plan.saved_tokens, BestByTokenTrie(reqs, min_prefix));
  }
}

TEST(BatchPlanTest, SharedPrefixWorkloadGroupsBySystemPrompt) {
  // SGLang's generated-shared-prefix shape: 40 system prompts of 300 tokens, 25 questions each,
  // shuffled; a template header of 3 tokens common to all.
  std::mt19937 rng(7);
  std::vector<Req> reqs;
  for (int g = 0; g < 40; ++g) {
    for (int q = 0; q < 25; ++q) {
      Req r;
      r.prompt = Cat(Seq(1, 3), Seq(1000 + g * 300, 300));
      for (int k = 0; k < 20; ++k) r.prompt.push_back(static_cast<TokenId>(rng() % 5000));
      r.decode = 32;
      reqs.push_back(std::move(r));
    }
  }
  std::shuffle(reqs.begin(), reqs.end(), rng);
  const BatchPlan plan = PlanBatch(Items(reqs), {16});
  CheckInvariants(reqs, plan, 16);
  ASSERT_EQ(plan.groups.size(), 40u);
  for (const PrefixGroup& g : plan.groups) {
    EXPECT_EQ(g.members.size(), 25u);
    EXPECT_GE(g.prefix_tokens, 303);  // the header and the system prompt (or a bit more)
  }
  EXPECT_GE(plan.saved_tokens, 40 * 24 * 303);
}

TEST(BatchPlanTest, LargeBatchKeepsInvariants) {
  std::mt19937 rng(5);
  const auto reqs = RandomBatch(rng, 20000, 40, 3);
  const BatchPlan plan = PlanBatch(Items(reqs), {4});
  CheckInvariants(reqs, plan, 4);
  EXPECT_GT(plan.saved_tokens, 0);
}

TEST(BatchPlanTest, DeepChainOfNestedPrompts) {
  // Every prompt is a prefix of the next: a trie as deep as the batch is long.
  std::vector<Req> reqs;
  for (int n = 2; n < 3000; ++n) reqs.push_back(R(Seq(1, n)));
  const BatchPlan plan = PlanBatch(Items(reqs));
  CheckInvariants(reqs, plan, 1);
  // One group at the root's child would save little; the optimum is far above it.
  EXPECT_GT(plan.saved_tokens, static_cast<int64_t>(reqs.size() - 1));
}

}  // namespace
}  // namespace cachette::sched
