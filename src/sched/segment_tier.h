// Segments in the chunk store's tiers (RAM, disk, Redis; issue 11): how a SegmentKv
// (engine/segment_reuse.h) is filed as chunks and read back, so that a corpus computed once
// survives a restart and is shared by every server on the same Redis.
//
// Filing. A segment's layers are filed in bands (SegmentBands: at most 6; the first and the
// last layer each alone, the others evenly between), each band its own chain, so that a load
// hands over band b (its layers of every segment) while band b + 1 is still being read:
// CacheBlend's pipeline, where the prefill computes a layer while the next ones load. A lone
// first layer lets the prefill start early; a lone last layer leaves one layer's compute after
// the load. Band [first, end) of a segment computed
// after context C (SegmentKv::context, a 64-bit id) is stored as the token sequence
//   [C bits 0..31, C bits 32..63, n_tokens, first | end << 16] ++ segment tokens ++ [-1 ...]
// (whole chunks, of the band's layers) in the namespace SegmentNamespace(ns). The chunk keys,
// chained over that sequence, so name (tenant namespace, context, tokens, band) and nothing
// else: the segment's position is not in them, and its length is in every one (a segment shares
// no chunk with a longer one).
// Its own namespace keeps it away from prompt prefixes, and a tenant's clear reaches it
// (TierBridge::Clear clears both). The slots of the four leading words and of the padding
// hold zeros. The segment's metadata (segment meta v1, below) is the aux of each band's last
// chunk. The store's codec applies as to any chunk: a lossy codec is lossy for segments too.
//
// Segment meta v1 (little-endian):
//   0   4  magic "CTSG"
//   4   2  version 1
//   6   2  reserved, 0
//   8   4  n_tokens (1 .. kRecordMaxTokens)
//   12  4  n_context_chunks (0 .. 4096)
//   16  4  n_inter (0 or n_tokens)
//   20  4  reserved, 0
//   24  8  base_pos (0 .. 2^40)
//   32  8  context
//   40  8  cci (IEEE double, in [0, 1])
//   48  8 x n_context_chunks   context chunk ids
//   ..  4 x n_inter            inter (IEEE float, in [0, 1])
// Its exact size follows from the counts; anything else is refused naming the field.
// Relay segments (kRelayContext) are not filed: their base position depends on the request.
//
// Thread-safety: free functions over caller-owned data.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "cachette/cache.h"
#include "engine/segment_reuse.h"

namespace cachette::sched {

// The store namespace of `ns`'s segments.
Hash128 SegmentNamespace(const Hash128& ns);

// A band of layers [first, end).
struct LayerBand {
  int first = 0;
  int end = 0;
};
// The bands a model of `n_layer` layers files its segments in, in order.
std::vector<LayerBand> SegmentBands(int n_layer);
// The chunk layout of a band: `full`'s (the model's) with the band's layer count.
ChunkLayout BandLayout(const ChunkLayout& full, LayerBand band);

// The token sequence band `band` of a segment is filed under (see above), `chunk_tokens` per
// chunk.
std::vector<TokenId> SegmentChainTokens(std::span<const TokenId> tokens, uint64_t context,
                                        int chunk_tokens, LayerBand band);

// The metadata of `seg` in segment meta v1, and back (kCorruption naming the field).
std::vector<std::byte> EncodeSegmentMeta(const SegmentKv& seg);
struct SegmentMeta {
  uint32_t n_tokens = 0;
  int64_t base_pos = 0;
  uint64_t context = 0;
  double cci = 0.5;
  std::vector<uint64_t> context_chunks;
  std::vector<float> inter;
};
Result<SegmentMeta> DecodeSegmentMeta(ByteSpan bytes);

// Band `band` of `seg` as whole chunks of `layout` (the band's: BandLayout, layout.n_tokens per
// chunk) and the aux of each (all empty but the last's).
struct SegmentChunks {
  std::vector<std::vector<std::byte>> chunks;
  std::vector<std::vector<std::byte>> aux;
};
SegmentChunks PackSegment(const SegmentKv& seg, const ChunkLayout& layout, LayerBand band);

// Fills layers `band` of `seg` from the band's loaded chunks (in order, every one OK), for the
// segment of `tokens` after `context`. The first band (first == 0) builds `seg` from the
// metadata, with every layer's arrays allocated (so a later band only writes into them);
// a later band must find `seg` so built. kNotFound when a chunk's layout or the metadata does
// not match the request or `shape`.
Status UnpackSegmentBand(std::span<const ChunkData* const> chunks,
                         std::span<const TokenId> tokens, uint64_t context, const KvShape& shape,
                         LayerBand band, SegmentKv& seg);

}  // namespace cachette::sched
