// AVX2 + FMA + F16C kernels (Haswell and later, Zen). This TU alone is compiled with -mavx2;
// helpers stay in the anonymous namespace and no std template is instantiated here (see
// kernels_internal.h).
//
// Float weights: "dot" tiles of R rows x T tokens, each accumulator a ymm over 8 input
// features, reduced horizontally at the end (16 ymm registers: tiles stay small). Quantized
// weights follow the AVX-512 kernels' order and give their bits: decode tiles of 8 rows read
// in place (VPMADDUBSW + VPMADDWD per row, integer horizontal sums per block), prefill from
// panels of 8 rows repacked so that each lane is a row (4 weight bytes times 4 broadcast
// activation bytes per step). Each output's float operations do not depend on m or the tile
// (docs/kernels.md).
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "kernels/kernels_internal.h"

namespace cachette::kernels::internal {
namespace {

constexpr int kF32 = static_cast<int>(WType::kF32);
constexpr int kF16 = static_cast<int>(WType::kF16);
constexpr int kQ8 = static_cast<int>(WType::kQ8_0);

constexpr int kTileR = 4, kTileT = 2;
// K chunk of the float order and block of the float tiles when several tokens reuse the
// weights. Each chunk ends in 3 x 4 horizontal reductions per tile, a tenth of a 512-wide
// chunk's work: 1024 took 5-11% off the f16 prefill matmuls against 512 on a Zen 5 (2048 did
// about as well, 4096 and whole rows worse: the widened panel and the tokens' x leave L1/L2).
constexpr int64_t kKc = 1024;

int64_t Min64(int64_t a, int64_t b) { return a < b ? a : b; }

float HalfToFloat(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

float Reduce8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

// Four Reduce8s at once: lane i is Reduce8 of input i, by the same additions in the same order
// ((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7)), so the same bits.
__m128 Reduce8x4(__m256 a, __m256 b, __m256 c, __m256 d) {
  auto halves = [](__m256 v) {  // [v0 + v4, v1 + v5, v2 + v6, v3 + v7]
    return _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  };
  const __m128 sa = halves(a), sb = halves(b), sc = halves(c), sd = halves(d);
  // [a02, b02, a13, b13] with x02 = (x0 + x4) + (x2 + x6), x13 = (x1 + x5) + (x3 + x7).
  const __m128 e = _mm_add_ps(_mm_unpacklo_ps(sa, sb), _mm_unpackhi_ps(sa, sb));
  const __m128 f = _mm_add_ps(_mm_unpacklo_ps(sc, sd), _mm_unpackhi_ps(sc, sd));
  return _mm_add_ps(_mm_movelh_ps(e, f), _mm_movehl_ps(f, e));
}

int32_t Reduce8i(__m256i v) {
  const __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  const __m128i s2 = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, _MM_SHUFFLE(2, 3, 0, 1))));
}

float Max8(__m256 v) {
  const __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s2, _mm_movehdup_ps(s2)));
}

// Lanes [0, n) of 8 set (n <= 8), for masked loads and stores (a head's last features, a tile's
// last rows).
__m256i LaneMask(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// exp(x): x = n ln2 + r, degree-7 Taylor polynomial for e^r (|r| <= ln2/2, error < 1e-8),
// times 2^n built in the exponent field. Inputs below ln(FLT_MIN) give 0 (no denormals),
// above ln(FLT_MAX) give +inf.
__m256 Exp(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.7228f), lo = _mm256_set1_ps(-87.3365f);
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  // n in [-126, 128]: 2^n for n = 128 would overflow the exponent field, so scale in two steps.
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1);
  const __m256i n2 = _mm256_sub_epi32(ni, n1);
  const __m256 s1 =
      _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, _mm256_set1_epi32(127)), 23));
  const __m256 s2 =
      _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, _mm256_set1_epi32(127)), 23));
  __m256 res = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
  res = _mm256_blendv_ps(res, _mm256_setzero_ps(), _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
  res = _mm256_blendv_ps(res, _mm256_set1_ps(__builtin_inff()), _mm256_cmp_ps(x, hi, _CMP_GT_OQ));
  // NaN in, NaN out.
  return _mm256_blendv_ps(res, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

// ---- Activation quantization (bit-identical to the scalar one) ---------------------------

void QuantizeAct(const float* x, int64_t t0, int64_t t1, const ActQ8& a) {
  const int64_t nb = a.cols / 32;
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* s = x + t * a.cols + b * 32;
      __m256 v[4];
      __m256 m = _mm256_setzero_ps();
      for (int i = 0; i < 4; ++i) {
        v[i] = _mm256_loadu_ps(s + 8 * i);
        m = _mm256_max_ps(m, _mm256_and_ps(v[i], abs_mask));
      }
      const float amax = Max8(m);
      const float id = amax > 0 ? 127.0f / amax : 0.0f;
      const __m256 vid = _mm256_set1_ps(id);
      __m256i q[4];
      for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], vid));
      const __m256i sum =
          _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
      // packs interleave 128-bit lanes: [q0l q1l q0h q1h] -> fix with a dword permute.
      const __m256i p16a = _mm256_packs_epi32(q[0], q[1]);
      const __m256i p16b = _mm256_packs_epi32(q[2], q[3]);
      const __m256i p8 = _mm256_packs_epi16(p16a, p16b);
      const __m256i ordered =
          _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.q + t * a.cols + b * 32), ordered);
      a.d[t * nb + b] = amax / 127.0f;
      a.sum[t * nb + b] = Reduce8i(sum);
    }
  }
}

// ---- MatMul tiles ------------------------------------------------------------------------

// 8 weights of a row as stored (RawW8) and widened to f32 (Widen8): LoadW8 = Widen8(LoadRawW8).
template <int kT>
struct RawW8Type {
  using type = __m128i;
};
template <>
struct RawW8Type<kF32> {
  using type = __m256;
};
template <int kT>
using RawW8 = typename RawW8Type<kT>::type;

template <int kT>
RawW8<kT> LoadRawW8(const uint8_t* row, int64_t k) {
  if constexpr (kT == kF32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(row + 4 * k));
  } else {
    return _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * k));
  }
}

template <int kT>
__m256 Widen8(RawW8<kT> w) {
  if constexpr (kT == kF32) {
    return w;
  } else if constexpr (kT == kF16) {
    return _mm256_cvtph_ps(w);
  } else {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(w), 16));
  }
}

template <int kT>
__m256 LoadW8(const uint8_t* row, int64_t k) {
  return Widen8<kT>(LoadRawW8<kT>(row, k));
}

// Decode streams each weight once: fetch the next tile's rows (the next stretch of memory), as
// rows are too short for the hardware prefetchers. One prefetch per 64-byte line, spread evenly
// over the steps: a full tile of 16-bit weights fetches the next tile's bytes in address order,
// one line a step; of f32, two rows at the current offset; a partial tile, each of its rows at
// the current offset once per line. A burst of R every few steps was slower (the AVX-512 tile
// measured it on a Zen 5, kernels_avx512.cc).
template <int kT, int R>
void PrefetchNextTile8(const uint8_t* w0, size_t row_bytes, int64_t k) {
  const int64_t off = k * (kT == kF32 ? 4 : 2);
  if constexpr (R == 4) {
    const int64_t step = k >> 3;
    if constexpr (kT == kF32) {
      const int64_t r0 = (step & 1) * 2;
      const uint8_t* next = w0 + (r0 + R) * row_bytes + off;
      _mm_prefetch(reinterpret_cast<const char*>(next), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(next + row_bytes), _MM_HINT_T0);
    } else {
      // The next tile's 4 rows in address order, one line a step (a tile of 16-bit weights
      // has as many lines as steps): on a Zen 3 rows of 896 weights (1792 bytes) are too short
      // for its prefetchers to follow 4 streams, and this order read 2 threads' f16 decode
      // pattern at 27-30 GB/s against 25-26 with row (k / 8) mod 4 (a stand-alone loop).
      _mm_prefetch(reinterpret_cast<const char*>(w0 + R * row_bytes + step * 64), _MM_HINT_T0);
    }
  } else if (off % 64 == 0) {
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w0 + (r + R) * row_bytes + off), _MM_HINT_T0);
    }
  }
}

template <int kT>
float LoadW1(const uint8_t* row, int64_t k) {
  if constexpr (kT == kF32) {
    float f;
    std::memcpy(&f, row + 4 * k, 4);
    return f;
  } else if constexpr (kT == kF16) {
    return HalfToFloat(row + 2 * k);
  } else {
    uint16_t h;
    std::memcpy(&h, row + 2 * k, 2);
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
}

// y[t][r] (+)= sum_{k in [k0, k1)} W[r][k] x[t][k] for R rows and T tokens; k0 is a multiple
// of kKc. The batch-invariant order (docs/kernels.md): K in chunks of kKc from 0; within a
// chunk lane j of a ymm accumulator takes k = j mod 8 in increasing k (FMA); the chunk is
// reduced by Reduce8, then the chunk's scalar tail (only the last chunk has one) is added by
// FMA in increasing k; chunk sums are added in order. A caller may split [0, cols) at
// multiples of kKc and accumulate in y: the additions are the same.
template <int kT, int R, int T>
void FloatTile(const uint8_t* w0, size_t row_bytes, const float* x, int64_t ldx, int64_t k0,
               int64_t k1, float* y, int64_t ldy, bool accumulate) {
  float sum[R][T] = {};
  for (int64_t c0 = k0; c0 < k1; c0 += kKc) {
    const int64_t c1 = Min64(k1, c0 + kKc);
    __m256 acc[R][T];
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
      #pragma GCC unroll 8
      for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
    // One step: R rows' raw weights, widened once, times T tokens' x at k.
    auto step = [&](const RawW8<kT>* w, int64_t kk) {
      __m256 wv[R];
      #pragma GCC unroll 8
      for (int r = 0; r < R; ++r) wv[r] = Widen8<kT>(w[r]);
      #pragma GCC unroll 8
      for (int t = 0; t < T; ++t) {
        const __m256 xv = _mm256_loadu_ps(x + t * ldx + kk);
        #pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
      }
    };
    int64_t k = c0;
    if constexpr (T <= 2) {
      // Decode: the loads of step k + 8 are issued before step k's widening and FMAs, so that
      // the uops which wait for a load that missed do not fill the scheduler and hold back the
      // loads behind them: an f16 model's decode matmuls 17-22% faster on a Zen 5 at this level
      // (kernels_avx512.cc). The same FMAs in the same order.
      if (k + 8 <= c1) {
        RawW8<kT> cur[R];
        #pragma GCC unroll 8
        for (int r = 0; r < R; ++r) cur[r] = LoadRawW8<kT>(w0 + r * row_bytes, k);
        for (; k + 16 <= c1; k += 8) {
          PrefetchNextTile8<kT, R>(w0, row_bytes, k);
          RawW8<kT> next[R];
          #pragma GCC unroll 8
          for (int r = 0; r < R; ++r) next[r] = LoadRawW8<kT>(w0 + r * row_bytes, k + 8);
          step(cur, k);
          #pragma GCC unroll 8
          for (int r = 0; r < R; ++r) cur[r] = next[r];
        }
        PrefetchNextTile8<kT, R>(w0, row_bytes, k);
        step(cur, k);
        k += 8;
      }
    } else {
      for (; k + 8 <= c1; k += 8) {
        RawW8<kT> w[R];
        #pragma GCC unroll 8
        for (int r = 0; r < R; ++r) w[r] = LoadRawW8<kT>(w0 + r * row_bytes, k);
        step(w, k);
      }
    }
    if constexpr (T == 4) {
      if (k == c1) {
        // No tail: each row's 4 tokens reduced at once (the prefill tiles' common case): one
        // Reduce8x4 per row instead of four Reduce8s.
        #pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          alignas(16) float v[4];
          _mm_store_ps(v, Reduce8x4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
          #pragma GCC unroll 8
          for (int t = 0; t < T; ++t) sum[r][t] = c0 == k0 ? v[t] : sum[r][t] + v[t];
        }
        continue;
      }
    }
    #pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      #pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        // An explicit FMA for the tail so that no compiler choice (contraction) enters the order.
        __m128 s = _mm_set_ss(Reduce8(acc[r][t]));
        for (int64_t kk = k; kk < c1; ++kk) {
          s = _mm_fmadd_ss(_mm_set_ss(LoadW1<kT>(w0 + r * row_bytes, kk)),
                           _mm_set_ss(x[t * ldx + kk]), s);
        }
        sum[r][t] = c0 == k0 ? _mm_cvtss_f32(s) : sum[r][t] + _mm_cvtss_f32(s);
      }
    }
  }
  #pragma GCC unroll 8
  for (int t = 0; t < T; ++t) {
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      float& out = y[t * ldy + r];
      out = accumulate ? out + sum[r][t] : sum[r][t];
    }
  }
}

using FloatTileFn = void (*)(const uint8_t*, size_t, const float*, int64_t, int64_t, int64_t,
                             float*, int64_t, bool);

// Prefill tiles: 3 rows x 4 tokens (12 accumulators, 3 weight vectors and one of x: all 16
// ymm registers), over panels of kFloatPanel rows and kKc features.
constexpr int kFloatR = 3, kFloatT = 4;
constexpr int64_t kFloatPanel = 24;
// With more tokens than this, f16/bf16 panels are widened to f32 once per panel block so the
// tiles do pure FMAs instead of converting each weight vector once per token pair.
constexpr int64_t kWidenMinM = 16;

#define CT_FLOAT_TILES(T, R) \
  { FloatTile<T, R, 1>, FloatTile<T, R, 2>, FloatTile<T, R, 3>, FloatTile<T, R, 4> }

template <int kT>
void FloatMatMulRows(const MatMulArgs& a, int64_t r0, int64_t r1) {
  const WeightMatrix& w = *a.w;
  const auto* base = static_cast<const uint8_t*>(w.data);
  const int64_t cols = w.cols, m = a.m;
  if (m <= kTileT) {
    // Decode: each weight row streams contiguously once (the tile chunks K inside).
    static constexpr FloatTileFn kTiles[kTileR][kTileT] = {
        {FloatTile<kT, 1, 1>, FloatTile<kT, 1, 2>},
        {FloatTile<kT, 2, 1>, FloatTile<kT, 2, 2>},
        {FloatTile<kT, 3, 1>, FloatTile<kT, 3, 2>},
        {FloatTile<kT, 4, 1>, FloatTile<kT, 4, 2>}};
    for (int64_t g = r0; g < r1; g += kTileR) {
      const int64_t nr = Min64(kTileR, r1 - g);
      kTiles[nr - 1][m - 1](base + g * w.row_bytes, w.row_bytes, a.x, cols, 0, cols, a.y + g,
                            w.rows, false);
    }
    return;
  }
  static constexpr FloatTileFn kTiles[kFloatR][kFloatT] = {
      CT_FLOAT_TILES(kT, 1), CT_FLOAT_TILES(kT, 2), CT_FLOAT_TILES(kT, 3)};
  static constexpr FloatTileFn kF32Tiles[kFloatR][kFloatT] = {
      CT_FLOAT_TILES(kF32, 1), CT_FLOAT_TILES(kF32, 2), CT_FLOAT_TILES(kF32, 3)};
  const bool widen = kT != kF32 && m > kWidenMinM;
  float* wide =
      widen ? static_cast<float*>(ThreadScratch(1, kFloatPanel * kKc * sizeof(float))) : nullptr;
  for (int64_t k0 = 0; k0 < cols; k0 += kKc) {
    const int64_t k1 = Min64(cols, k0 + kKc), kn = k1 - k0;
    for (int64_t p0 = r0; p0 < r1; p0 += kFloatPanel) {
      const int64_t p1 = Min64(r1, p0 + kFloatPanel);
      const uint8_t* rows = base + p0 * w.row_bytes;
      size_t ld = w.row_bytes;
      int64_t tk0 = k0, tk1 = k1;
      const FloatTileFn(*tiles)[kFloatT] = kTiles;
      if (widen) {
        for (int64_t r = 0; r < p1 - p0; ++r) {
          const uint8_t* row = rows + r * w.row_bytes;
          float* out = wide + r * kKc;
          int64_t k = 0;
          for (; k + 8 <= kn; k += 8) _mm256_store_ps(out + k, LoadW8<kT>(row, k0 + k));
          for (; k < kn; ++k) out[k] = LoadW1<kT>(row, k0 + k);
        }
        rows = reinterpret_cast<const uint8_t*>(wide);
        ld = kKc * sizeof(float);
        tk0 = 0;
        tk1 = kn;
        tiles = kF32Tiles;
      }
      for (int64_t t0 = 0; t0 < m; t0 += kFloatT) {
        const int64_t nt = Min64(kFloatT, m - t0);
        for (int64_t g = p0; g < p1; g += kFloatR) {
          const int64_t nr = Min64(kFloatR, p1 - g);
          tiles[nr - 1][nt - 1](rows + (g - p0) * ld, ld, a.x + t0 * cols + (k0 - tk0), cols, tk0,
                                tk1, a.y + t0 * w.rows + g, w.rows, k0 > 0);
        }
      }
    }
  }
}
#undef CT_FLOAT_TILES

// ---- Quantized weights: the AVX-512 order ------------------------------------------------
//
// For blocks b = 0, 1, ... in order, acc = fma(float(i_b), dw_b * dx_b, acc) from +0, with i_b
// the block's exact integer dot and one output per accumulator lane (docs/kernels.md). The
// integer dots are exact whichever way they are summed, so decode tiles (weights read in
// place, horizontal integer sums) and prefill tiles (repacked panels, one row per lane) give
// the same bits, and the same bits as the AVX-512 kernels.

// Quantized weights switch to the repacked kernel at this many tokens (both give the same
// bits): below it the repack costs more than the reuse gains. Measured on [896 -> 4864], one
// thread (Intel Xeon, AVX2 forced): m = 2 decode tiles 219 us vs packed 305 (q8_0), 212 vs
// 259 (q4_0); m = 4 435 vs 421, 427 vs 398; m = 8 871 vs 679, 833 vs 574.
constexpr int64_t kPackMinM = 4;
constexpr int kQDotT = 2;       // decode tiles: 8 rows x up to 2 tokens
constexpr int64_t kQGemvR = 8;
constexpr int kQPackT = 6;      // packed tiles: 8 rows x up to 6 tokens
constexpr int64_t kPanelRows = 8;

// Prefetches the lines in which the kStep bytes at p end: called once per step of kStep bytes
// (64 < kStep <= 128), every line of a stream exactly once: the rows-order q8_0 tile
// (Q8GemvDots). One prefetch per 34-byte q8_0 block touched each line twice; once per line,
// the in-step tile, then prefetching each row's next-tile line this way, streamed the 24
// layers of qwen2.5-0.5b's matmuls at 91% of a two-thread read of the same bytes, against 81%
// (medians of 12 paired rounds on Zen 5, AVX2 forced; docs/benchmarks.md). It now fetches the
// next tile in address order instead (PrefetchLinesIn), measured on Zen 3 only.
template <int64_t kStep>
void PrefetchStep(const uint8_t* p) {
  static_assert(kStep > 64 && kStep <= 128, "one or two new lines a step");
  const uint8_t* end = p + kStep - 1;
  _mm_prefetch(reinterpret_cast<const char*>(end), _MM_HINT_T0);
  if ((reinterpret_cast<uintptr_t>(end) & 63) + 64 < kStep) {
    _mm_prefetch(reinterpret_cast<const char*>(end - 64), _MM_HINT_T0);
  }
}

// Prefetches each line that starts in [p, p + kBytes): called for consecutive stretches of
// kBytes, it fetches every line of the whole span once, in address order.
template <int64_t kBytes>
void PrefetchLinesIn(const uint8_t* p) {
  const uintptr_t end = reinterpret_cast<uintptr_t>(p) + kBytes;
  for (uintptr_t a = (reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t{63}; a < end; a += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(a), _MM_HINT_T0);
  }
}

// The block at blk as the 32 bytes the integer dot takes: q8_0's signed weights, or q4_0's
// raw nibbles (w + 8, unsigned) in feature order (low nibbles are features 0-15).
template <int kT>
__m256i LoadQBlock(const uint8_t* blk) {
  if constexpr (kT == kQ8) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
  } else {
    const __m128i qs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2));
    const __m128i lo = _mm_and_si128(qs, _mm_set1_epi8(0x0f));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(qs, 4), _mm_set1_epi8(0x0f));
    return _mm256_set_m128i(hi, lo);
  }
}

// Block b of a row in the row layout.
template <int kT>
__m256i LoadQRaw(const uint8_t* row, int64_t b) {
  return LoadQBlock<kT>(row + b * (kT == kQ8 ? 34 : 18));
}

// 8 lanes of 4-product partial sums of w . x (int32, exact): q8_0 by the sign trick (|w| in the
// unsigned operand of VPMADDUBSW; pairs of products stay below 2^15), q4_0 from the raw
// nibbles directly (the offset 8 * sum(x) is taken off by the caller).
template <int kT>
__m256i DotParts(__m256i w, __m256i x) {
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (kT == kQ8) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w)),
                             ones);
  } else {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones);
  }
}

// [sum of p[0]'s lanes, ..., sum of p[7]'s lanes] (integers: exact in any order).
__m256i RowSums8(const __m256i p[8]) {
  const __m256i a0 = _mm256_hadd_epi32(p[0], p[1]);
  const __m256i a1 = _mm256_hadd_epi32(p[2], p[3]);
  const __m256i a2 = _mm256_hadd_epi32(p[4], p[5]);
  const __m256i a3 = _mm256_hadd_epi32(p[6], p[7]);
  // Per 128-bit half: rows 0-3 (b0) and 4-7 (b1), each the sum of that half's four lanes.
  const __m256i b0 = _mm256_hadd_epi32(a0, a1);
  const __m256i b1 = _mm256_hadd_epi32(a2, a3);
  return _mm256_add_epi32(_mm256_permute2x128_si256(b0, b1, 0x20),
                          _mm256_permute2x128_si256(b0, b1, 0x31));
}

// The f16 scales of 8 rows' blocks, at rows[r] + off, as floats. Eight 16-bit loads inserted
// one by one: on Zen 3 a VPGATHERDD costs more than the rest of a block's work for 8 rows.
__m256 RowScales8(const uint8_t* const rows[8], int64_t off) {
  uint16_t h[8];
  for (int r = 0; r < 8; ++r) std::memcpy(&h[r], rows[r] + off, 2);
  const __m128i v = _mm_setr_epi16(static_cast<int16_t>(h[0]), static_cast<int16_t>(h[1]),
                                   static_cast<int16_t>(h[2]), static_cast<int16_t>(h[3]),
                                   static_cast<int16_t>(h[4]), static_cast<int16_t>(h[5]),
                                   static_cast<int16_t>(h[6]), static_cast<int16_t>(h[7]));
  return _mm256_cvtph_ps(v);
}

// [w_r . x for r in 0..7] of the q4_0 blocks at rows[r] + off, with w the raw nibbles (w + 8):
// rows r and r + 4 share a register (16 bytes each), so a block of 8 rows takes 4 unpacks, 8
// VPMADDUBSW whose int16 pairs (at most 2 * 15 * 128) add without overflow, 4 VPMADDWD and 3
// VPHADDD, instead of 8 unpacks, 8 VPMADDWD and 6 VPHADDD. Forced inline: GCC 12 calls it
// otherwise, passing the rows through memory (a third of decode time in a profile on Zen 3).
[[gnu::always_inline]] inline __m256i Q4RowDots8(const uint8_t* const rows[8], int64_t off,
                                                  __m256i xq) {
  const __m256i x_lo = _mm256_permute2x128_si256(xq, xq, 0x00);  // features 0-15, twice
  const __m256i x_hi = _mm256_permute2x128_si256(xq, xq, 0x11);  // features 16-31, twice
  const __m256i mask = _mm256_set1_epi8(0x0f);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i v[4];
  for (int j = 0; j < 4; ++j) {
    const __m256i raw = _mm256_loadu2_m128i(
        reinterpret_cast<const __m128i*>(rows[j + 4] + off + 2),
        reinterpret_cast<const __m128i*>(rows[j] + off + 2));
    const __m256i lo = _mm256_and_si256(raw, mask);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
    const __m256i s16 =
        _mm256_add_epi16(_mm256_maddubs_epi16(lo, x_lo), _mm256_maddubs_epi16(hi, x_hi));
    v[j] = _mm256_madd_epi16(s16, ones);  // lanes 0-3: row j's quarters, 4-7: row j + 4's
  }
  // Per 128-bit half: [j0, j0, j1, j1] then [j0, j1, j2, j3]: rows 0-3 low, 4-7 high.
  return _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
}

// Stores lanes [0, n) of v at y (n <= 8).
void StoreRows(float* y, __m256 v, int64_t n) {
  if (n >= 8) {
    _mm256_storeu_ps(y, v);
  } else {
    _mm256_maskstore_ps(y, LaneMask(static_cast<int>(n)), v);
  }
}

// Interleaved decode tiles read this far ahead of their one stream (about 8 q8_0 blocks of 8
// rows): a stand-alone loop of the tile on a Zen 3 read memory at 0.94-0.95 of a plain sum's
// rate so, against 0.87 without prefetches and 0.92 at 8 KiB.
constexpr int64_t kInterleavedAhead = 2048;

// Decode tiles (m < kPackMinM): 8 rows x T tokens, reading the weights in place, the 8 rows
// block by block in step. Rows past n_rows repeat the last row and are not stored. s8 is the
// tile's WeightMatrix::scales8 group, or null (scales read from the rows). q4_0 always, q8_0
// unless Q8DecodeOrder() asks for rows and the weights are streamed from memory (Q8GemvTile).
// kInterleaved: w0 is a whole group of 8 interleaved rows (WeightMatrix::interleaved8), read
// as one stream; else rows row_bytes apart.
template <int kT, int T, bool kInterleaved = false>
void QuantGemvTile(const uint8_t* w0, size_t row_bytes, int64_t n_rows, const uint16_t* s8,
                   const ActQ8& act, int64_t t0, float* y, int64_t ldy) {
  constexpr int R = 8;
  constexpr int64_t kBB = kT == kQ8 ? 34 : 18;
  // From block b to block b + 1 of a row.
  constexpr int64_t kStep = kInterleaved ? R * kBB : kBB;
  const int64_t nb = act.cols / 32;
  const uint8_t* rows[R];
  for (int r = 0; r < R; ++r) {
    const int64_t rr = r < n_rows ? r : n_rows - 1;
    rows[r] = kInterleaved ? w0 + rr * kBB : w0 + rr * row_bytes;
  }
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const __m256 dw =
        s8 != nullptr
            ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s8 + b * 8)))
            : RowScales8(rows, b * kStep);
    for (int t = 0; t < T; ++t) {
      const __m256i xq = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(act.q + (t0 + t) * act.cols + b * 32));
      // Rows are too short for the hardware prefetchers to ramp up on: fetch the next tile
      // (the next stretch of memory), its bytes in address order spread evenly over the
      // blocks, each line once. On a Zen 3 the 24 layers' decode matmuls of qwen2.5-0.5b
      // (kernels_bench Model/*/m1, 2 threads, medians of 5 interleaved rounds) ran 1.20x
      // faster for q8_0 and 1.29x for q4_0 than with each row's next-tile line at the same
      // offset (8 streams); a stand-alone loop of this tile read 1 GiB at 26-31 GB/s against
      // 20-22 that way and 30-37 for a plain sum. Prefetching the scales8 stream as well
      // measured the same.
      // Interleaved, the group's blocks are one stream (the next group's follow it): its
      // bytes kInterleavedAhead on, each line once.
      if (t == 0) {
        if constexpr (kInterleaved) {
          PrefetchLinesIn<R * kBB>(w0 + b * (R * kBB) + kInterleavedAhead);
        } else {
          PrefetchLinesIn<R * kBB>(w0 + R * row_bytes + b * (R * kBB));
        }
      }
      __m256i dot;
      if constexpr (kT == kQ8) {
        __m256i p[R];
        for (int r = 0; r < R; ++r) p[r] = DotParts<kT>(LoadQBlock<kT>(rows[r] + b * kStep), xq);
        dot = RowSums8(p);
      } else {
        dot = Q4RowDots8(rows, b * kStep, xq);
        dot = _mm256_sub_epi32(dot, _mm256_set1_epi32(8 * act.sum[(t0 + t) * nb + b]));
      }
      const __m256 s = _mm256_mul_ps(dw, _mm256_set1_ps(act.d[(t0 + t) * nb + b]));
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), s, acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) StoreRows(y + t * ldy, acc[t], n_rows);
}

// Transposes the 8 x 8 int32 matrix in v (v[i] is row i) in place.
[[gnu::always_inline]] inline void Transpose8x8(__m256i v[8]) {
  __m256i t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // rows 0-3, rows 4-7
    const __m256i* th = t + 4 * h;
    u[4 * h + 0] = _mm256_unpacklo_epi64(th[0], th[2]);  // columns 0 | 4
    u[4 * h + 1] = _mm256_unpackhi_epi64(th[0], th[2]);  // 1 | 5
    u[4 * h + 2] = _mm256_unpacklo_epi64(th[1], th[3]);  // 2 | 6
    u[4 * h + 3] = _mm256_unpackhi_epi64(th[1], th[3]);  // 3 | 7
  }
  for (int g = 0; g < 4; ++g) {
    v[g] = _mm256_permute2x128_si256(u[g], u[4 + g], 0x20);
    v[g + 4] = _mm256_permute2x128_si256(u[g], u[4 + g], 0x31);
  }
}

// q8_0 decode tiles read this many blocks of each row in one run.
constexpr int64_t kGemvRun = 64;

// Pass 1 of a q8_0 decode tile, one step: the integer dots of blocks [b, b + J) of one row
// (those below nb; the rest are 0) with tokens [0, T) into out[t * ld_t + j], J = 8 / T, so
// that one RowSums8 reduces the step.
template <int T, bool kFull>
[[gnu::always_inline]] inline void Q8GemvDots(const uint8_t* row, int64_t b, int64_t nb,
                                               const ActQ8& act, int64_t t0, int32_t* out,
                                               int64_t ld_t) {
  constexpr int J = 8 / T;
  __m256i p[8];
  #pragma GCC unroll 8
  for (int j = 0; j < J; ++j) {
    if (!kFull && b + j >= nb) {
      for (int t = 0; t < T; ++t) p[t * J + j] = _mm256_setzero_si256();
      continue;
    }
    // Rows are too short for the hardware prefetchers to ramp up on: fetch 8 KiB ahead in
    // address order (the next rows of this tile, then of the next ones), each line once (b is
    // even). On Zen 3, 512 B, 1 KiB and 2 KiB ahead and one prefetch per 64 bytes measured the
    // same; on a Zen 5 VM, whose memory is further away, 8 KiB made the decode matmuls 8-13%
    // faster than 1 KiB (2 KiB 4-7%, 16 KiB no more than 8), and each line once instead of
    // once per block 5% faster.
    if (j % 2 == 0) PrefetchStep<68>(row + (b + j) * 34 + 8192);
    const __m256i wv = LoadQRaw<kQ8>(row, b + j);
    for (int t = 0; t < T; ++t) {
      const __m256i xq = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(act.q + (t0 + t) * act.cols + (b + j) * 32));
      p[t * J + j] = DotParts<kQ8>(wv, xq);
    }
  }
  const __m256i s = RowSums8(p);  // lanes [t * J + j]
  if constexpr (T == 1) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(out), s);
  } else {
    _mm_store_si128(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(s));
    _mm_store_si128(reinterpret_cast<__m128i*>(out + ld_t), _mm256_extracti128_si256(s, 1));
  }
}

// Decode tiles (m < kPackMinM) for q8_0 weights streamed from memory (not
// WeightMatrix::cache_resident): 8 rows x T tokens, reading the weights in place in two passes
// per run of kGemvRun blocks. Pass 1 reads the rows one after another, in address order, and
// leaves each block's exact integer dot in a small buffer; pass 2 adds the blocks in order with
// one row per lane, as the other tiles do. The integer dots are exact in any order, so the bits
// are those of QuantGemvTile, which reads the 8 rows block by block in step: 8 streams, which
// Zen 3 fetches from memory more slowly. Measured on qwen2.5-0.5b's shape (AMD EPYC Zen 3,
// docs/benchmarks.md): decode 1-15% faster end to end on 2 threads, 10-17% on one. On Zen 5
// (AVX2 forced) the other way round: the in-step tile streams 50-60% faster (decode 1.49x end
// to end), hence Q8DecodeOrder(). From the cache the extra loads cost more than the order
// gains (a 14 MB model decodes 35% slower this way), hence the hint. q4_0 keeps the one-pass
// tile: its single-row unpacking costs more than the order gains (15% slower from memory).
// The default nowhere since 842f830 (DefaultQ8DecodeOrder); CACHETTE_Q8_DECODE=rows asks for it.
// Rows past n_rows are not read and their lanes not stored.
template <int T>
void Q8GemvTile(const uint8_t* w0, size_t row_bytes, int64_t n_rows, const uint16_t* s8,
                const ActQ8& act, int64_t t0, float* y, int64_t ldy) {
  constexpr int R = 8, J = 8 / T;
  const int64_t nb = act.cols / 32;
  const uint8_t* rows[R];
  for (int r = 0; r < R; ++r) rows[r] = w0 + (r < n_rows ? r : n_rows - 1) * row_bytes;
  alignas(32) int32_t dots[T][R][kGemvRun];
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t c0 = 0; c0 < nb; c0 += kGemvRun) {
    const int64_t nc = Min64(kGemvRun, nb - c0);
    const int64_t nc8 = (nc + 7) / 8 * 8;  // pass 2 reads whole groups of 8
    // Pass 1: dots[t][r][j] = the integer dot of block c0 + j of row r with token t (0 for
    // rows past n_rows and blocks past nc).
    for (int r = 0; r < R; ++r) {
      if (r >= n_rows) {
        for (int t = 0; t < T; ++t) std::memset(dots[t][r], 0, sizeof(dots[t][r]));
        continue;
      }
      int64_t j = 0;
      for (; j + J <= nc; j += J) {
        Q8GemvDots<T, true>(rows[r], c0 + j, nb, act, t0, dots[0][r] + j, R * kGemvRun);
      }
      for (; j < nc8; j += J) {
        Q8GemvDots<T, false>(rows[r], c0 + j, c0 + nc, act, t0, dots[0][r] + j, R * kGemvRun);
      }
    }
    // Pass 2: blocks in order, one row per lane.
    for (int64_t j0 = 0; j0 < nc; j0 += 8) {
      __m256i d[T][8];
      for (int t = 0; t < T; ++t) {
        for (int r = 0; r < R; ++r) {
          d[t][r] = _mm256_load_si256(reinterpret_cast<const __m256i*>(dots[t][r] + j0));
        }
        Transpose8x8(d[t]);  // d[t][j]: block c0 + j0 + j, rows 0-7
      }
      const int64_t nj = Min64(8, nc - j0);
      for (int j = 0; j < nj; ++j) {
        const int64_t b = c0 + j0 + j;
        const __m256 dw =
            s8 != nullptr
                ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s8 + b * 8)))
                : RowScales8(rows, b * 34);
        for (int t = 0; t < T; ++t) {
          const __m256 s = _mm256_mul_ps(dw, _mm256_set1_ps(act.d[(t0 + t) * nb + b]));
          acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[t][j]), s, acc[t]);
        }
      }
    }
  }
  for (int t = 0; t < T; ++t) StoreRows(y + t * ldy, acc[t], n_rows);
}

using QuantGemvTileFn = void (*)(const uint8_t*, size_t, int64_t, const uint16_t*,
                                 const ActQ8&, int64_t, float*, int64_t);

template <int kT>
void QuantGemvRows(const MatMulArgs& a, int64_t r0, int64_t r1) {
  static constexpr QuantGemvTileFn kTiles[kQDotT] = {QuantGemvTile<kT, 1>, QuantGemvTile<kT, 2>};
  static constexpr QuantGemvTileFn kRowTiles[kQDotT] = {Q8GemvTile<1>, Q8GemvTile<2>};
  static constexpr QuantGemvTileFn kGroupTiles[kQDotT] = {QuantGemvTile<kT, 1, true>,
                                                          QuantGemvTile<kT, 2, true>};
  const WeightMatrix& w = *a.w;
  const QuantGemvTileFn* tiles =
      kT == kQ8 && !w.cache_resident && Q8DecodeOrder() == Q8Order::kRows ? kRowTiles : kTiles;
  const auto* base = static_cast<const uint8_t*>(w.data);
  // Interleaved rows come in whole groups of 8: ranges start at multiples of kQGemvR.
  static_assert(kQGemvR == 8, "a decode tile is one group of interleaved rows");
  const int64_t grouped = w.interleaved8 ? w.rows / 8 * 8 : 0;
  for (int64_t g = r0; g < r1; g += kQGemvR) {
    const int64_t nr = Min64(kQGemvR, r1 - g);
    const uint16_t* s8 =
        w.scales8 != nullptr && g % 8 == 0 ? w.scales8 + g / 8 * (w.cols / 32) * 8 : nullptr;
    for (int64_t t0 = 0; t0 < a.m; t0 += kQDotT) {
      const int64_t nt = Min64(kQDotT, a.m - t0);
      (g < grouped ? kGroupTiles : tiles)[nt - 1](base + g * w.row_bytes, w.row_bytes, nr, s8,
                                                  a.act, t0, a.y + t0 * w.rows + g, w.rows);
    }
  }
}

// Repacks rows [p0, p1) (at most 8; missing rows are zero, scale 0) of W (either layout) into
//   wp  [nb][8][8] uint32: the 4 weight bytes (LoadQBlock's) of features 4g..4g+3 of each row
//   dwp [nb][8]    float : block scales
// by an 8 x 8 transpose of each block's dwords.
template <int kT>
void PackQuantPanel(const WeightMatrix& w, int64_t p0, int64_t p1, uint32_t* wp, float* dwp) {
  const int64_t nb = w.cols / 32;
  const int64_t n = p1 - p0;
  for (int64_t b = 0; b < nb; ++b) {
    __m256i v[8];
    for (int i = 0; i < 8; ++i) {
      const uint8_t* blk = i < n ? QuantBlockAt(w, p0 + i, b) : nullptr;
      v[i] = i < n ? LoadQBlock<kT>(blk) : _mm256_setzero_si256();
      dwp[b * 8 + i] = i < n ? HalfToFloat(blk) : 0.0f;
    }
    Transpose8x8(v);
    auto* out = reinterpret_cast<__m256i*>(wp + b * 64);
    for (int g = 0; g < 8; ++g) _mm256_store_si256(out + g, v[g]);
  }
}

// y[t0 + t][p0 + i] for i < n_rows, t < T from a packed panel. q4_0's block dots are summed
// in 16-bit lanes over the block's 8 groups (each lane at most 16 * 15 * 127 < 2^15) before
// widening, and its offset 8 * sum(x_q) is taken off per block.
template <int kT, int T>
void QuantPanelTile(const uint32_t* wp, const float* dwp, const ActQ8& act, int64_t t0,
                    float* y, int64_t ldy, int64_t n_rows) {
  const int64_t nb = act.cols / 32;
  const int8_t* xq[T];
  const float* dx[T];
  const int32_t* sx[T];
  for (int t = 0; t < T; ++t) {
    xq[t] = act.q + (t0 + t) * act.cols;
    dx[t] = act.d + (t0 + t) * nb;
    sx[t] = act.sum + (t0 + t) * nb;
  }
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 facc[T];
  for (int t = 0; t < T; ++t) facc[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const auto* wb = reinterpret_cast<const __m256i*>(wp + b * 64);
    __m256i iacc[T];
    for (int g = 0; g < 8; ++g) {
      const __m256i w = _mm256_load_si256(wb + g);
      if constexpr (kT == kQ8) {
        for (int t = 0; t < T; ++t) {
          int32_t x4;
          std::memcpy(&x4, xq[t] + b * 32 + g * 4, 4);
          const __m256i p = DotParts<kQ8>(w, _mm256_set1_epi32(x4));
          iacc[t] = g == 0 ? p : _mm256_add_epi32(iacc[t], p);
        }
      } else {
        for (int t = 0; t < T; ++t) {
          int32_t x4;
          std::memcpy(&x4, xq[t] + b * 32 + g * 4, 4);
          const __m256i p = _mm256_maddubs_epi16(w, _mm256_set1_epi32(x4));
          iacc[t] = g == 0 ? p : _mm256_add_epi16(iacc[t], p);
        }
      }
    }
    const __m256 dw = _mm256_load_ps(dwp + b * 8);
    for (int t = 0; t < T; ++t) {
      __m256i dot = iacc[t];
      if constexpr (kT != kQ8) {
        dot = _mm256_sub_epi32(_mm256_madd_epi16(dot, ones), _mm256_set1_epi32(8 * sx[t][b]));
      }
      facc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot),
                                _mm256_mul_ps(dw, _mm256_set1_ps(dx[t][b])), facc[t]);
    }
  }
  for (int t = 0; t < T; ++t) StoreRows(y + t * ldy, facc[t], n_rows);
}

using QuantPanelTileFn = void (*)(const uint32_t*, const float*, const ActQ8&, int64_t, float*,
                                  int64_t, int64_t);

template <int kT>
void QuantPackedRows(const MatMulArgs& a, int64_t r0, int64_t r1) {
  static constexpr QuantPanelTileFn kTiles[kQPackT] = {
      QuantPanelTile<kT, 1>, QuantPanelTile<kT, 2>, QuantPanelTile<kT, 3>, QuantPanelTile<kT, 4>,
      QuantPanelTile<kT, 5>, QuantPanelTile<kT, 6>};
  const WeightMatrix& w = *a.w;
  const int64_t nb = w.cols / 32;
  auto* wp = static_cast<uint32_t*>(ThreadScratch(1, nb * 64 * sizeof(uint32_t)));
  auto* dwp = static_cast<float*>(ThreadScratch(2, nb * 8 * sizeof(float)));
  for (int64_t p0 = r0; p0 < r1; p0 += kPanelRows) {
    const int64_t p1 = Min64(r1, p0 + kPanelRows);
    PackQuantPanel<kT>(w, p0, p1, wp, dwp);
    for (int64_t t0 = 0; t0 < a.m; t0 += kQPackT) {
      const int64_t nt = Min64(kQPackT, a.m - t0);
      kTiles[nt - 1](wp, dwp, a.act, t0, a.y + t0 * w.rows + p0, w.rows, p1 - p0);
    }
  }
}

template <int kT>
void QuantMatMulRows(const MatMulArgs& a, int64_t r0, int64_t r1) {
  return a.m >= kPackMinM ? QuantPackedRows<kT>(a, r0, r1) : QuantGemvRows<kT>(a, r0, r1);
}

void MatMulRows(const MatMulArgs& a, int64_t r0, int64_t r1) {
  switch (a.w->type) {
    case WType::kF32:
      return FloatMatMulRows<kF32>(a, r0, r1);
    case WType::kF16:
      return FloatMatMulRows<kF16>(a, r0, r1);
    case WType::kBF16:
      return FloatMatMulRows<static_cast<int>(WType::kBF16)>(a, r0, r1);
    case WType::kQ8_0:
      return QuantMatMulRows<kQ8>(a, r0, r1);
    case WType::kQ4_0:
      return QuantMatMulRows<static_cast<int>(WType::kQ4_0)>(a, r0, r1);
  }
}

int64_t RowGrain(WType t, int64_t m) {
  if (t == WType::kQ8_0 || t == WType::kQ4_0) return m >= kPackMinM ? kPanelRows : kQGemvR;
  return m <= kTileT ? kTileR : kFloatPanel;
}

// ---- Elementwise -------------------------------------------------------------------------

void RmsNorm(const float* x, const float* weight, float* y, int64_t rows, int64_t dim, float eps) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* xi = x + i * dim;
    float* yi = y + i * dim;
    __m256 ss = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 8 <= dim; c += 8) {
      const __m256 v = _mm256_loadu_ps(xi + c);
      ss = _mm256_fmadd_ps(v, v, ss);
    }
    float s = Reduce8(ss);
    for (; c < dim; ++c) s += xi[c] * xi[c];
    const float inv = 1.0f / __builtin_sqrtf(s / static_cast<float>(dim) + eps);
    const __m256 vinv = _mm256_set1_ps(inv);
    for (c = 0; c + 8 <= dim; c += 8) {
      _mm256_storeu_ps(yi + c, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xi + c), vinv),
                                             _mm256_loadu_ps(weight + c)));
    }
    for (; c < dim; ++c) yi[c] = xi[c] * inv * weight[c];
  }
}

// Scalar tails go through the vector exp too (one lane used) so that every element gets the
// same function.
float Exp1(float x) { return _mm256_cvtss_f32(Exp(_mm256_set1_ps(x))); }

void Softmax(float* x, int64_t n) {
  if (n <= 0) return;
  __m256 vmax = _mm256_set1_ps(-__builtin_inff());
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(x + i));
  float mx = Max8(vmax);
  for (; i < n; ++i) mx = x[i] > mx ? x[i] : mx;
  const __m256 vmx = _mm256_set1_ps(mx);
  __m256 vsum = _mm256_setzero_ps();
  for (i = 0; i + 8 <= n; i += 8) {
    const __m256 e = Exp(_mm256_sub_ps(_mm256_loadu_ps(x + i), vmx));
    _mm256_storeu_ps(x + i, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float sum = Reduce8(vsum);
  for (; i < n; ++i) sum += (x[i] = Exp1(x[i] - mx));
  const float inv = 1.0f / sum;
  const __m256 vinv = _mm256_set1_ps(inv);
  for (i = 0; i + 8 <= n; i += 8)
    _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), vinv));
  for (; i < n; ++i) x[i] *= inv;
}

void SwiGlu(const float* gate, const float* up, float* out, int64_t n) {
  int64_t i = 0;
  const __m256 one = _mm256_set1_ps(1.0f);
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 e = Exp(_mm256_sub_ps(_mm256_setzero_ps(), g));
    _mm256_storeu_ps(
        out + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i)));
  }
  for (; i < n; ++i) out[i] = gate[i] / (1.0f + Exp1(-gate[i])) * up[i];
}

void Add(const float* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(y + i), _mm256_loadu_ps(x + i)));
  }
  for (; i < n; ++i) y[i] += x[i];
}

// ---- Attention inner loops ---------------------------------------------------------------

float KvElem(const uint8_t* p, int i, KvType t) {
  switch (t) {
    case KvType::kF32:
      return LoadW1<kF32>(p, i);
    case KvType::kF16:
      return HalfToFloat(p + 2 * i);
    case KvType::kQ8_0: {
      const uint8_t* blk = p + (i / 32) * 34;
      return HalfToFloat(blk) * static_cast<int8_t>(blk[2 + i % 32]);
    }
    case KvType::kQ4_0: {
      const uint8_t* blk = p + (i / 32) * 18;
      const int j = i % 32;
      const int nib = j < 16 ? blk[2 + j] & 0x0f : blk[2 + j - 16] >> 4;
      return HalfToFloat(blk) * static_cast<float>(nib - 8);
    }
    case KvType::kKivi4:  // a V vector (head_dim % 32 == 0: never a tail element)
    case KvType::kQ4_1: {  // the same block layout and arithmetic
      const uint8_t* blk = p + (i / 32) * 20;
      const int j = i % 32;
      const int nib = j < 16 ? blk[4 + j] & 0x0f : blk[4 + j - 16] >> 4;
      return __builtin_fmaf(HalfToFloat(blk), static_cast<float>(nib), HalfToFloat(blk + 2));
    }
  }
  return 0;
}

// Nibbles [j, j + 8) of a 32-element block's 16 bytes qs (j % 8 == 0), as floats.
__m256 Nibbles8(const uint8_t* qs, int j) {
  __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + j % 16));
  if (j >= 16) q = _mm_srli_epi16(q, 4);
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(q, _mm_set1_epi8(0x0f))));
}

// 8 elements starting at i (i % 8 == 0).
__m256 LoadKv8(const uint8_t* p, int i, KvType t) {
  switch (t) {
    case KvType::kF32:
      return _mm256_loadu_ps(reinterpret_cast<const float*>(p + 4 * i));
    case KvType::kF16:
      return LoadW8<kF16>(p, i);
    case KvType::kQ8_0: {
      const uint8_t* blk = p + (i / 32) * 34;
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 2 + i % 32));
      return _mm256_mul_ps(_mm256_set1_ps(HalfToFloat(blk)),
                           _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)));
    }
    case KvType::kQ4_0: {
      // Elements [j, j + 8) of the block (j = i % 32) are the low nibbles of qs[j..j+8) for
      // j < 16, the high nibbles of qs[j-16..j-8) otherwise.
      const uint8_t* blk = p + (i / 32) * 18;
      const int j = i % 32;
      __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 2 + j % 16));
      if (j >= 16) q = _mm_srli_epi16(q, 4);
      q = _mm_and_si128(q, _mm_set1_epi8(0x0f));
      // d * nib - 8d: both terms and the sum are exact (= d * (nib - 8), as the scalar code).
      const float d = HalfToFloat(blk);
      return _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q)),
                             _mm256_set1_ps(-8.0f * d));
    }
    case KvType::kKivi4:  // a V vector (a K vector needs its group's parameters: WidenKivi)
    case KvType::kQ4_1: {  // the same block layout and arithmetic
      const uint8_t* blk = p + (i / 32) * 20;
      return _mm256_fmadd_ps(_mm256_set1_ps(HalfToFloat(blk)), Nibbles8(blk + 4, i % 32),
                             _mm256_set1_ps(HalfToFloat(blk + 2)));
    }
  }
  return _mm256_setzero_ps();
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
      const auto* kh = reinterpret_cast<const uint8_t*>(TailSlot(kv, false, kvh, s));
      const auto* vh = reinterpret_cast<const uint8_t*>(TailSlot(kv, true, kvh, s));
      for (int c = 0; c < hd; c += 8) {
        _mm256_store_ps(kt + j * ld + c, LoadW8<kF16>(kh, c));
        _mm256_store_ps(vt + j * ld + c, LoadW8<kF16>(vh, c));
      }
      continue;
    }
    if (s / kKiviGroup != group) {
      group = s / kKiviGroup;
      KiviKeyParams(KvSlot(kv, false, kvh, group * kKiviGroup), tok_bytes, hd, par, par + hd);
    }
    const uint8_t* kp = KvSlot(kv, false, kvh, s);
    const uint8_t* vp = KvSlot(kv, true, kvh, s);
    for (int c = 0; c < hd; c += 8) {
      const __m256 nib = Nibbles8(kp + (c / 32) * 20 + 4, c % 32);
      _mm256_store_ps(kt + j * ld + c, _mm256_fmadd_ps(_mm256_load_ps(par + c), nib,
                                                       _mm256_load_ps(par + hd + c)));
      _mm256_store_ps(vt + j * ld + c, LoadKv8(vp, c, KvType::kKivi4));
    }
  }
}

float KvDot(const float* q, const void* k, int head_dim, KvType t) {
  const auto* p = static_cast<const uint8_t*>(k);
  __m256 acc = _mm256_setzero_ps();
  int i = 0;
  for (; i + 8 <= head_dim; i += 8)
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), LoadKv8(p, i, t), acc);
  float s = Reduce8(acc);
  for (; i < head_dim; ++i) s += q[i] * KvElem(p, i, t);
  return s;
}

void KvAxpy(float a, const void* v, int head_dim, KvType t, float* acc) {
  const auto* p = static_cast<const uint8_t*>(v);
  const __m256 va = _mm256_set1_ps(a);
  int i = 0;
  for (; i + 8 <= head_dim; i += 8) {
    _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(va, LoadKv8(p, i, t), _mm256_loadu_ps(acc + i)));
  }
  for (; i < head_dim; ++i) acc[i] += a * KvElem(p, i, t);
}

// Up to 8 query heads of a GQA group at once (G accumulators stay in registers).
constexpr int kMaxAttnHeads = 8;

// The sums of four vectors' lanes, one per output lane; each input is reduced by the same tree
// and never mixed with another (so a sum does not depend on its neighbours).
__m128 Reduce4x8(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// ScoreHeads' K source: the widened tile rather than stored vectors of a KV type.
constexpr auto kWidened = static_cast<KvType>(-1);

// Scores of HB heads of one query over keys [0, n4) of a K tile, four keys at a time (qp: the
// heads' zero-padded q rows, ld apart): per 8-feature chunk each K row chunk is loaded once for the
// HB heads, 4 * HB accumulators. The K tile is the widened one (kt, rows ld apart) when kSrc is
// kWidened, else key j's stored kSrc vector kp[j], read in place (the same values: the widening is
// exact; whole 8-feature chunks only), at kp[j] + off. Per (head, key) the same FMAs in the same
// order and the same Reduce4x8 as one head at a time, so the same bits.
template <int HB, KvType kSrc>
void ScoreHeads(const float* qp, int ld, const float* kt, const uint8_t* const* kp, size_t off,
                int n4, float scale, float (*s)[kAttnTile]) {
  const __m128 sc = _mm_set1_ps(scale);
  for (int j = 0; j < n4; j += 4) {
    __m256 a[HB][4];
    #pragma GCC unroll 4
    for (int h = 0; h < HB; ++h) {
      #pragma GCC unroll 4
      for (int x = 0; x < 4; ++x) a[h][x] = _mm256_setzero_ps();
    }
    for (int c = 0; c < ld; c += 8) {
      __m256 qc[HB];
      #pragma GCC unroll 4
      for (int h = 0; h < HB; ++h) qc[h] = _mm256_load_ps(qp + h * ld + c);
      #pragma GCC unroll 4
      for (int x = 0; x < 4; ++x) {
        __m256 kv;
        if constexpr (kSrc == kWidened) {
          kv = _mm256_load_ps(kt + (j + x) * ld + c);
        } else {
          kv = LoadKv8(kp[j + x] + off, c, kSrc);
        }
        #pragma GCC unroll 4
        for (int h = 0; h < HB; ++h) a[h][x] = _mm256_fmadd_ps(qc[h], kv, a[h][x]);
      }
    }
    #pragma GCC unroll 4
    for (int h = 0; h < HB; ++h) {
      _mm_store_ps(s[h] + j, _mm_mul_ps(Reduce4x8(a[h][0], a[h][1], a[h][2], a[h][3]), sc));
    }
  }
}

// Scores of the G heads of one query (their q rows at qp, ld apart), two heads a pass.
template <int G, KvType kSrc>
void TileScores(const float* qp, int ld, const float* kt, const uint8_t* const* kp, size_t off,
                int n4, float scale, float (*s)[kAttnTile]) {
  int h = 0;
  for (; h + 2 <= G; h += 2) ScoreHeads<2, kSrc>(qp + h * ld, ld, kt, kp, off, n4, scale, s + h);
  if (h < G) ScoreHeads<1, kSrc>(qp + h * ld, ld, kt, kp, off, n4, scale, s + h);
}

// 8 widened elements [i, i + 8) of a stored head vector of hd features, zeros past hd.
template <KvType kT>
__m256 WidenKv8(const uint8_t* p, int i, int hd) {
  if (i + 8 <= hd) return LoadKv8(p, i, kT);
  alignas(32) float f[8] = {};
  for (int e = i; e < hd; ++e) f[e - i] = KvElem(p, e, kT);
  return _mm256_load_ps(f);
}

// Rows [j_from, j_to) of the K tile when kt is set, and of the V tile when vt is set, widened
// from the stored vectors at kp[j] + off, vp[j] + off of type kT (whole 8-feature chunks
// straight, a partial last one zero-padded), the next pass's vectors prefetched one slot per
// row.
template <KvType kT>
void WidenRows(const uint8_t* const* kp, const uint8_t* const* vp, size_t off, int j_from,
               int j_to, int hd, int ld, float* kt, float* vt, const PassPrefetch& pf) {
  const int whole = hd / 8;
  for (int j = j_from; j < j_to; ++j) {
    PrefetchSlot(*pf.tile, j, pf.hb, pf.off);
    if (kt != nullptr) {  // else the scores read K in place
      const uint8_t* const k = kp[j] + off;
      float* const kr = kt + j * ld;
      for (int c = 0; c < whole; ++c) _mm256_store_ps(kr + 8 * c, LoadKv8(k, 8 * c, kT));
      if (8 * whole < ld) _mm256_store_ps(kr + 8 * whole, WidenKv8<kT>(k, 8 * whole, hd));
    }
    if (vt == nullptr) continue;  // a lone query reads V in place
    const uint8_t* const v = vp[j] + off;
    float* const vr = vt + j * ld;
    for (int c = 0; c < whole; ++c) _mm256_store_ps(vr + 8 * c, LoadKv8(v, 8 * c, kT));
    if (8 * whole < ld) _mm256_store_ps(vr + 8 * whole, WidenKv8<kT>(v, 8 * whole, hd));
  }
}

// The V half of a tile for G heads of one query and the 8-feature chunks [c, c + C): the
// heads' accumulators, rescaled by corr, gain p[h][j] * v_j for j < n in slot order
// (C * G accumulators in registers; C = 2 while 2G + 3 registers fit in 16). V rows come from
// `vt` (widened, ld apart) when it is not null, else straight from the stored vectors vp[j]
// (the same values: the widening is exact; only when head_dim is whole 8-feature chunks).
template <int G, int C, KvType kT>
void TileValues(const float* vt, const uint8_t* const* vp, size_t off, int ld, int n,
                const float (*p)[kAttnTile], const float* corr, int c, const __m256i* masks,
                int hd, float* acc) {
  __m256 a[C][G];
  #pragma GCC unroll 2
  for (int x = 0; x < C; ++x) {
    #pragma GCC unroll 8
    for (int h = 0; h < G; ++h) {
      a[x][h] = _mm256_mul_ps(_mm256_maskload_ps(acc + h * hd + 8 * (c + x), masks[x]),
                              _mm256_set1_ps(corr[h]));
    }
  }
  // One loop per source of V, so that no choice is left inside it.
  auto run = [&](auto load) {
    for (int j = 0; j < n; ++j) {
      __m256 v[C];
      #pragma GCC unroll 2
      for (int x = 0; x < C; ++x) v[x] = load(j, 8 * (c + x));
      #pragma GCC unroll 8
      for (int h = 0; h < G; ++h) {
        const __m256 w = _mm256_set1_ps(p[h][j]);
        #pragma GCC unroll 2
        for (int x = 0; x < C; ++x) a[x][h] = _mm256_fmadd_ps(w, v[x], a[x][h]);
      }
    }
  };
  if (vt != nullptr) {
    run([&](int j, int i) { return _mm256_load_ps(vt + j * ld + i); });
  } else {
    run([&](int j, int i) { return LoadKv8(vp[j] + off, i, kT); });
  }
  #pragma GCC unroll 2
  for (int x = 0; x < C; ++x) {
    #pragma GCC unroll 8
    for (int h = 0; h < G; ++h) {
      _mm256_maskstore_ps(acc + h * hd + 8 * (c + x), masks[x], a[x][h]);
    }
  }
}

// attend_block for heads h0 .. h0 + G of each query's group, for nq queries and the job's KV
// heads (see kernels_internal.h; the scalar AttendSpan is the definition of each query's
// arithmetic), built like the AVX-512 BlockHeads with 8 lanes: per tile, per KV head in turn,
// K (and for several queries V) widened once to f32 rows (zero-padded to whole 8-feature
// chunks) in L1 scratch for all the queries, the next pass's vectors prefetched meanwhile; per
// query, the scores of two heads per pass, four keys at a time (Reduce4x8; ScoreHeads); per
// head, the max, exponentials and sum over the query's own keys; then V with the G
// accumulators in registers, one or two 8-feature chunks per pass (16 ymm registers;
// TileValues). A query's operations do not depend on the others in the block, nor on the
// other KV heads.
template <int G, KvType kT>
void BlockHeads(const KvView& kv, const AttendJob& job, int h0) {
  const int hd = kv.head_dim, nq = job.nq, group = job.group, nk = job.n_kvh;
  const int nc = (hd + 7) / 8, ld = 8 * nc;
  const __m256i last = LaneMask(hd - 8 * (nc - 1));
  const float inf = __builtin_inff();
  auto m = [&](int k, int i) { return job.State(k, i) + h0; };
  auto l = [&](int k, int i) { return job.State(k, i) + group + h0; };
  auto acc = [&](int k, int i) { return job.State(k, i) + 2 * group + h0 * hd; };
  const int64_t end = StartJob(job, h0, G, hd);
  // Scratch: the K tile [kAttnTile][ld], the V tile, the queries [n_kvh][nq][G][ld], all
  // zero-padded, then (kivi4) a key group's parameters.
  constexpr bool kivi = kT == KvType::kKivi4;
  auto* kt = static_cast<float*>(ThreadScratch(
      2, sizeof(float) * ((2 * kAttnTile + nk * nq * G) * ld + (kivi ? 2 * hd : 0))));
  float* const vbuf = kt + kAttnTile * ld;
  float* qp = vbuf + kAttnTile * ld;
  for (int k = 0; k < nk; ++k) {
    for (int i = 0; i < nq; ++i) {
      const float* src = job.q + k * job.q_kvh_stride + i * job.q_stride + h0 * hd;
      for (int h = 0; h < G; ++h) {
        float* dst = qp + ((k * nq + i) * G + h) * ld;
        for (int d = 0; d < ld; ++d) dst[d] = d < hd ? src[h * hd + d] : 0.0f;
      }
    }
  }
  // The stored K and V vectors of the first KV head for this tile and the next (TileAddrs;
  // none for kivi4); KV head kvh + k's are hb * k bytes on in the blocks, 2 * hd * k in the
  // f16 ring.
  TileAddrs tiles[2];
  const size_t hb = KvHeadBytes(kT, hd);
  alignas(32) float s[G][kAttnTile];
  float corr[G];
  const int64_t begin = job.begin, t_first = begin - begin % kAttnTile;
  if (!kivi && t_first < end) {
    FindTile(kv, job.kvh, begin, static_cast<int>(Min64(t_first + kAttnTile, end) - begin),
             tiles);
  }
  // Scores from K in place where V is read in place too (f16 and f32 KV: one conversion a
  // chunk), instead of widening K first.
  constexpr bool kInPlaceType = kT == KvType::kF16 || kT == KvType::kF32;
  int x = 0;  // tiles[x]: this tile's
  for (int64_t t0 = t_first; t0 < end; t0 += kAttnTile, x ^= 1) {
    const int64_t j0 = t0 > begin ? t0 : begin;
    const int n_all = static_cast<int>(Min64(t0 + kAttnTile, end) - j0);
    const int n4_all = (n_all + 3) & ~3;
    // A lone query (a decode step) reads V in place instead of widening it first, except in a
    // tile reaching a window's f16 tail (every kivi4 tile), whose slots are not all in the
    // blocks, and with a partial last chunk.
    float* const vt =
        nq > 1 || kivi || hd % 8 != 0 || t0 + kAttnTile > kv.tail_begin ? vbuf : nullptr;
    TileAddrs& cur = tiles[x];
    TileAddrs& next = tiles[x ^ 1];
    const bool in_place = kInPlaceType && vt == nullptr;
    if constexpr (!kivi) {
      StepTiles(kv, job.kvh, t0, end, in_place, n_all, n4_all, cur, next);
    }
    // The widened K tile's rows [n_all, n4_all) stay zeros through the KV heads' passes.
    for (int j = n_all; !in_place && j < n4_all; ++j) {
      for (int c = 0; c < ld; c += 8) _mm256_store_ps(kt + j * ld + c, _mm256_setzero_ps());
    }
    for (int k = 0; k < nk; ++k) {
      const size_t off = k * hb;
      if constexpr (kivi) {
        WidenKivi(kv, job.kvh + k, j0, n_all, kt, vt, ld, qp + nk * nq * G * ld);
      } else {
        const PassPrefetch pf = NextPass(cur, next, k, nk, hb);
        float* const kw = in_place ? nullptr : kt;
        WidenRows<kT>(cur.k, cur.v, off, 0, cur.n_blocks, hd, ld, kw, vt, pf);
        WidenRows<KvType::kF16>(cur.k, cur.v, 2 * hd * k, cur.n_blocks, n_all, hd, ld, kw, vt,
                                pf);
        for (int j = n_all; j < pf.tile->n_blocks; ++j) PrefetchSlot(*pf.tile, j, hb, pf.off);
      }
      for (int qi = 0; qi < nq; ++qi) {
        if (job.ends[qi] <= j0) continue;
        const int n = static_cast<int>(Min64(t0 + kAttnTile, job.ends[qi]) - j0);
        const int n4 = (n + 3) & ~3;
        float* mq = m(k, qi);
        float* lq = l(k, qi);
        const float* qq = qp + (k * nq + qi) * G * ld;
        if (in_place) {
          if constexpr (kInPlaceType) {
            TileScores<G, kT>(qq, ld, nullptr, cur.k, off, n4, job.scale, s);
          }
        } else {
          TileScores<G, kWidened>(qq, ld, kt, nullptr, 0, n4, job.scale, s);
        }
        for (int h = 0; h < G; ++h) {
          __m256 vmax = _mm256_set1_ps(-inf);
          int i = 0;
          for (; i + 8 <= n; i += 8) vmax = _mm256_max_ps(vmax, _mm256_load_ps(s[h] + i));
          float tile_max = Max8(vmax);
          for (int t = i; t < n; ++t) tile_max = s[h][t] > tile_max ? s[h][t] : tile_max;
          const float m_new = mq[h] > tile_max ? mq[h] : tile_max;
          corr[h] = __builtin_expf(mq[h] - m_new);
          const __m256 mx = _mm256_set1_ps(m_new);
          __m256 vsum = _mm256_setzero_ps();
          for (i = 0; i + 8 <= n; i += 8) {
            const __m256 e = Exp(_mm256_sub_ps(_mm256_load_ps(s[h] + i), mx));
            _mm256_store_ps(s[h] + i, e);
            vsum = _mm256_add_ps(vsum, e);
          }
          float sum = Reduce8(vsum);
          for (; i < n; ++i) sum += (s[h][i] = Exp1(s[h][i] - m_new));
          lq[h] = lq[h] * corr[h] + sum;
          mq[h] = m_new;
        }
        float* aq = acc(k, qi);
        const __m256i all = _mm256_set1_epi32(-1);
        int c = 0;
        if constexpr (2 * G + 3 <= 16) {
          for (; c + 2 <= nc; c += 2) {
            const __m256i masks[2] = {all, c + 2 == nc ? last : all};
            TileValues<G, 2, kT>(vt, cur.v, off, ld, n, s, corr, c, masks, hd, aq);
          }
        }
        for (; c < nc; ++c) {
          const __m256i masks[1] = {c == nc - 1 ? last : all};
          TileValues<G, 1, kT>(vt, cur.v, off, ld, n, s, corr, c, masks, hd, aq);
        }
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

// F16C, 8 at a time; a tail goes through a zero-padded block of 8.
void F32ToF16(const float* x, void* y, int64_t n) {
  auto* out = static_cast<uint8_t*>(y);
  for (int64_t i = 0; i < n; i += 8) {
    const int m = n - i < 8 ? static_cast<int>(n - i) : 8;
    alignas(32) float in[8] = {};
    const float* src = x + i;
    if (m < 8) {
      std::memcpy(in, src, sizeof(float) * m);
      src = in;
    }
    const __m256 v = _mm256_loadu_ps(src);
    const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
    if (m == 8) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * i), h);
    } else {
      alignas(16) uint8_t tmp[16];
      _mm_store_si128(reinterpret_cast<__m128i*>(tmp), h);
      std::memcpy(out + 2 * i, tmp, 2 * static_cast<size_t>(m));
    }
    if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0) {
      FixNanHalves(src, out + 2 * i, m);
    }
  }
}

void F16ToF32(const void* x, float* y, int64_t n) {
  const auto* in = static_cast<const uint8_t*>(x);
  for (int64_t i = 0; i < n; i += 8) {
    const int m = n - i < 8 ? static_cast<int>(n - i) : 8;
    alignas(16) uint8_t tmp[16] = {};
    const uint8_t* src = in + 2 * i;
    if (m < 8) {
      std::memcpy(tmp, src, 2 * static_cast<size_t>(m));
      src = tmp;
    }
    const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
    if (m == 8) {
      _mm256_storeu_ps(y + i, v);
    } else {
      alignas(32) float f[8];
      _mm256_store_ps(f, v);
      std::memcpy(y + i, f, sizeof(float) * m);
    }
    if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0) FixNanFloats(src, y + i, m);
  }
}

// Ops::fma_chains: 12 chains, enough to cover the FMA latency (4-5 cycles) times the two FMA
// ports of the cores this level runs on.
int64_t FmaChains(int64_t steps, float* sink) {
  __m256 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(static_cast<float>(i));
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  for (int64_t s = 0; s < steps; ++s) {
    #pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  }
  __m256 sum = acc[0];
  for (int i = 1; i < 12; ++i) sum = _mm256_add_ps(sum, acc[i]);
  *sink = Reduce8(sum);
  return steps * 12 * 8 * 2;
}

Ops MakeOps() {
  Ops o{};
  o.isa = Isa::kAvx2;
  o.quantize_act = QuantizeAct;
  o.matmul_rows = MatMulRows;
  o.row_grain = RowGrain;
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

const Ops& Avx2Ops() {
  static const Ops ops = MakeOps();
  return ops;
}

}  // namespace cachette::kernels::internal
