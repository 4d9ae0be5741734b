#include "model/model.h"

#include <cmath>
#include <cstring>

#include "core/fp16.h"
#include "core/log.h"

namespace cachette {

using kernels::WType;

Result<WType> WTypeFromGguf(gguf::TensorType t) {
  switch (t) {
    case gguf::TensorType::kF32: return WType::kF32;
    case gguf::TensorType::kF16: return WType::kF16;
    case gguf::TensorType::kBF16: return WType::kBF16;
    case gguf::TensorType::kQ8_0: return WType::kQ8_0;
    case gguf::TensorType::kQ4_0: return WType::kQ4_0;
    default:
      return Unimplemented("weight type " + gguf::TensorTypeName(t) +
                           " is not supported (supported: f32, f16, bf16, q8_0, q4_0)");
  }
}

gguf::TensorType GgufFromWType(WType t) {
  switch (t) {
    case WType::kF32: return gguf::TensorType::kF32;
    case WType::kF16: return gguf::TensorType::kF16;
    case WType::kBF16: return gguf::TensorType::kBF16;
    case WType::kQ8_0: return gguf::TensorType::kQ8_0;
    case WType::kQ4_0: return gguf::TensorType::kQ4_0;
  }
  return gguf::TensorType::kF32;
}

Result<std::unique_ptr<Model>> Model::Load(const std::string& path, gguf::Residence residence) {
  std::unique_ptr<Model> m(new Model());
  CT_ASSIGN_OR_RETURN(m->file_, gguf::GgufFile::Open(path, residence));
  Status s = m->Init();
  if (!s.ok()) return s.WithContext(path);
  return m;
}

namespace {

std::string DimsString(const std::vector<int64_t>& d) {
  std::string s = "{";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "}";
}

// A positive integer hyperparameter that fits comfortably in int (bounded so that products
// such as n_head * head_dim cannot overflow).
Result<int> PositiveInt(const gguf::GgufFile& f, const std::string& key, int64_t max) {
  CT_ASSIGN_OR_RETURN(int64_t v, f.GetInt(key));
  if (v <= 0 || v > max) {
    return InvalidArgument("metadata '" + key + "' = " + std::to_string(v) +
                           " is out of range [1, " + std::to_string(max) + "]");
  }
  return static_cast<int>(v);
}

// Bytes one decode step reads of w: every row, and the regrouped block scales where the
// kernels read those too (WeightMatrix::scales8).
uint64_t DecodeReadBytes(const kernels::WeightMatrix& w) {
  uint64_t bytes = static_cast<uint64_t>(w.row_bytes) * w.rows;
  if (w.scales8 != nullptr) bytes += kernels::DecodeScalesCount(w) * sizeof(uint16_t);
  return bytes;
}

}  // namespace

Result<kernels::WeightMatrix> Model::Matrix(const std::string& name, int64_t rows, int64_t cols) {
  const gguf::TensorInfo* t = file_->FindTensor(name);
  if (t == nullptr) return InvalidArgument("missing tensor '" + name + "'");
  if (t->dims.size() != 2 || t->dims[0] != cols || t->dims[1] != rows) {
    return InvalidArgument("tensor '" + name + "' has dims " + DimsString(t->dims) +
                           ", expected {" + std::to_string(cols) + ", " + std::to_string(rows) +
                           "}");
  }
  auto wt = WTypeFromGguf(t->type);
  if (!wt.ok()) return wt.status().WithContext("tensor '" + name + "'");
  kernels::WeightMatrix w;
  w.type = *wt;
  w.data = t->data;
  w.rows = rows;
  w.cols = cols;
  w.row_bytes = kernels::WTypeRowBytes(*wt, cols);
  if (cols % kernels::WTypeBlockElems(*wt) != 0) {
    return InvalidArgument("tensor '" + name + "': row length " + std::to_string(cols) +
                           " is not a multiple of the block size");
  }
  if (kernels::UsesDecodeScales(w.type)) {
    // Reads every block's scale now (the whole mapping, as the first decode step would).
    owned_scales_.push_back(kernels::DecodeScales(w));
    w.scales8 = owned_scales_.back().data();
  }
  // Rows interleaved by 8 where the kernels read them faster so and the weights are in memory
  // of the model's own (read, not mapped: a mapping would copy every page it changes).
  std::byte* own = file_->WritableData(*t);
  if (own != nullptr && rows >= 8 && kernels::PrefersInterleaved8(w.type)) {
    if (interleaved_.insert(t->data).second) {
      Fingerprint();  // of the file as it is on disk: before the first change
      kernels::InterleaveRows8(w.type, rows, cols, own);
    }
    w.interleaved8 = true;
  }
  weight_bytes_per_token_ += DecodeReadBytes(w);
  config_.n_params += rows * cols;
  return w;
}

Result<const float*> Model::Vector(const std::string& name, int64_t n) {
  const gguf::TensorInfo* t = file_->FindTensor(name);
  if (t == nullptr) return InvalidArgument("missing tensor '" + name + "'");
  if (t->dims.size() != 1 || t->dims[0] != n) {
    return InvalidArgument("tensor '" + name + "' has dims " + DimsString(t->dims) +
                           ", expected {" + std::to_string(n) + "}");
  }
  config_.n_params += n;
  auto out = std::make_unique<float[]>(n);
  const auto* raw = reinterpret_cast<const unsigned char*>(t->data);
  switch (t->type) {
    case gguf::TensorType::kF32:
      std::memcpy(out.get(), raw, n * sizeof(float));  // copied: mmapped data may be unaligned
      break;
    case gguf::TensorType::kF16:
    case gguf::TensorType::kBF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, raw + 2 * i, 2);
        out[i] = t->type == gguf::TensorType::kF16 ? Fp16ToFp32(h) : Bf16ToFp32(h);
      }
      break;
    default:
      return Unimplemented("tensor '" + name + "' has type " + gguf::TensorTypeName(t->type) +
                           "; 1-D tensors must be f32, f16 or bf16");
  }
  const float* p = out.get();
  owned_vectors_.push_back(std::move(out));
  return p;
}

Status Model::Init() {
  const gguf::GgufFile& f = *file_;
  ModelConfig& c = config_;
  CT_ASSIGN_OR_RETURN(std::string_view arch, f.GetString("general.architecture"));
  c.arch_name = std::string(arch);
  if (arch == "llama") {
    c.arch = Arch::kLlama;
    c.rope.style = kernels::RopeStyle::kNormal;
  } else if (arch == "qwen2") {
    c.arch = Arch::kQwen2;
    c.rope.style = kernels::RopeStyle::kNeox;
  } else {
    return Unimplemented("unknown architecture '" + c.arch_name + "' (supported: llama, qwen2)");
  }
  if (const gguf::Value* v = f.Find("general.name"); v && v->type == gguf::ValueType::kString) {
    c.name = std::string(v->str);
  }
  const std::string a = c.arch_name + ".";
  constexpr int64_t kMaxDim = 1 << 20;
  CT_ASSIGN_OR_RETURN(c.d_model, PositiveInt(f, a + "embedding_length", kMaxDim));
  CT_ASSIGN_OR_RETURN(c.n_layer, PositiveInt(f, a + "block_count", 4096));
  CT_ASSIGN_OR_RETURN(c.d_ff, PositiveInt(f, a + "feed_forward_length", kMaxDim));
  CT_ASSIGN_OR_RETURN(c.n_head, PositiveInt(f, a + "attention.head_count", 4096));
  CT_ASSIGN_OR_RETURN(int64_t n_kv, f.GetIntOr(a + "attention.head_count_kv", c.n_head));
  if (n_kv <= 0 || n_kv > c.n_head || c.n_head % n_kv != 0) {
    return InvalidArgument("metadata '" + a + "attention.head_count_kv' = " +
                           std::to_string(n_kv) + " must divide head_count = " +
                           std::to_string(c.n_head));
  }
  c.n_kv_head = static_cast<int>(n_kv);
  CT_ASSIGN_OR_RETURN(c.n_ctx_train, PositiveInt(f, a + "context_length", 1 << 24));
  CT_ASSIGN_OR_RETURN(int64_t hd, f.GetIntOr(a + "attention.key_length", c.d_model / c.n_head));
  if (hd <= 0 || hd > 1024 || hd % 2 != 0) {
    return InvalidArgument("head dimension " + std::to_string(hd) + " (" + a +
                           "attention.key_length or embedding_length / head_count) must be even "
                           "and in [2, 1024]");
  }
  c.head_dim = static_cast<int>(hd);
  CT_ASSIGN_OR_RETURN(int64_t vlen, f.GetIntOr(a + "attention.value_length", hd));
  if (vlen != hd) return Unimplemented("attention.value_length != key_length is not supported");
  CT_ASSIGN_OR_RETURN(int64_t rope_dims, f.GetIntOr(a + "rope.dimension_count", hd));
  if (rope_dims != hd) {
    return Unimplemented("partial RoPE (" + a + "rope.dimension_count = " +
                         std::to_string(rope_dims) + " < head dim " + std::to_string(hd) +
                         ") is not supported");
  }
  CT_ASSIGN_OR_RETURN(double eps, f.GetFloatOr(a + "attention.layer_norm_rms_epsilon", 1e-5));
  if (!(eps > 0 && eps < 1)) {
    return InvalidArgument("metadata '" + a +
                           "attention.layer_norm_rms_epsilon' must be in (0, 1)");
  }
  c.norm_eps = static_cast<float>(eps);
  CT_ASSIGN_OR_RETURN(double theta, f.GetFloatOr(a + "rope.freq_base", 10000.0));
  if (!(theta > 1 && std::isfinite(theta))) {
    return InvalidArgument("metadata '" + a + "rope.freq_base' must be > 1");
  }
  c.rope.theta_base = static_cast<float>(theta);
  c.rope.head_dim = c.head_dim;
  // RoPE scaling as llama.cpp writes it: rope.scaling.type ("none", "linear", "yarn") with
  // rope.scaling.factor, or the older rope.scale_linear.
  double factor = 1.0;
  std::string scaling = "none";
  if (const gguf::Value* v = f.Find(a + "rope.scaling.type")) {
    if (v->type != gguf::ValueType::kString) {
      return InvalidArgument("metadata '" + a + "rope.scaling.type' must be a string");
    }
    scaling = std::string(v->str);
  }
  if (scaling == "linear") {
    CT_ASSIGN_OR_RETURN(factor, f.GetFloatOr(a + "rope.scaling.factor", 1.0));
  } else if (scaling == "none") {
    CT_ASSIGN_OR_RETURN(factor, f.GetFloatOr(a + "rope.scale_linear", 1.0));
  } else {
    return Unimplemented("RoPE scaling type '" + scaling + "' is not supported (none, linear)");
  }
  if (!(factor >= 1.0 && factor < 1e6)) {
    return InvalidArgument("RoPE scaling factor " + std::to_string(factor) + " must be >= 1");
  }
  c.rope.freq_scale = static_cast<float>(1.0 / factor);

  CT_ASSIGN_OR_RETURN(tokenizer_, Tokenizer::FromGguf(f));
  c.n_vocab = tokenizer_->vocab_size();

  const gguf::TensorInfo* emb = f.FindTensor("token_embd.weight");
  if (emb == nullptr) return InvalidArgument("missing tensor 'token_embd.weight'");
  if (emb->dims.size() == 2 && emb->dims[1] != c.n_vocab) {
    return InvalidArgument("vocabulary has " + std::to_string(c.n_vocab) +
                           " tokens but token_embd.weight has " + std::to_string(emb->dims[1]) +
                           " rows");
  }
  CT_ASSIGN_OR_RETURN(tok_embd_, Matrix("token_embd.weight", c.n_vocab, c.d_model));
  // The embedding is read one row per token, not streamed per token.
  weight_bytes_per_token_ -= DecodeReadBytes(tok_embd_);
  CT_ASSIGN_OR_RETURN(output_norm_, Vector("output_norm.weight", c.d_model));
  if (f.FindTensor("output.weight") != nullptr) {
    CT_ASSIGN_OR_RETURN(output_, Matrix("output.weight", c.n_vocab, c.d_model));
  } else {
    c.tied_output = true;
    output_ = tok_embd_;
    weight_bytes_per_token_ += DecodeReadBytes(output_);
  }
  const int64_t d = c.d_model, q = c.q_dim(), kv = c.kv_dim(), ff = c.d_ff;
  layers_.resize(c.n_layer);
  for (int i = 0; i < c.n_layer; ++i) {
    const std::string p = "blk." + std::to_string(i) + ".";
    LayerWeights& l = layers_[i];
    CT_ASSIGN_OR_RETURN(l.attn_norm, Vector(p + "attn_norm.weight", d));
    CT_ASSIGN_OR_RETURN(l.wq, Matrix(p + "attn_q.weight", q, d));
    CT_ASSIGN_OR_RETURN(l.wk, Matrix(p + "attn_k.weight", kv, d));
    CT_ASSIGN_OR_RETURN(l.wv, Matrix(p + "attn_v.weight", kv, d));
    if (c.arch == Arch::kQwen2) {
      CT_ASSIGN_OR_RETURN(l.bq, Vector(p + "attn_q.bias", q));
      CT_ASSIGN_OR_RETURN(l.bk, Vector(p + "attn_k.bias", kv));
      CT_ASSIGN_OR_RETURN(l.bv, Vector(p + "attn_v.bias", kv));
    }
    CT_ASSIGN_OR_RETURN(l.wo, Matrix(p + "attn_output.weight", d, q));
    CT_ASSIGN_OR_RETURN(l.ffn_norm, Vector(p + "ffn_norm.weight", d));
    CT_ASSIGN_OR_RETURN(l.w_gate, Matrix(p + "ffn_gate.weight", ff, d));
    CT_ASSIGN_OR_RETURN(l.w_up, Matrix(p + "ffn_up.weight", ff, d));
    CT_ASSIGN_OR_RETURN(l.w_down, Matrix(p + "ffn_down.weight", d, ff));
  }
  c.weight_type = layers_[0].wq.type;
  // A model small enough to stay in the last-level cache is decoded from there.
  if (kernels::FitsInLastLevelCache(weight_bytes_per_token_)) {
    for (kernels::WeightMatrix* w : {&tok_embd_, &output_}) w->cache_resident = true;
    for (LayerWeights& l : layers_) {
      for (kernels::WeightMatrix* w : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) {
        w->cache_resident = true;
      }
    }
  }
  return Status::Ok();
}

Hash128 Model::Fingerprint() const {
  std::call_once(fingerprint_once_, [this] {
    Hasher128 h;
    const ModelConfig& c = config_;
    const std::string header = c.arch_name + "|" + std::to_string(c.n_vocab) + "|" +
                               std::to_string(c.d_model) + "|" + std::to_string(c.n_layer) + "|" +
                               std::to_string(c.n_head) + "|" + std::to_string(c.n_kv_head) + "|" +
                               std::to_string(c.head_dim) + "|" + std::to_string(c.d_ff);
    h.Update(header.data(), header.size());
    for (const gguf::TensorInfo& t : file_->tensors()) {
      h.Update(t.name.data(), t.name.size());
      const uint32_t type = static_cast<uint32_t>(t.type);
      h.Update(&type, sizeof type);
      h.Update(t.dims.data(), t.dims.size() * sizeof(int64_t));
      h.Update(t.data, t.n_bytes);
    }
    fingerprint_ = h.Digest();
  });
  return fingerprint_;
}

}  // namespace cachette
