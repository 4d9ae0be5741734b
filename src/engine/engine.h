// The forward pass: a batch of sequences, each contributing a run of new tokens (a prefill
// chunk or a single decode token), in one call.
//
// All new tokens of the batch go through the matrix multiplies together (weights are read once
// per step, whatever the batch size); attention runs per sequence over that sequence's own
// causal range, through its SequenceKv. Each item's new tokens occupy slots
// [kv->layer_tokens(l), + tokens.size()) of every layer l, at RoPE positions from
// kv->next_position() on (both n_tokens() for a sequence that never evicts), and after a
// successful call every layer has grown by tokens.size().
//
// Thread-safety: one Forward() at a time per Engine (the scheduler loop owns it); it uses the
// engine's thread pool internally.
#pragma once

#include <memory>
#include <span>
#include <vector>

#include "cachette/status.h"
#include "core/thread_pool.h"
#include "engine/kv_budget.h"
#include "engine/kv_cache.h"
#include "model/model.h"

namespace cachette {

struct EngineOptions {
  int threads = 0;                                  // 0 = one per core
  kernels::KvType kv_type = kernels::KvType::kF16;  // element type of stored K/V
  int64_t max_batch_tokens = 512;                   // tokens per internal micro-batch
};

class Engine {
 public:
  Engine(const Model& model, const EngineOptions& options);
  ~Engine();

  const Model& model() const { return model_; }
  const EngineOptions& options() const { return options_; }
  ThreadPool& pool() { return *pool_; }
  KvShape kv_shape() const;

  // A fresh contiguous KV cache for one sequence of up to `capacity` tokens
  // (0 = the model's training context).
  std::unique_ptr<ContiguousKv> NewSequence(int64_t capacity = 0) const;

  enum class Logits { kNone, kLast, kAll };
  struct Item {
    SequenceKv* kv = nullptr;
    std::span<const TokenId> tokens;
    Logits logits = Logits::kLast;
    // kLast: [n_vocab]; kAll: [tokens.size()][n_vocab]. Owned by the caller.
    float* logits_out = nullptr;
    // Attention statistics for a KV budget policy (engine/kv_budget.h); null = none. Sized by
    // the engine to the sequence's capacity.
    AttentionStats* stats = nullptr;
  };

  // Runs the batch. kInvalidArgument for an empty item, a token id outside the vocabulary, or
  // a missing logits buffer; kResourceExhausted when a sequence's KV cannot hold its new tokens
  // (e.g. a prompt longer than the context). On error no sequence's n_tokens() changes.
  Status Forward(std::span<Item> batch);

  // Convenience: one sequence, logits of the last token into `logits` (may be null).
  Status Forward(SequenceKv& kv, std::span<const TokenId> tokens, float* logits);

 private:
  struct Scratch;
  Status ForwardMicroBatch(std::span<Item> batch, const std::vector<int64_t>& begin,
                           const std::vector<int64_t>& count);

  const Model& model_;
  EngineOptions options_;
  std::unique_ptr<ThreadPool> pool_;
  std::unique_ptr<Scratch> scratch_;
};

}  // namespace cachette
