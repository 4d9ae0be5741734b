// Runs a workload against one OpenAI-compatible server and collects one record per turn, plus
// what the server's /metrics said during the run (preemptions, KV pages over time).
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "bench_client/openai_client.h"
#include "bench_client/server_metrics.h"
#include "bench_client/stats.h"
#include "bench_client/workload.h"
#include "cachette/status.h"

namespace cachette::bench_client {

struct RunOptions {
  std::string url;           // http://host:port
  std::string model;         // empty: the first id of GET /v1/models
  double duration_s = 0;     // > 0: no turn is sent later than this after the start (skipped)
  // Stop strings sent with every request (up to 4): answers then end at the first one, well
  // before max_tokens, as real answers do (what Past-Future admission bets on).
  std::vector<std::string> stop;
  // Period of the KV-pages sampler reading /metrics; 0 reads no /metrics at all.
  double metrics_every_s = 0.25;
  // Appended to every program id sent ("<id>-<nonce>"); empty: a fresh random one per run, so
  // two runs (or the two targets of a comparison) never share a program on the server.
  std::string run_nonce;
  // Send every turn of program i with session_id "sess-<i>-<nonce>" (cachette keeps a session's
  // conversation pinned, in the session pool with --session-kv-type).
  bool session_ids = false;
  // Called after each request from the thread that ran it (serialized by the runner).
  std::function<void(const RequestRecord&)> on_record;
};

struct RunResult {
  std::string model;
  double wall_s = 0;
  std::vector<RequestRecord> records;  // ordered by program, then turn
  std::string run_nonce;
  // Preemptions over the whole run (warm-up phases included) and the KV summary; notes when
  // /metrics did not have them.
  ServerFigures server;
  std::vector<KvSample> kv_timeline;   // every sample, in time order
};

// Runs `w`: one thread per program of the current phase; each sends its turns in order, a turn
// no earlier than its scheduled time nor before the previous answer plus the turn's pause.
// Each request carries its turn's scheduling fields (priority, deadline_ms, tool) and its
// program's id with the run nonce. /metrics is read before and after the run and sampled
// during it (RunOptions::metrics_every_s).
// Request failures are records with status "error", not a failed run; the run fails
// (Unavailable, InvalidArgument) only when the server cannot be reached or the URL is bad.
Result<RunResult> RunWorkload(const Workload& w, const RunOptions& o);

}  // namespace cachette::bench_client
