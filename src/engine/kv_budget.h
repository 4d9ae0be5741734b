// What the engine offers KV budget policies (src/kv/kv_policy.h): attention statistics
// gathered off the fast path, and compaction by a keep plan of any SequenceKv: ContiguousKv
// (engine/kv_cache.h), whose layers may then hold different numbers of slots, and the paged
// sequences of src/kv.
//
// Slots and positions. A sequence's KV is a list of slots per layer; the token in slot s of
// layer l has a RoPE position, the position its key was rotated to. Without eviction slot ==
// position. After a policy evicts tokens, either
//   - positions are kept (H2O, SnapKV, ...): kept keys are moved to lower slots unchanged and
//     the next token's position is the number of tokens the sequence has read, or
//   - positions are reassigned (StreamingLLM): after compaction slot i holds position i (each
//     moved key is re-rotated by new slot - old slot), and the next position is the slot
//     count, so the model never sees a position beyond its context.
//
// Thread-safety: none; a sequence and its statistics belong to one caller at a time.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "cachette/status.h"
#include "core/thread_pool.h"
#include "engine/kv_cache.h"
#include "kernels/kernels.h"

namespace cachette {

// Attention probabilities accumulated per (layer, KV head, slot), over the query heads of the
// head's group and over the queries that contribute. Attached to an Engine::Item; the engine
// adds the new tokens' attention after each layer (a second pass over the KV, not a change to
// the attention kernel), and the compaction moves the sums with their slots.
struct AttentionStats {
  // What to collect (set before a forward pass; 0/false = nothing).
  int window = 0;           // the last `window` new tokens of each Forward item add to win_*
  bool cumulative = false;  // every new token adds to cum

  // Per layer, [n_kv_head][capacity] laid out head-major (index h * capacity + slot); sized by
  // Resize(). Query rows x group heads summed into win_* per layer: win_rows[layer].
  int n_layer = 0, n_kv_head = 0;
  int64_t capacity = 0;
  std::vector<std::vector<float>> win_sum, win_sq, cum;
  std::vector<int64_t> win_rows;

  // Sizes every array for `capacity` slots (keeping what fits) and zeroes the rest.
  void Resize(int n_layer, int n_kv_head, int64_t capacity);
  // Zeroes the window sums (after a policy has used them); cum is kept.
  void ClearWindow();
  float* WinSum(int layer, int head) { return win_sum[layer].data() + head * capacity; }
  float* WinSq(int layer, int head) { return win_sq[layer].data() + head * capacity; }
  float* Cum(int layer, int head) { return cum[layer].data() + head * capacity; }
  const float* WinSum(int layer, int head) const {
    return win_sum[layer].data() + head * capacity;
  }
  const float* WinSq(int layer, int head) const { return win_sq[layer].data() + head * capacity; }
  const float* Cum(int layer, int head) const { return cum[layer].data() + head * capacity; }
};

// Adds the attention of queries q[rows[i]] (each [n_head][head_dim], already rotated) to
// `stats` for `layer`: query row rows[i] sits in slot slot0 + rows[i] - rows_base and attends
// to slots [0, that slot]. window/cumulative say which sums it feeds. Scores by MatMul over
// the stored keys when one block holds them all and their type is a weight type (f32, f16,
// q8_0, q4_0; q8_0 and q4_0 then quantize the queries to 8 bits, as MatMul does), else by f32
// dot products; then kernels::Softmax. Parallel over `pool`.
void AccumulateAttention(const float* q, int n_head, const std::vector<int64_t>& rows,
                         int64_t rows_base, int64_t slot0, const kernels::KvView& view,
                         float scale, int layer, bool window, bool cumulative,
                         AttentionStats& stats, ThreadPool& pool);

// Which slots survive a compaction. For each layer, every KV head keeps the same number of
// slots (layers may differ); slots[layer][head] lists the kept old slots in increasing order.
// merge_into (optional, may be empty): per layer, [n_kv_head][old slot count] = the kept old
// slot an evicted slot's K and V are averaged into (-1 = dropped; entries of kept slots are
// ignored). reassign_positions: see the header comment (requires equal counts in every layer).
struct KeepPlan {
  std::vector<std::vector<std::vector<int64_t>>> slots;  // [layer][head][kept]
  std::vector<std::vector<std::vector<int64_t>>> merge_into;
  bool reassign_positions = false;

  int64_t kept(int layer) const {
    return slots[layer].empty() ? 0 : static_cast<int64_t>(slots[layer][0].size());
  }
  // The first slot whose bytes the plan changes in any layer or head (a move, a drop, a merge
  // into it), INT64_MAX when it changes nothing: slots before it keep the exact KV.
  int64_t FirstChanged(const std::vector<int64_t>& layer_tokens) const;
  // kInvalidArgument naming the layer/head when a list is unsorted, repeats a slot, is out of
  // [0, layer_tokens[layer]), differs in length between heads, or a merge target is not kept.
  Status Validate(const std::vector<int64_t>& layer_tokens, int n_kv_head) const;
};

// Compacts `kv` by `plan` through KSlot/VSlot (any layout): merges, moves (re-rotating keys
// when positions are reassigned), `stats` (may be null) moved with the slots. layer_n: slots
// per layer, updated. weight[layer][head * weight_stride + slot]: tokens each slot stands for
// (merges weigh by it), updated. Validates the plan first; on error nothing changes. Writes
// only slots from the plan's first changed one up to each layer's kept count (a merged anchor
// is stored in its new slot), so a paged sequence copies only those pages first.
Status CompactSlots(SequenceKv& kv, const KvShape& shape, std::vector<int64_t>& layer_n,
                    const KeepPlan& plan, const kernels::RopeParams& rope,
                    AttentionStats* stats, std::vector<std::vector<float>>& weight,
                    int64_t weight_stride);

}  // namespace cachette
