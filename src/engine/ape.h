// APE, Adaptive Parallel Encoding (Yang, Chen and Chen, ICLR'25): a prompt of a shared prefix,
// several documents and a query, where the documents are encoded in parallel, each on its own
// after the prefix and all at the same positions, so that each document's KV can be computed
// once and cached (a SegmentKv computed after the prefix) and no document token is ever
// recomputed: a prompt costs only its query.
//
// Layout of a sequence's slots after PrefillApe (P prefix tokens, documents of lengths
// L_0, L_1, ... with D = sum L_d and L = max L_d, Q query tokens):
//   slots [0, P)                 the prefix, at positions 0 .. P-1
//   slots [P, P + D)             the documents one after another; document d at positions
//                                P .. P + L_d - 1 (every document starts at P)
//   slots [P + D, P + D + Q + g) the query, then g generated tokens, at positions P + L, P + L + 1,
//                                ... (the query follows the longest document: the authors'
//                                code gives it the largest position in the cache, plus one)
// Slot and position part ways, so the sequence's next_position() is not the next token's
// position: extend it only with DecodeApe (WART: Engine::Forward on it would give the next
// token position P + D + Q + g, not P + L + Q + g: off by D - L with several documents).
//
// Attention. The prefix attends causally to itself, each document to the prefix and causally
// to itself, never to another document (its KV comes from its SegmentKv, computed that way).
// A query or generated token with scores
// s_j = q.k_j / sqrt(head_dim) attends in two parts, after the authors' public code
// (github.com/Infini-AI-Lab/APE, ape/ape_llama.py, llama_attention_prefill_query):
//   documents  C = every document slot:       o_C = softmax_C(s / T) V,  l_C = log sum_C e^(s_j/T)
//   the rest   O = the prefix, the query and generated tokens up to this one (causal):
//                                            o_O = softmax_O(s) V,      l_O = log sum_O e^(s_j)
//   out = (e^(S T l_C) o_C + e^(l_O) o_O) / (e^(S T l_C) + e^(l_O))
// with temperature T and scale S (ApeOptions): the documents' weight e^(S T l_C) is
// (sum_C e^(s_j/T))^(S T), each document key's share e^(s_j/T + (S T - 1) l_C). At T = S = 1
// this is exactly softmax over all of C and O: one document then gives the ordinary prefill of
// prefix + document + query (float rounding aside), and several give plain parallel encoding.
// The rest's part is itself merged from two ranges (prefix, query) the same way, by
// kernels::AttentionLse.
//
// Thread-safety: uses the engine (one call at a time per Engine).
#pragma once

#include <cstdint>
#include <span>

#include "cachette/status.h"
#include "engine/engine.h"
#include "engine/segment_reuse.h"

namespace cachette {

struct ApeOptions {
  double temperature = 0.9;  // T > 0: the documents' scores are divided by T
  double scale = 0.9;        // S > 0: the documents' log-sum-exp is multiplied by S * T
};

// Where a sequence's slots stand after PrefillApe (see the layout above); DecodeApe reads it.
struct ApeState {
  int64_t prefix_tokens = 0;  // P
  int64_t doc_tokens = 0;     // D: the documents' slots, all together
  int64_t doc_span = 0;       // L: the longest document; the query starts at position P + L
  ApeOptions options;

  // The RoPE position of the token in `slot` (>= P + D).
  int64_t PositionOf(int64_t slot) const { return slot - doc_tokens + doc_span; }
};

// Fills `kv` with the prefix, the documents and the query laid out as above, computes the
// query with APE's attention, writes its last token's logits [n_vocab] to `logits` (may be
// null) and the layout to `state` (may be null; DecodeApe needs it).
//   kv      holds the exact KV of the first kv.n_tokens() tokens of `prefix` (0 is fine: the
//           rest of the prefix is computed here, causally) and has never been compacted.
//   docs    each computed after exactly `prefix` (ComputeSegment(engine, prefix, doc): its
//           base_pos is P and its context ContextId(prefix)), so its keys already sit at
//           positions P.. and are copied as they are. Borrowed for the call only. May be empty
//           (then this is the ordinary prefill of prefix + query).
//   query   at least one token.
// kInvalidArgument, naming the problem, for: T or S not positive and finite, an empty query, a
// token outside the vocabulary, kv holding more tokens than the prefix or compacted, a null or
// empty document, a document computed after another context or starting at another position
// than P, a document whose KV shape or sizes are not the engine's, or P + L + Q beyond the
// model's context; kResourceExhausted when kv cannot hold P + D + Q slots. Inputs are checked
// before anything is written; after a later error (none is expected past the checks) kv keeps
// its tokens.
Status PrefillApe(Engine& engine, SequenceKv& kv, std::span<const TokenId> prefix,
                  std::span<const SegmentKv* const> docs, std::span<const TokenId> query,
                  const ApeOptions& options, float* logits, ApeState* state);

// Appends `tokens` (generated ones, or a follow-up turn) to a sequence laid out by PrefillApe
// and extended only by DecodeApe since, computing them with APE's attention as the query was
// (they attend to the documents in the documents' part, to the prefix and every query and
// generated token before them in the rest). Writes the last token's logits [n_vocab] to
// `logits` (may be null). kInvalidArgument for no tokens, a token outside the vocabulary, a
// state that does not fit kv (fewer slots than P + D + 1, or options out of range), or positions
// beyond the model's context; kResourceExhausted when kv cannot grow. On error kv is unchanged.
Status DecodeApe(Engine& engine, SequenceKv& kv, const ApeState& state,
                 std::span<const TokenId> tokens, float* logits);

}  // namespace cachette
