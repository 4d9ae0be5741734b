// Parameters of the cachegen codec (docs/formats/codecs.md, "cachegen v1"): token groups, layer
// bands and the bins of each quality level. Shared by the codec and its tests, which derive the
// error bound of every element from these tables.
#pragma once

#include <algorithm>
#include <cstdint>

namespace cachette::cache::codecs {

inline constexpr uint32_t kCacheGenGroupTokens = 16;  // an anchor and up to 15 delta tokens

// The level byte of a payload.
enum class CacheGenLevel : uint8_t { kLow = 0, kMedium = 1, kHigh = 2 };
inline constexpr int kCacheGenLevels = 3;

struct CacheGenBins {
  const char* name;
  uint32_t k[3];  // K bins of bands 0 (first third of the layers), 1, 2
  uint32_t v[3];
};

// Indexed by the level byte. `cachegen-high` is LMCache's configuration for 7-8B models (32
// bins for the first layers, 16 after). The default is coarser, tuned for the models here:
// their KV has light tails (a channel's maximum is 2.4-3.3 times its rms in cachette-tiny's),
// so a step relative to the maximum is finer, in units of the channel's spread, than the same
// bins on KV with heavier tails. docs/formats/codecs.md has the measured sizes and errors.
inline constexpr CacheGenBins kCacheGenBins[kCacheGenLevels] = {
    {"cachegen-low", {10, 8, 6}, {8, 6, 6}},
    {"cachegen", {12, 10, 8}, {12, 8, 8}},
    {"cachegen-high", {32, 24, 16}, {32, 16, 16}},
};

// Band of layer `layer` of `n_layer`: min(2, floor(3 layer / n_layer)).
inline uint32_t CacheGenBand(uint64_t layer, uint64_t n_layer) {
  return static_cast<uint32_t>(std::min<uint64_t>(2, 3 * layer / n_layer));
}

inline uint32_t CacheGenPlaneBins(int level, uint64_t layer, uint64_t n_layer, int kv) {
  const CacheGenBins& b = kCacheGenBins[level];
  const uint32_t band = CacheGenBand(layer, n_layer);
  return kv == 0 ? b.k[band] : b.v[band];
}
// Steps each side of zero: a delta's step is scale / DeltaLevels, an anchor's scale /
// AnchorLevels (twice the bins).
inline uint32_t CacheGenDeltaLevels(uint32_t bins) { return bins / 2 - 1; }
inline uint32_t CacheGenAnchorLevels(uint32_t bins) { return bins - 1; }

}  // namespace cachette::cache::codecs
