// Per-sequence KV storage as the forward pass sees it.
//
// The forward pass reads and writes K/V only through SequenceKv, so the same code runs over a
// contiguous per-sequence buffer (ContiguousKv, below) and over pages from a shared pool (the
// paged cache in src/kv). K is stored after RoPE.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "cachette/status.h"
#include "kernels/kernels.h"

namespace cachette {

struct KvShape {
  int n_layer = 0;
  int n_kv_head = 0;
  int head_dim = 0;
  kernels::KvType type = kernels::KvType::kF16;

  // Bytes of one token's K (or V) in one layer: [n_kv_head][head_dim] elements.
  size_t token_bytes() const { return n_kv_head * kernels::KvHeadBytes(type, head_dim); }
};

class SequenceKv {
 public:
  virtual ~SequenceKv() = default;

  // Tokens whose K/V are stored: positions [0, n_tokens()).
  virtual int64_t n_tokens() const = 0;
  // Most tokens this sequence can hold.
  virtual int64_t capacity() const = 0;
  // Makes room for positions [0, n); kResourceExhausted if it cannot. Does not change n_tokens.
  virtual Status Reserve(int64_t n) = 0;
  // Where K (or V) of `layer` at position `pos` (< reserved size) goes:
  // [n_kv_head][head_dim] elements of the KV type.
  virtual void* KSlot(int layer, int64_t pos) = 0;
  virtual void* VSlot(int layer, int64_t pos) = 0;
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
  // After a forward pass wrote `count` new tokens after every layer's last slot.
  virtual void Append(int64_t count) { SetTokens(n_tokens() + count); }
};

// One contiguous buffer per layer and per K/V, laid out [capacity][n_kv_head][head_dim].
class ContiguousKv final : public SequenceKv {
 public:
  ContiguousKv(const KvShape& shape, int64_t capacity);

  int64_t n_tokens() const override { return n_tokens_; }
  int64_t capacity() const override { return capacity_; }
  Status Reserve(int64_t n) override;
  void* KSlot(int layer, int64_t pos) override;
  void* VSlot(int layer, int64_t pos) override;
  kernels::KvView View(int layer, int64_t n) const override;
  void SetTokens(int64_t n) override { n_tokens_ = n; }

  const KvShape& shape() const { return shape_; }

 private:
  KvShape shape_;
  int64_t capacity_;
  int64_t n_tokens_ = 0;
  std::vector<std::unique_ptr<std::byte[]>> k_, v_;  // [n_layer]
  std::vector<const void*> k_ptr_, v_ptr_;           // [n_layer], one block each
};

}  // namespace cachette
