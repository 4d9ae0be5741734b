#include "sched/segment_tier.h"

#include <bit>
#include <cmath>
#include <cstring>
#include <string>

#include "cache/record.h"
#include "core/bytes.h"

namespace cachette::sched {
namespace {

constexpr char kMetaMagic[4] = {'C', 'T', 'S', 'G'};
constexpr uint16_t kMetaVersion = 1;
constexpr size_t kMetaFixedBytes = 48;
constexpr uint32_t kMaxContextChunks = 4096;
constexpr int64_t kMaxBasePos = int64_t{1} << 40;
// Slots before the segment's first token in its chain: the two words of its context id, its
// length (so that no chunk key of a segment is also one of a longer segment's) and its band's
// layers.
constexpr int64_t kLeadSlots = 4;
constexpr int kMaxSegmentBands = 6;
constexpr TokenId kPadToken = -1;


Status Bad(const std::string& field, const std::string& why) {
  return Corruption("segment meta " + field + ": " + why);
}

// Visits each copy between the layers `band` of a segment's per-layer K/V arrays and its
// chunks (layer-major over the band's layers, the token axis chunk_tokens long, after the
// kLeadSlots leading slots): every run of tokens that lies in one chunk is one copy per layer
// and K/V, fn(chunk, layer, kv, byte offset in the chunk, byte offset in the segment's array,
// bytes).
template <typename Fn>
void ForEachCopy(const KvShape& shape, LayerBand band, int64_t n_tokens, int64_t chunk_tokens,
                 Fn&& fn) {
  const size_t tb = shape.token_bytes();
  const auto C = static_cast<size_t>(chunk_tokens);
  for (int64_t i = 0; i < n_tokens;) {
    const int64_t slot = kLeadSlots + i;
    const int64_t run = std::min(n_tokens - i, chunk_tokens - slot % chunk_tokens);
    for (int l = band.first; l < band.end; ++l) {
      for (int kv = 0; kv < 2; ++kv) {
        fn(static_cast<size_t>(slot / chunk_tokens), static_cast<size_t>(l), kv,
           (static_cast<size_t>(2 * (l - band.first) + kv) * C +
            static_cast<size_t>(slot % chunk_tokens)) *
               tb,
           static_cast<size_t>(i) * tb, static_cast<size_t>(run) * tb);
      }
    }
    i += run;
  }
}

}  // namespace

Hash128 SegmentNamespace(const Hash128& ns) {
  std::byte buf[20 + 16];
  std::memcpy(buf, "cachette-segments-v2", 20);
  PutLe64(buf + 20, ns.lo);
  PutLe64(buf + 28, ns.hi);
  return Hash128Of(ByteSpan(buf, sizeof(buf)));
}

std::vector<LayerBand> SegmentBands(int n_layer) {
  std::vector<LayerBand> out;
  if (n_layer <= kMaxSegmentBands) {
    for (int l = 0; l < n_layer; ++l) out.push_back({l, l + 1});
    return out;
  }
  // The first and the last layer alone: the prefill starts after one layer's load, and only
  // one layer's compute is left once the last band is in. The middle layers evenly.
  const int middle = kMaxSegmentBands - 2, span = n_layer - 2;
  out.push_back({0, 1});
  for (int b = 0; b < middle; ++b) {
    out.push_back({1 + b * span / middle, 1 + (b + 1) * span / middle});
  }
  out.push_back({n_layer - 1, n_layer});
  return out;
}

ChunkLayout BandLayout(const ChunkLayout& full, LayerBand band) {
  ChunkLayout l = full;
  l.n_layer = static_cast<uint32_t>(band.end - band.first);
  return l;
}

std::vector<TokenId> SegmentChainTokens(std::span<const TokenId> tokens, uint64_t context,
                                        int chunk_tokens, LayerBand band) {
  const size_t used = kLeadSlots + tokens.size();
  const size_t c = static_cast<size_t>(chunk_tokens);
  std::vector<TokenId> out((used + c - 1) / c * c, kPadToken);
  out[0] = static_cast<TokenId>(static_cast<uint32_t>(context));
  out[1] = static_cast<TokenId>(static_cast<uint32_t>(context >> 32));
  out[2] = static_cast<TokenId>(tokens.size());
  out[3] = static_cast<TokenId>(static_cast<uint32_t>(band.first) |
                                static_cast<uint32_t>(band.end) << 16);
  std::copy(tokens.begin(), tokens.end(), out.begin() + kLeadSlots);
  return out;
}

std::vector<std::byte> EncodeSegmentMeta(const SegmentKv& seg) {
  const size_t n_cc = seg.context_chunks.size(), n_inter = seg.inter.size();
  std::vector<std::byte> out(kMetaFixedBytes + 8 * n_cc + 4 * n_inter);
  std::byte* p = out.data();
  std::memcpy(p, kMetaMagic, 4);
  p[4] = static_cast<std::byte>(kMetaVersion);
  PutLe32(p + 8, static_cast<uint32_t>(seg.tokens.size()));
  PutLe32(p + 12, static_cast<uint32_t>(n_cc));
  PutLe32(p + 16, static_cast<uint32_t>(n_inter));
  PutLe64(p + 24, static_cast<uint64_t>(seg.base_pos));
  PutLe64(p + 32, seg.context);
  PutLe64(p + 40, std::bit_cast<uint64_t>(seg.cci));
  for (size_t i = 0; i < n_cc; ++i) PutLe64(p + kMetaFixedBytes + 8 * i, seg.context_chunks[i]);
  std::byte* q = p + kMetaFixedBytes + 8 * n_cc;
  for (size_t i = 0; i < n_inter; ++i) PutLe32(q + 4 * i, std::bit_cast<uint32_t>(seg.inter[i]));
  return out;
}

Result<SegmentMeta> DecodeSegmentMeta(ByteSpan b) {
  if (b.size() < kMetaFixedBytes) {
    return Bad("size", std::to_string(b.size()) + " bytes, fewer than the fixed 48");
  }
  const std::byte* p = b.data();
  if (std::memcmp(p, kMetaMagic, 4) != 0) return Bad("magic", "not CTSG");
  const uint32_t version = GetLe32(p + 4) & 0xffff;
  if (version != kMetaVersion) {
    return Bad("version", std::to_string(version) + " (this reader knows 1)");
  }
  if ((GetLe32(p + 4) >> 16) != 0 || GetLe32(p + 20) != 0) return Bad("reserved", "not zero");
  SegmentMeta m;
  m.n_tokens = GetLe32(p + 8);
  const uint32_t n_cc = GetLe32(p + 12), n_inter = GetLe32(p + 16);
  if (m.n_tokens == 0 || m.n_tokens > cache::kRecordMaxTokens) {
    return Bad("n_tokens", std::to_string(m.n_tokens) + " not in 1.." +
                               std::to_string(cache::kRecordMaxTokens));
  }
  if (n_cc > kMaxContextChunks) {
    return Bad("n_context_chunks", std::to_string(n_cc) + " over " +
                                       std::to_string(kMaxContextChunks));
  }
  if (n_inter != 0 && n_inter != m.n_tokens) {
    return Bad("n_inter", std::to_string(n_inter) + " is neither 0 nor n_tokens");
  }
  const uint64_t want = kMetaFixedBytes + 8 * uint64_t{n_cc} + 4 * uint64_t{n_inter};
  if (b.size() != want) {
    return Bad("size", std::to_string(b.size()) + " bytes, the counts need " +
                           std::to_string(want));
  }
  const uint64_t base = GetLe64(p + 24);
  if (base > static_cast<uint64_t>(kMaxBasePos)) {
    return Bad("base_pos", std::to_string(base) + " out of range");
  }
  m.base_pos = static_cast<int64_t>(base);
  m.context = GetLe64(p + 32);
  m.cci = std::bit_cast<double>(GetLe64(p + 40));
  if (!(m.cci >= 0 && m.cci <= 1)) return Bad("cci", "not in [0, 1]");
  m.context_chunks.resize(n_cc);
  for (uint32_t i = 0; i < n_cc; ++i) m.context_chunks[i] = GetLe64(p + kMetaFixedBytes + 8 * i);
  const std::byte* q = p + kMetaFixedBytes + 8 * size_t{n_cc};
  m.inter.resize(n_inter);
  for (uint32_t i = 0; i < n_inter; ++i) {
    m.inter[i] = std::bit_cast<float>(GetLe32(q + 4 * size_t{i}));
    // A share of attention mass, with room for the rounding of its sum.
    if (!(m.inter[i] >= 0 && m.inter[i] <= 1.01f)) {
      return Bad("inter", "value " + std::to_string(i) + " is not a share in [0, 1]");
    }
  }
  return m;
}

SegmentChunks PackSegment(const SegmentKv& seg, const ChunkLayout& layout, LayerBand band) {
  const int64_t C = layout.n_tokens;
  const int64_t n = static_cast<int64_t>(seg.tokens.size());
  const size_t n_chunks = static_cast<size_t>((kLeadSlots + n + C - 1) / C);
  SegmentChunks out;
  out.chunks.assign(n_chunks, std::vector<std::byte>(layout.raw_bytes()));
  out.aux.resize(n_chunks);
  out.aux.back() = EncodeSegmentMeta(seg);
  ForEachCopy(seg.shape, band, n, C, [&](size_t chunk, size_t l, int kv, size_t at, size_t from,
                                         size_t bytes) {
    std::memcpy(out.chunks[chunk].data() + at, (kv == 0 ? seg.k : seg.v)[l].data() + from, bytes);
  });
  return out;
}

Status UnpackSegmentBand(std::span<const ChunkData* const> chunks,
                         std::span<const TokenId> tokens, uint64_t context, const KvShape& shape,
                         LayerBand band, SegmentKv& seg) {
  if (chunks.empty() || tokens.empty()) return NotFound("no chunks");
  if (band.first < 0 || band.end <= band.first || band.end > shape.n_layer) {
    return NotFound("segment: a band outside the model's layers");
  }
  const ChunkLayout& layout = chunks.front()->layout;
  const int64_t C = layout.n_tokens;
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (C <= 0 || static_cast<int64_t>(chunks.size()) != (kLeadSlots + n + C - 1) / C) {
    return NotFound("segment: chunk count does not match its length");
  }
  for (const ChunkData* c : chunks) {
    if (!c->status.ok() || c->layout != layout ||
        layout.n_layer != static_cast<uint32_t>(band.end - band.first) ||
        layout.n_kv_head != static_cast<uint32_t>(shape.n_kv_head) ||
        layout.head_dim != static_cast<uint32_t>(shape.head_dim) ||
        layout.kv_type != static_cast<uint32_t>(shape.type) ||
        c->bytes().size() != layout.raw_bytes()) {
      return NotFound("segment: a chunk's layout is not this server's KV layout");
    }
  }
  Result<SegmentMeta> meta = DecodeSegmentMeta(chunks.back()->aux);
  if (!meta.ok()) return NotFound(meta.status().message());
  if (meta->n_tokens != tokens.size() || meta->context != context) {
    return NotFound("segment: its metadata names another segment");
  }
  const size_t tb = shape.token_bytes();
  if (band.first == 0) {
    seg = SegmentKv{};
    seg.tokens.assign(tokens.begin(), tokens.end());
    seg.base_pos = meta->base_pos;
    seg.context = context;
    seg.context_chunks = std::move(meta->context_chunks);
    seg.inter = std::move(meta->inter);
    seg.cci = meta->cci;
    seg.shape = shape;
    seg.k.assign(static_cast<size_t>(shape.n_layer), std::vector<std::byte>(n * tb));
    seg.v.assign(static_cast<size_t>(shape.n_layer), std::vector<std::byte>(n * tb));
  } else if (seg.tokens.size() != tokens.size() || seg.context != context ||
             seg.base_pos != meta->base_pos || seg.k.size() != static_cast<size_t>(shape.n_layer)) {
    return NotFound("segment: a band of another filing of it (base position differs)");
  }
  ForEachCopy(shape, band, n, C,
              [&](size_t chunk, size_t l, int kv, size_t at, size_t to, size_t bytes) {
                std::memcpy((kv == 0 ? seg.k : seg.v)[l].data() + to,
                            chunks[chunk]->bytes().data() + at, bytes);
              });
  return Status::Ok();
}

}  // namespace cachette::sched
