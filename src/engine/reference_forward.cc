#include "engine/reference_forward.h"

#include <cmath>
#include <cstring>

#include "core/fp16.h"

namespace cachette::testing {
namespace {

using Mat = std::vector<std::vector<double>>;  // [rows][cols]

float Half(const unsigned char* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return Fp16ToFp32(h);
}

// Dequantizes the whole matrix, straight from the GGUF block layouts (rows interleaved by 8
// where the model interleaved them: kernels::QuantBlockAt).
Mat Dequantize(const kernels::WeightMatrix& w) {
  Mat m(w.rows, std::vector<double>(w.cols));
  for (int64_t r = 0; r < w.rows; ++r) {
    const auto* row = static_cast<const unsigned char*>(w.data) + r * w.row_bytes;
    for (int64_t c = 0; c < w.cols; ++c) {
      double v = 0;
      switch (w.type) {
        case kernels::WType::kF32: {
          float f;
          std::memcpy(&f, row + 4 * c, 4);
          v = f;
          break;
        }
        case kernels::WType::kF16: v = Half(row + 2 * c); break;
        case kernels::WType::kBF16: {
          uint16_t b;
          std::memcpy(&b, row + 2 * c, 2);
          v = Bf16ToFp32(b);
          break;
        }
        case kernels::WType::kQ8_0: {
          const unsigned char* blk = kernels::QuantBlockAt(w, r, c / 32);
          v = static_cast<double>(Half(blk)) * static_cast<int8_t>(blk[2 + c % 32]);
          break;
        }
        case kernels::WType::kQ4_0: {
          const unsigned char* blk = kernels::QuantBlockAt(w, r, c / 32);
          const int j = static_cast<int>(c % 32);
          const int nib = j < 16 ? (blk[2 + j] & 0xf) : (blk[2 + j - 16] >> 4);
          v = static_cast<double>(Half(blk)) * (nib - 8);
          break;
        }
      }
      m[r][c] = v;
    }
  }
  return m;
}

std::vector<double> MatVec(const Mat& w, const std::vector<double>& x) {
  std::vector<double> y(w.size());
  for (size_t r = 0; r < w.size(); ++r) {
    double s = 0;
    for (size_t c = 0; c < x.size(); ++c) s += w[r][c] * x[c];
    y[r] = s;
  }
  return y;
}

std::vector<double> RmsNorm(const std::vector<double>& x, const float* weight, double eps) {
  double ss = 0;
  for (double v : x) ss += v * v;
  const double inv = 1.0 / std::sqrt(ss / x.size() + eps);
  std::vector<double> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = x[i] * inv * weight[i];
  return y;
}

void Rope(std::vector<double>& v, int n_head, int head_dim, int pos, const ModelConfig& c) {
  for (int h = 0; h < n_head; ++h) {
    double* x = v.data() + h * head_dim;
    for (int i = 0; i < head_dim / 2; ++i) {
      const double freq = std::pow(static_cast<double>(c.rope.theta_base), -2.0 * i / head_dim);
      const double angle = pos * static_cast<double>(c.rope.freq_scale) * freq;
      const double cs = std::cos(angle), sn = std::sin(angle);
      // llama: adjacent pairs; qwen2 (neox): element i pairs with i + head_dim/2.
      const int a = c.rope.style == kernels::RopeStyle::kNormal ? 2 * i : i;
      const int b = c.rope.style == kernels::RopeStyle::kNormal ? 2 * i + 1 : i + head_dim / 2;
      const double x0 = x[a], x1 = x[b];
      x[a] = x0 * cs - x1 * sn;
      x[b] = x0 * sn + x1 * cs;
    }
  }
}

}  // namespace

std::vector<std::vector<double>> ReferenceForward(const Model& model,
                                                  const std::vector<TokenId>& tokens) {
  const ModelConfig& c = model.config();
  const int n = static_cast<int>(tokens.size());
  const int hd = c.head_dim, group = c.n_head / c.n_kv_head;
  const Mat emb = Dequantize(model.tok_embd());
  std::vector<std::vector<double>> x(n);
  for (int t = 0; t < n; ++t) x[t] = emb[tokens[t]];

  for (int l = 0; l < c.n_layer; ++l) {
    const LayerWeights& w = model.layers()[l];
    const Mat wq = Dequantize(w.wq), wk = Dequantize(w.wk), wv = Dequantize(w.wv);
    const Mat wo = Dequantize(w.wo), wg = Dequantize(w.w_gate), wu = Dequantize(w.w_up);
    const Mat wd = Dequantize(w.w_down);
    std::vector<std::vector<double>> q(n), k(n), v(n);
    for (int t = 0; t < n; ++t) {
      const auto h = RmsNorm(x[t], w.attn_norm, c.norm_eps);
      q[t] = MatVec(wq, h);
      k[t] = MatVec(wk, h);
      v[t] = MatVec(wv, h);
      if (w.bq != nullptr) {
        for (int i = 0; i < c.q_dim(); ++i) q[t][i] += w.bq[i];
        for (int i = 0; i < c.kv_dim(); ++i) k[t][i] += w.bk[i], v[t][i] += w.bv[i];
      }
      Rope(q[t], c.n_head, hd, t, c);
      Rope(k[t], c.n_kv_head, hd, t, c);
    }
    for (int t = 0; t < n; ++t) {
      std::vector<double> att(c.q_dim(), 0.0);
      for (int h = 0; h < c.n_head; ++h) {
        const int kh = h / group;
        std::vector<double> score(t + 1);
        double mx = -1e300;
        for (int s = 0; s <= t; ++s) {
          double d = 0;
          for (int i = 0; i < hd; ++i) d += q[t][h * hd + i] * k[s][kh * hd + i];
          score[s] = d / std::sqrt(static_cast<double>(hd));
          mx = std::max(mx, score[s]);
        }
        double sum = 0;
        for (double& e : score) sum += (e = std::exp(e - mx));
        for (int s = 0; s <= t; ++s) {
          for (int i = 0; i < hd; ++i) att[h * hd + i] += score[s] / sum * v[s][kh * hd + i];
        }
      }
      const auto o = MatVec(wo, att);
      for (int i = 0; i < c.d_model; ++i) x[t][i] += o[i];
      const auto h = RmsNorm(x[t], w.ffn_norm, c.norm_eps);
      auto g = MatVec(wg, h);
      const auto u = MatVec(wu, h);
      for (int i = 0; i < c.d_ff; ++i) g[i] = g[i] / (1.0 + std::exp(-g[i])) * u[i];
      const auto dn = MatVec(wd, g);
      for (int i = 0; i < c.d_model; ++i) x[t][i] += dn[i];
    }
  }
  const Mat out = Dequantize(model.output());
  std::vector<std::vector<double>> logits(n);
  for (int t = 0; t < n; ++t) {
    logits[t] = MatVec(out, RmsNorm(x[t], model.output_norm(), c.norm_eps));
  }
  return logits;
}

double RelativeL2(const std::vector<float>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num / den);
}

}  // namespace cachette::testing
