// Internal seam between the dispatching front end (kernels.cc) and the per-ISA translation
// units (kernels_scalar.cc, kernels_avx2.cc, kernels_avx512.cc).
//
// Each ISA TU exports one function returning a table of plain function pointers. Nothing in
// this header is inline or a template on purpose: an ISA TU is compiled with -mavx512*, and an
// inline function or template instantiated there could be merged by the linker with the
// baseline copy, putting AVX-512 code on the path of a CPU without it. ISA TUs keep their
// helpers in anonymous namespaces for the same reason.
//
// Batch invariance: at one ISA level, matmul_rows computes each output y[t][r] by one fixed
// sequence of float operations, whatever m, the tile, the row range it is handed or a
// repacking; docs/kernels.md writes down that order per weight type and level, and every new
// kernel must follow it (kernels_test checks it bit for bit).
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/kernels.h"

namespace cachette::kernels::internal {

// Activations quantized for the integer dot products of kQ8_0 / kQ4_0 weights, one call's
// worth, in one buffer (all ISAs produce the same bytes, see QuantizeActRows):
//   q   [m][cols]  int8, per block of 32: q = nearbyint(x * 127 / amax)
//   d   [m][nb]    float, amax / 127 (the block's scale; 0 for an all-zero block)
//   sum [m][nb]    int32, sum of the block's q (for the unsigned-weight offset correction)
// nb = cols / 32. The float scale (not f16 as in ggml) keeps one rounding step out.
struct ActQ8 {
  int8_t* q = nullptr;
  float* d = nullptr;
  int32_t* sum = nullptr;
  int64_t m = 0;
  int64_t cols = 0;
};
size_t ActQ8Bytes(int64_t m, int64_t cols);
ActQ8 ActQ8View(void* buf, int64_t m, int64_t cols);

// Everything one MatMul call needs, shared read-only by all threads.
struct MatMulArgs {
  const float* x = nullptr;  // [m][cols]
  ActQ8 act;                 // valid for quantized weight types
  int64_t m = 0;
  const WeightMatrix* w = nullptr;
  float* y = nullptr;  // [m][rows]
};

// One attend_block call: nq consecutive queries, each against keys [begin, ends[i]), for the
// `group` query heads of each of the KV heads [kvh, kvh + n_kvh). Query i's heads of KV head
// kvh + k ([group][head_dim]) are at q + k * q_kvh_stride + i * q_stride, and their state
// (Ops::attend_block) at state + k * state_kvh_stride + i * state_stride.
struct AttendJob {
  const float* q = nullptr;
  int nq = 0;
  int64_t q_stride = 0;
  int64_t q_kvh_stride = 0;
  int group = 0;
  int kvh = 0;
  int n_kvh = 1;
  int64_t begin = 0;
  const int64_t* ends = nullptr;
  float scale = 0;
  float* state = nullptr;
  size_t state_stride = 0;
  size_t state_kvh_stride = 0;

  // The state of query i and KV head kvh + k.
  float* State(int k, int i) const { return state + k * state_kvh_stride + i * state_stride; }
};

// An aggregate without member initializers on purpose: a non-trivial constructor would be an
// inline function emitted by every TU that builds a table, ISA TUs included. Build with Ops{}.
struct Ops {
  Isa isa;
  // Quantizes tokens [t0, t1) of x into a (bit-identical across ISAs).
  void (*quantize_act)(const float* x, int64_t t0, int64_t t1, const ActQ8& a);
  // y[0:m][r0:r1] for the call described by a. Called concurrently on disjoint row ranges.
  void (*matmul_rows)(const MatMulArgs& a, int64_t r0, int64_t r1);
  // Row ranges handed to matmul_rows are multiples of this (except the last).
  int64_t (*row_grain)(WType t, int64_t m);

  void (*dequantize_row)(const WeightMatrix& w, int64_t row, float* out);
  void (*rms_norm)(const float* x, const float* weight, float* y, int64_t rows, int64_t dim,
                   float eps);
  void (*softmax)(float* x, int64_t n);
  void (*swiglu)(const float* gate, const float* up, float* out, int64_t n);
  void (*add)(const float* x, float* y, int64_t n);
  // Attention inner loops over one stored head vector (KvHeadBytes(t, head_dim) bytes).
  float (*kv_dot)(const float* q, const void* k, int head_dim, KvType t);
  void (*kv_axpy)(float a, const void* v, int head_dim, KvType t, float* acc);
  // Attention for nq query positions, each against keys [begin, ends[i]), for the `group`
  // heads of each that share a KV head, for each of the KV heads [kvh, kvh + n_kvh)
  // (AttendJob); the online-softmax state of each (query, KV head) (docs/kernels.md,
  // "Attention"):
  //   m[g]            max_j s_j, s_j = scale * q_g . k_j  (-inf for an empty range)
  //   l[g]            sum_j exp(s_j - m[g])
  //   acc[g][hd]      sum_j exp(s_j - m[g]) v_j           (unnormalized)
  // laid out as { m[group], l[group], acc[group][head_dim] }. Keys are visited in tiles of
  // kAttnTile slots aligned to multiples of kAttnTile, each K and V vector loaded and converted
  // once per tile for all heads (and, at the vector levels, for all nq queries); the vector
  // levels visit the KV heads in turn within each tile, so that a thread reads each slot's
  // record of KV heads whole. A head's state is one fixed sequence of float operations given
  // (q, the keys, begin, its end): the same whatever the group's other heads, the other
  // queries or KV heads of the call (nq = n_kvh = 1 included) or the thread running it.
  void (*attend_block)(const KvView& kv, const AttendJob& job);
  // n floats to IEEE halves at y (unaligned, 2n bytes), and back: the bits of core/fp16.h's
  // Fp32ToFp16 / Fp16ToFp32 at every level (the vector levels convert with F16C, which rounds
  // the same way, and write NaNs as those functions do: a NaN float becomes sign | 0x7e00, a
  // NaN half keeps its payload and its quiet bit as it is).
  void (*f32_to_f16)(const float* x, void* y, int64_t n);
  void (*f16_to_f32)(const void* x, float* y, int64_t n);
  // The level's float arithmetic at its peak: `steps` rounds of 12 independent multiply-add
  // chains on the level's widest float vectors (FMA at the vector levels; the scalar level's
  // a * b + c as the compiler emits it), the chains' sum into *sink so none is dropped.
  // Returns the floating-point operations done (2 per lane per multiply-add).
  int64_t (*fma_chains)(int64_t steps, float* sink);
};

// The NaN lanes of n values a vector level converted with F16C, rewritten as the core
// functions write them (F16C quiets and keeps payloads its own way): a NaN float becomes the
// half sign | 0x7e00 (FixNanHalves, out unaligned); a NaN half becomes the float
// sign | 0x7f800000 | payload << 13, its quiet bit as it is (FixNanFloats).
void FixNanHalves(const float* x, uint8_t* out, int n);
void FixNanFloats(const uint8_t* in, float* y, int n);

const Ops& ScalarOps();
const Ops& Avx2Ops();
const Ops& Avx512Ops();

// kivi4 (kernels.h) and the f16 tail of windowed KV, defined once in kernels.cc for every
// level: the reference dequantization, whose results the vector levels reproduce bit for bit
// (kivi4: x = fma(scale, nib, min)).
//   KiviKeyParams: the per-channel scale and min of a key group from its 32 tokens' head
//                  vectors (first token at `first`, `stride` bytes apart), [head_dim] each.
//   KiviKeyRow / KiviValueRow: one stored head vector to head_dim floats.
//   KvSlot / TailSlot: a head vector's address in the blocks / in the f16 tail ring.
//   WidenTile: slots [j0, j0 + n) of KV head kvh to f32 rows of K and V, ld floats apart, for
//              any KV type, tail slots (KvView::tail_begin) from the f16 ring.
void KiviKeyParams(const void* first, size_t stride, int head_dim, float* scale, float* min);
void KiviKeyRow(const void* k, int head_dim, const float* scale, const float* min, float* out);
void KiviValueRow(const void* v, int head_dim, float* out);
const uint8_t* KvSlot(const KvView& kv, bool v, int kvh, int64_t slot);
const uint16_t* TailSlot(const KvView& kv, bool v, int kvh, int64_t slot);
void WidenTile(const KvView& kv, int kvh, int64_t j0, int n, float* kt, float* vt, int ld);

// Key tile of attend_block (slots); the attention front end splits long ranges at multiples
// of it.
constexpr int kAttnTile = 64;

// The stored K and V vectors of KV head kvh for the slots [j0, j0 + n) of an attend_block tile:
// k[j], v[j] for j < n, the first n_blocks of them in the blocks (a block's consecutive slots
// found without a division each), the rest in the f16 ring (from KvView::tail_begin on). Found
// once per tile (FindTile), while the tile before is computed, so that its vectors can be
// prefetched (PrefetchSlot) as that tile is widened. Not for kivi4, whose blocks need
// WidenKivi. Defined in kernels.cc (no vector code).
struct TileAddrs {
  int n = 0;
  int n_blocks = 0;
  const uint8_t* k[kAttnTile];
  const uint8_t* v[kAttnTile];
};
void FindTile(const KvView& kv, int kvh, int64_t j0, int n, TileAddrs* t);

// attend_block's step into the tile of slots from t0 (j0 = max(t0, begin), n_all of them): the
// next tile's addresses found into `next` (none past end); and where K is read in place, the
// keys [n_all, n4_all) that round the last group of four up pointing at the last key again (a
// widened tile has zeros there; their scores are not used). Internal linkage, as below.
static inline void StepTiles(const KvView& kv, int kvh, int64_t t0, int64_t end, bool in_place,
                             int n_all, int n4_all, TileAddrs& cur, TileAddrs& next) {
  next.n = next.n_blocks = 0;
  const int64_t t1 = t0 + kAttnTile;
  if (t1 < end) {
    FindTile(kv, kvh, t1, static_cast<int>(end - t1 < kAttnTile ? end - t1 : kAttnTile), &next);
  }
  for (int j = n_all; in_place && j < n4_all; ++j) cur.k[j] = cur.k[n_all - 1];
}

// attend_block's look-ahead: the lines of slot j's K and V vectors (head_bytes each, `off` bytes
// on: another KV head's) of a tile found ahead, when j is in its blocks: one slot per widened slot
// of the tile before, so that they arrive from memory while it computes. The engine's 16-slot pages
// put each block of a layer in another 4 KiB page, where hardware prefetchers stop
// (docs/benchmarks.md, "Attention over long contexts"). Every line of a vector, its last byte's
// included. Internal linkage: each ISA's translation unit inlines its own copy.
[[gnu::always_inline]] static inline void PrefetchLines(const uint8_t* p, size_t bytes) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const uintptr_t span = ((a + bytes - 1) & ~uintptr_t{63}) - (a & ~uintptr_t{63});
  for (uintptr_t x = 0; x <= span; x += 64) __builtin_prefetch(p + x, 0, 3);
}
[[gnu::always_inline]] static inline void PrefetchSlot(const TileAddrs& t, int j,
                                                       size_t head_bytes, size_t off = 0) {
  if (j >= t.n_blocks) return;
  PrefetchLines(t.k[j] + off, head_bytes);
  PrefetchLines(t.v[j] + off, head_bytes);
}

// attend_block's start for heads h0 .. h0 + g of each (query, KV head) of the job: their states
// emptied (m = -inf, l = 0, acc = 0); returns the end of the longest range. Internal linkage, as
// above.
static inline int64_t StartJob(const AttendJob& job, int h0, int g, int hd) {
  int64_t end = job.begin;
  for (int i = 0; i < job.nq; ++i) end = job.ends[i] > end ? job.ends[i] : end;
  for (int k = 0; k < job.n_kvh; ++k) {
    for (int i = 0; i < job.nq; ++i) {
      float* const st = job.State(k, i);
      for (int h = h0; h < h0 + g; ++h) {
        st[h] = -__builtin_inff();
        st[job.group + h] = 0;
      }
      for (int d = h0 * hd; d < (h0 + g) * hd; ++d) st[2 * job.group + d] = 0;
    }
  }
  return end;
}

// Where attend_block's pass over a tile for one of its KV heads prefetches the next pass's K
// and V vectors, one slot per widened slot: `tile`'s, hb bytes each, off bytes on. The next
// pass is KV head k + 1's over this tile (`cur`), or after the last, the first KV head's over
// the next tile. Internal linkage, as above.
struct PassPrefetch {
  const TileAddrs* tile;
  size_t hb;
  size_t off;
};
static inline PassPrefetch NextPass(const TileAddrs& cur, const TileAddrs& next, int k,
                                    int n_kvh, size_t hb) {
  return k + 1 == n_kvh ? PassPrefetch{&next, hb, 0} : PassPrefetch{&cur, hb, (k + 1) * hb};
}

// A 64-byte aligned buffer of at least `bytes`, owned by the calling thread and reused across
// calls (grows, never shrinks). `slot` tells independent buffers of one thread apart:
// slot 0 is the MatMul front end's activation buffer, 1..3 are free for kernels.
void* ThreadScratch(int slot, size_t bytes);

// How the AVX2 level's q8_0 decode tiles (m < kPackMinM) read weights streamed from memory (not
// WeightMatrix::cache_resident, which always takes kStep, the fewest instructions per byte):
//   kRows  rows one after another in address order, in two passes (Q8GemvTile)
//   kStep  8 rows block by block in step (QuantGemvTile)
// The same bits either way. CACHETTE_Q8_DECODE=rows|step, else kStep: faster on both
// processors measured (Zen 5: 50-60%; Zen 3: 5-13% since 2026-12-06, when the in-step tile
// had learned to prefetch each line once; rows had been 1-15% faster there before). kRows
// stays for processors not yet measured (Intel's AVX2-only parts): vs_llamacpp.py
// --q8-orders rows,step.
// The setter is for tests and benchmarks (not thread-safe against kernel calls).
enum class Q8Order : int { kRows, kStep };
Q8Order Q8DecodeOrder();
void SetQ8DecodeOrder(Q8Order order);

}  // namespace cachette::kernels::internal
