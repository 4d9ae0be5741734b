// CPU math for the forward pass, with runtime ISA dispatch.
//
// Every entry point here has a scalar reference implementation (kernels_scalar.cc) and may
// have faster ones (AVX2, AVX-512, VNNI/AMX) selected once at start-up from what the CPU
// reports (cpuid + OS xsave support); CACHETTE_ISA=scalar|avx2|avx512|amx caps the choice, and
// SetIsa() lets tests compare every level against the scalar one on random inputs.
//
// Shapes are given in brackets, fastest-varying dimension last. All float buffers are f32
// unless said otherwise. Functions that take a ThreadPool& split work over it; the rest are
// single-threaded and the caller parallelizes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

#include "core/thread_pool.h"

namespace cachette::kernels {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAmx = 3 };
std::string_view IsaName(Isa isa);

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512vnni = false, avx512bf16 = false, avx512fp16 = false, avxvnni = false;
  bool amx_tile = false, amx_int8 = false, amx_bf16 = false;  // and OS permission granted
};
const CpuFeatures& Cpu();

// The best ISA this CPU supports, capped by CACHETTE_ISA.
Isa BestIsa();
// The ISA kernels currently dispatch to. Defaults to BestIsa().
Isa ActiveIsa();
// Caps dispatch at `isa` (clamped to BestIsa()). For tests and benchmarks; not thread-safe
// against concurrent kernel calls.
void SetIsa(Isa isa);

// The compute ceiling of the active level on the calling thread, in floating-point operations
// per second: 12 independent chains of multiply-adds on the level's widest float vectors
// (FMA at the vector levels), timed over about `seconds` after a short untimed warm-up. No
// matmul at this level computes faster on this core. Run on every thread of a pool at once it
// gives the machine's ceiling for that many threads (two vCPUs on one physical core share it).
double FmaPeakFlops(double seconds);

// ---- Weight matrices -------------------------------------------------------------------

// Weight element types, with ggml's block layouts:
//   kF32  : float
//   kF16  : IEEE half
//   kBF16 : bfloat16
//   kQ8_0 : blocks of 32: { f16 d; int8 q[32]; }          x = d * q          (34 bytes)
//   kQ4_0 : blocks of 32: { f16 d; uint8 qs[16]; }        x = d * (nib - 8)  (18 bytes)
//           element j < 16 is the low nibble of qs[j], element j + 16 its high nibble.
enum class WType : int { kF32, kF16, kBF16, kQ8_0, kQ4_0 };
std::string_view WTypeName(WType t);
int64_t WTypeBlockElems(WType t);  // 1 or 32
int64_t WTypeBlockBytes(WType t);  // 4, 2, 2, 34, 18
// Bytes of one row of `cols` elements (cols must be a multiple of the block size).
size_t WTypeRowBytes(WType t, int64_t cols);

// A row-major weight matrix [rows][cols] in one of the layouts above; rows are `row_bytes`
// apart. For a linear layer, rows = output features and cols = input features.
struct WeightMatrix {
  WType type = WType::kF32;
  const void* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  size_t row_bytes = 0;
  // Optional, q8_0/q4_0 only: the blocks' f16 scales regrouped by 8 rows, laid out
  // [ceil(rows / 8)][cols / 32][8] (a last group's missing rows repeat the matrix's last row),
  // as DecodeScales() builds them. The AVX2 and AVX-512 decode kernels then take a block's 8
  // scales with one load instead of 8 inserts or a gather; the same bits with or without it.
  const uint16_t* scales8 = nullptr;
  // Optional hint: the weights a decode step streams fit in the last-level cache
  // (FitsInLastLevelCache), so the kernels find them there rather than in memory. The AVX2 q8_0
  // decode kernel then reads 8 rows block by block in step (fewest instructions per byte),
  // whatever CACHETTE_Q8_DECODE asks for weights streamed from memory (kernels_internal.h).
  // Same bits either way.
  bool cache_resident = false;
  // q8_0/q4_0 only: the rows in groups of 8, each group's blocks interleaved (InterleaveRows8):
  // block b of row 8g + i at group g's start + (8b + i) x block bytes, so that a decode tile
  // reads its 8 rows as one stream; rows past the last whole group keep the row layout.
  // row_bytes is then exactly WTypeRowBytes. Every level's kernels read both layouts with the
  // same bits (the AVX-512 level hands such a matrix to its AVX2 kernels, the same bits too).
  bool interleaved8 = false;
};

// Where block b of row r of a q8_0/q4_0 matrix starts, in either layout. Always inlined: the
// ISA translation units call it too, and must not lend their code to the others.
[[gnu::always_inline]] inline const uint8_t* QuantBlockAt(const WeightMatrix& w, int64_t r,
                                                          int64_t b) {
  const auto* base = static_cast<const uint8_t*>(w.data);
  const int64_t bb = w.type == WType::kQ8_0 ? 34 : 18;
  if (w.interleaved8 && r < w.rows / 8 * 8) {
    return base + static_cast<size_t>(r / 8) * 8 * w.row_bytes +
           static_cast<size_t>((b * 8 + r % 8) * bb);
  }
  return base + static_cast<size_t>(r) * w.row_bytes + static_cast<size_t>(b * bb);
}

// Rewrites rows [0, rows) of q8_0/q4_0 weights (row_bytes = WTypeRowBytes) at `data` from the
// row layout to WeightMatrix::interleaved8's, in place (a group's bytes stay where they were).
void InterleaveRows8(WType t, int64_t rows, int64_t cols, void* data);
// Whether the kernels dispatched now read weights of type t faster interleaved: q8_0 and q4_0
// at the AVX2 level (a stand-alone loop of the decode tile read memory at 0.94 of a plain
// sum's rate interleaved against 0.83-0.85 in rows, on a Zen 3: docs/benchmarks.md).
bool PrefersInterleaved8(WType t);

// Whether `bytes` of weights, streamed once per decode step, stay in the last-level cache: at
// most half its size (the KV cache and activations share it). False where the size is unknown.
bool FitsInLastLevelCache(uint64_t bytes);

// Whether the kernels dispatched now read WeightMatrix::scales8 for weights of type t (so a
// model builds it only where it pays: 2 bytes per block, 6% of q8_0 and 11% of q4_0).
bool UsesDecodeScales(WType t);
// w's scales in WeightMatrix::scales8's layout (w.type q8_0 or q4_0), and their count:
// ceil(rows / 8) x (cols / 32) x 8.
std::vector<uint16_t> DecodeScales(const WeightMatrix& w);
size_t DecodeScalesCount(const WeightMatrix& w);

// y[m][rows] = x[m][cols] . W^T, i.e. y[i][r] = sum_c x[i][c] * W[r][c].
// For quantized W the activations are quantized to 8 bits per block of 32 (as ggml does) before
// the integer dot products, so results differ from the float product by that rounding.
// m == 1 is the decode (matrix-vector) case. Parallel over `pool`.
void MatMul(const float* x, int64_t m, const WeightMatrix& w, float* y, ThreadPool& pool);

// Several matmuls of one input, ys[i] = x . ws[i]^T, as ONE parallel job: a decode step's Q, K
// and V projections, or its gate and up: one fork-join instead of three or two, with the small K
// and V rows shared out among the threads together with Q's. The activations are quantized
// once. Every output is the same bits as MatMul's (each row's sum is computed alike, whatever
// range it falls in). The matrices must share type and cols; otherwise they run one MatMul
// after another.
void MatMulGroup(const float* x, int64_t m, std::span<const WeightMatrix* const> ws,
                 std::span<float* const> ys, ThreadPool& pool);

// out[cols] = W[row] converted to f32 (embedding lookup).
void DequantizeRow(const WeightMatrix& w, int64_t row, float* out);

// ---- Elementwise and normalization ------------------------------------------------------

// y[i][:] = x[i][:] / sqrt(mean(x[i][:]^2) + eps) * weight[:], for i in [0, rows). x may alias y.
void RmsNorm(const float* x, const float* weight, float* y, int64_t rows, int64_t dim, float eps);

// x[:] = softmax(x[:]) in place, numerically stable (max subtracted).
void Softmax(float* x, int64_t n);

// out[i] = silu(gate[i]) * up[i], silu(g) = g / (1 + exp(-g)). out may alias gate or up.
void SwiGlu(const float* gate, const float* up, float* out, int64_t n);

// y[i] += x[i].
void Add(const float* x, float* y, int64_t n);

// ---- RoPE --------------------------------------------------------------------------------

// kNormal: rotate adjacent pairs (x[2i], x[2i+1])      (GGUF `llama`)
// kNeox:   rotate pairs (x[i], x[i + head_dim/2])      (GGUF `qwen2`)
enum class RopeStyle : int { kNormal = 0, kNeox = 1 };

struct RopeParams {
  RopeStyle style = RopeStyle::kNormal;
  int head_dim = 0;
  float theta_base = 10000.0f;
  float freq_scale = 1.0f;  // linear scaling: position is multiplied by freq_scale
};

// Rotates x[n_tok][n_head][head_dim] in place; token t is at position pos[t].
// Angle for pair i at position p: p * freq_scale * theta_base^(-2i/head_dim).
void Rope(float* x, int64_t n_tok, int n_head, const int32_t* pos, const RopeParams& p);

// ---- KV storage and attention ------------------------------------------------------------

// Element types of stored K/V:
//   kF32, kF16 : plain
//   kQ8_0      : blocks of 32 along head_dim, ggml block_q8_0 layout (head_dim % 32 == 0):
//                { f16 d; int8 q[32]; }  x = d * q, d = amax / 127                 (34 bytes)
//   kQ4_0      : blocks of 32 along head_dim, ggml block_q4_0 layout (head_dim % 32 == 0):
//                { f16 d; uint8 qs[16]; }  x = d * (nib - 8)                       (18 bytes)
//                element j < 16 is the low nibble of qs[j], element j + 16 its high nibble;
//                d = m / -8 where m is the block's element of largest magnitude (sign kept),
//                so m itself is exactly nib 0 and the others round half up to nearest,
//                clamped to 15 (ggml's quantize_row_q4_0_ref, bit for bit on finite input;
//                a NaN makes its whole block NaN). Error <= |d|/2, but up to |d| where an
//                element of the sign opposite to m clamps at 15.
//   kQ4_1      : blocks of 32 along head_dim, ggml block_q4_1 layout (head_dim % 32 == 0):
//                { f16 d; f16 m; uint8 qs[16] }  x = fma(d, nib, m), nibble order of kQ4_0
//                (20 bytes); d = (max - min) / 15 and m = min of the block, nib = (x - min) / d
//                rounded half up, clamped to 15 (ggml's quantize_row_q4_1_ref, bit for bit on
//                finite input; a NaN or an infinity makes its whole block NaN). Per-token
//                asymmetric 4 bits: error <= d / 2 plus the f16 rounding of d and m.
//   kKivi4     : KIVI's asymmetric 4-bit layout (docs/kernels.md, "kivi4"), blocks of 32 along
//                head_dim: { f16 scale; f16 min; uint8 qs[16] }  x = min + scale * nib, nibble
//                order of kQ4_0 (20 bytes). A V vector is one token's: each block's scale and
//                min are over its 32 elements. K is quantized per channel over groups of 32
//                tokens (slots 32g .. 32g + 31): a K block holds the token's nibbles, and the
//                scale and min of channel 32 * block + slot % 32, which the group's 32 tokens
//                share. So a K vector is written and read with its group (StoreKiviGroup,
//                KiviKeyParams), never alone: StoreKv, LoadKv and KvDot refuse kKivi4. The
//                newest tokens of a kivi4 sequence are f16 outside the blocks (KvView::tail).
// The values are stable: they are chunk layout ids in the cache layer (cache/chunk.h).
enum class KvType : int { kF32 = 0, kF16 = 1, kQ8_0 = 2, kQ4_0 = 3, kKivi4 = 4, kQ4_1 = 5 };
std::string_view KvTypeName(KvType t);
// The type KvTypeName names `name`, or nullopt for any other string.
std::optional<KvType> KvTypeFromName(std::string_view name);
// Elements per block along head_dim: 1 for kF32/kF16, 32 for the others. A head_dim that is
// not a multiple of it cannot be stored in that type (StoreKv and Attention CHECK-fail).
int KvTypeBlockElems(KvType t);
// Bytes of one head vector of `head_dim` elements.
size_t KvHeadBytes(KvType t, int head_dim);

// Converts `n_vec` f32 vectors of `head_dim` to KV storage at dst (packed, KvHeadBytes apart).
void StoreKv(const float* src, int64_t n_vec, int head_dim, KvType t, void* dst);
// The inverse (for tests, codecs and reference paths).
void LoadKv(const void* src, int64_t n_vec, int head_dim, KvType t, float* dst);

// Tokens in a kKivi4 key group.
constexpr int kKiviGroup = 32;
// Quantizes kKiviGroup tokens' K and V to kKivi4: k and v are [kKiviGroup][n_kv_head][head_dim]
// f32; token t's stored [n_kv_head] head vectors go to k_dst + t * dst_stride (v_dst likewise).
// A group holding a NaN or an infinity in a channel (K) or block (V) reads back as NaN there.
void StoreKiviGroup(const float* k, const float* v, int n_kv_head, int head_dim, void* k_dst,
                    void* v_dst, size_t dst_stride);
// The inverse: token t's stored vectors at k_src + t * src_stride to f32 k and v, laid out as
// StoreKiviGroup's input. Dequantizes as the attention kernels do (up to the last bit).
void LoadKiviGroup(const void* k_src, const void* v_src, size_t src_stride, int n_kv_head,
                   int head_dim, float* k, float* v);

// q . k for one stored head vector k (KvHeadBytes(t, head_dim) bytes) at the active ISA level,
// elements converted as Attention converts them (for passes that need the scores themselves,
// e.g. the attention statistics of KV budget policies). The sum's order, so its last bits,
// depend on the level and may differ from Attention's own scores.
float KvDot(const float* q, const void* k, int head_dim, KvType t);

// One layer's K and V of one sequence, in blocks of `block_tokens` tokens. Block b holds
// tokens [b*block_tokens, (b+1)*block_tokens); within a block, K is laid out
// [block_tokens][n_kv_head][head_dim] starting at k_blocks[b], V likewise at v_blocks[b].
// A contiguous per-sequence cache is one block with block_tokens = capacity.
struct KvView {
  KvType type = KvType::kF32;
  int n_kv_head = 0;
  int head_dim = 0;
  int block_tokens = 0;
  const void* const* k_blocks = nullptr;
  const void* const* v_blocks = nullptr;
  int64_t n_tokens = 0;  // valid tokens: the keys attended over are [0, n_tokens)
  // kKivi4 only: slots from tail_begin (a multiple of kKiviGroup) on are not in the blocks but
  // f16 [n_kv_head][head_dim] vectors in a ring of tail_cap slots per K and V, slot s at index
  // s % tail_cap (the sequence's most recent tokens, engine/kv_cache.h, KvWindow).
  int64_t tail_begin = INT64_MAX;
  int64_t tail_cap = 0;
  const void* tail_k = nullptr;
  const void* tail_v = nullptr;
};

// Causal attention with grouped-query heads.
//   q   [n_q][n_head][head_dim]  query i sits at position q_pos0 + i and attends to keys
//                                 [0, q_pos0 + i] (which must be < kv.n_tokens)
//   out [n_q][n_head][head_dim]
// Query head h uses KV head h / (n_head / n_kv_head). scale is usually 1/sqrt(head_dim).
// Online softmax over tiles of 64 slots, the range cut into splits of 2,048 merged by their
// log-sum-exps (docs/kernels.md, "Attention"); parallel over (query, KV head), or over
// (query, KV head, split) when the step has few queries and a long context. A query's output
// is the same bits whatever the other queries, the threads or the block size.
void Attention(const float* q, int64_t n_q, int n_head, int64_t q_pos0, const KvView& kv,
               float scale, float* out, ThreadPool& pool);

// Attention over one contiguous range of slots that also returns each softmax's log-sum-exp,
// so that attention split over several ranges can be merged exactly, or reweighted (APE,
// engine/ape.h). Query i attends slots [begin, end_i) with
//   end_i = end                                    when causal_slot0 < 0 (every query alike),
//   end_i = min(end, causal_slot0 + i + 1)         otherwise (query i sits in slot
//                                                   causal_slot0 + i and sees no later slot).
//   q   [n_q][n_head][head_dim]
//   out [n_q][n_head][head_dim]  sum_j p_j v_j, p = softmax_j(s_j), s_j = score_scale * q.k_j
//   lse [n_q][n_head]            log sum_j exp(s_j), natural log
// An empty range gives out = 0 and lse = -inf. Requires 0 <= begin and end <= kv.n_tokens.
// GQA heads as in Attention, and computed as Attention is (the same bits over the same
// causal range).
void AttentionLse(const float* q, int64_t n_q, int n_head, const KvView& kv, int64_t begin,
                  int64_t end, int64_t causal_slot0, float score_scale, float* out, float* lse,
                  ThreadPool& pool);

}  // namespace cachette::kernels
