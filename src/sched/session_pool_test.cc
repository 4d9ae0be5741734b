// The session pool (--session-kv-type, issue 13 item 4): requests with a session_id keep their
// KV in a pool of its own type; everything else in the main pool. Each side must give the same
// greedy tokens as Generate() alone on a contiguous cache of its type, and neither pool's
// admission, pins or tiers may touch the other's pages.
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "cachette/cache.h"
#include "core/check.h"
#include "engine/generate.h"
#include "sched/sched_test_util.h"
#include "sched/scheduler.h"
#include "sched/tier_bridge.h"

namespace cachette::sched {
namespace {

using kernels::KvType;
using sched_test::Collect;
using sched_test::Collected;
using sched_test::Text;
using sched_test::Trained;

int64_t CachedIn(const Collected& c, const std::string& tier) {
  for (const TierTokens& t : c.last.usage.cached_by_tier) {
    if (t.tier == tier) return t.tokens;
  }
  return 0;
}

class SessionPoolTest : public ::testing::TestWithParam<KvType> {
 protected:
  // Main pool: f32, `main_pages` pages; session pool: GetParam(), `session_pages` pages; pages
  // of 32 tokens (whole kivi4 key groups) in both. With ram_tier, a RAM chunk store behind both.
  void Build(size_t main_pages, size_t session_pages, bool ram_tier = false,
             SchedulerOptions sched_options = {}) {
    EngineOptions eo;
    eo.threads = 2;
    eo.kv_type = KvType::kF32;
    engine_ = std::make_unique<Engine>(Trained(), eo);
    KvManagerOptions ko;
    ko.shape = engine_->kv_shape();
    ko.page_tokens = 32;
    ko.budget_bytes = PagePool::PageBytes(ko.shape, 32) * main_pages;
    kv_ = std::make_unique<KvManager>(ko);
    KvManagerOptions so = ko;
    so.shape = engine_->kv_shape(GetParam());
    so.budget_bytes = PagePool::PageBytes(so.shape, 32) * session_pages;
    CT_CHECK(KvManager::Validate(so).ok());
    session_kv_ = std::make_unique<KvManager>(so);
    PrefixSource* source = nullptr;
    if (ram_tier) {
      store_ = sched_test::RamOnlyStore();
      bridge_ = std::make_unique<TierBridge>(*kv_, *store_);
      source = bridge_.get();
    }
    sched_ = std::make_unique<Scheduler>(*engine_, *kv_, sched_options, source,
                                         session_kv_.get());
  }
  void TearDown() override {
    sched_.reset();
    bridge_.reset();
    store_.reset();
    session_kv_.reset();
    kv_.reset();
    engine_.reset();
  }
  // Generate() alone on a contiguous cache of `type`.
  std::vector<TokenId> Reference(KvType type, const std::vector<TokenId>& prompt, int n) {
    EngineOptions eo;
    eo.threads = 2;
    eo.kv_type = type;
    Engine e(Trained(), eo);
    auto kv = e.NewSequence(static_cast<int64_t>(prompt.size()) + n + 1);
    GenerateOptions go;
    go.max_tokens = n;
    go.ignore_eos = true;
    auto r = Generate(e, *kv, prompt, go);
    CT_CHECK(r.ok()) << r.status().ToString();
    return r->tokens;
  }
  std::shared_ptr<RequestStream> Start(std::vector<TokenId> prompt, int n,
                                       const std::string& session, int priority = 0) {
    SchedRequest r;
    r.prompt = std::move(prompt);
    r.gen.max_tokens = n;
    r.gen.ignore_eos = true;
    r.session_id = session;
    r.priority = priority;
    auto s = sched_->Submit(std::move(r));
    CT_CHECK(s.ok()) << s.status().ToString();
    return *s;
  }
  Collected Run(std::vector<TokenId> prompt, int n, const std::string& session) {
    SchedRequest r;
    r.prompt = std::move(prompt);
    r.gen.max_tokens = n;
    r.gen.ignore_eos = true;
    r.session_id = session;
    auto s = sched_->Submit(std::move(r));
    CT_CHECK(s.ok()) << s.status().ToString();
    return Collect(**s);
  }
  Hash128 SessionNs() const { return KvNamespace(Trained(), GetParam()); }

  std::unique_ptr<Engine> engine_;
  std::unique_ptr<KvManager> kv_, session_kv_;
  std::unique_ptr<Cache> store_;
  std::unique_ptr<TierBridge> bridge_;
  std::unique_ptr<Scheduler> sched_;
};

// About 80 tokens: two whole pages and a partial one.
const char* kTurn1 =
    "The kernel documentation describes how to configure the build of modules for a system "
    "with many devices and drivers. In the beginning God created the heaven and the earth. And "
    "the earth was without form, and void; and darkness was upon the face of the deep. Python is "
    "a programming language that lets you work quickly, and the";

TEST_P(SessionPoolTest, SessionsLiveInTheirPoolAndMatchTheirTypeAlone) {
  Build(64, 64);
  const auto prompt = Text(kTurn1);
  const int n = 12;
  // A request without a session: the main pool, f32.
  ASSERT_GT(prompt.size(), 64u);
  const Collected plain = Run(prompt, n, "");
  ASSERT_EQ(plain.last.kind, StreamEvent::Kind::kDone) << plain.last.error.ToString();
  EXPECT_EQ(plain.tokens, Reference(KvType::kF32, prompt, n));
  EXPECT_EQ(session_kv_->GetStats().lookups, 0u);
  // A session's first turn: the session pool, in its type, and nothing cached from the main
  // pool's copy of the same prompt (another namespace).
  const uint64_t main_lookups = kv_->GetStats().lookups;
  const Collected t1 = Run(prompt, n, "agent-1");
  ASSERT_EQ(t1.last.kind, StreamEvent::Kind::kDone) << t1.last.error.ToString();
  EXPECT_EQ(t1.tokens, Reference(GetParam(), prompt, n));
  EXPECT_EQ(kv_->GetStats().lookups, main_lookups);
  EXPECT_EQ(t1.last.usage.cached_tokens, 0);
  EXPECT_GT(session_kv_->GetStats().pages_used, 0u);
  // The session's pin holds pages of its pool only.
  EXPECT_EQ(sched_->pins().sessions(), 1u);
  EXPECT_GT(session_kv_->GetStats().pages_pinned, 0u);
  EXPECT_EQ(kv_->GetStats().pages_pinned, 0u);
  EXPECT_EQ(&sched_->PoolOf(SessionNs()), session_kv_.get());
  EXPECT_EQ(&sched_->PoolOf(sched_->Namespace("")), kv_.get());

  // The second turn extends the conversation without re-prefilling it.
  std::vector<TokenId> turn2 = prompt;
  turn2.insert(turn2.end(), t1.tokens.begin(), t1.tokens.end());
  for (TokenId t : Text(" and then the modules")) {
    if (t != Trained().tokenizer().bos()) turn2.push_back(t);
  }
  const Collected t2 = Run(turn2, n, "agent-1");
  ASSERT_EQ(t2.last.kind, StreamEvent::Kind::kDone) << t2.last.error.ToString();
  // Whole pages of turn 1 (kivi4: its last whole key group) come from memory.
  EXPECT_GE(CachedIn(t2, "memory"), static_cast<int64_t>(prompt.size()) / 32 * 32);
  if (!engine_->kv_shape(GetParam()).windowed()) {
    // Reused 4-bit KV holds the bits a prefill would write: the same tokens as recomputing.
    EXPECT_EQ(t2.tokens, Reference(GetParam(), turn2, n));
  }

  // Clearing the tenant reaches the session pool.
  ASSERT_TRUE(sched_->ClearTenant("").ok());
  EXPECT_EQ(sched_->pins().sessions(), 0u);
  EXPECT_EQ(session_kv_->CachedPrefix(SessionNs(), prompt), 0);
}

TEST_P(SessionPoolTest, EachPoolAdmitsFromItsOwnPages) {
  // 4 session pages (128 tokens) and 64 main pages.
  Build(64, 4);
  std::vector<TokenId> big = Text(kTurn1);
  while (big.size() < 150) big.insert(big.end(), big.begin() + 1, big.begin() + 20);
  SchedRequest r;
  r.prompt = big;
  r.gen.max_tokens = 4;
  r.session_id = "agent-big";
  auto refused = sched_->Submit(r);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("--session-kv-budget"), std::string::npos)
      << refused.status().ToString();
  r.session_id.clear();  // the main pool holds it
  auto s = sched_->Submit(r);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  EXPECT_EQ(Collect(**s).last.kind, StreamEvent::Kind::kDone);

  // Several sessions at once queue for the session pool, and all finish.
  std::vector<std::shared_ptr<RequestStream>> streams;
  for (int i = 0; i < 4; ++i) {
    SchedRequest q;
    q.prompt = Text(std::string(kTurn1).substr(0, 40 + 10 * i));
    q.gen.max_tokens = 8;
    q.session_id = "agent-" + std::to_string(i);
    auto st = sched_->Submit(std::move(q));
    ASSERT_TRUE(st.ok()) << st.status().ToString();
    streams.push_back(*st);
  }
  for (auto& st : streams) {
    const Collected c = Collect(*st);
    EXPECT_EQ(c.last.kind, StreamEvent::Kind::kDone) << c.last.error.ToString();
  }
}

TEST_P(SessionPoolTest, APrioritySessionPreemptsOnlyInItsPool) {
  // Pages of 32 tokens: 8 in the main pool, 9 in the session pool. A plain request and a
  // session each hold most of their pool; a high-priority session that needs most of the
  // session pool (7 pages, and one more to copy the partial page its BOS shares with the cached
  // session) preempts the session (the newer plain request, lowest ranked by the global order,
  // must not be touched), and both low-priority requests still give their type's tokens.
  Build(8, 9);
  const auto low_prompt = Text(kTurn1);
  const int n = 100;  // ~85 + 100 tokens: 6 pages
  auto low_session = Start(low_prompt, n, "agent-low");
  StreamEvent e;
  ASSERT_TRUE(low_session->Next(&e, std::chrono::milliseconds(30000)));
  auto plain = Start(low_prompt, n, "");
  ASSERT_TRUE(plain->Next(&e, std::chrono::milliseconds(30000)));
  const auto hi_prompt = Text("Once upon a time there was a king who had three daughters");
  auto high = Start(hi_prompt, 200, "agent-high", /*priority=*/5);  // 7 pages
  const Collected h = Collect(*high);
  const Collected p = Collect(*plain);
  const Collected l = Collect(*low_session);
  ASSERT_EQ(h.last.kind, StreamEvent::Kind::kDone) << h.last.error.ToString();
  ASSERT_EQ(p.last.kind, StreamEvent::Kind::kDone) << p.last.error.ToString();
  ASSERT_EQ(l.last.kind, StreamEvent::Kind::kDone) << l.last.error.ToString();
  EXPECT_EQ(sched_->Stats().preemptions, 1u) << "only the session in the session pool";
  const std::vector<TokenId> plain_ref = Reference(KvType::kF32, low_prompt, n);
  EXPECT_TRUE(std::equal(p.tokens.begin(), p.tokens.end(), plain_ref.begin() + 1));
  if (!engine_->kv_shape(GetParam()).windowed()) {
    // (A windowed type restarts its window at a cache hit: not the bits of a fresh prefill.)
    EXPECT_EQ(h.tokens, Reference(GetParam(), hi_prompt, 200));
    // The victim resumes by prefilling its prompt and output again: exactly its type's tokens.
    const std::vector<TokenId> low_ref = Reference(GetParam(), low_prompt, n);
    EXPECT_TRUE(std::equal(l.tokens.begin(), l.tokens.end(), low_ref.begin() + 1));
  }
}

TEST_P(SessionPoolTest, AForgottenTenantsSessionsResolveToTheMainPool) {
  // At most 2 remembered tenants: the third forgets the first, whose session namespace then
  // resolves to the main pool (where a pin finds nothing); the others' stay in the session pool.
  SchedulerOptions so;
  so.max_tenants = 2;
  Build(64, 64, /*ram_tier=*/false, so);
  auto session_ns = [&](const std::string& salt) {
    return KvNamespace(Trained(), GetParam(), salt);
  };
  for (const std::string salt : {"a", "b"}) {
    sched_->Namespace(salt);
    std::this_thread::sleep_for(std::chrono::milliseconds(5));  // "a" is the older by the clock
  }
  EXPECT_EQ(&sched_->PoolOf(session_ns("a")), session_kv_.get());
  EXPECT_EQ(&sched_->PoolOf(session_ns("b")), session_kv_.get());
  sched_->Namespace("c");
  EXPECT_EQ(sched_->tenants(), 2u);
  EXPECT_EQ(&sched_->PoolOf(session_ns("a")), kv_.get());
  EXPECT_EQ(&sched_->PoolOf(session_ns("b")), session_kv_.get());
  EXPECT_EQ(&sched_->PoolOf(session_ns("c")), session_kv_.get());
}

TEST_P(SessionPoolTest, ASessionOfAForgottenTenantStillPinsItsConversation) {
  // A turn running when its tenant is forgotten (max_tenants 1, another tenant arrives) pins its
  // conversation in its own pool at the end, not by namespace (which now resolves to the main
  // pool, where there is nothing to pin).
  SchedulerOptions so;
  so.max_tenants = 1;
  Build(64, 64, /*ram_tier=*/false, so);
  SchedRequest r;
  r.prompt = Text(kTurn1);
  r.gen.max_tokens = 40;
  r.gen.ignore_eos = true;
  r.session_id = "agent-a";
  r.cache_salt = "a";
  auto stream = sched_->Submit(std::move(r));
  ASSERT_TRUE(stream.ok()) << stream.status().ToString();
  StreamEvent e;
  ASSERT_TRUE((*stream)->Next(&e, std::chrono::milliseconds(30000)));
  sched_->Namespace("b");  // forgets "a" while its turn runs
  const Collected c = Collect(**stream);
  ASSERT_EQ(c.last.kind, StreamEvent::Kind::kDone) << c.last.error.ToString();
  EXPECT_EQ(&sched_->PoolOf(KvNamespace(Trained(), GetParam(), "a")), kv_.get());
  EXPECT_EQ(sched_->pins().sessions(), 1u);
  EXPECT_GT(session_kv_->GetStats().pages_pinned, 0u);
  EXPECT_EQ(kv_->GetStats().pages_pinned, 0u);
}

TEST_P(SessionPoolTest, AFullSessionPoolDoesNotHoldUpTheMainPool) {
  // Pages of 32 tokens: 8 in the main pool, 9 in the session pool. A session holds 6 of its
  // pool's pages; a second one needing 7 waits for it (same priority: no preemption). A plain
  // request queued behind that one goes at once into the empty main pool, instead of waiting
  // with it for the first session to end.
  Build(8, 9);
  auto first = Start(Text(kTurn1), 100, "agent-1");  // ~85 + 100 tokens: 6 pages
  StreamEvent e;
  ASSERT_TRUE(first->Next(&e, std::chrono::milliseconds(30000)));
  auto second =
      Start(Text("Once upon a time there was a king who had three daughters"), 200, "agent-2");
  auto plain = Start(Text(kTurn1), 8, "");
  const Collected p = Collect(*plain);
  ASSERT_EQ(p.last.kind, StreamEvent::Kind::kDone) << p.last.error.ToString();
  EXPECT_FALSE(second->Next(&e, std::chrono::milliseconds(0)))
      << "the second session is still waiting for the first to end";
  EXPECT_EQ(Collect(*first).last.kind, StreamEvent::Kind::kDone);
  const Collected s2 = Collect(*second);
  ASSERT_EQ(s2.last.kind, StreamEvent::Kind::kDone) << s2.last.error.ToString();
  EXPECT_EQ(sched_->Stats().preemptions, 0u);
}

TEST_P(SessionPoolTest, APoolStalledOnPinsGivesUpItsNewestWhileTheOtherProgresses) {
  // Session pool of 9 pages of 32 tokens, pins up to all of it. Session b's 6 pages stay cached
  // unpinned; session a is admitted counting them, then they are pinned: a runs out of pages
  // mid-decode while a plain request decodes in the main pool. The session pool gives a up at
  // once (as a single pool does when nothing progresses), instead of spinning until the pin
  // expires.
  SchedulerOptions so;
  so.max_pinned_fraction = 1.0;
  Build(64, 9, /*ram_tier=*/false, so);
  const auto b_prompt = Text(kTurn1);
  const Collected b = Run(b_prompt, 100, "agent-b");  // ~85 + 100 tokens: 6 pages
  ASSERT_EQ(b.last.kind, StreamEvent::Kind::kDone) << b.last.error.ToString();
  ASSERT_TRUE(sched_->pins().RemoveSession("agent-b"));
  auto plain = Start(Text(kTurn1), 1900, "");  // decodes all through the test (cancelled)
  auto a = Start(Text("Once upon a time there was a king who had three daughters"), 200,
                 "agent-a");  // 7 pages
  StreamEvent e;
  ASSERT_TRUE(a->Next(&e, std::chrono::milliseconds(30000)));
  std::vector<TokenId> conversation = b_prompt;
  conversation.insert(conversation.end(), b.tokens.begin(), b.tokens.end());
  const auto t0 = std::chrono::steady_clock::now();
  const PinRegistry::Info pin = sched_->pins().Add(SessionNs(), "", conversation, 20000);
  ASSERT_NE(pin.id, 0u) << pin.status.ToString();
  ASSERT_GE(pin.tokens, 160);
  const Collected ca = Collect(*a);
  EXPECT_EQ(ca.last.kind, StreamEvent::Kind::kError);
  EXPECT_EQ(ca.last.error.code(), StatusCode::kResourceExhausted) << ca.last.error.ToString();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(15))
      << "given up, not left waiting until the pin expired";
  // ... while the main pool was still decoding: the plain request has not ended by itself.
  plain->Cancel();
  const Collected cp = Collect(*plain);
  EXPECT_EQ(cp.last.kind, StreamEvent::Kind::kDone) << cp.last.error.ToString();
  EXPECT_EQ(cp.last.finish, GenerateResult::Finish::kCancelled)
      << "a was given up only when the main pool went idle (" << cp.tokens.size() << " tokens)";
}

TEST_P(SessionPoolTest, SessionsRefuseWhatComputesKvInTheEnginesType) {
  Build(64, 64);
  SchedRequest r;
  r.prompt = Text(kTurn1);
  r.gen.max_tokens = 4;
  r.session_id = "agent-1";
  r.kv_policy.name = "snapkv";
  auto policy = sched_->Submit(r);
  ASSERT_FALSE(policy.ok());
  EXPECT_NE(policy.status().message().find("kv_policy"), std::string::npos);
  EXPECT_NE(policy.status().message().find("--session-kv-type"), std::string::npos);
  r.kv_policy = {};
  r.segments = {{1, 10}, {11, 10}};
  r.reuse.mode = ReuseMode::kBlend;
  auto blend = sched_->Submit(r);
  ASSERT_FALSE(blend.ok());
  EXPECT_NE(blend.status().message().find("kv_reuse 'blend'"), std::string::npos);
  // The same request without a session goes to the main pool.
  r.session_id.clear();
  auto ok = sched_->Submit(r);
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  EXPECT_EQ(Collect(**ok).last.kind, StreamEvent::Kind::kDone);
}

TEST_P(SessionPoolTest, SessionChunksGoToTheTiersInTheirTypeAndComeBack) {
  Build(64, 64, /*ram_tier=*/true);
  const auto prompt = Text(kTurn1);
  const int n = 8;
  const Collected t1 = Run(prompt, n, "agent-1");
  ASSERT_EQ(t1.last.kind, StreamEvent::Kind::kDone) << t1.last.error.ToString();
  // Memory forgets the session (its pin and pages); the RAM tier keeps its chunks.
  ASSERT_TRUE(sched_->pins().RemoveSession("agent-1"));
  session_kv_->Clear(SessionNs());
  EXPECT_EQ(session_kv_->CachedPrefix(SessionNs(), prompt), 0);
  std::vector<TokenId> turn2 = prompt;
  turn2.insert(turn2.end(), t1.tokens.begin(), t1.tokens.end());
  const Collected t2 = Run(turn2, n, "agent-1");
  ASSERT_EQ(t2.last.kind, StreamEvent::Kind::kDone) << t2.last.error.ToString();
  EXPECT_GE(CachedIn(t2, "ram"), static_cast<int64_t>(prompt.size()) / 32 * 32);
  if (!engine_->kv_shape(GetParam()).windowed()) {
    EXPECT_EQ(t2.tokens, Reference(GetParam(), turn2, n));
  }
  // A conversation changed inside its second chunk restores its first chunk only (chunks are
  // keyed by the chained hash of every token up to their end).
  std::vector<TokenId> changed = turn2;
  changed[40] = changed[40] == 100 ? 101 : 100;
  ASSERT_TRUE(sched_->pins().RemoveSession("agent-1"));
  session_kv_->Clear(SessionNs());
  const Collected t3 = Run(changed, 4, "agent-1");
  ASSERT_EQ(t3.last.kind, StreamEvent::Kind::kDone) << t3.last.error.ToString();
  EXPECT_EQ(t3.last.usage.cached_tokens, 32);
  EXPECT_EQ(CachedIn(t3, "ram"), 32);
}

INSTANTIATE_TEST_SUITE_P(SessionTypes, SessionPoolTest,
                         ::testing::Values(KvType::kQ4_0, KvType::kQ4_1, KvType::kKivi4),
                         [](const auto& info) {
                           return std::string(kernels::KvTypeName(info.param));
                         });

}  // namespace
}  // namespace cachette::sched
