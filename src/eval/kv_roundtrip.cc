#include "eval/kv_roundtrip.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "core/timer.h"

namespace cachette::eval {

cache::ChunkLayout LayoutFor(const KvShape& shape, int64_t n_tokens) {
  cache::ChunkLayout l;
  l.n_layer = static_cast<uint32_t>(shape.n_layer);
  l.n_kv_head = static_cast<uint32_t>(shape.n_kv_head);
  l.head_dim = static_cast<uint32_t>(shape.head_dim);
  l.n_tokens = static_cast<uint32_t>(n_tokens);
  l.kv_type = static_cast<uint32_t>(shape.type);
  return l;
}

void CopyKvChunk(SequenceKv& kv, const KvShape& shape, int64_t begin, int64_t n,
                 std::span<std::byte> chunk, bool to_kv) {
  const size_t tb = shape.token_bytes();
  // Per position, because SequenceKv promises only that one position's [n_kv_head][head_dim]
  // is contiguous (pages may split longer runs).
  for (int l = 0; l < shape.n_layer; ++l) {
    for (int kv_i = 0; kv_i < 2; ++kv_i) {
      std::byte* plane = chunk.data() + static_cast<size_t>(2 * l + kv_i) * n * tb;
      for (int64_t t = 0; t < n; ++t) {
        auto* slot =
            static_cast<std::byte*>(kv_i == 0 ? kv.KSlot(l, begin + t) : kv.VSlot(l, begin + t));
        std::byte* c = plane + static_cast<size_t>(t) * tb;
        if (to_kv) {
          std::memcpy(slot, c, tb);
        } else {
          std::memcpy(c, slot, tb);
        }
      }
    }
  }
}

Status RoundTripKv(const cache::Codec& codec, const KvShape& shape, int chunk_tokens,
                   SequenceKv& src, SequenceKv& dst, int64_t begin, int64_t end,
                   RoundTripStats* stats) {
  if (chunk_tokens <= 0) {
    return InvalidArgument("chunk_tokens must be positive, got " + std::to_string(chunk_tokens));
  }
  CT_RETURN_IF_ERROR(CheckKvRewritable(shape, "a KV codec round trip (--kv-codec)"));
  if (begin < 0 || begin > end || end > src.n_tokens() || begin > dst.n_tokens()) {
    return InvalidArgument("round-trip range [" + std::to_string(begin) + ", " +
                           std::to_string(end) + ") outside the source (" +
                           std::to_string(src.n_tokens()) +
                           " tokens) or past the end of the "
                           "destination (" +
                           std::to_string(dst.n_tokens()) + " tokens)");
  }
  CT_RETURN_IF_ERROR(dst.Reserve(end));
  std::vector<std::byte> raw, decoded;
  for (int64_t p = begin; p < end;) {
    const int64_t chunk_end = std::min<int64_t>(end, (p / chunk_tokens + 1) * chunk_tokens);
    const int64_t n = chunk_end - p;
    const cache::ChunkLayout layout = LayoutFor(shape, n);
    raw.resize(layout.raw_bytes());
    decoded.resize(layout.raw_bytes());
    CopyKvChunk(src, shape, p, n, raw, /*to_kv=*/false);
    Stopwatch sw;
    auto encoded = codec.Encode(layout, raw);
    if (!encoded.ok()) return encoded.status().WithContext("codec " + codec.name());
    const double enc_s = sw.Seconds();
    sw.Reset();
    CT_RETURN_IF_ERROR(
        codec.Decode(layout, *encoded, decoded).WithContext("codec " + codec.name()));
    const double dec_s = sw.Seconds();
    CopyKvChunk(dst, shape, p, n, decoded, /*to_kv=*/true);
    if (stats != nullptr) {
      stats->tokens += n;
      stats->raw_bytes += layout.raw_bytes();
      stats->encoded_bytes += encoded->size();
      stats->encode_seconds += enc_s;
      stats->decode_seconds += dec_s;
    }
    p = chunk_end;
  }
  dst.SetTokens(end);
  return Status::Ok();
}

}  // namespace cachette::eval
