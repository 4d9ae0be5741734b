// Scalar reference of the cachegen decoder's inner loops (cachegen_kernels.h): the values of a
// plane here, the table build and the lockstep rANS loop rans.h's portable ones. Plain code in
// the spec's order: the AVX2 and AVX-512 tables must match it bit for bit. Also the run-time
// checks that hand out the fast tables.
#include <cpuid.h>

#include <algorithm>
#include <cstring>

#include "cache/codecs/cachegen_kernels.h"
#include "cache/codecs/quant_scalar_ops.h"
#include "core/fp16.h"

namespace cachette::cache::codecs {
namespace {

constexpr uint64_t kG = kCacheGenGroupTokens;

// n values of a row into out (f16 or f32).
void StoreRow(const float* v, uint64_t n, bool f16, std::byte* out) {
  if (f16) {
    for (uint64_t i = 0; i < n; ++i) StoreU16(out + 2 * i, Fp32ToFp16(v[i]));
  } else {
    std::memcpy(out, v, 4 * n);
  }
}

// Per group and block of up to 64 channels: the anchors, which are the block's first row and
// (outside plain mode) its deltas' reference, then the group's delta tokens.
void Reconstruct(const CacheGenPlaneCodes& p, bool f16, std::byte* out) {
  constexpr uint64_t kBlock = 64;
  const uint64_t C = p.channels;
  const uint64_t elem_bytes = f16 ? 2 : 4;
  const uint64_t groups = (p.tokens + kG - 1) / kG;
  const uint64_t deltas = p.tokens - groups;
  float ref[kBlock], row[kBlock];
  for (uint64_t g = 0; g < groups; ++g) {
    const uint64_t t0 = g * kG, t_end = std::min(t0 + kG, p.tokens);
    for (uint64_t c0 = 0; c0 < C; c0 += kBlock) {
      const uint64_t n = std::min(kBlock, C - c0);
      const float* scale = p.scale + c0;
      for (uint64_t i = 0; i < n; ++i) {
        row[i] =
            std::min(std::max(p.anchor_q[g * C + c0 + i] * p.step_a[c0 + i], -scale[i]), scale[i]);
        ref[i] = p.plain[c0 + i] ? 0.0f : row[i];
      }
      StoreRow(row, n, f16, out + (t0 * C + c0) * elem_bytes);
      for (uint64_t t = t0 + 1; t < t_end; ++t) {
        const int8_t* q = p.delta_q + c0 * deltas + g * (kG - 1) + (t - t0 - 1);
        for (uint64_t i = 0; i < n; ++i) {
          const float v = ref[i] + static_cast<float>(q[i * deltas]) * p.step_d[c0 + i];
          row[i] = std::min(std::max(v, -scale[i]), scale[i]);
        }
        StoreRow(row, n, f16, out + (t * C + c0) * elem_bytes);
      }
    }
  }
}

void BuildTable(int lo, int n, const uint16_t* freq, rans::DecodeTable& table) {
  table.Build(lo, n, freq);
}

}  // namespace

const CacheGenKernels& ScalarCacheGenKernels() {
  static const CacheGenKernels k = {"scalar", Reconstruct, BuildTable, rans::Decoder::DecodeRuns};
  return k;
}

const CacheGenKernels* Avx2CacheGenKernels() {
  static const bool supported = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    // CPUID leaf 1, ECX bit 29: F16C. AVX2 (with the OS saving the YMM state) from the compiler.
    const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & (1u << 29)) != 0;
    return f16c && __builtin_cpu_supports("avx2");
  }();
  return supported ? &Avx2CacheGenKernelsTable() : nullptr;
}

const CacheGenKernels* Avx512CacheGenKernels() {
  static const bool supported = __builtin_cpu_supports("avx512f") &&
                                __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512vl");
  return supported ? &Avx512CacheGenKernelsTable() : nullptr;
}

}  // namespace cachette::cache::codecs
