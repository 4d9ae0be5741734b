// The bridge between scheduler and store: restoring a prefix from the tiered store (RAM, then
// disk after a restart) gives the same greedy tokens as a cold run, with the raw codec; chunks
// arrive through the asynchronous StartLoad/ApplyLoad path; a passed deadline recomputes.
#include "sched/tier_bridge.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <random>
#include <thread>

#include "engine/engine.h"
#include "engine/reference_forward.h"
#include "engine/sampler.h"
#include "engine/segment_reuse.h"

namespace cachette::sched {
namespace {

namespace fs = std::filesystem;
using kernels::KvType;
const std::string kShared = CACHETTE_SHARED_DIR;

int64_t Added(const LoadProgress& p, const std::string& tier = "") {
  int64_t n = 0;
  for (const TierTokens& t : p.added) {
    if (tier.empty() || t.tier == tier) n += t.tokens;
  }
  return n;
}

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

class TierBridgeTest : public ::testing::TestWithParam<KvType> {
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

TEST_P(TierBridgeTest, RestoredFromRamAndDiskEqualsCold) {
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
  const Hash128 kv_ns = KvNamespace(*model_, kv_type);
  EXPECT_NE(kv_ns, KvNamespace(*model_, kv_type, "tenant"));
  EXPECT_NE(KvNamespace(*model_, KvType::kF16), KvNamespace(*model_, KvType::kQ8_0));
  EXPECT_NE(KvNamespace(*model_, KvType::kQ8_0), KvNamespace(*model_, KvType::kQ4_0));
  EXPECT_NE(kv_ns, KvNamespace(*model_, kv_type, "", "adapter-a"));
  auto soon = [] { return std::chrono::steady_clock::now() + std::chrono::seconds(5); };

  {  // First process: compute, then save the full chunks (3 of 32 tokens).
    auto cache = OpenCache(64 << 20);
    KvManager kvm(KvOptions(engine));
    ASSERT_TRUE(TierBridge::Validate(*cache, kvm).ok());
    TierBridge tiers(kvm, *cache);
    auto seq = kvm.Start(kv_ns, prompt, 200);
    auto r = tiers.RestoreNow(*seq, prompt, soon());
    EXPECT_EQ(Added(r), 0);
    const Out first = Greedy(engine, *seq, prompt, n_gen);
    EXPECT_EQ(first.tokens, cold.tokens);
    EXPECT_EQ(tiers.Save(*seq, prompt, 0), 3 * 32) << "three chunks of 32 tokens";
    ASSERT_TRUE(cache->Flush().ok());

    // A fresh radix index (as after its pages were evicted): restored from RAM.
    KvManager fresh(KvOptions(engine));
    TierBridge t2(fresh, *cache);
    auto s2 = fresh.Start(kv_ns, prompt, 200);
    auto r2 = t2.RestoreNow(*s2, prompt, soon());
    EXPECT_EQ(Added(r2), 96);
    EXPECT_EQ(Added(r2, "ram"), 96);
    EXPECT_EQ(r2.tier_tokens, 96);
    const Out warm = Greedy(engine, *s2, prompt, n_gen);
    EXPECT_EQ(warm.tokens, cold.tokens);
    std::vector<double> ref(cold.first_logits.begin(), cold.first_logits.end());
    EXPECT_LT(testing::RelativeL2(warm.first_logits, ref), tol);
  }
  {  // A restarted process with no RAM tier: restored from the disk tier.
    auto cache = OpenCache(0);
    KvManager kvm(KvOptions(engine));
    TierBridge tiers(kvm, *cache);
    // A radix hit of 40 tokens (ending inside a chunk and inside a page) plus tier chunks.
    std::vector<TokenId> head(prompt.begin(), prompt.begin() + 40);
    auto pre = kvm.Start(kv_ns, head, 200);
    Greedy(engine, *pre, head, 1);
    kvm.Finish(*pre, head);
    auto seq = kvm.Start(kv_ns, prompt, 200);
    EXPECT_EQ(seq->cached_tokens(), 40);
    auto r = tiers.RestoreNow(*seq, prompt, soon());
    EXPECT_EQ(Added(r), 56);
    EXPECT_EQ(Added(r, "disk"), 56);
    const Out warm = Greedy(engine, *seq, prompt, n_gen);
    EXPECT_EQ(warm.tokens, cold.tokens);
    std::vector<double> ref(cold.first_logits.begin(), cold.first_logits.end());
    EXPECT_LT(testing::RelativeL2(warm.first_logits, ref), tol);
    // Another tenant's namespace never hits.
    auto other = kvm.Start(KvNamespace(*model_, kv_type, "b"), prompt, 200);
    EXPECT_EQ(Added(tiers.RestoreNow(*other, prompt, soon())), 0);
    other.reset();

    // A deadline already passed: nothing is restored, the whole prompt is recomputed.
    KvManager again(KvOptions(engine));
    TierBridge t3(again, *cache);
    auto late = again.Start(kv_ns, prompt, 200);
    EXPECT_EQ(Added(t3.RestoreNow(*late, prompt, std::chrono::steady_clock::now())), 0);
    EXPECT_EQ(late->n_tokens(), 0);

    // Clear(ns) reaches the store: the namespace's chunks are gone from every tier.
    ASSERT_TRUE(tiers.Clear(kv_ns).ok());
    auto cleared = again.Start(kv_ns, prompt, 200);
    EXPECT_EQ(Added(t3.RestoreNow(*cleared, prompt, soon())), 0);
  }
}

// Segments in the tiers (issue 11): a segment computed after a context and filed by one
// process is read back, byte for byte with its metadata, by a restarted one from disk, placed
// by the same prefill as the original; another context, another tenant or a cleared tenant
// finds nothing.
TEST_P(TierBridgeTest, SegmentsSurviveARestartOnDisk) {
  const KvType kv_type = GetParam();
  EngineOptions eo;
  eo.threads = 2;
  eo.kv_type = kv_type;
  Engine engine(*model_, eo);
  std::mt19937 rng(9);
  const std::vector<TokenId> context = {1, 300, 301};
  std::vector<TokenId> doc(77);  // 4 + 77 slots: three chunks of 32, the last one padded
  for (auto& t : doc) t = static_cast<TokenId>(rng() % 8000);
  Result<SegmentKv> seg = ComputeSegment(engine, context, doc);
  ASSERT_TRUE(seg.ok()) << seg.status().ToString();
  const Hash128 ns = KvNamespace(*model_, kv_type);
  auto soon = [] { return std::chrono::steady_clock::now() + std::chrono::seconds(5); };
  const SegmentRef ref{doc, ContextId(context)};
  auto load = [&](TierBridge& tiers, const Hash128& in, const SegmentRef& r) {
    std::shared_ptr<PendingSegments> p = tiers.StartSegmentLoad(in, {r}, soon());
    EXPECT_NE(p, nullptr);
    EXPECT_TRUE(p->WaitUntil(soon()));
    std::vector<std::shared_ptr<SegmentKv>> found = p->Take();
    EXPECT_EQ(found.size(), 1u);
    return found.empty() ? nullptr : found[0];
  };
  {
    auto cache = OpenCache(64 << 20);
    KvManager kvm(KvOptions(engine));
    TierBridge tiers(kvm, *cache);
    tiers.SaveSegment(ns, *seg);
    ASSERT_TRUE(cache->Flush().ok());
    EXPECT_EQ(tiers.Stats()["segments"]["saved"], 1);
    // Filed on disk only (the segment cache is its copy in memory), a band per layer (6).
    const CacheStats st = cache->Stats();
    EXPECT_EQ(st.tier[static_cast<int>(CacheTier::kRam)].entries, 0u);
    EXPECT_EQ(st.tier[static_cast<int>(CacheTier::kDisk)].entries, 3u * 6);
  }
  auto cache = OpenCache(0);  // no RAM tier: only the disk can answer
  KvManager kvm(KvOptions(engine));
  TierBridge tiers(kvm, *cache);
  {
    // Pipelined: the first band is handed over before the rest, then each layer as it comes.
    std::shared_ptr<PendingSegments> p = tiers.StartSegmentLoad(ns, {ref}, soon());
    ASSERT_NE(p, nullptr);
    while (!p->published()) std::this_thread::sleep_for(std::chrono::microseconds(100));
    std::shared_ptr<const SegmentKv> early = p->Found(doc, ref.context);
    ASSERT_NE(early, nullptr);
    EXPECT_EQ(p->Found(doc, ref.context + 1), nullptr);
    for (int l = 0; l < model_->config().n_layer; ++l) {
      ASSERT_TRUE(p->AwaitLayer(l, soon()).ok()) << l;
      EXPECT_EQ(early->k[l], seg->k[l]) << "layer " << l;
      EXPECT_EQ(early->v[l], seg->v[l]) << "layer " << l;
    }
    EXPECT_EQ(p->AwaitLayer(model_->config().n_layer, soon()).code(), StatusCode::kUnavailable);
    ASSERT_TRUE(p->WaitUntil(soon()));
    EXPECT_EQ(p->load_left_us(), 0);  // over
    const std::vector<std::shared_ptr<SegmentKv>> found = p->Take();
    ASSERT_EQ(found.size(), 1u);
    EXPECT_EQ(found[0], early);
  }
  std::shared_ptr<SegmentKv> back = load(tiers, ns, ref);
  ASSERT_NE(back, nullptr);
  EXPECT_EQ(back->tokens, seg->tokens);
  EXPECT_EQ(back->base_pos, 3);
  EXPECT_EQ(back->context, seg->context);
  EXPECT_EQ(back->inter, seg->inter);
  EXPECT_EQ(back->cci, seg->cci);
  ASSERT_EQ(back->k.size(), seg->k.size());
  for (size_t l = 0; l < seg->k.size(); ++l) {
    EXPECT_EQ(back->k[l], seg->k[l]) << "layer " << l;
    EXPECT_EQ(back->v[l], seg->v[l]) << "layer " << l;
  }
  // Placed after another prefix, the loaded segment gives what the original gives.
  std::vector<TokenId> prompt = {1, 500, 501, 502, 503};
  const int64_t at = static_cast<int64_t>(prompt.size());
  prompt.insert(prompt.end(), doc.begin(), doc.end());
  prompt.push_back(42);
  ReuseOptions blend;
  blend.mode = ReuseMode::kBlend;
  std::vector<float> a(model_->config().n_vocab), b(model_->config().n_vocab);
  for (const SegmentKv* use : {&*seg, back.get()}) {
    auto kv = engine.NewSequence(200);
    const SegmentUse u{at, use};
    ASSERT_TRUE(PrefillWithSegments(engine, *kv, prompt, {&u, 1}, blend,
                                    (use == back.get() ? b : a).data(), nullptr)
                    .ok());
  }
  EXPECT_EQ(a, b);
  const std::vector<TokenId> bos = {1};
  EXPECT_EQ(load(tiers, ns, SegmentRef{doc, ContextId(bos)}), nullptr) << "another context";
  EXPECT_EQ(load(tiers, KvNamespace(*model_, kv_type, "b"), ref), nullptr) << "another tenant";
  std::vector<TokenId> shorter(doc.begin(), doc.end() - 1);
  EXPECT_EQ(load(tiers, ns, SegmentRef{shorter, ref.context}), nullptr) << "a prefix of it";
  ASSERT_TRUE(tiers.Clear(ns).ok());
  EXPECT_EQ(load(tiers, ns, ref), nullptr) << "cleared with its tenant";
  EXPECT_EQ(tiers.Stats()["segments"]["loaded"], 2);
}

// Without an engine (cheap enough for ThreadSanitizer): pages filled with a known pattern are
// saved, then restored concurrently into fresh managers through the asynchronous path; every
// restored byte equals what was saved, a divergent prompt stops at the first differing chunk.
float Pattern(uint64_t tenant, int layer, int kv, int64_t pos, int i) {
  return static_cast<float>(tenant * 1000003 + layer * 10007 + kv * 101 + pos * 7 + i);
}

// What the byte-level tests share: a fresh temporary directory, a small f32 pool of `pages`
// pages of 16 tokens, and a store of 32-token chunks in 8 MiB of RAM and a disk tier there.
struct BytesSetup {
  fs::path dir;
  KvManagerOptions ko;
  CacheOptions co;
};

BytesSetup MakeBytesSetup(const std::string& name, int pages) {
  BytesSetup b;
  b.dir = fs::temp_directory_path() / (name + "_" + std::to_string(getpid()));
  fs::remove_all(b.dir);
  fs::create_directories(b.dir);
  b.ko.shape = KvShape{2, 2, 16, KvType::kF32};
  b.ko.page_tokens = 16;
  b.ko.budget_bytes = PagePool::PageBytes(b.ko.shape, 16) * pages;
  b.co.chunk_tokens = 32;
  b.co.ram_budget_bytes = 8 << 20;
  b.co.disk_dir = (b.dir / "disk").string();
  return b;
}

TEST(TierBridgeBytesTest, ConcurrentRestoresReturnTheSavedBytes) {
  auto [dir, ko, co] = MakeBytesSetup("cachette_bridge", 128);
  auto cache = Cache::Open(co);
  ASSERT_TRUE(cache.ok()) << cache.status().ToString();
  const int64_t n = 100;
  const int floats = 2 * 16;  // [n_kv_head][head_dim] per token, K or V
  auto prompt_of = [&](uint64_t tenant) {
    std::vector<TokenId> p(n);
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<TokenId>(tenant * 1000 + i);
    return p;
  };
  {
    KvManager kvm(ko);
    TierBridge bridge(kvm, **cache);
    for (uint64_t t = 0; t < 4; ++t) {
      const auto prompt = prompt_of(t);
      auto seq = kvm.Start(Hash128{t, 1}, prompt, n);
      ASSERT_TRUE(seq->Reserve(n).ok());
      for (int l = 0; l < 2; ++l) {
        for (int64_t pos = 0; pos < n; ++pos) {
          auto* k = static_cast<float*>(seq->KSlot(l, pos));
          auto* v = static_cast<float*>(seq->VSlot(l, pos));
          for (int i = 0; i < floats; ++i) {
            k[i] = Pattern(t, l, 0, pos, i);
            v[i] = Pattern(t, l, 1, pos, i);
          }
        }
      }
      seq->SetTokens(n);
      EXPECT_EQ(bridge.Save(*seq, prompt, 0), 3 * 32) << "three chunks of 32 tokens";
    }
    ASSERT_TRUE((*cache)->Flush().ok());
  }
  std::vector<int64_t> restored(5, -1), wrong(5, 0);
  auto restore = [&](KvManager& fresh, TierBridge& bridge, uint64_t t) {
      // t == 4 asks for tenant 0's prompt diverging at token 40: only chunk 0 matches.
      const uint64_t tenant = t == 4 ? 0 : t;
      auto prompt = prompt_of(tenant);
      if (t == 4) prompt[40] = 7;
      auto seq = fresh.Start(Hash128{tenant, 1}, prompt, n);
      LoadProgress p = bridge.RestoreNow(
          *seq, prompt, std::chrono::steady_clock::now() + std::chrono::seconds(10));
      restored[t] = seq->n_tokens();
      for (int l = 0; l < 2; ++l) {
        for (int64_t pos = 0; pos < seq->n_tokens(); ++pos) {
          const auto* k = static_cast<const float*>(seq->KSlot(l, pos));
          const auto* v = static_cast<const float*>(seq->VSlot(l, pos));
          for (int i = 0; i < floats; ++i) {
            wrong[t] += k[i] != Pattern(tenant, l, 0, pos, i);
            wrong[t] += v[i] != Pattern(tenant, l, 1, pos, i);
          }
        }
      }
      fresh.Finish(*seq, std::span<const TokenId>(prompt).first(seq->n_tokens()));
  };
  {
    KvManager fresh(ko);
    TierBridge bridge(fresh, **cache);
    std::vector<std::thread> threads;
    for (uint64_t t = 0; t < 4; ++t) {
      threads.emplace_back([&, t] { restore(fresh, bridge, t); });
    }
    for (auto& th : threads) th.join();
  }
  {
    KvManager fresh(ko);
    TierBridge bridge(fresh, **cache);
    restore(fresh, bridge, 4);
  }
  for (int t = 0; t < 4; ++t) {
    EXPECT_EQ(restored[t], 96) << "tenant " << t;
    EXPECT_EQ(wrong[t], 0) << "tenant " << t;
  }
  EXPECT_EQ(restored[4], 32);
  EXPECT_EQ(wrong[4], 0);
  cache->reset();
  fs::remove_all(dir);
}

// Regression: a segment read back from disk went into the RAM tier too (padded to whole
// chunks) besides the scheduler's segment cache, so a hot segment sat in memory twice. It
// enters the segment cache only; a prompt prefix read back from disk is still promoted.
TEST(TierBridgeBytesTest, SegmentsReadBackAreNotPromotedToRam) {
  auto [dir, ko, co] = MakeBytesSetup("cachette_segram", 32);
  const Hash128 ns{7, 1};
  SegmentKv seg;  // 4 + 40 slots: two chunks of 32, the last one padded
  seg.shape = ko.shape;
  seg.base_pos = 1;
  seg.context = 5;
  for (int i = 0; i < 40; ++i) seg.tokens.push_back(static_cast<TokenId>(100 + i));
  for (int l = 0; l < ko.shape.n_layer; ++l) {
    seg.k.emplace_back(seg.tokens.size() * ko.shape.token_bytes(), std::byte{1});
    seg.v.emplace_back(seg.tokens.size() * ko.shape.token_bytes(), std::byte{2});
  }
  std::vector<TokenId> prompt(64);
  for (int i = 0; i < 64; ++i) prompt[i] = static_cast<TokenId>(1000 + i);
  {  // First process: the segment filed on disk, a prompt's two chunks in RAM and on disk.
    auto cache = Cache::Open(co);
    ASSERT_TRUE(cache.ok()) << cache.status().ToString();
    KvManager kvm(ko);
    TierBridge bridge(kvm, **cache);
    bridge.SaveSegment(ns, seg);
    auto seq = kvm.Start(ns, prompt, 64);
    ASSERT_TRUE(seq->Reserve(64).ok());
    seq->SetTokens(64);
    EXPECT_EQ(bridge.Save(*seq, prompt, 0), 64);
    ASSERT_TRUE((*cache)->Flush().ok());
  }
  // A restarted process: its RAM tier is empty, the disk holds both.
  auto cache = Cache::Open(co);
  ASSERT_TRUE(cache.ok()) << cache.status().ToString();
  KvManager kvm(ko);
  TierBridge bridge(kvm, **cache);
  auto ram = [&] { return (*cache)->Stats().tier[static_cast<int>(CacheTier::kRam)]; };
  const auto soon = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  for (int round = 0; round < 2; ++round) {  // the second read comes from disk again
    std::shared_ptr<PendingSegments> p =
        bridge.StartSegmentLoad(ns, {SegmentRef{seg.tokens, seg.context}}, soon);
    ASSERT_NE(p, nullptr);
    ASSERT_TRUE(p->WaitUntil(soon));
    const std::vector<std::shared_ptr<SegmentKv>> found = p->Take();
    ASSERT_EQ(found.size(), 1u);
    ASSERT_NE(found[0], nullptr) << "round " << round;
    EXPECT_EQ(found[0]->k, seg.k);
    EXPECT_EQ(ram().entries, 0u) << "round " << round;
    EXPECT_EQ(ram().bytes_used, 0u) << "round " << round;
    EXPECT_EQ((*cache)->Stats().promotions, 0u) << "round " << round;
  }
  // Two rounds of two chunks in each of the two bands (one per layer).
  EXPECT_EQ((*cache)->Stats().tier[static_cast<int>(CacheTier::kDisk)].hit_chunks, 8u);
  EXPECT_EQ(bridge.Stats()["segments"]["loaded"], 2);
  // A prompt prefix read back from disk is promoted as before.
  auto seq = kvm.Start(ns, prompt, 64);
  const LoadProgress r = bridge.RestoreNow(*seq, prompt, soon);
  EXPECT_EQ(Added(r, "disk"), 64);
  EXPECT_EQ((*cache)->Stats().promotions, 2u);
  EXPECT_EQ(ram().entries, 2u);
  EXPECT_GT(ram().bytes_used, 0u);
  seq.reset();
  cache->reset();
  fs::remove_all(dir);
}

// The quantized pools go through the raw codec byte for byte, like the float ones.
INSTANTIATE_TEST_SUITE_P(KvTypes, TierBridgeTest,
                         ::testing::Values(KvType::kF32, KvType::kF16, KvType::kQ8_0,
                                           KvType::kQ4_0),
                         [](const auto& info) { return std::string(kernels::KvTypeName(info.param)); });

}  // namespace
}  // namespace cachette::sched
