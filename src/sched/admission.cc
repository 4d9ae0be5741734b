#include "sched/admission.h"

#include <algorithm>
#include <numeric>

namespace cachette::sched {

int64_t PeakExtraPages(std::span<const SeqLoad> seqs, std::span<const int64_t> remaining,
                       int page_tokens) {
  const int64_t P = page_tokens;
  auto pages = [P](int64_t tokens) { return (tokens + P - 1) / P; };
  std::vector<size_t> order(seqs.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::sort(order.begin(), order.end(),
            [&](size_t a, size_t b) { return remaining[a] < remaining[b]; });
  int64_t peak = 0;
  // Just before the k-th shortest finishes (time t = its remaining length): the ones sorted
  // before it have finished and given their pages back, the rest hold pages(tokens + t).
  int64_t freed = 0;
  for (size_t k = 0; k < order.size(); ++k) {
    const int64_t t = remaining[order[k]];
    int64_t need = -freed;
    for (size_t m = k; m < order.size(); ++m) {
      const SeqLoad& s = seqs[order[m]];
      need += pages(s.tokens + t) - s.held_pages;
    }
    peak = std::max(peak, need);
    freed += seqs[order[k]].held_pages;
  }
  return peak;
}

PastFutureAdmission::PastFutureAdmission(size_t history, int samples, uint32_t seed)
    : capacity_(std::max<size_t>(history, 1)), samples_(std::max(samples, 1)), rng_(seed) {}

void PastFutureAdmission::Finished(int64_t output_tokens) {
  history_.push_back(std::max<int64_t>(output_tokens, 0));
  if (history_.size() > capacity_) history_.pop_front();
  dirty_ = true;
}

int64_t PastFutureAdmission::SampleFinal(const SeqLoad& s) {
  // History values at least as long as what it has generated: sorted_[first, end).
  const auto first = std::lower_bound(sorted_.begin(), sorted_.end(), s.generated);
  if (first == sorted_.end()) return s.max_output;  // longer than anything seen: worst case
  std::uniform_int_distribution<size_t> pick(0, static_cast<size_t>(sorted_.end() - first) - 1);
  return std::min(*(first + static_cast<std::ptrdiff_t>(pick(rng_))), s.max_output);
}

int64_t PastFutureAdmission::EstimateExtraPages(std::span<const SeqLoad> seqs, int page_tokens) {
  if (history_.size() < kMinHistory) return -1;
  if (dirty_) {
    sorted_.assign(history_.begin(), history_.end());
    std::sort(sorted_.begin(), sorted_.end());
    dirty_ = false;
  }
  std::vector<int64_t> remaining(seqs.size());
  int64_t worst = 0;
  for (int k = 0; k < samples_; ++k) {
    for (size_t i = 0; i < seqs.size(); ++i) {
      remaining[i] = std::max<int64_t>(1, SampleFinal(seqs[i]) - seqs[i].generated);
    }
    worst = std::max(worst, PeakExtraPages(seqs, remaining, page_tokens));
  }
  return worst;
}

}  // namespace cachette::sched
