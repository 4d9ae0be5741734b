// The cachegen codec (docs/formats/codecs.md, "cachegen v1"): per plane, groups of 16 tokens
// coded as an anchor and deltas against the decoded anchor, steps relative to each channel's
// maximum and banded by layer and K/V, symbols entropy-coded with rANS (rans.h) under a
// frequency table per (layer, K/V, channel) stored with the chunk.
//
// Each plane [n_tokens][C] (C = n_kv_head * head_dim) is one section of the body with its own
// rANS stream, found through a directory of section lengths, so planes could be decoded in
// parallel. On the calling thread, the decoder takes them in batches of up to 16
// (rans::Decoder::kMaxLockstep) whose streams it decodes in lockstep, run for run: the planes'
// runs have the same lengths, and 16 streams are 64 independent rANS states, enough to fill
// vector lanes (cachegen_kernels.h) where one stream's 4 states would leave the CPU waiting on
// each update. A batch the fast path refuses is decoded again by the reference decoder, plane by
// plane, so a corrupt payload's status is the reference's.
//
// Scratch per call: the encoder's is the size of one plane (f32 values, int8 codes, f32
// anchors); the decoder's is the int8 codes and tables of one batch of planes, and with the
// reference one plane of f32 values.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cache/codecs/cachegen.h"
#include "cache/codecs/cachegen_kernels.h"
#include "cache/codecs/codec_internal.h"
#include "cache/codecs/quant_scalar_ops.h"
#include "cache/codecs/rans.h"
#include "core/check.h"
#include "core/fp16.h"

namespace cachette::cache::codecs {
namespace {

constexpr uint32_t kF32 = 0, kF16 = 1;
constexpr uint64_t kG = kCacheGenGroupTokens;
constexpr size_t kBodyPrefixBytes = 4;  // level, 3 reserved
constexpr size_t kDirEntryBytes = 4;    // u32 section length per plane
// The widest alphabet any table may have: anchors of 64 bins, [-63, 63] (cachegen-high's finest
// band uses 32 bins, [-31, 31]; the rest of the format would take up to 64).
constexpr int kMaxAlphabet = 2 * 63 + 1;
static_assert(kMaxAlphabet <= rans::kMaxSymbols);
// w(k) of a table's 4-bit weight codes: about 4 * 2^((k - 1) / 2).
constexpr uint16_t kWeights[16] = {0, 4, 6, 8, 11, 16, 23, 32, 45, 64, 91, 128, 181, 256, 362, 512};

// The shape shared by every plane of a layout: [tokens][channels].
struct PlaneShape {
  uint64_t tokens = 0, channels = 0;
  uint64_t groups = 0;  // anchors per channel
  uint64_t deltas = 0;  // delta tokens per channel

  uint64_t elems() const { return tokens * channels; }
  uint64_t anchors() const { return groups * channels; }
  uint64_t mode_bytes() const { return (channels + 7) / 8; }
  // The smallest section: scales, modes, one-symbol tables (3 bytes each), the states.
  uint64_t MinSectionBytes() const {
    if (elems() == 0) return 0;
    return 2 * channels + mode_bytes() + 3 + (deltas > 0 ? 3 * channels : 0) +
           rans::kStreamHeaderBytes;
  }
};

// Only for a layout that passed CheckLayout, so the products cannot overflow.
PlaneShape ShapeOf(const ChunkLayout& l) {
  PlaneShape s;
  if (l.raw_bytes() == 0) return s;  // every plane is empty
  s.tokens = l.n_tokens;
  s.channels = uint64_t{l.n_kv_head} * l.head_dim;
  s.groups = (s.tokens + kG - 1) / kG;
  s.deltas = s.tokens - s.groups;
  return s;
}

struct PlaneParams {
  int anchor_levels;  // M_a
  int delta_levels;   // M_d
};

PlaneParams ParamsOf(int level, uint64_t layer, uint64_t n_layer, int kv) {
  const uint32_t bins = CacheGenPlaneBins(level, layer, n_layer, kv);
  return {static_cast<int>(CacheGenAnchorLevels(bins)),
          static_cast<int>(CacheGenDeltaLevels(bins))};
}

// Q of a channel's delta alphabet [-Q, Q]: deltas against the anchor span twice the scale.
int DeltaAlphabet(const PlaneParams& pp, bool plain) {
  return plain ? pp.delta_levels : 2 * pp.delta_levels;
}

uint32_t LoadU32(const std::byte* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(p[i]) << (8 * i);
  return v;
}
void StoreU32(std::byte* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<std::byte>(v >> (8 * i));
}

// ---- tables ----

// A table's range and weights, as stored.
struct StoredTable {
  int lo = 0, n = 0;
  uint8_t k[kMaxAlphabet];  // weight codes
};

// counts[0, 2q] = occurrences of the symbols -q .. q among symbols[0, n) (n < 2^32). Four
// partial histograms, so runs of one symbol do not wait on their own increments.
void Histogram(const int8_t* symbols, uint64_t n, int q, uint64_t* counts) {
  uint32_t part[4][kMaxAlphabet];
  for (auto& p : part) std::fill(p, p + 2 * q + 1, 0u);
  uint64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    ++part[0][symbols[i] + q];
    ++part[1][symbols[i + 1] + q];
    ++part[2][symbols[i + 2] + q];
    ++part[3][symbols[i + 3] + q];
  }
  for (; i < n; ++i) ++part[0][symbols[i] + q];
  for (int k = 0; k <= 2 * q; ++k) {
    counts[k] = uint64_t{part[0][k]} + part[1][k] + part[2][k] + part[3][k];
  }
}

// The weight code nearest in ratio to 512 * count / max (spec: "The encoder writes"): k is 1
// plus the number of geometric midpoints sqrt(w(k) w(k + 1)) below the target, compared
// squared.
uint8_t WeightCode(uint64_t count, uint64_t max) {
  if (count == 0) return 0;
  const double target = 512.0 * static_cast<double>(count) / static_cast<double>(max);
  int k = 1;
  while (k < 15 && target * target > static_cast<double>(kWeights[k]) * kWeights[k + 1]) ++k;
  return static_cast<uint8_t>(k);
}

// The stored table of a histogram over [-q, q] (some count nonzero).
StoredTable TableOf(const uint64_t* counts, int q) {
  int first = 0, last = 2 * q;
  while (counts[first] == 0) ++first;
  while (counts[last] == 0) --last;
  const uint64_t max = *std::max_element(counts + first, counts + last + 1);
  StoredTable t;
  t.lo = first - q;
  t.n = last - first + 1;
  for (int i = 0; i < t.n; ++i) t.k[i] = WeightCode(counts[first + i], max);
  return t;
}

void WriteTable(const StoredTable& t, std::vector<std::byte>& out) {
  out.push_back(static_cast<std::byte>(static_cast<int8_t>(t.lo)));
  out.push_back(static_cast<std::byte>(t.n));
  for (int i = 0; i < t.n; i += 2) {
    const uint8_t high = i + 1 < t.n ? t.k[i + 1] : 0;
    out.push_back(static_cast<std::byte>(t.k[i] | high << 4));
  }
}

// The frequencies both sides derive from a stored table. False if every weight is 0.
bool Frequencies(const StoredTable& t, uint16_t* freq) {
  uint64_t w[kMaxAlphabet], total = 0;
  for (int i = 0; i < t.n; ++i) total += w[i] = kWeights[t.k[i]];
  if (total == 0) return false;
  rans::NormalizeCounts(w, t.n, total, freq);
  return true;
}

// Bits to code a histogram over [-q, q] of n symbols with its own table (the entropy, plus
// the table): what the encoder compares to pick a channel's mode.
double CostBits(const uint64_t* counts, int q, uint64_t n) {
  double bits = 0;
  int first = -1, last = 0;
  for (int i = 0; i <= 2 * q; ++i) {
    if (counts[i] == 0) continue;
    if (first < 0) first = i;
    last = i;
    bits -= static_cast<double>(counts[i]) * std::log2(static_cast<double>(counts[i]) / n);
  }
  return bits + 8.0 * (2 + (last - first + 2) / 2);
}

// Bounds-checked reads from one section.
struct Cursor {
  const std::byte* p;
  const std::byte* end;

  size_t left() const { return static_cast<size_t>(end - p); }
};

// Reads a stored table of the alphabet [-q, q] and its frequencies into freq[0, t->n). False
// if it is malformed or runs past the cursor.
bool ReadTable(Cursor& cur, int q, StoredTable* t, uint16_t* freq) {
  if (cur.left() < 2) return false;
  t->lo = static_cast<int8_t>(cur.p[0]);
  t->n = static_cast<uint8_t>(cur.p[1]);
  cur.p += 2;
  if (t->n == 0 || t->lo < -q || t->lo + t->n - 1 > q) return false;
  const size_t bytes = (static_cast<size_t>(t->n) + 1) / 2;
  if (cur.left() < bytes) return false;
  for (int i = 0; i < t->n; i += 2) {
    const uint8_t b = static_cast<uint8_t>(cur.p[i / 2]);
    t->k[i] = b & 0x0F;
    if (i + 1 < t->n) {
      t->k[i + 1] = b >> 4;
    } else if ((b >> 4) != 0) {
      return false;  // the unused nibble
    }
  }
  cur.p += bytes;
  return Frequencies(*t, freq);
}

// ---- planes ----

// The encoder's scratch for one plane, sized once per Encode call.
struct PlaneScratch {
  std::vector<float> values;                 // [tokens][C]
  std::vector<float> anchors;                // [groups][C], decoded
  std::vector<int8_t> anchor_q;              // [groups][C]
  std::vector<int8_t> delta_q;               // [C][deltas]
  std::vector<int8_t> plain_q;               // [C][deltas], the plain-mode codes
  std::vector<float> scale, step_a, step_d;  // [C]
  std::vector<uint8_t> plain;                // [C] 1 = plain mode
  std::vector<StoredTable> tables;           // the anchors', then each channel's

  explicit PlaneScratch(const PlaneShape& s)
      : values(s.elems()),
        anchors(s.anchors()),
        anchor_q(s.anchors()),
        delta_q(s.deltas * s.channels),
        plain_q(s.deltas * s.channels),
        scale(s.channels),
        step_a(s.channels),
        step_d(s.channels),
        plain(s.channels),
        tables(1 + s.channels) {}
};

// A channel's steps from its scale s: s / M_a and s / M_d.
void SetSteps(uint64_t channels, const PlaneParams& pp, const float* scale, float* step_a,
              float* step_d) {
  for (uint64_t c = 0; c < channels; ++c) {
    step_a[c] = scale[c] / static_cast<float>(pp.anchor_levels);
    step_d[c] = scale[c] / static_cast<float>(pp.delta_levels);
  }
}

// Encodes w.values ([tokens][C] f32) as one plane section appended to `out`. False if a value
// is non-finite or beyond the f16 range.
bool EncodePlane(const PlaneShape& s, const PlaneParams& pp, PlaneScratch& w,
                 std::vector<std::byte>& out) {
  const uint64_t C = s.channels;
  const float* x = w.values.data();
  // Scales: the channel's largest |x|, rounded up to f16.
  std::vector<float> amax(C, 0.0f);
  bool in_range = true;
  for (uint64_t t = 0; t < s.tokens; ++t) {
    const float* row = x + t * C;
    for (uint64_t c = 0; c < C; ++c) {
      const float a = std::fabs(row[c]);
      in_range &= a <= kF16Max;  // false for NaN too
      amax[c] = std::max(amax[c], a);
    }
  }
  if (!in_range) return false;
  const size_t scales_at = out.size();
  out.resize(scales_at + 2 * C);
  for (uint64_t c = 0; c < C; ++c) {
    const uint16_t bits = F16RoundUp(amax[c]);
    StoreU16(out.data() + scales_at + 2 * c, bits);
    w.scale[c] = Fp16ToFp32(bits);
  }
  SetSteps(C, pp, w.scale.data(), w.step_a.data(), w.step_d.data());
  const float qa = static_cast<float>(pp.anchor_levels);
  const float qd = static_cast<float>(pp.delta_levels);

  // Anchors, then each delta token's code in both modes, channel-major (the rANS run order).
  for (uint64_t g = 0; g < s.groups; ++g) {
    const float* row = x + g * kG * C;
    for (uint64_t c = 0; c < C; ++c) {
      const float step = w.step_a[c], inv = step > 0.0f ? 1.0f / step : 0.0f;
      const float q = ClampCode(RoundHalfEven(row[c] * inv), -qa, qa);
      w.anchor_q[g * C + c] = static_cast<int8_t>(q);
      w.anchors[g * C + c] = std::clamp(q * step, -w.scale[c], w.scale[c]);
    }
  }
  std::vector<float> inv_d(C);
  for (uint64_t c = 0; c < C; ++c) inv_d[c] = w.step_d[c] > 0.0f ? 1.0f / w.step_d[c] : 0.0f;
  // Locals, so the int8 stores (which may alias anything) do not reload the vectors' data.
  int8_t* const delta_q = w.delta_q.data();
  int8_t* const plain_q = w.plain_q.data();
  const float* const inv_step_d = inv_d.data();
  const uint64_t deltas = s.deltas;
  uint64_t j = 0;  // delta index within a channel's run
  for (uint64_t t = 0; t < s.tokens; ++t) {
    if (t % kG == 0) continue;
    const float* row = x + t * C;
    const float* anchor = w.anchors.data() + (t / kG) * C;
    for (uint64_t c = 0; c < C; ++c) {
      const float d =
          ClampCode(RoundHalfEven((row[c] - anchor[c]) * inv_step_d[c]), -2 * qd, 2 * qd);
      const float p = ClampCode(RoundHalfEven(row[c] * inv_step_d[c]), -qd, qd);
      delta_q[c * deltas + j] = static_cast<int8_t>(d);
      plain_q[c * deltas + j] = static_cast<int8_t>(p);
    }
    ++j;
  }

  // Modes: per channel, the cheaper of the two; its codes go to delta_q and its table to
  // tables[1 + c].
  const size_t modes_at = out.size();
  out.resize(modes_at + s.mode_bytes());
  uint64_t counts[kMaxAlphabet], plain_counts[kMaxAlphabet];
  if (s.deltas > 0) {
    for (uint64_t c = 0; c < C; ++c) {
      int8_t* anchored = w.delta_q.data() + c * s.deltas;
      const int8_t* plain = w.plain_q.data() + c * s.deltas;
      Histogram(anchored, s.deltas, 2 * pp.delta_levels, counts);
      Histogram(plain, s.deltas, pp.delta_levels, plain_counts);
      w.plain[c] = CostBits(plain_counts, pp.delta_levels, s.deltas) <
                   CostBits(counts, 2 * pp.delta_levels, s.deltas);
      if (w.plain[c]) {
        std::memcpy(anchored, plain, s.deltas);
        out[modes_at + c / 8] |= static_cast<std::byte>(1u << (c % 8));
        w.tables[1 + c] = TableOf(plain_counts, pp.delta_levels);
      } else {
        w.tables[1 + c] = TableOf(counts, 2 * pp.delta_levels);
      }
    }
  }

  // Tables: the anchors', then each channel's.
  Histogram(w.anchor_q.data(), s.anchors(), pp.anchor_levels, counts);
  w.tables[0] = TableOf(counts, pp.anchor_levels);
  WriteTable(w.tables[0], out);
  if (s.deltas > 0) {
    for (uint64_t c = 0; c < C; ++c) WriteTable(w.tables[1 + c], out);
  }

  // The stream: runs last first (channel C - 1's deltas ... channel 0's, then the anchors).
  rans::Encoder enc;
  rans::Table table;
  uint16_t freq[kMaxAlphabet];
  auto encode_run = [&](const int8_t* run, uint64_t n, const StoredTable& t) {
    const bool some_weight = Frequencies(t, freq);
    CT_CHECK(some_weight) << "a table of " << n << " symbols has no weight";
    table.Build(t.lo, t.n, freq);
    enc.EncodeRun(table, run, n, 1);
  };
  if (s.deltas > 0) {
    for (uint64_t c = C; c-- > 0;) {
      encode_run(w.delta_q.data() + c * s.deltas, s.deltas, w.tables[1 + c]);
    }
  }
  encode_run(w.anchor_q.data(), s.anchors(), w.tables[0]);
  enc.Finish(out);
  return true;
}

// One plane's section as the decoder reads it: per-channel parameters, the tables (ranges holds
// (lo, n) per table, freqs their frequencies at kMaxAlphabet apart; table 0 is the anchors',
// table 1 + c channel c's), the opened stream, and the decoded codes.
struct PlaneDecode {
  std::vector<float> scale, step_a, step_d;  // [C]
  std::vector<uint8_t> plain;                // [C] 1 = plain mode
  std::vector<int> ranges;
  std::vector<uint16_t> freqs;
  rans::Decoder dec;
  std::vector<int8_t> anchor_q;  // [groups][C]
  // The reference decoder's [deltas][C]; the fast one's [C][deltas] and 3 bytes of slack
  // (CacheGenPlaneCodes).
  std::vector<int8_t> delta_q;

  explicit PlaneDecode(const PlaneShape& s)
      : scale(s.channels),
        step_a(s.channels),
        step_d(s.channels),
        plain(s.channels),
        anchor_q(s.anchors()),
        delta_q(s.deltas * s.channels + 3) {}

  // Table i's range and frequencies into `dt`, by the plain Build or `kernels`' twin.
  void BuildTable(uint64_t i, rans::DecodeTable& dt) const {
    dt.Build(ranges[2 * i], ranges[2 * i + 1], freqs.data() + i * kMaxAlphabet);
  }
  void BuildTable(uint64_t i, const CacheGenKernels& kernels, rans::DecodeTable& dt) const {
    kernels.build_table(ranges[2 * i], ranges[2 * i + 1], freqs.data() + i * kMaxAlphabet, dt);
  }
  CacheGenPlaneCodes Codes(const PlaneShape& s) const {
    return {s.tokens,     s.channels,    anchor_q.data(), delta_q.data(),
            scale.data(), step_a.data(), step_d.data(),   plain.data()};
  }
};

// Reads a section's scales, modes and tables and opens its stream. kCorruption naming the
// fault.
Status ParsePlane(const PlaneShape& s, const PlaneParams& pp, std::span<const std::byte> section,
                  PlaneDecode& d) {
  const uint64_t C = s.channels;
  Cursor cur{section.data(), section.data() + section.size()};
  if (cur.left() < 2 * C + s.mode_bytes()) return Corruption("scales run past the section");
  for (uint64_t c = 0; c < C; ++c) {
    const uint16_t bits = LoadU16(cur.p + 2 * c);
    if ((bits & 0x8000) != 0 || (bits & 0x7C00) == 0x7C00) {
      return Corruption("scale of channel " + std::to_string(c) +
                        " is not a finite non-negative f16");
    }
    d.scale[c] = Fp16ToFp32(bits);
  }
  cur.p += 2 * C;
  SetSteps(C, pp, d.scale.data(), d.step_a.data(), d.step_d.data());
  for (uint64_t c = 0; c < C; ++c) {
    d.plain[c] = (static_cast<uint8_t>(cur.p[c / 8]) >> (c % 8)) & 1;
  }
  if (C % 8 != 0 && (static_cast<uint8_t>(cur.p[C / 8]) >> (C % 8)) != 0) {
    return Corruption("unused mode bits are set");
  }
  cur.p += s.mode_bytes();

  const uint64_t n_tables = 1 + (s.deltas > 0 ? C : 0);
  d.ranges.resize(2 * n_tables);
  d.freqs.resize(n_tables * kMaxAlphabet);
  StoredTable t;
  for (uint64_t i = 0; i < n_tables; ++i) {
    const bool anchor = i == 0;
    const int q = anchor ? pp.anchor_levels : DeltaAlphabet(pp, d.plain[i - 1]);
    if (!ReadTable(cur, q, &t, d.freqs.data() + i * kMaxAlphabet)) {
      return Corruption(anchor ? std::string("anchor table is malformed or truncated")
                               : "delta table of channel " + std::to_string(i - 1) +
                                     " is malformed or truncated");
    }
    d.ranges[2 * i] = t.lo;
    d.ranges[2 * i + 1] = t.n;
  }
  return d.dec.Open(std::span<const std::byte>(cur.p, cur.end));
}

// The reference decoder of one plane section, the spec's steps one after the other: parse,
// each rANS run on its own, then the values in f32 ([tokens][C], into `values`). kCorruption
// naming the fault.
Status DecodePlaneReference(const PlaneShape& s, const PlaneParams& pp,
                            std::span<const std::byte> section, PlaneDecode& d,
                            rans::DecodeTable& dt, std::vector<float>& values) {
  CT_RETURN_IF_ERROR(ParsePlane(s, pp, section, d));
  const uint64_t C = s.channels;
  d.BuildTable(0, dt);
  if (!d.dec.DecodeRun(dt, s.anchors(), d.anchor_q.data(), 1)) {
    return Corruption("rANS stream ends inside the anchors");
  }
  if (s.deltas > 0) {
    for (uint64_t c = 0; c < C; ++c) {
      d.BuildTable(1 + c, dt);
      if (!d.dec.DecodeRun(dt, s.deltas, d.delta_q.data() + c, C)) {
        return Corruption("rANS stream ends inside channel " + std::to_string(c));
      }
    }
  }
  if (!d.dec.AtEnd()) return Corruption("rANS stream does not end where its section does");

  // Dequantize, token-major. ref holds each channel's reference of the current group: its
  // anchor, or 0 in plain mode.
  std::vector<float> anchors(s.anchors()), ref(C);
  for (uint64_t g = 0; g < s.groups; ++g) {
    const int8_t* q = d.anchor_q.data() + g * C;
    float* a = anchors.data() + g * C;
    for (uint64_t c = 0; c < C; ++c) {
      a[c] = std::min(std::max(q[c] * d.step_a[c], -d.scale[c]), d.scale[c]);
    }
  }
  uint64_t j = 0;
  for (uint64_t t = 0; t < s.tokens; ++t) {
    float* out = values.data() + t * C;
    const float* anchor = anchors.data() + (t / kG) * C;
    if (t % kG == 0) {
      std::memcpy(out, anchor, C * sizeof(float));
      for (uint64_t c = 0; c < C; ++c) ref[c] = d.plain[c] ? 0.0f : anchor[c];
      continue;
    }
    const int8_t* q = d.delta_q.data() + j * C;
    for (uint64_t c = 0; c < C; ++c) {
      const float v = ref[c] + static_cast<float>(q[c]) * d.step_d[c];
      out[c] = std::min(std::max(v, -d.scale[c]), d.scale[c]);
    }
    ++j;
  }
  return Status::Ok();
}

// The fast decoder of k <= kMaxLockstep plane sections (one decode each in `d`, one table
// each in `dt`): the same steps up to the codes, with the k streams' runs decoded in lockstep by
// `kernels` (their runs have the same lengths: every plane has the chunk's shape), each
// channel's deltas into its own row of delta_q. The caller writes the values. Any fault is
// reported as a bare kCorruption: the caller then reruns the reference on these planes, which
// names the first fault in plane order.
Status DecodePlanesFast(const PlaneShape& s, std::span<const PlaneParams> pp,
                        std::span<const std::span<const std::byte>> sections,
                        const CacheGenKernels& kernels, std::span<PlaneDecode> d,
                        std::span<rans::DecodeTable> dt) {
  const int k = static_cast<int>(sections.size());
  rans::Decoder* decs[rans::Decoder::kMaxLockstep];
  int8_t* outs[rans::Decoder::kMaxLockstep];
  for (int i = 0; i < k; ++i) {
    CT_RETURN_IF_ERROR(ParsePlane(s, pp[i], sections[i], d[i]));
    decs[i] = &d[i].dec;
  }
  const Status fault = Corruption("a plane of the batch is corrupt");
  for (int i = 0; i < k; ++i) {
    d[i].BuildTable(0, kernels, dt[i]);
    outs[i] = d[i].anchor_q.data();
  }
  if (!kernels.decode_runs(decs, dt.data(), k, s.anchors(), outs, 1)) return fault;
  if (s.deltas > 0) {
    for (uint64_t c = 0; c < s.channels; ++c) {
      for (int i = 0; i < k; ++i) {
        d[i].BuildTable(1 + c, kernels, dt[i]);
        outs[i] = d[i].delta_q.data() + c * s.deltas;
      }
      if (!kernels.decode_runs(decs, dt.data(), k, s.deltas, outs, 1)) return fault;
    }
  }
  for (int i = 0; i < k; ++i) {
    if (!d[i].dec.AtEnd()) return fault;
  }
  return Status::Ok();
}

class CacheGenCodec final : public Codec {
 public:
  // `cg` nullptr: decode with the reference alone.
  CacheGenCodec(CacheGenLevel level, const QuantKernels& kernels, const CacheGenKernels* cg)
      : k_(kernels), cg_(cg), level_(static_cast<int>(level)), name_(kCacheGenBins[level_].name) {}

  std::string name() const override { return name_; }
  uint32_t id() const override { return static_cast<uint32_t>(CodecId::kCacheGen); }
  uint32_t version() const override { return kCacheGenVersion; }
  bool lossless() const override { return false; }

  Result<std::vector<std::byte>> Encode(const ChunkLayout& layout,
                                        std::span<const std::byte> raw) const override {
    CT_RETURN_IF_ERROR(CheckSupported(layout, raw.size()));
    const PlaneShape s = ShapeOf(layout);
    // Histograms count in 32 bits (and no chunk comes near: 256 tokens of 8 x 128 channels
    // are 2^18 elements a plane).
    if (s.elems() > std::numeric_limits<uint32_t>::max()) {
      return InvalidArgument(name_ + ": a plane of " + std::to_string(s.elems()) +
                             " elements is beyond cachegen's 2^32");
    }
    const uint64_t n_planes = uint64_t{layout.n_layer} * 2;
    std::vector<std::byte> out(kHeaderBytes + kBodyPrefixBytes + kDirEntryBytes * n_planes);
    out[kHeaderBytes] = static_cast<std::byte>(level_);
    const uint64_t elem_bytes = layout.kv_type == kF32 ? 4 : 2;
    PlaneScratch w(s);
    for (uint64_t p = 0; p < n_planes && s.elems() > 0; ++p) {
      const std::byte* src = raw.data() + p * s.elems() * elem_bytes;
      if (layout.kv_type == kF16) {
        k_.f16_to_f32(src, w.values.data(), s.elems());
      } else {
        std::memcpy(w.values.data(), src, s.elems() * 4);
      }
      const size_t at = out.size();
      if (!EncodePlane(s, ParamsOf(level_, p / 2, layout.n_layer, static_cast<int>(p % 2)), w,
                       out)) {
        return InvalidArgument(name_ +
                               ": input has a non-finite value or one beyond the f16 "
                               "range (|x| > 65504) in layer " +
                               std::to_string(p / 2));
      }
      const uint64_t section = out.size() - at;
      if (section > std::numeric_limits<uint32_t>::max()) {
        return InvalidArgument(name_ + ": plane section of " + std::to_string(section) +
                               " bytes is beyond the format's 4 GiB");
      }
      StoreU32(out.data() + kHeaderBytes + kBodyPrefixBytes + kDirEntryBytes * p,
               static_cast<uint32_t>(section));
    }
    WriteHeader(id(), version(), layout, out.size() - kHeaderBytes, out.data());
    return out;
  }

  Status Decode(const ChunkLayout& layout, std::span<const std::byte> encoded,
                std::span<std::byte> raw) const override {
    CT_RETURN_IF_ERROR(CheckSupported(layout, raw.size()));
    CT_ASSIGN_OR_RETURN(std::span<const std::byte> body,
                        ParseHeader(encoded, id(), version(), layout, kAnyBodySize, name_));
    CT_ASSIGN_OR_RETURN(const int level, CheckBody(layout, body));
    const PlaneShape s = ShapeOf(layout);
    if (s.elems() == 0) return Status::Ok();
    const uint64_t n_planes = uint64_t{layout.n_layer} * 2;
    const uint64_t elem_bytes = layout.kv_type == kF32 ? 4 : 2;
    constexpr int kBatch = rans::Decoder::kMaxLockstep;
    const size_t batch = std::min<uint64_t>(kBatch, n_planes);
    std::vector<PlaneDecode> d(batch, PlaneDecode(s));
    std::vector<rans::DecodeTable> dt(batch);
    std::vector<float> values;  // the reference's f32 plane
    uint64_t at = kBodyPrefixBytes + kDirEntryBytes * n_planes;
    // Batches of up to kBatch planes: the fast decoder, or (for the reference codec, and to
    // name the fault of a batch the fast one refused) the reference plane by plane.
    for (uint64_t p0 = 0; p0 < n_planes; p0 += kBatch) {
      const int k = static_cast<int>(std::min<uint64_t>(kBatch, n_planes - p0));
      PlaneParams pp[kBatch];
      std::span<const std::byte> sections[kBatch];
      for (int i = 0; i < k; ++i) {
        const uint64_t p = p0 + i;
        const uint64_t len = LoadU32(body.data() + kBodyPrefixBytes + kDirEntryBytes * p);
        pp[i] = ParamsOf(level, p / 2, layout.n_layer, static_cast<int>(p % 2));
        sections[i] = body.subspan(at, len);
        at += len;
      }
      auto dst = [&](int i) { return raw.data() + (p0 + i) * s.elems() * elem_bytes; };
      if (cg_ != nullptr && DecodePlanesFast(s, std::span(pp, k), std::span(sections, k), *cg_,
                                             std::span(d.data(), k), std::span(dt.data(), k))
                                .ok()) {
        for (int i = 0; i < k; ++i) {
          cg_->reconstruct(d[i].Codes(s), layout.kv_type == kF16, dst(i));
        }
        continue;
      }
      values.resize(s.elems());
      for (int i = 0; i < k; ++i) {
        const uint64_t p = p0 + i;
        const Status st = DecodePlaneReference(s, pp[i], sections[i], d[i], dt[i], values);
        if (!st.ok()) {
          return Corruption(name_ + ": layer " + std::to_string(p / 2) + (p % 2 ? " V" : " K") +
                            ": " + st.message());
        }
        if (layout.kv_type == kF16) {
          k_.f32_to_f16(values.data(), dst(i), s.elems());
        } else {
          std::memcpy(dst(i), values.data(), s.elems() * 4);
        }
      }
    }
    return Status::Ok();
  }

  Status CheckPayload(const ChunkLayout& layout,
                      std::span<const std::byte> encoded) const override {
    CT_RETURN_IF_ERROR(CheckSupported(layout, layout.raw_bytes()));
    CT_ASSIGN_OR_RETURN(std::span<const std::byte> body,
                        ParseHeader(encoded, id(), version(), layout, kAnyBodySize, name_));
    return CheckBody(layout, body).status();
  }

 private:
  Status CheckSupported(const ChunkLayout& layout, size_t raw_size) const {
    if (layout.kv_type != kF32 && layout.kv_type != kF16) {
      return InvalidArgument(name_ + ": kv_type " + std::to_string(layout.kv_type) +
                             " is not supported (f32 or f16 only)");
    }
    return CheckLayout(layout, raw_size, name_);
  }

  // The body checks before any plane is decoded (docs/formats/codecs.md, "Decode checks"):
  // the level, the reserved bytes, and the plane directory against the layout and the body's
  // length. Returns the level.
  Result<int> CheckBody(const ChunkLayout& layout, std::span<const std::byte> body) const {
    const std::string who = name_ + ": ";
    const uint64_t n_planes = uint64_t{layout.n_layer} * 2;
    if (body.size() < kBodyPrefixBytes ||
        (body.size() - kBodyPrefixBytes) / kDirEntryBytes < n_planes) {
      return Corruption(who + "body of " + std::to_string(body.size()) +
                        " bytes is shorter than its plane directory");
    }
    const int level = static_cast<int>(body[0]);
    if (level >= kCacheGenLevels) return Corruption(who + "unknown level " + std::to_string(level));
    if (body[1] != std::byte{0} || body[2] != std::byte{0} || body[3] != std::byte{0}) {
      return Corruption(who + "nonzero reserved body bytes");
    }
    const uint64_t sections = body.size() - kBodyPrefixBytes - kDirEntryBytes * n_planes;
    const uint64_t min_section = ShapeOf(layout).MinSectionBytes();
    uint64_t sum = 0;
    for (uint64_t p = 0; p < n_planes; ++p) {
      const uint64_t len = LoadU32(body.data() + kBodyPrefixBytes + kDirEntryBytes * p);
      if (min_section == 0 ? len != 0 : len < min_section) {
        return Corruption(who + "plane section " + std::to_string(p) + " of " +
                          std::to_string(len) + " bytes cannot hold a plane of this layout");
      }
      sum += len;  // below 2^32 per plane and stops at the body's size: no overflow
      if (sum > sections) {
        return Corruption(who + "plane sections run past the body's " + std::to_string(sections) +
                          " bytes");
      }
    }
    if (sum != sections) {
      return Corruption(who + "plane sections sum to " + std::to_string(sum) +
                        " bytes, the body holds " + std::to_string(sections));
    }
    return level;
  }

  const QuantKernels& k_;
  const CacheGenKernels* cg_;
  int level_;
  std::string name_;
};

}  // namespace

std::unique_ptr<Codec> MakeCacheGenCodecWith(CacheGenLevel level, const QuantKernels& quant,
                                             const CacheGenKernels* kernels) {
  return std::make_unique<CacheGenCodec>(level, quant, kernels);
}

std::unique_ptr<Codec> MakeCacheGenCodec(CacheGenLevel level, const QuantKernels& kernels) {
  // The cachegen table of the same ISA as `kernels` (tests pass the scalar one).
  const CacheGenKernels* cg = &ScalarCacheGenKernels();
  if (&kernels == Avx512QuantKernels()) {
    cg = Avx512CacheGenKernels();
  } else if (&kernels == Avx2QuantKernels()) {
    cg = Avx2CacheGenKernels();
  }
  return MakeCacheGenCodecWith(level, kernels, cg != nullptr ? cg : &ScalarCacheGenKernels());
}

}  // namespace cachette::cache::codecs
