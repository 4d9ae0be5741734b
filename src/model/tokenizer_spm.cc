// SentencePiece BPE (`tokenizer.ggml.model` = "llama"), as llama.cpp runs it.
//
// Encoding a raw fragment:
//   1. prefix a space if the fragment starts the text or follows a special token and the
//      vocab says add_space_prefix; replace every ' ' with U+2581 (the visible space);
//   2. split into characters (a byte that does not start a well-formed UTF-8 sequence is a
//      character of its own; llama.cpp trusts the lead byte instead, which differs only on
//      invalid input, where it could swallow part of a following U+2581 and not round-trip);
//   3. repeatedly merge the adjacent pair whose concatenation is a token with the highest
//      score (leftmost on ties), with a max-heap of candidates over a linked list of symbols;
//   4. a final symbol that is not a token is emitted byte by byte as <0xXX> tokens (byte
//      fallback), or as the unknown token when the vocab has no byte tokens.
//
// Speed: there is no pre-tokenizer, so a whole text is one merge problem. When no token
// contains U+2581 right after another character (true of SentencePiece vocabularies, which
// split on whitespace), no merge can cross the start of a word, so each word (a maximal run of
// "U+2581...U+2581 non-space...") is merged on its own with a small heap. The result is the
// same as merging the whole text at once: a merge never spans two words either way. A word
// longer than kMaxMergeRun characters (tokenizer.h) is merged in pieces of at most that many,
// so one heap stays bounded even for a text with no spaces.
#include <algorithm>
#include <array>
#include <string>

#include "model/tokenizer.h"
#include "model/unicode.h"

namespace cachette::tokenizer_internal {
namespace {

constexpr std::string_view kSpaceMark = "\xE2\x96\x81";  // U+2581

class SpmTokenizer final : public VocabTokenizer {
 public:
  SpmTokenizer(Vocab vocab, TokenId bos, TokenId eos, bool add_bos)
      : VocabTokenizer(std::move(vocab), bos, eos, add_bos) {
    static constexpr char kHex[] = "0123456789ABCDEF";
    for (int b = 0; b < 256; ++b) {
      const char name[] = {'<', '0', 'x', kHex[b >> 4], kHex[b & 15], '>'};
      TokenId id = vocab_.Find(std::string_view(name, sizeof(name)));
      if (id < 0) {
        const char raw = static_cast<char>(b);
        id = vocab_.Find(std::string_view(&raw, 1));
      }
      byte_token_[b] = id >= 0 ? id : vocab_.unk;
    }
    split_words_ = true;
    for (const std::string& t : vocab_.text) {
      for (size_t p = t.find(kSpaceMark, 1); p != std::string::npos;
           p = t.find(kSpaceMark, p + 1)) {
        if (!EndsWithSpaceMark(std::string_view(t).substr(0, p))) split_words_ = false;
      }
    }
  }

  Kind kind() const override { return Kind::kSpm; }

 protected:
  void EncodeRaw(std::string_view raw, bool after_special,
                 std::vector<TokenId>* out) const override {
    std::string text;
    text.reserve(raw.size() * 2 + 3);
    if (vocab_.add_space_prefix && after_special) text += kSpaceMark;
    for (char c : raw) {
      if (c == ' ') {
        text += kSpaceMark;
      } else {
        text.push_back(c);
      }
    }
    Tokenize(text, out);
  }

  std::string NormalPiece(std::string_view text) const override {
    std::string out;
    out.reserve(text.size());
    for (size_t i = 0; i < text.size();) {
      if (text.compare(i, kSpaceMark.size(), kSpaceMark) == 0) {
        out.push_back(' ');
        i += kSpaceMark.size();
      } else {
        out.push_back(text[i++]);
      }
    }
    return out;
  }

 private:
  struct Symbol {
    uint32_t begin;  // byte offset in the escaped text
    uint32_t len;    // 0 once merged into its left neighbour
    int32_t prev;
    int32_t next;
  };
  struct Candidate {
    float score;
    int32_t left;
    int32_t right;
    uint32_t len;  // bytes of the merged text when queued
    // std heap functions build a max-heap: "greater" is the one to pop first.
    bool operator<(const Candidate& o) const {
      return score != o.score ? score < o.score : left > o.left;
    }
  };

  void TryPair(std::string_view text, std::vector<Symbol>& syms, std::vector<Candidate>& heap,
               int32_t left, int32_t right) const {
    if (left < 0 || right < 0) return;
    const uint32_t len = syms[left].len + syms[right].len;
    const TokenId id = vocab_.Find(text.substr(syms[left].begin, len));
    if (id < 0) return;
    heap.push_back(Candidate{vocab_.score[id], left, right, len});
    std::push_heap(heap.begin(), heap.end());
  }

  static bool EndsWithSpaceMark(std::string_view s) {
    return s.size() >= kSpaceMark.size() &&
           s.compare(s.size() - kSpaceMark.size(), kSpaceMark.size(), kSpaceMark) == 0;
  }

  void Tokenize(std::string_view text, std::vector<TokenId>* out) const {
    const std::vector<unicode::Unit> units = unicode::Decode(text);
    std::vector<Symbol> syms;
    std::vector<Candidate> heap;
    size_t start = 0;
    for (size_t i = 1; i <= units.size(); ++i) {
      // A word starts at a U+2581 that follows some other character.
      const bool word_start =
          i < units.size() && units[i].cp == 0x2581 && units[i - 1].cp != 0x2581;
      // Without split_words_ a merge may cross a word start, so an over-long run is cut at one
      // where it can (WART in tokenizer.h), and anywhere only at 4x the bound.
      const size_t run = i - start;
      const bool boundary = i == units.size() || (split_words_ && word_start) ||
                            (run >= kMaxMergeRun && (split_words_ || word_start)) ||
                            run >= 4 * kMaxMergeRun;
      if (!boundary) continue;
      const uint32_t begin = units[start].offset;
      const uint32_t end = i < units.size() ? units[i].offset : static_cast<uint32_t>(text.size());
      syms.clear();
      for (size_t k = start; k < i; ++k) {
        const auto idx = static_cast<int32_t>(syms.size());
        syms.push_back(Symbol{units[k].offset - begin, units[k].len, idx - 1,
                              k + 1 < i ? idx + 1 : -1});
      }
      TokenizeWord(text.substr(begin, end - begin), syms, heap, out);
      start = i;
    }
  }

  void TokenizeWord(std::string_view text, std::vector<Symbol>& syms,
                    std::vector<Candidate>& heap, std::vector<TokenId>* out) const {
    if (syms.empty()) return;
    heap.clear();
    for (int32_t i = 0; i + 1 < static_cast<int32_t>(syms.size()); ++i) {
      TryPair(text, syms, heap, i, i + 1);
    }
    while (!heap.empty()) {
      std::pop_heap(heap.begin(), heap.end());
      const Candidate c = heap.back();
      heap.pop_back();
      Symbol& l = syms[c.left];
      Symbol& r = syms[c.right];
      // Stale candidate: one side has merged since it was queued (its length changed).
      if (l.len == 0 || r.len == 0 || l.len + r.len != c.len) continue;
      l.len += r.len;
      r.len = 0;
      l.next = r.next;
      if (r.next >= 0) syms[r.next].prev = c.left;
      TryPair(text, syms, heap, l.prev, c.left);
      TryPair(text, syms, heap, c.left, l.next);
    }
    for (int32_t i = 0; i >= 0; i = syms[i].next) {
      const std::string_view piece = text.substr(syms[i].begin, syms[i].len);
      const TokenId id = vocab_.Find(piece);
      if (id >= 0) {
        out->push_back(id);
        continue;
      }
      for (char c : piece) {
        const TokenId b = byte_token_[static_cast<uint8_t>(c)];
        if (b >= 0) out->push_back(b);
      }
    }
  }

  std::array<TokenId, 256> byte_token_{};  // <0xXX> (or the byte itself, or unk) per byte
  bool split_words_ = false;  // no token has U+2581 right after another character
};

}  // namespace

Result<std::unique_ptr<Tokenizer>> NewSpmTokenizer(Vocab vocab, TokenId bos, TokenId eos,
                                                   bool add_bos) {
  return std::unique_ptr<Tokenizer>(
      std::make_unique<SpmTokenizer>(std::move(vocab), bos, eos, add_bos));
}

}  // namespace cachette::tokenizer_internal
