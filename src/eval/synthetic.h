// Synthetic long-context tasks generated from a seed (`cachette eval retrieval --synthetic`).
//
// The same seed and options give the same tasks on every machine (a counter-based generator,
// no std:: distributions, whose output differs between standard libraries). The prompts follow
// the shapes of ../shared/eval/longctx-qa.jsonl, which the bundled model was trained on:
//   kv     "Here is a table of keys and values." then "<key> is <colour>" lines, and a question
//          about one key at a drawn depth;
//   needle natural text (a slice of `filler` at a drawn offset) with "The secret number of
//          <Name> is <6 digits>." inserted as a paragraph at a drawn depth;
//   facts  "Record i - ..." sentences about people, towns and companies, and a two-hop question
//          (e.g. the founding year of a person's birthplace) whose two records sit in the first
//          and the last quarter of the prompt, so they fall in different store chunks.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "cachette/status.h"
#include "eval/retrieval.h"

namespace cachette::eval {

struct SyntheticOptions {
  uint64_t seed = 1;
  int n = 24;  // tasks, round-robin over kinds
  std::vector<std::string> kinds = {"kv", "needle", "facts"};
  int approx_chars = 2400;  // prompt length (~4 chars/token)
  std::string_view filler;  // natural text for haystacks
};

// kInvalidArgument for an unknown kind, n < 0, approx_chars < 200, or needle tasks without
// at least approx_chars of filler.
Result<std::vector<QaItem>> GenerateSyntheticTasks(const SyntheticOptions& options);

}  // namespace cachette::eval
