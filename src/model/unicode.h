// Unicode helpers for the tokenizers: UTF-8 decoding that tolerates invalid bytes, the three
// character classes the pre-tokenizer regexes use (\p{L}, \p{N}, \s), and hand-written
// matchers for llama.cpp's byte-level BPE pre-tokenizer regexes.
//
// Category data comes from ICU (libicu-dev, u_charType / u_isUWhiteSpace); \s is Unicode's
// White_Space property, as in llama.cpp's tables.
//
// Thread-safety: all functions are pure; safe to call concurrently.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace cachette::unicode {

// One decoded character. Invalid UTF-8 bytes decode one byte at a time to `kInvalid` units
// (a category of their own: not a letter, number or space, like U+FFFD), so every byte of the
// input belongs to exactly one unit and splitting never loses or reorders bytes.
struct Unit {
  static constexpr uint32_t kInvalid = 0xFFFFFFFFu;
  uint32_t cp = 0;      // the code point, or kInvalid
  uint32_t offset = 0;  // byte offset in the text
  uint8_t len = 0;      // bytes (1..4)
  uint8_t flags = 0;    // kLetter | kNumber | kSpace
};

inline constexpr uint8_t kLetter = 1;  // \p{L}
inline constexpr uint8_t kNumber = 2;  // \p{N}
inline constexpr uint8_t kSpace = 4;   // \s (White_Space)

// The kLetter/kNumber/kSpace flags of `cp` (0 for kInvalid).
uint8_t Flags(uint32_t cp);

// Decodes `text`. Well-formed sequences (no overlongs, no surrogates, <= U+10FFFF) become one
// unit each; any other byte becomes a kInvalid unit of length 1.
std::vector<Unit> Decode(std::string_view text);

// Appends the UTF-8 encoding of `cp` (which must be <= U+10FFFF).
void AppendUtf8(uint32_t cp, std::string* out);

// Byte-level BPE pre-tokenizers, each equal to one of llama.cpp's regexes:
//   kGpt2:   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//   kLlama3: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
//            ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
//   kQwen2:  kLlama3 with \p{N} instead of \p{N}{1,3}
// A character no alternative matches becomes a piece of its own (as llama.cpp does).
enum class PreTokenizer { kGpt2, kLlama3, kQwen2 };

// Splits `text` into pieces that concatenate back to `text`; returns the pieces as
// [begin, end) byte offsets.
struct Span {
  uint32_t begin;
  uint32_t end;
};
std::vector<Span> PreTokenize(PreTokenizer kind, std::string_view text);

// Same, on an already decoded text (`units` from Decode), appending to `out`.
void PreTokenizeUnits(PreTokenizer kind, const std::vector<Unit>& units, uint32_t text_size,
                      std::vector<Span>* out);

}  // namespace cachette::unicode
