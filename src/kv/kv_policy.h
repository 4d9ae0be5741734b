// KV budget policies: which token positions a sequence keeps, per layer and KV head, when its
// KV must fit in a budget. One interface, the policies as small plug-ins (kv_policies.cc);
// the engine side (statistics, compaction, positions) is in engine/kv_budget.h and the
// prefill/decode loop that applies a policy in kv/budget_runner.h.
//
// Budget. B >= 1 is a number of tokens per layer and KV head (truncated to an integer);
// 0 < B < 1 is that fraction of the sequence's length when the policy is applied, rounded up
// (BudgetTokens). Policies with per-layer budgets (PyramidKV, CAKE) spread n_layer x B over
// the layers, so the total is the same.
//
// Rules every policy follows. b is a layer's budget, n its slot count. A layer with n <= b
// keeps every slot; otherwise it keeps exactly b (a per-layer policy: its own b), except that
// a policy reassigning positions keeps one count in every layer. Each KV head chooses its own
// slots (same count per layer); lists are ascending; equal scores keep the lower slot. A
// scoring policy given no statistics (or statistics that do not cover the slots) scores by
// recency, i.e. keeps the newest slots in place of the scored ones.
//
// Policies, parameters [defaults], and what they keep (each paper's released code as guide):
//   streamingllm  [sinks=4] the first min(sinks, b-1) slots + the most recent rest. Positions
//                 reassigned, so every layer keeps one count: min(B, smallest layer).
//   h2o           cumulative attention (every query's). The B/2 most recent slots + the
//                 B - B/2 with the most cumulative attention among the others (the paper's
//                 50/50 split; no sinks).
//   snapkv        [window=32, pool=5 (odd), max_pool=false] the last `window` slots (the
//                 observation window) + the b - window earlier slots with the highest window
//                 attention (win_sum) pooled over the `pool` slots centred on each: averaged
//                 with zero padding (avg_pool1d, the paper's default), or with max_pool the
//                 maximum over the kernel clipped to the slots before the window (max_pool1d,
//                 the other option of the authors' code). b <= window: the b most recent.
//   pyramidkv     [window, pool, beta=20 (>= 1; 1 = uniform)] SnapKV's selection with layer
//                 budgets in an arithmetic sequence (the authors' code): d = B - window,
//                 min = d/beta, max = 2d - min, layer l (0 = lowest) gets
//                 window + max - l (max - min)/(L-1), rounded down, the units lost to rounding
//                 given back by largest fraction (lower layer on ties), so the layers sum to
//                 exactly L x B and lower layers get more. B <= window or L = 1: B everywhere.
//                 A layer shorter than its budget keeps everything; its surplus is not lent.
//   cake          [window, tau1=1, tau2=1, gamma=200 (>= 0)] layer preference
//                 P_l = H_l^(1/tau1) x V_l^(1/tau2) from the window statistics of the slots
//                 before the window: per head, mean m_j = win_sum/win_rows, variance
//                 v_j = max(0, win_sq/win_rows - m_j^2); H = entropy of m normalised to sum 1,
//                 V = sum of v_j; both summed over heads. Layer budgets are shares of L x B
//                 proportional to P (water-filled), each within [min(window+1, B, n), n] (a
//                 short layer lends its surplus to the others), integers summing to at most
//                 L x B. Uniform shares when any P is not finite or all are 0 (no window rows).
//                 Within a layer: the window + the top eviction indicator m_j + gamma x v_j.
//                 Cascading (cascades()): the prompt is read a layer at a time
//                 (Engine::ForwardLayerMajor) and after layer m the layers [0, m] share the
//                 whole L x B by the same rule (layers_seen = m + 1), each layer's preference
//                 taken when it is read (from its whole prompt) and kept for later stages. A
//                 layer's budget only shrinks as later layers join (water-filling over more
//                 preferences lowers the level), the layers read hold at most L x B slots
//                 besides the one being read, and the last stage (layers_seen = L) is the
//                 one-shot allocation (up to integer rounding: an earlier stage may have kept
//                 one fewer). The scheduler reads a cascading prompt a few layers per step.
//                 No exact KV of the prompt exists whole, so none enters the prefix cache,
//                 and the scheduler does not reuse a cached prefix for it either (the first
//                 stage evicting inside it would copy its pages). cascade=false reads the
//                 prompt whole, leaves its exact KV in the prefix cache and compacts once
//                 (the one-shot allocation; full KV until then).
//   lacache       [sinks=4, lacache_span S (0 = b/4), lacache_overlap O (0 = S/2; < S)] a
//                 score-free ladder. Every layer keeps the first s = min(sinks, b-1) slots,
//                 a band of S slots and the most recent r = b - s - S slots (S capped at
//                 b - s - 1 so r >= 1; O at S - 1). The bands are rungs of the middle
//                 [s, n - r): rung k ends at n - r - k (S - O), so consecutive rungs overlap
//                 by O; layer l takes rung l mod K, K = 1 + (n - r - s - S) / (S - O) the
//                 rungs that fit, so deeper layers keep older context and the ladder starts
//                 over when it reaches the sinks. Positions reassigned; one count per layer
//                 (min(B, smallest layer)). Each compaction (the runner calls Select again as
//                 the region fills) redraws the ladder over what is left: the iterative part.
//   elastic       cumulative attention. Keeps s = min(sinks [4], b - r) first slots, the
//                 r = max(1, b/4) most recent, and the most cumulative attention among the
//                 rest; every evicted slot is merged (KeepPlan::merge_into) into the nearest
//                 kept slot before it, or after it when none is before. Positions kept.
//   blockwise     [window, pool] EpiCache-style block-wise prefill: the prompt is read in
//                 blocks of the budget and compacted after each (SnapKV's selection), so peak
//                 KV stays bounded.
//
// Parameters are validated only for the policies that read them.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "cachette/status.h"
#include "engine/kv_budget.h"

namespace cachette {

struct KvPolicyConfig {
  std::string name;     // one of KvPolicyNames()
  double budget = 0.2;  // >= 1: tokens per layer and head; (0, 1): fraction of the length

  int sinks = 4;          // streamingllm, lacache, elastic: first tokens always kept
  int window = 32;        // snapkv, pyramidkv, cake, blockwise: observation window (queries)
  int pool = 5;           // snapkv, pyramidkv, blockwise: pooling kernel over slots (odd)
  bool max_pool = false;  // snapkv family: max pooling instead of average pooling
  double beta = 20;       // pyramidkv (>= 1)
  double tau1 = 1, tau2 = 1, gamma = 200;  // cake
  int lacache_span = 0;     // lacache S (0 = budget / 4)
  int lacache_overlap = 0;  // lacache O (0 = S / 2)
  bool cascade = true;      // cake: read the prompt a layer at a time (KvPolicy::cascades)
};

// The names accepted by ValidateKvPolicy/MakeKvPolicy, in documentation order.
const std::vector<std::string>& KvPolicyNames();

// Checks a config: kInvalidArgument "kv_policy.name: ..." for an unknown name (listing the
// known ones), "kv_policy.budget: ..." for a budget that is not finite and > 0, and the
// parameter's name for a bad parameter.
Status ValidateKvPolicy(const KvPolicyConfig& config);

// Budget in tokens for a sequence of `length` tokens: at least 1, at most length (0 when
// length <= 0). `budget` must be valid (finite, > 0; checked).
int64_t BudgetTokens(double budget, int64_t length);

// What a policy decides from.
struct KvPolicyInput {
  int n_layer = 0, n_kv_head = 0;
  std::vector<int64_t> layer_tokens;  // slots per layer now
  int64_t budget = 0;                 // tokens per layer and head (average for per-layer ones)
  const AttentionStats* stats = nullptr;  // sized to the sequence; null when none collected
  int64_t tokens_seen = 0;                // positions handed out so far (evicted included)
  // A cascading prefill (KvPolicy::cascades()) in progress: layers [0, layers_seen) have read
  // the prompt, the others not yet (they keep everything). 0 = every layer.
  int layers_seen = 0;
};

// The input for `kv` as it stands: its layers' slot counts and tokens read, `budget` tokens
// per layer, `stats` (may be null), a cascade's stage.
KvPolicyInput PolicyInputFor(const SequenceKv& kv, int64_t budget, const AttentionStats* stats,
                             int layers_seen = 0);

class KvPolicy {
 public:
  virtual ~KvPolicy() = default;
  virtual std::string_view name() const = 0;
  // Statistics the policy reads: the window's attention (window > 0) and/or every query's.
  virtual int stats_window() const { return 0; }
  virtual bool stats_cumulative() const { return false; }
  // Whether positions are reassigned within the cache (the model never sees a position past
  // the slot count, so generation may run past the context).
  virtual bool reassigns_positions() const { return false; }
  // Whether a long prompt is read in blocks of the budget, compacting after each block.
  virtual bool blockwise_prefill() const { return false; }
  // Whether the prompt is read a layer at a time, the layers read so far compacted after each
  // (KvPolicyInput::layers_seen), so peak KV stays near the budget (CAKE's cascade).
  virtual bool cascades() const { return false; }
  // The most slots one layer may keep after a compaction, for a budget of `budget` tokens per
  // layer over n_layer layers (the paged KV sizes a sequence by its longest layer).
  virtual int64_t MaxLayerKept(int64_t budget, int n_layer) const {
    (void)n_layer;
    return budget;
  }
  // The keep plan for `in`. Every layer keeps at most its budget (a per-layer policy: its
  // share); a layer already within budget may be left as it is. The plan is valid for
  // in.layer_tokens (KeepPlan::Validate).
  virtual KeepPlan Select(const KvPolicyInput& in) = 0;
};

// The policy `config` names (validated).
Result<std::unique_ptr<KvPolicy>> MakeKvPolicy(const KvPolicyConfig& config);

}  // namespace cachette
