// Scalar reference kernels: the plain definition every faster path is tested against.
// Written for obviousness, not speed; compiled for baseline x86-64.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "core/check.h"
#include "core/fp16.h"
#include "kernels/kernels_internal.h"

namespace cachette::kernels::internal {
namespace {

uint16_t LoadU16(const void* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

const uint8_t* RowPtr(const WeightMatrix& w, int64_t r) {
  return static_cast<const uint8_t*>(w.data) + static_cast<size_t>(r) * w.row_bytes;
}

// W[r][c] as a float, for the float weight types.
float FloatWeight(const WeightMatrix& w, const uint8_t* row, int64_t c) {
  switch (w.type) {
    case WType::kF32: {
      float f;
      std::memcpy(&f, row + 4 * c, 4);
      return f;
    }
    case WType::kF16:
      return Fp16ToFp32(LoadU16(row + 2 * c));
    case WType::kBF16:
      return Bf16ToFp32(LoadU16(row + 2 * c));
    default:
      CT_CHECK(false) << "not a float type";
      return 0;
  }
}

// The 32 integer weights of block b of row r of a quantized matrix (either layout), and its
// scale.
void QuantBlock(const WeightMatrix& w, int64_t r, int64_t b, int8_t q[32], float* d) {
  const uint8_t* blk = QuantBlockAt(w, r, b);
  *d = Fp16ToFp32(LoadU16(blk));
  if (w.type == WType::kQ8_0) {
    for (int j = 0; j < 32; ++j) q[j] = static_cast<int8_t>(blk[2 + j]);
  } else {
    for (int j = 0; j < 16; ++j) {
      q[j] = static_cast<int8_t>((blk[2 + j] & 0x0f) - 8);
      q[j + 16] = static_cast<int8_t>((blk[2 + j] >> 4) - 8);
    }
  }
}

void QuantizeAct(const float* x, int64_t t0, int64_t t1, const ActQ8& a) {
  const int64_t nb = a.cols / 32;
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* s = x + t * a.cols + b * 32;
      int8_t* q = a.q + t * a.cols + b * 32;
      float amax = 0;
      for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(s[j]));
      // 127 / amax (not 1 / d) so that the largest element maps to exactly +-127.
      const float id = amax > 0 ? 127.0f / amax : 0.0f;
      int32_t sum = 0;
      for (int j = 0; j < 32; ++j) {
        q[j] = static_cast<int8_t>(std::nearbyint(s[j] * id));
        sum += q[j];
      }
      a.d[t * nb + b] = amax / 127.0f;
      a.sum[t * nb + b] = sum;
    }
  }
}

void MatMulRows(const MatMulArgs& a, int64_t r0, int64_t r1) {
  const WeightMatrix& w = *a.w;
  const int64_t cols = w.cols;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = RowPtr(w, r);  // float types
    for (int64_t t = 0; t < a.m; ++t) {
      float acc = 0;
      if (w.type == WType::kQ8_0 || w.type == WType::kQ4_0) {
        const int64_t nb = cols / 32;
        for (int64_t b = 0; b < nb; ++b) {
          int8_t q[32];
          float dw;
          QuantBlock(w, r, b, q, &dw);
          const int8_t* xq = a.act.q + t * cols + b * 32;
          int32_t dot = 0;
          for (int j = 0; j < 32; ++j) dot += q[j] * xq[j];
          acc += static_cast<float>(dot) * (dw * a.act.d[t * nb + b]);
        }
      } else {
        const float* xr = a.x + t * cols;
        for (int64_t c = 0; c < cols; ++c) acc += xr[c] * FloatWeight(w, row, c);
      }
      a.y[t * w.rows + r] = acc;
    }
  }
}

int64_t RowGrain(WType, int64_t) { return 1; }

void DequantizeRow(const WeightMatrix& w, int64_t r, float* out) {
  const uint8_t* row = RowPtr(w, r);  // float types
  if (w.type == WType::kQ8_0 || w.type == WType::kQ4_0) {
    for (int64_t b = 0; b < w.cols / 32; ++b) {
      int8_t q[32];
      float d;
      QuantBlock(w, r, b, q, &d);
      for (int j = 0; j < 32; ++j) out[b * 32 + j] = d * q[j];
    }
  } else {
    for (int64_t c = 0; c < w.cols; ++c) out[c] = FloatWeight(w, row, c);
  }
}

void RmsNorm(const float* x, const float* weight, float* y, int64_t rows, int64_t dim, float eps) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* xi = x + i * dim;
    float* yi = y + i * dim;
    float ss = 0;
    for (int64_t c = 0; c < dim; ++c) ss += xi[c] * xi[c];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(dim) + eps);
    for (int64_t c = 0; c < dim; ++c) yi[c] = xi[c] * inv * weight[c];
  }
}

void Softmax(float* x, int64_t n) {
  if (n <= 0) return;
  float mx = x[0];
  for (int64_t i = 1; i < n; ++i) mx = std::max(mx, x[i]);
  float sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - mx);
    sum += x[i];
  }
  const float inv = 1.0f / sum;
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

void SwiGlu(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    out[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

void Add(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

float KvElem(const void* p, int i, KvType t) {
  const auto* b = static_cast<const uint8_t*>(p);
  switch (t) {
    case KvType::kF32: {
      float f;
      std::memcpy(&f, b + 4 * i, 4);
      return f;
    }
    case KvType::kF16:
      return Fp16ToFp32(LoadU16(b + 2 * i));
    case KvType::kQ8_0: {
      const uint8_t* blk = b + (i / 32) * 34;
      return Fp16ToFp32(LoadU16(blk)) * static_cast<int8_t>(blk[2 + i % 32]);
    }
    case KvType::kQ4_0: {
      const uint8_t* blk = b + (i / 32) * 18;
      const int j = i % 32;
      const int nib = j < 16 ? blk[2 + j] & 0x0f : blk[2 + j - 16] >> 4;
      return Fp16ToFp32(LoadU16(blk)) * static_cast<float>(nib - 8);
    }
    case KvType::kQ4_1: {
      const uint8_t* blk = b + (i / 32) * 20;
      const int j = i % 32;
      const int nib = j < 16 ? blk[4 + j] & 0x0f : blk[4 + j - 16] >> 4;
      return std::fma(Fp16ToFp32(LoadU16(blk)), static_cast<float>(nib),
                      Fp16ToFp32(LoadU16(blk + 2)));
    }
    case KvType::kKivi4:
      break;  // read with its group: AttendSpan widens kivi4 tiles
  }
  CT_CHECK(false) << "kivi4 head vectors are read with their key group";
  return 0;
}

float KvDot(const float* q, const void* k, int head_dim, KvType t) {
  float acc = 0;
  for (int i = 0; i < head_dim; ++i) acc += q[i] * KvElem(k, i, t);
  return acc;
}

void KvAxpy(float a, const void* v, int head_dim, KvType t, float* acc) {
  for (int i = 0; i < head_dim; ++i) acc[i] += a * KvElem(v, i, t);
}

// The definition every level's attend_block follows for one query: per head and per tile, the
// scores, the tile's max, the exponentials and their sum in slot order, then the running state
// rescaled and the tile's values added in slot order.
void AttendSpan(const float* q, int group, const KvView& kv, int kvh, int64_t begin, int64_t end,
                float scale, float* state) {
  const int hd = kv.head_dim;
  const size_t head_bytes = KvHeadBytes(kv.type, hd);
  const size_t tok_bytes = head_bytes * kv.n_kv_head;
  auto slot = [&](const void* const* blocks, int64_t j) {
    return static_cast<const uint8_t*>(blocks[j / kv.block_tokens]) +
           (j % kv.block_tokens) * tok_bytes + kvh * head_bytes;
  };
  float* m = state;
  float* l = state + group;
  float s[kAttnTile];
  // kivi4, and a range reaching a window's f16 tail: each tile's K and V widened to f32 rows
  // first (the reference dequantization, the same values as KvElem's).
  const bool widen = kv.type == KvType::kKivi4 || kv.tail_begin < end;
  std::vector<float> kt(widen ? kAttnTile * hd : 0), vt(kt.size());
  auto key = [&](int64_t j0, int64_t j) -> const void* {
    return widen ? static_cast<const void*>(kt.data() + j * hd) : slot(kv.k_blocks, j0 + j);
  };
  auto value = [&](int64_t j0, int64_t j) -> const void* {
    return widen ? static_cast<const void*>(vt.data() + j * hd) : slot(kv.v_blocks, j0 + j);
  };
  const KvType elem = widen ? KvType::kF32 : kv.type;
  for (int g = 0; g < group; ++g) {
    const float* qg = q + g * hd;
    float* acc = state + 2 * group + g * hd;
    m[g] = -std::numeric_limits<float>::infinity();
    l[g] = 0;
    std::fill(acc, acc + hd, 0.0f);
    for (int64_t t0 = begin - begin % kAttnTile; t0 < end; t0 += kAttnTile) {
      const int64_t j0 = std::max(t0, begin), n = std::min(t0 + kAttnTile, end) - j0;
      if (widen) WidenTile(kv, kvh, j0, static_cast<int>(n), kt.data(), vt.data(), hd);
      float tile_max = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < n; ++j) {
        s[j] = (KvDot)(qg, key(j0, j), hd, elem) * scale;  // () : no ADL
        tile_max = std::max(tile_max, s[j]);
      }
      const float m_new = std::max(m[g], tile_max);
      const float corr = std::exp(m[g] - m_new);
      float sum = 0;
      for (int64_t j = 0; j < n; ++j) sum += (s[j] = std::exp(s[j] - m_new));
      l[g] = l[g] * corr + sum;
      m[g] = m_new;
      for (int d = 0; d < hd; ++d) acc[d] *= corr;
      for (int64_t j = 0; j < n; ++j) (KvAxpy)(s[j], value(j0, j), hd, elem, acc);
    }
  }
}

void AttendBlock(const KvView& kv, const AttendJob& job) {
  for (int k = 0; k < job.n_kvh; ++k) {
    for (int i = 0; i < job.nq; ++i) {
      AttendSpan(job.q + k * job.q_kvh_stride + i * job.q_stride, job.group, kv, job.kvh + k,
                 job.begin, job.ends[i], job.scale,
                 job.state + k * job.state_kvh_stride + i * job.state_stride);
    }
  }
}

void F32ToF16(const float* x, void* y, int64_t n) {
  auto* out = static_cast<uint8_t*>(y);
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t h = Fp32ToFp16(x[i]);
    std::memcpy(out + 2 * i, &h, 2);
  }
}

void F16ToF32(const void* x, float* y, int64_t n) {
  const auto* in = static_cast<const uint8_t*>(x);
  for (int64_t i = 0; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, in + 2 * i, 2);
    y[i] = Fp16ToFp32(h);
  }
}

// Ops::fma_chains: 12 chains of a * b + c on floats, as the baseline compiler emits them.
int64_t FmaChains(int64_t steps, float* sink) {
  float acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = static_cast<float>(i);
  const float a = 0.999999f, b = 1e-7f;
  for (int64_t s = 0; s < steps; ++s) {
    for (float& v : acc) v = v * a + b;
  }
  float sum = 0;
  for (float v : acc) sum += v;
  *sink = sum;
  return steps * 12 * 2;
}

Ops MakeOps() {
  Ops o{};
  o.isa = Isa::kScalar;
  o.quantize_act = QuantizeAct;
  o.matmul_rows = MatMulRows;
  o.row_grain = RowGrain;
  o.dequantize_row = DequantizeRow;
  o.rms_norm = RmsNorm;
  o.softmax = Softmax;
  o.swiglu = SwiGlu;
  o.add = Add;
  o.kv_dot = KvDot;
  o.kv_axpy = KvAxpy;
  o.attend_block = AttendBlock;
  o.f32_to_f16 = F32ToF16;
  o.f16_to_f32 = F16ToF32;
  o.fma_chains = FmaChains;
  return o;
}

}  // namespace

const Ops& ScalarOps() {
  static const Ops ops = MakeOps();
  return ops;
}

}  // namespace cachette::kernels::internal
