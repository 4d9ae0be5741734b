// Exactness of prefix reuse: with a warm paged cache, greedy generation gives the same tokens
// as a cold run and the same first-token logits bit for bit (the matmul is batch-invariant,
// docs/kernels.md), on synthetic models of each exact weight type and on the trained model.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <random>

#include "engine/engine.h"
#include "engine/kv_budget.h"
#include "engine/reference_forward.h"
#include "engine/sampler.h"
#include "engine/segment_reuse.h"
#include "kv/kv_manager.h"
#include "model/synth.h"

namespace cachette {
namespace {

namespace fs = std::filesystem;
using kernels::KvType;
const std::string kShared = CACHETTE_SHARED_DIR;

std::unique_ptr<Model> LoadTiny(kernels::WType type, const std::string& arch) {
  const fs::path dir = fs::temp_directory_path() / ("cachette_prefix_" + std::to_string(getpid()));
  fs::create_directories(dir);
  const std::string path = (dir / (arch + ".gguf")).string();
  SynthOptions o;
  o.type = type;
  o.arch = arch;
  o.vocab_path = kShared + "/testdata/tokenizer/ggml-vocab-gpt-2.gguf";
  EXPECT_TRUE(SynthesizeModel(o, path).ok());
  auto m = Model::Load(path);
  fs::remove_all(dir);
  EXPECT_TRUE(m.ok()) << m.status().ToString();
  return std::move(*m);
}

struct GreedyRun {
  std::vector<TokenId> tokens;    // generated
  std::vector<float> first_logits;
  int64_t cached = 0;
};

// Greedy decoding of n tokens from `prompt` on `kv`, reusing whatever kv already holds.
GreedyRun Greedy(Engine& engine, SequenceKv& kv, const std::vector<TokenId>& prompt, int n) {
  GreedyRun r;
  r.cached = kv.n_tokens();
  const int nv = engine.model().config().n_vocab;
  std::vector<float> logits(nv);
  int64_t from = kv.n_tokens();
  if (from == static_cast<int64_t>(prompt.size())) {
    kv.SetTokens(--from);  // recompute the last prompt token for its logits
  }
  Status s = engine.Forward(kv, std::span(prompt).subspan(from), logits.data());
  EXPECT_TRUE(s.ok()) << s.ToString();
  r.first_logits = logits;
  for (int i = 0; i < n; ++i) {
    const TokenId t = Sampler::Argmax(logits);
    r.tokens.push_back(t);
    if (i + 1 == n) break;
    const TokenId next[1] = {t};
    EXPECT_TRUE(engine.Forward(kv, next, logits.data()).ok());
  }
  return r;
}

class PrefixCacheTest : public ::testing::TestWithParam<KvType> {
 protected:
  void Check(const Model& model, KvType kv_type, int n_gen) {
    EngineOptions eo;
    eo.threads = 2;
    eo.kv_type = kv_type;
    Engine engine(model, eo);
    KvManagerOptions ko;
    ko.shape = engine.kv_shape();
    ko.page_tokens = 16;
    ko.budget_bytes = PagePool::PageBytes(ko.shape, 16) * 256;
    KvManager kvm(ko);
    const Hash128 ns = KvNamespace(model, kv_type);
    const int nv = model.config().n_vocab;
    std::mt19937 rng(11);
    auto random = [&](int n) {
      std::vector<TokenId> t(n);
      for (auto& x : t) x = static_cast<TokenId>(rng() % (nv - 1));
      return t;
    };
    auto cold = [&](const std::vector<TokenId>& p) {
      auto kv = engine.NewSequence(p.size() + n_gen + 1);
      return Greedy(engine, *kv, p, n_gen);
    };
    auto warm = [&](const std::vector<TokenId>& p) {
      auto seq = kvm.Start(ns, p, p.size() + n_gen + 1);
      GreedyRun r = Greedy(engine, *seq, p, n_gen);
      std::vector<TokenId> all = p;
      all.insert(all.end(), r.tokens.begin(), r.tokens.end());
      kvm.Finish(*seq, all);
      return r;
    };
    auto expect_same = [&](const GreedyRun& c, const GreedyRun& w, const char* what, int64_t want_cached) {
      EXPECT_EQ(w.cached, want_cached) << what;
      EXPECT_EQ(c.tokens, w.tokens) << what;
      EXPECT_TRUE(w.first_logits == c.first_logits) << what << ": logits differ in their bits";
    };

    const auto base = random(70);  // 4 full pages + 6 tokens
    const GreedyRun c0 = cold(base);
    expect_same(c0, warm(base), "first (cold) paged run", 0);
    expect_same(c0, warm(base), "full hit", 70);
    // Partial hits ending on a page boundary (64) and inside a page (37).
    for (int share : {64, 37}) {
      auto p = std::vector<TokenId>(base.begin(), base.begin() + share);
      auto tail = random(9);
      p.insert(p.end(), tail.begin(), tail.end());
      expect_same(cold(p), warm(p), share == 64 ? "hit on a boundary" : "hit inside a page", share);
    }
    // Branching from the middle of a generated continuation: the cache holds base + its
    // generated tokens (all but the last, never fed back).
    std::vector<TokenId> branch = base;
    branch.insert(branch.end(), c0.tokens.begin(), c0.tokens.begin() + n_gen / 2);
    const int64_t cached_branch = static_cast<int64_t>(branch.size());
    auto tail = random(5);
    branch.insert(branch.end(), tail.begin(), tail.end());
    expect_same(cold(branch), warm(branch), "branch from the middle of a generation",
                cached_branch);

    // Two concurrent sequences sharing a cached prefix, decoded together in one batch.
    std::vector<TokenId> pa(base.begin(), base.begin() + 50), pb = pa;
    auto ta = random(7), tb = random(12);
    pa.insert(pa.end(), ta.begin(), ta.end());
    pb.insert(pb.end(), tb.begin(), tb.end());
    const GreedyRun ca = cold(pa), cb = cold(pb);
    auto sa = kvm.Start(ns, pa, 200), sb = kvm.Start(ns, pb, 200);
    EXPECT_EQ(sa->cached_tokens(), 50);
    EXPECT_EQ(sb->cached_tokens(), 50);
    std::vector<float> la(nv), lb(nv);
    std::vector<Engine::Item> batch = {
        {sa.get(), std::span(pa).subspan(50), Engine::Logits::kLast, la.data()},
        {sb.get(), std::span(pb).subspan(50), Engine::Logits::kLast, lb.data()}};
    ASSERT_TRUE(engine.Forward(batch).ok());
    std::vector<TokenId> ga, gb;
    for (int i = 0; i < n_gen; ++i) {
      ga.push_back(Sampler::Argmax(la));
      gb.push_back(Sampler::Argmax(lb));
      if (i + 1 == n_gen) break;
      const TokenId na[1] = {ga.back()}, nb[1] = {gb.back()};
      std::vector<Engine::Item> step = {{sa.get(), na, Engine::Logits::kLast, la.data()},
                                        {sb.get(), nb, Engine::Logits::kLast, lb.data()}};
      ASSERT_TRUE(engine.Forward(step).ok());
    }
    EXPECT_EQ(ga, ca.tokens);
    EXPECT_EQ(gb, cb.tokens);
    EXPECT_GT(kvm.GetStats().cow_copies, 0u);
  }
};

TEST_P(PrefixCacheTest, SyntheticModelWarmEqualsCold) {
  const KvType kv = GetParam();
  for (kernels::WType type :
       {kernels::WType::kF32, kernels::WType::kQ8_0, kernels::WType::kQ4_0}) {
    for (const char* arch : {"llama", "qwen2"}) {
      SCOPED_TRACE(std::string(kernels::WTypeName(type)) + " " + arch);
      auto model = LoadTiny(type, arch);
      Check(*model, kv, 12);
    }
  }
}

TEST_P(PrefixCacheTest, TrainedModelWarmEqualsCold) {
  const KvType kv = GetParam();
  for (const char* file : {"cachette-tiny-f32.gguf", "cachette-tiny-q8_0.gguf"}) {
    SCOPED_TRACE(file);
    auto model = Model::Load(kShared + "/models/" + file);
    ASSERT_TRUE(model.ok()) << model.status().ToString();
    Check(**model, kv, 16);
  }
}


// A KV budget policy's compaction of a paged sequence: the pages the index shares are copied
// before they are written (so the index keeps the exact KV, and a later warm run equals a cold
// one), whole pages go back to the pool, the compacted KV equals a contiguous sequence
// compacted by the same plan, and nothing past the first changed slot is committed afterwards.
TEST(PagedCompactionTest, IndexStaysExactAndPagesGoBack) {
  auto model = Model::Load(kShared + "/models/cachette-tiny-f32.gguf");
  ASSERT_TRUE(model.ok()) << model.status().ToString();
  const ModelConfig& c = (*model)->config();
  EngineOptions eo;
  eo.threads = 2;
  eo.kv_type = KvType::kF32;
  Engine engine(**model, eo);
  KvManagerOptions ko;
  ko.shape = engine.kv_shape();
  ko.page_tokens = 16;
  ko.budget_bytes = PagePool::PageBytes(ko.shape, 16) * 64;
  KvManager kvm(ko);
  const Hash128 ns = KvNamespace(**model, KvType::kF32);
  std::mt19937 rng(5);
  std::vector<TokenId> prompt(100);
  for (auto& t : prompt) t = static_cast<TokenId>(1 + rng() % 8000);
  const GreedyRun cold = [&] {
    auto fresh = engine.NewSequence(128);
    return Greedy(engine, *fresh, prompt, 6);
  }();

  auto seq = kvm.Start(ns, prompt, 128);
  ContiguousKv twin(engine.kv_shape(), 128);
  ASSERT_TRUE(engine.Forward(*seq, prompt, nullptr).ok());
  ASSERT_TRUE(engine.Forward(twin, prompt, nullptr).ok());
  kvm.Commit(*seq, prompt);  // 6 full pages shared with the index
  const uint32_t used_before = kvm.GetStats().pages_used;
  // Keep 8 sinks and the last 24, different per layer (reassigning needs equal counts: no).
  KeepPlan plan;
  for (int l = 0; l < c.n_layer; ++l) {
    std::vector<int64_t> keep;
    for (int64_t i = 0; i < 8; ++i) keep.push_back(i);
    for (int64_t i = 100 - 24 + l; i < 100; ++i) keep.push_back(i);
    plan.slots.emplace_back(c.n_kv_head, keep);
  }
  ASSERT_TRUE(kvm.Compact(*seq, plan, c.rope, nullptr).ok());
  ASSERT_TRUE(twin.Compact(plan, c.rope, nullptr).ok());
  EXPECT_TRUE(seq->compacted());
  EXPECT_EQ(seq->n_tokens(), 32);
  EXPECT_EQ(seq->layer_tokens(c.n_layer - 1), 8 + 24 - (c.n_layer - 1));
  EXPECT_EQ(seq->next_position(), 100);
  EXPECT_EQ(seq->exact_tokens(), 8);
  // No whole exact page (8 < 16): every layer's 2 blocks are packed, n_layer to a page.
  EXPECT_EQ(seq->block_table().size(), 0u);
  EXPECT_EQ(seq->held_pages(), 2);
  EXPECT_GT(kvm.GetStats().cow_copies, 0u);
  // The index keeps its 6 exact pages; the sequence holds its 2 copies; the 7th page (the
  // prompt's partial one) went back to the pool.
  EXPECT_EQ(used_before, 7u);
  EXPECT_EQ(kvm.GetStats().pages_used, 6u + 2u);
  // The compacted paged KV and the compacted contiguous KV continue identically.
  const int nv = c.n_vocab;
  std::vector<float> la(nv), lb(nv);
  const TokenId next[1] = {cold.tokens[0]};
  ASSERT_TRUE(engine.Forward(*seq, next, la.data()).ok());
  ASSERT_TRUE(engine.Forward(twin, next, lb.data()).ok());
  EXPECT_EQ(la, lb);
  // Finishing commits nothing past the exact part; the index still holds the exact prompt.
  std::vector<TokenId> fed = prompt;
  fed.push_back(next[0]);
  kvm.Finish(*seq, fed);
  EXPECT_EQ(kvm.CachedPrefix(ns, prompt), 96);
  auto warm_seq = kvm.Start(ns, prompt, 128);
  EXPECT_EQ(warm_seq->n_tokens(), 96);
  const GreedyRun warm = Greedy(engine, *warm_seq, prompt, 6);
  EXPECT_EQ(warm.tokens, cold.tokens);
  for (int i = 0; i < nv; ++i) ASSERT_NEAR(warm.first_logits[i], cold.first_logits[i], 1e-4);
}

// Per-layer budgets on paged KV: after a compaction that leaves the layers different slot
// counts, the sequence holds the exact leading pages whole plus its layers' other blocks packed
// (the pages of their total, not of the longest layer), every kept slot reads back the bytes a
// contiguous sequence compacted by the same plan holds, and decoding on (layers taking blocks
// from free slots, then from new pages) and compacting again keep both equal bit for bit.
TEST(PagedCompactionTest, PerLayerBudgetsHoldThePagesOfTheirTotal) {
  auto model = Model::Load(kShared + "/models/cachette-tiny-f32.gguf");
  ASSERT_TRUE(model.ok()) << model.status().ToString();
  const ModelConfig& c = (*model)->config();
  const int L = c.n_layer;
  ASSERT_GE(L, 2);
  Engine engine(**model, EngineOptions{.threads = 2, .kv_type = KvType::kF16});
  constexpr int64_t P = 16;
  KvManagerOptions ko;
  ko.shape = engine.kv_shape();
  ko.page_tokens = P;
  ko.budget_bytes = PagePool::PageBytes(ko.shape, P) * 64;
  KvManager kvm(ko);
  const Hash128 ns = KvNamespace(**model, KvType::kF16);
  const unsigned seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  std::vector<TokenId> prompt(300);
  for (auto& t : prompt) t = static_cast<TokenId>(1 + rng() % (c.n_vocab - 2));
  auto seq = kvm.Start(ns, prompt, 400);
  ContiguousKv twin(engine.kv_shape(), 400);
  ASSERT_TRUE(engine.Forward(*seq, prompt, nullptr).ok());
  ASSERT_TRUE(engine.Forward(twin, prompt, nullptr).ok());
  kvm.Commit(*seq, prompt);
  const uint32_t index_pages = 300 / P;
  // Layer l keeps the first `exact` slots (the same in every layer: they stay exact), then a
  // random ascending choice per head of the rest, fewer in deeper layers (a pyramid).
  auto plan_for = [&](const SequenceKv& kv, int64_t exact, int64_t top) {
    KeepPlan plan;
    for (int l = 0; l < L; ++l) {
      const int64_t n = kv.layer_tokens(l);
      const int64_t keep = std::min(n, exact + std::max<int64_t>(1, (top - exact) * (L - l) / L));
      plan.slots.emplace_back();
      for (int h = 0; h < c.n_kv_head; ++h) {
        std::vector<int64_t> rest;
        for (int64_t i = exact; i < n; ++i) rest.push_back(i);
        std::shuffle(rest.begin(), rest.end(), rng);
        rest.resize(static_cast<size_t>(keep - exact));
        std::vector<int64_t> k;
        for (int64_t i = 0; i < exact; ++i) k.push_back(i);
        std::sort(rest.begin(), rest.end());
        k.insert(k.end(), rest.begin(), rest.end());
        plan.slots.back().push_back(k);
      }
    }
    return plan;
  };
  // Pages the packing should hold: the exact leading ones, and the other blocks L to a page.
  auto want_pages = [&](int64_t natural) {
    int64_t blocks = 0;
    for (int l = 0; l < L; ++l) blocks += (seq->layer_tokens(l) + P - 1) / P - natural;
    return natural + (blocks + L - 1) / L;
  };
  auto same_slots = [&] {
    const size_t bytes = engine.kv_shape().token_bytes();
    for (int l = 0; l < L; ++l) {
      ASSERT_EQ(seq->layer_tokens(l), twin.layer_tokens(l)) << "layer " << l;
      for (int64_t i = 0; i < seq->layer_tokens(l); ++i) {
        ASSERT_EQ(std::memcmp(seq->KSlot(l, i), twin.KSlot(l, i), bytes), 0) << l << " " << i;
        ASSERT_EQ(std::memcmp(seq->VSlot(l, i), twin.VSlot(l, i), bytes), 0) << l << " " << i;
      }
    }
  };
  const int nv = c.n_vocab;
  std::vector<float> la(nv), lb(nv);
  auto decode = [&](int n) {
    for (int i = 0; i < n; ++i) {
      const TokenId next[1] = {static_cast<TokenId>(1 + rng() % (nv - 2))};
      ASSERT_TRUE(engine.Forward(*seq, next, la.data()).ok());
      ASSERT_TRUE(engine.Forward(twin, next, lb.data()).ok());
      ASSERT_EQ(la, lb) << "decode step " << i;
    }
  };

  // The exact leading slots: the plan's first `exact`, more when the random choice happens to
  // keep the next ones in place in every layer and head.
  const KeepPlan first = plan_for(*seq, 40, 200);  // 40 exact: at least 2 whole pages
  ASSERT_TRUE(kvm.Compact(*seq, first, c.rope, nullptr).ok());
  ASSERT_TRUE(twin.Compact(first, c.rope, nullptr).ok());
  EXPECT_GE(seq->exact_tokens(), 40);
  int64_t natural = seq->exact_tokens() / P;
  EXPECT_EQ(static_cast<int64_t>(seq->block_table().size()), natural);
  EXPECT_EQ(seq->held_pages(), want_pages(natural));
  EXPECT_LT(seq->held_pages(), (seq->n_tokens() + P - 1) / P);  // less than the longest layer
  // The whole exact pages are the index's too.
  EXPECT_EQ(kvm.GetStats().pages_used, index_pages + seq->held_pages() - natural);
  same_slots();
  // 40 decode steps cross block boundaries in every layer: free slots first, then new pages.
  decode(40);
  same_slots();
  EXPECT_EQ(kvm.GetStats().pages_used, index_pages + seq->held_pages() - natural);

  // Compact again from slot 20 on (the exact part shrinks to 1 whole page, or stays).
  const KeepPlan second = plan_for(*seq, 20, 120);
  ASSERT_TRUE(kvm.Compact(*seq, second, c.rope, nullptr).ok());
  ASSERT_TRUE(twin.Compact(second, c.rope, nullptr).ok());
  EXPECT_GE(seq->exact_tokens(), 20);
  natural = seq->exact_tokens() / P;
  EXPECT_EQ(static_cast<int64_t>(seq->block_table().size()), natural);
  EXPECT_EQ(seq->held_pages(), want_pages(natural));
  EXPECT_EQ(kvm.GetStats().pages_used, index_pages + seq->held_pages() - natural);
  same_slots();
  decode(20);
  same_slots();

  // Finishing gives every page back but the index's; the index still holds the exact prompt.
  kvm.Finish(*seq, prompt);
  EXPECT_EQ(kvm.GetStats().pages_used, index_pages);
  EXPECT_EQ(kvm.CachedPrefix(ns, prompt), 300 / P * P);
}

// Segment reuse over a paged sequence that starts from the radix index's cached pages: placing
// and recomputing writes only the sequence's own slots (a shared partial page is copied
// first), so the index stays exact; blend at ratio 1 gives full prefill's greedy tokens and
// logits to float rounding, and naive on paged pages equals naive on a contiguous buffer.
TEST(PagedSegmentReuseTest, IndexStaysExactAndBlendAtOneIsFullPrefill) {
  auto model = LoadTiny(kernels::WType::kF32, "llama");
  Engine engine(*model, EngineOptions{.threads = 2, .kv_type = KvType::kF16});
  KvManagerOptions ko;
  ko.shape = engine.kv_shape();
  ko.page_tokens = 16;
  ko.budget_bytes = PagePool::PageBytes(ko.shape, 16) * 128;
  KvManager kvm(ko);
  const Hash128 ns = KvNamespace(*model, KvType::kF16);
  const int nv = model->config().n_vocab;
  std::mt19937 rng(std::random_device{}());
  auto random = [&](int n) {
    std::vector<TokenId> t(n);
    for (auto& x : t) x = static_cast<TokenId>(rng() % (nv - 1));
    return t;
  };
  auto cat = [](std::initializer_list<std::span<const TokenId>> parts) {
    std::vector<TokenId> out;
    for (auto p : parts) out.insert(out.end(), p.begin(), p.end());
    return out;
  };
  const auto sys = random(21), doc_a = random(37), doc_b = random(29), q1 = random(6),
             q2 = random(9);
  const auto first = cat({sys, doc_a, q1});
  const GreedyRun cold_first = [&] {
    auto kv = engine.NewSequence(first.size() + 9);
    return Greedy(engine, *kv, first, 8);
  }();
  {  // The index learns sys + doc_a (+ q1 and the generated tokens).
    auto seq = kvm.Start(ns, first, first.size() + 9);
    GreedyRun r = Greedy(engine, *seq, first, 8);
    auto all = first;
    all.insert(all.end(), r.tokens.begin(), r.tokens.end());
    kvm.Finish(*seq, all);
  }
  auto seg_a = ComputeSegment(engine, sys, doc_a);
  auto seg_b = ComputeSegment(engine, sys, doc_b);
  ASSERT_TRUE(seg_a.ok() && seg_b.ok());
  // doc_b now comes first, then doc_a. The index holds sys only; doc_b sits where it was
  // computed (after sys), so it is exact too; doc_a moves.
  const auto prompt = cat({sys, doc_b, doc_a, q2});
  const int64_t ob = sys.size(), oa = ob + doc_b.size();
  const SegmentUse uses[] = {{ob, &*seg_b}, {oa, &*seg_a}};
  std::vector<float> full(nv), got(nv), contiguous(nv);
  auto full_kv = engine.NewSequence(prompt.size() + 9);
  ASSERT_TRUE(engine.Forward(*full_kv, prompt, full.data()).ok());
  for (ReuseMode mode : {ReuseMode::kBlend, ReuseMode::kNaive}) {
    auto seq = kvm.Start(ns, prompt, prompt.size() + 9);
    // The first run finds sys; the second also doc_b, which the first committed as exact.
    EXPECT_EQ(seq->cached_tokens(),
              static_cast<int64_t>(sys.size() + (mode == ReuseMode::kBlend ? 0 : doc_b.size())));
    ReuseReport rep;
    const ReuseOptions ro{.mode = mode, .ratio = 1.0};
    ASSERT_TRUE(PrefillWithSegments(engine, *seq, prompt, uses, ro, got.data(), &rep).ok());
    EXPECT_EQ(rep.prefix_tokens, static_cast<int64_t>(sys.size() + doc_b.size()));
    EXPECT_EQ(rep.reused_tokens, static_cast<int64_t>(doc_a.size()));
    EXPECT_EQ(seq->n_tokens(), static_cast<int64_t>(prompt.size()));
    if (mode == ReuseMode::kBlend) {
      double num = 0, den = 0;
      for (int i = 0; i < nv; ++i) {
        num += (got[i] - full[i]) * double(got[i] - full[i]);
        den += double(full[i]) * full[i];
      }
      EXPECT_LT(std::sqrt(num / den), 1e-5);
      // Decoding on from both gives the same greedy tokens.
      std::vector<TokenId> a, b;
      std::vector<float> la = got, lb = full;
      for (int i = 0; i < 6; ++i) {
        a.push_back(Sampler::Argmax(la));
        b.push_back(Sampler::Argmax(lb));
        const TokenId ta[1] = {a.back()}, tb[1] = {b.back()};
        ASSERT_TRUE(engine.Forward(*seq, ta, la.data()).ok());
        ASSERT_TRUE(engine.Forward(*full_kv, tb, lb.data()).ok());
      }
      EXPECT_EQ(a, b);
    } else {
      auto kv = engine.NewSequence(prompt.size() + 9);
      ASSERT_TRUE(engine.Forward(*kv, std::span(sys), nullptr).ok());
      ASSERT_TRUE(PrefillWithSegments(engine, *kv, prompt, uses, ro, contiguous.data(), nullptr)
                      .ok());
      EXPECT_EQ(got, contiguous) << "naive: paged and contiguous placement differ";
    }
    kvm.Finish(*seq, prompt);  // commits only its exact prefix, not the placed document
    EXPECT_EQ(kvm.CachedPrefix(ns, prompt), rep.prefix_tokens)
        << "the index took approximate KV for exact";
  }
  // The index still gives the first prompt's exact run.
  auto seq = kvm.Start(ns, first, first.size() + 9);
  EXPECT_GT(seq->cached_tokens(), static_cast<int64_t>(sys.size()));
  const GreedyRun warm = Greedy(engine, *seq, first, 8);
  EXPECT_EQ(warm.tokens, cold_first.tokens);
  EXPECT_TRUE(warm.first_logits == cold_first.first_logits);
}

INSTANTIATE_TEST_SUITE_P(KvTypes, PrefixCacheTest, ::testing::Values(KvType::kF32, KvType::kF16),
                         [](const auto& info) { return std::string(kernels::KvTypeName(info.param)); });

}  // namespace
}  // namespace cachette
