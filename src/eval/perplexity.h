// Perplexity with the KV cache passed through a codec (`cachette eval ppl`).
//
// Method (llama.cpp's `perplexity`, so figures compare with its): the token stream is cut into
// non-overlapping windows of `ctx` tokens (a trailing partial window is dropped); the first
// token of every window is replaced by BOS; only the second half of each window is scored:
// the logits at positions [ctx/2, ctx-1) predict tokens [ctx/2+1, ctx). Each scored token
// thus sees at least ctx/2 tokens of context.
//
// The codec enters exactly where a restored prefix would: the first half [0, ctx/2) is
// prefilled, its KV is round-tripped through the codec in store chunks (see kv_roundtrip.h)
// and written back, and the second half is computed over the round-tripped KV. The exact-KV
// baseline runs in the same pass over the same prefill, so each window costs one full
// prefill plus half a window per codec.
//
// Thread-safety: uses the engine (one call at a time per Engine).
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "cachette/status.h"
#include "engine/engine.h"
#include "eval/kv_roundtrip.h"

namespace cachette::eval {

struct PerplexityOptions {
  int ctx = 1024;                   // window length in tokens (>= 4, <= the KV capacity)
  std::vector<std::string> codecs;  // MakeCodec names, measured beside the exact baseline
  int chunk_tokens = 256;           // store chunk size the prefix is cut into
  TokenId bos = -1;                 // replaces each window's first token; -1 = keep it
  // Scored tokens per forward pass (0 = the whole second half at once). 1 scores as decoding
  // does: each token then attends to the KV as stored after the ones before it, which is what
  // differs for a KV type with a recent f16 window (--kv-recent, kivi4): in one pass, every
  // scored token is still in the window.
  int score_step = 0;
  // Called after each window with (windows done, windows in all).
  std::function<void(int, int)> progress;
};

// One configuration's figure. The baseline has codec "" (exact KV, never encoded).
struct PerplexityFigure {
  std::string codec;
  double nll_sum = 0;  // sum over scored tokens of -ln p(token), in nats
  int64_t n_scored = 0;
  double bytes_per_token = 0;  // encoded KV bytes per token (baseline: raw KV bytes/token)
  RoundTripStats roundtrip;    // codec only
  double seconds = 0;          // forward passes of the scored halves (+ codec time)

  double mean_nll() const { return n_scored > 0 ? nll_sum / static_cast<double>(n_scored) : 0; }
  double ppl() const;  // exp(mean_nll())
};

struct PerplexityResult {
  int ctx = 0;
  int n_windows = 0;
  int64_t n_input_tokens = 0;
  double prefill_seconds = 0;             // the shared first halves
  std::vector<PerplexityFigure> figures;  // [0] = the exact baseline, then options.codecs
};

// -ln softmax(logits)[target], computed in double with the max subtracted.
double NegLogLikelihood(std::span<const float> logits, TokenId target);

// OK when ctx is in [4, n_ctx] and n_tokens hold one window; else kInvalidArgument naming which.
Status CheckWindows(int ctx, int n_ctx, size_t n_tokens);
// Copies tokens [w x ctx, (w + 1) x ctx), ctx = window.size(), into `window`; bos (if >= 0) first.
void CopyWindow(std::span<const TokenId> tokens, int w, TokenId bos, std::span<TokenId> window);

// Runs the evaluation over `tokens`. kInvalidArgument for ctx < 4 or above the model's
// context, for fewer than ctx tokens, or for an unknown codec name; codec and engine errors
// otherwise (a codec that refuses the engine's KV type, e.g. int4 of q8_0 KV, names itself).
Result<PerplexityResult> EvalPerplexity(Engine& engine, std::span<const TokenId> tokens,
                                        const PerplexityOptions& options);

}  // namespace cachette::eval
