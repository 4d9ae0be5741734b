// Chunk records: the self-checking byte form of one chunk, as stored by the disk and Redis
// tiers. The byte layout, its checks and their order are specified in docs/formats/chunk.md;
// this file is its only reader and writer.
//
// Thread-safety: free functions over caller-owned memory; safe to call concurrently.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "cache/chunk.h"
#include "cachette/status.h"
#include "cachette/types.h"

namespace cachette::cache {

inline constexpr uint8_t kRecordMagic[4] = {'C', 'T', 'K', 'V'};
// Version 1: no aux section. Version 2: an aux section (flags bit 0) after the token ids. A
// writer writes version 1 whenever a record has no aux bytes, so such records read the same
// everywhere; only records with aux bytes need a reader of version 2.
inline constexpr uint16_t kRecordVersion = 1;
inline constexpr uint16_t kRecordVersionAux = 2;
inline constexpr uint16_t kRecordFlagAux = 1;
inline constexpr size_t kRecordFixedBytes = 120;  // before the token ids
inline constexpr uint32_t kRecordMaxTokens = 65536;
inline constexpr uint64_t kRecordMaxRawBytes = uint64_t{1} << 40;
inline constexpr uint32_t kRecordMaxAuxBytes = uint32_t{1} << 20;

// Everything in a record but the token ids and the payload.
struct RecordMeta {
  Hash128 ns;
  ChunkKey key;
  ChunkKey parent;  // zero for chunk 0
  uint32_t codec_id = 0;
  uint32_t codec_version = 1;
  ChunkLayout layout;
  uint32_t chunk_index = 0;
  uint64_t raw_bytes = 0;  // layout.raw_bytes(): the decoded size
  // Bytes the writer files with the chunk for its own use (0 .. kRecordMaxAuxBytes; the store
  // never looks inside). Covered by the header checksum; kept through every codec.
  std::vector<std::byte> aux;
  bool operator==(const RecordMeta&) const = default;
};

// A decoded header: sizes and the token ids, without the payload.
struct RecordHeader {
  RecordMeta meta;
  std::vector<TokenId> tokens;
  uint64_t header_bytes = 0;
  uint64_t payload_bytes = 0;
  uint64_t payload_xxh3 = 0;
  uint64_t record_bytes() const { return header_bytes + payload_bytes; }
};

// A fully verified record; `payload` points into the bytes given to DecodeRecord (borrowed:
// valid while they are).
struct RecordView {
  RecordHeader header;
  ByteSpan payload;
};

// Bytes of the record header for `n_tokens` token ids and `aux_bytes` aux bytes (fixed part +
// ids + [aux length + aux] + checksum).
inline uint64_t RecordHeaderBytes(uint64_t n_tokens, uint64_t aux_bytes = 0) {
  return kRecordFixedBytes + 4 * n_tokens + (aux_bytes == 0 ? 0 : 4 + aux_bytes) + 8;
}

// The key a record must carry: XXH3-128(parent || ns || tokens), as ComputeChunkKeys.
ChunkKey ChainKey(const ChunkKey& parent, const Hash128& ns, std::span<const TokenId> tokens);

// Encodes a record. `meta.key` must equal ChainKey(meta.parent, meta.ns, tokens) and
// `meta.raw_bytes` must equal `meta.layout.raw_bytes()`; kInvalidArgument naming the field
// otherwise (so a writer can never produce a record its reader would refuse).
Result<std::vector<std::byte>> EncodeRecord(const RecordMeta& meta,
                                            std::span<const TokenId> tokens, ByteSpan payload);

// Encodes a record into `out` (resized), for callers that reuse a buffer or write in place.
Status EncodeRecordInto(const RecordMeta& meta, std::span<const TokenId> tokens,
                        ByteSpan payload, std::vector<std::byte>& out);

// Verifies and decodes a whole record (both checksums). kCorruption naming the failed field
// ("record magic", "record payload checksum", ...). Never reads out of `bytes`.
Result<RecordView> DecodeRecord(ByteSpan bytes);

// Verifies and decodes the header only. `prefix` is the start of the record (at least
// RecordHeaderBytes(n_tokens) bytes, or the whole record if shorter); `record_size` is the size
// of the whole record, checked against payload_bytes. The payload checksum is not verified.
Result<RecordHeader> DecodeRecordHeader(ByteSpan prefix, uint64_t record_size);

// How many leading bytes DecodeRecordHeader needs, judged from the first 16 bytes of a record
// (its header_bytes field; kRecordFixedBytes + 8 if fewer are given). Clamped to the largest
// valid header, so the answer is bounded whatever the bytes say.
uint64_t RecordHeaderBytesNeeded(ByteSpan prefix);

}  // namespace cachette::cache
