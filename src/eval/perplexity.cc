#include "eval/perplexity.h"

#include <algorithm>
#include <cmath>
#include <memory>

#include "core/timer.h"

namespace cachette::eval {

double PerplexityFigure::ppl() const { return std::exp(mean_nll()); }

double NegLogLikelihood(std::span<const float> logits, TokenId target) {
  float max = logits[0];
  for (float x : logits) max = std::max(max, x);
  double sum = 0;
  for (float x : logits) sum += std::exp(static_cast<double>(x) - max);
  return std::log(sum) + max - static_cast<double>(logits[target]);
}

Status CheckWindows(int ctx, int n_ctx, size_t n_tokens) {
  if (ctx < 4 || ctx > n_ctx) {
    return InvalidArgument("context " + std::to_string(ctx) + " outside [4, " +
                           std::to_string(n_ctx) + "] (the model's context)");
  }
  if (n_tokens < static_cast<size_t>(ctx)) {
    return InvalidArgument("the text has " + std::to_string(n_tokens) +
                           " tokens, fewer than one window of " + std::to_string(ctx));
  }
  return Status::Ok();
}

void CopyWindow(std::span<const TokenId> tokens, int w, TokenId bos, std::span<TokenId> window) {
  const auto from = tokens.subspan(static_cast<size_t>(w) * window.size(), window.size());
  std::copy(from.begin(), from.end(), window.begin());
  if (bos >= 0) window[0] = bos;
}

namespace {

// Forwards `tokens` at the end of `kv` with all-position logits into `logits` and adds the
// NLL of positions [0, tokens.size() - 1) predicting their successors to `figure`.
Status ScoreHalf(Engine& engine, SequenceKv& kv, std::span<const TokenId> tokens, int step,
                 std::vector<float>& logits, PerplexityFigure& figure) {
  const int nv = engine.model().config().n_vocab;
  Stopwatch sw;
  const size_t chunk = step > 0 ? static_cast<size_t>(step) : tokens.size();
  for (size_t at = 0; at < tokens.size(); at += chunk) {
    Engine::Item item{&kv, tokens.subspan(at, std::min(chunk, tokens.size() - at)),
                      Engine::Logits::kAll, logits.data() + at * nv};
    CT_RETURN_IF_ERROR(engine.Forward(std::span<Engine::Item>(&item, 1)));
  }
  for (size_t j = 0; j + 1 < tokens.size(); ++j) {
    figure.nll_sum += NegLogLikelihood(
        std::span<const float>(logits.data() + j * nv, static_cast<size_t>(nv)), tokens[j + 1]);
    ++figure.n_scored;
  }
  figure.seconds += sw.Seconds();
  return Status::Ok();
}

}  // namespace

Result<PerplexityResult> EvalPerplexity(Engine& engine, std::span<const TokenId> tokens,
                                        const PerplexityOptions& options) {
  std::vector<std::unique_ptr<cache::Codec>> codecs;
  for (const std::string& name : options.codecs) {
    CT_ASSIGN_OR_RETURN(auto c, cache::MakeCodec(name));
    codecs.push_back(std::move(c));
  }
  const ModelConfig& cfg = engine.model().config();
  const int ctx = options.ctx;
  CT_RETURN_IF_ERROR(CheckWindows(ctx, cfg.n_ctx_train, tokens.size()));
  const KvShape shape = engine.kv_shape();
  PerplexityResult r;
  r.ctx = ctx;
  r.n_input_tokens = static_cast<int64_t>(tokens.size());
  r.n_windows = static_cast<int>(tokens.size() / ctx);
  r.figures.resize(1 + codecs.size());
  r.figures[0].bytes_per_token = 2.0 * static_cast<double>(shape.n_layer * shape.token_bytes());
  for (size_t i = 0; i < codecs.size(); ++i) r.figures[1 + i].codec = codecs[i]->name();

  const int first = ctx / 2;
  auto kv = engine.NewSequence(ctx);
  std::vector<float> logits(static_cast<size_t>(ctx - first) * cfg.n_vocab);
  std::vector<TokenId> window(ctx);
  // The exact KV of the first half, kept to restore the sequence before each codec's pass
  // (the baseline's second half overwrites nothing before `first`, but a codec's write-back
  // does).
  std::vector<std::byte> prefix(LayoutFor(shape, first).raw_bytes());
  for (int w = 0; w < r.n_windows; ++w) {
    CopyWindow(tokens, w, options.bos, window);
    const std::span<const TokenId> head(window.data(), first);
    const std::span<const TokenId> tail(window.data() + first, ctx - first);

    kv->SetTokens(0);
    Stopwatch sw;
    CT_RETURN_IF_ERROR(engine.Forward(*kv, head, nullptr));
    r.prefill_seconds += sw.Seconds();
    if (!codecs.empty()) CopyKvChunk(*kv, shape, 0, first, prefix, /*to_kv=*/false);
    CT_RETURN_IF_ERROR(ScoreHalf(engine, *kv, tail, options.score_step, logits, r.figures[0]));

    for (size_t i = 0; i < codecs.size(); ++i) {
      PerplexityFigure& f = r.figures[1 + i];
      // Back to the exact prefix, then through the codec in store chunks.
      CopyKvChunk(*kv, shape, 0, first, prefix, /*to_kv=*/true);
      kv->SetTokens(first);
      Stopwatch cs;
      CT_RETURN_IF_ERROR(
          RoundTripKv(*codecs[i], shape, options.chunk_tokens, *kv, *kv, 0, first, &f.roundtrip));
      f.seconds += cs.Seconds();
      CT_RETURN_IF_ERROR(ScoreHalf(engine, *kv, tail, options.score_step, logits, f));
    }
    if (options.progress) options.progress(w + 1, r.n_windows);
  }
  for (size_t i = 1; i < r.figures.size(); ++i) {
    r.figures[i].bytes_per_token = r.figures[i].roundtrip.bytes_per_token();
  }
  return r;
}

}  // namespace cachette::eval
