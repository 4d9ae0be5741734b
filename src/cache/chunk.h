// Chunks: the unit the KV cache layer stores, keyed by content.
//
// A chunk is the KV of `chunk_tokens` consecutive tokens (default 256) of one sequence, all
// layers, in layer-major layout so a reader can stream layer by layer:
//   [n_layer][2 (K, V)][n_tokens][n_kv_head][head_dim] elements of `kv_type`
// (for q8_0 / q4_0, each head vector is head_dim/32 ggml blocks of 34 / 18 bytes).
//
// Keys are content addresses, chained so a key names the whole prefix up to its chunk:
//   key[0] = XXH3-128(zero128 || namespace || token ids of chunk 0)
//   key[i] = XXH3-128(key[i-1] || namespace || token ids of chunk i)
// with 128-bit values serialized as lo then hi, little-endian, and token ids as int32 LE.
// Deterministic across processes and machines (no seeds), so instances sharing a Redis tier hit
// each other's chunks. A stored chunk also carries its namespace and token ids; readers verify
// them, so a hash collision is a miss, never wrong data.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "cachette/status.h"
#include "cachette/types.h"
#include "core/hash.h"

namespace cachette::cache {

using ChunkKey = Hash128;

// Everything that changes the bytes of a chunk. Two requests share chunks only when all of
// these are equal.
struct NamespaceSpec {
  Hash128 model_fingerprint;  // weights identity (Model::Fingerprint)
  std::string arch;           // "llama", "qwen2"
  uint32_t n_layer = 0, n_kv_head = 0, head_dim = 0;
  std::string kv_type;        // stored KV type: f32, f16, q8_0, q4_0, kivi4, q4_1
  std::string layout = "layer-major-v1";
  std::string rope;           // e.g. "normal theta=10000 scale=1"
  std::string adapter;        // "" when none
  std::string tenant_salt;    // "" = the shared namespace
};

// The namespace id: XXH3-128 of a canonical text serialization of `spec` (versioned, so a
// change of the serialization changes every id rather than aliasing old ones).
Hash128 NamespaceId(const NamespaceSpec& spec);

// The key of the block `tokens` that follows the block keyed `prev` (zero before the first):
// the chain step above. Radix pages (KV events) use it with page-sized blocks.
ChunkKey NextChunkKey(const ChunkKey& prev, const Hash128& ns, std::span<const TokenId> tokens);

// Keys of the full chunks of `tokens` (a trailing partial chunk gets no key).
std::vector<ChunkKey> ComputeChunkKeys(const Hash128& ns, std::span<const TokenId> tokens,
                                       int chunk_tokens);

// Describes the raw bytes of a chunk.
struct ChunkLayout {
  uint32_t n_layer = 0;
  uint32_t n_kv_head = 0;
  uint32_t head_dim = 0;
  uint32_t n_tokens = 0;
  uint32_t kv_type = 1;  // kernels::KvType: 0 f32, 1 f16, 2 q8_0, 3 q4_0, 4 kivi4, 5 q4_1

  // Bytes of one head vector of the element type (0 if unknown), and of the whole raw chunk.
  uint64_t head_bytes() const;
  uint64_t raw_bytes() const { return uint64_t{n_layer} * 2 * n_tokens * n_kv_head * head_bytes(); }
  bool operator==(const ChunkLayout&) const = default;
};

}  // namespace cachette::cache
