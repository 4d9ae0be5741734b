// What a scheduler step costs, learned online, and the prefill share that keeps decodes within an
// inter-token latency objective (Sarathi-Serve's chunked-prefill token budget, sized from
// measurements instead of a fixed --step-tokens).
//
// Model: a step that runs d decodes and p prefill tokens takes
//     t = a + b*d + c*p   seconds
// (a: fixed cost per Forward and sampling; b: a decode's weights-and-attention share; c: a
// prompt token's). It is fitted by least squares with exponential forgetting (each new step
// weighs 1, one k steps old lambda^k), so it follows the context growing and the machine's
// load; a cost that comes out negative (the steps seen do not separate a from b) is dropped
// and the rest refitted. The model is linear where the machine is not: a prompt token costs
// more in a small chunk than in a large one (smaller matrix products), so c fitted while
// chunks are small is higher than the engine's bulk prefill rate. Attention cost that grows with the context is absorbed by the drift of b and c; the
// objective is a target, not a guarantee.
//
// PrefillBudget(d, target) = (target - a - b*d) / c, clamped to [min, max]: the prefill tokens
// that fit beside d decodes. Before the model has seen enough steps of both kinds (prefill and
// decode-only, so that c is identified), it answers `max` (today's fixed budget).
//
// Thread-safety: none; the scheduler loop owns it.
#pragma once

#include <cstdint>

namespace cachette::sched {

class StepCostModel {
 public:
  explicit StepCostModel(double forget = 0.97) : forget_(forget) {}

  // One finished step: `decodes` one-token items, `prefill` prompt tokens, `seconds` of wall time.
  void Observe(int64_t decodes, int64_t prefill, double seconds);

  // True once both prefill steps and steps without prefill were seen and the fit is sane.
  bool ready() const { return ready_; }
  double fixed_s() const { return coef_[0]; }
  double decode_s() const { return coef_[1]; }
  double prefill_token_s() const { return coef_[2]; }
  // Predicted seconds of a step.
  double Predict(int64_t decodes, int64_t prefill) const;
  // Prefill tokens that fit beside `decodes` within target_s, in [min_tokens, max_tokens].
  int64_t PrefillBudget(int64_t decodes, double target_s, int64_t min_tokens,
                        int64_t max_tokens) const;

 private:
  void Solve();

  double forget_;
  double xtx_[3][3] = {};  // sum of forgotten x x^T, x = (1, d, p)
  double xty_[3] = {};
  double coef_[3] = {};    // a, b, c
  int64_t prefill_steps_ = 0, plain_steps_ = 0;
  bool ready_ = false;
};

}  // namespace cachette::sched
