// Per-request records of a benchmark run and the summary computed from them.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace cachette::bench_client {

// What the client saw of one request. Times are seconds; `sent_s` and `scheduled_s` count from
// the start of the run.
struct RequestRecord {
  int program = 0;
  int turn = 0;
  int phase = 0;
  std::string tag;
  bool measured = true;
  double scheduled_s = 0;     // when the workload wanted it sent
  double sent_s = 0;          // when it was sent (later if its program was still busy)
  double ttft_s = -1;         // first content chunk; < 0 when none arrived
  double e2e_s = 0;           // until the stream ended
  std::vector<double> gaps_s; // between successive content chunks
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  int64_t cached_tokens = 0;
  std::map<std::string, int64_t> cached_by_tier;
  int http_status = 0;
  std::string status = "ok";  // "ok", "error", or "skipped" (past the duration cap)
  std::string error;
  std::string answer;         // the generated text (kept for the next turn, not logged)

  double ItlMeanSeconds() const;  // mean of gaps_s; 0 without gaps
};

// One JSON object per request: the line written to --out.
nlohmann::json RecordJson(const RequestRecord& r);

// The value at percentile `p` (0..100) of `v`, interpolating linearly between the two nearest
// ranks (numpy's default); NaN for an empty `v`.
double Percentile(std::vector<double> v, double p);

struct TagSummary {
  int requests = 0;
  double ttft_p50_ms = 0;
  double hit_rate = 0;
};

struct Summary {
  int requests = 0;           // measured requests sent (ok + errors)
  int ok = 0;
  int errors = 0;
  int skipped = 0;            // not sent: past the duration cap
  double wall_s = 0;          // first send to last answer among measured requests
  double ttft_p50_ms = 0, ttft_p90_ms = 0, ttft_p99_ms = 0, ttft_mean_ms = 0;
  double itl_p50_ms = 0, itl_p99_ms = 0;  // over every gap of every measured request
  double e2e_p50_ms = 0;
  double req_per_s = 0;
  double gen_tok_per_s = 0;   // completion tokens / wall_s
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  int64_t cached_tokens = 0;
  double hit_rate = 0;        // cached_tokens / prompt_tokens
  std::map<std::string, int64_t> cached_by_tier;
  std::map<std::string, TagSummary> by_tag;
  std::vector<std::string> first_errors;  // up to 3 distinct error messages
};

// Summarizes the measured records (warm-up ones are left out).
Summary Summarize(const std::vector<RequestRecord>& records);
nlohmann::json SummaryJson(const Summary& s);

}  // namespace cachette::bench_client
