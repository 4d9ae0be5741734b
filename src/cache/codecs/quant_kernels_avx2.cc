// AVX2 + F16C version of the lossy codec loops, for processors without AVX-512 (AMD Zen 2/3,
// Intel before Skylake-X). Compiled with -mavx2 -mf16c in its own translation unit and only
// called after a run-time CPU check. No FMA: the scalar reference multiplies and adds in two
// roundings, and every output here must match it bit for bit (quant_kernels.h).
//
// Same plan as quant_kernels_avx512.cc with 8 lanes: derive the f16 parameters of 8 vectors or
// groups at once (vcvtps2ph rounds down / up in one instruction), then code each vector or group
// 8 elements at a time. Unlike the AVX-512 file, odd sizes run here too: a tail of fewer than 8
// elements goes through the same vector arithmetic on masked loads (maskload reads nothing
// outside the mask) or a zero-padded copy, so it needs no scalar twin of the arithmetic. Only
// affine4 rows with an odd group (never used by a codec: groups are 32 and 64) go to the scalar
// reference, because their groups start in the middle of a code byte.
//
// Like src/kernels' ISA files, this one calls no inline function or template from a header
// (quant_scalar_ops.h, core/fp16.h, std::min): the linker could keep this file's AVX2 copy of
// one and run it on a CPU without AVX2. Helpers live in the anonymous namespace.
#include <immintrin.h>

#include <cstring>

#include "cache/codecs/quant_kernels.h"

namespace cachette::cache::codecs {
namespace {

const QuantKernels& Ref() { return ScalarQuantKernels(); }

constexpr int kRoundNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
constexpr int kRoundDown = _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC;
constexpr int kRoundUp = _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC;

size_t MinSize(size_t a, size_t b) { return a < b ? a : b; }

// Lanes [0, n) set, n in [0, 8]: a window into {-1 x 8, 0 x 8}.
__m256i FirstLanes(size_t n) {
  alignas(32) static const int32_t kWindow[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                                  0,  0,  0,  0,  0,  0,  0,  0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kWindow + 8 - n));
}

__m256 AllLanes() { return _mm256_castsi256_ps(_mm256_set1_epi32(-1)); }

__m256 Abs(__m256 x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x); }

// All-ones lanes where |x| <= kF16Max (none for NaN), as in the scalar loops.
__m256 InRange(__m256 x) { return _mm256_cmp_ps(Abs(x), _mm256_set1_ps(kF16Max), _CMP_LE_OQ); }

// max(v, lo) returns lo for NaN v (second operand), then min(., hi): the scalar ClampCode.
__m256 ClampCode(__m256 v, __m256 lo, __m256 hi) {
  return _mm256_min_ps(_mm256_max_ps(v, lo), hi);
}

// 1 / s, or 0 where s is not > 0 (the scalar helpers' rule for a zero scale).
__m256 InverseOrZero(__m256 s) {
  return _mm256_and_ps(_mm256_cmp_ps(s, _mm256_setzero_ps(), _CMP_GT_OQ),
                       _mm256_div_ps(_mm256_set1_ps(1.0f), s));
}

float ReduceMax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}
float ReduceMin(__m256 v) {
  __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_min_ps(m, _mm_movehl_ps(m, m));
  m = _mm_min_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

// One f16 parameter, at any byte offset, as f32 in all lanes (vcvtph2ps is exact, as the
// scalar conversion is).
__m256 BroadcastHalf(const std::byte* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(h)));
}

// Stores the first n (<= 8) halves of h.
void StoreHalves(std::byte* dst, __m128i h, size_t n) {
  alignas(16) std::byte tmp[16];
  _mm_store_si128(reinterpret_cast<__m128i*>(tmp), h);
  std::memcpy(dst, tmp, 2 * n);
}

// Loads n (<= 8) halves, zero past n.
__m128i LoadHalves(const std::byte* src, size_t n) {
  alignas(16) std::byte tmp[16] = {};
  std::memcpy(tmp, src, 2 * n);
  return _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
}

__m128i LoadU32(const void* src) {
  int32_t w;
  std::memcpy(&w, src, 4);
  return _mm_cvtsi32_si128(w);
}

void StoreU32(void* dst, __m128i v) {
  const int32_t w = _mm_cvtsi128_si32(v);
  std::memcpy(dst, &w, 4);
}

// ---- code packing ----

// 8 int8 codes (integral f32 lanes in [-127, 127]) -> bytes 0..7 of the result.
__m128i PackInt8x8(__m256 q) {
  const __m256i i = _mm256_cvtps_epi32(q);
  const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
  return _mm_packs_epi16(w, w);
}

// 32 int8 codes -> 32 bytes in order.
__m256i PackInt8x32(__m256 a, __m256 b, __m256 c, __m256 d) {
  // packs works within 128-bit halves, so after both steps the 8 dwords (4 codes each) hold
  // a[0:4] b[0:4] c[0:4] d[0:4] | a[4:8] b[4:8] c[4:8] d[4:8]; the permute restores the order.
  const __m256i ab = _mm256_packs_epi32(_mm256_cvtps_epi32(a), _mm256_cvtps_epi32(b));
  const __m256i cd = _mm256_packs_epi32(_mm256_cvtps_epi32(c), _mm256_cvtps_epi32(d));
  const __m256i abcd = _mm256_packs_epi16(ab, cd);
  return _mm256_permutevar8x32_epi32(abcd, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// 16 codes in [0, 15] (integral f32 lanes, a then b) -> bytes 0..7 of the result, even
// element in the low nibble.
__m128i PackNibbles16(__m256 a, __m256 b) {
  const __m256i ia = _mm256_cvtps_epi32(a), ib = _mm256_cvtps_epi32(b);
  const __m128i wa = _mm_packs_epi32(_mm256_castsi256_si128(ia), _mm256_extracti128_si256(ia, 1));
  const __m128i wb = _mm_packs_epi32(_mm256_castsi256_si128(ib), _mm256_extracti128_si256(ib, 1));
  const __m128i bytes = _mm_packus_epi16(wa, wb);  // element i -> byte i
  // As 8 u16 lanes (even | odd << 8): lane | lane >> 4 has even | odd << 4 in its low byte.
  const __m128i merged = _mm_or_si128(bytes, _mm_srli_epi16(bytes, 4));
  return _mm_packus_epi16(_mm_and_si128(merged, _mm_set1_epi16(0xFF)), _mm_setzero_si128());
}

// 8 bytes of nibbles (bytes 0..7 of b) -> 16 codes as f32, in *lo (0..7) and *hi (8..15).
void UnpackNibbles16(__m128i b, __m256* lo, __m256* hi) {
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i codes =
      _mm_unpacklo_epi8(_mm_and_si128(b, mask), _mm_and_si128(_mm_srli_epi16(b, 4), mask));
  *lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes));
  *hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(codes, 8)));
}

// ---- f16 <-> f32 ----

// Tails go through the same instruction on a padded copy (not the scalar reference), so an
// element converts the same wherever it sits; the two differ only on NaN payloads.
void F16ToF32(const std::byte* src, float* dst, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  if (i < n) {
    _mm256_maskstore_ps(dst + i, FirstLanes(n - i),
                        _mm256_cvtph_ps(LoadHalves(src + 2 * i, n - i)));
  }
}

void F32ToF16(const float* src, std::byte* dst, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), kRoundNearest);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * i), h);
  }
  if (i < n) {
    const __m256 x = _mm256_maskload_ps(src + i, FirstLanes(n - i));
    StoreHalves(dst + 2 * i, _mm256_cvtps_ph(x, kRoundNearest), n - i);
  }
}

// ---- int8 ----

__m256 Int8Codes(__m256 x, __m256 inv) {
  const __m256 q = _mm256_round_ps(_mm256_mul_ps(x, inv), kRoundNearest);
  return ClampCode(q, _mm256_set1_ps(-127.0f), _mm256_set1_ps(127.0f));
}

bool Int8Encode(const float* x, size_t n_vec, size_t dim, std::byte* scales, int8_t* codes) {
  const size_t tail = dim % 8, body = dim - tail;
  const __m256i tail_lanes = FirstLanes(tail);
  __m256 ok = AllLanes();
  // Scales of 8 vectors at a time: the f16 round-up is one instruction there.
  for (size_t v0 = 0; v0 < n_vec; v0 += 8) {
    const size_t nb = MinSize(8, n_vec - v0);
    alignas(32) float amax[8] = {};
    for (size_t b = 0; b < nb; ++b) {
      const float* xv = x + (v0 + b) * dim;
      __m256 a = _mm256_setzero_ps();
      for (size_t i = 0; i < body; i += 8) {
        const __m256 xi = _mm256_loadu_ps(xv + i);
        ok = _mm256_and_ps(ok, InRange(xi));
        a = _mm256_max_ps(a, Abs(xi));
      }
      if (tail != 0) {  // lanes past the tail load as 0: in range, and no larger than amax
        const __m256 xi = _mm256_maskload_ps(xv + body, tail_lanes);
        ok = _mm256_and_ps(ok, InRange(xi));
        a = _mm256_max_ps(a, Abs(xi));
      }
      amax[b] = ReduceMax(a);
    }
    // Int8ScaleFor, 8 lanes.
    const __m128i bits =
        _mm256_cvtps_ph(_mm256_div_ps(_mm256_load_ps(amax), _mm256_set1_ps(127.0f)), kRoundUp);
    alignas(32) float inv[8];
    _mm256_store_ps(inv, InverseOrZero(_mm256_cvtph_ps(bits)));
    StoreHalves(scales + 2 * v0, bits, nb);
    for (size_t b = 0; b < nb; ++b) {
      const float* xv = x + (v0 + b) * dim;
      int8_t* cv = codes + (v0 + b) * dim;
      const __m256 vinv = _mm256_set1_ps(inv[b]);
      size_t i = 0;
      for (; i + 32 <= body; i += 32) {
        const __m256i q = PackInt8x32(Int8Codes(_mm256_loadu_ps(xv + i), vinv),
                                      Int8Codes(_mm256_loadu_ps(xv + i + 8), vinv),
                                      Int8Codes(_mm256_loadu_ps(xv + i + 16), vinv),
                                      Int8Codes(_mm256_loadu_ps(xv + i + 24), vinv));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(cv + i), q);
      }
      for (; i < body; i += 8) {
        _mm_storel_epi64(reinterpret_cast<__m128i*>(cv + i),
                         PackInt8x8(Int8Codes(_mm256_loadu_ps(xv + i), vinv)));
      }
      if (tail != 0) {
        alignas(16) int8_t tmp[16];
        _mm_store_si128(reinterpret_cast<__m128i*>(tmp),
                        PackInt8x8(Int8Codes(_mm256_maskload_ps(xv + body, tail_lanes), vinv)));
        std::memcpy(cv + body, tmp, tail);
      }
    }
  }
  return _mm256_movemask_ps(ok) == 0xFF;
}

__m256 Int8Values(__m128i c8, __m256 s) {  // codes in bytes 0..7 of c8, times s
  return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c8)), s);
}

void Int8Decode(const std::byte* scales, const int8_t* codes, size_t n_vec, size_t dim,
                float* out) {
  const size_t tail = dim % 8, body = dim - tail;
  const __m256i tail_lanes = FirstLanes(tail);
  for (size_t v = 0; v < n_vec; ++v) {
    const __m256 s = BroadcastHalf(scales + 2 * v);
    const int8_t* cv = codes + v * dim;
    float* ov = out + v * dim;
    size_t i = 0;
    for (; i + 16 <= body; i += 16) {
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(cv + i));
      _mm256_storeu_ps(ov + i, Int8Values(c, s));
      _mm256_storeu_ps(ov + i + 8, Int8Values(_mm_srli_si128(c, 8), s));
    }
    for (; i < body; i += 8) {
      _mm256_storeu_ps(ov + i,
                       Int8Values(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(cv + i)), s));
    }
    if (tail != 0) {
      alignas(16) int8_t tmp[16] = {};
      std::memcpy(tmp, cv + body, tail);
      _mm256_maskstore_ps(ov + body, tail_lanes,
                          Int8Values(_mm_load_si128(reinterpret_cast<const __m128i*>(tmp)), s));
    }
  }
}

// ---- affine 4-bit ----

// Affine4ParamsFor for 8 groups at once: vcvtps2ph rounds down / up directly, and the other
// steps are the same IEEE operations as the scalar helper.
struct Affine4ParamsX8 {
  __m128i min_bits, scale_bits;
  __m256 min, inv;
};
Affine4ParamsX8 Affine4ParamsFor8(__m256 lo, __m256 hi) {
  const __m256 zero = _mm256_setzero_ps();
  lo = _mm256_add_ps(lo, zero);  // -0 -> +0, as the scalar helper does
  hi = _mm256_add_ps(hi, zero);
  Affine4ParamsX8 p;
  p.min_bits = _mm256_cvtps_ph(lo, kRoundDown);
  p.min = _mm256_cvtph_ps(p.min_bits);
  p.scale_bits =
      _mm256_cvtps_ph(_mm256_div_ps(_mm256_sub_ps(hi, p.min), _mm256_set1_ps(15.0f)), kRoundUp);
  p.inv = InverseOrZero(_mm256_cvtph_ps(p.scale_bits));
  return p;
}

// Codes of 8 elements: clamp(round((x - m) * inv), 0, 15), the scalar Affine4Code.
__m256 Affine4Codes(__m256 x, __m256 m, __m256 inv) {
  const __m256 t = _mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(x, m), inv), kRoundNearest);
  return ClampCode(t, _mm256_setzero_ps(), _mm256_set1_ps(15.0f));
}

// Codes of n (even) consecutive elements x[0, n) of one group into n / 2 bytes at out.
void Affine4CodeRun(const float* x, size_t n, __m256 m, __m256 inv, uint8_t* out) {
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m128i packed = PackNibbles16(Affine4Codes(_mm256_loadu_ps(x + i), m, inv),
                                         Affine4Codes(_mm256_loadu_ps(x + i + 8), m, inv));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i / 2), packed);
  }
  if (i + 8 <= n) {
    StoreU32(out + i / 2,
             PackNibbles16(Affine4Codes(_mm256_loadu_ps(x + i), m, inv), _mm256_setzero_ps()));
    i += 8;
  }
  if (i < n) {
    const __m256 xi = _mm256_maskload_ps(x + i, FirstLanes(n - i));
    alignas(16) uint8_t tmp[16];
    _mm_store_si128(reinterpret_cast<__m128i*>(tmp),
                    PackNibbles16(Affine4Codes(xi, m, inv), _mm256_setzero_ps()));
    std::memcpy(out + i / 2, tmp, (n - i) / 2);
  }
}

// out[0, n) = m + code * s for n (even) codes packed at `codes`.
void Affine4DecodeRun(const uint8_t* codes, size_t n, __m256 m, __m256 s, float* out) {
  size_t i = 0;
  __m256 lo, hi;
  for (; i + 16 <= n; i += 16) {
    UnpackNibbles16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + i / 2)), &lo, &hi);
    _mm256_storeu_ps(out + i, _mm256_add_ps(m, _mm256_mul_ps(lo, s)));
    _mm256_storeu_ps(out + i + 8, _mm256_add_ps(m, _mm256_mul_ps(hi, s)));
  }
  if (i + 8 <= n) {
    UnpackNibbles16(LoadU32(codes + i / 2), &lo, &hi);
    _mm256_storeu_ps(out + i, _mm256_add_ps(m, _mm256_mul_ps(lo, s)));
    i += 8;
  }
  if (i < n) {
    alignas(16) uint8_t tmp[16] = {};
    std::memcpy(tmp, codes + i / 2, (n - i) / 2);
    UnpackNibbles16(_mm_load_si128(reinterpret_cast<const __m128i*>(tmp)), &lo, &hi);
    _mm256_maskstore_ps(out + i, FirstLanes(n - i), _mm256_add_ps(m, _mm256_mul_ps(lo, s)));
  }
}

bool Affine4RowsEncode(const float* x, size_t n_rows, size_t dim, size_t group,
                       std::byte* scales, std::byte* mins, uint8_t* codes) {
  if (group % 2 != 0) {
    return Ref().affine4_rows_encode(x, n_rows, dim, group, scales, mins, codes);
  }
  // Groups in the order of the flat [n_rows][n_groups] parameter arrays, 8 at a time so their
  // parameters come out of one Affine4ParamsFor8. With an even group every group starts on a
  // code byte and has an even length (dim is even), so each is coded on its own.
  const size_t n_groups = (dim + group - 1) / group, total = n_rows * n_groups;
  __m256 ok = AllLanes();
  for (size_t g0 = 0; g0 < total; g0 += 8) {
    const size_t nb = MinSize(8, total - g0);
    alignas(32) float lo_arr[8] = {}, hi_arr[8] = {};
    for (size_t b = 0; b < nb; ++b) {
      const size_t r = (g0 + b) / n_groups, begin = (g0 + b) % n_groups * group;
      const size_t len = MinSize(group, dim - begin);
      const float* xg = x + r * dim + begin;
      const __m256 first = _mm256_set1_ps(xg[0]);
      __m256 lo = first, hi = first;
      size_t i = 0;
      for (; i + 8 <= len; i += 8) {
        const __m256 xi = _mm256_loadu_ps(xg + i);
        ok = _mm256_and_ps(ok, InRange(xi));
        lo = _mm256_min_ps(lo, xi);
        hi = _mm256_max_ps(hi, xi);
      }
      if (i < len) {  // lanes past the group repeat its first element: no new min or max
        const __m256i lanes = FirstLanes(len - i);
        const __m256 xi =
            _mm256_blendv_ps(first, _mm256_maskload_ps(xg + i, lanes), _mm256_castsi256_ps(lanes));
        ok = _mm256_and_ps(ok, InRange(xi));
        lo = _mm256_min_ps(lo, xi);
        hi = _mm256_max_ps(hi, xi);
      }
      lo_arr[b] = ReduceMin(lo);
      hi_arr[b] = ReduceMax(hi);
    }
    const Affine4ParamsX8 p = Affine4ParamsFor8(_mm256_load_ps(lo_arr), _mm256_load_ps(hi_arr));
    StoreHalves(scales + 2 * g0, p.scale_bits, nb);
    StoreHalves(mins + 2 * g0, p.min_bits, nb);
    alignas(32) float m_arr[8], inv_arr[8];
    _mm256_store_ps(m_arr, p.min);
    _mm256_store_ps(inv_arr, p.inv);
    for (size_t b = 0; b < nb; ++b) {
      const size_t r = (g0 + b) / n_groups, begin = (g0 + b) % n_groups * group;
      Affine4CodeRun(x + r * dim + begin, MinSize(group, dim - begin), _mm256_set1_ps(m_arr[b]),
                     _mm256_set1_ps(inv_arr[b]), codes + r * (dim / 2) + begin / 2);
    }
  }
  return _mm256_movemask_ps(ok) == 0xFF;
}

void Affine4RowsDecode(const std::byte* scales, const std::byte* mins, const uint8_t* codes,
                       size_t n_rows, size_t dim, size_t group, float* out) {
  if (group % 2 != 0) {
    return Ref().affine4_rows_decode(scales, mins, codes, n_rows, dim, group, out);
  }
  const size_t n_groups = (dim + group - 1) / group;
  for (size_t r = 0; r < n_rows; ++r) {
    for (size_t g = 0; g < n_groups; ++g) {
      const size_t gi = r * n_groups + g, begin = g * group;
      Affine4DecodeRun(codes + r * (dim / 2) + begin / 2, MinSize(group, dim - begin),
                       BroadcastHalf(mins + 2 * gi), BroadcastHalf(scales + 2 * gi),
                       out + r * dim + begin);
    }
  }
}

bool Affine4ColsEncode(const float* x, size_t n_rows, size_t n_cols, std::byte* scales,
                       std::byte* mins, uint8_t* codes) {
  if (n_rows == 0) return Ref().affine4_cols_encode(x, n_rows, n_cols, scales, mins, codes);
  __m256 ok = AllLanes();
  // 8 columns at a time; the last block may be partial (2, 4 or 6 columns, n_cols is even):
  // its lanes past the columns load as 0, which only changes parameters that are not stored.
  for (size_t c = 0; c < n_cols; c += 8) {
    const size_t nc = MinSize(8, n_cols - c);
    const __m256i lanes = FirstLanes(nc);
    const auto load = [&](const float* p) {
      return nc == 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lanes);
    };
    __m256 lo = load(x + c), hi = lo;
    for (size_t r = 0; r < n_rows; ++r) {
      const __m256 xr = load(x + r * n_cols + c);
      ok = _mm256_and_ps(ok, InRange(xr));
      lo = _mm256_min_ps(lo, xr);
      hi = _mm256_max_ps(hi, xr);
    }
    const Affine4ParamsX8 p = Affine4ParamsFor8(lo, hi);
    StoreHalves(scales + 2 * c, p.scale_bits, nc);
    StoreHalves(mins + 2 * c, p.min_bits, nc);
    for (size_t r = 0; r < n_rows; ++r) {
      const __m256 q = Affine4Codes(load(x + r * n_cols + c), p.min, p.inv);
      const __m128i packed = PackNibbles16(q, _mm256_setzero_ps());
      uint8_t* out = codes + (r * n_cols + c) / 2;
      if (nc == 8) {
        StoreU32(out, packed);
      } else {
        alignas(16) uint8_t tmp[16];
        _mm_store_si128(reinterpret_cast<__m128i*>(tmp), packed);
        std::memcpy(out, tmp, nc / 2);
      }
    }
  }
  return _mm256_movemask_ps(ok) == 0xFF;
}

void Affine4ColsDecode(const std::byte* scales, const std::byte* mins, const uint8_t* codes,
                       size_t n_rows, size_t n_cols, float* out) {
  for (size_t c = 0; c < n_cols; c += 8) {
    const size_t nc = MinSize(8, n_cols - c);
    const __m256 s = _mm256_cvtph_ps(LoadHalves(scales + 2 * c, nc));
    const __m256 m = _mm256_cvtph_ps(LoadHalves(mins + 2 * c, nc));
    const __m256i lanes = FirstLanes(nc);
    for (size_t r = 0; r < n_rows; ++r) {
      const uint8_t* cr = codes + (r * n_cols + c) / 2;
      __m128i b;
      if (nc == 8) {
        b = LoadU32(cr);
      } else {
        alignas(16) uint8_t tmp[16] = {};
        std::memcpy(tmp, cr, nc / 2);
        b = _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
      }
      __m256 lo, hi;
      UnpackNibbles16(b, &lo, &hi);
      const __m256 v = _mm256_add_ps(m, _mm256_mul_ps(lo, s));
      if (nc == 8) {
        _mm256_storeu_ps(out + r * n_cols + c, v);
      } else {
        _mm256_maskstore_ps(out + r * n_cols + c, lanes, v);
      }
    }
  }
}

}  // namespace

// The CPU check lives in quant_kernels_scalar.cc (baseline code): clang's
// __builtin_cpu_supports knows no "f16c", so F16C is read from CPUID there.
const QuantKernels& Avx2QuantKernelsTable() {
  static const QuantKernels k = {
      "avx2",            F16ToF32,          F32ToF16,          Int8Encode,
      Int8Decode,        Affine4RowsEncode, Affine4RowsDecode, Affine4ColsEncode,
      Affine4ColsDecode,
  };
  return k;
}

}  // namespace cachette::cache::codecs
