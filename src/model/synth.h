// Deterministic random-weight GGUF models for tests and benchmarks (`cachette model synth`).
//
// Shapes:
//   tiny          llama, d 128, 2 layers, 4 heads of 32, 2 KV heads, FFN 256, context 1024,
//                 vocabulary cut to its first 1023 tokens + end-of-text (under 2 MB in f32)
//   tiny-hd40     tiny with d 160: heads of 40, which the q8_0/q4_0 KV types cannot hold
//   qwen2.5-0.5b  qwen2, d 896, 24 layers, 14 heads, 2 KV heads, FFN 4864, theta 1e6
//   llama-1b      llama, d 2048, 16 layers, 32 heads, 8 KV heads, FFN 8192, theta 5e5
// The vocabulary (tokens, merges, types, special ids, pre-tokenizer) is copied from a vocab
// GGUF. Weights come from a counter-based generator seeded by (seed, tensor name), so the same
// arguments give byte-identical files on every machine.
#pragma once

#include <cstdint>
#include <string>

#include "cachette/status.h"
#include "kernels/kernels.h"

namespace cachette {

struct SynthOptions {
  std::string shape = "tiny";
  kernels::WType type = kernels::WType::kF32;
  std::string vocab_path;  // a GGUF with tokenizer.ggml.* keys
  std::string arch;        // "" = the shape's own; "llama" or "qwen2" to override
  uint64_t seed = 1;
  int n_vocab_cut = 0;     // 0 = the shape's default (tiny: 1024; others: whole vocabulary)
};

// Writes the model to `out_path` atomically. kInvalidArgument for an unknown shape/arch or a
// vocabulary that cannot be cut; errors from reading the vocab or writing the file.
Status SynthesizeModel(const SynthOptions& options, const std::string& out_path);

// Quantizes `n` floats (n a multiple of the block size) into `out` in the GGUF layout of `t`.
void QuantizeRow(const float* x, int64_t n, kernels::WType t, void* out);

}  // namespace cachette
