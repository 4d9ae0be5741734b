// Every kernel at every ISA level this CPU supports, checked against the scalar reference on
// fresh random inputs of odd sizes, and the scalar reference itself checked against naive
// double-precision formulas written from the documentation in kernels.h.
//
// Tolerances. Float sums of n terms in different orders differ by at most 2 * n * u * sum|terms|
// (u = 2^-24, the bound for recursive summation, which blocked/vector sums only improve), so
// MatMul outputs are compared against kSumTol(n) * sum_c |x_c w_c|. Dropping or repeating one
// term would change an output by about sum|terms| / n, above that bound for the sizes used
// here (n < 2900), so the bound still catches indexing bugs.
#include "kernels/kernels.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "core/fp16.h"
#include "core/thread_pool.h"
#include "kernels/kernels_internal.h"

namespace cachette::kernels {
namespace {

constexpr double kU = 1.0 / (1 << 24);
double SumTol(int64_t n) { return 2.0 * static_cast<double>(n) * kU; }

std::vector<Isa> Levels() {
  std::vector<Isa> v;
  for (int i = 0; i <= static_cast<int>(BestIsa()); ++i) v.push_back(static_cast<Isa>(i));
  return v;
}

// Restores the best ISA after a test that changed it.
class IsaTest : public ::testing::Test {
 protected:
  void TearDown() override { SetIsa(BestIsa()); }
  std::mt19937 rng_{12345};
  ThreadPool pool_{2};

  std::vector<float> RandomFloats(int64_t n, float lo = -1.0f, float hi = 1.0f) {
    std::uniform_real_distribution<float> dist(lo, hi);
    std::vector<float> v(n);
    for (auto& f : v) f = dist(rng_);
    return v;
  }
};

// Ops::fma_chains computes its 12 chains (the sink is their lanes' sum, so none was dropped)
// and counts 2 flops per lane and multiply-add; FmaPeakFlops gives a finite positive rate at
// every level.
TEST_F(IsaTest, FmaChainsComputeTheirChainsAndCountTheirFlops) {
  std::vector<const internal::Ops*> ops = {&internal::ScalarOps()};
  if (BestIsa() >= Isa::kAvx2) ops.push_back(&internal::Avx2Ops());
  if (BestIsa() >= Isa::kAvx512) ops.push_back(&internal::Avx512Ops());
  for (const internal::Ops* o : ops) {
    const int lanes = o->isa == Isa::kScalar ? 1 : o->isa == Isa::kAvx2 ? 8 : 16;
    for (int64_t steps : {0, 1, 7, 1000}) {
      SCOPED_TRACE(std::string(IsaName(o->isa)) + " steps " + std::to_string(steps));
      float sink = -1;
      EXPECT_EQ(o->fma_chains(steps, &sink), steps * 12 * lanes * 2);
      double want = 0;
      for (int i = 0; i < 12; ++i) {
        float v = static_cast<float>(i);
        for (int64_t k = 0; k < steps; ++k) {
          v = o->isa == Isa::kScalar ? v * 0.999999f + 1e-7f : std::fma(v, 0.999999f, 1e-7f);
        }
        want += lanes * static_cast<double>(v);
      }
      EXPECT_NEAR(sink, want, 1e-6 * want);
    }
  }
  for (Isa isa : Levels()) {
    SetIsa(isa);
    const double flops = FmaPeakFlops(0.01);
    EXPECT_TRUE(std::isfinite(flops)) << IsaName(isa);
    EXPECT_GT(flops, 1e6) << IsaName(isa);
  }
}

void PutU16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); }
uint16_t GetU16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// A random weight matrix with `pad` spare bytes per row (rows are row_bytes apart).
struct TestMatrix {
  std::vector<uint8_t> bytes;
  WeightMatrix w;
};

TestMatrix RandomMatrix(WType t, int64_t rows, int64_t cols, std::mt19937& rng) {
  constexpr size_t kPad = 18;
  TestMatrix m;
  m.w.type = t;
  m.w.rows = rows;
  m.w.cols = cols;
  m.w.row_bytes = WTypeRowBytes(t, cols) + kPad;
  m.bytes.assign(m.w.row_bytes * rows, 0xcd);
  std::uniform_real_distribution<float> val(-1.0f, 1.0f);
  std::uniform_real_distribution<float> scale(0.001f, 0.02f);
  std::uniform_int_distribution<int> byte(0, 255);
  for (int64_t r = 0; r < rows; ++r) {
    uint8_t* row = m.bytes.data() + r * m.w.row_bytes;
    for (int64_t c = 0; c < cols; ++c) {
      switch (t) {
        case WType::kF32: {
          const float f = val(rng);
          std::memcpy(row + 4 * c, &f, 4);
          break;
        }
        case WType::kF16:
          PutU16(row + 2 * c, Fp32ToFp16(val(rng)));
          break;
        case WType::kBF16:
          PutU16(row + 2 * c, Fp32ToBf16(val(rng)));
          break;
        default:
          break;
      }
    }
    if (t == WType::kQ8_0) {
      for (int64_t b = 0; b < cols / 32; ++b) {
        PutU16(row + b * 34, Fp32ToFp16(scale(rng)));
        // -128 is legal in the format (ggml never writes it); include it.
        for (int j = 0; j < 32; ++j) row[b * 34 + 2 + j] = static_cast<uint8_t>(byte(rng));
      }
    } else if (t == WType::kQ4_0) {
      for (int64_t b = 0; b < cols / 32; ++b) {
        PutU16(row + b * 18, Fp32ToFp16(scale(rng)));
        for (int j = 0; j < 16; ++j) row[b * 18 + 2 + j] = static_cast<uint8_t>(byte(rng));
      }
    }
  }
  m.w.data = m.bytes.data();
  return m;
}

// W[r][c] decoded straight from the layouts documented in kernels.h.
double DocWeight(const WeightMatrix& w, int64_t r, int64_t c) {
  const auto* row = static_cast<const uint8_t*>(w.data) + r * w.row_bytes;
  switch (w.type) {
    case WType::kF32: {
      float f;
      std::memcpy(&f, row + 4 * c, 4);
      return f;
    }
    case WType::kF16:
      return Fp16ToFp32(GetU16(row + 2 * c));
    case WType::kBF16:
      return Bf16ToFp32(GetU16(row + 2 * c));
    case WType::kQ8_0: {
      const uint8_t* blk = row + (c / 32) * 34;
      return static_cast<double>(Fp16ToFp32(GetU16(blk))) * static_cast<int8_t>(blk[2 + c % 32]);
    }
    case WType::kQ4_0: {
      const uint8_t* blk = row + (c / 32) * 18;
      const int j = static_cast<int>(c % 32);
      const int nib = j < 16 ? (blk[2 + j] & 0x0f) : (blk[2 + j - 16] >> 4);
      return static_cast<double>(Fp16ToFp32(GetU16(blk))) * (nib - 8);
    }
  }
  return 0;
}

bool Quantized(WType t) { return t == WType::kQ8_0 || t == WType::kQ4_0; }

// x as the quantized kernels see it: per block of 32, d = amax / 127, q = round(x * 127 / amax).
std::vector<double> DocQuantizeActivations(const std::vector<float>& x) {
  std::vector<double> out(x.size());
  for (size_t b = 0; b < x.size() / 32; ++b) {
    float amax = 0;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[b * 32 + j]));
    const float id = amax > 0 ? 127.0f / amax : 0.0f;
    const float d = amax / 127.0f;
    for (int j = 0; j < 32; ++j) out[b * 32 + j] = d * std::nearbyint(x[b * 32 + j] * id);
  }
  return out;
}

const WType kAllTypes[] = {WType::kF32, WType::kF16, WType::kBF16, WType::kQ8_0, WType::kQ4_0};

struct MatMulShape {
  int64_t rows, cols;
  std::vector<int64_t> ms;
};

TEST_F(IsaTest, MatMulMatchesScalarAndDocumentedMath) {
  const std::vector<MatMulShape> shapes = {
      {33, 96, {1, 2, 3, 7, 17, 64, 129}},
      {97, 160, {1, 2, 3, 7, 17, 64, 129}},
      {1000, 288, {1, 7, 64}},
      {45, 1056, {1, 3, 17}},  // crosses the float kernels' K blocks
      {13, 2208, {1, 2, 3}},   // 69 quantized blocks: crosses the AVX2 q8_0 decode tile's runs
  };
  ThreadPool single(1);
  for (WType t : kAllTypes) {
    for (const MatMulShape& s : shapes) {
      TestMatrix tm = RandomMatrix(t, s.rows, s.cols, rng_);
      const WeightMatrix& w = tm.w;
      for (int64_t m : s.ms) {
        SCOPED_TRACE(std::string(WTypeName(t)) + " rows=" + std::to_string(s.rows) +
                     " cols=" + std::to_string(s.cols) + " m=" + std::to_string(m));
        std::vector<float> x = RandomFloats(m * s.cols);
        // Reference: the documented math in double, and sum|x w| for the tolerance.
        std::vector<double> exact(m * s.rows), mag(m * s.rows);
        for (int64_t i = 0; i < m; ++i) {
          std::vector<float> xi(x.begin() + i * s.cols, x.begin() + (i + 1) * s.cols);
          std::vector<double> xe =
              Quantized(t) ? DocQuantizeActivations(xi) : std::vector<double>(xi.begin(), xi.end());
          for (int64_t r = 0; r < s.rows; ++r) {
            double acc = 0, a = 0;
            for (int64_t c = 0; c < s.cols; ++c) {
              const double p = xe[c] * DocWeight(w, r, c);
              acc += p;
              a += std::fabs(p);
            }
            exact[i * s.rows + r] = acc;
            mag[i * s.rows + r] = a;
          }
        }
        const double tol = SumTol(s.cols);
        for (Isa isa : Levels()) {
          SetIsa(isa);
          SCOPED_TRACE(std::string(IsaName(isa)));
          std::vector<float> y(m * s.rows, std::numeric_limits<float>::quiet_NaN());
          MatMul(x.data(), m, w, y.data(), (m & 1) ? pool_ : single);
          int bad = 0;
          for (int64_t i = 0; i < m * s.rows && bad < 5; ++i) {
            if (!(std::fabs(y[i] - exact[i]) <= tol * mag[i] + 1e-30)) {
              ADD_FAILURE() << "y[" << i / s.rows << "][" << i % s.rows << "] = " << y[i]
                            << " want " << exact[i] << " tol " << tol * mag[i];
              ++bad;
            }
          }
        }
      }
    }
  }
}

TEST_F(IsaTest, ActivationQuantizationIsBitIdenticalAcrossIsas) {
  const int64_t m = 5, cols = 32 * 7;
  std::vector<float> x = RandomFloats(m * cols, -3.0f, 3.0f);
  std::fill(x.begin() + 32, x.begin() + 64, 0.0f);  // an all-zero block
  x[70] = 0.5f;                                     // ties for round-to-nearest-even
  x[71] = -0.5f;
  using internal::ActQ8;
  std::vector<uint8_t> ref(internal::ActQ8Bytes(m, cols) + 64), got(ref.size());
  auto align = [](std::vector<uint8_t>& v) {
    return reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t{63});
  };
  const ActQ8 a_ref = internal::ActQ8View(align(ref), m, cols);
  internal::ScalarOps().quantize_act(x.data(), 0, m, a_ref);
  const internal::Ops* levels[] = {&internal::Avx2Ops(), &internal::Avx512Ops()};
  for (int l = 0; l < 2 && l < static_cast<int>(BestIsa()); ++l) {
    const ActQ8 a = internal::ActQ8View(align(got), m, cols);
    levels[l]->quantize_act(x.data(), 0, m, a);
    EXPECT_EQ(0, std::memcmp(a.q, a_ref.q, m * cols)) << l;
    EXPECT_EQ(0, std::memcmp(a.d, a_ref.d, m * cols / 32 * 4)) << l;
    EXPECT_EQ(0, std::memcmp(a.sum, a_ref.sum, m * cols / 32 * 4)) << l;
  }
}

// Batch invariance (docs/kernels.md): at each ISA level, y[t][r] is computed by one fixed
// sequence of float operations whatever the number of tokens in the call, the tile it falls
// in, the thread split and whether the weights were repacked. So a token's row of MatMul over
// m tokens is bit-identical to MatMul of that token alone, and to MatMul over any chunking of
// the m tokens. Fresh random inputs each run; the seed is printed on failure.
TEST_F(IsaTest, MatMulIsBatchInvariantBitForBit) {
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  const int64_t ms[] = {1, 2, 3, 5, 6, 7, 8, 13, 16, 17, 31, 64, 100};
  const int64_t max_m = 100;
  struct Shape {
    int64_t rows, float_cols, quant_cols;
  };
  // Odd row counts (partial tiles, panels and thread ranges); float K with a partial vector
  // tail, quantized K with an odd block count; the larger ones cross the float K chunks
  // (512 wide at AVX-512, 1024 at AVX2) and (69 blocks) the AVX2 q8_0 decode tile's runs of
  // 64 blocks.
  const Shape shapes[] = {{37, 101, 96}, {75, 547, 544}, {203, 1059, 1056}, {21, 2213, 2208}};
  ThreadPool single(1);
  auto bits_equal = [](const float* a, const float* b, int64_t n) {
    return std::memcmp(a, b, sizeof(float) * n) == 0;
  };
  for (WType t : kAllTypes) {
    for (const Shape& sh : shapes) {
      const int64_t cols = Quantized(t) ? sh.quant_cols : sh.float_cols, rows = sh.rows;
      TestMatrix tm = RandomMatrix(t, rows, cols, rng);
      std::uniform_real_distribution<float> val(-2.0f, 2.0f);
      std::vector<float> x(max_m * cols);
      for (auto& f : x) f = val(rng);
      for (Isa isa : Levels()) {
        SetIsa(isa);
        SCOPED_TRACE(std::string(WTypeName(t)) + " " + std::string(IsaName(isa)) +
                     " rows=" + std::to_string(rows) + " cols=" + std::to_string(cols));
        // Each token alone, on one thread: the reference rows.
        std::vector<float> alone(max_m * rows);
        for (int64_t i = 0; i < max_m; ++i)
          MatMul(x.data() + i * cols, 1, tm.w, alone.data() + i * rows, single);
        for (int64_t m : ms) {
          for (ThreadPool* pool : {&single, &pool_}) {
            SCOPED_TRACE("m=" + std::to_string(m) + " threads=" + std::to_string(pool->size()));
            std::vector<float> y(m * rows, std::numeric_limits<float>::quiet_NaN());
            MatMul(x.data(), m, tm.w, y.data(), *pool);
            // The same tokens in random chunks.
            std::vector<float> yc(m * rows, std::numeric_limits<float>::quiet_NaN());
            std::string chunks;
            for (int64_t i = 0; i < m;) {
              const int64_t n = std::uniform_int_distribution<int64_t>(1, m - i)(rng);
              MatMul(x.data() + i * cols, n, tm.w, yc.data() + i * rows, *pool);
              chunks += std::to_string(n) + " ";
              i += n;
            }
            int bad = 0;
            for (int64_t i = 0; i < m && bad < 3; ++i) {
              const float* want = alone.data() + i * rows;
              if (!bits_equal(y.data() + i * rows, want, rows)) {
                ADD_FAILURE() << "token " << i << " of " << m << " differs from it alone";
                ++bad;
              }
              if (!bits_equal(yc.data() + i * rows, want, rows)) {
                ADD_FAILURE() << "token " << i << " in chunks [ " << chunks
                              << "] differs from it alone";
                ++bad;
              }
            }
          }
        }
      }
    }
  }
}

// MatMulGroup runs several matrices of one input as one parallel job: every output is the bits
// MatMul gives for its matrix alone, at every level, type and thread count, for decode and
// prefill batches, with row counts that end in partial tiles and panels; matrices that do not
// share type or cols run one after another, with the same result.
TEST_F(IsaTest, MatMulGroupIsEachMatMulsBitsInOneJob) {
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  ThreadPool three(3);
  for (WType t : kAllTypes) {
    const int64_t cols = Quantized(t) ? 288 : 301;
    // Q, K and V-like: one large and two small, odd row counts.
    std::vector<TestMatrix> tms;
    for (int64_t rows : {203, 37, 13}) tms.push_back(RandomMatrix(t, rows, cols, rng));
    TestMatrix other = RandomMatrix(t == WType::kF32 ? WType::kF16 : WType::kF32, 29, cols, rng);
    for (Isa isa : Levels()) {
      SetIsa(isa);
      for (int64_t m : {1, 3, 17, 64}) {
        std::vector<float> x = RandomFloats(m * cols, -2.0f, 2.0f);
        for (ThreadPool* pool : {&pool_, &three}) {
          SCOPED_TRACE(std::string(WTypeName(t)) + " " + std::string(IsaName(isa)) +
                       " m=" + std::to_string(m) + " threads=" + std::to_string(pool->size()));
          std::vector<std::vector<float>> want, got;
          std::vector<const WeightMatrix*> ws;
          std::vector<float*> ys;
          for (TestMatrix* tm : {&tms[0], &tms[1], &tms[2], &other}) {
            want.emplace_back(m * tm->w.rows);
            MatMul(x.data(), m, tm->w, want.back().data(), *pool);
            got.emplace_back(m * tm->w.rows, std::numeric_limits<float>::quiet_NaN());
          }
          for (size_t i = 0; i < 3; ++i) {
            ws.push_back(&tms[i].w);
            ys.push_back(got[i].data());
          }
          MatMulGroup(x.data(), m, ws, ys, *pool);
          // A mixed group (another type): runs matrix by matrix.
          const WeightMatrix* mixed[] = {&tms[1].w, &other.w};
          std::vector<float> got1(m * tms[1].w.rows), got_other(m * other.w.rows);
          float* mixed_out[] = {got1.data(), got_other.data()};
          MatMulGroup(x.data(), m, mixed, mixed_out, *pool);
          for (size_t i = 0; i < 3; ++i) {
            EXPECT_EQ(std::memcmp(got[i].data(), want[i].data(), sizeof(float) * want[i].size()),
                      0)
                << "matrix " << i << " of the group differs from MatMul";
          }
          EXPECT_EQ(std::memcmp(got1.data(), want[1].data(), sizeof(float) * got1.size()), 0);
          EXPECT_EQ(std::memcmp(got_other.data(), want[3].data(), sizeof(float) * got_other.size()),
                    0);
        }
      }
    }
  }
}

// Quantized matrices [rows, cols] for the layout tests: rows not a multiple of 8 and fewer
// than 8, whole groups of 8, one block a row and many.
const std::pair<int64_t, int64_t> kOddQuantShapes[] = {{37, 96}, {75, 544}, {8, 32}, {13, 2208},
                                                       {16, 192}, {21, 224}, {5, 64}, {24, 896}};

// WeightMatrix::scales8 holds each block's scale regrouped by 8 rows (the last group padded
// with the last row), and a kernel that reads it gives the bits it gives without it, as does
// one told the weights are cache-resident, and either order of the AVX2 q8_0 decode tiles from
// memory (internal::Q8DecodeOrder): at every level, for decode tiles and packed panels, on one
// thread and two.
TEST_F(IsaTest, DecodeScalesAreTheRowsScalesAndTheyAndTheCacheHintChangeNoBits) {
  const internal::Q8Order default_order = internal::Q8DecodeOrder();
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> val(-2.0f, 2.0f);
  ThreadPool single(1);
  for (WType t : {WType::kQ8_0, WType::kQ4_0}) {
    for (const auto& [rows, cols] : kOddQuantShapes) {
      TestMatrix tm = RandomMatrix(t, rows, cols, rng);
      const std::vector<uint16_t> s8 = DecodeScales(tm.w);
      const int64_t nb = cols / 32, groups = (rows + 7) / 8;
      ASSERT_EQ(s8.size(), static_cast<size_t>(groups * nb * 8));
      const auto* base = static_cast<const uint8_t*>(tm.w.data);
      for (int64_t g = 0; g < groups; ++g) {
        for (int64_t b = 0; b < nb; ++b) {
          for (int64_t r = 0; r < 8; ++r) {
            const int64_t row = std::min(g * 8 + r, rows - 1);
            ASSERT_EQ(s8[(g * nb + b) * 8 + r],
                      GetU16(base + row * tm.w.row_bytes + b * WTypeBlockBytes(t)))
                << "group " << g << " block " << b << " lane " << r;
          }
        }
      }
      WeightMatrix with = tm.w;
      with.scales8 = s8.data();
      WeightMatrix resident = tm.w, resident_with = with;
      resident.cache_resident = resident_with.cache_resident = true;
      for (Isa isa : Levels()) {
        SetIsa(isa);
        EXPECT_EQ(UsesDecodeScales(t), isa != Isa::kScalar);
        for (int64_t m : {1, 2, 3, 7}) {
          SCOPED_TRACE(std::string(WTypeName(t)) + " " + std::string(IsaName(isa)) + " rows=" +
                       std::to_string(rows) + " cols=" + std::to_string(cols) +
                       " m=" + std::to_string(m));
          std::vector<float> x(m * cols);
          for (auto& f : x) f = val(rng);
          for (ThreadPool* pool : {&single, &pool_}) {
            internal::SetQ8DecodeOrder(default_order);
            std::vector<float> y0(m * rows);
            MatMul(x.data(), m, tm.w, y0.data(), *pool);
            for (internal::Q8Order order : {internal::Q8Order::kRows, internal::Q8Order::kStep}) {
              internal::SetQ8DecodeOrder(order);
              for (const WeightMatrix* w : {&tm.w, &with, &resident, &resident_with}) {
                std::vector<float> y1(m * rows);
                MatMul(x.data(), m, *w, y1.data(), *pool);
                EXPECT_EQ(0, std::memcmp(y0.data(), y1.data(), sizeof(float) * y0.size()))
                    << "scales8 " << (w->scales8 != nullptr) << " cache_resident "
                    << w->cache_resident << " q8_0 decode order " << static_cast<int>(order);
              }
            }
          }
        }
      }
    }
  }
  internal::SetQ8DecodeOrder(default_order);
}

// WeightMatrix::interleaved8: InterleaveRows8 moves every block to where QuantBlockAt says,
// rows past the last whole group of 8 staying put, and every level's matmul (decode tiles and
// packed panels, alone and grouped, one thread and two), DequantizeRow and DecodeScales give
// the bits they give in the row layout. PrefersInterleaved8 only at the AVX2 level.
TEST_F(IsaTest, InterleavedRowsGiveTheBitsOfTheRowLayout) {
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> val(-2.0f, 2.0f);
  ThreadPool single(1);
  for (WType t : {WType::kQ8_0, WType::kQ4_0}) {
    for (const auto& [rows, cols] : kOddQuantShapes) {
      const TestMatrix padded = RandomMatrix(t, rows, cols, rng);
      // The row layout without padding (interleaving needs row_bytes = WTypeRowBytes).
      const size_t rb = WTypeRowBytes(t, cols);
      std::vector<uint8_t> plain_bytes(rows * rb), inter_bytes;
      for (int64_t r = 0; r < rows; ++r) {
        std::memcpy(plain_bytes.data() + r * rb, padded.bytes.data() + r * padded.w.row_bytes,
                    rb);
      }
      inter_bytes = plain_bytes;
      InterleaveRows8(t, rows, cols, inter_bytes.data());
      WeightMatrix plain = padded.w;
      plain.data = plain_bytes.data();
      plain.row_bytes = rb;
      WeightMatrix inter = plain;
      inter.data = inter_bytes.data();
      inter.interleaved8 = true;
      const int64_t nb = cols / 32, bb = WTypeBlockBytes(t);
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t b = 0; b < nb; ++b) {
          ASSERT_EQ(0, std::memcmp(QuantBlockAt(inter, r, b), QuantBlockAt(plain, r, b), bb))
              << "row " << r << " block " << b;
        }
      }
      if (rows >= 8 && nb > 1) {  // (one block a row is laid out alike both ways)
        ASSERT_NE(inter_bytes, plain_bytes);
      }
      for (int64_t r = rows / 8 * 8; r < rows; ++r) {  // the last rows keep the row layout
        ASSERT_EQ(0, std::memcmp(inter_bytes.data() + r * rb, plain_bytes.data() + r * rb, rb));
      }
      const std::vector<uint16_t> s8 = DecodeScales(plain);
      ASSERT_EQ(DecodeScales(inter), s8);
      WeightMatrix plain_s8 = plain, inter_s8 = inter;
      plain_s8.scales8 = inter_s8.scales8 = s8.data();
      for (Isa isa : Levels()) {
        SetIsa(isa);
        EXPECT_EQ(PrefersInterleaved8(t), isa == Isa::kAvx2);
        std::vector<float> d0(cols), d1(cols);
        for (int64_t r = 0; r < rows; ++r) {
          DequantizeRow(plain, r, d0.data());
          DequantizeRow(inter, r, d1.data());
          ASSERT_EQ(0, std::memcmp(d0.data(), d1.data(), sizeof(float) * cols)) << "row " << r;
        }
        for (int64_t m : {1, 2, 3, 7, 9}) {
          SCOPED_TRACE(std::string(WTypeName(t)) + " " + std::string(IsaName(isa)) + " rows=" +
                       std::to_string(rows) + " cols=" + std::to_string(cols) +
                       " m=" + std::to_string(m));
          std::vector<float> x(m * cols);
          for (auto& f : x) f = val(rng);
          for (ThreadPool* pool : {&single, &pool_}) {
            std::vector<float> want(m * rows);
            MatMul(x.data(), m, plain, want.data(), *pool);
            for (const WeightMatrix* w : {&inter, &inter_s8, &plain_s8}) {
              std::vector<float> got(m * rows);
              MatMul(x.data(), m, *w, got.data(), *pool);
              EXPECT_EQ(0, std::memcmp(want.data(), got.data(), sizeof(float) * want.size()))
                  << "interleaved " << w->interleaved8 << " scales8 " << (w->scales8 != nullptr);
            }
            // Grouped with a matrix of the other layout, as a decode step's Q, K and V.
            std::vector<float> g0(m * rows), g1(m * rows);
            const WeightMatrix* ws[] = {&inter_s8, &plain};
            float* ys[] = {g0.data(), g1.data()};
            MatMulGroup(x.data(), m, ws, ys, *pool);
            EXPECT_EQ(0, std::memcmp(want.data(), g0.data(), sizeof(float) * want.size()));
            EXPECT_EQ(0, std::memcmp(want.data(), g1.data(), sizeof(float) * want.size()));
          }
        }
      }
    }
  }
}

// Q8_0/Q4_0 follow one order at both vector levels (docs/kernels.md): exact integer block
// dots, then one FMA per block per output. So AVX2 and AVX-512 give the same bits, decode
// tiles and repacked panels alike (m = 1, 2 and 3 cross both levels' PackMinM).
TEST_F(IsaTest, QuantizedMatMulIsTheSameBitsAtAvx2AndAvx512) {
  if (BestIsa() < Isa::kAvx512) GTEST_SKIP() << "no AVX-512 here";
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> val(-2.0f, 2.0f);
  for (WType t : {WType::kQ8_0, WType::kQ4_0}) {
    for (const auto& [rows, cols] : {std::pair<int64_t, int64_t>{37, 96}, {75, 544}, {203, 1056}}) {
      TestMatrix tm = RandomMatrix(t, rows, cols, rng);
      for (int64_t m : {1, 2, 3, 7, 40}) {
        SCOPED_TRACE(std::string(WTypeName(t)) + " rows=" + std::to_string(rows) +
                     " cols=" + std::to_string(cols) + " m=" + std::to_string(m));
        std::vector<float> x(m * cols);
        for (auto& f : x) f = val(rng);
        std::vector<float> y2(m * rows), y512(m * rows);
        SetIsa(Isa::kAvx2);
        MatMul(x.data(), m, tm.w, y2.data(), pool_);
        SetIsa(Isa::kAvx512);
        MatMul(x.data(), m, tm.w, y512.data(), pool_);
        EXPECT_EQ(0, std::memcmp(y2.data(), y512.data(), sizeof(float) * y2.size()));
      }
    }
  }
}

TEST_F(IsaTest, QuantizedBlockLayoutsDecodeAsDocumented) {
  // q8_0: { f16 d; int8 q[32] }, x = d * q.
  uint8_t q8[34];
  PutU16(q8, Fp32ToFp16(0.5f));
  for (int j = 0; j < 32; ++j) q8[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(j - 16));
  // q4_0: { f16 d; uint8 qs[16] }, element j < 16 low nibble of qs[j], j + 16 its high nibble.
  uint8_t q4[18];
  PutU16(q4, Fp32ToFp16(2.0f));
  for (int j = 0; j < 16; ++j) q4[2 + j] = static_cast<uint8_t>(j | ((15 - j) << 4));
  for (Isa isa : Levels()) {
    SetIsa(isa);
    float out[32];
    WeightMatrix w{WType::kQ8_0, q8, 1, 32, 34};
    DequantizeRow(w, 0, out);
    for (int j = 0; j < 32; ++j) EXPECT_EQ(out[j], 0.5f * (j - 16)) << j;
    w = WeightMatrix{WType::kQ4_0, q4, 1, 32, 18};
    DequantizeRow(w, 0, out);
    for (int j = 0; j < 16; ++j) {
      EXPECT_EQ(out[j], 2.0f * (j - 8)) << j;
      EXPECT_EQ(out[16 + j], 2.0f * (15 - j - 8)) << j;
    }
  }
  EXPECT_EQ(WTypeRowBytes(WType::kQ8_0, 96), 102u);
  EXPECT_EQ(WTypeRowBytes(WType::kQ4_0, 96), 54u);
  EXPECT_EQ(WTypeRowBytes(WType::kBF16, 7), 14u);
}

TEST_F(IsaTest, DequantizeRowMatchesLayout) {
  for (WType t : kAllTypes) {
    TestMatrix tm = RandomMatrix(t, 5, 96, rng_);
    for (Isa isa : Levels()) {
      SetIsa(isa);
      std::vector<float> out(96);
      DequantizeRow(tm.w, 3, out.data());
      for (int c = 0; c < 96; ++c)
        ASSERT_EQ(out[c], static_cast<float>(DocWeight(tm.w, 3, c))) << c;
    }
  }
}

const int64_t kLengths[] = {1, 15, 16, 17, 33, 896, 4867};

TEST_F(IsaTest, RmsNormAddSwiGluSoftmax) {
  for (int64_t n : kLengths) {
    SCOPED_TRACE("n=" + std::to_string(n));
    const int64_t rows = 3;
    std::vector<float> x = RandomFloats(rows * n, -4, 4), w = RandomFloats(n, 0.5f, 1.5f);
    std::vector<float> g = RandomFloats(n, -20, 20), u = RandomFloats(n, -2, 2);
    g[0] = -100.0f;  // exp(100) overflows to inf inside silu; the result must still be ~0.
    for (Isa isa : Levels()) {
      SetIsa(isa);
      SCOPED_TRACE(std::string(IsaName(isa)));
      // RmsNorm, in place. Error: the mean of squares is a sum of n positive terms (relative
      // error n * u), halved by the square root, plus a few roundings per output.
      std::vector<float> y = x;
      RmsNorm(y.data(), w.data(), y.data(), rows, n, 1e-6f);
      for (int64_t i = 0; i < rows; ++i) {
        double ss = 0;
        for (int64_t c = 0; c < n; ++c) ss += double(x[i * n + c]) * x[i * n + c];
        const double inv = 1.0 / std::sqrt(ss / n + 1e-6);
        for (int64_t c = 0; c < n; ++c) {
          const double want = x[i * n + c] * inv * w[c];
          ASSERT_NEAR(y[i * n + c], want, (n * kU + 8 * kU) * std::fabs(want) + 1e-30) << c;
        }
      }
      // Add: exact.
      std::vector<float> acc = u;
      Add(g.data(), acc.data(), n);
      for (int64_t c = 0; c < n; ++c) ASSERT_EQ(acc[c], u[c] + g[c]);
      // SwiGlu, out aliasing gate. exp is accurate to a few ulp; 16 ulp covers the division
      // and products.
      std::vector<float> out = g;
      SwiGlu(out.data(), u.data(), out.data(), n);
      for (int64_t c = 0; c < n; ++c) {
        const double want = g[c] / (1.0 + std::exp(-double(g[c]))) * u[c];
        ASSERT_NEAR(out[c], want, 16 * kU * std::fabs(want) + 1e-30) << g[c];
      }
      // Softmax: each output within (n + 16) u relative (the normalizing sum has n terms).
      std::vector<float> sm(x.begin(), x.begin() + n);
      sm[0] = 80.0f;  // would overflow exp without the max subtraction
      std::vector<float> sx = sm;
      Softmax(sm.data(), n);
      double mx = *std::max_element(sx.begin(), sx.end()), sum = 0;
      for (float v : sx) sum += std::exp(double(v) - mx);
      for (int64_t c = 0; c < n; ++c) {
        const double want = std::exp(double(sx[c]) - mx) / sum;
        ASSERT_NEAR(sm[c], want, (n + 16) * kU * want + 1e-38) << c;
      }
    }
  }
}

TEST_F(IsaTest, RopeMatchesFormulaBothStyles) {
  for (RopeStyle style : {RopeStyle::kNormal, RopeStyle::kNeox}) {
    RopeParams p;
    p.style = style;
    p.head_dim = 64;
    p.theta_base = 1000000.0f;
    p.freq_scale = 0.5f;
    const int64_t n_tok = 5;
    const int n_head = 3;
    std::vector<int32_t> pos = {0, 1, 17, 4095, 32767};
    std::vector<float> x = RandomFloats(n_tok * n_head * p.head_dim);
    for (Isa isa : Levels()) {
      SetIsa(isa);
      std::vector<float> y = x;
      Rope(y.data(), n_tok, n_head, pos.data(), p);
      for (int64_t t = 0; t < n_tok; ++t) {
        for (int h = 0; h < n_head; ++h) {
          const float* v = x.data() + (t * n_head + h) * p.head_dim;
          const float* o = y.data() + (t * n_head + h) * p.head_dim;
          for (int i = 0; i < p.head_dim / 2; ++i) {
            const double theta = pos[t] * double(p.freq_scale) *
                                 std::pow(double(p.theta_base), -2.0 * i / p.head_dim);
            const int a = style == RopeStyle::kNormal ? 2 * i : i;
            const int b = style == RopeStyle::kNormal ? 2 * i + 1 : i + p.head_dim / 2;
            const double want_a = v[a] * std::cos(theta) - v[b] * std::sin(theta);
            const double want_b = v[a] * std::sin(theta) + v[b] * std::cos(theta);
            // Computed in double, rounded once to float: half an ulp of values <= sqrt(2).
            ASSERT_NEAR(o[a], want_a, 2e-7) << t << " " << h << " " << i;
            ASSERT_NEAR(o[b], want_b, 2e-7) << t << " " << h << " " << i;
          }
        }
      }
    }
  }
}

TEST_F(IsaTest, StoreLoadKvLayouts) {
  const int hd = 64;
  const int64_t n_vec = 3;
  std::vector<float> x = RandomFloats(n_vec * hd, -3, 3);
  // f16: exactly the scalar conversion.
  std::vector<uint8_t> buf(KvHeadBytes(KvType::kF16, hd) * n_vec);
  StoreKv(x.data(), n_vec, hd, KvType::kF16, buf.data());
  std::vector<float> back(n_vec * hd);
  LoadKv(buf.data(), n_vec, hd, KvType::kF16, back.data());
  for (int64_t i = 0; i < n_vec * hd; ++i) {
    ASSERT_EQ(GetU16(buf.data() + 2 * i), Fp32ToFp16(x[i]));
    ASSERT_EQ(back[i], Fp16ToFp32(Fp32ToFp16(x[i])));
  }
  // q8_0: blocks { f16 d; int8 q[32] }, d = amax / 127, so |x - d q| <= d / 2 (+ f16 rounding
  // of d, relative 2^-11, times |q| <= 127).
  ASSERT_EQ(KvHeadBytes(KvType::kQ8_0, hd), 68u);
  buf.assign(KvHeadBytes(KvType::kQ8_0, hd) * n_vec, 0);
  StoreKv(x.data(), n_vec, hd, KvType::kQ8_0, buf.data());
  LoadKv(buf.data(), n_vec, hd, KvType::kQ8_0, back.data());
  for (int64_t b = 0; b < n_vec * hd / 32; ++b) {
    float amax = 0;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[b * 32 + j]));
    const float d = Fp16ToFp32(GetU16(buf.data() + b * 34));
    ASSERT_NEAR(d, amax / 127, amax / 127 / 1024);
    for (int j = 0; j < 32; ++j) {
      const int8_t q = static_cast<int8_t>(buf[b * 34 + 2 + j]);
      ASSERT_EQ(back[b * 32 + j], d * q);
      ASSERT_NEAR(back[b * 32 + j], x[b * 32 + j], d / 2 + 127 * d / 1024);
    }
  }
}

// ggml's quantize_row_q4_0_ref, transcribed: the bytes StoreKv(kQ4_0) must write.
void GgmlQuantizeQ4_0(const float* x, int64_t n, uint8_t* out) {
  for (int64_t b = 0; b < n / 32; ++b, out += 18) {
    float amax = 0, max = 0;
    for (int j = 0; j < 32; ++j) {
      const float v = x[b * 32 + j];
      if (amax < std::fabs(v)) {
        amax = std::fabs(v);
        max = v;
      }
    }
    const float d = max / -8;
    const float id = d ? 1.0f / d : 0.0f;
    PutU16(out, Fp32ToFp16(d));
    for (int j = 0; j < 16; ++j) {
      const uint8_t xi0 = std::min<int8_t>(15, static_cast<int8_t>(x[b * 32 + j] * id + 8.5f));
      const uint8_t xi1 = std::min<int8_t>(15, static_cast<int8_t>(x[b * 32 + 16 + j] * id + 8.5f));
      out[2 + j] = static_cast<uint8_t>(xi0 | (xi1 << 4));
    }
  }
}

TEST(KvStoreTest, EveryTypeIsFoundByItsName) {
  for (const KvType t : {KvType::kF32, KvType::kF16, KvType::kQ8_0, KvType::kQ4_0, KvType::kKivi4,
                         KvType::kQ4_1}) {
    EXPECT_EQ(KvTypeFromName(KvTypeName(t)), t) << KvTypeName(t);
  }
  for (const char* other : {"", "q4", "F16", "q4_0 ", "?"}) {
    EXPECT_EQ(KvTypeFromName(other), std::nullopt) << "'" << other << "'";
  }
}

TEST(KvStoreTest, Q8_0NonFiniteBlocksReadBackAsNaNAndSpareTheirNeighbours) {
  for (float bad :
       {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    std::vector<float> x(96);
    for (int i = 0; i < 96; ++i) x[i] = 0.25f * static_cast<float>(i % 7) - 0.5f;
    x[40] = bad;  // the second block
    std::vector<uint8_t> q(KvHeadBytes(KvType::kQ8_0, 96));
    StoreKv(x.data(), 1, 96, KvType::kQ8_0, q.data());
    std::vector<float> y(96);
    LoadKv(q.data(), 1, 96, KvType::kQ8_0, y.data());
    for (int i = 0; i < 96; ++i) {
      if (i >= 32 && i < 64) {
        EXPECT_TRUE(std::isnan(y[i])) << "element " << i << " of " << bad;
      } else {
        EXPECT_NEAR(y[i], x[i], 1.0f / 127) << "element " << i << " of " << bad;
      }
    }
  }
}

TEST_F(IsaTest, StoreLoadKvQ4_0IsGgmlBlockQ4_0) {
  const int hd = 96;
  const int64_t n_vec = 5;
  std::vector<float> x = RandomFloats(n_vec * hd, -3, 3);
  // Edge blocks: all zero, a positive and a negative extreme, ties (x / d = k + 1/2), a tiny one.
  for (int j = 0; j < 32; ++j) x[j] = 0;
  x[32] = 4.0f;
  x[64 + 5] = -4.0f;
  for (int j = 0; j < 32; ++j) x[96 + j] = (j % 15 - 7) * 0.5f + 0.25f;  // x / d = k + 1/2
  x[96] = -4.0f;                                                         // d = 0.5
  for (int j = 0; j < 32; ++j) x[128 + j] = 1e-6f * (j - 16);
  ASSERT_EQ(KvHeadBytes(KvType::kQ4_0, hd), 54u);
  EXPECT_EQ(KvTypeBlockElems(KvType::kQ4_0), 32);
  EXPECT_EQ(KvTypeName(KvType::kQ4_0), "q4_0");
  std::vector<uint8_t> buf(KvHeadBytes(KvType::kQ4_0, hd) * n_vec, 0xAA);
  StoreKv(x.data(), n_vec, hd, KvType::kQ4_0, buf.data());
  std::vector<uint8_t> want(buf.size());
  GgmlQuantizeQ4_0(x.data(), n_vec * hd, want.data());
  ASSERT_EQ(buf, want);
  // Reads back as d * (nib - 8), element j < 16 the low nibble of qs[j], j + 16 the high one;
  // |x - x'| <= |d| / 2 (|d| where nib 15 clamps x in (7|d|, 8|d|] of the sign opposite to
  // the extreme), plus the f16 rounding of d times |nib - 8| <= 8; that rounding is relative
  // 2^-11 for normal halves, absolute 2^-25 for subnormal ones (the tiny block).
  std::vector<float> back(n_vec * hd);
  LoadKv(buf.data(), n_vec, hd, KvType::kQ4_0, back.data());
  for (int64_t b = 0; b < n_vec * hd / 32; ++b) {
    const uint8_t* blk = buf.data() + b * 18;
    const float d = Fp16ToFp32(GetU16(blk));
    const double d_err = std::fabs(d) / 2048 + 1.0 / (1 << 25);
    for (int j = 0; j < 32; ++j) {
      const int nib = j < 16 ? blk[2 + j] & 15 : blk[2 + j - 16] >> 4;
      ASSERT_EQ(back[b * 32 + j], d * (nib - 8)) << b << " " << j;
      const double step = (std::fabs(d) + d_err) * (nib == 15 ? 1.0 : 0.5);
      ASSERT_NEAR(back[b * 32 + j], x[b * 32 + j], step + 8 * d_err) << b << " " << j;
    }
  }
  EXPECT_EQ(back[32], 4.0f);       // the extreme is exact: nib 0, d = -0.5
  EXPECT_EQ(back[64 + 5], -4.0f);  // nib 0, d = +0.5
  for (int j = 0; j < 32; ++j) EXPECT_EQ(back[j], 0.0f);
  // A NaN poisons its block only (f32 / f16 KV would carry it too), without undefined casts.
  x[3 * 32 + 7] = std::numeric_limits<float>::quiet_NaN();
  StoreKv(x.data(), n_vec, hd, KvType::kQ4_0, buf.data());
  LoadKv(buf.data(), n_vec, hd, KvType::kQ4_0, back.data());
  for (int j = 0; j < 32; ++j) EXPECT_TRUE(std::isnan(back[3 * 32 + j])) << j;
  for (int j = 0; j < 32; ++j) EXPECT_FALSE(std::isnan(back[4 * 32 + j])) << j;
}

// ggml's quantize_row_q4_1_ref, transcribed: the bytes StoreKv(kQ4_1) must write.
void GgmlQuantizeQ4_1(const float* x, int64_t n, uint8_t* out) {
  for (int64_t i = 0; i < n / 32; ++i) {
    float min = std::numeric_limits<float>::max(), max = -std::numeric_limits<float>::max();
    for (int j = 0; j < 32; ++j) {
      const float v = x[i * 32 + j];
      if (v < min) min = v;
      if (v > max) max = v;
    }
    const float d = (max - min) / ((1 << 4) - 1);
    const float id = d ? 1.0f / d : 0.0f;
    uint8_t* y = out + i * 20;
    PutU16(y, Fp32ToFp16(d));
    PutU16(y + 2, Fp32ToFp16(min));
    for (int j = 0; j < 16; ++j) {
      const float x0 = (x[i * 32 + 0 + j] - min) * id;
      const float x1 = (x[i * 32 + 16 + j] - min) * id;
      const uint8_t xi0 = std::min<uint8_t>(15, static_cast<int8_t>(x0 + 0.5f));
      const uint8_t xi1 = std::min<uint8_t>(15, static_cast<int8_t>(x1 + 0.5f));
      y[4 + j] = static_cast<uint8_t>(xi0 | (xi1 << 4));
    }
  }
}

TEST_F(IsaTest, StoreLoadKvQ4_1IsGgmlBlockQ4_1) {
  const int hd = 96;
  const int64_t n_vec = 5;
  std::vector<float> x = RandomFloats(n_vec * hd, -3, 3);
  // Edge blocks: constant, all-positive with an offset, ties ((x - min) / d = k + 1/2), tiny.
  for (int j = 0; j < 32; ++j) x[j] = 1.5f;
  for (int j = 0; j < 32; ++j) x[32 + j] = 10.0f + 0.1f * j;
  for (int j = 0; j < 32; ++j) x[96 + j] = (j % 15) * 0.5f + 0.25f - 3.0f;
  x[96] = -3.0f;
  x[97] = 4.5f;  // d = 0.5
  for (int j = 0; j < 32; ++j) x[128 + j] = 1e-6f * (j - 16);
  ASSERT_EQ(KvHeadBytes(KvType::kQ4_1, hd), 60u);
  EXPECT_EQ(KvTypeBlockElems(KvType::kQ4_1), 32);
  EXPECT_EQ(KvTypeName(KvType::kQ4_1), "q4_1");
  std::vector<uint8_t> buf(KvHeadBytes(KvType::kQ4_1, hd) * n_vec, 0xAA);
  StoreKv(x.data(), n_vec, hd, KvType::kQ4_1, buf.data());
  std::vector<uint8_t> want(buf.size());
  GgmlQuantizeQ4_1(x.data(), n_vec * hd, want.data());
  ASSERT_EQ(buf, want);
  // Reads back as fma(d, nib, m), element j < 16 the low nibble of qs[j], j + 16 the high one;
  // |x - x'| <= d / 2 plus the f16 rounding of d (relative 2^-11, times nib <= 15; absolute
  // 2^-25 when subnormal) and of m (relative 2^-11).
  std::vector<float> back(n_vec * hd);
  LoadKv(buf.data(), n_vec, hd, KvType::kQ4_1, back.data());
  for (int64_t b = 0; b < n_vec * hd / 32; ++b) {
    const uint8_t* blk = buf.data() + b * 20;
    const float d = Fp16ToFp32(GetU16(blk)), m = Fp16ToFp32(GetU16(blk + 2));
    const double d_err = d / 2048 + 1.0 / (1 << 25), m_err = std::fabs(m) / 2048 + 1e-7;
    for (int j = 0; j < 32; ++j) {
      const int nib = j < 16 ? blk[4 + j] & 15 : blk[4 + j - 16] >> 4;
      ASSERT_EQ(back[b * 32 + j], std::fma(d, static_cast<float>(nib), m)) << b << " " << j;
      ASSERT_NEAR(back[b * 32 + j], x[b * 32 + j], (d + d_err) / 2 + 15 * d_err + m_err)
          << b << " " << j;
    }
  }
  for (int j = 0; j < 32; ++j) EXPECT_EQ(back[j], 1.5f);  // a constant block is exact
  // A NaN or an infinity poisons its block only, without undefined casts.
  x[3 * 32 + 7] = std::numeric_limits<float>::quiet_NaN();
  x[4 * 32 + 9] = -std::numeric_limits<float>::infinity();
  StoreKv(x.data(), n_vec, hd, KvType::kQ4_1, buf.data());
  LoadKv(buf.data(), n_vec, hd, KvType::kQ4_1, back.data());
  for (int j = 0; j < 32; ++j) EXPECT_TRUE(std::isnan(back[3 * 32 + j])) << j;
  for (int j = 0; j < 32; ++j) EXPECT_TRUE(std::isnan(back[4 * 32 + j])) << j;
  for (int j = 0; j < 32; ++j) EXPECT_FALSE(std::isnan(back[2 * 32 + j])) << j;
}

// The attention inner loops of every ISA level against the scalar ones, for every KV type, at
// head sizes with vector tails (float types) and several blocks (quantized types).
TEST_F(IsaTest, HalfConversionsAreTheCoreFunctionsBitForBit) {
  // Every level converts as core/fp16.h does: random bit patterns (NaNs, infinities,
  // subnormals, values past the half range and ties included), at every length from 0 to 40
  // (the vector levels' tails) and at odd offsets.
  std::vector<const internal::Ops*> levels = {&internal::ScalarOps()};
  if (BestIsa() >= Isa::kAvx2) levels.push_back(&internal::Avx2Ops());
  if (BestIsa() >= Isa::kAvx512) levels.push_back(&internal::Avx512Ops());
  std::uniform_int_distribution<uint32_t> bits;
  std::vector<float> x(4096 + 3);
  std::vector<uint16_t> h(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    uint32_t b = bits(rng_);
    switch (i % 8) {
      case 0:  // around the half range: ties, subnormal halves, overflow
        b = (b & 0x80001fffu) | ((0x33u + (b >> 20) % 0x16u) << 23);
        break;
      case 1:  // NaN floats, payloads of every kind
        b |= 0x7f800000u;
        break;
      case 2: {  // a float from a random half (NaN halves included)
        const uint16_t r = static_cast<uint16_t>(b);
        const float f = Fp16ToFp32(r);
        std::memcpy(&b, &f, 4);
        break;
      }
      default:
        break;
    }
    std::memcpy(&x[i], &b, 4);
    h[i] = static_cast<uint16_t>(bits(rng_));
  }
  for (uint16_t special : {0x7c00, 0xfc00, 0x7c01, 0x7e00, 0xfdff, 0x0001, 0x8000, 0x03ff}) {
    h[special % h.size()] = special;
  }
  for (const internal::Ops* ops : levels) {
    SCOPED_TRACE(std::string(IsaName(ops->isa)));
    for (int64_t n = 0; n <= 40; ++n) {
      for (int64_t off : {0, 1, 3}) {
        std::vector<uint8_t> out(2 * n + 2, 0xa5);
        ops->f32_to_f16(x.data() + off + 8 * n, out.data(), n);
        std::vector<float> back(n + 1, -7.0f);
        ops->f16_to_f32(h.data() + off + 8 * n, back.data(), n);
        for (int64_t i = 0; i < n; ++i) {
          ASSERT_EQ(GetU16(out.data() + 2 * i), Fp32ToFp16(x[off + 8 * n + i])) << n << " " << i;
          const float want = Fp16ToFp32(h[off + 8 * n + i]);
          ASSERT_EQ(std::memcmp(&back[i], &want, 4), 0) << n << " " << i;
        }
        ASSERT_EQ(GetU16(out.data() + 2 * n), 0xa5a5) << "wrote past " << n;
        ASSERT_EQ(back[n], -7.0f) << "wrote past " << n;
      }
    }
    // A long run, as StoreKv / LoadKv give them.
    std::vector<uint8_t> out(2 * x.size());
    ops->f32_to_f16(x.data(), out.data(), static_cast<int64_t>(x.size()));
    std::vector<float> back(h.size());
    ops->f16_to_f32(h.data(), back.data(), static_cast<int64_t>(h.size()));
    for (size_t i = 0; i < x.size(); ++i) {
      ASSERT_EQ(GetU16(out.data() + 2 * i), Fp32ToFp16(x[i])) << i;
      const float want = Fp16ToFp32(h[i]);
      ASSERT_EQ(std::memcmp(&back[i], &want, 4), 0) << i;
    }
  }
}

TEST_F(IsaTest, KvDotAndAxpyMatchScalar) {
  std::vector<const internal::Ops*> levels = {&internal::ScalarOps()};
  if (BestIsa() >= Isa::kAvx2) levels.push_back(&internal::Avx2Ops());
  if (BestIsa() >= Isa::kAvx512) levels.push_back(&internal::Avx512Ops());
  for (KvType type : {KvType::kF32, KvType::kF16, KvType::kQ8_0, KvType::kQ4_0,
                      KvType::kQ4_1}) {
    for (int hd : {32, 40, 72, 96, 160, 200}) {
      if (hd % KvTypeBlockElems(type) != 0) continue;
      SCOPED_TRACE(std::string(KvTypeName(type)) + " hd=" + std::to_string(hd));
      const std::vector<float> x = RandomFloats(hd, -2, 2);
      const std::vector<float> q = RandomFloats(hd, -2, 2);
      std::vector<uint8_t> stored(KvHeadBytes(type, hd));
      StoreKv(x.data(), 1, hd, type, stored.data());
      std::vector<float> xs(hd);
      LoadKv(stored.data(), 1, hd, type, xs.data());
      double want = 0, abs_sum = 0;
      for (int i = 0; i < hd; ++i) {
        want += double(q[i]) * xs[i];
        abs_sum += std::fabs(double(q[i]) * xs[i]);
      }
      const std::vector<float> acc0 = RandomFloats(hd, -1, 1);
      for (const internal::Ops* ops : levels) {
        SCOPED_TRACE(std::string(IsaName(ops->isa)));
        EXPECT_NEAR(ops->kv_dot(q.data(), stored.data(), hd, type), want,
                    SumTol(hd) * abs_sum + 1e-30);
        std::vector<float> acc = acc0;
        ops->kv_axpy(0.75f, stored.data(), hd, type, acc.data());
        for (int i = 0; i < hd; ++i) {
          // One fused or two rounded operations: within 2 ulp of the exact a * x + acc.
          const double e = 0.75 * xs[i] + double(acc0[i]);
          ASSERT_NEAR(acc[i], e, 2 * kU * (std::fabs(0.75 * xs[i]) + std::fabs(acc0[i]))) << i;
        }
      }
    }
  }
}

// A paged KV cache for one layer, with NaN in every slot attention must not read.
struct TestKv {
  std::vector<std::vector<uint8_t>> k_store, v_store;
  std::vector<const void*> k_ptrs, v_ptrs;
  std::vector<float> k_f32, v_f32;  // [n_tokens][n_kv_head][head_dim] as stored (dequantized)
  KvView view;
};

TestKv MakeKv(KvType type, int n_kv_head, int hd, int block_tokens, int64_t n_valid,
              int64_t n_tokens, std::mt19937& rng) {
  TestKv kv;
  const size_t tok_bytes = KvHeadBytes(type, hd) * n_kv_head;
  const int64_t n_blocks = (n_tokens + block_tokens - 1) / block_tokens;
  std::uniform_real_distribution<float> dist(-1, 1);
  std::vector<float> nan_tok(n_kv_head * hd, std::numeric_limits<float>::quiet_NaN());
  kv.k_f32.resize(n_tokens * n_kv_head * hd);
  kv.v_f32.resize(n_tokens * n_kv_head * hd);
  for (int64_t b = 0; b < n_blocks; ++b) {
    kv.k_store.emplace_back(tok_bytes * block_tokens);
    kv.v_store.emplace_back(tok_bytes * block_tokens);
    for (int j = 0; j < block_tokens; ++j) {
      const int64_t tok = b * block_tokens + j;
      for (auto* store : {&kv.k_store.back(), &kv.v_store.back()}) {
        std::vector<float> vals(n_kv_head * hd);
        for (auto& f : vals) f = dist(rng);
        const bool valid = tok < n_valid;
        StoreKv(valid ? vals.data() : nan_tok.data(), n_kv_head, hd, type,
                store->data() + j * tok_bytes);
        if (valid) {
          auto& dst = store == &kv.k_store.back() ? kv.k_f32 : kv.v_f32;
          LoadKv(store->data() + j * tok_bytes, n_kv_head, hd, type,
                 dst.data() + tok * n_kv_head * hd);
        }
      }
    }
  }
  for (auto& s : kv.k_store) kv.k_ptrs.push_back(s.data());
  for (auto& s : kv.v_store) kv.v_ptrs.push_back(s.data());
  kv.view = KvView{type, n_kv_head, hd, block_tokens, kv.k_ptrs.data(), kv.v_ptrs.data(), n_tokens};
  return kv;
}

// Attention in float64 by its definition: query i attends slots [begin, stop(i)) with
// stop(i) = min(end, causal_slot0 + i + 1) when causal_slot0 >= 0, else end. Fills out
// [n_q][n_head][hd] and lse [n_q][n_head] (-inf for an empty range).
void NaiveAttention(const std::vector<float>& q, int64_t n_q, int n_head, const TestKv& kv,
                    int64_t begin, int64_t end, int64_t causal_slot0, double scale,
                    std::vector<double>& out, std::vector<double>& lse) {
  const int hd = kv.view.head_dim, n_kv_head = kv.view.n_kv_head;
  const int group = n_head / n_kv_head;
  out.assign(n_q * n_head * hd, 0.0);
  lse.assign(n_q * n_head, -std::numeric_limits<double>::infinity());
  for (int64_t i = 0; i < n_q; ++i) {
    const int64_t stop = causal_slot0 < 0 ? end : std::min(end, causal_slot0 + i + 1);
    for (int h = 0; h < n_head; ++h) {
      const int kvh = h / group;
      std::vector<double> s;
      double mx = -1e300, sum = 0;
      for (int64_t j = begin; j < stop; ++j) {
        double dot = 0;
        for (int d = 0; d < hd; ++d) {
          dot += double(q[(i * n_head + h) * hd + d]) * kv.k_f32[(j * n_kv_head + kvh) * hd + d];
        }
        s.push_back(dot * scale);
        mx = std::max(mx, s.back());
      }
      if (s.empty()) continue;
      for (auto& v : s) sum += (v = std::exp(v - mx));
      lse[i * n_head + h] = mx + std::log(sum);
      for (size_t j = 0; j < s.size(); ++j) {
        for (int d = 0; d < hd; ++d) {
          out[(i * n_head + h) * hd + d] +=
              s[j] / sum * kv.v_f32[((begin + j) * n_kv_head + kvh) * hd + d];
        }
      }
    }
  }
}

TEST_F(IsaTest, AttentionMatchesNaiveDouble) {
  struct Case {
    int n_head, n_kv_head, hd, block_tokens;
    int64_t n_q, q_pos0;
  };
  const Case cases[] = {
      {6, 2, 64, 16, 1, 52},   // decode, GQA 3:1, 4 blocks, the last holding 5 tokens
      {6, 2, 64, 16, 7, 30},   // prefill chunk after a cached prefix
      {4, 4, 96, 8, 5, 0},     // MHA, from position 0
      {14, 2, 64, 256, 3, 9},  // qwen2.5-0.5b head layout, one contiguous block
      {10, 1, 40, 8, 3, 5},    // group > 8 heads, head_dim not a multiple of 16 (float KV only)
  };
  for (KvType type : {KvType::kF32, KvType::kF16, KvType::kQ8_0, KvType::kQ4_0,
                      KvType::kQ4_1}) {
    for (const Case& c : cases) {
      if (c.hd % KvTypeBlockElems(type) != 0) continue;
      SCOPED_TRACE(std::string(KvTypeName(type)) + " n_head=" + std::to_string(c.n_head) +
                   " n_q=" + std::to_string(c.n_q) + " q_pos0=" + std::to_string(c.q_pos0));
      const int64_t n_valid = c.q_pos0 + c.n_q;
      // Two more tokens than the queries may see: causal masking must skip them (they are NaN).
      TestKv kv = MakeKv(type, c.n_kv_head, c.hd, c.block_tokens, n_valid, n_valid + 2, rng_);
      std::vector<float> q = RandomFloats(c.n_q * c.n_head * c.hd, -2, 2);
      const float scale = 1.0f / std::sqrt(static_cast<float>(c.hd));
      std::vector<double> want, want_lse;
      NaiveAttention(q, c.n_q, c.n_head, kv, 0, c.q_pos0 + c.n_q, c.q_pos0, scale, want, want_lse);
      for (Isa isa : Levels()) {
        SetIsa(isa);
        SCOPED_TRACE(std::string(IsaName(isa)));
        std::vector<float> out(q.size(), std::numeric_limits<float>::quiet_NaN());
        Attention(q.data(), c.n_q, c.n_head, c.q_pos0, kv.view, scale, out.data(), pool_);
        // Scores carry float dot-product error ~hd * u * |q||k| (< 1e-4 absolute here), which
        // moves probabilities by that much relative; outputs are convex combinations of values
        // in [-1, 1], so 1e-4 absolute is a safe bound that still catches a wrong key or head.
        for (size_t e = 0; e < out.size(); ++e) ASSERT_NEAR(out[e], want[e], 1e-4) << e;
      }
    }
  }
}

// Writes NaN over slots [0, n) of kv's K and V: attention over a later range must not read them.
void PoisonLeadingSlots(TestKv& kv, int64_t n) {
  const KvView& v = kv.view;
  const size_t tok_bytes = KvHeadBytes(v.type, v.head_dim) * v.n_kv_head;
  std::vector<float> nan_tok(v.n_kv_head * v.head_dim, std::numeric_limits<float>::quiet_NaN());
  for (int64_t t = 0; t < n; ++t) {
    for (auto* store : {&kv.k_store, &kv.v_store}) {
      StoreKv(nan_tok.data(), v.n_kv_head, v.head_dim, v.type,
              (*store)[t / v.block_tokens].data() + (t % v.block_tokens) * tok_bytes);
    }
  }
}

// AttentionLse against a float64 evaluation of its documented formula: ranges inside blocks
// and across them, non-causal and causal (with the range's end cutting in, and queries whose
// causal range is empty), an empty range, and score multipliers other than 1/sqrt(head_dim).
// Slots before `begin` and after the last valid one hold NaN, so a read outside the range
// shows.
TEST_F(IsaTest, AttentionLseMatchesNaiveDouble) {
  struct Case {
    int n_head, n_kv_head, hd, block_tokens;
    int64_t n_q, n_valid, begin, end, causal_slot0;
    float score_scale;
    const char* what;
  };
  const Case cases[] = {
      {6, 2, 64, 16, 3, 60, 10, 40, -1, 0.125f, "non-causal, across blocks"},
      {6, 2, 64, 16, 4, 60, 45, 60, 56, 0.125f, "causal queries at the range's end"},
      {14, 2, 64, 256, 5, 40, 20, 40, 38, 0.2f, "causal, clamped by end"},
      {6, 2, 64, 16, 4, 40, 30, 40, 28, 0.14f, "causal, first queries see nothing"},
      {4, 4, 96, 8, 2, 30, 7, 7, -1, 0.1f, "empty range"},
      {10, 1, 40, 8, 3, 25, 5, 25, 22, 0.3f, "group > 8 heads, head_dim 40 (float KV only)"},
      {6, 2, 64, 16, 1, 33, 0, 33, -1, 0.139f, "decode over everything, multiplier 1/(T*8)"},
      // Longer than one split (2,048 slots): the splits' states merged in order, both when a
      // decode query's splits run as separate units and when a prefill chunk's rows do.
      {6, 2, 64, 16, 1, 5000, 0, 5000, 4999, 0.125f, "decode over three splits"},
      {14, 2, 64, 32, 9, 4104, 0, 4104, 4095, 0.125f, "chunk straddling the 2nd split boundary"},
      {4, 1, 64, 64, 2, 4500, 1000, 4500, -1, 0.125f, "non-causal, starting inside a split"},
  };
  for (KvType type : {KvType::kF32, KvType::kF16, KvType::kQ8_0, KvType::kQ4_0,
                      KvType::kQ4_1}) {
    for (const Case& c : cases) {
      if (c.hd % KvTypeBlockElems(type) != 0) continue;
      SCOPED_TRACE(std::string(KvTypeName(type)) + " " + c.what);
      TestKv kv = MakeKv(type, c.n_kv_head, c.hd, c.block_tokens, c.n_valid, c.n_valid + 2, rng_);
      PoisonLeadingSlots(kv, c.begin);
      std::vector<float> q = RandomFloats(c.n_q * c.n_head * c.hd, -2, 2);
      std::vector<double> want, want_lse;
      NaiveAttention(q, c.n_q, c.n_head, kv, c.begin, c.end, c.causal_slot0, c.score_scale, want,
                     want_lse);
      for (Isa isa : Levels()) {
        SetIsa(isa);
        SCOPED_TRACE(std::string(IsaName(isa)));
        std::vector<float> out(q.size(), std::numeric_limits<float>::quiet_NaN());
        std::vector<float> lse(c.n_q * c.n_head, std::numeric_limits<float>::quiet_NaN());
        AttentionLse(q.data(), c.n_q, c.n_head, kv.view, c.begin, c.end, c.causal_slot0,
                     c.score_scale, out.data(), lse.data(), pool_);
        // As for Attention: score errors ~hd * u * |q||k| move probabilities by that much
        // relative, and the log-sum-exp by that much absolute.
        for (size_t e = 0; e < out.size(); ++e) ASSERT_NEAR(out[e], want[e], 1e-4) << e;
        for (size_t e = 0; e < lse.size(); ++e) {
          if (std::isinf(want_lse[e])) {
            ASSERT_TRUE(std::isinf(lse[e]) && lse[e] < 0) << e << ": " << lse[e];
          } else {
            ASSERT_NEAR(lse[e], want_lse[e], 1e-4 * (1 + std::fabs(want_lse[e]))) << e;
          }
        }
      }
    }
  }
}

// Causal attention split at any slot into a non-causal head range and a causal tail range,
// merged by the two log-sum-exps, is Attention itself: what APE's merge relies on.
TEST_F(IsaTest, AttentionLseRangesMergeIntoAttention) {
  const int n_head = 6, n_kv_head = 2, hd = 64, n_q = 5;
  const int64_t q_pos0 = 27, n = q_pos0 + n_q;
  const float scale = 0.125f;
  for (KvType type : {KvType::kF32, KvType::kF16, KvType::kQ8_0, KvType::kQ4_0,
                      KvType::kQ4_1}) {
    TestKv kv = MakeKv(type, n_kv_head, hd, 16, n, n + 1, rng_);
    std::vector<float> q = RandomFloats(n_q * n_head * hd, -2, 2);
    for (Isa isa : Levels()) {
      SetIsa(isa);
      std::vector<float> want(q.size());
      Attention(q.data(), n_q, n_head, q_pos0, kv.view, scale, want.data(), pool_);
      // Up to q_pos0 + 1: every query sees the whole head range (the first query's tail is
      // then empty).
      for (int64_t split : {int64_t{0}, int64_t{1}, int64_t{16}, q_pos0, q_pos0 + 1}) {
        SCOPED_TRACE(std::string(KvTypeName(type)) + " " + std::string(IsaName(isa)) + " split " +
                     std::to_string(split));
        std::vector<float> o1(q.size()), o2(q.size()), l1(n_q * n_head), l2(n_q * n_head);
        AttentionLse(q.data(), n_q, n_head, kv.view, 0, split, -1, scale, o1.data(), l1.data(),
                     pool_);
        AttentionLse(q.data(), n_q, n_head, kv.view, split, n, q_pos0, scale, o2.data(), l2.data(),
                     pool_);
        for (int64_t r = 0; r < n_q * n_head; ++r) {
          const double m = std::max(l1[r], l2[r]);
          const double w1 = std::exp(l1[r] - m), w2 = std::exp(l2[r] - m);
          for (int d = 0; d < hd; ++d) {
            const double got = (w1 * o1[r * hd + d] + w2 * o2[r * hd + d]) / (w1 + w2);
            ASSERT_NEAR(got, want[r * hd + d], 2e-5) << r << " " << d;
          }
        }
      }
    }
  }
}

// A query's attention output is the same bits whether it runs alone (a decode step, its
// splits spread over threads), inside a prefill chunk of any size, or on one thread: the
// property that makes a cache hit's recompute and a batched decode equal a lone cold run.
// Shapes: 3 query heads per KV head; 7 (more than one pass of the score and value loops); a
// head_dim of 36, whose last chunk is partial at both vector widths (float KV only); 4 KV
// heads, which a decode step past the split takes 4, 2 or 1 at a time depending on the threads
// (1, 2, 3 here; a chunk always 1).
TEST_F(IsaTest, AttentionIsBatchInvariantBitForBit) {
  struct Shape {
    int n_head, n_kv_head, hd;
  };
  // Query 18 is the first past the split at 2,048. The whole chunk goes in blocks of 16
  // queries; the chunks cut below in blocks of 3 to 15.
  const int64_t q_pos0 = 2030, n_q = 48;
  ThreadPool one(1), three(3);
  for (const Shape& shape :
       {Shape{6, 2, 64}, Shape{14, 2, 64}, Shape{4, 1, 36}, Shape{8, 4, 32}}) {
    for (KvType type : {KvType::kF32, KvType::kF16, KvType::kQ8_0, KvType::kQ4_1}) {
      if (shape.hd % KvTypeBlockElems(type) != 0) continue;
      const int n_head = shape.n_head, n_kv_head = shape.n_kv_head, hd = shape.hd;
      SCOPED_TRACE(std::to_string(n_head) + " heads, " + std::to_string(n_kv_head) +
                   " KV heads of " + std::to_string(hd));
      TestKv kv = MakeKv(type, n_kv_head, hd, 16, q_pos0 + n_q, q_pos0 + n_q, rng_);
      std::vector<float> q = RandomFloats(n_q * n_head * hd, -2, 2);
      const size_t row = static_cast<size_t>(n_head) * hd;
      for (Isa isa : Levels()) {
        SetIsa(isa);
        SCOPED_TRACE(std::string(KvTypeName(type)) + " " + std::string(IsaName(isa)));
        std::vector<float> chunk(q.size());
        Attention(q.data(), n_q, n_head, q_pos0, kv.view, 0.125f, chunk.data(), pool_);
        std::vector<float> other(q.size());
        Attention(q.data(), n_q, n_head, q_pos0, kv.view, 0.125f, other.data(), one);
        ASSERT_EQ(0, std::memcmp(chunk.data(), other.data(), q.size() * sizeof(float)));
        for (int64_t cut : {int64_t{1}, int64_t{7}, int64_t{18}, int64_t{21}}) {
          SCOPED_TRACE("chunks cut at " + std::to_string(cut));
          Attention(q.data(), cut, n_head, q_pos0, kv.view, 0.125f, other.data(), three);
          Attention(q.data() + cut * row, n_q - cut, n_head, q_pos0 + cut, kv.view, 0.125f,
                    other.data() + cut * row, pool_);
          ASSERT_EQ(0, std::memcmp(chunk.data(), other.data(), q.size() * sizeof(float)));
        }
        for (int64_t i : {int64_t{0}, int64_t{17}, int64_t{18}, n_q - 1}) {
          SCOPED_TRACE("alone: query " + std::to_string(i));
          std::vector<float> alone(row);
          const float* qi = q.data() + i * row;
          Attention(qi, 1, n_head, q_pos0 + i, kv.view, 0.125f, alone.data(), pool_);
          ASSERT_EQ(0, std::memcmp(chunk.data() + i * row, alone.data(), row * sizeof(float)));
          Attention(qi, 1, n_head, q_pos0 + i, kv.view, 0.125f, alone.data(), one);
          ASSERT_EQ(0, std::memcmp(chunk.data() + i * row, alone.data(), row * sizeof(float)));
          Attention(qi, 1, n_head, q_pos0 + i, kv.view, 0.125f, alone.data(), three);
          ASSERT_EQ(0, std::memcmp(chunk.data() + i * row, alone.data(), row * sizeof(float)));
        }
        // AttentionLse over the same causal ranges is the same computation.
        std::vector<float> lse_out(q.size()), lse(n_q * n_head);
        AttentionLse(q.data(), n_q, n_head, kv.view, 0, q_pos0 + n_q, q_pos0, 0.125f,
                     lse_out.data(), lse.data(), three);
        ASSERT_EQ(0, std::memcmp(chunk.data(), lse_out.data(), q.size() * sizeof(float)));
      }
    }
  }
}

// kivi4: a group of 32 tokens quantized and read back. Per K channel (over the group's tokens)
// and per V block (over a token's 32 elements) the values span [min, max]; each reads back
// within half a step, (max - min) / 30, plus the f16 rounding of scale (relative 2^-11, times
// up to 15 steps) and of min.
TEST(KiviTest, GroupRoundTripIsWithinHalfAStepOfItsChannelOrBlock) {
  std::mt19937 rng(7);
  const int n_kv_head = 2, hd = 64, G = kKiviGroup;
  const size_t row = static_cast<size_t>(n_kv_head) * hd, hb = KvHeadBytes(KvType::kKivi4, hd);
  ASSERT_EQ(hb, 40u);
  std::vector<float> k(G * row), v(G * row);
  // Per-channel offsets and scales for K (KIVI's case: outlier channels), plain V.
  std::uniform_real_distribution<float> u(-1, 1);
  for (int t = 0; t < G; ++t) {
    for (size_t c = 0; c < row; ++c) {
      k[t * row + c] = (c % 7 == 0 ? 20.0f : 1.0f) * u(rng) + (c % 5) * 3.0f;
      v[t * row + c] = u(rng);
    }
  }
  const size_t stride = hb * n_kv_head + 8;  // slots need not be packed
  std::vector<uint8_t> ks(stride * G), vs(stride * G);
  StoreKiviGroup(k.data(), v.data(), n_kv_head, hd, ks.data(), vs.data(), stride);
  std::vector<float> kb(G * row), vb(G * row);
  LoadKiviGroup(ks.data(), vs.data(), stride, n_kv_head, hd, kb.data(), vb.data());
  auto bound = [](float lo, float hi) {
    return (hi - lo) / 30 + 16 * (hi - lo) / 15 / 2048 + std::fabs(lo) / 2048 + 1e-7f;
  };
  for (size_t c = 0; c < row; ++c) {
    float lo = k[c], hi = k[c];
    for (int t = 0; t < G; ++t) {
      lo = std::min(lo, k[t * row + c]);
      hi = std::max(hi, k[t * row + c]);
    }
    for (int t = 0; t < G; ++t) {
      ASSERT_NEAR(kb[t * row + c], k[t * row + c], bound(lo, hi)) << "K t=" << t << " c=" << c;
    }
  }
  for (int t = 0; t < G; ++t) {
    for (size_t b = 0; b < row / 32; ++b) {
      const float* x = v.data() + t * row + 32 * b;
      const float lo = *std::min_element(x, x + 32), hi = *std::max_element(x, x + 32);
      for (int j = 0; j < 32; ++j) {
        ASSERT_NEAR(vb[t * row + 32 * b + j], x[j], bound(lo, hi)) << "V t=" << t;
      }
    }
  }
  // A channel with a NaN or an infinity reads back NaN there and only there.
  k[5 * row + 3] = std::numeric_limits<float>::infinity();
  v[9 * row + 40] = std::numeric_limits<float>::quiet_NaN();
  StoreKiviGroup(k.data(), v.data(), n_kv_head, hd, ks.data(), vs.data(), stride);
  LoadKiviGroup(ks.data(), vs.data(), stride, n_kv_head, hd, kb.data(), vb.data());
  for (int t = 0; t < G; ++t) {
    for (size_t c = 0; c < row; ++c) {
      ASSERT_EQ(std::isnan(kb[t * row + c]), c == 3) << t << " " << c;
      ASSERT_EQ(std::isnan(vb[t * row + c]), t == 9 && c / 32 == 1) << t << " " << c;
    }
  }
}

// A windowed layer: slots [0, tail_begin) quantized in `type` in blocks of block_tokens, the
// rest f16 in a ring of tail_cap slots; k_f32 / v_f32 hold what attention must read
// (dequantized, or f16).
struct WindowKv {
  TestKv kv;
  std::vector<uint16_t> tail_k, tail_v;
};

WindowKv MakeWindowKv(KvType type, int n_kv_head, int hd, int block_tokens, int64_t tail_begin,
                      int64_t tail_cap, int64_t n_tokens, std::mt19937& rng) {
  WindowKv out;
  TestKv& kv = out.kv;
  const int G = kKiviGroup;
  const size_t row = static_cast<size_t>(n_kv_head) * hd;
  const size_t tok_bytes = KvHeadBytes(type, hd) * n_kv_head;
  std::uniform_real_distribution<float> dist(-1, 1);
  std::vector<float> k(n_tokens * row), v(n_tokens * row);
  for (size_t i = 0; i < k.size(); ++i) k[i] = dist(rng) + (i % row % 9 == 0 ? 4.0f : 0.0f);
  for (auto& f : v) f = dist(rng);
  kv.k_f32.resize(k.size());
  kv.v_f32.resize(v.size());
  const int64_t n_blocks = (n_tokens + block_tokens - 1) / block_tokens;
  for (int64_t b = 0; b < n_blocks; ++b) {
    kv.k_store.emplace_back(tok_bytes * block_tokens, 0xff);  // NaN-ish bytes where unused
    kv.v_store.emplace_back(tok_bytes * block_tokens, 0xff);
  }
  for (int64_t t = 0; type != KvType::kKivi4 && t < tail_begin; ++t) {
    const int64_t b = t / block_tokens, o = t % block_tokens;
    StoreKv(k.data() + t * row, n_kv_head, hd, type, kv.k_store[b].data() + o * tok_bytes);
    StoreKv(v.data() + t * row, n_kv_head, hd, type, kv.v_store[b].data() + o * tok_bytes);
    LoadKv(kv.k_store[b].data() + o * tok_bytes, n_kv_head, hd, type, kv.k_f32.data() + t * row);
    LoadKv(kv.v_store[b].data() + o * tok_bytes, n_kv_head, hd, type, kv.v_f32.data() + t * row);
  }
  for (int64_t g = 0; type == KvType::kKivi4 && g < tail_begin; g += G) {
    const int64_t b = g / block_tokens, o = g % block_tokens;
    StoreKiviGroup(k.data() + g * row, v.data() + g * row, n_kv_head, hd,
                   kv.k_store[b].data() + o * tok_bytes, kv.v_store[b].data() + o * tok_bytes,
                   tok_bytes);
    LoadKiviGroup(kv.k_store[b].data() + o * tok_bytes, kv.v_store[b].data() + o * tok_bytes,
                  tok_bytes, n_kv_head, hd, kv.k_f32.data() + g * row, kv.v_f32.data() + g * row);
  }
  out.tail_k.assign(tail_cap * row, 0x7e00);  // f16 NaN in unused ring slots
  out.tail_v.assign(tail_cap * row, 0x7e00);
  for (int64_t s = tail_begin; s < n_tokens; ++s) {
    for (size_t e = 0; e < row; ++e) {
      out.tail_k[(s % tail_cap) * row + e] = Fp32ToFp16(k[s * row + e]);
      out.tail_v[(s % tail_cap) * row + e] = Fp32ToFp16(v[s * row + e]);
      kv.k_f32[s * row + e] = Fp16ToFp32(Fp32ToFp16(k[s * row + e]));
      kv.v_f32[s * row + e] = Fp16ToFp32(Fp32ToFp16(v[s * row + e]));
    }
  }
  for (auto& st : kv.k_store) kv.k_ptrs.push_back(st.data());
  for (auto& st : kv.v_store) kv.v_ptrs.push_back(st.data());
  kv.view = KvView{type, n_kv_head, hd, block_tokens, kv.k_ptrs.data(), kv.v_ptrs.data(),
                   n_tokens};
  kv.view.tail_begin = tail_begin;
  kv.view.tail_cap = tail_cap;
  kv.view.tail_k = out.tail_k.data();
  kv.view.tail_v = out.tail_v.data();
  return out;
}

// Attention over windowed KV (kivi4, and q8_0 / q4_0 / q4_1 with --kv-recent) at every level
// against float64 over the values it must read: quantized slots across blocks (kivi4 in key
// groups), the f16 window in a ring that wraps, a prefill chunk straddling the window's start
// (for the GGUF types at a slot that is not a multiple of 32), ranges through AttentionLse, and
// a context past the 2,048-slot split. A query's output is the same alone or in a chunk.
TEST_F(IsaTest, AttentionOverAnF16WindowMatchesNaiveDouble) {
  struct Case {
    int n_head, n_kv_head, hd, block_tokens;
    int64_t tail_begin, tail_cap, n_tokens, n_q;
  };
  const Case cases[] = {
      {6, 2, 64, 32, 96, 80, 150, 1},      // decode; ring wraps (150 % 80)
      {6, 2, 64, 64, 64, 128, 140, 40},    // prefill chunk from slot 100, across the window
      {14, 2, 64, 32, 0, 64, 40, 3},       // nothing quantized yet
      {4, 4, 128, 256, 256, 64, 300, 2},   // MHA, head_dim 128, one group per block
      {14, 2, 64, 32, 2144, 96, 2200, 1},  // past the split at 2,048
  };
  for (KvType type : {KvType::kKivi4, KvType::kQ4_1, KvType::kQ8_0, KvType::kQ4_0}) {
    for (const Case& c : cases) {
      SCOPED_TRACE(std::string(KvTypeName(type)) + " n_tokens=" + std::to_string(c.n_tokens) +
                   " n_q=" + std::to_string(c.n_q));
      // kivi4 quantizes whole key groups; the others any prefix.
      const int64_t tail_begin =
          type == KvType::kKivi4 || c.tail_begin == 0 ? c.tail_begin : c.tail_begin - 5;
      WindowKv wk = MakeWindowKv(type, c.n_kv_head, c.hd, c.block_tokens, tail_begin, c.tail_cap,
                                 c.n_tokens, rng_);
      const TestKv& kv = wk.kv;
      const int64_t q_pos0 = c.n_tokens - c.n_q;
      std::vector<float> q = RandomFloats(c.n_q * c.n_head * c.hd, -1, 1);
      const float scale = 1.0f / std::sqrt(static_cast<float>(c.hd));
      std::vector<double> want, want_lse;
      NaiveAttention(q, c.n_q, c.n_head, kv, 0, c.n_tokens, q_pos0, scale, want, want_lse);
      const size_t row = static_cast<size_t>(c.n_head) * c.hd;
      for (Isa isa : Levels()) {
        SetIsa(isa);
        SCOPED_TRACE(std::string(IsaName(isa)));
        std::vector<float> out(q.size(), std::numeric_limits<float>::quiet_NaN());
        Attention(q.data(), c.n_q, c.n_head, q_pos0, kv.view, scale, out.data(), pool_);
        for (size_t e = 0; e < out.size(); ++e) ASSERT_NEAR(out[e], want[e], 1e-4) << e;
        std::vector<float> alone(row);
        Attention(q.data() + (c.n_q - 1) * row, 1, c.n_head, c.n_tokens - 1, kv.view, scale,
                  alone.data(), pool_);
        ASSERT_EQ(0, std::memcmp(out.data() + (c.n_q - 1) * row, alone.data(), row * 4));
        // A non-causal range that starts inside a quantized group and ends in the window.
        const int64_t begin = c.tail_begin > 40 ? c.tail_begin - 37 : 3;
        std::vector<double> want_r, want_rl;
        NaiveAttention(q, c.n_q, c.n_head, kv, begin, c.n_tokens, -1, scale, want_r, want_rl);
        std::vector<float> lse(c.n_q * c.n_head);
        AttentionLse(q.data(), c.n_q, c.n_head, kv.view, begin, c.n_tokens, -1, scale, out.data(),
                     lse.data(), pool_);
        for (size_t e = 0; e < out.size(); ++e) ASSERT_NEAR(out[e], want_r[e], 1e-4) << e;
        for (size_t e = 0; e < lse.size(); ++e) ASSERT_NEAR(lse[e], want_rl[e], 1e-4) << e;
      }
    }
  }
}

TEST(KernelsDispatchTest, SetIsaClampsAndNamesAreStable) {
  SetIsa(Isa::kAmx);
  EXPECT_EQ(ActiveIsa(), BestIsa());
  SetIsa(Isa::kScalar);
  EXPECT_EQ(ActiveIsa(), Isa::kScalar);
  SetIsa(BestIsa());
  EXPECT_EQ(IsaName(Isa::kAvx512), "avx512");
  EXPECT_EQ(WTypeName(WType::kQ4_0), "q4_0");
  const CpuFeatures& f = Cpu();
  if (f.avx512f) {
    EXPECT_TRUE(f.avx2);
  }
  std::printf("best ISA: %s\n", std::string(IsaName(BestIsa())).c_str());
}

}  // namespace
}  // namespace cachette::kernels
