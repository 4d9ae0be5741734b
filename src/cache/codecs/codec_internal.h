// Pieces shared by the codec implementations: the 40-byte payload header of
// docs/formats/codecs.md and the per-codec factories behind MakeCodec / CodecFor.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "cache/chunk.h"
#include "cache/codecs/cachegen.h"
#include "cache/codecs/codec.h"
#include "cache/codecs/quant_kernels.h"
#include "cachette/status.h"

namespace cachette::cache::codecs {

inline constexpr size_t kHeaderBytes = 40;
inline constexpr uint32_t kRawVersion = 1;
inline constexpr uint32_t kInt8Version = 1;
inline constexpr uint32_t kInt4KiviVersion = 1;
inline constexpr uint32_t kInt4G64Version = 1;
inline constexpr uint32_t kCacheGenVersion = 1;
// The zstd layer's own version, in the high 16 bits of a zstd+X version.
inline constexpr uint32_t kZstdLayerVersion = 1;
inline constexpr int kZstdDefaultLevel = 3;

// kInvalidArgument unless `layout` has a known kv_type, a nonzero head size and a raw size that
// fits in 64 bits with room to spare (< 2^48 bytes), and raw_size == layout.raw_bytes().
Status CheckLayout(const ChunkLayout& layout, size_t raw_size, std::string_view codec_name);

// Writes the header into out[0, kHeaderBytes).
void WriteHeader(uint32_t id, uint32_t version, const ChunkLayout& layout, uint64_t body_bytes,
                 std::byte* out);
// Validates `encoded`'s header against (id, version, layout) and its total length against
// kHeaderBytes + expected_body_bytes (skipped when expected_body_bytes is kAnyBodySize).
// kCorruption naming the first mismatch. Returns the body.
inline constexpr uint64_t kAnyBodySize = ~uint64_t{0};
Result<std::span<const std::byte>> ParseHeader(std::span<const std::byte> encoded, uint32_t id,
                                               uint32_t version, const ChunkLayout& layout,
                                               uint64_t expected_body_bytes,
                                               std::string_view codec_name);

std::unique_ptr<Codec> MakeRawCodec();
// Lossy codecs run on `kernels` (tests pass the scalar table to compare against the fast one).
std::unique_ptr<Codec> MakeInt8Codec(const QuantKernels& kernels);
std::unique_ptr<Codec> MakeInt4KiviCodec(const QuantKernels& kernels);
std::unique_ptr<Codec> MakeInt4G64Codec(const QuantKernels& kernels);
// cachegen at `level` (the level it encodes; it decodes every level).
std::unique_ptr<Codec> MakeCacheGenCodec(CacheGenLevel level, const QuantKernels& kernels);
// zstd at `level` over `inner`'s payload.
std::unique_ptr<Codec> MakeZstdCodec(std::unique_ptr<Codec> inner, int level);

}  // namespace cachette::cache::codecs
