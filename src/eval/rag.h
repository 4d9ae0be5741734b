// Multi-document QA with document KV reused anywhere in the prompt (`cachette eval rag`).
//
// Each item is a list of documents, a question ending in "Answer:" and the expected answer.
// The prompt is BOS + the documents in order + the question, each part tokenized on its own
// (segment boundaries are token boundaries). Every document is first computed on its own after
// BOS (the ingestion a RAG service does ahead of queries; not timed), then the prompt is
// prefilled once per configuration (a reuse mode and, for blend, a recompute ratio) from those
// cached documents, and the answer decoded greedily as in `eval retrieval`, scored by exact
// match. The first document sits where it was computed, after BOS: every mode but full takes
// it as an exact prefix; the others move (their keys re-rotated) and lose their attention to
// what now precedes them, which is what naive, blend and the other modes differ on.
//
// APE lays the documents out in parallel after BOS (engine/ape.h) and decodes with its
// two-part attention, one sequence at a time.
//
// TTFT per configuration: the wall time from the cached documents to the first token's logits
// (placement, re-rotation, recompute; BOS is in the sequence already in every mode).
//
// Thread-safety: uses the engine (one call at a time per Engine).
#pragma once

#include <functional>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "cachette/status.h"
#include "engine/ape.h"
#include "engine/engine.h"
#include "engine/segment_reuse.h"

namespace cachette::eval {

struct RagItem {
  std::string kind;  // "facts", "kv", "needle"
  int hops = 1;
  std::vector<std::string> docs;
  std::string question;  // ends with "Answer:"
  std::string answer;
  int line = 0;  // 1-based line in its JSONL source
};

// Parses JSON lines of objects with `kind` (string), `docs` (non-empty array of strings),
// `question` and `answer` (strings), `hops` (optional integer >= 1). Blank lines are skipped.
// kInvalidArgument "<source>:<line>: <why>" naming the field for the first bad line.
Result<std::vector<RagItem>> ParseRagJsonl(std::string_view text, std::string_view source);

// The log-softmax of `logits` into `out` (resized), in double.
void LogSoftmax(std::span<const float> logits, std::vector<double>& out);
// KL(p || q) in nats from two log-probability vectors of one size (LogSoftmax's), never below
// 0 (rounding): how far a reuse mode's next-token distribution q is from full prefill's p.
double KlDivergence(std::span<const double> log_p, std::span<const double> log_q);

// One measured configuration.
struct RagConfig {
  ReuseMode mode = ReuseMode::kFull;
  double ratio = 0;  // blend's recompute ratio, cachecraft's alpha
  CraftChoice craft = ReuseOptions{}.craft_choice;  // cachecraft's choice of tokens

  // "full", "naive", "blend@0.15", "cachecraft@0.2", and "cachecraft:prompt@0.2" for a choice
  // of tokens other than ReuseOptions' default.
  std::string Name() const;
};

struct RagOptions {
  std::vector<RagConfig> configs;
  ApeOptions ape;  // T and S of the ape configuration
  int extra_answer_tokens = 8;  // decode budget beyond the expected answer's tokens
  std::function<void(int, int)> progress;  // (items done, items in all)
};

struct RagOutcome {
  int index = 0;
  std::string kind;
  int hops = 1;
  int64_t prompt_tokens = 0;
  bool skipped = false;  // prompt + answer budget beyond the model's context
  std::vector<std::string> answers;  // per configuration
  std::vector<bool> correct;
  std::vector<double> ttft_s;
  std::vector<ReuseReport> reports;
  // With a full configuration: KL(full || this) of the first answer token's distribution, in
  // nats (0 for full itself); empty without one.
  std::vector<double> kl_vs_full;
};

struct RagResult {
  std::vector<std::string> configs;
  int full_index = -1;  // the full prefill configuration, -1 when not measured
  std::vector<RagOutcome> outcomes;
  double seconds = 0;

  // Groups: "all", each kind, "hops=2": {n scored, correct per configuration}.
  struct Score {
    int n = 0;
    std::vector<int> correct;
  };
  std::map<std::string, Score> Scores() const;
  // Per configuration over scored items: median TTFT, reused and recomputed token totals.
  std::vector<double> MedianTtft() const;
  std::vector<ReuseReport> Totals() const;
  // The reuse loss itself, whatever the model's accuracy, against the full configuration
  // (empty without one): the share of scored items whose answer equals full prefill's, and
  // the mean KL(full || config) of the first answer token.
  std::vector<double> AgreementWithFull() const;
  std::vector<double> MeanKlVsFull() const;
  int n_skipped() const;
};

// Runs every item under every configuration. kInvalidArgument for no configuration or a blend
// ratio outside [0, 1]; engine errors otherwise. Items beyond the model's context are skipped
// and counted.
Result<RagResult> EvalRag(Engine& engine, std::span<const RagItem> items,
                          const RagOptions& options);

}  // namespace cachette::eval
