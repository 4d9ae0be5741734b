// The lossy codecs: int8 (per token and head), int4 (KIVI) and int4-g64. Byte layouts and error
// bounds are in docs/formats/codecs.md; the inner loops are in quant_kernels*.cc.
//
// Each codec walks the chunk plane by plane ([n_tokens][n_kv_head][head_dim], the K or the V
// of one layer, in layer-major order), widens the plane to f32 in a scratch buffer (~128 KiB
// for the qwen2.5-0.5b shape, so it stays in L2) and quantizes from there; decoding runs the
// other way. The payload sections of a plane follow each other with no padding.
#include <algorithm>
#include <cstring>
#include <vector>

#include "cache/codecs/codec_internal.h"

namespace cachette::cache::codecs {
namespace {

constexpr uint32_t kF32 = 0, kF16 = 1;
constexpr uint64_t kKiviGroup = 32;  // tokens per key group, elements per value group
constexpr uint64_t kG64Group = 64;

uint64_t CeilDiv(uint64_t a, uint64_t b) { return (a + b - 1) / b; }

class LossyCodec : public Codec {
 public:
  LossyCodec(std::string name, CodecId id, uint32_t version, bool needs_even_head_dim,
             const QuantKernels& kernels)
      : k_(kernels),
        name_(std::move(name)),
        id_(static_cast<uint32_t>(id)),
        version_(version),
        needs_even_head_dim_(needs_even_head_dim) {}

  std::string name() const override { return name_; }
  uint32_t id() const override { return id_; }
  uint32_t version() const override { return version_; }
  bool lossless() const override { return false; }
  uint64_t FixedEncodedBytes(const ChunkLayout& layout) const override {
    return kHeaderBytes + BodyBytes(layout);
  }
  Status CheckPayload(const ChunkLayout& layout,
                      std::span<const std::byte> encoded) const override {
    CT_RETURN_IF_ERROR(CheckSupported(layout, layout.raw_bytes()));
    return ParseHeader(encoded, id_, version_, layout, BodyBytes(layout), name_).status();
  }

  Result<std::vector<std::byte>> Encode(const ChunkLayout& layout,
                                        std::span<const std::byte> raw) const override {
    CT_RETURN_IF_ERROR(CheckSupported(layout, raw.size()));
    const uint64_t body = BodyBytes(layout);
    std::vector<std::byte> out(kHeaderBytes + body);
    WriteHeader(id_, version_, layout, body, out.data());
    const uint64_t plane_elems = PlaneElems(layout);
    const uint64_t elem_bytes = layout.kv_type == kF32 ? 4 : 2;
    std::vector<float> plane(plane_elems);
    std::byte* dst = out.data() + kHeaderBytes;
    for (uint64_t p = 0; p < uint64_t{layout.n_layer} * 2; ++p) {
      const std::byte* src = raw.data() + p * plane_elems * elem_bytes;
      if (layout.kv_type == kF16) {
        k_.f16_to_f32(src, plane.data(), plane_elems);
      } else if (plane_elems > 0) {
        std::memcpy(plane.data(), src, plane_elems * 4);
      }
      const int kv = static_cast<int>(p % 2);
      if (!EncodePlane(kv, plane.data(), layout, dst)) {
        return InvalidArgument(name_ + ": input has a non-finite value or one beyond the f16 "
                               "range (|x| > 65504) in layer " + std::to_string(p / 2));
      }
      dst += PlaneBytes(layout, kv);
    }
    return out;
  }

  Status Decode(const ChunkLayout& layout, std::span<const std::byte> encoded,
                std::span<std::byte> raw) const override {
    CT_RETURN_IF_ERROR(CheckSupported(layout, raw.size()));
    CT_ASSIGN_OR_RETURN(std::span<const std::byte> body,
                        ParseHeader(encoded, id_, version_, layout, BodyBytes(layout), name_));
    const uint64_t plane_elems = PlaneElems(layout);
    const uint64_t elem_bytes = layout.kv_type == kF32 ? 4 : 2;
    std::vector<float> plane(plane_elems);
    const std::byte* src = body.data();
    for (uint64_t p = 0; p < uint64_t{layout.n_layer} * 2; ++p) {
      const int kv = static_cast<int>(p % 2);
      DecodePlane(kv, src, layout, plane.data());
      src += PlaneBytes(layout, kv);
      std::byte* dst = raw.data() + p * plane_elems * elem_bytes;
      if (layout.kv_type == kF16) {
        k_.f32_to_f16(plane.data(), dst, plane_elems);
      } else if (plane_elems > 0) {
        std::memcpy(dst, plane.data(), plane_elems * 4);
      }
    }
    return Status::Ok();
  }

 protected:
  static uint64_t PlaneElems(const ChunkLayout& l) {
    return uint64_t{l.n_tokens} * l.n_kv_head * l.head_dim;
  }
  // Vectors (token, head) of a plane.
  static uint64_t PlaneVectors(const ChunkLayout& l) { return uint64_t{l.n_tokens} * l.n_kv_head; }

  // Bytes of the payload section of the K (kv = 0) or V (kv = 1) plane of one layer.
  virtual uint64_t PlaneBytes(const ChunkLayout& layout, int kv) const = 0;
  // Quantizes plane x into dst[0, PlaneBytes). False on out-of-range input.
  virtual bool EncodePlane(int kv, const float* x, const ChunkLayout& layout,
                           std::byte* dst) const = 0;
  virtual void DecodePlane(int kv, const std::byte* src, const ChunkLayout& layout,
                           float* out) const = 0;

  const QuantKernels& k_;

 private:
  Status CheckSupported(const ChunkLayout& layout, size_t raw_size) const {
    if (layout.kv_type != kF32 && layout.kv_type != kF16) {
      return InvalidArgument(name_ + ": kv_type " + std::to_string(layout.kv_type) +
                             " is not supported (f32 or f16 only)");
    }
    if (needs_even_head_dim_ && layout.head_dim % 2 != 0) {
      return InvalidArgument(name_ + ": head_dim must be even (two codes per byte)");
    }
    return CheckLayout(layout, raw_size, name_);
  }

  uint64_t BodyBytes(const ChunkLayout& layout) const {
    return uint64_t{layout.n_layer} * (PlaneBytes(layout, 0) + PlaneBytes(layout, 1));
  }

  std::string name_;
  uint32_t id_, version_;
  bool needs_even_head_dim_;
};

// scales [n_tokens][n_kv_head] f16, codes [n_tokens][n_kv_head][head_dim] int8.
class Int8Codec final : public LossyCodec {
 public:
  explicit Int8Codec(const QuantKernels& k)
      : LossyCodec("int8", CodecId::kInt8, kInt8Version, false, k) {}

 protected:
  uint64_t PlaneBytes(const ChunkLayout& l, int) const override {
    return PlaneVectors(l) * (2 + l.head_dim);
  }
  bool EncodePlane(int, const float* x, const ChunkLayout& l, std::byte* dst) const override {
    const uint64_t n = PlaneVectors(l);
    return k_.int8_encode(x, n, l.head_dim, dst, reinterpret_cast<int8_t*>(dst + 2 * n));
  }
  void DecodePlane(int, const std::byte* src, const ChunkLayout& l, float* out) const override {
    const uint64_t n = PlaneVectors(l);
    k_.int8_decode(src, reinterpret_cast<const int8_t*>(src + 2 * n), n, l.head_dim, out);
  }
};

// Per-vector affine groups along head_dim: scales, mins [n_tokens][n_kv_head][ceil(hd/group)]
// f16, codes [n_tokens][n_kv_head][head_dim/2]. Used for int4-g64 planes and KIVI V planes.
uint64_t RowGroupBytes(const ChunkLayout& l, uint64_t group) {
  const uint64_t rows = uint64_t{l.n_tokens} * l.n_kv_head;
  return rows * (4 * CeilDiv(l.head_dim, group) + l.head_dim / 2);
}
bool EncodeRowGroups(const QuantKernels& k, const float* x, const ChunkLayout& l, uint64_t group,
                     std::byte* dst) {
  const uint64_t rows = uint64_t{l.n_tokens} * l.n_kv_head;
  const uint64_t params = rows * CeilDiv(l.head_dim, group) * 2;
  return k.affine4_rows_encode(x, rows, l.head_dim, group, dst, dst + params,
                               reinterpret_cast<uint8_t*>(dst + 2 * params));
}
void DecodeRowGroups(const QuantKernels& k, const std::byte* src, const ChunkLayout& l,
                     uint64_t group, float* out) {
  const uint64_t rows = uint64_t{l.n_tokens} * l.n_kv_head;
  const uint64_t params = rows * CeilDiv(l.head_dim, group) * 2;
  k.affine4_rows_decode(src, src + params, reinterpret_cast<const uint8_t*>(src + 2 * params),
                        rows, l.head_dim, group, out);
}

class Int4G64Codec final : public LossyCodec {
 public:
  explicit Int4G64Codec(const QuantKernels& k)
      : LossyCodec("int4-g64", CodecId::kInt4G64, kInt4G64Version, true, k) {}

 protected:
  uint64_t PlaneBytes(const ChunkLayout& l, int) const override {
    return RowGroupBytes(l, kG64Group);
  }
  bool EncodePlane(int, const float* x, const ChunkLayout& l, std::byte* dst) const override {
    return EncodeRowGroups(k_, x, l, kG64Group, dst);
  }
  void DecodePlane(int, const std::byte* src, const ChunkLayout& l, float* out) const override {
    DecodeRowGroups(k_, src, l, kG64Group, out);
  }
};

// KIVI: keys have outlier channels, so they are grouped per channel over 32 tokens; values are
// grouped per token. K section: scales, mins [ceil(n_tokens/32)][C] f16, codes [n_tokens][C/2]
// with C = n_kv_head * head_dim. V section: as RowGroup with group 32.
class Int4KiviCodec final : public LossyCodec {
 public:
  explicit Int4KiviCodec(const QuantKernels& k)
      : LossyCodec("int4", CodecId::kInt4Kivi, kInt4KiviVersion, true, k) {}

 protected:
  uint64_t PlaneBytes(const ChunkLayout& l, int kv) const override {
    if (kv == 1) return RowGroupBytes(l, kKiviGroup);
    const uint64_t cols = uint64_t{l.n_kv_head} * l.head_dim;
    return 4 * CeilDiv(l.n_tokens, kKiviGroup) * cols + uint64_t{l.n_tokens} * cols / 2;
  }

  bool EncodePlane(int kv, const float* x, const ChunkLayout& l, std::byte* dst) const override {
    if (kv == 1) return EncodeRowGroups(k_, x, l, kKiviGroup, dst);
    const uint64_t cols = uint64_t{l.n_kv_head} * l.head_dim;
    const uint64_t groups = CeilDiv(l.n_tokens, kKiviGroup);
    std::byte* scales = dst;
    std::byte* mins = dst + 2 * groups * cols;
    auto* codes = reinterpret_cast<uint8_t*>(dst + 4 * groups * cols);
    bool ok = true;
    for (uint64_t g = 0; g < groups; ++g) {
      const uint64_t t0 = g * kKiviGroup;
      const uint64_t rows = std::min<uint64_t>(kKiviGroup, l.n_tokens - t0);
      ok &= k_.affine4_cols_encode(x + t0 * cols, rows, cols, scales + 2 * g * cols,
                                   mins + 2 * g * cols, codes + t0 * cols / 2);
    }
    return ok;
  }

  void DecodePlane(int kv, const std::byte* src, const ChunkLayout& l, float* out) const override {
    if (kv == 1) return DecodeRowGroups(k_, src, l, kKiviGroup, out);
    const uint64_t cols = uint64_t{l.n_kv_head} * l.head_dim;
    const uint64_t groups = CeilDiv(l.n_tokens, kKiviGroup);
    const std::byte* scales = src;
    const std::byte* mins = src + 2 * groups * cols;
    const auto* codes = reinterpret_cast<const uint8_t*>(src + 4 * groups * cols);
    for (uint64_t g = 0; g < groups; ++g) {
      const uint64_t t0 = g * kKiviGroup;
      const uint64_t rows = std::min<uint64_t>(kKiviGroup, l.n_tokens - t0);
      k_.affine4_cols_decode(scales + 2 * g * cols, mins + 2 * g * cols, codes + t0 * cols / 2,
                             rows, cols, out + t0 * cols);
    }
  }
};

}  // namespace

std::unique_ptr<Codec> MakeInt8Codec(const QuantKernels& k) {
  return std::make_unique<Int8Codec>(k);
}
std::unique_ptr<Codec> MakeInt4KiviCodec(const QuantKernels& k) {
  return std::make_unique<Int4KiviCodec>(k);
}
std::unique_ptr<Codec> MakeInt4G64Codec(const QuantKernels& k) {
  return std::make_unique<Int4G64Codec>(k);
}

}  // namespace cachette::cache::codecs
