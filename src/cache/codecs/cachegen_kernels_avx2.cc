// AVX2 + F16C version of the cachegen decoder's inner loops (cachegen_kernels.h). Compiled with
// -mavx2 -mf16c in its own translation unit and only called after a run-time CPU check. No
// FMA: the scalar reference multiplies and adds in two roundings.
//
// Reconstruct: per group of 16 tokens and 8 channels, the anchors once, kept in a register as
// the deltas' reference, then the group's delta tokens. Codes are channel-major (8 channels'
// codes of one token lie `deltas` bytes apart), so one gather of 8 words brings 4 tokens' codes
// of each channel. A last block of fewer than 8 channels runs the same arithmetic on zero-padded
// lanes and stores only its own.
//
// BuildTable: rans::DecodeTable::Build with 8-entry stores.
//
// DecodeRuns: the plan of cachegen_kernels_avx512.cc (read that first) on four vectors of two
// streams each (lane 4i + s is state s of the vector's stream i; a 128-bit lane is a stream).
//
// Like quant_kernels_avx2.cc, this file calls no inline function or template from a header
// (the linker could keep this file's AVX2 copy of one and run it on a CPU without AVX2).
#include <immintrin.h>

#include <cstring>

#include "cache/codecs/cachegen_kernels.h"

namespace cachette::cache::codecs {
namespace {

constexpr uint64_t kG = kCacheGenGroupTokens;

// Lanes [0, n) set, n in [0, 8]: a window into {-1 x 8, 0 x 8}.
__m256i FirstLanes(uint64_t n) {
  alignas(32) static const int32_t kWindow[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                                  0,  0,  0,  0,  0,  0,  0,  0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kWindow + 8 - n));
}

// n (<= 8) bytes as 8 i32 lanes, zero past n.
__m256i LoadBytes(const void* src, uint64_t n) {
  int64_t w = 0;
  std::memcpy(&w, src, n);
  return _mm256_cvtepi8_epi32(_mm_cvtsi64_si128(w));
}

// min(max(v, -s), s) as std::min(std::max(v, -s), s) computes it: maxps(a, b) is a > b ? a : b
// and minps(a, b) is a < b ? a : b, so the operands go in this order.
__m256 Clamp(__m256 v, __m256 s) {
  const __m256 neg = _mm256_xor_ps(s, _mm256_set1_ps(-0.0f));
  return _mm256_min_ps(s, _mm256_max_ps(neg, v));
}

void StoreRow(__m256 v, bool f16, uint64_t n, __m256i lanes, std::byte* out) {
  if (f16) {
    const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    if (n == 8) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out), h);
    } else {
      alignas(16) std::byte tmp[16];
      _mm_store_si128(reinterpret_cast<__m128i*>(tmp), h);
      std::memcpy(out, tmp, 2 * n);
    }
  } else if (n == 8) {
    _mm256_storeu_ps(reinterpret_cast<float*>(out), v);
  } else {
    _mm256_maskstore_ps(reinterpret_cast<float*>(out), lanes, v);
  }
}

// Each set lane's 4 bytes at src[lane * deltas]: 4 consecutive delta tokens of its channel.
__m256i GatherCodes(const int8_t* src, __m256i offsets, __m256i lanes) {
  return _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), reinterpret_cast<const int*>(src),
                                     offsets, lanes, 1);
}

// Byte `kByte` of each lane as a signed code in f32.
template <int kByte>
__m256 CodeOf(__m256i w) {
  return _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(w, 24 - 8 * kByte), 24));
}

void Reconstruct(const CacheGenPlaneCodes& p, bool f16, std::byte* out) {
  const uint64_t C = p.channels;
  const uint64_t elem_bytes = f16 ? 2 : 4;
  const uint64_t groups = (p.tokens + kG - 1) / kG;
  const uint64_t deltas = p.tokens - groups;
  // Lane offsets l * deltas must fit in i32 (they do for any real chunk).
  if (deltas > (uint64_t{1} << 27)) return ScalarCacheGenKernels().reconstruct(p, f16, out);
  const __m256i offsets = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                             _mm256_set1_epi32(static_cast<int32_t>(deltas)));
  for (uint64_t g = 0; g < groups; ++g) {
    const uint64_t t0 = g * kG;
    const uint64_t t_end = t0 + kG < p.tokens ? t0 + kG : p.tokens;
    const int8_t* delta_q = p.delta_q + g * (kG - 1);  // the group's first delta token
    for (uint64_t c = 0; c < C; c += 8) {
      const uint64_t n = C - c < 8 ? C - c : 8;
      const __m256i lanes = FirstLanes(n);
      const __m256 s = _mm256_maskload_ps(p.scale + c, lanes);
      const __m256 step_a = _mm256_maskload_ps(p.step_a + c, lanes);
      const __m256 step_d = _mm256_maskload_ps(p.step_d + c, lanes);
      const __m256i plain = LoadBytes(p.plain + c, n);
      const __m256 q = _mm256_cvtepi32_ps(LoadBytes(p.anchor_q + g * C + c, n));
      const __m256 a = Clamp(_mm256_mul_ps(q, step_a), s);
      // r = 0 (+0.0) in plain mode, else the anchor.
      const __m256 r = _mm256_andnot_ps(
          _mm256_castsi256_ps(_mm256_cmpgt_epi32(plain, _mm256_setzero_si256())), a);
      StoreRow(a, f16, n, lanes, out + (t0 * C + c) * elem_bytes);
      auto store_delta = [&](__m256 d, uint64_t t) {
        const __m256 v = _mm256_add_ps(r, _mm256_mul_ps(d, step_d));
        StoreRow(Clamp(v, s), f16, n, lanes, out + (t * C + c) * elem_bytes);
      };
      // Four tokens a gather (the word's bytes past the group's end are unused).
      for (uint64_t t = t0 + 1; t < t_end; t += 4) {
        const __m256i w = GatherCodes(delta_q + c * deltas + (t - t0 - 1), offsets, lanes);
        store_delta(CodeOf<0>(w), t);
        if (t + 1 < t_end) store_delta(CodeOf<1>(w), t + 1);
        if (t + 2 < t_end) store_delta(CodeOf<2>(w), t + 2);
        if (t + 3 < t_end) store_delta(CodeOf<3>(w), t + 3);
      }
    }
  }
}

// rans::DecodeTable::Build in blocks of 16 entries (two stores): symbol | freq << 8 |
// (slot - start) << 20.
void BuildTable(int lo, int n, const uint16_t* freq, rans::DecodeTable& table) {
  constexpr uint32_t kBlock = rans::DecodeTable::kFillBlock;
  static_assert(kBlock == 16);
  const __m256i iota = _mm256_slli_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), 20);
  table.single = false;
  uint32_t at = 0;
  for (int i = 0; i < n; ++i) {
    const uint32_t f = freq[i];
    if (f > rans::kProbScale - at) break;  // not from NormalizeCounts; stay inside the table
    __m256i v = _mm256_or_si256(
        _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint8_t>(lo + i) | f << 8)), iota);
    // The first block unconditionally, as in cachegen_kernels_avx512.cc (a frequency of 0
    // writes a block the next symbol overwrites, or the padding takes).
    uint32_t* e = table.entry + at;
    for (uint32_t k = 0;; k += kBlock) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(e + k), v);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(e + k + 8),
                          _mm256_add_epi32(v, _mm256_set1_epi32(8 << 20)));
      if (k + kBlock >= f) break;
      v = _mm256_add_epi32(v, _mm256_set1_epi32(kBlock << 20));
    }
    at += f;
    if (f == rans::kProbScale) {
      table.single = true;
      table.single_symbol = lo + i;
    }
  }
}

// ---- rANS ----

constexpr int kStreams = 8;  // four vectors of two streams
constexpr int kTableDwords = sizeof(rans::DecodeTable) / 4;
static_assert(sizeof(rans::DecodeTable) % 4 == 0 && rans::kStates == 4);

// One pass of two streams (one vector), as Pass in cachegen_kernels_avx512.cc: decodes the 8
// states' symbols, stores stream i's four at out[i], refills from `w` (each stream's next 4
// bytes in its four lanes). Returns 8 x the bytes stream i took in lane 4i + 3.
__m256i Pass(__m256i& x, __m256i table, const uint32_t* entries, __m256i w, int8_t* const* out) {
  const __m256i slot = _mm256_and_si256(x, _mm256_set1_epi32(rans::kProbScale - 1));
  const __m256i e = _mm256_i32gather_epi32(reinterpret_cast<const int*>(entries),
                                           _mm256_add_epi32(slot, table), 4);
  // Each lane's low byte, gathered into the low dword of its 128-bit lane.
  const __m256i symbols = _mm256_shuffle_epi8(
      e, _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12,
                          -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1));
  const int32_t s0 = _mm_cvtsi128_si32(_mm256_castsi256_si128(symbols));
  const int32_t s1 = _mm_cvtsi128_si32(_mm256_extracti128_si256(symbols, 1));
  std::memcpy(out[0], &s0, 4);
  std::memcpy(out[1], &s1, 4);
  // x' = freq * (x >> P) + (slot - start).
  const __m256i freq = _mm256_and_si256(_mm256_srli_epi32(e, 8), _mm256_set1_epi32(0xFFF));
  x = _mm256_add_epi32(_mm256_mullo_epi32(freq, _mm256_srli_epi32(x, rans::kProbBits)),
                       _mm256_srli_epi32(e, 20));
  // States are below 2^31, so a signed compare is x < L.
  const __m256i take = _mm256_cmpgt_epi32(_mm256_set1_epi32(rans::kStateLow), x);
  const __m256i eight = _mm256_and_si256(take, _mm256_set1_epi32(8));
  const __m256i before =
      _mm256_add_epi32(_mm256_add_epi32(_mm256_slli_si256(eight, 4), _mm256_slli_si256(eight, 8)),
                       _mm256_slli_si256(eight, 12));
  const __m256i byte = _mm256_and_si256(_mm256_srlv_epi32(w, before), _mm256_set1_epi32(0xFF));
  x = _mm256_blendv_epi8(x, _mm256_or_si256(_mm256_slli_epi32(x, 8), byte), take);
  return _mm256_add_epi32(before, eight);
}

// Bytes taken by the four streams of vectors a and b (8 x each in lanes 3 and 7) as 4 qwords.
__m256i Taken(__m256i a, __m256i b) {
  // Into the high dword of qwords 0, 1 (from a) and 2, 3 (from b); a shift by 32 + 3 then
  // leaves the byte counts.
  const __m256i pa = _mm256_permutevar8x32_epi32(a, _mm256_setr_epi32(0, 3, 0, 7, 0, 0, 0, 0));
  const __m256i pb = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 0, 0, 0, 0, 3, 0, 7));
  return _mm256_srli_epi64(_mm256_blend_epi32(pa, pb, 0xF0), 35);
}

// Eight streams, stride 1: whole passes while every stream has 4 bytes left (a pass takes at
// most 4 and reads a word at its pointer), then the portable loop for the rest of the run.
bool DecodeRuns8(rans::Decoder* const* decs, const rans::DecodeTable* tables, size_t n,
                 int8_t* const* outs) {
  rans::Decoder::Position pos[kStreams];
  alignas(32) uint32_t x[4 * 8];
  alignas(32) const uint8_t* p[kStreams];
  for (int i = 0; i < kStreams; ++i) {
    pos[i] = decs[i]->position();
    std::memcpy(x + 4 * i, pos[i].x, 16);
    p[i] = pos[i].p;
  }
  __m256i xv[4];
  __m256i table[4];
  const __m256i stream_of_lane = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  for (int v = 0; v < 4; ++v) {
    xv[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(x + 8 * v));
    table[v] = _mm256_mullo_epi32(_mm256_add_epi32(stream_of_lane, _mm256_set1_epi32(2 * v)),
                                  _mm256_set1_epi32(kTableDwords));
  }
  const __m256i spread_lo = stream_of_lane;  // words 0, 1 (or 4, 5) over their lanes
  const __m256i spread_hi = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3);
  const uint32_t* entries = tables[0].entry;
  int8_t* o[kStreams];
  for (int i = 0; i < kStreams; ++i) o[i] = outs[i];
  __m256i pv0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(p));
  __m256i pv1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(p + 4));
  size_t j = 0;
  while (n - j >= 4) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(p), pv0);
    _mm256_store_si256(reinterpret_cast<__m256i*>(p + 4), pv1);
    size_t passes = (n - j) / 4;
    for (int i = 0; i < kStreams; ++i) {
      const size_t left = static_cast<size_t>(pos[i].end - p[i]) / 4;
      passes = left < passes ? left : passes;
    }
    if (passes == 0) break;
    for (size_t pass = 0; pass < passes; ++pass) {
      // Each stream's next 4 bytes (two gathers of 4 pointers), spread over its 4 lanes.
      const __m256i w0 = _mm256_castsi128_si256(_mm256_i64gather_epi32(nullptr, pv0, 1));
      const __m256i w1 = _mm256_castsi128_si256(_mm256_i64gather_epi32(nullptr, pv1, 1));
      const __m256i t0 =
          Pass(xv[0], table[0], entries, _mm256_permutevar8x32_epi32(w0, spread_lo), o);
      const __m256i t1 =
          Pass(xv[1], table[1], entries, _mm256_permutevar8x32_epi32(w0, spread_hi), o + 2);
      const __m256i t2 =
          Pass(xv[2], table[2], entries, _mm256_permutevar8x32_epi32(w1, spread_lo), o + 4);
      const __m256i t3 =
          Pass(xv[3], table[3], entries, _mm256_permutevar8x32_epi32(w1, spread_hi), o + 6);
      pv0 = _mm256_add_epi64(pv0, Taken(t0, t1));
      pv1 = _mm256_add_epi64(pv1, Taken(t2, t3));
      for (int i = 0; i < kStreams; ++i) o[i] += 4;
    }
    j += 4 * passes;
  }
  _mm256_store_si256(reinterpret_cast<__m256i*>(p), pv0);
  _mm256_store_si256(reinterpret_cast<__m256i*>(p + 4), pv1);
  for (int v = 0; v < 4; ++v) _mm256_store_si256(reinterpret_cast<__m256i*>(x + 8 * v), xv[v]);
  for (int i = 0; i < kStreams; ++i) {
    std::memcpy(pos[i].x, x + 4 * i, 16);
    pos[i].p = p[i];
    decs[i]->set_position(pos[i]);
  }
  return j == n || rans::Decoder::DecodeRuns(decs, tables, kStreams, n - j, o, 1);
}

// Batches of 16 streams as two of 8: sixteen 8-lane states would not fit AVX2's 16 registers.
bool DecodeRuns(rans::Decoder* const* decs, const rans::DecodeTable* tables, int k, size_t n,
                int8_t* const* outs, size_t stride) {
  if (stride == 1 && k == 2 * kStreams) {
    return DecodeRuns8(decs, tables, n, outs) &&
           DecodeRuns8(decs + kStreams, tables + kStreams, n, outs + kStreams);
  }
  if (stride == 1 && k == kStreams) return DecodeRuns8(decs, tables, n, outs);
  return rans::Decoder::DecodeRuns(decs, tables, k, n, outs, stride);
}

}  // namespace

const CacheGenKernels& Avx2CacheGenKernelsTable() {
  static const CacheGenKernels k = {"avx2", Reconstruct, BuildTable, DecodeRuns};
  return k;
}

}  // namespace cachette::cache::codecs
