// The rANS coder of rans.h. The update rules are the spec's (docs/formats/codecs.md, "Stream").
#include "cache/codecs/rans.h"

#include <algorithm>
#include <cstring>

#include "core/check.h"

namespace cachette::cache::codecs::rans {
namespace {

// A state below this before encoding a symbol of frequency f would leave the encoded state
// below 2^31; at or above it, bytes go out first.
constexpr uint32_t kEncodeBoundPerFreq = (kStateLow >> kProbBits) << 8;

uint32_t LoadU32(const uint8_t* p) {
  return uint32_t{p[0]} | uint32_t{p[1]} << 8 | uint32_t{p[2]} << 16 | uint32_t{p[3]} << 24;
}

int FirstLargest(const uint16_t* freq, int n) {
  int best = 0;
  for (int i = 1; i < n; ++i) {
    if (freq[i] > freq[best]) best = i;
  }
  return best;
}

}  // namespace

void NormalizeCounts(const uint64_t* counts, int n, uint64_t total, uint16_t* freq) {
  CT_CHECK(n >= 1 && n <= kMaxSymbols && total > 0) << "n " << n << " total " << total;
  uint64_t count_sum = 0;
  uint32_t sum = 0;
  // The decoder runs this per run, so the divisions by `total` become multiplications where
  // that is exact (every cachegen table: totals below 2^17). For a = count * 2^P <= total * 2^P
  // and r = ceil(2^48 / total), (a * r) >> 48 overshoots a / total by less than a / 2^48 <=
  // total * 2^P / 2^48 < 1 / total when total < 2^20, while a / total is an integer or at
  // least 1 / total below the next one: the floor is exact. And a * r <= 2^P * total *
  // (2^48 / total + 1) < 2^57: no overflow.
  const bool by_reciprocal = total < (uint64_t{1} << 20);
  const uint64_t reciprocal = ((uint64_t{1} << 48) + total - 1) / total;
  int largest = 0;  // the first largest frequency so far, and its value
  uint64_t largest_f = 0;
  for (int i = 0; i < n; ++i) {
    count_sum += counts[i];
    const uint64_t a = counts[i] * kProbScale;
    const uint64_t floor = by_reciprocal && counts[i] <= total ? (a * reciprocal) >> 48 : a / total;
    const uint64_t f = counts[i] == 0 ? 0 : std::max<uint64_t>(1, floor);
    freq[i] = static_cast<uint16_t>(f);
    sum += static_cast<uint32_t>(f);
    largest = f > largest_f ? i : largest;
    largest_f = std::max(largest_f, f);
  }
  CT_CHECK_EQ(count_sum, total);
  // The floors sum to at most 2^P and the max(1, .) bumps add at most n, so the loop below
  // ends: each pass takes at least 1 from a frequency above 1, and frequencies of 1 alone sum
  // to at most kMaxSymbols < 2^P.
  if (sum < kProbScale) freq[largest] += kProbScale - sum;
  for (int i = largest; sum > kProbScale; i = FirstLargest(freq, n)) {
    const uint32_t give = std::min<uint32_t>(sum - kProbScale, freq[i] - 1u);
    freq[i] = static_cast<uint16_t>(freq[i] - give);
    sum -= give;
  }
}

void Table::Build(int lo_in, int n_in, const uint16_t* freq_in) {
  lo = lo_in;
  n = n_in;
  uint32_t at = 0;
  for (int i = 0; i < n; ++i) {
    freq[i] = freq_in[i];
    start[i] = static_cast<uint16_t>(at);
    at += freq_in[i];
    // ceil(2^40 / f): for x < 2^31 the product overshoots x / f by less than x / 2^40 < 2^-9,
    // while x / f stays at least 1/f >= 2^-P = 2^-8 below the next integer: the floor is exact.
    reciprocal[i] = freq_in[i] == 0 ? 0 : ((uint64_t{1} << 40) + freq_in[i] - 1) / freq_in[i];
  }
  CT_CHECK_EQ(at, kProbScale);
}

void DecodeTable::Build(int lo, int n, const uint16_t* freq) {
  single = false;
  uint32_t at = 0;
  for (int i = 0; i < n; ++i) {
    const uint32_t f = freq[i];
    const uint32_t base = static_cast<uint8_t>(lo + i) | f << 8;
    uint32_t* e = entry + at;  // a pointer, so the fill vectorizes (no 32-bit index wrap)
    for (uint32_t k = 0; k < f; k += kFillBlock) {
      for (uint32_t l = 0; l < kFillBlock; ++l) e[k + l] = base | (k + l) << 20;
    }
    at += f;
    if (f == kProbScale) {
      single = true;
      single_symbol = lo + i;
    }
  }
  CT_CHECK_EQ(at, kProbScale);
}

Encoder::Encoder() {
  for (uint32_t& x : x_) x = kStateLow;
}

void Encoder::EncodeRun(const Table& table, const int8_t* symbols, size_t n, size_t stride) {
  // A symbol emits at most one byte: below 2^31, one shift brings a state under L <= L * f.
  static_assert(kProbBits <= 8, "an encode step must emit at most one byte");
  const size_t at = reversed_.size();
  reversed_.resize(at + n);
  uint8_t* out = reversed_.data() + at;
  uint32_t x[kStates];
  std::memcpy(x, x_, sizeof(x));
  for (size_t j = n; j-- > 0;) {
    const int i = symbols[j * stride] - table.lo;
    CT_CHECK(i >= 0 && i < table.n && table.freq[i] != 0)
        << "symbol " << int{symbols[j * stride]} << " is not in the table";
    const uint32_t f = table.freq[i];
    uint32_t& s = x[j % kStates];
    const bool emit = s >= kEncodeBoundPerFreq * f;
    *out = static_cast<uint8_t>(s);
    out += emit;
    s = emit ? s >> 8 : s;
    const uint32_t q =
        static_cast<uint32_t>((static_cast<unsigned __int128>(s) * table.reciprocal[i]) >> 40);
    s = (q << kProbBits) + (s - q * f) + table.start[i];
  }
  std::memcpy(x_, x, sizeof(x_));
  reversed_.resize(static_cast<size_t>(out - reversed_.data()));
}

void Encoder::Finish(std::vector<std::byte>& out) {
  const size_t at = out.size();
  out.resize(at + kStreamHeaderBytes + reversed_.size());
  std::byte* p = out.data() + at;
  for (int k = 0; k < kStates; ++k) {
    for (int b = 0; b < 4; ++b) *p++ = static_cast<std::byte>(x_[k] >> (8 * b));
  }
  std::reverse_copy(reversed_.begin(), reversed_.end(), reinterpret_cast<uint8_t*>(p));
  reversed_.clear();
}

Status Decoder::Open(std::span<const std::byte> stream) {
  if (stream.size() < kStreamHeaderBytes) {
    return Corruption("rANS stream of " + std::to_string(stream.size()) +
                      " bytes is shorter than its states");
  }
  const auto* p = reinterpret_cast<const uint8_t*>(stream.data());
  for (int k = 0; k < kStates; ++k) {
    x_[k] = LoadU32(p + 4 * k);
    if (x_[k] < kStateLow || x_[k] >= (kStateLow << 8)) {
      return Corruption("rANS state " + std::to_string(k) + " out of range");
    }
  }
  p_ = p + kStreamHeaderBytes;
  end_ = p + stream.size();
  return Status::Ok();
}

namespace {

// One symbol: x' = freq * (x >> P) + (slot - start), from the slot's packed entry.
inline int8_t DecodeSymbol(const uint32_t* entry, uint32_t& x) {
  const uint32_t e = entry[x & (kProbScale - 1)];
  x = ((e >> 8) & 0xFFF) * (x >> kProbBits) + (e >> 20);
  return static_cast<int8_t>(e);
}

// Symbols j .. n - 1 of a run, one at a time, each byte read checked: the end of a stream.
// False if the stream ends first.
bool DecodeChecked(const uint32_t* entry, uint32_t* x, const uint8_t*& p, const uint8_t* end,
                   size_t j, size_t n, int8_t* out, size_t stride) {
  for (; j < n; ++j) {
    uint32_t& s = x[j % kStates];
    out[j * stride] = DecodeSymbol(entry, s);
    while (s < kStateLow) {
      if (p == end) return false;
      s = (s << 8) | *p++;
    }
  }
  return true;
}

}  // namespace

bool Decoder::DecodeRun(const DecodeTable& t, size_t n, int8_t* out, size_t stride) {
  if (t.single) {
    // Every slot is the one symbol: x = 2^P * (x >> P) + slot leaves each state as it is.
    for (size_t j = 0; j < n; ++j) out[j * stride] = static_cast<int8_t>(t.single_symbol);
    return true;
  }
  const uint8_t* p = p_;
  const uint8_t* const end = end_;
  const uint32_t* const entry = t.entry;
  uint32_t x0 = x_[0], x1 = x_[1], x2 = x_[2], x3 = x_[3];
  // A state just decoded is at least L >> P = 2^15, so one byte brings it back to [L, 2^31)
  // when it fell below L. Branch-free: shift in the next byte, or nothing. Only where a byte
  // remains.
  static_assert(kProbBits <= 8, "a refill must take at most one byte");
  auto refill = [&p](uint32_t& x) {
    const bool take = x < kStateLow;
    const uint32_t shifted = (x << 8) | p[0];
    x = take ? shifted : x;
    p += take;
  };
  size_t j = 0;
  int8_t* o = out;
  // Four symbols per pass, one per state; four bytes left cover the most four refills take.
  while (j + 4 <= n && end - p >= 4) {
    o[0] = DecodeSymbol(entry, x0);
    o[stride] = DecodeSymbol(entry, x1);
    o[2 * stride] = DecodeSymbol(entry, x2);
    o[3 * stride] = DecodeSymbol(entry, x3);
    refill(x0);
    refill(x1);
    refill(x2);
    refill(x3);
    o += 4 * stride;
    j += 4;
  }
  // The rest one byte at a time, each read checked.
  uint32_t x[kStates] = {x0, x1, x2, x3};
  const bool ok = DecodeChecked(entry, x, p, end, j, n, out, stride);
  std::memcpy(x_, x, sizeof(x_));
  p_ = p;
  return ok;
}

// The same symbols, states and bytes as DecodeRun on each stream, two changes in how:
//  - K streams in one loop, so the CPU has 4K independent state updates in flight;
//  - a pass reads its (at most) four bytes of a stream as one little-endian word up front, and
//    state s takes byte (number of states before s that took one) of it. In DecodeRun each
//    refill loads at a pointer the previous refill just moved, a chain of loads through the
//    four states; here only a shift count is carried from state to state.
// Passes that cannot run out (a stream with 4m bytes left has m passes of up to 4 bytes, each
// reading a word within it) go unchecked in a block; the rest of a run goes to DecodeChecked.
template <int K>
bool Decoder::DecodeRunsOf(Decoder* const* decs, const DecodeTable* tables, size_t n,
                           int8_t* const* outs, size_t stride) {
  uint32_t x[K][kStates];
  const uint8_t* p[K];
  const uint32_t* entry[K];
  int8_t* o[K];
  for (int k = 0; k < K; ++k) {
    std::memcpy(x[k], decs[k]->x_, sizeof(x[k]));
    p[k] = decs[k]->p_;
    entry[k] = tables[k].entry;
    o[k] = outs[k];
  }
  size_t j = 0;
  while (n - j >= 4) {
    size_t passes = (n - j) / 4;
    for (int k = 0; k < K; ++k) {
      passes = std::min(passes, static_cast<size_t>(decs[k]->end_ - p[k]) / 4);
    }
    if (passes == 0) break;
    for (size_t i = 0; i < passes; ++i) {
#pragma GCC unroll 4
      for (int k = 0; k < K; ++k) {
        const uint32_t w = LoadU32(p[k]);
#pragma GCC unroll 4
        for (int s = 0; s < kStates; ++s) o[k][s * stride] = DecodeSymbol(entry[k], x[k][s]);
        uint32_t shift = 0;  // 8 x the bytes taken so far in this pass: at most 24 before s = 3
#pragma GCC unroll 4
        for (int s = 0; s < kStates; ++s) {
          const bool take = x[k][s] < kStateLow;
          const uint32_t shifted = (x[k][s] << 8) | ((w >> shift) & 0xFF);
          x[k][s] = take ? shifted : x[k][s];
          shift += take ? 8 : 0;
        }
        p[k] += shift / 8;
        o[k] += kStates * stride;
      }
    }
    j += kStates * passes;
  }
  bool ok = true;
  for (int k = 0; k < K; ++k) {
    Decoder& d = *decs[k];
    ok &= DecodeChecked(entry[k], x[k], p[k], d.end_, j, n, outs[k], stride);
    std::memcpy(d.x_, x[k], sizeof(d.x_));
    d.p_ = p[k];
  }
  return ok;
}

bool Decoder::DecodeRuns(Decoder* const* decs, const DecodeTable* tables, int k, size_t n,
                         int8_t* const* outs, size_t stride) {
  CT_CHECK(k >= 1 && k <= kMaxLockstep) << "DecodeRuns of " << k << " streams";
  // Four at a time at most: beyond 16 states the scalar loop runs out of registers.
  bool ok = true;
  for (int i = 0; i < k; i += 4) {
    switch (std::min(k - i, 4)) {
      case 1:
        ok &= DecodeRunsOf<1>(decs + i, tables + i, n, outs + i, stride);
        break;
      case 2:
        ok &= DecodeRunsOf<2>(decs + i, tables + i, n, outs + i, stride);
        break;
      case 3:
        ok &= DecodeRunsOf<3>(decs + i, tables + i, n, outs + i, stride);
        break;
      default:
        ok &= DecodeRunsOf<4>(decs + i, tables + i, n, outs + i, stride);
        break;
    }
  }
  return ok;
}

Decoder::Position Decoder::position() const {
  Position pos;
  std::memcpy(pos.x, x_, sizeof(pos.x));
  pos.p = p_;
  pos.end = end_;
  return pos;
}

void Decoder::set_position(const Position& pos) {
  CT_CHECK(pos.end == end_ && pos.p >= p_ && pos.p <= end_) << "a position of another stream";
  std::memcpy(x_, pos.x, sizeof(x_));
  p_ = pos.p;
}

bool Decoder::AtEnd() const {
  return p_ == end_ && x_[0] == kStateLow && x_[1] == kStateLow && x_[2] == kStateLow &&
         x_[3] == kStateLow;
}

}  // namespace cachette::cache::codecs::rans
