// Tests of the KV codecs: exact round trips of the lossless ones, the per-element error bound of
// the lossy ones (derived from the data, independently of the payload), the fast kernels
// against the scalar reference, and a table of malformed payloads.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <zstd.h>

#include "cache/codecs/codec.h"
#include "cache/codecs/codec_internal.h"
#include "cache/codecs/quant_kernels.h"
#include "cache/test_util.h"
#include "core/fp16.h"

namespace cachette::cache {
namespace {

using testing::FromRaw;
using testing::ToRaw;
using codecs::kHeaderBytes;

std::vector<std::byte> RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::byte> v(n);
  for (auto& b : v) b = static_cast<std::byte>(rng() & 0xFF);
  return v;
}

// KV-like values: N(0, 1), a few outlier channels (x 30, as keys have) and rare spikes.
std::vector<float> KvLikeValues(const ChunkLayout& l, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> spike(0, 199);
  const size_t n = l.raw_bytes() / (l.kv_type == 0 ? 4 : 2);
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) {
    const size_t d = i % l.head_dim;
    float x = normal(rng);
    if (d % 17 == 3) x *= 30.0f;
    if (spike(rng) == 0) x *= 100.0f;
    v[i] = x;
  }
  return v;
}

std::unique_ptr<Codec> Make(const std::string& name) {
  auto c = MakeCodec(name);
  EXPECT_TRUE(c.ok()) << name << ": " << c.status().ToString();
  return std::move(c).value();
}

ChunkLayout Layout(uint32_t n_layer, uint32_t n_kv_head, uint32_t head_dim, uint32_t n_tokens,
                   uint32_t kv_type) {
  return ChunkLayout{n_layer, n_kv_head, head_dim, n_tokens, kv_type};
}

const std::vector<ChunkLayout>& Shapes() {
  static const std::vector<ChunkLayout> shapes = {
      Layout(2, 2, 64, 256, 1),  // qwen2.5-0.5b-like, f16
      Layout(1, 2, 64, 45, 1),   // n_tokens not a multiple of 32
      Layout(2, 1, 128, 33, 0),  // f32, one token in the last key group
      Layout(1, 3, 80, 7, 1),    // head_dim not a multiple of 16/32/64: tails and fallbacks
      Layout(1, 1, 2, 1, 0),     // tiny
      Layout(3, 2, 64, 32, 0),
      Layout(1, 2, 64, 0, 1),    // empty chunk
  };
  return shapes;
}

std::string ShapeName(const ChunkLayout& l) {
  // snprintf rather than a chain of string +: GCC 12 reports a false -Wrestrict on the latter.
  char buf[96];
  std::snprintf(buf, sizeof(buf), "L%uH%uD%uT%uk%u", l.n_layer, l.n_kv_head, l.head_dim,
                l.n_tokens, l.kv_type);
  return buf;
}

// ---- lossless ----

TEST(CodecsTest, LosslessRoundTripIsExact) {
  std::vector<ChunkLayout> shapes = Shapes();
  shapes.push_back(Layout(2, 2, 64, 16, 2));  // q8_0: raw and zstd+raw only
  shapes.push_back(Layout(2, 3, 96, 16, 3));  // q4_0: likewise
  for (const char* name : {"raw", "zstd+raw"}) {
    auto codec = Make(name);
    EXPECT_TRUE(codec->lossless());
    for (const ChunkLayout& l : shapes) {
      SCOPED_TRACE(std::string(name) + " " + ShapeName(l));
      const auto raw = RandomBytes(l.raw_bytes(), 7);
      auto enc = codec->Encode(l, raw);
      ASSERT_TRUE(enc.ok()) << enc.status().ToString();
      std::vector<std::byte> out(raw.size(), std::byte{0x5a});
      ASSERT_TRUE(codec->Decode(l, *enc, out).ok());
      EXPECT_EQ(out, raw);
    }
  }
}

TEST(CodecsTest, ZstdIsLosslessOverLossyCodecs) {
  const ChunkLayout l = Layout(2, 2, 64, 45, 1);
  const auto raw = ToRaw(l, KvLikeValues(l, 3));
  for (const char* inner : {"int8", "int4", "int4-g64"}) {
    SCOPED_TRACE(inner);
    auto plain = Make(inner), zstd = Make(std::string("zstd+") + inner);
    std::vector<std::byte> a(raw.size()), b(raw.size());
    auto ea = plain->Encode(l, raw);
    auto eb = zstd->Encode(l, raw);
    ASSERT_TRUE(ea.ok() && eb.ok());
    ASSERT_TRUE(plain->Decode(l, *ea, a).ok());
    ASSERT_TRUE(zstd->Decode(l, *eb, b).ok());
    EXPECT_EQ(a, b);
    EXPECT_FALSE(zstd->lossless());
  }
}

TEST(CodecsTest, ZstdCompressesALowEntropyChunk) {
  // f16 KV of a repetitive prompt: a few distinct vectors repeated over the tokens.
  const ChunkLayout l = Layout(4, 2, 64, 256, 1);
  std::vector<float> v(l.raw_bytes() / 2);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>((i / 128) % 4) * 0.25f;
  const auto raw = ToRaw(l, v);
  auto enc = Make("zstd+raw")->Encode(l, raw);
  ASSERT_TRUE(enc.ok());
  EXPECT_LT(enc->size(), raw.size() / 20) << "zstd+raw: " << enc->size() << " of " << raw.size();
  // And random bytes do not grow by more than zstd's framing.
  const auto noise = RandomBytes(l.raw_bytes(), 11);
  auto enc_noise = Make("zstd+raw")->Encode(l, noise);
  ASSERT_TRUE(enc_noise.ok());
  EXPECT_LT(enc_noise->size(), noise.size() + noise.size() / 100 + 2 * kHeaderBytes);
}

// ---- lossy: error bounds ----

// The group every element belongs to, per codec (docs/formats/codecs.md), as a map key.
uint64_t GroupOf(const std::string& codec, const ChunkLayout& l, uint64_t layer, int kv,
                 uint64_t t, uint64_t h, uint64_t d) {
  const uint64_t plane = layer * 2 + kv;
  const uint64_t vec = (plane * l.n_tokens + t) * l.n_kv_head + h;
  if (codec == "int8") return vec;
  if (codec == "int4-g64") return vec * 1000 + d / 64;
  // int4 (KIVI): keys per channel over 32 tokens, values per token over 32 elements.
  if (kv == 0) return ((plane * 1000 + t / 32) * l.n_kv_head + h) * 100000 + d + (1ull << 62);
  return vec * 1000 + d / 32;
}

struct GroupStats {
  float lo = INFINITY, hi = -INFINITY, amax = 0.0f;
};

// The bound of docs/formats/codecs.md, from the group's data only. f16 rounding of a parameter
// moves it by at most 2^-10 relative (normal range) or 2^-24 absolute (subnormals).
double Bound(const std::string& codec, const GroupStats& g, float decoded, bool f16_out) {
  const double kUlp = std::ldexp(1.0, -10), kSub = std::ldexp(1.0, -24);
  double b;
  if (codec == "int8") {
    const double s = g.amax / 127.0 * (1 + kUlp) + kSub;
    b = s / 2 * (1 + std::ldexp(1.0, -14)) + g.amax * std::ldexp(1.0, -22);
  } else {
    const double m = g.lo - std::fabs(g.lo) * kUlp - kSub;
    const double s = (g.hi - m) / 15 * (1 + kUlp) + kSub;
    b = s / 2 * (1 + std::ldexp(1.0, -14)) + (std::fabs(m) + 15 * s) * std::ldexp(1.0, -22);
  }
  if (f16_out) b += std::max(std::fabs(decoded) * std::ldexp(1.0, -11), std::ldexp(1.0, -25));
  return b;
}

void CheckBound(const std::string& name, const std::string& base, const ChunkLayout& l,
                uint32_t seed) {
  SCOPED_TRACE(name + " " + ShapeName(l));
  auto codec = Make(name);
  const std::vector<float> x_exact = KvLikeValues(l, seed);
  const auto raw = ToRaw(l, x_exact);
  const std::vector<float> x = FromRaw(l, raw);  // what the codec sees (f16-rounded for f16)
  auto enc = codec->Encode(l, raw);
  ASSERT_TRUE(enc.ok()) << enc.status().ToString();
  std::vector<std::byte> out(raw.size());
  ASSERT_TRUE(codec->Decode(l, *enc, out).ok());
  const std::vector<float> y = FromRaw(l, out);

  std::map<uint64_t, GroupStats> groups;
  auto for_each = [&](auto&& fn) {
    size_t i = 0;
    for (uint64_t layer = 0; layer < l.n_layer; ++layer) {
      for (int kv = 0; kv < 2; ++kv) {
        for (uint64_t t = 0; t < l.n_tokens; ++t) {
          for (uint64_t h = 0; h < l.n_kv_head; ++h) {
            for (uint64_t d = 0; d < l.head_dim; ++d, ++i) {
              fn(GroupOf(base, l, layer, kv, t, h, d), i);
            }
          }
        }
      }
    }
  };
  for_each([&](uint64_t g, size_t i) {
    GroupStats& s = groups[g];
    s.lo = std::min(s.lo, x[i]);
    s.hi = std::max(s.hi, x[i]);
    s.amax = std::max(s.amax, std::fabs(x[i]));
  });
  double worst_ratio = 0;
  int failures = 0;
  for_each([&](uint64_t g, size_t i) {
    const double err = std::fabs(static_cast<double>(x[i]) - y[i]);
    const double bound = Bound(base, groups[g], y[i], l.kv_type == 1);
    worst_ratio = std::max(worst_ratio, err / bound);
    if (err > bound && ++failures <= 5) {
      ADD_FAILURE() << "element " << i << ": x " << x[i] << " decoded " << y[i] << " error "
                    << err << " > bound " << bound;
    }
  });
  // The bound is tight: some element gets close to it (else the test checks nothing).
  if (x.size() > 1000) {
    EXPECT_GT(worst_ratio, 0.5);
  }
}

TEST(CodecsTest, LossyCodecsMeetTheirErrorBound) {
  for (const char* base : {"int8", "int4", "int4-g64"}) {
    for (const ChunkLayout& l : Shapes()) {
      CheckBound(base, base, l, 100 + l.n_tokens);
      CheckBound(std::string("zstd+") + base, base, l, 200 + l.n_tokens);
    }
  }
}

TEST(CodecsTest, LossyCodecsAreExactOnTheirGrid) {
  // Values an int8 codec can represent exactly (q * 2^-4 with a group amax of 127 * 2^-4)
  // come back bit-exact, f16 in and out.
  const ChunkLayout l = Layout(1, 1, 64, 4, 1);
  std::vector<float> v(l.raw_bytes() / 2);
  for (size_t i = 0; i < v.size(); ++i) v[i] = (static_cast<int>(i % 64) - 32) / 16.0f;
  for (size_t t = 0; t < v.size(); t += 64) v[t] = 127 / 16.0f;
  const auto raw = ToRaw(l, v);
  auto codec = Make("int8");
  auto enc = codec->Encode(l, raw);
  ASSERT_TRUE(enc.ok());
  std::vector<std::byte> out(raw.size());
  ASSERT_TRUE(codec->Decode(l, *enc, out).ok());
  EXPECT_EQ(out, raw);
}

TEST(CodecsTest, PayloadSizesMatchTheSpec) {
  // qwen2.5-0.5b chunk: 24 layers, 2 KV heads, head_dim 64, 256 tokens, f16.
  const ChunkLayout l = Layout(24, 2, 64, 256, 1);
  const auto raw = ToRaw(l, KvLikeValues(l, 5));
  const std::map<std::string, uint64_t> body = {
      {"raw", l.raw_bytes()},
      {"int8", 24ull * 2 * 256 * 2 * (2 + 64)},
      {"int4", 24ull * (4 * 8 * 128 + 256 * 64 + 4 * 256 * 2 * 2 + 256 * 64)},
      {"int4-g64", 24ull * 2 * 256 * 2 * (4 + 32)},
  };
  for (const auto& [name, bytes] : body) {
    auto enc = Make(name)->Encode(l, raw);
    ASSERT_TRUE(enc.ok());
    EXPECT_EQ(enc->size(), kHeaderBytes + bytes) << name;
  }
}

TEST(CodecsTest, LossyCodecsRefuseWhatTheyCannotRepresent) {
  const ChunkLayout l = Layout(1, 1, 64, 2, 0);
  for (const char* name : {"int8", "int4", "int4-g64", "zstd+int4"}) {
    SCOPED_TRACE(name);
    auto codec = Make(name);
    for (float bad : {NAN, INFINITY, 1e6f}) {
      std::vector<float> v(128, 1.0f);
      v[77] = bad;
      auto enc = codec->Encode(l, ToRaw(l, v));
      ASSERT_FALSE(enc.ok());
      EXPECT_EQ(enc.status().code(), StatusCode::kInvalidArgument);
      EXPECT_NE(enc.status().message().find("f16"), std::string::npos)
          << enc.status().message();
    }
    // q8_0 and q4_0 chunks are not re-quantized.
    for (uint32_t kv_type : {2u, 3u}) {
      const ChunkLayout q = Layout(1, 1, 64, 2, kv_type);
      auto enc = codec->Encode(q, RandomBytes(q.raw_bytes(), 1));
      EXPECT_EQ(enc.status().code(), StatusCode::kInvalidArgument) << kv_type;
    }
  }
  const ChunkLayout odd = Layout(1, 1, 3, 2, 0);
  for (const char* name : {"int4", "int4-g64"}) {
    auto enc = Make(name)->Encode(odd, std::vector<std::byte>(odd.raw_bytes()));
    EXPECT_EQ(enc.status().code(), StatusCode::kInvalidArgument) << name;
  }
  // int8 handles any head_dim.
  auto enc = Make("int8")->Encode(odd, std::vector<std::byte>(odd.raw_bytes()));
  EXPECT_TRUE(enc.ok());
}

// ---- fast kernels against the scalar reference ----

using codecs::QuantKernels;

// Every fast table this CPU runs (AVX-512, AVX2); each must match the scalar one bit for bit.
std::vector<const QuantKernels*> FastTables() {
  std::vector<const QuantKernels*> tables;
  for (const QuantKernels* k : {codecs::Avx512QuantKernels(), codecs::Avx2QuantKernels()}) {
    if (k != nullptr) tables.push_back(k);
  }
  return tables;
}

// Fresh inputs every run; CACHETTE_TEST_SEED=<n> replays the run that printed seed n.
uint32_t TestSeed() {
  if (const char* s = std::getenv("CACHETTE_TEST_SEED")) {
    return static_cast<uint32_t>(std::atoll(s));
  }
  return std::random_device{}();
}

TEST(CodecsTest, FastKernelsMatchScalarBitForBit) {
  const std::vector<const QuantKernels*> tables = FastTables();
  if (tables.empty()) GTEST_SKIP() << "no AVX2 or AVX-512 on this CPU";
  const QuantKernels& ref = codecs::ScalarQuantKernels();
  using Factory = std::unique_ptr<Codec> (*)(const QuantKernels&);
  const std::pair<const char*, Factory> factories[] = {
      {"int8", codecs::MakeInt8Codec},
      {"int4", codecs::MakeInt4KiviCodec},
      {"int4-g64", codecs::MakeInt4G64Codec},
  };
  std::vector<ChunkLayout> shapes = Shapes();
  shapes.push_back(Layout(1, 2, 128, 300, 1));
  for (const QuantKernels* fast : tables) {
    SCOPED_TRACE(fast->name);
    uint32_t seed = 1;
    for (const auto& [name, make] : factories) {
      auto a = make(ref), b = make(*fast);
      for (const ChunkLayout& l : shapes) {
        for (int trial = 0; trial < 3; ++trial) {
          SCOPED_TRACE(std::string(name) + " " + ShapeName(l) + " trial " +
                       std::to_string(trial));
          std::vector<float> v = KvLikeValues(l, ++seed);
          if (trial == 2) {  // zeros of both signs, ties, tiny (subnormal-scale) groups
            for (size_t i = 0; i < v.size(); ++i) {
              v[i] = (i % 3 == 0) ? -0.0f : (i % 3 == 1 ? 0.0f : v[i] * 1e-6f);
            }
          }
          const auto raw = ToRaw(l, v);
          auto ea = a->Encode(l, raw), eb = b->Encode(l, raw);
          ASSERT_TRUE(ea.ok() && eb.ok());
          ASSERT_EQ(*ea, *eb);
          std::vector<std::byte> da(raw.size()), db(raw.size());
          ASSERT_TRUE(a->Decode(l, *ea, da).ok());
          ASSERT_TRUE(b->Decode(l, *ea, db).ok());
          ASSERT_EQ(da, db);
        }
      }
    }
    // f16 <-> f32 conversions, including a tail that is not a multiple of 8 or 16.
    const auto halves = RandomBytes(2 * 1001, 9);
    std::vector<float> fa(1001), fb(1001);
    ref.f16_to_f32(halves.data(), fa.data(), 1001);
    fast->f16_to_f32(halves.data(), fb.data(), 1001);
    for (size_t i = 0; i < fa.size(); ++i) {
      if (std::isnan(fa[i])) {
        EXPECT_TRUE(std::isnan(fb[i]));
      } else {
        EXPECT_EQ(fa[i], fb[i]) << i;
      }
    }
    std::vector<float> f(1001);
    std::mt19937 rng(3);
    std::uniform_real_distribution<float> u(-70000.0f, 70000.0f);
    for (size_t i = 0; i < f.size(); ++i) f[i] = u(rng) * (i % 2 ? 1.0f : 1e-8f);
    std::vector<std::byte> ha(2 * 1001), hb(2 * 1001);
    ref.f32_to_f16(f.data(), ha.data(), 1001);
    fast->f32_to_f16(f.data(), hb.data(), 1001);
    EXPECT_EQ(ha, hb);
  }
}

// A kernel argument of n elements that starts `offset` elements into its storage (so vector
// loads and stores are unaligned) and is followed by 40 bytes of slack. Storage starts filled
// with 0xA5, so comparing the whole storage of two runs also catches a write out of bounds.
template <typename T>
struct Guarded {
  Guarded(size_t n, size_t offset) : offset(offset), v(offset + n + 40 / sizeof(T)) {
    std::memset(v.data(), 0xA5, v.size() * sizeof(T));
  }
  T* data() { return v.data() + offset; }
  size_t offset;
  std::vector<T> v;
};

// The first byte where a and b differ, or -1 (floats compared as bits: -0 != +0).
template <typename T>
int64_t FirstDiff(const Guarded<T>& a, const Guarded<T>& b) {
  const auto* pa = reinterpret_cast<const unsigned char*>(a.v.data());
  const auto* pb = reinterpret_cast<const unsigned char*>(b.v.data());
  if (a.v.size() != b.v.size()) return 0;
  for (size_t i = 0; i < a.v.size() * sizeof(T); ++i) {
    if (pa[i] != pb[i]) return static_cast<int64_t>(i);
  }
  return -1;
}

// n values in one of 4 styles that reach the kernels' edge cases:
//   0: normal values at a random magnitude in [1e-6, 300], with rare 30x outliers
//   1: multiples of 0.25 in [-8, 8] (many ties once scaled)
//   2: zeros of both signs, with a few equal constants (zero and constant groups)
//   3: extremes: +-65504, subnormal floats, 1e-8, mixed with normal values
std::vector<float> EdgeValues(size_t n, int style, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> exponent(-6.0f, 2.5f);
  const float magnitude = std::pow(10.0f, exponent(rng));
  std::vector<float> v(n);
  for (float& x : v) {
    switch (style) {
      case 0:
        x = normal(rng) * magnitude * (rng() % 50 == 0 ? 30.0f : 1.0f);
        break;
      case 1:
        x = static_cast<float>(static_cast<int>(rng() % 65) - 32) * 0.25f;
        break;
      case 2: {
        const uint32_t r = rng() % 8;
        x = r < 3 ? 0.0f : (r < 6 ? -0.0f : 1.5f);
        break;
      }
      default: {
        const float extremes[] = {65504.0f, -65504.0f, 1e-40f, -1e-40f, 1e-8f, -3e-8f, 0.0f};
        const uint32_t r = rng() % 10;
        x = r < 7 ? extremes[r] : normal(rng) * 100.0f;
        break;
      }
    }
  }
  return v;
}

// Copies x into a Guarded input that starts one float past 32-byte alignment.
Guarded<float> Input(const std::vector<float>& x) {
  Guarded<float> g(x.size(), 1);
  std::copy(x.begin(), x.end(), g.data());
  return g;
}

// int8_encode and int8_decode of fast against ref on in-range x [n_vec][dim]; decode reads
// the reference scales with random codes (all 256 values, -128 included).
void CheckInt8(const QuantKernels& ref, const QuantKernels& fast, const std::vector<float>& x,
               size_t n_vec, size_t dim, std::mt19937& rng) {
  Guarded<float> in = Input(x);
  Guarded<std::byte> sa(2 * n_vec, 1), sb(2 * n_vec, 1);
  Guarded<int8_t> ca(n_vec * dim, 3), cb(n_vec * dim, 3);
  const bool ok_a = ref.int8_encode(in.data(), n_vec, dim, sa.data(), ca.data());
  const bool ok_b = fast.int8_encode(in.data(), n_vec, dim, sb.data(), cb.data());
  ASSERT_TRUE(ok_a) << "in-range input refused";
  ASSERT_EQ(ok_a, ok_b);
  ASSERT_EQ(FirstDiff(sa, sb), -1) << "scales";
  ASSERT_EQ(FirstDiff(ca, cb), -1) << "codes";
  for (size_t i = 0; i < n_vec * dim; ++i) ca.data()[i] = static_cast<int8_t>(rng());
  Guarded<float> oa(n_vec * dim, 1), ob(n_vec * dim, 1);
  ref.int8_decode(sa.data(), ca.data(), n_vec, dim, oa.data());
  fast.int8_decode(sa.data(), ca.data(), n_vec, dim, ob.data());
  ASSERT_EQ(FirstDiff(oa, ob), -1) << "decoded";
}

// affine4_rows_encode / _decode on x [n_rows][dim] in groups of `group`.
void CheckRows(const QuantKernels& ref, const QuantKernels& fast, const std::vector<float>& x,
               size_t n_rows, size_t dim, size_t group, std::mt19937& rng) {
  const size_t n_params = n_rows * ((dim + group - 1) / group), n_codes = n_rows * dim / 2;
  Guarded<float> in = Input(x);
  Guarded<std::byte> sa(2 * n_params, 1), sb(2 * n_params, 1), ma(2 * n_params, 3),
      mb(2 * n_params, 3);
  Guarded<uint8_t> ca(n_codes, 5), cb(n_codes, 5);
  const bool ok_a =
      ref.affine4_rows_encode(in.data(), n_rows, dim, group, sa.data(), ma.data(), ca.data());
  const bool ok_b =
      fast.affine4_rows_encode(in.data(), n_rows, dim, group, sb.data(), mb.data(), cb.data());
  ASSERT_TRUE(ok_a) << "in-range input refused";
  ASSERT_EQ(ok_a, ok_b);
  ASSERT_EQ(FirstDiff(sa, sb), -1) << "scales";
  ASSERT_EQ(FirstDiff(ma, mb), -1) << "mins";
  ASSERT_EQ(FirstDiff(ca, cb), -1) << "codes";
  for (size_t i = 0; i < n_codes; ++i) ca.data()[i] = static_cast<uint8_t>(rng());
  Guarded<float> oa(n_rows * dim, 1), ob(n_rows * dim, 1);
  ref.affine4_rows_decode(sa.data(), ma.data(), ca.data(), n_rows, dim, group, oa.data());
  fast.affine4_rows_decode(sa.data(), ma.data(), ca.data(), n_rows, dim, group, ob.data());
  ASSERT_EQ(FirstDiff(oa, ob), -1) << "decoded";
}

// affine4_cols_encode / _decode on x [n_rows][n_cols].
void CheckCols(const QuantKernels& ref, const QuantKernels& fast, const std::vector<float>& x,
               size_t n_rows, size_t n_cols, std::mt19937& rng) {
  const size_t n_codes = n_rows * n_cols / 2;
  Guarded<float> in = Input(x);
  Guarded<std::byte> sa(2 * n_cols, 1), sb(2 * n_cols, 1), ma(2 * n_cols, 3), mb(2 * n_cols, 3);
  Guarded<uint8_t> ca(n_codes, 5), cb(n_codes, 5);
  const bool ok_a =
      ref.affine4_cols_encode(in.data(), n_rows, n_cols, sa.data(), ma.data(), ca.data());
  const bool ok_b =
      fast.affine4_cols_encode(in.data(), n_rows, n_cols, sb.data(), mb.data(), cb.data());
  ASSERT_TRUE(ok_a) << "in-range input refused";
  ASSERT_EQ(ok_a, ok_b);
  ASSERT_EQ(FirstDiff(sa, sb), -1) << "scales";
  ASSERT_EQ(FirstDiff(ma, mb), -1) << "mins";
  ASSERT_EQ(FirstDiff(ca, cb), -1) << "codes";
  for (size_t i = 0; i < n_codes; ++i) ca.data()[i] = static_cast<uint8_t>(rng());
  Guarded<float> oa(n_rows * n_cols, 1), ob(n_rows * n_cols, 1);
  ref.affine4_cols_decode(sa.data(), ma.data(), ca.data(), n_rows, n_cols, oa.data());
  fast.affine4_cols_decode(sa.data(), ma.data(), ca.data(), n_rows, n_cols, ob.data());
  ASSERT_EQ(FirstDiff(oa, ob), -1) << "decoded";
}

TEST(CodecsTest, FastKernelsMatchScalarAtOddSizesAndOffsets) {
  const std::vector<const QuantKernels*> tables = FastTables();
  if (tables.empty()) GTEST_SKIP() << "no AVX2 or AVX-512 on this CPU";
  const QuantKernels& ref = codecs::ScalarQuantKernels();
  const uint32_t seed = TestSeed();
  SCOPED_TRACE("CACHETTE_TEST_SEED=" + std::to_string(seed));
  std::mt19937 rng(seed);
  char what[128];
  for (const QuantKernels* fast : tables) {
    SCOPED_TRACE(fast->name);
    // int8: every dim in [1, 130] (tails of 1..7 after 8 and 32 lanes), n_vec across the
    // 8- and 16-vector scale batches.
    for (size_t dim = 1; dim <= 130; ++dim) {
      for (size_t n_vec : {1, 2, 7, 9, 17}) {
        const int style = static_cast<int>(rng() % 4);
        std::snprintf(what, sizeof(what), "int8 n_vec %zu dim %zu style %d", n_vec, dim, style);
        SCOPED_TRACE(what);
        CheckInt8(ref, *fast, EdgeValues(n_vec * dim, style, rng), n_vec, dim, rng);
        if (HasFatalFailure()) return;
      }
    }
    // affine4 rows: every even dim in [2, 130], whole and partial groups, odd groups (the
    // scalar fallback), a group wider than the row.
    for (size_t dim = 2; dim <= 130; dim += 2) {
      for (size_t group : {2, 4, 6, 8, 10, 16, 24, 32, 64, 3, 7}) {
        for (size_t n_rows : {1, 3, 9}) {
          const int style = static_cast<int>(rng() % 4);
          std::snprintf(what, sizeof(what), "rows n_rows %zu dim %zu group %zu style %d",
                        n_rows, dim, group, style);
          SCOPED_TRACE(what);
          CheckRows(ref, *fast, EdgeValues(n_rows * dim, style, rng), n_rows, dim, group, rng);
          if (HasFatalFailure()) return;
        }
      }
    }
    // affine4 cols: every even n_cols in [2, 130] (partial 8- and 16-column blocks), every
    // n_rows of a KIVI key group, 1..32.
    for (size_t n_cols = 2; n_cols <= 130; n_cols += 2) {
      for (size_t n_rows = 1; n_rows <= 32; ++n_rows) {
        const int style = static_cast<int>(rng() % 4);
        std::snprintf(what, sizeof(what), "cols n_rows %zu n_cols %zu style %d", n_rows, n_cols,
                      style);
        SCOPED_TRACE(what);
        CheckCols(ref, *fast, EdgeValues(n_rows * n_cols, style, rng), n_rows, n_cols, rng);
        if (HasFatalFailure()) return;
      }
    }
    // f16 <-> f32 at every n in [0, 70], unaligned (no NaN: the two round NaN payloads
    // differently, and no codec stores one).
    for (size_t n = 0; n <= 70; ++n) {
      SCOPED_TRACE("conversions n " + std::to_string(n));
      std::vector<float> x = EdgeValues(n, static_cast<int>(rng() % 4), rng);
      for (size_t i = 0; i < n; i += 5) x[i] = (i % 2 ? 1.0f : -1.0f) * 70000.0f;  // -> inf
      Guarded<float> in = Input(x);
      Guarded<std::byte> ha(2 * n, 1), hb(2 * n, 1);
      ref.f32_to_f16(in.data(), ha.data(), n);
      fast->f32_to_f16(in.data(), hb.data(), n);
      ASSERT_EQ(FirstDiff(ha, hb), -1);
      Guarded<float> fa(n, 1), fb(n, 1);
      ref.f16_to_f32(ha.data(), fa.data(), n);
      fast->f16_to_f32(ha.data(), fb.data(), n);
      ASSERT_EQ(FirstDiff(fa, fb), -1);
    }
  }
}

TEST(CodecsTest, FastKernelsRefuseOutOfRangeInputLikeScalar) {
  const std::vector<const QuantKernels*> tables = FastTables();
  if (tables.empty()) GTEST_SKIP() << "no AVX2 or AVX-512 on this CPU";
  const QuantKernels& ref = codecs::ScalarQuantKernels();
  std::mt19937 rng(17);
  const float bad_values[] = {NAN, -NAN, INFINITY, -INFINITY, 70000.0f, -70000.0f,
                              std::nextafter(codecs::kF16Max, INFINITY)};
  for (const QuantKernels* fast : tables) {
    SCOPED_TRACE(fast->name);
    for (const float bad : bad_values) {
      // Shapes with a vector body and a tail; the bad value goes first, in the body, at the
      // last element, and in the tail of a middle vector / group / column block.
      struct Shape {
        size_t rows, cols, group;
      };
      for (const Shape s : {Shape{3, 37, 16}, Shape{9, 64, 32}, Shape{5, 38, 6}}) {
        const size_t n = s.rows * s.cols;
        for (const size_t at : {size_t{0}, size_t{9}, n - 1, s.cols + s.cols - 2}) {
          char what[96];
          std::snprintf(what, sizeof(what), "bad %g at %zu of [%zu][%zu]", bad, at, s.rows,
                        s.cols);
          SCOPED_TRACE(what);
          std::vector<float> x = EdgeValues(n, 0, rng);
          x[at] = bad;
          Guarded<float> in = Input(x);
          Guarded<std::byte> sc(2 * n, 0), mn(2 * n, 0);
          Guarded<int8_t> c8(n, 0);
          Guarded<uint8_t> c4(n, 0);
          for (const QuantKernels* k : {&ref, fast}) {
            EXPECT_FALSE(k->int8_encode(in.data(), s.rows, s.cols, sc.data(), c8.data()))
                << k->name;
            if (s.cols % 2 == 0) {
              EXPECT_FALSE(k->affine4_rows_encode(in.data(), s.rows, s.cols, s.group, sc.data(),
                                                  mn.data(), c4.data()))
                  << k->name;
              EXPECT_FALSE(k->affine4_cols_encode(in.data(), s.rows, s.cols, sc.data(),
                                                  mn.data(), c4.data()))
                  << k->name;
            }
          }
        }
      }
    }
    // The boundary itself is representable: +-65504 in every position is accepted alike.
    std::vector<float> x(9 * 38);
    for (size_t i = 0; i < x.size(); ++i) x[i] = (i % 3 == 0 ? -1.0f : 1.0f) * 65504.0f;
    CheckInt8(ref, *fast, x, 9, 38, rng);
    CheckRows(ref, *fast, x, 9, 38, 6, rng);
    CheckCols(ref, *fast, x, 9, 38, rng);
  }
}

// ---- bad input ----

const std::vector<std::string>& AllCodecs() {
  static const std::vector<std::string> names = {
      "raw",       "int8",          "int4",     "int4-g64",      "zstd+raw",    "zstd+int8",
      "zstd+int4", "zstd+int4-g64", "cachegen", "cachegen-high", "cachegen-low"};
  return names;
}

void PutU32(std::vector<std::byte>& v, size_t at, uint32_t x) {
  for (int i = 0; i < 4; ++i) v[at + i] = static_cast<std::byte>(x >> (8 * i));
}
void PutU64(std::vector<std::byte>& v, size_t at, uint64_t x) {
  for (int i = 0; i < 8; ++i) v[at + i] = static_cast<std::byte>(x >> (8 * i));
}

TEST(CodecsTest, MalformedPayloadsAreCorruption) {
  const ChunkLayout l = Layout(2, 2, 64, 45, 1);
  const auto raw = ToRaw(l, KvLikeValues(l, 21));
  struct Case {
    std::string what;
    std::function<void(std::vector<std::byte>&)> mutate;
    std::string message;  // a substring of the error
    ChunkLayout layout;
  };
  const ChunkLayout other = Layout(2, 2, 64, 46, 1);
  const std::vector<Case> cases = {
      {"truncated header", [](auto& p) { p.resize(10); }, "truncated", l},
      {"empty", [](auto& p) { p.clear(); }, "truncated", l},
      {"truncated body", [](auto& p) { p.pop_back(); }, "wrong length", l},
      {"extra byte", [](auto& p) { p.push_back(std::byte{0}); }, "wrong length", l},
      {"bad magic", [](auto& p) { p[0] = std::byte{'X'}; }, "magic", l},
      {"wrong id", [](auto& p) { p[4] ^= std::byte{1}; }, "codec id", l},
      {"wrong version", [](auto& p) { PutU32(p, 8, 77); }, "version", l},
      {"reserved", [](auto& p) { p[14] = std::byte{1}; }, "reserved", l},
      {"other layout", [](auto&) {}, "layout mismatch", other},
      {"tampered huge length", [](auto& p) { PutU64(p, 32, ~uint64_t{0} >> 4); },
       "wrong length", l},
      {"body size inconsistent with layout",
       [](auto& p) {
         p.resize(p.size() + 2);
         PutU64(p, 32, p.size() - kHeaderBytes);
       },
       "", l},  // raw / lossy: "wrong length"; zstd: trailing bytes
  };
  for (const std::string& name : AllCodecs()) {
    auto codec = Make(name);
    auto enc = codec->Encode(l, raw);
    ASSERT_TRUE(enc.ok());
    for (const Case& c : cases) {
      SCOPED_TRACE(name + ": " + c.what);
      std::vector<std::byte> payload = *enc;
      c.mutate(payload);
      std::vector<std::byte> out(c.layout.raw_bytes());
      const Status s = codec->Decode(c.layout, payload, out);
      EXPECT_EQ(s.code(), StatusCode::kCorruption) << s.ToString();
      EXPECT_NE(s.message().find(c.message), std::string::npos) << s.ToString();
      EXPECT_NE(s.message().find(codec->name()), std::string::npos) << s.ToString();
      // Each of these is a header or size fault: found without decoding or allocating.
      EXPECT_EQ(codec->CheckPayload(c.layout, payload), s);
    }
    EXPECT_TRUE(codec->CheckPayload(l, *enc).ok());
  }
}

TEST(CodecsTest, GarbageZstdFramesAreCorruption) {
  const ChunkLayout l = Layout(1, 2, 64, 32, 1);
  const auto raw = RandomBytes(l.raw_bytes(), 5);
  for (const char* name : {"zstd+raw", "zstd+int8", "zstd+int4", "zstd+int4-g64"}) {
    SCOPED_TRACE(name);
    auto codec = Make(name);
    const bool is_raw = name == std::string("zstd+raw");
    auto enc = codec->Encode(l, is_raw ? raw : ToRaw(l, KvLikeValues(l, 1)));
    ASSERT_TRUE(enc.ok());
    std::vector<std::byte> out(raw.size());
    // Random bytes where the frame should be.
    std::vector<std::byte> garbage = *enc;
    auto noise = RandomBytes(garbage.size() - kHeaderBytes, 77);
    std::copy(noise.begin(), noise.end(), garbage.begin() + kHeaderBytes);
    Status s = codec->Decode(l, garbage, out);
    EXPECT_EQ(s.code(), StatusCode::kCorruption) << s.ToString();
    EXPECT_NE(s.message().find("zstd"), std::string::npos) << s.ToString();
    // A flipped byte inside the frame: zstd's checksum or its structure catches it.
    for (size_t at : {kHeaderBytes + 6, enc->size() / 2, enc->size() - 5}) {
      std::vector<std::byte> flipped = *enc;
      flipped[at] ^= std::byte{0x10};
      s = codec->Decode(l, flipped, out);
      EXPECT_EQ(s.code(), StatusCode::kCorruption) << at << ": " << s.ToString();
    }
    // A valid frame around the wrong content (an inner payload of another layout).
    const ChunkLayout l31 = Layout(1, 2, 64, 31, 1);
    auto other = codec->Encode(l31, std::vector<std::byte>(l31.raw_bytes()));
    if (other.ok()) {
      std::vector<std::byte> swapped = *other;
      PutU32(swapped, 28, 32);  // outer header claims 32 tokens
      s = codec->Decode(l, swapped, out);
      EXPECT_EQ(s.code(), StatusCode::kCorruption) << s.ToString();
    }
  }
}

// Regression: a zstd frame could claim up to 4x the raw chunk and was decompressed into a
// buffer of its claimed size before the inner codec saw the length was wrong. Every inner
// payload has a size fixed by the layout; a frame claiming any other is refused first.
TEST(CodecsTest, ZstdFrameOfAnyOtherContentSizeIsRefusedBeforeDecompressing) {
  const ChunkLayout l = Layout(1, 2, 64, 33, 1);
  const auto raw = ToRaw(l, KvLikeValues(l, 3));
  for (const char* inner_name : {"raw", "int8", "int4", "int4-g64"}) {
    SCOPED_TRACE(inner_name);
    auto inner = Make(inner_name);
    auto zstd = Make(std::string("zstd+") + inner_name);
    auto inner_payload = inner->Encode(l, raw);
    ASSERT_TRUE(inner_payload.ok());
    EXPECT_EQ(inner->FixedEncodedBytes(l), inner_payload->size());
    EXPECT_EQ(zstd->FixedEncodedBytes(l), 0u);  // depends on the bytes
    const uint64_t fixed = inner_payload->size();
    for (uint64_t claimed : {fixed - 1, fixed + 1, 3 * uint64_t{raw.size()}}) {
      SCOPED_TRACE(claimed);
      // A well-formed frame (checksum and all) of `claimed` bytes: the inner payload, cut or
      // padded with zeros.
      std::vector<std::byte> content(claimed);
      std::memcpy(content.data(), inner_payload->data(), std::min<uint64_t>(claimed, fixed));
      std::vector<std::byte> frame(ZSTD_compressBound(claimed));
      ZSTD_CCtx* cctx = ZSTD_createCCtx();
      ZSTD_CCtx_setParameter(cctx, ZSTD_c_checksumFlag, 1);
      const size_t n = ZSTD_compress2(cctx, frame.data(), frame.size(), content.data(), claimed);
      ZSTD_freeCCtx(cctx);
      ASSERT_FALSE(ZSTD_isError(n));
      std::vector<std::byte> payload(kHeaderBytes + n);
      codecs::WriteHeader(zstd->id(), zstd->version(), l, n, payload.data());
      std::memcpy(payload.data() + kHeaderBytes, frame.data(), n);
      std::vector<std::byte> out(raw.size());
      const Status s = zstd->Decode(l, payload, out);
      EXPECT_EQ(s.code(), StatusCode::kCorruption) << s.ToString();
      EXPECT_NE(s.message().find("frame claims"), std::string::npos) << s.ToString();
      EXPECT_EQ(zstd->CheckPayload(l, payload), s);
    }
  }
}

TEST(CodecsTest, EveryTruncationAndRandomFlipsAreSafe) {
  // Under ASan this is the bounds check: no prefix reads out of bounds, and a flipped body
  // byte either decodes (lossy bodies carry no checksum; the record around them does) or is
  // refused.
  const ChunkLayout l = Layout(1, 1, 64, 33, 1);
  const auto raw = ToRaw(l, KvLikeValues(l, 8));
  std::mt19937 rng(12);
  for (const std::string& name : AllCodecs()) {
    SCOPED_TRACE(name);
    auto codec = Make(name);
    auto enc = codec->Encode(l, raw);
    ASSERT_TRUE(enc.ok());
    std::vector<std::byte> out(raw.size());
    for (size_t n = 0; n < enc->size(); ++n) {
      const Status s = codec->Decode(l, std::span(enc->data(), n), out);
      ASSERT_EQ(s.code(), StatusCode::kCorruption) << n;
    }
    for (int i = 0; i < 300; ++i) {
      std::vector<std::byte> p = *enc;
      p[rng() % p.size()] ^= static_cast<std::byte>(1 + rng() % 255);
      (void)codec->Decode(l, p, out);
    }
  }
}

TEST(CodecsTest, WrongOutputSizeIsInvalidArgument) {
  const ChunkLayout l = Layout(1, 1, 64, 4, 1);
  const auto raw = ToRaw(l, KvLikeValues(l, 2));
  for (const std::string& name : AllCodecs()) {
    auto codec = Make(name);
    auto enc = codec->Encode(l, raw);
    ASSERT_TRUE(enc.ok());
    std::vector<std::byte> small(raw.size() - 2);
    EXPECT_EQ(codec->Decode(l, *enc, small).code(), StatusCode::kInvalidArgument) << name;
    EXPECT_EQ(codec->Encode(l, small).status().code(), StatusCode::kInvalidArgument) << name;
  }
  // A layout whose byte count overflows is refused, not wrapped.
  const ChunkLayout huge = Layout(0xFFFFFFFF, 0xFFFFFFFF, 64, 0xFFFFFFFF, 0);
  EXPECT_EQ(Make("raw")->Encode(huge, {}).status().code(), StatusCode::kInvalidArgument);
}

// ---- registry ----

TEST(CodecsTest, MakeCodecNamesAndUnknownNames) {
  for (const std::string& name : AllCodecs()) EXPECT_EQ(Make(name)->name(), name);
  for (const char* bad : {"nope", "", "zstd+", "zstd+nope", "zstd+zstd+raw", "INT8", "int4-g32",
                          "zstd+cachegen", "cachegen-medium"}) {
    auto c = MakeCodec(bad);
    ASSERT_FALSE(c.ok()) << bad;
    EXPECT_EQ(c.status().code(), StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(c.status().message().find(std::string("\"") + bad + "\""), std::string::npos)
        << c.status().message();
  }
}

TEST(CodecsTest, CodecForRoundTrips) {
  for (const std::string& name : AllCodecs()) {
    auto codec = Make(name);
    auto again = CodecFor(codec->id(), codec->version());
    ASSERT_TRUE(again.ok()) << name << ": " << again.status().ToString();
    // One cachegen id for every level: the stored codec is "cachegen", which decodes them all.
    EXPECT_EQ((*again)->name(), name.starts_with("cachegen") ? "cachegen" : name);
    EXPECT_EQ((*again)->id(), codec->id());
    EXPECT_EQ((*again)->version(), codec->version());
    EXPECT_EQ(CodecFor(codec->id(), codec->version() + 1).status().code(),
              StatusCode::kUnimplemented)
        << name;
  }
  EXPECT_EQ(Make("zstd+int4")->id(), 0x102u);
  EXPECT_EQ(Make("zstd+int4")->version(), 0x10001u);
  EXPECT_EQ(CodecFor(5, 1).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(CodecFor(0x104, 0x10001).status().code(), StatusCode::kNotFound);  // no zstd+cachegen
  EXPECT_EQ(CodecFor(0x200, 1).status().code(), StatusCode::kNotFound);
}

}  // namespace
}  // namespace cachette::cache
