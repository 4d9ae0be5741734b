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

#include <functional>
#include <memory>
#include <span>
#include <string>
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
  // Newest tokens a quantized KV type keeps in f16 (KvShape::recent); -1 = the type's default
  // (kDefaultKiviRecent for kivi4, 0 for the others).
  int kv_recent = -1;
  int64_t max_batch_tokens = 512;                   // tokens per internal micro-batch
};

class Engine {
 public:
  Engine(const Model& model, const EngineOptions& options);
  ~Engine();

  const Model& model() const { return model_; }
  const EngineOptions& options() const { return options_; }
  ThreadPool& pool() { return *pool_; }
  // The KV layout of options().kv_type, or of `type` (with options().kv_recent's window).
  KvShape kv_shape() const;
  KvShape kv_shape(kernels::KvType type) const;

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

  // The same pass over one sequence a layer at a time: every token through layer 0 (in
  // micro-batches), then layer 1, ..., each layer's slots reserved just before it is read
  // (SequenceKv::ReserveLayer) and `after_layer(l)` (may be empty) called once layer l's KV is
  // stored and its statistics collected, so the caller may compact layers [0, l] before the
  // next is read (CAKE's cascade: peak KV the kept total plus one layer). The same logits as
  // Forward() to float rounding. On error the sequence is left part-read: discard it.
  Status ForwardLayerMajor(SequenceKv& kv, std::span<const TokenId> tokens, float* logits,
                           AttentionStats* stats,
                           const std::function<Status(int layer)>& after_layer);

  // ForwardLayerMajor in steps (the scheduler reads a cascading prompt a few layers per step,
  // between other requests' batches): the residual rows of every token (tokens x d_model
  // floats) wait here between steps. The engine, sequence and statistics (may be null) must
  // outlive it; nothing else may write the sequence until it is done.
  class LayerPass {
   public:
    // Validates and embeds the tokens (kInvalidArgument as Forward would).
    static Result<std::unique_ptr<LayerPass>> Start(Engine& engine, SequenceKv& kv,
                                                    std::span<const TokenId> tokens,
                                                    AttentionStats* stats);
    // The next layer to read; done() once every layer is.
    int next_layer() const { return next_; }
    bool done() const;
    int64_t tokens() const { return static_cast<int64_t>(pos_.size()); }
    // Reads the next `layers` layers (at least one), after_layer(l) (may be empty) after each.
    // Once the last is read, the tokens' positions are appended and `logits` (may be null)
    // receives the last token's.
    Status Run(int layers, const std::function<Status(int layer)>& after_layer, float* logits);

   private:
    LayerPass(Engine& engine, SequenceKv& kv, AttentionStats* stats)
        : engine_(engine), kv_(kv), stats_(stats) {}
    Engine& engine_;
    SequenceKv& kv_;
    AttentionStats* stats_;
    std::vector<float> x_;  // [tokens][d_model]
    std::vector<int32_t> pos_;
    int next_ = 0;
  };

  // ---- The forward pass a layer at a time, for callers that compute only some of a
  // sequence's tokens, at slots they choose (segment reuse, engine/segment_reuse.h). Forward()
  // is these steps over every new token. The caller validates tokens, reserves slots and, at
  // the end, sets the sequences' token counts; these CHECK-fail on what Forward() would reject.

  // Rows of the layer-at-a-time pass are grouped in runs of consecutive slots of one sequence.
  struct Run {
    SequenceKv* kv = nullptr;
    int64_t count = 0;  // rows in this run, following the previous run's rows
    int64_t slot0 = 0;  // slot of its first row in every layer (-1 in Forward(): the layer's
                        // slot count); row j's query attends to slots [0, slot0 + j]
  };
  // x[r][d_model] = the embedding of tokens[r].
  void Embed(std::span<const TokenId> tokens, float* x) const;
  // Replaces the causal attention of ForwardLayer: given the layer, the rows' queries
  // q[n][n_head][head_dim] (RoPE applied) after their K/V went into their slots, writes the
  // attention output out[n][n_head][head_dim] (e.g. APE's attention in two parts).
  using AttentionFn = std::function<void(int layer, const float* q, int64_t n, float* out)>;
  // One transformer block over the residual rows x[n][d_model], in place: each row's K and V
  // are computed at RoPE position pos[r] and stored in its run's slot (overwriting it), its
  // query attends over its sequence's slots up to its own (or as `attention` says), then the
  // FFN.
  void ForwardLayer(int layer, float* x, int64_t n, const int32_t* pos, std::span<const Run> runs,
                    const AttentionFn& attention = {});
  // K and V [n][n_kv_head][head_dim] in f32 (bias and RoPE applied) of the residual rows x at
  // `layer`, as ForwardLayer computes them, without storing them or running attention: what a
  // caller compares with cached KV to choose the tokens to recompute.
  void ProjectKv(int layer, const float* x, int64_t n, const int32_t* pos, float* k, float* v);
  // The logits [n_vocab] of a row of the last layer's output.
  void RowLogits(const float* x_row, float* logits);

 private:
  struct Scratch;
  // ForwardLayer's body; after_attention (may be empty) sees each run's attention: the run's
  // index, its first slot, the view attended over and the layer's queries [n][n_head][head_dim].
  using AfterAttention =
      std::function<void(size_t, int64_t, const kernels::KvView&, const float*)>;
  void RunLayer(int layer, float* x, int64_t n, const int32_t* pos, std::span<const Run> runs,
                const AfterAttention& after_attention, const AttentionFn& attention = {});
  // Q (if not null), K and V of the normalized rows h at `layer`: projections, biases, RoPE.
  void Project(int layer, const float* h, int64_t n, const int32_t* pos, float* q, float* k,
               float* v);
  Status ForwardMicroBatch(std::span<Item> batch, const std::vector<int64_t>& begin,
                           const std::vector<int64_t>& count);
  // kInvalidArgument (prefixed by `where`) for a token outside the vocabulary or tokens that
  // would run past the model's context after kv's next position.
  Status CheckTokens(const SequenceKv& kv, std::span<const TokenId> tokens,
                     const std::string& where) const;
  // Sizes `stats` (may be null) to kv's capacity and the model's layers.
  void SizeStats(const SequenceKv& kv, AttentionStats* stats) const;
  // Adds to `stats` (may be null) the attention of a layer's rows [row0, row0 + count), which
  // hold tokens [begin, begin + count) of a run of `total` new tokens: every row's when it
  // collects cumulative sums, the rows of the run's last stats->window tokens to the window.
  void AddStats(AttentionStats* stats, int layer, int64_t total, int64_t begin, int64_t count,
                int64_t row0, int64_t slot0, const kernels::KvView& view, const float* q);

  const Model& model_;
  EngineOptions options_;
  std::unique_ptr<ThreadPool> pool_;
  std::unique_ptr<Scratch> scratch_;
};

}  // namespace cachette
