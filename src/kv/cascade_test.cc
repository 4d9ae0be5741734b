// CAKE's cascade (kv_policy.h): the prompt read a layer at a time, the layers read so far
// compacted after each. On paged KV the sequence then holds about the budget plus one layer's
// prompt, not every layer's; the result is the same on paged and contiguous KV, and ends at
// the allocation a one-shot compaction of the whole prompt makes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <random>

#include "engine/engine.h"
#include "kv/budget_runner.h"
#include "kv/kv_manager.h"
#include "kv/kv_policy.h"

namespace cachette {
namespace {

using kernels::KvType;
const std::string kShared = CACHETTE_SHARED_DIR;

class CakeCascadeTest : public ::testing::Test {
 protected:
  static constexpr int64_t kPage = 16;
  static constexpr int64_t kPrompt = 400;
  static constexpr int64_t kBudget = 40;

  void SetUp() override {
    auto m = Model::Load(kShared + "/models/cachette-tiny-f32.gguf");
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    model_ = std::move(*m);
    engine_ = std::make_unique<Engine>(*model_, EngineOptions{.threads = 2,
                                                              .kv_type = KvType::kF16});
    const unsigned seed = std::random_device{}();
    std::mt19937 rng(seed);
    prompt_.resize(kPrompt);
    for (auto& t : prompt_) t = static_cast<TokenId>(1 + rng() % (model_->config().n_vocab - 2));
    config_.name = "cake";
    config_.budget = kBudget;
  }

  // Reads the prompt into `kv` with the cascade, `compact` applying each stage's plan; the
  // largest `held()` seen after a layer is read (before its stage compacts) goes to *peak.
  void Cascade(SequenceKv& kv, const std::function<Status(const KeepPlan&, AttentionStats*)>&
                                   compact,
               const std::function<int64_t()>& held, int64_t* peak, float* logits) {
    auto policy = MakeKvPolicy(config_);
    ASSERT_TRUE(policy.ok());
    AttentionStats st;
    st.window = (*policy)->stats_window();
    auto stage = [&](int layer) {
      *peak = std::max(*peak, held());
      return compact((*policy)->Select(PolicyInputFor(kv, kBudget, &st, layer + 1)), &st);
    };
    const Status s = engine_->ForwardLayerMajor(kv, prompt_, logits, &st, stage);
    ASSERT_TRUE(s.ok()) << s.ToString();
  }

  // A pool of `pages` pages of kPage tokens for the engine's KV.
  std::unique_ptr<KvManager> Pool(size_t pages) {
    KvManagerOptions ko;
    ko.shape = engine_->kv_shape();
    ko.page_tokens = kPage;
    ko.budget_bytes = PagePool::PageBytes(ko.shape, kPage) * pages;
    return std::make_unique<KvManager>(ko);
  }

  std::unique_ptr<Model> model_;
  std::unique_ptr<Engine> engine_;
  std::vector<TokenId> prompt_;
  KvPolicyConfig config_;
};

TEST_F(CakeCascadeTest, PagedKvHoldsAboutTheBudgetAndEqualsContiguousKv) {
  const ModelConfig& c = model_->config();
  const int L = c.n_layer;
  auto pool = Pool(128);
  KvManager& kvm = *pool;
  const Hash128 ns = KvNamespace(*model_, KvType::kF16);
  auto seq = kvm.Start(ns, {}, kPrompt + 32);
  ContiguousKv twin(engine_->kv_shape(), kPrompt + 32);
  const int nv = c.n_vocab;
  std::vector<float> la(nv), lb(nv);
  int64_t paged_peak = 0, twin_peak = 0;
  Cascade(
      *seq,
      [&](const KeepPlan& plan, AttentionStats* st) {
        return kvm.Compact(*seq, plan, c.rope, st);
      },
      [&] { return seq->held_pages(); }, &paged_peak, la.data());
  Cascade(
      twin,
      [&](const KeepPlan& plan, AttentionStats* st) { return twin.Compact(plan, c.rope, st); },
      [&] { return twin.total_slots(); }, &twin_peak, lb.data());
  EXPECT_EQ(la, lb);
  // Once every layer is read they keep the budget in total, packed L to a page.
  int64_t total = 0;
  for (int l = 0; l < L; ++l) {
    EXPECT_EQ(seq->layer_tokens(l), twin.layer_tokens(l)) << "layer " << l;
    total += seq->layer_tokens(l);
  }
  EXPECT_LE(total, L * kBudget);
  // At most the budget over the layers read plus the layer being read: blocks for L x B slots
  // (one partial block per layer) and the prompt, L blocks to a page, and one page of slack.
  const int64_t blocks = (L * kBudget + kPage - 1) / kPage + L + (kPrompt + kPage - 1) / kPage;
  EXPECT_LE(paged_peak, (blocks + L - 1) / L + 1);
  // Reading every layer before compacting would hold the whole prompt's pages.
  EXPECT_LT(2 * paged_peak, (kPrompt + kPage - 1) / kPage);
  EXPECT_LE(twin_peak, L * kBudget + kPrompt);
  // Decoding on: the same logits.
  for (int i = 0; i < 5; ++i) {
    const TokenId next[1] = {prompt_[i]};
    ASSERT_TRUE(engine_->Forward(*seq, next, la.data()).ok());
    ASSERT_TRUE(engine_->Forward(twin, next, lb.data()).ok());
    ASSERT_EQ(la, lb) << "step " << i;
  }
  // Nothing of it is exact: nothing enters the index, and every page goes back.
  EXPECT_EQ(seq->exact_tokens(), 0);
  kvm.Finish(*seq, prompt_);
  EXPECT_EQ(kvm.GetStats().pages_used, 0u);
}

// A cascade over a paged sequence that starts from cached pages (an engine caller may; the
// scheduler reads from the first token): stages that evict inside the cached prefix copy its
// shared pages before writing, so the index keeps the exact KV (a warm full-KV read gives the
// cold logits), and the sequence's packed pages are its own (checked by KvManager::Compact).
TEST_F(CakeCascadeTest, ACascadeFromCachedPagesLeavesTheIndexExact) {
  const ModelConfig& c = model_->config();
  auto pool = Pool(128);
  KvManager& kvm = *pool;
  const Hash128 ns = KvNamespace(*model_, KvType::kF16);
  const int nv = c.n_vocab;
  std::vector<float> cold(nv), warm(nv), unused(nv);
  const std::span<const TokenId> head = std::span<const TokenId>(prompt_).first(160);
  {
    auto seq = kvm.Start(ns, head, kPrompt + 32);
    ASSERT_TRUE(engine_->Forward(*seq, head, cold.data()).ok());
    kvm.Finish(*seq, head);  // 10 whole pages in the index
  }
  auto seq = kvm.Start(ns, prompt_, kPrompt + 32);
  ASSERT_EQ(seq->n_tokens(), 160);
  // The rest of the prompt, by the cascade (Cascade reads prompt_, so read its tail here).
  auto policy = MakeKvPolicy(config_);
  ASSERT_TRUE(policy.ok());
  AttentionStats st;
  st.window = (*policy)->stats_window();
  auto stage = [&](int layer) {
    return kvm.Compact(*seq, (*policy)->Select(PolicyInputFor(*seq, kBudget, &st, layer + 1)),
                       c.rope, &st);
  };
  const Status s = engine_->ForwardLayerMajor(
      *seq, std::span<const TokenId>(prompt_).subspan(160), unused.data(), &st, stage);
  ASSERT_TRUE(s.ok()) << s.ToString();
  int64_t total = 0;
  for (int l = 0; l < c.n_layer; ++l) total += seq->layer_tokens(l);
  EXPECT_LE(total, c.n_layer * kBudget);
  EXPECT_GT(kvm.GetStats().cow_copies, 0u);
  kvm.Finish(*seq, prompt_);
  // The index still holds the exact 160 tokens.
  auto again = kvm.Start(ns, head, kPrompt + 32);
  ASSERT_EQ(again->n_tokens(), 160);
  again->SetTokens(159);
  ASSERT_TRUE(engine_->Forward(*again, head.subspan(159), warm.data()).ok());
  EXPECT_EQ(warm, cold);
}

// The runner's cascade (BudgetRunner::Prefill) ends near the one-shot allocation of the same
// prompt (StartFrom an exact prefill): the same last logits, a budget per layer within a few
// slots of it, the same kept KV where the counts agree, a fraction of its peak.
TEST_F(CakeCascadeTest, TheRunnersCascadeEndsAtTheOneShotAllocation) {
  const ModelConfig& c = model_->config();
  const int L = c.n_layer;
  const int nv = c.n_vocab;
  auto cascade = BudgetRunner::Create(*engine_, config_);
  auto one_shot = BudgetRunner::Create(*engine_, config_);
  ASSERT_TRUE(cascade.ok() && one_shot.ok());
  std::vector<float> la(nv), lb(nv);
  ASSERT_TRUE((*cascade)->Prefill(prompt_, la.data()).ok());
  ContiguousKv exact(engine_->kv_shape(), kPrompt + 32);
  AttentionStats st;
  st.window = (*one_shot)->stats_window();
  Engine::Item item{&exact, prompt_, Engine::Logits::kLast, lb.data(), &st};
  ASSERT_TRUE(engine_->Forward(std::span(&item, 1)).ok());
  ASSERT_TRUE((*one_shot)->StartFrom(exact, kPrompt, &st).ok());
  EXPECT_EQ(la, lb);
  ContiguousKv& a = *(*cascade)->kv();
  ContiguousKv& b = *(*one_shot)->kv();
  int64_t total = 0;
  int equal_layers = 0;
  const size_t bytes = engine_->kv_shape().token_bytes();
  for (int l = 0; l < L; ++l) {
    EXPECT_NEAR(a.layer_tokens(l), b.layer_tokens(l), 2) << "layer " << l;
    total += a.layer_tokens(l);
    if (a.layer_tokens(l) != b.layer_tokens(l)) continue;
    ++equal_layers;
    for (int64_t i = 0; i < a.layer_tokens(l); ++i) {
      ASSERT_EQ(std::memcmp(a.KSlot(l, i), b.KSlot(l, i), bytes), 0) << l << " " << i;
      ASSERT_EQ(std::memcmp(a.VSlot(l, i), b.VSlot(l, i), bytes), 0) << l << " " << i;
    }
  }
  EXPECT_GE(equal_layers, L / 2);
  EXPECT_LE(total, L * kBudget);
  EXPECT_EQ((*one_shot)->peak_kept_tokens(), kPrompt);
  EXPECT_LE((*cascade)->peak_kept_tokens(), (L * kBudget + kPrompt + L - 1) / L);
}

}  // namespace
}  // namespace cachette
