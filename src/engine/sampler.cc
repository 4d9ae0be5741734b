#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <unordered_set>

namespace cachette {

Status SamplingParams::Validate() const {
  if (!(temperature >= 0 && temperature <= 100)) {
    return InvalidArgument("temperature must be in [0, 100], got " + std::to_string(temperature));
  }
  if (top_k < 0) return InvalidArgument("top_k must be >= 0, got " + std::to_string(top_k));
  if (!(top_p > 0 && top_p <= 1)) {
    return InvalidArgument("top_p must be in (0, 1], got " + std::to_string(top_p));
  }
  if (!(min_p >= 0 && min_p <= 1)) {
    return InvalidArgument("min_p must be in [0, 1], got " + std::to_string(min_p));
  }
  if (!(repetition_penalty > 0 && repetition_penalty <= 10)) {
    return InvalidArgument("repetition_penalty must be in (0, 10], got " +
                           std::to_string(repetition_penalty));
  }
  if (repeat_last_n < 0) return InvalidArgument("repeat_last_n must be >= 0");
  return Status::Ok();
}

Sampler::Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}

TokenId Sampler::Argmax(std::span<const float> logits) {
  // First maximum wins, so ties resolve the same way everywhere.
  return static_cast<TokenId>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

TokenId Sampler::Sample(std::span<float> logits, std::span<const TokenId> history) {
  const int64_t n = static_cast<int64_t>(logits.size());
  if (params_.repetition_penalty != 1.0f && params_.repeat_last_n > 0) {
    const size_t from = history.size() > static_cast<size_t>(params_.repeat_last_n)
                            ? history.size() - params_.repeat_last_n
                            : 0;
    std::unordered_set<TokenId> seen(history.begin() + from, history.end());
    for (TokenId t : seen) {
      if (t < 0 || t >= n) continue;
      float& l = logits[t];
      l = l > 0 ? l / params_.repetition_penalty : l * params_.repetition_penalty;
    }
  }
  if (params_.temperature <= 0) return Argmax(logits);

  cand_.clear();
  cand_.reserve(n);
  for (int64_t i = 0; i < n; ++i) cand_.emplace_back(logits[i], static_cast<TokenId>(i));
  auto by_logit = [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  size_t keep = cand_.size();
  if (params_.top_k > 0 && static_cast<size_t>(params_.top_k) < keep) {
    keep = params_.top_k;
    std::partial_sort(cand_.begin(), cand_.begin() + keep, cand_.end(), by_logit);
    cand_.resize(keep);
  } else {
    std::sort(cand_.begin(), cand_.end(), by_logit);
  }
  // Softmax with temperature over the survivors (sorted, largest first).
  const float inv_t = 1.0f / params_.temperature;
  const float max_l = cand_[0].first;
  double sum = 0;
  for (auto& c : cand_) {
    c.first = std::exp((c.first - max_l) * inv_t);
    sum += c.first;
  }
  for (auto& c : cand_) c.first = static_cast<float>(c.first / sum);
  if (params_.top_p < 1.0f) {
    double cum = 0;
    size_t k = 0;
    for (; k < cand_.size(); ++k) {
      cum += cand_[k].first;
      if (cum >= params_.top_p) {
        ++k;
        break;
      }
    }
    cand_.resize(std::max<size_t>(1, std::min(k, cand_.size())));
  }
  if (params_.min_p > 0) {
    const float floor = cand_[0].first * params_.min_p;
    size_t k = 1;
    while (k < cand_.size() && cand_[k].first >= floor) ++k;
    cand_.resize(k);
  }
  double total = 0;
  for (const auto& c : cand_) total += c.first;
  std::uniform_real_distribution<double> u(0.0, total);
  double x = u(rng_);
  for (const auto& c : cand_) {
    x -= c.first;
    if (x <= 0) return c.second;
  }
  return cand_.back().second;
}

}  // namespace cachette
