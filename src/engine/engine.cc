#include "engine/engine.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <span>
#include <string>
#include <unordered_set>

#include "core/check.h"

namespace cachette {

namespace {

// A float buffer that grows and never shrinks (activations are reused across steps).
class Buffer {
 public:
  float* Get(size_t n) {
    if (n > size_) {
      data_ = std::make_unique<float[]>(n);
      size_ = n;
    }
    return data_.get();
  }

 private:
  std::unique_ptr<float[]> data_;
  size_t size_ = 0;
};

}  // namespace

struct Engine::Scratch {
  Buffer x, h, q, k, v, att, gate, up, logits_rows, logits;
  std::vector<int32_t> pos;
  std::vector<int64_t> logit_rows;  // which rows of this micro-batch need logits
  std::vector<int64_t> stat_rows;   // rows feeding an item's attention statistics
};

Engine::Engine(const Model& model, const EngineOptions& options)
    : model_(model),
      options_(options),
      pool_(std::make_unique<ThreadPool>(options.threads)),
      scratch_(std::make_unique<Scratch>()) {
  CT_CHECK(options_.max_batch_tokens > 0);
}

Engine::~Engine() = default;

KvShape Engine::kv_shape() const { return kv_shape(options_.kv_type); }

KvShape Engine::kv_shape(kernels::KvType type) const {
  const ModelConfig& c = model_.config();
  const bool kivi = type == kernels::KvType::kKivi4;
  const int recent = options_.kv_recent >= 0 ? options_.kv_recent : kivi ? kDefaultKiviRecent : 0;
  return KvShape{c.n_layer, c.n_kv_head, c.head_dim, type, recent};
}

std::unique_ptr<ContiguousKv> Engine::NewSequence(int64_t capacity) const {
  if (capacity <= 0) capacity = model_.config().n_ctx_train;
  return std::make_unique<ContiguousKv>(kv_shape(), capacity);
}

Status Engine::Forward(SequenceKv& kv, std::span<const TokenId> tokens, float* logits) {
  Item item{&kv, tokens, logits ? Logits::kLast : Logits::kNone, logits};
  return Forward(std::span<Item>(&item, 1));
}

Status Engine::CheckTokens(const SequenceKv& kv, std::span<const TokenId> tokens,
                           const std::string& where) const {
  const ModelConfig& c = model_.config();
  for (TokenId t : tokens) {
    if (t < 0 || t >= c.n_vocab) {
      return InvalidArgument(where + ": token id " + std::to_string(t) +
                             " is outside the vocabulary [0, " + std::to_string(c.n_vocab) + ")");
    }
  }
  const int64_t last_pos = kv.next_position() + static_cast<int64_t>(tokens.size());
  if (last_pos > c.n_ctx_train) {
    return InvalidArgument(where + ": " + std::to_string(last_pos) +
                           " tokens exceed the model's context of " +
                           std::to_string(c.n_ctx_train));
  }
  return Status::Ok();
}

void Engine::SizeStats(const SequenceKv& kv, AttentionStats* stats) const {
  const ModelConfig& c = model_.config();
  if (stats != nullptr && (stats->capacity != kv.capacity() || stats->n_layer != c.n_layer)) {
    stats->Resize(c.n_layer, c.n_kv_head, kv.capacity());
  }
}

void Engine::AddStats(AttentionStats* stats, int layer, int64_t total, int64_t begin,
                      int64_t count, int64_t row0, int64_t slot0, const kernels::KvView& view,
                      const float* q) {
  if (stats == nullptr || (stats->window == 0 && !stats->cumulative)) return;
  const ModelConfig& c = model_.config();
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  std::vector<int64_t>& rows = scratch_->stat_rows;
  // Rows feeding the statistics: all of them for cumulative sums, otherwise those among the
  // item's last `window` tokens.
  const int64_t first_win = total - stats->window;
  rows.clear();
  bool any_window = false;
  for (int64_t j = 0; j < count; ++j) {
    const bool in_window = stats->window > 0 && begin + j >= first_win;
    any_window |= in_window;
    if (in_window || stats->cumulative) rows.push_back(row0 + j);
  }
  if (rows.empty()) return;
  // Window rows are a suffix of the slice: accumulate the cumulative sums over every row, then
  // the window sums over the suffix.
  if (stats->cumulative) {
    AccumulateAttention(q, c.n_head, rows, row0, slot0, view, scale, layer, false, true, *stats,
                        *pool_);
  }
  if (any_window) {
    std::vector<int64_t> win;
    for (int64_t row : rows) {
      if (begin + (row - row0) >= first_win) win.push_back(row);
    }
    AccumulateAttention(q, c.n_head, win, row0, slot0, view, scale, layer, true, false, *stats,
                        *pool_);
  }
}

Status Engine::ForwardLayerMajor(SequenceKv& kv, std::span<const TokenId> tokens, float* logits,
                                 AttentionStats* stats,
                                 const std::function<Status(int layer)>& after_layer) {
  CT_ASSIGN_OR_RETURN(auto pass, LayerPass::Start(*this, kv, tokens, stats));
  return pass->Run(model_.config().n_layer, after_layer, logits);
}

Result<std::unique_ptr<Engine::LayerPass>> Engine::LayerPass::Start(
    Engine& engine, SequenceKv& kv, std::span<const TokenId> tokens, AttentionStats* stats) {
  if (tokens.empty()) return InvalidArgument("layer-major pass: no tokens");
  CT_RETURN_IF_ERROR(engine.CheckTokens(kv, tokens, "layer-major pass"));
  engine.SizeStats(kv, stats);
  std::unique_ptr<LayerPass> p(new LayerPass(engine, kv, stats));
  const int64_t n = static_cast<int64_t>(tokens.size());
  p->x_.resize(static_cast<size_t>(n * engine.model_.config().d_model));
  p->pos_.resize(static_cast<size_t>(n));
  const int64_t pos0 = kv.next_position();
  for (int64_t j = 0; j < n; ++j) p->pos_[j] = static_cast<int32_t>(pos0 + j);
  engine.Embed(tokens, p->x_.data());
  return p;
}

bool Engine::LayerPass::done() const { return next_ == engine_.model_.config().n_layer; }

Status Engine::LayerPass::Run(int layers, const std::function<Status(int layer)>& after_layer,
                              float* logits) {
  Engine& e = engine_;
  const ModelConfig& c = e.model_.config();
  const int64_t n = static_cast<int64_t>(pos_.size());
  const int64_t d = c.d_model;
  const int64_t step = std::max<int64_t>(1, e.options_.max_batch_tokens);
  for (int k = 0; k < std::max(1, layers) && !done(); ++k) {
    const int layer = next_;
    CT_RETURN_IF_ERROR(kv_.ReserveLayer(layer, n).WithContext("layer-major pass"));
    const int64_t base = kv_.layer_tokens(layer);
    // Micro-batches of the layer: each attends to the slots the earlier ones stored.
    for (int64_t b = 0; b < n; b += step) {
      const int64_t m = std::min(step, n - b);
      const Engine::Run run{&kv_, m, base + b};
      auto after = [&](size_t, int64_t slot0, const kernels::KvView& view, const float* q) {
        e.AddStats(stats_, layer, n, b, m, 0, slot0, view, q);
      };
      e.RunLayer(layer, x_.data() + b * d, m, pos_.data() + b,
                 std::span<const Engine::Run>(&run, 1), after);
    }
    kv_.AppendLayer(layer, n);
    ++next_;
    if (after_layer) CT_RETURN_IF_ERROR(after_layer(layer));
  }
  if (done()) {
    kv_.AppendPositions(n);
    if (logits != nullptr) e.RowLogits(x_.data() + (n - 1) * d, logits);
    x_ = std::vector<float>();
  }
  return Status::Ok();
}

Status Engine::Forward(std::span<Item> batch) {
  std::unordered_set<SequenceKv*> seen;
  for (size_t i = 0; i < batch.size(); ++i) {
    const Item& it = batch[i];
    const std::string where = "batch item " + std::to_string(i);
    if (it.kv == nullptr) return InvalidArgument(where + ": no KV cache");
    if (!seen.insert(it.kv).second) return InvalidArgument(where + ": sequence appears twice");
    if (it.tokens.empty()) return InvalidArgument(where + ": no tokens");
    if (it.logits != Logits::kNone && it.logits_out == nullptr) {
      return InvalidArgument(where + ": logits requested without an output buffer");
    }
    CT_RETURN_IF_ERROR(CheckTokens(*it.kv, it.tokens, where));
    const int64_t n_new = static_cast<int64_t>(it.tokens.size());
    CT_RETURN_IF_ERROR(it.kv->Reserve(it.kv->n_tokens() + n_new).WithContext(where));
    SizeStats(*it.kv, it.stats);
  }
  // Split into micro-batches of at most max_batch_tokens, taking items in order and chunking
  // long ones. begin[i]/count[i]: the slice of item i's tokens in this micro-batch.
  std::vector<int64_t> done(batch.size(), 0);
  std::vector<int64_t> begin(batch.size()), count(batch.size());
  for (;;) {
    int64_t budget = options_.max_batch_tokens;
    bool any = false;
    for (size_t i = 0; i < batch.size(); ++i) {
      const int64_t left = static_cast<int64_t>(batch[i].tokens.size()) - done[i];
      const int64_t take = std::min(left, budget);
      begin[i] = done[i];
      count[i] = take;
      budget -= take;
      any |= take > 0;
    }
    if (!any) break;
    CT_RETURN_IF_ERROR(ForwardMicroBatch(batch, begin, count));
    for (size_t i = 0; i < batch.size(); ++i) done[i] += count[i];
  }
  return Status::Ok();
}

Status Engine::ForwardMicroBatch(std::span<Item> batch, const std::vector<int64_t>& begin,
                                 const std::vector<int64_t>& count) {
  const ModelConfig& c = model_.config();
  const int64_t d = c.d_model;
  Scratch& s = *scratch_;
  ThreadPool& pool = *pool_;

  int64_t n = 0;
  for (size_t i = 0; i < batch.size(); ++i) n += count[i];
  float* x = s.x.Get(n * d);  // [n][d] residual stream
  s.pos.resize(n);

  // Rows of the micro-batch in item order; pos0[i] = RoPE position of item i's first new
  // row, slot0 = its slot in the layer at hand.
  std::vector<int64_t> row0(batch.size()), pos0(batch.size());
  int64_t r = 0;
  for (size_t i = 0; i < batch.size(); ++i) {
    row0[i] = r;
    pos0[i] = batch[i].kv->next_position();
    Embed(batch[i].tokens.subspan(begin[i], count[i]), x + r * d);
    for (int64_t j = 0; j < count[i]; ++j, ++r) s.pos[r] = static_cast<int32_t>(pos0[i] + j);
  }

  std::vector<Run> runs(batch.size());
  for (size_t i = 0; i < batch.size(); ++i) runs[i] = Run{batch[i].kv, count[i], -1};
  for (int layer = 0; layer < c.n_layer; ++layer) {
    // Attention statistics for a KV budget policy, after each item's attention.
    auto stats = [&](size_t i, int64_t slot0, const kernels::KvView& view, const float* q) {
      const Item& it = batch[i];
      AddStats(it.stats, layer, static_cast<int64_t>(it.tokens.size()), begin[i], count[i],
               row0[i], slot0, view, q);
    };
    RunLayer(layer, x, n, s.pos.data(), runs, stats);
  }

  // Logits only for the rows that asked for them: the final norm and the vocabulary
  // projection are the most expensive matmul per row.
  s.logit_rows.clear();
  for (size_t i = 0; i < batch.size(); ++i) {
    if (count[i] == 0) continue;
    const Item& it = batch[i];
    const bool last_chunk = begin[i] + count[i] == static_cast<int64_t>(it.tokens.size());
    if (it.logits == Logits::kAll) {
      for (int64_t j = 0; j < count[i]; ++j) s.logit_rows.push_back(row0[i] + j);
    } else if (it.logits == Logits::kLast && last_chunk) {
      s.logit_rows.push_back(row0[i] + count[i] - 1);
    }
  }
  if (!s.logit_rows.empty()) {
    const int64_t nr = static_cast<int64_t>(s.logit_rows.size());
    float* rows = s.logits_rows.Get(nr * d);
    for (int64_t j = 0; j < nr; ++j) {
      kernels::RmsNorm(x + s.logit_rows[j] * d, model_.output_norm(), rows + j * d, 1, d,
                       c.norm_eps);
    }
    const int64_t nv = c.n_vocab;
    float* out = s.logits.Get(nr * nv);
    kernels::MatMul(rows, nr, model_.output(), out, pool);
    int64_t j = 0;
    for (size_t i = 0; i < batch.size(); ++i) {
      if (count[i] == 0) continue;
      const Item& it = batch[i];
      const bool last_chunk = begin[i] + count[i] == static_cast<int64_t>(it.tokens.size());
      if (it.logits == Logits::kAll) {
        std::memcpy(it.logits_out + begin[i] * nv, out + j * nv, count[i] * nv * sizeof(float));
        j += count[i];
      } else if (it.logits == Logits::kLast && last_chunk) {
        std::memcpy(it.logits_out, out + j * nv, nv * sizeof(float));
        j += 1;
      }
    }
  }
  for (size_t i = 0; i < batch.size(); ++i) {
    if (count[i] > 0) batch[i].kv->Append(count[i]);
  }
  return Status::Ok();
}

void Engine::RunLayer(int layer, float* x, int64_t n, const int32_t* pos,
                      std::span<const Run> runs, const AfterAttention& after_attention,
                      const AttentionFn& attention) {
  const ModelConfig& c = model_.config();
  const int64_t d = c.d_model, qd = c.q_dim(), kvd = c.kv_dim(), ff = c.d_ff;
  Scratch& s = *scratch_;
  ThreadPool& pool = *pool_;
  float* h = s.h.Get(n * d);       // [n][d] normalized
  float* q = s.q.Get(n * qd);      // [n][n_head][head_dim]
  float* k = s.k.Get(n * kvd);     // [n][n_kv_head][head_dim]
  float* v = s.v.Get(n * kvd);     // [n][n_kv_head][head_dim]
  float* att = s.att.Get(n * qd);  // [n][n_head][head_dim]
  float* gate = s.gate.Get(n * ff);
  float* up = s.up.Get(n * ff);
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));

  const LayerWeights& w = model_.layers()[layer];
  kernels::RmsNorm(x, w.attn_norm, h, n, d, c.norm_eps);
  Project(layer, h, n, pos, q, k, v);
  // Each run's rows start at its slot0: the layer's slot count unless the caller placed it.
  std::vector<int64_t> row0(runs.size()), slot0(runs.size());
  int64_t r = 0;
  for (size_t i = 0; i < runs.size(); ++i) {
    row0[i] = r;
    slot0[i] = runs[i].slot0 >= 0 ? runs[i].slot0 : runs[i].kv->layer_tokens(layer);
    r += runs[i].count;
  }
  CT_CHECK_EQ(r, n);
  for (size_t i = 0; i < runs.size(); ++i) {
    SequenceKv& kv = *runs[i].kv;
    // New K/V go in the sequence's own write type: its pool's (a server may hold two,
    // --session-kv-type), f16 for a window's newest tokens (KvWindow).
    const kernels::KvType kv_type = kv.shape().write_type();
    for (int64_t j = 0; j < runs[i].count; ++j) {
      const int64_t row = row0[i] + j;
      kernels::StoreKv(k + row * kvd, c.n_kv_head, c.head_dim, kv_type,
                       kv.KWrite(layer, slot0[i] + j));
      kernels::StoreKv(v + row * kvd, c.n_kv_head, c.head_dim, kv_type,
                       kv.VWrite(layer, slot0[i] + j));
    }
  }
  if (attention) {
    attention(layer, q, n, att);
  } else {
    for (size_t i = 0; i < runs.size(); ++i) {
      if (runs[i].count == 0) continue;
      const kernels::KvView view = runs[i].kv->View(layer, slot0[i] + runs[i].count);
      kernels::Attention(q + row0[i] * qd, runs[i].count, c.n_head, slot0[i], view, scale,
                         att + row0[i] * qd, pool);
      if (after_attention) after_attention(i, slot0[i], view, q);
    }
  }
  kernels::MatMul(att, n, w.wo, h, pool);
  kernels::Add(h, x, n * d);
  kernels::RmsNorm(x, w.ffn_norm, h, n, d, c.norm_eps);
  const kernels::WeightMatrix* gate_up[] = {&w.w_gate, &w.w_up};
  float* gate_up_out[] = {gate, up};
  kernels::MatMulGroup(h, n, gate_up, gate_up_out, pool);
  kernels::SwiGlu(gate, up, gate, n * ff);
  kernels::MatMul(gate, n, w.w_down, h, pool);
  kernels::Add(h, x, n * d);
}

void Engine::Project(int layer, const float* h, int64_t n, const int32_t* pos, float* q, float* k,
                     float* v) {
  const ModelConfig& c = model_.config();
  const int64_t qd = c.q_dim(), kvd = c.kv_dim();
  const LayerWeights& w = model_.layers()[layer];
  const kernels::WeightMatrix* ws[] = {&w.wq, &w.wk, &w.wv};
  float* ys[] = {q, k, v};
  const size_t first = q == nullptr ? 1 : 0;  // K and V only
  kernels::MatMulGroup(h, n, std::span(ws).subspan(first), std::span(ys).subspan(first), *pool_);
  if (w.bq != nullptr) {
    for (int64_t t = 0; t < n; ++t) {
      if (q != nullptr) kernels::Add(w.bq, q + t * qd, qd);
      kernels::Add(w.bk, k + t * kvd, kvd);
      kernels::Add(w.bv, v + t * kvd, kvd);
    }
  }
  if (q != nullptr) kernels::Rope(q, n, c.n_head, pos, c.rope);
  kernels::Rope(k, n, c.n_kv_head, pos, c.rope);
}

void Engine::ProjectKv(int layer, const float* x, int64_t n, const int32_t* pos, float* k,
                       float* v) {
  const ModelConfig& c = model_.config();
  CT_CHECK(layer >= 0 && layer < c.n_layer);
  float* h = scratch_->h.Get(n * c.d_model);
  kernels::RmsNorm(x, model_.layers()[layer].attn_norm, h, n, c.d_model, c.norm_eps);
  Project(layer, h, n, pos, nullptr, k, v);
}

void Engine::ForwardLayer(int layer, float* x, int64_t n, const int32_t* pos,
                          std::span<const Run> runs, const AttentionFn& attention) {
  CT_CHECK(layer >= 0 && layer < model_.config().n_layer);
  for (const Run& run : runs) {
    CT_CHECK(run.kv != nullptr && run.count >= 0 && run.slot0 >= 0);
  }
  RunLayer(layer, x, n, pos, runs, nullptr, attention);
}

void Engine::Embed(std::span<const TokenId> tokens, float* x) const {
  const int64_t d = model_.config().d_model;
  for (size_t r = 0; r < tokens.size(); ++r) {
    CT_CHECK(tokens[r] >= 0 && tokens[r] < model_.config().n_vocab);
    kernels::DequantizeRow(model_.tok_embd(), tokens[r], x + r * d);
  }
}

void Engine::RowLogits(const float* x_row, float* logits) {
  const ModelConfig& c = model_.config();
  float* row = scratch_->logits_rows.Get(c.d_model);
  kernels::RmsNorm(x_row, model_.output_norm(), row, 1, c.d_model, c.norm_eps);
  kernels::MatMul(row, 1, model_.output(), logits, *pool_);
}

}  // namespace cachette
