// AVX-512 (F/BW/VL/DQ + VNNI) kernels. This TU alone is compiled with -mavx512*; every helper
// lives in the anonymous namespace and no std template is instantiated here (see
// kernels_internal.h for why).
//
// MatMul strategies (each output's float operations are the same in all of them, whatever m,
// the tile or the thread split: the batch-invariant orders of docs/kernels.md):
//  * Float weights (f32/f16/bf16): "dot" tiles of R = 4 rows x T = 6 tokens; each accumulator
//    is a zmm over 16 input features, reduced horizontally once per 512-wide K chunk. For few
//    tokens the weights are read in place (f16/bf16 widened in registers), so m == 1 streams
//    each weight once; for many tokens each [16 rows][512] panel block is widened to f32 once
//    into scratch and reused by all token tiles.
//  * Quantized weights, m < PackMinM() (decode): tiles of 8 rows over pairs of blocks (64
//    weights per zmm), q4_0 over 4 blocks a step where the rows' scales are regrouped
//    (Q4Steps4); VPDPBUSD takes unsigned weights (w + 128 for q8_0, the raw nibbles, w + 8, for
//    q4_0) and each block's sum starts at minus the offset times sum(x_q); integer horizontal
//    sums give each row's block dot, then one FMA per block with one row per lane, as the
//    packed panels do.
//  * Quantized weights, m >= PackMinM() (prefill): a panel of 32 rows is repacked once per call
//    (loads and a dword transpose) into the VNNI layout [block][group of 4 features][32 rows]
//    [4 bytes] with unsigned weights (q + 128 for q8_0, the raw nibble for q4_0), so one
//    VPDPBUSD with 4 broadcast activation bytes advances 16 rows at once and no horizontal sums
//    are needed; the offset is removed with the per-block activation sums precomputed at
//    quantization.
// Attention widens each 64-slot K tile (and, for several queries, V tile) to f32 once for all
// query heads of a GQA group and a block of queries (BlockHeads), scores up to 4 heads
// per pass over the tile with their q in registers (ScoreHeads), and prefetches the next
// tile's K and V vectors while this one computes.
//
// WART: AMX-INT8 (TDPBSUD) is detected but not used. Tile kernels for the Q8_0/Q4_0 panels
// were built (a block's exact int32 dots per 16 tokens x 16 rows, then these panels' float
// operations, so the same bits) and measured at best level with the VNNI panels: each 32-wide
// block needs its own tile product, store and scaling, and the scaling, which both paths
// share, dominates (docs/benchmarks.md, "AMX").
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
// (one pass over the panel) costs more than the reuse gains. Both give the same bits.
// Measured on [896 -> 4864] (Sapphire Rapids, when the panels were packed by gathers): q8_0
// m=2 dot 225 us vs packed 257 us, m=4 340 vs 275; q4_0 m=2 195 vs 163.
int64_t PackMinM(WType t) { return t == WType::kQ8_0 ? 3 : 2; }
// K block of the float tiles: [T tokens][kKc] of x stays in L1 while R-row groups sweep a panel.
constexpr int64_t kKc = 512;
constexpr int64_t kFloatPanel = 16;  // rows per panel (4 groups of kFloatR)
constexpr int kFloatR = 4, kFloatT = 6;
constexpr int64_t kFloatPanelOuterMaxM = 64;
constexpr int kQDotT = 2;  // quantized small-m tiles: 8 rows x up to 2 tokens
constexpr int kQPackT = 6;             // quantized packed tiles: 32 rows x 6 tokens

int64_t Min64(int64_t a, int64_t b) { return a < b ? a : b; }

float HalfToFloat(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

__mmask16 TailMask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }

// Sums of 4 vectors at once: lane i of the result is the total of input i, by a fixed tree
// that never mixes inputs: per 128-bit quarter q, Q_q = (v[4q] + v[4q+2]) + (v[4q+1] + v[4q+3]);
// total = (Q_0 + Q_2) + (Q_1 + Q_3).
__m128 Reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] and the same for c, d.
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  // Per 128-bit lane: [a, b, c, d] partial sums.
  const __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 h =
      _mm256_add_ps(_mm512_castps512_ps256(abcd),
                    _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
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

// 16 weights of a row as stored (RawW) and widened to f32 (Widen): LoadW = Widen(LoadRawW).
template <int kT>
struct RawWType {
  using type = __m256i;
};
template <>
struct RawWType<kF32> {
  using type = __m512;
};
template <int kT>
using RawW = typename RawWType<kT>::type;

template <int kT>
RawW<kT> LoadRawW(const uint8_t* row, int64_t k) {
  if constexpr (kT == kF32) {
    return _mm512_loadu_ps(row + 4 * k);
  } else {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * k));
  }
}

template <int kT>
__m512 Widen(RawW<kT> w) {
  if constexpr (kT == kF32) {
    return w;
  } else if constexpr (kT == kF16) {
    return _mm512_cvtph_ps(w);
  } else {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(w), 16));
  }
}

template <int kT>
__m512 LoadW(const uint8_t* row, int64_t k) {
  return Widen<kT>(LoadRawW<kT>(row, k));
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

// Decode streams each weight once: fetch the next tile's rows at the same offset (the next
// stretch of memory), as rows are too short for the hardware prefetchers (see QuantGemvTile).
// 16-bit weights advance half a 64-byte line per step, so a full tile fetches rows 0-1 on even
// steps and 2-3 on odd ones: each line once, two prefetches per step. Four per step (each line
// twice) made the f16 decode of a model 10-15% slower on AMD's Zen 5, and so did four on every
// other step.
template <int kT, int R>
void PrefetchNextTile(const uint8_t* w0, size_t row_bytes, int64_t k) {
  if constexpr (kT != kF32 && R == 4) {
    const int r0 = static_cast<int>(k >> 3) & 2;  // k / 16 odd: rows 2-3
    const char* next = reinterpret_cast<const char*>(w0 + (r0 + R) * row_bytes) + 2 * k;
    _mm_prefetch(next, _MM_HINT_T0);
    _mm_prefetch(next + row_bytes, _MM_HINT_T0);
  } else {
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w0 + (r + R) * row_bytes) +
                       k * static_cast<int64_t>(kT == kF32 ? 4 : 2),
                   _MM_HINT_T0);
    }
  }
}

// y[t][r] (+)= sum_{k in [k0, k1)} W[r][k] x[t][k] for R rows starting at w0 and T tokens.
// k0 is a multiple of kKc. The batch-invariant order (docs/kernels.md): K in chunks of kKc
// from 0; within a chunk lane j of a zmm accumulator takes k = j mod 16 in increasing k (FMA,
// the tail masked to zero); each chunk is reduced by Reduce4's tree and the chunk sums are
// added in order. A caller may split [0, cols) at multiples of kKc and accumulate in y: the
// additions are the same.
template <int kT, int R, int T>
void FloatTile(const uint8_t* w0, size_t row_bytes, const float* x, int64_t ldx, int64_t k0,
               int64_t k1, float* y, int64_t ldy, bool accumulate) {
  static_assert(R >= 1 && R <= 4, "Reduce4 takes up to 4 rows");
  __m128 sum[T];
  #pragma GCC unroll 8
  for (int t = 0; t < T; ++t) sum[t] = _mm_setzero_ps();
  for (int64_t c0 = k0; c0 < k1; c0 += kKc) {
    const int64_t c1 = Min64(k1, c0 + kKc);
    __m512 acc[4][T];
    #pragma GCC unroll 8
    for (int r = 0; r < 4; ++r)
      #pragma GCC unroll 8
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
    // One step: R rows' raw weights, widened once, times T tokens' x at k.
    auto step = [&](const RawW<kT>* w, int64_t kk) {
      __m512 wv[R];
      #pragma GCC unroll 8
      for (int r = 0; r < R; ++r) wv[r] = Widen<kT>(w[r]);
      #pragma GCC unroll 8
      for (int t = 0; t < T; ++t) {
        const __m512 xv = _mm512_loadu_ps(x + t * ldx + kk);
        #pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
      }
    };
    int64_t k = c0;
    if constexpr (T <= 2) {
      // Decode streams each weight once. The loads of step k + 16 are issued before step k's
      // widening and FMAs, so that the uops which wait for a load that missed do not fill the
      // scheduler and hold back the loads behind them: an f16 model's decode matmuls 11-15%
      // faster on AMD's Zen 5, bf16 and f32 alike (the same FMAs in the same order). Loading
      // two to four steps ahead was slower than one.
      if (k + 16 <= c1) {
        RawW<kT> cur[R];
        #pragma GCC unroll 8
        for (int r = 0; r < R; ++r) cur[r] = LoadRawW<kT>(w0 + r * row_bytes, k);
        for (; k + 32 <= c1; k += 16) {
          PrefetchNextTile<kT, R>(w0, row_bytes, k);
          RawW<kT> next[R];
          #pragma GCC unroll 8
          for (int r = 0; r < R; ++r) next[r] = LoadRawW<kT>(w0 + r * row_bytes, k + 16);
          step(cur, k);
          #pragma GCC unroll 8
          for (int r = 0; r < R; ++r) cur[r] = next[r];
        }
        PrefetchNextTile<kT, R>(w0, row_bytes, k);
        step(cur, k);
        k += 16;
      }
    } else {
      for (; k + 16 <= c1; k += 16) {
        if constexpr (kT == kF32) {
          // Each step reads a new 64-byte line of each row: fetch the line two steps ahead.
          // One thread on Zen 5, m = 512, four rounds: f32 weights (read in place) 31.0-32.9
          // -> 29.9-30.8 ms, f16/bf16 (panels widened into L2) 1-2% faster; four or sixteen
          // lines ahead read slower than none in one round each.
          #pragma GCC unroll 8
          for (int r = 0; r < R; ++r) {
            _mm_prefetch(reinterpret_cast<const char*>(w0 + r * row_bytes + 4 * k + 128),
                         _MM_HINT_T0);
          }
        }
        RawW<kT> w[R];
        #pragma GCC unroll 8
        for (int r = 0; r < R; ++r) w[r] = LoadRawW<kT>(w0 + r * row_bytes, k);
        step(w, k);
      }
    }
    if (k < c1) {
      const __mmask16 mask = TailMask(c1 - k);
      __m512 wv[R];
      #pragma GCC unroll 8
      for (int r = 0; r < R; ++r) wv[r] = LoadWMasked<kT>(w0 + r * row_bytes, k, mask);
      #pragma GCC unroll 8
      for (int t = 0; t < T; ++t) {
        const __m512 xv = _mm512_maskz_loadu_ps(mask, x + t * ldx + k);
        #pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
      }
    }
    // Missing rows (R < 4) reduce zeros in their own lane: Reduce4 never mixes inputs, so a
    // row's sum does not depend on R.
    #pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      const __m128 s = Reduce4(acc[0][t], acc[1][t], acc[2][t], acc[3][t]);
      sum[t] = c0 == k0 ? s : _mm_add_ps(sum[t], s);
    }
  }
  #pragma GCC unroll 8
  for (int t = 0; t < T; ++t) {
    float* yt = y + t * ldy;
    if constexpr (R == 4) {
      __m128 s = sum[t];
      if (accumulate) s = _mm_add_ps(_mm_loadu_ps(yt), s);
      _mm_storeu_ps(yt, s);
    } else {
      alignas(16) float s[4];
      _mm_store_ps(s, sum[t]);
      #pragma GCC unroll 8
      for (int r = 0; r < R; ++r) yt[r] = accumulate ? yt[r] + s[r] : s[r];
    }
  }
}

using FloatTileFn = void (*)(const uint8_t*, size_t, const float*, int64_t, int64_t, int64_t,
                             float*, int64_t, bool);

#define CT_FLOAT_TILES(R)                                                               \
  {                                                                                     \
    FloatTile<kT, R, 1>, FloatTile<kT, R, 2>, FloatTile<kT, R, 3>, FloatTile<kT, R, 4>, \
        FloatTile<kT, R, 5>, FloatTile<kT, R, 6>                                        \
  }

#define CT_F32_TILES(R)                                                                         \
  {                                                                                             \
    FloatTile<kF32, R, 1>, FloatTile<kF32, R, 2>, FloatTile<kF32, R, 3>, FloatTile<kF32, R, 4>, \
        FloatTile<kF32, R, 5>, FloatTile<kF32, R, 6>                                            \
  }

template <int kT>
void FloatMatMulRows(const MatMulArgs& a, int64_t r0, int64_t r1) {
  static constexpr FloatTileFn kTiles[kFloatR][kFloatT] = {CT_FLOAT_TILES(1), CT_FLOAT_TILES(2),
                                                           CT_FLOAT_TILES(3), CT_FLOAT_TILES(4)};
  static constexpr FloatTileFn kF32Tiles[kFloatR][kFloatT] = {CT_F32_TILES(1), CT_F32_TILES(2),
                                                              CT_F32_TILES(3), CT_F32_TILES(4)};
  const WeightMatrix& w = *a.w;
  const auto* base = static_cast<const uint8_t*>(w.data);
  const int64_t cols = w.cols, m = a.m;
  // Few tokens: no K blocking here, so each weight row streams contiguously once (the tile
  // still sums in kKc chunks: same bits as the blocked path).
  const int64_t kc = m <= kFloatT ? cols : kKc;
  // With many token blocks, f16/bf16 weights are widened to f32 once per panel block
  // [kFloatPanel][kc] so the tiles do pure FMAs (VCVTPH2PS competes for the FMA ports). With
  // few, the extra pass costs more than it saves (m = 8: 70 vs 95 GFLOP/s).
  const bool widen = kT != kF32 && m > kFloatPanelOuterMaxM;
  float* wide =
      widen ? static_cast<float*>(ThreadScratch(1, kFloatPanel * kc * sizeof(float))) : nullptr;
  auto run_panel_block = [&](int64_t p0, int64_t k0) {
    const int64_t p1 = Min64(r1, p0 + kFloatPanel);
    const int64_t k1 = Min64(cols, k0 + kc);
    if (widen) {
      const int64_t kn = k1 - k0;
      for (int64_t r = p0; r < p1; ++r) {
        const uint8_t* row = base + r * w.row_bytes;
        float* out = wide + (r - p0) * kc;
        int64_t k = 0;
        for (; k + 16 <= kn; k += 16) _mm512_storeu_ps(out + k, LoadW<kT>(row, k0 + k));
        if (k < kn)
          _mm512_mask_storeu_ps(out + k, TailMask(kn - k),
                                LoadWMasked<kT>(row, k0 + k, TailMask(kn - k)));
      }
      for (int64_t t0 = 0; t0 < m; t0 += kFloatT) {
        const int64_t nt = Min64(kFloatT, m - t0);
        for (int64_t g = p0; g < p1; g += kFloatR) {
          const int64_t nr = Min64(kFloatR, p1 - g);
          kF32Tiles[nr - 1][nt - 1](reinterpret_cast<const uint8_t*>(wide + (g - p0) * kc),
                                    kc * sizeof(float), a.x + t0 * cols + k0, cols, 0, kn,
                                    a.y + t0 * w.rows + g, w.rows, k0 > 0);
        }
      }
      return;
    }
    for (int64_t t0 = 0; t0 < m; t0 += kFloatT) {
      const int64_t nt = Min64(kFloatT, m - t0);
      for (int64_t g = p0; g < p1; g += kFloatR) {
        const int64_t nr = Min64(kFloatR, p1 - g);
        kTiles[nr - 1][nt - 1](base + g * w.row_bytes, w.row_bytes, a.x + t0 * cols, cols, k0, k1,
                               a.y + t0 * w.rows + g, w.rows, k0 > 0);
      }
    }
  };
  if (m <= kFloatPanelOuterMaxM) {
    // x [m][cols] fits in L2: finish each panel over all of K so that the weights stream from
    // memory row by row (K-outer order would revisit every row once per K block).
    for (int64_t p0 = r0; p0 < r1; p0 += kFloatPanel)
      for (int64_t k0 = 0; k0 < cols; k0 += kc) run_panel_block(p0, k0);
  } else {
    // x does not fit: keep its [m][kc] slice in L2 while all panels pass over it.
    for (int64_t k0 = 0; k0 < cols; k0 += kc)
      for (int64_t p0 = r0; p0 < r1; p0 += kFloatPanel) run_panel_block(p0, k0);
  }
}
#undef CT_FLOAT_TILES
#undef CT_F32_TILES

// ---- Quantized weights, small m ----------------------------------------------------------

// Prefetches the 64-byte lines that a read of [p, p + kStep) enters for a stream read kStep
// bytes a step, 64 < kStep <= 128: the line of its last byte, and the one before when the step
// spans three lines. One prefetch of p's line per step would never fetch one line in 17 for
// q8_0's 68-byte steps (a demand miss each): that took 15-20% off the q8_0 decode matmuls of
// a model on AMD's Zen 5.
template <int64_t kStep>
void PrefetchStep(const uint8_t* p) {
  static_assert(kStep > 64 && kStep <= 128, "one or two new lines a step");
  const uint8_t* end = p + kStep - 1;
  _mm_prefetch(reinterpret_cast<const char*>(end), _MM_HINT_T0);
  if ((reinterpret_cast<uintptr_t>(end) & 63) + 64 < kStep) {
    _mm_prefetch(reinterpret_cast<const char*>(end - 64), _MM_HINT_T0);
  }
}

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

// Blocks b and b + 1 of a quantized row as 64 signed weights.
template <int kT>
__m512i LoadQPair(const uint8_t* row, int64_t b) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(LoadQBlock<kT>(row, b)),
                            LoadQBlock<kT>(row, b + 1), 1);
}

// [d[0] x 8, d[1] x 8].
__m512 PairDx(const float* d, __m512i pair_idx) {
  double d2;
  std::memcpy(&d2, d, 8);
  return _mm512_permutexvar_ps(pair_idx, _mm512_castps128_ps512(_mm_castpd_ps(_mm_set_sd(d2))));
}

// Per 128-bit quarter q of the 8 rows' partial sums P[r] (4 lanes each): r03 holds rows 0-3's
// sums of that quarter's lanes, r47 rows 4-7's (integer sums: exact in any order).
[[gnu::always_inline]] inline void QuarterSums8(const __m512i P[8], __m512i* r03, __m512i* r47) {
  __m512i a[4];
  for (int i = 0; i < 4; ++i) {
    // Per quarter: [P2i lanes 0+2, P2i+1 lanes 0+2, P2i lanes 1+3, P2i+1 lanes 1+3].
    a[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(P[2 * i], P[2 * i + 1]),
                            _mm512_unpackhi_epi32(P[2 * i], P[2 * i + 1]));
  }
  *r03 = _mm512_add_epi32(_mm512_unpacklo_epi64(a[0], a[1]), _mm512_unpackhi_epi64(a[0], a[1]));
  *r47 = _mm512_add_epi32(_mm512_unpacklo_epi64(a[2], a[3]), _mm512_unpackhi_epi64(a[2], a[3]));
}

// The integer block dots of 8 rows for two blocks: P[r] holds row r's 4-product partial sums
// of block b in lanes 0-7 and of block b + 1 in lanes 8-15. Returns
// [row 0..7 of block b, row 0..7 of block b + 1] (integer sums: exact in any order).
__m512i BlockSums8x2(const __m512i P[8]) {
  __m512i b0, b1;
  QuarterSums8(P, &b0, &b1);
  // Quarters 0 + 1 are block b, 2 + 3 block b + 1.
  const __m512i lo = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
  const __m512i hi = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
  return _mm512_add_epi32(_mm512_permutex2var_epi64(b0, lo, b1),
                          _mm512_permutex2var_epi64(b0, hi, b1));
}

// acc += dot * s for two blocks in order: lanes 0-7 (block b), then lanes 8-15 (block b + 1),
// one output per lane of acc; the two FMAs every decode tile adds a pair of blocks with.
[[gnu::always_inline]] inline __m256 AddBlockPair(__m256 acc, __m512 dot, __m512 s) {
  acc = _mm256_fmadd_ps(_mm512_castps512_ps256(dot), _mm512_castps512_ps256(s), acc);
  return _mm256_fmadd_ps(_mm512_extractf32x8_ps(dot, 1), _mm512_extractf32x8_ps(s, 1), acc);
}

// The q4_0 decode tile's main loop, 4 blocks a step (QuantGemvTile's callee; s8 required):
// returns the number of blocks it did (a multiple of 4), acc updated as QuantGemvTile would,
// block by block. Each row's 4 x 16 nibble bytes go in one register, low nibbles (elements
// 0-15 of each block) and high nibbles (16-31) apart, and the activations are rearranged to
// match (16-byte lanes), so no weight shuffles: two VPDPBUSD a row leave block b + q's sums in
// 128-bit quarter q, and one reduction serves 4 blocks. Per block and 8 rows that is about 28
// instructions against 46 at 2 blocks a step, where q4_0 decode is short of instructions
// rather than bandwidth (docs/benchmarks.md).
template <int T>
int64_t Q4Steps4(const uint8_t* const rows[8], size_t row_bytes, const uint16_t* s8,
                 const ActQ8& act, int64_t t0, __m256 acc[T]) {
  constexpr int R = 8;
  constexpr int64_t kBB = 18;
  const int64_t nb = act.cols / 32;
  const __m512i pair_idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512i quad_idx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  // x's 16-byte lanes: block j's elements 0-15 are lane 2j, 16-31 lane 2j + 1.
  const __m512i x_lo = _mm512_setr_epi64(0, 1, 4, 5, 8, 9, 12, 13);
  const __m512i x_hi = _mm512_setr_epi64(2, 3, 6, 7, 10, 11, 14, 15);
  // [rows 0-3 | rows 4-7] per quarter -> [block b rows 0-7 | block b + 1 rows 0-7], and b + 2, 3.
  const __m512i blocks01 = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
  const __m512i blocks23 = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
  const __m512i nib = _mm512_set1_epi8(0x0f);
  int64_t b = 0;
  for (; b + 4 <= nb; b += 4) {
    const __m512 dw01 =
        _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s8 + b * 8)));
    const __m512 dw23 =
        _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s8 + b * 8 + 16)));
    __m512i lo[R], hi[R];
    for (int r = 0; r < R; ++r) {
      // The next tile's rows, as in QuantGemvTile: each line once (72-byte steps).
      PrefetchStep<4 * kBB>(rows[r] + b * kBB + R * row_bytes);
      const uint8_t* q = rows[r] + b * kBB + 2;
      __m512i v = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
      v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + kBB)), 1);
      v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 2 * kBB)),
                             2);
      v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 3 * kBB)),
                             3);
      lo[r] = _mm512_and_si512(v, nib);
      hi[r] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
    }
    for (int t = 0; t < T; ++t) {
      const int8_t* xt = act.q + (t0 + t) * act.cols + b * 32;
      const __m512i x0 = _mm512_loadu_si512(xt), x1 = _mm512_loadu_si512(xt + 64);
      const __m512i xl = _mm512_permutex2var_epi64(x0, x_lo, x1);
      const __m512i xh = _mm512_permutex2var_epi64(x0, x_hi, x1);
      // Lane 0 of each quarter starts at -8 * sum(x_q) of its block (the raw nibbles are w + 8).
      const __m128i sums =
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(act.sum + (t0 + t) * nb + b));
      const __m512i init = _mm512_maskz_permutexvar_epi32(
          0x1111, quad_idx,
          _mm512_castsi128_si512(_mm_sub_epi32(_mm_setzero_si128(), _mm_slli_epi32(sums, 3))));
      __m512i p[R];
      for (int r = 0; r < R; ++r) {
        p[r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(init, lo[r], xl), hi[r], xh);
      }
      __m512i r03, r47;  // per quarter (block b + q): rows 0-3, rows 4-7
      QuarterSums8(p, &r03, &r47);
      const __m512 dot01 = _mm512_cvtepi32_ps(_mm512_permutex2var_epi64(r03, blocks01, r47));
      const __m512 dot23 = _mm512_cvtepi32_ps(_mm512_permutex2var_epi64(r03, blocks23, r47));
      const float* dx = act.d + (t0 + t) * nb + b;
      const __m512 s01 = _mm512_mul_ps(dw01, PairDx(dx, pair_idx));
      const __m512 s23 = _mm512_mul_ps(dw23, PairDx(dx + 2, pair_idx));
      // Blocks in order, as QuantGemvTile adds them.
      acc[t] = AddBlockPair(AddBlockPair(acc[t], dot01, s01), dot23, s23);
    }
  }
  return b;
}

// Decode tiles (m < PackMinM): 8 rows x T tokens, reading the weights in place. Each block's
// integer dot is exact, so the per-output float sequence is the packed panels' one
// (QuantPanelTile): acc = fma(float(dot_b), dw_b * dx_b, acc) for b = 0, 1, ... with one
// output per lane; the horizontal work is integer (BlockSums8x2), once per 2 blocks x 8 rows.
// Rows past n_rows repeat the last row and are not stored. s8 is the tile's
// WeightMatrix::scales8 group (one load per 2 blocks), or null: the scales are then gathered
// from the rows, which on AMD's Zen 5 costs 4-8% of a decode step's matmul time (a microcoded
// gather that is the first to touch each row's next lines; docs/benchmarks.md).
template <int kT, int T>
void QuantGemvTile(const uint8_t* w0, size_t row_bytes, int64_t n_rows, const uint16_t* s8,
                   const ActQ8& act, int64_t t0, float* y, int64_t ldy) {
  constexpr int R = 8;
  constexpr int64_t kBB = kT == kQ8 ? 34 : 18;
  const int64_t nb = act.cols / 32;
  const __m512i pair_idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512i nib_idx = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
  const uint8_t* rows[R];
  int32_t offs[R];
  for (int r = 0; r < R; ++r) {
    const int64_t rr = r < n_rows ? r : n_rows - 1;
    rows[r] = w0 + rr * row_bytes;
    offs[r] = static_cast<int32_t>(rr * static_cast<int64_t>(row_bytes));
  }
  // Gather offsets of the f16 scales: lanes 0-7 block b of rows 0-7, lanes 8-15 block b + 1.
  const __m256i off8 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(offs));
  const __m512i scale_offs = _mm512_inserti64x4(
      _mm512_castsi256_si512(off8), _mm256_add_epi32(off8, _mm256_set1_epi32(kBB)), 1);
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  int64_t b = 0;
  if constexpr (kT == kQ4) {
    if (s8 != nullptr) b = Q4Steps4<T>(rows, row_bytes, s8, act, t0, acc);
  }
  for (; b + 2 <= nb; b += 2) {
    const __m512 dw =
        s8 != nullptr
            ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s8 + b * 8)))
            : _mm512_cvtph_ps(
                  _mm512_cvtepi32_epi16(_mm512_i32gather_epi32(scale_offs, w0 + b * kBB, 1)));
    __m512i wv[R];
    for (int r = 0; r < R; ++r) {
      // The tile's rows are one contiguous region; rows are short (a few hundred bytes to a few
      // KiB), too short for the hardware prefetchers to ramp up on, so fetch the same offset of
      // the next tile's rows, which is the next stretch of memory in address order.
      if constexpr (kT == kQ8) {
        PrefetchStep<2 * kBB>(rows[r] + b * kBB + R * row_bytes);
      } else {  // 36-byte steps: p's line each step (each line once was no faster)
        _mm_prefetch(reinterpret_cast<const char*>(rows[r] + b * kBB + R * row_bytes),
                     _MM_HINT_T0);
      }
      if constexpr (kT == kQ8) {
        // w + 128, unsigned: VPDPBUSD's operand without the sign trick's three instructions a
        // row (the 128 * sum(x_q) this adds is subtracted by the accumulator's start).
        wv[r] = _mm512_xor_si512(LoadQPair<kT>(rows[r], b), _mm512_set1_epi8(-128));
      } else {
        // q4_0: the raw nibbles (w + 8) are already unsigned; the 8 * sum(x_q) they add is
        // subtracted by starting lane 0 of each block at -8 * sum(x_q).
        const __m256i qs = _mm256_set_m128i(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[r] + (b + 1) * kBB + 2)),
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[r] + b * kBB + 2)));
        const __m256i lo = _mm256_and_si256(qs, _mm256_set1_epi8(0x0f));
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qs, 4), _mm256_set1_epi8(0x0f));
        // [lo_b, hi_b, lo_b+1, hi_b+1] in 16-byte units = element order of x.
        wv[r] = _mm512_permutex2var_epi64(_mm512_castsi256_si512(lo), nib_idx,
                                          _mm512_castsi256_si512(hi));
      }
    }
    for (int t = 0; t < T; ++t) {
      const __m512i xq = _mm512_loadu_si512(act.q + (t0 + t) * act.cols + b * 32);
      __m512i p[R];
      // Lane 0 of each block starts at -offset * sum(x_q): 128 for q8_0's w + 128, 8 for q4_0's
      // raw nibbles (w + 8).
      const __m128i sums =
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(act.sum + (t0 + t) * nb + b));
      const __m512i init = _mm512_maskz_permutexvar_epi32(
          0x0101, pair_idx,
          _mm512_castsi128_si512(
              _mm_sub_epi32(_mm_setzero_si128(), _mm_slli_epi32(sums, kT == kQ8 ? 7 : 3))));
      for (int r = 0; r < R; ++r) p[r] = _mm512_dpbusd_epi32(init, wv[r], xq);
      const __m512 dot = _mm512_cvtepi32_ps(BlockSums8x2(p));
      const __m512 s = _mm512_mul_ps(dw, PairDx(act.d + (t0 + t) * nb + b, pair_idx));
      acc[t] = AddBlockPair(acc[t], dot, s);
    }
  }
  if (b < nb) {  // odd block count: the last block alone, in lanes 0-7 (8-15 stay zero)
    const __m256 dw =
        s8 != nullptr
            ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s8 + b * 8)))
            : _mm256_cvtph_ps(_mm256_cvtepi32_epi16(_mm256_i32gather_epi32(
                  reinterpret_cast<const int*>(w0 + b * kBB), _mm512_castsi512_si256(scale_offs),
                  1)));
    __m512i wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_castsi256_si512(LoadQBlock<kT>(rows[r], b));
    for (int t = 0; t < T; ++t) {
      const __m256i xq = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(act.q + (t0 + t) * act.cols + b * 32));
      __m512i p[R];
      for (int r = 0; r < R; ++r) {
        const __m256i w = _mm512_castsi512_si256(wv[r]);
        p[r] = _mm512_zextsi256_si512(_mm256_dpbusd_epi32(
            _mm256_setzero_si256(), _mm256_abs_epi8(w), _mm256_sign_epi8(xq, w)));
      }
      const __m256 dot = _mm512_castps512_ps256(_mm512_cvtepi32_ps(BlockSums8x2(p)));
      const __m256 s = _mm256_mul_ps(dw, _mm256_set1_ps(act.d[(t0 + t) * nb + b]));
      acc[t] = _mm256_fmadd_ps(dot, s, acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) {
    if (n_rows >= R) {
      _mm256_storeu_ps(y + t * ldy, acc[t]);
    } else {
      _mm256_mask_storeu_ps(y + t * ldy, static_cast<__mmask8>((1u << n_rows) - 1), acc[t]);
    }
  }
}

using QuantGemvTileFn = void (*)(const uint8_t*, size_t, int64_t, const uint16_t*,
                                 const ActQ8&, int64_t, float*, int64_t);
constexpr int64_t kQGemvR = 8;

template <int kT>
void QuantGemvRows(const MatMulArgs& a, int64_t r0, int64_t r1) {
  static constexpr QuantGemvTileFn kTiles[kQDotT] = {QuantGemvTile<kT, 1>, QuantGemvTile<kT, 2>};
  const WeightMatrix& w = *a.w;
  const auto* base = static_cast<const uint8_t*>(w.data);
  for (int64_t g = r0; g < r1; g += kQGemvR) {
    const int64_t nr = Min64(kQGemvR, r1 - g);
    const uint16_t* s8 =
        w.scales8 != nullptr && g % 8 == 0 ? w.scales8 + g / 8 * (w.cols / 32) * 8 : nullptr;
    for (int64_t t0 = 0; t0 < a.m; t0 += kQDotT) {
      const int64_t nt = Min64(kQDotT, a.m - t0);
      kTiles[nt - 1](base + g * w.row_bytes, w.row_bytes, nr, s8, a.act, t0,
                     a.y + t0 * w.rows + g, w.rows);
    }
  }
}

// ---- Quantized weights, large m: repacked VNNI panels ------------------------------------

constexpr int64_t kPanelRows = 32;
constexpr int64_t kPanelBlockBytes = 32 * kPanelRows;  // [8 groups][32 rows][4 bytes]

// Repacks rows [p0, p1) (p1 - p0 <= 32; missing rows are zero) of W into
//   wp  [nb][8][32] uint32: 4 unsigned weight bytes of features 4g..4g+3 of each row
//   dwp [nb][32]    float : block scales
// a transpose at dword granularity of each block, 16 rows at a time: each row's block loaded
// whole, then unpacks and lane permutes. It replaced a VPGATHERDD per dword group (9 a block
// for q8_0), which Zen 5 runs microcoded: the packing was a fifth of a q8_0 prefill matmul there
// (docs/benchmarks.md). The scales come from WeightMatrix::scales8 where it is built, else one
// gather a block.
template <int kT>
void PackQuantPanel(const WeightMatrix& w, int64_t p0, int64_t p1, uint32_t* wp, float* dwp) {
  constexpr int64_t kBB = kT == kQ8 ? 34 : 18;
  const int64_t nb = w.cols / 32;
  const auto* base = static_cast<const uint8_t*>(w.data);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i offs = _mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int>(w.row_bytes)));
  const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  // Quadword indices that gather 128-bit lanes 0 and 2 (lo) or 1 and 3 (hi) of a, b as
  // [a.0, b.0, a.2, b.2] and [a.1, b.1, a.3, b.3].
  const __m512i lanes_lo = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
  const __m512i lanes_hi = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
  for (int half = 0; half < 2; ++half) {
    const int64_t h0 = p0 + 16 * half;
    const int n = static_cast<int>(p1 - h0 >= 16 ? 16 : p1 - h0 <= 0 ? 0 : p1 - h0);
    const __mmask16 valid = TailMask(n);
    const uint8_t* const rows = base + (n > 0 ? h0 * w.row_bytes : 0);
    // scales8's groups of 8 rows for this half (h0 is a multiple of 16): the second only where
    // a row of it is in the panel.
    const uint16_t* s8 = w.scales8 != nullptr && n > 0 ? w.scales8 + h0 / 8 * nb * 8 : nullptr;
    for (int64_t b = 0; b < nb; ++b) {
      uint32_t* const out = wp + b * 8 * kPanelRows + 16 * half;
      __m256i sc;
      if (s8 != nullptr) {
        const __m128i g0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s8 + b * 8));
        const __m128i g1 =
            n > 8 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(s8 + (nb + b) * 8))
                  : _mm_setzero_si128();
        sc = _mm256_maskz_mov_epi16(valid, _mm256_set_m128i(g1, g0));
      } else {
        sc = _mm512_cvtepi32_epi16(_mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid,
                                                               offs, rows + b * kBB, 1));
      }
      _mm512_store_ps(dwp + b * kPanelRows + 16 * half, _mm512_cvtph_ps(sc));
      const uint8_t* const blk = rows + b * kBB + 2;
      if constexpr (kT == kQ8) {
        // v[i]: row i's 8 dwords in the low 256 bits, row i + 8's in the high (zero past n).
        __m512i v[8];
        for (int i = 0; i < 8; ++i) {
          const __m256i lo = i < n ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                                         blk + i * w.row_bytes))
                                   : _mm256_setzero_si256();
          const __m256i hi = i + 8 < n ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                                             blk + (i + 8) * w.row_bytes))
                                       : _mm256_setzero_si256();
          v[i] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
        }
        // An 8 x 8 dword transpose in each 256-bit half: t[g] = dword g of rows 0-7 | 8-15.
        __m512i t[8], u[8];
        for (int i = 0; i < 4; ++i) {
          t[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
          t[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
        }
        for (int h = 0; h < 2; ++h) {  // rows 0-3 (of each half), rows 4-7
          const __m512i* th = t + 4 * h;
          u[4 * h + 0] = _mm512_unpacklo_epi64(th[0], th[2]);  // dwords 0 | 4
          u[4 * h + 1] = _mm512_unpackhi_epi64(th[0], th[2]);  // 1 | 5
          u[4 * h + 2] = _mm512_unpacklo_epi64(th[1], th[3]);  // 2 | 6
          u[4 * h + 3] = _mm512_unpackhi_epi64(th[1], th[3]);  // 3 | 7
        }
        for (int g = 0; g < 4; ++g) {
          const __m512i d0 = _mm512_permutex2var_epi64(u[g], lanes_lo, u[4 + g]);
          const __m512i d1 = _mm512_permutex2var_epi64(u[g], lanes_hi, u[4 + g]);
          // q + 128 as unsigned bytes; padded rows stay 0.
          _mm512_store_si512(out + g * kPanelRows, _mm512_maskz_xor_epi32(valid, d0, bias));
          _mm512_store_si512(out + (g + 4) * kPanelRows, _mm512_maskz_xor_epi32(valid, d1, bias));
        }
      } else {
        // v[i]: rows i, i + 4, i + 8, i + 12 in its 128-bit lanes (their 4 dwords of nibbles).
        auto row = [&](int r) {
          return r < n ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + r * w.row_bytes))
                       : _mm_setzero_si128();
        };
        __m512i v[4];
        for (int i = 0; i < 4; ++i) {  // the lane indices are immediates, whatever the unrolling
          v[i] = _mm512_inserti32x4(_mm512_castsi128_si512(row(i)), row(i + 4), 1);
          v[i] = _mm512_inserti32x4(v[i], row(i + 8), 2);
          v[i] = _mm512_inserti32x4(v[i], row(i + 12), 3);
        }
        // A 4 x 4 dword transpose in each lane: t[g] = dword g of rows 0-3 | 4-7 | 8-11 | 12-15.
        const __m512i a0 = _mm512_unpacklo_epi32(v[0], v[1]);
        const __m512i a1 = _mm512_unpackhi_epi32(v[0], v[1]);
        const __m512i a2 = _mm512_unpacklo_epi32(v[2], v[3]);
        const __m512i a3 = _mm512_unpackhi_epi32(v[2], v[3]);
        const __m512i t[4] = {_mm512_unpacklo_epi64(a0, a2), _mm512_unpackhi_epi64(a0, a2),
                              _mm512_unpacklo_epi64(a1, a3), _mm512_unpackhi_epi64(a1, a3)};
        for (int g = 0; g < 4; ++g) {
          // Features 4g.. are the low nibbles, 16 + 4g.. the high ones: raw nibble = q + 8.
          _mm512_store_si512(out + g * kPanelRows, _mm512_and_si512(t[g], low4));
          _mm512_store_si512(out + (g + 4) * kPanelRows,
                             _mm512_and_si512(_mm512_srli_epi16(t[g], 4), low4));
        }
      }
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
      facc[0][t] =
          _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[0][t]), _mm512_mul_ps(dw0, s), facc[0][t]);
      facc[1][t] =
          _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[1][t]), _mm512_mul_ps(dw1, s), facc[1][t]);
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
    case WType::kF32:
      return FloatMatMulRows<kF32>(a, r0, r1);
    case WType::kF16:
      return FloatMatMulRows<kF16>(a, r0, r1);
    case WType::kBF16:
      return FloatMatMulRows<kBF16>(a, r0, r1);
    case WType::kQ8_0:
      return a.m >= PackMinM(WType::kQ8_0) ? QuantPackedRows<kQ8>(a, r0, r1)
                                           : QuantGemvRows<kQ8>(a, r0, r1);
    case WType::kQ4_0:
      return a.m >= PackMinM(WType::kQ4_0) ? QuantPackedRows<kQ4>(a, r0, r1)
                                           : QuantGemvRows<kQ4>(a, r0, r1);
  }
}

int64_t RowGrain(WType t, int64_t m) {
  if (t == WType::kQ8_0 || t == WType::kQ4_0) return m >= PackMinM(t) ? kPanelRows : kQGemvR;
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
    const float inv =
        1.0f / __builtin_sqrtf(_mm512_reduce_add_ps(ss) / static_cast<float>(dim) + eps);
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
  if (i < n)
    vmax = _mm512_mask_max_ps(vmax, TailMask(n - i), vmax,
                              _mm512_maskz_loadu_ps(TailMask(n - i), x + i));
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
  for (i = 0; i + 16 <= n; i += 16)
    _mm512_storeu_ps(x + i, _mm512_mul_ps(_mm512_loadu_ps(x + i), inv));
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
    _mm512_mask_storeu_ps(
        out + i, m, SwiGlu16(_mm512_maskz_loadu_ps(m, gate + i), _mm512_maskz_loadu_ps(m, up + i)));
  }
}

void Add(const float* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm512_storeu_ps(y + i, _mm512_add_ps(_mm512_loadu_ps(y + i), _mm512_loadu_ps(x + i)));
  }
  if (i < n) {
    const __mmask16 m = TailMask(n - i);
    _mm512_mask_storeu_ps(
        y + i, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, y + i), _mm512_maskz_loadu_ps(m, x + i)));
  }
}

// ---- Attention inner loops ---------------------------------------------------------------

// 16 elements of a stored head vector starting at i (i % 16 == 0), masked to `mask`.
__m512 LoadKv16(const uint8_t* p, int i, KvType t, __mmask16 mask) {
  switch (t) {
    case KvType::kF32:
      return _mm512_maskz_loadu_ps(mask, p + 4 * i);
    case KvType::kF16:
      return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p + 2 * i));
    case KvType::kQ8_0: {
      const uint8_t* blk = p + (i / 32) * 34;
      const __m128i q = _mm_maskz_loadu_epi8(mask, blk + 2 + i % 32);
      return _mm512_mul_ps(_mm512_set1_ps(HalfToFloat(blk)),
                           _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)));
    }
    case KvType::kQ4_0: {
      // i % 32 is 0 or 16: the low or the high nibbles of the block's 16 bytes.
      const uint8_t* blk = p + (i / 32) * 18;
      __m128i q = _mm_maskz_loadu_epi8(mask, blk + 2);
      if (i % 32 != 0) q = _mm_srli_epi16(q, 4);
      q = _mm_and_si128(q, _mm_set1_epi8(0x0f));
      // d * nib - 8d: both terms and the sum are exact (= d * (nib - 8), as the scalar code).
      const float d = HalfToFloat(blk);
      return _mm512_fmadd_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q)),
                             _mm512_set1_ps(-8.0f * d));
    }
    case KvType::kKivi4:  // a V vector (a K vector needs its group's parameters: WidenKivi)
    case KvType::kQ4_1: {  // the same block layout and arithmetic
      const uint8_t* blk = p + (i / 32) * 20;
      __m128i q = _mm_maskz_loadu_epi8(mask, blk + 4);
      if (i % 32 != 0) q = _mm_srli_epi16(q, 4);
      q = _mm_and_si128(q, _mm_set1_epi8(0x0f));
      return _mm512_fmadd_ps(_mm512_set1_ps(HalfToFloat(blk)),
                             _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q)),
                             _mm512_set1_ps(HalfToFloat(blk + 2)));
    }
  }
  return _mm512_setzero_ps();
}

// kivi4 slots [j0, j0 + n) of KV head kvh to f32 rows kt and vt (ld apart), the same bits as
// the reference (internal::WidenTile): tail slots from f16, quantized ones by
// fma(scale, nib, min) with the key group's per-channel parameters (gathered into par:
// scale[hd], min[hd], once per group).
void WidenKivi(const KvView& kv, int kvh, int64_t j0, int n, float* kt, float* vt, int ld,
               float* par) {
  const int hd = kv.head_dim;
  const size_t tok_bytes = KvHeadBytes(KvType::kKivi4, hd) * kv.n_kv_head;
  int64_t group = -1;
  for (int j = 0; j < n; ++j) {
    const int64_t s = j0 + j;
    if (s >= kv.tail_begin) {
      const uint16_t* kh = TailSlot(kv, false, kvh, s);
      const uint16_t* vh = TailSlot(kv, true, kvh, s);
      for (int c = 0; c < hd; c += 16) {
        _mm512_store_ps(kt + j * ld + c, _mm512_cvtph_ps(_mm256_loadu_si256(
                                             reinterpret_cast<const __m256i*>(kh + c))));
        _mm512_store_ps(vt + j * ld + c, _mm512_cvtph_ps(_mm256_loadu_si256(
                                             reinterpret_cast<const __m256i*>(vh + c))));
      }
      continue;
    }
    if (s / kKiviGroup != group) {
      group = s / kKiviGroup;
      KiviKeyParams(KvSlot(kv, false, kvh, group * kKiviGroup), tok_bytes, hd, par, par + hd);
    }
    const uint8_t* kp = KvSlot(kv, false, kvh, s);
    const uint8_t* vp = KvSlot(kv, true, kvh, s);
    for (int c = 0; c < hd; c += 16) {
      const uint8_t* kq = kp + (c / 32) * 20 + 4;
      __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kq));
      if (c % 32 != 0) q = _mm_srli_epi16(q, 4);
      q = _mm_and_si128(q, _mm_set1_epi8(0x0f));
      _mm512_store_ps(kt + j * ld + c,
                      _mm512_fmadd_ps(_mm512_load_ps(par + c),
                                      _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q)),
                                      _mm512_load_ps(par + hd + c)));
      _mm512_store_ps(vt + j * ld + c, LoadKv16(vp, c, KvType::kKivi4, 0xffff));
    }
  }
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
    _mm512_mask_storeu_ps(
        acc + i, m, _mm512_fmadd_ps(va, LoadKv16(p, i, t, m), _mm512_maskz_loadu_ps(m, acc + i)));
  }
}

// Up to 8 query heads of a GQA group at once (G accumulators stay in registers).
constexpr int kMaxAttnHeads = 8;

// The V half of a tile for G heads of one query and the 16-feature chunks [c, c + C)
// (C = 1 or 2): the heads' accumulators, rescaled by corr, gain p[h][j] * v_j for j < n;
// 2C * G independent FMA chains.
// V rows come from `vt` (widened, ld apart) when it is not null, else straight from the
// stored vectors at vp[j] + off (the same values: the widening is exact).
template <int G, int C, KvType kT>
void TileValues(const float* vt, const uint8_t* const* vp, size_t off, int ld, int n,
                const float (*p)[kAttnTile], const float* corr, int c, __mmask16 m0, __mmask16 m1,
                int hd, float* acc) {
  __m512 a[C][G];
  for (int x = 0; x < C; ++x) {
    const __mmask16 mk = x == 0 ? m0 : m1;
    for (int h = 0; h < G; ++h) {
      a[x][h] = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, acc + h * hd + 16 * (c + x)),
                              _mm512_set1_ps(corr[h]));
    }
  }
  for (int j = 0; j < n; ++j) {
    __m512 v[C];
    for (int x = 0; x < C; ++x) {
      v[x] = vt != nullptr ? _mm512_load_ps(vt + j * ld + 16 * (c + x))
                           : LoadKv16(vp[j] + off, 16 * (c + x), kT, x == 0 ? m0 : m1);
    }
    for (int h = 0; h < G; ++h) {
      const __m512 w = _mm512_set1_ps(p[h][j]);
      for (int x = 0; x < C; ++x) a[x][h] = _mm512_fmadd_ps(w, v[x], a[x][h]);
    }
  }
  for (int x = 0; x < C; ++x) {
    for (int h = 0; h < G; ++h) {
      _mm512_mask_storeu_ps(acc + h * hd + 16 * (c + x), x == 0 ? m0 : m1, a[x][h]);
    }
  }
}

// Rows [j_from, j_to) of the K tile when kt is set, and of the V tile when vt is set, widened
// from the stored vectors at kp[j] + off, vp[j] + off of type kT (zero-padded to whole
// 16-feature chunks), the next pass's vectors prefetched one slot per row.
template <KvType kT>
void WidenRows(const uint8_t* const* kp, const uint8_t* const* vp, size_t off, int j_from,
               int j_to, int nc, __mmask16 last, int ld, float* kt, float* vt,
               const PassPrefetch& pf) {
  for (int j = j_from; j < j_to; ++j) {
    PrefetchSlot(*pf.tile, j, pf.hb, pf.off);
    int c = 0;
    if (kt != nullptr) {  // else the scores read K in place
      const uint8_t* const k = kp[j] + off;
      float* const kr = kt + j * ld;
      for (; c < nc - 1; ++c) _mm512_store_ps(kr + 16 * c, LoadKv16(k, 16 * c, kT, 0xffff));
      _mm512_store_ps(kr + 16 * c, LoadKv16(k, 16 * c, kT, last));
    }
    if (vt == nullptr) continue;  // a lone query reads V in place
    const uint8_t* const v = vp[j] + off;
    float* const vr = vt + j * ld;
    for (c = 0; c < nc - 1; ++c) _mm512_store_ps(vr + 16 * c, LoadKv16(v, 16 * c, kT, 0xffff));
    _mm512_store_ps(vr + 16 * c, LoadKv16(v, 16 * c, kT, last));
  }
}

// Scores of each of the g heads of one query in turn, four keys at a time, for any number of
// chunks (the head_dims TileScoresFor has no ScoreHeads for): the same FMAs and Reduce4.
void TileScoresAny(const float* q, int g, int hd, const float* kt, int ld, int n4,
                   __mmask16 last, float scale, float (*s)[kAttnTile]) {
  const int nc = ld / 16;
  for (int h = 0; h < g; ++h) {
    const float* qh = q + h * hd;
    for (int j = 0; j < n4; j += 4) {
      const float* k0 = kt + j * ld;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int c = 0; c < nc; ++c) {
        const __m512 qc = _mm512_maskz_loadu_ps(c == nc - 1 ? last : 0xffff, qh + 16 * c);
        a0 = _mm512_fmadd_ps(qc, _mm512_load_ps(k0 + 16 * c), a0);
        a1 = _mm512_fmadd_ps(qc, _mm512_load_ps(k0 + ld + 16 * c), a1);
        a2 = _mm512_fmadd_ps(qc, _mm512_load_ps(k0 + 2 * ld + 16 * c), a2);
        a3 = _mm512_fmadd_ps(qc, _mm512_load_ps(k0 + 3 * ld + 16 * c), a3);
      }
      _mm_store_ps(s[h] + j, _mm_mul_ps(Reduce4(a0, a1, a2, a3), _mm_set1_ps(scale)));
    }
  }
}

// ScoreHeads' K source: the widened tile rather than stored vectors of a KV type.
constexpr auto kWidened = static_cast<KvType>(-1);

// Scores of HB heads of one query over keys [0, n4) of a K tile, four keys at a time: the heads' NC
// q chunks stay in registers and each K chunk is loaded once for the HB heads. The K tile is the
// widened one (kt, rows ld apart) when kSrc is kWidened, else key j's stored kSrc vector at kp[j] +
// off, read in place (the same values: the widening is exact). Per (head, key) the same FMAs over
// the chunks in order and the same Reduce4 as one head at a time, so the same bits. HB * (NC + 4)
// zmm registers.
template <int NC, int HB, KvType kSrc>
void ScoreHeads(const float* qh, int hd, const float* kt, const uint8_t* const* kp, size_t off,
                int ld, int n4, __mmask16 last, float scale, float (*s)[kAttnTile]) {
  __m512 qv[HB][NC];
  #pragma GCC unroll 16
  for (int h = 0; h < HB; ++h) {
    #pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) {
      qv[h][c] = _mm512_maskz_loadu_ps(c == NC - 1 ? last : 0xffff, qh + h * hd + 16 * c);
    }
  }
  const __m128 sc = _mm_set1_ps(scale);
  for (int j = 0; j < n4; j += 4) {
    __m512 a[HB][4];
    #pragma GCC unroll 16
    for (int h = 0; h < HB; ++h) {
      #pragma GCC unroll 4
      for (int x = 0; x < 4; ++x) a[h][x] = _mm512_setzero_ps();
    }
    #pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) {
      #pragma GCC unroll 4
      for (int x = 0; x < 4; ++x) {
        __m512 kv;
        if constexpr (kSrc == kWidened) {
          kv = _mm512_load_ps(kt + (j + x) * ld + 16 * c);
        } else {
          kv = LoadKv16(kp[j + x] + off, 16 * c, kSrc, c == NC - 1 ? last : 0xffff);
        }
        #pragma GCC unroll 4
        for (int h = 0; h < HB; ++h) a[h][x] = _mm512_fmadd_ps(qv[h][c], kv, a[h][x]);
      }
    }
    #pragma GCC unroll 4
    for (int h = 0; h < HB; ++h) {
      _mm_store_ps(s[h] + j, _mm_mul_ps(Reduce4(a[h][0], a[h][1], a[h][2], a[h][3]), sc));
    }
  }
}

// Heads per ScoreHeads pass: as many as fit HB * (NC + 4) <= 24 registers, at most 4.
constexpr int ScoreBlock(int nc) {
  return 24 / (nc + 4) < 1 ? 1 : (24 / (nc + 4) > 4 ? 4 : 24 / (nc + 4));
}

// Scores of all g heads of one query (head h's q at q + h * hd, its scores in s[h]), from the
// widened K tile (kSrc kWidened) or the stored vectors in place (ScoreHeads).
template <int NC, KvType kSrc>
void TileScores(const float* q, int g, int hd, const float* kt, const uint8_t* const* kp,
                size_t off, int ld, int n4, __mmask16 last, float scale,
                float (*s)[kAttnTile]) {
  constexpr int kHb = ScoreBlock(NC);
#define CT_SCORE_HEADS(HB) \
  ScoreHeads<NC, HB, kSrc>(q + h * hd, hd, kt, kp, off, ld, n4, last, scale, s + h)
  int h = 0;
  for (; h + kHb <= g; h += kHb) CT_SCORE_HEADS(kHb);
  switch (g - h) {
    case 1: CT_SCORE_HEADS(1); break;
    case 2:
      if constexpr (kHb > 2) CT_SCORE_HEADS(2);
      break;
    case 3:
      if constexpr (kHb > 3) CT_SCORE_HEADS(3);
      break;
    default: break;
  }
#undef CT_SCORE_HEADS
}

using TileScoresFn = void (*)(const float*, int, int, const float*, const uint8_t* const*,
                              size_t, int, int, __mmask16, float, float (*)[kAttnTile]);

// TileScoresAny with TileScoresFn's arguments (always from the widened tile).
void TileScoresAnyFn(const float* q, int g, int hd, const float* kt, const uint8_t* const*,
                     size_t, int ld, int n4, __mmask16 last, float scale,
                     float (*s)[kAttnTile]) {
  TileScoresAny(q, g, hd, kt, ld, n4, last, scale, s);
}

// By the number of 16-feature chunks of a head: ScoreHeads passes for head_dim up to 128 and
// 256, TileScoresAny for the others. kSrc: the widened tile (kWidened), or stored vectors of
// that type in place (null where there is no such pass: the tile must be widened).
template <KvType kSrc>
TileScoresFn TileScoresFor(int nc) {
  static constexpr TileScoresFn kFns[9] = {
      kSrc == kWidened ? TileScoresAnyFn : nullptr, TileScores<1, kSrc>,
      TileScores<2, kSrc>, TileScores<3, kSrc>, TileScores<4, kSrc>, TileScores<5, kSrc>,
      TileScores<6, kSrc>, TileScores<7, kSrc>, TileScores<8, kSrc>};
  if (nc <= 8) return kFns[nc];
  if (nc == 16) return TileScores<16, kSrc>;
  return kSrc == kWidened ? TileScoresAnyFn : nullptr;
}

// attend_block for heads h0 .. h0 + G of each query's group, for nq consecutive queries and
// the job's KV heads (see kernels_internal.h; the scalar AttendSpan is the definition of each
// query's arithmetic). Per tile, per KV head in turn: K and V widened once to f32 rows in L1
// scratch (zero-padded to whole 16-feature chunks) for all the queries, the next pass's
// vectors (the next KV head's in this tile, or the first's in the next tile) prefetched
// meanwhile; then per query: the scores of up to 4 heads per pass, four keys at a time (one
// Reduce4 for four dot products; TileScores); per head, the max, exponentials and sum over the
// query's own keys of the tile; and the V sum with the G heads' accumulators in registers, two
// 16-feature chunks per pass. A query's operations do not depend on the others in the block,
// nor on the other KV heads: a decode step (nq = 1) and any prefill block give the same bits.
// The KV heads of one thread go in turn within each tile so that it reads each slot's record
// of them whole: one KV head's vectors are a strided half (or less) of each record, which
// streamed from memory at a third of the rate (docs/benchmarks.md).
template <int G, KvType kT>
void BlockHeads(const KvView& kv, const AttendJob& job, int h0) {
  const int hd = kv.head_dim, nq = job.nq, group = job.group;
  const int nc = (hd + 15) / 16, ld = 16 * nc;
  const __mmask16 last = hd % 16 == 0 ? 0xffff : TailMask(hd % 16);
  const float inf = __builtin_inff();
  auto m = [&](int k, int i) { return job.State(k, i) + h0; };
  auto l = [&](int k, int i) { return job.State(k, i) + group + h0; };
  auto acc = [&](int k, int i) { return job.State(k, i) + 2 * group + h0 * hd; };
  const int64_t end = StartJob(job, h0, G, hd);
  // Scratch: the K tile [kAttnTile][ld], then the V tile, both zero-padded, then (kivi4) a key
  // group's parameters. A lone query (a decode step, memory-bound) reads V in place instead of
  // widening it first, except in a tile reaching a window's f16 tail (KvView::tail_begin; every
  // kivi4 tile), whose slots are not all in the blocks.
  constexpr bool kivi = kT == KvType::kKivi4;
  auto* kt = static_cast<float*>(
      ThreadScratch(2, sizeof(float) * (2 * kAttnTile * ld + (kivi ? 2 * hd : 0))));
  float* const vbuf = kt + kAttnTile * ld;
  // The stored K and V vectors of the first KV head for this tile and the next (TileAddrs;
  // none for kivi4); KV head kvh + k's are hb * k bytes on in the blocks, 2 * hd * k in the
  // f16 ring.
  TileAddrs tiles[2];
  const size_t hb = KvHeadBytes(kT, hd);
  alignas(64) float s[G][kAttnTile];
  float corr[G];
  const TileScoresFn scores = TileScoresFor<kWidened>(nc);
  // Scores from K in place, where a lone query reads V in place too (f16 and f32 KV: one
  // conversion a chunk): widening K cost a lone query more than the scores' repeated reads.
  TileScoresFn k_in_place = nullptr;
  if constexpr (kT == KvType::kF16 || kT == KvType::kF32) k_in_place = TileScoresFor<kT>(nc);
  const int64_t begin = job.begin, t_first = begin - begin % kAttnTile;
  if (!kivi && t_first < end) {
    FindTile(kv, job.kvh, begin, static_cast<int>(Min64(t_first + kAttnTile, end) - begin),
             tiles);
  }
  int x = 0;  // tiles[x]: this tile's
  for (int64_t t0 = t_first; t0 < end; t0 += kAttnTile, x ^= 1) {
    const int64_t j0 = t0 > begin ? t0 : begin;
    const int n_all = static_cast<int>(Min64(t0 + kAttnTile, end) - j0);
    const int n4_all = (n_all + 3) & ~3;
    float* const vt = nq > 1 || kivi || t0 + kAttnTile > kv.tail_begin ? vbuf : nullptr;
    TileAddrs& cur = tiles[x];
    TileAddrs& next = tiles[x ^ 1];
    const bool in_place = vt == nullptr && k_in_place != nullptr;
    if constexpr (!kivi) {
      StepTiles(kv, job.kvh, t0, end, in_place, n_all, n4_all, cur, next);
    }
    // The widened K tile's rows [n_all, n4_all) stay zeros through the KV heads' passes.
    for (int j = n_all; !in_place && j < n4_all; ++j) {
      for (int c = 0; c < ld; c += 16) _mm512_store_ps(kt + j * ld + c, _mm512_setzero_ps());
    }
    for (int k = 0; k < job.n_kvh; ++k) {
      const int kvh = job.kvh + k;
      const size_t off = k * hb;
      if constexpr (kivi) {
        WidenKivi(kv, kvh, j0, n_all, kt, vt, ld, kt + 2 * kAttnTile * ld);
      } else {
        const PassPrefetch pf = NextPass(cur, next, k, job.n_kvh, hb);
        float* const kw = in_place ? nullptr : kt;
        WidenRows<kT>(cur.k, cur.v, off, 0, cur.n_blocks, nc, last, ld, kw, vt, pf);
        WidenRows<KvType::kF16>(cur.k, cur.v, 2 * hd * k, cur.n_blocks, n_all, nc, last, ld, kw,
                                vt, pf);
        for (int j = n_all; j < pf.tile->n_blocks; ++j) PrefetchSlot(*pf.tile, j, hb, pf.off);
      }
      for (int qi = 0; qi < nq; ++qi) {
        if (job.ends[qi] <= j0) continue;
        const int n = static_cast<int>(Min64(t0 + kAttnTile, job.ends[qi]) - j0);
        const int n4 = (n + 3) & ~3;
        const float* qq = job.q + k * job.q_kvh_stride + qi * job.q_stride + h0 * hd;
        float* mq = m(k, qi);
        float* lq = l(k, qi);
        if (in_place) {
          k_in_place(qq, G, hd, nullptr, cur.k, off, ld, n4, last, job.scale, s);
        } else {
          scores(qq, G, hd, kt, nullptr, 0, ld, n4, last, job.scale, s);
        }
        for (int h = 0; h < G; ++h) {
          __m512 vmax = _mm512_set1_ps(-inf);
          int i = 0;
          for (; i + 16 <= n; i += 16) vmax = _mm512_max_ps(vmax, _mm512_load_ps(s[h] + i));
          const __mmask16 tail = TailMask(n - i);
          if (i < n) {
            vmax = _mm512_mask_max_ps(vmax, tail, vmax, _mm512_maskz_load_ps(tail, s[h] + i));
          }
          const float tile_max = _mm512_reduce_max_ps(vmax);
          const float m_new = mq[h] > tile_max ? mq[h] : tile_max;
          corr[h] = __builtin_expf(mq[h] - m_new);
          const __m512 mx = _mm512_set1_ps(m_new);
          __m512 vsum = _mm512_setzero_ps();
          for (i = 0; i + 16 <= n; i += 16) {
            const __m512 e = Exp(_mm512_sub_ps(_mm512_load_ps(s[h] + i), mx));
            _mm512_store_ps(s[h] + i, e);
            vsum = _mm512_add_ps(vsum, e);
          }
          if (i < n) {
            const __m512 e = Exp(_mm512_sub_ps(_mm512_maskz_load_ps(tail, s[h] + i), mx));
            _mm512_mask_store_ps(s[h] + i, tail, e);
            vsum = _mm512_mask_add_ps(vsum, tail, vsum, e);
          }
          lq[h] = lq[h] * corr[h] + _mm512_reduce_add_ps(vsum);
          mq[h] = m_new;
        }
        float* const aq = acc(k, qi);
        int c = 0;
        for (; c + 2 <= nc; c += 2) {
          TileValues<G, 2, kT>(vt, cur.v, off, ld, n, s, corr, c, 0xffff,
                               c + 2 == nc ? last : 0xffff, hd, aq);
        }
        if (c < nc) TileValues<G, 1, kT>(vt, cur.v, off, ld, n, s, corr, c, last, 0, hd, aq);
      }
    }
  }
}

#define BLOCK_HEADS(t)                                                                     \
  {                                                                                        \
    BlockHeads<1, t>, BlockHeads<2, t>, BlockHeads<3, t>, BlockHeads<4, t>,                \
        BlockHeads<5, t>, BlockHeads<6, t>, BlockHeads<7, t>, BlockHeads<8, t>             \
  }

void AttendBlock(const KvView& kv, const AttendJob& job) {
  using Fn = void (*)(const KvView&, const AttendJob&, int);
  // [KV type][heads - 1]
  static constexpr Fn kFns[6][kMaxAttnHeads] = {
      BLOCK_HEADS(KvType::kF32),  BLOCK_HEADS(KvType::kF16),   BLOCK_HEADS(KvType::kQ8_0),
      BLOCK_HEADS(KvType::kQ4_0), BLOCK_HEADS(KvType::kKivi4), BLOCK_HEADS(KvType::kQ4_1)};
  for (int h0 = 0; h0 < job.group; h0 += kMaxAttnHeads) {
    const int g = job.group - h0 < kMaxAttnHeads ? job.group - h0 : kMaxAttnHeads;
    kFns[static_cast<int>(kv.type)][g - 1](kv, job, h0);
  }
}
#undef BLOCK_HEADS

// 16 at a time; the tail with masked loads and stores.
void F32ToF16(const float* x, void* y, int64_t n) {
  auto* out = static_cast<uint8_t*>(y);
  for (int64_t i = 0; i < n; i += 16) {
    const int m = n - i < 16 ? static_cast<int>(n - i) : 16;
    const __mmask16 k = static_cast<__mmask16>((1u << m) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(k, x + i);
    const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_mask_storeu_epi16(out + 2 * i, k, h);
    if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0) FixNanHalves(x + i, out + 2 * i, m);
  }
}

void F16ToF32(const void* x, float* y, int64_t n) {
  const auto* in = static_cast<const uint8_t*>(x);
  for (int64_t i = 0; i < n; i += 16) {
    const int m = n - i < 16 ? static_cast<int>(n - i) : 16;
    const __mmask16 k = static_cast<__mmask16>((1u << m) - 1);
    const __m512 v = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, in + 2 * i));
    _mm512_mask_storeu_ps(y + i, k, v);
    if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0) FixNanFloats(in + 2 * i, y + i, m);
  }
}

// Ops::fma_chains: 12 chains, enough to cover the FMA latency (4 cycles) times two FMA ports.
int64_t FmaChains(int64_t steps, float* sink) {
  __m512 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_ps(static_cast<float>(i));
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  for (int64_t s = 0; s < steps; ++s) {
    #pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  }
  __m512 sum = acc[0];
  for (int i = 1; i < 12; ++i) sum = _mm512_add_ps(sum, acc[i]);
  *sink = _mm512_reduce_add_ps(sum);
  return steps * 12 * 16 * 2;
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
  o.attend_block = AttendBlock;
  o.f32_to_f16 = F32ToF16;
  o.f16_to_f32 = F16ToF32;
  o.fma_chains = FmaChains;
  return o;
}

}  // namespace

const Ops& Avx512Ops() {
  static const Ops ops = MakeOps();
  return ops;
}

}  // namespace cachette::kernels::internal
