// Tokenizers built from GGUF metadata (`tokenizer.ggml.*` keys, as llama.cpp writes them):
//   - byte-level BPE (`tokenizer.ggml.model` = "gpt2"), with the pre-tokenizer named by
//     `tokenizer.ggml.pre` ("gpt-2", "llama-bpe", "qwen2", and "default" = gpt-2);
//   - SentencePiece (`tokenizer.ggml.model` = "llama"), scores-based merges, byte fallback.
// Reproduces llama.cpp's tokenization exactly (golden vectors in ../shared/testdata/tokenizer).
//
// Thread-safety: immutable after construction; Encode/Decode are safe to call concurrently.
#pragma once

#include <memory>
#include <string>
#include <string_view>
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
  // otherwise it is tokenized as plain text. Invalid UTF-8 is tokenized byte-wise, never an
  // error. Matches llama.cpp's llama_tokenize(text, add_special=add_bos, parse_special).
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

}  // namespace cachette
