// AVX-512 (F+BW+VL) version of the cachegen decoder's inner loops (cachegen_kernels.h).
// Compiled with AVX-512 flags in its own translation unit and only called after a run-time CPU
// check.
//
// Reconstruct: the plan of cachegen_kernels_avx2.cc with 16 lanes; a last block of fewer than
// 16 channels runs on masked loads, gathers and stores (which touch nothing outside the mask).
//
// DecodeRuns: 16 (or 8) streams in four (or two) vectors of 16 states (lane 4i + s is state s
// of the vector's stream i; a 128-bit lane is a stream), so a pass decodes 16 symbols a vector
// in about the instructions the scalar loop spends on 4, and the vectors' chains (gather,
// multiply, refill) overlap.
//
// BuildTable: rans::DecodeTable::Build with 16-entry stores.
//
// Like quant_kernels_avx512.cc, this file calls no inline function or template from a header.
#include <immintrin.h>

#include <cstring>

#include "cache/codecs/cachegen_kernels.h"

namespace cachette::cache::codecs {
namespace {

constexpr uint64_t kG = kCacheGenGroupTokens;
constexpr int kRoundNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

// 16 (or the masked ones of) int8 codes as f32 lanes, zero outside the mask.
__m512 LoadCodes(const int8_t* src, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, src)));
}

// min(max(v, -s), s) as std::min(std::max(v, -s), s) computes it: maxps(a, b) is a > b ? a : b
// and minps(a, b) is a < b ? a : b, so the operands go in this order.
__m512 Clamp(__m512 v, __m512 s) {
  const __m512 neg =
      _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(s), _mm512_set1_epi32(INT32_MIN)));
  return _mm512_min_ps(s, _mm512_max_ps(neg, v));
}

void StoreRow(__m512 v, bool f16, __mmask16 m, std::byte* out) {
  if (f16) {
    _mm256_mask_storeu_epi16(out, m, _mm512_cvtps_ph(v, kRoundNearest));
  } else {
    _mm512_mask_storeu_ps(out, m, v);
  }
}

// Each set lane's 4 bytes at src[lane * deltas]: 4 consecutive delta tokens of its channel.
__m512i GatherCodes(const int8_t* src, __m512i offsets, __mmask16 m) {
  return _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, offsets, src, 1);
}

// Byte `kByte` of each lane as a signed code in f32.
template <int kByte>
__m512 CodeOf(__m512i w) {
  return _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(w, 24 - 8 * kByte), 24));
}

void Reconstruct(const CacheGenPlaneCodes& p, bool f16, std::byte* out) {
  const uint64_t C = p.channels;
  const uint64_t elem_bytes = f16 ? 2 : 4;
  const uint64_t groups = (p.tokens + kG - 1) / kG;
  const uint64_t deltas = p.tokens - groups;
  // Lane offsets l * deltas must fit in i32 (they do for any real chunk).
  if (deltas > (uint64_t{1} << 27)) return ScalarCacheGenKernels().reconstruct(p, f16, out);
  const __m512i offsets =
      _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                         _mm512_set1_epi32(static_cast<int32_t>(deltas)));
  for (uint64_t g = 0; g < groups; ++g) {
    const uint64_t t0 = g * kG;
    const uint64_t t_end = t0 + kG < p.tokens ? t0 + kG : p.tokens;
    const int8_t* delta_q = p.delta_q + g * (kG - 1);  // the group's first delta token
    for (uint64_t c = 0; c < C; c += 16) {
      const __mmask16 m = C - c < 16 ? static_cast<__mmask16>((1u << (C - c)) - 1) : 0xFFFF;
      const __m512 s = _mm512_maskz_loadu_ps(m, p.scale + c);
      const __m512 step_a = _mm512_maskz_loadu_ps(m, p.step_a + c);
      const __m512 step_d = _mm512_maskz_loadu_ps(m, p.step_d + c);
      const __m128i plain = _mm_maskz_loadu_epi8(m, p.plain + c);
      const __m512 a = Clamp(_mm512_mul_ps(LoadCodes(p.anchor_q + g * C + c, m), step_a), s);
      // r = 0 (+0.0) in plain mode, else the anchor.
      const __m512 r = _mm512_maskz_mov_ps(_mm_testn_epi8_mask(plain, plain), a);
      StoreRow(a, f16, m, out + (t0 * C + c) * elem_bytes);
      auto store_delta = [&](__m512 d, uint64_t t) {
        const __m512 v = _mm512_add_ps(r, _mm512_mul_ps(d, step_d));
        StoreRow(Clamp(v, s), f16, m, out + (t * C + c) * elem_bytes);
      };
      // Four tokens a gather (the word's bytes past the group's end are unused).
      for (uint64_t t = t0 + 1; t < t_end; t += 4) {
        const __m512i w = GatherCodes(delta_q + c * deltas + (t - t0 - 1), offsets, m);
        store_delta(CodeOf<0>(w), t);
        if (t + 1 < t_end) store_delta(CodeOf<1>(w), t + 1);
        if (t + 2 < t_end) store_delta(CodeOf<2>(w), t + 2);
        if (t + 3 < t_end) store_delta(CodeOf<3>(w), t + 3);
      }
    }
  }
}

// ---- rANS ----

constexpr int kTableDwords = sizeof(rans::DecodeTable) / 4;
static_assert(sizeof(rans::DecodeTable) % 4 == 0 && rans::kStates == 4);

// One pass of four streams (one vector): decodes the 16 states' symbols, stores stream i's
// four at out[i] (4 bytes), then refills. `w` holds each stream's next 4 bytes in all four of
// its lanes; state s takes byte (number of states before s in its stream that took one) of it,
// the byte DecodeRun would take. Returns 8 x the bytes stream i took in lane 4i + 3.
__m512i Pass(__m512i& x, __m512i table, const uint32_t* entries, __m512i w, int8_t* const* out) {
  const __m512i slot = _mm512_and_si512(x, _mm512_set1_epi32(rans::kProbScale - 1));
  const __m512i e = _mm512_i32gather_epi32(_mm512_add_epi32(slot, table), entries, 4);
  const __m128i symbols = _mm512_cvtepi32_epi8(e);  // lane 4i + s -> byte 4i + s
  const int32_t s0 = _mm_cvtsi128_si32(symbols), s1 = _mm_extract_epi32(symbols, 1);
  const int32_t s2 = _mm_extract_epi32(symbols, 2), s3 = _mm_extract_epi32(symbols, 3);
  std::memcpy(out[0], &s0, 4);
  std::memcpy(out[1], &s1, 4);
  std::memcpy(out[2], &s2, 4);
  std::memcpy(out[3], &s3, 4);
  // x' = freq * (x >> P) + (slot - start).
  const __m512i freq = _mm512_and_si512(_mm512_srli_epi32(e, 8), _mm512_set1_epi32(0xFFF));
  x = _mm512_add_epi32(_mm512_mullo_epi32(freq, _mm512_srli_epi32(x, rans::kProbBits)),
                       _mm512_srli_epi32(e, 20));
  const __mmask16 take = _mm512_cmplt_epu32_mask(x, _mm512_set1_epi32(rans::kStateLow));
  // 8 per taking state; the sum over the states before each one in its stream (byte shifts
  // stay within 128-bit lanes, that is within a stream).
  const __m512i eight = _mm512_maskz_mov_epi32(take, _mm512_set1_epi32(8));
  const __m512i before = _mm512_add_epi32(
      _mm512_add_epi32(_mm512_bslli_epi128(eight, 4), _mm512_bslli_epi128(eight, 8)),
      _mm512_bslli_epi128(eight, 12));
  const __m512i byte = _mm512_and_si512(_mm512_srlv_epi32(w, before), _mm512_set1_epi32(0xFF));
  x = _mm512_mask_mov_epi32(x, take, _mm512_or_si512(_mm512_slli_epi32(x, 8), byte));
  return _mm512_add_epi32(before, eight);
}

// 4V streams (V vectors), stride 1: whole passes while every stream has 4 bytes left (a pass
// takes at most 4 and reads a word at its pointer), then the portable loop for the rest of the
// run. V = 4 for the codec's batches: the gathers' latency is the limit, and four independent
// vectors keep more of them in flight than two.
template <int V>
bool DecodeRunsOf(rans::Decoder* const* decs, const rans::DecodeTable* tables, size_t n,
                  int8_t* const* outs) {
  constexpr int kStreams = 4 * V;
  static_assert(V % 2 == 0, "pointers go in vectors of 8");
  rans::Decoder::Position pos[kStreams];
  alignas(64) uint32_t x[16 * V];
  alignas(64) const uint8_t* p[kStreams];
  for (int i = 0; i < kStreams; ++i) {
    pos[i] = decs[i]->position();
    std::memcpy(x + 4 * i, pos[i].x, 16);
    p[i] = pos[i].p;
  }
  const __m512i stream_of_lane = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  __m512i xv[V], table[V];
  for (int v = 0; v < V; ++v) {
    xv[v] = _mm512_load_si512(x + 16 * v);
    table[v] = _mm512_mullo_epi32(_mm512_add_epi32(stream_of_lane, _mm512_set1_epi32(4 * v)),
                                  _mm512_set1_epi32(kTableDwords));
  }
  // Words 0-3 (or 4-7) of a gather of 8 over their streams' lanes.
  const __m512i spread[2] = {stream_of_lane,
                             _mm512_add_epi32(stream_of_lane, _mm512_set1_epi32(4))};
  // Top dword of each stream's 128-bit lane (a: 3, 7, 11, 15; b: the same + 16) into the high
  // half of qword i, so a shift right by 35 leaves bytes taken by stream i.
  const __m512i taken_index =
      _mm512_setr_epi32(0, 3, 0, 7, 0, 11, 0, 15, 0, 19, 0, 23, 0, 27, 0, 31);
  const uint32_t* entries = tables[0].entry;
  int8_t* o[kStreams];
  for (int i = 0; i < kStreams; ++i) o[i] = outs[i];
  __m512i pv[V / 2];
  for (int h = 0; h < V / 2; ++h) pv[h] = _mm512_load_si512(p + 8 * h);
  size_t j = 0;
  while (n - j >= 4) {
    for (int h = 0; h < V / 2; ++h) _mm512_store_si512(p + 8 * h, pv[h]);
    size_t passes = (n - j) / 4;
    for (int i = 0; i < kStreams; ++i) {
      const size_t left = static_cast<size_t>(pos[i].end - p[i]) / 4;
      passes = left < passes ? left : passes;
    }
    if (passes == 0) break;
    for (size_t pass = 0; pass < passes; ++pass) {
      for (int h = 0; h < V / 2; ++h) {
        // Each stream's next 4 bytes (one gather of 8 pointers), spread over its 4 lanes.
        const __m512i words = _mm512_castsi256_si512(_mm512_i64gather_epi32(pv[h], nullptr, 1));
        const __m512i ta = Pass(xv[2 * h], table[2 * h], entries,
                                _mm512_permutexvar_epi32(spread[0], words), o + 8 * h);
        const __m512i tb = Pass(xv[2 * h + 1], table[2 * h + 1], entries,
                                _mm512_permutexvar_epi32(spread[1], words), o + 8 * h + 4);
        pv[h] = _mm512_add_epi64(
            pv[h], _mm512_srli_epi64(_mm512_permutex2var_epi32(ta, taken_index, tb), 35));
      }
      for (int i = 0; i < kStreams; ++i) o[i] += 4;
    }
    j += 4 * passes;
  }
  for (int h = 0; h < V / 2; ++h) _mm512_store_si512(p + 8 * h, pv[h]);
  for (int v = 0; v < V; ++v) _mm512_store_si512(x + 16 * v, xv[v]);
  for (int i = 0; i < kStreams; ++i) {
    std::memcpy(pos[i].x, x + 4 * i, 16);
    pos[i].p = p[i];
    decs[i]->set_position(pos[i]);
  }
  return j == n || rans::Decoder::DecodeRuns(decs, tables, kStreams, n - j, o, 1);
}

bool DecodeRuns(rans::Decoder* const* decs, const rans::DecodeTable* tables, int k, size_t n,
                int8_t* const* outs, size_t stride) {
  if (stride == 1 && k == 16) return DecodeRunsOf<4>(decs, tables, n, outs);
  if (stride == 1 && k == 8) return DecodeRunsOf<2>(decs, tables, n, outs);
  return rans::Decoder::DecodeRuns(decs, tables, k, n, outs, stride);
}

// rans::DecodeTable::Build in blocks of 16 entries (one store): symbol | freq << 8 |
// (slot - start) << 20.
void BuildTable(int lo, int n, const uint16_t* freq, rans::DecodeTable& table) {
  constexpr uint32_t kBlock = rans::DecodeTable::kFillBlock;
  static_assert(kBlock == 16);
  const __m512i iota = _mm512_slli_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), 20);
  table.single = false;
  uint32_t at = 0;
  for (int i = 0; i < n; ++i) {
    const uint32_t f = freq[i];
    if (f > rans::kProbScale - at) break;  // not from NormalizeCounts; stay inside the table
    __m512i v = _mm512_or_si512(
        _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint8_t>(lo + i) | f << 8)), iota);
    // The first block unconditionally, so that the loop (whose varying trip count the branch
    // predictor misses) runs only for the few symbols of more than 16 slots. A symbol of
    // frequency 0 thus writes one block, which the next symbol overwrites (or the padding
    // takes).
    uint32_t* e = table.entry + at;
    _mm512_storeu_si512(e, v);
    for (uint32_t k = kBlock; k < f; k += kBlock) {
      v = _mm512_add_epi32(v, _mm512_set1_epi32(kBlock << 20));
      _mm512_storeu_si512(e + k, v);
    }
    at += f;
    if (f == rans::kProbScale) {
      table.single = true;
      table.single_symbol = lo + i;
    }
  }
}

}  // namespace

const CacheGenKernels& Avx512CacheGenKernelsTable() {
  static const CacheGenKernels k = {"avx512", Reconstruct, BuildTable, DecodeRuns};
  return k;
}

}  // namespace cachette::cache::codecs
