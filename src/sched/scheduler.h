// The scheduler loop: one thread owns the Engine and drives every request through the paged KV
// (KvManager) with continuous batching.
//
// Each step of the loop:
//   a. reaps cancelled requests (their sequences are finished and their pages released at once),
//   b. admits queued requests, highest priority first, while fewer than max_running run and the
//      KV forecast fits (below),
//   c. runs ONE Engine::Forward over every decoding sequence (one token each) plus prefill
//      chunks of the admitted prompts, up to step_tokens tokens in all, so a long prompt is
//      prefilled over several steps and never starves the running decodes,
//   d. samples the next token of every sequence whose logits were computed and streams it.
//
// Preemption: a running request goes back to the queue (2, 3, 4 --preempt--> 1) when
//   - Past-Future admission guessed wrong: a step cannot reserve pages for a request, so the
//     newest running request without an item in that step makes room; or
//   - a waiting request outranks running ones and does not fit: a higher priority, or the same
//     priority with a time-to-first-token objective still meetable against one without any.
//     The lowest-ranked, newest running requests go first, and only when they free enough.
// The victim's KV is committed to the radix index and released (--preempt recompute); with
// --preempt swap its full chunks are also copied to the PrefixSource's tiers (the RAM tier in
// chunk-sized block groups, the copy kept: a later preemption of the same conversation writes
// only new chunks). On re-admission it restores what memory lost from the tiers, prefills the
// rest of its prompt plus what it generated, and decodes on; its stream sees only a pause.
//
// Ordering. Within a priority, waiting requests are served: earliest deadline first among
// those whose objective (deadline_ms) can still be met; then by QueueOrder: arrival (fcfs),
// longest cached prefix (lpm), or the arrival of the request's program (program: Continuum's
// program-level FCFS, so an agent's next turn never waits behind programs that came later).
// lpm also holds back a request whose next uncached page a running request is prefilling (it
// waits a step for that page rather than computing it twice), within the same skip bound.
//
// Continuum (QueueOrder::kProgram): when a turn of a program ends with a `tool` call, its
// conversation is pinned for a TTL chosen by ToolTtlEstimator (program_ttl.h) from the tool's
// observed call durations (answer to next turn), the measured cost of re-prefilling the
// context (StepCostModel), the mean queueing delay and how much the pin would cost the other
// requests; the program's last turn (no tool) unpins it.
//
// Step size. Each step adds prefill chunks to the running decodes, up to step_tokens tokens;
// with itl_target_ms the prefill share is sized from the measured step cost (step_cost.h) so
// that a step with decodes takes about the target (at least one page of prefill per step).
//
// A request's states (numbered as in the code):
//   1 kQueued  --admit, the tiers may hold more of the prompt-->  2 kLoading
//   1 kQueued  --admit, nothing to load-->  3 kPrefill
//   2 kLoading --every chunk copied, a miss, or the load deadline-->  3 kPrefill
//   3 kPrefill --prompt in KV, first token sampled-->  4 kDecode
//   2, 3, 4  --eos / stop string / max_tokens / context full / cancel / error-->  5 kFinished
//   1  --cancel, or queued longer than queue_timeout_ms-->  5 kFinished.
// A loading request holds its admitted pages but takes no part in the batch: the loop polls
// its restore (PrefixSource::ApplyLoad copies chunks into pages as they arrive) between steps,
// so running sequences keep decoding whatever a slow disk or Redis does.
//
// Admission never overcommits KV memory: a request is admitted only when the pages it may still
// allocate (prompt + max_tokens, less the full pages it shares from the cache) plus those every
// running sequence may still allocate fit in the free pages plus the cached pages that can be
// evicted. Otherwise it waits in the queue. If a Reserve still fails (pins taken meanwhile),
// the item skips that step; a step where nothing can progress fails the newest sequence with
// kResourceExhausted instead of deadlocking.
//
// Prefix reuse: KvManager::Start() reuses the longest cached prefix in the request's namespace
// (KvNamespace: model, KV layout, RoPE, adapter, cache_salt: one value for the radix index, the
// tiers and the admin API), then the PrefixSource may restore more; the prompt's full pages
// are committed after every prefill chunk (concurrent requests share them while the rest is
// still being computed) and everything is committed when the request finishes (later
// requests hit).
//
// Logprobs (SchedRequest::logprobs, engine/logprobs.h): a generated token's entry is computed in
// Emit from the raw logits, before the sampler changes them. Prompt logprobs (echo) need the
// logits of every prompt position, which cached KV does not have: such a request reuses no
// cached prefix and loads nothing from the tiers (a resumed one reuses at most the positions it
// already has); its chunks run with Engine::Logits::kAll into one step buffer of at most
// kPromptLogitsBytes (chunks are cut to fit), each row reduced to its entry right after the
// forward. Its KV is committed like any other.
//
// Segment reuse (issue 11, engine/segment_reuse.h). A request with segments and reuse mode
// naive, blend or cachecraft (prefix, the default, and full ignore its segments; so do a request
// under a KV budget policy, one with prompt logprobs, and every request without the prefix
// cache) is admitted as any other: the radix index and the tiers give it its exact prefix. When
// it reaches kPrefill, its whole prefill is ONE synchronous PrefillWithSegments call on its
// paged sequence, on the loop thread at the start of a step (one such request per step): a
// large step, during which the running decodes wait. Segments missing from the segment cache
// (segment_cache.h; key: namespace, tokens, context) are first looked for in the tiers, off
// the loop (TierBridge, in bands of layers); with pipeline_segment_loads the prefill starts
// once the first band is in and awaits each later layer inside the call (CacheBlend's
// pipeline: the loop computes while the rest loads), else once the whole load is in. Those the
// tiers lack are computed on their own after the request's shared prefix (the prompt tokens
// before its first segment: BOS and any system text) with ComputeSegment and stored, so the
// first request pays about a prefill and later ones reuse. Its first token is sampled from the call's logits; it then
// decodes as usual. Only its exact prefix (ReuseReport::prefix_tokens) may enter the radix
// index and the tiers (commits, pins, sessions, swap), as for a compacted KV budget sequence:
// the KV past it is approximate. A resumed (preempted) one runs the same path on its prompt and
// output. Reused tokens count in usage.cached_tokens (tier "segment"), the placed ones also in
// usage.segment_tokens, those recomputed in usage.recomputed_tokens.
// PrecomputeSegments (POST /v1/cache/segments) posts a job that the loop runs between steps.
// A segment prefill that cannot reserve its pages (admitted on an estimate, or pins taken
// since) waits for the next step while another request decodes and will free some (counted in
// reserve_failures), as a batch prefill does; when none decodes, it fails with
// kResourceExhausted.
//
// Session pool (--session-kv-type, issue 13 item 4). With a second KvManager, every request
// with a session_id keeps its KV there, in that pool's type (e.g. q4_0: agent memory in 4 bits,
// 3.5x more sessions in the same bytes), and everything else in the main pool. Each request
// lives in one pool from admission to finish: its namespace is the pool's (KvNamespace over the
// pool's KV type, which must differ from the main pool's, so the tiers keep its chunks in that
// type, and a restarted server restores them into the same pool), admission and preemption
// count and free that pool's pages only (a request that does not fit blocks only its own pool's
// queue; a pool stalled on pins gives up its newest request), the scheduler's pins name the
// request's pool, and pins by namespace resolve it (PoolOf). The engine writes each sequence in
// its own type (SequenceKv::shape()). Session requests take the prefix path: kv_policy and the
// segment reuse modes compute KV in the engine's type and are refused for them (400); relay
// skips them. The two pools have the same page size.
//
// Thread-safety: Submit, Stats, Drain, PrecomputeSegments and the accessors are safe from any
// thread; the engine is touched by the loop thread only.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <span>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "cachette/status.h"
#include "engine/engine.h"
#include "kv/budget_runner.h"
#include "kv/kv_manager.h"
#include "sched/admission.h"
#include "sched/pin_registry.h"
#include "sched/prefix_source.h"
#include "sched/program_ttl.h"
#include "sched/request.h"
#include "sched/segment_cache.h"
#include "sched/step_cost.h"

namespace cachette::sched {

// The order in which waiting requests are admitted, within a priority.
enum class QueueOrder {
  kFcfs,  // arrival order
  kLpm,   // longest cached prefix first (SGLang), no request passed over more than
          // lpm_max_skips times
  kProgram,  // program-level FCFS (Continuum): by the arrival of the request's program
             // (program_id, else session_id), so a program's next turn waits behind no newcomer
};
// What happens to a preempted request's KV.
enum class PreemptMode {
  kRecompute,  // committed to the radix index and released; the resume re-prefills what was
               // evicted meanwhile
  kSwap,       // also copied to the PrefixSource's tiers (RAM first) in whole chunks, copies
               // kept, so a resume restores instead of recomputing (FastSwitch)
};
// How admission decides that a request's KV fits (see admission.h).
enum class AdmissionPolicy {
  kForecast,    // every request's worst case (prompt + max_tokens): never preempts
  kPastFuture,  // the likely peak from past output lengths; preempts (recompute) when wrong
};

struct SchedulerOptions {
  int max_running = 16;             // sequences in the running batch
  int max_queue = 256;              // waiting requests; Submit fails beyond
  int64_t step_tokens = 256;        // tokens per Forward (decodes first, then prefill chunks)
  bool prefix_cache = true;         // false: no reuse and no commits (the no-cache baseline)
  int64_t session_ttl_ms = 300000;  // default TTL of a session's pin
  // Bounds (issue 9). A tier restore waits at most load_deadline_ms for chunks (the rest is
  // recomputed); a request queued longer than queue_timeout_ms (> 0) fails with
  // kDeadlineExceeded; pins (cache_control, sessions, admin) hold at most max_pinned_fraction
  // of the page pool, each for at most max_pin_ttl_ms; at most max_sessions sessions, max_pins
  // plain pins and max_tenants remembered namespaces (idle ones are reclaimed).
  int64_t load_deadline_ms = 1000;
  int64_t queue_timeout_ms = 0;
  double max_pinned_fraction = 0.5;
  int64_t max_pin_ttl_ms = 3600000;
  size_t max_sessions = 10000;
  size_t max_pins = 10000;
  size_t max_tenants = 10000;
  QueueOrder order = QueueOrder::kFcfs;
  int lpm_max_skips = 16;
  AdmissionPolicy admission = AdmissionPolicy::kForecast;
  PreemptMode preempt = PreemptMode::kRecompute;
  // > 0: size each step's prefill share so that a step with decodes takes about this long
  // (Sarathi-Serve's chunked-prefill budget), from the measured step cost; 0: step_tokens.
  double itl_target_ms = 0;
  // The segment cache's budget (K and V bytes of its segments).
  size_t segment_cache_bytes = size_t{256} << 20;
  // Relay (RelayCaching): a finished request's generated tokens' KV goes into the segment
  // cache (context kRelayContext), so a later prompt that quotes that output as a segment
  // places it instead of prefilling it (another agent reading this one's answer).
  bool relay = false;
  // CacheBlend's pipeline: a segment prefill whose segments come from the tiers starts once the
  // first band of their layers is in, and computes each layer while the later ones load
  // (PrefillWithSegments' await_layer); false waits for the whole load first. Same result.
  bool pipeline_segment_loads = true;
  // CacheBlend's loading controller: a pipelined blend recomputes more than its blend_ratio
  // when the load of a layer takes longer than the recompute at that ratio, as much as hides
  // under the load (ReuseOptions::load_left_us: PipelinedBlendRatio from this load's measured
  // read time per layer and the cost of a row through a layer measured in the prefill itself).
  // Raises quality for no time; the ratio then depends on the tier's speed, so it is opt-in.
  bool blend_load_controller = false;
};

struct SchedulerStats {
  int64_t queued = 0, running = 0;
  uint64_t submitted = 0, finished = 0, cancelled = 0, rejected = 0, failed = 0;
  uint64_t steps = 0, prompt_tokens = 0, prefill_tokens = 0, generated_tokens = 0;
  uint64_t cached_tokens = 0;  // prompt tokens reused from memory (+ restored, below)
  uint64_t restored_tokens = 0;
  uint64_t reserve_failures = 0;  // a prefill, decode or segment prefill put off a step: no pages
  uint64_t preemptions = 0;  // running requests sent back to the queue
  uint64_t swapped_out_tokens = 0;  // written to the tiers by swap preemptions
  uint64_t resume_restored_tokens = 0;  // restored from the tiers by preempted requests
  uint64_t deadline_met = 0, deadline_missed = 0;  // first token within deadline_ms or not
  uint64_t program_turns = 0;       // turns that followed a tool call of their program
  uint64_t program_pin_hits = 0;    // ... that arrived while the program's pin held
  int64_t prefill_budget = 0;       // prefill tokens the last step with decodes allowed
  // Segment reuse: requests prefilled from the segment cache, the tokens of cached_tokens that
  // were placed segments (the rest of cached_tokens is exact prefix), those of them recomputed,
  // and segment tokens computed on their own for the cache (requests' misses, precompute).
  uint64_t segment_prefills = 0;
  uint64_t segment_tokens = 0;
  uint64_t recomputed_tokens = 0;
  uint64_t segment_computed_tokens = 0;
  // Relay: finished requests whose output went into the segment cache, and segments found
  // there as an earlier request's output.
  uint64_t relay_saved = 0;
  uint64_t relay_hits = 0;
  // Segments the segment cache lacked that the tiers (disk, Redis) gave back, and their tokens.
  uint64_t segment_tier_hits = 0;
  uint64_t segment_tier_tokens = 0;
  // Segment prefills pipelined with their load from the tiers, the time they waited for a
  // layer, and those the loading controller gave a higher ratio.
  uint64_t segment_pipelined_prefills = 0;
  uint64_t segment_load_wait_us = 0;
  uint64_t segment_ratio_raised = 0;
};

// One segment of PrecomputeSegments.
struct PrecomputedSegment {
  int64_t tokens = 0;
  bool cached = false;  // it was in the cache already (not computed again)
};

class Scheduler {
 public:
  // `engine`, `kv`, `source` (may be null: nothing beyond memory) and `session_kv` (may be
  // null: sessions share `kv`; else the session pool, of kv's page size) must outlive the
  // scheduler. The loop thread starts here.
  Scheduler(Engine& engine, KvManager& kv, const SchedulerOptions& options,
            PrefixSource* source = nullptr, KvManager* session_kv = nullptr);
  ~Scheduler();  // Drain()s, then joins the loop
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Queues a request. kInvalidArgument for an empty prompt, a token outside the vocabulary,
  // bad sampling parameters or a prompt + max_tokens beyond the context; kResourceExhausted
  // when max_queue requests wait already, or when the request alone needs more pages than the
  // pool holds; kUnavailable while draining.
  Result<std::shared_ptr<RequestStream>> Submit(SchedRequest request);

  // Stops accepting requests, lets queued and running ones finish, and returns when none is
  // left or after timeout_ms (the rest are then cancelled). Idempotent.
  void Drain(int64_t timeout_ms);

  SchedulerStats Stats() const;
  // Programs, tools and their TTLs, the step cost model: {"programs", "tools", "step_cost"}.
  nlohmann::json SchedJson() const;
  PinRegistry& pins() { return pins_; }
  KvManager& kv() { return kv_; }
  KvManager* session_kv() { return session_kv_; }  // null without a session pool
  PrefixSource& source() { return *source_; }
  const SchedulerOptions& options() const { return options_; }
  // The namespace of a tenant (cache_salt "" = the shared one) in the main pool. Remembers the
  // tenant (up to max_tenants, least recently used forgotten first) for ClearAll.
  Hash128 Namespace(const std::string& cache_salt);
  // The same tenant's namespace in the session pool, where its sessions' KV is. Only with a
  // session pool (session_kv() not null).
  Hash128 SessionNamespace(const std::string& cache_salt);
  // The pool whose pages a namespace's KV is in: the session pool for a tenant's session
  // namespace, else the main one. Any thread.
  KvManager& PoolOf(const Hash128& ns);
  // Drops the tenant's pins and its cached KV from memory and from every tier of the source.
  Status ClearTenant(const std::string& cache_salt);
  // ClearTenant for every remembered tenant and the shared namespace; returns how many.
  size_t ClearAll();
  size_t tenants() const;  // remembered tenants

  // Computes each of `segments` on its own after `context` (BOS and the shared prefix) in the
  // namespace of `cache_salt` and stores it in the segment cache, expiring after ttl_ms (0:
  // until evicted); a segment already cached is left as it is. The loop thread runs it between
  // steps; the caller waits. kInvalidArgument for an empty segment, a token outside the
  // vocabulary or a context and segment beyond the model's context (naming the segment);
  // kUnavailable while draining or without the prefix cache. Segments before a failing one stay
  // stored.
  Result<std::vector<PrecomputedSegment>> PrecomputeSegments(
      const std::string& cache_salt, std::vector<TokenId> context,
      std::vector<std::vector<TokenId>> segments, int64_t ttl_ms);
  SegmentCache& segment_cache() { return segments_; }

 private:
  struct Seq;
  void Loop();
  void TakeSubmissions();
  void SortQueue();  // priority desc, then id (arrival) asc
  void ReapCancelled();
  void ExpireQueued();
  // Index in queue_ of the request to admit next, passing over those of pool `blocked` (null:
  // none); kNoneEligible when only blocked ones wait, kWaitForPrefill (scheduler.cc).
  size_t PickNext(const KvManager* blocked = nullptr);
  void Admit();
  // Admitted `s` (fresh or resumed) starts its restore from the tiers (kLoading) or, with
  // nothing to load, goes straight to kPrefill.
  void StartTierLoad(Seq& s);
  SeqLoad LoadOf(const Seq& s) const;
  void Preempt(Seq& victim);  // loop thread; the victim moves to the queue at Requeue
  // Preempts running requests `s` outranks, lowest first, when they free `short_pages`.
  bool PreemptFor(const Seq& s, int64_t short_pages);
  bool Outranks(const Seq& a, const Seq& b, int64_t now_ns) const;
  void Requeue();
  void PollLoads();
  // Namespace() in `pool` (kv_ or *session_kv_).
  Hash128 NamespaceIn(const KvManager& pool, const std::string& cache_salt);
  void RememberTenant(const std::string& cache_salt);
  // Whether `s` fits now; else `short_pages` (when given) says by how many pages.
  bool Fits(Seq& s, int64_t* short_pages = nullptr);
  // Continuum: a new turn of a program (tool statistics, pin hit), and the end of one.
  void ProgramArrived(Seq& s);
  void ProgramTurnEnded(Seq& s, std::span<const TokenId> kept);
  void ForgetIdlePrograms(int64_t now_ns);
  void PublishSchedJson();
  void Step();
  // Samples and streams the token after `s`'s logits; returns false when `s` is finished.
  bool Emit(Seq& s);
  // Prompt logprobs (SchedRequest::prompt_logprobs): turns a kAll item's rows into `s`'s
  // entries right away (the rows live in prompt_logits_ for this step only) and, at the
  // prompt's end, copies the last row to s.logits; then hands them to `s`'s first event.
  void TakePromptLogits(Seq& s, const Engine::Item& item);
  void TakePromptLogprobs(Seq& s, StreamEvent& e);
  using Reason = GenerateResult::Finish;
  // Ends `s` with `reason` (ignored when `error` is not OK: the stream gets kError).
  void Finish(Seq& s, Reason reason, const Status& error = Status::Ok());
  int64_t Outstanding(const Seq& s) const;
  // KV budget policies: slots a policy sequence may hold at once, and its compaction.
  int64_t PolicyCapacity(const KvPolicy& policy, int64_t budget, int64_t block,
                         int64_t prompt_len, int64_t max_tokens) const;
  // Compacts s by its policy; layers_seen: a cascade's stage (KvPolicyInput::layers_seen).
  Status CompactPolicy(Seq& s, int layers_seen = 0);
  // Whether s reads its prompt by its policy's cascade (CAKE, the prompt at once, no prompt
  // logprobs, a KV type that can be rewritten), a few layers per step (StepCascade), from its
  // first token; its forecast then what the cascade holds at most (CascadeForecast).
  bool Cascades(const Seq& s) const;
  static bool Cascades(const KvPolicy* policy, int64_t block, bool prompt_logprobs,
                       const KvManager& pool);
  int64_t CascadeForecast(int64_t budget, int64_t capacity, int64_t prompt_len,
                          int64_t page_tokens) const;
  // Reads the next `layers` layers of s's prompt; the last one ends its prefill (Emit).
  void StepCascade(Seq& s, int layers);
  // Pages a policy sequence copies, for a moment, when it compacts slots it shares with the
  // index (its prompt's, committed first): those its longest kept layer is written to
  // (KvManager::Compact). Its forecast holds them beside its prompt's pages.
  int64_t CompactionCopies(const KvPolicy* policy, int64_t budget, int64_t capacity,
                           int64_t page_tokens) const;
  // Segment reuse (see the header comment): whether `s` takes that path, and its prefill.
  bool UsesSegments(const Seq& s) const;
  void SegmentPrefill(Seq& s);
  // Part of a segment prefill: computes the first of `s`'s first `n_segments` segments at or
  // past offset `from` that no cache holds (nor, with `relay`, an earlier output), files it,
  // leaves `s` pending and returns true, so that a cold RAG prompt takes one loop step per
  // missing segment and decodes run between them. False when every one is cached. True too
  // when computing failed (`s` is then finished).
  bool ComputeOneSegment(Seq& s, std::span<const TokenId> context, size_t n_segments,
                         int64_t from, bool relay);
  // After SegmentPrefill failed with `st`: whether `s` waits to try again next step (short of
  // pages while decodes run) rather than failing.
  bool RetrySegmentPrefill(Seq& s, const Status& st);
  // APE's prefill (kv_reuse ape): documents from the segment cache laid out in parallel.
  void ApePrefill(Seq& s);
  // After either: the exact prefix committed (and pinned if asked), the first token emitted.
  void SegmentPrefillDone(Seq& s);
  // The segment of `toks` computed after `context`: from the segment cache, else (with `relay`)
  // an earlier request's output, else computed now, filed in the cache (for ttl_ms; 0: no
  // expiry) and the tiers, with *computed set. Errors are ComputeSegment's.
  Result<std::shared_ptr<const SegmentKv>> SegmentFor(const Hash128& ns,
                                                      std::span<const TokenId> context,
                                                      std::span<const TokenId> toks, bool relay,
                                                      int64_t ttl_ms, bool* computed);
  // The refs of `segs`, computed after `context`, that the segment cache lacks (empty ones
  // left out).
  std::vector<SegmentRef> UncachedRefs(const Hash128& ns, std::span<const TokenId> context,
                                       std::span<const std::span<const TokenId>> segs);
  // At admission: starts reading from the tiers the segments of `s` the cache lacks.
  void StartSegmentLoad(Seq& s);
  // Whether `s`'s segment load is over (none, arrived, or past its deadline); what arrived is
  // moved into the segment cache.
  bool SegmentsArrived(Seq& s);
  // Files segments the tiers gave back in the segment cache (ttl_ms: as Insert) and counts them.
  // Any thread.
  void AdoptSegments(const Hash128& ns, std::vector<std::shared_ptr<SegmentKv>> found,
                     int64_t ttl_ms);
  // Relay: a segment an earlier request generated (its tokens, or all but the last), or null.
  std::shared_ptr<const SegmentKv> RelayLookup(const Hash128& ns, std::span<const TokenId> toks);
  // Relay: the length (all of `toks`, or all but the last) under which an earlier request's
  // output is cached, 0 for none; counts nothing.
  size_t RelayLength(const Hash128& ns, std::span<const TokenId> toks);
  // Relay: files a finishing request's generated tokens' KV in the segment cache.
  void SaveRelay(Seq& s);
  // The tokens of `s` (prompt, then output) whose KV may be shared: its exact part.
  std::span<const TokenId> ExactTokens(const Seq& s) const;
  struct Job;
  void RunJobs();

  Engine& engine_;
  KvManager& kv_;
  KvManager* session_kv_;  // null: sessions share kv_
  SchedulerOptions options_;
  NoPrefixSource no_source_;
  PrefixSource* source_;
  PinRegistry pins_;
  PastFutureAdmission past_future_;  // loop thread only
  StepCostModel step_cost_;          // loop thread only
  ToolTtlEstimator tool_ttl_;        // loop thread only
  SegmentCache segments_;
  struct Program {
    int64_t first_ns = 0;        // arrival of its first turn (program-level FCFS)
    int64_t last_seen_ns = 0;
    int64_t last_end_ns = 0;     // end of its last turn (0: one is running)
    std::string last_tool;       // the tool that turn called
    double pin_ttl_s = 0;        // the pin it got
  };
  std::unordered_map<std::string, Program> programs_;  // loop thread only
  double queue_delay_s_ = 0;  // moving mean of queueing delays (loop thread)
  int64_t n_ctx_ = 0;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool draining_ = false;                      // GUARDED_BY(mu_)
  bool stop_ = false;                          // GUARDED_BY(mu_)
  bool wake_ = false;                          // GUARDED_BY(mu_)
  std::vector<std::unique_ptr<Seq>> inbox_;    // GUARDED_BY(mu_): submitted, not yet queued
  std::vector<std::shared_ptr<Job>> jobs_;     // GUARDED_BY(mu_): precomputes to run
  struct Tenant {
    Hash128 session_ns;  // its namespace in the session pool (none without one)
    int64_t last_used_ms = 0;
  };
  std::unordered_map<std::string, Tenant> tenants_;  // GUARDED_BY(mu_)
  // The remembered tenants' namespaces in the session pool (PoolOf). Taken after mu_.
  std::mutex ns_mu_;
  std::set<Hash128> session_ns_;  // GUARDED_BY(ns_mu_)
  uint64_t next_id_ = 1;                       // GUARDED_BY(mu_)
  SchedulerStats stats_;                       // GUARDED_BY(mu_)
  nlohmann::json sched_json_;                  // GUARDED_BY(mu_): SchedJson()'s snapshot

  // Loop thread only.
  std::vector<std::unique_ptr<Seq>> queue_;    // sorted: priority desc, then id asc
  std::vector<std::unique_ptr<Seq>> running_;  // admission order
  bool admission_dirty_ = true;                // something changed since the last failed try
  // Logprobs: the kAll logits of this step's prompt chunks, [rows][n_vocab], at most
  // kPromptLogitsBytes (scheduler.cc) and freed after a step without any; and the raw logits
  // of the token being sampled ([n_vocab]; the sampler modifies its copy).
  std::vector<float> prompt_logits_;
  std::vector<float> raw_logits_;
  int64_t last_sweep_ms_ = 0;

  std::thread loop_;  // the scheduler loop; joined in the destructor
};

}  // namespace cachette::sched
