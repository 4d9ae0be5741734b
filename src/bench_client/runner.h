// Runs a workload against one OpenAI-compatible server and collects one record per turn.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "bench_client/openai_client.h"
#include "bench_client/stats.h"
#include "bench_client/workload.h"
#include "cachette/status.h"

namespace cachette::bench_client {

struct RunOptions {
  std::string url;           // http://host:port
  std::string model;         // empty: the first id of GET /v1/models
  double duration_s = 0;     // > 0: no turn is sent later than this after the start (skipped)
  // Called after each request from the thread that ran it (serialized by the runner).
  std::function<void(const RequestRecord&)> on_record;
};

struct RunResult {
  std::string model;
  double wall_s = 0;
  std::vector<RequestRecord> records;  // ordered by program, then turn
};

// Runs `w`: one thread per program of the current phase; each sends its turns in order, a turn
// no earlier than its scheduled time nor before the previous answer plus the turn's pause.
// Request failures are records with status "error", not a failed run; the run fails
// (Unavailable, InvalidArgument) only when the server cannot be reached or the URL is bad.
Result<RunResult> RunWorkload(const Workload& w, const RunOptions& o);

}  // namespace cachette::bench_client
