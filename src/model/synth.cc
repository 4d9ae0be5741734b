#include "model/synth.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string_view>
#include <unordered_set>
#include <vector>

#include "core/fp16.h"
#include "core/hash.h"
#include "model/gguf.h"
#include "model/model.h"

namespace cachette {

using kernels::WType;

void QuantizeRow(const float* x, int64_t n, WType t, void* out) {
  auto* o = static_cast<unsigned char*>(out);
  switch (t) {
    case WType::kF32:
      std::memcpy(o, x, n * sizeof(float));
      return;
    case WType::kF16:
    case WType::kBF16:
      for (int64_t i = 0; i < n; ++i) {
        const uint16_t h = t == WType::kF16 ? Fp32ToFp16(x[i]) : Fp32ToBf16(x[i]);
        std::memcpy(o + 2 * i, &h, 2);
      }
      return;
    case WType::kQ8_0:
      for (int64_t b = 0; b < n / 32; ++b, o += 34) {
        const float* xb = x + b * 32;
        float amax = 0;
        for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xb[j]));
        const float d = amax / 127.0f;
        const float id = d != 0 ? 1.0f / d : 0.0f;
        const uint16_t dh = Fp32ToFp16(d);
        std::memcpy(o, &dh, 2);
        for (int j = 0; j < 32; ++j) {
          o[2 + j] = static_cast<unsigned char>(static_cast<int8_t>(std::lround(xb[j] * id)));
        }
      }
      return;
    case WType::kQ4_0:
      for (int64_t b = 0; b < n / 32; ++b, o += 18) {
        const float* xb = x + b * 32;
        // The value of largest magnitude maps to -8 (the asymmetric end), the rest scale along.
        float max = 0;
        for (int j = 0; j < 32; ++j) {
          if (std::fabs(xb[j]) > std::fabs(max)) max = xb[j];
        }
        const float d = max / -8.0f;
        const float id = d != 0 ? 1.0f / d : 0.0f;
        const uint16_t dh = Fp32ToFp16(d);
        std::memcpy(o, &dh, 2);
        for (int j = 0; j < 16; ++j) {
          const int lo = std::clamp(static_cast<int>(std::lround(xb[j] * id)) + 8, 0, 15);
          const int hi = std::clamp(static_cast<int>(std::lround(xb[j + 16] * id)) + 8, 0, 15);
          o[2 + j] = static_cast<unsigned char>(lo | (hi << 4));
        }
      }
      return;
  }
}

namespace {

struct Shape {
  std::string arch;
  int d, n_layer, n_head, n_kv_head, d_ff, n_ctx;
  float theta, eps;
  int vocab_cut;
  bool tied;
};

Result<Shape> ShapeByName(const std::string& name) {
  if (name == "tiny") return Shape{"llama", 128, 2, 4, 2, 256, 1024, 10000.f, 1e-5f, 1024, true};
  // tiny with heads of 40 (not a multiple of the 32-element q8_0/q4_0 KV blocks).
  if (name == "tiny-hd40") {
    return Shape{"llama", 160, 2, 4, 2, 256, 1024, 10000.f, 1e-5f, 1024, true};
  }
  if (name == "qwen2.5-0.5b") {
    return Shape{"qwen2", 896, 24, 14, 2, 4864, 32768, 1000000.f, 1e-6f, 0, true};
  }
  if (name == "llama-1b") {
    return Shape{"llama", 2048, 16, 32, 8, 8192, 8192, 500000.f, 1e-5f, 0, true};
  }
  return InvalidArgument("unknown shape '" + name + "' (known: tiny, tiny-hd40, qwen2.5-0.5b, llama-1b)");
}

// splitmix64: a counter-based generator, so tensor contents depend only on (seed, name, index).
uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Uniform in [-1, 1).
float Uniform(uint64_t stream, uint64_t i) {
  return static_cast<float>(static_cast<double>(Mix(stream ^ Mix(i)) >> 11) * 0x1.0p-52 - 1.0);
}

uint64_t StreamOf(uint64_t seed, const std::string& name) {
  return Mix(seed) ^ Hash64(ByteSpan(reinterpret_cast<const std::byte*>(name.data()), name.size()));
}

// Cuts a byte-level BPE vocabulary to its first n-1 tokens plus the end-of-text token, keeping
// only merges whose parts and result survive.
Status CopyVocab(const gguf::GgufFile& v, int cut, gguf::GgufWriter& w, int* n_vocab) {
  CT_ASSIGN_OR_RETURN(const std::vector<gguf::Value>* tokens,
                      v.GetArray("tokenizer.ggml.tokens", gguf::ValueType::kString));
  const int full = static_cast<int>(tokens->size());
  if (cut <= 0 || cut >= full) {
    for (const auto& kv : v.metadata()) {
      if (kv.key.substr(0, 10) == "tokenizer.") w.AddValue(std::string(kv.key), kv.value);
    }
    *n_vocab = full;
    return Status::Ok();
  }
  CT_ASSIGN_OR_RETURN(std::string_view model, v.GetString("tokenizer.ggml.model"));
  if (model != "gpt2") return InvalidArgument("only a gpt2 (BPE) vocabulary can be cut");
  CT_ASSIGN_OR_RETURN(int64_t eos, v.GetInt("tokenizer.ggml.eos_token_id"));
  if (eos < 0 || eos >= full) return InvalidArgument("vocab eos_token_id out of range");
  std::vector<std::string> kept;
  std::unordered_set<std::string_view> kept_set;
  for (int i = 0; i < cut - 1; ++i) {
    kept.emplace_back((*tokens)[i].str);
    kept_set.insert((*tokens)[i].str);
  }
  kept.emplace_back((*tokens)[eos].str);
  kept_set.insert((*tokens)[eos].str);
  std::vector<std::string> merges;
  if (auto m = v.GetArray("tokenizer.ggml.merges", gguf::ValueType::kString); m.ok()) {
    for (const gguf::Value& mv : **m) {
      std::string_view s = mv.str;
      const size_t sp = s.find(' ', 1);
      if (sp == std::string_view::npos) continue;
      std::string_view a = s.substr(0, sp), b = s.substr(sp + 1);
      std::string ab = std::string(a) + std::string(b);
      if (kept_set.count(a) && kept_set.count(b) && kept_set.count(ab)) merges.emplace_back(s);
    }
  }
  std::vector<int32_t> types;
  if (auto t = v.GetArray("tokenizer.ggml.token_type", gguf::ValueType::kInt32); t.ok()) {
    for (int i = 0; i < cut - 1; ++i) types.push_back(static_cast<int32_t>((**t)[i].i64));
    types.push_back(static_cast<int32_t>((**t)[eos].i64));
  }
  for (const auto& kv : v.metadata()) {
    const std::string key(kv.key);
    if (key.substr(0, 10) != "tokenizer.") continue;
    if (key == "tokenizer.ggml.tokens" || key == "tokenizer.ggml.merges" ||
        key == "tokenizer.ggml.token_type" || key == "tokenizer.ggml.scores" ||
        key.find("_token_id") != std::string::npos) {
      continue;
    }
    w.AddValue(key, kv.value);
  }
  w.AddStringArray("tokenizer.ggml.tokens", std::move(kept));
  w.AddStringArray("tokenizer.ggml.merges", std::move(merges));
  if (!types.empty()) w.AddInt32Array("tokenizer.ggml.token_type", std::move(types));
  w.AddUint32("tokenizer.ggml.bos_token_id", cut - 1);
  w.AddUint32("tokenizer.ggml.eos_token_id", cut - 1);
  *n_vocab = cut;
  return Status::Ok();
}

// general.file_type is llama.cpp's "mostly" enum (llama_ftype), not a tensor type: Q8_0 is 7
// there and 8 (a tensor type's number) would read as "Q5_0".
uint32_t LlamaFileType(WType t) {
  switch (t) {
    case WType::kF32:
      return 0;
    case WType::kF16:
      return 1;
    case WType::kQ4_0:
      return 2;
    case WType::kQ8_0:
      return 7;
    case WType::kBF16:
      return 32;
  }
  return 0;
}

}  // namespace

Status SynthesizeModel(const SynthOptions& o, const std::string& out_path) {
  CT_ASSIGN_OR_RETURN(Shape sh, ShapeByName(o.shape));
  if (!o.arch.empty()) {
    if (o.arch != "llama" && o.arch != "qwen2") {
      return InvalidArgument("unknown arch '" + o.arch + "' (llama, qwen2)");
    }
    sh.arch = o.arch;
  }
  if (o.n_vocab_cut > 0) sh.vocab_cut = o.n_vocab_cut;
  if (o.type == WType::kQ8_0 || o.type == WType::kQ4_0) {
    if (sh.d % 32 || sh.d_ff % 32) return InvalidArgument("dims must be multiples of 32");
  }
  CT_ASSIGN_OR_RETURN(auto vocab, gguf::GgufFile::Open(o.vocab_path));

  gguf::GgufWriter w;
  const std::string a = sh.arch + ".";
  w.AddString("general.architecture", sh.arch);
  w.AddString("general.name", "cachette-synth-" + o.shape);
  w.AddUint32("general.file_type", LlamaFileType(o.type));
  w.AddUint32(a + "context_length", sh.n_ctx);
  w.AddUint32(a + "embedding_length", sh.d);
  w.AddUint32(a + "block_count", sh.n_layer);
  w.AddUint32(a + "feed_forward_length", sh.d_ff);
  w.AddUint32(a + "attention.head_count", sh.n_head);
  w.AddUint32(a + "attention.head_count_kv", sh.n_kv_head);
  w.AddFloat32(a + "attention.layer_norm_rms_epsilon", sh.eps);
  w.AddFloat32(a + "rope.freq_base", sh.theta);
  int n_vocab = 0;
  CT_RETURN_IF_ERROR(CopyVocab(*vocab, sh.vocab_cut, w, &n_vocab));

  const int hd = sh.d / sh.n_head;
  const int q = sh.n_head * hd, kv = sh.n_kv_head * hd;
  // Matrix entries uniform with variance 1/fan_in (scaled so activations stay O(1)); norms
  // near 1; biases small.
  auto add_matrix = [&](const std::string& name, int64_t rows, int64_t cols, WType t,
                        float gain) -> Status {
    const uint64_t stream = StreamOf(o.seed, name);
    const float amp = gain * std::sqrt(3.0f / static_cast<float>(cols));
    const size_t row_bytes = kernels::WTypeRowBytes(t, cols);
    std::vector<std::byte> data(row_bytes * rows);
    std::vector<float> row(cols);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) row[c] = amp * Uniform(stream, r * cols + c);
      QuantizeRow(row.data(), cols, t, data.data() + r * row_bytes);
    }
    return w.AddTensor(name, GgufFromWType(t), {cols, rows}, std::move(data));
  };
  auto add_vector = [&](const std::string& name, int64_t n, float center, float spread) {
    const uint64_t stream = StreamOf(o.seed, name);
    std::vector<std::byte> data(n * sizeof(float));
    for (int64_t i = 0; i < n; ++i) {
      const float v = center + spread * Uniform(stream, i);
      std::memcpy(data.data() + i * sizeof(float), &v, sizeof v);
    }
    return w.AddTensor(name, gguf::TensorType::kF32, {n}, std::move(data));
  };
  // The embedding gets unit-scale rows (as trained embeddings roughly have after the norm).
  CT_RETURN_IF_ERROR(add_matrix("token_embd.weight", n_vocab, sh.d, o.type,
                                std::sqrt(static_cast<float>(sh.d)) * 0.5f));
  CT_RETURN_IF_ERROR(add_vector("output_norm.weight", sh.d, 1.0f, 0.1f));
  if (!sh.tied) CT_RETURN_IF_ERROR(add_matrix("output.weight", n_vocab, sh.d, o.type, 1.0f));
  for (int l = 0; l < sh.n_layer; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    CT_RETURN_IF_ERROR(add_vector(p + "attn_norm.weight", sh.d, 1.0f, 0.1f));
    CT_RETURN_IF_ERROR(add_matrix(p + "attn_q.weight", q, sh.d, o.type, 1.0f));
    CT_RETURN_IF_ERROR(add_matrix(p + "attn_k.weight", kv, sh.d, o.type, 1.0f));
    CT_RETURN_IF_ERROR(add_matrix(p + "attn_v.weight", kv, sh.d, o.type, 1.0f));
    if (sh.arch == "qwen2") {
      CT_RETURN_IF_ERROR(add_vector(p + "attn_q.bias", q, 0.0f, 0.1f));
      CT_RETURN_IF_ERROR(add_vector(p + "attn_k.bias", kv, 0.0f, 0.1f));
      CT_RETURN_IF_ERROR(add_vector(p + "attn_v.bias", kv, 0.0f, 0.1f));
    }
    CT_RETURN_IF_ERROR(add_matrix(p + "attn_output.weight", sh.d, q, o.type, 0.5f));
    CT_RETURN_IF_ERROR(add_vector(p + "ffn_norm.weight", sh.d, 1.0f, 0.1f));
    CT_RETURN_IF_ERROR(add_matrix(p + "ffn_gate.weight", sh.d_ff, sh.d, o.type, 1.0f));
    CT_RETURN_IF_ERROR(add_matrix(p + "ffn_up.weight", sh.d_ff, sh.d, o.type, 1.0f));
    CT_RETURN_IF_ERROR(add_matrix(p + "ffn_down.weight", sh.d, sh.d_ff, o.type, 0.5f));
  }
  return w.WriteFile(out_path);
}

}  // namespace cachette
