// The eval harness against direct computations: perplexity equals exp(mean NLL) from the
// engine's logits; the raw codec changes nothing; the retrieval scorer's rules; JSONL errors;
// the window and item rules the policy evaluation shares.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "cache/codecs/codec.h"
#include "eval/kv_roundtrip.h"
#include "eval/perplexity.h"
#include "eval/rag.h"
#include "eval/retrieval.h"
#include "eval/synthetic.h"
#include "model/synth.h"

namespace cachette::eval {
namespace {

namespace fs = std::filesystem;
const std::string kShared = CACHETTE_SHARED_DIR;

// A tiny random-weight llama (synthesized once per process).
const Model& TinyModel() {
  static std::unique_ptr<Model> model = [] {
    const fs::path dir =
        fs::temp_directory_path() / ("cachette_eval_test_" + std::to_string(getpid()));
    fs::create_directories(dir);
    const std::string path = (dir / "tiny.gguf").string();
    SynthOptions o;
    o.shape = "tiny";
    o.vocab_path = kShared + "/testdata/tokenizer/ggml-vocab-gpt-2.gguf";
    Status s = SynthesizeModel(o, path);
    EXPECT_TRUE(s.ok()) << s.ToString();
    auto m = Model::Load(path);
    EXPECT_TRUE(m.ok()) << m.status().ToString();
    fs::remove_all(dir);
    return std::move(*m);
  }();
  return *model;
}

std::vector<TokenId> RandomTokens(int n, int vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<TokenId> t(n);
  for (auto& x : t) x = static_cast<TokenId>(rng() % vocab);
  return t;
}

// The reference: each window prefilled in one call with every position's logits, NLL of the
// second half computed here.
double DirectPerplexity(Engine& engine, const std::vector<TokenId>& tokens, int ctx, TokenId bos) {
  const int nv = engine.model().config().n_vocab;
  double nll = 0;
  int64_t n = 0;
  for (size_t w = 0; (w + 1) * ctx <= tokens.size(); ++w) {
    std::vector<TokenId> win(tokens.begin() + w * ctx, tokens.begin() + (w + 1) * ctx);
    win[0] = bos;
    auto kv = engine.NewSequence(ctx);
    std::vector<float> logits(static_cast<size_t>(ctx) * nv);
    Engine::Item item{kv.get(), win, Engine::Logits::kAll, logits.data()};
    EXPECT_TRUE(engine.Forward(std::span<Engine::Item>(&item, 1)).ok());
    for (int j = ctx / 2; j < ctx - 1; ++j) {
      const float* l = logits.data() + static_cast<size_t>(j) * nv;
      double mx = l[0], sum = 0;
      for (int v = 0; v < nv; ++v) mx = std::max<double>(mx, l[v]);
      for (int v = 0; v < nv; ++v) sum += std::exp(l[v] - mx);
      nll += std::log(sum) + mx - l[win[j + 1]];
      ++n;
    }
  }
  return std::exp(nll / static_cast<double>(n));
}

TEST(PerplexityTest, EqualsExpMeanNllFromEngineLogits) {
  const Model& model = TinyModel();
  Engine engine(model, EngineOptions{});
  const auto tokens = RandomTokens(3 * 48 + 7, model.config().n_vocab, 11);
  PerplexityOptions o;
  o.ctx = 48;
  o.bos = model.tokenizer().bos();
  auto r = EvalPerplexity(engine, tokens, o);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->n_windows, 3);  // the trailing 7 tokens make no window
  EXPECT_EQ(r->figures[0].n_scored, 3 * (48 - 24 - 1));
  const double direct = DirectPerplexity(engine, tokens, 48, o.bos);
  EXPECT_NEAR(r->figures[0].ppl(), direct, 1e-5 * direct);
}

TEST(PerplexityTest, LosslessCodecsGiveExactlyTheBaseline) {
  const Model& model = TinyModel();
  Engine engine(model, EngineOptions{});
  const auto tokens = RandomTokens(2 * 64, model.config().n_vocab, 12);
  PerplexityOptions o;
  o.ctx = 64;
  o.chunk_tokens = 12;  // the 32-token prefix becomes chunks of 12, 12 and 8
  o.codecs = {"raw", "zstd+raw", "int8"};
  auto r = EvalPerplexity(engine, tokens, o);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_EQ(r->figures.size(), 4u);
  EXPECT_EQ(r->figures[1].nll_sum, r->figures[0].nll_sum);  // bit for bit
  EXPECT_EQ(r->figures[2].nll_sum, r->figures[0].nll_sum);
  EXPECT_NE(r->figures[3].nll_sum, r->figures[0].nll_sum);  // lossy: the KV did change
  EXPECT_EQ(r->figures[1].roundtrip.tokens, 2 * 32);
  const double raw_bpt = r->figures[0].bytes_per_token;
  EXPECT_GT(r->figures[1].bytes_per_token, raw_bpt);  // + the 40-byte header per chunk
  EXPECT_LT(r->figures[3].bytes_per_token, 0.6 * raw_bpt);
}

TEST(PerplexityTest, ErrorsNameTheProblem) {
  const Model& model = TinyModel();
  Engine engine(model, EngineOptions{});
  const auto tokens = RandomTokens(100, model.config().n_vocab, 13);
  PerplexityOptions o;
  o.ctx = 200;
  auto r = EvalPerplexity(engine, tokens, o);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("fewer than one window"), std::string::npos);
  o.ctx = 32;
  o.codecs = {"int3"};
  r = EvalPerplexity(engine, tokens, o);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("int3"), std::string::npos);
}

// The window rules EvalPerplexity and EvalPolicyPerplexity share.
TEST(PerplexityTest, WindowChecksAndCopies) {
  EXPECT_TRUE(CheckWindows(4, 64, 4).ok());
  EXPECT_TRUE(CheckWindows(64, 64, 200).ok());
  struct Bad {
    int ctx;
    size_t n_tokens;
    const char* want;
  };
  const Bad bad[] = {
      {3, 100, "context 3 outside [4, 64] (the model's context)"},
      {65, 100, "context 65 outside [4, 64]"},
      {32, 31, "the text has 31 tokens, fewer than one window of 32"},
  };
  for (const auto& b : bad) {
    const Status s = CheckWindows(b.ctx, 64, b.n_tokens);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << b.want;
    EXPECT_NE(s.message().find(b.want), std::string::npos) << s.ToString();
  }
  const std::vector<TokenId> tokens = {10, 11, 12, 13, 14, 15, 16, 17, 18};
  std::vector<TokenId> window(4);
  CopyWindow(tokens, 1, /*bos=*/1, window);
  EXPECT_EQ(window, (std::vector<TokenId>{1, 15, 16, 17}));
  CopyWindow(tokens, 0, /*bos=*/-1, window);
  EXPECT_EQ(window, (std::vector<TokenId>{10, 11, 12, 13}));
}

// On the trained model, int8 KV (per token and head, f16 scale) costs under 1% perplexity on a
// short text; measured: about 0.1%.
TEST(PerplexityTest, Int8WithinOnePercentOnTrainedModel) {
  const std::string path = kShared + "/models/cachette-tiny-f16.gguf";
  if (!fs::exists(path)) GTEST_SKIP() << path << " not present";
  auto model = Model::Load(path);
  ASSERT_TRUE(model.ok()) << model.status().ToString();
  Engine engine(**model, EngineOptions{});
  std::ifstream f(kShared + "/eval/heldout-text.txt", std::ios::binary);
  std::string text(12000, '\0');
  f.read(text.data(), static_cast<std::streamsize>(text.size()));
  const Tokenizer& tok = (*model)->tokenizer();
  PerplexityOptions o;
  o.ctx = 512;
  o.bos = tok.bos();
  o.codecs = {"int8", "int4"};
  auto r = EvalPerplexity(engine, tok.Encode(text, true, false), o);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  const double base = r->figures[0].ppl();
  EXPECT_GT(base, 3);
  EXPECT_LT(base, 60);
  EXPECT_NEAR(r->figures[1].ppl(), base, 0.01 * base) << "int8";
  EXPECT_NEAR(r->figures[2].ppl(), base, 0.10 * base) << "int4";
}

TEST(RoundTripTest, ChunksFollowStoreBoundariesAndRawIsIdentity) {
  const Model& model = TinyModel();
  Engine engine(model, EngineOptions{});
  const KvShape shape = engine.kv_shape();
  auto src = engine.NewSequence(64);
  const auto tokens = RandomTokens(40, model.config().n_vocab, 14);
  ASSERT_TRUE(engine.Forward(*src, tokens, nullptr).ok());
  auto raw = cache::MakeCodec("raw");
  ASSERT_TRUE(raw.ok());
  auto dst = engine.NewSequence(64);
  ASSERT_TRUE(engine.Forward(*dst, std::span<const TokenId>(tokens.data(), 5), nullptr).ok());
  RoundTripStats stats;
  // [5, 40) with chunks of 16: partial [5, 16), whole [16, 32), partial [32, 40).
  ASSERT_TRUE(RoundTripKv(**raw, shape, 16, *src, *dst, 5, 40, &stats).ok());
  EXPECT_EQ(dst->n_tokens(), 40);
  EXPECT_EQ(stats.tokens, 35);
  EXPECT_EQ(stats.encoded_bytes, stats.raw_bytes + 3 * 40);  // one header per chunk
  std::vector<std::byte> a(LayoutFor(shape, 40).raw_bytes()), b(a.size());
  CopyKvChunk(*src, shape, 0, 40, a, false);
  CopyKvChunk(*dst, shape, 0, 40, b, false);
  EXPECT_EQ(a, b);
  // Out of range: the source holds 40 tokens.
  EXPECT_FALSE(RoundTripKv(**raw, shape, 16, *src, *dst, 0, 41, nullptr).ok());
}

struct MatchCase {
  const char* generated;
  const char* expected;
  bool match;
};

TEST(RetrievalScorerTest, ExactMatchRules) {
  const MatchCase cases[] = {
      {" pink\n", "pink", true},                  // leading space, ends at newline
      {" pink", "pink", true},                    // budget ran out right after it
      {" pink\r\nQuestion: what", "pink", true},  // only the first line counts
      {"\tDeasdeas Nixchinkait \n", "Deasdeas Nixchinkait", true},
      {" pink is", "pink", false},      // more on the line
      {" Pink\n", "pink", false},       // case matters
      {" 1181.\n", "1181", false},      // punctuation matters
      {" 118\n", "1181", false},        // a prefix is not the answer
      {"\n pink", "pink", false},       // the answer line is empty
      {" 767661\n", " 767661 ", true},  // the expected text is trimmed too
  };
  for (const auto& c : cases) {
    EXPECT_EQ(ExactMatch(c.generated, c.expected), c.match)
        << "'" << c.generated << "' vs '" << c.expected << "'";
  }
  EXPECT_EQ(AnswerLine("  a b  \nc"), "a b");
  EXPECT_EQ(AnswerLine(" \n"), "");
}

TEST(RetrievalScorerTest, ParsesJsonlAndNamesTheBadLine) {
  const std::string good =
      "{\"kind\": \"kv\", \"prompt\": \"x is red\\nAnswer:\", \"answer\": \"red\", \"n\": 1}\n"
      "\n"
      "{\"kind\": \"needle\", \"prompt\": \"p\", \"answer\": \"42\"}";
  auto items = ParseQaJsonl(good, "qa.jsonl");
  ASSERT_TRUE(items.ok()) << items.status().ToString();
  ASSERT_EQ(items->size(), 2u);
  EXPECT_EQ((*items)[0].prompt, "x is red\nAnswer:");
  EXPECT_EQ((*items)[1].line, 3);
  struct Bad {
    std::string text;
    std::string want;
  };
  const Bad bad[] = {
      {good + "\n{\"kind\": \"kv\", \"prompt\": \"p\"", "qa.jsonl:4: not valid JSON"},
      {good + "\n[1, 2]", "qa.jsonl:4: not a JSON object"},
      {"{\"kind\": \"kv\", \"prompt\": \"p\"}", "qa.jsonl:1: missing string field 'answer'"},
      {"\n\n{\"kind\": \"kv\", \"prompt\": \"p\", \"answer\": 5}",
       "qa.jsonl:3: missing string field 'answer'"},
  };
  for (const auto& b : bad) {
    auto r = ParseQaJsonl(b.text, "qa.jsonl");
    ASSERT_FALSE(r.ok()) << b.text;
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find(b.want), std::string::npos) << r.status().ToString();
  }
}

TEST(SyntheticTest, DeterministicAndAnswerable) {
  std::string filler;
  for (int i = 0; i < 400; ++i) filler += "Line " + std::to_string(i) + " of the filler text.\n";
  SyntheticOptions o;
  o.seed = 7;
  o.n = 9;
  o.approx_chars = 1500;
  o.filler = filler;
  auto a = GenerateSyntheticTasks(o);
  auto b = GenerateSyntheticTasks(o);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  ASSERT_TRUE(b.ok());
  ASSERT_EQ(a->size(), 9u);
  o.seed = 8;
  auto c = GenerateSyntheticTasks(o);
  ASSERT_TRUE(c.ok());
  for (size_t i = 0; i < a->size(); ++i) {
    const QaItem& q = (*a)[i];
    EXPECT_EQ(q.prompt, (*b)[i].prompt);
    EXPECT_NE(q.prompt, (*c)[i].prompt);
    EXPECT_EQ(q.kind, o.kinds[i % 3]);
    EXPECT_TRUE(q.prompt.ends_with("\nAnswer:")) << q.prompt;
    EXPECT_NE(q.prompt.find(q.answer), std::string::npos) << q.kind << ": " << q.answer;
    EXPECT_GT(q.prompt.size(), 1000u);
  }
  o.kinds = {"kv", "haystack"};
  auto bad = GenerateSyntheticTasks(o);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("haystack"), std::string::npos);
}

// The per-item rules EvalRetrieval and EvalPolicyRetrieval share: the budget counts the
// answer's tokens as written after "Answer:", and an item that cannot fit is skipped.
TEST(RetrievalTest, PrepareQaBudgetsAndSkips) {
  const Tokenizer& tok = TinyModel().tokenizer();
  const QaItem item{"kv", "x is red\nAnswer:", " red \n", 0};
  const PreparedQa q = PrepareQa(tok, item, 3, /*extra_answer_tokens=*/8, 4096, 1);
  EXPECT_EQ(q.prompt, tok.Encode(item.prompt, tok.add_bos(), false));
  EXPECT_EQ(q.answer_budget, static_cast<int>(tok.Encode(" red", false, false).size()) + 8);
  EXPECT_EQ(q.outcome.index, 3);
  EXPECT_EQ(q.outcome.kind, "kv");
  EXPECT_EQ(q.outcome.prompt_tokens, static_cast<int64_t>(q.prompt.size()));
  EXPECT_FALSE(q.outcome.skipped);
  const int64_t fit = q.outcome.prompt_tokens + q.answer_budget;
  EXPECT_FALSE(PrepareQa(tok, item, 0, 8, fit, 1).outcome.skipped);
  EXPECT_TRUE(PrepareQa(tok, item, 0, 8, fit - 1, 1).outcome.skipped);
  EXPECT_FALSE(PrepareQa(tok, item, 0, 8, 4096, q.prompt.size()).outcome.skipped);
  EXPECT_TRUE(PrepareQa(tok, item, 0, 8, 4096, q.prompt.size() + 1).outcome.skipped);
}

// The greedy stop rule both decoders share: a newline in the text or an end-of-generation
// token ends the answer; the latter is not part of it.
TEST(RetrievalTest, GreedyAnswerEndsAtNewlineOrEog) {
  const Model& model = TinyModel();
  const Tokenizer& tok = model.tokenizer();
  ASSERT_GE(tok.eos(), 0);
  auto peak = [&](TokenId id) {
    std::vector<float> logits(model.config().n_vocab, 0.0f);
    logits[id] = 1.0f;
    return logits;
  };
  GreedyAnswer a(/*first=*/7);
  for (TokenId t : tok.Encode(" red", false, false)) {
    a.Take(tok, peak(t));
    EXPECT_FALSE(a.done);
    EXPECT_EQ(a.next, t);
  }
  EXPECT_EQ(a.text, " red");
  a.Take(tok, peak(tok.Encode("\n", false, false).at(0)));
  EXPECT_TRUE(a.done);
  EXPECT_EQ(a.text, " red\n");
  GreedyAnswer b(/*first=*/7);
  b.Take(tok, peak(tok.eos()));
  EXPECT_TRUE(b.done);
  EXPECT_TRUE(b.ids.empty());
  EXPECT_EQ(b.text, "");
  EXPECT_EQ(b.next, 7);
}

// The raw codec answers exactly as the baseline, and reusing the previous item's prefix gives
// the same answers as evaluating each item on its own.
TEST(RetrievalTest, RawCodecAndPrefixReuseChangeNothing) {
  const Model& model = TinyModel();
  Engine engine(model, EngineOptions{});
  std::vector<QaItem> items;
  std::string episode = "Here is a table of keys and values.\n";
  for (int i = 0; i < 30; ++i) episode += "key" + std::to_string(i) + " is red\n";
  for (int q = 0; q < 4; ++q) {
    episode += "\nQuestion: What is the value of key" + std::to_string(q * 7) + "?\nAnswer:";
    items.push_back({"kv", episode, "red", 0});
    episode += " red";
  }
  RetrievalOptions o;
  o.codecs = {"raw", "int8"};
  o.chunk_tokens = 32;
  auto all = EvalRetrieval(engine, items, o);
  ASSERT_TRUE(all.ok()) << all.status().ToString();
  ASSERT_EQ(all->outcomes.size(), 4u);
  EXPECT_LT(all->prefill_tokens, 2 * static_cast<int64_t>(all->outcomes[3].prompt_tokens));
  for (size_t i = 0; i < items.size(); ++i) {
    const QaOutcome& o_all = all->outcomes[i];
    ASSERT_FALSE(o_all.skipped);
    EXPECT_EQ(o_all.answers[1], o_all.answers[0]) << "raw codec, item " << i;
    auto one = EvalRetrieval(engine, std::span<const QaItem>(&items[i], 1), o);
    ASSERT_TRUE(one.ok());
    EXPECT_EQ(one->outcomes[0].answers, o_all.answers) << "item " << i;
  }
  const auto by = all->ByKind();
  EXPECT_EQ(by.at("all").n, 4);
  EXPECT_EQ(by.at("kv").n, 4);
}

TEST(RagTest, ParsesJsonlAndNamesTheBadField) {
  auto ok = ParseRagJsonl(
      "{\"kind\": \"facts\", \"docs\": [\"a\", \"b\"], \"question\": \"Q?\\nAnswer:\", "
      "\"answer\": \"x\", \"hops\": 2}\n\n",
      "t.jsonl");
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  ASSERT_EQ(ok->size(), 1u);
  EXPECT_EQ((*ok)[0].docs, (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ((*ok)[0].hops, 2);
  EXPECT_EQ((*ok)[0].line, 1);
  const std::pair<const char*, const char*> bad[] = {
      {"{\"kind\": \"kv\", \"docs\": [], \"question\": \"q\", \"answer\": \"a\"}", "'docs'"},
      {"{\"kind\": \"kv\", \"docs\": [\"d\", 3], \"question\": \"q\", \"answer\": \"a\"}",
       "non-string"},
      {"{\"kind\": \"kv\", \"docs\": [\"d\"], \"answer\": \"a\"}", "'question'"},
      {"{\"kind\": \"kv\", \"docs\": [\"d\"], \"question\": \"q\", \"answer\": \"a\", "
       "\"hops\": 0}",
       "'hops'"},
      {"[1]", "not a JSON object"},
      {"{\"kind\": ", "not valid JSON"},
  };
  for (const auto& [line, needle] : bad) {
    auto r = ParseRagJsonl(std::string("\n") + line, "t.jsonl");
    ASSERT_FALSE(r.ok()) << line;
    EXPECT_NE(r.status().message().find("t.jsonl:2: "), std::string::npos) << r.status().ToString();
    EXPECT_NE(r.status().message().find(needle), std::string::npos) << r.status().ToString();
  }
}

// On the trained model: blend at ratio 1 recomputes everything, so it answers as full prefill
// with a first-token KL of float rounding; naive and cachecraft at alpha 0 recompute nothing;
// the accounting adds up to the prompt in every mode.
TEST(RagTest, BlendAtOneAnswersAsFullPrefill) {
  const std::string path = kShared + "/models/cachette-tiny-f32.gguf";
  std::ifstream f(kShared + "/eval/multidoc-qa.jsonl", std::ios::binary);
  if (!fs::exists(path) || !f) GTEST_SKIP() << "trained model or multidoc-qa.jsonl not present";
  auto model = Model::Load(path);
  ASSERT_TRUE(model.ok());
  std::stringstream ss;
  ss << f.rdbuf();
  auto items = ParseRagJsonl(ss.str(), "multidoc-qa.jsonl");
  ASSERT_TRUE(items.ok()) << items.status().ToString();
  items->resize(3);
  Engine engine(**model, EngineOptions{.kv_type = kernels::KvType::kF32});
  RagOptions o;
  o.configs = {{ReuseMode::kFull, 0},       {ReuseMode::kBlend, 1.0}, {ReuseMode::kNaive, 0},
               {ReuseMode::kCacheCraft, 0}, {ReuseMode::kPrefix, 0},  {ReuseMode::kApe, 0}};
  auto r = EvalRag(engine, *items, o);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->configs, (std::vector<std::string>{"full", "blend@1", "naive", "cachecraft@0",
                                                  "prefix", "ape"}));
  EXPECT_EQ(r->full_index, 0);
  for (const RagOutcome& oc : r->outcomes) {
    ASSERT_FALSE(oc.skipped);
    EXPECT_EQ(oc.answers[1], oc.answers[0]);
    EXPECT_LT(oc.kl_vs_full[1], 1e-6);
    EXPECT_EQ(oc.kl_vs_full[0], 0);
    EXPECT_LT(oc.kl_vs_full[4], 1e-6);  // prefix reuse is exact
    for (size_t i = 0; i < oc.reports.size(); ++i) {
      const ReuseReport& rep = oc.reports[i];
      EXPECT_EQ(rep.prefix_tokens + rep.reused_tokens + rep.computed_tokens, oc.prompt_tokens)
          << r->configs[i];
    }
    EXPECT_EQ(oc.reports[1].recomputed_tokens, oc.reports[1].reused_tokens);
    EXPECT_GT(oc.reports[2].reused_tokens, 0);
    EXPECT_EQ(oc.reports[2].recomputed_tokens, 0);
    EXPECT_EQ(oc.reports[3].recomputed_tokens, 0);
    EXPECT_EQ(oc.reports[4].reused_tokens, 0);
    EXPECT_GT(oc.reports[5].reused_tokens, 0);
  }
  EXPECT_EQ(r->AgreementWithFull()[1], 1.0);
  o.configs = {{ReuseMode::kBlend, 1.5}};
  EXPECT_EQ(EvalRag(engine, *items, o).status().code(), StatusCode::kInvalidArgument);
  o.configs = {{ReuseMode::kApe, 0}, {ReuseMode::kApe, 0}};
  EXPECT_EQ(EvalRag(engine, *items, o).status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace cachette::eval
