// Scalar reference of the lossy codec loops (quant_kernels.h). Plain, obviously-correct code:
// the AVX2 and AVX-512 tables must match it bit for bit.
#include <cpuid.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cache/codecs/quant_kernels.h"
#include "cache/codecs/quant_scalar_ops.h"

namespace cachette::cache::codecs {
namespace {

void F16ToF32(const std::byte* src, float* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = Fp16ToFp32(LoadU16(src + 2 * i));
}

void F32ToF16(const float* src, std::byte* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) StoreU16(dst + 2 * i, Fp32ToFp16(src[i]));
}

bool Int8Encode(const float* x, size_t n_vec, size_t dim, std::byte* scales, int8_t* codes) {
  bool in_range = true;
  for (size_t v = 0; v < n_vec; ++v) {
    const float* xv = x + v * dim;
    float amax = 0.0f;
    for (size_t i = 0; i < dim; ++i) {
      const float a = std::fabs(xv[i]);
      in_range &= a <= kF16Max;  // false for NaN too
      amax = std::max(amax, a);
    }
    const Int8Scale sc = Int8ScaleFor(amax);
    StoreU16(scales + 2 * v, sc.bits);
    for (size_t i = 0; i < dim; ++i) {
      const float q = ClampCode(RoundHalfEven(xv[i] * sc.inv), -127.0f, 127.0f);
      codes[v * dim + i] = static_cast<int8_t>(q);
    }
  }
  return in_range;
}

void Int8Decode(const std::byte* scales, const int8_t* codes, size_t n_vec, size_t dim,
                float* out) {
  for (size_t v = 0; v < n_vec; ++v) {
    const float s = Fp16ToFp32(LoadU16(scales + 2 * v));
    for (size_t i = 0; i < dim; ++i) out[v * dim + i] = static_cast<float>(codes[v * dim + i]) * s;
  }
}

// Packs q[0..n) (n even, each < 16) two per byte, even index in the low nibble.
void PackNibbles(const uint8_t* q, size_t n, uint8_t* out) {
  for (size_t i = 0; i < n; i += 2) out[i / 2] = static_cast<uint8_t>(q[i] | (q[i + 1] << 4));
}

uint8_t Nibble(const uint8_t* codes, size_t i) {
  return (i & 1) ? static_cast<uint8_t>(codes[i / 2] >> 4) : (codes[i / 2] & 0xF);
}

bool Affine4RowsEncode(const float* x, size_t n_rows, size_t dim, size_t group,
                       std::byte* scales, std::byte* mins, uint8_t* codes) {
  const size_t n_groups = (dim + group - 1) / group;
  std::vector<uint8_t> q(dim);
  bool in_range = true;
  for (size_t r = 0; r < n_rows; ++r) {
    const float* xr = x + r * dim;
    for (size_t g = 0; g < n_groups; ++g) {
      const size_t begin = g * group, end = std::min(dim, begin + group);
      float lo = xr[begin], hi = xr[begin];
      for (size_t i = begin; i < end; ++i) {
        in_range &= std::fabs(xr[i]) <= kF16Max;
        lo = std::min(lo, xr[i]);
        hi = std::max(hi, xr[i]);
      }
      const Affine4Params p = Affine4ParamsFor(lo, hi);
      StoreU16(scales + 2 * (r * n_groups + g), p.scale_bits);
      StoreU16(mins + 2 * (r * n_groups + g), p.min_bits);
      for (size_t i = begin; i < end; ++i) q[i] = Affine4Code(xr[i], p);
    }
    PackNibbles(q.data(), dim, codes + r * (dim / 2));
  }
  return in_range;
}

void Affine4RowsDecode(const std::byte* scales, const std::byte* mins, const uint8_t* codes,
                       size_t n_rows, size_t dim, size_t group, float* out) {
  const size_t n_groups = (dim + group - 1) / group;
  for (size_t r = 0; r < n_rows; ++r) {
    const uint8_t* cr = codes + r * (dim / 2);
    for (size_t i = 0; i < dim; ++i) {
      const size_t g = r * n_groups + i / group;
      const float s = Fp16ToFp32(LoadU16(scales + 2 * g));
      const float m = Fp16ToFp32(LoadU16(mins + 2 * g));
      out[r * dim + i] = m + static_cast<float>(Nibble(cr, i)) * s;
    }
  }
}

bool Affine4ColsEncode(const float* x, size_t n_rows, size_t n_cols, std::byte* scales,
                       std::byte* mins, uint8_t* codes) {
  std::vector<Affine4Params> params(n_cols);
  bool in_range = true;
  for (size_t c = 0; c < n_cols; ++c) {
    float lo = x[c], hi = x[c];
    for (size_t r = 0; r < n_rows; ++r) {
      const float v = x[r * n_cols + c];
      in_range &= std::fabs(v) <= kF16Max;
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
    params[c] = Affine4ParamsFor(lo, hi);
    StoreU16(scales + 2 * c, params[c].scale_bits);
    StoreU16(mins + 2 * c, params[c].min_bits);
  }
  std::vector<uint8_t> q(n_cols);
  for (size_t r = 0; r < n_rows; ++r) {
    for (size_t c = 0; c < n_cols; ++c) q[c] = Affine4Code(x[r * n_cols + c], params[c]);
    PackNibbles(q.data(), n_cols, codes + r * (n_cols / 2));
  }
  return in_range;
}

void Affine4ColsDecode(const std::byte* scales, const std::byte* mins, const uint8_t* codes,
                       size_t n_rows, size_t n_cols, float* out) {
  for (size_t r = 0; r < n_rows; ++r) {
    for (size_t c = 0; c < n_cols; ++c) {
      const float s = Fp16ToFp32(LoadU16(scales + 2 * c));
      const float m = Fp16ToFp32(LoadU16(mins + 2 * c));
      out[r * n_cols + c] = m + static_cast<float>(Nibble(codes + r * (n_cols / 2), c)) * s;
    }
  }
}

}  // namespace

const QuantKernels& ScalarQuantKernels() {
  static const QuantKernels k = {
      "scalar",          F16ToF32,          F32ToF16,          Int8Encode,
      Int8Decode,        Affine4RowsEncode, Affine4RowsDecode, Affine4ColsEncode,
      Affine4ColsDecode,
  };
  return k;
}

const QuantKernels* Avx2QuantKernels() {
  static const bool supported = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    // CPUID leaf 1, ECX bit 29: F16C. AVX2 (with the OS saving the YMM state) from the compiler.
    const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & (1u << 29)) != 0;
    return f16c && __builtin_cpu_supports("avx2");
  }();
  return supported ? &Avx2QuantKernelsTable() : nullptr;
}

const QuantKernels& BestQuantKernels() {
  static const QuantKernels& best = [&]() -> const QuantKernels& {
    if (const QuantKernels* avx512 = Avx512QuantKernels()) return *avx512;
    if (const QuantKernels* avx2 = Avx2QuantKernels()) return *avx2;
    return ScalarQuantKernels();
  }();
  return best;
}

}  // namespace cachette::cache::codecs
