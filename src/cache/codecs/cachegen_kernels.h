// Inner loops of the cachegen decoder (docs/formats/codecs.md, "cachegen v1"): the rANS runs of
// several planes in lockstep, each run's decode table, and a plane's values from its decoded
// codes, written straight out as f16 or f32. A scalar reference and AVX2 and AVX-512 versions
// picked at run time, as in quant_kernels.h: the same symbols, states and bytes as
// rans::Decoder::DecodeRun; the same f32 operations in the same order (a multiply and an add
// rounded separately, no FMA; the clamps as std::min(std::max(v, -s), s)); round to nearest
// even to f16. So every table writes the same bytes; cachegen_test checks each one against the
// reference decoder on random input.
//
// Thread-safety: the tables are immutable; the functions keep no state.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "cache/codecs/cachegen.h"
#include "cache/codecs/codec.h"
#include "cache/codecs/quant_kernels.h"
#include "cache/codecs/rans.h"

namespace cachette::cache::codecs {

// One plane's codes and per-channel parameters, C = channels, G = ceil(tokens / 16).
struct CacheGenPlaneCodes {
  uint64_t tokens = 0, channels = 0;
  const int8_t* anchor_q = nullptr;  // [G][C]
  // [C][tokens - G]: each channel's deltas in token order, as its rANS run decodes them, and
  // readable 3 bytes past the end (the vector loops load a code as 4 bytes).
  const int8_t* delta_q = nullptr;
  const float* scale = nullptr;    // [C] s, the decoded f16 scale
  const float* step_a = nullptr;   // [C] s / M_a
  const float* step_d = nullptr;   // [C] s / M_d
  const uint8_t* plain = nullptr;  // [C] 1 = plain mode (deltas against 0)
};

struct CacheGenKernels {
  const char* name;  // "scalar", "avx2", "avx512"

  // Writes the plane [tokens][C] to `out` (no alignment needed) as f16 (`f16`) or f32: an
  // anchor token is a = min(max(q * step_a, -s), s); a delta token min(max(r + q * step_d,
  // -s), s) with r = 0 in plain mode, else its group's a.
  void (*reconstruct)(const CacheGenPlaneCodes& plane, bool f16, std::byte* out);

  // rans::DecodeTable::Build, the same entries: one per run, so its cost is the decoder's too.
  void (*build_table)(int lo, int n, const uint16_t* freq, rans::DecodeTable& table);

  // rans::Decoder::DecodeRuns, the same contract: k streams, tables side by side. The vector
  // loops take k = 16 or 8 with stride 1 (the codec's batches); other calls go to the portable
  // loop.
  bool (*decode_runs)(rans::Decoder* const* decs, const rans::DecodeTable* tables, int k, size_t n,
                      int8_t* const* outs, size_t stride);
};

// The scalar reference, always available.
const CacheGenKernels& ScalarCacheGenKernels();
// The AVX2 (+F16C, no FMA) table, or nullptr if this CPU lacks AVX2 or F16C.
const CacheGenKernels* Avx2CacheGenKernels();
// The AVX-512 (F+BW+VL) table, or nullptr if this CPU lacks it.
const CacheGenKernels* Avx512CacheGenKernels();
// The tables without the CPU check (their ISA files; call the checked functions above).
const CacheGenKernels& Avx2CacheGenKernelsTable();
const CacheGenKernels& Avx512CacheGenKernelsTable();

// cachegen whose decoder runs on `kernels`, or, with nullptr, the reference decoder: one plane
// and one rANS run at a time, f32 values, then `quant`'s f16 conversion.
// For tests, which compare the two; MakeCacheGenCodec picks the table of `quant`'s ISA.
std::unique_ptr<Codec> MakeCacheGenCodecWith(CacheGenLevel level, const QuantKernels& quant,
                                             const CacheGenKernels* kernels);

}  // namespace cachette::cache::codecs
