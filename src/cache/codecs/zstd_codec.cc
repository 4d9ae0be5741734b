// zstd+X: one zstd frame over X's whole payload (docs/formats/codecs.md). Lossless with respect
// to X; the frame carries its content size and zstd's content checksum.
#include <zstd.h>

#include <cstring>

#include "cache/codecs/codec_internal.h"

namespace cachette::cache::codecs {
namespace {

// Contexts are reused per thread: creating a level-3 compression context allocates about a
// megabyte, which would dominate the encode of a chunk. Codecs stay stateless to callers.
struct ZstdContexts {
  ZSTD_CCtx* cctx = ZSTD_createCCtx();
  ZSTD_DCtx* dctx = ZSTD_createDCtx();
  ~ZstdContexts() {
    ZSTD_freeCCtx(cctx);
    ZSTD_freeDCtx(dctx);
  }
};
ZstdContexts& Contexts() {
  thread_local ZstdContexts contexts;
  return contexts;
}

class ZstdCodec final : public Codec {
 public:
  ZstdCodec(std::unique_ptr<Codec> inner, int level) : inner_(std::move(inner)), level_(level) {}

  std::string name() const override { return "zstd+" + inner_->name(); }
  uint32_t id() const override { return static_cast<uint32_t>(CodecId::kZstd) | inner_->id(); }
  uint32_t version() const override { return (kZstdLayerVersion << 16) | inner_->version(); }
  bool lossless() const override { return inner_->lossless(); }

  Result<std::vector<std::byte>> Encode(const ChunkLayout& layout,
                                        std::span<const std::byte> raw) const override {
    CT_ASSIGN_OR_RETURN(std::vector<std::byte> inner, inner_->Encode(layout, raw));
    std::vector<std::byte> out(kHeaderBytes + ZSTD_compressBound(inner.size()));
    ZSTD_CCtx* cctx = Contexts().cctx;
    if (cctx == nullptr) return ResourceExhausted(name() + ": cannot allocate a zstd context");
    ZSTD_CCtx_reset(cctx, ZSTD_reset_session_and_parameters);
    ZSTD_CCtx_setParameter(cctx, ZSTD_c_compressionLevel, level_);
    ZSTD_CCtx_setParameter(cctx, ZSTD_c_checksumFlag, 1);
    ZSTD_CCtx_setParameter(cctx, ZSTD_c_contentSizeFlag, 1);
    const size_t n = ZSTD_compress2(cctx, out.data() + kHeaderBytes, out.size() - kHeaderBytes,
                                    inner.data(), inner.size());
    if (ZSTD_isError(n)) {
      // Cannot happen with a compressBound-sized buffer short of allocation failure.
      return ResourceExhausted(name() + ": zstd: " + ZSTD_getErrorName(n));
    }
    out.resize(kHeaderBytes + n);
    WriteHeader(id(), version(), layout, n, out.data());
    return out;
  }

  Status Decode(const ChunkLayout& layout, std::span<const std::byte> encoded,
                std::span<std::byte> raw) const override {
    CT_RETURN_IF_ERROR(CheckLayout(layout, raw.size(), name()));
    CT_ASSIGN_OR_RETURN(const uint64_t content, CheckFrame(layout, encoded));
    const std::span<const std::byte> frame = encoded.subspan(kHeaderBytes);
    ZSTD_DCtx* dctx = Contexts().dctx;
    if (dctx == nullptr) return ResourceExhausted(name() + ": cannot allocate a zstd context");
    std::vector<std::byte> inner(content);
    const size_t n =
        ZSTD_decompressDCtx(dctx, inner.data(), inner.size(), frame.data(), frame.size());
    if (ZSTD_isError(n)) {
      return Corruption(name() + ": zstd: " + ZSTD_getErrorName(n));
    }
    if (n != content) return Corruption(name() + ": zstd frame shorter than it declares");
    return inner_->Decode(layout, inner, raw);
  }

  Status CheckPayload(const ChunkLayout& layout,
                      std::span<const std::byte> encoded) const override {
    CT_RETURN_IF_ERROR(CheckLayout(layout, layout.raw_bytes(), name()));
    return CheckFrame(layout, encoded).status();
  }

 private:
  // Everything Decode checks before allocating (layout already checked); the frame's declared
  // content size.
  Result<uint64_t> CheckFrame(const ChunkLayout& layout,
                              std::span<const std::byte> encoded) const {
    CT_ASSIGN_OR_RETURN(std::span<const std::byte> frame,
                        ParseHeader(encoded, id(), version(), layout, kAnyBodySize, name()));
    const size_t frame_bytes = ZSTD_findFrameCompressedSize(frame.data(), frame.size());
    if (ZSTD_isError(frame_bytes)) {
      return Corruption(name() + ": bad zstd frame: " + ZSTD_getErrorName(frame_bytes));
    }
    if (frame_bytes != frame.size()) {
      return Corruption(name() + ": " + std::to_string(frame.size() - frame_bytes) +
                        " trailing bytes after the zstd frame");
    }
    const unsigned long long content = ZSTD_getFrameContentSize(frame.data(), frame.size());
    if (content == ZSTD_CONTENTSIZE_ERROR || content == ZSTD_CONTENTSIZE_UNKNOWN) {
      return Corruption(name() + ": zstd frame does not declare its content size");
    }
    // The inner payload's size follows from the layout (every inner codec has a fixed size);
    // any other claim is a tampered frame, refused before allocating it. The fallback bound,
    // for an inner codec of variable size, is a few times the raw chunk (int4 of a one-token
    // chunk with head_dim 2 is the worst fixed codec, ~2.25x).
    const uint64_t fixed = inner_->FixedEncodedBytes(layout);
    if (fixed != 0 ? content != fixed
                   : content > 4 * layout.raw_bytes() + 4 * kHeaderBytes) {
      return Corruption(name() + ": zstd frame claims " + std::to_string(content) +
                        " bytes, the layout's " + inner_->name() + " payload is " +
                        (fixed != 0 ? std::to_string(fixed) : "smaller"));
    }
    return uint64_t{content};
  }

  std::unique_ptr<Codec> inner_;
  int level_;
};

}  // namespace

std::unique_ptr<Codec> MakeZstdCodec(std::unique_ptr<Codec> inner, int level) {
  return std::make_unique<ZstdCodec>(std::move(inner), level);
}

}  // namespace cachette::cache::codecs
