// ContiguousKv under a budget, compaction and attention statistics (engine/kv_budget.h), and
// the layer-at-a-time pass, on the trained model.
#include "engine/kv_budget.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "engine/engine.h"
#include "engine/segment_test_util.h"

namespace cachette {
namespace {

using segment_test::Trained;

std::vector<TokenId> RandomTokens(int n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<TokenId> t(n);
  for (auto& x : t) x = static_cast<TokenId>(1 + rng() % 8000);
  return t;
}

std::vector<float> HeadK(ContiguousKv& kv, int layer, int64_t slot, int head) {
  const KvShape& s = kv.shape();
  std::vector<float> out(s.head_dim);
  const auto* p = static_cast<const std::byte*>(kv.KSlot(layer, slot)) +
                  head * kernels::KvHeadBytes(s.type, s.head_dim);
  kernels::LoadKv(p, 1, s.head_dim, s.type, out.data());
  return out;
}

KeepPlan Uniform(int n_layer, int n_kv_head, const std::vector<int64_t>& keep) {
  KeepPlan p;
  p.slots.assign(n_layer, std::vector<std::vector<int64_t>>(n_kv_head, keep));
  return p;
}

TEST(KvBudgetTest, AFreshSequenceCountsPositionsAndSlots) {
  Engine engine(Trained(), {.threads = 2, .kv_type = kernels::KvType::kF16});
  const auto toks = RandomTokens(40, 1);
  ContiguousKv b(engine.kv_shape(), 64);
  ASSERT_TRUE(engine.Forward(b, std::span(toks).first(30), nullptr).ok());
  ASSERT_TRUE(engine.Forward(b, std::span(toks).subspan(30), nullptr).ok());
  const int n_layer = Trained().config().n_layer;
  EXPECT_EQ(b.n_tokens(), 40);
  EXPECT_EQ(b.next_position(), 40);
  EXPECT_EQ(b.tokens_seen(), 40);
  for (int l = 0; l < n_layer; ++l) EXPECT_EQ(b.layer_tokens(l), 40);
  EXPECT_EQ(b.total_slots(), 40 * n_layer);
  EXPECT_FALSE(b.compacted());
  b.SetTokens(0);
  EXPECT_EQ(b.next_position(), 0);
  EXPECT_EQ(b.tokens_seen(), 0);
}

TEST(KvBudgetTest, KeepAllCompactionChangesNothing) {
  Engine engine(Trained(), {.threads = 2, .kv_type = kernels::KvType::kF32});
  const auto& c = Trained().config();
  const auto toks = RandomTokens(33, 2);
  auto a = engine.NewSequence(64);
  ContiguousKv b(engine.kv_shape(), 64);
  ASSERT_TRUE(engine.Forward(*a, std::span(toks).first(32), nullptr).ok());
  ASSERT_TRUE(engine.Forward(b, std::span(toks).first(32), nullptr).ok());
  std::vector<int64_t> all(32);
  for (int i = 0; i < 32; ++i) all[i] = i;
  ASSERT_TRUE(b.Compact(Uniform(c.n_layer, c.n_kv_head, all), c.rope, nullptr).ok());
  std::vector<float> la(c.n_vocab), lb(c.n_vocab);
  ASSERT_TRUE(engine.Forward(*a, std::span(toks).subspan(32), la.data()).ok());
  ASSERT_TRUE(engine.Forward(b, std::span(toks).subspan(32), lb.data()).ok());
  EXPECT_EQ(la, lb);
}

TEST(KvBudgetTest, CompactionMovesEachHeadsSlotsAndStats) {
  Engine engine(Trained(), {.threads = 2, .kv_type = kernels::KvType::kF16});
  const auto& c = Trained().config();
  ContiguousKv kv(engine.kv_shape(), 64);
  AttentionStats stats;
  stats.window = 8;
  stats.cumulative = true;
  const auto toks = RandomTokens(48, 3);
  Engine::Item item{&kv, toks, Engine::Logits::kNone, nullptr, &stats};
  ASSERT_TRUE(engine.Forward(std::span(&item, 1)).ok());
  // Different slots per head, different counts per layer.
  KeepPlan plan;
  std::mt19937 rng(4);
  std::vector<std::vector<std::vector<float>>> want_k(c.n_layer);
  std::vector<std::vector<float>> want_cum(c.n_layer);
  for (int l = 0; l < c.n_layer; ++l) {
    plan.slots.emplace_back();
    const int m = 10 + l;
    for (int h = 0; h < c.n_kv_head; ++h) {
      std::vector<int64_t> all(48);
      for (int i = 0; i < 48; ++i) all[i] = i;
      std::shuffle(all.begin(), all.end(), rng);
      std::vector<int64_t> keep(all.begin(), all.begin() + m);
      std::sort(keep.begin(), keep.end());
      plan.slots[l].push_back(keep);
      for (int64_t s : keep) {
        want_k[l].push_back(HeadK(kv, l, s, h));
        want_cum[l].push_back(stats.Cum(l, h)[s]);
      }
    }
  }
  ASSERT_TRUE(kv.Compact(plan, c.rope, &stats).ok());
  EXPECT_EQ(kv.n_tokens(), 10 + c.n_layer - 1);
  EXPECT_EQ(kv.next_position(), 48);  // positions kept
  for (int l = 0; l < c.n_layer; ++l) {
    EXPECT_EQ(kv.layer_tokens(l), 10 + l);
    size_t idx = 0;
    for (int h = 0; h < c.n_kv_head; ++h) {
      for (int i = 0; i < 10 + l; ++i, ++idx) {
        EXPECT_EQ(HeadK(kv, l, i, h), want_k[l][idx]) << l << " " << h << " " << i;
        EXPECT_EQ(stats.Cum(l, h)[i], want_cum[l][idx]);
      }
      EXPECT_EQ(stats.Cum(l, h)[10 + l], 0.0f);
    }
  }
  // The engine keeps working over layers of different lengths, at the kept positions.
  std::vector<float> logits(c.n_vocab);
  ASSERT_TRUE(engine.Forward(kv, std::span(toks).first(3), logits.data()).ok());
  EXPECT_EQ(kv.layer_tokens(0), 13);
  EXPECT_EQ(kv.next_position(), 51);
  for (float x : logits) ASSERT_TRUE(std::isfinite(x));
}

TEST(KvBudgetTest, ReassignedKeysEqualKeysComputedAtTheNewPositions) {
  // Layer 0's keys depend only on the token and its position, so after StreamingLLM-style
  // compaction (sinks + recent, positions reassigned) they must equal a fresh prefill of the
  // kept tokens, to float rounding; and the next token continues at the slot count.
  Engine engine(Trained(), {.threads = 2, .kv_type = kernels::KvType::kF32});
  const auto& c = Trained().config();
  const auto toks = RandomTokens(60, 5);
  ContiguousKv kv(engine.kv_shape(), 64);
  ASSERT_TRUE(engine.Forward(kv, toks, nullptr).ok());
  std::vector<int64_t> keep = {0, 1, 2, 3};
  std::vector<TokenId> kept_toks(toks.begin(), toks.begin() + 4);
  for (int64_t s = 40; s < 60; ++s) {
    keep.push_back(s);
    kept_toks.push_back(toks[s]);
  }
  KeepPlan plan = Uniform(c.n_layer, c.n_kv_head, keep);
  plan.reassign_positions = true;
  ASSERT_TRUE(kv.Compact(plan, c.rope, nullptr).ok());
  EXPECT_EQ(kv.next_position(), 24);
  ContiguousKv fresh(engine.kv_shape(), 64);
  ASSERT_TRUE(engine.Forward(fresh, kept_toks, nullptr).ok());
  for (int h = 0; h < c.n_kv_head; ++h) {
    for (int i = 0; i < 24; ++i) {
      const auto a = HeadK(kv, 0, i, h), b = HeadK(fresh, 0, i, h);
      for (int d = 0; d < c.head_dim; ++d) {
        ASSERT_NEAR(a[d], b[d], 1e-4f * (1 + std::fabs(b[d]))) << h << " " << i << " " << d;
      }
    }
  }
}

TEST(KvBudgetTest, RopeByDeltaThenMinusDeltaIsIdentity) {
  std::mt19937 rng(6);
  std::normal_distribution<float> nd;
  for (auto style : {kernels::RopeStyle::kNormal, kernels::RopeStyle::kNeox}) {
    kernels::RopeParams p;
    p.style = style;
    p.head_dim = 64;
    std::vector<float> x(64), y;
    for (auto& v : x) v = nd(rng);
    y = x;
    const int32_t plus = 1234, minus = -1234;
    kernels::Rope(y.data(), 1, 1, &plus, p);
    kernels::Rope(y.data(), 1, 1, &minus, p);
    for (int d = 0; d < 64; ++d) EXPECT_NEAR(x[d], y[d], 1e-5f);
  }
}

TEST(KvBudgetTest, MergeAveragesIntoTheAnchorWeightedByTokens) {
  Engine engine(Trained(), {.threads = 2, .kv_type = kernels::KvType::kF32});
  const auto& c = Trained().config();
  ContiguousKv kv(engine.kv_shape(), 16);
  ASSERT_TRUE(engine.Forward(kv, RandomTokens(8, 7), nullptr).ok());
  auto k = [&](int64_t s) { return HeadK(kv, 1, s, 0); };
  const auto k2 = k(2), k3 = k(3), k4 = k(4), k5 = k(5);
  // Keep {0, 2, 5}; 3 and 4 merge into 2 (anchor of 3 tokens); the rest are dropped.
  KeepPlan plan = Uniform(c.n_layer, c.n_kv_head, {0, 2, 5});
  plan.merge_into.assign(c.n_layer, std::vector<std::vector<int64_t>>(
                                        c.n_kv_head, {-1, -1, -1, 2, 2, -1, -1, -1}));
  ASSERT_TRUE(kv.Compact(plan, c.rope, nullptr).ok());
  const auto anchor = k(1);
  for (int d = 0; d < c.head_dim; ++d) {
    EXPECT_NEAR(anchor[d], (k2[d] + k3[d] + k4[d]) / 3, 1e-5f);
  }
  EXPECT_EQ(k(2), k5);
  // A second merge into the same anchor weighs it as the 3 tokens it stands for.
  const auto k_last = k(2);
  KeepPlan again = Uniform(c.n_layer, c.n_kv_head, {0, 1});
  again.merge_into.assign(c.n_layer,
                          std::vector<std::vector<int64_t>>(c.n_kv_head, {-1, -1, 1}));
  ASSERT_TRUE(kv.Compact(again, c.rope, nullptr).ok());
  const auto merged = k(1);
  for (int d = 0; d < c.head_dim; ++d) {
    EXPECT_NEAR(merged[d], (3 * anchor[d] + k_last[d]) / 4, 1e-5f);
  }
}

TEST(KvBudgetTest, StatisticsEqualANaiveSoftmax) {
  // f32 and f16 keys in one block (scored by MatMul), and f32 keys seen as blocks of 8 tokens
  // (scored key by key), against a double reference.
  struct Case {
    kernels::KvType type;
    int block_tokens;  // 0: the sequence's own single block
  };
  for (const Case& k : {Case{kernels::KvType::kF32, 0}, Case{kernels::KvType::kF16, 0},
                        Case{kernels::KvType::kF32, 8}}) {
    SCOPED_TRACE(std::string(kernels::KvTypeName(k.type)) + " blocks " +
                 std::to_string(k.block_tokens));
    Engine engine(Trained(), {.threads = 2, .kv_type = k.type});
    const auto& c = Trained().config();
    ContiguousKv kv(engine.kv_shape(), 32);
    ASSERT_TRUE(engine.Forward(kv, RandomTokens(20, 8), nullptr).ok());
    // Random queries for 3 rows at slots 17..19 against the stored keys of layer 2.
    std::mt19937 rng(9);
    std::normal_distribution<float> nd;
    std::vector<float> q(3 * c.n_head * c.head_dim);
    for (auto& v : q) v = nd(rng);
    AttentionStats st;
    st.Resize(c.n_layer, c.n_kv_head, 32);
    const float scale = 0.125f;
    kernels::KvView view = kv.View(2, 20);
    std::vector<const void*> k_blocks, v_blocks;
    if (k.block_tokens > 0) {
      // The same bytes, cut into blocks: slot s is slot s % 8 of block s / 8.
      const size_t stride = static_cast<size_t>(k.block_tokens) * c.n_kv_head *
                            kernels::KvHeadBytes(k.type, c.head_dim);
      for (int b = 0; b < 4; ++b) {
        k_blocks.push_back(static_cast<const std::byte*>(view.k_blocks[0]) + b * stride);
        v_blocks.push_back(static_cast<const std::byte*>(view.v_blocks[0]) + b * stride);
      }
      view.block_tokens = k.block_tokens;
      view.k_blocks = k_blocks.data();
      view.v_blocks = v_blocks.data();
    }
    AccumulateAttention(q.data(), c.n_head, {0, 1, 2}, 0, 17, view, scale, 2, true, true, st,
                        engine.pool());
    const int group = c.n_head / c.n_kv_head;
    for (int g = 0; g < c.n_kv_head; ++g) {
      std::vector<double> want(20, 0), want_sq(20, 0);
      for (int r = 0; r < 3; ++r) {
        for (int hq = 0; hq < group; ++hq) {
          const float* qv = q.data() + (r * c.n_head + g * group + hq) * c.head_dim;
          std::vector<double> p;
          for (int s = 0; s <= 17 + r; ++s) {
            const auto kk = HeadK(kv, 2, s, g);
            double dot = 0;
            for (int d = 0; d < c.head_dim; ++d) dot += qv[d] * kk[d];
            p.push_back(std::exp(dot * scale));
          }
          double z = 0;
          for (double x : p) z += x;
          for (size_t s = 0; s < p.size(); ++s) {
            want[s] += p[s] / z;
            want_sq[s] += (p[s] / z) * (p[s] / z);
          }
        }
      }
      for (int s = 0; s < 20; ++s) {
        EXPECT_NEAR(st.WinSum(2, g)[s], want[s], 1e-5) << g << " " << s;
        EXPECT_NEAR(st.WinSq(2, g)[s], want_sq[s], 1e-5);
        EXPECT_NEAR(st.Cum(2, g)[s], want[s], 1e-5);
      }
    }
    EXPECT_EQ(st.win_rows[2], 3 * group);
    EXPECT_EQ(st.win_rows[1], 0);
  }
}

TEST(KvBudgetTest, EngineCollectsTheWindowOfTheLastTokensOnly) {
  Engine engine(Trained(), {.threads = 2, .kv_type = kernels::KvType::kF32,
                            .max_batch_tokens = 16});  // the window spans micro-batches
  const auto& c = Trained().config();
  ContiguousKv kv(engine.kv_shape(), 64);
  AttentionStats st;
  st.window = 20;
  Engine::Item item{&kv, RandomTokens(40, 10), Engine::Logits::kNone, nullptr, &st};
  const auto toks = RandomTokens(40, 10);
  item.tokens = toks;
  ASSERT_TRUE(engine.Forward(std::span(&item, 1)).ok());
  const int group = c.n_head / c.n_kv_head;
  for (int l = 0; l < c.n_layer; ++l) {
    EXPECT_EQ(st.win_rows[l], 20 * group);
    // Each window query's probabilities sum to 1: the total is the row count.
    double total = 0;
    for (int h = 0; h < c.n_kv_head; ++h) {
      for (int s = 0; s < 40; ++s) total += st.WinSum(l, h)[s];
    }
    EXPECT_NEAR(total, 20.0 * group * c.n_kv_head, 1e-3);
    for (int h = 0; h < c.n_kv_head; ++h) EXPECT_EQ(st.Cum(l, h)[0], 0.0f);  // not asked
  }
}

// Engine::ForwardLayerMajor is Forward a layer at a time: with the same micro-batches, the same
// logits, KV and statistics bit for bit; each layer is reserved just before it is read and
// reported once stored; a decode step after it is the same too; what it cannot read is refused.
TEST(KvBudgetTest, ALayerMajorPassIsTheForwardPassALayerAtATime) {
  Engine engine(Trained(), {.threads = 2, .kv_type = kernels::KvType::kF16,
                            .max_batch_tokens = 32});  // 4 micro-batches per layer
  const auto& c = Trained().config();
  const int L = c.n_layer;
  const int nv = c.n_vocab;
  const auto toks = RandomTokens(100, 21);
  ContiguousKv a(engine.kv_shape(), 128), b(engine.kv_shape(), 128);
  AttentionStats sa, sb;
  sa.window = sb.window = 20;
  sa.cumulative = sb.cumulative = true;
  std::vector<float> la(nv), lb(nv);
  Engine::Item item{&a, toks, Engine::Logits::kLast, la.data(), &sa};
  ASSERT_TRUE(engine.Forward(std::span(&item, 1)).ok());
  int calls = 0;
  auto after = [&](int layer) {
    EXPECT_EQ(layer, calls++);
    EXPECT_EQ(b.layer_tokens(layer), 100);
    if (layer + 1 < L) {
      EXPECT_EQ(b.layer_tokens(layer + 1), 0);
    }
    EXPECT_EQ(b.next_position(), 0);  // positions move once every layer is read
    return Status::Ok();
  };
  ASSERT_TRUE(engine.ForwardLayerMajor(b, toks, lb.data(), &sb, after).ok());
  EXPECT_EQ(calls, L);
  EXPECT_EQ(la, lb);
  EXPECT_EQ(b.n_tokens(), 100);
  EXPECT_EQ(b.next_position(), 100);
  EXPECT_EQ(b.tokens_seen(), 100);
  const size_t bytes = engine.kv_shape().token_bytes();
  for (int l = 0; l < L; ++l) {
    for (int64_t i = 0; i < 100; ++i) {
      ASSERT_EQ(std::memcmp(a.KSlot(l, i), b.KSlot(l, i), bytes), 0) << l << " " << i;
      ASSERT_EQ(std::memcmp(a.VSlot(l, i), b.VSlot(l, i), bytes), 0) << l << " " << i;
    }
    EXPECT_EQ(sa.win_rows[l], sb.win_rows[l]);
    EXPECT_EQ(sa.win_sum[l], sb.win_sum[l]);
    EXPECT_EQ(sa.win_sq[l], sb.win_sq[l]);
    EXPECT_EQ(sa.cum[l], sb.cum[l]);
  }
  // The same pass in steps of two layers (Engine::LayerPass): the same logits and KV.
  ContiguousKv stepped(engine.kv_shape(), 128);
  auto pass = Engine::LayerPass::Start(engine, stepped, toks, nullptr);
  ASSERT_TRUE(pass.ok()) << pass.status().ToString();
  std::vector<float> lc(nv);
  int steps = 0;
  while (!(*pass)->done()) {
    EXPECT_EQ((*pass)->next_layer(), 2 * steps);
    ASSERT_TRUE((*pass)->Run(2, {}, lc.data()).ok());
    ++steps;
    EXPECT_EQ(stepped.next_position(), (*pass)->done() ? 100 : 0);
  }
  EXPECT_EQ(steps, (L + 1) / 2);
  EXPECT_EQ(lc, lb);
  for (int64_t i = 0; i < 100; ++i) {
    ASSERT_EQ(std::memcmp(stepped.KSlot(L - 1, i), b.KSlot(L - 1, i), bytes), 0) << i;
  }
  const TokenId next[1] = {toks[3]};
  ASSERT_TRUE(engine.Forward(a, next, la.data()).ok());
  ASSERT_TRUE(engine.Forward(b, next, lb.data()).ok());
  EXPECT_EQ(la, lb);

  // A token outside the vocabulary, a pass past the context, a windowed KV type: refused.
  ContiguousKv fresh(engine.kv_shape(), 128);
  const TokenId bad[2] = {1, static_cast<TokenId>(nv)};
  Status st = engine.ForwardLayerMajor(fresh, bad, nullptr, nullptr, {});
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("vocabulary"), std::string::npos) << st.message();
  Engine kivi(Trained(), {.threads = 2, .kv_type = kernels::KvType::kKivi4});
  ContiguousKv windowed(kivi.kv_shape(), 128);
  st = kivi.ForwardLayerMajor(windowed, toks, nullptr, nullptr, {});
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("a layer at a time"), std::string::npos) << st.message();
  // An error from after_layer stops the pass and comes back.
  ContiguousKv stopped(engine.kv_shape(), 128);
  st = engine.ForwardLayerMajor(stopped, toks, nullptr, nullptr,
                                [](int layer) {
                                  return layer == 1 ? ResourceExhausted("stop here") : Status::Ok();
                                });
  EXPECT_EQ(st.code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(stopped.layer_tokens(2), 0);
}

TEST(KvBudgetTest, ValidateNamesTheProblem) {
  const std::vector<int64_t> n = {10, 10};
  KeepPlan p = Uniform(2, 2, {0, 3, 3});
  EXPECT_NE(p.Validate(n, 2).message().find("not strictly increasing"), std::string::npos);
  p = Uniform(2, 2, {0, 10});
  EXPECT_NE(p.Validate(n, 2).message().find("outside [0, 10)"), std::string::npos);
  p = Uniform(2, 2, {0, 1});
  p.slots[1][1] = {0};
  EXPECT_NE(p.Validate(n, 2).message().find("head 0 keeps 2"), std::string::npos);
  p = Uniform(2, 2, {0, 1});
  p.merge_into.assign(2, std::vector<std::vector<int64_t>>(2, std::vector<int64_t>(10, 4)));
  EXPECT_NE(p.Validate(n, 2).message().find("not kept"), std::string::npos);
  p = Uniform(2, 2, {0, 1});
  p.slots[1] = {{0}, {1}};
  p.reassign_positions = true;
  EXPECT_NE(p.Validate(n, 2).message().find("same count"), std::string::npos);
  EXPECT_TRUE(Uniform(2, 2, {1, 9}).Validate(n, 2).ok());
}

TEST(KvBudgetTest, GrowKeepsTheContents) {
  Engine engine(Trained(), {.threads = 2, .kv_type = kernels::KvType::kF16});
  const auto& c = Trained().config();
  const auto toks = RandomTokens(24, 11);
  ContiguousKv a(engine.kv_shape(), 16), b(engine.kv_shape(), 64);
  ASSERT_TRUE(engine.Forward(a, std::span(toks).first(16), nullptr).ok());
  ASSERT_TRUE(engine.Forward(b, std::span(toks).first(16), nullptr).ok());
  EXPECT_FALSE(engine.Forward(a, std::span(toks).subspan(16), nullptr).ok());
  a.Grow(40);
  std::vector<float> la(c.n_vocab), lb(c.n_vocab);
  ASSERT_TRUE(engine.Forward(a, std::span(toks).subspan(16), la.data()).ok());
  ASSERT_TRUE(engine.Forward(b, std::span(toks).subspan(16), lb.data()).ok());
  EXPECT_EQ(la, lb);
}

}  // namespace
}  // namespace cachette
