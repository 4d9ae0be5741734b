// Per-request records of a benchmark run and the summary computed from them.
//
// Besides latency and cache figures the summary carries the scheduling figures:
//   goodput      requests (and generated tokens) per second of the requests that met their
//                objective: TTFT <= deadline_ms when the request had one, finished OK when not.
//   by priority  TTFT per priority class, when a workload sends more than one.
//   programs     agent programs' completion time, the first send of a program to its last
//                answer (Continuum's metric), and per tool the calls and the pause after them.
//   server       what the server's /metrics said during the run (ServerFigures): preemptions
//                and KV pages in use over time. The runner fills it; Summarize() copies it.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
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
  // The scheduling fields as sent (0 / empty: not sent); see Turn in workload.h.
  int priority = 0;
  int deadline_ms = 0;
  std::string program_id;     // with the run's nonce
  std::string session_id;     // RunOptions::session_ids: "sess-<program>-<nonce>"
  std::string tool;
  // For a turn with a tool: the program's pause between this answer and the next turn's send
  // (the tool's run time as the server saw it); < 0 when no next turn was sent.
  double tool_pause_s = -1;

  double ItlMeanSeconds() const;  // mean of gaps_s; 0 without gaps
  // True when the request finished OK and, if it had a deadline, its first token came within
  // it. The definition of goodput.
  bool MetObjective() const;
};

// One JSON object per request: the line written to --out.
nlohmann::json RecordJson(const RequestRecord& r);

// The value at percentile `p` (0..100) of `v`, interpolating linearly between the two nearest
// ranks (numpy's default); NaN for an empty `v`.
double Percentile(std::vector<double> v, double p);

struct TagSummary {
  int requests = 0;
  double ttft_p50_ms = 0;
  double ttft_p99_ms = 0;
  double hit_rate = 0;
};

// One priority class (requests sent with the same "priority").
struct PrioritySummary {
  int requests = 0;           // sent (ok + errors)
  double ttft_p50_ms = 0, ttft_p99_ms = 0;
  double goodput_fraction = 0;  // met their objective / requests
};

struct ToolSummary {
  int calls = 0;              // answered turns that called the tool
  double pause_mean_ms = 0;   // mean tool_pause_s over calls followed by a sent turn; NaN if none
};

// KV pages in use, sampled from the server's /metrics during the run.
struct KvSample {
  double t_s = 0;                    // since the run's start
  std::optional<double> used, total; // cachette_kv_pages{state="used"|"total"}; absent: missing
  // The same of the session pool (cachette_session_kv_pages, --session-kv-type); absent without.
  std::optional<double> session_used, session_total;
};

// What the server's /metrics said about the run; every figure is optional because servers other
// than cachette (or an older cachette) do not export it.
struct ServerFigures {
  bool preemptions_known = false;    // the counter was read before and after the run
  double preemptions = 0;            // increase of cachette_preemptions_total over the run
  int kv_samples = 0;                // samples with a used-pages value
  double kv_used_peak = 0, kv_used_mean = 0;
  double kv_total = 0;               // the last total seen; 0 when never seen
  // The same of the session pool, when the server has one (session_kv_samples > 0).
  int session_kv_samples = 0;
  double session_kv_used_peak = 0, session_kv_used_mean = 0, session_kv_total = 0;
  std::vector<std::string> notes;    // why a figure is missing
};

// Peak and mean of the samples' used pages and the last total (samples without a value are
// skipped); fills the kv_* fields of `f`.
void SummarizeKv(const std::vector<KvSample>& samples, ServerFigures* f);

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

  // Goodput: see MetObjective(). Rates are over wall_s.
  int met_objective = 0;
  int with_deadline = 0;             // requests sent with a deadline_ms
  int met_deadline = 0;              // of those, the ones that met it
  double goodput_req_per_s = 0;
  double goodput_tok_per_s = 0;      // completion tokens of the requests that met it / wall_s
  double goodput_fraction = 0;       // met_objective / requests
  std::map<int, PrioritySummary> by_priority;

  // Agent programs (records with a program_id); only programs whose measured turns all
  // finished OK count.
  int programs_completed = 0;
  double program_completion_mean_ms = 0, program_completion_p50_ms = 0,
         program_completion_p90_ms = 0;
  std::map<std::string, ToolSummary> by_tool;

  ServerFigures server;
};

// Summarizes the measured records (warm-up ones are left out); `server` is copied in as is.
Summary Summarize(const std::vector<RequestRecord>& records, const ServerFigures& server = {});
nlohmann::json SummaryJson(const Summary& s);

}  // namespace cachette::bench_client
