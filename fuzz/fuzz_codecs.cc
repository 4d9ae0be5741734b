// Feeds arbitrary bytes to every codec's decoder (docs/formats/codecs.md), and uses them as raw
// KV for the round trips that must hold.
//
// Input: [codec selector][layout selector][bytes...]. The selectors pick one of the eleven
// codecs (raw, int8, int4, int4-g64, each with and without zstd; cachegen at its three levels)
// and one of a few fixed small layouts (f32, f16 and q8_0; even and odd head_dim; token counts
// across the KIVI group of 32 and the cachegen group of 16).
//   1. Decode(bytes) into a buffer of exactly layout.raw_bytes(): any answer is fine, but never
//      an out-of-bounds access (ASan) or a buffer sized from the input (-rss_limit_mb); and
//      CheckPayload never accepts less than Decode does.
//   2. The bytes, repeated to layout.raw_bytes(), as raw KV: for the lossless codecs Encode then
//      Decode must give them back exactly; for the lossy ones whatever Encode accepts must
//      decode.
//   3. CodecFor with the id and version a payload header would carry: a codec or an error.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "cache/codecs/codec.h"

namespace {

using cachette::cache::ChunkLayout;
using cachette::cache::Codec;

// New codecs go at the end, so the selector bytes of the existing seeds keep their codec.
constexpr const char* kCodecNames[] = {"raw",      "int8",          "int4",        "int4-g64",
                                       "zstd+raw", "zstd+int8",     "zstd+int4",   "zstd+int4-g64",
                                       "cachegen", "cachegen-high", "cachegen-low"};
constexpr size_t kCodecs = sizeof(kCodecNames) / sizeof(kCodecNames[0]);

// {n_layer, n_kv_head, head_dim, n_tokens, kv_type (0 f32, 1 f16, 2 q8_0)}
const ChunkLayout kLayouts[] = {
    {1, 1, 4, 1, 0},   // 32 bytes
    {2, 2, 8, 3, 1},   // 384 bytes
    {1, 2, 64, 33, 1}, // KIVI key groups of 32 tokens and a partial one; one g64 group
    {1, 1, 32, 2, 2},  // q8_0: raw and zstd+raw only
    {2, 1, 6, 5, 0},   // head_dim not a multiple of any group
    {1, 1, 3, 2, 1},   // odd head_dim: the int4 codecs refuse it
    {3, 2, 4, 20, 1},  // cachegen: three layer bands, a group of 16 tokens and a partial one
    {2, 2, 16, 17, 1}, // cachegen: enough channels for the 8- and 16-plane vector rANS loops
};
constexpr size_t kNumLayouts = sizeof(kLayouts) / sizeof(kLayouts[0]);

const std::vector<std::unique_ptr<Codec>>& Codecs() {
  static const auto* codecs = [] {
    auto* v = new std::vector<std::unique_ptr<Codec>>();
    for (const char* name : kCodecNames) {
      auto c = cachette::cache::MakeCodec(name);
      if (!c.ok()) __builtin_trap();  // the registry must know every codec listed here
      v->push_back(std::move(c).value());
    }
    return v;
  }();
  return *codecs;
}

uint32_t U32(const uint8_t* p) {
  return uint32_t{p[0]} | uint32_t{p[1]} << 8 | uint32_t{p[2]} << 16 | uint32_t{p[3]} << 24;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  const Codec& codec = *Codecs()[data[0] % kCodecs];
  const ChunkLayout& layout = kLayouts[data[1] % kNumLayouts];
  const std::span<const std::byte> encoded(reinterpret_cast<const std::byte*>(data + 2),
                                           size - 2);
  const size_t raw_bytes = layout.raw_bytes();

  // 1. Decode arbitrary bytes. CheckPayload is Decode's checks before allocating: what it
  //    refuses, Decode refuses too.
  std::vector<std::byte> raw(raw_bytes);
  const bool checked = codec.CheckPayload(layout, encoded).ok();
  if (codec.Decode(layout, encoded, raw).ok() && !checked) __builtin_trap();
  // A raw buffer of the wrong size is refused, whatever the payload.
  std::vector<std::byte> wrong(raw_bytes + 1);
  if (codec.Decode(layout, encoded, wrong).ok()) __builtin_trap();

  // 2. The bytes as raw KV.
  if (!encoded.empty()) {
    std::vector<std::byte> input(raw_bytes);
    for (size_t i = 0; i < raw_bytes; ++i) input[i] = encoded[i % encoded.size()];
    auto enc = codec.Encode(layout, input);
    if (enc.ok()) {
      std::vector<std::byte> back(raw_bytes);
      const cachette::Status s = codec.Decode(layout, *enc, back);
      if (!s.ok()) __builtin_trap();  // the writer produced what its reader refuses
      if (codec.lossless() && std::memcmp(back.data(), input.data(), raw_bytes) != 0) {
        __builtin_trap();  // a lossless codec changed the bytes
      }
    } else if (codec.lossless()) {
      __builtin_trap();  // lossless codecs take any bytes of a supported layout
    }
  }

  // 3. The registry, with the id and version a payload header would carry.
  if (size >= 2 + 12) (void)cachette::cache::CodecFor(U32(data + 2 + 4), U32(data + 2 + 8));
  return 0;
}
