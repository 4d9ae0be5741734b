// Quality of KV budget policies (kv/kv_policy.h) against full KV, in one run
// (`cachette eval ppl|retrieval --kv-policy NAMES --budget B,...`).
//
// Perplexity: windows of `ctx` tokens as in perplexity.h (second half scored). The first half
// is the "prompt": it is prefilled once with full attention, collecting the statistics every
// policy asks for, and the full-KV baseline scores the second half over it. Each policy then
// starts from that prefill (BudgetRunner::StartFrom: copied and compacted to B x ctx/2 tokens,
// or, for block-wise prefill, read again in blocks) and scores the second half in steps of
// `step` tokens, compacting again whenever `step` tokens have been added, so every scored
// token sees at most budget + step slots.
//
// Retrieval: each prompt (all but its last token) is prefilled once with full attention and
// statistics; the baseline decodes over it, and each policy decodes after compacting it to
// B x the prompt's length (the SnapKV family's observation window is the prompt's end: the
// question). Scoring as in retrieval.h (exact match).
//
// Streaming: one long text scored with a policy that reassigns positions (StreamingLLM), in
// steps, with the cache never above `cache` slots: perplexity per window of `report` tokens and
// the process's peak RSS; beside it, the same windows scored with full KV and the context
// restarting at each window's first token (the alternative for a model that cannot read past
// its context).
//
// Thread-safety: uses the engine (one call at a time per Engine).
#pragma once

#include <functional>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "cachette/status.h"
#include "engine/engine.h"
#include "eval/retrieval.h"
#include "kv/kv_policy.h"

namespace cachette::eval {

// "snapkv@0.2", "h2o@512"; "full" for the baseline.
std::string PolicyLabel(const KvPolicyConfig& config);

struct PolicyPplOptions {
  int ctx = 1024;
  std::vector<KvPolicyConfig> policies;  // each with one budget
  int step = 16;                         // tokens scored per step (and compaction slack)
  TokenId bos = -1;                      // replaces each window's first token; -1 = keep it
  std::function<void(int, int)> progress;
};

struct PolicyPplFigure {
  std::string label;  // PolicyLabel, "full" for the baseline
  double nll_sum = 0;
  int64_t n_scored = 0;
  double kept_sum = 0;    // KV slots per layer seen by the scored steps, summed per step
  int64_t steps = 0;
  int64_t peak_kept = 0;  // most slots per layer held at once
  double seconds = 0;

  double mean_nll() const { return n_scored > 0 ? nll_sum / static_cast<double>(n_scored) : 0; }
  double ppl() const;
  double mean_kept() const { return steps > 0 ? kept_sum / static_cast<double>(steps) : 0; }
};

struct PolicyPplResult {
  int ctx = 0;
  int n_windows = 0;
  int64_t n_input_tokens = 0;
  std::vector<PolicyPplFigure> figures;  // [0] = full KV, then options.policies
};

Result<PolicyPplResult> EvalPolicyPerplexity(Engine& engine, std::span<const TokenId> tokens,
                                             const PolicyPplOptions& options);

struct PolicyRetrievalOptions {
  std::vector<KvPolicyConfig> policies;
  int extra_answer_tokens = 8;
  std::function<void(int, int)> progress;
};

struct PolicyRetrievalResult {
  // configs: "full", then PolicyLabel of each policy; outcomes and ByKind() as in retrieval.h
  // (bytes_per_token and roundtrip unused).
  RetrievalResult r;
  std::vector<double> kept_sum;  // per config: kept slots per layer after the prompt, summed
  std::vector<int64_t> peak_kept;
};

Result<PolicyRetrievalResult> EvalPolicyRetrieval(Engine& engine, std::span<const QaItem> items,
                                                  const PolicyRetrievalOptions& options);

struct StreamingOptions {
  KvPolicyConfig policy;  // must reassign positions (streamingllm, lacache)
  int cache = 2048;       // most KV slots per layer at any time
  int step = 64;          // tokens per step (and compaction slack)
  int report = 2048;      // tokens per reported window (at most the model's context)
  // Also score each window with full KV over that window alone (the context restarting at
  // its first token): what a model limited to its context does without a policy.
  bool baseline = true;
  std::function<void(int64_t, int64_t)> progress;
};

struct StreamingWindow {
  int64_t first_token = 0;
  int64_t n_scored = 0;
  double nll_sum = 0;
  int64_t peak_rss_bytes = 0;  // of the process, after the window
  double full_nll_sum = 0;     // the restarting full-KV baseline over the same tokens
  double ppl() const;
  double full_ppl() const;
};

struct StreamingResult {
  std::vector<StreamingWindow> windows;
  int64_t n_scored = 0;
  double nll_sum = 0;
  int64_t max_kept = 0;
  double seconds = 0;
};

Result<StreamingResult> EvalStreaming(Engine& engine, std::span<const TokenId> tokens,
                                      const StreamingOptions& options);

}  // namespace cachette::eval
