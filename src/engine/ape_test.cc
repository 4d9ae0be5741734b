// APE (engine/ape.h) against what it must reduce to and against a float64 reference of
// parallel encoding written here from the definition. (The log-sum-exp attention kernel it is
// built on is checked in kernels_test.cc: AttentionLse*.)
#include "engine/ape.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "engine/segment_test_util.h"

namespace cachette {
namespace {

using namespace segment_test;
using kernels::KvType;

// ---- A float64 reference of parallel encoding ------------------------------------------------
//
// Every token of prefix, documents and query with its position and what it may attend to,
// computed layer by layer in double from the model's weights (rows read by DequantizeRow,
// exact for f32 weights):
//   prefix token i      position i,          attends prefix [0, i]
//   document d token i  position P + i,      attends the prefix and document d's [0, i]
//   query token i       position q_pos0 + i, attends the prefix, the query's [0, i] with log
//                       weight s_j, and every document token with log weight
//                       s_j / T + (S T - 1) lse_C, lse_C = log sum_C e^(s_j / T)
// (the second is ape.h's two-part merge written as one softmax over per-key log weights).
// q_pos0 is P + the longest document for APE; tests pass another to show positions matter.

using Mat = std::vector<std::vector<double>>;  // [rows][cols]

Mat Dequantize(const kernels::WeightMatrix& w) {
  Mat m(w.rows, std::vector<double>(w.cols));
  std::vector<float> row(w.cols);
  for (int64_t r = 0; r < w.rows; ++r) {
    kernels::DequantizeRow(w, r, row.data());
    std::copy(row.begin(), row.end(), m[r].begin());
  }
  return m;
}

std::vector<double> MatVec(const Mat& w, const std::vector<double>& x) {
  std::vector<double> y(w.size(), 0.0);
  for (size_t r = 0; r < w.size(); ++r) {
    for (size_t c = 0; c < x.size(); ++c) y[r] += w[r][c] * x[c];
  }
  return y;
}

std::vector<double> Norm(const std::vector<double>& x, const float* weight, double eps) {
  double ss = 0;
  for (double v : x) ss += v * v;
  const double inv = 1.0 / std::sqrt(ss / x.size() + eps);
  std::vector<double> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = x[i] * inv * weight[i];
  return y;
}

void RotateHeads(std::vector<double>& v, int n_head, int pos, const ModelConfig& c) {
  const int hd = c.head_dim, half = hd / 2;
  const bool neox = c.rope.style == kernels::RopeStyle::kNeox;
  for (int h = 0; h < n_head; ++h) {
    for (int i = 0; i < half; ++i) {
      const double angle =
          pos * double(c.rope.freq_scale) * std::pow(double(c.rope.theta_base), -2.0 * i / hd);
      const int a = h * hd + (neox ? i : 2 * i), b = neox ? a + half : a + 1;
      const double x0 = v[a], x1 = v[b];
      v[a] = x0 * std::cos(angle) - x1 * std::sin(angle);
      v[b] = x0 * std::sin(angle) + x1 * std::cos(angle);
    }
  }
}

struct RefToken {
  TokenId id;
  int pos;
  int group;  // kPrefix, kQuery, or the document's index
  int index;  // within its group
};
constexpr int kPrefix = -1, kQuery = -2;

// Logits [query.size()][n_vocab] of the query tokens.
std::vector<std::vector<double>> ReferenceApe(const Model& model,
                                              const std::vector<TokenId>& prefix,
                                              const std::vector<std::vector<TokenId>>& docs,
                                              const std::vector<TokenId>& query, double t_temp,
                                              double s_scale, int q_pos0) {
  const ModelConfig& c = model.config();
  const int p = static_cast<int>(prefix.size()), hd = c.head_dim;
  const int group_size = c.n_head / c.n_kv_head;
  std::vector<RefToken> toks;
  for (int i = 0; i < p; ++i) toks.push_back({prefix[i], i, kPrefix, i});
  for (size_t d = 0; d < docs.size(); ++d) {
    for (size_t i = 0; i < docs[d].size(); ++i) {
      toks.push_back({docs[d][i], p + int(i), int(d), int(i)});
    }
  }
  for (size_t i = 0; i < query.size(); ++i) {
    toks.push_back({query[i], q_pos0 + int(i), kQuery, int(i)});
  }
  const size_t n = toks.size();
  std::vector<std::vector<double>> x(n, std::vector<double>(c.d_model));
  std::vector<float> row(c.d_model);
  for (size_t t = 0; t < n; ++t) {
    kernels::DequantizeRow(model.tok_embd(), toks[t].id, row.data());
    std::copy(row.begin(), row.end(), x[t].begin());
  }
  // May token t attend to token s, and is s in the documents' part (for a query token)?
  auto sees = [&](const RefToken& t, const RefToken& s) {
    if (s.group == kPrefix) return t.group != kPrefix || s.index <= t.index;
    if (t.group == kQuery) return s.group != kQuery || s.index <= t.index;
    return s.group == t.group && s.index <= t.index;
  };
  for (int l = 0; l < c.n_layer; ++l) {
    const LayerWeights& w = model.layers()[l];
    const Mat wq = Dequantize(w.wq), wk = Dequantize(w.wk), wv = Dequantize(w.wv);
    const Mat wo = Dequantize(w.wo), wg = Dequantize(w.w_gate), wu = Dequantize(w.w_up);
    const Mat wd = Dequantize(w.w_down);
    std::vector<std::vector<double>> q(n), k(n), v(n);
    for (size_t t = 0; t < n; ++t) {
      const auto h = Norm(x[t], w.attn_norm, c.norm_eps);
      q[t] = MatVec(wq, h);
      k[t] = MatVec(wk, h);
      v[t] = MatVec(wv, h);
      if (w.bq != nullptr) {
        for (int i = 0; i < c.q_dim(); ++i) q[t][i] += w.bq[i];
        for (int i = 0; i < c.kv_dim(); ++i) k[t][i] += w.bk[i], v[t][i] += w.bv[i];
      }
      RotateHeads(q[t], c.n_head, toks[t].pos, c);
      RotateHeads(k[t], c.n_kv_head, toks[t].pos, c);
    }
    for (size_t t = 0; t < n; ++t) {
      std::vector<double> att(c.q_dim(), 0.0);
      for (int h = 0; h < c.n_head; ++h) {
        const int kh = h / group_size;
        // Log weights of the keys t sees; documents' keys first get s_j / T.
        std::vector<double> lw(n, -std::numeric_limits<double>::infinity());
        double doc_max = -std::numeric_limits<double>::infinity();
        for (size_t s = 0; s < n; ++s) {
          if (!sees(toks[t], toks[s])) continue;
          double dot = 0;
          for (int i = 0; i < hd; ++i) dot += q[t][h * hd + i] * k[s][kh * hd + i];
          lw[s] = dot / std::sqrt(double(hd));
          if (toks[t].group == kQuery && toks[s].group >= 0) {
            lw[s] /= t_temp;
            doc_max = std::max(doc_max, lw[s]);
          }
        }
        if (toks[t].group == kQuery && !docs.empty()) {
          double sum = 0;
          for (size_t s = 0; s < n; ++s) {
            if (toks[s].group >= 0) sum += std::exp(lw[s] - doc_max);
          }
          const double lse_c = doc_max + std::log(sum);
          for (size_t s = 0; s < n; ++s) {
            if (toks[s].group >= 0) lw[s] += (s_scale * t_temp - 1) * lse_c;
          }
        }
        const double mx = *std::max_element(lw.begin(), lw.end());
        double z = 0;
        for (double& e : lw) z += (e = std::exp(e - mx));
        for (size_t s = 0; s < n; ++s) {
          if (lw[s] == 0) continue;
          for (int i = 0; i < hd; ++i) att[h * hd + i] += lw[s] / z * v[s][kh * hd + i];
        }
      }
      const auto o = MatVec(wo, att);
      for (int i = 0; i < c.d_model; ++i) x[t][i] += o[i];
      const auto h = Norm(x[t], w.ffn_norm, c.norm_eps);
      auto g = MatVec(wg, h);
      const auto u = MatVec(wu, h);
      for (int i = 0; i < c.d_ff; ++i) g[i] = g[i] / (1.0 + std::exp(-g[i])) * u[i];
      const auto dn = MatVec(wd, g);
      for (int i = 0; i < c.d_model; ++i) x[t][i] += dn[i];
    }
  }
  const Mat out = Dequantize(model.output());
  std::vector<std::vector<double>> logits;
  for (size_t t = n - query.size(); t < n; ++t) {
    logits.push_back(MatVec(out, Norm(x[t], model.output_norm(), c.norm_eps)));
  }
  return logits;
}

// ---- Tests -------------------------------------------------------------------------------------

// The prompt of a retrieval-augmented query on the trained model: a prefix (BOS and a system
// line), documents, a question.
struct RagCase {
  std::vector<TokenId> prefix, doc1, doc2, question;
};

RagCase MakeRag(const Model& model) {
  const Tokenizer& tok = model.tokenizer();
  RagCase r;
  r.prefix = Concat({std::vector<TokenId>{tok.bos()},
                     tok.Encode("Read the documents and answer.\n", false, false)});
  r.doc1 = tok.Encode(
      "Document 3. Staithfar Trading is a company based in Preshwulpus. It was founded by "
      "Brarnyx Grotpaindtho in 1978. The company makes tea.\n\n",
      false, false);
  r.doc2 = tok.Encode(
      "Document 7. The town of Preshwulpus lies on the lake Tyndpraifyr. It was founded in "
      "1254. Preshwulpus is known for its salt.\n\n",
      false, false);
  r.question = tok.Encode("Question: Who founded Staithfar Trading?\nAnswer:", false, false);
  return r;
}

// Greedy continuation through DecodeApe; `logits` are the prefill's and end as the last step's.
std::vector<TokenId> GreedyApe(Engine& engine, SequenceKv& kv, const ApeState& st,
                               std::vector<float>& logits, int steps,
                               std::vector<std::vector<float>>* all = nullptr) {
  std::vector<TokenId> out;
  for (int i = 0; i < steps; ++i) {
    const TokenId t = Argmax(logits);
    out.push_back(t);
    Status s = DecodeApe(engine, kv, st, std::span<const TokenId>(&t, 1), logits.data());
    EXPECT_TRUE(s.ok()) << s.ToString();
    if (all != nullptr) all->push_back(logits);
  }
  return out;
}

std::vector<TokenId> GreedyPlain(Engine& engine, SequenceKv& kv, std::vector<float>& logits,
                                 int steps, std::vector<std::vector<float>>* all = nullptr) {
  std::vector<TokenId> out;
  for (int i = 0; i < steps; ++i) {
    const TokenId t = Argmax(logits);
    out.push_back(t);
    EXPECT_TRUE(engine.Forward(kv, std::span<const TokenId>(&t, 1), logits.data()).ok());
    if (all != nullptr) all->push_back(logits);
  }
  return out;
}

// With one document and T = S = 1 the two-part merge is exactly softmax over everything, and
// the document computed after the prefix is exactly what an ordinary prefill computes there:
// APE is the ordinary prefill of prefix + document + question (float rounding aside), in
// logits and in 8 greedy tokens, for both an empty sequence and one holding the prefix. With
// no document at all it is the ordinary prefill of prefix + question. The paper's T = S = 0.9
// changes the logits (the test would see a merge that ignored them).
TEST(ApeTest, OneDocumentAtUnitTemperatureAndScaleIsOrdinaryPrefill) {
  const Model& model = Trained();
  const RagCase r = MakeRag(model);
  const int nv = model.config().n_vocab;
  for (KvType type : {KvType::kF32, KvType::kF16}) {
    SCOPED_TRACE(std::string(kernels::KvTypeName(type)));
    Engine engine(model, EngineOptions{.threads = 2, .kv_type = type});
    // The merge rounds differently from one softmax (~1e-7 relative); with f16 KV a query
    // row's K/V that moved by that much may round to the neighbouring half (~5e-4 relative)
    // when stored, which later layers and tokens carry into the logits at ~1e-5.
    const double tol = type == KvType::kF32 ? 1e-5 : 1e-4;
    auto doc = ComputeSegment(engine, r.prefix, r.doc1);
    ASSERT_TRUE(doc.ok()) << doc.status().ToString();
    const SegmentKv* docs[] = {&*doc};

    std::vector<float> want(nv);
    auto full = engine.NewSequence();
    ASSERT_TRUE(engine.Forward(*full, Concat({r.prefix, r.doc1, r.question}), want.data()).ok());
    const std::vector<float> want_first = want;
    std::vector<std::vector<float>> want_steps;
    const auto want_tokens = GreedyPlain(engine, *full, want, 8, &want_steps);

    for (bool prefix_cached : {false, true}) {
      SCOPED_TRACE(prefix_cached ? "prefix in the sequence" : "empty sequence");
      auto seq = engine.NewSequence();
      if (prefix_cached) {
        ASSERT_TRUE(engine.Forward(*seq, r.prefix, nullptr).ok());
      }
      std::vector<float> got(nv);
      ApeState st;
      Status s = PrefillApe(engine, *seq, r.prefix, docs, r.question,
                            ApeOptions{.temperature = 1, .scale = 1}, got.data(), &st);
      ASSERT_TRUE(s.ok()) << s.ToString();
      EXPECT_EQ(st.prefix_tokens, static_cast<int64_t>(r.prefix.size()));
      EXPECT_EQ(st.doc_tokens, static_cast<int64_t>(r.doc1.size()));
      EXPECT_EQ(st.doc_span, static_cast<int64_t>(r.doc1.size()));
      EXPECT_EQ(seq->n_tokens(),
                static_cast<int64_t>(r.prefix.size() + r.doc1.size() + r.question.size()));
      EXPECT_LT(RelL2(got, want_first), tol);
      std::printf("  %s: relative L2 vs ordinary prefill %.2e\n",
                  std::string(kernels::KvTypeName(type)).c_str(), RelL2(got, want_first));
      std::vector<std::vector<float>> got_steps;
      EXPECT_EQ(GreedyApe(engine, *seq, st, got, 8, &got_steps), want_tokens);
      for (size_t i = 0; i < got_steps.size() && i < want_steps.size(); ++i) {
        EXPECT_LT(RelL2(got_steps[i], want_steps[i]), tol) << "step " << i;
      }
    }

    // No documents: the ordinary prefill of prefix + question.
    {
      auto plain = engine.NewSequence();
      std::vector<float> plain_logits(nv), got(nv);
      ASSERT_TRUE(engine.Forward(*plain, Concat({r.prefix, r.question}), plain_logits.data()).ok());
      auto seq = engine.NewSequence();
      ASSERT_TRUE(
          PrefillApe(engine, *seq, r.prefix, {}, r.question, ApeOptions{}, got.data(), nullptr)
              .ok());
      EXPECT_LT(RelL2(got, plain_logits), tol);
    }

    // The paper's defaults move the logits.
    {
      auto seq = engine.NewSequence();
      std::vector<float> got(nv);
      ASSERT_TRUE(
          PrefillApe(engine, *seq, r.prefix, docs, r.question, ApeOptions{}, got.data(), nullptr)
              .ok());
      EXPECT_GT(RelL2(got, want_first), 1e-3);
    }
  }
}

// Several documents of different lengths on synthetic models of both RoPE styles: APE's
// logits for the query and three generated tokens (one of them decoded with the next in one
// call) equal the float64 reference of parallel encoding above, at T = S = 1 (plain parallel
// encoding) and at other temperatures and scales. A micro-batch smaller than the query covers
// chunked prefill. The same reference with the query right after all documents' slots
// instead (sequential positions) is far off: the test sees the positions.
TEST(ApeTest, SeveralDocumentsMatchFloat64ParallelEncoding) {
  for (const std::string arch : {"llama", "qwen2"}) {
    const Model& model = Synthetic(arch);
    const int nv = model.config().n_vocab;
    std::mt19937 rng(std::random_device{}());
    const auto prefix = RandomTokens(5, nv, rng);
    const std::vector<std::vector<TokenId>> doc_tokens = {
        RandomTokens(9, nv, rng), RandomTokens(4, nv, rng), RandomTokens(12, nv, rng)};
    const auto query = RandomTokens(7, nv, rng);
    const int p = static_cast<int>(prefix.size()), span = 12, d_all = 25;
    Engine engine(model,
                  EngineOptions{.threads = 2, .kv_type = KvType::kF32, .max_batch_tokens = 4});
    std::vector<SegmentKv> docs;
    for (const auto& d : doc_tokens) {
      auto seg = ComputeSegment(engine, prefix, d);
      ASSERT_TRUE(seg.ok()) << seg.status().ToString();
      docs.push_back(std::move(*seg));
    }
    const SegmentKv* doc_ptrs[] = {&docs[0], &docs[1], &docs[2]};
    for (const ApeOptions& o : {ApeOptions{.temperature = 1, .scale = 1}, ApeOptions{},
                                ApeOptions{.temperature = 0.6, .scale = 1.3}}) {
      SCOPED_TRACE(arch + " T=" + std::to_string(o.temperature) + " S=" + std::to_string(o.scale));
      auto seq = engine.NewSequence();
      std::vector<float> logits(nv);
      ApeState st;
      Status s = PrefillApe(engine, *seq, prefix, doc_ptrs, query, o, logits.data(), &st);
      ASSERT_TRUE(s.ok()) << s.ToString();
      EXPECT_EQ(st.doc_tokens, d_all);
      EXPECT_EQ(st.doc_span, span);
      std::vector<std::vector<float>> got = {logits};
      std::vector<TokenId> tail = query;
      // One token, then two in one call (the second's logits only), as a follow-up would.
      TokenId next = Argmax(logits);
      tail.push_back(next);
      ASSERT_TRUE(DecodeApe(engine, *seq, st, {&next, 1}, logits.data()).ok());
      got.push_back(logits);
      const TokenId two[] = {Argmax(logits), static_cast<TokenId>(rng() % nv)};
      tail.insert(tail.end(), two, two + 2);
      ASSERT_TRUE(DecodeApe(engine, *seq, st, two, logits.data()).ok());
      got.push_back(logits);
      EXPECT_EQ(seq->n_tokens(), p + d_all + static_cast<int64_t>(tail.size()));

      const auto want =
          ReferenceApe(model, prefix, doc_tokens, tail, o.temperature, o.scale, p + span);
      const size_t q = query.size();
      const size_t rows[] = {q - 1, q, q + 2};
      for (size_t i = 0; i < 3; ++i) {
        const double e = RelL2(got[i], want[rows[i]]);
        EXPECT_LT(e, 1e-4) << "query/generated token " << rows[i];
        std::printf("  %s T=%.1f S=%.1f token %zu: relative L2 vs float64 %.2e\n", arch.c_str(),
                    o.temperature, o.scale, rows[i], e);
      }
      if (o.temperature == 1 && o.scale == 1) {
        const auto sequential = ReferenceApe(model, prefix, doc_tokens, tail, 1, 1, p + d_all);
        const double e = RelL2(got[0], sequential[q - 1]);
        std::printf("  %s: relative L2 vs sequential positions %.2e\n", arch.c_str(), e);
        EXPECT_GT(e, 1e-3);
      }
    }
  }
}

TEST(ApeTest, RejectsBadInput) {
  const Model& model = Trained();
  const RagCase r = MakeRag(model);
  Engine engine(model, EngineOptions{.threads = 1, .kv_type = KvType::kF16});
  auto doc = ComputeSegment(engine, r.prefix, r.doc1);
  ASSERT_TRUE(doc.ok());
  const SegmentKv* good[] = {&*doc};
  auto expect_error = [&](std::span<const TokenId> prefix, std::span<const SegmentKv* const> docs,
                          std::span<const TokenId> query, ApeOptions o, const std::string& needle,
                          StatusCode code = StatusCode::kInvalidArgument, int64_t capacity = 0) {
    auto seq = engine.NewSequence(capacity);
    Status s = PrefillApe(engine, *seq, prefix, docs, query, o, nullptr, nullptr);
    EXPECT_EQ(s.code(), code) << needle << ": " << s.ToString();
    EXPECT_NE(s.ToString().find(needle), std::string::npos) << s.ToString();
    EXPECT_EQ(seq->n_tokens(), 0) << needle;
  };
  const auto& pre = r.prefix;
  const auto& qry = r.question;
  expect_error(pre, good, qry, ApeOptions{.temperature = 0}, "temperature");
  expect_error(pre, good, qry, ApeOptions{.temperature = std::nan("")}, "temperature");
  expect_error(pre, good, qry, ApeOptions{.scale = -0.5}, "scale");
  expect_error(pre, good, {}, ApeOptions{}, "query token");
  const std::vector<TokenId> bad_query = {1, model.config().n_vocab};
  expect_error(pre, good, bad_query, ApeOptions{}, "vocabulary");

  // Documents: none given, computed after a shorter context (another position), after another
  // context of the same length, with another KV type, or cut short.
  const SegmentKv* null_doc[] = {nullptr};
  expect_error(pre, null_doc, qry, ApeOptions{}, "no KV");
  auto after_bos = ComputeSegment(engine, std::span<const TokenId>(pre).first(1), r.doc1);
  ASSERT_TRUE(after_bos.ok());
  const SegmentKv* moved[] = {&*doc, &*after_bos};
  expect_error(pre, moved, qry, ApeOptions{}, "document 1 starts at position 1");
  std::vector<TokenId> other_prefix = pre;
  other_prefix.back() = (other_prefix.back() + 1) % model.config().n_vocab;
  expect_error(other_prefix, good, qry, ApeOptions{}, "another context");
  Engine f32_engine(model, EngineOptions{.threads = 1, .kv_type = KvType::kF32});
  auto f32_doc = ComputeSegment(f32_engine, pre, r.doc1);
  ASSERT_TRUE(f32_doc.ok());
  const SegmentKv* wrong_type[] = {&*f32_doc};
  expect_error(pre, wrong_type, qry, ApeOptions{}, "shape");
  SegmentKv cut = *doc;
  cut.v[2].resize(cut.v[2].size() - 1);
  const SegmentKv* cut_docs[] = {&cut};
  expect_error(pre, cut_docs, qry, ApeOptions{}, "layer 2");

  // Beyond the model's context (positions P + L + Q), or beyond the sequence's capacity.
  const int64_t room = model.config().n_ctx_train - pre.size() - r.doc1.size();
  const std::vector<TokenId> long_query(room + 1, qry[0]);
  expect_error(pre, good, long_query, ApeOptions{}, "context");
  expect_error(pre, good, qry, ApeOptions{}, "holds", StatusCode::kResourceExhausted,
               static_cast<int64_t>(pre.size() + r.doc1.size()));

  // A sequence holding more than the prefix.
  {
    auto seq = engine.NewSequence();
    ASSERT_TRUE(engine.Forward(*seq, Concat({pre, qry}), nullptr).ok());
    Status s = PrefillApe(engine, *seq, pre, good, qry, ApeOptions{}, nullptr, nullptr);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
    EXPECT_NE(s.ToString().find("more than"), std::string::npos) << s.ToString();
  }

  // DecodeApe: no tokens, a state from a longer sequence, bad options; the sequence is unchanged.
  auto seq = engine.NewSequence();
  ApeState st;
  ASSERT_TRUE(PrefillApe(engine, *seq, pre, good, qry, ApeOptions{}, nullptr, &st).ok());
  const int64_t n = seq->n_tokens();
  const TokenId one = qry[0];
  Status s = DecodeApe(engine, *seq, st, {}, nullptr);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.ToString().find("at least one token"), std::string::npos) << s.ToString();
  ApeState too_big = st;
  too_big.doc_tokens = n;
  s = DecodeApe(engine, *seq, too_big, {&one, 1}, nullptr);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.ToString().find("does not fit"), std::string::npos) << s.ToString();
  ApeState cold = st;
  cold.options.temperature = -1;
  s = DecodeApe(engine, *seq, cold, {&one, 1}, nullptr);
  EXPECT_NE(s.ToString().find("temperature"), std::string::npos) << s.ToString();
  EXPECT_EQ(seq->n_tokens(), n);
  EXPECT_TRUE(DecodeApe(engine, *seq, st, {&one, 1}, nullptr).ok());
  EXPECT_EQ(seq->n_tokens(), n + 1);
}

}  // namespace
}  // namespace cachette
