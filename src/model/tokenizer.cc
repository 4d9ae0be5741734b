// Tokenizer: reading the vocabulary from GGUF, special-token partitioning, pieces, decoding and
// streaming detokenization. The two algorithms live in tokenizer_bpe.cc and tokenizer_spm.cc.
#include "model/tokenizer.h"

#include <algorithm>
#include <string>

namespace cachette {
namespace tokenizer_internal {
namespace {

constexpr std::string_view kModelKey = "tokenizer.ggml.model";
constexpr std::string_view kPreKey = "tokenizer.ggml.pre";
constexpr std::string_view kTokensKey = "tokenizer.ggml.tokens";
constexpr std::string_view kScoresKey = "tokenizer.ggml.scores";
constexpr std::string_view kTypesKey = "tokenizer.ggml.token_type";
constexpr std::string_view kMergesKey = "tokenizer.ggml.merges";

// Texts that end generation wherever they appear in a vocabulary (llama.cpp detects the
// end-of-turn token by text, since converters often leave eot_token_id unset).
constexpr std::string_view kEogTexts[] = {"<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end|>",
                                          "<end_of_turn>"};

std::string Quote(std::string_view s) {
  std::string q;
  q.reserve(s.size() + 2);
  q.push_back('\'');
  q.append(s);
  q.push_back('\'');
  return q;
}

// A required array `key` of `elem_type` (missing or mistyped: kInvalidArgument naming it).
Result<const std::vector<gguf::Value>*> RequiredArray(const gguf::GgufFile& file,
                                                      std::string_view key,
                                                      gguf::ValueType elem_type) {
  if (file.Find(key) == nullptr) {
    return InvalidArgument("tokenizer: missing key " + Quote(key));
  }
  auto arr = file.GetArray(key, elem_type);
  if (!arr.ok()) {
    return InvalidArgument("tokenizer: key " + Quote(key) + ": " + arr.status().message());
  }
  return *arr;
}

// Reads an optional token id `key` into *id; kInvalidArgument when present but not an integer
// in [0, n_vocab).
Status ReadTokenId(const gguf::GgufFile& file, std::string_view key, int32_t n_vocab,
                   TokenId* id) {
  if (file.Find(key) == nullptr) return Status::Ok();
  auto v = file.GetInt(key);
  if (!v.ok()) {
    return InvalidArgument("tokenizer: key " + Quote(key) + ": " + v.status().message());
  }
  if (*v < 0 || *v >= n_vocab) {
    return InvalidArgument("tokenizer: key " + Quote(key) + " = " + std::to_string(*v) +
                           " is out of range [0, " + std::to_string(n_vocab) + ")");
  }
  *id = static_cast<TokenId>(*v);
  return Status::Ok();
}

Status ReadBool(const gguf::GgufFile& file, std::string_view key, bool* b) {
  auto v = file.GetBoolOr(key, *b);
  if (!v.ok()) {
    return InvalidArgument("tokenizer: key " + Quote(key) + ": " + v.status().message());
  }
  *b = *v;
  return Status::Ok();
}

}  // namespace

size_t CutAtCharBoundary(std::string_view s, size_t max_bytes) {
  if (s.size() <= max_bytes) return s.size();
  for (size_t cut = max_bytes; cut > 0 && cut + 4 > max_bytes; --cut) {
    if ((static_cast<uint8_t>(s[cut]) & 0xC0) != 0x80) return cut;  // s[cut] starts a character
  }
  return max_bytes;
}

std::vector<Fragment> PartitionSpecial(const Vocab& vocab, std::string_view text,
                                       bool parse_special) {
  std::vector<Fragment> frags;
  if (text.empty()) return frags;
  frags.push_back(Fragment{-1, 0, static_cast<uint32_t>(text.size())});
  std::vector<Fragment> next;
  for (TokenId id : vocab.specials) {
    const uint8_t type = vocab.type[id];
    if (!parse_special && type != kTypeUserDefined) continue;
    const std::string_view needle = vocab.text[id];
    next.clear();
    bool changed = false;
    for (const Fragment& f : frags) {
      if (f.token >= 0) {
        next.push_back(f);
        continue;
      }
      uint32_t pos = f.begin;
      const std::string_view hay = text.substr(0, f.end);
      while (pos < f.end) {
        const size_t hit = hay.find(needle, pos);
        if (hit == std::string_view::npos) break;
        if (hit > pos) next.push_back(Fragment{-1, pos, static_cast<uint32_t>(hit)});
        next.push_back(Fragment{id, static_cast<uint32_t>(hit),
                                static_cast<uint32_t>(hit + needle.size())});
        pos = static_cast<uint32_t>(hit + needle.size());
        changed = true;
      }
      if (pos < f.end) next.push_back(Fragment{-1, pos, f.end});
    }
    if (changed) frags.swap(next);
  }
  return frags;
}

VocabTokenizer::VocabTokenizer(Vocab vocab, TokenId bos, TokenId eos, bool add_bos)
    : vocab_(std::move(vocab)) {
  bos_ = bos;
  eos_ = eos;
  add_bos_ = add_bos;
}

std::vector<TokenId> VocabTokenizer::Encode(std::string_view text, bool add_bos,
                                            bool parse_special) const {
  std::vector<TokenId> out;
  out.reserve(text.size() / 3 + 2);
  if (add_bos && bos_ >= 0) out.push_back(bos_);
  // Offsets inside the tokenizer are 32-bit: a text of 4 GiB or more is encoded in slices of
  // at most 1 GiB (cut at a character boundary), each as if it followed the previous one.
  constexpr size_t kMaxSlice = size_t{1} << 30;
  bool after_special = true;
  while (!text.empty()) {
    const std::string_view slice =
        text.size() < (size_t{1} << 32) ? text : text.substr(0, CutAtCharBoundary(text, kMaxSlice));
    for (const Fragment& f : PartitionSpecial(vocab_, slice, parse_special)) {
      if (f.token >= 0) {
        out.push_back(f.token);
        after_special = true;
      } else {
        EncodeRaw(slice.substr(f.begin, f.end - f.begin), after_special, &out);
        after_special = false;
      }
    }
    text.remove_prefix(slice.size());
  }
  if (add_bos && vocab_.add_eos && eos_ >= 0) out.push_back(eos_);
  return out;
}

int VocabTokenizer::ByteOf(TokenId id) const {
  const std::string& t = vocab_.text[id];
  // "<0xXX>"
  if (t.size() != 6 || t[0] != '<' || t[1] != '0' || t[2] != 'x' || t[5] != '>') return -1;
  auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  const int hi = hex(t[3]);
  const int lo = hex(t[4]);
  return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
}

std::string VocabTokenizer::TokenToPiece(TokenId id, bool render_special) const {
  if (id < 0 || id >= vocab_.size()) return "";
  switch (vocab_.type[id]) {
    case kTypeControl:
    case kTypeUnknown:
      return render_special ? vocab_.text[id] : "";
    case kTypeUserDefined:
      return vocab_.text[id];
    case kTypeNormal:
      return NormalPiece(vocab_.text[id]);
    case kTypeByte: {
      const int b = kind() == Kind::kSpm ? ByteOf(id) : -1;
      return b < 0 ? "" : std::string(1, static_cast<char>(b));
    }
    default:  // unused, undefined: suppressed like control tokens (as llama.cpp does)
      return "";
  }
}

std::string_view VocabTokenizer::TokenText(TokenId id) const {
  if (id < 0 || id >= vocab_.size()) return {};
  return vocab_.text[id];
}

bool VocabTokenizer::IsEog(TokenId id) const {
  return std::binary_search(vocab_.eog.begin(), vocab_.eog.end(), id);
}

bool VocabTokenizer::IsControl(TokenId id) const {
  return id >= 0 && id < vocab_.size() && vocab_.type[id] == kTypeControl;
}

}  // namespace tokenizer_internal

using tokenizer_internal::Vocab;

Result<std::unique_ptr<Tokenizer>> Tokenizer::FromGguf(const gguf::GgufFile& file) {
  using tokenizer_internal::kModelKey;
  using tokenizer_internal::Quote;
  if (file.Find(kModelKey) == nullptr) {
    return InvalidArgument("tokenizer: missing key " + Quote(kModelKey));
  }
  auto model = file.GetString(kModelKey);
  if (!model.ok()) {
    return InvalidArgument("tokenizer: key " + Quote(kModelKey) + ": " +
                           model.status().message());
  }
  const bool is_bpe = *model == "gpt2";
  const bool is_spm = *model == "llama";
  if (!is_bpe && !is_spm) {
    return InvalidArgument("tokenizer: key " + Quote(kModelKey) + ": unsupported model " +
                           Quote(*model) + " (expected 'gpt2' or 'llama')");
  }

  tokenizer_internal::BpePre pre = tokenizer_internal::BpePre::kGpt2;
  bool add_bos = is_spm;  // llama.cpp's defaults; llama-bpe turns it on below
  if (is_bpe && file.Find(tokenizer_internal::kPreKey) != nullptr) {
    auto name = file.GetString(tokenizer_internal::kPreKey);
    if (!name.ok()) {
      return InvalidArgument("tokenizer: key " + Quote(tokenizer_internal::kPreKey) + ": " +
                             name.status().message());
    }
    if (*name == "gpt-2" || *name == "default") {
      pre = tokenizer_internal::BpePre::kGpt2;
    } else if (*name == "llama-bpe" || *name == "llama3" || *name == "llama-v3") {
      pre = tokenizer_internal::BpePre::kLlama3;
      add_bos = true;
    } else if (*name == "qwen2") {
      pre = tokenizer_internal::BpePre::kQwen2;
    } else {
      return InvalidArgument("tokenizer: key " + Quote(tokenizer_internal::kPreKey) +
                             ": unsupported pre-tokenizer " + Quote(*name) +
                             " (expected 'gpt-2', 'default', 'llama-bpe' or 'qwen2')");
    }
  }

  Vocab vocab;
  CT_ASSIGN_OR_RETURN(const std::vector<gguf::Value>* tokens,
                      tokenizer_internal::RequiredArray(file, tokenizer_internal::kTokensKey,
                                                        gguf::ValueType::kString));
  if (tokens->empty() || tokens->size() > (1u << 30)) {
    return InvalidArgument("tokenizer: key " + Quote(tokenizer_internal::kTokensKey) +
                           " has " + std::to_string(tokens->size()) + " tokens");
  }
  const size_t n = tokens->size();
  const auto n_vocab = static_cast<int32_t>(n);
  vocab.text.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    std::string t((*tokens)[i].str);
    if (t.empty()) t = "[EMPTY_" + std::to_string(i) + "]";
    vocab.text.push_back(std::move(t));
  }
  vocab.score.assign(n, 0.0f);
  vocab.type.assign(n, tokenizer_internal::kTypeNormal);
  if (file.Find(tokenizer_internal::kScoresKey) != nullptr) {
    CT_ASSIGN_OR_RETURN(const std::vector<gguf::Value>* scores,
                        tokenizer_internal::RequiredArray(file, tokenizer_internal::kScoresKey,
                                                          gguf::ValueType::kFloat32));
    if (scores->size() != n) {
      return InvalidArgument("tokenizer: key " + Quote(tokenizer_internal::kScoresKey) +
                             " has " + std::to_string(scores->size()) + " entries for " +
                             std::to_string(n) + " tokens");
    }
    for (size_t i = 0; i < n; ++i) vocab.score[i] = static_cast<float>((*scores)[i].f64);
  }
  if (file.Find(tokenizer_internal::kTypesKey) != nullptr) {
    CT_ASSIGN_OR_RETURN(const std::vector<gguf::Value>* types,
                        tokenizer_internal::RequiredArray(file, tokenizer_internal::kTypesKey,
                                                          gguf::ValueType::kInt32));
    if (types->size() != n) {
      return InvalidArgument("tokenizer: key " + Quote(tokenizer_internal::kTypesKey) +
                             " has " + std::to_string(types->size()) + " entries for " +
                             std::to_string(n) + " tokens");
    }
    for (size_t i = 0; i < n; ++i) {
      const int64_t t = (*types)[i].i64;
      vocab.type[i] = t >= 1 && t <= 6 ? static_cast<uint8_t>(t)
                                        : static_cast<uint8_t>(tokenizer_internal::kTypeUndefined);
    }
  }
  vocab.to_id.reserve(n * 2);
  for (size_t i = 0; i < n; ++i) {
    vocab.to_id[std::string_view(vocab.text[i])] = static_cast<TokenId>(i);
  }

  // Special ids: llama.cpp's defaults for SentencePiece (for BPE it has none worth keeping).
  auto in_range = [&](TokenId id) { return id < n_vocab ? id : -1; };
  TokenId bos = is_spm ? in_range(1) : -1;
  TokenId eos = is_spm ? in_range(2) : -1;
  vocab.unk = is_spm ? in_range(0) : -1;
  TokenId pad = -1;
  CT_RETURN_IF_ERROR(tokenizer_internal::ReadTokenId(file, "tokenizer.ggml.bos_token_id",
                                                     n_vocab, &bos));
  CT_RETURN_IF_ERROR(tokenizer_internal::ReadTokenId(file, "tokenizer.ggml.eos_token_id",
                                                     n_vocab, &eos));
  CT_RETURN_IF_ERROR(tokenizer_internal::ReadTokenId(file, "tokenizer.ggml.unknown_token_id",
                                                     n_vocab, &vocab.unk));
  CT_RETURN_IF_ERROR(tokenizer_internal::ReadTokenId(file, "tokenizer.ggml.eot_token_id",
                                                     n_vocab, &vocab.eot));
  CT_RETURN_IF_ERROR(tokenizer_internal::ReadTokenId(file, "tokenizer.ggml.padding_token_id",
                                                     n_vocab, &pad));
  CT_RETURN_IF_ERROR(
      tokenizer_internal::ReadBool(file, "tokenizer.ggml.add_bos_token", &add_bos));
  CT_RETURN_IF_ERROR(
      tokenizer_internal::ReadBool(file, "tokenizer.ggml.add_eos_token", &vocab.add_eos));
  vocab.add_space_prefix = is_spm;
  CT_RETURN_IF_ERROR(tokenizer_internal::ReadBool(file, "tokenizer.ggml.add_space_prefix",
                                                  &vocab.add_space_prefix));

  // End of generation: eos, eot and the well-known end-of-turn texts. Like llama.cpp, such a
  // token is treated as control even when the converter typed it normal, so that it renders
  // only on request and is matched only with parse_special.
  if (eos >= 0) vocab.eog.push_back(eos);
  if (vocab.eot >= 0) vocab.eog.push_back(vocab.eot);
  for (std::string_view t : tokenizer_internal::kEogTexts) {
    const TokenId id = vocab.Find(t);
    if (id < 0) continue;
    vocab.eog.push_back(id);
    if (vocab.type[id] != tokenizer_internal::kTypeControl) {
      vocab.type[id] = tokenizer_internal::kTypeControl;
    }
  }
  std::sort(vocab.eog.begin(), vocab.eog.end());
  vocab.eog.erase(std::unique(vocab.eog.begin(), vocab.eog.end()), vocab.eog.end());

  for (size_t i = 0; i < n; ++i) {
    const uint8_t t = vocab.type[i];
    if (t == tokenizer_internal::kTypeControl || t == tokenizer_internal::kTypeUserDefined ||
        t == tokenizer_internal::kTypeUnknown) {
      vocab.specials.push_back(static_cast<TokenId>(i));
    }
  }
  std::stable_sort(vocab.specials.begin(), vocab.specials.end(), [&](TokenId a, TokenId b) {
    return vocab.text[a].size() > vocab.text[b].size();
  });

  if (is_spm) return tokenizer_internal::NewSpmTokenizer(std::move(vocab), bos, eos, add_bos);

  CT_ASSIGN_OR_RETURN(const std::vector<gguf::Value>* merge_values,
                      tokenizer_internal::RequiredArray(file, tokenizer_internal::kMergesKey,
                                                        gguf::ValueType::kString));
  std::vector<std::string_view> merges;
  merges.reserve(merge_values->size());
  for (const gguf::Value& v : *merge_values) merges.push_back(v.str);
  return tokenizer_internal::NewBpeTokenizer(std::move(vocab), pre, merges, bos, eos, add_bos);
}

std::string Tokenizer::Decode(const std::vector<TokenId>& ids, bool render_special) const {
  std::string out;
  // SentencePiece marks the start of the text with a space (add_space_prefix); the first
  // piece that produces text gives it back.
  bool strip_space = false;
  if (kind() == Kind::kSpm) {
    const auto* vt = dynamic_cast<const tokenizer_internal::VocabTokenizer*>(this);
    strip_space = vt != nullptr && vt->vocab().add_space_prefix;
  }
  for (TokenId id : ids) {
    std::string piece = TokenToPiece(id, render_special);
    if (piece.empty()) continue;
    if (strip_space && piece[0] == ' ') piece.erase(0, 1);
    strip_space = false;
    out += piece;
  }
  return out;
}

std::string StreamingDetokenizer::Push(TokenId id) {
  pending_ += tok_.TokenToPiece(id);
  // Find where the last character starts; hold it back if its bytes are not all here yet.
  const size_t n = pending_.size();
  size_t hold_from = n;
  for (size_t back = 1; back <= 4 && back <= n; ++back) {
    const auto b = static_cast<uint8_t>(pending_[n - back]);
    if ((b & 0xC0) == 0x80) continue;  // continuation byte: keep looking for the lead
    size_t need = 0;
    if ((b & 0xE0) == 0xC0) {
      need = 2;
    } else if ((b & 0xF0) == 0xE0) {
      need = 3;
    } else if ((b & 0xF8) == 0xF0) {
      need = 4;
    }
    if (need > back) hold_from = n - back;
    break;
  }
  std::string out = pending_.substr(0, hold_from);
  pending_.erase(0, hold_from);
  return out;
}

std::string StreamingDetokenizer::Flush() {
  std::string out;
  out.swap(pending_);
  return out;
}

}  // namespace cachette
