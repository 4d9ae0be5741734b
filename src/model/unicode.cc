#include "model/unicode.h"

#include <unicode/uchar.h>

#include <array>

namespace cachette::unicode {
namespace {

uint8_t ComputeFlags(uint32_t cp) {
  if (cp > 0x10FFFF) return 0;
  const auto c = static_cast<UChar32>(cp);
  uint8_t f = 0;
  const uint32_t mask = U_GET_GC_MASK(c);
  if (mask & U_GC_L_MASK) f |= kLetter;
  if (mask & U_GC_N_MASK) f |= kNumber;
  if (u_isUWhiteSpace(c)) f |= kSpace;
  return f;
}

// ASCII dominates real text; a table keeps ICU calls off the hot path for it.
const std::array<uint8_t, 128>& AsciiFlags() {
  static const std::array<uint8_t, 128> table = [] {
    std::array<uint8_t, 128> t{};
    for (uint32_t c = 0; c < 128; ++c) t[c] = ComputeFlags(c);
    return t;
  }();
  return table;
}

// Decodes one well-formed sequence at `p` (n >= 1 bytes available). Returns its length, or 0
// when the bytes there are not a well-formed UTF-8 sequence.
int DecodeOne(const uint8_t* p, size_t n, uint32_t* cp) {
  const uint8_t b0 = p[0];
  if (b0 < 0x80) {
    *cp = b0;
    return 1;
  }
  int len;
  uint32_t min;
  uint32_t v;
  if ((b0 & 0xE0) == 0xC0) {
    len = 2, min = 0x80, v = b0 & 0x1F;
  } else if ((b0 & 0xF0) == 0xE0) {
    len = 3, min = 0x800, v = b0 & 0x0F;
  } else if ((b0 & 0xF8) == 0xF0) {
    len = 4, min = 0x10000, v = b0 & 0x07;
  } else {
    return 0;
  }
  if (n < static_cast<size_t>(len)) return 0;
  for (int i = 1; i < len; ++i) {
    if ((p[i] & 0xC0) != 0x80) return 0;
    v = (v << 6) | (p[i] & 0x3F);
  }
  if (v < min || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) return 0;
  *cp = v;
  return len;
}

// The matchers below index units past the end freely: `At` returns a sentinel there.
class Matcher {
 public:
  explicit Matcher(const std::vector<Unit>& u) : u_(u), n_(u.size()) {}

  size_t size() const { return n_; }
  uint32_t Cp(size_t i) const { return i < n_ ? u_[i].cp : kEnd; }
  bool Is(size_t i, uint8_t flag) const { return i < n_ && (u_[i].flags & flag); }
  bool IsL(size_t i) const { return Is(i, kLetter); }
  bool IsN(size_t i) const { return Is(i, kNumber); }
  bool IsS(size_t i) const { return Is(i, kSpace); }
  // [^\s\p{L}\p{N}]
  bool IsOther(size_t i) const { return i < n_ && !(u_[i].flags & (kLetter | kNumber | kSpace)); }
  bool IsCrLf(size_t i) const { return Cp(i) == '\r' || Cp(i) == '\n'; }

  // 's|'t|'re|'ve|'m|'ll|'d at i; returns the match length in units or 0.
  size_t Contraction(size_t i, bool ignore_case) const {
    if (Cp(i) != '\'') return 0;
    auto low = [&](size_t j) {
      uint32_t c = Cp(j);
      if (ignore_case && c >= 'A' && c <= 'Z') c += 'a' - 'A';
      return c;
    };
    const uint32_t c1 = low(i + 1);
    if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') return 2;
    const uint32_t c2 = low(i + 2);
    if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) return 3;
    return 0;
  }

  // Length of the run of units at i that satisfy `pred`.
  template <typename Pred>
  size_t Run(size_t i, Pred pred) const {
    size_t j = i;
    while (j < n_ && pred(j)) ++j;
    return j - i;
  }

  // \s+(?!\S)|\s+ at i, given a whitespace run of k >= 1 units there: the lookahead makes the
  // first alternative leave the last space for the next piece when a non-space follows.
  size_t TrailingSpaces(size_t i, size_t k) const { return (k > 1 && i + k < n_) ? k - 1 : k; }

  static constexpr uint32_t kEnd = 0xFFFFFFFEu;

 private:
  const std::vector<Unit>& u_;
  size_t n_;
};

size_t MatchGpt2(const Matcher& m, size_t i) {
  if (size_t k = m.Contraction(i, /*ignore_case=*/false)) return k;
  const size_t sp = m.Cp(i) == ' ' ? 1 : 0;
  // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`
  if (m.IsL(i + sp)) return sp + m.Run(i + sp, [&](size_t j) { return m.IsL(j); });
  if (m.IsN(i + sp)) return sp + m.Run(i + sp, [&](size_t j) { return m.IsN(j); });
  if (m.IsOther(i + sp)) return sp + m.Run(i + sp, [&](size_t j) { return m.IsOther(j); });
  if (size_t k = m.Run(i, [&](size_t j) { return m.IsS(j); })) return m.TrailingSpaces(i, k);
  return 1;
}

size_t MatchLlama3(const Matcher& m, size_t i, size_t max_digits) {
  if (size_t k = m.Contraction(i, /*ignore_case=*/true)) return k;
  // [^\r\n\p{L}\p{N}]?\p{L}+
  auto letters = [&](size_t j) { return m.Run(j, [&](size_t x) { return m.IsL(x); }); };
  if (i < m.size() && !m.IsCrLf(i) && !m.IsL(i) && !m.IsN(i) && m.IsL(i + 1)) {
    return 1 + letters(i + 1);
  }
  if (m.IsL(i)) return letters(i);
  // \p{N}{1,max_digits}
  if (m.IsN(i)) {
    size_t k = 1;
    while (k < max_digits && m.IsN(i + k)) ++k;
    return k;
  }
  // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
  const size_t sp = m.Cp(i) == ' ' ? 1 : 0;
  if (m.IsOther(i + sp)) {
    size_t j = i + sp + m.Run(i + sp, [&](size_t x) { return m.IsOther(x); });
    j += m.Run(j, [&](size_t x) { return m.IsCrLf(x); });
    return j - i;
  }
  const size_t k = m.Run(i, [&](size_t j) { return m.IsS(j); });
  if (k == 0) return 1;
  // \s*[\r\n]+: backtracks to just after the last line break inside the whitespace run.
  for (size_t j = i + k; j > i; --j) {
    if (m.IsCrLf(j - 1)) return j - i;
  }
  return m.TrailingSpaces(i, k);
}

}  // namespace

uint8_t Flags(uint32_t cp) {
  if (cp < 128) return AsciiFlags()[cp];
  return ComputeFlags(cp);
}

std::vector<Unit> Decode(std::string_view text) {
  std::vector<Unit> units;
  units.reserve(text.size());
  const auto* p = reinterpret_cast<const uint8_t*>(text.data());
  const size_t n = text.size();
  const auto& ascii = AsciiFlags();
  for (size_t i = 0; i < n;) {
    Unit u;
    u.offset = static_cast<uint32_t>(i);
    if (p[i] < 0x80) {
      u.cp = p[i];
      u.len = 1;
      u.flags = ascii[p[i]];
    } else if (int len = DecodeOne(p + i, n - i, &u.cp)) {
      u.len = static_cast<uint8_t>(len);
      u.flags = ComputeFlags(u.cp);
    } else {
      u.cp = Unit::kInvalid;
      u.len = 1;
      u.flags = 0;
    }
    i += u.len;
    units.push_back(u);
  }
  return units;
}

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

void PreTokenizeUnits(PreTokenizer kind, const std::vector<Unit>& units, uint32_t text_size,
                      std::vector<Span>* out) {
  const Matcher m(units);
  for (size_t i = 0; i < units.size();) {
    size_t k;
    switch (kind) {
      case PreTokenizer::kGpt2:
        k = MatchGpt2(m, i);
        break;
      case PreTokenizer::kLlama3:
        k = MatchLlama3(m, i, 3);
        break;
      case PreTokenizer::kQwen2:
      default:
        k = MatchLlama3(m, i, 1);
        break;
    }
    const size_t end = i + k;
    out->push_back(Span{units[i].offset, end < units.size() ? units[end].offset : text_size});
    i = end;
  }
}

std::vector<Span> PreTokenize(PreTokenizer kind, std::string_view text) {
  std::vector<Span> spans;
  PreTokenizeUnits(kind, Decode(text), static_cast<uint32_t>(text.size()), &spans);
  return spans;
}

}  // namespace cachette::unicode
