// Runs the requests of an offline batch (`cachette batch`) through the online scheduler and
// collects each one's whole result, in one of two orders:
//
//   kBatchLlm  BatchLLM: the batch is planned first (sched/batch_plan.h: single-level groups
//              that share a prefix, decode-heavy groups first). For a group of 2+ requests a
//              prefill-only request of the shared prefix (the "prime", max_tokens 0) runs
//              first and pins the prefix; then the members run, each reusing the prefix
//              instead of prefilling it; when the last member ends the pin goes, so the shared
//              KV is computed once and lives as long as its group. Singletons run as they are.
//              With the prefix cache off (--no-prefix-cache) only the order remains.
//   kFcfs      the baseline: every request submitted at once in input order, FCFS admission,
//              no plan and no primes (whatever the online prefix cache shares, it shares).
//
// The window (kBatchLlm). Requests are taken in plan order while the KV pages they may need
// fit the pool: a member is charged ceil((prompt + max_tokens) / page) pages less the full
// pages of its group's prefix, plus one (the copy of a shared partial page: the scheduler's
// admission counts it too), and the prefix is charged once per group while the group is open.
// At least one request is always in flight. So KV memory, not a request or token count,
// bounds the work handed to the scheduler; its own admission (worst-case forecast or
// past-future) stays the final guard. Since every charge covers what admission asks for, the
// requests of a full window never wait on each other's pins: when nothing runs, the pool less
// the pinned prefixes holds the next one. A group's members wait, charged, until its prime has
// ended (successfully or not: a failed prime only costs the sharing).
//
// One prime at a time. A group's members are submitted as soon as its prime ends, and only then
// the next group's prime, so the scheduler (FCFS within a priority) admits them first and the
// next prefix's prefill shares steps with their decodes. Starting every prime the window allows
// at once would run all the prefills first and leave the decodes to steps of a few tokens each,
// which on a CPU cost almost as much as full ones (each reads all the weights).
// WART: pins the bodies themselves ask for (cache_control, session_id) are not charged; they
// can hold up to --max-pinned of the pool until their TTL passes, and admission then waits.
//
// The pin is taken by the scheduler loop itself right after the prime's prefill
// (SchedRequest::pin_ttl_ms, the same PinRegistry entry scheduler.pins().Add would make), so
// no eviction can slip in between the prime's end and the pin. A refused pin (the pinned share
// of the pool is full) leaves the prefix cached but unprotected; the run goes on.
//
// Thread-safety: RunBatch runs on the calling thread and calls on_done there; the scheduler
// is used through its thread-safe Submit and pins().
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "cachette/status.h"
#include "sched/request.h"
#include "sched/scheduler.h"

namespace cachette::cli {

enum class BatchOrder { kBatchLlm, kFcfs };

struct BatchRunOptions {
  BatchOrder order = BatchOrder::kBatchLlm;
  // Shorter shared prefixes make no group (the online prefix cache shares them anyway).
  int64_t min_prefix_tokens = 16;
  int64_t pin_ttl_ms = 3600000;  // the prefix pins' TTL (cut to the scheduler's max_pin_ttl)
};

// One request's whole outcome: its text and usage, or why it failed.
struct JobResult {
  Status error;  // not OK: rejected by the scheduler or failed while running
  std::string text;
  GenerateResult::Finish finish = GenerateResult::Finish::kLength;
  sched::RequestUsage usage;
};

struct BatchRunStats {
  size_t groups = 0;         // groups of the plan (singletons included)
  size_t shared_groups = 0;  // ... of two or more requests, each with a prime
  int64_t planned_saved_tokens = 0;
  size_t primes_failed = 0;  // primes rejected or failed (their groups ran unshared)
  size_t pins_refused = 0;   // primes whose pin the registry refused
  int64_t window_pages = 0;  // the window's bound (the pool's pages)
  int64_t peak_window_pages = 0;
  double plan_seconds = 0;
};

// Runs `jobs` (each a parsed request) to the end. on_done(i, result) is called exactly once for
// every job i, in the order they end. Never fails as a whole: a job the scheduler rejects gets
// its error in its result.
BatchRunStats RunBatch(sched::Scheduler& scheduler, std::vector<sched::SchedRequest> jobs,
                       const BatchRunOptions& options,
                       const std::function<void(size_t, JobResult)>& on_done);

}  // namespace cachette::cli
