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

namespace {

// Solves the normal equations restricted to the features in `use` (the others' coefficients
// are 0), with a small ridge that keeps the system solvable while a feature is constant, by
// Gaussian elimination with partial pivoting. False when singular.
bool SolveSubset(const double xtx[3][3], const double xty[3], const bool use[3], double out[3]) {
  int idx[3], n = 0;
  for (int i = 0; i < 3; ++i) {
    out[i] = 0;
    if (use[i]) idx[n++] = i;
  }
  double m[3][4];
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < n; ++j) m[i][j] = xtx[idx[i]][idx[j]];
    m[i][i] += 1e-9 * (1.0 + xtx[idx[i]][idx[i]]);
    m[i][n] = xty[idx[i]];
  }
  for (int col = 0; col < n; ++col) {
    int piv = col;
    for (int r = col + 1; r < n; ++r) {
      if (std::fabs(m[r][col]) > std::fabs(m[piv][col])) piv = r;
    }
    if (std::fabs(m[piv][col]) < 1e-300) return false;
    for (int j = 0; j <= n; ++j) std::swap(m[col][j], m[piv][j]);
    for (int r = 0; r < n; ++r) {
      if (r == col) continue;
      const double f = m[r][col] / m[col][col];
      for (int j = col; j <= n; ++j) m[r][j] -= f * m[col][j];
    }
  }
  for (int i = 0; i < n; ++i) out[idx[i]] = m[i][n] / m[i][i];
  return std::isfinite(out[0]) && std::isfinite(out[1]) && std::isfinite(out[2]);
}

}  // namespace

void StepCostModel::Solve() {
  // Costs are never negative: a negative fixed or per-decode cost (the steps seen so far do not
  // separate them) is dropped and the others refitted without it.
  bool use[3] = {true, true, true};
  double c[3];
  for (int attempt = 0; attempt < 3; ++attempt) {
    if (!SolveSubset(xtx_, xty_, use, c)) return;
    bool dropped = false;
    for (int i = 0; i < 2; ++i) {
      if (use[i] && c[i] < 0) {
        use[i] = false;
        dropped = true;
      }
    }
    if (!dropped) break;
  }
  // A per-token cost <= 0 is noise (too few distinct step shapes yet): keep the last sane fit.
  if (!(c[2] > 0) || c[0] < 0 || c[1] < 0) return;
  for (int i = 0; i < 3; ++i) coef_[i] = c[i];
  ready_ = prefill_steps_ >= 4 && plain_steps_ + prefill_steps_ >= 8;
}

double StepCostModel::Predict(int64_t decodes, int64_t prefill) const {
  return coef_[0] + coef_[1] * static_cast<double>(decodes) +
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
