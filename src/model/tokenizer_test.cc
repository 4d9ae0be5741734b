#include "model/tokenizer.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/gguf.h"
#include "model/unicode.h"

namespace cachette {
namespace {

const std::string kShared = CACHETTE_SHARED_DIR;
const std::string kGpt2Vocab = kShared + "/testdata/tokenizer/ggml-vocab-gpt-2.gguf";
const std::string kSpmVocab = kShared + "/testdata/tokenizer/ggml-vocab-llama-spm.gguf";
const std::string kTinyVocab = kShared + "/models/cachette-tiny-vocab.gguf";

std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Loaded once per process: the vocabularies are immutable and shared by the tests.
struct Loaded {
  std::unique_ptr<gguf::GgufFile> file;
  std::unique_ptr<Tokenizer> tok;
};
const Tokenizer& Load(const std::string& path) {
  static auto* cache = new std::map<std::string, Loaded>();
  auto it = cache->find(path);
  if (it == cache->end()) {
    auto file = gguf::GgufFile::Open(path);
    EXPECT_TRUE(file.ok()) << path << ": " << file.status().ToString();
    if (!file.ok()) std::abort();
    auto tok = Tokenizer::FromGguf(**file);
    EXPECT_TRUE(tok.ok()) << path << ": " << tok.status().ToString();
    if (!tok.ok()) std::abort();
    it = cache->emplace(path, Loaded{std::move(*file), std::move(*tok)}).first;
  }
  return *it->second.tok;
}

std::string Join(const std::vector<TokenId>& ids) {
  std::string s;
  for (TokenId id : ids) {
    s.push_back(' ');
    s += std::to_string(id);
  }
  return s;
}

// ---------------------------------------------------------------------------------------------
// Golden vectors from llama.cpp's tests/test-tokenizer-0: cases separated by
// "\n__ggml_vocab_test__\n", tokenized with add_special = false and parse_special = false; the
// .out file has one line per case, " id id ...".

struct GoldenCase {
  std::string text;
  std::vector<TokenId> ids;
};

std::vector<GoldenCase> ReadGolden(const std::string& vocab_path) {
  const std::string inp = ReadFile(vocab_path + ".inp");
  const std::string outp = ReadFile(vocab_path + ".out");
  const std::string sep = "\n__ggml_vocab_test__\n";
  std::vector<std::string> texts;
  for (size_t pos = 0; pos < inp.size();) {
    const size_t next = inp.find(sep, pos);
    if (next == std::string::npos) {
      texts.push_back(inp.substr(pos));
      break;
    }
    texts.push_back(inp.substr(pos, next - pos));
    pos = next + sep.size();
  }
  std::vector<GoldenCase> cases;
  std::istringstream lines(outp);
  std::string line;
  for (size_t i = 0; std::getline(lines, line); ++i) {
    GoldenCase c;
    if (i < texts.size()) c.text = texts[i];
    std::istringstream ids(line);
    for (TokenId id; ids >> id;) c.ids.push_back(id);
    cases.push_back(std::move(c));
  }
  EXPECT_EQ(cases.size(), texts.size()) << vocab_path;
  return cases;
}

class GoldenTest : public ::testing::TestWithParam<std::string> {};

TEST_P(GoldenTest, MatchesLlamaCpp) {
  const std::string path = kShared + "/testdata/tokenizer/" + GetParam();
  const Tokenizer& tok = Load(path);
  const std::vector<GoldenCase> cases = ReadGolden(path);
  ASSERT_GT(cases.size(), 40u);
  int passed = 0;
  for (const GoldenCase& c : cases) {
    const std::vector<TokenId> got = tok.Encode(c.text, /*add_bos=*/false,
                                                /*parse_special=*/false);
    EXPECT_EQ(Join(got), Join(c.ids)) << "text: '" << c.text << "'";
    passed += got == c.ids;
  }
  std::printf("[ golden   ] %s: %d/%zu cases passed\n", GetParam().c_str(), passed, cases.size());
}

INSTANTIATE_TEST_SUITE_P(Vocabs, GoldenTest,
                         ::testing::Values("ggml-vocab-gpt-2.gguf", "ggml-vocab-llama-spm.gguf"),
                         [](const auto& info) {
                           return info.param.find("spm") != std::string::npos ? "LlamaSpm"
                                                                               : "Gpt2";
                         });

TEST(TokenizerTest, Gpt2VocabBasics) {
  const Tokenizer& tok = Load(kGpt2Vocab);
  EXPECT_EQ(tok.kind(), Tokenizer::Kind::kBpe);
  EXPECT_EQ(tok.vocab_size(), 50257);
  EXPECT_EQ(tok.TokenText(262), "Ġthe");
  EXPECT_EQ(tok.TokenToPiece(262), " the");
  EXPECT_EQ(tok.TokenToPiece(-1), "");
  EXPECT_EQ(tok.TokenToPiece(1 << 30), "");
  EXPECT_EQ(tok.TokenText(1 << 30), "");
  // <|endoftext|> is control: hidden unless rendered, matched only with parse_special.
  EXPECT_TRUE(tok.IsControl(50256));
  EXPECT_TRUE(tok.IsEog(50256));
  EXPECT_FALSE(tok.IsEog(262));
  EXPECT_EQ(tok.TokenToPiece(50256), "");
  EXPECT_EQ(tok.TokenToPiece(50256, /*render_special=*/true), "<|endoftext|>");
  EXPECT_EQ(tok.Encode("a<|endoftext|>b", false, true), (std::vector<TokenId>{64, 50256, 65}));
  EXPECT_NE(tok.Encode("a<|endoftext|>b", false, false).size(), 3u);
}

TEST(TokenizerTest, SpmVocabBasics) {
  const Tokenizer& tok = Load(kSpmVocab);
  EXPECT_EQ(tok.kind(), Tokenizer::Kind::kSpm);
  EXPECT_EQ(tok.bos(), 1);
  EXPECT_EQ(tok.eos(), 2);
  EXPECT_TRUE(tok.add_bos());
  EXPECT_TRUE(tok.IsEog(2));
  EXPECT_EQ(tok.TokenText(15043), "▁Hello");
  EXPECT_EQ(tok.TokenToPiece(15043), " Hello");
  EXPECT_EQ(tok.TokenToPiece(13), "\n");    // <0x0A>
  EXPECT_EQ(tok.TokenToPiece(1), "");       // <s>: control
  EXPECT_EQ(tok.TokenToPiece(1, true), "<s>");
  EXPECT_EQ(tok.Encode("Hello world", /*add_bos=*/true, false),
            (std::vector<TokenId>{1, 15043, 3186}));
  EXPECT_EQ(tok.Decode({1, 15043, 3186}), "Hello world");
  EXPECT_EQ(tok.Decode({1, 15043, 3186}, /*render_special=*/true), "<s> Hello world");
  // With parse_special, "<s>" in the text is BOS, and the text after it gets a space prefix.
  EXPECT_EQ(tok.Encode("<s>Hello", false, true), (std::vector<TokenId>{1, 15043}));
}

// ---------------------------------------------------------------------------------------------
// The bundled model's vocabulary: GPT-2 cut to 8192 tokens, <|endoftext|> = 8191 = BOS = EOS.

TEST(TokenizerTest, TinyVocab) {
  const Tokenizer& tok = Load(kTinyVocab);
  EXPECT_EQ(tok.kind(), Tokenizer::Kind::kBpe);
  EXPECT_EQ(tok.vocab_size(), 8192);
  EXPECT_EQ(tok.bos(), 8191);
  EXPECT_EQ(tok.eos(), 8191);
  EXPECT_TRUE(tok.add_bos());
  EXPECT_TRUE(tok.IsEog(8191));
  EXPECT_EQ(tok.Encode("<|endoftext|>", false, true), std::vector<TokenId>{8191});
  EXPECT_EQ(tok.Encode("x<|endoftext|>", true, true), (std::vector<TokenId>{8191, 87, 8191}));
  const std::vector<TokenId> plain = tok.Encode("<|endoftext|>", false, false);
  EXPECT_GT(plain.size(), 1u);
  EXPECT_EQ(tok.Decode(plain), "<|endoftext|>");
  for (const char* s : {"The history of the world", "  indented\n\tcode();\n", "Ünïcödé ✓ 🦙",
                        "1234567 + 89 = ?", ""}) {
    EXPECT_EQ(tok.Decode(tok.Encode(s, true, false)), s);
  }
}

// Prompt ids recorded by llama.cpp when it generated the model's golden continuations.
TEST(TokenizerTest, TinyVocabMatchesLlamaCppPrompts) {
  const Tokenizer& tok = Load(kTinyVocab);
  const auto golden = nlohmann::json::parse(ReadFile(kShared + "/models/cachette-tiny.golden.json"));
  int n = 0;
  for (const auto& c : golden["cases"]) {
    std::string text = c["text"];
    std::vector<TokenId> want = c["prompt_ids"];
    std::vector<TokenId> got;
    if (text.size() > 3 && text.compare(text.size() - 3, 3, "...") == 0) {
      // Long prompts are stored abbreviated: compare all but the last word's tokens.
      text.resize(text.size() - 3);
      got = tok.Encode(text, tok.add_bos(), false);
      ASSERT_GT(got.size(), 2u);
      got.resize(got.size() - 2);
      ASSERT_LE(got.size(), want.size());
      want.resize(got.size());
    } else {
      got = tok.Encode(text, tok.add_bos(), false);
    }
    EXPECT_EQ(Join(got), Join(want)) << text;
    ++n;
  }
  EXPECT_GT(n, 0);
}

// ---------------------------------------------------------------------------------------------
// Round trips on random text.

void AppendUtf8(uint32_t cp, std::string* s) { unicode::AppendUtf8(cp, s); }

// Random valid UTF-8 across many scripts, spaces, digits, punctuation and emoji (with ZWJ and
// variation selectors).
std::string RandomText(std::mt19937& rng, size_t n_chars) {
  static const std::vector<std::pair<uint32_t, uint32_t>> kRanges = {
      {0x20, 0x7E},     {0x20, 0x7E},     {0x20, 0x7E},     {'a', 'z'},       {'0', '9'},
      {0xA0, 0xFF},     {0x100, 0x17F},   {0x370, 0x3FF},   {0x400, 0x4FF},   {0x590, 0x5FF},
      {0x600, 0x6FF},   {0x900, 0x97F},   {0xE00, 0xE7F},   {0x1780, 0x17FF}, {0x3040, 0x30FF},
      {0x4E00, 0x9FFF}, {0xAC00, 0xD7A3}, {0x2000, 0x206F}, {0x300, 0x36F},   {0x1F300, 0x1F6FF},
      {0x1F900, 0x1F9FF}, {0x200D, 0x200D}, {0xFE0F, 0xFE0F}, {0x3000, 0x3000}, {'\t', '\r'},
      {0x10000, 0x10FFF},
  };
  std::string s;
  std::uniform_int_distribution<size_t> pick(0, kRanges.size() - 1);
  for (size_t i = 0; i < n_chars; ++i) {
    const auto [lo, hi] = kRanges[pick(rng)];
    uint32_t cp = std::uniform_int_distribution<uint32_t>(lo, hi)(rng);
    if (cp >= 0xD800 && cp <= 0xDFFF) cp = 'x';
    AppendUtf8(cp, &s);
  }
  return s;
}

std::string RandomBytes(std::mt19937& rng, size_t n) {
  std::string s(n, '\0');
  for (char& c : s) c = static_cast<char>(rng() & 0xFF);
  return s;
}

class RoundTripTest : public ::testing::TestWithParam<std::string> {};

TEST_P(RoundTripTest, RandomUtf8AndBytes) {
  const Tokenizer& tok = Load(GetParam());
  std::mt19937 rng(1234);
  for (int i = 0; i < 300; ++i) {
    const std::string text = RandomText(rng, 1 + rng() % 60);
    const std::vector<TokenId> ids = tok.Encode(text, false, false);
    // SentencePiece adds a leading space when encoding and Decode removes it again, so the
    // round trip is exact for both kinds.
    ASSERT_EQ(tok.Decode(ids), text) << "case " << i;
    // With BOS (a control token that renders as nothing).
    ASSERT_EQ(tok.Decode(tok.Encode(text, true, false)), text) << "case " << i;
  }
  // Invalid UTF-8: tokenized byte-wise, still exact.
  for (int i = 0; i < 300; ++i) {
    const std::string bytes = RandomBytes(rng, rng() % 40);
    ASSERT_EQ(tok.Decode(tok.Encode(bytes, false, true)), bytes) << "case " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Vocabs, RoundTripTest,
                         ::testing::Values(kGpt2Vocab, kSpmVocab, kTinyVocab),
                         [](const auto& info) {
                           if (info.param.find("spm") != std::string::npos) return "LlamaSpm";
                           if (info.param.find("tiny") != std::string::npos) return "Tiny";
                           return "Gpt2";
                         });

TEST(TokenizerTest, InvalidUtf8NeverCrashes) {
  for (const std::string& path : {kGpt2Vocab, kSpmVocab}) {
    const Tokenizer& tok = Load(path);
    for (const std::string& s :
         {std::string("\xff\xfe\xfd"), std::string("\xc3"), std::string("a\xe2\x82"),
          std::string("\xf0\x9f\xa6"), std::string("\xed\xa0\x80"), std::string("\xc0\xaf"),
          std::string("'\x80s"), std::string(" \xf4\x90\x80\x80 "), std::string(1, '\0')}) {
      const auto ids = tok.Encode(s, true, true);
      EXPECT_EQ(tok.Decode(ids), s);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Streaming detokenization never splits a UTF-8 character.

bool IsValidUtf8(std::string_view s) {
  for (const unicode::Unit& u : unicode::Decode(s)) {
    if (u.cp == unicode::Unit::kInvalid) return false;
  }
  return true;
}

TEST(StreamingDetokenizerTest, HoldsPartialCharacters) {
  for (const std::string& path : {kGpt2Vocab, kSpmVocab, kTinyVocab}) {
    const Tokenizer& tok = Load(path);
    const std::string text = "llama 🦙 and 😶‍🌫️, Ünïcödé, 我想在apple工作, កាន់តែ";
    const std::vector<TokenId> ids = tok.Encode(text, true, false);
    // The emoji alone must come out as several byte tokens somewhere.
    ASSERT_GT(ids.size(), 20u);
    StreamingDetokenizer detok(tok);
    std::string streamed;
    int empty_pushes = 0;
    for (TokenId id : ids) {
      const std::string part = detok.Push(id);
      EXPECT_TRUE(IsValidUtf8(part)) << path << ": token " << id;
      empty_pushes += part.empty();
      streamed += part;
    }
    streamed += detok.Flush();
    EXPECT_GT(empty_pushes, 1) << path;  // some tokens held back half a character
    // Streaming keeps SentencePiece's leading space (there is no "first token" in a stream).
    EXPECT_EQ(streamed, path == kSpmVocab ? std::string(" ").append(text) : text) << path;
  }
}

TEST(StreamingDetokenizerTest, SpmByteTokensAndFlush) {
  const Tokenizer& tok = Load(kSpmVocab);
  // 🦙 = F0 9F A6 99 = <0xF0> <0x9F> <0xA6> <0x99> = 243 162 169 156.
  StreamingDetokenizer detok(tok);
  EXPECT_EQ(detok.Push(243), "");
  EXPECT_EQ(detok.Push(162), "");
  EXPECT_EQ(detok.Push(169), "");
  EXPECT_EQ(detok.Push(156), "🦙");
  EXPECT_EQ(detok.Push(243), "");
  EXPECT_EQ(detok.Flush(), "\xF0");
  EXPECT_EQ(detok.Flush(), "");
  // A stray continuation byte is passed through rather than held forever.
  EXPECT_EQ(detok.Push(131), "\x80");  // <0x80>
}

// ---------------------------------------------------------------------------------------------
// Pre-tokenizer splitting, worked by hand from the regexes.

std::vector<std::string> Split(unicode::PreTokenizer kind, std::string_view text) {
  std::vector<std::string> out;
  for (const auto& s : unicode::PreTokenize(kind, text)) {
    out.emplace_back(text.substr(s.begin, s.end - s.begin));
  }
  return out;
}

using V = std::vector<std::string>;
using unicode::PreTokenizer;

TEST(PreTokenizerTest, Gpt2) {
  EXPECT_EQ(Split(PreTokenizer::kGpt2, "Hello world"), (V{"Hello", " world"}));
  EXPECT_EQ(Split(PreTokenizer::kGpt2, "I'm can't WE'RE"),
            (V{"I", "'m", " can", "'t", " WE", "'", "RE"}));  // case-sensitive contractions
  EXPECT_EQ(Split(PreTokenizer::kGpt2, "12345 abc"), (V{"12345", " abc"}));
  EXPECT_EQ(Split(PreTokenizer::kGpt2, "   Hello"), (V{"  ", " Hello"}));
  EXPECT_EQ(Split(PreTokenizer::kGpt2, "a  \n\n"), (V{"a", "  \n\n"}));
  EXPECT_EQ(Split(PreTokenizer::kGpt2, "x !!! y"), (V{"x", " !!!", " y"}));
  EXPECT_EQ(Split(PreTokenizer::kGpt2, "\tab"), (V{"\t", "ab"}));
  EXPECT_EQ(Split(PreTokenizer::kGpt2, "нещо 3½"), (V{"нещо", " 3½"}));  // ½ is \p{N}
  EXPECT_EQ(Split(PreTokenizer::kGpt2, ""), V{});
}

TEST(PreTokenizerTest, Llama3) {
  // Digits in groups of 1-3.
  EXPECT_EQ(Split(PreTokenizer::kLlama3, "1234567"), (V{"123", "456", "7"}));
  EXPECT_EQ(Split(PreTokenizer::kLlama3, "a12 3"), (V{"a", "12", " ", "3"}));
  // Case-insensitive contractions.
  EXPECT_EQ(Split(PreTokenizer::kLlama3, "I'M WE'RE it's"), (V{"I", "'M", " WE", "'RE", " it", "'s"}));
  // One non-letter, non-digit, non-newline character may lead a word.
  EXPECT_EQ(Split(PreTokenizer::kLlama3, "\tHello (world)"), (V{"\tHello", " (", "world", ")"}));
  EXPECT_EQ(Split(PreTokenizer::kLlama3, "x.y"), (V{"x", ".y"}));
  // Punctuation swallows following newlines.
  EXPECT_EQ(Split(PreTokenizer::kLlama3, "end.\n\nNext"), (V{"end", ".\n\n", "Next"}));
  // Whitespace up to the last newline is one piece; a space before a word stays with it.
  EXPECT_EQ(Split(PreTokenizer::kLlama3, "a \n  b"), (V{"a", " \n", " ", " b"}));
  EXPECT_EQ(Split(PreTokenizer::kLlama3, "\n\n\n"), (V{"\n\n\n"}));
  EXPECT_EQ(Split(PreTokenizer::kLlama3, "   Hello"), (V{"  ", " Hello"}));
  EXPECT_EQ(Split(PreTokenizer::kLlama3, "ab   "), (V{"ab", "   "}));
  EXPECT_EQ(Split(PreTokenizer::kLlama3, "\r\nx"), (V{"\r\n", "x"}));
  EXPECT_EQ(Split(PreTokenizer::kLlama3, "\nx"), (V{"\n", "x"}));
}

TEST(PreTokenizerTest, Qwen2) {
  // Single digits.
  EXPECT_EQ(Split(PreTokenizer::kQwen2, "1234"), (V{"1", "2", "3", "4"}));
  EXPECT_EQ(Split(PreTokenizer::kQwen2, "x 42."), (V{"x", " ", "4", "2", "."}));
  EXPECT_EQ(Split(PreTokenizer::kQwen2, "I'LL go"), (V{"I", "'LL", " go"}));
  EXPECT_EQ(Split(PreTokenizer::kQwen2, "你好，世界\n"), (V{"你好", "，世界", "\n"}));
}

TEST(PreTokenizerTest, PiecesCoverInput) {
  std::mt19937 rng(7);
  for (auto kind : {PreTokenizer::kGpt2, PreTokenizer::kLlama3, PreTokenizer::kQwen2}) {
    for (int i = 0; i < 200; ++i) {
      const std::string text = i % 2 ? RandomText(rng, 40) : RandomBytes(rng, 40);
      uint32_t pos = 0;
      for (const auto& s : unicode::PreTokenize(kind, text)) {
        ASSERT_EQ(s.begin, pos);
        ASSERT_LT(s.begin, s.end);
        pos = s.end;
      }
      ASSERT_EQ(pos, text.size());
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Synthetic vocabularies built in memory.

struct MemGguf {
  std::vector<std::byte> bytes;
  std::unique_ptr<gguf::GgufFile> file;
};

MemGguf Build(const gguf::GgufWriter& w) {
  MemGguf m;
  m.bytes = w.Serialize();
  auto f = gguf::GgufFile::FromMemory(m.bytes);
  EXPECT_TRUE(f.ok()) << f.status().ToString();
  if (f.ok()) m.file = std::move(*f);
  return m;
}

// A tiny SentencePiece vocab: <unk> <s> </s>, the bytes, and a few pieces with scores.
gguf::GgufWriter SpmWriter(bool with_bytes) {
  std::vector<std::string> tokens = {"<unk>", "<s>", "</s>"};
  std::vector<float> scores = {0, 0, 0};
  std::vector<int32_t> types = {2, 3, 3};
  if (with_bytes) {
    for (int b = 0; b < 256; ++b) {
      char name[8];
      std::snprintf(name, sizeof(name), "<0x%02X>", b);
      tokens.push_back(name);
      scores.push_back(0);
      types.push_back(6);
    }
  }
  const std::vector<std::pair<std::string, float>> pieces = {
      {"▁", -1}, {"a", -2}, {"b", -2}, {"c", -2}, {"ab", -5}, {"bc", -3}, {"▁a", -4},
      {"▁ab", -6}, {"<|im_end|>", 0}, {"<tool>", 0}};
  for (const auto& [t, s] : pieces) {
    tokens.push_back(t);
    scores.push_back(s);
    types.push_back(t == "<|im_end|>" ? 1 : (t == "<tool>" ? 4 : 1));
  }
  gguf::GgufWriter w;
  w.AddString("tokenizer.ggml.model", "llama");
  w.AddStringArray("tokenizer.ggml.tokens", tokens);
  w.AddFloat32Array("tokenizer.ggml.scores", scores);
  w.AddInt32Array("tokenizer.ggml.token_type", types);
  return w;
}

TEST(SpmTest, MergesByScoreAndFallsBackToBytes) {
  MemGguf m = Build(SpmWriter(/*with_bytes=*/true));
  ASSERT_TRUE(m.file);
  auto tok = Tokenizer::FromGguf(*m.file);
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  const Tokenizer& t = **tok;
  auto id = [&](std::string_view s) {
    for (TokenId i = 0; i < t.vocab_size(); ++i) {
      if (t.TokenText(i) == s) return i;
    }
    return -1;
  };
  // "▁abc": pairs ▁a(-4), ab(-5), bc(-3): bc first, then ▁a, then no "▁abc" -> [▁a, bc].
  EXPECT_EQ(t.Encode("abc", false, false), (std::vector<TokenId>{id("▁a"), id("bc")}));
  // "▁ab": ▁a(-4) beats ab(-5), then ▁ab(-6).
  EXPECT_EQ(t.Encode("ab", false, false), std::vector<TokenId>{id("▁ab")});
  // Unknown character: UTF-8 bytes as <0xXX>.
  EXPECT_EQ(t.Encode("é", false, false),
            (std::vector<TokenId>{id("▁"), id("<0xC3>"), id("<0xA9>")}));
  EXPECT_EQ(t.Decode(t.Encode("é", false, false)), "é");
  // User-defined tokens are split out even without parse_special; the text after a special
  // token gets the space prefix again.
  EXPECT_EQ(t.Encode("a<tool>b", false, false),
            (std::vector<TokenId>{id("▁a"), id("<tool>"), id("▁"), id("b")}));
  // <|im_end|> is typed normal but is an end-of-turn text: control, and EOG.
  EXPECT_TRUE(t.IsEog(id("<|im_end|>")));
  EXPECT_TRUE(t.IsControl(id("<|im_end|>")));
  EXPECT_EQ(t.Encode("<|im_end|>", false, true), std::vector<TokenId>{id("<|im_end|>")});
  EXPECT_GT(t.Encode("<|im_end|>", false, false).size(), 1u);
}

TEST(SpmTest, UnknownTokenWithoutByteTokens) {
  MemGguf m = Build(SpmWriter(/*with_bytes=*/false));
  ASSERT_TRUE(m.file);
  auto tok = Tokenizer::FromGguf(*m.file);
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  // "é" is two bytes, each unknown.
  EXPECT_EQ((*tok)->Encode("é", false, false).size(), 3u);
  EXPECT_EQ((*tok)->Encode("é", false, false)[1], 0);
}

// A minimal byte-level BPE vocab: the 256 byte stand-ins, a few merges, special tokens.
gguf::GgufWriter BpeWriter() {
  std::vector<std::string> tokens;
  for (uint32_t b = 0, next = 256; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
    std::string s;
    unicode::AppendUtf8(printable ? b : next++, &s);
    tokens.push_back(s);
  }
  for (const char* t : {"ab", "Ġa", "Ġab", "<|endoftext|>", "<|end|>", "<|endoftext|>x"}) {
    tokens.push_back(t);
  }
  std::vector<int32_t> types(tokens.size(), 1);
  types[tokens.size() - 3] = 3;
  types[tokens.size() - 2] = 3;
  types[tokens.size() - 1] = 3;
  gguf::GgufWriter w;
  w.AddString("tokenizer.ggml.model", "gpt2");
  w.AddString("tokenizer.ggml.pre", "gpt-2");
  w.AddStringArray("tokenizer.ggml.tokens", tokens);
  w.AddInt32Array("tokenizer.ggml.token_type", types);
  w.AddStringArray("tokenizer.ggml.merges", {"a b", "Ġ a", "Ġa b"});
  w.AddUint32("tokenizer.ggml.bos_token_id", 259);
  w.AddUint32("tokenizer.ggml.eos_token_id", 259);
  return w;
}

TEST(BpeTest, SyntheticVocab) {
  MemGguf m = Build(BpeWriter());
  ASSERT_TRUE(m.file);
  auto tok = Tokenizer::FromGguf(*m.file);
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  const Tokenizer& t = **tok;
  // " ab": merges by rank: "a b" (0) first, then no "Ġ ab" -> [Ġ, ab].
  // Token i < 256 is byte i's stand-in; "ab" = 256, "Ġa" = 257, "Ġab" = 258.
  EXPECT_EQ(t.Encode(" ab", false, false), (std::vector<TokenId>{32, 256}));
  EXPECT_EQ(t.Encode(" ac", false, false), (std::vector<TokenId>{257, 'c'}));
  EXPECT_EQ(t.Encode("ab", true, false), (std::vector<TokenId>{259, 256}));
  // Longest special token first: "<|endoftext|>x" wins over "<|endoftext|>".
  EXPECT_EQ(t.Encode("<|endoftext|>x<|end|>", false, true), (std::vector<TokenId>{261, 260}));
  EXPECT_EQ(t.Encode("<|endoftext|><|end|>", false, true), (std::vector<TokenId>{259, 260}));
  EXPECT_TRUE(t.IsEog(259));
  EXPECT_TRUE(t.IsEog(260));
  EXPECT_FALSE(t.IsEog(261));
}

// Long words must not be quadratic; also checks a 100 KB single "word".
TEST(BpeTest, LongWord) {
  const Tokenizer& tok = Load(kGpt2Vocab);
  const std::string word(100000, 'a');
  const auto t0 = std::chrono::steady_clock::now();
  const auto ids = tok.Encode(word, false, false);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(tok.Decode(ids), word);
  EXPECT_LT(s, 2.0);
}

// ---------------------------------------------------------------------------------------------
// Bad vocabularies: kInvalidArgument naming the key.

void ExpectInvalid(const gguf::GgufWriter& w, const std::string& key) {
  MemGguf m = Build(w);
  ASSERT_TRUE(m.file);
  auto tok = Tokenizer::FromGguf(*m.file);
  ASSERT_FALSE(tok.ok()) << "expected an error naming " << key;
  EXPECT_EQ(tok.status().code(), StatusCode::kInvalidArgument) << tok.status().ToString();
  EXPECT_NE(tok.status().message().find(key), std::string::npos) << tok.status().ToString();
}

TEST(BadVocabTest, NoTokenizerKeys) {
  gguf::GgufWriter w;
  w.AddString("general.architecture", "llama");
  ExpectInvalid(w, "tokenizer.ggml.model");
}

TEST(BadVocabTest, MissingTokens) {
  gguf::GgufWriter w;
  w.AddString("tokenizer.ggml.model", "llama");
  ExpectInvalid(w, "tokenizer.ggml.tokens");
}

TEST(BadVocabTest, UnknownModel) {
  gguf::GgufWriter v;
  v.AddString("tokenizer.ggml.model", "wordpiece");
  v.AddStringArray("tokenizer.ggml.tokens", {"a", "b"});
  ExpectInvalid(v, "tokenizer.ggml.model");
}

TEST(BadVocabTest, UnknownPre) {
  gguf::GgufWriter w;
  w.AddString("tokenizer.ggml.model", "gpt2");
  w.AddString("tokenizer.ggml.pre", "klingon");
  w.AddStringArray("tokenizer.ggml.tokens", {"a", "b", "ab"});
  w.AddStringArray("tokenizer.ggml.merges", {"a b"});
  ExpectInvalid(w, "tokenizer.ggml.pre");
}

TEST(BadVocabTest, MismatchedScores) {
  gguf::GgufWriter w;
  w.AddString("tokenizer.ggml.model", "llama");
  w.AddStringArray("tokenizer.ggml.tokens", {"<unk>", "<s>", "</s>", "a"});
  w.AddFloat32Array("tokenizer.ggml.scores", {0, 0, 0});
  ExpectInvalid(w, "tokenizer.ggml.scores");
}

TEST(BadVocabTest, MismatchedTypes) {
  gguf::GgufWriter w;
  w.AddString("tokenizer.ggml.model", "llama");
  w.AddStringArray("tokenizer.ggml.tokens", {"<unk>", "<s>", "</s>", "a"});
  w.AddInt32Array("tokenizer.ggml.token_type", {2, 3, 3, 1, 1});
  ExpectInvalid(w, "tokenizer.ggml.token_type");
}

TEST(BadVocabTest, WrongArrayType) {
  gguf::GgufWriter w;
  w.AddString("tokenizer.ggml.model", "llama");
  w.AddInt32Array("tokenizer.ggml.tokens", {1, 2, 3});
  ExpectInvalid(w, "tokenizer.ggml.tokens");
}

TEST(BadVocabTest, BosOutOfRange) {
  gguf::GgufWriter w;
  w.AddString("tokenizer.ggml.model", "llama");
  w.AddStringArray("tokenizer.ggml.tokens", {"<unk>", "<s>", "</s>", "a"});
  w.AddUint32("tokenizer.ggml.bos_token_id", 4);
  ExpectInvalid(w, "tokenizer.ggml.bos_token_id");
}

TEST(BadVocabTest, EosOutOfRange) {
  gguf::GgufWriter w;
  w.AddString("tokenizer.ggml.model", "llama");
  w.AddStringArray("tokenizer.ggml.tokens", {"<unk>", "<s>", "</s>", "a"});
  w.AddInt32("tokenizer.ggml.eos_token_id", -1);
  ExpectInvalid(w, "tokenizer.ggml.eos_token_id");
}

TEST(BadVocabTest, MissingMerges) {
  gguf::GgufWriter w;
  w.AddString("tokenizer.ggml.model", "gpt2");
  w.AddStringArray("tokenizer.ggml.tokens", {"a", "b"});
  ExpectInvalid(w, "tokenizer.ggml.merges");
}

TEST(BadVocabTest, MergeNamesUnknownToken) {
  gguf::GgufWriter w;
  w.AddString("tokenizer.ggml.model", "gpt2");
  w.AddStringArray("tokenizer.ggml.tokens", {"a", "b", "ab"});
  w.AddStringArray("tokenizer.ggml.merges", {"a b", "a c"});
  ExpectInvalid(w, "tokenizer.ggml.merges");
  gguf::GgufWriter v;
  v.AddString("tokenizer.ggml.model", "gpt2");
  v.AddStringArray("tokenizer.ggml.tokens", {"a", "b", "ab"});
  v.AddStringArray("tokenizer.ggml.merges", {"ab"});
  ExpectInvalid(v, "tokenizer.ggml.merges");
}

// SentencePiece merges word by word when no token can span a word start; its naive twin is the
// same vocabulary plus one token that spans one ("\x01▁", never in the text), which forces the
// whole-text merge. Both must agree.
TEST(SpmTest, WordSplitMatchesWholeTextMerge) {
  auto file = gguf::GgufFile::Open(kSpmVocab);
  ASSERT_TRUE(file.ok());
  gguf::GgufWriter w;
  for (const gguf::KeyValue& kv : (*file)->metadata()) {
    const std::string key(kv.key);
    if (key.rfind("tokenizer.ggml.", 0) != 0) continue;
    if (key == "tokenizer.ggml.tokens") {
      std::vector<std::string> tokens;
      for (const auto& v : kv.value.array) tokens.emplace_back(v.str);
      tokens.push_back("\x01▁");
      w.AddStringArray(key, tokens);
    } else if (key == "tokenizer.ggml.scores") {
      std::vector<float> scores;
      for (const auto& v : kv.value.array) scores.push_back(static_cast<float>(v.f64));
      scores.push_back(-1e9f);
      w.AddFloat32Array(key, scores);
    } else if (key == "tokenizer.ggml.token_type") {
      std::vector<int32_t> types;
      for (const auto& v : kv.value.array) types.push_back(static_cast<int32_t>(v.i64));
      types.push_back(1);
      w.AddInt32Array(key, types);
    } else {
      w.AddValue(key, kv.value);
    }
  }
  MemGguf m = Build(w);
  ASSERT_TRUE(m.file);
  auto naive = Tokenizer::FromGguf(*m.file);
  ASSERT_TRUE(naive.ok()) << naive.status().ToString();
  const Tokenizer& fast = Load(kSpmVocab);
  std::string text = ReadFile(kShared + "/eval/heldout-text.txt").substr(0, 100000);
  std::mt19937 rng(99);
  text += RandomText(rng, 3000);
  text += "  double  spaces   and\ttabs \n\n end ";
  EXPECT_EQ(fast.Encode(text, true, false), (*naive)->Encode(text, true, false));
}

// ---------------------------------------------------------------------------------------------
// Speed: 1 MB of English.

// ---------------------------------------------------------------------------------------------
// Pathological inputs: bounded time and memory (issue 9, item 4).

TEST(CutAtCharBoundaryTest, NeverSplitsACharacterOfValidUtf8) {
  struct Case {
    std::string s;
    size_t max_bytes;
    size_t cut;
  };
  const Case cases[] = {
      {"abcdef", 4, 4},
      {"abc", 4, 3},                      // short enough: no cut
      {"ab\xc3\xa9z", 3, 2},              // é would straddle the cut
      {"a\xe2\x96\x81zz", 2, 1},          // U+2581 (3 bytes)
      {"a\xe2\x96\x81zz", 4, 4},          // the cut falls after it
      {"\xf0\x9f\xa6\x99\xf0\x9f\xa6\x99", 6, 4},  // two 4-byte characters
      {"\x80\x80\x80\x80\x80\x80", 4, 4},  // continuation bytes only: cut anyway
  };
  for (const Case& c : cases) {
    EXPECT_EQ(tokenizer_internal::CutAtCharBoundary(c.s, c.max_bytes), c.cut) << c.s;
  }
}

// A word far longer than kMaxMergeRun is merged piece by piece: its tokens are those of its
// pieces, each tokenized alone (so the merge state never holds the whole word), and the text
// still round-trips.
TEST(TokenizerTest, OverlongWordIsMergedInBoundedPieces) {
  const size_t kRun = tokenizer_internal::kMaxMergeRun;
  const std::string word(3 * kRun + 123, 'a');
  const Tokenizer& tok = Load(kGpt2Vocab);
  std::vector<TokenId> expected;
  for (size_t off = 0; off < word.size(); off += kRun) {
    const auto part = tok.Encode(word.substr(off, kRun), false, false);
    expected.insert(expected.end(), part.begin(), part.end());
  }
  const auto ids = tok.Encode(word, false, false);
  EXPECT_EQ(ids, expected);
  EXPECT_EQ(tok.Decode(ids), word);
  // A multi-byte character at the cut stays whole (no byte-fallback pieces of it).
  std::string accents;
  while (accents.size() < 2 * kRun) accents += "\xc3\xa9";  // é é é ...
  accents = "x" + accents;  // shifts every character so one straddles kRun
  EXPECT_EQ(tok.Decode(tok.Encode(accents, false, false)), accents);
  for (const std::string& path : {kSpmVocab, kTinyVocab}) {
    const Tokenizer& t = Load(path);
    EXPECT_EQ(t.Decode(t.Encode(word, false, false)), word) << path;
    EXPECT_EQ(t.Decode(t.Encode(accents, false, false)), accents) << path;
  }
}

// Input of about `n` bytes for each pathological shape. `special` is the text of one of the
// vocabulary's control tokens (which with parse_special splits the text into fragments).
std::string Pathological(int shape, size_t n, const std::string& special) {
  const size_t half = special.size() / 2;
  const std::string units[] = {
      "a",                                  // one word with no spaces
      "<|im_start|>",                       // chat-template text (a special in some vocabs)
      special,                              // repeated special-token text
      special.substr(0, half) + special + special.substr(half),  // nested special text
      "\xff\xfe",                           // invalid UTF-8
      "\xe2\x96\x81",                       // U+2581, SentencePiece's own space mark
      " ",                                  // one run of spaces
      "\n \n\t",                            // whitespace with line breaks
  };
  std::string s;
  s.reserve(n + 64);
  while (s.size() < n) s += units[shape];
  return s;
}
constexpr int kShapes = 8;
bool IsSpecialShape(int shape) { return shape >= 1 && shape <= 3; }

// The fastest of two runs: noise (another process, a page fault) only ever adds time.
double FastestEncodeSeconds(const Tokenizer& tok, const std::string& text, bool parse_special) {
  double best = 1e9;
  for (int i = 0; i < 2; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    const auto ids = tok.Encode(text, false, parse_special);
    best = std::min(
        best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    EXPECT_FALSE(ids.empty());
  }
  return best;
}

// Not a timing test: only the ratio matters. Linear (or n log n) work takes ~4x for 4x the
// input; quadratic work takes ~16x. The bound of 10x leaves room for a noisy machine; each size
// is the fastest of two runs, and the small input is timed alone first so a quadratic
// regression fails quickly instead of running for minutes. The inputs are large enough
// (256 KiB) that both sizes miss the caches alike. Noise only ever adds time, so a ratio over
// the bound is measured again (up to kAttempts times, keeping each size's fastest): under
// ctest -j2 one 1 MiB run once took 13x its 256 KiB run (SPM, shape 2, CI at 4950664) on a
// tokenizer that measures linear alone (106-125 ns a byte from 64 KiB to 4 MiB). Quadratic
// work stays at 16x however often it is timed. Skipped under sanitizers, whose overhead is not
// proportional to the work.
TEST(TokenizerTest, PathologicalInputIsNotQuadratic) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "ratios are meaningless under sanitizers";
#endif
  const size_t kSmall = 256 << 10;
  constexpr int kAttempts = 4;
  // One vocabulary per algorithm: the bundled model's BPE (qwen2 pre-tokenizer) and SPM.
  for (const std::string& path : {kTinyVocab, kSpmVocab}) {
    const Tokenizer& tok = Load(path);
    const std::string special(tok.TokenText(tok.eos()));
    for (int shape = 0; shape < kShapes; ++shape) {
      // parse_special changes the work only for the special-token shapes.
      for (bool parse_special : {false, true}) {
        if (parse_special && !IsSpecialShape(shape)) continue;
        const std::string small_text = Pathological(shape, kSmall, special);
        const std::string large_text = Pathological(shape, 4 * kSmall, special);
        double small = FastestEncodeSeconds(tok, small_text, parse_special);
        ASSERT_LT(small, 5.0) << path << " shape " << shape;
        double large = 1e9;
        // The floor: for the cheap shapes (~20 ns a byte) the 256 KiB working set fits the
        // caches and the 1 MiB one does not, which alone gives ~12x. Any quadratic term at
        // 256 KiB (3.4e10 pair steps; even a memmove of the rest per token moves 34 GB) costs
        // seconds, so a 20 ms floor keeps the test able to fail.
        for (int attempt = 0; attempt < kAttempts; ++attempt) {
          if (attempt > 0) small = std::min(small, FastestEncodeSeconds(tok, small_text,
                                                                        parse_special));
          large = std::min(large, FastestEncodeSeconds(tok, large_text, parse_special));
          if (large < 10 * std::max(small, 20e-3)) break;
        }
        EXPECT_LT(large, 10 * std::max(small, 20e-3))
            << path << " shape " << shape << " parse_special " << parse_special << ": "
            << small * 1e3 << " ms for 256 KiB, " << large * 1e3 << " ms for 1 MiB, fastest of "
            << kAttempts << " attempts";
      }
    }
  }
}

// The shapes above at 16 MiB (one word) and 1 MiB (special-token text) finish, and round-trip.
TEST(TokenizerTest, SixteenMebibyteWordAndOneMebibyteOfSpecialsFinish) {
  const Tokenizer& tok = Load(kTinyVocab);
  const std::string special(tok.TokenText(tok.eos()));
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  const size_t kWord = 2 << 20;  // sanitizers are ~5x slower; the shape is what matters
#else
  const size_t kWord = 16 << 20;
#endif
  const std::string word = Pathological(0, kWord, special);
  EXPECT_EQ(tok.Decode(tok.Encode(word, false, false)), word);
  for (int shape : {1, 2, 3}) {
    const std::string text = Pathological(shape, 1 << 20, special);
    const auto ids = tok.Encode(text, false, true);
    if (shape == 2) {  // nothing but the special token, once per copy
      EXPECT_EQ(ids, std::vector<TokenId>(text.size() / special.size(), tok.eos()));
    }
    EXPECT_EQ(tok.Decode(tok.Encode(text, false, false)), text);
  }
}

TEST(TokenizerSpeedTest, OneMegabyteOfEnglish) {
  std::string text = ReadFile(kShared + "/eval/heldout-text.txt");
  ASSERT_GE(text.size(), 1000000u);
  text.resize(1000000);
  for (const std::string& path : {kGpt2Vocab, kTinyVocab, kSpmVocab}) {
    const Tokenizer& tok = Load(path);
    const auto t0 = std::chrono::steady_clock::now();
    const std::vector<TokenId> ids = tok.Encode(text, false, false);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("[ speed    ] %s: 1 MB -> %zu tokens in %.1f ms (%.1f MB/s)\n",
                path.substr(path.rfind('/') + 1).c_str(), ids.size(), s * 1e3, 1.0 / s);
    EXPECT_EQ(tok.Decode(ids), text);
#if !defined(__SANITIZE_ADDRESS__)
    EXPECT_LT(s, 1.0);
#endif
  }
}

}  // namespace
}  // namespace cachette
