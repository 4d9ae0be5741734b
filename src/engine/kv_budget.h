// What the engine offers KV budget policies (src/kv/kv_policy.h): attention statistics
// gathered off the fast path, a per-sequence KV whose layers may hold different numbers of
// tokens, and compaction of that KV by a keep plan.
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
// to slots [0, that slot]. window/cumulative say which sums it feeds. Scores in float, the
// softmax in double per (query, head); parallel over KV heads.
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
// (merges weigh by it), updated. Validates the plan first; on error nothing changes.
Status CompactSlots(SequenceKv& kv, const KvShape& shape, std::vector<int64_t>& layer_n,
                    const KeepPlan& plan, const kernels::RopeParams& rope,
                    AttentionStats* stats, std::vector<std::vector<float>>& weight,
                    int64_t weight_stride);

// A contiguous per-sequence KV whose layers may hold different numbers of slots, and which
// remembers the next RoPE position (see the header comment). Capacity is fixed at creation.
class BudgetKv final : public SequenceKv {
 public:
  BudgetKv(const KvShape& shape, int64_t capacity);

  int64_t n_tokens() const override { return n_max_; }
  int64_t capacity() const override { return capacity_; }
  Status Reserve(int64_t n) override;
  void* KSlot(int layer, int64_t slot) override;
  void* VSlot(int layer, int64_t slot) override;
  kernels::KvView View(int layer, int64_t n) const override;
  // Sets every layer to n slots; with n == 0 the sequence restarts (positions from 0).
  // Otherwise only valid for n <= n_tokens() on a sequence that has never been compacted.
  void SetTokens(int64_t n) override;
  int64_t layer_tokens(int layer) const override { return layer_n_[layer]; }
  int64_t next_position() const override { return next_pos_; }
  void Append(int64_t count) override;

  const KvShape& shape() const { return shape_; }
  // Tokens read so far (positions handed out), evicted ones included.
  int64_t tokens_seen() const { return seen_; }
  // Slots summed over layers (the memory a per-layer budget actually holds).
  int64_t total_slots() const;
  bool compacted() const { return compacted_; }

  // Compacts every layer by `plan` (validated first; on error nothing changes), moving
  // `stats` (may be null) with the slots and re-rotating keys when the plan reassigns
  // positions. Merged slots are averaged with their anchor in f32, weighted by how many
  // tokens each already stands for.
  Status Compact(const KeepPlan& plan, const kernels::RopeParams& rope, AttentionStats* stats);

  // Raises the capacity to `capacity` slots (a no-op if it is not larger), keeping the
  // contents. Attention statistics sized to the old capacity are resized by the next forward.
  void Grow(int64_t capacity);

  // Copies `src`'s first n tokens (every layer) into this empty sequence.
  Status CopyFrom(const SequenceKv& src, int64_t n);

 private:
  KvShape shape_;
  int64_t capacity_;
  std::vector<int64_t> layer_n_;
  int64_t n_max_ = 0, next_pos_ = 0, seen_ = 0;
  bool compacted_ = false;
  // Tokens each slot stands for (1, more after merges): [layer][head * capacity + slot].
  std::vector<std::vector<float>> weight_;
  std::vector<std::unique_ptr<std::byte[]>> k_, v_;  // [n_layer]
  std::vector<const void*> k_ptr_, v_ptr_;
};

}  // namespace cachette
