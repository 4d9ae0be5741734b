// Tests of the rANS coder (rans.h) on its own: bit-exact round trips of random symbol streams
// under random skewed distributions (a fresh seed each run, printed on failure; set
// CACHETTE_TEST_SEED to replay one), the edge cases, the normalization rule, and a decoder
// written naively from the spec (docs/formats/codecs.md, "Stream") that must read what the
// encoder writes, symbol for symbol, as the fast decoder does; and the lockstep decoders (the
// portable one and each ISA table's of cachegen_kernels.h) against DecodeRun.
#include "cache/codecs/rans.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cache/codecs/cachegen_kernels.h"

namespace cachette::cache::codecs::rans {
namespace {

uint32_t FreshSeed() {
  if (const char* s = std::getenv("CACHETTE_TEST_SEED")) {
    return static_cast<uint32_t>(std::atoll(s));
  }
  return std::random_device{}();
}

// One run: its table range, raw counts, and symbols.
struct SymbolRun {
  int lo = 0, n = 0;
  std::vector<uint64_t> counts;
  std::vector<int8_t> symbols;
  std::vector<uint16_t> freq;
};

// A random skewed distribution over n symbols: geometric-like weights with a random decay and a
// random mode, a few random spikes; then `len` symbols drawn from it, and the run's table from
// their histogram (as cachegen builds it), sometimes with extra counts so table and data differ.
SymbolRun RandomRun(std::mt19937& rng, int n, size_t len) {
  SymbolRun r;
  r.n = n;
  r.lo = std::uniform_int_distribution<int>(-128, 127 - (n - 1))(rng);
  std::vector<double> w(n);
  const double decay = std::uniform_real_distribution<double>(0.05, 3.0)(rng);
  const int mode = std::uniform_int_distribution<int>(0, n - 1)(rng);
  for (int i = 0; i < n; ++i) w[i] = std::exp(-decay * std::abs(i - mode));
  for (int k = 0; k < 3; ++k) w[rng() % n] += std::uniform_real_distribution<double>(0, 1)(rng);
  std::discrete_distribution<int> pick(w.begin(), w.end());
  r.counts.assign(n, 0);
  for (size_t j = 0; j < len; ++j) {
    const int i = pick(rng);
    r.symbols.push_back(static_cast<int8_t>(r.lo + i));
    ++r.counts[i];
  }
  if (rng() % 3 == 0) {
    for (auto& c : r.counts) c += rng() % 5;
  }
  uint64_t total = 0;
  for (auto c : r.counts) total += c;
  if (total == 0) r.counts[mode] = total = 1;
  r.freq.resize(n);
  NormalizeCounts(r.counts.data(), n, total, r.freq.data());
  return r;
}

std::vector<std::byte> EncodeRuns(const std::vector<SymbolRun>& runs, size_t stride) {
  Encoder enc;
  Table t;
  for (size_t k = runs.size(); k-- > 0;) {
    const SymbolRun& r = runs[k];
    t.Build(r.lo, r.n, r.freq.data());
    std::vector<int8_t> strided(r.symbols.size() * stride, int8_t{99});
    for (size_t j = 0; j < r.symbols.size(); ++j) strided[j * stride] = r.symbols[j];
    enc.EncodeRun(t, strided.data(), r.symbols.size(), stride);
  }
  std::vector<std::byte> out;
  enc.Finish(out);
  return out;
}

// The spec's decoder, one symbol at a time, a linear search for the slot's symbol.
struct NaiveDecoder {
  uint32_t x[4];
  size_t at = 16;
  const std::vector<std::byte>& s;

  explicit NaiveDecoder(const std::vector<std::byte>& stream) : s(stream) {
    for (int k = 0; k < 4; ++k) {
      x[k] = 0;
      for (int b = 0; b < 4; ++b) x[k] |= static_cast<uint32_t>(s[4 * k + b]) << (8 * b);
    }
  }
  bool Symbol(const SymbolRun& r, size_t j, int* out) {
    uint32_t& st = x[j % 4];
    const uint32_t slot = st % (1u << kProbBits);
    uint32_t start = 0;
    int i = 0;
    while (!(slot >= start && slot < start + r.freq[i])) start += r.freq[i++];
    *out = r.lo + i;
    st = r.freq[i] * (st >> kProbBits) + slot - start;
    while (st < (1u << 23)) {
      if (at == s.size()) return false;
      st = (st << 8) | static_cast<uint32_t>(s[at++]);
    }
    return true;
  }
};

TEST(RansTest, RandomSkewedStreamsRoundTripBitExact) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " (CACHETTE_TEST_SEED replays it)");
  std::mt19937 rng(seed);
  for (int trial = 0; trial < 60; ++trial) {
    SCOPED_TRACE("trial " + std::to_string(trial));
    const int n_runs = 1 + static_cast<int>(rng() % 8);
    const size_t stride = 1 + rng() % 3;
    std::vector<SymbolRun> runs;
    size_t total = 0;
    for (int k = 0; k < n_runs; ++k) {
      const int n = 1 + static_cast<int>(rng() % (rng() % 2 ? 8 : kMaxSymbols));
      const size_t len = rng() % 4 == 0 ? rng() % 8 : rng() % 6000;
      runs.push_back(RandomRun(rng, n, len));
      total += len;
    }
    const std::vector<std::byte> stream = EncodeRuns(runs, stride);

    Decoder dec;
    ASSERT_TRUE(dec.Open(stream).ok());
    NaiveDecoder naive(stream);
    DecodeTable dt;
    for (const SymbolRun& r : runs) {
      dt.Build(r.lo, r.n, r.freq.data());
      std::vector<int8_t> out(r.symbols.size() * stride + 1, int8_t{77});
      ASSERT_TRUE(dec.DecodeRun(dt, r.symbols.size(), out.data(), stride));
      for (size_t j = 0; j < r.symbols.size(); ++j) {
        ASSERT_EQ(out[j * stride], r.symbols[j]) << "symbol " << j;
        int naive_symbol;
        ASSERT_TRUE(naive.Symbol(r, j, &naive_symbol));
        ASSERT_EQ(naive_symbol, r.symbols[j]) << "naive decoder, symbol " << j;
      }
      EXPECT_EQ(out.back(), int8_t{77});  // nothing written past the run
    }
    EXPECT_TRUE(dec.AtEnd());
    EXPECT_EQ(naive.at, stream.size());
    for (uint32_t x : naive.x) EXPECT_EQ(x, kStateLow);
    (void)total;
  }
}

TEST(RansTest, SizeIsCloseToTheEntropy) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  for (int trial = 0; trial < 10; ++trial) {
    std::vector<SymbolRun> runs = {RandomRun(rng, 2 + static_cast<int>(rng() % 40), 50000)};
    double bits = 0;  // the empirical entropy of the symbols, under their own histogram
    for (uint64_t c : runs[0].counts) {
      if (c > 0) bits -= c * std::log2(static_cast<double>(c) / 50000);
    }
    const bool exact = [&] {  // the table is the data's histogram (no extra counts)
      uint64_t t = 0;
      for (auto c : runs[0].counts) t += c;
      return t == 50000;
    }();
    if (!exact) continue;
    // The ideal length under the coder's own table (cross entropy): what rANS should reach to
    // within its state precision. The table's own cost (counts rounded to 2^-11 units, at
    // least one unit per used symbol) is separate, and bounded loosely: with 50,000 symbols
    // and rare ones it was at most 2.5% over 2,000 seeds.
    double table_bits = 0;
    for (int i = 0; i < runs[0].n; ++i) {
      if (runs[0].counts[i] > 0) {
        table_bits -= runs[0].counts[i] *
                      std::log2(static_cast<double>(runs[0].freq[i]) / (1u << kProbBits));
      }
    }
    const size_t bytes = EncodeRuns(runs, 1).size();
    EXPECT_LE(bytes, table_bits / 8 * 1.002 + 32)  // 16 of them the four states
        << "ideal under the table " << table_bits / 8 << " bytes";
    EXPECT_LE(table_bits, bits * 1.08 + 400) << "entropy " << bits / 8 << " bytes";
  }
}

TEST(RansTest, EmptyStreamIsTheStatesAlone) {
  Encoder enc;
  std::vector<std::byte> out;
  enc.Finish(out);
  ASSERT_EQ(out.size(), kStreamHeaderBytes);
  Decoder dec;
  ASSERT_TRUE(dec.Open(out).ok());
  EXPECT_TRUE(dec.AtEnd());
  // An empty run reads nothing.
  const uint16_t freq[2] = {kProbScale / 2, kProbScale / 2};
  DecodeTable dt;
  dt.Build(0, 2, freq);
  EXPECT_TRUE(dec.DecodeRun(dt, 0, nullptr, 1));
  EXPECT_TRUE(dec.AtEnd());
}

TEST(RansTest, OneSymbolCostsNoBytes) {
  // A table whose one symbol has every slot codes any number of it in zero bytes.
  std::mt19937 rng(1);
  for (int n : {1, 5}) {  // a range of one symbol, or five with one used
    SymbolRun r;
    r.lo = -3;
    r.n = n;
    r.counts.assign(n, 0);
    r.counts[n - 1] = 1000;
    r.symbols.assign(1000, static_cast<int8_t>(r.lo + n - 1));
    r.freq.resize(n);
    NormalizeCounts(r.counts.data(), n, 1000, r.freq.data());
    EXPECT_EQ(r.freq[n - 1], kProbScale);
    const auto stream = EncodeRuns({r, RandomRun(rng, 7, 300), r}, 1);
    Decoder dec;
    ASSERT_TRUE(dec.Open(stream).ok());
    DecodeTable dt;
    dt.Build(r.lo, r.n, r.freq.data());
    EXPECT_TRUE(dt.single);
    std::vector<int8_t> out(1000);
    ASSERT_TRUE(dec.DecodeRun(dt, 1000, out.data(), 1));
    EXPECT_EQ(out, r.symbols);
  }
}

TEST(RansTest, EverySymbolOfTheWidestTable) {
  // 255 symbols, uniform and then with one symbol taking nearly everything (the others keep
  // frequency 1 each and must still round-trip).
  for (bool skewed : {false, true}) {
    SCOPED_TRACE(skewed ? "skewed" : "uniform");
    SymbolRun r;
    r.lo = -128;
    r.n = kMaxSymbols;
    r.counts.assign(kMaxSymbols, 1);
    if (skewed) r.counts[100] = 1'000'000;
    for (int i = 0; i < kMaxSymbols; ++i) r.symbols.push_back(static_cast<int8_t>(-128 + i));
    for (int i = 0; i < 500; ++i) r.symbols.push_back(static_cast<int8_t>(-128 + 100));
    uint64_t total = 0;
    for (auto c : r.counts) total += c;
    r.freq.resize(kMaxSymbols);
    NormalizeCounts(r.counts.data(), kMaxSymbols, total, r.freq.data());
    for (int i = 0; i < kMaxSymbols; ++i) EXPECT_GE(r.freq[i], 1) << i;
    const auto stream = EncodeRuns({r}, 1);
    Decoder dec;
    ASSERT_TRUE(dec.Open(stream).ok());
    DecodeTable dt;
    dt.Build(r.lo, r.n, r.freq.data());
    std::vector<int8_t> out(r.symbols.size());
    ASSERT_TRUE(dec.DecodeRun(dt, out.size(), out.data(), 1));
    EXPECT_EQ(out, r.symbols);
    EXPECT_TRUE(dec.AtEnd());
  }
}

TEST(RansTest, NormalizedFrequenciesSumToTheScaleAndKeepEveryUsedSymbol) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  for (int trial = 0; trial < 2000; ++trial) {
    const int n = 1 + static_cast<int>(rng() % kMaxSymbols);
    std::vector<uint64_t> counts(n);
    uint64_t total = 0;
    for (auto& c : counts) {
      const int kind = static_cast<int>(rng() % 4);
      c = kind == 0 ? 0 : kind == 1 ? 1 : kind == 2 ? rng() % 100 : rng() % 10'000'000;
      total += c;
    }
    if (total == 0) counts[0] = total = 1;
    std::vector<uint16_t> freq(n);
    NormalizeCounts(counts.data(), n, total, freq.data());
    uint32_t sum = 0;
    for (int i = 0; i < n; ++i) {
      sum += freq[i];
      EXPECT_EQ(freq[i] == 0, counts[i] == 0) << i;
    }
    EXPECT_EQ(sum, kProbScale);
  }
}

TEST(RansTest, TruncatedOrBadStreamsAreRefusedWithoutReadingPastThem) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  std::vector<SymbolRun> runs = {RandomRun(rng, 9, 700), RandomRun(rng, 30, 500)};
  const auto stream = EncodeRuns(runs, 1);
  DecodeTable dt;
  for (size_t len = 0; len < stream.size(); ++len) {
    // A copy of exactly `len` bytes, so ASan sees any read past it.
    std::vector<std::byte> cut(stream.begin(), stream.begin() + len);
    Decoder dec;
    if (!dec.Open(cut).ok()) {
      EXPECT_LT(len, kStreamHeaderBytes);
      continue;
    }
    bool ok = true;
    for (const SymbolRun& r : runs) {
      dt.Build(r.lo, r.n, r.freq.data());
      std::vector<int8_t> out(r.symbols.size());
      ok = ok && dec.DecodeRun(dt, out.size(), out.data(), 1);
    }
    EXPECT_FALSE(ok && dec.AtEnd()) << len;
  }
  // States out of [L, 2^31).
  for (uint32_t bad : {0u, kStateLow - 1, 0x80000000u, 0xFFFFFFFFu}) {
    std::vector<std::byte> s = stream;
    for (int b = 0; b < 4; ++b) s[4 + b] = static_cast<std::byte>(bad >> (8 * b));
    Decoder dec;
    EXPECT_EQ(dec.Open(s).code(), StatusCode::kCorruption) << bad;
  }
  // A byte too many: decodes, but does not end where the stream does.
  std::vector<std::byte> longer = stream;
  longer.push_back(std::byte{0});
  Decoder dec;
  ASSERT_TRUE(dec.Open(longer).ok());
  for (const SymbolRun& r : runs) {
    dt.Build(r.lo, r.n, r.freq.data());
    std::vector<int8_t> out(r.symbols.size());
    ASSERT_TRUE(dec.DecodeRun(dt, out.size(), out.data(), 1));
  }
  EXPECT_FALSE(dec.AtEnd());
}

// The rule of rans.h, as written there: floors by division, then the first largest frequency
// takes the shortfall or gives up the excess.
std::vector<uint16_t> NaiveNormalize(const std::vector<uint64_t>& counts, uint64_t total) {
  const int n = static_cast<int>(counts.size());
  std::vector<uint16_t> f(n);
  uint32_t sum = 0;
  for (int i = 0; i < n; ++i) {
    f[i] = counts[i] == 0 ? 0 : std::max<uint64_t>(1, counts[i] * kProbScale / total);
    sum += f[i];
  }
  auto first_largest = [&] {
    return static_cast<int>(std::max_element(f.begin(), f.end()) - f.begin());
  };
  if (sum < kProbScale) f[first_largest()] += kProbScale - sum;
  while (sum > kProbScale) {
    const int i = first_largest();
    const uint32_t give = std::min<uint32_t>(sum - kProbScale, f[i] - 1u);
    f[i] -= give;
    sum -= give;
  }
  return f;
}

TEST(RansTest, NormalizeCountsIsItsRuleExactly) {
  // NormalizeCounts divides by multiplying with a reciprocal for totals below 2^20: exact
  // quotients (counts that are multiples of total / 2^P), totals on either side of 2^20, and
  // cachegen's weights (4 .. 512 each).
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  for (int trial = 0; trial < 5000; ++trial) {
    const int n = 1 + static_cast<int>(rng() % (trial % 2 ? 16 : kMaxSymbols));
    std::vector<uint64_t> counts(n);
    const int kind = trial % 4;
    const uint64_t unit = 1 + rng() % 4096;
    for (auto& c : counts) {
      c = kind == 0   ? (rng() % 3) * unit                          // exact quotients
          : kind == 1 ? (rng() % 2 ? 0 : 4u << (rng() % 8))         // cachegen weights
          : kind == 2 ? rng() % ((uint64_t{1} << 21) / n)           // totals near 2^20
                      : rng() % 1000;
    }
    uint64_t total = 0;
    for (auto c : counts) total += c;
    if (total == 0) counts[0] = total = unit;
    std::vector<uint16_t> freq(n);
    NormalizeCounts(counts.data(), n, total, freq.data());
    ASSERT_EQ(freq, NaiveNormalize(counts, total)) << "trial " << trial << " total " << total;
  }
  // The hardest quotients: count * 2^P one below a multiple of an odd total up to 2^20, so
  // count * 2^P / total is an integer less 1 / total, and an inexact reciprocal rounds it up.
  for (int trial = 0; trial < 2000; ++trial) {
    const uint64_t total = ((uint64_t{1} << (2 + rng() % 18)) + rng() % 4096) | 1;
    // c = -(2^P)^-1 mod total, by Euclid on (2^P, total).
    int64_t r0 = static_cast<int64_t>(total), r1 = kProbScale, s0 = 0, s1 = 1;
    while (r1 != 0) {
      const int64_t q = r0 / r1;
      std::tie(r0, r1) = std::make_pair(r1, r0 - q * r1);
      std::tie(s0, s1) = std::make_pair(s1, s0 - q * s1);
    }
    const int64_t t = static_cast<int64_t>(total);
    const uint64_t inverse = static_cast<uint64_t>(((s0 % t) + t) % t);
    const uint64_t c = (total - inverse) % total;
    std::vector<uint64_t> counts = {c, total - c};
    ASSERT_EQ((c * kProbScale) % total, c == 0 ? 0 : total - 1);
    std::vector<uint16_t> freq(2);
    NormalizeCounts(counts.data(), 2, total, freq.data());
    ASSERT_EQ(freq, NaiveNormalize(counts, total)) << "total " << total << " count " << c;
  }
}

// ---- the lockstep decoders against DecodeRun ----

// Every cachegen kernel table this CPU runs; the scalar one's decode_runs is the portable
// Decoder::DecodeRuns.
std::vector<const CacheGenKernels*> KernelTables() {
  std::vector<const CacheGenKernels*> tables = {&ScalarCacheGenKernels()};
  for (const CacheGenKernels* k : {Avx2CacheGenKernels(), Avx512CacheGenKernels()}) {
    if (k != nullptr) tables.push_back(k);
  }
  return tables;
}

// k streams of the same run lengths (a cachegen batch of planes), each run with its own table.
struct Streams {
  std::vector<size_t> lengths;                  // [run]
  std::vector<std::vector<SymbolRun>> runs;     // [stream][run]
  std::vector<std::vector<std::byte>> encoded;  // [stream]
};

Streams RandomStreams(std::mt19937& rng, int k) {
  static const size_t kLengths[] = {0, 1, 2, 3, 4, 5, 7, 8, 15, 17, 240, 241, 243, 2048};
  Streams s;
  const int n_runs = 1 + static_cast<int>(rng() % 5);
  for (int r = 0; r < n_runs; ++r) s.lengths.push_back(kLengths[rng() % std::size(kLengths)]);
  s.runs.resize(k);
  for (int i = 0; i < k; ++i) {
    for (const size_t len : s.lengths) {
      // Mostly small alphabets, as cachegen's; one symbol now and then (a table of one slot).
      const int n = rng() % 8 == 0 ? 1 : 1 + static_cast<int>(rng() % (rng() % 4 == 0 ? 127 : 13));
      s.runs[i].push_back(RandomRun(rng, n, len));
    }
    s.encoded.push_back(EncodeRuns(s.runs[i], 1));
  }
  return s;
}

TEST(RansTest, LockstepDecodersMatchDecodeRunOnEveryStream) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " (CACHETTE_TEST_SEED replays it)");
  std::mt19937 rng(seed);
  for (int trial = 0; trial < 60; ++trial) {
    // The batch sizes the vector loops take (16, 8), and any other.
    const int k = trial % 3 == 0   ? Decoder::kMaxLockstep
                  : trial % 3 == 1 ? Decoder::kMaxLockstep / 2
                                   : 1 + static_cast<int>(rng() % Decoder::kMaxLockstep);
    const Streams s = RandomStreams(rng, k);
    for (const CacheGenKernels* kernels : KernelTables()) {
      SCOPED_TRACE(std::string(kernels->name) + " trial " + std::to_string(trial) + " k " +
                   std::to_string(k));
      std::vector<Decoder> decs(k);
      std::vector<Decoder*> dec_ptrs;
      for (int i = 0; i < k; ++i) {
        ASSERT_TRUE(decs[i].Open(s.encoded[i]).ok());
        dec_ptrs.push_back(&decs[i]);
      }
      std::vector<DecodeTable> tables(k);
      DecodeTable plain;
      for (size_t r = 0; r < s.lengths.size(); ++r) {
        std::vector<std::vector<int8_t>> out(k, std::vector<int8_t>(s.lengths[r] + 1, 99));
        std::vector<int8_t*> outs;
        for (int i = 0; i < k; ++i) {
          const SymbolRun& run = s.runs[i][r];
          kernels->build_table(run.lo, run.n, run.freq.data(), tables[i]);
          plain.Build(run.lo, run.n, run.freq.data());
          ASSERT_EQ(0, std::memcmp(plain.entry, tables[i].entry, sizeof(uint32_t) * kProbScale));
          ASSERT_EQ(plain.single, tables[i].single);
          if (plain.single) {
            ASSERT_EQ(plain.single_symbol, tables[i].single_symbol);
          }
          outs.push_back(out[i].data());
        }
        ASSERT_TRUE(
            kernels->decode_runs(dec_ptrs.data(), tables.data(), k, s.lengths[r], outs.data(), 1));
        for (int i = 0; i < k; ++i) {
          const std::vector<int8_t>& want = s.runs[i][r].symbols;
          ASSERT_TRUE(std::equal(want.begin(), want.end(), out[i].begin())) << "stream " << i;
          ASSERT_EQ(out[i].back(), 99) << "wrote past the run";
        }
      }
      for (int i = 0; i < k; ++i) EXPECT_TRUE(decs[i].AtEnd()) << "stream " << i;
    }
  }
}

TEST(RansTest, LockstepDecodersRefuseTruncatedStreamsWithoutReadingPastThem) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " (CACHETTE_TEST_SEED replays it)");
  std::mt19937 rng(seed);
  for (int trial = 0; trial < 20; ++trial) {
    const int k = trial % 2 == 0 ? Decoder::kMaxLockstep : Decoder::kMaxLockstep / 2;
    const Streams s = RandomStreams(rng, k);
    const int cut_stream = static_cast<int>(rng() % k);
    const std::vector<std::byte>& whole = s.encoded[cut_stream];
    if (whole.size() <= kStreamHeaderBytes) continue;
    // Exactly `len` bytes on the heap, so ASan sees any read past them.
    const size_t len = kStreamHeaderBytes + rng() % (whole.size() - kStreamHeaderBytes);
    const std::vector<std::byte> cut(whole.begin(), whole.begin() + len);
    for (const CacheGenKernels* kernels : KernelTables()) {
      SCOPED_TRACE(std::string(kernels->name) + " trial " + std::to_string(trial));
      std::vector<Decoder> decs(k);
      std::vector<Decoder*> dec_ptrs;
      for (int i = 0; i < k; ++i) {
        ASSERT_TRUE(decs[i].Open(i == cut_stream ? cut : s.encoded[i]).ok());
        dec_ptrs.push_back(&decs[i]);
      }
      std::vector<DecodeTable> tables(k);
      bool ok = true;
      for (size_t r = 0; r < s.lengths.size() && ok; ++r) {
        std::vector<std::vector<int8_t>> out(k, std::vector<int8_t>(s.lengths[r]));
        std::vector<int8_t*> outs;
        for (int i = 0; i < k; ++i) {
          const SymbolRun& run = s.runs[i][r];
          kernels->build_table(run.lo, run.n, run.freq.data(), tables[i]);
          outs.push_back(out[i].data());
        }
        ok = kernels->decode_runs(dec_ptrs.data(), tables.data(), k, s.lengths[r], outs.data(), 1);
      }
      EXPECT_FALSE(ok && decs[cut_stream].AtEnd()) << "a stream cut to " << len << " bytes";
    }
  }
}

}  // namespace
}  // namespace cachette::cache::codecs::rans
