#include "engine/logprobs.h"

#include <algorithm>
#include <cmath>

#include "core/check.h"

namespace cachette {

namespace {

// The normalizer as (max, log(sum_v exp(logit_v - max))): a logprob is (logit - max) - log_sum,
// so a huge max never swallows the small terms.
struct Normalizer {
  double max = 0;
  double log_sum = 0;
};

Normalizer Normalize(std::span<const float> logits) {
  Normalizer z;
  z.max = *std::max_element(logits.begin(), logits.end());
  if (!std::isfinite(z.max)) return z;  // inf or NaN logits: the values follow IEEE rules
  double sum = 0;
  for (float l : logits) sum += std::exp(static_cast<double>(l) - z.max);
  z.log_sum = std::log(sum);
  return z;
}

}  // namespace

PositionLogprobs LogprobsAt(std::span<const float> logits, TokenId token, int top_n) {
  const int64_t n = static_cast<int64_t>(logits.size());
  CT_CHECK(token >= 0 && token < n) << "token " << token << " outside [0, " << n << ")";
  const Normalizer z = Normalize(logits);
  auto logprob = [&](TokenId t) { return (static_cast<double>(logits[t]) - z.max) - z.log_sum; };
  PositionLogprobs out;
  out.chosen = {token, logprob(token)};
  const size_t k = static_cast<size_t>(std::clamp<int64_t>(top_n, 0, n));
  if (k == 0) return out;
  // The k best (logit descending, id ascending), kept sorted: a token enters only when it beats
  // the current k-th, which after the first few thousand tokens is rare.
  auto better = [&](TokenId a, TokenId b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  std::vector<TokenId> best;
  best.reserve(k + 1);
  for (TokenId t = 0; t < n; ++t) {
    if (best.size() == k && !better(t, best.back())) continue;
    best.insert(std::upper_bound(best.begin(), best.end(), t, better), t);
    if (best.size() > k) best.pop_back();
  }
  out.top.reserve(k);
  for (TokenId t : best) out.top.push_back({t, logprob(t)});
  return out;
}

}  // namespace cachette
