// Prompt-to-text generation for one sequence: prefill, then sample and decode until
// max_tokens, an end-of-generation token, or a stop string.
#pragma once

#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "cachette/status.h"
#include "engine/engine.h"
#include "engine/sampler.h"

namespace cachette {

struct GenerateOptions {
  int max_tokens = 128;
  SamplingParams sampling;
  std::vector<std::string> stop;  // generation ends before the first occurrence of any of these
  bool ignore_eos = false;
};

struct GenerateResult {
  std::vector<TokenId> tokens;  // generated ids (the stop string's tokens included, EOS not)
  std::string text;             // generated text, cut before a stop string
  enum class Finish { kLength, kEos, kStop, kCancelled } finish = Finish::kLength;
  int64_t prompt_tokens = 0;
  double prefill_seconds = 0;   // until the first token's logits
  double decode_seconds = 0;    // for the remaining tokens
};
std::string_view FinishName(GenerateResult::Finish f);

// Called with each generated token and its newly completed text; return false to stop
// (finish = kCancelled).
using TokenCallback = std::function<bool(TokenId id, std::string_view text)>;

// Generates a continuation of `prompt` into the (empty or partially filled) `kv`: tokens
// already in kv.n_tokens() are assumed to be the first tokens of `prompt` and are not
// recomputed. kInvalidArgument for an empty prompt, bad sampling parameters, or a prompt that
// does not fit in the context (the message gives both lengths).
Result<GenerateResult> Generate(Engine& engine, SequenceKv& kv, std::span<const TokenId> prompt,
                                const GenerateOptions& options,
                                const TokenCallback& on_token = nullptr);

// The same loop over another way of computing logits (e.g. a KV budget policy's runner):
// `prefill` reads the prompt and writes its last token's logits [n_vocab]; `step` feeds one
// generated token and writes its logits; `room` says whether one more token fits (false ends
// generation as kLength). Validation of sampling and max_tokens as above; the prompt's length
// is the logits source's business.
struct LogitSource {
  std::function<Status(float* logits)> prefill;
  std::function<Status(TokenId id, float* logits)> step;
  std::function<bool()> room;
};
Result<GenerateResult> Generate(const Model& model, std::span<const TokenId> prompt,
                                const GenerateOptions& options, const LogitSource& source,
                                const TokenCallback& on_token = nullptr);

}  // namespace cachette
