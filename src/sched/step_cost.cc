#include "sched/step_cost.h"

#include <algorithm>
#include <cmath>

namespace cachette::sched {

void StepCostModel::Observe(int64_t decodes, int64_t prefill, double seconds) {
  if (!(seconds >= 0) || !std::isfinite(seconds)) return;
  const double x[3] = {1.0, static_cast<double>(decodes), static_cast<double>(prefill)};
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) xtx_[i][j] = forget_ * xtx_[i][j] + x[i] * x[j];
    xty_[i] = forget_ * xty_[i] + x[i] * seconds;
  }
  (prefill > 0 ? prefill_steps_ : plain_steps_)++;
  Solve();
}

void StepCostModel::Solve() {
  // Normal equations with a small ridge (keeps the system solvable while one feature is
  // constant), solved by Gaussian elimination with partial pivoting.
  double m[3][4];
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) m[i][j] = xtx_[i][j];
    m[i][i] += 1e-9 * (1.0 + xtx_[i][i]);
    m[i][3] = xty_[i];
  }
  for (int col = 0; col < 3; ++col) {
    int piv = col;
    for (int r = col + 1; r < 3; ++r) {
      if (std::fabs(m[r][col]) > std::fabs(m[piv][col])) piv = r;
    }
    if (std::fabs(m[piv][col]) < 1e-300) {
      ready_ = false;
      return;
    }
    for (int j = 0; j < 4; ++j) std::swap(m[col][j], m[piv][j]);
    for (int r = 0; r < 3; ++r) {
      if (r == col) continue;
      const double f = m[r][col] / m[col][col];
      for (int j = col; j < 4; ++j) m[r][j] -= f * m[col][j];
    }
  }
  double c[3];
  for (int i = 0; i < 3; ++i) c[i] = m[i][3] / m[i][i];
  // A per-token cost <= 0 is noise (too few distinct step shapes yet): keep the last sane fit.
  // Negative a or b are clamped where they are used.
  const bool sane = std::isfinite(c[0]) && std::isfinite(c[1]) && std::isfinite(c[2]) && c[2] > 0;
  if (!sane) return;
  for (int i = 0; i < 3; ++i) coef_[i] = c[i];
  ready_ = prefill_steps_ >= 4 && plain_steps_ + prefill_steps_ >= 8;
}

double StepCostModel::Predict(int64_t decodes, int64_t prefill) const {
  return std::max(0.0, coef_[0]) + std::max(0.0, coef_[1]) * static_cast<double>(decodes) +
         coef_[2] * static_cast<double>(prefill);
}

int64_t StepCostModel::PrefillBudget(int64_t decodes, double target_s, int64_t min_tokens,
                                     int64_t max_tokens) const {
  if (!ready_) return max_tokens;
  const double room = target_s - Predict(decodes, 0);
  const double tokens = room / coef_[2];
  if (!(tokens > static_cast<double>(min_tokens))) return min_tokens;
  if (tokens >= static_cast<double>(max_tokens)) return max_tokens;
  return static_cast<int64_t>(tokens);
}

}  // namespace cachette::sched
