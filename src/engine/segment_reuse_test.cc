#include "engine/segment_reuse.h"

#include <gtest/gtest.h>

#include <array>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <mutex>
#include <numeric>
#include <random>
#include <thread>

#include "engine/segment_test_util.h"

namespace cachette {
namespace {

using namespace segment_test;
using kernels::KvType;
using kernels::RopeStyle;
using kernels::WType;

// Greedy continuation of `steps` tokens from a filled sequence whose last logits are given.
std::vector<TokenId> Greedy(Engine& engine, SequenceKv& kv, std::vector<float> logits,
                            int steps) {
  std::vector<TokenId> out;
  for (int i = 0; i < steps; ++i) {
    const TokenId t = Argmax(logits);
    out.push_back(t);
    EXPECT_TRUE(engine.Forward(kv, std::span<const TokenId>(&t, 1), logits.data()).ok());
  }
  return out;
}

TEST(RotateStoredKeysTest, RoundTripAndComposition) {
  std::mt19937 rng(std::random_device{}());
  std::normal_distribution<float> nd;
  for (RopeStyle style : {RopeStyle::kNormal, RopeStyle::kNeox}) {
    for (KvType type : {KvType::kF32, KvType::kF16}) {
      const KvShape shape{1, 3, 64, type};
      const kernels::RopeParams rope{style, 64, 10000.0f, 1.0f};
      const int n_tok = 5;
      std::vector<float> raw(n_tok * 3 * 64);
      for (float& f : raw) f = nd(rng);
      std::vector<std::byte> stored(n_tok * shape.token_bytes());
      kernels::StoreKv(raw.data(), n_tok * 3, 64, type, stored.data());
      std::vector<float> before(raw.size()), after(raw.size());
      kernels::LoadKv(stored.data(), n_tok * 3, 64, type, before.data());
      const int64_t delta = 1 + rng() % 3000;
      RotateStoredKeys(stored.data(), n_tok, shape, delta, rope);
      RotateStoredKeys(stored.data(), n_tok, shape, -delta, rope);
      kernels::LoadKv(stored.data(), n_tok * 3, 64, type, after.data());
      const double tol = type == KvType::kF32 ? 1e-6 : 2e-3;
      EXPECT_LT(RelL2(after, before), tol) << "style " << int(style) << " delta " << delta;

      // Rotating to p then by delta is rotating to p + delta.
      const int32_t p = 17, pd = static_cast<int32_t>(p + delta);
      std::vector<float> a = raw, b = raw;
      std::vector<int32_t> pos_a(n_tok, p), pos_b(n_tok, pd);
      kernels::Rope(a.data(), n_tok, 3, pos_a.data(), rope);
      kernels::Rope(b.data(), n_tok, 3, pos_b.data(), rope);
      std::vector<std::byte> sa(stored.size());
      kernels::StoreKv(a.data(), n_tok * 3, 64, KvType::kF32 == type ? type : type, sa.data());
      RotateStoredKeys(sa.data(), n_tok, shape, delta, rope);
      kernels::LoadKv(sa.data(), n_tok * 3, 64, type, a.data());
      EXPECT_LT(RelL2(a, b), tol) << "style " << int(style);
    }
  }
}

// Layer 0's keys do not depend on the context, so a segment computed after one context and
// placed after another must have, in layer 0, the keys a full prefill computes there: this
// checks the re-rotation on real projections for both RoPE styles.
TEST(SegmentReuseTest, PlacedLayerZeroKeysMatchFullPrefill) {
  for (const std::string arch : {"llama", "qwen2"}) {
    const Model& model = Synthetic(arch);
    Engine engine(model, EngineOptions{.threads = 2, .kv_type = KvType::kF32});
    std::mt19937 rng(std::random_device{}());
    const int vocab = model.config().n_vocab;
    const auto ctx_a = RandomTokens(3, vocab, rng), ctx_b = RandomTokens(40, vocab, rng);
    const auto doc = RandomTokens(30, vocab, rng), tail = RandomTokens(5, vocab, rng);
    auto seg = ComputeSegment(engine, ctx_a, doc);
    ASSERT_TRUE(seg.ok()) << seg.status().ToString();
    const auto prompt = Concat({ctx_b, doc, tail});
    auto full = engine.NewSequence(prompt.size());
    ASSERT_TRUE(engine.Forward(*full, prompt, nullptr).ok());
    auto placed = engine.NewSequence(prompt.size());
    ASSERT_TRUE(engine.Forward(*placed, ctx_b, nullptr).ok());
    const SegmentUse use{static_cast<int64_t>(ctx_b.size()), &*seg};
    ReuseReport rep;
    ASSERT_TRUE(PrefillWithSegments(engine, *placed, prompt, {&use, 1},
                                    ReuseOptions{.mode = ReuseMode::kNaive}, nullptr, &rep)
                    .ok());
    EXPECT_EQ(rep.reused_tokens, 30);
    EXPECT_EQ(rep.computed_tokens, 5);
    EXPECT_EQ(placed->n_tokens(), static_cast<int64_t>(prompt.size()));
    const int64_t kvd = model.config().kv_dim();
    std::vector<float> a(kvd), b(kvd);
    for (int64_t t = ctx_b.size(); t < static_cast<int64_t>(ctx_b.size() + doc.size()); ++t) {
      kernels::LoadKv(placed->KSlot(0, t), model.config().n_kv_head, model.config().head_dim,
                      KvType::kF32, a.data());
      kernels::LoadKv(full->KSlot(0, t), model.config().n_kv_head, model.config().head_dim,
                      KvType::kF32, b.data());
      EXPECT_LT(RelL2(a, b), 1e-5) << arch << " position " << t;
    }
  }
}

// The prompt of a retrieval-augmented query on the trained model: BOS, two documents
// precomputed on their own after BOS, a question.
struct RagCase {
  std::vector<TokenId> bos, doc1, doc2, question, prompt;
};

RagCase MakeRag(const Model& model) {
  const Tokenizer& tok = model.tokenizer();
  RagCase r;
  r.bos = {tok.bos()};
  r.doc1 = tok.Encode(
      "Document 3. Staithfar Trading is a company based in Preshwulpus. It was founded by "
      "Brarnyx Grotpaindtho in 1978. The company makes tea.\n\n",
      false, false);
  r.doc2 = tok.Encode(
      "Document 7. The town of Preshwulpus lies on the lake Tyndpraifyr. It was founded in "
      "1254. Preshwulpus is known for its salt.\n\n",
      false, false);
  r.question = tok.Encode("Question: Who founded Staithfar Trading?\nAnswer:", false, false);
  r.prompt = Concat({r.bos, r.doc2, r.doc1, r.question});
  return r;
}

// Blend at ratio 1 recomputes every token: the same logits as a full prefill (float rounding)
// and the same greedy tokens.
TEST(SegmentReuseTest, BlendAtRatioOneEqualsFullPrefill) {
  const Model& model = Trained();
  for (KvType type : {KvType::kF32, KvType::kF16}) {
    Engine engine(model, EngineOptions{.threads = 2, .kv_type = type});
    const RagCase r = MakeRag(model);
    auto s1 = ComputeSegment(engine, r.bos, r.doc1);
    auto s2 = ComputeSegment(engine, r.bos, r.doc2);
    ASSERT_TRUE(s1.ok() && s2.ok());
    const int nv = model.config().n_vocab;
    std::vector<float> full_logits(nv), blend_logits(nv);
    auto full = engine.NewSequence();
    ASSERT_TRUE(engine.Forward(*full, r.prompt, full_logits.data()).ok());
    // doc2 sits at its own place (after BOS): the exact prefix; doc1 moves.
    const SegmentUse uses[] = {{1, &*s2}, {static_cast<int64_t>(1 + r.doc2.size()), &*s1}};
    auto seq = engine.NewSequence();
    ASSERT_TRUE(engine.Forward(*seq, r.bos, nullptr).ok());
    ReuseReport rep;
    ASSERT_TRUE(PrefillWithSegments(engine, *seq, r.prompt, uses,
                                    ReuseOptions{.mode = ReuseMode::kBlend, .ratio = 1.0},
                                    blend_logits.data(), &rep)
                    .ok());
    EXPECT_EQ(rep.prefix_tokens, static_cast<int64_t>(1 + r.doc2.size()));
    EXPECT_EQ(rep.reused_tokens, static_cast<int64_t>(r.doc1.size()));
    EXPECT_EQ(rep.recomputed_tokens, rep.reused_tokens);
    EXPECT_LT(RelL2(blend_logits, full_logits), 1e-5);
    EXPECT_EQ(Greedy(engine, *seq, blend_logits, 8), Greedy(engine, *full, full_logits, 8));
  }
}

// A single segment at position 0, computed with no context, is the prompt's exact prefix:
// every mode gives prefix reuse's logits, bit for bit.
TEST(SegmentReuseTest, SegmentAtPositionZeroIsPrefixReuseInEveryMode) {
  const Model& model = Trained();
  Engine engine(model, EngineOptions{.threads = 2, .kv_type = KvType::kF16});
  const RagCase r = MakeRag(model);
  const auto head = Concat({r.bos, r.doc1});
  auto seg = ComputeSegment(engine, {}, head);
  ASSERT_TRUE(seg.ok());
  const auto prompt = Concat({head, r.question});
  const int nv = model.config().n_vocab;
  std::vector<float> want(nv), got(nv);
  auto ref = engine.NewSequence();
  ASSERT_TRUE(engine.Forward(*ref, head, nullptr).ok());
  ASSERT_TRUE(engine.Forward(*ref, r.question, want.data()).ok());
  const SegmentUse use{0, &*seg};
  for (ReuseMode mode : {ReuseMode::kPrefix, ReuseMode::kNaive, ReuseMode::kBlend}) {
    auto seq = engine.NewSequence();
    ReuseReport rep;
    ASSERT_TRUE(PrefillWithSegments(engine, *seq, prompt, {&use, 1},
                                    ReuseOptions{.mode = mode, .ratio = 0.15}, got.data(), &rep)
                    .ok());
    EXPECT_EQ(got, want) << ReuseModeName(mode);
    EXPECT_EQ(rep.prefix_tokens, static_cast<int64_t>(head.size()));
    EXPECT_EQ(rep.reused_tokens, 0);
  }
}

// A moved document loses its attention to what now precedes it; blend recomputes the tokens
// that deviate most and lands closer to full prefill than naive placement.
// Both documents of MakeRag computed after BOS, then moved: a new system line comes first, so
// neither sits where it was computed.
struct MovedDocs {
  std::vector<TokenId> prompt;
  SegmentKv s1, s2;
  int64_t o1 = 0, o2 = 0;
  std::array<SegmentUse, 2> Uses() const { return {SegmentUse{o2, &s2}, SegmentUse{o1, &s1}}; }
};

MovedDocs MakeMoved(Engine& engine, const RagCase& r) {
  MovedDocs m;
  m.s1 = ComputeSegment(engine, r.bos, r.doc1).value();
  m.s2 = ComputeSegment(engine, r.bos, r.doc2).value();
  const auto sys = engine.model().tokenizer().Encode("Read the documents.\n", false, false);
  m.prompt = Concat({r.bos, sys, r.doc2, r.doc1, r.question});
  m.o2 = 1 + static_cast<int64_t>(sys.size());
  m.o1 = m.o2 + static_cast<int64_t>(r.doc2.size());
  return m;
}

// The last position's logits of `m.prompt` placed with `o` after a sequence holding BOS (its
// own exact prefix).
std::vector<float> PlaceAfterBos(Engine& engine, const MovedDocs& m, const ReuseOptions& o,
                                 ReuseReport* rep) {
  std::vector<float> out(engine.model().config().n_vocab);
  auto seq = engine.NewSequence();
  const TokenId bos[1] = {m.prompt[0]};
  EXPECT_TRUE(engine.Forward(*seq, bos, nullptr).ok());
  const auto uses = m.Uses();
  Status s = PrefillWithSegments(engine, *seq, m.prompt, uses, o, out.data(), rep);
  EXPECT_TRUE(s.ok()) << s.ToString();
  return out;
}

TEST(SegmentReuseTest, BlendRecomputesItsShareAndBeatsNaive) {
  const Model& model = Trained();
  Engine engine(model, EngineOptions{.threads = 2, .kv_type = KvType::kF32});
  const RagCase r = MakeRag(model);
  const MovedDocs m = MakeMoved(engine, r);
  const std::vector<TokenId>& prompt = m.prompt;
  std::vector<float> full(model.config().n_vocab);
  {
    auto seq = engine.NewSequence();
    ASSERT_TRUE(engine.Forward(*seq, prompt, full.data()).ok());
  }
  auto run = [&](ReuseMode mode, double ratio, ReuseReport* rep) {
    return PlaceAfterBos(engine, m, ReuseOptions{.mode = mode, .ratio = ratio}, rep);
  };
  ReuseReport naive_rep, blend_rep, prefix_rep;
  const auto naive = run(ReuseMode::kNaive, 0, &naive_rep);
  const auto blend = run(ReuseMode::kBlend, 0.3, &blend_rep);
  const auto prefix = run(ReuseMode::kPrefix, 0, &prefix_rep);
  const int64_t reused = r.doc1.size() + r.doc2.size();
  EXPECT_EQ(naive_rep.reused_tokens, reused);
  EXPECT_EQ(naive_rep.recomputed_tokens, 0);
  EXPECT_EQ(naive_rep.prefix_tokens, 1);
  EXPECT_EQ(blend_rep.recomputed_tokens, static_cast<int64_t>(std::ceil(0.3 * reused)));
  EXPECT_EQ(prefix_rep.reused_tokens, 0);
  EXPECT_EQ(prefix_rep.computed_tokens, static_cast<int64_t>(prompt.size()) - 1);
  EXPECT_LT(RelL2(prefix, full), 1e-5);
  const double e_naive = RelL2(naive, full), e_blend = RelL2(blend, full);
  EXPECT_GT(e_naive, 1e-3);
  EXPECT_LT(e_blend, e_naive);
}

TEST(CacheCraftTest, ShareFollowsContextOverlapAndOrder) {
  SegmentKv seg;
  seg.cci = 0.8;
  seg.context_chunks = {11, 22, 33};
  const uint64_t same[] = {11, 22, 33};
  const uint64_t reversed_two[] = {33, 22};
  const uint64_t other[] = {44};
  EXPECT_DOUBLE_EQ(CacheCraftShare(seg, same, 0.5), 0.0);  // same context: pure reuse
  // b and c found (beta 2/3) in reverse order (gamma 1): as if nothing overlapped.
  EXPECT_DOUBLE_EQ(CacheCraftShare(seg, reversed_two, 0.5), 0.4);
  EXPECT_DOUBLE_EQ(CacheCraftShare(seg, other, 0.5), 0.4);
  const uint64_t two_in_order[] = {22, 33};
  EXPECT_NEAR(CacheCraftShare(seg, two_in_order, 0.5), 0.5 * 0.8 / 3, 1e-12);
  EXPECT_DOUBLE_EQ(CacheCraftShare(seg, other, 5.0), 1.0);  // clamped
  seg.context_chunks.clear();
  EXPECT_DOUBLE_EQ(CacheCraftShare(seg, same, 0.5), 0.4);
}

// Cache-Craft recomputes each moved segment's share CFO of its tokens, those with the largest
// inter-attention; at alpha 0 it is naive placement bit for bit.
TEST(CacheCraftTest, RecomputesItsShareOfEachSegment) {
  const Model& model = Trained();
  Engine engine(model, EngineOptions{.threads = 2, .kv_type = KvType::kF16});
  const RagCase r = MakeRag(model);
  const MovedDocs m = MakeMoved(engine, r);
  const SegmentKv* s1 = &m.s1;
  const SegmentKv* s2 = &m.s2;
  for (const SegmentKv* s : {s1, s2}) {
    ASSERT_EQ(s->inter.size(), s->tokens.size());
    for (float f : s->inter) EXPECT_TRUE(f >= 0 && f <= 1.0001f) << f;
    EXPECT_GT(s->cci, 0.5);
    EXPECT_LT(s->cci, 1.0);
  }
  auto run = [&](ReuseMode mode, double ratio, ReuseReport* rep) {
    return PlaceAfterBos(engine, m, ReuseOptions{.mode = mode, .ratio = ratio}, rep);
  };
  ReuseReport craft, naive, zero;
  run(ReuseMode::kCacheCraft, 0.5, &craft);
  const int64_t want = static_cast<int64_t>(std::ceil(0.5 * s2->cci * r.doc2.size())) +
                       static_cast<int64_t>(std::ceil(0.5 * s1->cci * r.doc1.size()));
  EXPECT_EQ(craft.recomputed_tokens, want);
  EXPECT_EQ(craft.reused_tokens, static_cast<int64_t>(r.doc1.size() + r.doc2.size()));
  EXPECT_EQ(run(ReuseMode::kCacheCraft, 0.0, &zero), run(ReuseMode::kNaive, 0.0, &naive));
  EXPECT_EQ(zero.recomputed_tokens, 0);
}

// Layer-0 attention mass of each token t of the prompt's [begin, end) to slots [from, begin),
// summed over query heads: a float64 twin of CraftChoice::kPrompt's measure, from the queries
// and keys of a full prefill's layer 0.
std::vector<double> LayerZeroMassTwin(Engine& engine, std::span<const TokenId> prompt,
                                      int64_t from, int64_t begin, int64_t end) {
  const ModelConfig& c = engine.model().config();
  const int64_t n = static_cast<int64_t>(prompt.size()), qd = int64_t{c.n_head} * c.head_dim;
  auto seq = engine.NewSequence(n);
  EXPECT_TRUE(seq->Reserve(n).ok());
  std::vector<float> x(n * c.d_model), q_all(n * qd);
  engine.Embed(prompt, x.data());
  std::vector<int32_t> pos(n);
  std::iota(pos.begin(), pos.end(), 0);
  const Engine::Run run{seq.get(), n, 0};
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  engine.ForwardLayer(0, x.data(), n, pos.data(), {&run, 1},
                      [&](int layer, const float* q, int64_t m, float* out) {
                        std::copy(q, q + m * qd, q_all.begin());
                        kernels::Attention(q, m, c.n_head, 0, seq->View(layer, n), scale, out,
                                           engine.pool());
                      });
  std::vector<float> k(n * c.kv_dim());
  for (int64_t t = 0; t < n; ++t) {
    kernels::LoadKv(seq->KSlot(0, t), c.n_kv_head, c.head_dim, engine.kv_shape().type,
                    k.data() + t * c.kv_dim());
  }
  std::vector<double> mass;
  for (int64_t t = begin; t < end; ++t) {
    double sum = 0;
    for (int h = 0; h < c.n_head; ++h) {
      const float* qh = q_all.data() + t * qd + int64_t{h} * c.head_dim;
      const int kh = h / (c.n_head / c.n_kv_head);
      std::vector<double> s(t + 1);
      double mx = -INFINITY;
      for (int64_t j = 0; j <= t; ++j) {
        const float* kj = k.data() + j * c.kv_dim() + int64_t{kh} * c.head_dim;
        double dot = 0;
        for (int e = 0; e < c.head_dim; ++e) dot += double(qh[e]) * kj[e];
        s[j] = dot * scale;
        mx = std::max(mx, s[j]);
      }
      double z = 0, part = 0;
      for (int64_t j = 0; j <= t; ++j) {
        z += std::exp(s[j] - mx);
        if (j >= from && j < begin) part += std::exp(s[j] - mx);
      }
      sum += part / z;
    }
    mass.push_back(sum);
  }
  return mass;
}

// Choosing in the prompt, Cache-Craft recomputes, of each moved document, its share of the
// tokens whose layer-0 attention to what now precedes it (not the BOS it was computed after)
// is largest: checked against a float64 twin. The stored profile picks other tokens here, and
// at alpha 0 the choice in the prompt is naive placement bit for bit.
TEST(CacheCraftTest, PromptChoiceRecomputesTokensAttendingMostToTheirNewContext) {
  const Model& model = Trained();
  Engine engine(model, EngineOptions{.threads = 2, .kv_type = KvType::kF32});
  const RagCase r = MakeRag(model);
  const MovedDocs m = MakeMoved(engine, r);
  const std::vector<TokenId>& prompt = m.prompt;
  const auto uses = m.Uses();
  auto run = [&](double alpha, CraftChoice choice, ReuseReport* rep) {
    const ReuseOptions o{.mode = ReuseMode::kCacheCraft, .ratio = alpha, .craft_choice = choice};
    return PlaceAfterBos(engine, m, o, rep);
  };
  ReuseReport in_prompt, stored;
  run(0.5, CraftChoice::kPrompt, &in_prompt);
  run(0.5, CraftChoice::kStored, &stored);
  EXPECT_EQ(in_prompt.recomputed_tokens, stored.recomputed_tokens);
  EXPECT_EQ(in_prompt.recomputed_slots.size(), static_cast<size_t>(in_prompt.recomputed_tokens));
  EXPECT_NE(in_prompt.recomputed_slots, stored.recomputed_slots);
  for (const SegmentUse& u : uses) {
    const int64_t len = static_cast<int64_t>(u.kv->tokens.size());
    const std::vector<double> mass = LayerZeroMassTwin(engine, prompt, 1, u.offset, u.offset + len);
    std::vector<bool> chosen(len, false);
    for (int64_t t : in_prompt.recomputed_slots) {
      if (t >= u.offset && t < u.offset + len) chosen[t - u.offset] = true;
    }
    EXPECT_EQ(std::count(chosen.begin(), chosen.end(), true),
              static_cast<int64_t>(std::ceil(0.5 * u.kv->cci * len)));
    double least_chosen = INFINITY, most_passed = -INFINITY;
    for (int64_t i = 0; i < len; ++i) {
      if (chosen[i]) {
        least_chosen = std::min(least_chosen, mass[i]);
      } else {
        most_passed = std::max(most_passed, mass[i]);
      }
    }
    EXPECT_GE(least_chosen, most_passed - 1e-5) << "segment at " << u.offset;
  }
  // The stored choice at alpha 0 is naive placement (RecomputesItsShareOfEachSegment).
  ReuseReport zero, stored_zero;
  EXPECT_EQ(run(0.0, CraftChoice::kPrompt, &zero), run(0.0, CraftChoice::kStored, &stored_zero));
  EXPECT_TRUE(zero.recomputed_slots.empty());
  EXPECT_EQ(ParseCraftChoice("prompt").value(), CraftChoice::kPrompt);
  EXPECT_EQ(ParseCraftChoice("inter").status().code(), StatusCode::kInvalidArgument);
}

// The KV of every slot [0, n) of every layer of `kv`, K then V.
std::vector<std::byte> AllKv(SequenceKv& kv, int64_t n) {
  const size_t tb = kv.shape().token_bytes();
  std::vector<std::byte> out;
  for (int l = 0; l < kv.shape().n_layer; ++l) {
    for (int64_t t = 0; t < n; ++t) {
      const auto* k = static_cast<const std::byte*>(kv.KSlot(l, t));
      const auto* v = static_cast<const std::byte*>(kv.VSlot(l, t));
      out.insert(out.end(), k, k + tb);
      out.insert(out.end(), v, v + tb);
    }
  }
  return out;
}

// Segment KV arriving a layer at a time from another thread (a tier read), while the prefill
// runs: the same logits and KV, bit for bit, as with every layer there from the start, in
// every mode; a load that fails ends the prefill with its error and the sequence unchanged.
TEST(SegmentReuseTest, LayersArrivingDuringThePrefillGiveTheSameResult) {
  const Model& model = Trained();
  const int n_layer = model.config().n_layer;
  Engine engine(model, EngineOptions{.threads = 2, .kv_type = KvType::kF16});
  const RagCase r = MakeRag(model);
  auto s1 = ComputeSegment(engine, r.bos, r.doc1);
  auto s2 = ComputeSegment(engine, r.bos, r.doc2);
  ASSERT_TRUE(s1.ok() && s2.ok());
  const int64_t n = static_cast<int64_t>(r.prompt.size());
  const int nv = model.config().n_vocab;
  const ReuseOptions modes[] = {{.mode = ReuseMode::kPrefix},
                                {.mode = ReuseMode::kNaive},
                                {.mode = ReuseMode::kBlend, .ratio = 0.3},
                                {.mode = ReuseMode::kCacheCraft, .ratio = 0.6},
                                {.mode = ReuseMode::kCacheCraft, .ratio = 0.6,
                                 .craft_choice = CraftChoice::kPrompt}};
  for (const ReuseOptions& o : modes) {
    SCOPED_TRACE(std::string(ReuseModeName(o.mode)));
    const SegmentUse uses[] = {{1, &*s2}, {static_cast<int64_t>(1 + r.doc2.size()), &*s1}};
    std::vector<float> want(nv), got(nv);
    auto ref = engine.NewSequence();
    ASSERT_TRUE(engine.Forward(*ref, r.bos, nullptr).ok());
    ReuseReport want_rep;
    ASSERT_TRUE(PrefillWithSegments(engine, *ref, r.prompt, uses, o, want.data(), &want_rep).ok());

    // Copies whose layers are zero until the "loader" fills them, one every 2 ms.
    SegmentKv l1 = *s1, l2 = *s2;
    for (SegmentKv* seg : {&l1, &l2}) {
      for (int l = 0; l < n_layer; ++l) {
        std::fill(seg->k[l].begin(), seg->k[l].end(), std::byte{0});
        std::fill(seg->v[l].begin(), seg->v[l].end(), std::byte{0});
      }
    }
    std::mutex mu;
    std::condition_variable cv;
    int ready = 0;
    const SegmentUse loading[] = {{1, &l2}, {static_cast<int64_t>(1 + r.doc2.size()), &l1}};
    auto seq = engine.NewSequence();
    ASSERT_TRUE(engine.Forward(*seq, r.bos, nullptr).ok());
    std::thread loader([&] {
      for (int l = 0; l < n_layer; ++l) {
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
        std::lock_guard<std::mutex> lock(mu);
        l1.k[l] = s1->k[l], l1.v[l] = s1->v[l], l2.k[l] = s2->k[l], l2.v[l] = s2->v[l];
        ready = l + 1;
        cv.notify_all();
      }
    });
    std::vector<int> awaited;
    auto await_layer = [&](int l) {
      awaited.push_back(l);
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return ready > l; });
      return Status::Ok();
    };
    ReuseReport rep;
    const SegmentLoad load{await_layer, {}};
    const Status st = PrefillWithSegments(engine, *seq, r.prompt, loading, o, got.data(), &rep,
                                          &load);
    loader.join();
    ASSERT_TRUE(st.ok()) << st.ToString();
    std::vector<int> in_order(n_layer);
    std::iota(in_order.begin(), in_order.end(), 0);
    EXPECT_EQ(awaited, in_order);
    EXPECT_EQ(got, want);
    EXPECT_EQ(AllKv(*seq, n), AllKv(*ref, n));
    EXPECT_EQ(rep.recomputed_slots, want_rep.recomputed_slots);
    EXPECT_EQ(rep.row_layers, want_rep.row_layers);
    EXPECT_GT(rep.load_wait_us, 0);

    // The load fails at layer 3: its error, and the sequence holds BOS alone.
    auto failed = engine.NewSequence();
    ASSERT_TRUE(engine.Forward(*failed, r.bos, nullptr).ok());
    const SegmentLoad lost{[](int l) {
                             return l < 3 ? Status::Ok() : Unavailable("layer 3 is lost");
                           },
                           {}};
    const Status bad =
        PrefillWithSegments(engine, *failed, r.prompt, uses, o, got.data(), &rep, &lost);
    EXPECT_EQ(bad.code(), StatusCode::kUnavailable);
    EXPECT_EQ(failed->n_tokens(), 1);
  }
}

TEST(SegmentReuseTest, PipelinedRatioFillsTheLoadTime) {
  // 100 us to load a layer, 1 us a row: 100 rows per layer hide under the load; 20 of them are
  // computed anyway, so 80 of the 400 placed tokens (0.2) can be recomputed for nothing.
  // 4 layers to go, widen 2: ratio r computes r x 400 x 5 placed rows and 4 x 20 others; at
  // 1 us a row, 480 us of load left pay for r = (480 - 80) / 2000 = 0.2.
  EXPECT_DOUBLE_EQ(PipelinedBlendRatio(0.15, 400, 20, 4, 2.0, 1.0, 480.0), 0.2);
  EXPECT_DOUBLE_EQ(PipelinedBlendRatio(0.15, 400, 20, 4, 1.0, 1.0, 400.0), 0.2);  // one-shot
  EXPECT_DOUBLE_EQ(PipelinedBlendRatio(0.3, 400, 20, 4, 2.0, 1.0, 400.0), 0.3);   // the floor
  EXPECT_DOUBLE_EQ(PipelinedBlendRatio(0.15, 400, 20, 4, 2.0, 1.0, 1e6), 1.0);    // a slow link
  EXPECT_DOUBLE_EQ(PipelinedBlendRatio(0.15, 400, 200, 4, 2.0, 1.0, 400.0), 0.15);
  EXPECT_DOUBLE_EQ(PipelinedBlendRatio(0.15, 0, 20, 4, 2.0, 1.0, 400.0), 0.15);  // none placed
  EXPECT_DOUBLE_EQ(PipelinedBlendRatio(0.15, 400, 20, 4, 2.0, 0.0, 400.0), 0.15);  // unknown
  EXPECT_DOUBLE_EQ(PipelinedBlendRatio(0.15, 400, 20, 4, 2.0, 1.0, -5.0), 0.15);   // load over
  EXPECT_DOUBLE_EQ(PipelinedBlendRatio(0.15, 400, 20, 0, 2.0, 1.0, 400.0), 0.15);
}

// The loading controller inside a blend: a load slower than any recompute raises the ratio to
// 1 (every placed token through every layer but the last, which runs the ratio asked for) and
// brings the logits closer to full prefill's; a load faster than a row leaves the ratio asked
// for, as without the controller.
TEST(SegmentReuseTest, LoadingControllerRaisesTheRatioToWhatTheLoadHides) {
  const Model& model = Trained();
  Engine engine(model, EngineOptions{.threads = 2, .kv_type = KvType::kF32});
  const RagCase r = MakeRag(model);
  auto s1 = ComputeSegment(engine, r.bos, r.doc1);
  auto s2 = ComputeSegment(engine, r.bos, r.doc2);
  ASSERT_TRUE(s1.ok() && s2.ok());
  const int nv = model.config().n_vocab;
  std::vector<float> full(nv), got(nv);
  {
    auto seq = engine.NewSequence();
    ASSERT_TRUE(engine.Forward(*seq, r.prompt, full.data()).ok());
  }
  const SegmentUse uses[] = {{1, &*s2}, {static_cast<int64_t>(1 + r.doc2.size()), &*s1}};
  auto run = [&](double load_left_us, ReuseReport* rep) {
    auto seq = engine.NewSequence();
    EXPECT_TRUE(engine.Forward(*seq, r.bos, nullptr).ok());
    const SegmentLoad load{{}, [&] { return load_left_us; }};
    return PrefillWithSegments(engine, *seq, r.prompt, uses,
                               ReuseOptions{.mode = ReuseMode::kBlend, .ratio = 0.15}, got.data(),
                               rep, load_left_us >= 0 ? &load : nullptr);
  };
  ReuseReport slow, fast, off;
  ASSERT_TRUE(run(1e12, &slow).ok());
  const std::vector<float> raised = got;
  EXPECT_EQ(slow.ratio, 1.0);
  EXPECT_EQ(slow.recomputed_tokens, slow.reused_tokens);
  ASSERT_TRUE(run(0, &fast).ok());  // the load is over
  const std::vector<float> asked = got;
  ASSERT_TRUE(run(-1, &off).ok());  // no controller
  EXPECT_EQ(got, asked);
  EXPECT_LT(RelL2(raised, full), 0.5 * RelL2(asked, full));
  EXPECT_EQ(fast.ratio, 0.15);
  EXPECT_EQ(fast.recomputed_slots, off.recomputed_slots);
  EXPECT_EQ(off.recomputed_tokens, static_cast<int64_t>(std::ceil(0.15 * off.reused_tokens)));
}

TEST(SegmentReuseTest, RejectsBadInput) {
  const Model& model = Trained();
  Engine engine(model, EngineOptions{.threads = 1, .kv_type = KvType::kF16});
  const RagCase r = MakeRag(model);
  auto s1 = ComputeSegment(engine, r.bos, r.doc1);
  ASSERT_TRUE(s1.ok());
  auto expect_error = [&](std::span<const SegmentUse> uses, ReuseOptions o,
                          const std::string& needle) {
    auto seq = engine.NewSequence();
    Status s = PrefillWithSegments(engine, *seq, r.prompt, uses, o, nullptr, nullptr);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << needle;
    EXPECT_NE(s.ToString().find(needle), std::string::npos) << s.ToString();
    EXPECT_EQ(seq->n_tokens(), 0);
  };
  const int64_t o1 = 1 + r.doc2.size();
  const SegmentUse good{o1, &*s1};
  expect_error({&good, 1}, ReuseOptions{.mode = ReuseMode::kBlend, .ratio = 1.5}, "ratio");
  expect_error({&good, 1}, ReuseOptions{.mode = ReuseMode::kBlend, .check_layer = 6},
               "check layer");
  const SegmentUse shifted{o1 + 1, &*s1};
  expect_error({&shifted, 1}, ReuseOptions{}, "differ");
  const SegmentUse twice[] = {good, good};
  expect_error(twice, ReuseOptions{}, "overlaps");
  EXPECT_EQ(ParseReuseMode("blend").value(), ReuseMode::kBlend);
  EXPECT_EQ(ParseReuseMode("cachecraft").value(), ReuseMode::kCacheCraft);
  EXPECT_EQ(ParseReuseMode("blend ").status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(ComputeSegment(engine, r.bos, {}).status().code() == StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace cachette
