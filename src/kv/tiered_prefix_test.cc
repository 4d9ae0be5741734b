// Restoring a prefix from the tiered store (RAM, then disk after a restart) gives the same
// greedy tokens as a cold run, with the raw codec.
#include "kv/tiered_prefix.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <random>

#include "engine/engine.h"
#include "engine/reference_forward.h"
#include "engine/sampler.h"

namespace cachette {
namespace {

namespace fs = std::filesystem;
using kernels::KvType;
const std::string kShared = CACHETTE_SHARED_DIR;

struct Out {
  std::vector<TokenId> tokens;
  std::vector<float> first_logits;
};

Out Greedy(Engine& engine, SequenceKv& kv, const std::vector<TokenId>& prompt, int n) {
  Out o;
  std::vector<float> logits(engine.model().config().n_vocab);
  int64_t from = kv.n_tokens();
  if (from == static_cast<int64_t>(prompt.size())) kv.SetTokens(--from);
  EXPECT_TRUE(engine.Forward(kv, std::span(prompt).subspan(from), logits.data()).ok());
  o.first_logits = logits;
  for (int i = 0; i < n; ++i) {
    o.tokens.push_back(Sampler::Argmax(logits));
    if (i + 1 == n) break;
    const TokenId next[1] = {o.tokens.back()};
    EXPECT_TRUE(engine.Forward(kv, next, logits.data()).ok());
  }
  return o;
}

class TieredPrefixTest : public ::testing::TestWithParam<KvType> {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("cachette_tiered_" + std::to_string(getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    auto m = Model::Load(kShared + "/models/cachette-tiny-f32.gguf");
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    model_ = std::move(*m);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::unique_ptr<Cache> OpenCache(uint64_t ram_bytes) {
    CacheOptions o;
    o.chunk_tokens = 32;
    o.ram_budget_bytes = ram_bytes;
    o.disk_dir = (dir_ / "disk").string();
    o.disk_budget_bytes = 64 << 20;
    auto c = Cache::Open(o);
    EXPECT_TRUE(c.ok()) << c.status().ToString();
    return std::move(*c);
  }

  KvManagerOptions KvOptions(const Engine& e) {
    KvManagerOptions ko;
    ko.shape = e.kv_shape();
    ko.page_tokens = 16;
    ko.budget_bytes = PagePool::PageBytes(ko.shape, 16) * 64;
    return ko;
  }

  fs::path dir_;
  std::unique_ptr<Model> model_;
};

TEST_P(TieredPrefixTest, RestoredFromRamAndDiskEqualsCold) {
  const KvType kv_type = GetParam();
  EngineOptions eo;
  eo.threads = 2;
  eo.kv_type = kv_type;
  Engine engine(*model_, eo);
  std::mt19937 rng(5);
  std::vector<TokenId> prompt(100);
  for (auto& t : prompt) t = static_cast<TokenId>(rng() % 8000);
  const int n_gen = 16;
  auto cold_kv = engine.NewSequence(200);
  const Out cold = Greedy(engine, *cold_kv, prompt, n_gen);
  const double tol = kv_type == KvType::kF32 ? 1e-5 : 1e-3;
  const Hash128 kv_ns = KvNamespace(model_->Fingerprint(), kv_type);
  const Hash128 store_ns = CacheNamespace(*model_, kv_type);
  EXPECT_NE(store_ns, CacheNamespace(*model_, kv_type, "tenant"));

  {  // First process: compute, then save the full chunks (3 of 32 tokens).
    auto cache = OpenCache(64 << 20);
    KvManager kvm(KvOptions(engine));
    ASSERT_TRUE(TieredPrefix::Validate(*cache, kvm).ok());
    TieredPrefix tiers(*cache, kvm);
    auto seq = kvm.Start(kv_ns, prompt, 200);
    auto r = tiers.Restore(*seq, prompt, store_ns, std::chrono::steady_clock::now() +
                                                       std::chrono::seconds(5));
    EXPECT_EQ(r.tokens, 0);
    const Out first = Greedy(engine, *seq, prompt, n_gen);
    EXPECT_EQ(first.tokens, cold.tokens);
    EXPECT_EQ(tiers.Save(*seq, prompt, store_ns), 3u);
    ASSERT_TRUE(cache->Flush().ok());

    // A fresh radix index (as after its pages were evicted): restored from RAM.
    KvManager fresh(KvOptions(engine));
    TieredPrefix t2(*cache, fresh);
    auto s2 = fresh.Start(kv_ns, prompt, 200);
    auto r2 = t2.Restore(*s2, prompt, store_ns,
                         std::chrono::steady_clock::now() + std::chrono::seconds(5));
    EXPECT_EQ(r2.tokens, 96);
    EXPECT_EQ(r2.tokens_by_tier[static_cast<int>(CacheTier::kRam)], 96);
    const Out warm = Greedy(engine, *s2, prompt, n_gen);
    EXPECT_EQ(warm.tokens, cold.tokens);
    std::vector<double> ref(cold.first_logits.begin(), cold.first_logits.end());
    EXPECT_LT(testing::RelativeL2(warm.first_logits, ref), tol);
  }
  {  // A restarted process with no RAM tier: restored from the disk tier.
    auto cache = OpenCache(0);
    KvManager kvm(KvOptions(engine));
    TieredPrefix tiers(*cache, kvm);
    // A radix hit of 40 tokens (ending inside a chunk and inside a page) plus tier chunks.
    std::vector<TokenId> head(prompt.begin(), prompt.begin() + 40);
    auto pre = kvm.Start(kv_ns, head, 200);
    Greedy(engine, *pre, head, 1);
    kvm.Finish(*pre, head);
    auto seq = kvm.Start(kv_ns, prompt, 200);
    EXPECT_EQ(seq->cached_tokens(), 40);
    auto r = tiers.Restore(*seq, prompt, store_ns,
                           std::chrono::steady_clock::now() + std::chrono::seconds(5));
    EXPECT_EQ(r.tokens, 56);
    EXPECT_EQ(r.tokens_by_tier[static_cast<int>(CacheTier::kDisk)], 56);
    const Out warm = Greedy(engine, *seq, prompt, n_gen);
    EXPECT_EQ(warm.tokens, cold.tokens);
    std::vector<double> ref(cold.first_logits.begin(), cold.first_logits.end());
    EXPECT_LT(testing::RelativeL2(warm.first_logits, ref), tol);
    // Another tenant's namespace never hits.
    auto other = kvm.Start(KvNamespace(model_->Fingerprint(), kv_type, "b"), prompt, 200);
    EXPECT_EQ(tiers.Restore(*other, prompt, CacheNamespace(*model_, kv_type, "b"),
                            std::chrono::steady_clock::now() + std::chrono::seconds(5))
                  .tokens,
              0);
  }
}

INSTANTIATE_TEST_SUITE_P(KvTypes, TieredPrefixTest, ::testing::Values(KvType::kF32, KvType::kF16),
                         [](const auto& info) { return std::string(kernels::KvTypeName(info.param)); });

}  // namespace
}  // namespace cachette
