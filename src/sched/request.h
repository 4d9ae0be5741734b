// What an HTTP thread hands the scheduler (SchedRequest) and what it gets back: a RequestStream,
// the thread-safe channel through which the scheduler loop pushes tokens and the final usage.
//
// Life of a request, as the stream sees it:
//   1. Scheduler::Submit() queues it and returns the stream (or an error: queue full, bad input).
//   2. The loop pushes zero or more kToken events, then exactly one terminal event: kDone (with
//      the finish reason and usage) or kError (with a Status). Nothing follows a terminal event.
//   3. The HTTP side may Cancel() at any time (client gone); the loop then finishes the sequence
//      and frees its pages at its next step, and pushes kDone with finish kCancelled.
//
// Thread-safety: Push is called by the scheduler loop only; Next/Cancel by the one HTTP thread
// that owns the request. Both sides may hold the shared_ptr; whoever drops it last frees it.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "cachette/status.h"
#include "cachette/types.h"
#include "engine/generate.h"
#include "engine/logprobs.h"
#include "engine/ape.h"
#include "engine/segment_reuse.h"
#include "kv/kv_policy.h"

namespace cachette::sched {

// A segment of a prompt (a document, a tool's output): its tokens are
// prompt[offset, offset + length). Segment boundaries are token boundaries (each segment was
// tokenized on its own).
struct SegmentSpan {
  int64_t offset = 0;
  int64_t length = 0;
};

struct SchedRequest {
  std::vector<TokenId> prompt;    // BOS and chat template already applied
  GenerateOptions gen;            // max_tokens (0 = prefill only), sampling, stop, ignore_eos
  std::string cache_salt;         // tenant: another salt never hits these pages
  int priority = 0;               // higher is admitted first; ties in arrival order
  int64_t pin_ttl_ms = 0;         // > 0: pin the prompt prefix after prefill (cache_control)
  std::string session_id;         // non-empty: keep the conversation pinned between turns
  int64_t session_ttl_ms = 0;     // 0 = the scheduler's default
  int64_t deadline_ms = 0;        // > 0: time-to-first-token objective from submission
  std::string program_id;         // agent program (Continuum); empty: session_id
  std::string tool;               // the tool whose result the program's next turn carries
  KvPolicyConfig kv_policy;       // name empty: full KV; else the budget policy (kv_policy.h)
  // Log-probabilities (engine/logprobs.h): -1 none; N >= 0: every generated token's logprob
  // with the N most likely tokens at its position (at most kMaxTopLogprobs).
  int logprobs = -1;
  // With logprobs >= 0: also every prompt token's after the first (echo). Cached KV has no
  // logits, so such a request prefills its whole prompt: no reuse from the radix index or the
  // tiers (its KV is still committed for later requests).
  bool prompt_logprobs = false;
  // Segment reuse (engine/segment_reuse.h, issue 11): the prompt's segments (sorted, disjoint,
  // non-empty) and how their KV may be reused. Modes naive, blend, cachecraft and ape prefill
  // the prompt from the segment cache (Scheduler, "Segment reuse"); prefix (the default) and
  // full ignore the segments. ape (engine/ape.h): the segments but a last one that ends the
  // prompt are its documents, adjacent; what follows them is the query; `ape` holds T and S.
  std::vector<SegmentSpan> segments;
  ReuseOptions reuse;
  ApeOptions ape;
};

// kv_reuse ape's layout: at least one document segment before the query (the segments but a
// last one that ends the prompt), the documents adjacent, T and S in (0, 100].
// kInvalidArgument saying which; Ok for any other mode or no segments.
Status ValidateApeLayout(const SchedRequest& r);

// Tokens of the prompt that came from one place instead of being prefilled.
struct TierTokens {
  std::string tier;  // "memory" (the radix index), then the PrefixSource's tiers
  int64_t tokens = 0;
};

struct RequestUsage {
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  // Prompt tokens whose KV was reused (not prefilled). When the whole prompt is cached its last
  // token is still recomputed (its logits are needed), so this is at most prompt_tokens - 1.
  int64_t cached_tokens = 0;
  std::vector<TierTokens> cached_by_tier;  // sums to cached_tokens ("segment": segment cache)
  // Of cached_tokens: cached segment tokens placed at a new position (approximate KV); the rest
  // is exact prefix (radix index, tiers, cached segments in place after their own context).
  int64_t segment_tokens = 0;
  // Placed segment tokens recomputed through the upper (blend) or all (cachecraft) layers:
  // those of segment_tokens and those of segments this request computed itself (a miss).
  int64_t recomputed_tokens = 0;
  uint64_t pin_id = 0;                     // the cache_control pin taken, if any
  double queue_seconds = 0;                // submit -> admitted
  double ttft_seconds = 0;                 // submit -> first token (or end of prefill)
  double decode_seconds = 0;               // first token -> finish
  int64_t kv_tokens_kept = -1;             // under a KV budget policy: slots per layer held
                                           // at the end (-1: full KV)
};

struct StreamEvent {
  enum class Kind { kToken, kDone, kError } kind = Kind::kToken;
  TokenId token = -1;       // kToken
  std::string text;         // kToken: newly completed text (may be empty)
  // kToken of a request with logprobs >= 0: the token's logprobs (logprobs.chosen.token ==
  // token). chosen.token -1: none (not asked, or a stop string cut the token's text entirely).
  PositionLogprobs logprobs;
  // The first event (kToken or kDone) of a request with prompt_logprobs: entry i is for prompt
  // token i + 1 (prompt_len - 1 entries; the first token has none). Empty otherwise.
  std::vector<PositionLogprobs> prompt_logprobs;
  // kDone: why it ended (kEos, kStop: a stop string, kLength, kCancelled).
  GenerateResult::Finish finish = GenerateResult::Finish::kLength;
  RequestUsage usage;       // kDone
  Status error;             // kError
};

class RequestStream {
 public:
  RequestStream() = default;
  RequestStream(const RequestStream&) = delete;
  RequestStream& operator=(const RequestStream&) = delete;

  // Waits up to `timeout` for the next event; false on timeout.
  bool Next(StreamEvent* out, std::chrono::milliseconds timeout);

  // Asks the scheduler to stop this request and free its pages. Idempotent.
  void Cancel();
  bool cancelled() const { return cancelled_.load(std::memory_order_acquire); }

  // Scheduler side.
  void Push(StreamEvent e);
  void set_on_cancel(std::function<void()> fn) { on_cancel_ = std::move(fn); }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<StreamEvent> events_;  // GUARDED_BY(mu_)
  std::atomic<bool> cancelled_{false};
  std::function<void()> on_cancel_;  // set before the stream is shared; wakes the loop
};

}  // namespace cachette::sched
