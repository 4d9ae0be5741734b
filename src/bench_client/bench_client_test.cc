// Workload generators (determinism from a seed, sizes, shapes), percentile math, the summary,
// URL parsing and the SSE recorder; the scheduling workloads and figures (goodput, programs,
// /metrics parsing), and the runner against an in-process fake server that records what it
// was sent. No cachette server needed: e2e tests drive a real one.
#include <gtest/gtest.h>
#include <httplib.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include <unistd.h>

#include "bench_client/openai_client.h"
#include "bench_client/runner.h"
#include "bench_client/server_metrics.h"
#include "bench_client/soak.h"
#include "bench_client/stats.h"
#include "bench_client/workload.h"

namespace cachette::bench_client {
namespace {

WorkloadOptions Small(const std::string& kind) {
  WorkloadOptions o;
  o.kind = kind;
  o.seed = 7;
  o.system_tokens = 50;
  o.question_tokens = 10;
  o.users = 3;
  o.rounds = 2;
  o.documents = 4;
  o.document_tokens = 100;
  o.queries = 6;
  o.hit_miss = "2:1";
  o.programs = 3;
  o.turns = 3;
  o.tool_output_tokens = 20;
  o.requests = 5;
  o.chunks = 8;
  o.chunk_tokens = 30;
  o.groups = 3;
  o.prompts_per_group = 4;
  return o;
}

bool SameWorkload(const Workload& a, const Workload& b) {
  if (a.programs.size() != b.programs.size()) return false;
  for (size_t i = 0; i < a.programs.size(); ++i) {
    const Program &p = a.programs[i], &q = b.programs[i];
    if (p.system != q.system || p.phase != q.phase || p.turns.size() != q.turns.size() ||
        p.id != q.id || p.keep_history != q.keep_history) {
      return false;
    }
    for (size_t k = 0; k < p.turns.size(); ++k) {
      const Turn &s = p.turns[k], &t = q.turns[k];
      if (s.user != t.user || s.at_s != t.at_s || s.after_prev_s != t.after_prev_s ||
          s.tag != t.tag || s.max_tokens != t.max_tokens || s.priority != t.priority ||
          s.deadline_ms != t.deadline_ms || s.tool != t.tool) {
        return false;
      }
    }
  }
  return true;
}

class KindTest : public ::testing::TestWithParam<const char*> {};

TEST_P(KindTest, SameSeedSameWorkloadOtherSeedDiffers) {
  WorkloadOptions o = Small(GetParam());
  auto a = GenerateWorkload(o);
  auto b = GenerateWorkload(o);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  ASSERT_TRUE(b.ok());
  EXPECT_TRUE(SameWorkload(*a, *b));
  EXPECT_GT(a->TurnCount(), 0);
  o.seed = 8;
  auto c = GenerateWorkload(o);
  ASSERT_TRUE(c.ok());
  EXPECT_FALSE(SameWorkload(*a, *c));
}

INSTANTIATE_TEST_SUITE_P(AllKinds, KindTest,
                         ::testing::ValuesIn(kWorkloadKinds));

TEST(WorkloadTest, MultiRoundQaShape) {
  auto w = GenerateWorkload(Small("multi-round-qa"));
  ASSERT_TRUE(w.ok());
  ASSERT_EQ(w->programs.size(), 3u);
  const std::string& system = w->programs[0].system;
  // The shared system prompt: ~system_tokens words plus a short fixed lead.
  EXPECT_NEAR(CountWords(system), 50, 10);
  double last_at = -1;
  for (size_t k = 0; k < 2; ++k) {
    for (const Program& p : w->programs) {
      EXPECT_EQ(p.system, system);
      EXPECT_TRUE(p.keep_history);
      ASSERT_EQ(p.turns.size(), 2u);
      const Turn& t = p.turns[k];
      EXPECT_EQ(t.tag, "round-" + std::to_string(k + 1));
      EXPECT_EQ(CountWords(t.user), 10);
      EXPECT_GE(t.at_s, last_at);  // arrivals in order: user 0..N-1 of round 1, then round 2
      last_at = t.at_s;
    }
  }
  EXPECT_EQ(w->programs[0].turns[0].at_s, 0.0);
}

TEST(WorkloadTest, PoissonRateIsNearTarget) {
  WorkloadOptions o = Small("rag");
  o.requests = 2000;
  o.qps = 4;
  auto w = GenerateWorkload(o);
  ASSERT_TRUE(w.ok());
  const double span = w->programs.back().turns[0].at_s;
  EXPECT_NEAR((o.requests - 1) / span, 4.0, 0.4);
}

TEST(WorkloadTest, LongDocQaWarmsThenQueriesInTheHitMissPattern) {
  auto w = GenerateWorkload(Small("long-doc-qa"));
  ASSERT_TRUE(w.ok());
  std::vector<std::string> warm_docs, tags;
  std::set<std::string> warmed;
  for (const Program& p : w->programs) {
    EXPECT_FALSE(p.keep_history);
    for (const Turn& t : p.turns) {
      const std::string doc = t.user.substr(0, t.user.find("\n\n"));
      if (p.phase == 0) {
        EXPECT_FALSE(t.measured);
        warmed.insert(doc);
        warm_docs.push_back(doc);
      } else {
        EXPECT_TRUE(t.measured);
        tags.push_back(t.tag);
        EXPECT_EQ(warmed.count(doc) == 1, t.tag == "hit") << t.tag;
      }
    }
  }
  EXPECT_EQ(warm_docs.size(), 4u);
  EXPECT_EQ(warmed.size(), 4u);
  EXPECT_NEAR(CountWords(warm_docs[0]), 100, 3);
  EXPECT_EQ(tags, (std::vector<std::string>{"hit", "hit", "miss", "hit", "hit", "miss"}));
}

TEST(WorkloadTest, AgenticTurnsPauseForTools) {
  WorkloadOptions o = Small("agentic");
  o.tool_ms = 200;
  auto w = GenerateWorkload(o);
  ASSERT_TRUE(w.ok());
  ASSERT_EQ(w->programs.size(), 3u);
  for (const Program& p : w->programs) {
    ASSERT_EQ(p.turns.size(), 3u);
    EXPECT_GE(p.turns[0].at_s, 0);
    for (size_t k = 1; k < p.turns.size(); ++k) {
      EXPECT_LT(p.turns[k].at_s, 0);
      EXPECT_GE(p.turns[k].after_prev_s, 0);
      EXPECT_LE(p.turns[k].after_prev_s, 0.8 + 1e-9);  // capped at 4x the mean
      EXPECT_EQ(CountWords(p.turns[k].user), 22);      // "Tool result:" + 20 words
    }
  }
}

TEST(WorkloadTest, RagRetrievesThreeToSixDistinctChunks) {
  WorkloadOptions o = Small("rag");
  o.requests = 50;
  auto w = GenerateWorkload(o);
  ASSERT_TRUE(w.ok());
  std::set<size_t> counts;
  for (const Program& p : w->programs) {
    ASSERT_EQ(p.turns.size(), 1u);
    const std::string& u = p.turns[0].user;
    std::set<std::string> ids;
    size_t n = 0;
    for (size_t at = u.find("[passage "); at != std::string::npos;
         at = u.find("[passage ", at + 1)) {
      ids.insert(u.substr(at, u.find(']', at) - at));
      ++n;
    }
    EXPECT_EQ(ids.size(), n);  // distinct
    EXPECT_GE(n, 3u);
    EXPECT_LE(n, 6u);
    EXPECT_EQ(p.turns[0].tag, "k=" + std::to_string(n));
    counts.insert(n);
  }
  EXPECT_EQ(counts.size(), 4u);  // every count from 3 to 6 occurs in 50 draws
}

TEST(WorkloadTest, RejectsBadOptions) {
  WorkloadOptions o = Small("nope");
  EXPECT_EQ(GenerateWorkload(o).status().code(), StatusCode::kInvalidArgument);
  o = Small("long-doc-qa");
  o.hit_miss = "x";
  EXPECT_EQ(GenerateWorkload(o).status().code(), StatusCode::kInvalidArgument);
  o = Small("rag");
  o.max_retrieved = 100;
  EXPECT_EQ(GenerateWorkload(o).status().code(), StatusCode::kInvalidArgument);
  o = Small("multi-round-qa");
  o.qps = 0;
  EXPECT_EQ(GenerateWorkload(o).status().code(), StatusCode::kInvalidArgument);
}

TEST(PercentileTest, Table) {
  struct Case {
    std::vector<double> v;
    double p, want;
  } cases[] = {
      {{5}, 50, 5},           {{5}, 99, 5},          {{1, 2}, 50, 1.5},
      {{3, 1, 2}, 50, 2},     {{1, 2, 3, 4}, 0, 1},  {{1, 2, 3, 4}, 100, 4},
      {{1, 2, 3, 4}, 50, 2.5}, {{10, 20, 30, 40, 50}, 90, 46},
      {{0, 100}, 99, 99},
  };
  for (const Case& c : cases) EXPECT_DOUBLE_EQ(Percentile(c.v, c.p), c.want) << c.p;
  EXPECT_TRUE(std::isnan(Percentile({}, 50)));
}

TEST(PercentileTest, MatchesNaiveOnManyValues) {
  Rng rng(3);
  std::vector<double> v(1001);
  for (auto& x : v) x = rng.Uniform();
  std::vector<double> sorted = v;
  std::sort(sorted.begin(), sorted.end());
  // With n - 1 = 1000 intervals, percentile p lands exactly on rank 10 * p.
  for (int p : {0, 1, 50, 90, 99, 100}) EXPECT_DOUBLE_EQ(Percentile(v, p), sorted[10 * p]);
}

TEST(SummaryTest, CountsHitRateAndSkipsWarmup) {
  std::vector<RequestRecord> rs(4);
  rs[0].measured = false;  // warm-up: not counted
  rs[0].prompt_tokens = 1000;
  rs[1].sent_s = 1;
  rs[1].ttft_s = 0.1;
  rs[1].e2e_s = 1;
  rs[1].gaps_s = {0.01, 0.03};
  rs[1].prompt_tokens = 100;
  rs[1].cached_tokens = 75;
  rs[1].cached_by_tier = {{"memory", 50}, {"ram", 25}};
  rs[1].completion_tokens = 3;
  rs[1].tag = "a";
  rs[2].sent_s = 2;
  rs[2].e2e_s = 1;
  rs[2].status = "error";
  rs[2].error = "HTTP 429";
  rs[3].status = "skipped";
  const Summary s = Summarize(rs);
  EXPECT_EQ(s.requests, 2);
  EXPECT_EQ(s.ok, 1);
  EXPECT_EQ(s.errors, 1);
  EXPECT_EQ(s.skipped, 1);
  EXPECT_DOUBLE_EQ(s.wall_s, 2);
  EXPECT_DOUBLE_EQ(s.ttft_p50_ms, 100);
  EXPECT_DOUBLE_EQ(s.itl_p50_ms, 20);
  EXPECT_DOUBLE_EQ(s.hit_rate, 0.75);
  EXPECT_EQ(s.cached_by_tier.at("ram"), 25);
  EXPECT_DOUBLE_EQ(s.gen_tok_per_s, 1.5);
  EXPECT_EQ(s.by_tag.at("a").requests, 1);
  EXPECT_EQ(s.first_errors, std::vector<std::string>{"HTTP 429"});
  const nlohmann::json j = SummaryJson(s);
  EXPECT_EQ(j["hit_rate"], 0.75);
  EXPECT_EQ(RecordJson(rs[1])["cached_tokens_by_tier"]["memory"], 50);
}

TEST(ServerUrlTest, Parses) {
  auto u = ParseServerUrl("http://127.0.0.1:8080/v1/");
  ASSERT_TRUE(u.ok());
  EXPECT_EQ(u->host, "127.0.0.1");
  EXPECT_EQ(u->port, 8080);
  EXPECT_EQ(u->base_path, "");
  u = ParseServerUrl("http://example.org/llm");
  ASSERT_TRUE(u.ok());
  EXPECT_EQ(u->port, 80);
  EXPECT_EQ(u->base_path, "/llm");
  EXPECT_FALSE(ParseServerUrl("https://x:1").ok());
  EXPECT_FALSE(ParseServerUrl("http://x:99999").ok());
  EXPECT_FALSE(ParseServerUrl("http://:80").ok());
}

TEST(SseRecorderTest, TimesContentChunksAcrossArbitrarySplits) {
  const std::string body =
      ": ping\n\n"
      "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n"
      "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n"
      "data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\r\n\r\n"
      "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":2,"
      "\"prompt_tokens_details\":{\"cached_tokens\":8},"
      "\"cachette\":{\"cached_tokens_by_tier\":{\"memory\":5,\"disk\":3}}}}\n\n"
      "data: [DONE]\n\n";
  RequestRecord r;
  r.sent_s = 1.0;
  SseRecorder sse(&r);
  // Feed 7 bytes at a time, the clock advancing one second per piece.
  double now = 1.0;
  for (size_t i = 0; i < body.size(); i += 7) sse.Feed(body.substr(i, 7), now += 1);
  EXPECT_TRUE(sse.done());
  EXPECT_EQ(r.status, "ok");
  EXPECT_EQ(r.answer, "Hello");
  EXPECT_GT(r.ttft_s, 0);
  ASSERT_EQ(r.gaps_s.size(), 1u);
  EXPECT_GT(r.gaps_s[0], 0);
  EXPECT_EQ(r.prompt_tokens, 10);
  EXPECT_EQ(r.cached_tokens, 8);
  EXPECT_EQ(r.cached_by_tier.at("disk"), 3);
}

TEST(SseRecorderTest, ErrorEventMarksTheRequest) {
  RequestRecord r;
  SseRecorder sse(&r);
  sse.Feed("data: {\"error\":{\"message\":\"boom\"}}\n\ndata: [DONE]\n\n", 0);
  EXPECT_EQ(r.status, "error");
  EXPECT_EQ(r.error, "boom");
}

// ---- The scheduling workloads (shared-prefix, deadline-mix, agentic with tools) ----------

TEST(SharedPrefixTest, GroupsShareTheirOwnSystemPromptInAShuffledBurst) {
  WorkloadOptions o = Small("shared-prefix");  // 3 groups x 4 prompts
  o.qps = 0;                                   // the burst (the CLI's default for this kind)
  auto w = GenerateWorkload(o);
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  ASSERT_EQ(w->programs.size(), 12u);
  std::map<std::string, std::string> system_of;  // tag -> system prompt
  std::map<std::string, int> count;
  std::set<std::string> questions;
  std::vector<std::string> order;
  for (size_t k = 0; k < w->programs.size(); ++k) {
    const Program& p = w->programs[k];
    EXPECT_FALSE(p.keep_history);
    EXPECT_TRUE(p.id.empty());
    ASSERT_EQ(p.turns.size(), 1u);
    const Turn& t = p.turns[0];
    EXPECT_DOUBLE_EQ(t.at_s, 1e-3 * static_cast<double>(k));  // a burst, 1 ms apart, in order
    EXPECT_EQ(t.max_tokens, o.max_tokens);
    EXPECT_EQ(CountWords(t.user), o.question_tokens);
    EXPECT_EQ(t.deadline_ms, 0);
    EXPECT_TRUE(t.tool.empty());
    questions.insert(t.user);
    const auto it = system_of.emplace(t.tag, p.system).first;
    EXPECT_EQ(it->second, p.system) << "one system prompt per group: " << t.tag;
    ++count[t.tag];
    order.push_back(t.tag);
  }
  EXPECT_EQ(questions.size(), 12u);  // every request has its own question
  EXPECT_EQ(count, (std::map<std::string, int>{{"group-0", 4}, {"group-1", 4}, {"group-2", 4}}));
  // Distinct between groups from the first word on: no group's prompt is another's prefix.
  std::set<std::string> first_words;
  for (const auto& [tag, system] : system_of) {
    EXPECT_NEAR(CountWords(system), o.system_tokens, 3);
    first_words.insert(system.substr(0, system.find('.')));
    for (const auto& [tag2, system2] : system_of) {
      if (tag != tag2) {
        EXPECT_NE(system2.rfind(system.substr(0, 20), 0), 0u);
      }
    }
  }
  EXPECT_EQ(first_words.size(), 3u);
  // Shuffled: FCFS over this order does not meet the groups one after another.
  int changes = 0;
  for (size_t k = 1; k < order.size(); ++k) changes += order[k] != order[k - 1];
  EXPECT_GT(changes, 2) << "the groups arrive contiguously";
  WorkloadOptions other = o;
  other.seed = 8;
  auto w2 = GenerateWorkload(other);
  ASSERT_TRUE(w2.ok());
  std::vector<std::string> order2;
  for (const Program& p : w2->programs) order2.push_back(p.turns[0].tag);
  EXPECT_NE(order, order2) << "the order depends on the seed";
}

TEST(SharedPrefixTest, QpsSpreadsTheArrivalsAndZeroIsOnlyForSharedPrefix) {
  WorkloadOptions o = Small("shared-prefix");
  o.qps = 0;
  ASSERT_TRUE(GenerateWorkload(o).ok());
  o.qps = 2;
  auto w = GenerateWorkload(o);
  ASSERT_TRUE(w.ok());
  EXPECT_EQ(w->programs[0].turns[0].at_s, 0.0);
  EXPECT_GT(w->programs.back().turns[0].at_s, 1.0);  // 11 gaps of mean 0.5 s
  for (const char* kind : {"multi-round-qa", "agentic", "rag", "deadline-mix"}) {
    WorkloadOptions bad = Small(kind);
    bad.qps = 0;
    EXPECT_EQ(GenerateWorkload(bad).status().code(), StatusCode::kInvalidArgument) << kind;
  }
  o.groups = 0;
  EXPECT_EQ(GenerateWorkload(o).status().code(), StatusCode::kInvalidArgument);
}

TEST(DeadlineMixTest, OnlyInteractiveRequestsCarryADeadline) {
  WorkloadOptions o = Small("deadline-mix");
  o.requests = 400;
  o.deadline_ms = 700;
  o.background_tokens = 120;
  o.background_max_tokens = 64;
  o.interactive_share = 0.25;
  for (bool with_priority : {false, true}) {
    o.deadline_priority = with_priority;
    auto w = GenerateWorkload(o);
    ASSERT_TRUE(w.ok()) << w.status().ToString();
    ASSERT_EQ(w->programs.size(), 400u);
    int interactive = 0;
    double last_at = -1;
    for (const Program& p : w->programs) {
      ASSERT_EQ(p.turns.size(), 1u);
      EXPECT_TRUE(p.system.empty());
      const Turn& t = p.turns[0];
      EXPECT_GE(t.at_s, last_at);
      last_at = t.at_s;
      if (t.tag == "interactive") {
        ++interactive;
        EXPECT_EQ(t.deadline_ms, 700);
        EXPECT_EQ(t.priority, with_priority ? 1 : 0);
        EXPECT_EQ(t.max_tokens, o.max_tokens);
        EXPECT_LT(CountWords(t.user), o.question_tokens + 5);
      } else {
        ASSERT_EQ(t.tag, "background");
        EXPECT_EQ(t.deadline_ms, 0);
        EXPECT_EQ(t.priority, 0);
        EXPECT_EQ(t.max_tokens, 64);
        EXPECT_NEAR(CountWords(t.user), 120, 6);
      }
    }
    EXPECT_NEAR(interactive, 100, 30);  // a quarter of 400
  }
  for (double share : {0.0, 1.0}) {
    o.interactive_share = share;
    auto w = GenerateWorkload(o);
    ASSERT_TRUE(w.ok());
    for (const Program& p : w->programs) {
      EXPECT_EQ(p.turns[0].tag, share == 0 ? "background" : "interactive");
    }
  }
  o.interactive_share = 1.5;
  EXPECT_EQ(GenerateWorkload(o).status().code(), StatusCode::kInvalidArgument);
}

TEST(AgenticToolsTest, EveryTurnButTheLastNamesTheToolItsNextTurnWaitsFor) {
  WorkloadOptions o = Small("agentic");
  o.programs = 200;
  o.turns = 5;
  o.tool_output_tokens = 3;
  o.tools = "search:300,code:1500,browse:800";
  const std::map<std::string, double> mean_ms = {
      {"search", 300}, {"code", 1500}, {"browse", 800}};
  auto w = GenerateWorkload(o);
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  std::set<std::string> ids;
  std::map<std::string, std::vector<double>> pauses_ms;
  for (const Program& p : w->programs) {
    ids.insert(p.id);
    ASSERT_EQ(p.turns.size(), 5u);
    EXPECT_TRUE(p.turns.back().tool.empty()) << "the last turn calls no tool";
    for (size_t k = 0; k + 1 < p.turns.size(); ++k) {
      const std::string& tool = p.turns[k].tool;
      ASSERT_EQ(mean_ms.count(tool), 1u) << "'" << tool << "'";
      const double pause_ms = p.turns[k + 1].after_prev_s * 1e3;
      EXPECT_GE(pause_ms, 0);
      EXPECT_LE(pause_ms, 4 * mean_ms.at(tool) + 1e-6);  // capped per tool
      pauses_ms[tool].push_back(pause_ms);
    }
  }
  EXPECT_EQ(ids.size(), 200u);
  EXPECT_EQ(ids.count("s7-p0"), 1u);
  EXPECT_EQ(ids.count("s7-p199"), 1u);
  // 800 draws: each tool about a third of them, with its own mean (the 4x cap takes ~2%).
  for (const auto& [tool, v] : pauses_ms) {
    EXPECT_NEAR(static_cast<double>(v.size()), 800.0 / 3, 60) << tool;
    double sum = 0;
    for (double x : v) sum += x;
    EXPECT_NEAR(sum / v.size(), mean_ms.at(tool), 0.2 * mean_ms.at(tool)) << tool;
  }
}

TEST(AgenticToolsTest, OneNamedToolGivesTheWorkloadOfToolMs) {
  WorkloadOptions plain = Small("agentic");
  plain.tool_ms = 250;
  WorkloadOptions named = plain;
  named.tools = "tool:250";
  auto a = GenerateWorkload(plain);
  auto b = GenerateWorkload(named);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_TRUE(SameWorkload(*a, *b));
  EXPECT_EQ(a->programs[0].turns[0].tool, "tool");
}

TEST(AgenticToolsTest, ParseToolsTable) {
  auto t = ParseTools("search:300,code:1500.5,a_b-c.d:0");
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  ASSERT_EQ(t->size(), 3u);
  EXPECT_EQ((*t)[1].name, "code");
  EXPECT_DOUBLE_EQ((*t)[1].mean_ms, 1500.5);
  EXPECT_DOUBLE_EQ((*t)[2].mean_ms, 0);
  for (const char* bad : {"", "search", ":5", "a:", "a:x", "a:-1", "a:5,a:6", "a b:5", "a:5,",
                          "a:1e9", "a:5ms"}) {
    auto r = ParseTools(bad);
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << "'" << bad << "'";
  }
  WorkloadOptions o = Small("agentic");
  o.tools = "search:fast";
  EXPECT_EQ(GenerateWorkload(o).status().code(), StatusCode::kInvalidArgument);
}

// ---- Goodput, priority classes, programs and tools (stats.h) ------------------------------

RequestRecord Done(double sent_s, double ttft_s, double e2e_s, int64_t tokens) {
  RequestRecord r;
  r.sent_s = sent_s;
  r.ttft_s = ttft_s;
  r.e2e_s = e2e_s;
  r.completion_tokens = tokens;
  return r;
}

TEST(GoodputTest, CountsRequestsThatMetTheirObjective) {
  std::vector<RequestRecord> rs = {
      Done(0, 0.05, 1, 10),   // deadline 250, met
      Done(1, 0.25, 1, 20),   // deadline 250, met exactly
      Done(2, 0.30, 1, 40),   // deadline 250, late
      Done(3, 2.00, 1, 80),   // no deadline, ok: met
      Done(4, 0.01, 1, 160),  // no deadline, error: not met
      Done(5, 0.01, 1, 320),  // skipped: not counted
      Done(6, 0.01, 4, 640),  // warm-up: not counted
  };
  for (int i = 0; i < 3; ++i) {
    rs[i].deadline_ms = 250;
    rs[i].priority = 1;
  }
  rs[4].status = "error";
  rs[5].status = "skipped";
  rs[6].measured = false;
  const Summary s = Summarize(rs);
  EXPECT_EQ(s.requests, 5);
  EXPECT_DOUBLE_EQ(s.wall_s, 5);  // 0 .. 4 + 1
  EXPECT_EQ(s.met_objective, 3);
  EXPECT_EQ(s.with_deadline, 3);
  EXPECT_EQ(s.met_deadline, 2);
  EXPECT_DOUBLE_EQ(s.goodput_fraction, 3.0 / 5);
  EXPECT_DOUBLE_EQ(s.goodput_req_per_s, 3.0 / 5);
  EXPECT_DOUBLE_EQ(s.goodput_tok_per_s, (10 + 20 + 80) / 5.0);
  ASSERT_EQ(s.by_priority.size(), 2u);
  const PrioritySummary& hi = s.by_priority.at(1);
  EXPECT_EQ(hi.requests, 3);
  EXPECT_DOUBLE_EQ(hi.ttft_p50_ms, 250);
  EXPECT_NEAR(hi.ttft_p99_ms, 250 + 0.98 * 50, 1e-9);  // between 250 and 300, numpy-style
  EXPECT_DOUBLE_EQ(hi.goodput_fraction, 2.0 / 3);
  const PrioritySummary& lo = s.by_priority.at(0);
  EXPECT_EQ(lo.requests, 2);
  EXPECT_DOUBLE_EQ(lo.ttft_p50_ms, 2000);  // only the OK request has a TTFT
  EXPECT_DOUBLE_EQ(lo.goodput_fraction, 0.5);
  EXPECT_TRUE(rs[1].MetObjective());
  EXPECT_FALSE(rs[2].MetObjective());
  RequestRecord no_token = Done(0, -1, 1, 0);
  no_token.deadline_ms = 100;
  EXPECT_FALSE(no_token.MetObjective()) << "no first token, no deadline met";
  const nlohmann::json j = SummaryJson(s);
  EXPECT_EQ(j["met_objective"], 3);
  EXPECT_EQ(j["by_priority"]["1"]["requests"], 3);
  EXPECT_EQ(j["ttft_p50_ms"], s.ttft_p50_ms);  // the old fields stay
  const nlohmann::json r = RecordJson(rs[2]);
  EXPECT_EQ(r["deadline_ms"], 250);
  EXPECT_EQ(r["priority"], 1);
  EXPECT_EQ(r["met_objective"], false);
  EXPECT_FALSE(RecordJson(rs[3]).contains("deadline_ms"));
  EXPECT_FALSE(RecordJson(rs[3]).contains("program_id"));
}

TEST(ProgramSummaryTest, CompletionTimeSpansFirstSendToLastAnswerOfCompletePrograms) {
  auto turn = [](const std::string& id, int k, double sent_s, double e2e_s, std::string tool,
                 double pause_s) {
    RequestRecord r = Done(sent_s, 0.1, e2e_s, 5);
    r.program_id = id;
    r.turn = k;
    r.tool = std::move(tool);
    r.tool_pause_s = pause_s;
    return r;
  };
  std::vector<RequestRecord> rs = {
      turn("a", 0, 0.0, 1.0, "search", 0.5),   // a: 0 .. 1, pause, 1.5 .. 2, pause, 4 .. 5
      turn("a", 1, 1.5, 0.5, "code", 2.0),
      turn("a", 2, 4.0, 1.0, "", -1),
      turn("b", 0, 1.0, 1.0, "search", 1.5),   // b: 1 .. 2, pause, 3.5 .. 4
      turn("b", 1, 3.5, 0.5, "", -1),
      turn("c", 0, 0.0, 1.0, "code", -1),      // c: its second turn failed: not complete
      turn("c", 1, 2.0, 1.0, "", -1),
  };
  rs[6].status = "error";
  const Summary s = Summarize(rs);
  EXPECT_EQ(s.programs_completed, 2);
  EXPECT_DOUBLE_EQ(s.program_completion_mean_ms, (5000.0 + 3000.0) / 2);
  EXPECT_DOUBLE_EQ(s.program_completion_p50_ms, 4000);
  EXPECT_NEAR(s.program_completion_p90_ms, 3000 + 0.9 * 2000, 1e-9);
  ASSERT_EQ(s.by_tool.size(), 2u);
  EXPECT_EQ(s.by_tool.at("search").calls, 2);
  EXPECT_DOUBLE_EQ(s.by_tool.at("search").pause_mean_ms, 1000);
  EXPECT_EQ(s.by_tool.at("code").calls, 2);  // c's call counts; its pause is unknown
  EXPECT_DOUBLE_EQ(s.by_tool.at("code").pause_mean_ms, 2000);
  // Without program ids (every other kind) there are no program figures.
  for (auto& r : rs) r.program_id.clear();
  EXPECT_EQ(Summarize(rs).programs_completed, 0);
  EXPECT_TRUE(Summarize(rs).by_tool.empty());
}

// ---- /metrics: preemptions and KV pages (server_metrics.h) --------------------------------

TEST(ServerMetricsTest, ReadsTheSchedulingSeriesFromPrometheusText) {
  const std::string text =
      "# HELP cachette_preemptions_total Running requests sent back to the queue.\n"
      "# TYPE cachette_preemptions_total counter\n"
      "cachette_preemptions_total 7\n"
      "# TYPE cachette_kv_pages gauge\n"
      "cachette_kv_pages{state=\"total\"} 256\n"
      "cachette_kv_pages{state=\"used\"} 96\n"
      "cachette_kv_pages{state=\"used_extra\"} 1\n"
      "cachette_session_kv_pages{state=\"total\"} 900\n"
      "cachette_session_kv_pages{state=\"used\"} 40\n";
  const MetricsSnapshot m = ParseMetricsSnapshot(text);
  EXPECT_EQ(m.preemptions, 7.0);
  EXPECT_EQ(m.kv_used, 96.0);
  EXPECT_EQ(m.kv_total, 256.0);
  EXPECT_EQ(m.session_kv_used, 40.0);
  EXPECT_EQ(m.session_kv_total, 900.0);
  EXPECT_FALSE(ParseMetricsSnapshot("cachette_kv_pages{state=\"used\"} 5\n").session_kv_used);
}

TEST(ServerMetricsTest, MalformedTextGivesMissingValuesNotACrash) {
  const std::string cases[] = {
      "",
      "<html>404 not found</html>",
      "cachette_preemptions_total\ncachette_kv_pages{state=\"used\"}\n",
      "cachette_preemptions_total abc\ncachette_kv_pages{state=\"used\"} \n",
      "cachette_preemptions_total NaN\ncachette_kv_pages{state=\"used\"} +Inf\n",
      "cachette_preemptions_total{} 3\ncachette_kv_pages{state=\"used\" 5\n",
      std::string("cachette_preemptions_total \0 9\n", 31) + "\xff\xfe\n\n\n",
      "cachette_kv_pages{state=\"used\"} 5",  // cut before the newline: still a value
  };
  for (size_t i = 0; i < std::size(cases); ++i) {
    const MetricsSnapshot m = ParseMetricsSnapshot(cases[i]);
    EXPECT_FALSE(m.preemptions.has_value()) << i;
    EXPECT_FALSE(m.kv_total.has_value()) << i;
    if (i + 1 < std::size(cases)) {
      EXPECT_FALSE(m.kv_used.has_value()) << i;
    }
  }
  EXPECT_EQ(ParseMetricsSnapshot(cases[std::size(cases) - 1]).kv_used, 5.0);
}

TEST(ServerMetricsTest, PreemptionsAreTheCounterIncreaseOrANote) {
  MetricsSnapshot a, b;
  a.preemptions = 3;
  b.preemptions = 10;
  ServerFigures f;
  AddPreemptions(a, b, &f);
  EXPECT_TRUE(f.preemptions_known);
  EXPECT_DOUBLE_EQ(f.preemptions, 7);
  EXPECT_TRUE(f.notes.empty());

  ServerFigures missing;
  b.preemptions.reset();
  AddPreemptions(a, b, &missing);
  EXPECT_FALSE(missing.preemptions_known);
  EXPECT_DOUBLE_EQ(missing.preemptions, 0);
  ASSERT_EQ(missing.notes.size(), 1u);
  EXPECT_NE(missing.notes[0].find("cachette_preemptions_total"), std::string::npos);

  ServerFigures unreachable;
  AddPreemptions(Unavailable("GET /metrics: HTTP 404"), a, &unreachable);
  EXPECT_FALSE(unreachable.preemptions_known);
  ASSERT_EQ(unreachable.notes.size(), 1u);
  EXPECT_NE(unreachable.notes[0].find("HTTP 404"), std::string::npos);
}

TEST(ServerMetricsTest, KvSummarySkipsMissingSamples) {
  std::vector<KvSample> samples(5);
  samples[0].used = 10;
  samples[0].total = 100;
  samples[1].used = 30;
  // samples[2]: a failed read
  samples[3].used = 20;
  samples[3].total = 120;
  samples[4].total = 120;
  ServerFigures f;
  SummarizeKv(samples, &f);
  EXPECT_EQ(f.kv_samples, 3);
  EXPECT_DOUBLE_EQ(f.kv_used_peak, 30);
  EXPECT_DOUBLE_EQ(f.kv_used_mean, 20);
  EXPECT_DOUBLE_EQ(f.kv_total, 120);
  EXPECT_EQ(f.session_kv_samples, 0);  // no session pool
  samples[1].session_used = 4;
  samples[3].session_used = 8;
  samples[3].session_total = 50;
  SummarizeKv(samples, &f);
  EXPECT_EQ(f.session_kv_samples, 2);
  EXPECT_DOUBLE_EQ(f.session_kv_used_peak, 8);
  EXPECT_DOUBLE_EQ(f.session_kv_used_mean, 6);
  EXPECT_DOUBLE_EQ(f.session_kv_total, 50);
  EXPECT_EQ(f.kv_samples, 3);
  SummarizeKv({}, &f);
  EXPECT_EQ(f.kv_samples, 0);
  EXPECT_DOUBLE_EQ(f.kv_used_peak, 0);
}

// ---- The runner against an in-process fake server ----------------------------------------

// An OpenAI-style server on a loopback port that answers every chat completion with one
// content chunk and usage, counts /metrics reads (each raises the preemption counter by one
// and reports `used` = reads) and keeps every request body it was sent.
class FakeServer {
 public:
  explicit FakeServer(bool with_metrics) {
    srv_.Get("/v1/models", [](const httplib::Request&, httplib::Response& res) {
      res.set_content(R"({"data":[{"id":"fake"}]})", "application/json");
    });
    srv_.Post("/v1/chat/completions", [this](const httplib::Request& req,
                                             httplib::Response& res) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        bodies_.push_back(nlohmann::json::parse(req.body));
      }
      res.set_content(
          "data: {\"choices\":[{\"delta\":{\"content\":\"ok\"}}]}\n\n"
          "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\n"
          "data: [DONE]\n\n",
          "text/event-stream");
    });
    if (with_metrics) {
      srv_.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
        const int n = ++metrics_reads_;
        res.set_content("cachette_preemptions_total " + std::to_string(n) +
                            "\ncachette_kv_pages{state=\"total\"} 64\n"
                            "cachette_kv_pages{state=\"used\"} " + std::to_string(n) + "\n",
                        "text/plain");
      });
    }
    port_ = srv_.bind_to_any_port("127.0.0.1");
    thread_ = std::thread([this] { srv_.listen_after_bind(); });
    while (!srv_.is_running()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ~FakeServer() {
    srv_.stop();
    thread_.join();
  }
  std::string url() const { return "http://127.0.0.1:" + std::to_string(port_); }
  std::vector<nlohmann::json> bodies() {
    std::lock_guard<std::mutex> lock(mu_);
    return bodies_;
  }

 private:
  httplib::Server srv_;
  int port_ = 0;
  std::thread thread_;
  std::mutex mu_;
  std::vector<nlohmann::json> bodies_;
  std::atomic<int> metrics_reads_{0};
};

TEST(RunnerTest, SendsTheSchedulingFieldsAndReadsMetricsAroundTheRun) {
  FakeServer server(/*with_metrics=*/true);
  WorkloadOptions o = Small("agentic");
  o.programs = 2;
  o.turns = 3;
  o.qps = 1000;
  o.tools = "search:20,code:40";
  o.max_tokens = 2;
  auto w = GenerateWorkload(o);
  ASSERT_TRUE(w.ok());
  RunOptions ro;
  ro.url = server.url();
  ro.metrics_every_s = 0.02;
  ro.run_nonce = "n1";
  auto run = RunWorkload(*w, ro);
  ASSERT_TRUE(run.ok()) << run.status().ToString();
  EXPECT_EQ(run->run_nonce, "n1");
  ASSERT_EQ(run->records.size(), 6u);
  for (const RequestRecord& r : run->records) {
    EXPECT_EQ(r.status, "ok") << r.error;
    EXPECT_EQ(r.program_id, "s7-p" + std::to_string(r.program) + "-n1");
    EXPECT_EQ(r.tool.empty(), r.turn == 2);
    EXPECT_EQ(r.tool_pause_s >= 0, r.turn < 2);  // the pause after each tool call
  }
  // The server saw each program's id on every turn and a tool on all but the last turn.
  std::map<std::string, std::vector<std::string>> tools_by_program;
  for (const nlohmann::json& b : server.bodies()) {
    EXPECT_FALSE(b.contains("priority"));
    EXPECT_FALSE(b.contains("deadline_ms"));
    tools_by_program[b.at("program_id").get<std::string>()].push_back(b.value("tool", ""));
  }
  ASSERT_EQ(tools_by_program.size(), 2u);
  for (const auto& [id, tools] : tools_by_program) {
    ASSERT_EQ(tools.size(), 3u) << id;
    EXPECT_FALSE(tools[0].empty());
    EXPECT_FALSE(tools[1].empty());
    EXPECT_TRUE(tools[2].empty());
  }
  // Every read raised the fake counter by one: before, the samples, after.
  const ServerFigures& f = run->server;
  EXPECT_TRUE(f.preemptions_known) << (f.notes.empty() ? "" : f.notes[0]);
  EXPECT_DOUBLE_EQ(f.preemptions, static_cast<double>(run->kv_timeline.size()) + 1);
  EXPECT_GE(f.kv_samples, 1);
  EXPECT_DOUBLE_EQ(f.kv_total, 64);
  EXPECT_DOUBLE_EQ(f.kv_used_peak, static_cast<double>(run->kv_timeline.size()) + 1);
  for (size_t i = 1; i < run->kv_timeline.size(); ++i) {
    EXPECT_GE(run->kv_timeline[i].t_s, run->kv_timeline[i - 1].t_s);
  }
  // A fresh nonce per run when none is given.
  ro.run_nonce.clear();
  auto a = RunWorkload(*w, ro);
  auto b = RunWorkload(*w, ro);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_NE(a->run_nonce, b->run_nonce);
  EXPECT_NE(a->records[0].program_id, b->records[0].program_id);
}

TEST(RunnerTest, SessionIdsAreOnePerProgramAndOnlyWhenAsked) {
  FakeServer server(/*with_metrics=*/false);
  WorkloadOptions o = Small("multi-round-qa");
  o.users = 3;
  o.rounds = 2;
  o.qps = 1000;
  o.max_tokens = 2;
  auto w = GenerateWorkload(o);
  ASSERT_TRUE(w.ok());
  RunOptions ro;
  ro.url = server.url();
  ro.metrics_every_s = 0;
  ro.run_nonce = "n2";
  ro.session_ids = true;
  auto run = RunWorkload(*w, ro);
  ASSERT_TRUE(run.ok()) << run.status().ToString();
  std::map<std::string, int> turns_by_session;
  for (const nlohmann::json& b : server.bodies()) {
    ASSERT_TRUE(b.contains("session_id"));
    ++turns_by_session[b.at("session_id").get<std::string>()];
  }
  ASSERT_EQ(turns_by_session.size(), 3u);
  for (const auto& [id, turns] : turns_by_session) {
    EXPECT_EQ(id.rfind("sess-", 0), 0u) << id;
    EXPECT_EQ(id.substr(id.size() - 3), "-n2") << id;
    EXPECT_EQ(turns, 2) << id;
  }
  for (const RequestRecord& r : run->records) {
    EXPECT_EQ(r.session_id, "sess-" + std::to_string(r.program) + "-n2");
    EXPECT_EQ(RecordJson(r).at("session_id"), r.session_id);
  }
  // Off by default.
  FakeServer plain(/*with_metrics=*/false);
  ro.url = plain.url();
  ro.session_ids = false;
  ASSERT_TRUE(RunWorkload(*w, ro).ok());
  for (const nlohmann::json& b : plain.bodies()) EXPECT_FALSE(b.contains("session_id"));
}

TEST(RunnerTest, DeadlineMixSendsPriorityAndDeadlineOnlyOnInteractiveRequests) {
  FakeServer server(/*with_metrics=*/false);
  WorkloadOptions o = Small("deadline-mix");
  o.requests = 12;
  o.qps = 1000;
  o.deadline_priority = true;
  o.deadline_ms = 5000;
  o.background_tokens = 20;
  o.background_max_tokens = 3;
  auto w = GenerateWorkload(o);
  ASSERT_TRUE(w.ok());
  RunOptions ro;
  ro.url = server.url();
  auto run = RunWorkload(*w, ro);
  ASSERT_TRUE(run.ok()) << run.status().ToString();
  int interactive = 0;
  for (const nlohmann::json& b : server.bodies()) {
    EXPECT_FALSE(b.contains("program_id"));
    EXPECT_FALSE(b.contains("tool"));
    if (b.contains("deadline_ms")) {
      ++interactive;
      EXPECT_EQ(b["deadline_ms"], 5000);
      EXPECT_EQ(b["priority"], 1);
      EXPECT_EQ(b["max_tokens"], o.max_tokens);
    } else {
      EXPECT_FALSE(b.contains("priority"));
      EXPECT_EQ(b["max_tokens"], 3);
    }
  }
  EXPECT_GT(interactive, 0);
  EXPECT_LT(interactive, 12);
  // No /metrics (HTTP 404): figures missing with notes, the run itself fine.
  const Summary s = Summarize(run->records, run->server);
  EXPECT_EQ(s.ok, 12);
  EXPECT_EQ(s.met_objective, 12);  // a fake answer is well within 5 s
  EXPECT_FALSE(s.server.preemptions_known);
  EXPECT_EQ(s.server.kv_samples, 0);
  ASSERT_EQ(s.server.notes.size(), 2u);
  EXPECT_NE(s.server.notes[0].find("404"), std::string::npos) << s.server.notes[0];
  EXPECT_TRUE(run->kv_timeline.empty());
}

// ---- The soak client's pure pieces (soak.h) ----------------------------------------------

TEST(SoakMixTest, EveryDrawMapsToAnActionInProportionToItsWeight) {
  SoakMix mix = SoakMix::Default();
  mix.weights[static_cast<int>(SoakAction::kMetrics)] = 0;  // a zero weight is never drawn
  std::array<int, kSoakActionCount> seen{};
  for (int u = 0; u < mix.Total(); ++u) ++seen[static_cast<int>(mix.Pick(u))];
  EXPECT_EQ(seen, mix.weights);
  EXPECT_EQ(seen[static_cast<int>(SoakAction::kMetrics)], 0);
  // The default mix uses every action, a fifth or so malformed.
  const SoakMix d = SoakMix::Default();
  for (int i = 0; i < kSoakActionCount; ++i) EXPECT_GT(d.weights[i], 0) << i;
  const double malformed =
      static_cast<double>(d.weights[static_cast<int>(SoakAction::kMalformed)]) / d.Total();
  EXPECT_GT(malformed, 0.15);
  EXPECT_LT(malformed, 0.3);
}

bool SamePlan(const SoakRequest& a, const SoakRequest& b) {
  return a.action == b.action && a.malformed == b.malformed && a.transport == b.transport &&
         a.method == b.method && a.path == b.path && a.body == b.body && a.raw == b.raw &&
         a.admin == b.admin;
}

TEST(SoakPlanTest, SameSeedSamePlansOtherSeedDiffers) {
  const SoakMix mix = SoakMix::Default();
  const SoakPools pools = SoakPools::Default();
  SoakClientState st;
  Rng a(5), b(5), c(6);
  int differ = 0;
  for (int i = 0; i < 300; ++i) {
    const SoakRequest qa = PlanSoakRequest(a, mix, pools, st);
    const SoakRequest qb = PlanSoakRequest(b, mix, pools, st);
    EXPECT_TRUE(SamePlan(qa, qb)) << i;
    differ += !SamePlan(qa, PlanSoakRequest(c, mix, pools, st));
  }
  EXPECT_GT(differ, 250);
}

TEST(SoakPlanTest, ManyDrawsFollowTheMixAndReachEveryMalformedKind) {
  const SoakMix mix = SoakMix::Default();
  const SoakPools pools = SoakPools::Default();
  SoakClientState st;
  Rng rng(11);
  constexpr int kDraws = 20000;
  std::array<int, kSoakActionCount> actions{};
  std::array<int, kSoakMalformedCount> kinds{};
  std::set<std::string> salts;
  for (int i = 0; i < kDraws; ++i) {
    const SoakRequest q = PlanSoakRequest(rng, mix, pools, st);
    ++actions[static_cast<int>(q.action)];
    if (q.action == SoakAction::kMalformed) {
      ASSERT_LT(q.malformed, SoakMalformed::kCount);
      ++kinds[static_cast<int>(q.malformed)];
    } else {
      EXPECT_EQ(q.malformed, SoakMalformed::kCount);
    }
    if (q.action == SoakAction::kChat) {
      salts.insert(nlohmann::json::parse(q.body).value("cache_salt", std::string()));
    }
  }
  for (int i = 0; i < kSoakActionCount; ++i) {
    const double expected = static_cast<double>(kDraws) * mix.weights[i] / mix.Total();
    EXPECT_NEAR(actions[i], expected, 0.2 * expected + 10)
        << SoakActionName(static_cast<SoakAction>(i));
  }
  for (int k = 0; k < kSoakMalformedCount; ++k) {
    EXPECT_GT(kinds[k], 0) << SoakMalformedName(static_cast<SoakMalformed>(k));
  }
  // Tenants reach the 256-byte boundary from both sides; "" is "no cache_salt".
  std::set<size_t> sizes;
  for (const auto& s : salts) sizes.insert(s.size());
  EXPECT_TRUE(sizes.count(0) && sizes.count(255) && sizes.count(256) && sizes.count(257) &&
              sizes.count(300));
}

TEST(SoakPlanTest, WellFormedActionsCarryValidJsonOfTheirShape) {
  const SoakPools pools = SoakPools::Default();
  SoakClientState st;
  st.model = "m";
  Rng rng(3);
  for (int i = 0; i < 400; ++i) {
    const auto a = static_cast<SoakAction>(i % kSoakActionCount);
    if (a == SoakAction::kMalformed) continue;
    const SoakRequest q = PlanSoakAction(a, SoakMalformed::kCount, rng, pools, st);
    SCOPED_TRACE(std::string(SoakActionName(a)));
    if (q.method == "GET") {
      EXPECT_TRUE(q.body.empty());
      continue;
    }
    const nlohmann::json b = nlohmann::json::parse(q.body);  // throws (fails) when invalid
    const bool generates = q.path == "/v1/chat/completions" || q.path == "/v1/completions";
    EXPECT_EQ(q.admin, !generates);
    if (generates) {
      EXPECT_EQ(b["model"], "m");
      const int mt = b["max_tokens"].get<int>();
      EXPECT_GE(mt, 1);
      EXPECT_LE(mt, a == SoakAction::kStreamDisconnect ? 64 : 24);
    }
    switch (a) {
      case SoakAction::kChatStream:
      case SoakAction::kCompletionStream:
        EXPECT_EQ(q.transport, SoakTransport::kStream);
        EXPECT_TRUE(b["stream"].get<bool>());
        break;
      case SoakAction::kStreamDisconnect:
        EXPECT_EQ(q.transport, SoakTransport::kStreamDisconnect);
        EXPECT_TRUE(b["ignore_eos"].get<bool>());
        break;
      case SoakAction::kChatPin:
        EXPECT_EQ(b["cache_control"]["type"], "ephemeral");
        break;
      case SoakAction::kAbandon:
        EXPECT_EQ(q.transport, SoakTransport::kRawAbandon);
        EXPECT_EQ(q.raw.rfind("POST /v1/chat/completions HTTP/1.1\r\n", 0), 0u);
        EXPECT_EQ(q.raw.substr(q.raw.size() - q.body.size()), q.body);
        break;
      case SoakAction::kAdminPin:
        EXPECT_EQ(q.path, "/v1/cache/pin");
        EXPECT_GE(b["ttl_s"].get<int>(), 5);
        break;
      default:
        EXPECT_EQ(q.transport, SoakTransport::kHttp);
    }
  }
}

TEST(SoakPlanTest, UnpinUsesAPinIdTheClientHoldsOrASession) {
  const SoakPools pools = SoakPools::Default();
  SoakClientState st;
  st.pin_ids = {17, 23};
  Rng rng(9);
  int by_id = 0, by_session = 0;
  for (int i = 0; i < 200; ++i) {
    const auto b = nlohmann::json::parse(
        PlanSoakAction(SoakAction::kAdminUnpin, SoakMalformed::kCount, rng, pools, st).body);
    if (b.contains("pin_id")) {
      ++by_id;
      EXPECT_TRUE(b["pin_id"] == 17 || b["pin_id"] == 23);
    } else {
      ++by_session;
      EXPECT_EQ(b["session_id"].get<std::string>().rfind("soak-session-", 0), 0u);
    }
  }
  EXPECT_GT(by_id, by_session);
  EXPECT_GT(by_session, 0);
}

TEST(SoakPlanTest, MalformedRequestsAreMalformedTheWayTheyClaim) {
  const SoakPools pools = SoakPools::Default();
  SoakClientState st;
  st.api_key = "k1";
  st.host = "h:1";
  Rng rng(4);
  auto plan = [&](SoakMalformed m) {
    return PlanSoakAction(SoakAction::kMalformed, m, rng, pools, st);
  };
  auto parses = [](const std::string& s) {
    return !nlohmann::json::parse(s, nullptr, /*allow_exceptions=*/false).is_discarded();
  };
  for (int k = 0; k < kSoakMalformedCount; ++k) {
    const auto m = static_cast<SoakMalformed>(k);
    const SoakRequest q = plan(m);
    SCOPED_TRACE(std::string(SoakMalformedName(m)));
    EXPECT_EQ(q.raw.rfind(q.method + " " + q.path + " HTTP/1.1\r\nHost: h:1\r\n", 0), 0u);
    EXPECT_EQ(q.raw.substr(q.raw.size() - q.body.size()), q.body);
    const bool bad_key = m == SoakMalformed::kBadAuth;
    EXPECT_EQ(q.raw.find("Authorization: Bearer k1\r\n") != std::string::npos, !bad_key);
    EXPECT_EQ(q.transport, m == SoakMalformed::kPartialBody ? SoakTransport::kRawAbandon
                                                             : SoakTransport::kRaw);
  }
  for (int i = 0; i < 20; ++i) EXPECT_FALSE(parses(plan(SoakMalformed::kBadJson).body));
  EXPECT_FALSE(parses(plan(SoakMalformed::kInvalidUtf8).body));
  EXPECT_NE(plan(SoakMalformed::kEmptyBody).raw.find("Content-Length: 0\r\n\r\n"),
            std::string::npos);
  EXPECT_NE(plan(SoakMalformed::kBadContentLength).raw.find("Content-Length: abc\r\n"),
            std::string::npos);
  const SoakRequest partial = plan(SoakMalformed::kPartialBody);
  EXPECT_NE(partial.raw.find("Content-Length: " + std::to_string(partial.body.size() + 100)),
            std::string::npos);
  EXPECT_EQ(nlohmann::json::parse(plan(SoakMalformed::kOversizeMaxTokens).body)["max_tokens"],
            1000000000);
  EXPECT_EQ(nlohmann::json::parse(plan(SoakMalformed::kNegativeMaxTokens).body)["max_tokens"], -5);
  EXPECT_EQ(plan(SoakMalformed::kWrongMethod).method, "GET");
  EXPECT_EQ(plan(SoakMalformed::kUnknownRoute).path, "/v1/nonexistent");
  EXPECT_GT(plan(SoakMalformed::kHugePrompt).body.size(), 60000u);
  const auto ext = nlohmann::json::parse(plan(SoakMalformed::kBadExtensions).body);
  EXPECT_TRUE(ext["cache_salt"].is_number() && ext["cache_control"].is_string());
  EXPECT_TRUE(nlohmann::json::parse(plan(SoakMalformed::kUnknownFields).body).contains(
      "frobnicate"));
}

TEST(SoakClassifyTest, Table) {
  struct Case {
    SoakOutcome o;
    SoakClass want;
  };
  auto status = [](int s) {
    SoakOutcome o;
    o.http_status = s;
    return o;
  };
  auto with = [](SoakOutcome o, auto fn) {
    fn(o);
    return o;
  };
  const Case cases[] = {
      {status(200), SoakClass::k2xx},
      {status(204), SoakClass::k2xx},
      {status(400), SoakClass::k4xx},
      {status(404), SoakClass::k4xx},
      {status(413), SoakClass::k4xx},
      {status(429), SoakClass::k429},
      {status(500), SoakClass::k5xx},
      {status(503), SoakClass::k5xx},
      {with(status(503), [](SoakOutcome& o) { o.draining = true; }), SoakClass::k503Draining},
      {with(status(500), [](SoakOutcome& o) { o.draining = true; }), SoakClass::k5xx},
      {status(0), SoakClass::kConnectionError},
      {with(status(200), [](SoakOutcome& o) { o.transport_error = true; }),
       SoakClass::kConnectionError},
      {with(status(0), [](SoakOutcome& o) { o.abandoned = true; }), SoakClass::kAbandoned},
      {with(status(200), [](SoakOutcome& o) { o.stream_error_type = "server_error"; }),
       SoakClass::kStreamError},
      {with(status(200), [](SoakOutcome& o) { o.stream_error_type = "rate_limit_error"; }),
       SoakClass::k429},
      {with(status(200), [](SoakOutcome& o) { o.stream_error_type = "invalid_request_error"; }),
       SoakClass::k4xx},
      {with(status(200), [](SoakOutcome& o) { o.stream_incomplete = true; }),
       SoakClass::kStreamError},
  };
  for (const Case& c : cases) {
    EXPECT_EQ(Classify(c.o), c.want) << "status " << c.o.http_status << " -> "
                                     << SoakClassName(Classify(c.o));
  }
  EXPECT_TRUE(IsSoakFailure(SoakClass::k5xx));
  EXPECT_TRUE(IsSoakFailure(SoakClass::kConnectionError));
  EXPECT_TRUE(IsSoakFailure(SoakClass::kStreamError));
  for (SoakClass ok : {SoakClass::k2xx, SoakClass::k4xx, SoakClass::k429,
                       SoakClass::k503Draining, SoakClass::kAbandoned}) {
    EXPECT_FALSE(IsSoakFailure(ok)) << SoakClassName(ok);
  }
}

TEST(SoakTallyTest, CountsPerClassStatusAndActionAndMerges) {
  SoakTally a, b;
  SoakOutcome ok, bad, e500, gone;
  ok.http_status = 200;
  bad.http_status = 400;
  e500.http_status = 500;
  e500.detail = "boom";
  gone.abandoned = true;
  a.Add(SoakAction::kChat, ok);
  a.Add(SoakAction::kChat, bad);
  a.Add(SoakAction::kMalformed, bad);
  b.Add(SoakAction::kAbandon, gone);
  b.Add(SoakAction::kChatStream, e500);
  EXPECT_EQ(a.failures(), 0);
  EXPECT_EQ(b.failures(), 1);
  a.Merge(b);
  EXPECT_EQ(a.requests(), 5);
  EXPECT_EQ(a.count(SoakClass::k2xx), 1);
  EXPECT_EQ(a.count(SoakClass::k4xx), 2);
  EXPECT_EQ(a.count(SoakClass::k5xx), 1);
  EXPECT_EQ(a.count(SoakClass::kAbandoned), 1);
  EXPECT_EQ(a.failures(), 1);
  EXPECT_EQ(a.by_status().at(400), 2);
  EXPECT_EQ(a.by_status().count(0), 0u);  // abandoned requests have no status
  EXPECT_EQ(a.action_count(SoakAction::kChat), 2);
  ASSERT_EQ(a.failure_notes().size(), 1u);
  EXPECT_EQ(a.failure_notes()[0], "chat_stream: 5xx boom");
  const nlohmann::json j = a.ToJson();
  EXPECT_EQ(j["classes"]["4xx"], 2);
  EXPECT_EQ(j["statuses"]["500"], 1);
  // Notes stop at the cap; counts do not.
  for (int i = 0; i < 20; ++i) a.Add(SoakAction::kChat, e500);
  EXPECT_EQ(a.failure_notes().size(), SoakTally::kMaxFailureNotes);
  EXPECT_EQ(a.failures(), 21);
}

TEST(SoakRssTest, ParsesVmRssFromProcStatus) {
  const std::string status =
      "Name:\tcachette\nVmPeak:\t  999999 kB\nVmSize:\t  888888 kB\nVmRSS:\t   51200 kB\n"
      "RssAnon:\t   10000 kB\n";
  auto b = ParseVmRssBytes(status);
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_EQ(*b, 51200u * 1024);
  EXPECT_FALSE(ParseVmRssBytes("Name:\tx\nVmSize:\t 1 kB\n").ok());  // a kernel thread
  EXPECT_FALSE(ParseVmRssBytes("VmRSS:\t   kB\n").ok());
  EXPECT_FALSE(ParseVmRssBytes("VmRSS:\t 12 MB\n").ok());
  EXPECT_FALSE(ParseVmRssBytes("VmRSS:\t 99999999999999999999999 kB\n").ok());
  EXPECT_EQ(*ParseVmRssBytes("VmRSS: 7 kB"), 7u * 1024);  // no final newline
  // This test process has a resident set; a process that does not exist is kNotFound.
  auto self = ReadProcessRssBytes(static_cast<int>(getpid()));
  ASSERT_TRUE(self.ok()) << self.status().ToString();
  EXPECT_GT(*self, 1u << 20);
  EXPECT_EQ(ReadProcessRssBytes(0x3fffffff).status().code(), StatusCode::kNotFound);
}

TEST(SoakRssTest, SummaryGivesStartMaxEndAndTheSlopeOfTheLastHalf) {
  EXPECT_EQ(SummarizeRss({}).samples, 0);
  std::vector<RssSample> flat;
  // A spike early on, then flat: the max sees the spike, the late slope does not.
  for (int t = 0; t <= 100; ++t) flat.push_back({double(t), t == 10 ? 900u : 500u});
  RssSummary s = SummarizeRss(flat);
  EXPECT_EQ(s.samples, 101);
  EXPECT_EQ(s.start_bytes, 500u);
  EXPECT_EQ(s.max_bytes, 900u);
  EXPECT_EQ(s.end_bytes, 500u);
  EXPECT_DOUBLE_EQ(s.late_slope_bytes_per_s, 0);
  // Growth of 1 MiB/s over the second half only (a leak that starts late).
  std::vector<RssSample> leak;
  for (int t = 0; t <= 100; ++t) {
    leak.push_back({double(t), uint64_t{100} << 20 | 0});
    if (t > 50) leak.back().bytes += static_cast<uint64_t>(t - 50) << 20;
  }
  s = SummarizeRss(leak);
  EXPECT_NEAR(s.late_slope_bytes_per_s, 1 << 20, 0.05 * (1 << 20));
  EXPECT_EQ(s.end_bytes, (uint64_t{150}) << 20);
  // One sample: no slope.
  EXPECT_DOUBLE_EQ(SummarizeRss({{5, 7}}).late_slope_bytes_per_s, 0);
}

TEST(SoakMetricsTest, PrometheusValueMatchesTheWholeSeriesName) {
  const std::string text =
      "# HELP cachette_pins Pins held.\n# TYPE cachette_pins gauge\n"
      "cachette_pins_total 99\ncachette_pins 3\n"
      "cachette_kv_pages{state=\"total\"} 64\ncachette_kv_pages{state=\"used\"} 12\n"
      "cachette_broken nan-ish\n";
  EXPECT_EQ(PrometheusValue(text, "cachette_pins"), 3.0);
  EXPECT_EQ(PrometheusValue(text, "cachette_pins_total"), 99.0);
  EXPECT_EQ(PrometheusValue(text, "cachette_kv_pages{state=\"used\"}"), 12.0);
  EXPECT_FALSE(PrometheusValue(text, "cachette_kv_pages").has_value());
  EXPECT_FALSE(PrometheusValue(text, "cachette_sessions").has_value());
}

TEST(SoakDurationTest, Table) {
  EXPECT_EQ(*ParseDurationSeconds("45"), 45);
  EXPECT_EQ(*ParseDurationSeconds("45s"), 45);
  EXPECT_EQ(*ParseDurationSeconds("10m"), 600);
  EXPECT_EQ(*ParseDurationSeconds("1.5m"), 90);
  EXPECT_EQ(*ParseDurationSeconds("2h"), 7200);
  for (const char* bad : {"", "0", "-3", "m", "10x", "1e999", "ten"}) {
    EXPECT_FALSE(ParseDurationSeconds(bad).ok()) << bad;
  }
}

TEST(SoakRawTest, RequestBytesAreExact) {
  EXPECT_EQ(RawHttpRequest("POST", "/p", "h:1", {"A: b"}, "xyz"),
            "POST /p HTTP/1.1\r\nHost: h:1\r\nConnection: close\r\nA: b\r\n"
            "Content-Length: 3\r\n\r\nxyz");
  EXPECT_EQ(RawHttpRequest("GET", "/", "h", {}, "", "7"),
            "GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\nContent-Length: 7\r\n\r\n");
}

}  // namespace
}  // namespace cachette::bench_client
