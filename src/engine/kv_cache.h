// Per-sequence KV storage as the forward pass sees it.
//
// The forward pass reads and writes K/V only through SequenceKv, so the same code runs over a
// contiguous per-sequence buffer (ContiguousKv, below) and over pages from a shared pool (the
// paged cache in src/kv). K is stored after RoPE.
#pragma once

#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

#include "cachette/status.h"
#include "core/huge_pages.h"
#include "kernels/kernels.h"

namespace cachette {

struct KvShape {
  int n_layer = 0;
  int n_kv_head = 0;
  int head_dim = 0;
  kernels::KvType type = kernels::KvType::kF16;
  // Newest tokens kept in f16 outside the slots (KvWindow) by a quantized type: 0 = none, except
  // for kKivi4, which always keeps its key group in progress there (and, by default,
  // kDefaultKiviRecent more: EngineOptions::kv_recent).
  int recent = 0;

  // Whether the sequence keeps a KvWindow: kKivi4, or a recent window on q8_0 / q4_0 / q4_1.
  bool windowed() const {
    return type == kernels::KvType::kKivi4 ||
           (recent > 0 && type != kernels::KvType::kF32 && type != kernels::KvType::kF16);
  }

  // Bytes of one token's K (or V) in one layer: [n_kv_head][head_dim] elements.
  size_t token_bytes() const { return n_kv_head * kernels::KvHeadBytes(type, head_dim); }
  // The type the forward pass writes new K/V in (SequenceKv::KWrite): f16 when windowed (the
  // newest tokens stay f16 until the window lets them go, KvWindow), else the type.
  kernels::KvType write_type() const { return windowed() ? kernels::KvType::kF16 : type; }
};

// KIVI's residual length: tokens kept f16 after the newest quantized key group by default.
constexpr int kDefaultKiviRecent = 64;

// Windowed sequences (kivi4, --kv-recent) do not combine with the features that rewrite single
// slots of a sequence (KV budget policies, segment reuse, APE, slot-level copies):
// kInvalidArgument naming `what`.
Status CheckKvRewritable(const KvShape& shape, std::string_view what);

class SequenceKv;

// The f16 recent window of a windowed sequence (KvShape::windowed(): kivi4, whose keys are
// quantized by groups of 32 tokens, or a GGUF-style type with --kv-recent; KIVI keeps the newest
// tokens in full precision). Tokens from begin() on are f16 vectors in one ring per layer and
// per K/V, outside the sequence's slots; the slots before begin() hold the quantized tokens.
// Tokens move into the slots 32 at a time (for kivi4, a key group, aligned to 32) once
// `recent` newer tokens stand after them, so the window holds recent to recent + 31 tokens
// between forward passes (more during a prefill chunk: the ring grows for it, and shrinks back
// after). Its memory is outside the page pool's budget: about recent + 32 tokens of f16 KV per
// running sequence.
class KvWindow {
 public:
  explicit KvWindow(const KvShape& shape);

  int64_t begin() const { return begin_; }
  // The f16 slot of `pos` (>= begin()) in layer's K (V) ring, grown to hold it if needed.
  void* K(int layer, int64_t pos);
  void* V(int layer, int64_t pos);
  // Sets the tail fields of a view of `layer`.
  void Fill(int layer, kernels::KvView* view) const;
  // After the forward pass stored tokens up to n (the sequence's slots count): quantizes 32
  // tokens at a time into seq's slots while `recent` tokens stay after them.
  void Flush(SequenceKv& seq, int64_t n);
  // The sequence now holds n tokens whose slots are quantized (a cache hit, a restore from a
  // tier) or was cut to n < begin(): the window restarts at n (kivi4: at n's key group, its
  // tokens before n dequantized from seq's slots, which hold that whole group).
  void Rebase(SequenceKv& seq, int64_t n);
  // Cut to n tokens (a shrink or a restart): Rebase when n < begin(), else nothing moves.
  void Truncate(SequenceKv& seq, int64_t n);
  // When the sequence ends (nothing will attend to it again): quantizes its window into seq's
  // slots, all n tokens (kivi4: its whole key groups; a group in progress stays out), so that
  // the prefix index and the tiers keep them and the next turn does not recompute them.
  void Seal(SequenceKv& seq, int64_t n);

 private:
  void Grow(int64_t need);  // capacity for tokens [begin_, begin_ + need)
  // Moves tokens [begin_, end) into seq's slots, 32 at a time (the last run shorter unless
  // kivi4), and begin_ to end.
  void Quantize(SequenceKv& seq, int64_t end);
  void Resize(int64_t cap);

  KvShape shape_;
  size_t row_ = 0;  // u16 per token: n_kv_head * head_dim
  int64_t begin_ = 0;
  int64_t end_ = 0;  // one past the last position written since begin_
  int64_t cap_ = 0;
  std::vector<std::vector<uint16_t>> k_, v_;  // [n_layer][cap_ * row_]
};

class SequenceKv {
 public:
  virtual ~SequenceKv() = default;

  // Tokens whose K/V are stored: positions [0, n_tokens()).
  virtual int64_t n_tokens() const = 0;
  // Most tokens this sequence can hold.
  virtual int64_t capacity() const = 0;
  // Its KV layout: a server may hold sequences of several KV types (--session-kv-type), and the
  // forward pass writes each in its own (KvShape::write_type()).
  virtual const KvShape& shape() const = 0;
  // Makes room for positions [0, n); kResourceExhausted if it cannot. Does not change n_tokens.
  // Once compacted (below): room for n - n_tokens() more slots after each layer's last.
  virtual Status Reserve(int64_t n) = 0;
  // Where K (or V) of `layer` at position `pos` (< reserved size) goes:
  // [n_kv_head][head_dim] elements of the KV type.
  virtual void* KSlot(int layer, int64_t pos) = 0;
  virtual void* VSlot(int layer, int64_t pos) = 0;
  // Where the forward pass writes K (or V) of `layer` at `pos`, as KvShape::write_type(): the
  // slot itself, except for the newest tokens of a kivi4 sequence (KvWindow).
  virtual void* KWrite(int layer, int64_t pos) { return KSlot(layer, pos); }
  virtual void* VWrite(int layer, int64_t pos) { return VSlot(layer, pos); }
  // The attention view of `layer` over positions [0, n).
  virtual kernels::KvView View(int layer, int64_t n) const = 0;
  // Marks positions [0, n) as stored (after a forward pass) or drops those past n (n smaller).
  virtual void SetTokens(int64_t n) = 0;

  // A KV budget policy (engine/kv_budget.h) may evict tokens, so that a sequence's slots and
  // positions part ways and its layers hold different numbers of slots. The defaults are those
  // of a sequence that never evicts: every layer holds n_tokens() slots, slot == position.
  // Slots in use in `layer`; n_tokens() is the largest over the layers.
  virtual int64_t layer_tokens(int layer) const {
    (void)layer;
    return n_tokens();
  }
  // RoPE position of the next token.
  virtual int64_t next_position() const { return n_tokens(); }
  // Tokens read so far (positions handed out), evicted ones included.
  virtual int64_t tokens_seen() const { return n_tokens(); }
  // After a forward pass wrote `count` new tokens after every layer's last slot.
  virtual void Append(int64_t count) { SetTokens(n_tokens() + count); }
  // Reading a layer at a time (Engine::ForwardLayerMajor, for CAKE's cascade: earlier layers
  // compacted before later ones are read). ReserveLayer makes room for `count` more slots after
  // `layer`'s last (the first call starts per-layer bookkeeping, as a compaction does);
  // AppendLayer then records them; AppendPositions(count) once every layer has its `count`.
  // kInvalidArgument where the sequence cannot (windowed types; the default).
  virtual Status ReserveLayer(int layer, int64_t count) {
    (void)layer;
    (void)count;
    return InvalidArgument("this sequence cannot be read a layer at a time");
  }
  virtual void AppendLayer(int layer, int64_t count) {
    (void)layer;
    (void)count;
  }
  virtual void AppendPositions(int64_t count) { (void)count; }
  // Slots from `n` on do not hold the exact KV of their tokens (segment reuse placed or
  // approximated them, engine/segment_reuse.h): a sequence that feeds an exact cache must not
  // give them to it. The default has no cache to protect.
  virtual void MarkInexactFrom(int64_t n) { (void)n; }
};

struct AttentionStats;  // engine/kv_budget.h
struct KeepPlan;

// How a sequence's slots stand for its tokens once a KV budget policy has compacted it, kept
// the same way by every sequence type that can be compacted (ContiguousKv, PagedSequence).
// Until the first compaction nothing is kept (a sequence that never compacts pays nothing):
// every layer holds the sequence's n tokens, slot == position, each slot one token. The
// methods take that n, the sequence's own count (its longest layer once compacted).
struct SlotBook {
  bool compacted = false;
  std::vector<int64_t> layer_n;  // [n_layer]: slots per layer
  int64_t next_pos = 0;          // the RoPE position of the next token
  int64_t seen = 0;              // tokens read, evicted ones included
  int64_t exact = 0;             // leading slots still holding the exact KV of the first tokens
  // Tokens each slot stands for (1, more after merges): [layer][head * stride + slot].
  std::vector<std::vector<float>> weight;

  int64_t LayerTokens(int layer, int64_t n) const { return compacted ? layer_n[layer] : n; }
  int64_t NextPosition(int64_t n) const { return compacted ? next_pos : n; }
  int64_t Seen(int64_t n) const { return compacted ? seen : n; }
  int64_t Exact(int64_t n) const { return compacted ? exact : n; }
  // Slots summed over the layers (the memory a per-layer budget actually holds).
  int64_t TotalSlots(int n_layer, int64_t n) const;
  // Before a first compaction of a sequence of n tokens: every layer full, each slot one token.
  void Start(const KvShape& shape, int64_t stride, int64_t n);
  // `count` new tokens went after every layer's last slot; returns the new longest layer.
  int64_t Append(int n_kv_head, int64_t stride, int64_t n, int64_t count);
  // The same a layer at a time (compacted only): `count` slots after `layer`'s last, each one
  // token; then, once every layer has them, their positions. Returns the longest layer.
  int64_t AppendLayer(int n_kv_head, int64_t stride, int layer, int64_t count);
  int64_t AppendPositions(int64_t count);
  // Re-lays the weights of the first n slots for a new stride (a larger capacity).
  void Restride(int n_kv_head, int64_t old_stride, int64_t stride, int64_t n);
  void Clear() { *this = SlotBook(); }
};

// One contiguous buffer per layer and per K/V, laid out [capacity][n_kv_head][head_dim].
// Without a KV budget policy it is a plain sequence (slot == position, every layer full).
// A policy may compact it (engine/kv_budget.h): its layers may then hold different numbers of
// slots, and it remembers the next RoPE position and how many tokens it has read.
class ContiguousKv final : public SequenceKv {
 public:
  ContiguousKv(const KvShape& shape, int64_t capacity);

  int64_t n_tokens() const override { return n_max_; }
  int64_t capacity() const override { return capacity_; }
  Status Reserve(int64_t n) override;
  void* KSlot(int layer, int64_t slot) override;
  void* VSlot(int layer, int64_t slot) override;
  void* KWrite(int layer, int64_t pos) override;
  void* VWrite(int layer, int64_t pos) override;
  kernels::KvView View(int layer, int64_t n) const override;
  // Sets every layer to n slots; with n == 0 the sequence restarts (positions from 0).
  // Otherwise only valid on a sequence that has never been compacted. On a kivi4 sequence,
  // slots added this way hold quantized tokens (KvWindow::Rebase).
  void SetTokens(int64_t n) override;
  int64_t layer_tokens(int layer) const override { return book_.LayerTokens(layer, n_max_); }
  int64_t next_position() const override { return book_.NextPosition(n_max_); }
  void Append(int64_t count) override;
  Status ReserveLayer(int layer, int64_t count) override;
  void AppendLayer(int layer, int64_t count) override;
  void AppendPositions(int64_t count) override;

  const KvShape& shape() const override { return shape_; }
  int64_t tokens_seen() const override { return book_.Seen(n_max_); }
  // Slots summed over layers (the memory a per-layer budget actually holds).
  int64_t total_slots() const { return book_.TotalSlots(shape_.n_layer, n_max_); }
  bool compacted() const { return book_.compacted; }

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
  // (Re)allocates mem_ for `capacity` slots a layer, zeroed, and points k_ptr_/v_ptr_ at it.
  void Allocate(int64_t capacity);
  std::byte* K(int layer) const { return mem_.get() + 2 * layer_bytes_ * layer; }
  std::byte* V(int layer) const { return K(layer) + layer_bytes_; }

  KvShape shape_;
  int64_t capacity_;
  int64_t n_max_ = 0;                       // the longest layer's slots
  SlotBook book_;                           // weights strided by capacity_
  size_t layer_bytes_ = 0;                  // one layer's K (or V): capacity_ slots
  ZeroedBuffer mem_;                        // [n_layer][K, V][capacity_][token_bytes]
  std::vector<const void*> k_ptr_, v_ptr_;  // [n_layer], one block each
  std::unique_ptr<KvWindow> tail_;          // windowed types only
};

}  // namespace cachette
