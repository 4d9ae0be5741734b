// The KV budget policies declared in kv_policy.h: names, validation, budgets in tokens and one
// small class per policy. Every Select() is a pure function of its input, except that CAKE's
// cascade remembers each layer's preference from the stage that read it; the exact rules (and
// the defaults) are written once, in kv_policy.h's header comment.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <numeric>

#include "core/check.h"
#include "kv/kv_policy.h"

namespace cachette {
namespace {

using SlotList = std::vector<int64_t>;

constexpr double kLowest = -std::numeric_limits<double>::infinity();

std::string Num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

// NaN would break the strict ordering the selections sort by; it ranks lowest instead.
double Clean(double v) { return std::isnan(v) ? kLowest : v; }

// ---- Selection helpers ---------------------------------------------------------------------

// A plan shaped for `in` with every slot list empty.
KeepPlan EmptyPlan(const KvPolicyInput& in) {
  KeepPlan plan;
  plan.slots.assign(in.n_layer, std::vector<SlotList>(in.n_kv_head));
  return plan;
}

void AppendRange(int64_t begin, int64_t end, SlotList& out) {
  for (int64_t s = begin; s < end; ++s) out.push_back(s);
}

// Appends the `k` slots of [begin, end) with the highest score[slot] to `out`, unordered;
// among equal scores the lower slot wins.
void AppendTop(const std::vector<double>& score, int64_t begin, int64_t end, int64_t k,
               SlotList& out) {
  k = std::clamp<int64_t>(k, 0, end - begin);
  if (k == 0) return;
  SlotList candidates(end - begin);
  std::iota(candidates.begin(), candidates.end(), begin);
  auto better = [&](int64_t a, int64_t b) {
    return score[a] != score[b] ? score[a] > score[b] : a < b;
  };
  if (k < static_cast<int64_t>(candidates.size())) {
    std::nth_element(candidates.begin(), candidates.begin() + k, candidates.end(), better);
  }
  out.insert(out.end(), candidates.begin(), candidates.begin() + k);
}

// The shape every policy keeps in a layer of n slots over budget b: the first `sinks` slots,
// the last `recent` slots, and the b - sinks - recent best-scored slots between them (score
// indexed by slot, read on [sinks, n - recent)). Everything when n <= b. Sorted.
SlotList KeepSinksTopRecent(int64_t n, int64_t b, int64_t sinks, int64_t recent,
                            const std::vector<double>& score) {
  SlotList keep;
  if (n <= b) {
    AppendRange(0, n, keep);
    return keep;
  }
  CT_CHECK(sinks >= 0 && recent >= 0 && sinks + recent <= b)
      << "sinks " << sinks << " recent " << recent << " budget " << b;
  keep.reserve(b);
  AppendRange(0, sinks, keep);
  AppendTop(score, sinks, n - recent, b - sinks - recent, keep);
  std::sort(keep.begin() + sinks, keep.end());
  AppendRange(n - recent, n, keep);
  return keep;
}

// Sinks that still leave the newest slot in a budget of b.
int64_t SinksFor(int sinks, int64_t b) {
  return std::clamp<int64_t>(sinks, 0, std::max<int64_t>(b - 1, 0));
}

// The one count every layer keeps under a policy that reassigns positions: the budget, or the
// smallest layer when that holds fewer (KeepPlan needs equal counts to reassign).
int64_t CommonCount(const KvPolicyInput& in) {
  if (in.layer_tokens.empty()) return 0;
  const int64_t smallest = *std::min_element(in.layer_tokens.begin(), in.layer_tokens.end());
  return std::min(in.budget, smallest);
}

void CheckInput(const KvPolicyInput& in) {
  CT_CHECK(in.n_layer >= 0 && in.n_kv_head >= 1)
      << in.n_layer << " layers, " << in.n_kv_head << " KV heads";
  CT_CHECK_EQ(static_cast<int64_t>(in.layer_tokens.size()), static_cast<int64_t>(in.n_layer));
  CT_CHECK(in.budget >= 1) << "budget " << in.budget << " tokens";
}

// The statistics, or null when there are none or they do not cover every layer's slots (the
// scoring policies then fall back to recency: see kv_policy.h).
const AttentionStats* UsableStats(const KvPolicyInput& in) {
  const AttentionStats* s = in.stats;
  if (s == nullptr || s->n_layer != in.n_layer || s->n_kv_head != in.n_kv_head) return nullptr;
  for (int64_t n : in.layer_tokens) {
    if (n > s->capacity) return nullptr;
  }
  return s;
}

// Scores for the recency fallback: later slots rank higher.
void RecencyScores(int64_t count, std::vector<double>& score) {
  score.resize(count);
  std::iota(score.begin(), score.end(), 0.0);
}

// SnapKV's scores for slots [0, count): the window's attention per slot, pooled over the
// `pool` slots centred on it: averaged with the kernel zero-padded at the ends (avg_pool1d's
// default, which divides by `pool` everywhere), or the maximum over the clipped kernel.
void PooledWindowScores(const AttentionStats& stats, int layer, int head, int64_t count, int pool,
                        bool max_pool, std::vector<double>& score) {
  const float* sum = stats.WinSum(layer, head);
  const int64_t half = pool / 2;
  score.resize(count);
  for (int64_t j = 0; j < count; ++j) {
    double best = kLowest, total = 0;
    const int64_t end = std::min(count, j + half + 1);
    for (int64_t i = std::max<int64_t>(0, j - half); i < end; ++i) {
      best = std::max(best, Clean(sum[i]));
      total += Clean(sum[i]);
    }
    score[j] = max_pool ? best : total / static_cast<double>(pool);
  }
}

// The SnapKV family's keep list for one head: the last min(window, b) slots and the best
// pooled scores before them.
SlotList SnapKeep(const KvPolicyInput& in, const AttentionStats* stats, int layer, int head,
                  int64_t b, int window, int pool, bool max_pool) {
  const int64_t n = in.layer_tokens[layer];
  const int64_t w = std::min<int64_t>(window, b);
  std::vector<double> score;
  if (n > b && b > w) {
    if (stats != nullptr) {
      PooledWindowScores(*stats, layer, head, n - w, pool, max_pool, score);
    } else {
      RecencyScores(n - w, score);
    }
  }
  return KeepSinksTopRecent(n, b, 0, w, score);
}

// Integer budgets from real shares (each >= 0): every share rounded down (and capped at
// hi[l]), then the units still missing to `total` handed out one at a time by largest
// fraction, lower layer first on ties, never past hi[l]. The result sums to at most `total`
// when the shares do.
std::vector<int64_t> RoundShares(const std::vector<double>& share, int64_t total,
                                 const std::vector<int64_t>& hi) {
  const size_t n = share.size();
  std::vector<int64_t> out(n);
  int64_t left = total;
  for (size_t l = 0; l < n; ++l) {
    out[l] = std::min(hi[l], static_cast<int64_t>(std::floor(share[l])));
    left -= out[l];
  }
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return share[a] - std::floor(share[a]) > share[b] - std::floor(share[b]);
  });
  bool progressed = true;
  while (left > 0 && progressed) {
    progressed = false;
    for (size_t l : order) {
      if (left == 0) break;
      if (out[l] < hi[l]) {
        ++out[l];
        --left;
        progressed = true;
      }
    }
  }
  return out;
}

// Shares of `total` proportional to `weight` (>= 0, some > 0), each clamped to [lo, hi]
// (water-filling: the layers held at a bound give their surplus or deficit to the others),
// as integers summing to min(total, sum of hi). Requires sum of lo <= total.
std::vector<int64_t> ProportionalBudgets(const std::vector<double>& weight,
                                         const std::vector<int64_t>& lo,
                                         const std::vector<int64_t>& hi, int64_t total) {
  const size_t n = weight.size();
  if (std::accumulate(hi.begin(), hi.end(), int64_t{0}) <= total) return hi;
  const double weight_sum = std::accumulate(weight.begin(), weight.end(), 0.0);
  auto shares = [&](double lambda) {
    std::vector<double> s(n);
    for (size_t l = 0; l < n; ++l) {
      s[l] = std::clamp(lambda * (weight[l] / weight_sum), static_cast<double>(lo[l]),
                        static_cast<double>(hi[l]));
    }
    return s;
  };
  auto sum = [](const std::vector<double>& s) { return std::accumulate(s.begin(), s.end(), 0.0); };
  const double goal = static_cast<double>(total);
  double lam_lo = 0, lam_hi = goal;
  for (int i = 0; i < 64 && sum(shares(lam_hi)) < goal; ++i) lam_hi *= 2;
  if (sum(shares(lam_hi)) <= goal) {
    lam_lo = lam_hi;
  } else {
    for (int i = 0; i < 100; ++i) {
      const double mid = 0.5 * (lam_lo + lam_hi);
      (sum(shares(mid)) <= goal ? lam_lo : lam_hi) = mid;
    }
  }
  return RoundShares(shares(lam_lo), total, hi);
}

// ---- streamingllm --------------------------------------------------------------------------

class StreamingLlmPolicy final : public KvPolicy {
 public:
  explicit StreamingLlmPolicy(const KvPolicyConfig& c) : sinks_(c.sinks) {}
  std::string_view name() const override { return "streamingllm"; }
  bool reassigns_positions() const override { return true; }

  KeepPlan Select(const KvPolicyInput& in) override {
    CheckInput(in);
    KeepPlan plan = EmptyPlan(in);
    plan.reassign_positions = true;
    const int64_t b = CommonCount(in);
    const int64_t sinks = SinksFor(sinks_, b);
    for (int l = 0; l < in.n_layer; ++l) {
      const SlotList keep = KeepSinksTopRecent(in.layer_tokens[l], b, sinks, b - sinks, {});
      for (auto& head : plan.slots[l]) head = keep;
    }
    return plan;
  }

 private:
  int sinks_;
};

// ---- h2o -----------------------------------------------------------------------------------

class H2oPolicy final : public KvPolicy {
 public:
  explicit H2oPolicy(const KvPolicyConfig&) {}
  std::string_view name() const override { return "h2o"; }
  bool stats_cumulative() const override { return true; }

  KeepPlan Select(const KvPolicyInput& in) override {
    CheckInput(in);
    KeepPlan plan = EmptyPlan(in);
    const AttentionStats* stats = UsableStats(in);
    const int64_t b = in.budget, recent = in.budget / 2;
    std::vector<double> score;
    for (int l = 0; l < in.n_layer; ++l) {
      const int64_t n = in.layer_tokens[l];
      for (int h = 0; h < in.n_kv_head; ++h) {
        if (n > b) {
          if (stats != nullptr) {
            const float* cum = stats->Cum(l, h);
            score.resize(n);
            for (int64_t j = 0; j < n; ++j) score[j] = Clean(cum[j]);
          } else {
            RecencyScores(n, score);
          }
        }
        plan.slots[l][h] = KeepSinksTopRecent(n, b, 0, recent, score);
      }
    }
    return plan;
  }
};

// ---- snapkv and blockwise ------------------------------------------------------------------

class SnapKvPolicy : public KvPolicy {
 public:
  explicit SnapKvPolicy(const KvPolicyConfig& c)
      : window_(c.window), pool_(c.pool), max_pool_(c.max_pool) {}
  std::string_view name() const override { return "snapkv"; }
  int stats_window() const override { return window_; }

  KeepPlan Select(const KvPolicyInput& in) override {
    CheckInput(in);
    KeepPlan plan = EmptyPlan(in);
    const AttentionStats* stats = UsableStats(in);
    for (int l = 0; l < in.n_layer; ++l) {
      for (int h = 0; h < in.n_kv_head; ++h) {
        plan.slots[l][h] = SnapKeep(in, stats, l, h, in.budget, window_, pool_, max_pool_);
      }
    }
    return plan;
  }

 private:
  int window_, pool_;
  bool max_pool_;
};

class BlockwisePolicy final : public SnapKvPolicy {
 public:
  explicit BlockwisePolicy(const KvPolicyConfig& c) : SnapKvPolicy(c) {}
  std::string_view name() const override { return "blockwise"; }
  bool blockwise_prefill() const override { return true; }
};

// ---- pyramidkv -----------------------------------------------------------------------------

// Per-layer budgets (layer 0 = lowest), summing to exactly n_layer * b.
std::vector<int64_t> PyramidBudgets(int n_layer, int64_t b, int window, double beta) {
  if (n_layer < 2 || b <= window) return std::vector<int64_t>(n_layer, b);
  const double d = static_cast<double>(b - window);
  const double min_num = d / beta, max_num = 2 * d - min_num;
  const double step = (max_num - min_num) / (n_layer - 1);
  std::vector<double> share(n_layer);
  for (int l = 0; l < n_layer; ++l) share[l] = window + max_num - l * step;
  return RoundShares(share, n_layer * b,
                     std::vector<int64_t>(n_layer, std::numeric_limits<int64_t>::max()));
}

class PyramidKvPolicy final : public KvPolicy {
 public:
  // Layer 0 gets window + max, below 2 x budget.
  int64_t MaxLayerKept(int64_t budget, int) const override { return 2 * budget; }
  explicit PyramidKvPolicy(const KvPolicyConfig& c)
      : window_(c.window), pool_(c.pool), max_pool_(c.max_pool), beta_(c.beta) {}
  std::string_view name() const override { return "pyramidkv"; }
  int stats_window() const override { return window_; }

  KeepPlan Select(const KvPolicyInput& in) override {
    CheckInput(in);
    KeepPlan plan = EmptyPlan(in);
    const AttentionStats* stats = UsableStats(in);
    const std::vector<int64_t> budgets = PyramidBudgets(in.n_layer, in.budget, window_, beta_);
    for (int l = 0; l < in.n_layer; ++l) {
      for (int h = 0; h < in.n_kv_head; ++h) {
        plan.slots[l][h] = SnapKeep(in, stats, l, h, budgets[l], window_, pool_, max_pool_);
      }
    }
    return plan;
  }

 private:
  int window_, pool_;
  bool max_pool_;
  double beta_;
};

// ---- cake ----------------------------------------------------------------------------------

class CakePolicy final : public KvPolicy {
 public:
  // One layer may take nearly the whole n_layer x budget.
  int64_t MaxLayerKept(int64_t budget, int n_layer) const override { return budget * n_layer; }
  explicit CakePolicy(const KvPolicyConfig& c)
      : window_(c.window), tau1_(c.tau1), tau2_(c.tau2), gamma_(c.gamma), cascade_(c.cascade) {}
  std::string_view name() const override { return "cake"; }
  int stats_window() const override { return window_; }
  bool cascades() const override { return cascade_; }

  KeepPlan Select(const KvPolicyInput& in) override {
    CheckInput(in);
    KeepPlan plan = EmptyPlan(in);
    const AttentionStats* stats = UsableStats(in);
    const int seen = Seen(in);
    const std::vector<int64_t> budgets = LayerBudgets(in, stats, seen);
    std::vector<double> score;
    for (int l = 0; l < in.n_layer; ++l) {
      const int64_t n = in.layer_tokens[l];
      const int64_t b = l < seen ? budgets[l] : n;  // a layer not read yet keeps everything
      const int64_t w = std::min<int64_t>(window_, b);
      const int64_t rows = stats != nullptr ? stats->win_rows[l] : 0;
      for (int h = 0; h < in.n_kv_head; ++h) {
        if (n > b && b > w) {
          if (rows > 0) {
            // Eviction indicator: mean + gamma * variance over the window's queries.
            const float* sum = stats->WinSum(l, h);
            const float* sq = stats->WinSq(l, h);
            score.resize(n - w);
            for (int64_t j = 0; j < n - w; ++j) {
              const double mean = sum[j] / static_cast<double>(rows);
              const double var = std::max(0.0, sq[j] / static_cast<double>(rows) - mean * mean);
              score[j] = Clean(mean + gamma_ * var);
            }
          } else {
            RecencyScores(n - w, score);
          }
        }
        plan.slots[l][h] = KeepSinksTopRecent(n, b, 0, w, score);
      }
    }
    return plan;
  }

 private:
  // P_l = H_l^(1/tau1) * V_l^(1/tau2) over the slots before the window, summed over heads;
  // NaN when the layer has no window statistics.
  double Preference(const AttentionStats& stats, int layer, int64_t n) const {
    const int64_t rows = stats.win_rows[layer];
    if (rows <= 0) return std::numeric_limits<double>::quiet_NaN();
    const int64_t count = std::max<int64_t>(0, n - window_);
    double entropy = 0, variance = 0;
    std::vector<double> mean(count);
    for (int h = 0; h < stats.n_kv_head; ++h) {
      const float* sum = stats.WinSum(layer, h);
      const float* sq = stats.WinSq(layer, h);
      double total = 0;
      for (int64_t j = 0; j < count; ++j) {
        mean[j] = std::max(0.0, sum[j] / static_cast<double>(rows));
        variance += std::max(0.0, sq[j] / static_cast<double>(rows) - mean[j] * mean[j]);
        total += mean[j];
      }
      if (total <= 0) continue;
      for (int64_t j = 0; j < count; ++j) {
        const double p = mean[j] / total;
        if (p > 0) entropy -= p * std::log(p);
      }
    }
    return std::pow(entropy, 1 / tau1_) * std::pow(variance, 1 / tau2_);
  }

  static int Seen(const KvPolicyInput& in) {
    return in.layers_seen > 0 ? std::min(in.layers_seen, in.n_layer) : in.n_layer;
  }

  // Budgets of layers [0, seen): shares of the whole n_layer x budget.
  std::vector<int64_t> LayerBudgets(const KvPolicyInput& in, const AttentionStats* stats,
                                    int seen) const {
    std::vector<double> weight(seen, 1.0);
    if (stats != nullptr) {
      // A cascade computes a layer's preference at the stage that read it, from its whole
      // prompt, and keeps it for the later stages (which see the layer compacted).
      if (in.layers_seen > 0) {
        if (in.layers_seen == 1) cascade_pref_.clear();
        while (static_cast<int>(cascade_pref_.size()) < seen) {
          const int l = static_cast<int>(cascade_pref_.size());
          cascade_pref_.push_back(Preference(*stats, l, in.layer_tokens[l]));
        }
      }
      double total = 0;
      bool usable = true;
      for (int l = 0; l < seen && usable; ++l) {
        weight[l] = in.layers_seen > 0 ? cascade_pref_[l]
                                       : Preference(*stats, l, in.layer_tokens[l]);
        usable = std::isfinite(weight[l]) && weight[l] >= 0;
        total += weight[l];
      }
      if (!usable || !(total > 0) || !std::isfinite(total)) weight.assign(seen, 1.0);
    }
    std::vector<int64_t> lo(seen), hi(in.layer_tokens.begin(), in.layer_tokens.begin() + seen);
    for (int l = 0; l < seen; ++l) {
      lo[l] = std::min({hi[l], static_cast<int64_t>(window_) + 1, in.budget});
    }
    return ProportionalBudgets(weight, lo, hi, in.n_layer * in.budget);
  }

  int window_;
  double tau1_, tau2_, gamma_;
  bool cascade_;
  mutable std::vector<double> cascade_pref_;  // [layer] at the stage that read it
};

// ---- lacache -------------------------------------------------------------------------------

class LaCachePolicy final : public KvPolicy {
 public:
  explicit LaCachePolicy(const KvPolicyConfig& c)
      : sinks_(c.sinks), span_(c.lacache_span), overlap_(c.lacache_overlap) {}
  std::string_view name() const override { return "lacache"; }
  bool reassigns_positions() const override { return true; }

  KeepPlan Select(const KvPolicyInput& in) override {
    CheckInput(in);
    KeepPlan plan = EmptyPlan(in);
    plan.reassign_positions = true;
    const int64_t b = CommonCount(in);
    const int64_t sinks = SinksFor(sinks_, b);
    const int64_t span = std::min<int64_t>(span_ > 0 ? span_ : b / 4, b - sinks - 1);
    const int64_t recent = b - sinks - std::max<int64_t>(span, 0);
    const int64_t overlap = std::min<int64_t>(overlap_ > 0 ? overlap_ : span / 2, span - 1);
    const int64_t step = span - overlap;
    for (int l = 0; l < in.n_layer; ++l) {
      const int64_t n = in.layer_tokens[l];
      SlotList keep;
      if (n <= b || span <= 0) {
        keep = KeepSinksTopRecent(n, b, sinks, b - sinks, {});
      } else {
        // The middle [sinks, n - recent) holds `bands` rungs, each `step` older than the
        // previous; layer l takes rung l mod bands (n > b makes the middle longer than span).
        const int64_t middle = n - recent - sinks;
        const int64_t bands = 1 + (middle - span) / step;
        const int64_t end = n - recent - (l % bands) * step;
        AppendRange(0, sinks, keep);
        AppendRange(end - span, end, keep);
        AppendRange(n - recent, n, keep);
      }
      for (auto& head : plan.slots[l]) head = keep;
    }
    return plan;
  }

 private:
  int sinks_, span_, overlap_;
};

// ---- elastic -------------------------------------------------------------------------------

// For each slot of [0, n) not in `keep` (sorted), the nearest kept slot before it, or after
// it when none is before; -1 for kept slots (and for every slot when nothing is kept).
SlotList MergeTargets(int64_t n, const SlotList& keep) {
  SlotList target(n, -1);
  if (keep.empty()) return target;
  size_t next = 0;  // index in keep of the first kept slot >= s
  int64_t before = -1;
  for (int64_t s = 0; s < n; ++s) {
    if (next < keep.size() && keep[next] == s) {
      before = s;
      ++next;
      continue;
    }
    target[s] = before >= 0 ? before : keep[next];
  }
  return target;
}

class ElasticPolicy final : public KvPolicy {
 public:
  explicit ElasticPolicy(const KvPolicyConfig& c) : sinks_(c.sinks) {}
  std::string_view name() const override { return "elastic"; }
  bool stats_cumulative() const override { return true; }

  KeepPlan Select(const KvPolicyInput& in) override {
    CheckInput(in);
    KeepPlan plan = EmptyPlan(in);
    plan.merge_into.assign(in.n_layer, std::vector<SlotList>(in.n_kv_head));
    const AttentionStats* stats = UsableStats(in);
    const int64_t b = in.budget;
    const int64_t recent = std::max<int64_t>(1, b / 4);
    const int64_t sinks = std::clamp<int64_t>(sinks_, 0, b - recent);
    std::vector<double> score;
    for (int l = 0; l < in.n_layer; ++l) {
      const int64_t n = in.layer_tokens[l];
      for (int h = 0; h < in.n_kv_head; ++h) {
        if (n > b) {
          if (stats != nullptr) {
            const float* cum = stats->Cum(l, h);
            score.resize(n);
            for (int64_t j = 0; j < n; ++j) score[j] = Clean(cum[j]);
          } else {
            RecencyScores(n, score);
          }
        }
        plan.slots[l][h] = KeepSinksTopRecent(n, b, sinks, recent, score);
        plan.merge_into[l][h] = MergeTargets(n, plan.slots[l][h]);
      }
    }
    return plan;
  }

 private:
  int sinks_;
};

// ---- Names and validation ------------------------------------------------------------------

enum class Kind { kStreamingLlm, kH2o, kSnapKv, kPyramidKv, kCake, kLaCache, kElastic, kBlockwise };

struct Entry {
  const char* name;
  Kind kind;
};
constexpr Entry kPolicies[] = {
    {"streamingllm", Kind::kStreamingLlm},
    {"h2o", Kind::kH2o},
    {"snapkv", Kind::kSnapKv},
    {"pyramidkv", Kind::kPyramidKv},
    {"cake", Kind::kCake},
    {"lacache", Kind::kLaCache},
    {"elastic", Kind::kElastic},
    {"blockwise", Kind::kBlockwise},
};

Status Bad(const char* field, const std::string& what) {
  return InvalidArgument(std::string("kv_policy.") + field + ": " + what);
}

Status CheckInt(const char* field, int v, int min) {
  if (v >= min) return Status::Ok();
  return Bad(field, "must be >= " + std::to_string(min) + " (got " + std::to_string(v) + ")");
}

Status CheckPositive(const char* field, double v) {
  if (std::isfinite(v) && v > 0) return Status::Ok();
  return Bad(field, "must be a finite number > 0 (got " + Num(v) + ")");
}

Status CheckParameters(Kind kind, const KvPolicyConfig& c) {
  const bool uses_sinks =
      kind == Kind::kStreamingLlm || kind == Kind::kLaCache || kind == Kind::kElastic;
  const bool uses_window = kind == Kind::kSnapKv || kind == Kind::kPyramidKv ||
                           kind == Kind::kCake || kind == Kind::kBlockwise;
  const bool uses_pool =
      kind == Kind::kSnapKv || kind == Kind::kPyramidKv || kind == Kind::kBlockwise;
  if (uses_sinks) CT_RETURN_IF_ERROR(CheckInt("sinks", c.sinks, 0));
  if (uses_window) CT_RETURN_IF_ERROR(CheckInt("window", c.window, 1));
  if (uses_pool && (c.pool < 1 || c.pool % 2 == 0)) {
    return Bad("pool", "must be odd and >= 1 (got " + std::to_string(c.pool) + ")");
  }
  if (kind == Kind::kPyramidKv && !(std::isfinite(c.beta) && c.beta >= 1)) {
    return Bad("beta", "must be a finite number >= 1 (got " + Num(c.beta) + ")");
  }
  if (kind == Kind::kCake) {
    CT_RETURN_IF_ERROR(CheckPositive("tau1", c.tau1));
    CT_RETURN_IF_ERROR(CheckPositive("tau2", c.tau2));
    if (!(std::isfinite(c.gamma) && c.gamma >= 0)) {
      return Bad("gamma", "must be a finite number >= 0 (got " + Num(c.gamma) + ")");
    }
  }
  if (kind == Kind::kLaCache) {
    CT_RETURN_IF_ERROR(CheckInt("lacache_span", c.lacache_span, 0));
    CT_RETURN_IF_ERROR(CheckInt("lacache_overlap", c.lacache_overlap, 0));
    if (c.lacache_span > 0 && c.lacache_overlap >= c.lacache_span) {
      return Bad("lacache_overlap", "must be < lacache_span (" + std::to_string(c.lacache_span) +
                                        ", got " + std::to_string(c.lacache_overlap) + ")");
    }
  }
  return Status::Ok();
}

Result<Kind> FindKind(std::string_view name) {
  for (const Entry& e : kPolicies) {
    if (name == e.name) return e.kind;
  }
  std::string known;
  for (const Entry& e : kPolicies) known += std::string(known.empty() ? "" : ", ") + e.name;
  return Bad("name", "unknown policy '" + std::string(name) + "' (known: " + known + ")");
}

}  // namespace

KvPolicyInput PolicyInputFor(const SequenceKv& kv, int64_t budget, const AttentionStats* stats,
                             int layers_seen) {
  KvPolicyInput in;
  in.n_layer = kv.shape().n_layer;
  in.n_kv_head = kv.shape().n_kv_head;
  for (int l = 0; l < in.n_layer; ++l) in.layer_tokens.push_back(kv.layer_tokens(l));
  in.budget = budget;
  in.stats = stats;
  in.tokens_seen = kv.tokens_seen();
  in.layers_seen = layers_seen;
  return in;
}

const std::vector<std::string>& KvPolicyNames() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> v;
    for (const Entry& e : kPolicies) v.emplace_back(e.name);
    return v;
  }();
  return names;
}

Status ValidateKvPolicy(const KvPolicyConfig& config) {
  Result<Kind> kind = FindKind(config.name);
  if (!kind.ok()) return kind.status();
  if (!(std::isfinite(config.budget) && config.budget > 0)) {
    return Bad("budget", "must be a finite number > 0 (got " + Num(config.budget) +
                             "): tokens if >= 1, a fraction of the length below");
  }
  return CheckParameters(*kind, config);
}

int64_t BudgetTokens(double budget, int64_t length) {
  CT_CHECK(std::isfinite(budget) && budget > 0) << "budget " << budget;
  if (length <= 0) return 0;
  const double n = static_cast<double>(length);
  // Below 1 a fraction, rounded up; products within 1e-9 of an integer (0.07 * 100) count as it.
  const double tokens = budget >= 1 ? std::floor(budget) : std::ceil(budget * n - 1e-9);
  return static_cast<int64_t>(std::clamp(tokens, 1.0, n));
}

Result<std::unique_ptr<KvPolicy>> MakeKvPolicy(const KvPolicyConfig& config) {
  CT_RETURN_IF_ERROR(ValidateKvPolicy(config));
  std::unique_ptr<KvPolicy> policy;
  switch (*FindKind(config.name)) {
    case Kind::kStreamingLlm:
      policy = std::make_unique<StreamingLlmPolicy>(config);
      break;
    case Kind::kH2o:
      policy = std::make_unique<H2oPolicy>(config);
      break;
    case Kind::kSnapKv:
      policy = std::make_unique<SnapKvPolicy>(config);
      break;
    case Kind::kPyramidKv:
      policy = std::make_unique<PyramidKvPolicy>(config);
      break;
    case Kind::kCake:
      policy = std::make_unique<CakePolicy>(config);
      break;
    case Kind::kLaCache:
      policy = std::make_unique<LaCachePolicy>(config);
      break;
    case Kind::kElastic:
      policy = std::make_unique<ElasticPolicy>(config);
      break;
    case Kind::kBlockwise:
      policy = std::make_unique<BlockwisePolicy>(config);
      break;
  }
  return policy;
}

}  // namespace cachette
