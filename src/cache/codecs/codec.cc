// Codec registry, the payload header (docs/formats/codecs.md) and the raw codec.
#include "cache/codecs/codec.h"

#include <cstring>

#include "cache/codecs/codec_internal.h"
#include "core/bytes.h"

namespace cachette::cache {
namespace codecs {
namespace {

constexpr std::byte kMagic[4] = {std::byte{'C'}, std::byte{'K'}, std::byte{'V'}, std::byte{'C'}};


std::string Str(std::string_view s) { return std::string(s); }

class RawCodec final : public Codec {
 public:
  std::string name() const override { return "raw"; }
  uint32_t id() const override { return static_cast<uint32_t>(CodecId::kRaw); }
  uint32_t version() const override { return kRawVersion; }
  bool lossless() const override { return true; }

  Result<std::vector<std::byte>> Encode(const ChunkLayout& layout,
                                        std::span<const std::byte> raw) const override {
    CT_RETURN_IF_ERROR(CheckLayout(layout, raw.size(), "raw"));
    std::vector<std::byte> out(kHeaderBytes + raw.size());
    WriteHeader(id(), version(), layout, raw.size(), out.data());
    if (!raw.empty()) std::memcpy(out.data() + kHeaderBytes, raw.data(), raw.size());
    return out;
  }

  Status Decode(const ChunkLayout& layout, std::span<const std::byte> encoded,
                std::span<std::byte> raw) const override {
    CT_RETURN_IF_ERROR(CheckLayout(layout, raw.size(), "raw"));
    CT_ASSIGN_OR_RETURN(std::span<const std::byte> body,
                        ParseHeader(encoded, id(), version(), layout, raw.size(), "raw"));
    if (!body.empty()) std::memcpy(raw.data(), body.data(), body.size());
    return Status::Ok();
  }

  uint64_t FixedEncodedBytes(const ChunkLayout& layout) const override {
    return kHeaderBytes + layout.raw_bytes();
  }

  Status CheckPayload(const ChunkLayout& layout,
                      std::span<const std::byte> encoded) const override {
    CT_RETURN_IF_ERROR(CheckLayout(layout, layout.raw_bytes(), "raw"));
    return ParseHeader(encoded, id(), version(), layout, layout.raw_bytes(), "raw").status();
  }
};

}  // namespace

Status CheckLayout(const ChunkLayout& layout, size_t raw_size, std::string_view codec_name) {
  const uint64_t head = layout.head_bytes();
  if (head == 0) {
    return InvalidArgument(Str(codec_name) + ": unsupported layout (kv_type " +
                           std::to_string(layout.kv_type) + ", head_dim " +
                           std::to_string(layout.head_dim) + ")");
  }
  // Dimensions are u32 each; bound the product so every size derived from it (bodies, zstd
  // bounds, element counts) stays far from overflow.
  uint64_t n = head;
  for (uint64_t d : {uint64_t{layout.n_layer} * 2, uint64_t{layout.n_tokens},
                     uint64_t{layout.n_kv_head}}) {
    if (__builtin_mul_overflow(n, d, &n) || n >= (uint64_t{1} << 48)) {
      return InvalidArgument(Str(codec_name) + ": layout too large");
    }
  }
  if (raw_size != n) {
    return InvalidArgument(Str(codec_name) + ": raw buffer is " + std::to_string(raw_size) +
                           " bytes, layout needs " + std::to_string(n));
  }
  return Status::Ok();
}

void WriteHeader(uint32_t id, uint32_t version, const ChunkLayout& layout, uint64_t body_bytes,
                 std::byte* out) {
  std::memcpy(out, kMagic, 4);
  PutLe32(out + 4, id);
  PutLe32(out + 8, version);
  out[12] = static_cast<std::byte>(layout.kv_type);
  out[13] = out[14] = out[15] = std::byte{0};
  PutLe32(out + 16, layout.n_layer);
  PutLe32(out + 20, layout.n_kv_head);
  PutLe32(out + 24, layout.head_dim);
  PutLe32(out + 28, layout.n_tokens);
  PutLe64(out + 32, body_bytes);
}

Result<std::span<const std::byte>> ParseHeader(std::span<const std::byte> encoded, uint32_t id,
                                               uint32_t version, const ChunkLayout& layout,
                                               uint64_t expected_body_bytes,
                                               std::string_view codec_name) {
  const std::string who = Str(codec_name) + ": ";
  if (encoded.size() < kHeaderBytes) {
    return Corruption(who + "truncated header (" + std::to_string(encoded.size()) + " bytes)");
  }
  const std::byte* h = encoded.data();
  if (std::memcmp(h, kMagic, 4) != 0) return Corruption(who + "bad magic");
  if (GetLe32(h + 4) != id) {
    return Corruption(who + "codec id " + std::to_string(GetLe32(h + 4)) + ", expected " +
                      std::to_string(id));
  }
  if (GetLe32(h + 8) != version) {
    return Corruption(who + "unsupported version " + std::to_string(GetLe32(h + 8)) +
                      ", expected " + std::to_string(version));
  }
  if (h[13] != std::byte{0} || h[14] != std::byte{0} || h[15] != std::byte{0}) {
    return Corruption(who + "nonzero reserved header bytes");
  }
  const ChunkLayout stored{GetLe32(h + 16), GetLe32(h + 20), GetLe32(h + 24), GetLe32(h + 28),
                           static_cast<uint32_t>(h[12])};
  if (!(stored == layout)) {
    return Corruption(who + "layout mismatch (payload has n_layer " +
                      std::to_string(stored.n_layer) + " n_kv_head " +
                      std::to_string(stored.n_kv_head) + " head_dim " +
                      std::to_string(stored.head_dim) + " n_tokens " +
                      std::to_string(stored.n_tokens) + " kv_type " +
                      std::to_string(stored.kv_type) + ")");
  }
  const uint64_t body_bytes = GetLe64(h + 32);
  if (body_bytes != encoded.size() - kHeaderBytes) {
    return Corruption(who + "wrong length: header says " + std::to_string(body_bytes) +
                      " body bytes, payload has " + std::to_string(encoded.size() - kHeaderBytes));
  }
  if (expected_body_bytes != kAnyBodySize && body_bytes != expected_body_bytes) {
    return Corruption(who + "wrong length: body is " + std::to_string(body_bytes) +
                      " bytes, layout needs " + std::to_string(expected_body_bytes));
  }
  return encoded.subspan(kHeaderBytes);
}

std::unique_ptr<Codec> MakeRawCodec() { return std::make_unique<RawCodec>(); }

}  // namespace codecs

Result<std::unique_ptr<Codec>> MakeCodec(std::string_view name) {
  const std::string_view full = name;
  bool zstd = false;
  if (name.starts_with("zstd+")) {
    zstd = true;
    name.remove_prefix(5);
  }
  std::unique_ptr<Codec> codec;
  const codecs::QuantKernels& k = codecs::BestQuantKernels();
  if (name == "raw") {
    codec = codecs::MakeRawCodec();
  } else if (name == "int8") {
    codec = codecs::MakeInt8Codec(k);
  } else if (name == "int4") {
    codec = codecs::MakeInt4KiviCodec(k);
  } else if (name == "int4-g64") {
    codec = codecs::MakeInt4G64Codec(k);
  } else if (!zstd && name == "cachegen") {
    codec = codecs::MakeCacheGenCodec(codecs::CacheGenLevel::kMedium, k);
  } else if (!zstd && name == "cachegen-high") {
    codec = codecs::MakeCacheGenCodec(codecs::CacheGenLevel::kHigh, k);
  } else if (!zstd && name == "cachegen-low") {
    codec = codecs::MakeCacheGenCodec(codecs::CacheGenLevel::kLow, k);
  } else {
    return InvalidArgument("unknown codec \"" + std::string(full) +
                           "\" (known: raw, int8, int4, int4-g64, each optionally zstd+; "
                           "cachegen, cachegen-high, cachegen-low)");
  }
  if (zstd) codec = codecs::MakeZstdCodec(std::move(codec), codecs::kZstdDefaultLevel);
  return codec;
}

Result<std::unique_ptr<Codec>> CodecFor(uint32_t id, uint32_t version) {
  const bool zstd = (id & static_cast<uint32_t>(CodecId::kZstd)) != 0;
  const uint32_t base = id & ~static_cast<uint32_t>(CodecId::kZstd);
  const char* names[] = {"raw", "int8", "int4", "int4-g64", "cachegen"};
  const bool zstd_of_cachegen = zstd && base == static_cast<uint32_t>(CodecId::kCacheGen);
  if (base >= std::size(names) || zstd_of_cachegen) {
    return NotFound("no codec with id " + std::to_string(id));
  }
  auto made = MakeCodec(std::string(zstd ? "zstd+" : "") + names[base]);
  if (!made.ok()) return made.status();
  if ((*made)->id() != id || (*made)->version() != version) {
    return Unimplemented("codec " + (*made)->name() + " version " + std::to_string(version) +
                         " is not supported (this build has version " +
                         std::to_string((*made)->version()) + ")");
  }
  return made;
}

}  // namespace cachette::cache
