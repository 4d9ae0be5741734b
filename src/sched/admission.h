// Past-Future admission (LightLLM): admit by the KV peak the running batch is likely to reach,
// estimated from the output lengths of requests that finished before ("the past"), instead of
// by every request's worst case (prompt + max_tokens).
//
// For each running request that has generated g tokens, its final output length is sampled
// from the history values >= g (its max_tokens when none is that long), and so is the
// candidate's. Sorting the requests by remaining length r_1 <= ... <= r_n, the batch needs the
// most pages just before one of them finishes: at time r_j every request i with r_i >= r_j
// still runs and holds pages(u_i + r_j), while those with r_i < r_j have finished and freed
// theirs. The peak over j is compared with the pages the batch may use; over several sample
// sets (5), the largest peak counts. With fewer than kMinHistory finished requests, the
// worst case is used.
//
// Benefits: many more requests in flight when outputs are usually far shorter than max_tokens.
// Costs: an estimate can be wrong; the scheduler then preempts (recompute) the newest request.
//
// Thread-safety: none; the scheduler loop owns it.
#pragma once

#include <cstdint>
#include <deque>
#include <random>
#include <span>
#include <vector>

namespace cachette::sched {

// One sequence as the estimator sees it.
struct SeqLoad {
  int64_t tokens = 0;      // tokens the sequence holds (or will, once its prompt is in)
  int64_t generated = 0;   // output tokens so far
  int64_t max_output = 0;  // its max_tokens, bounded by the context
  int64_t held_pages = 0;  // pages it holds now (they return to the pool when it finishes)
};

// Pages a batch needs at its peak beyond those it holds now, for given remaining lengths.
// `remaining[i]` >= 1 is how many more tokens seqs[i] writes. Exposed for tests.
int64_t PeakExtraPages(std::span<const SeqLoad> seqs, std::span<const int64_t> remaining,
                       int page_tokens);

class PastFutureAdmission {
 public:
  static constexpr size_t kMinHistory = 10;
  explicit PastFutureAdmission(size_t history = 200, int samples = 5, uint32_t seed = 20240601);

  // Records the output length of a request that finished by itself (EOS, stop, max_tokens).
  void Finished(int64_t output_tokens);
  size_t history_size() const { return history_.size(); }

  // The largest, over the sample sets, of the extra pages `seqs` need at their peak; -1 when
  // the history is too short to say (use the worst-case forecast).
  int64_t EstimateExtraPages(std::span<const SeqLoad> seqs, int page_tokens);

 private:
  int64_t SampleFinal(const SeqLoad& s);

  const size_t capacity_;
  const int samples_;
  std::deque<int64_t> history_;
  std::vector<int64_t> sorted_;  // history_, sorted; rebuilt when dirty
  bool dirty_ = false;
  std::mt19937 rng_;
};

}  // namespace cachette::sched
