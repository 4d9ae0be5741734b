// AVX-512 (F+BW) version of the lossy codec loops. Compiled with AVX-512 flags in its own
// translation unit and only called after a run-time CPU check. Each loop takes the common
// shapes (head_dim a multiple of 16, whole groups) and hands anything else to the scalar
// reference, so both tables agree on every input; codecs_test (QuantKernels) checks that.
#include <immintrin.h>

#include <algorithm>

#include "cache/codecs/quant_kernels.h"
#include "cache/codecs/quant_scalar_ops.h"

namespace cachette::cache::codecs {
namespace {

const QuantKernels& Ref() { return ScalarQuantKernels(); }

constexpr int kRoundNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

// True for lanes with |x| <= kF16Max (false for NaN), as in the scalar loops.
__mmask16 InRange(__m512 x) {
  return _mm512_cmp_ps_mask(_mm512_abs_ps(x), _mm512_set1_ps(kF16Max), _CMP_LE_OQ);
}

// max(v, lo) returns lo for NaN v (second operand), then min(., hi): the scalar ClampCode.
__m512 ClampCode(__m512 v, __m512 lo, __m512 hi) {
  return _mm512_min_ps(_mm512_max_ps(v, lo), hi);
}

// 16 codes in [0, 15] (f32 lanes) -> 8 bytes, even lane in the low nibble.
void StoreNibbles16(__m512 q, uint8_t* out) {
  const __m128i bytes = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q));  // lane i -> byte i
  // As 8 u16 lanes (even | odd << 8): lane | lane >> 4 has even | odd << 4 in its low byte.
  const __m128i merged = _mm_or_si128(bytes, _mm_srli_epi16(bytes, 4));
  const __m128i packed = _mm_packus_epi16(_mm_and_si128(merged, _mm_set1_epi16(0xFF)),
                                          _mm_setzero_si128());
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out), packed);
}

// 8 bytes of nibbles -> 16 codes as f32 lanes.
__m512 LoadNibbles16(const uint8_t* in) {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(in));
  const __m128i lo = _mm_and_si128(b, _mm_set1_epi8(0x0F));
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F));
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)));
}

// Affine4ParamsFor for 16 groups at once: vcvtps2ph rounds down / up directly, and the
// other steps are the same IEEE operations as the scalar helper.
struct Affine4ParamsX16 {
  __m256i min_bits, scale_bits;
  __m512 min, inv;
};
Affine4ParamsX16 Affine4ParamsFor16(__m512 lo, __m512 hi) {
  const __m512 zero = _mm512_setzero_ps();
  lo = _mm512_add_ps(lo, zero);  // -0 -> +0, as the scalar helper does
  hi = _mm512_add_ps(hi, zero);
  Affine4ParamsX16 p;
  p.min_bits = _mm512_cvtps_ph(lo, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  p.min = _mm512_cvtph_ps(p.min_bits);
  p.scale_bits = _mm512_cvtps_ph(_mm512_div_ps(_mm512_sub_ps(hi, p.min), _mm512_set1_ps(15.0f)),
                                 _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
  const __m512 s = _mm512_cvtph_ps(p.scale_bits);
  p.inv = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(s, zero, _CMP_GT_OQ), _mm512_set1_ps(1.0f), s);
  return p;
}

// Stores the first n (<= 16) halves of `h`.
void StoreHalves(std::byte* dst, __m256i h, size_t n) {
  _mm256_mask_storeu_epi16(dst, static_cast<__mmask16>((1u << n) - 1), h);
}

void F16ToF32(const std::byte* src, float* dst, size_t n) {
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 2 * i));
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(h));
  }
  Ref().f16_to_f32(src + 2 * i, dst + i, n - i);
}

void F32ToF16(const float* src, std::byte* dst, size_t n) {
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm512_cvtps_ph(_mm512_loadu_ps(src + i), kRoundNearest);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * i), h);
  }
  Ref().f32_to_f16(src + i, dst + 2 * i, n - i);
}

bool Int8Encode(const float* x, size_t n_vec, size_t dim, std::byte* scales, int8_t* codes) {
  if (dim % 16 != 0) return Ref().int8_encode(x, n_vec, dim, scales, codes);
  __mmask16 ok = 0xFFFF;
  const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
  // Scales of 16 vectors at a time: the f16 round-up is one instruction there, where the
  // scalar helper would dominate the loop.
  for (size_t v0 = 0; v0 < n_vec; v0 += 16) {
    const size_t nb = std::min<size_t>(16, n_vec - v0);
    alignas(64) float amax[16] = {};
    for (size_t b = 0; b < nb; ++b) {
      const float* xv = x + (v0 + b) * dim;
      __m512 a = _mm512_setzero_ps();
      for (size_t i = 0; i < dim; i += 16) {
        const __m512 xi = _mm512_loadu_ps(xv + i);
        ok &= InRange(xi);
        a = _mm512_max_ps(a, _mm512_abs_ps(xi));
      }
      amax[b] = _mm512_reduce_max_ps(a);
    }
    // Int8ScaleFor, 16 lanes.
    const __m256i bits = _mm512_cvtps_ph(_mm512_div_ps(_mm512_load_ps(amax), hi),
                                         _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
    const __m512 s = _mm512_cvtph_ps(bits);
    alignas(64) float inv[16];
    _mm512_store_ps(inv, _mm512_maskz_div_ps(_mm512_cmp_ps_mask(s, _mm512_setzero_ps(), _CMP_GT_OQ),
                                             _mm512_set1_ps(1.0f), s));
    StoreHalves(scales + 2 * v0, bits, nb);
    for (size_t b = 0; b < nb; ++b) {
      const float* xv = x + (v0 + b) * dim;
      const __m512 vinv = _mm512_set1_ps(inv[b]);
      for (size_t i = 0; i < dim; i += 16) {
        const __m512 q = ClampCode(
            _mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(xv + i), vinv), kRoundNearest),
            lo, hi);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + (v0 + b) * dim + i),
                         _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(q)));
      }
    }
  }
  return ok == 0xFFFF;
}

void Int8Decode(const std::byte* scales, const int8_t* codes, size_t n_vec, size_t dim,
                float* out) {
  if (dim % 16 != 0) return Ref().int8_decode(scales, codes, n_vec, dim, out);
  for (size_t v = 0; v < n_vec; ++v) {
    const __m512 s = _mm512_set1_ps(Fp16ToFp32(LoadU16(scales + 2 * v)));
    for (size_t i = 0; i < dim; i += 16) {
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + v * dim + i));
      _mm512_storeu_ps(out + v * dim + i,
                       _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c)), s));
    }
  }
}

bool Affine4RowsEncode(const float* x, size_t n_rows, size_t dim, size_t group,
                       std::byte* scales, std::byte* mins, uint8_t* codes) {
  if (group % 16 != 0 || dim % group != 0) {
    return Ref().affine4_rows_encode(x, n_rows, dim, group, scales, mins, codes);
  }
  // With whole groups, group gi of the flat [n_rows][n_groups] parameter arrays covers
  // x[gi * group, (gi + 1) * group): walk groups 16 at a time and derive their parameters at
  // once.
  const size_t n_groups = n_rows * (dim / group);
  __mmask16 ok = 0xFFFF;
  const __m512 zero = _mm512_setzero_ps(), fifteen = _mm512_set1_ps(15.0f);
  for (size_t g0 = 0; g0 < n_groups; g0 += 16) {
    const size_t nb = std::min<size_t>(16, n_groups - g0);
    alignas(64) float lo_arr[16] = {}, hi_arr[16] = {};
    for (size_t b = 0; b < nb; ++b) {
      const float* xg = x + (g0 + b) * group;
      __m512 lo = _mm512_loadu_ps(xg), hi = lo;
      for (size_t i = 0; i < group; i += 16) {
        const __m512 xi = _mm512_loadu_ps(xg + i);
        ok &= InRange(xi);
        lo = _mm512_min_ps(lo, xi);
        hi = _mm512_max_ps(hi, xi);
      }
      lo_arr[b] = _mm512_reduce_min_ps(lo);
      hi_arr[b] = _mm512_reduce_max_ps(hi);
    }
    const Affine4ParamsX16 p =
        Affine4ParamsFor16(_mm512_load_ps(lo_arr), _mm512_load_ps(hi_arr));
    StoreHalves(scales + 2 * g0, p.scale_bits, nb);
    StoreHalves(mins + 2 * g0, p.min_bits, nb);
    alignas(64) float m_arr[16], inv_arr[16];
    _mm512_store_ps(m_arr, p.min);
    _mm512_store_ps(inv_arr, p.inv);
    for (size_t b = 0; b < nb; ++b) {
      const float* xg = x + (g0 + b) * group;
      const __m512 m = _mm512_set1_ps(m_arr[b]), inv = _mm512_set1_ps(inv_arr[b]);
      uint8_t* cg = codes + (g0 + b) * group / 2;
      for (size_t i = 0; i < group; i += 16) {
        const __m512 t = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(xg + i), m), inv);
        StoreNibbles16(ClampCode(_mm512_roundscale_ps(t, kRoundNearest), zero, fifteen),
                       cg + i / 2);
      }
    }
  }
  return ok == 0xFFFF;
}

void Affine4RowsDecode(const std::byte* scales, const std::byte* mins, const uint8_t* codes,
                       size_t n_rows, size_t dim, size_t group, float* out) {
  if (group % 16 != 0 || dim % group != 0) {
    return Ref().affine4_rows_decode(scales, mins, codes, n_rows, dim, group, out);
  }
  const size_t n_groups = dim / group;
  for (size_t r = 0; r < n_rows; ++r) {
    for (size_t g = 0; g < n_groups; ++g) {
      const size_t gi = r * n_groups + g;
      const __m512 s = _mm512_set1_ps(Fp16ToFp32(LoadU16(scales + 2 * gi)));
      const __m512 m = _mm512_set1_ps(Fp16ToFp32(LoadU16(mins + 2 * gi)));
      const size_t base = r * dim + g * group;
      for (size_t i = 0; i < group; i += 16) {
        const __m512 q = LoadNibbles16(codes + (base + i) / 2);
        _mm512_storeu_ps(out + base + i, _mm512_add_ps(m, _mm512_mul_ps(q, s)));
      }
    }
  }
}

bool Affine4ColsEncode(const float* x, size_t n_rows, size_t n_cols, std::byte* scales,
                       std::byte* mins, uint8_t* codes) {
  if (n_cols % 16 != 0 || n_rows == 0) {
    return Ref().affine4_cols_encode(x, n_rows, n_cols, scales, mins, codes);
  }
  __mmask16 ok = 0xFFFF;
  const __m512 zero = _mm512_setzero_ps(), fifteen = _mm512_set1_ps(15.0f);
  for (size_t c = 0; c < n_cols; c += 16) {
    __m512 lo = _mm512_loadu_ps(x + c), hi = lo;
    for (size_t r = 0; r < n_rows; ++r) {
      const __m512 xr = _mm512_loadu_ps(x + r * n_cols + c);
      ok &= InRange(xr);
      lo = _mm512_min_ps(lo, xr);
      hi = _mm512_max_ps(hi, xr);
    }
    const Affine4ParamsX16 p = Affine4ParamsFor16(lo, hi);
    const __m512 m = p.min, inv = p.inv;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(scales + 2 * c), p.scale_bits);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(mins + 2 * c), p.min_bits);
    for (size_t r = 0; r < n_rows; ++r) {
      const __m512 t = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + r * n_cols + c), m), inv);
      StoreNibbles16(ClampCode(_mm512_roundscale_ps(t, kRoundNearest), zero, fifteen),
                     codes + (r * n_cols + c) / 2);
    }
  }
  return ok == 0xFFFF;
}

void Affine4ColsDecode(const std::byte* scales, const std::byte* mins, const uint8_t* codes,
                       size_t n_rows, size_t n_cols, float* out) {
  if (n_cols % 16 != 0) {
    return Ref().affine4_cols_decode(scales, mins, codes, n_rows, n_cols, out);
  }
  for (size_t c = 0; c < n_cols; c += 16) {
    const __m512 s =
        _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + 2 * c)));
    const __m512 m =
        _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mins + 2 * c)));
    for (size_t r = 0; r < n_rows; ++r) {
      const __m512 q = LoadNibbles16(codes + (r * n_cols + c) / 2);
      _mm512_storeu_ps(out + r * n_cols + c, _mm512_add_ps(m, _mm512_mul_ps(q, s)));
    }
  }
}

}  // namespace

const QuantKernels* Avx512QuantKernels() {
  static const QuantKernels k = {
      "avx512",          F16ToF32,          F32ToF16,          Int8Encode,
      Int8Decode,        Affine4RowsEncode, Affine4RowsDecode, Affine4ColsEncode,
      Affine4ColsDecode,
  };
  static const bool supported =
      __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  return supported ? &k : nullptr;
}

}  // namespace cachette::cache::codecs
