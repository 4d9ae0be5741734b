// Token log-probabilities from logits, for the API's `logprobs` (and `echo` prompt scoring).
//
// A logprob is the log-softmax of the model's raw logits at one position: log p(token) =
// (logit[token] - m) - log(sum_v exp(logit[v] - m)) with m the largest logit, in double (no
// overflow, and no precision lost to a huge m). It is the model's own distribution: no
// temperature, top-k/top-p/min-p or repetition penalty is applied (those shape sampling, not
// what is reported).
//
// Determinism: the value depends only on the logits (a fixed summation order, no threads), so
// equal logits give bit-identical logprobs; the top list breaks ties by the lower token id.
//
// Thread-safety: pure functions.
#pragma once

#include <span>
#include <vector>

#include "cachette/types.h"

namespace cachette {

struct TokenLogprob {
  TokenId token = -1;
  double logprob = 0;
};

// One position: the token there (sampled, or the prompt's next token) with its logprob, and the
// `top_n` most likely tokens at that position, most likely first. The token's own value is
// computed exactly as a top entry's, so when it is the most likely token the two are equal.
struct PositionLogprobs {
  TokenLogprob chosen;
  std::vector<TokenLogprob> top;  // [min(top_n, n_vocab)], logprob descending, then id ascending
};

// Largest top_n the API accepts (OpenAI's chat limit; vLLM's default for both endpoints).
inline constexpr int kMaxTopLogprobs = 20;

// The logprobs of `token` and of the top `top_n` tokens under `logits` [n_vocab]. top_n <= 0:
// none. `token` must be in [0, n_vocab) (CT_CHECK). O(n_vocab * (1 + top_n)) at worst, O(n_vocab)
// in practice (a candidate below the current n-th best is rejected by one comparison).
PositionLogprobs LogprobsAt(std::span<const float> logits, TokenId token, int top_n);

}  // namespace cachette
