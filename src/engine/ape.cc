#include "engine/ape.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "core/check.h"

namespace cachette {
namespace {

Status CheckOptions(const ApeOptions& o) {
  if (!(o.temperature > 0) || !std::isfinite(o.temperature)) {
    return InvalidArgument("APE temperature must be positive and finite, got " +
                           std::to_string(o.temperature));
  }
  if (!(o.scale > 0) || !std::isfinite(o.scale)) {
    return InvalidArgument("APE scale must be positive and finite, got " + std::to_string(o.scale));
  }
  return Status::Ok();
}

Status CheckTokens(std::span<const TokenId> tokens, int n_vocab, const std::string& what) {
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= n_vocab) {
      return InvalidArgument(what + " token " + std::to_string(i) + " (id " +
                             std::to_string(tokens[i]) + ") is outside the vocabulary [0, " +
                             std::to_string(n_vocab) + ")");
    }
  }
  return Status::Ok();
}

// A sequence that was never compacted: every layer holds n_tokens() slots, slot == position
// for the slots the engine placed itself.
bool Uncompacted(const SequenceKv& kv, int n_layer) {
  if (kv.next_position() != kv.n_tokens()) return false;
  for (int l = 0; l < n_layer; ++l) {
    if (kv.layer_tokens(l) != kv.n_tokens()) return false;
  }
  return true;
}

// Computes `tokens` into the slots after kv's last one, at the positions `st` gives them, with
// APE's attention; the last token's logits into `logits` (may be null). The caller validated
// the tokens, the state and the context, and reserved the slots. Chunks of max_batch_tokens
// rows keep the layer buffers bounded; a chunk sees every earlier chunk in every layer.
void ForwardApe(Engine& engine, SequenceKv& kv, const ApeState& st, std::span<const TokenId> tokens,
                float* logits) {
  const ModelConfig& c = engine.model().config();
  const int64_t d = c.d_model, hd = c.head_dim;
  const int64_t p = st.prefix_tokens, doc_end = st.prefix_tokens + st.doc_tokens;
  // The engine's own score scale, so that at T = 1 the documents' part scores exactly as the
  // rest does.
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const float doc_scale = static_cast<float>(scale / st.options.temperature);
  const double lse_mult = st.options.scale * st.options.temperature;
  const int64_t chunk = engine.options().max_batch_tokens;
  std::vector<float> x;
  std::vector<int32_t> pos;
  // Per part: outputs [n][n_head][head_dim] and log-sum-exps [n][n_head].
  std::vector<float> o_doc, o_pre, o_qry, l_doc, l_pre, l_qry;
  for (size_t done = 0; done < tokens.size();) {
    const int64_t n = std::min<int64_t>(chunk, static_cast<int64_t>(tokens.size() - done));
    const int64_t s0 = kv.n_tokens();
    pos.resize(n);
    for (int64_t i = 0; i < n; ++i) pos[i] = static_cast<int32_t>(st.PositionOf(s0 + i));
    x.resize(n * d);
    engine.Embed(tokens.subspan(done, n), x.data());
    const size_t rows = static_cast<size_t>(n) * c.n_head;
    for (auto* o : {&o_doc, &o_pre, &o_qry}) o->resize(rows * hd);
    for (auto* l : {&l_doc, &l_pre, &l_qry}) l->resize(rows);
    const Engine::Run run{&kv, n, s0};
    auto attention = [&](int layer, const float* q, int64_t nq, float* out) {
      CT_CHECK_EQ(nq, n);
      const kernels::KvView view = kv.View(layer, s0 + n);
      ThreadPool& pool = engine.pool();
      // Documents: every one of their slots, scores / T. Prefix: all of it. Query and
      // generated tokens: causal, up to each row's own slot.
      kernels::AttentionLse(q, n, c.n_head, view, p, doc_end, -1, doc_scale, o_doc.data(),
                            l_doc.data(), pool);
      kernels::AttentionLse(q, n, c.n_head, view, 0, p, -1, scale, o_pre.data(), l_pre.data(),
                            pool);
      kernels::AttentionLse(q, n, c.n_head, view, doc_end, s0 + n, s0, scale, o_qry.data(),
                            l_qry.data(), pool);
      // Merge by weights e^(S T l_doc), e^(l_pre), e^(l_qry); the query part always holds the
      // row's own slot, so the largest exponent is finite. An empty part has -inf: weight 0.
      for (size_t r = 0; r < rows; ++r) {
        const double a = l_doc[r] * lse_mult, b = l_pre[r], cq = l_qry[r];
        const double m = std::max({a, b, cq});
        const double wa = std::exp(a - m), wb = std::exp(b - m), wc = std::exp(cq - m);
        const double inv = 1.0 / (wa + wb + wc);
        const float fa = static_cast<float>(wa * inv), fb = static_cast<float>(wb * inv),
                    fc = static_cast<float>(wc * inv);
        const size_t e0 = r * hd;
        for (int64_t e = 0; e < hd; ++e) {
          out[e0 + e] = fa * o_doc[e0 + e] + fb * o_pre[e0 + e] + fc * o_qry[e0 + e];
        }
      }
    };
    for (int layer = 0; layer < c.n_layer; ++layer) {
      engine.ForwardLayer(layer, x.data(), n, pos.data(), {&run, 1}, attention);
    }
    kv.Append(n);
    done += n;
    if (done == tokens.size() && logits != nullptr) {
      engine.RowLogits(x.data() + (n - 1) * d, logits);
    }
  }
}

}  // namespace

Status PrefillApe(Engine& engine, SequenceKv& kv, std::span<const TokenId> prefix,
                  std::span<const SegmentKv* const> docs, std::span<const TokenId> query,
                  const ApeOptions& options, float* logits, ApeState* state) {
  const ModelConfig& c = engine.model().config();
  const KvShape shape = engine.kv_shape();
  const size_t tb = shape.token_bytes();
  CT_RETURN_IF_ERROR(CheckKvRewritable(shape, "APE"));
  CT_RETURN_IF_ERROR(CheckOptions(options));
  if (query.empty()) return InvalidArgument("APE needs at least one query token");
  CT_RETURN_IF_ERROR(CheckTokens(prefix, c.n_vocab, "prefix"));
  CT_RETURN_IF_ERROR(CheckTokens(query, c.n_vocab, "query"));
  const int64_t p = static_cast<int64_t>(prefix.size());
  const int64_t n0 = kv.n_tokens();
  if (n0 > p) {
    return InvalidArgument("the sequence already holds " + std::to_string(n0) +
                           " tokens, more than the " + std::to_string(p) + "-token prefix");
  }
  if (!Uncompacted(kv, c.n_layer)) return InvalidArgument("the sequence has been compacted");
  const uint64_t context = ContextId(prefix);
  int64_t doc_tokens = 0, doc_span = 0;
  for (size_t i = 0; i < docs.size(); ++i) {
    const std::string where = "APE document " + std::to_string(i);
    const SegmentKv* doc = docs[i];
    if (doc == nullptr) return InvalidArgument(where + ": no KV");
    const int64_t len = static_cast<int64_t>(doc->tokens.size());
    if (len == 0) return InvalidArgument(where + ": no tokens");
    if (doc->base_pos != p) {
      return InvalidArgument(where + " starts at position " + std::to_string(doc->base_pos) +
                             ", not right after the " + std::to_string(p) + "-token prefix");
    }
    if (doc->context != context) {
      return InvalidArgument(where + " was computed after another context than this prefix");
    }
    const KvShape& ds = doc->shape;
    if (ds.n_layer != shape.n_layer || ds.n_kv_head != shape.n_kv_head ||
        ds.head_dim != shape.head_dim || ds.type != shape.type) {
      return InvalidArgument(where + ": its KV shape is not the engine's");
    }
    if (doc->k.size() != static_cast<size_t>(shape.n_layer) ||
        doc->v.size() != static_cast<size_t>(shape.n_layer)) {
      return InvalidArgument(where + ": its KV has " + std::to_string(doc->k.size()) +
                             " layers, not " + std::to_string(shape.n_layer));
    }
    for (int l = 0; l < shape.n_layer; ++l) {
      if (doc->k[l].size() != len * tb || doc->v[l].size() != len * tb) {
        return InvalidArgument(where + ": its KV in layer " + std::to_string(l) + " is not " +
                               std::to_string(len) + " tokens' worth");
      }
    }
    doc_tokens += len;
    doc_span = std::max(doc_span, len);
  }
  const int64_t n_query = static_cast<int64_t>(query.size());
  if (p + doc_span + n_query > c.n_ctx_train) {
    return InvalidArgument("APE positions reach " + std::to_string(p + doc_span + n_query) +
                           ", beyond the model's context of " + std::to_string(c.n_ctx_train));
  }
  CT_RETURN_IF_ERROR(kv.Reserve(p + doc_tokens + n_query));

  // The prefix's missing tokens, causally; then the documents' KV as it is (each was computed
  // after this prefix, so its keys already sit at positions P, P + 1, ...).
  if (n0 < p) CT_RETURN_IF_ERROR(engine.Forward(kv, prefix.subspan(n0), nullptr));
  int64_t at = p;
  for (const SegmentKv* doc : docs) {
    const int64_t len = static_cast<int64_t>(doc->tokens.size());
    for (int l = 0; l < shape.n_layer; ++l) {
      for (int64_t t = 0; t < len; ++t) {
        std::memcpy(kv.KSlot(l, at + t), doc->k[l].data() + t * tb, tb);
        std::memcpy(kv.VSlot(l, at + t), doc->v[l].data() + t * tb, tb);
      }
    }
    at += len;
  }
  if (doc_tokens > 0) kv.Append(doc_tokens);

  ApeState st;
  st.prefix_tokens = p;
  st.doc_tokens = doc_tokens;
  st.doc_span = doc_span;
  st.options = options;
  ForwardApe(engine, kv, st, query, logits);
  if (state != nullptr) *state = st;
  return Status::Ok();
}

Status DecodeApe(Engine& engine, SequenceKv& kv, const ApeState& state,
                 std::span<const TokenId> tokens, float* logits) {
  const ModelConfig& c = engine.model().config();
  CT_RETURN_IF_ERROR(CheckOptions(state.options));
  if (tokens.empty()) return InvalidArgument("APE decode needs at least one token");
  CT_RETURN_IF_ERROR(CheckTokens(tokens, c.n_vocab, "decode"));
  const int64_t n = kv.n_tokens();
  const int64_t p = state.prefix_tokens, dt = state.doc_tokens, span = state.doc_span;
  if (p < 0 || dt < 0 || span < 0 || span > dt || n < p + dt + 1 || !Uncompacted(kv, c.n_layer)) {
    return InvalidArgument("the APE state (prefix " + std::to_string(p) + ", documents " +
                           std::to_string(dt) + " slots spanning " + std::to_string(span) +
                           ") does not fit a sequence of " + std::to_string(n) + " slots");
  }
  const int64_t count = static_cast<int64_t>(tokens.size());
  if (state.PositionOf(n) + count > c.n_ctx_train) {
    return InvalidArgument("APE positions reach " + std::to_string(state.PositionOf(n) + count) +
                           ", beyond the model's context of " + std::to_string(c.n_ctx_train));
  }
  CT_RETURN_IF_ERROR(kv.Reserve(n + count));
  ForwardApe(engine, kv, state, tokens, logits);
  return Status::Ok();
}

}  // namespace cachette
