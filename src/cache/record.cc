#include "cache/record.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "core/bytes.h"
#include "core/hash.h"

namespace cachette::cache {
namespace {

// Field offsets (docs/formats/chunk.md).
constexpr size_t kOffMagic = 0, kOffVersion = 4, kOffFlags = 6, kOffHeaderBytes = 8,
                 kOffNTokens = 12, kOffNs = 16, kOffKey = 32, kOffParent = 48, kOffCodecId = 64,
                 kOffCodecVersion = 68, kOffLayout = 72, kOffChunkIndex = 92, kOffRawBytes = 96,
                 kOffPayloadBytes = 104, kOffPayloadXxh3 = 112, kOffTokens = 120;

void PutHash(std::byte* p, const Hash128& h) {
  PutLe64(p, h.lo);
  PutLe64(p + 8, h.hi);
}
Hash128 GetHash(const std::byte* p) { return Hash128{GetLe64(p), GetLe64(p + 8)}; }

Status Bad(const std::string& field, const std::string& why) {
  return Corruption("record " + field + ": " + why);
}

Status CheckMeta(const RecordMeta& m, std::span<const TokenId> tokens) {
  if (tokens.empty() || tokens.size() > kRecordMaxTokens) {
    return InvalidArgument("record n_tokens: " + std::to_string(tokens.size()) +
                           " not in 1.." + std::to_string(kRecordMaxTokens));
  }
  if (m.layout.n_tokens != tokens.size()) {
    return InvalidArgument("record layout.n_tokens " + std::to_string(m.layout.n_tokens) +
                           " != " + std::to_string(tokens.size()) + " token ids");
  }
  if (m.raw_bytes == 0 || m.raw_bytes != m.layout.raw_bytes() ||
      m.raw_bytes > kRecordMaxRawBytes) {
    return InvalidArgument("record raw_bytes " + std::to_string(m.raw_bytes) +
                           " != layout.raw_bytes() " + std::to_string(m.layout.raw_bytes()));
  }
  if (ChainKey(m.parent, m.ns, tokens) != m.key) {
    return InvalidArgument("record key is not XXH3-128(parent || namespace || tokens)");
  }
  if (m.aux.size() > kRecordMaxAuxBytes) {
    return InvalidArgument("record aux: " + std::to_string(m.aux.size()) + " bytes, at most " +
                           std::to_string(kRecordMaxAuxBytes));
  }
  return Status::Ok();
}

}  // namespace

ChunkKey ChainKey(const ChunkKey& parent, const Hash128& ns, std::span<const TokenId> tokens) {
  // Same byte string as ComputeChunkKeys (chunk.h); one buffer so it is a single XXH3 call.
  std::vector<std::byte> buf(32 + 4 * tokens.size());
  PutHash(buf.data(), parent);
  PutHash(buf.data() + 16, ns);
  for (size_t i = 0; i < tokens.size(); ++i) {
    PutLe32(buf.data() + 32 + 4 * i, static_cast<uint32_t>(tokens[i]));
  }
  return Hash128Of(ByteSpan(buf.data(), buf.size()));
}

Status EncodeRecordInto(const RecordMeta& m, std::span<const TokenId> tokens, ByteSpan payload,
                        std::vector<std::byte>& out) {
  CT_RETURN_IF_ERROR(CheckMeta(m, tokens));
  if (m.codec_id == 0 && payload.size() != m.raw_bytes) {
    return InvalidArgument("record payload: raw codec needs " + std::to_string(m.raw_bytes) +
                           " bytes, got " + std::to_string(payload.size()));
  }
  const uint64_t header_bytes = RecordHeaderBytes(tokens.size(), m.aux.size());
  out.resize(header_bytes + payload.size());
  std::byte* p = out.data();
  const bool aux = !m.aux.empty();
  std::memcpy(p + kOffMagic, kRecordMagic, 4);
  PutLe16(p + kOffVersion, aux ? kRecordVersionAux : kRecordVersion);
  PutLe16(p + kOffFlags, aux ? kRecordFlagAux : 0);
  PutLe32(p + kOffHeaderBytes, static_cast<uint32_t>(header_bytes));
  PutLe32(p + kOffNTokens, static_cast<uint32_t>(tokens.size()));
  PutHash(p + kOffNs, m.ns);
  PutHash(p + kOffKey, m.key);
  PutHash(p + kOffParent, m.parent);
  PutLe32(p + kOffCodecId, m.codec_id);
  PutLe32(p + kOffCodecVersion, m.codec_version);
  const uint32_t layout[5] = {m.layout.n_layer, m.layout.n_kv_head, m.layout.head_dim,
                              m.layout.n_tokens, m.layout.kv_type};
  for (int i = 0; i < 5; ++i) PutLe32(p + kOffLayout + 4 * i, layout[i]);
  PutLe32(p + kOffChunkIndex, m.chunk_index);
  PutLe64(p + kOffRawBytes, m.raw_bytes);
  PutLe64(p + kOffPayloadBytes, payload.size());
  PutLe64(p + kOffPayloadXxh3, Hash64(payload));
  for (size_t i = 0; i < tokens.size(); ++i) {
    PutLe32(p + kOffTokens + 4 * i, static_cast<uint32_t>(tokens[i]));
  }
  if (aux) {
    std::byte* a = p + kOffTokens + 4 * tokens.size();
    PutLe32(a, static_cast<uint32_t>(m.aux.size()));
    std::memcpy(a + 4, m.aux.data(), m.aux.size());
  }
  const size_t checked = header_bytes - 8;
  PutLe64(p + checked, Hash64(ByteSpan(p, checked)));
  if (!payload.empty()) std::memcpy(p + header_bytes, payload.data(), payload.size());
  return Status::Ok();
}

Result<std::vector<std::byte>> EncodeRecord(const RecordMeta& meta,
                                            std::span<const TokenId> tokens, ByteSpan payload) {
  std::vector<std::byte> out;
  CT_RETURN_IF_ERROR(EncodeRecordInto(meta, tokens, payload, out));
  return out;
}

uint64_t RecordHeaderBytesNeeded(ByteSpan prefix) {
  if (prefix.size() < kOffHeaderBytes + 4) return RecordHeaderBytes(0);
  const uint64_t claimed = GetLe32(prefix.data() + kOffHeaderBytes);
  return std::clamp<uint64_t>(claimed, RecordHeaderBytes(0),
                              RecordHeaderBytes(kRecordMaxTokens, kRecordMaxAuxBytes));
}

Result<RecordHeader> DecodeRecordHeader(ByteSpan b, uint64_t record_size) {
  // Every length below is used only after the check that bounds it (format doc, check order).
  if (record_size < RecordHeaderBytes(0) || b.size() < RecordHeaderBytes(0)) {
    return Bad("header", "truncated: " + std::to_string(record_size) + " bytes");
  }
  const std::byte* p = b.data();
  if (std::memcmp(p + kOffMagic, kRecordMagic, 4) != 0) return Bad("magic", "not CTKV");
  const uint16_t version = GetLe16(p + kOffVersion);
  if (version != kRecordVersion && version != kRecordVersionAux) {
    return Bad("version", std::to_string(version) + " (this reader knows 1 and 2)");
  }
  const bool aux = version == kRecordVersionAux;
  if (GetLe16(p + kOffFlags) != (aux ? kRecordFlagAux : 0)) {
    return Bad("flags", aux ? "version 2 without the aux flag" : "reserved bits set");
  }
  const uint32_t n_tokens = GetLe32(p + kOffNTokens);
  if (n_tokens == 0 || n_tokens > kRecordMaxTokens) {
    return Bad("n_tokens", std::to_string(n_tokens) + " not in 1.." +
                               std::to_string(kRecordMaxTokens));
  }
  const uint64_t header_bytes = GetLe32(p + kOffHeaderBytes);
  // Version 2's aux length is read (below) only once the header checksum covers it; here the
  // claimed size is only bounded.
  if (aux ? header_bytes <= RecordHeaderBytes(n_tokens, 0) + 4 ||
                header_bytes > RecordHeaderBytes(n_tokens, kRecordMaxAuxBytes)
          : header_bytes != RecordHeaderBytes(n_tokens)) {
    return Bad("header_bytes", std::to_string(header_bytes) + " does not match n_tokens");
  }
  if (record_size < header_bytes) {
    return Bad("header", "truncated: " + std::to_string(record_size) + " < " +
                             std::to_string(header_bytes) + " bytes");
  }
  if (b.size() < header_bytes) {
    return InvalidArgument("record header: prefix of " + std::to_string(b.size()) +
                           " bytes given, " + std::to_string(header_bytes) + " needed");
  }
  const size_t checked = header_bytes - 8;
  if (GetLe64(p + checked) != Hash64(ByteSpan(p, checked))) {
    return Bad("header checksum", "mismatch");
  }

  RecordHeader h;
  RecordMeta& m = h.meta;
  if (aux) {
    const std::byte* a = p + kOffTokens + 4 * size_t{n_tokens};
    const uint32_t aux_bytes = GetLe32(a);
    if (aux_bytes == 0 || RecordHeaderBytes(n_tokens, aux_bytes) != header_bytes) {
      return Bad("aux", "length " + std::to_string(aux_bytes) + " does not match header_bytes");
    }
    m.aux.assign(a + 4, a + 4 + aux_bytes);
  }
  m.ns = GetHash(p + kOffNs);
  m.key = GetHash(p + kOffKey);
  m.parent = GetHash(p + kOffParent);
  m.codec_id = GetLe32(p + kOffCodecId);
  m.codec_version = GetLe32(p + kOffCodecVersion);
  m.layout.n_layer = GetLe32(p + kOffLayout);
  m.layout.n_kv_head = GetLe32(p + kOffLayout + 4);
  m.layout.head_dim = GetLe32(p + kOffLayout + 8);
  m.layout.n_tokens = GetLe32(p + kOffLayout + 12);
  m.layout.kv_type = GetLe32(p + kOffLayout + 16);
  m.chunk_index = GetLe32(p + kOffChunkIndex);
  m.raw_bytes = GetLe64(p + kOffRawBytes);
  h.payload_bytes = GetLe64(p + kOffPayloadBytes);
  h.payload_xxh3 = GetLe64(p + kOffPayloadXxh3);
  h.header_bytes = header_bytes;
  if (m.layout.n_tokens != n_tokens) {
    return Bad("layout", "n_tokens " + std::to_string(m.layout.n_tokens) + " != " +
                             std::to_string(n_tokens));
  }
  if (m.layout.kv_type > 5) return Bad("layout", "kv_type " + std::to_string(m.layout.kv_type));
  // Each dimension is bounded so raw_bytes() cannot overflow 64 bits.
  if (m.layout.n_layer == 0 || m.layout.n_layer > 4096 || m.layout.n_kv_head == 0 ||
      m.layout.n_kv_head > 4096 || m.layout.head_dim == 0 || m.layout.head_dim > 65536 ||
      m.layout.head_bytes() == 0) {
    return Bad("layout", "dimensions out of range");
  }
  if (m.raw_bytes != m.layout.raw_bytes() || m.raw_bytes > kRecordMaxRawBytes) {
    return Bad("raw_bytes", std::to_string(m.raw_bytes) + " != layout " +
                                std::to_string(m.layout.raw_bytes()));
  }
  h.tokens.resize(n_tokens);
  for (uint32_t i = 0; i < n_tokens; ++i) {
    h.tokens[i] = static_cast<TokenId>(GetLe32(p + kOffTokens + 4 * size_t{i}));
  }
  if (ChainKey(m.parent, m.ns, h.tokens) != m.key) {
    return Bad("key", "is not XXH3-128(parent || namespace || tokens)");
  }
  if (m.codec_id == 0 && h.payload_bytes != m.raw_bytes) {
    return Bad("payload_bytes", "raw codec with " + std::to_string(h.payload_bytes) +
                                    " bytes, layout needs " + std::to_string(m.raw_bytes));
  }
  const uint64_t have = record_size - header_bytes;
  if (h.payload_bytes > have) {
    return Bad("payload", "truncated: " + std::to_string(have) + " of " +
                              std::to_string(h.payload_bytes) + " bytes");
  }
  if (h.payload_bytes < have) {
    return Bad("payload", std::to_string(have - h.payload_bytes) + " trailing bytes");
  }
  return h;
}

Result<RecordView> DecodeRecord(ByteSpan bytes) {
  CT_ASSIGN_OR_RETURN(RecordHeader h, DecodeRecordHeader(bytes, bytes.size()));
  ByteSpan payload = bytes.subspan(h.header_bytes, h.payload_bytes);
  if (Hash64(payload) != h.payload_xxh3) return Bad("payload checksum", "mismatch");
  return RecordView{std::move(h), payload};
}

}  // namespace cachette::cache
