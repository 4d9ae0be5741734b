// Windowed KV (engine/kv_cache.h, KvWindow): kivi4 (kernels.h, KvType::kKivi4) and q4_1 with a
// recent window of 64 tokens (--kv-recent), through the engine on the trained model: f16 while
// every token is in the window, the same bits paged and contiguous, a warm start from the
// prefix cache (on a group boundary and inside a group) close to a cold run, and the features
// that cannot work on it refused with a clear error.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>

#include "engine/engine.h"
#include "engine/kv_budget.h"
#include "engine/sampler.h"
#include "kv/kv_manager.h"

namespace cachette {
namespace {

using kernels::KvType;
const std::string kShared = CACHETTE_SHARED_DIR;

class KiviTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto m = Model::Load(kShared + "/models/cachette-tiny-f32.gguf");
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    model_ = std::move(*m);
    std::ifstream in(kShared + "/eval/heldout-text.txt");
    ASSERT_TRUE(in) << "missing held-out text in " << kShared;
    std::string text(16384, '\0');
    in.read(text.data(), static_cast<std::streamsize>(text.size()));
    text.resize(static_cast<size_t>(in.gcount()));
    text_ = model_->tokenizer().Encode(text, true, false);
    ASSERT_GE(text_.size(), 600u);
  }

  std::unique_ptr<Engine> NewEngine(KvType t, int recent = -1) {
    EngineOptions eo;
    eo.threads = 2;
    eo.kv_type = t;
    eo.kv_recent = recent;
    return std::make_unique<Engine>(*model_, eo);
  }

  // The windowed configurations: kivi4 (its default window of 64) and q4_1 with a window of 64.
  struct Config {
    KvType type;
    int recent;
    int page_tokens;  // kivi4 pages hold whole key groups
  };
  static constexpr Config kConfigs[] = {{KvType::kKivi4, -1, 32}, {KvType::kQ4_1, 64, 16}};

  std::unique_ptr<KvManager> NewManager(const Engine& engine, int page_tokens) {
    KvManagerOptions ko;
    ko.shape = engine.kv_shape();
    ko.page_tokens = page_tokens;
    ko.budget_bytes = PagePool::PageBytes(ko.shape, page_tokens) * 64;
    EXPECT_TRUE(KvManager::Validate(ko).ok());
    return std::make_unique<KvManager>(ko);
  }

  // Feeds prompt[kv.n_tokens():] in chunks of `chunk`, then decodes n tokens greedily; returns
  // the logits after the prompt and after each decode step.
  std::vector<std::vector<float>> Run(Engine& engine, SequenceKv& kv,
                                      std::span<const TokenId> prompt, int chunk, int n) {
    const int nv = model_->config().n_vocab;
    std::vector<std::vector<float>> out;
    std::vector<float> logits(nv);
    int64_t from = kv.n_tokens();
    if (from == static_cast<int64_t>(prompt.size())) kv.SetTokens(--from);
    for (int64_t at = from; at < static_cast<int64_t>(prompt.size()); at += chunk) {
      const int64_t len = std::min<int64_t>(chunk, prompt.size() - at);
      EXPECT_TRUE(engine.Forward(kv, prompt.subspan(at, len), logits.data()).ok());
    }
    out.push_back(logits);
    for (int i = 0; i < n; ++i) {
      const TokenId t[1] = {Sampler::Argmax(logits)};
      EXPECT_TRUE(engine.Forward(kv, t, logits.data()).ok());
      out.push_back(logits);
    }
    return out;
  }

  static double RelL2(const std::vector<float>& a, const std::vector<float>& b) {
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); ++i) {
      num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
      den += double(b[i]) * b[i];
    }
    return std::sqrt(num / den);
  }

  std::unique_ptr<Model> model_;
  std::vector<TokenId> text_;
};

// Until 32 tokens have 64 newer ones after them, nothing is quantized: the same bits as f16
// KV, in chunks and in decode steps.
TEST_F(KiviTest, IsF16WhileEveryTokenIsInTheRecentWindow) {
  for (const Config& cfg : kConfigs) {
    SCOPED_TRACE(kernels::KvTypeName(cfg.type));
    const int64_t n = kDefaultKiviRecent + kernels::kKiviGroup - 1;  // 95 tokens, none quantized
    auto f16 = NewEngine(KvType::kF16);
    auto kivi = NewEngine(cfg.type, cfg.recent);
    const std::span<const TokenId> prompt(text_.data(), 60);
    auto a = f16->NewSequence(200);
    auto b = kivi->NewSequence(200);
    const auto want = Run(*f16, *a, prompt, 25, static_cast<int>(n - 60));
    const auto got = Run(*kivi, *b, prompt, 25, static_cast<int>(n - 60));
    ASSERT_EQ(want.size(), got.size());
    for (size_t i = 0; i < want.size(); ++i) {
      ASSERT_EQ(0, std::memcmp(want[i].data(), got[i].data(), want[i].size() * 4)) << i;
    }
    // The 96th token still reads f16 only; after it the first group leaves the window, so the
    // 97th reads it quantized and the logits move, a little.
    std::vector<float> la = got.back(), lb = got.back();
    for (int step = 0; step < 2; ++step) {
      const TokenId t[1] = {Sampler::Argmax(la)};
      ASSERT_TRUE(f16->Forward(*a, t, la.data()).ok());
      ASSERT_TRUE(kivi->Forward(*b, t, lb.data()).ok());
      EXPECT_EQ(step == 0, 0 == std::memcmp(la.data(), lb.data(), la.size() * 4)) << step;
    }
    EXPECT_LT(RelL2(lb, la), 0.2);
  }
}

// The window's bookkeeping is the sequence type's: paged (pages of 32 and 64) and contiguous
// sequences fed the same chunks give the same bits, through many flushes and a ring that grows
// for a long chunk and shrinks back.
TEST_F(KiviTest, PagedAndContiguousGiveTheSameBits) {
  for (const Config& cfg : kConfigs) {
    SCOPED_TRACE(kernels::KvTypeName(cfg.type));
    auto engine = NewEngine(cfg.type, cfg.recent);
    const std::span<const TokenId> prompt(text_.data(), 300);
    auto contiguous = engine->NewSequence(400);
    const auto want = Run(*engine, *contiguous, prompt, 70, 40);
    for (int page : {cfg.page_tokens, 64}) {
      SCOPED_TRACE("pages of " + std::to_string(page));
      auto kvm = NewManager(*engine, page);
      auto seq = kvm->Start(KvNamespace(*model_, cfg.type), prompt, 400);
      const auto got = Run(*engine, *seq, prompt, 70, 40);
      for (size_t i = 0; i < want.size(); ++i) {
        ASSERT_EQ(0, std::memcmp(want[i].data(), got[i].data(), want[i].size() * 4)) << i;
      }
      // Only quantized tokens may enter the index: 340 tokens, at least kRecent of them f16.
      EXPECT_EQ(seq->exact_tokens() % kernels::kKiviGroup, 0);
      EXPECT_LE(seq->exact_tokens(), 340 - kDefaultKiviRecent);
      EXPECT_GT(seq->exact_tokens(), 340 - kDefaultKiviRecent - kernels::kKiviGroup);
    }
  }
}

// A second request reuses the quantized pages the first one committed (its window sealed into
// them when it finished), from a group boundary and from inside a group (whose start kivi4
// dequantizes into the window), and continues close to a cold run: what differs is only which
// tokens were still f16 when later ones attended to them.
TEST_F(KiviTest, WarmStartFromTheIndexStaysCloseToColdRun) {
  for (const Config& cfg : kConfigs) {
    SCOPED_TRACE(kernels::KvTypeName(cfg.type));
    auto engine = NewEngine(cfg.type, cfg.recent);
    auto kvm = NewManager(*engine, cfg.page_tokens);
    const Hash128 ns = KvNamespace(*model_, cfg.type);
    std::vector<TokenId> first(text_.begin(), text_.begin() + 260);
    {
      auto seq = kvm->Start(ns, first, 400);
      Run(*engine, *seq, first, 64, 0);
      kvm->Finish(*seq, first);
    }
    // Finish sealed the window into the pages: the index has every token (kivi4: its whole key
    // groups; the group in progress stays out).
    const int64_t committed = cfg.type == KvType::kKivi4 ? 256 : 260;
    for (int64_t share : {int64_t{160}, int64_t{150}, committed}) {
      SCOPED_TRACE("sharing " + std::to_string(share) + " tokens");
      std::vector<TokenId> p(text_.begin(), text_.begin() + share);
      // A prompt of exactly the committed tokens is a full hit: its last token is recomputed.
      if (share != committed) p.insert(p.end(), text_.begin() + 400, text_.begin() + 440);
      auto cold = engine->NewSequence(400);
      const auto want = Run(*engine, *cold, p, 64, 8);
      auto seq = kvm->Start(ns, p, 400);
      EXPECT_EQ(seq->cached_tokens(), std::min(share, committed));
      EXPECT_GT(seq->cached_tokens(), 0);
      const auto got = Run(*engine, *seq, p, 64, 8);
      for (size_t i = 0; i < want.size(); ++i) {
        EXPECT_LT(RelL2(got[i], want[i]), 0.06) << i;
      }
      EXPECT_EQ(Sampler::Argmax(got[0]), Sampler::Argmax(want[0]));
    }
  }
}

TEST_F(KiviTest, RefusesWhatRewritesSlots) {
  auto engine = NewEngine(KvType::kKivi4);
  KvManagerOptions ko;
  ko.shape = engine->kv_shape();
  ko.page_tokens = 16;
  const Status s = KvManager::Validate(ko);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("multiple of 32"), std::string::npos) << s.ToString();
  // A KV budget policy's compaction.
  auto kvm = NewManager(*engine, 32);
  std::vector<TokenId> p(text_.begin(), text_.begin() + 100);
  auto seq = kvm->Start(KvNamespace(*model_, KvType::kKivi4), p, 200);
  Run(*engine, *seq, p, 100, 0);
  KeepPlan plan;
  const Status c = kvm->Compact(*seq, plan, model_->config().rope, nullptr);
  EXPECT_EQ(c.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(c.message().find("kivi4"), std::string::npos) << c.ToString();
  // q4_1 with a window: the same refusal, naming the window.
  auto windowed = NewEngine(KvType::kQ4_1, 64);
  const Status w = CheckKvRewritable(windowed->kv_shape(), "segment reuse");
  EXPECT_EQ(w.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(w.message().find("--kv-recent 64"), std::string::npos) << w.ToString();
  EXPECT_TRUE(CheckKvRewritable(NewEngine(KvType::kQ4_1)->kv_shape(), "segment reuse").ok());
}

}  // namespace
}  // namespace cachette
