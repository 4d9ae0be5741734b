// Byte-level BPE (GPT-2 style, `tokenizer.ggml.model` = "gpt2").
//
// Encoding a raw fragment:
//   1. pre-tokenize it into words with the regex of `tokenizer.ggml.pre` (model/unicode.h);
//   2. map each byte of a word to its printable stand-in code point (GPT-2's bytes_to_unicode:
//      printable Latin-1 bytes map to themselves, the other 68 to U+0100..U+0143), so that each
//      byte is one initial symbol whose token is that code point's text;
//   3. repeatedly merge the adjacent pair with the lowest merge rank (leftmost on ties), using
//      a min-heap of candidate pairs over a linked list of symbols: O(n log n) per word.
//      A word longer than kMaxMergeRun bytes is merged in pieces of at most that many bytes
//      (tokenizer.h), so the symbols and heap of one merge stay bounded.
// With ignore_merges (llama-bpe), a word that is itself a token is emitted without merging.
#include <algorithm>
#include <array>
#include <string>
#include <unordered_map>

#include "model/tokenizer.h"
#include "model/unicode.h"

namespace cachette::tokenizer_internal {
namespace {

// GPT-2's bytes_to_unicode: the code point that stands for byte `b` in token texts.
std::array<uint32_t, 256> ByteCodePoints() {
  std::array<uint32_t, 256> cps{};
  uint32_t next = 256;
  for (uint32_t b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
    cps[b] = printable ? b : next++;
  }
  return cps;
}

struct Merge {
  int32_t rank;
  TokenId result;
};

class BpeTokenizer final : public VocabTokenizer {
 public:
  BpeTokenizer(Vocab vocab, BpePre pre, TokenId bos, TokenId eos, bool add_bos)
      : VocabTokenizer(std::move(vocab), bos, eos, add_bos), pre_(pre) {
    byte_cp_ = ByteCodePoints();
    cp_byte_.fill(-1);
    for (int b = 0; b < 256; ++b) {
      cp_byte_[byte_cp_[b]] = static_cast<int16_t>(b);
      std::string s;
      unicode::AppendUtf8(byte_cp_[b], &s);
      byte_text_[b] = s;
      byte_token_[b] = vocab_.Find(s);
    }
  }

  Kind kind() const override { return Kind::kBpe; }

  Status AddMerges(const std::vector<std::string_view>& merges) {
    merges_.reserve(merges.size() * 2);
    std::string joined;
    for (size_t i = 0; i < merges.size(); ++i) {
      const std::string_view m = merges[i];
      auto bad = [&](const std::string& why) {
        return InvalidArgument("tokenizer: key 'tokenizer.ggml.merges': merge " +
                               std::to_string(i) + " '" + std::string(m) + "' " + why);
      };
      const size_t sp = m.size() > 1 ? m.find(' ', 1) : std::string_view::npos;
      if (sp == std::string_view::npos) return bad("is not of the form 'left right'");
      const std::string_view left = m.substr(0, sp);
      const std::string_view right = m.substr(sp + 1);
      const TokenId l = vocab_.Find(left);
      const TokenId r = vocab_.Find(right);
      if (l < 0) return bad("names unknown token '" + std::string(left) + "'");
      if (r < 0) return bad("names unknown token '" + std::string(right) + "'");
      joined.assign(left);
      joined.append(right);
      const TokenId result = vocab_.Find(joined);
      if (result < 0) return bad("produces unknown token '" + joined + "'");
      // The first (lowest-ranked) occurrence of a pair wins, as in llama.cpp.
      merges_.emplace(Key(l, r), Merge{static_cast<int32_t>(i), result});
    }
    return Status::Ok();
  }

 protected:
  void EncodeRaw(std::string_view raw, bool /*after_special*/,
                 std::vector<TokenId>* out) const override {
    const std::vector<unicode::Unit> units = unicode::Decode(raw);
    std::vector<unicode::Span> words;
    words.reserve(units.size() / 4 + 1);
    unicode::PreTokenizeUnits(ToUnicode(pre_), units, static_cast<uint32_t>(raw.size()), &words);
    Scratch scratch;
    for (const unicode::Span& w : words) {
      EncodeWord(raw.substr(w.begin, w.end - w.begin), &scratch, out);
    }
  }

  std::string NormalPiece(std::string_view text) const override {
    std::string out;
    out.reserve(text.size());
    for (const unicode::Unit& u : unicode::Decode(text)) {
      if (u.cp < cp_byte_.size() && cp_byte_[u.cp] >= 0) {
        out.push_back(static_cast<char>(cp_byte_[u.cp]));
      } else {
        // Not a byte stand-in (a malformed vocabulary): keep the text as it is.
        out.append(text.substr(u.offset, u.len));
      }
    }
    return out;
  }

 private:
  struct Symbol {
    TokenId id;    // -1: a byte whose stand-in is not a token
    int32_t prev;  // -1 at the start
    int32_t next;  // -1 at the end
    uint8_t byte;  // the first byte (used only for unmergeable single bytes)
    bool alive;
  };
  struct Candidate {
    int32_t rank;
    int32_t left;
    int32_t right;
    TokenId left_id;
    TokenId right_id;
    TokenId result;
    // std heap functions build a max-heap: "greater" is the one to pop first.
    bool operator<(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : left > o.left;
    }
  };
  struct Scratch {
    std::vector<Symbol> symbols;
    std::vector<Candidate> heap;
    std::string encoded;
  };

  static uint64_t Key(TokenId l, TokenId r) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(l)) << 32) | static_cast<uint32_t>(r);
  }
  static unicode::PreTokenizer ToUnicode(BpePre p) {
    switch (p) {
      case BpePre::kLlama3:
        return unicode::PreTokenizer::kLlama3;
      case BpePre::kQwen2:
        return unicode::PreTokenizer::kQwen2;
      case BpePre::kGpt2:
      default:
        return unicode::PreTokenizer::kGpt2;
    }
  }

  void TryPair(Scratch* s, int32_t left, int32_t right) const {
    if (left < 0 || right < 0) return;
    const Symbol& l = s->symbols[left];
    const Symbol& r = s->symbols[right];
    if (l.id < 0 || r.id < 0) return;
    auto it = merges_.find(Key(l.id, r.id));
    if (it == merges_.end()) return;
    s->heap.push_back(Candidate{it->second.rank, left, right, l.id, r.id, it->second.result});
    std::push_heap(s->heap.begin(), s->heap.end());
  }

  void EmitSymbol(const Symbol& sym, std::vector<TokenId>* out) const {
    if (sym.id >= 0) {
      out->push_back(sym.id);
      return;
    }
    // llama.cpp's fallback for a symbol that is not a token: each of its bytes as a
    // one-byte token, where one exists.
    for (char c : byte_text_[sym.byte]) {
      const TokenId id = vocab_.Find(std::string_view(&c, 1));
      if (id >= 0) out->push_back(id);
    }
  }

  void EncodeWord(std::string_view word, Scratch* s, std::vector<TokenId>* out) const {
    while (word.size() > kMaxMergeRun) {
      const size_t cut = CutAtCharBoundary(word, kMaxMergeRun);
      MergeWord(word.substr(0, cut), s, out);
      word.remove_prefix(cut);
    }
    MergeWord(word, s, out);
  }

  // One bounded merge problem (at most kMaxMergeRun bytes).
  void MergeWord(std::string_view word, Scratch* s, std::vector<TokenId>* out) const {
    if (word.empty()) return;
    if (pre_ == BpePre::kLlama3) {  // ignore_merges: whole words that are tokens win
      s->encoded.clear();
      for (char c : word) s->encoded += byte_text_[static_cast<uint8_t>(c)];
      const TokenId id = vocab_.Find(s->encoded);
      if (id >= 0) {
        out->push_back(id);
        return;
      }
    }
    const auto n = static_cast<int32_t>(word.size());
    s->symbols.resize(n);
    for (int32_t i = 0; i < n; ++i) {
      const auto b = static_cast<uint8_t>(word[i]);
      s->symbols[i] = Symbol{byte_token_[b], i - 1, i + 1 < n ? i + 1 : -1, b, true};
    }
    s->heap.clear();
    for (int32_t i = 0; i + 1 < n; ++i) TryPair(s, i, i + 1);
    while (!s->heap.empty()) {
      std::pop_heap(s->heap.begin(), s->heap.end());
      const Candidate c = s->heap.back();
      s->heap.pop_back();
      Symbol& l = s->symbols[c.left];
      const Symbol& r = s->symbols[c.right];
      // Stale candidate: one side has merged since it was queued.
      if (!l.alive || !r.alive || l.next != c.right || l.id != c.left_id || r.id != c.right_id) {
        continue;
      }
      l.id = c.result;
      l.next = r.next;
      if (r.next >= 0) s->symbols[r.next].prev = c.left;
      s->symbols[c.right].alive = false;
      TryPair(s, l.prev, c.left);
      TryPair(s, c.left, l.next);
    }
    for (int32_t i = 0; i >= 0; i = s->symbols[i].next) EmitSymbol(s->symbols[i], out);
  }

  BpePre pre_;
  std::unordered_map<uint64_t, Merge> merges_;  // (left id, right id) -> rank, result
  std::array<uint32_t, 256> byte_cp_{};
  std::array<int16_t, 512> cp_byte_{};  // stand-in code point -> byte, or -1
  std::array<std::string, 256> byte_text_;  // UTF-8 of each byte's stand-in
  std::array<TokenId, 256> byte_token_{};
};

}  // namespace

Result<std::unique_ptr<Tokenizer>> NewBpeTokenizer(Vocab vocab, BpePre pre,
                                                   const std::vector<std::string_view>& merges,
                                                   TokenId bos, TokenId eos, bool add_bos) {
  auto tok = std::make_unique<BpeTokenizer>(std::move(vocab), pre, bos, eos, add_bos);
  CT_RETURN_IF_ERROR(tok->AddMerges(merges));
  return std::unique_ptr<Tokenizer>(std::move(tok));
}

}  // namespace cachette::tokenizer_internal
