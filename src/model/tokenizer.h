// Tokenizers built from GGUF metadata (`tokenizer.ggml.*` keys, as llama.cpp writes them):
//   - byte-level BPE (`tokenizer.ggml.model` = "gpt2"), with the pre-tokenizer named by
//     `tokenizer.ggml.pre` ("gpt-2", "llama-bpe", "qwen2", and "default" = gpt-2);
//   - SentencePiece (`tokenizer.ggml.model` = "llama"), scores-based merges, byte fallback.
// Reproduces llama.cpp's tokenization exactly (golden vectors in ../shared/testdata/tokenizer).
//
// Thread-safety: immutable after construction; Encode/Decode are safe to call concurrently.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "cachette/status.h"
#include "cachette/types.h"
#include "model/gguf.h"

namespace cachette {

class Tokenizer {
 public:
  enum class Kind { kBpe, kSpm };

  // Reads the vocabulary from `file`'s metadata. kInvalidArgument naming the key for missing
  // or inconsistent fields (unknown model or pre-tokenizer, tokens/scores/types of different
  // lengths, a merge naming an unknown token, bos/eos ids out of range, ...).
  static Result<std::unique_ptr<Tokenizer>> FromGguf(const gguf::GgufFile& file);

  virtual ~Tokenizer() = default;

  virtual Kind kind() const = 0;
  virtual int32_t vocab_size() const = 0;

  // Tokenizes `text`. add_bos prepends BOS (when the vocab has one). parse_special: text that
  // spells a control/user-defined special token (e.g. "<|endoftext|>") becomes that token;
  // otherwise it is tokenized as plain text (WART: user-defined tokens, type 4, are matched
  // even without parse_special, because llama.cpp does so). Invalid UTF-8 is tokenized
  // byte-wise, never an error. Matches llama.cpp's llama_tokenize(text, add_special=add_bos,
  // parse_special).
  virtual std::vector<TokenId> Encode(std::string_view text, bool add_bos,
                                      bool parse_special) const = 0;

  // The bytes a token stands for (for BPE: the byte-level mapping undone; for SPM: U+2581
  // becomes a space, <0xXX> byte tokens become that byte). Control tokens give "" unless
  // `render_special`, in which case their text. Out-of-range ids give "".
  virtual std::string TokenToPiece(TokenId id, bool render_special = false) const = 0;

  // Concatenated pieces. For SPM, a leading space produced by the first token is removed when
  // the vocab adds a space prefix (as llama.cpp's detokenizer does).
  virtual std::string Decode(const std::vector<TokenId>& ids, bool render_special = false) const;

  // The token's text exactly as stored in the vocabulary (e.g. "Ġthe", "▁the").
  virtual std::string_view TokenText(TokenId id) const = 0;

  TokenId bos() const { return bos_; }  // -1 when none
  TokenId eos() const { return eos_; }  // -1 when none
  bool add_bos() const { return add_bos_; }  // `tokenizer.ggml.add_bos_token` (or the default)
  // End-of-generation: eos, eot and similar (`tokenizer.ggml.eot_token_id`, `<|im_end|>`...).
  virtual bool IsEog(TokenId id) const = 0;
  virtual bool IsControl(TokenId id) const = 0;

 protected:
  TokenId bos_ = -1;
  TokenId eos_ = -1;
  bool add_bos_ = false;
};

// Turns a stream of token ids into text that never ends in the middle of a UTF-8 character:
// bytes of an incomplete character are held until the next token completes them.
class StreamingDetokenizer {
 public:
  explicit StreamingDetokenizer(const Tokenizer& tok) : tok_(tok) {}
  // Returns the newly completed text for `id` (possibly empty).
  std::string Push(TokenId id);
  // Returns any held bytes (an incomplete character at the end of generation), as is.
  std::string Flush();

 private:
  const Tokenizer& tok_;
  std::string pending_;
};

// ---------------------------------------------------------------------------------------------
// Internals shared by tokenizer.cc, tokenizer_bpe.cc and tokenizer_spm.cc (and their tests).
// Not part of the API: other modules use only Tokenizer and StreamingDetokenizer above.
namespace tokenizer_internal {

// `tokenizer.ggml.token_type` values.
enum TokenType : uint8_t {
  kTypeUndefined = 0,
  kTypeNormal = 1,
  kTypeUnknown = 2,
  kTypeControl = 3,
  kTypeUserDefined = 4,
  kTypeUnused = 5,
  kTypeByte = 6,
};

// The vocabulary as read from GGUF. Immutable once built.
struct Vocab {
  std::vector<std::string> text;  // [n_vocab] token texts (empty ones renamed "[EMPTY_<id>]")
  std::vector<float> score;       // [n_vocab] (0 when the file has no scores)
  std::vector<uint8_t> type;      // [n_vocab] TokenType (kTypeNormal when the file has none)
  // text -> id; views into `text` (stable: the strings are never moved after the map is
  // built, and moving the vector keeps its elements in place). Later duplicates win.
  std::unordered_map<std::string_view, TokenId> to_id;
  // Control, user-defined and unknown tokens, longest text first (ties: lower id first).
  std::vector<TokenId> specials;
  std::vector<TokenId> eog;  // sorted, unique
  TokenId unk = -1;
  TokenId eot = -1;
  bool add_eos = false;
  bool add_space_prefix = false;

  int32_t size() const { return static_cast<int32_t>(text.size()); }
  // -1 when absent.
  TokenId Find(std::string_view s) const {
    auto it = to_id.find(s);
    return it == to_id.end() ? -1 : it->second;
  }
};

// The longest run of text merged as one problem (bytes for BPE pre-tokens, characters for
// SentencePiece words). Longer runs are cut into pieces of at most this size (at a character
// boundary where there is one) and each piece is merged on its own, so the merge state of one
// problem (symbols, candidate heap) stays bounded whatever the input: a 16 MiB word with no
// spaces costs 16 MiB / kMaxMergeRun small problems, not one 16M-symbol heap.
// WART: llama.cpp merges a run of any length at once, so on a run longer than this the tokens
// near each cut can differ from its output. Natural-language and code pre-tokens are far
// shorter (the golden vectors pass unchanged); only such a pathological input differs.
inline constexpr size_t kMaxMergeRun = 4096;

// Where to cut `s` (longer than `max_bytes`) so the first piece has at most `max_bytes` bytes
// and does not end inside a UTF-8 character: the last character start among the bytes
// s[max_bytes - 3 .. max_bytes], or `max_bytes` itself when none starts one (invalid UTF-8).
size_t CutAtCharBoundary(std::string_view s, size_t max_bytes);

// A piece of the input: raw text [begin, end), or one special token (token >= 0).
struct Fragment {
  TokenId token = -1;
  uint32_t begin = 0;
  uint32_t end = 0;
};

// Splits `text` around the special tokens it spells, as llama.cpp does: special tokens are
// tried longest first, each splitting every raw fragment at all its non-overlapping
// occurrences from left to right. User-defined tokens are always split out; control and
// unknown tokens only when `parse_special`.
std::vector<Fragment> PartitionSpecial(const Vocab& vocab, std::string_view text,
                                       bool parse_special);

// Common behaviour of both tokenizers; subclasses supply the raw-text algorithm and the
// rendering of normal tokens.
class VocabTokenizer : public Tokenizer {
 public:
  VocabTokenizer(Vocab vocab, TokenId bos, TokenId eos, bool add_bos);

  int32_t vocab_size() const override { return vocab_.size(); }
  std::vector<TokenId> Encode(std::string_view text, bool add_bos,
                              bool parse_special) const override;
  std::string TokenToPiece(TokenId id, bool render_special = false) const override;
  std::string_view TokenText(TokenId id) const override;
  bool IsEog(TokenId id) const override;
  bool IsControl(TokenId id) const override;

  const Vocab& vocab() const { return vocab_; }

 protected:
  // Tokenizes one raw fragment. `after_special` is true for the first fragment and for one
  // that follows a special token (SentencePiece adds its space prefix there).
  virtual void EncodeRaw(std::string_view raw, bool after_special,
                         std::vector<TokenId>* out) const = 0;
  // The bytes of a normal token's text.
  virtual std::string NormalPiece(std::string_view text) const = 0;
  // The byte of a byte-type token (`<0xXX>`), or -1 if it has none.
  int ByteOf(TokenId id) const;

  Vocab vocab_;
};

// Pre-tokenizer named by `tokenizer.ggml.pre`.
enum class BpePre { kGpt2, kLlama3, kQwen2 };

// Builds the byte-level BPE tokenizer. `merges` are the `tokenizer.ggml.merges` strings; a
// malformed merge or one naming (or producing) a token not in the vocabulary gives
// kInvalidArgument naming the key.
Result<std::unique_ptr<Tokenizer>> NewBpeTokenizer(Vocab vocab, BpePre pre,
                                                   const std::vector<std::string_view>& merges,
                                                   TokenId bos, TokenId eos, bool add_bos);
Result<std::unique_ptr<Tokenizer>> NewSpmTokenizer(Vocab vocab, TokenId bos, TokenId eos,
                                                   bool add_bos);

}  // namespace tokenizer_internal
}  // namespace cachette
