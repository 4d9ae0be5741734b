// Passing a sequence's KV through a cache codec, as a restore from the chunk store would.
//
// The store keeps KV in chunks of `chunk_tokens` consecutive positions, cut at multiples of
// chunk_tokens from position 0, in the layer-major chunk layout of src/cache/chunk.h:
//   [n_layer][2 (K, V)][n_tokens][n_kv_head][head_dim] elements of the KV type.
// RoundTripKv copies positions out of a SequenceKv into that layout, encodes and decodes them
// with a codec, and writes the decoded bytes back into a SequenceKv, so a forward pass that
// follows attends to exactly the values a restored prefix would hold.
//
// Thread-safety: the functions touch only their arguments; one call per sequence at a time.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "cache/chunk.h"
#include "cache/codecs/codec.h"
#include "cachette/status.h"
#include "engine/kv_cache.h"

namespace cachette::eval {

// Totals over the chunks one or more RoundTripKv calls passed through a codec.
struct RoundTripStats {
  int64_t tokens = 0;          // positions round-tripped
  uint64_t raw_bytes = 0;      // chunk bytes before encoding
  uint64_t encoded_bytes = 0;  // payload bytes, the 40-byte codec header included
  double encode_seconds = 0;
  double decode_seconds = 0;

  double bytes_per_token() const {
    return tokens > 0 ? static_cast<double>(encoded_bytes) / static_cast<double>(tokens) : 0;
  }
};

// The chunk layout of `n_tokens` positions of a sequence of `shape`.
cache::ChunkLayout LayoutFor(const KvShape& shape, int64_t n_tokens);

// Copies positions [begin, begin + n) of `kv` (all reserved) into `chunk` in chunk layout
// (chunk.size() == LayoutFor(shape, n).raw_bytes()), or back when `to_kv`. Does not change
// kv.n_tokens().
void CopyKvChunk(SequenceKv& kv, const KvShape& shape, int64_t begin, int64_t n,
                 std::span<std::byte> chunk, bool to_kv);

// Round-trips positions [begin, end) of `src` through `codec` into the same positions of
// `dst` (which may be `src`): chunk boundaries fall at multiples of `chunk_tokens`, and a
// range that starts or ends inside a chunk is encoded as the partial chunk it covers (a
// trailing partial chunk is round-tripped too, not left exact). Requires begin <=
// dst.n_tokens() and end <= src.n_tokens(); afterwards dst.n_tokens() == end.
// Errors: kInvalidArgument for a bad range or chunk_tokens, or when the codec refuses the KV
// type (e.g. int4 of q8_0 KV); the codec's own errors; kResourceExhausted when dst cannot hold
// `end` positions. Adds to `stats` when non-null.
Status RoundTripKv(const cache::Codec& codec, const KvShape& shape, int chunk_tokens,
                   SequenceKv& src, SequenceKv& dst, int64_t begin, int64_t end,
                   RoundTripStats* stats);

}  // namespace cachette::eval
