// A loaded transformer: hyperparameters, weight views into the mmapped GGUF, and tokenizer.
//
// Supported architectures (GGUF `general.architecture`):
//   llama : RMSNorm, attention with normal (adjacent-pair) RoPE, SwiGLU FFN, optional tied
//           output (no output.weight: the token embedding is reused).
//   qwen2 : as llama, plus biases on Q, K and V, and NEOX (half-split) RoPE.
// Weight types: F32, F16, BF16, Q8_0, Q4_0 for matrices; 1-D tensors (norms, biases) of any
// of F32/F16/BF16 are converted to f32 at load.
//
// Load() validates everything a forward pass relies on (hyperparameters present and
// consistent, every tensor present with the expected dims and a supported type, vocabulary
// size equal to the embedding rows) and returns kInvalidArgument/kUnimplemented naming the key
// or tensor. Thread-safety: immutable after Load(); concurrent forward passes are safe.
#pragma once

#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "cachette/status.h"
#include "core/hash.h"
#include "kernels/kernels.h"
#include "model/gguf.h"
#include "model/tokenizer.h"

namespace cachette {

enum class Arch { kLlama, kQwen2 };

struct ModelConfig {
  Arch arch = Arch::kLlama;
  std::string arch_name;  // "llama", "qwen2"
  std::string name;       // general.name, may be empty
  int n_vocab = 0;
  int d_model = 0;
  int n_layer = 0;
  int n_head = 0;
  int n_kv_head = 0;
  int head_dim = 0;
  int d_ff = 0;
  int n_ctx_train = 0;
  float norm_eps = 1e-5f;
  kernels::RopeParams rope;
  bool tied_output = false;
  kernels::WType weight_type = kernels::WType::kF32;  // type of the attention Q matrix

  int q_dim() const { return n_head * head_dim; }
  int kv_dim() const { return n_kv_head * head_dim; }
  // Parameters in matrices and vectors, counting a tied output once.
  int64_t n_params = 0;
};

struct LayerWeights {
  const float* attn_norm = nullptr;  // [d_model]
  kernels::WeightMatrix wq;          // [q_dim][d_model]
  kernels::WeightMatrix wk;          // [kv_dim][d_model]
  kernels::WeightMatrix wv;          // [kv_dim][d_model]
  const float* bq = nullptr;         // [q_dim]   qwen2 only
  const float* bk = nullptr;         // [kv_dim]  qwen2 only
  const float* bv = nullptr;         // [kv_dim]  qwen2 only
  kernels::WeightMatrix wo;          // [d_model][q_dim]
  const float* ffn_norm = nullptr;   // [d_model]
  kernels::WeightMatrix w_gate;      // [d_ff][d_model]
  kernels::WeightMatrix w_up;        // [d_ff][d_model]
  kernels::WeightMatrix w_down;      // [d_model][d_ff]
};

class Model {
 public:
  // The weights stay where `residence` puts the file (gguf::GgufFile::Open).
  static Result<std::unique_ptr<Model>> Load(
      const std::string& path, gguf::Residence residence = gguf::Residence::kMapped);

  const ModelConfig& config() const { return config_; }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  const gguf::GgufFile& file() const { return *file_; }

  const kernels::WeightMatrix& tok_embd() const { return tok_embd_; }  // [n_vocab][d_model]
  const kernels::WeightMatrix& output() const { return output_; }      // [n_vocab][d_model]
  const float* output_norm() const { return output_norm_; }            // [d_model]
  const std::vector<LayerWeights>& layers() const { return layers_; }

  // Bytes of weights read per decoded token (every matrix once, the embedding row aside; with
  // the block scales the vector decode kernels read beside the rows, WeightMatrix::scales8).
  uint64_t weight_bytes_per_token() const { return weight_bytes_per_token_; }
  // Whether the model interleaved some matrices' rows in memory (WeightMatrix::interleaved8).
  bool interleaved() const { return !interleaved_.empty(); }

  // Identity of the weights: XXH3-128 over the architecture, hyperparameters, every tensor's
  // name, type and dims, and all tensor data bytes as the file has them. Changing any weight
  // byte changes it. Computed on first call (reads the whole file once), or at load where the
  // model rearranges weights in memory (WeightMatrix::interleaved8), then cached. Thread-safe.
  Hash128 Fingerprint() const;

 private:
  Model() = default;
  Status Init();
  Result<kernels::WeightMatrix> Matrix(const std::string& name, int64_t rows, int64_t cols);
  Result<const float*> Vector(const std::string& name, int64_t n);

  std::unique_ptr<gguf::GgufFile> file_;
  std::unique_ptr<Tokenizer> tokenizer_;
  ModelConfig config_;
  kernels::WeightMatrix tok_embd_, output_;
  const float* output_norm_ = nullptr;
  std::vector<LayerWeights> layers_;
  std::vector<std::unique_ptr<float[]>> owned_vectors_;  // 1-D tensors converted to f32
  std::vector<std::vector<uint16_t>> owned_scales_;      // WeightMatrix::scales8 arrays
  std::set<const std::byte*> interleaved_;               // tensors rearranged in place
  uint64_t weight_bytes_per_token_ = 0;

  mutable std::once_flag fingerprint_once_;
  mutable Hash128 fingerprint_;
};

// Maps a GGUF tensor type to a kernel weight type; kUnimplemented for others.
Result<kernels::WType> WTypeFromGguf(gguf::TensorType t);
gguf::TensorType GgufFromWType(kernels::WType t);

}  // namespace cachette
