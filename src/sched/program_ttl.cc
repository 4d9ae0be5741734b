#include "sched/program_ttl.h"

#include <algorithm>
#include <cmath>

#include "core/map_util.h"

namespace cachette::sched {

void ToolTtlEstimator::Observe(const std::string& tool, double seconds) {
  if (!(seconds >= 0) || !std::isfinite(seconds)) return;
  auto it = tools_.find(tool);
  if (it == tools_.end()) {
    if (tools_.size() >= std::max<size_t>(1, o_.max_tools)) {
      EraseSmallest(tools_, &Tool::last_use);
    }
    it = tools_.emplace(tool, Tool{}).first;
  }
  Tool& t = it->second;
  t.durations.push_back(seconds);
  while (t.durations.size() > std::max<size_t>(1, o_.window)) t.durations.pop_front();
  ++t.calls;
  t.last_use = ++clock_;
  total_s_ += seconds;
  ++total_n_;
}

double ToolTtlEstimator::PriorMean() const {
  return total_n_ > 0 ? total_s_ / static_cast<double>(total_n_) : o_.prior_mean_s;
}

std::vector<double> ToolTtlEstimator::Samples(const std::string& tool) const {
  std::vector<double> v;
  auto it = tools_.find(tool);
  if (it != tools_.end()) v.assign(it->second.durations.begin(), it->second.durations.end());
  const double mean = PriorMean();
  const int k = std::max(0, o_.prior_samples);
  for (int i = 0; i < k; ++i) {
    const double q = (i + 0.5) / k;
    v.push_back(-mean * std::log(1.0 - q));
  }
  std::sort(v.begin(), v.end());
  return v;
}

double ToolTtlEstimator::Ttl(const std::string& tool, double benefit_s, double hold_rate,
                             double max_s) const {
  if (!(benefit_s > 0) || !(max_s > 0)) return 0;
  const std::vector<double> d = Samples(tool);
  if (d.empty()) return 0;
  const double n = static_cast<double>(d.size());
  // Sorted durations: at tau = d[i], P(D <= tau) = (i+1)/n and E[min(D, tau)] = (sum of d[0..i]
  // + (n-1-i) * d[i]) / n.
  double best_tau = 0, best_net = 0, prefix = 0;
  for (size_t i = 0; i < d.size(); ++i) {
    prefix += d[i];
    if (i + 1 < d.size() && d[i + 1] == d[i]) continue;  // the last of equal values counts all
    const double tau = d[i];
    const double p = static_cast<double>(i + 1) / n;
    const double held = (prefix + (n - 1 - static_cast<double>(i)) * tau) / n;
    const double net = p * benefit_s - std::max(0.0, hold_rate) * held;
    if (net > best_net + 1e-12) {
      best_net = net;
      best_tau = tau;
    }
  }
  if (best_net <= 0) return 0;
  return std::min(max_s, best_tau * o_.margin + o_.margin_s);
}

void ToolTtlEstimator::NoteTtl(const std::string& tool, double ttl_s) {
  auto it = tools_.find(tool);
  if (it != tools_.end()) it->second.last_ttl_s = ttl_s;
}

nlohmann::json ToolTtlEstimator::Stats() const {
  nlohmann::json tools = nlohmann::json::object();
  for (const auto& [name, t] : tools_) {
    std::vector<double> d(t.durations.begin(), t.durations.end());
    std::sort(d.begin(), d.end());
    double sum = 0;
    for (double x : d) sum += x;
    auto q = [&](double p) {
      return d.empty() ? 0.0 : d[std::min(d.size() - 1, static_cast<size_t>(p * d.size()))];
    };
    tools[name] = {{"calls", t.calls},
                   {"mean_s", d.empty() ? 0.0 : sum / static_cast<double>(d.size())},
                   {"p50_s", q(0.5)},
                   {"p90_s", q(0.9)},
                   {"last_ttl_s", t.last_ttl_s}};
  }
  return {{"tools", tools}, {"prior_mean_s", PriorMean()}};
}

}  // namespace cachette::sched
