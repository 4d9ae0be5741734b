// The scheduler against its naive twin: every request pushed through the batching loop must give
// the same greedy tokens as Generate() alone on a fresh contiguous KV cache.
#include "sched/scheduler.h"

#include <gtest/gtest.h>

#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <thread>

#include "cachette/cache.h"
#include "core/check.h"
#include "core/timer.h"
#include "engine/generate.h"
#include "kv/budget_runner.h"
#include "model/synth.h"
#include "sched/sched_test_util.h"
#include "sched/tier_bridge.h"

namespace cachette::sched {
namespace {

using kernels::KvType;
using sched_test::Collect;
using sched_test::Collected;
using sched_test::Text;
using sched_test::Trained;

// The F32 file, the default for every test. The matmul is batch-invariant for F32, Q8_0 and
// Q4_0 weights (docs/kernels.md), so the exactness tests also run on the trained Q8_0 file and
// on a synthetic Q4_0 model with the same vocabulary (TrainedQ8_0, SynthQ4_0).
const Model& TrainedQ8_0() {
  static std::unique_ptr<Model> m = [] {
    auto r = Model::Load(sched_test::SharedPath("/models/cachette-tiny-q8_0.gguf"));
    CT_CHECK(r.ok()) << r.status().ToString();
    return std::move(*r);
  }();
  return *m;
}

// Random weights (many greedy near-ties: a sharp test of exactness) over the trained vocabulary,
// so Text() gives valid ids.
const Model& SynthQ4_0() {
  static std::unique_ptr<Model> m = [] {
    const std::string path = ::testing::TempDir() + "scheduler_test_q4_0_" +
                             std::to_string(getpid()) + ".gguf";
    SynthOptions o;
    o.type = kernels::WType::kQ4_0;
    o.arch = "llama";
    o.vocab_path = sched_test::SharedPath("/models/cachette-tiny-vocab.gguf");
    o.n_vocab_cut = static_cast<int>(Trained().config().n_vocab);
    Status st = SynthesizeModel(o, path);
    CT_CHECK(st.ok()) << st.ToString();
    auto r = Model::Load(path);
    std::remove(path.c_str());
    CT_CHECK(r.ok()) << r.status().ToString();
    return std::move(*r);
  }();
  return *m;
}

class SchedulerTest : public ::testing::Test {
 protected:
  // A scheduler over `pages` pages of 16 tokens. `source` (borrowed) sits behind the radix
  // index; or, with ram_tier, a RAM-only chunk store (chunks of 32 tokens) through a TierBridge.
  void Build(size_t pages, SchedulerOptions so, PrefixSource* source = nullptr,
             bool ram_tier = false) {
    EngineOptions eo;
    eo.threads = 2;
    eo.kv_type = KvType::kF32;
    engine_ = std::make_unique<Engine>(*model_, eo);
    ref_engine_ = std::make_unique<Engine>(*model_, eo);  // the loop owns engine_
    KvManagerOptions ko;
    ko.shape = engine_->kv_shape();
    ko.page_tokens = 16;
    ko.budget_bytes = PagePool::PageBytes(ko.shape, 16) * pages;
    kv_ = std::make_unique<KvManager>(ko);
    if (ram_tier) {
      store_ = sched_test::RamOnlyStore();
      bridge_ = std::make_unique<TierBridge>(*kv_, *store_);
      source = bridge_.get();
    }
    sched_ = std::make_unique<Scheduler>(*engine_, *kv_, so, source);
  }
  // A long request that has started streaming, so the requests submitted next wait for it.
  std::shared_ptr<RequestStream> Blocker(int n = 30) {
    SchedRequest r = Req(Text("Once upon a time"), n);
    r.gen.ignore_eos = true;
    auto st = sched_->Submit(std::move(r));
    CT_CHECK(st.ok()) << st.status().ToString();
    StreamEvent e;
    CT_CHECK((*st)->Next(&e, std::chrono::milliseconds(30000)));
    return *st;
  }
  void TearDown() override {
    sched_.reset();
    bridge_.reset();
    store_.reset();
    kv_.reset();
    engine_.reset();
    ref_engine_.reset();
  }
  std::vector<TokenId> Reference(const std::vector<TokenId>& prompt, int n,
                                 bool ignore_eos = false) {
    auto kv = ref_engine_->NewSequence(static_cast<int64_t>(prompt.size()) + n + 1);
    GenerateOptions go;
    go.max_tokens = n;
    go.ignore_eos = ignore_eos;
    auto r = Generate(*ref_engine_, *kv, prompt, go);
    CT_CHECK(r.ok()) << r.status().ToString();
    return r->tokens;
  }
  SchedRequest Req(std::vector<TokenId> prompt, int n, std::string salt = "") {
    SchedRequest r;
    r.prompt = std::move(prompt);
    r.gen.max_tokens = n;
    r.cache_salt = std::move(salt);
    return r;
  }

  const Model* model_ = &Trained();  // the exactness tests also set a quantized one
  std::unique_ptr<Engine> engine_, ref_engine_;
  std::unique_ptr<KvManager> kv_;
  std::unique_ptr<Cache> store_;
  std::unique_ptr<TierBridge> bridge_;
  std::unique_ptr<Scheduler> sched_;
};

// The exactness tests, on each batch-invariant weight type: F32 and Q8_0 (the trained files)
// and Q4_0 (synthetic).
class SchedulerExactTest : public SchedulerTest,
                           public ::testing::WithParamInterface<const char*> {
 protected:
  void SetUp() override {
    const std::string t = GetParam();
    model_ = t == "q8_0" ? &TrainedQ8_0() : t == "q4_0" ? &SynthQ4_0() : &Trained();
  }
};

const char* kPrompts[] = {
    "The history of the",
    "In the beginning God created the heaven and the earth. And the earth was without form,",
    "The kernel documentation describes how to configure the",
    "A dictionary defines the word",
    ("Python is a programming language that lets you work quickly and integrate systems more "
     "effectively. The standard library"),
    "Once upon a time",
};

TEST_P(SchedulerExactTest, BatchedGreedyMatchesGenerateAlone) {
  SchedulerOptions so;
  so.max_running = 4;
  so.step_tokens = 24;  // forces prompts to be prefilled in chunks beside running decodes
  Build(512, so);
  const int n = 16;
  std::vector<std::shared_ptr<RequestStream>> streams;
  for (const char* p : kPrompts) {
    auto s = sched_->Submit(Req(Text(p), n));
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    streams.push_back(*s);
  }
  for (size_t i = 0; i < streams.size(); ++i) {
    Collected c = Collect(*streams[i]);
    ASSERT_EQ(c.last.kind, StreamEvent::Kind::kDone) << c.last.error.ToString();
    EXPECT_EQ(c.tokens, Reference(Text(kPrompts[i]), n)) << kPrompts[i];
    EXPECT_EQ(c.last.usage.completion_tokens, static_cast<int64_t>(c.tokens.size()));
  }
  EXPECT_GT(sched_->Stats().steps, 0u);
}

TEST_P(SchedulerExactTest, PrefixReuseIsExactAndPerTenant) {
  Build(512, {});
  const auto prompt = Text("The kernel documentation describes how to configure the build of "
                           "modules for a system with many devices and drivers");
  const int64_t len = static_cast<int64_t>(prompt.size());
  auto run = [&](const std::vector<TokenId>& p, const std::string& salt, int n) {
    auto s = sched_->Submit(Req(p, n, salt));
    CT_CHECK(s.ok());
    return Collect(**s);
  };
  const Collected cold = run(prompt, "a", 1);  // one token: nothing generated enters the KV
  EXPECT_EQ(cold.last.usage.cached_tokens, 0);
  const Collected warm = run(prompt, "a", 1);
  EXPECT_EQ(warm.last.usage.cached_tokens, len - 1);  // the last token is recomputed
  EXPECT_EQ(warm.tokens, cold.tokens);
  auto longer = prompt;
  for (TokenId t : Text(" and more text"))
    if (t != Trained().tokenizer().bos()) longer.push_back(t);
  const Collected ext = run(longer, "a", 8);
  EXPECT_EQ(ext.last.usage.cached_tokens, len);
  ASSERT_EQ(ext.last.usage.cached_by_tier.size(), 1u);
  EXPECT_EQ(ext.last.usage.cached_by_tier[0].tier, "memory");
  EXPECT_EQ(ext.tokens, Reference(longer, 8));
  EXPECT_EQ(run(prompt, "b", 1).last.usage.cached_tokens, 0);  // another tenant never hits
}

INSTANTIATE_TEST_SUITE_P(WeightTypes, SchedulerExactTest, ::testing::Values("f32", "q8_0", "q4_0"),
                         [](const auto& info) { return std::string(info.param); });

// BOS, two documents (d2, then d1) and a question about d1, as segments.
struct LighthouseRag {
  LighthouseRag() {
    const Tokenizer& tok = Trained().tokenizer();
    auto plain = [&](const char* t) { return tok.Encode(t, false, false); };
    d1 = plain(" The lighthouse on the cape was built in 1871 and electrified in 1951.");
    d2 = plain(" The town below the cape lived from herring fishing every spring.");
    q = plain(" When was the lighthouse electrified? It was electrified in");
    bos = {tok.bos()};
    prompt = bos;
    for (const auto* part : {&d2, &d1, &q}) {
      spans.push_back({static_cast<int64_t>(prompt.size()), static_cast<int64_t>(part->size())});
      prompt.insert(prompt.end(), part->begin(), part->end());
    }
  }
  std::vector<TokenId> d1, d2, q, bos, prompt;
  std::vector<SegmentSpan> spans;
};

// Segment reuse (issue 11): documents precomputed once are placed in a later prompt; blend at
// ratio 1 recomputes every placed token (= full prefill), naive none; only the exact prefix
// (BOS + the first document, in place after its own context) enters the radix index; another
// tenant reuses nothing; clearing a tenant drops its segments.
TEST_F(SchedulerTest, SegmentReuseIsPerTenantAndCommitsOnlyTheExactPrefix) {
  Build(512, {});
  const LighthouseRag rag;
  const auto &d1 = rag.d1, &d2 = rag.d2, &q = rag.q, &bos = rag.bos, &prompt = rag.prompt;
  const std::vector<SegmentSpan>& spans = rag.spans;
  auto pre = sched_->PrecomputeSegments("", bos, {d1, d2}, 0);
  ASSERT_TRUE(pre.ok()) << pre.status().ToString();
  ASSERT_EQ(pre->size(), 2u);
  EXPECT_FALSE((*pre)[0].cached);
  EXPECT_EQ((*pre)[0].tokens, static_cast<int64_t>(d1.size()));
  EXPECT_TRUE((*sched_->PrecomputeSegments("", bos, {d1}, 0))[0].cached);

  auto run = [&](ReuseMode mode, double ratio, const std::string& salt) {
    SchedRequest r = Req(prompt, 8, salt);
    r.segments = spans;
    r.reuse.mode = mode;
    r.reuse.ratio = ratio;
    auto st = sched_->Submit(std::move(r));
    CT_CHECK(st.ok()) << st.status().ToString();
    return Collect(**st);
  };
  const int64_t exact = 1 + static_cast<int64_t>(d2.size());
  const Collected blend = run(ReuseMode::kBlend, 1.0, "");
  ASSERT_EQ(blend.last.kind, StreamEvent::Kind::kDone) << blend.last.error.ToString();
  EXPECT_EQ(blend.tokens, Reference(prompt, 8));
  EXPECT_EQ(blend.last.usage.segment_tokens, static_cast<int64_t>(d1.size()));
  EXPECT_EQ(blend.last.usage.cached_tokens, exact - 1 + static_cast<int64_t>(d1.size()));
  EXPECT_GE(blend.last.usage.recomputed_tokens, static_cast<int64_t>(d1.size()));
  // The radix index holds the exact prefix, not the approximate KV after it.
  EXPECT_EQ(sched_->kv().CachedPrefix(sched_->Namespace(""), prompt), exact);

  const Collected naive = run(ReuseMode::kNaive, 0.15, "");
  ASSERT_EQ(naive.last.kind, StreamEvent::Kind::kDone) << naive.last.error.ToString();
  EXPECT_EQ(naive.last.usage.recomputed_tokens, 0);
  // d1 and the question (stored by the blend request) placed; the exact prefix from memory.
  EXPECT_EQ(naive.last.usage.segment_tokens,
            static_cast<int64_t>(d1.size() + q.size()) - 1);
  EXPECT_EQ(naive.last.usage.cached_by_tier[0].tokens, exact);
  EXPECT_EQ(sched_->kv().CachedPrefix(sched_->Namespace(""), prompt), exact);

  const Collected other = run(ReuseMode::kNaive, 0.15, "other");
  EXPECT_EQ(other.last.usage.cached_tokens, 0);
  EXPECT_EQ(other.last.usage.segment_tokens, 0);
  EXPECT_EQ(other.tokens, naive.tokens);  // computed afresh, placed the same way

  const size_t before = sched_->segment_cache().GetStats().entries;
  ASSERT_TRUE(sched_->ClearTenant("").ok());
  EXPECT_EQ(sched_->segment_cache().GetStats().entries, before - 3);  // d1, d2, q of ""
  EXPECT_GT(sched_->Stats().segment_tokens, 0u);

  SchedRequest ape = Req(prompt, 1);
  ape.segments = {spans[0], spans[2]};  // text (d1) between the document and the query's end
  ape.segments[1].offset += 1;
  ape.segments[1].length -= 1;
  ape.reuse.mode = ReuseMode::kApe;
  EXPECT_EQ(sched_->Submit(std::move(ape)).status().code(), StatusCode::kOk);
  SchedRequest ape_one = Req(prompt, 1);
  ape_one.segments = {spans[2]};  // the query alone: no document
  ape_one.reuse.mode = ReuseMode::kApe;
  EXPECT_EQ(sched_->Submit(std::move(ape_one)).status().code(), StatusCode::kInvalidArgument);
  SchedRequest ape_gap = Req(prompt, 1);
  ape_gap.segments = {{spans[0].offset, spans[0].length - 1}, spans[1], spans[2]};
  ape_gap.reuse.mode = ReuseMode::kApe;
  EXPECT_EQ(sched_->Submit(std::move(ape_gap)).status().code(), StatusCode::kInvalidArgument);
  SchedRequest overlap = Req(prompt, 1);
  overlap.segments = {{1, 4}, {3, 2}};
  overlap.reuse.mode = ReuseMode::kNaive;
  EXPECT_EQ(sched_->Submit(std::move(overlap)).status().code(), StatusCode::kInvalidArgument);
}

// APE through the scheduler (engine/ape.h): with one document and T = S = 1 its two-part
// attention is ordinary attention, so the output is full prefill's; with T = S = 0.9 and two
// documents laid out in parallel the documents come from the segment cache (reused on the
// second request) and decoding goes on through DecodeApe beside ordinary decodes.
TEST_F(SchedulerTest, ApeServesDocumentsInParallel) {
  Build(512, {});
  const Tokenizer& tok = Trained().tokenizer();
  auto plain = [&](const char* t) { return tok.Encode(t, false, false); };
  const auto d1 = plain(" The lighthouse on the cape was built in 1871 and electrified in 1951.");
  const auto d2 = plain(" The town below the cape lived from herring fishing every spring.");
  const auto q = plain(" When was the lighthouse electrified? It was electrified in");
  auto build = [&](std::vector<const std::vector<TokenId>*> docs, std::vector<SegmentSpan>* sp) {
    std::vector<TokenId> p = {tok.bos()};
    docs.push_back(&q);
    for (const auto* part : docs) {
      sp->push_back({static_cast<int64_t>(p.size()), static_cast<int64_t>(part->size())});
      p.insert(p.end(), part->begin(), part->end());
    }
    return p;
  };
  auto run = [&](const std::vector<TokenId>& prompt, const std::vector<SegmentSpan>& spans,
                 double t, double s) {
    SchedRequest r = Req(prompt, 8);
    r.segments = spans;
    r.reuse.mode = ReuseMode::kApe;
    r.ape = ApeOptions{t, s};
    auto st = sched_->Submit(std::move(r));
    CT_CHECK(st.ok()) << st.status().ToString();
    return Collect(**st);
  };
  std::vector<SegmentSpan> one_spans;
  const auto one = build({&d1}, &one_spans);
  const Collected exact = run(one, one_spans, 1.0, 1.0);
  ASSERT_EQ(exact.last.kind, StreamEvent::Kind::kDone) << exact.last.error.ToString();
  EXPECT_EQ(exact.tokens, Reference(one, 8));

  std::vector<SegmentSpan> two_spans;
  const auto two = build({&d2, &d1}, &two_spans);
  // An ordinary request decoding at the same time.
  auto other = sched_->Submit(Req(two, 8, "other"));
  ASSERT_TRUE(other.ok());
  const Collected first = run(two, two_spans, 0.9, 0.9);
  const Collected second = run(two, two_spans, 0.9, 0.9);
  const Collected plain_run = Collect(**other);
  ASSERT_EQ(second.last.kind, StreamEvent::Kind::kDone) << second.last.error.ToString();
  EXPECT_EQ(first.tokens.size(), 8u);
  EXPECT_EQ(second.tokens, first.tokens);
  EXPECT_EQ(second.last.usage.segment_tokens, static_cast<int64_t>(d1.size() + d2.size()));
  EXPECT_EQ(plain_run.tokens, Reference(two, 8));
  // Only BOS (the prefix) is exact: the radix index holds no more of the APE layout.
  EXPECT_LE(sched_->kv().CachedPrefix(sched_->Namespace(""), two), 1);
}

// Relay (RelayCaching): agent A's answer is kept as a segment when A finishes; agent B, whose
// prompt quotes that answer after other text, places it instead of prefilling it. With blend
// at ratio 1 B's output is full prefill's; without --relay nothing is kept.
TEST_F(SchedulerTest, RelayReusesAnEarlierRequestsOutput) {
  for (bool relay : {true, false}) {
    SchedulerOptions so;
    so.relay = relay;
    Build(512, so);
    const Tokenizer& tok = Trained().tokenizer();
    auto plain = [&](const char* t) { return tok.Encode(t, false, false); };
    std::vector<TokenId> a_prompt = {tok.bos()};
    const auto a_text = plain(" Write one line about the lighthouse on the cape:");
    a_prompt.insert(a_prompt.end(), a_text.begin(), a_text.end());
    SchedRequest a = Req(a_prompt, 12);
    a.gen.ignore_eos = true;
    auto sa = sched_->Submit(std::move(a));
    ASSERT_TRUE(sa.ok());
    const Collected out = Collect(**sa);
    ASSERT_EQ(out.tokens.size(), 12u);
    // B: another agent's prompt quoting A's answer (as generated: A's KV lacks its last
    // token, which ended on max_tokens), then a question.
    std::vector<TokenId> b_prompt = {tok.bos()};
    const auto intro = plain(" Another agent said:");
    const auto q = plain(" Is that true? Answer:");
    b_prompt.insert(b_prompt.end(), intro.begin(), intro.end());
    const int64_t at = static_cast<int64_t>(b_prompt.size());
    b_prompt.insert(b_prompt.end(), out.tokens.begin(), out.tokens.end());
    const int64_t q_at = static_cast<int64_t>(b_prompt.size());
    b_prompt.insert(b_prompt.end(), q.begin(), q.end());
    auto run = [&](ReuseMode mode, double ratio) {
      SchedRequest r = Req(b_prompt, 6);
      r.segments = {{at, static_cast<int64_t>(out.tokens.size())},
                    {q_at, static_cast<int64_t>(q.size())}};
      r.reuse.mode = mode;
      r.reuse.ratio = ratio;
      auto st = sched_->Submit(std::move(r));
      CT_CHECK(st.ok()) << st.status().ToString();
      return Collect(**st);
    };
    const Collected naive = run(ReuseMode::kNaive, 0);
    ASSERT_EQ(naive.last.kind, StreamEvent::Kind::kDone) << naive.last.error.ToString();
    if (relay) {
      EXPECT_EQ(naive.last.usage.segment_tokens, 11) << "A's 11 fed tokens placed";
      EXPECT_EQ(naive.last.usage.recomputed_tokens, 0);
      EXPECT_EQ(sched_->Stats().relay_saved, 2u);  // A, and B itself when it finished
      EXPECT_EQ(sched_->Stats().relay_hits, 1u);
    } else {
      EXPECT_EQ(naive.last.usage.segment_tokens, 0) << "no relay: computed on its own";
      EXPECT_EQ(sched_->Stats().relay_saved, 0u);
    }
    const Collected blend = run(ReuseMode::kBlend, 1.0);
    EXPECT_EQ(blend.tokens, Reference(b_prompt, 6));
  }
}

TEST_F(SchedulerTest, TinyBudgetQueuesInsteadOfFailing) {
  SchedulerOptions so;
  so.max_running = 8;
  Build(12, so);  // 12 pages of 16 tokens; each request below needs up to 4
  const int n = 24;
  std::vector<std::shared_ptr<RequestStream>> streams;
  for (const char* p : kPrompts) {
    auto s = sched_->Submit(Req(Text(p), n, p));  // distinct tenants: no sharing
    ASSERT_TRUE(s.ok());
    streams.push_back(*s);
  }
  for (size_t i = 0; i < streams.size(); ++i) {
    Collected c = Collect(*streams[i]);
    ASSERT_EQ(c.last.kind, StreamEvent::Kind::kDone) << c.last.error.ToString();
    EXPECT_EQ(c.tokens, Reference(Text(kPrompts[i]), n));
  }
  const SchedulerStats st = sched_->Stats();
  EXPECT_EQ(st.failed, 0u);
  EXPECT_EQ(st.reserve_failures, 0u);
  // A request bigger than the whole pool is refused up front.
  auto big = sched_->Submit(Req(Text("x"), 16 * 12 + 1));
  EXPECT_EQ(big.status().code(), StatusCode::kInvalidArgument);
}

TEST_F(SchedulerTest, ARequestNeedingTheWholePoolDropsAPartialPageItShares) {
  // 8 pages of 16 tokens. The first request leaves its prompt cached, the last page partial;
  // the second shares part of that page and needs all 8 pages: keeping the shared partial page
  // (copied before its first write) would take a 9th, so it prefills those tokens again
  // instead of waiting forever.
  Build(8, {});
  const auto a = Text("The history of the world is long");
  auto first = sched_->Submit(Req(a, 1));
  ASSERT_TRUE(first.ok());
  ASSERT_EQ(Collect(**first).last.kind, StreamEvent::Kind::kDone);
  std::vector<TokenId> b(a.begin(), a.begin() + 5);
  for (TokenId t : Text(" and a dictionary defines the word")) {
    if (t != Trained().tokenizer().bos()) b.push_back(t);
  }
  const int n = 128 - static_cast<int>(b.size());  // prompt + output: exactly 8 pages
  SchedRequest r = Req(b, n);
  r.gen.ignore_eos = true;
  auto second = sched_->Submit(std::move(r));
  ASSERT_TRUE(second.ok()) << second.status().ToString();
  const Collected c = Collect(**second);
  ASSERT_EQ(c.last.kind, StreamEvent::Kind::kDone) << c.last.error.ToString();
  EXPECT_EQ(c.last.usage.cached_tokens, 0);
  EXPECT_EQ(c.tokens, Reference(b, n, true));
}

TEST_F(SchedulerTest, CancelFreesTheSequenceAtOnce) {
  Build(512, {});
  auto s = sched_->Submit(Req(Text("Once upon a time"), 1500));
  ASSERT_TRUE(s.ok());
  StreamEvent e;
  for (int got = 0; got < 3;) {
    ASSERT_TRUE((*s)->Next(&e, std::chrono::milliseconds(30000)));
    ASSERT_EQ(e.kind, StreamEvent::Kind::kToken);
    ++got;
  }
  (*s)->Cancel();
  Collected rest = Collect(**s);
  EXPECT_EQ(rest.last.kind, StreamEvent::Kind::kDone);
  EXPECT_EQ(rest.last.finish, GenerateResult::Finish::kCancelled);
  const KvManager::Stats ks = kv_->GetStats();
  EXPECT_EQ(ks.pages_used, ks.pages_cached_unreferenced);  // no running sequence holds a page
  // The counts are published at the end of the loop iteration that pushed the event.
  for (int i = 0; i < 500 && sched_->Stats().running != 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(sched_->Stats().running, 0);
  EXPECT_EQ(sched_->Stats().cancelled, 1u);
}

TEST_F(SchedulerTest, FullQueueRejectsAndPriorityOrders) {
  SchedulerOptions so;
  so.max_running = 1;
  so.max_queue = 2;
  Build(512, so);
  auto blocker = sched_->Submit(Req(Text("The history of the"), 48));
  ASSERT_TRUE(blocker.ok());
  SchedRequest low = Req(Text("A dictionary defines the word"), 4);
  SchedRequest high = Req(Text("Once upon a time"), 4);
  high.priority = 5;
  auto a = sched_->Submit(std::move(low));
  auto b = sched_->Submit(std::move(high));
  // Two wait at most: of blocker, low, high and one more, at least one is refused.
  auto extra = sched_->Submit(Req(Text("x"), 1));
  const int refused = !a.ok() + !b.ok() + !extra.ok();
  EXPECT_GE(refused, 1);
  if (!extra.ok()) {
    EXPECT_EQ(extra.status().code(), StatusCode::kResourceExhausted);
  }
  if (a.ok() && b.ok()) {
    std::atomic<int> order{0};
    int done_a = 0, done_b = 0;
    std::thread ta([&] { Collect(**a); done_a = ++order; });
    std::thread tb([&] { Collect(**b); done_b = ++order; });
    ta.join();
    tb.join();
    EXPECT_LT(done_b, done_a) << "the higher priority request runs first";
  }
  Collect(**blocker);
  if (extra.ok()) Collect(**extra);
}

TEST_F(SchedulerTest, SessionsAndCacheControlPin) {
  Build(512, {});
  SchedRequest r = Req(Text("Once upon a time there was a"), 6);
  r.session_id = "agent-1";
  r.pin_ttl_ms = 60000;
  auto s = sched_->Submit(std::move(r));
  ASSERT_TRUE(s.ok());
  Collected c = Collect(**s);
  EXPECT_NE(c.last.usage.pin_id, 0u);
  const auto pins = sched_->pins().List();
  ASSERT_EQ(pins.size(), 2u);  // the cache_control pin and the session's
  EXPECT_EQ(sched_->pins().sessions(), 1u);
  EXPECT_GT(kv_->GetStats().pages_pinned, 0u);
  EXPECT_TRUE(sched_->pins().RemoveSession("agent-1"));
  EXPECT_TRUE(sched_->pins().Remove(c.last.usage.pin_id));
  EXPECT_EQ(kv_->GetStats().pages_pinned, 0u);
}

// A source whose loads finish only when the test opens the gate (a frozen tier), and which
// records the namespaces it was asked to clear.
class GateSource final : public PrefixSource {
 public:
  struct Load final : PendingLoad {};
  std::unique_ptr<PendingLoad> StartLoad(const Hash128&, std::span<const TokenId>, int64_t,
                                         SteadyTime) override {
    ++started;
    return std::make_unique<Load>();
  }
  LoadProgress ApplyLoad(PendingLoad&, PagedSequence&) override {
    return {open.load(), {}, 0};
  }
  int64_t Save(PagedSequence&, std::span<const TokenId>, int64_t skip) override {
    ++saves;
    return skip;
  }
  Status Clear(const Hash128& ns) override {
    std::lock_guard<std::mutex> lock(mu);
    cleared.push_back(ns);
    return Status::Ok();
  }
  std::atomic<bool> open{false};
  std::atomic<int> started{0}, saves{0};
  std::mutex mu;
  std::vector<Hash128> cleared;
};

TEST_F(SchedulerTest, LoadingRequestDoesNotStallRunningDecodes) {
  GateSource gate;
  SchedulerOptions so;
  so.max_running = 4;
  Build(512, so, &gate);
  const auto pa = Text("Once upon a time");
  auto a = sched_->Submit(Req(pa, 40, "a"));
  ASSERT_TRUE(a.ok());
  StreamEvent e;
  std::vector<TokenId> got;
  auto next_token = [&] {
    EXPECT_TRUE((*a)->Next(&e, std::chrono::milliseconds(30000)));
    EXPECT_EQ(e.kind, StreamEvent::Kind::kToken);
    got.push_back(e.token);
  };
  // `a` is admitted while the gate is closed too: it waits for its own load first.
  gate.open = true;
  for (int i = 0; i < 3; ++i) next_token();
  gate.open = false;
  // `b` waits for a tier that does not answer; `a` keeps decoding meanwhile.
  const auto pb = Text("A dictionary defines the word");
  auto b = sched_->Submit(Req(pb, 8, "b"));
  ASSERT_TRUE(b.ok());
  for (int i = 0; i < 20; ++i) next_token();
  EXPECT_EQ(gate.started.load(), 2);
  EXPECT_FALSE((*b)->Next(&e, std::chrono::milliseconds(0))) << "b produced while loading";
  gate.open = true;
  Collected cb = Collect(**b);
  ASSERT_EQ(cb.last.kind, StreamEvent::Kind::kDone) << cb.last.error.ToString();
  EXPECT_EQ(cb.tokens, Reference(pb, 8));
  Collected ca = Collect(**a);
  got.insert(got.end(), ca.tokens.begin(), ca.tokens.end());
  EXPECT_EQ(got, Reference(pa, 40));
  EXPECT_EQ(gate.saves.load(), 2);
}

// Segments read from the tiers band by band (CacheBlend's pipeline), by a source the test
// drives: the prefill starts on the first layer and awaits the others, so what it computes
// with them (zeros until the test fills them) is the same as with segments precomputed in
// memory; a load whose later band never comes is redone at the next step with the segments
// computed as misses, with the same output.
class BandSource final : public NoPrefixSource {
 public:
  std::shared_ptr<PendingSegments> StartSegmentLoad(const Hash128&, std::vector<SegmentRef> refs,
                                                    SteadyTime) override {
    std::lock_guard<std::mutex> lock(mu);
    pending = std::make_shared<PendingSegments>(std::move(refs), std::vector<int>{1, n_layer});
    return pending;
  }
  std::shared_ptr<PendingSegments> Pending() {
    std::lock_guard<std::mutex> lock(mu);
    return pending;
  }
  int n_layer = 0;
  std::mutex mu;
  std::shared_ptr<PendingSegments> pending;
};

TEST_F(SchedulerTest, SegmentsLoadingBandByBandGiveThePrecomputedOutput) {
  const LighthouseRag rag;
  const auto &d1 = rag.d1, &d2 = rag.d2, &q = rag.q, &bos = rag.bos, &prompt = rag.prompt;
  const std::vector<SegmentSpan>& spans = rag.spans;
  auto run = [&] {
    SchedRequest r = Req(prompt, 8);
    r.segments = spans;
    r.reuse.mode = ReuseMode::kBlend;
    r.reuse.ratio = 0.3;
    auto st = sched_->Submit(std::move(r));
    CT_CHECK(st.ok()) << st.status().ToString();
    return *st;
  };
  // The reference: every segment precomputed in memory.
  Build(512, {});
  ASSERT_TRUE(sched_->PrecomputeSegments("", bos, {d1, d2, q}, 0).ok());
  const Collected want = Collect(*run());
  ASSERT_EQ(want.last.kind, StreamEvent::Kind::kDone) << want.last.error.ToString();

  for (const bool lose_a_band : {false, true}) {
    SCOPED_TRACE(lose_a_band ? "a band lost" : "every band");
    BandSource source;
    source.n_layer = Trained().config().n_layer;
    sched_.reset();
    SchedulerOptions so;
    so.load_deadline_ms = 60000;  // the test fills the bands, slowly under the sanitizers
    Build(512, so, &source);
    std::shared_ptr<RequestStream> stream = run();
    std::shared_ptr<PendingSegments> p;
    for (int i = 0; i < 30000 && (p = source.Pending()) == nullptr; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    ASSERT_NE(p, nullptr);
    ASSERT_EQ(p->refs().size(), 3u);
    // What the tiers hold: each segment as computed after BOS, its layers from 1 on zeros until
    // their band "arrives".
    std::vector<SegmentKv> full;
    std::vector<std::shared_ptr<SegmentKv>> found;
    for (const SegmentRef& ref : p->refs()) {
      Result<SegmentKv> seg = ComputeSegment(*ref_engine_, bos, ref.tokens);
      ASSERT_TRUE(seg.ok()) << seg.status().ToString();
      full.push_back(*seg);
      for (int l = 1; l < source.n_layer; ++l) {
        std::fill(seg->k[l].begin(), seg->k[l].end(), std::byte{0});
        std::fill(seg->v[l].begin(), seg->v[l].end(), std::byte{0});
      }
      found.push_back(std::make_shared<SegmentKv>(std::move(*seg)));
    }
    p->Publish(found, 1000.0);
    // The prefill starts on layer 0 and waits for layer 1; held there at least 50 ms (the
    // scheduler's step may start late under the sanitizers, so wait for it to be waiting).
    for (int i = 0; i < 30000 && p->waiting() == 0; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    ASSERT_EQ(p->waiting(), 1) << "the prefill never waited for layer 1";
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    EXPECT_EQ(sched_->Stats().segment_prefills, 0u);
    if (lose_a_band) {
      p->Fail();
    } else {
      for (size_t i = 0; i < found.size(); ++i) {
        for (int l = 1; l < source.n_layer; ++l) {
          found[i]->k[l] = full[i].k[l];
          found[i]->v[l] = full[i].v[l];
        }
      }
      p->Advance(60000.0);
    }
    p->Finish();
    const Collected got = Collect(*stream);
    ASSERT_EQ(got.last.kind, StreamEvent::Kind::kDone) << got.last.error.ToString();
    EXPECT_EQ(got.tokens, want.tokens);
    const SchedulerStats st = sched_->Stats();
    EXPECT_EQ(st.segment_prefills, 1u);
    if (lose_a_band) {
      EXPECT_EQ(st.segment_pipelined_prefills, 0u);
      EXPECT_EQ(st.segment_tier_hits, 0u);
      EXPECT_EQ(st.segment_computed_tokens, d1.size() + d2.size() + q.size());
    } else {
      EXPECT_EQ(st.segment_pipelined_prefills, 1u);
      EXPECT_GE(st.segment_load_wait_us, 20000u);
      EXPECT_EQ(st.segment_tier_hits, 3u);
      EXPECT_EQ(st.segment_computed_tokens, 0u);
      EXPECT_EQ(got.last.usage.segment_tokens, want.last.usage.segment_tokens);
      EXPECT_EQ(got.last.usage.recomputed_tokens, want.last.usage.recomputed_tokens);
    }
    sched_.reset();  // before the source it borrows
  }
}

// RetrySegmentPrefill: a segment prefill that cannot reserve its pages (taken after its
// admission, here by the test's own sequence) waits a step while another request decodes,
// counted in reserve_failures like a batch prefill that cannot reserve, and completes exactly
// once the pages are back; with nothing else running it fails with kResourceExhausted rather
// than wait for pages no one will free. Each request is admitted while the gate holds it in
// its (empty) tier load, so the pages go after its admission and before its prefill.
TEST_F(SchedulerTest, SegmentPrefillShortOfPagesWaitsForRunningDecodes) {
  GateSource gate;
  SchedulerOptions so;
  so.max_running = 4;
  Build(64, so, &gate);  // 64 pages of 16 tokens
  const Tokenizer& tok = Trained().tokenizer();
  auto plain = [&](const char* t) { return tok.Encode(t, false, false); };
  const auto line = plain(" The lighthouse on the cape was built in 1871 and electrified in 1951.");
  const std::vector<TokenId> doc = [&] {
    std::vector<TokenId> d;
    while (d.size() < 480) d.insert(d.end(), line.begin(), line.end());
    return d;
  }();
  const auto q = plain(" When was the lighthouse electrified? It was electrified in");
  const std::vector<TokenId> bos = {tok.bos()};
  std::vector<TokenId> prompt = bos;
  std::vector<SegmentSpan> spans;
  for (const auto* part : {&doc, &q}) {
    spans.push_back({static_cast<int64_t>(prompt.size()), static_cast<int64_t>(part->size())});
    prompt.insert(prompt.end(), part->begin(), part->end());
  }
  const int64_t prompt_pages = (static_cast<int64_t>(prompt.size()) + 15) / 16;
  ASSERT_TRUE(sched_->PrecomputeSegments("", bos, {doc, q}, 0).ok());
  auto submit = [&](const std::string& salt) {
    SchedRequest r = Req(prompt, 8, salt);
    r.segments = spans;
    r.reuse.mode = ReuseMode::kBlend;
    r.reuse.ratio = 1.0;  // every placed token recomputed: full prefill's output
    auto st = sched_->Submit(std::move(r));
    CT_CHECK(st.ok()) << st.status().ToString();
    return *st;
  };
  auto wait_for = [](const std::function<bool()>& done) {
    for (int i = 0; i < 30000 && !done(); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return done();
  };
  // The test's own sequence takes every page but `keep` (free or evictable).
  std::unique_ptr<PagedSequence> hog;
  auto take_all_but = [&](int64_t keep) {
    hog = kv_->Start(Hash128{99, 99}, {}, 64 * 16);
    for (int attempt = 0; attempt < 100; ++attempt) {  // a decode may take a page meanwhile
      const KvManager::Stats ks = kv_->GetStats();
      const int64_t take = int64_t{ks.pages_free} + ks.pages_cached_unreferenced - keep;
      if (hog->Reserve(take * 16).ok()) return true;
    }
    return false;
  };

  // 1. Another request decodes: the segment prefill waits, then completes.
  gate.open = true;
  const int n_blocker = 300;  // its 20 pages fit in what the test leaves: it never stalls
  std::shared_ptr<RequestStream> blocker = Blocker(n_blocker);
  gate.open = false;
  std::shared_ptr<RequestStream> s = submit("");
  ASSERT_TRUE(wait_for([&] { return gate.started.load() == 2; })) << "admitted, loading";
  const int64_t keep = 21;
  ASSERT_LT(keep, prompt_pages - 1) << "the segment prefill must not fit";
  ASSERT_TRUE(take_all_but(keep));
  gate.open = true;
  ASSERT_TRUE(wait_for([&] {
    const SchedulerStats t = sched_->Stats();
    return t.reserve_failures > 0 || t.failed > 0;
  }));
  EXPECT_EQ(sched_->Stats().failed, 0u) << "it waits instead";
  EXPECT_EQ(sched_->Stats().segment_prefills, 0u);
  hog.reset();
  const Collected c = Collect(*s);
  ASSERT_EQ(c.last.kind, StreamEvent::Kind::kDone) << c.last.error.ToString();
  EXPECT_EQ(c.tokens, Reference(prompt, 8));
  EXPECT_GT(c.last.usage.segment_tokens, 0) << "placed from the segment cache";
  const Collected b = Collect(*blocker);
  ASSERT_EQ(b.last.kind, StreamEvent::Kind::kDone) << b.last.error.ToString();
  EXPECT_EQ(b.tokens.size() + 1, static_cast<size_t>(n_blocker));  // Blocker took the first
  SchedulerStats st = sched_->Stats();
  EXPECT_EQ(st.segment_prefills, 1u);
  EXPECT_EQ(st.failed, 0u);
  const uint64_t waits = st.reserve_failures;

  // 2. Nothing else runs: no one would free pages, so it fails at once and is not retried.
  ASSERT_TRUE(wait_for([&] { return sched_->Stats().running == 0; }));
  gate.open = false;
  std::shared_ptr<RequestStream> alone = submit("t2");
  ASSERT_TRUE(wait_for([&] { return gate.started.load() == 3; }));
  ASSERT_TRUE(take_all_but(1));
  gate.open = true;
  const Collected a = Collect(*alone);
  EXPECT_EQ(a.last.kind, StreamEvent::Kind::kError);
  EXPECT_EQ(a.last.error.code(), StatusCode::kResourceExhausted) << a.last.error.ToString();
  EXPECT_TRUE(a.tokens.empty());
  hog.reset();
  // The counts are published after the event is pushed.
  ASSERT_TRUE(wait_for([&] { return sched_->Stats().failed == 1; }));
  st = sched_->Stats();
  EXPECT_EQ(st.reserve_failures, waits);
  EXPECT_EQ(st.segment_prefills, 1u);
}

TEST_F(SchedulerTest, QueuedRequestTimesOut) {
  SchedulerOptions so;
  so.max_running = 1;
  so.queue_timeout_ms = 150;
  Build(512, so);
  auto blocker = sched_->Submit(Req(Text("The history of the"), 400));
  ASSERT_TRUE(blocker.ok());
  auto waiting = sched_->Submit(Req(Text("Once upon a time"), 4));
  ASSERT_TRUE(waiting.ok());
  Collected c = Collect(**waiting);
  EXPECT_EQ(c.last.kind, StreamEvent::Kind::kError);
  EXPECT_EQ(c.last.error.code(), StatusCode::kDeadlineExceeded) << c.last.error.ToString();
  EXPECT_TRUE(c.tokens.empty());
  (*blocker)->Cancel();
  Collect(**blocker);
}

TEST_F(SchedulerTest, PinsSessionsAndTenantsAreBounded) {
  GateSource gate;
  gate.open = true;
  SchedulerOptions so;
  so.max_pinned_fraction = 0.1;  // 6 of 64 pages
  so.max_pin_ttl_ms = 1000;
  so.max_pins = 1;
  so.max_sessions = 2;
  so.max_tenants = 3;
  Build(64, so, &gate);
  auto run = [&](SchedRequest r) {
    auto s = sched_->Submit(std::move(r));
    CT_CHECK(s.ok()) << s.status().ToString();
    return Collect(**s);
  };
  // 8 pages of prompt: over the pinned-pages cap, so the pin is refused (the request is served).
  std::vector<TokenId> big = Text("x");
  while (big.size() < 8 * 16) big.push_back(static_cast<TokenId>(100 + big.size()));
  SchedRequest r = Req(big, 1, "t1");
  r.pin_ttl_ms = 60000;
  Collected c = run(std::move(r));
  EXPECT_EQ(c.last.kind, StreamEvent::Kind::kDone);
  EXPECT_EQ(c.last.usage.pin_id, 0u);
  EXPECT_EQ(kv_->GetStats().pages_pinned, 0u);
  // A small prompt is pinned, with its TTL cut to max_pin_ttl_ms; a second pin is refused.
  r = Req(Text("Once upon a time there was a"), 1, "t1");
  r.pin_ttl_ms = 60000;
  c = run(std::move(r));
  ASSERT_NE(c.last.usage.pin_id, 0u);
  const auto pins = sched_->pins().List();
  ASSERT_EQ(pins.size(), 1u);
  EXPECT_LE(pins[0].expires_at_ms - NowNanos() / 1000000, 1000);
  EXPECT_EQ(pins[0].ns, sched_->Namespace("t1"));
  r = Req(Text("The history of the"), 1, "t1");
  r.pin_ttl_ms = 60000;
  EXPECT_EQ(run(std::move(r)).last.usage.pin_id, 0u);
  // Three sessions, at most two kept.
  for (const char* id : {"s1", "s2", "s3"}) {
    SchedRequest sr = Req(Text(std::string("Session ") + id), 2, "t2");
    sr.session_id = id;
    run(std::move(sr));
  }
  EXPECT_EQ(sched_->pins().sessions(), 2u);
  // Tenants are remembered up to max_tenants.
  for (const char* t : {"t3", "t4", "t5", "t6"}) run(Req(Text("Hello"), 1, t));
  EXPECT_EQ(sched_->tenants(), 3u);
  // Clearing a tenant drops its pins and reaches the source.
  ASSERT_TRUE(sched_->ClearTenant("t1").ok());
  EXPECT_TRUE(sched_->pins().List().size() == 2u);  // the two sessions of t2 stay
  {
    std::lock_guard<std::mutex> lock(gate.mu);
    ASSERT_EQ(gate.cleared.size(), 1u);
    EXPECT_EQ(gate.cleared[0], sched_->Namespace("t1"));
  }
}

TEST_F(SchedulerTest, LpmAdmitsTheCachedPrefixFirstWithinItsBound) {
  for (int max_skips : {16, 0}) {
    SchedulerOptions so;
    so.max_running = 1;
    so.order = QueueOrder::kLpm;
    so.lpm_max_skips = max_skips;
    Build(512, so);
    const std::string shared =
        "The kernel documentation describes how to configure the build of modules for a "
        "system with many devices and drivers";
    auto run = [&](const std::string& text, int n) {
      auto st = sched_->Submit(Req(Text(text), n));
      CT_CHECK(st.ok());
      return *st;
    };
    Collect(*run(shared, 1));  // now cached
    auto blocker = run("Once upon a time", 40);
    StreamEvent e;
    ASSERT_TRUE(blocker->Next(&e, std::chrono::milliseconds(30000)));  // it runs
    auto cold = run("A dictionary defines the word", 4);  // arrives first, nothing cached
    auto warm = run(shared + " and their options", 4);   // arrives second, prefix cached
    Collect(*blocker);
    const Collected c = Collect(*cold), w = Collect(*warm);
    ASSERT_EQ(c.last.kind, StreamEvent::Kind::kDone);
    ASSERT_EQ(w.last.kind, StreamEvent::Kind::kDone);
    EXPECT_GT(w.last.usage.cached_tokens, 10);
    if (max_skips > 0) {
      EXPECT_LT(w.last.usage.queue_seconds, c.last.usage.queue_seconds)
          << "the cached prefix is admitted first";
    } else {
      EXPECT_LT(c.last.usage.queue_seconds, w.last.usage.queue_seconds)
          << "a request may not be passed over at all with lpm_max_skips 0";
    }
    EXPECT_EQ(w.tokens, Reference(Text(shared + " and their options"), 4));
    TearDown();
  }
}

TEST_F(SchedulerTest, LpmWaitsForAPrefixBeingPrefilledInsteadOfComputingItTwice) {
  SchedulerOptions so;
  so.max_running = 4;
  so.step_tokens = 16;  // a page per step: the shared prefix takes several steps
  so.order = QueueOrder::kLpm;
  Build(512, so);
  std::string shared;
  for (const char* p : kPrompts) shared += std::string(p) + " ";
  const std::vector<TokenId> a = Text(shared + "First question");
  const std::vector<TokenId> b = Text(shared + "Second question");
  ASSERT_GT(a.size(), 64u);
  auto sa = sched_->Submit(Req(a, 4));
  auto sb = sched_->Submit(Req(b, 4));  // same burst: both wait in the queue together
  ASSERT_TRUE(sa.ok() && sb.ok());
  const Collected ca = Collect(**sa), cb = Collect(**sb);
  ASSERT_EQ(cb.last.kind, StreamEvent::Kind::kDone);
  EXPECT_EQ(ca.tokens, Reference(a, 4));
  EXPECT_EQ(cb.tokens, Reference(b, 4));
  // b waited while a prefilled the shared part, then reused its committed pages.
  EXPECT_GE(cb.last.usage.cached_tokens, 48) << "the shared prefix was computed once";
}

TEST_F(SchedulerTest, PastFutureAdmitsMoreThanTheWorstCaseAndPreemptsExactly) {
  SchedulerOptions so;
  so.max_running = 4;
  so.admission = AdmissionPolicy::kPastFuture;
  Build(16, so);  // 16 pages of 16 tokens: the worst case of each request below is 7 pages
  // The past: ten short answers.
  for (int i = 0; i < 10; ++i) {
    std::string salt = "h";  // appended, not "h" + ...: GCC 12 warns falsely (-Wrestrict)
    salt += std::to_string(i);
    auto st = sched_->Submit(Req(Text("Hello " + std::to_string(i)), 4, salt));
    ASSERT_TRUE(st.ok());
    Collect(**st);
  }
  // Four long ones at once (distinct tenants: no sharing): admitted on the short past, they
  // outgrow the pool, and the newest are preempted and resumed.
  const int n = 90;
  std::vector<std::shared_ptr<RequestStream>> streams;
  for (int i = 0; i < 4; ++i) {
    SchedRequest r = Req(Text(kPrompts[i]), n, "t" + std::to_string(i));
    r.gen.ignore_eos = true;  // long for sure, unlike the past
    auto st = sched_->Submit(std::move(r));
    ASSERT_TRUE(st.ok()) << st.status().ToString();
    streams.push_back(*st);
  }
  for (int i = 0; i < 4; ++i) {
    Collected c = Collect(*streams[i]);
    ASSERT_EQ(c.last.kind, StreamEvent::Kind::kDone) << c.last.error.ToString();
    EXPECT_EQ(c.tokens, Reference(Text(kPrompts[i]), n, /*ignore_eos=*/true)) << kPrompts[i];
    EXPECT_EQ(c.last.usage.prompt_tokens, static_cast<int64_t>(Text(kPrompts[i]).size()));
    EXPECT_EQ(c.last.usage.completion_tokens, n);
  }
  const SchedulerStats st = sched_->Stats();
  EXPECT_GT(st.preemptions, 0u) << "more were admitted than the worst case allows";
  EXPECT_EQ(st.failed, 0u);
}

TEST_F(SchedulerTest, ItlTargetShrinksThePrefillShareAndStaysExact) {
  SchedulerOptions so;
  so.max_running = 4;
  so.step_tokens = 256;
  so.itl_target_ms = 0.001;  // nothing fits beside a decode: one page of prefill per step
  Build(512, so);
  // Warm the step cost model with steps of both kinds.
  for (int i = 0; i < 6; ++i) {
    auto st = sched_->Submit(Req(Text(kPrompts[i % 6]), 3, "w" + std::to_string(i)));
    ASSERT_TRUE(st.ok());
    Collect(**st);
  }
  SchedRequest r = Req(Text("Once upon a time"), 60);
  r.gen.ignore_eos = true;
  auto decoding = sched_->Submit(std::move(r));
  ASSERT_TRUE(decoding.ok());
  StreamEvent e;
  ASSERT_TRUE((*decoding)->Next(&e, std::chrono::milliseconds(30000)));  // it decodes
  std::string long_text;
  for (int i = 0; i < 6; ++i) long_text += std::string(kPrompts[i]) + " ";
  const std::vector<TokenId> prompt = Text(long_text);
  ASSERT_GT(prompt.size(), 48u);
  auto st = sched_->Submit(Req(prompt, 8));
  ASSERT_TRUE(st.ok());
  const Collected c = Collect(**st);
  Collect(**decoding);
  ASSERT_EQ(c.last.kind, StreamEvent::Kind::kDone);
  EXPECT_EQ(c.tokens, Reference(prompt, 8));
  EXPECT_EQ(sched_->Stats().prefill_budget, 16) << "a page per step beside the decode";
  // The statistics are published at the loop's sweeps (every second).
  nlohmann::json j;
  for (int i = 0; i < 40; ++i) {
    j = sched_->SchedJson();
    if (j.contains("step_cost") && j["step_cost"]["ready"].get<bool>()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ASSERT_TRUE(j.contains("step_cost")) << j.dump();
  EXPECT_TRUE(j["step_cost"]["ready"].get<bool>()) << j.dump();
  EXPECT_GT(j["step_cost"]["prefill_token_ms"].get<double>(), 0);
}

TEST_F(SchedulerTest, DeadlinesGoFirstWhileTheyCanBeMet) {
  SchedulerOptions so;
  so.max_running = 1;
  Build(512, so);
  auto blocker = Blocker();
  auto plain = sched_->Submit(Req(Text("A dictionary defines the word"), 4));
  SchedRequest d = Req(Text("The history of the"), 4);
  d.deadline_ms = 60000;
  auto urgent = sched_->Submit(std::move(d));
  SchedRequest m = Req(Text("In the beginning"), 4);
  m.deadline_ms = 1;  // already missed when admission comes: no precedence
  auto missed = sched_->Submit(std::move(m));
  ASSERT_TRUE(plain.ok() && urgent.ok() && missed.ok());
  Collect(*blocker);
  const Collected p = Collect(**plain), u = Collect(**urgent), x = Collect(**missed);
  EXPECT_LT(u.last.usage.queue_seconds, p.last.usage.queue_seconds) << "EDF within a priority";
  EXPECT_LT(p.last.usage.queue_seconds, x.last.usage.queue_seconds) << "then arrival order";
  const SchedulerStats st = sched_->Stats();
  EXPECT_EQ(st.deadline_met, 1u);
  EXPECT_EQ(st.deadline_missed, 1u);
}

TEST_F(SchedulerTest, PriorityPreemptsAndTheVictimResumesExactly) {
  for (PreemptMode mode : {PreemptMode::kRecompute, PreemptMode::kSwap}) {
    SCOPED_TRACE(mode == PreemptMode::kSwap ? "swap" : "recompute");
    SchedulerOptions so;
    so.max_running = 4;
    so.preempt = mode;
    Build(12, so, nullptr, /*ram_tier=*/true);  // both modes have the RAM tier: only swap differs
    // Low priority, long: 8 pages at most; it runs alone first.
    const std::vector<TokenId> low_prompt = Text(std::string(kPrompts[1]) + " " + kPrompts[4]);
    SchedRequest lo = Req(low_prompt, 80, "lo");
    lo.gen.ignore_eos = true;
    auto low = sched_->Submit(std::move(lo));
    ASSERT_TRUE(low.ok());
    StreamEvent e;
    for (int i = 0; i < 40; ++i) ASSERT_TRUE((*low)->Next(&e, std::chrono::milliseconds(30000)));
    // High priority, 10 pages at most: it needs most of the low one's pages, so the victim
    // loses some of its cached KV while it waits (a swap brings them back from RAM).
    SchedRequest hi = Req(Text(kPrompts[2]), 140, "hi");
    hi.gen.ignore_eos = true;
    hi.priority = 5;
    auto high = sched_->Submit(std::move(hi));
    ASSERT_TRUE(high.ok());
    const Collected h = Collect(**high);
    Collected l = Collect(**low);
    ASSERT_EQ(h.last.kind, StreamEvent::Kind::kDone) << h.last.error.ToString();
    ASSERT_EQ(l.last.kind, StreamEvent::Kind::kDone) << l.last.error.ToString();
    EXPECT_EQ(h.tokens, Reference(Text(kPrompts[2]), 140, true));
    EXPECT_EQ(l.tokens.size(), 40u);
    const std::vector<TokenId> ref = Reference(low_prompt, 80, true);
    EXPECT_TRUE(std::equal(l.tokens.begin(), l.tokens.end(), ref.begin() + 40))
        << "the resumed request continues exactly";
    EXPECT_EQ(l.last.usage.completion_tokens, 80);
    EXPECT_LT(h.last.usage.ttft_seconds, 5.0);
    const SchedulerStats st = sched_->Stats();
    EXPECT_GE(st.preemptions, 1u);
    EXPECT_EQ(st.failed, 0u);
    if (mode == PreemptMode::kSwap) {
      EXPECT_GE(st.swapped_out_tokens, 64u) << "the victim's full chunks went to RAM";
      EXPECT_GT(st.resume_restored_tokens, 0u) << "and came back from there";
    } else {
      EXPECT_EQ(st.swapped_out_tokens, 0u);
    }
    TearDown();
  }
}

TEST_F(SchedulerTest, ProgramOrderAndToolPins) {
  SchedulerOptions so;
  so.max_running = 1;
  so.order = QueueOrder::kProgram;
  Build(512, so);
  auto turn = [&](const std::string& program, const std::string& text, const std::string& tool,
                  int n) {
    SchedRequest r = Req(Text(text), n);
    r.program_id = program;
    r.tool = tool;
    auto st = sched_->Submit(std::move(r));
    CT_CHECK(st.ok()) << st.status().ToString();
    return *st;
  };
  const std::string first = "The kernel documentation describes how to configure the build";
  Collected p1 = Collect(*turn("P", first, "search", 4));  // program P arrives, calls a tool
  ASSERT_EQ(p1.last.kind, StreamEvent::Kind::kDone);
  bool pinned = false;
  for (const PinRegistry::Info& i : sched_->pins().List()) {
    pinned |= i.session == std::string("\x01program:P") && i.tokens > 0;
  }
  EXPECT_TRUE(pinned) << "the paused program's KV is pinned for the tool call";
  auto blocker = Blocker();
  auto newcomer = turn("Q", "A dictionary defines the word", "", 4);  // a program after P
  auto p2 = turn("P", first + " of modules", "", 4);                   // P's next turn
  Collect(*blocker);
  const Collected q = Collect(*newcomer), second = Collect(*p2);
  EXPECT_LT(second.last.usage.queue_seconds, q.last.usage.queue_seconds)
      << "program-level FCFS: P arrived before Q";
  EXPECT_GT(second.last.usage.cached_tokens, 8);
  EXPECT_EQ(second.tokens, Reference(Text(first + " of modules"), 4));
  const SchedulerStats st = sched_->Stats();
  EXPECT_EQ(st.program_turns, 1u);
  EXPECT_EQ(st.program_pin_hits, 1u);
  for (const PinRegistry::Info& i : sched_->pins().List()) {
    EXPECT_NE(i.session, std::string("\x01program:P")) << "its last turn unpins the program";
  }
  const nlohmann::json j = sched_->SchedJson();  // published when the call was observed
  ASSERT_TRUE(j.contains("tools") && j["tools"].contains("search")) << j.dump();
  EXPECT_EQ(j["tools"]["search"]["calls"], 1) << j.dump();
}



// ---- KV budget policies ----------------------------------------------------------------------

namespace policy_test {

std::vector<TokenId> LongPrompt(size_t n_tokens) {
  // Natural text repeated until long enough; the first token is BOS.
  std::string text;
  for (const char* p : kPrompts) text += std::string(p) + " ";
  std::vector<TokenId> ids = Text(text);
  const std::vector<TokenId> more(ids.begin() + 1, ids.end());
  while (ids.size() < n_tokens) ids.insert(ids.end(), more.begin(), more.end());
  ids.resize(n_tokens);
  return ids;
}

}  // namespace policy_test

class SchedulerPolicyTest : public SchedulerTest {
 protected:
  static KvPolicyConfig Policy(const std::string& name, double budget) {
    KvPolicyConfig pc;
    pc.name = name;
    pc.budget = budget;
    return pc;
  }
  // A request of n tokens (no early end) under `pc`, in the tenant `salt`.
  SchedRequest PolicyReq(const std::vector<TokenId>& prompt, int n, const std::string& salt,
                         const KvPolicyConfig& pc) {
    SchedRequest r = Req(prompt, n, salt);
    r.gen.ignore_eos = true;
    r.kv_policy = pc;
    return r;
  }
  // The same greedy decode through a BudgetRunner on a contiguous sequence.
  std::vector<TokenId> PolicyReference(const std::vector<TokenId>& prompt, int n,
                                       const KvPolicyConfig& pc, int64_t* kept = nullptr) {
    auto run = BudgetRunner::Create(*ref_engine_, pc);
    CT_CHECK(run.ok()) << run.status().ToString();
    BudgetRunner& r = **run;
    LogitSource src;
    src.prefill = [&](float* logits) { return r.Prefill(prompt, logits); };
    src.step = [&](TokenId id, float* logits) {
      return r.Step(std::span<const TokenId>(&id, 1), Engine::Logits::kLast, logits);
    };
    src.room = [] { return true; };
    GenerateOptions go;
    go.max_tokens = n;
    go.ignore_eos = true;
    auto res = Generate(Trained(), prompt, go, src);
    CT_CHECK(res.ok()) << res.status().ToString();
    if (kept != nullptr) *kept = r.kept_tokens();
    return res->tokens;
  }
};

TEST_F(SchedulerPolicyTest, PolicyRequestsMatchTheRunnerAndLeaveAnExactPrefix) {
  SchedulerOptions so;
  so.step_tokens = 64;  // the prompt is prefilled in chunks; the last holds the window
  Build(512, so);
  const auto prompt = policy_test::LongPrompt(160);
  // "cake" reads the prompt by its cascade (a few layers per step: 64 of 160 tokens pay for 2
  // of 6 layers); "cake-whole" (cascade off) reads it in chunks and compacts once.
  for (std::string name : {"snapkv", "h2o", "streamingllm", "pyramidkv", "cake", "cake-whole",
                           "lacache", "elastic"}) {
    KvPolicyConfig pc;
    pc.name = name == "cake-whole" ? "cake" : name;
    pc.cascade = name != "cake-whole";
    pc.budget = 0.3;
    SchedRequest r = Req(prompt, 20, name);  // a tenant per policy: no sharing between them
    r.gen.ignore_eos = true;
    r.kv_policy = pc;
    auto s = sched_->Submit(std::move(r));
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    const Collected c = Collect(**s);
    ASSERT_EQ(c.last.kind, StreamEvent::Kind::kDone) << name << ": " << c.last.error.ToString();
    int64_t kept = 0;
    // 20 tokens: one compaction during decode (every 16) besides the one after the prompt.
    EXPECT_EQ(c.tokens, PolicyReference(prompt, 20, pc, &kept)) << name;
    EXPECT_EQ(c.last.usage.kv_tokens_kept, kept) << name;
    EXPECT_LE(c.last.usage.kv_tokens_kept, 48 + 16) << name;
    EXPECT_NE(c.tokens, Reference(prompt, 20, true)) << name << ": eviction changes nothing?";
    // The prompt's exact KV went to the index before the policy touched it: a full-KV request
    // with the same prompt reuses its full pages and gives the exact tokens. (A cascade never
    // holds the prompt's exact KV whole: nothing to reuse.)
    const Collected warm = Collect(**sched_->Submit(Req(prompt, 8, name)));
    EXPECT_EQ(warm.last.usage.cached_tokens, name == "cake" ? 0 : 160 - 1) << name;
    EXPECT_EQ(warm.tokens, Reference(prompt, 8)) << name;
    EXPECT_EQ(warm.last.usage.kv_tokens_kept, -1);
  }
}

TEST_F(SchedulerPolicyTest, StreamingReadsAndGeneratesPastTheContext) {
  Build(512, {});
  const int64_t ctx = Trained().config().n_ctx_train;
  const auto prompt = policy_test::LongPrompt(static_cast<size_t>(ctx) + 60);
  KvPolicyConfig pc;
  pc.name = "streamingllm";
  pc.budget = 256;
  SchedRequest r = Req(prompt, 24);
  r.gen.ignore_eos = true;
  r.kv_policy = pc;
  auto s = sched_->Submit(std::move(r));
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  const Collected c = Collect(**s);
  ASSERT_EQ(c.last.kind, StreamEvent::Kind::kDone) << c.last.error.ToString();
  EXPECT_EQ(c.tokens, PolicyReference(prompt, 24, pc));
  EXPECT_LE(c.last.usage.kv_tokens_kept, 256 + 16);
  // The same prompt without a policy, or with one that keeps positions, is refused by name.
  EXPECT_NE(sched_->Submit(Req(prompt, 4)).status().message().find("maximum context length"),
            std::string::npos);
  SchedRequest snap = Req(prompt, 4);
  snap.kv_policy.name = "snapkv";
  EXPECT_NE(sched_->Submit(std::move(snap)).status().message().find("reassigns positions"),
            std::string::npos);
}

// Admission counts a policy sequence's kept budget once it has compacted its prompt, not its
// prompt: in a pool of 22 pages, a second 160-token request (10 pages, 4 more for its
// compaction's copies) runs beside a first one that has compacted its 10 pages to a per-layer
// budget of 48 tokens (its layers packed into about 4 pages, 6 forecast), where counting the
// first one's prompt would leave room for about 8. Both give the runner's tokens.
TEST_F(SchedulerPolicyTest, AdmissionCountsTheKeptBudgetAfterThePrompt) {
  SchedulerOptions so;
  so.step_tokens = 64;
  Build(22, so);
  const auto prompt = policy_test::LongPrompt(160);
  const KvPolicyConfig pc = Policy("pyramidkv", 48);
  auto sa = sched_->Submit(PolicyReq(prompt, 120, "a", pc));
  ASSERT_TRUE(sa.ok()) << sa.status().ToString();
  StreamEvent e;
  ASSERT_TRUE((*sa)->Next(&e, std::chrono::milliseconds(60000)));  // compacted, decoding
  ASSERT_EQ(e.kind, StreamEvent::Kind::kToken) << e.error.ToString();
  std::vector<TokenId> a_tokens = {e.token};
  auto sb = sched_->Submit(PolicyReq(prompt, 4, "b", pc));  // another tenant: nothing shared
  ASSERT_TRUE(sb.ok()) << sb.status().ToString();
  const Collected cb = Collect(**sb);
  ASSERT_EQ(cb.last.kind, StreamEvent::Kind::kDone) << cb.last.error.ToString();
  // The first request (119 tokens to go when the second came) is still running.
  bool a_done = false;
  while ((*sa)->Next(&e, std::chrono::milliseconds(0))) {
    if (e.kind != StreamEvent::Kind::kToken) {
      a_done = true;
      break;
    }
    a_tokens.push_back(e.token);
  }
  EXPECT_FALSE(a_done) << "the second request waited for the first";
  const Collected ca = a_done ? Collected{} : Collect(**sa);
  ASSERT_EQ(ca.last.kind, StreamEvent::Kind::kDone) << ca.last.error.ToString();
  a_tokens.insert(a_tokens.end(), ca.tokens.begin(), ca.tokens.end());
  EXPECT_EQ(a_tokens, PolicyReference(prompt, 120, pc));
  EXPECT_EQ(cb.tokens, PolicyReference(prompt, 4, pc));
}

// CAKE's cascade holds about its budget while it reads: a 160-token prompt (10 pages at every
// layer) runs in a pool of 12 pages at 16 tokens per layer, a few layers per step beside a
// decoding request, and gives the runner's tokens, reading the prompt from its first token
// though a full-KV request cached it; read whole (cascade off) it is refused.
TEST_F(SchedulerPolicyTest, ACakePromptLargerThanThePoolReadsByItsCascade) {
  SchedulerOptions so;
  so.step_tokens = 32;  // a layer or so per step
  Build(12, so);
  const auto prompt = policy_test::LongPrompt(160);
  const Collected full = Collect(**sched_->Submit(Req(prompt, 2, "cake")));
  ASSERT_EQ(full.last.kind, StreamEvent::Kind::kDone) << full.last.error.ToString();
  const auto blocker = Blocker(40);  // decoding while the cascade reads
  KvPolicyConfig pc = Policy("cake", 16);
  auto s = sched_->Submit(PolicyReq(prompt, 12, "cake", pc));
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  const Collected c = Collect(**s);
  ASSERT_EQ(c.last.kind, StreamEvent::Kind::kDone) << c.last.error.ToString();
  EXPECT_EQ(c.tokens, PolicyReference(prompt, 12, pc));
  EXPECT_EQ(c.last.usage.cached_tokens, 0);
  EXPECT_LE(c.last.usage.kv_tokens_kept, 16 + 16);
  EXPECT_EQ(Collect(*blocker).last.kind, StreamEvent::Kind::kDone);
  pc.cascade = false;
  const Status st = sched_->Submit(PolicyReq(prompt, 12, "cake", pc)).status();
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("pages of KV"), std::string::npos) << st.message();
}

TEST_F(SchedulerPolicyTest, BadPoliciesAreRefusedNamingTheField) {
  Build(64, {});
  SchedRequest r = Req(Text("Once upon a time"), 4);
  r.kv_policy.name = "snapk";
  Status st = sched_->Submit(std::move(r)).status();
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("kv_policy.name"), std::string::npos) << st.message();
  SchedRequest b = Req(Text("Once upon a time"), 4);
  b.kv_policy.name = "h2o";
  b.kv_policy.budget = -1;
  st = sched_->Submit(std::move(b)).status();
  EXPECT_NE(st.message().find("kv_policy.budget"), std::string::npos) << st.message();
}

}  // namespace
}  // namespace cachette::sched
