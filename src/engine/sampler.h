// Token sampling from logits.
//
// Order of operations (as llama.cpp's default chain): repetition penalty over the last
// `repeat_last_n` tokens -> temperature 0 means greedy argmax -> top-k -> softmax with
// temperature -> top-p (nucleus) -> min-p -> draw with the seeded generator.
// Deterministic for a given seed. Not thread-safe (one per sequence).
#pragma once

#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "cachette/status.h"
#include "cachette/types.h"

namespace cachette {

struct SamplingParams {
  float temperature = 0.0f;        // <= 0: greedy
  int top_k = 0;                   // <= 0: off
  float top_p = 1.0f;              // >= 1: off
  float min_p = 0.0f;              // <= 0: off
  float repetition_penalty = 1.0f; // 1: off; > 1 discourages repeats (CTRL-style)
  int repeat_last_n = 64;
  uint64_t seed = 0;

  // kInvalidArgument naming the field when a value is out of range.
  Status Validate() const;
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);

  // Picks the next token from `logits` [n_vocab]; `history` is the sequence so far (for the
  // repetition penalty). Modifies `logits` in place.
  TokenId Sample(std::span<float> logits, std::span<const TokenId> history);

  static TokenId Argmax(std::span<const float> logits);

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, TokenId>> cand_;
};

}  // namespace cachette
