// Long-context retrieval accuracy with the KV cache passed through a codec
// (`cachette eval retrieval`).
//
// Each item is a prompt ending in "Answer:" and the expected answer text. The prompt is
// tokenized (with BOS when the vocabulary adds one); all of it but the last token is
// prefilled, that KV is round-tripped through the codec in store chunks (the worst case for a
// restore: every prompt position but the last comes back from the store, a trailing partial
// chunk included), and the answer is decoded greedily from the last prompt token on, until a
// newline, an end-of-generation token, or the expected answer's token count + 8. Scoring is
// exact match (see ExactMatch). The exact-KV baseline shares the prefill and decodes in the
// same batch as the codecs.
//
// Consecutive items often extend the previous prompt (multi-question episodes), so the
// prefill reuses the longest common token prefix with the previous item; codec sequences
// re-encode from the start of the chunk where the prompts diverge, so figures do not depend on
// the order of items.
//
// Thread-safety: uses the engine (one call at a time per Engine).
#pragma once

#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "cachette/status.h"
#include "engine/engine.h"
#include "eval/kv_roundtrip.h"

namespace cachette::eval {

struct QaItem {
  std::string kind;    // "kv", "needle", "facts", "recall", ...
  std::string prompt;  // ends with "Answer:"
  std::string answer;  // the expected text up to the end of the line
  int line = 0;        // 1-based line in its JSONL source (0 for generated items)
};

// Calls item(object, 1-based line) for each non-blank line of JSON-lines `text`.
// kInvalidArgument "<source>:<line>: <why>" for the first line that is not a JSON object or
// that `item` refuses (its message follows the line's name).
Status ForEachJsonLine(std::string_view text, std::string_view source,
                       const std::function<Status(const nlohmann::json&, int)>& item);

// Parses JSON lines of objects with string fields `kind`, `prompt` and `answer` (other fields
// ignored; blank lines skipped). kInvalidArgument "<source>:<line>: <why>" for the first line
// that is not such an object.
Result<std::vector<QaItem>> ParseQaJsonl(std::string_view text, std::string_view source);

// The answer a generation gives: its text up to the first newline, without leading and
// trailing whitespace (spaces, tabs, CR).
std::string AnswerLine(std::string_view generated);
// Whether `generated` answers `expected`: AnswerLine(generated) == AnswerLine(expected),
// case and punctuation included (a trailing period is a wrong answer).
bool ExactMatch(std::string_view generated, std::string_view expected);

struct RetrievalOptions {
  std::vector<std::string> codecs;  // MakeCodec names, measured beside the exact baseline
  int chunk_tokens = 256;           // store chunk size the prompt KV is cut into
  int extra_answer_tokens = 8;      // decode budget beyond the expected answer's tokens
  // Called after each item with (items done, items in all).
  std::function<void(int, int)> progress;
};

// One item's outcome for every configuration ([0] the baseline, then the codecs).
struct QaOutcome {
  int index = 0;  // into the items given
  std::string kind;
  int64_t prompt_tokens = 0;
  bool skipped = false;              // prompt + answer budget beyond the model's context
  std::vector<std::string> answers;  // AnswerLine of each configuration's generation
  std::vector<bool> correct;
};

// One item tokenized for decoding. outcome: index, kind, prompt_tokens and skipped set.
struct PreparedQa {
  QaOutcome outcome;
  std::vector<TokenId> prompt;  // with BOS when the vocabulary adds one
  int answer_budget = 0;        // the expected answer's tokens (after "Answer:") + extra
};

// Tokenizes `item`. Skipped: under min_prompt_tokens prompt tokens, or prompt + budget > n_ctx.
PreparedQa PrepareQa(const Tokenizer& tok, const QaItem& item, int index, int extra_answer_tokens,
                     int64_t n_ctx, size_t min_prompt_tokens);

// One greedy answer, a token at a time: feed `next`, then Take the logits it gave, until done
// (an end-of-generation token, or a newline in the text: the "Answer:" line ended) or the
// caller's token budget runs out.
struct GreedyAnswer {
  explicit GreedyAnswer(TokenId first) : next(first) {}
  TokenId next;              // the token to feed next
  std::vector<TokenId> ids;  // generated, without the end-of-generation token
  std::string text;          // tok.Decode(ids)
  bool done = false;
  // Takes the argmax of `logits` [n_vocab], those after `next`: done on EOG, else appended.
  void Take(const Tokenizer& tok, std::span<const float> logits);
};

// Greedy decoding of several sequences in one batch per step: answers[i] goes on from
// seqs[i]'s end (feeding its `next`) until done or `max_tokens` steps; `steps` counts the
// batched steps.
Status DecodeGreedy(Engine& engine, std::span<SequenceKv* const> seqs,
                    std::span<GreedyAnswer> answers, int max_tokens, int64_t& steps);

struct RetrievalResult {
  std::vector<std::string> configs;       // "" (the exact baseline), then the codec names
  std::vector<double> bytes_per_token;    // per config (baseline: raw KV bytes/token)
  std::vector<RoundTripStats> roundtrip;  // per config ([0] unused)
  std::vector<QaOutcome> outcomes;
  int64_t prefill_tokens = 0;  // tokens actually prefilled (after prefix reuse)
  int64_t decode_steps = 0;
  double seconds = 0;

  // Per kind (sorted), then "all": {n scored, correct per config}.
  struct Score {
    int n = 0;
    std::vector<int> correct;
  };
  std::map<std::string, Score> ByKind() const;
  int n_skipped() const;
};

// Runs every item. kInvalidArgument for an unknown codec name; engine and codec errors
// otherwise. Items whose prompt plus answer budget exceed the model's context are skipped and
// counted, not failed.
Result<RetrievalResult> EvalRetrieval(Engine& engine, std::span<const QaItem> items,
                                      const RetrievalOptions& options);

}  // namespace cachette::eval
