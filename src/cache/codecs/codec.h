// KV codecs: how a chunk's raw KV bytes (see chunk.h for the layout) are encoded for storage.
//
// Each codec has a stable id and a format version, both stored in every chunk record, so a
// reader can refuse (a miss, not garbage) what it does not understand. Lossless codecs
// reproduce the raw bytes exactly; lossy ones (int8, int4, cachegen) are opt-in and documented
// with their error bound and measured quality.
// Thread-safety: codecs are stateless; Encode/Decode may be called concurrently.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "cache/chunk.h"
#include "cachette/status.h"

namespace cachette::cache {

enum class CodecId : uint32_t {
  kRaw = 0,         // the raw bytes
  kInt8 = 1,        // per (token, head) symmetric int8 with an f16 scale
  kInt4Kivi = 2,    // KIVI-style 4-bit: K grouped per channel, V per token, group 32
  kInt4G64 = 3,     // affine 4-bit, groups of 64 with f16 scale and min (agent memory layout)
  kCacheGen = 4,    // token groups with anchor and deltas, layer-banded bins, rANS; every
                    // quality level (the level is in the payload); no zstd+ variant
  kZstd = 0x100,    // flag: zstd over the inner codec's output (lossless); OR-ed with one above
};

class Codec {
 public:
  virtual ~Codec() = default;
  virtual std::string name() const = 0;  // "raw", "int8", "int4", "int4-g64", "zstd+int8", ...
  virtual uint32_t id() const = 0;       // CodecId value (with the zstd flag where used)
  virtual uint32_t version() const = 0;
  virtual bool lossless() const = 0;

  // Encodes raw chunk bytes of `layout` (raw.size() == layout.raw_bytes()). kInvalidArgument
  // if the layout is not supported by this codec (e.g. int4 of a q8_0 chunk).
  virtual Result<std::vector<std::byte>> Encode(const ChunkLayout& layout,
                                                std::span<const std::byte> raw) const = 0;
  // Decodes into `raw` (raw.size() == layout.raw_bytes()). kCorruption for malformed input
  // (wrong length, bad header); never reads or writes out of bounds. Every size the input
  // claims (its header's body length, a zstd frame's content size) is checked against what
  // `layout` implies before anything is allocated, so a hostile payload costs at most the
  // scratch of one plane of `layout`, never memory it names itself.
  virtual Status Decode(const ChunkLayout& layout, std::span<const std::byte> encoded,
                        std::span<std::byte> raw) const = 0;

  // The checks Decode makes before it allocates anything, without decoding: the payload
  // header against `layout`, its length, and for zstd the frame's size and declared content
  // size. A caller that must allocate the raw chunk (layout.raw_bytes(), which a hostile record
  // can make large) calls this first, so the allocation only happens for a payload whose sizes
  // agree with the layout. OK does not promise Decode succeeds (zstd's checksum and the inner
  // payload are checked only by decoding). kInvalidArgument for a layout the codec does not
  // support; kCorruption as Decode.
  virtual Status CheckPayload(const ChunkLayout& layout,
                              std::span<const std::byte> encoded) const = 0;

  // The exact size of this codec's payload for any chunk of `layout` (header included), or 0
  // when it depends on the bytes (zstd). `layout` must have passed Encode's or Decode's checks
  // (sizes below 2^48), so the answer cannot overflow.
  virtual uint64_t FixedEncodedBytes(const ChunkLayout& /*layout*/) const { return 0; }
};

// "raw", "int8", "int4" (= KIVI), "int4-g64", and any of them prefixed "zstd+" (e.g.
// "zstd+raw"); "cachegen" (medium quality), "cachegen-high", "cachegen-low" (no zstd+: their
// payload is entropy-coded already). kInvalidArgument naming the codec otherwise.
Result<std::unique_ptr<Codec>> MakeCodec(std::string_view name);
// The codec for a stored (id, version), or kNotFound/kUnimplemented. For cachegen that is
// "cachegen", which decodes payloads of every level.
Result<std::unique_ptr<Codec>> CodecFor(uint32_t id, uint32_t version);

}  // namespace cachette::cache
