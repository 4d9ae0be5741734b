#include "cache/chunk.h"

#include <cstring>


namespace cachette::cache {

Hash128 NamespaceId(const NamespaceSpec& s) {
  // Canonical text: one "field=value" line each, in a fixed order, under a version line.
  std::string text = "cachette-namespace-v1\n";
  auto line = [&](const char* k, const std::string& v) {
    text += k;
    text += '=';
    text += std::to_string(v.size());  // length-prefixed: no value can forge a field boundary
    text += ':';
    text += v;
    text += '\n';
  };
  line("model", s.model_fingerprint.ToHex());
  line("arch", s.arch);
  line("n_layer", std::to_string(s.n_layer));
  line("n_kv_head", std::to_string(s.n_kv_head));
  line("head_dim", std::to_string(s.head_dim));
  line("kv_type", s.kv_type);
  line("layout", s.layout);
  line("rope", s.rope);
  line("adapter", s.adapter);
  line("tenant_salt", s.tenant_salt);
  return Hash128Of(ByteSpan(reinterpret_cast<const std::byte*>(text.data()), text.size()));
}

namespace {
void PutU64(std::byte* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<std::byte>(v >> (8 * i));
}
}  // namespace

namespace {
// Serializes one chain step into `buf` (32 + 4 * tokens.size() bytes) and hashes it.
ChunkKey ChainStep(std::vector<std::byte>& buf, const ChunkKey& prev, const Hash128& ns,
                   std::span<const TokenId> tokens) {
  buf.resize(32 + 4 * tokens.size());
  PutU64(buf.data(), prev.lo);
  PutU64(buf.data() + 8, prev.hi);
  PutU64(buf.data() + 16, ns.lo);
  PutU64(buf.data() + 24, ns.hi);
  for (size_t i = 0; i < tokens.size(); ++i) {
    const uint32_t t = static_cast<uint32_t>(tokens[i]);
    std::byte* p = buf.data() + 32 + 4 * i;
    for (int b = 0; b < 4; ++b) p[b] = static_cast<std::byte>(t >> (8 * b));
  }
  return Hash128Of(ByteSpan(buf.data(), buf.size()));
}
}  // namespace

ChunkKey NextChunkKey(const ChunkKey& prev, const Hash128& ns, std::span<const TokenId> tokens) {
  std::vector<std::byte> buf;
  return ChainStep(buf, prev, ns, tokens);
}

std::vector<ChunkKey> ComputeChunkKeys(const Hash128& ns, std::span<const TokenId> tokens,
                                       int chunk_tokens) {
  std::vector<ChunkKey> keys;
  if (chunk_tokens <= 0) return keys;
  const size_t n_chunks = tokens.size() / chunk_tokens;
  keys.reserve(n_chunks);
  std::vector<std::byte> buf;
  ChunkKey prev{};  // zero before the first chunk
  for (size_t c = 0; c < n_chunks; ++c) {
    prev = ChainStep(buf, prev, ns, tokens.subspan(c * chunk_tokens, chunk_tokens));
    keys.push_back(prev);
  }
  return keys;
}

uint64_t ChunkLayout::head_bytes() const {
  // Mirrors kernels::KvHeadBytes without depending on the kernels (the cache layer sees only
  // core): f32, f16, ggml q8_0 / q4_0 / q4_1 blocks of 32 elements in 34 / 18 / 20 bytes, and
  // kivi4's blocks of 32 in 20 bytes (opaque here: a kivi4 chunk holds whole key groups).
  switch (kv_type) {
    case 0: return 4ull * head_dim;
    case 1: return 2ull * head_dim;
    case 2: return head_dim % 32 == 0 ? head_dim / 32 * 34ull : 0;
    case 3: return head_dim % 32 == 0 ? head_dim / 32 * 18ull : 0;
    case 4:  // kivi4
    case 5: return head_dim % 32 == 0 ? head_dim / 32 * 20ull : 0;  // q4_1
    default: return 0;
  }
}

}  // namespace cachette::cache
