// AVX-512 (F/BW/VL/DQ + VNNI) kernels. This TU alone is compiled with -mavx512*; every helper
// lives in the anonymous namespace and no std template is instantiated here (see
// kernels_internal.h for why).
//
// MatMul strategies:
//  * Float weights (f32/f16/bf16), any m: "dot" tiles of R rows x T tokens; each accumulator
//    is a zmm over 16 input features, reduced horizontally once per K block. Weights are read
//    in place (f16/bf16 widened in registers), so m == 1 streams each weight once and large m
//    reuses each loaded weight vector T times from L1.
//  * Quantized weights, small m: the same dot tiles over ymm blocks of 32 with the sign trick
//    (|w| unsigned x sign(x, w) signed) for VPDPBUSD.
//  * Quantized weights, m >= kPackMinM: a panel of 32 rows is repacked once per call into the
//    VNNI layout [block][group of 4 features][32 rows][4 bytes] with unsigned weights
//    (q + 128 for q8_0, the raw nibble for q4_0), so one VPDPBUSD with a broadcast 4 activation
//    bytes advances 16 rows at once and no horizontal sums are needed; the offset is removed
//    with the per-block activation sums precomputed at quantization.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "kernels/kernels_internal.h"

namespace cachette::kernels::internal {
namespace {

constexpr int kF32 = static_cast<int>(WType::kF32);
constexpr int kF16 = static_cast<int>(WType::kF16);
constexpr int kBF16 = static_cast<int>(WType::kBF16);
constexpr int kQ8 = static_cast<int>(WType::kQ8_0);
constexpr int kQ4 = static_cast<int>(WType::kQ4_0);

// Quantized weights switch to the repacked kernel at this many tokens: below it the repack
// (one pass over the panel) costs more than the reuse gains.
constexpr int64_t kPackMinM = 8;
// K block for the float tiles [T tokens][kKc] of x stay in L1 while R-row groups sweep a panel.
constexpr int64_t kKc = 512;
constexpr int64_t kFloatPanel = 16;  // rows per panel (4 groups of kFloatR)
constexpr int kFloatR = 4, kFloatT = 6;
constexpr int kQDotR = 4, kQDotT = 4;  // quantized small-m tiles
constexpr int kQPackT = 6;             // quantized packed tiles: 32 rows x 6 tokens

int64_t Min64(int64_t a, int64_t b) { return a < b ? a : b; }

float HalfToFloat(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

__mmask16 TailMask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }

// Sums of 4 vectors at once: lane i of the result is the total of input i.
__m128 Reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] and the same for c, d.
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  // Per 128-bit lane: [a, b, c, d] partial sums.
  const __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(abcd),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

float Reduce8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

// exp(x) to ~1 ulp: x = n ln2 + r, |r| <= ln2/2, e^r by its degree-7 Taylor polynomial
// (truncation error r^8/8! < 1e-8), scaled by 2^n with VSCALEF (which also gives 0 / inf
// for out-of-range inputs without clamping).
__m512 Exp(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// ---- Activation quantization -------------------------------------------------------------

// Bit-identical to the scalar QuantizeAct: same amax, same 127 / amax, same products, and
// VCVTPS2DQ rounds to nearest even like nearbyint in the default rounding mode.
void QuantizeAct(const float* x, int64_t t0, int64_t t1, const ActQ8& a) {
  const int64_t nb = a.cols / 32;
  const __m512 sign_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* s = x + t * a.cols + b * 32;
      const __m512 v0 = _mm512_loadu_ps(s), v1 = _mm512_loadu_ps(s + 16);
      const __m512 m = _mm512_max_ps(_mm512_and_ps(v0, sign_mask), _mm512_and_ps(v1, sign_mask));
      const float amax = _mm512_reduce_max_ps(m);
      const float id = amax > 0 ? 127.0f / amax : 0.0f;
      const __m512 vid = _mm512_set1_ps(id);
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, vid));
      const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, vid));
      int8_t* q = a.q + t * a.cols + b * 32;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(q1));
      a.d[t * nb + b] = amax / 127.0f;
      a.sum[t * nb + b] = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    }
  }
}

// ---- Float weights -----------------------------------------------------------------------

template <int kT>
__m512 LoadW(const uint8_t* row, int64_t k) {
  if constexpr (kT == kF32) {
    return _mm512_loadu_ps(row + 4 * k);
  } else if constexpr (kT == kF16) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * k)));
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * k));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

template <int kT>
__m512 LoadWMasked(const uint8_t* row, int64_t k, __mmask16 mask) {
  if constexpr (kT == kF32) {
    return _mm512_maskz_loadu_ps(mask, row + 4 * k);
  } else if constexpr (kT == kF16) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, row + 2 * k));
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(mask, row + 2 * k);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

// y[t][r] (+)= sum_{k in [k0, k1)} W[r][k] x[t][k] for R rows starting at w0 and T tokens.
template <int kT, int R, int T>
void FloatTile(const uint8_t* w0, size_t row_bytes, const float* x, int64_t ldx, int64_t k0,
               int64_t k1, float* y, int64_t ldy, bool accumulate) {
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  int64_t k = k0;
  for (; k + 16 <= k1; k += 16) {
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = LoadW<kT>(w0 + r * row_bytes, k);
    for (int t = 0; t < T; ++t) {
      const __m512 xv = _mm512_loadu_ps(x + t * ldx + k);
      for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
    }
  }
  if (k < k1) {
    const __mmask16 mask = TailMask(k1 - k);
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = LoadWMasked<kT>(w0 + r * row_bytes, k, mask);
    for (int t = 0; t < T; ++t) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + t * ldx + k);
      for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
    }
  }
  for (int t = 0; t < T; ++t) {
    float* yt = y + t * ldy;
    if constexpr (R == 4) {
      __m128 s = Reduce4(acc[0][t], acc[1][t], acc[2][t], acc[3][t]);
      if (accumulate) s = _mm_add_ps(s, _mm_loadu_ps(yt));
      _mm_storeu_ps(yt, s);
    } else {
      for (int r = 0; r < R; ++r) {
        const float s = _mm512_reduce_add_ps(acc[r][t]);
        yt[r] = accumulate ? yt[r] + s : s;
      }
    }
  }
}

using FloatTileFn = void (*)(const uint8_t*, size_t, const float*, int64_t, int64_t, int64_t,
                             float*, int64_t, bool);

#define CT_FLOAT_TILES(R) \
  {FloatTile<kT, R, 1>, FloatTile<kT, R, 2>, FloatTile<kT, R, 3>, FloatTile<kT, R, 4>, \
   FloatTile<kT, R, 5>, FloatTile<kT, R, 6>}

template <int kT>
void FloatMatMulRows(const MatMulArgs& a, int64_t r0, int64_t r1) {
  static constexpr FloatTileFn kTiles[kFloatR][kFloatT] = {
      CT_FLOAT_TILES(1), CT_FLOAT_TILES(2), CT_FLOAT_TILES(3), CT_FLOAT_TILES(4)};
  const WeightMatrix& w = *a.w;
  const auto* base = static_cast<const uint8_t*>(w.data);
  const int64_t cols = w.cols, m = a.m;
  // Few tokens: no K blocking, so each weight row streams contiguously once.
  const int64_t kc = m <= kFloatT ? cols : kKc;
  for (int64_t k0 = 0; k0 < cols; k0 += kc) {
    const int64_t k1 = Min64(cols, k0 + kc);
    for (int64_t p0 = r0; p0 < r1; p0 += kFloatPanel) {
      const int64_t p1 = Min64(r1, p0 + kFloatPanel);
      for (int64_t t0 = 0; t0 < m; t0 += kFloatT) {
        const int64_t nt = Min64(kFloatT, m - t0);
        for (int64_t g = p0; g < p1; g += kFloatR) {
          const int64_t nr = Min64(kFloatR, p1 - g);
          kTiles[nr - 1][nt - 1](base + g * w.row_bytes, w.row_bytes, a.x + t0 * cols, cols, k0,
                                 k1, a.y + t0 * w.rows + g, w.rows, k0 > 0);
        }
      }
    }
  }
}
#undef CT_FLOAT_TILES

// ---- Quantized weights, small m ----------------------------------------------------------

// Block b of a quantized row as 32 signed weights.
template <int kT>
__m256i LoadQBlock(const uint8_t* row, int64_t b) {
  if constexpr (kT == kQ8) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * 34 + 2));
  } else {
    const __m128i qs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * 18 + 2));
    const __m128i lo = _mm_and_si128(qs, _mm_set1_epi8(0x0f));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(qs, 4), _mm_set1_epi8(0x0f));
    return _mm256_sub_epi8(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(8));
  }
}

template <int kT>
float QScale(const uint8_t* row, int64_t b) {
  return HalfToFloat(row + b * (kT == kQ8 ? 34 : 18));
}

// [dw_b x 8, dw_{b+1} x 8] from the f16 scales of blocks b and b + 1 of a row.
template <int kT>
__m512 PairScales(const uint8_t* row, int64_t b) {
  constexpr int64_t kBB = kT == kQ8 ? 34 : 18;
  int16_t h0, h1;
  std::memcpy(&h0, row + b * kBB, 2);
  std::memcpy(&h1, row + (b + 1) * kBB, 2);
  return _mm512_cvtph_ps(_mm256_set_m128i(_mm_set1_epi16(h1), _mm_set1_epi16(h0)));
}

// Blocks b and b + 1 of a quantized row as 64 signed weights.
template <int kT>
__m512i LoadQPair(const uint8_t* row, int64_t b) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(LoadQBlock<kT>(row, b)), LoadQBlock<kT>(row, b + 1), 1);
}

// Dot tiles for few tokens: two blocks per zmm. The per-block scale is applied to the 8 int32
// lanes of each block (cvt + fma) rather than after a horizontal sum, which would cost more.
template <int kT, int R, int T>
void QuantDotTile(const uint8_t* w0, size_t row_bytes, const ActQ8& act, int64_t t0, float* y,
                  int64_t ldy) {
  constexpr int64_t kBB = kT == kQ8 ? 34 : 18;
  // Prefetch this far ahead in every row: R rows stream at once, more than the hardware
  // prefetchers track well.
  constexpr int64_t kAhead = 12 * kBB;
  const int64_t nb = act.cols / 32;
  const __m512i pair_idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    __m512i wv[R], wabs[R];
    __m512 dw[R];
    __mmask64 neg[R];
    for (int r = 0; r < R; ++r) {
      const uint8_t* row = w0 + r * row_bytes;
      _mm_prefetch(reinterpret_cast<const char*>(row + b * kBB + kAhead), _MM_HINT_T0);
      wv[r] = LoadQPair<kT>(row, b);
      wabs[r] = _mm512_abs_epi8(wv[r]);
      neg[r] = _mm512_movepi8_mask(wv[r]);
      dw[r] = PairScales<kT>(row, b);
    }
    for (int t = 0; t < T; ++t) {
      const __m512i xq = _mm512_loadu_si512(act.q + (t0 + t) * act.cols + b * 32);
      double dx2;
      std::memcpy(&dx2, act.d + (t0 + t) * nb + b, 8);
      const __m512 dx = _mm512_permutexvar_ps(pair_idx, _mm512_castps128_ps512(_mm_castpd_ps(_mm_set_sd(dx2))));
      for (int r = 0; r < R; ++r) {
        // sign(x, w) * |w| == x * w, with |w| in the unsigned operand VPDPBUSD wants.
        const __m512i xs = _mm512_mask_sub_epi8(xq, neg[r], _mm512_setzero_si512(), xq);
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wabs[r], xs);
        acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dw[r], dx), acc[r][t]);
      }
    }
  }
  float tail[R][T] = {};
  if (b < nb) {  // odd block count
    for (int r = 0; r < R; ++r) {
      const uint8_t* row = w0 + r * row_bytes;
      const __m256i w = LoadQBlock<kT>(row, b);
      const float dw = QScale<kT>(row, b);
      for (int t = 0; t < T; ++t) {
        const __m256i xq = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(act.q + (t0 + t) * act.cols + b * 32));
        const __m256i dot =
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_abs_epi8(w), _mm256_sign_epi8(xq, w));
        tail[r][t] = Reduce8(_mm256_cvtepi32_ps(dot)) * (dw * act.d[(t0 + t) * nb + b]);
      }
    }
  }
  for (int t = 0; t < T; ++t) {
    if constexpr (R == 4) {
      __m128 s = Reduce4(acc[0][t], acc[1][t], acc[2][t], acc[3][t]);
      s = _mm_add_ps(s, _mm_setr_ps(tail[0][t], tail[1][t], tail[2][t], tail[3][t]));
      _mm_storeu_ps(y + t * ldy, s);
    } else {
      for (int r = 0; r < R; ++r) y[t * ldy + r] = _mm512_reduce_add_ps(acc[r][t]) + tail[r][t];
    }
  }
}

using QuantDotTileFn = void (*)(const uint8_t*, size_t, const ActQ8&, int64_t, float*, int64_t);

#define CT_QDOT_TILES(R) \
  {QuantDotTile<kT, R, 1>, QuantDotTile<kT, R, 2>, QuantDotTile<kT, R, 3>, QuantDotTile<kT, R, 4>}

template <int kT>
void QuantDotRows(const MatMulArgs& a, int64_t r0, int64_t r1) {
  static constexpr QuantDotTileFn kTiles[kQDotR][kQDotT] = {
      CT_QDOT_TILES(1), CT_QDOT_TILES(2), CT_QDOT_TILES(3), CT_QDOT_TILES(4)};
  const WeightMatrix& w = *a.w;
  const auto* base = static_cast<const uint8_t*>(w.data);
  for (int64_t g = r0; g < r1; g += kQDotR) {
    const int64_t nr = Min64(kQDotR, r1 - g);
    for (int64_t t0 = 0; t0 < a.m; t0 += kQDotT) {
      const int64_t nt = Min64(kQDotT, a.m - t0);
      kTiles[nr - 1][nt - 1](base + g * w.row_bytes, w.row_bytes, a.act, t0,
                             a.y + t0 * w.rows + g, w.rows);
    }
  }
}
#undef CT_QDOT_TILES

// ---- Quantized weights, large m: repacked VNNI panels ------------------------------------

constexpr int64_t kPanelRows = 32;
constexpr int64_t kPanelBlockBytes = 32 * kPanelRows;  // [8 groups][32 rows][4 bytes]

// Repacks rows [p0, p1) (p1 - p0 <= 32; missing rows are zero) of W into
//   wp  [nb][8][32] uint32: 4 unsigned weight bytes of features 4g..4g+3 of each row
//   dwp [nb][32]    float : block scales
template <int kT>
void PackQuantPanel(const WeightMatrix& w, int64_t p0, int64_t p1, uint32_t* wp, float* dwp) {
  const int64_t nb = w.cols / 32;
  const auto* base = static_cast<const uint8_t*>(w.data);
  const __m256i bias = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t rr = 0; rr < kPanelRows; ++rr) {
    if (p0 + rr >= p1) {
      for (int64_t b = 0; b < nb; ++b) {
        dwp[b * kPanelRows + rr] = 0;
        for (int g = 0; g < 8; ++g) wp[(b * 8 + g) * kPanelRows + rr] = 0;
      }
      continue;
    }
    const uint8_t* row = base + (p0 + rr) * w.row_bytes;
    for (int64_t b = 0; b < nb; ++b) {
      __m256i u;
      if constexpr (kT == kQ8) {
        // q + 128 as an unsigned byte.
        u = _mm256_xor_si256(LoadQBlock<kQ8>(row, b), bias);
      } else {
        // The raw nibble: q + 8.
        u = _mm256_add_epi8(LoadQBlock<kQ4>(row, b), _mm256_set1_epi8(8));
      }
      alignas(32) uint32_t g4[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(g4), u);
      for (int g = 0; g < 8; ++g) wp[(b * 8 + g) * kPanelRows + rr] = g4[g];
      dwp[b * kPanelRows + rr] = QScale<kT>(row, b);
    }
  }
}

// y[t0 + t][p0 + i] for i < n_rows, t < T from a packed panel. `offset` is the bias added to
// the unsigned weights (128 or 8); it is removed per block as offset * sum(x_q).
template <int T>
void QuantPanelTile(const uint32_t* wp, const float* dwp, const ActQ8& act, int64_t t0,
                    int32_t offset, float* y, int64_t ldy, int64_t n_rows) {
  const int64_t nb = act.cols / 32;
  const int8_t* xq[T];
  const float* dx[T];
  const int32_t* sx[T];
  for (int t = 0; t < T; ++t) {
    xq[t] = act.q + (t0 + t) * act.cols;
    dx[t] = act.d + (t0 + t) * nb;
    sx[t] = act.sum + (t0 + t) * nb;
  }
  __m512 facc[2][T];
  for (int t = 0; t < T; ++t) facc[0][t] = facc[1][t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i iacc[2][T];
    for (int t = 0; t < T; ++t) iacc[0][t] = iacc[1][t] = _mm512_set1_epi32(-offset * sx[t][b]);
    const uint32_t* wb = wp + b * 8 * kPanelRows;
    for (int g = 0; g < 8; ++g) {
      const __m512i w0 = _mm512_load_si512(wb + g * kPanelRows);
      const __m512i w1 = _mm512_load_si512(wb + g * kPanelRows + 16);
      for (int t = 0; t < T; ++t) {
        int32_t x4;
        std::memcpy(&x4, xq[t] + b * 32 + g * 4, 4);
        const __m512i xb = _mm512_set1_epi32(x4);
        iacc[0][t] = _mm512_dpbusd_epi32(iacc[0][t], w0, xb);
        iacc[1][t] = _mm512_dpbusd_epi32(iacc[1][t], w1, xb);
      }
    }
    const __m512 dw0 = _mm512_load_ps(dwp + b * kPanelRows);
    const __m512 dw1 = _mm512_load_ps(dwp + b * kPanelRows + 16);
    for (int t = 0; t < T; ++t) {
      const __m512 s = _mm512_set1_ps(dx[t][b]);
      facc[0][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[0][t]), _mm512_mul_ps(dw0, s), facc[0][t]);
      facc[1][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[1][t]), _mm512_mul_ps(dw1, s), facc[1][t]);
    }
  }
  const __mmask16 m0 = n_rows >= 16 ? 0xffff : TailMask(n_rows);
  const __mmask16 m1 = n_rows >= 32 ? 0xffff : n_rows > 16 ? TailMask(n_rows - 16) : 0;
  for (int t = 0; t < T; ++t) {
    _mm512_mask_storeu_ps(y + t * ldy, m0, facc[0][t]);
    _mm512_mask_storeu_ps(y + t * ldy + 16, m1, facc[1][t]);
  }
}

using QuantPanelTileFn = void (*)(const uint32_t*, const float*, const ActQ8&, int64_t, int32_t,
                                  float*, int64_t, int64_t);

template <int kT>
void QuantPackedRows(const MatMulArgs& a, int64_t r0, int64_t r1) {
  static constexpr QuantPanelTileFn kTiles[kQPackT] = {QuantPanelTile<1>, QuantPanelTile<2>,
                                                       QuantPanelTile<3>, QuantPanelTile<4>,
                                                       QuantPanelTile<5>, QuantPanelTile<6>};
  const WeightMatrix& w = *a.w;
  const int64_t nb = w.cols / 32;
  auto* wp = static_cast<uint32_t*>(ThreadScratch(1, nb * kPanelBlockBytes));
  auto* dwp = static_cast<float*>(ThreadScratch(2, nb * kPanelRows * sizeof(float)));
  const int32_t offset = kT == kQ8 ? 128 : 8;
  for (int64_t p0 = r0; p0 < r1; p0 += kPanelRows) {
    const int64_t p1 = Min64(r1, p0 + kPanelRows);
    PackQuantPanel<kT>(w, p0, p1, wp, dwp);
    for (int64_t t0 = 0; t0 < a.m; t0 += kQPackT) {
      const int64_t nt = Min64(kQPackT, a.m - t0);
      kTiles[nt - 1](wp, dwp, a.act, t0, offset, a.y + t0 * w.rows + p0, w.rows, p1 - p0);
    }
  }
}

void MatMulRows(const MatMulArgs& a, int64_t r0, int64_t r1) {
  switch (a.w->type) {
    case WType::kF32: return FloatMatMulRows<kF32>(a, r0, r1);
    case WType::kF16: return FloatMatMulRows<kF16>(a, r0, r1);
    case WType::kBF16: return FloatMatMulRows<kBF16>(a, r0, r1);
    case WType::kQ8_0:
      return a.m >= kPackMinM ? QuantPackedRows<kQ8>(a, r0, r1) : QuantDotRows<kQ8>(a, r0, r1);
    case WType::kQ4_0:
      return a.m >= kPackMinM ? QuantPackedRows<kQ4>(a, r0, r1) : QuantDotRows<kQ4>(a, r0, r1);
  }
}

int64_t RowGrain(WType t, int64_t m) {
  if (t == WType::kQ8_0 || t == WType::kQ4_0) return m >= kPackMinM ? kPanelRows : kQDotR;
  return m <= kFloatT ? kFloatR : kFloatPanel;
}

// ---- Elementwise -------------------------------------------------------------------------

void RmsNorm(const float* x, const float* weight, float* y, int64_t rows, int64_t dim, float eps) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* xi = x + i * dim;
    float* yi = y + i * dim;
    __m512 ss = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 16 <= dim; c += 16) {
      const __m512 v = _mm512_loadu_ps(xi + c);
      ss = _mm512_fmadd_ps(v, v, ss);
    }
    if (c < dim) {
      const __m512 v = _mm512_maskz_loadu_ps(TailMask(dim - c), xi + c);
      ss = _mm512_fmadd_ps(v, v, ss);
    }
    const float inv = 1.0f / __builtin_sqrtf(_mm512_reduce_add_ps(ss) / static_cast<float>(dim) + eps);
    const __m512 vinv = _mm512_set1_ps(inv);
    for (c = 0; c + 16 <= dim; c += 16) {
      _mm512_storeu_ps(yi + c, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(xi + c), vinv),
                                             _mm512_loadu_ps(weight + c)));
    }
    if (c < dim) {
      const __mmask16 m = TailMask(dim - c);
      _mm512_mask_storeu_ps(yi + c, m,
                            _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, xi + c), vinv),
                                          _mm512_maskz_loadu_ps(m, weight + c)));
    }
  }
}

void Softmax(float* x, int64_t n) {
  if (n <= 0) return;
  __m512 vmax = _mm512_set1_ps(-__builtin_inff());
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(x + i));
  if (i < n) vmax = _mm512_mask_max_ps(vmax, TailMask(n - i), vmax, _mm512_maskz_loadu_ps(TailMask(n - i), x + i));
  const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
  __m512 vsum = _mm512_setzero_ps();
  for (i = 0; i + 16 <= n; i += 16) {
    const __m512 e = Exp(_mm512_sub_ps(_mm512_loadu_ps(x + i), mx));
    _mm512_storeu_ps(x + i, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  if (i < n) {
    const __mmask16 m = TailMask(n - i);
    const __m512 e = Exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), mx));
    _mm512_mask_storeu_ps(x + i, m, e);
    vsum = _mm512_mask_add_ps(vsum, m, vsum, e);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
  for (i = 0; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, _mm512_mul_ps(_mm512_loadu_ps(x + i), inv));
  if (i < n) {
    const __mmask16 m = TailMask(n - i);
    _mm512_mask_storeu_ps(x + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), inv));
  }
}

__m512 SwiGlu16(__m512 g, __m512 u) {
  const __m512 e = Exp(_mm512_sub_ps(_mm512_setzero_ps(), g));
  return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), u);
}

void SwiGlu(const float* gate, const float* up, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm512_storeu_ps(out + i, SwiGlu16(_mm512_loadu_ps(gate + i), _mm512_loadu_ps(up + i)));
  }
  if (i < n) {
    const __mmask16 m = TailMask(n - i);
    _mm512_mask_storeu_ps(out + i, m,
                          SwiGlu16(_mm512_maskz_loadu_ps(m, gate + i), _mm512_maskz_loadu_ps(m, up + i)));
  }
}

void Add(const float* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm512_storeu_ps(y + i, _mm512_add_ps(_mm512_loadu_ps(y + i), _mm512_loadu_ps(x + i)));
  }
  if (i < n) {
    const __mmask16 m = TailMask(n - i);
    _mm512_mask_storeu_ps(y + i, m,
                          _mm512_add_ps(_mm512_maskz_loadu_ps(m, y + i), _mm512_maskz_loadu_ps(m, x + i)));
  }
}

// ---- Attention inner loops ---------------------------------------------------------------

// 16 elements of a stored head vector starting at i (i % 16 == 0), masked to `mask`.
__m512 LoadKv16(const uint8_t* p, int i, KvType t, __mmask16 mask) {
  switch (t) {
    case KvType::kF32: return _mm512_maskz_loadu_ps(mask, p + 4 * i);
    case KvType::kF16: return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p + 2 * i));
    case KvType::kQ8_0: {
      const uint8_t* blk = p + (i / 32) * 34;
      const __m128i q = _mm_maskz_loadu_epi8(mask, blk + 2 + i % 32);
      return _mm512_mul_ps(_mm512_set1_ps(HalfToFloat(blk)),
                           _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)));
    }
  }
  return _mm512_setzero_ps();
}

float KvDot(const float* q, const void* k, int head_dim, KvType t) {
  const auto* p = static_cast<const uint8_t*>(k);
  __m512 acc = _mm512_setzero_ps();
  for (int i = 0; i < head_dim; i += 16) {
    const __mmask16 m = head_dim - i >= 16 ? 0xffff : TailMask(head_dim - i);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + i), LoadKv16(p, i, t, m), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

void KvAxpy(float a, const void* v, int head_dim, KvType t, float* acc) {
  const auto* p = static_cast<const uint8_t*>(v);
  const __m512 va = _mm512_set1_ps(a);
  for (int i = 0; i < head_dim; i += 16) {
    const __mmask16 m = head_dim - i >= 16 ? 0xffff : TailMask(head_dim - i);
    _mm512_mask_storeu_ps(acc + i, m,
                          _mm512_fmadd_ps(va, LoadKv16(p, i, t, m), _mm512_maskz_loadu_ps(m, acc + i)));
  }
}

Ops MakeOps() {
  Ops o{};
  o.isa = Isa::kAvx512;
  o.quantize_act = QuantizeAct;
  o.matmul_rows = MatMulRows;
  o.row_grain = RowGrain;
  // Embedding lookups convert one row per token: the scalar version is fast enough.
  o.dequantize_row = ScalarOps().dequantize_row;
  o.rms_norm = RmsNorm;
  o.softmax = Softmax;
  o.swiglu = SwiGlu;
  o.add = Add;
  o.kv_dot = KvDot;
  o.kv_axpy = KvAxpy;
  return o;
}

}  // namespace

const Ops& Avx512Ops() {
  static const Ops ops = MakeOps();
  return ops;
}

}  // namespace cachette::kernels::internal
