// Scalar building blocks shared by both kernel tables, so the per-group arithmetic (scale and
// minimum choice, code rounding) is written once and is the same in the fast path.
#pragma once

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "core/fp16.h"

namespace cachette::cache::codecs {

static_assert(std::endian::native == std::endian::little, "payloads are little-endian");

inline uint16_t LoadU16(const std::byte* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
inline void StoreU16(std::byte* p, uint16_t v) { std::memcpy(p, &v, 2); }

// Round half to even for |v| < 2^22 without libm (baseline x86-64 has no roundss): adding
// 1.5 * 2^23 leaves no fraction bits, so the FPU's default rounding does the work.
inline float RoundHalfEven(float v) {
  constexpr float kMagic = 12582912.0f;
  return (v + kMagic) - kMagic;
}

// The largest f16 <= x / the smallest f16 >= x, for finite |x| <= 65504 (what vcvtps2ph does
// with round-down / round-up).
inline uint16_t F16RoundDown(float x) {
  uint16_t h = Fp32ToFp16(x);
  if (Fp16ToFp32(h) > x) h = (h == 0x0000) ? 0x8001 : ((h & 0x8000) ? h + 1 : h - 1);
  return h;
}
inline uint16_t F16RoundUp(float x) {
  uint16_t h = Fp32ToFp16(x);
  if (Fp16ToFp32(h) < x) h = ((h & 0x7fff) == 0) ? 0x0001 : ((h & 0x8000) ? h - 1 : h + 1);
  return h;
}

// min(max(v, lo), hi), sending NaN to lo, so the integer conversion after it is always defined
// (out-of-range inputs make the encoder fail, but it must not hit UB on the way).
inline float ClampCode(float v, float lo, float hi) { return v >= lo ? (v <= hi ? v : hi) : lo; }

struct Int8Scale {
  uint16_t bits;  // f16 scale as stored
  float inv;      // 1 / scale, or 0 when the scale is 0
};

// scale = f16_round_up(amax / 127): rounding up keeps every |x| * inv <= 127 (up to the
// reciprocal's rounding, which the clamp absorbs).
inline Int8Scale Int8ScaleFor(float amax) {
  const uint16_t bits = F16RoundUp(amax / 127.0f);
  const float s = Fp16ToFp32(bits);
  return {bits, s > 0.0f ? 1.0f / s : 0.0f};
}

struct Affine4Params {
  uint16_t scale_bits, min_bits;
  float min, inv;  // decoded minimum, 1 / scale (0 when the scale is 0)
};

// m = f16_round_down(lo), s = f16_round_up((hi - m) / 15): the grid m + [0, 15] * s covers
// [lo, hi] with f16 parameters, so codes only clamp by reciprocal rounding.
// Adding +0 turns -0 into +0, so the stored minimum does not depend on which zero a min/max
// reduction happened to keep (the fast path reduces in another order).
inline Affine4Params Affine4ParamsFor(float lo, float hi) {
  lo += 0.0f;
  hi += 0.0f;
  Affine4Params p;
  p.min_bits = F16RoundDown(lo);
  p.min = Fp16ToFp32(p.min_bits);
  p.scale_bits = F16RoundUp((hi - p.min) / 15.0f);
  const float s = Fp16ToFp32(p.scale_bits);
  p.inv = s > 0.0f ? 1.0f / s : 0.0f;
  return p;
}

inline uint8_t Affine4Code(float x, const Affine4Params& p) {
  return static_cast<uint8_t>(ClampCode(RoundHalfEven((x - p.min) * p.inv), 0.0f, 15.0f));
}

}  // namespace cachette::cache::codecs
