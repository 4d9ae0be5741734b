// Reusing a segment's KV anywhere in a prompt, not only as an exact prefix (issue 11).
//
// A segment (a retrieved document, a tool's output) is computed once on its own, after some
// context (a shared system prefix, or nothing), and its KV kept with the RoPE position it
// started at and an id of that context (SegmentKv). A later prompt may contain the segment's
// tokens anywhere, after other text. PrefillWithSegments builds that prompt's KV from the
// cached segments and computes the rest, in one of these modes:
//   full    every token computed; the caches are ignored (the quality baseline).
//   prefix  exact prefix reuse only: the sequence's own KV, then cached segments that sit
//           where they were computed, after the same context, as long as they follow on.
//   naive   every cached segment is placed at its new position (keys re-rotated by the
//           position difference), nothing of it recomputed: the cross-attention between a
//           segment and what precedes it is simply missing (what llama.cpp's --cache-reuse
//           does by shifting).
//   blend   CacheBlend (Yao et al., EuroSys'25): placed as in naive, then the share `ratio` of
//           the placed tokens whose KV deviates most from what a full prefill gives is
//           recomputed. Every layer below `check_layer` is computed for every token (layer 0's
//           K/V do not depend on the context, so the deviation first shows in layer 1's); at
//           the check layer the K/V of every token are projected and compared with the cached
//           ones, the candidates (widen x ratio of them) go on, and the next layer narrows them
//           to `ratio` by its own deviation (gradual filtering). Tokens in no cache and the
//           prompt's last token are computed through every layer. Ratio 1 is full prefill.
//   cachecraft  Cache-Craft (SIGMOD'25): placed as in naive, then each segment's share
//           CacheCraftShare (from metadata stored with it and how its context changed) of its
//           tokens recomputed through every layer, those of largest inter-attention: as stored
//           when it was computed (CraftChoice::kStored; no check layer, nothing is computed for
//           the other tokens), or as measured in this prompt (kPrompt: layer 0, whose keys do
//           not depend on the context, runs for every token and gives each placed token's
//           attention to what now precedes its segment and did not when it was computed).
// In every mode but full, segments in place after their own context are exact and kept as a
// prefix; only what follows them is approximate.
//
// Thread-safety: uses the engine (one call at a time per Engine).
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string_view>
#include <vector>

#include "cachette/status.h"
#include "engine/engine.h"

namespace cachette {

// Rotates `n_tok` stored keys in place by `delta` positions (negative allowed): each token's
// [n_kv_head][head_dim] elements of shape.type, shape.token_bytes() apart. Rotations compose,
// so a key rotated to position p and then by delta is the key at p + delta up to float
// rounding (and, for a quantized KV type, its re-quantization).
void RotateStoredKeys(void* k, int64_t n_tok, const KvShape& shape, int64_t delta,
                      const kernels::RopeParams& rope);

// The id of the context a segment was computed after: a hash of its tokens (0 tokens: 0).
uint64_t ContextId(std::span<const TokenId> tokens);
// The context of a segment that an earlier request generated (RelayCaching): its KV was
// computed after that request's prompt, which no later prompt names, so such segments are
// filed under this one id and are never taken for an exact prefix.
inline constexpr uint64_t kRelayContext = ~uint64_t{0};

// The KV of a segment computed on its own after `context`, with Cache-Craft's metadata.
struct SegmentKv {
  std::vector<TokenId> tokens;
  int64_t base_pos = 0;  // the RoPE position of its first token (the context's length)
  uint64_t context = 0;  // ContextId of the tokens it was computed after
  // The segments (ContextId of their tokens) its context held, in order: Cache-Craft's "prefix
  // chunks" (empty when it was computed after a plain prefix such as BOS).
  std::vector<uint64_t> context_chunks;
  KvShape shape;
  // [layer]: [n_tokens][n_kv_head][head_dim] elements of shape.type, keys rotated to
  // base_pos, base_pos + 1, ...
  std::vector<std::vector<std::byte>> k, v;
  // Cache-Craft's attention profile, measured while it was computed: inter[i] = the attention
  // mass token i gave to the context (outside the segment), averaged over layers and query
  // heads; cci = sigmoid(mean over layers of inter / intra mass), its context dependence.
  // Computed after BOS alone, the context is the attention sink: mass a token finds nowhere
  // in its own segment. Empty inter (and cci 0.5) when no context preceded it.
  std::vector<float> inter;
  double cci = 0.5;

  size_t bytes() const;
};

// Computes `context` then `tokens` in a fresh sequence and returns the KV of `tokens` with
// its attention profile. `context_chunks`: the segments the context held (see SegmentKv).
// kInvalidArgument for no tokens or what Engine::Forward rejects.
Result<SegmentKv> ComputeSegment(Engine& engine, std::span<const TokenId> context,
                                 std::span<const TokenId> tokens,
                                 std::span<const uint64_t> context_chunks = {});

// Copies slots [begin, end) of every layer of `kv` into seg.k and seg.v, laid out as SegmentKv
// says (seg.shape set first, matching kv's).
void CopySegmentKv(SequenceKv& kv, int64_t begin, int64_t end, SegmentKv& seg);

// Cache-Craft's share of a placed segment to recompute: CFO = alpha * cci * (1 - beta'),
// clamped to [0, 1], where beta' = beta * (1 - gamma): beta is the share of the segment's old
// context chunks found among the chunks before it now, gamma the normalised Kendall-tau
// distance between their old and new orders (0 same order, 1 reversed).
double CacheCraftShare(const SegmentKv& seg, std::span<const uint64_t> chunks_before,
                       double alpha);

// kApe names APE's parallel encoding (engine/ape.h), which lays documents out differently:
// PrefillWithSegments refuses it; callers dispatch to PrefillApe.
enum class ReuseMode { kFull, kPrefix, kNaive, kBlend, kCacheCraft, kApe };
std::string_view ReuseModeName(ReuseMode mode);
// "full", "prefix", "naive", "blend", "cachecraft" or "ape"; kInvalidArgument naming the
// accepted ones otherwise.
Result<ReuseMode> ParseReuseMode(std::string_view name);

// Which tokens of a placed segment Cache-Craft recomputes (how many: CacheCraftShare).
enum class CraftChoice {
  // Those of largest SegmentKv::inter, the attention they gave to their context when the
  // segment was computed. Costs nothing at reuse; blind to what precedes the segment now.
  kStored,
  // Those of largest inter-attention in this prompt: the attention mass their layer-0 queries
  // give to the slots between the segment's old context (when the prompt starts with it, else
  // from slot 0) and the segment. Layer 0's keys do not depend on the context, so this is the
  // attention a full prefill computes there, exactly. Costs layer 0 for every token, which
  // every selected token needs anyway; the others' layer-0 K/V are rewritten, equal to the
  // placed ones up to rounding.
  kPrompt,
};

std::string_view CraftChoiceName(CraftChoice choice);  // "stored" or "prompt"
// kInvalidArgument naming the accepted ones for any other name.
Result<CraftChoice> ParseCraftChoice(std::string_view name);

struct ReuseOptions {
  ReuseMode mode = ReuseMode::kPrefix;
  // blend: share of the placed tokens recomputed; cachecraft: alpha (CacheCraftShare); [0, 1]
  double ratio = 0.15;
  CraftChoice craft_choice = CraftChoice::kStored;  // cachecraft: which tokens
  int check_layer = 1;   // blend: the layer whose K/V deviation picks them (< n_layer)
  double widen = 2.0;    // blend: candidates at the check layer, as a multiple of ratio (>= 1;
                         // 1 = one-shot selection)
};

// Segment KV still arriving from a tier while PrefillWithSegments runs (CacheBlend's pipeline).
struct SegmentLoad {
  // Returns once layers [0, layer] of every segment are in; an error ends the prefill with it.
  // Called in ascending layer order, once each, before layer `layer` of any segment is read.
  std::function<Status(int layer)> await_layer;
  // CacheBlend's loading controller, when set (blend only): how long the load still runs, in
  // microseconds, at the pace it has kept (0 once done). Read at the check layer, where the
  // ratio is raised so that the rows left to compute take about that long
  // (PipelinedBlendRatio), with the cost of a row through a layer measured on the layers below
  // in this very call; the last layer then computes the rows of the ratio asked for
  // (ReuseReport::recomputed_* count the raised rows, which went through every layer but the
  // last).
  std::function<double()> load_left_us;
};

// A cached segment in a prompt: its tokens are the prompt's [offset, offset + size).
struct SegmentUse {
  int64_t offset = 0;
  const SegmentKv* kv = nullptr;
};

struct ReuseReport {
  int64_t prefix_tokens = 0;      // exact: in the sequence before, or segments in place
  int64_t reused_tokens = 0;      // cached segment tokens placed at a new position/context
  int64_t recomputed_tokens = 0;  // of those, recomputed through the upper (blend) or all
                                  // (cachecraft) layers
  int64_t computed_tokens = 0;    // tokens in no cache (and the last one), computed in full
  // The slots of the recomputed placed tokens, ascending (recomputed_tokens of them).
  std::vector<int64_t> recomputed_slots;
  // Rows run through a layer, summed over the layers (the layer-at-a-time pass; 0 when the
  // prompt went through Engine::Forward): what the prefill cost in token-layers.
  int64_t row_layers = 0;
  // Time spent waiting for segment KV still being loaded (await_layer), in microseconds.
  int64_t load_wait_us = 0;
  // blend: the ratio applied (ReuseOptions::ratio, or what the loading controller raised it to).
  double ratio = 0;
};

// Fills `kv` with the KV of `prompt` and writes the last token's logits [n_vocab] (may be
// null). When any segment was placed, kv.MarkInexactFrom(the exact prefix's end) keeps the
// approximate slots out of exact caches. `kv` holds the exact KV of the prompt's first kv.n_tokens() tokens (fewer than the
// prompt's; 0 is fine) and has never been compacted. `segments` are sorted and disjoint; a
// segment that starts before kv.n_tokens() is not used (its later tokens are computed).
// kInvalidArgument for mode kApe, a segment whose tokens differ from the prompt's or whose KV
// shape is not the engine's, a ratio outside [0, 1], a check layer outside the model, or what
// Engine::Forward rejects; kResourceExhausted when kv cannot hold the prompt. On error kv
// keeps its tokens (slots past them may have been written).
//
// Pipelined loading (CacheBlend's): with `load`, the segments' KV may still be arriving, a
// layer band at a time, from a tier read running beside this call. Then load->await_layer(l)
// is called (in ascending l, once each, and only when some segment is placed) before layer l
// of any segment is read; its error ends the call with that error (kv keeps its tokens). The
// placed KV of layer l is copied in just before layer l is computed, so the load of the later
// layers runs under the compute of the earlier. The result does not depend on when the layers
// arrive; with load->load_left_us set (the loading controller), blend's ratio does.
Status PrefillWithSegments(Engine& engine, SequenceKv& kv, std::span<const TokenId> prompt,
                           std::span<const SegmentUse> segments, const ReuseOptions& options,
                           float* logits, ReuseReport* report,
                           const SegmentLoad* load = nullptr);

// CacheBlend's loading controller. When the segments' KV is loaded a layer at a time under the
// compute of the earlier layers, recomputing more costs nothing as long as the compute ends no
// later than the load. The last layer needs the last band, so its compute always follows the
// load: a raised blend narrows back to the ratio asked for there (PrefillWithSegments), and the
// layers that can hide under the load are the check layer and those above it but the last.
// With `layers_left` such layers, `time_left_us` of load still to come, a row through a layer
// costing `row_layer_us`, `placed` tokens placed and `other_rows` computed anyway (tokens in no
// cache, the last), blend at ratio r computes r x placed x (widen + layers_left - 1) rows of
// placed tokens there (widen x r at the check layer, r above it) and other_rows x layers_left
// others. This is the r whose rows take time_left_us, never below `min_ratio` (the quality
// floor asked for) nor above 1; `min_ratio` when a cost is unknown (<= 0) or nothing is
// placed.
double PipelinedBlendRatio(double min_ratio, int64_t placed_tokens, int64_t other_rows,
                           int layers_left, double widen, double row_layer_us,
                           double time_left_us);

}  // namespace cachette
