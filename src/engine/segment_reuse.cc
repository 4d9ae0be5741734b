#include "engine/segment_reuse.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <numeric>
#include <string>

#include "core/check.h"
#include "core/hash.h"

namespace cachette {

void RotateStoredKeys(void* k, int64_t n_tok, const KvShape& shape, int64_t delta,
                      const kernels::RopeParams& rope) {
  if (delta == 0 || n_tok == 0) return;
  CT_CHECK(delta >= INT32_MIN && delta <= INT32_MAX) << "rotation by " << delta;
  const int64_t n_vec = n_tok * shape.n_kv_head;
  std::vector<float> f(n_vec * shape.head_dim);
  // One Rope call with every token at position delta: the angles are computed once.
  const std::vector<int32_t> pos(n_tok, static_cast<int32_t>(delta));
  kernels::LoadKv(k, n_vec, shape.head_dim, shape.type, f.data());
  kernels::Rope(f.data(), n_tok, shape.n_kv_head, pos.data(), rope);
  kernels::StoreKv(f.data(), n_vec, shape.head_dim, shape.type, k);
}

uint64_t ContextId(std::span<const TokenId> tokens) {
  if (tokens.empty()) return 0;
  return Hash64(ByteSpan(reinterpret_cast<const std::byte*>(tokens.data()),
                         tokens.size() * sizeof(TokenId)));
}

size_t SegmentKv::bytes() const {
  size_t n = 0;
  for (const auto& b : k) n += b.size();
  for (const auto& b : v) n += b.size();
  return n;
}

namespace {

// Adds to inter[i] the attention mass that row i (slot ctx + i, query q[i]) gives to slots
// [0, ctx), summed over query heads: exp(lse over the context - lse over all it attends to).
void AddInterAttention(const float* q, int64_t n, int64_t ctx, const kernels::KvView& view,
                       int n_head, float scale, std::vector<double>& inter, ThreadPool& pool) {
  std::vector<float> out(n * n_head * view.head_dim), lse_ctx(n * n_head), lse_all(n * n_head);
  kernels::AttentionLse(q, n, n_head, view, 0, ctx, -1, scale, out.data(), lse_ctx.data(), pool);
  kernels::AttentionLse(q, n, n_head, view, 0, ctx + n, ctx, scale, out.data(), lse_all.data(),
                        pool);
  for (int64_t i = 0; i < n; ++i) {
    for (int h = 0; h < n_head; ++h) {
      inter[i] += std::exp(static_cast<double>(lse_ctx[i * n_head + h]) - lse_all[i * n_head + h]);
    }
  }
}

}  // namespace

Result<SegmentKv> ComputeSegment(Engine& engine, std::span<const TokenId> context,
                                 std::span<const TokenId> tokens,
                                 std::span<const uint64_t> context_chunks) {
  if (tokens.empty()) return InvalidArgument("segment: no tokens");
  CT_RETURN_IF_ERROR(CheckKvRewritable(engine.kv_shape(), "segment reuse"));
  const ModelConfig& c = engine.model().config();
  const int64_t n_ctx = static_cast<int64_t>(context.size());
  const int64_t n = static_cast<int64_t>(tokens.size());
  for (TokenId t : tokens) {
    if (t < 0 || t >= c.n_vocab) {
      return InvalidArgument("segment: token id " + std::to_string(t) +
                             " is outside the vocabulary");
    }
  }
  if (n_ctx + n > c.n_ctx_train) {
    return InvalidArgument("segment: " + std::to_string(n_ctx + n) +
                           " tokens exceed the model's context of " +
                           std::to_string(c.n_ctx_train));
  }
  auto seq = engine.NewSequence(n_ctx + n);
  if (n_ctx > 0) CT_RETURN_IF_ERROR(engine.Forward(*seq, context, nullptr));
  SegmentKv seg;
  seg.tokens.assign(tokens.begin(), tokens.end());
  seg.base_pos = n_ctx;
  seg.context = ContextId(context);
  seg.context_chunks.assign(context_chunks.begin(), context_chunks.end());
  seg.shape = engine.kv_shape();
  if (n_ctx == 0) {
    CT_RETURN_IF_ERROR(engine.Forward(*seq, tokens, nullptr));
  } else {
    // A layer at a time, the attention kernel's output as in Forward() plus the profile.
    CT_RETURN_IF_ERROR(seq->Reserve(n_ctx + n));
    std::vector<float> x(n * c.d_model);
    engine.Embed(tokens, x.data());
    std::vector<int32_t> pos(n);
    std::iota(pos.begin(), pos.end(), static_cast<int32_t>(n_ctx));
    const Engine::Run run{seq.get(), n, n_ctx};
    const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
    std::vector<double> inter(n, 0.0);
    double odds = 0;  // sum over layers of inter / intra mass
    for (int l = 0; l < c.n_layer; ++l) {
      std::vector<double> layer_inter(n, 0.0);
      engine.ForwardLayer(
          l, x.data(), n, pos.data(), {&run, 1},
          [&](int layer, const float* q, int64_t m, float* out) {
            const kernels::KvView view = seq->View(layer, n_ctx + n);
            kernels::Attention(q, m, c.n_head, n_ctx, view, scale, out, engine.pool());
            AddInterAttention(q, m, n_ctx, view, c.n_head, scale, layer_inter, engine.pool());
          });
      double a = 0;
      for (int64_t i = 0; i < n; ++i) {
        inter[i] += layer_inter[i];
        a += layer_inter[i];
      }
      a /= static_cast<double>(n) * c.n_head;
      odds += a / std::max(1.0 - a, 1e-9);
    }
    seq->Append(n);
    seg.inter.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      seg.inter[i] = static_cast<float>(inter[i] / (static_cast<double>(c.n_layer) * c.n_head));
    }
    seg.cci = 1.0 / (1.0 + std::exp(-odds / c.n_layer));
  }
  CopySegmentKv(*seq, n_ctx, n_ctx + n, seg);
  return seg;
}

void CopySegmentKv(SequenceKv& kv, int64_t begin, int64_t end, SegmentKv& seg) {
  const size_t tb = seg.shape.token_bytes();
  seg.k.assign(seg.shape.n_layer, {});
  seg.v.assign(seg.shape.n_layer, {});
  for (int l = 0; l < seg.shape.n_layer; ++l) {
    seg.k[l].resize((end - begin) * tb);
    seg.v[l].resize((end - begin) * tb);
    for (int64_t t = begin; t < end; ++t) {
      std::memcpy(seg.k[l].data() + (t - begin) * tb, kv.KSlot(l, t), tb);
      std::memcpy(seg.v[l].data() + (t - begin) * tb, kv.VSlot(l, t), tb);
    }
  }
}

double CacheCraftShare(const SegmentKv& seg, std::span<const uint64_t> chunks_before,
                       double alpha) {
  const auto& old = seg.context_chunks;
  double beta = 0, gamma = 0;
  if (!old.empty()) {
    // The old context's chunks found now, in their new order.
    std::vector<size_t> new_rank_of_old;  // for each common chunk in old order: its new index
    for (uint64_t id : old) {
      auto it = std::find(chunks_before.begin(), chunks_before.end(), id);
      if (it != chunks_before.end()) new_rank_of_old.push_back(it - chunks_before.begin());
    }
    const size_t k = new_rank_of_old.size();
    beta = static_cast<double>(k) / old.size();
    if (k >= 2) {
      int64_t discordant = 0;
      for (size_t i = 0; i < k; ++i) {
        for (size_t j = i + 1; j < k; ++j) discordant += new_rank_of_old[i] > new_rank_of_old[j];
      }
      gamma = static_cast<double>(discordant) / (k * (k - 1) / 2);
    }
  }
  const double beta_adj = beta * (1 - gamma);
  return std::clamp(alpha * seg.cci * (1 - beta_adj), 0.0, 1.0);
}

std::string_view ReuseModeName(ReuseMode mode) {
  switch (mode) {
    case ReuseMode::kFull: return "full";
    case ReuseMode::kPrefix: return "prefix";
    case ReuseMode::kNaive: return "naive";
    case ReuseMode::kBlend: return "blend";
    case ReuseMode::kCacheCraft: return "cachecraft";
    case ReuseMode::kApe: return "ape";
  }
  return "?";
}

Result<ReuseMode> ParseReuseMode(std::string_view name) {
  for (ReuseMode m : {ReuseMode::kFull, ReuseMode::kPrefix, ReuseMode::kNaive, ReuseMode::kBlend,
                      ReuseMode::kCacheCraft, ReuseMode::kApe}) {
    if (name == ReuseModeName(m)) return m;
  }
  return InvalidArgument("unknown KV reuse mode '" + std::string(name) +
                         "' (expected full, prefix, naive, blend, cachecraft or ape)");
}

std::string_view CraftChoiceName(CraftChoice choice) {
  return choice == CraftChoice::kStored ? "stored" : "prompt";
}

Result<CraftChoice> ParseCraftChoice(std::string_view name) {
  for (CraftChoice c : {CraftChoice::kStored, CraftChoice::kPrompt}) {
    if (name == CraftChoiceName(c)) return c;
  }
  return InvalidArgument("unknown Cache-Craft token choice '" + std::string(name) +
                         "' (expected stored or prompt)");
}

namespace {

// The rows a layer-at-a-time pass computes: prompt positions (slot == position), ascending.
struct Rows {
  std::vector<int64_t> at;
  std::vector<int32_t> pos;
  std::vector<Engine::Run> runs;

  void Build(SequenceKv& kv) {
    pos.assign(at.begin(), at.end());
    runs.clear();
    for (size_t i = 0; i < at.size(); ++i) {
      if (i > 0 && at[i] == at[i - 1] + 1) {
        ++runs.back().count;
      } else {
        runs.push_back(Engine::Run{&kv, 1, at[i]});
      }
    }
  }
};

// A placed segment whose tokens Cache-Craft chooses in the prompt (CraftChoice::kPrompt).
struct CraftPart {
  int64_t at = 0;         // its first slot
  int64_t count = 0;      // its placed tokens
  int64_t redo = 0;       // how many of them to recompute (CacheCraftShare)
  int64_t new_begin = 0;  // its new context: slots [new_begin, at)
};

// Marks with 2 the `redo` entries of `placed` [score.size()] of largest score (the first of
// equal ones).
void MarkLargest(std::span<const float> score, int64_t redo, char* placed) {
  std::vector<int64_t> order(score.size());
  std::iota(order.begin(), order.end(), 0);
  redo = std::min<int64_t>(redo, order.size());
  std::partial_sort(order.begin(), order.begin() + redo, order.end(), [&](int64_t a, int64_t b) {
    return score[a] != score[b] ? score[a] > score[b] : a < b;
  });
  for (int64_t j = 0; j < redo; ++j) placed[order[j]] = 2;
}

// The attention mass [part.count] that each of the part's rows (queries q [count][n_head]
// [head_dim], RoPE applied; row i in slot part.at + i) gives to its new context, summed over
// query heads. From the log-sum-exps over the new context [new_begin, at) and over the rest it
// attends to, its old context [0, new_begin) and its own segment up to itself: the new
// context's share is 1 / (1 + exp(lse rest - lse new)).
std::vector<float> NewContextAttention(const float* q, const CraftPart& part,
                                       const kernels::KvView& view, int n_head, float scale,
                                       ThreadPool& pool) {
  const int64_t m = part.count;
  std::vector<float> out(m * n_head * view.head_dim), lse_new(m * n_head), lse_old(m * n_head),
      lse_own(m * n_head);
  kernels::AttentionLse(q, m, n_head, view, part.new_begin, part.at, -1, scale, out.data(),
                        lse_new.data(), pool);
  kernels::AttentionLse(q, m, n_head, view, 0, part.new_begin, -1, scale, out.data(),
                        lse_old.data(), pool);
  kernels::AttentionLse(q, m, n_head, view, part.at, part.at + m, part.at, scale, out.data(),
                        lse_own.data(), pool);
  std::vector<float> mass(m, 0.0f);
  for (int64_t i = 0; i < m; ++i) {
    double sum = 0;
    for (int h = 0; h < n_head; ++h) {
      const int64_t j = i * n_head + h;
      // The own range holds the row itself, so lse_rest is finite; lse_new may be -inf.
      const double hi = std::max(lse_old[j], lse_own[j]);
      const double lse_rest =
          hi + std::log(std::exp(lse_old[j] - hi) + std::exp(lse_own[j] - hi));
      sum += 1.0 / (1.0 + std::exp(lse_rest - lse_new[j]));
    }
    mass[i] = static_cast<float>(sum);
  }
  return mass;
}

// Keeps the rows `keep` (indices into rows.at, ascending) and their residual rows of x.
void KeepRows(Rows& rows, const std::vector<size_t>& keep, std::vector<float>& x, int64_t d,
              SequenceKv& kv) {
  for (size_t j = 0; j < keep.size(); ++j) {
    rows.at[j] = rows.at[keep[j]];
    if (j != keep[j]) {
      std::memmove(x.data() + j * d, x.data() + keep[j] * d, d * sizeof(float));
    }
  }
  rows.at.resize(keep.size());
  x.resize(keep.size() * d);
  rows.Build(kv);
}

}  // namespace

Status PrefillWithSegments(Engine& engine, SequenceKv& kv, std::span<const TokenId> prompt,
                           std::span<const SegmentUse> segments, const ReuseOptions& options,
                           float* logits, ReuseReport* report,
                           const SegmentLoad* load) {
  const ModelConfig& c = engine.model().config();
  const KvShape shape = engine.kv_shape();
  CT_RETURN_IF_ERROR(CheckKvRewritable(shape, "segment reuse"));
  const int64_t n = static_cast<int64_t>(prompt.size());
  const int64_t n0 = kv.n_tokens();
  ReuseReport rep;
  if (options.mode == ReuseMode::kApe) {
    return InvalidArgument("ape lays documents out in parallel: PrefillApe, not this");
  }
  if (!(options.ratio >= 0 && options.ratio <= 1)) {
    return InvalidArgument("blend ratio " + std::to_string(options.ratio) +
                           " is outside [0, 1]");
  }
  if (options.check_layer < 0 || options.check_layer >= c.n_layer) {
    return InvalidArgument("check layer " + std::to_string(options.check_layer) +
                           " is outside the model's " + std::to_string(c.n_layer) + " layers");
  }
  if (!(options.widen >= 1)) return InvalidArgument("widen must be at least 1");
  const bool awaiting = load != nullptr && load->await_layer;
  if (n0 >= n) {
    return InvalidArgument("the sequence already holds " + std::to_string(n0) +
                           " tokens of a " + std::to_string(n) + "-token prompt");
  }
  if (kv.next_position() != n0) return InvalidArgument("the sequence has been compacted");
  int64_t prev_end = 0;
  for (size_t i = 0; i < segments.size(); ++i) {
    const SegmentUse& s = segments[i];
    const std::string where = "segment " + std::to_string(i);
    if (s.kv == nullptr) return InvalidArgument(where + ": no KV");
    const int64_t len = static_cast<int64_t>(s.kv->tokens.size());
    if (s.offset < prev_end || len == 0 || s.offset + len > n) {
      return InvalidArgument(where + " at " + std::to_string(s.offset) + " (+" +
                             std::to_string(len) + ") overlaps another or leaves the prompt");
    }
    if (!std::equal(s.kv->tokens.begin(), s.kv->tokens.end(), prompt.begin() + s.offset)) {
      return InvalidArgument(where + ": its tokens differ from the prompt's at " +
                             std::to_string(s.offset));
    }
    const KvShape& ss = s.kv->shape;
    if (ss.n_layer != shape.n_layer || ss.n_kv_head != shape.n_kv_head ||
        ss.head_dim != shape.head_dim || ss.type != shape.type) {
      return InvalidArgument(where + ": its KV shape is not the engine's");
    }
    prev_end = s.offset + len;
  }
  for (TokenId t : prompt) {
    if (t < 0 || t >= c.n_vocab) {
      return InvalidArgument("token id " + std::to_string(t) + " is outside the vocabulary");
    }
  }
  if (n > c.n_ctx_train) {
    return InvalidArgument(std::to_string(n) + " tokens exceed the model's context of " +
                           std::to_string(c.n_ctx_train));
  }
  CT_RETURN_IF_ERROR(kv.Reserve(n));
  const size_t tb = shape.token_bytes();
  // Segment tokens to copy into the sequence: `count` tokens of `seg` from its token `from` to
  // slot `at`, keys rotated. Placed a layer at a time, each layer once load->await_layer says
  // its KV is there (a load from the tiers may still be filling the later layers).
  struct Placement {
    const SegmentKv* seg;
    int64_t from, at, count;
  };
  std::vector<Placement> placements;
  std::vector<std::byte> keys;
  int layers_placed = 0;
  auto place_through = [&](int end_layer) -> Status {
    for (; layers_placed < end_layer; ++layers_placed) {
      const int l = layers_placed;
      if (awaiting && !placements.empty()) {
        const auto t0 = std::chrono::steady_clock::now();
        const Status st = load->await_layer(l);
        rep.load_wait_us += std::chrono::duration_cast<std::chrono::microseconds>(
                                std::chrono::steady_clock::now() - t0)
                                .count();
        CT_RETURN_IF_ERROR(st);
      }
      for (const Placement& pl : placements) {
        const SegmentKv& seg = *pl.seg;
        const int64_t delta = pl.at - (seg.base_pos + pl.from);
        const std::byte* k = seg.k[l].data() + pl.from * tb;
        if (delta != 0) {
          keys.assign(k, k + pl.count * tb);
          RotateStoredKeys(keys.data(), pl.count, shape, delta, c.rope);
          k = keys.data();
        }
        for (int64_t t = 0; t < pl.count; ++t) {
          std::memcpy(kv.KSlot(l, pl.at + t), k + t * tb, tb);
          std::memcpy(kv.VSlot(l, pl.at + t), seg.v[l].data() + (pl.from + t) * tb, tb);
        }
      }
    }
    return Status::Ok();
  };
  auto place = [&](const SegmentKv& seg, int64_t from, int64_t at, int64_t count) {
    placements.push_back(Placement{&seg, from, at, count});
  };

  // The exact prefix: the sequence's own tokens, then segments in place after their own
  // context while they follow on. The last token is always computed (it gives the logits).
  int64_t p = n0;
  size_t si = 0;
  while (si < segments.size() && segments[si].offset < n0) ++si;
  if (options.mode != ReuseMode::kFull) {
    for (; si < segments.size(); ++si) {
      const SegmentKv& seg = *segments[si].kv;
      if (segments[si].offset != p || seg.base_pos != p ||
          seg.context != ContextId(prompt.first(p))) {
        break;
      }
      const int64_t take = std::min<int64_t>(seg.tokens.size(), n - 1 - p);
      place(seg, 0, p, take);
      p += take;
      if (p == n - 1) {
        ++si;
        break;
      }
    }
  }
  rep.prefix_tokens = p;
  if (options.mode == ReuseMode::kFull || options.mode == ReuseMode::kPrefix ||
      si == segments.size()) {
    CT_RETURN_IF_ERROR(place_through(c.n_layer));
    if (p > n0) kv.Append(p - n0);
    CT_RETURN_IF_ERROR(engine.Forward(kv, prompt.subspan(p), logits));
    rep.computed_tokens = n - p;
    if (report != nullptr) *report = rep;
    return Status::Ok();
  }

  // Place the other segments and list the rows to compute: every token after the prefix
  // (blend, where a layer below the check layer needs them all, and Cache-Craft choosing in
  // the prompt, whose layer 0 does), or those in no segment.
  // placed[t]: 1 = cached KV placed at t; 2 = placed but recomputed anyway (cachecraft).
  std::vector<char> placed(n, 0);
  std::vector<uint64_t> chunks_before;  // Cache-Craft's chunks preceding the segment at hand
  for (size_t j = 0; j < si; ++j) chunks_before.push_back(ContextId(segments[j].kv->tokens));
  const bool craft_in_prompt = options.mode == ReuseMode::kCacheCraft &&
                               options.craft_choice == CraftChoice::kPrompt;
  std::vector<CraftPart> parts;  // kPrompt: the placed segments, chosen from after layer 0
  for (; si < segments.size(); ++si) {
    const SegmentKv& seg = *segments[si].kv;
    const int64_t at = segments[si].offset;
    const int64_t count = std::min<int64_t>(seg.tokens.size(), n - 1 - at);
    if (count <= 0) break;
    place(seg, 0, at, count);
    std::fill(placed.begin() + at, placed.begin() + at + count, 1);
    rep.reused_tokens += count;
    if (options.mode == ReuseMode::kCacheCraft) {
      const int64_t redo = static_cast<int64_t>(
          std::ceil(CacheCraftShare(seg, chunks_before, options.ratio) * count));
      if (craft_in_prompt) {
        // Its old context, when the prompt starts with it, is no news to it.
        const bool old_context_kept =
            seg.base_pos <= at && seg.context == ContextId(prompt.first(seg.base_pos));
        if (redo > 0) parts.push_back({at, count, redo, old_context_kept ? seg.base_pos : 0});
      } else if (seg.inter.size() >= static_cast<size_t>(count)) {
        MarkLargest(std::span<const float>(seg.inter).first(count), redo, &placed[at]);
      } else {
        std::fill_n(placed.begin() + at, redo, 2);  // no profile: the first tokens
      }
    }
    chunks_before.push_back(ContextId(seg.tokens));
  }
  const bool blend = options.mode == ReuseMode::kBlend;
  const bool all_rows = blend || !parts.empty();
  // Blend's placed rows carried to the end at `ratio`, and through the check layer.
  auto target_for = [&](double ratio) {
    return static_cast<int64_t>(std::ceil(ratio * rep.reused_tokens));
  };
  auto widened_for = [&](double ratio) {
    return std::min<int64_t>(rep.reused_tokens, static_cast<int64_t>(std::ceil(
                                                    options.widen * ratio * rep.reused_tokens)));
  };
  int64_t target = blend ? target_for(options.ratio) : 0;
  Rows rows;
  for (int64_t t = p; t < n; ++t) {
    if (placed[t] != 1 || all_rows) rows.at.push_back(t);
  }
  rows.Build(kv);
  const int64_t d = c.d_model;
  std::vector<float> x(rows.at.size() * d);
  {
    std::vector<TokenId> toks(rows.at.size());
    for (size_t i = 0; i < rows.at.size(); ++i) toks[i] = prompt[rows.at[i]];
    engine.Embed(toks, x.data());
  }

  // Blend's selection at `layer`: projects the rows' K/V, stores them (fresh KV is better than
  // the cached KV even where the row goes no further), and keeps the placed rows of largest
  // deviation (`keep` of them), every other row, and the last.
  const int64_t kvd = c.kv_dim();
  std::vector<float> k_new, v_new, k_old(kvd), v_old(kvd);
  auto select = [&](int layer, int64_t keep) {
    const int64_t m = static_cast<int64_t>(rows.at.size());
    k_new.resize(m * kvd);
    v_new.resize(m * kvd);
    engine.ProjectKv(layer, x.data(), m, rows.pos.data(), k_new.data(), v_new.data());
    std::vector<std::pair<double, size_t>> dev;
    std::vector<size_t> kept;
    for (int64_t i = 0; i < m; ++i) {
      const int64_t t = rows.at[i];
      void* ks = kv.KSlot(layer, t);
      void* vs = kv.VSlot(layer, t);
      if (placed[t] && t != n - 1) {
        kernels::LoadKv(ks, c.n_kv_head, c.head_dim, shape.type, k_old.data());
        kernels::LoadKv(vs, c.n_kv_head, c.head_dim, shape.type, v_old.data());
        double e = 0;
        for (int64_t j = 0; j < kvd; ++j) {
          const double dk = k_new[i * kvd + j] - k_old[j];
          const double dv = v_new[i * kvd + j] - v_old[j];
          e += dk * dk + dv * dv;
        }
        dev.emplace_back(e, static_cast<size_t>(i));
      } else {
        kept.push_back(static_cast<size_t>(i));
      }
      kernels::StoreKv(k_new.data() + i * kvd, c.n_kv_head, c.head_dim, shape.type, ks);
      kernels::StoreKv(v_new.data() + i * kvd, c.n_kv_head, c.head_dim, shape.type, vs);
    }
    keep = std::min<int64_t>(keep, dev.size());
    std::partial_sort(dev.begin(), dev.begin() + keep, dev.end(),
                      [](const auto& a, const auto& b) {
                        return a.first != b.first ? a.first > b.first : a.second < b.second;
                      });
    for (int64_t j = 0; j < keep; ++j) kept.push_back(dev[j].second);
    std::sort(kept.begin(), kept.end());
    KeepRows(rows, kept, x, d, kv);
  };

  // Cache-Craft's choice in the prompt: layer 0 over every row, measuring each placed part's
  // attention to its new context, then each part's `redo` tokens of largest attention stay
  // with the rows in no segment and the last.
  auto forward_layer_zero_and_choose = [&] {
    const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
    const int64_t qd = static_cast<int64_t>(c.n_head) * c.head_dim;
    std::vector<std::vector<float>> mass(parts.size());
    engine.ForwardLayer(
        0, x.data(), static_cast<int64_t>(rows.at.size()), rows.pos.data(), rows.runs,
        [&](int layer, const float* q, int64_t m, float* out) {
          // The rows are the slots [p, n), one run.
          CT_CHECK_EQ(m, n - p);
          const kernels::KvView view = kv.View(layer, n);
          kernels::Attention(q, m, c.n_head, p, view, scale, out, engine.pool());
          for (size_t i = 0; i < parts.size(); ++i) {
            mass[i] = NewContextAttention(q + (parts[i].at - p) * qd, parts[i], view, c.n_head,
                                          scale, engine.pool());
          }
        });
    for (size_t i = 0; i < parts.size(); ++i) {
      MarkLargest(mass[i], parts[i].redo, &placed[parts[i].at]);
    }
    std::vector<size_t> kept;
    for (size_t i = 0; i < rows.at.size(); ++i) {
      if (placed[rows.at[i]] != 1) kept.push_back(i);
    }
    KeepRows(rows, kept, x, d, kv);
  };

  rep.ratio = blend ? options.ratio : 0;
  // The slots of the placed tokens among the rows being computed, ascending.
  auto placed_rows = [&] {
    std::vector<int64_t> out;
    for (int64_t t : rows.at) {
      if (placed[t] != 0) out.push_back(t);
    }
    return out;
  };
  bool selecting = blend && target < rep.reused_tokens;
  const int64_t asked_target = target;  // the ratio asked for, before the loading controller
  bool raised = false;
  std::vector<int64_t> raised_slots;  // the placed rows the raised ratio carried
  int64_t widened = widened_for(options.ratio);
  const auto loop_start = std::chrono::steady_clock::now();
  for (int layer = 0; layer < c.n_layer; ++layer) {
    if (selecting && load != nullptr && load->load_left_us && layer == options.check_layer) {
      // The loading controller: the rows so far went through every layer below this one; what
      // one cost there (placing the layer's KV included, waiting for it not) prices the rest,
      // and the load has this much left to run under them.
      const auto now = std::chrono::steady_clock::now();
      const double us = std::chrono::duration<double, std::micro>(now - loop_start).count() -
                        static_cast<double>(rep.load_wait_us);
      const double row_layer_us =
          rep.row_layers > 0 ? std::max(us, 0.0) / static_cast<double>(rep.row_layers) : 0;
      const double time_left = load->load_left_us();
      const double ratio = PipelinedBlendRatio(
          options.ratio, rep.reused_tokens, n - p - rep.reused_tokens, c.n_layer - layer - 1,
          options.widen, row_layer_us, time_left);
      if (ratio > options.ratio) {
        raised = true;
        rep.ratio = ratio;
        target = target_for(ratio);
        selecting = target < rep.reused_tokens;
        widened = widened_for(ratio);
      }
    }
    CT_RETURN_IF_ERROR(place_through(layer + 1));
    if (selecting && layer == options.check_layer) {
      select(layer, layer + 1 < c.n_layer ? widened : target);
    } else if (raised && layer == c.n_layer - 1) {
      // The last layer needs the last band, so its compute follows the load: it runs the rows
      // the ratio asked for would (the raised rows' K/V there are projected fresh all the same).
      raised_slots = placed_rows();
      select(layer, asked_target);
    } else if (selecting && widened > target && layer == options.check_layer + 1) {
      select(layer, target);
    }
    rep.row_layers += static_cast<int64_t>(rows.at.size());
    if (layer == 0 && !parts.empty()) {
      forward_layer_zero_and_choose();
      continue;
    }
    engine.ForwardLayer(layer, x.data(), static_cast<int64_t>(rows.at.size()), rows.pos.data(),
                        rows.runs);
  }
  CT_CHECK(!rows.at.empty() && rows.at.back() == n - 1);
  if (logits != nullptr) engine.RowLogits(x.data() + (rows.at.size() - 1) * d, logits);
  rep.recomputed_slots = raised ? std::move(raised_slots) : placed_rows();
  rep.recomputed_tokens = static_cast<int64_t>(rep.recomputed_slots.size());
  rep.computed_tokens = n - p - rep.reused_tokens;
  kv.Append(n - n0);
  // Everything after the exact prefix is approximate (even blend at ratio 1, to rounding).
  kv.MarkInexactFrom(p);
  if (report != nullptr) *report = rep;
  return Status::Ok();
}

double PipelinedBlendRatio(double min_ratio, int64_t placed_tokens, int64_t other_rows,
                           int layers_left, double widen, double row_layer_us,
                           double time_left_us) {
  if (placed_tokens <= 0 || layers_left <= 0 || !(row_layer_us > 0) || !(time_left_us > 0)) {
    return min_ratio;
  }
  const double placed_rows =
      time_left_us / row_layer_us - static_cast<double>(other_rows) * layers_left;
  const double per_ratio = static_cast<double>(placed_tokens) * (widen + layers_left - 1);
  return std::clamp(placed_rows / per_ratio, min_ratio, 1.0);
}

}  // namespace cachette
