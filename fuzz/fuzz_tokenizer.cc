// Feeds arbitrary bytes to the tokenizer of the bundled model (models/cachette-tiny-q8_0.gguf,
// or the GGUF file named by $CACHETTE_FUZZ_MODEL), loaded once.
//
// Input: [mode][bytes...]. Mode bit 0: add_bos; bit 1: parse_special; bit 2: read the bytes as
// little-endian int32 token ids (any value, in range or not) and detokenize them, instead of
// tokenizing them as text.
//   - Encode: every id is in [0, vocab_size); without parse_special the text round-trips
//     exactly through Decode (byte-level BPE and byte fallback lose nothing).
//   - Decode, TokenToPiece, TokenText and the streaming detokenizer of arbitrary ids: an answer,
//     and the streamed text equals Decode's for the same ids.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "model/gguf.h"
#include "model/tokenizer.h"

#ifndef CACHETTE_FUZZ_MODEL
#define CACHETTE_FUZZ_MODEL "models/cachette-tiny-q8_0.gguf"
#endif

namespace {

// The file and its tokenizer, loaded on the first input and kept (reachable, so not a leak).
struct Loaded {
  std::unique_ptr<cachette::gguf::GgufFile> file;
  std::unique_ptr<cachette::Tokenizer> tok;
};

const cachette::Tokenizer& Tok() {
  static const Loaded* loaded = [] {
    const char* env = std::getenv("CACHETTE_FUZZ_MODEL");
    const std::string path = env != nullptr && *env != '\0' ? env : CACHETTE_FUZZ_MODEL;
    auto file = cachette::gguf::GgufFile::Open(path);
    if (!file.ok()) {
      std::fprintf(stderr, "fuzz_tokenizer: %s: %s (set CACHETTE_FUZZ_MODEL)\n", path.c_str(),
                   file.status().ToString().c_str());
      std::exit(2);
    }
    auto t = cachette::Tokenizer::FromGguf(**file);
    if (!t.ok()) {
      std::fprintf(stderr, "fuzz_tokenizer: %s\n", t.status().ToString().c_str());
      std::exit(2);
    }
    return new Loaded{std::move(file).value(), std::move(t).value()};
  }();
  return *loaded->tok;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const cachette::Tokenizer& tok = Tok();
  const bool add_bos = (data[0] & 1) != 0;
  const bool parse_special = (data[0] & 2) != 0;
  const bool ids_mode = (data[0] & 4) != 0;
  ++data;
  --size;

  if (!ids_mode) {
    const std::string_view text(reinterpret_cast<const char*>(data), size);
    const std::vector<cachette::TokenId> ids = tok.Encode(text, add_bos, parse_special);
    for (cachette::TokenId id : ids) {
      if (id < 0 || id >= tok.vocab_size()) __builtin_trap();
    }
    if (!parse_special && tok.Decode(ids) != text) __builtin_trap();  // lost or changed bytes
    return 0;
  }

  std::vector<cachette::TokenId> ids(size / 4);
  for (size_t i = 0; i < ids.size(); ++i) {
    uint32_t v;
    std::memcpy(&v, data + 4 * i, 4);
    ids[i] = static_cast<cachette::TokenId>(v);
  }
  const std::string text = tok.Decode(ids, parse_special);
  cachette::StreamingDetokenizer stream(tok);
  std::string streamed, pieces;
  size_t piece_bytes = 0;
  for (cachette::TokenId id : ids) {
    streamed += stream.Push(id);
    pieces += tok.TokenToPiece(id);
    piece_bytes += tok.TokenToPiece(id, parse_special).size();
    (void)tok.TokenText(id);
    (void)tok.IsEog(id);
    (void)tok.IsControl(id);
  }
  streamed += stream.Flush();
  if (streamed != pieces) __builtin_trap();  // streaming lost, added or reordered bytes
  // Decode may drop one leading space (SentencePiece's prefix); nothing else.
  if (text.size() > piece_bytes || text.size() + 1 < piece_bytes) __builtin_trap();
  return 0;
}
