// Workload generators (determinism from a seed, sizes, shapes), percentile math, the summary,
// URL parsing and the SSE recorder. No server needed: e2e tests drive a real one.
#include <gtest/gtest.h>

#include <cmath>
#include <set>

#include "bench_client/openai_client.h"
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
  return o;
}

bool SameWorkload(const Workload& a, const Workload& b) {
  if (a.programs.size() != b.programs.size()) return false;
  for (size_t i = 0; i < a.programs.size(); ++i) {
    const Program &p = a.programs[i], &q = b.programs[i];
    if (p.system != q.system || p.phase != q.phase || p.turns.size() != q.turns.size()) {
      return false;
    }
    for (size_t k = 0; k < p.turns.size(); ++k) {
      const Turn &s = p.turns[k], &t = q.turns[k];
      if (s.user != t.user || s.at_s != t.at_s || s.after_prev_s != t.after_prev_s ||
          s.tag != t.tag) {
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
                         ::testing::Values("multi-round-qa", "long-doc-qa", "agentic", "rag"));

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

}  // namespace
}  // namespace cachette::bench_client
