#include "sched/scheduler.h"

#include <algorithm>
#include <chrono>
#include <future>
#include <optional>

#include "core/check.h"
#include "core/map_util.h"
#include "core/log.h"
#include "core/timer.h"
#include "engine/sampler.h"
#include "model/tokenizer.h"

namespace cachette::sched {

struct Scheduler::Seq {
  // See the state machine in scheduler.h.
  enum class State { kQueued = 1, kLoading = 2, kPrefill = 3, kDecode = 4, kFinished = 5 };

  uint64_t id = 0;
  SchedRequest req;
  std::shared_ptr<RequestStream> stream;
  Hash128 ns;
  State state = State::kQueued;
  int64_t prompt_len = 0;        // tokens to prefill: the prompt, or after a preemption the
                                 // prompt and every token generated so far
  int64_t orig_prompt_len = 0;   // the request's prompt (usage and the output budget)
  bool resumed = false;          // preempted once: usage and tiers were already accounted
  int skips = 0;                 // times a later request was admitted first (kLpm)
  std::string program;           // program_id, else session_id ("" = none)
  int64_t program_ns = 0;        // its program's arrival (kProgram order), else submit_ns
  int64_t deadline_ns = 0;       // submit + deadline_ms (0: no objective)
  int64_t capacity = 0;         // prompt + max_tokens, within the context
  int64_t forecast_blocks = 0;  // pages it will hold at most (held_pages())
  bool cow_pending = false;     // its first write lands in a shared page (one more page)
  KvManager* pool = nullptr;    // the page pool of its KV: kv_, or session_kv_ for a session
  std::unique_ptr<PagedSequence> kv;
  std::unique_ptr<PendingLoad> load;  // kLoading: the tier restore in flight
  // kPrefill under a cascading policy (CAKE): the prompt read a few layers per step.
  std::unique_ptr<Engine::LayerPass> cascade;
  int64_t tier_tokens = 0;            // leading prompt tokens the tiers hold (Save skips them)
  std::vector<TokenId> tokens;  // prompt, then generated tokens
  std::vector<float> logits;    // [n_vocab] of the last computed position
  std::unique_ptr<Sampler> sampler;
  std::unique_ptr<StreamingDetokenizer> detok;
  std::string text;             // generated text so far (for stop strings)
  size_t max_stop = 0;
  int64_t generated = 0;
  TokenId next = -1;            // last sampled token, fed at the next decode step
  RequestUsage usage;
  int64_t submit_ns = 0, admit_ns = 0, first_ns = 0;
  // Under a KV budget policy (req.kv_policy): the policy, its budget in tokens for this prompt,
  // the prefill block (0 = the whole prompt at once), the attention statistics it reads, and
  // tokens added since the last compaction.
  std::unique_ptr<KvPolicy> policy;
  int64_t policy_budget = 0;
  int64_t policy_block = 0;
  AttentionStats stats;
  int64_t since_compaction = 0;
  // Prompt logprobs (req.prompt_logprobs): entry k is for prompt token k + 1, from the logits
  // at position k; they go out with the first event (prompt_lp_sent). Their count bounds the
  // prefix a (re)admission may reuse: positions past it need their logits computed.
  std::vector<PositionLogprobs> prompt_lp;
  bool prompt_lp_sent = false;
  // Segment reuse: its prefill is still to be done by SegmentPrefill (which leaves the
  // sequence's exact_tokens() at the end of the exact prefix: only those may be shared).
  bool segment_pending = false;
  // Its segments being read from the tiers (kLoading until they are, or the deadline).
  std::shared_ptr<PendingSegments> segment_load;
  SteadyTime segment_deadline;
  // Its segments (by index) that it computed itself, one per step (ComputeOneSegment).
  std::vector<bool> segment_fresh;
  // APE: the layout PrefillApe left; set, the sequence decodes through DecodeApe alone.
  std::optional<ApeState> ape;
  // Tokens of tokens/prompt read into the KV (the slot count differs once compacted).
  int64_t fed() const { return kv ? kv->tokens_seen() : 0; }
  // Whether the next prefill chunk must compute the logits of every position (kAll).
  bool NeedsPromptLogits() const {
    return req.prompt_logprobs && !prompt_lp_sent &&
           static_cast<int64_t>(prompt_lp.size()) + 1 < orig_prompt_len;
  }
};

// A PrecomputeSegments call waiting for the loop.
struct Scheduler::Job {
  Hash128 ns;
  std::vector<TokenId> context;
  std::vector<std::vector<TokenId>> segments;
  int64_t ttl_ms = 0;
  std::promise<Result<std::vector<PrecomputedSegment>>> done;
};

namespace {
constexpr int64_t kSweepEveryMs = 1000;
// While requests wait for tier loads and nothing else runs, the loop polls them this often.
constexpr auto kLoadPoll = std::chrono::milliseconds(1);
// PickNext: every candidate waits for a page a running request is prefilling.
constexpr size_t kWaitForPrefill = static_cast<size_t>(-1);
constexpr size_t kNoneEligible = static_cast<size_t>(-2);  // PickNext: every queued one blocked
// A program with no turn for this long is forgotten (its statistics stay in the tool's).
constexpr int64_t kProgramIdleNs = int64_t{600} * 1000000000;
// Before the step cost model is ready: what re-prefilling one token is assumed to cost.
constexpr double kDefaultPrefillTokenS = 1e-3;
// Pin keys of programs, apart from user session ids.
constexpr std::string_view kProgramPinPrefix = "\x01program:";

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
// Decode tokens a policy sequence adds before it is compacted again.
constexpr int64_t kPolicySlack = 16;
// Prompt logprobs: the logits of every position of a step's chunks ([rows][n_vocab] floats)
// take at most this much; chunks of such prompts are cut to fit (at least one row per step).
constexpr int64_t kPromptLogitsBytes = int64_t{32} << 20;
}  // namespace

Scheduler::Scheduler(Engine& engine, KvManager& kv, const SchedulerOptions& options,
                     PrefixSource* source, KvManager* session_kv)
    : engine_(engine),
      kv_(kv),
      session_kv_(session_kv),
      options_(options),
      source_(source != nullptr ? source : &no_source_),
      pins_([this](const Hash128& ns) -> KvManager& { return PoolOf(ns); },
            PinRegistry::Limits{options.max_pinned_fraction, options.max_pin_ttl_ms,
                                options.max_sessions, options.max_pins},
            nullptr, source),
      segments_(SegmentCache::Options{options.segment_cache_bytes, {}}),
      n_ctx_(engine.model().config().n_ctx_train) {
  options_.max_running = std::max(1, options_.max_running);
  options_.step_tokens = std::max<int64_t>(options_.step_tokens, options_.max_running);
  loop_ = std::thread([this] { Loop(); });
}

Scheduler::~Scheduler() {
  Drain(0);
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  loop_.join();
}

Hash128 Scheduler::Namespace(const std::string& cache_salt) {
  return NamespaceIn(kv_, cache_salt);
}

Hash128 Scheduler::SessionNamespace(const std::string& cache_salt) {
  CT_CHECK(session_kv_ != nullptr) << "no session pool";
  return NamespaceIn(*session_kv_, cache_salt);
}

Hash128 Scheduler::NamespaceIn(const KvManager& pool, const std::string& cache_salt) {
  const kernels::KvType type = pool.shape().type;
  if (!options_.prefix_cache) {
    // Nothing is ever committed here, so nothing is ever reused.
    return KvNamespace(engine_.model(), type, std::string("\x01no-prefix-cache|") + cache_salt);
  }
  const Hash128 ns = KvNamespace(engine_.model(), type, cache_salt);
  RememberTenant(cache_salt);
  return ns;
}

KvManager& Scheduler::PoolOf(const Hash128& ns) {
  if (session_kv_ == nullptr) return kv_;
  std::lock_guard<std::mutex> lock(ns_mu_);
  return session_ns_.contains(ns) ? *session_kv_ : kv_;
}

void Scheduler::RememberTenant(const std::string& cache_salt) {
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t now_ms = NowNanos() / 1000000;
  auto it = tenants_.find(cache_salt);
  if (it != tenants_.end()) {
    it->second.last_used_ms = now_ms;
    return;
  }
  // Bounded: past max_tenants the least recently used tenant is forgotten (its cached pages
  // stay until evicted; ClearAll no longer reaches it by name, but Clear of its salt still does).
  if (tenants_.size() >= std::max<size_t>(1, options_.max_tenants)) {
    auto oldest = SmallestBy(tenants_, &Tenant::last_used_ms);
    if (session_kv_ != nullptr) {
      // PoolOf now answers the main pool for its session namespace. The scheduler's own pins
      // name each request's pool, so only pins by namespace (none are made for sessions) would
      // look there.
      std::lock_guard<std::mutex> ns_lock(ns_mu_);
      session_ns_.erase(oldest->second.session_ns);
    }
    tenants_.erase(oldest);
  }
  Tenant t{{}, now_ms};
  if (session_kv_ != nullptr) {
    t.session_ns = KvNamespace(engine_.model(), session_kv_->shape().type, cache_salt);
    std::lock_guard<std::mutex> ns_lock(ns_mu_);
    session_ns_.insert(t.session_ns);
  }
  tenants_.emplace(cache_salt, t);
}

Status Scheduler::ClearTenant(const std::string& cache_salt) {
  const Hash128 ns = Namespace(cache_salt);
  pins_.RemoveTenant(cache_salt, ns);
  kv_.Clear(ns);
  segments_.Clear(ns);
  Status st = source_->Clear(ns);
  if (session_kv_ != nullptr) {
    // Its sessions' namespace in the session pool.
    const Hash128 sns = NamespaceIn(*session_kv_, cache_salt);
    pins_.RemoveTenant(cache_salt, sns);
    session_kv_->Clear(sns);
    if (Status ss = source_->Clear(sns); st.ok()) st = ss;
  }
  return st;
}

size_t Scheduler::ClearAll() {
  std::vector<std::string> salts = {""};
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [salt, t] : tenants_) {
      if (!salt.empty()) salts.push_back(salt);
    }
  }
  for (const std::string& s : salts) {
    Status st = ClearTenant(s);
    if (!st.ok()) {
      CT_LOG(kWarning) << "clearing a namespace: " << st.ToString();
    }
  }
  // Sessions restored from the journal whose tenant has sent nothing since the restart: their
  // salt is unknown, their namespace is not.
  for (const Hash128& ns : pins_.RestoredNamespaces()) {
    pins_.RemoveTenant("\x01restored", ns);
    kv_.Clear(ns);
    if (session_kv_ != nullptr) session_kv_->Clear(ns);
    segments_.Clear(ns);
    if (Status st = source_->Clear(ns); !st.ok()) {
      CT_LOG(kWarning) << "clearing a namespace: " << st.ToString();
    }
  }
  return salts.size();
}

size_t Scheduler::tenants() const {
  std::lock_guard<std::mutex> lock(mu_);
  return tenants_.size();
}

int64_t Scheduler::PolicyCapacity(const KvPolicy& policy, int64_t budget, int64_t block,
                                  int64_t prompt_len, int64_t max_tokens) const {
  // Slots a policy sequence may hold at once: what it reads before its first compaction (the
  // whole prompt, or budget + a block), or what a layer keeps after one, plus the decode
  // tokens between compactions; never more than it will ever read.
  const int64_t first_read = block > 0 ? budget + block : prompt_len;
  const int64_t layer_max = policy.MaxLayerKept(budget, engine_.model().config().n_layer);
  const int64_t bound = std::max(first_read, layer_max + kPolicySlack);
  return std::max<int64_t>(1, std::min(prompt_len + max_tokens, bound));
}

bool Scheduler::Cascades(const KvPolicy* policy, int64_t block, bool prompt_logprobs,
                         const KvManager& pool) {
  return policy != nullptr && policy->cascades() && block == 0 && !prompt_logprobs &&
         !pool.shape().windowed();
}

bool Scheduler::Cascades(const Seq& s) const {
  return Cascades(s.policy.get(), s.policy_block, s.req.prompt_logprobs, *s.pool);
}

int64_t Scheduler::CascadeForecast(int64_t budget, int64_t capacity, int64_t prompt_len,
                                   int64_t P) const {
  // The layers read hold at most n_layer x budget slots (a partial block each) besides the one
  // being read (the whole prompt), n_layer blocks to a page, and one page of slack.
  const int64_t L = engine_.model().config().n_layer;
  const int64_t blocks = CeilDiv(L * budget, P) + L + CeilDiv(prompt_len, P);
  return std::min(CeilDiv(capacity, P), CeilDiv(blocks, L) + 1);
}

void Scheduler::StepCascade(Seq& s, int layers) {
  if (!s.cascade) {
    s.stats.window = s.policy->stats_window();
    auto pass = Engine::LayerPass::Start(
        engine_, *s.kv, std::span<const TokenId>(s.req.prompt).subspan(s.fed()), &s.stats);
    if (!pass.ok()) {
      Finish(s, Reason::kCancelled, pass.status());
      return;
    }
    s.cascade = std::move(*pass);
  }
  // After layer l, stage l + 1: the layers read so far share the budget (the last stage is
  // the prompt's compaction).
  const Status st = s.cascade->Run(
      layers, [&](int layer) { return CompactPolicy(s, layer + 1); }, s.logits.data());
  if (!st.ok()) {
    s.cascade.reset();
    Finish(s, Reason::kCancelled, st);
    return;
  }
  if (!s.cascade->done()) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.prefill_tokens += static_cast<uint64_t>(s.cascade->tokens());
  }
  s.cascade.reset();
  // No exact KV of the fresh tokens ever existed: nothing more enters the index.
  s.state = Seq::State::kDecode;
  s.cow_pending = false;
  const int64_t P = s.pool->page_tokens();
  s.forecast_blocks =
      std::min(s.forecast_blocks, CeilDiv(s.policy_budget + kPolicySlack + 1, P) + 1);
  Emit(s);
}

int64_t Scheduler::CompactionCopies(const KvPolicy* policy, int64_t budget, int64_t capacity,
                                    int64_t page_tokens) const {
  if (policy == nullptr) return 0;
  const int64_t kept = policy->MaxLayerKept(budget, engine_.model().config().n_layer);
  return CeilDiv(std::min(capacity, kept), page_tokens);
}

Status Scheduler::CompactPolicy(Seq& s, int layers_seen) {
  const ModelConfig& c = engine_.model().config();
  const bool have_stats = s.stats.n_layer == c.n_layer && s.stats.capacity >= s.kv->n_tokens();
  const KeepPlan plan = s.policy->Select(PolicyInputFor(
      *s.kv, s.policy_budget, have_stats ? &s.stats : nullptr, layers_seen));
  CT_RETURN_IF_ERROR(s.kv->manager().Compact(*s.kv, plan, c.rope, have_stats ? &s.stats : nullptr)
                         .WithContext("kv_policy " + std::string(s.policy->name())));
  // A cascade's later stages compact the layers read so far again, by the same window.
  if (layers_seen == 0 || layers_seen == c.n_layer) s.stats.ClearWindow();
  s.since_compaction = 0;
  if (s.state == Seq::State::kDecode) {
    // From the prompt's compaction on, the sequence holds at most its budget per layer on
    // average (per-layer budgets sum to n_layer x budget; the paged KV packs layers' blocks,
    // KvManager::Compact) plus the decode tokens until the next compaction: that many pages,
    // plus one for each layer's partial block (n_layer partial blocks fill at most one page
    // more), is what it may still need, not its whole prompt.
    const int64_t P = s.pool->page_tokens();
    s.forecast_blocks =
        std::min(s.forecast_blocks, CeilDiv(s.policy_budget + kPolicySlack + 1, P) + 1);
  }
  return Status::Ok();
}

Result<std::shared_ptr<RequestStream>> Scheduler::Submit(SchedRequest request) {
  const int32_t n_vocab = engine_.model().config().n_vocab;
  const int64_t n = static_cast<int64_t>(request.prompt.size());
  if (n == 0) return InvalidArgument("the prompt is empty");
  for (TokenId t : request.prompt) {
    if (t < 0 || t >= n_vocab) {
      return InvalidArgument("token id " + std::to_string(t) + " is outside the vocabulary [0, " +
                             std::to_string(n_vocab) + ")");
    }
  }
  CT_RETURN_IF_ERROR(request.gen.sampling.Validate());
  if (request.gen.max_tokens < 0) return InvalidArgument("max_tokens must be >= 0");
  CT_RETURN_IF_ERROR(ValidateApeLayout(request));
  if (!(request.reuse.ratio >= 0 && request.reuse.ratio <= 1)) {
    return InvalidArgument("blend_ratio must be in [0, 1]");
  }
  int64_t seg_end = 0;
  for (const SegmentSpan& sp : request.segments) {
    if (sp.offset < seg_end || sp.length <= 0 || sp.offset + sp.length > n) {
      return InvalidArgument("segments must be sorted, disjoint, non-empty spans of the prompt");
    }
    seg_end = sp.offset + sp.length;
  }
  // A session's KV goes to the session pool when there is one (--session-kv-type).
  KvManager& pool = session_kv_ != nullptr && !request.session_id.empty() ? *session_kv_ : kv_;
  // A windowed KV type (kivi4, --kv-recent) keeps its newest tokens outside the slots that
  // policies and segment reuse rewrite; and both compute KV in the engine's own type, not the
  // session pool's.
  auto rewritable = [&](const std::string& what) -> Status {
    if (&pool != &kv_) {
      return InvalidArgument(what + " is not available to sessions on this server: their KV is "
                             "kept as " + std::string(kernels::KvTypeName(pool.shape().type)) +
                             " (--session-kv-type); send the request without session_id, or "
                             "without " + what);
    }
    return CheckKvRewritable(pool.shape(), what);
  };
  if (!request.kv_policy.name.empty()) CT_RETURN_IF_ERROR(rewritable("kv_policy"));
  if (!request.segments.empty() && request.reuse.mode != ReuseMode::kPrefix &&
      request.reuse.mode != ReuseMode::kFull) {
    CT_RETURN_IF_ERROR(
        rewritable("kv_reuse '" + std::string(ReuseModeName(request.reuse.mode)) + "'"));
  }
  std::unique_ptr<KvPolicy> policy;
  int64_t budget = 0, block = 0, capacity = n + request.gen.max_tokens;
  if (!request.kv_policy.name.empty()) {
    CT_ASSIGN_OR_RETURN(policy, MakeKvPolicy(request.kv_policy));
    budget = ResolveBudgetTokens(request.kv_policy, n);
    CT_RETURN_IF_ERROR(CheckPolicyPrompt(*policy, budget, n, n_ctx_));
    block = PrefillBlock(*policy, budget, n, n_ctx_);
    capacity = PolicyCapacity(*policy, budget, block, n, request.gen.max_tokens);
  }
  if (policy != nullptr && policy->reassigns_positions()) {
    // Positions stay within the cache: any prompt (read in blocks) and any output length.
  } else if (n + request.gen.max_tokens > n_ctx_) {
    return InvalidArgument("this model's maximum context length is " + std::to_string(n_ctx_) +
                           " tokens, but " + std::to_string(n + request.gen.max_tokens) +
                           " were requested (" + std::to_string(n) + " in the prompt, " +
                           std::to_string(request.gen.max_tokens) + " in the completion)");
  }
  const int64_t P = pool.page_tokens();
  // A cascade (CAKE) holds about its budget while it reads; Fits() refines it by the cache.
  int64_t blocks = CeilDiv(capacity, P) + CompactionCopies(policy.get(), budget, capacity, P);
  if (Cascades(policy.get(), block, request.prompt_logprobs, pool)) {
    blocks = CascadeForecast(budget, capacity, n, P);
  }
  const uint32_t total = pool.GetStats().pages_total;
  if (blocks > total) {
    return InvalidArgument("the prompt and max_tokens need " + std::to_string(blocks) +
                           " pages of KV but the " +
                           (&pool == &kv_ ? "pool holds " : "session pool holds ") +
                           std::to_string(total) + " (raise " +
                           (&pool == &kv_ ? "--kv-budget" : "--session-kv-budget") +
                           " or lower max_tokens)");
  }

  auto s = std::make_unique<Seq>();
  s->pool = &pool;
  s->ns = NamespaceIn(pool, request.cache_salt);
  s->req = std::move(request);
  s->prompt_len = n;
  s->orig_prompt_len = n;
  s->capacity = std::min<int64_t>(n_ctx_, n + s->req.gen.max_tokens);
  s->capacity = std::max<int64_t>(s->capacity, n);
  if (policy != nullptr) {
    s->capacity = capacity;
    s->policy = std::move(policy);
    s->policy_budget = budget;
    s->policy_block = block;
  }
  s->forecast_blocks = blocks;
  s->tokens = s->req.prompt;
  s->submit_ns = NowNanos();
  s->program_ns = s->submit_ns;
  s->program = !s->req.program_id.empty() ? s->req.program_id : s->req.session_id;
  if (s->req.deadline_ms > 0) s->deadline_ns = s->submit_ns + s->req.deadline_ms * 1000000;
  s->segment_pending = UsesSegments(*s);
  s->stream = std::make_shared<RequestStream>();
  s->stream->set_on_cancel([this] {
    {
      std::lock_guard<std::mutex> lock(mu_);
      wake_ = true;
    }
    cv_.notify_all();
  });
  std::shared_ptr<RequestStream> out = s->stream;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (draining_) return Unavailable("the server is shutting down");
    // Up to max_queue wait beyond the free running slots (a burst on an idle server is not
    // refused just because the loop has not admitted its first requests yet).
    const int64_t free_slots = std::max<int64_t>(0, options_.max_running - stats_.running);
    if (stats_.queued >= options_.max_queue + free_slots) {
      ++stats_.rejected;
      return ResourceExhausted("the queue is full (" + std::to_string(options_.max_queue) +
                               " requests waiting); retry later");
    }
    s->id = next_id_++;
    ++stats_.submitted;
    ++stats_.queued;
    inbox_.push_back(std::move(s));
  }
  cv_.notify_all();
  return out;
}

void Scheduler::Drain(int64_t timeout_ms) {
  std::unique_lock<std::mutex> lock(mu_);
  draining_ = true;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  auto idle = [&] { return stats_.queued == 0 && stats_.running == 0; };
  if (cv_.wait_until(lock, deadline, idle)) return;
  // Out of time: cancel what is left and wait for the loop to release it.
  stop_ = true;
  wake_ = true;
  cv_.notify_all();
  cv_.wait(lock, idle);
}

SchedulerStats Scheduler::Stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

nlohmann::json Scheduler::SchedJson() const {
  std::lock_guard<std::mutex> lock(mu_);
  return sched_json_.is_null() ? nlohmann::json::object() : sched_json_;
}

void Scheduler::PublishSchedJson() {
  nlohmann::json j = tool_ttl_.Stats();
  j["programs"] = programs_.size();
  j["queue_delay_mean_s"] = queue_delay_s_;
  j["step_cost"] = {{"ready", step_cost_.ready()},
                    {"fixed_ms", step_cost_.fixed_s() * 1e3},
                    {"decode_ms", step_cost_.decode_s() * 1e3},
                    {"prefill_token_ms", step_cost_.prefill_token_s() * 1e3},
                    {"itl_target_ms", options_.itl_target_ms}};
  std::lock_guard<std::mutex> lock(mu_);
  sched_json_ = std::move(j);
}

void Scheduler::Loop() {
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      // Wake for work; with nothing running, also every sweep period (pins expire, queued
      // requests time out). Requests waiting for tier loads are polled every kLoadPoll.
      const bool only_loading =
          !running_.empty() && std::all_of(running_.begin(), running_.end(), [](const auto& s) {
            return s->state == Seq::State::kLoading;
          });
      const bool queue_timeouts = options_.queue_timeout_ms > 0 && !queue_.empty();
      const auto wait = only_loading ? std::chrono::milliseconds(kLoadPoll)
                        : queue_timeouts
                            ? std::chrono::milliseconds(
                                  std::min<int64_t>(kSweepEveryMs, options_.queue_timeout_ms))
                            : std::chrono::milliseconds(kSweepEveryMs);
      cv_.wait_for(lock, wait, [&] {
        return stop_ || wake_ || !inbox_.empty() || !jobs_.empty() ||
               (!running_.empty() && !only_loading) || (!queue_.empty() && admission_dirty_);
      });
      wake_ = false;
      if (stop_ && inbox_.empty() && queue_.empty() && running_.empty()) {
        // Precomputes posted too late are answered, never left waiting.
        for (auto& j : jobs_) j->done.set_value(Unavailable("the server is shutting down"));
        jobs_.clear();
        break;
      }
    }
    TakeSubmissions();
    RunJobs();
    ReapCancelled();
    ExpireQueued();
    Admit();
    PollLoads();
    if (!running_.empty()) Step();
    const int64_t now_ms = NowNanos() / 1000000;
    if (now_ms - last_sweep_ms_ >= kSweepEveryMs) {
      last_sweep_ms_ = now_ms;
      if (pins_.Sweep() > 0) admission_dirty_ = true;
      ForgetIdlePrograms(now_ms * 1000000);
      PublishSchedJson();
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      stats_.running = static_cast<int64_t>(running_.size());
      stats_.queued = static_cast<int64_t>(queue_.size() + inbox_.size());
    }
    cv_.notify_all();  // Drain() waits on the counts
  }
}

void Scheduler::SortQueue() {
  const bool by_program = options_.order == QueueOrder::kProgram;
  std::stable_sort(queue_.begin(), queue_.end(), [by_program](const auto& a, const auto& b) {
    if (a->req.priority != b->req.priority) return a->req.priority > b->req.priority;
    if (by_program && a->program_ns != b->program_ns) return a->program_ns < b->program_ns;
    return a->id < b->id;
  });
  admission_dirty_ = true;
}

void Scheduler::ProgramArrived(Seq& s) {
  if (s.program.empty()) return;
  auto [it, fresh] = programs_.try_emplace(s.program);
  Program& p = it->second;
  if (fresh) p.first_ns = s.submit_ns;
  p.last_seen_ns = s.submit_ns;
  if (options_.order == QueueOrder::kProgram) s.program_ns = p.first_ns;
  if (!p.last_tool.empty() && p.last_end_ns > 0) {
    // The tool call took from the end of the last turn to this arrival.
    const double took_s = static_cast<double>(s.submit_ns - p.last_end_ns) * 1e-9;
    tool_ttl_.Observe(p.last_tool, took_s);
    const bool hit = p.pin_ttl_s > 0 && took_s <= p.pin_ttl_s;
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++stats_.program_turns;
      if (hit) ++stats_.program_pin_hits;
    }
    PublishSchedJson();
  }
  p.last_tool.clear();
  p.last_end_ns = 0;
}

void Scheduler::ProgramTurnEnded(Seq& s, std::span<const TokenId> kept) {
  if (s.program.empty()) return;
  auto it = programs_.find(s.program);
  if (it == programs_.end()) return;
  Program& p = it->second;
  const int64_t now = NowNanos();
  p.last_seen_ns = now;
  p.last_end_ns = now;
  p.last_tool = s.req.tool;
  p.pin_ttl_s = 0;
  if (options_.order != QueueOrder::kProgram || !options_.prefix_cache || kept.empty()) return;
  // A program named by its session_id shares the session's pin; otherwise it has its own.
  const bool is_session = s.req.program_id.empty();
  const std::string key =
      is_session ? s.req.session_id : std::string(kProgramPinPrefix) + s.req.program_id;
  if (s.req.tool.empty()) {
    // The program ended (or is an ordinary chat): a session keeps its fixed TTL (Finish pinned
    // it), a program's pin goes; its KV stays cached until evicted.
    if (!is_session) pins_.RemoveSession(key);
    return;
  }
  const KvManager::Stats ks = s.pool->GetStats();
  const double total = std::max<double>(1, ks.pages_total);
  const double pages =
      static_cast<double>(CeilDiv(static_cast<int64_t>(kept.size()), s.pool->page_tokens()));
  const double others = static_cast<double>(running_.size() + queue_.size()) - 1;
  const double utilisation = static_cast<double>(ks.pages_used) / total;
  const double hold_rate = pages / total * std::max(0.0, others) * utilisation;
  const double token_s =
      step_cost_.ready() ? step_cost_.prefill_token_s() : kDefaultPrefillTokenS;
  const double benefit = static_cast<double>(kept.size()) * token_s + queue_delay_s_;
  const double ttl = tool_ttl_.Ttl(s.req.tool, benefit, hold_rate,
                                   static_cast<double>(options_.max_pin_ttl_ms) * 1e-3);
  tool_ttl_.NoteTtl(s.req.tool, ttl);
  if (ttl > 0) {
    const PinRegistry::Info pin =
        pins_.SetSession(key, s.ns, s.req.cache_salt, kept, static_cast<int64_t>(ttl * 1e3),
                         s.pool);
    if (pin.id != 0) p.pin_ttl_s = ttl;
  } else {
    pins_.RemoveSession(key);
  }
}

void Scheduler::ForgetIdlePrograms(int64_t now_ns) {
  std::erase_if(programs_, [&](const auto& kv) {
    return kv.second.last_end_ns > 0 && now_ns - kv.second.last_seen_ns > kProgramIdleNs;
  });
  // Bounded like sessions: past max_sessions programs, the least recently seen go.
  while (programs_.size() > std::max<size_t>(1, options_.max_sessions)) {
    EraseSmallest(programs_, &Program::last_seen_ns);
  }
}

void Scheduler::TakeSubmissions() {
  std::vector<std::unique_ptr<Seq>> in;
  {
    std::lock_guard<std::mutex> lock(mu_);
    in.swap(inbox_);
  }
  if (in.empty()) return;
  for (auto& s : in) {
    ProgramArrived(*s);
    queue_.push_back(std::move(s));
  }
  if (programs_.size() > options_.max_sessions) ForgetIdlePrograms(NowNanos());
  SortQueue();
}

void Scheduler::ReapCancelled() {
  bool stop;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop = stop_;
  }
  auto reap = [&](std::vector<std::unique_ptr<Seq>>& v) {
    for (auto& s : v) {
      if (stop || s->stream->cancelled()) Finish(*s, Reason::kCancelled);
    }
    std::erase_if(v, [](const auto& s) { return s->state == Seq::State::kFinished; });
  };
  reap(queue_);
  reap(running_);
}

SeqLoad Scheduler::LoadOf(const Seq& s) const {
  SeqLoad l;
  l.tokens = std::max(s.kv ? s.kv->n_tokens() : 0, s.prompt_len);
  l.generated = s.generated;
  l.max_output = std::max<int64_t>(s.capacity - s.orig_prompt_len, s.generated + 1);
  l.held_pages = s.kv ? s.kv->held_pages() : 0;
  return l;
}

std::span<const TokenId> Scheduler::ExactTokens(const Seq& s) const {
  int64_t n = std::min<int64_t>(s.fed(), static_cast<int64_t>(s.tokens.size()));
  n = std::min(n, s.kv->exact_tokens());
  return std::span<const TokenId>(s.tokens.data(), static_cast<size_t>(std::max<int64_t>(0, n)));
}

bool Scheduler::UsesSegments(const Seq& s) const {
  const ReuseMode m = s.req.reuse.mode;
  return options_.prefix_cache && !s.req.segments.empty() && s.policy == nullptr &&
         !s.req.prompt_logprobs &&
         (m == ReuseMode::kNaive || m == ReuseMode::kBlend || m == ReuseMode::kCacheCraft ||
          m == ReuseMode::kApe);
}

void Scheduler::SegmentPrefill(Seq& s) {
  s.segment_pending = false;
  if (s.req.reuse.mode == ReuseMode::kApe) {
    ApePrefill(s);
    return;
  }
  const std::span<const TokenId> prompt(s.req.prompt);  // resumed: prompt and output
  const int64_t n = s.prompt_len;
  // A fully cached prompt still computes its last token (its logits).
  if (s.fed() >= n) s.kv->SetTokens(n - 1);
  // Segments are computed after the shared prefix: the tokens before the first segment.
  const std::span<const TokenId> context =
      prompt.first(static_cast<size_t>(s.req.segments.front().offset));
  // The shared prefix goes in first (exactly, as any prefill), so that the first segment,
  // computed after it, follows on in place: exact too.
  if (s.fed() < static_cast<int64_t>(context.size())) {
    const int64_t context_computed = static_cast<int64_t>(context.size()) - s.fed();
    Status st = s.kv->Reserve(static_cast<int64_t>(context.size()));
    if (st.ok()) {
      st = engine_.Forward(*s.kv, context.subspan(static_cast<size_t>(s.fed())), nullptr);
    }
    if (!st.ok()) {
      if (!RetrySegmentPrefill(s, st)) Finish(s, Reason::kCancelled, st);
      return;
    }
    std::lock_guard<std::mutex> lock(mu_);
    stats_.prefill_tokens += static_cast<uint64_t>(context_computed);
  }
  const int64_t n0 = s.fed();
  if (ComputeOneSegment(s, context, s.req.segments.size(), n0, options_.relay)) return;
  std::vector<std::shared_ptr<const SegmentKv>> held;  // keeps them alive through the call
  std::vector<SegmentUse> uses;
  std::vector<bool> fresh;  // computed by this request (not reused)
  int64_t computed = 0;
  int64_t loading_tokens = 0;  // of segments whose later layers are still being read
  const uint64_t context_id = ContextId(context);
  for (size_t i = 0; i < s.req.segments.size(); ++i) {
    const SegmentSpan& sp = s.req.segments[i];
    if (sp.offset < n0) continue;  // inside the exact prefix (or cut by it): not used
    const std::span<const TokenId> toks =
        prompt.subspan(static_cast<size_t>(sp.offset), static_cast<size_t>(sp.length));
    if (s.segment_load != nullptr && !segments_.Contains(s.ns, toks, context_id)) {
      if (std::shared_ptr<const SegmentKv> f = s.segment_load->Found(toks, context_id)) {
        loading_tokens += sp.length;
        uses.push_back(SegmentUse{sp.offset, f.get()});
        held.push_back(std::move(f));
        fresh.push_back(false);
        continue;
      }
    }
    bool miss = false;
    Result<std::shared_ptr<const SegmentKv>> seg =
        SegmentFor(s.ns, context, toks, options_.relay, 0, &miss);
    if (!seg.ok()) {
      Finish(s, Reason::kCancelled, seg.status().WithContext("computing a segment"));
      return;
    }
    if (miss) computed += sp.length;  // computed at an earlier step, then evicted
    uses.push_back(SegmentUse{sp.offset, seg->get()});
    held.push_back(std::move(*seg));
    fresh.push_back(miss || s.segment_fresh[i]);
  }
  SegmentLoad load;
  bool load_failed = false;
  if (loading_tokens > 0) {
    load.await_layer = [&](int layer) {
      Status st = s.segment_load->AwaitLayer(layer, s.segment_deadline);
      load_failed = !st.ok();
      return st;
    };
    if (options_.blend_load_controller) {
      load.load_left_us = [&] { return s.segment_load->load_left_us(); };
    }
  }
  ReuseReport rep;
  const Status st = PrefillWithSegments(engine_, *s.kv, prompt, uses, s.req.reuse,
                                        s.logits.data(), &rep,
                                        loading_tokens > 0 ? &load : nullptr);
  if (!st.ok()) {
    if (load_failed) {
      // A band did not come (evicted, refused, or past the deadline): the segments it was
      // reading are computed at the next steps, as misses.
      CT_LOG(kWarning) << "segment prefill without its load: " << st.ToString();
      s.segment_load.reset();
      s.segment_pending = true;
      return;
    }
    if (!RetrySegmentPrefill(s, st)) Finish(s, Reason::kCancelled, st);
    return;
  }
  s.cow_pending = false;  // Reserve copied any shared page it writes
  // What this request computed itself (its segments' misses) was not reused: split it off the
  // exact prefix (in place) and the placed tokens.
  int64_t fresh_prefix = 0, fresh_placed = 0;
  for (size_t i = 0; i < uses.size(); ++i) {
    if (!fresh[i]) continue;
    const int64_t at = uses[i].offset;
    const int64_t c =
        std::min<int64_t>(static_cast<int64_t>(uses[i].kv->tokens.size()), n - 1 - at);
    if (c <= 0) continue;
    (at + c <= rep.prefix_tokens ? fresh_prefix : fresh_placed) += c;
  }
  const int64_t exact_reused = std::max<int64_t>(0, rep.prefix_tokens - n0 - fresh_prefix);
  const int64_t placed_reused = std::max<int64_t>(0, rep.reused_tokens - fresh_placed);
  if (!s.resumed) {
    const int64_t reused = exact_reused + placed_reused;
    if (reused > 0) {
      s.usage.cached_tokens += reused;
      s.usage.cached_by_tier.push_back({"segment", reused});
    }
    s.usage.segment_tokens += placed_reused;
    s.usage.recomputed_tokens += rep.recomputed_tokens;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.segment_prefills;
    if (!s.resumed) {
      stats_.cached_tokens += static_cast<uint64_t>(exact_reused + placed_reused);
      stats_.segment_tokens += static_cast<uint64_t>(placed_reused);
      stats_.recomputed_tokens += static_cast<uint64_t>(rep.recomputed_tokens);
    }
    stats_.segment_computed_tokens += static_cast<uint64_t>(computed);
    stats_.prefill_tokens +=
        static_cast<uint64_t>(computed + rep.computed_tokens +
                              rep.recomputed_tokens);
  }
  if (s.segment_load != nullptr) {
    // Every layer was awaited: the load is over (or about to be); its segments go to the cache.
    // A load none of whose segments was used (the cache had them by now) is not waited for.
    if (loading_tokens > 0) s.segment_load->WaitUntil(s.segment_deadline);
    // The loaded segments move into the cache: nothing here reads them after.
    uses.clear();
    held.clear();
    AdoptSegments(s.ns, s.segment_load->Take(), 0);
    s.segment_load.reset();
    if (loading_tokens > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      ++stats_.segment_pipelined_prefills;
      stats_.segment_load_wait_us += static_cast<uint64_t>(rep.load_wait_us);
      if (rep.ratio > s.req.reuse.ratio) ++stats_.segment_ratio_raised;
    }
  }
  SegmentPrefillDone(s);
}

bool Scheduler::ComputeOneSegment(Seq& s, std::span<const TokenId> context, size_t n_segments,
                                  int64_t from, bool relay) {
  s.segment_fresh.resize(s.req.segments.size(), false);
  const std::span<const TokenId> prompt(s.req.prompt);
  const uint64_t context_id = ContextId(context);
  for (size_t i = 0; i < n_segments; ++i) {
    const SegmentSpan& sp = s.req.segments[i];
    if (sp.offset < from) continue;
    const std::span<const TokenId> toks =
        prompt.subspan(static_cast<size_t>(sp.offset), static_cast<size_t>(sp.length));
    if (segments_.Contains(s.ns, toks, context_id)) continue;
    if (relay && RelayLength(s.ns, toks) > 0) continue;
    // Being read from the tiers, its first layers in: the prefill awaits the rest.
    if (s.segment_load != nullptr && s.segment_load->Found(toks, context_id) != nullptr) {
      continue;
    }
    bool computed = false;
    Result<std::shared_ptr<const SegmentKv>> seg =
        SegmentFor(s.ns, context, toks, false, 0, &computed);
    if (!seg.ok()) {
      Finish(s, Reason::kCancelled, seg.status().WithContext("computing a segment"));
      return true;
    }
    s.segment_pending = true;  // the rest at the next steps
    // Not computed: another thread (a precompute reading the tiers) filed it meanwhile.
    if (!computed) return true;
    s.segment_fresh[i] = true;
    std::lock_guard<std::mutex> lock(mu_);
    stats_.segment_computed_tokens += static_cast<uint64_t>(sp.length);
    stats_.prefill_tokens += static_cast<uint64_t>(sp.length);
    return true;
  }
  return false;
}

bool Scheduler::RetrySegmentPrefill(Seq& s, const Status& st) {
  if (st.code() != StatusCode::kResourceExhausted) return false;
  // Short of pages (admitted on an estimate, or pins taken since): like a batch prefill that
  // cannot reserve, it waits for the running decodes to free some, and is given up only when
  // nothing else runs in its pool (the other pool's decodes free none of its pages). Its KV so
  // far stays (exact: the context; the rest is redone).
  const bool others = std::any_of(running_.begin(), running_.end(), [&](const auto& r) {
    return r.get() != &s && r->pool == s.pool && r->state == Seq::State::kDecode;
  });
  if (!others) return false;
  s.segment_pending = true;
  std::lock_guard<std::mutex> lock(mu_);
  ++stats_.reserve_failures;
  return true;
}

void Scheduler::ApePrefill(Seq& s) {
  const std::span<const TokenId> prompt(s.req.prompt);  // resumed: prompt and output
  const auto& sg = s.req.segments;
  const size_t n_docs =
      sg.size() - (sg.back().offset + sg.back().length == s.orig_prompt_len ? 1 : 0);
  const int64_t p = sg.front().offset;
  const int64_t docs_end = sg[n_docs - 1].offset + sg[n_docs - 1].length;
  const std::span<const TokenId> prefix = prompt.first(static_cast<size_t>(p));
  // The radix index (or a tier) may have given more than the prefix (the same prompt read in
  // full before): APE lays the documents out itself, so that part is dropped and uncounted.
  const int64_t from_index = std::min(s.fed(), p);
  if (s.fed() > p) {
    if (!s.resumed) {
      int64_t drop = std::min(s.fed(), s.prompt_len - 1) - p;
      s.usage.cached_tokens -= drop;
      auto& tiers = s.usage.cached_by_tier;
      for (auto it = tiers.rbegin(); drop > 0 && it != tiers.rend(); ++it) {
        const int64_t take = std::min(drop, it->tokens);
        it->tokens -= take;
        drop -= take;
      }
    }
    s.kv->SetTokens(p);
  }
  if (ComputeOneSegment(s, prefix, n_docs, 0, false)) return;
  std::vector<std::shared_ptr<const SegmentKv>> held;
  std::vector<const SegmentKv*> docs;
  int64_t reused = 0, computed = 0;
  for (size_t i = 0; i < n_docs; ++i) {
    const std::span<const TokenId> toks =
        prompt.subspan(static_cast<size_t>(sg[i].offset), static_cast<size_t>(sg[i].length));
    bool miss = false;
    Result<std::shared_ptr<const SegmentKv>> seg = SegmentFor(s.ns, prefix, toks, false, 0, &miss);
    if (!seg.ok()) {
      Finish(s, Reason::kCancelled, seg.status().WithContext("computing a document"));
      return;
    }
    if (miss) {
      computed += sg[i].length;  // computed at an earlier step, then evicted
    } else if (!s.segment_fresh[i]) {
      reused += sg[i].length;
    }
    docs.push_back(seg->get());
    held.push_back(std::move(*seg));
  }
  ApeState state;
  const Status st = PrefillApe(engine_, *s.kv, prefix, docs, prompt.subspan(docs_end), s.req.ape,
                               s.logits.data(), &state);
  if (!st.ok()) {
    Finish(s, Reason::kCancelled, st);
    return;
  }
  s.ape = state;
  s.kv->MarkInexactFrom(p);  // slots and positions part ways after the prefix
  if (!s.resumed) {
    s.usage.cached_tokens += reused;
    if (reused > 0) s.usage.cached_by_tier.push_back({"segment", reused});
    s.usage.segment_tokens += reused;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.segment_prefills;
    if (!s.resumed) {
      stats_.cached_tokens += static_cast<uint64_t>(reused);
      stats_.segment_tokens += static_cast<uint64_t>(reused);
    }
    stats_.segment_computed_tokens += static_cast<uint64_t>(computed);
    stats_.prefill_tokens +=
        static_cast<uint64_t>(p - from_index + computed + s.prompt_len - docs_end);
  }
  SegmentPrefillDone(s);
}

Result<std::shared_ptr<const SegmentKv>> Scheduler::SegmentFor(const Hash128& ns,
                                                                std::span<const TokenId> context,
                                                                std::span<const TokenId> toks,
                                                                bool relay, int64_t ttl_ms,
                                                                bool* computed) {
  *computed = false;
  std::shared_ptr<const SegmentKv> seg = segments_.Lookup(ns, toks, ContextId(context));
  if (seg == nullptr && relay) seg = RelayLookup(ns, toks);
  if (seg != nullptr) return seg;
  CT_ASSIGN_OR_RETURN(SegmentKv fresh, ComputeSegment(engine_, context, toks));
  *computed = true;
  seg = segments_.Insert(ns, std::move(fresh), ttl_ms);
  source_->SaveSegment(ns, *seg);
  return seg;
}

std::vector<SegmentRef> Scheduler::UncachedRefs(const Hash128& ns,
                                                std::span<const TokenId> context,
                                                std::span<const std::span<const TokenId>> segs) {
  const uint64_t context_id = ContextId(context);
  std::vector<SegmentRef> refs;
  for (std::span<const TokenId> toks : segs) {
    if (toks.empty() || segments_.Contains(ns, toks, context_id)) continue;
    refs.push_back(SegmentRef{std::vector<TokenId>(toks.begin(), toks.end()), context_id});
  }
  return refs;
}

void Scheduler::StartSegmentLoad(Seq& s) {
  const std::span<const TokenId> prompt(s.req.prompt);
  std::vector<std::span<const TokenId>> segs;
  for (const SegmentSpan& sp : s.req.segments) {
    segs.push_back(prompt.subspan(static_cast<size_t>(sp.offset), static_cast<size_t>(sp.length)));
  }
  std::vector<SegmentRef> refs =
      UncachedRefs(s.ns, prompt.first(static_cast<size_t>(s.req.segments.front().offset)), segs);
  if (refs.empty()) return;
  s.segment_deadline =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(options_.load_deadline_ms);
  s.segment_load = source_->StartSegmentLoad(s.ns, std::move(refs), s.segment_deadline);
}

bool Scheduler::SegmentsArrived(Seq& s) {
  if (s.segment_load == nullptr) return true;
  if (!s.segment_load->ready()) {
    // Pipelined: the prefill starts on the first band and awaits the rest layer by layer
    // (APE lays documents out whole: it waits).
    if (options_.pipeline_segment_loads && s.req.reuse.mode != ReuseMode::kApe &&
        s.segment_load->published()) {
      return true;
    }
    // Past the deadline the request goes on without them (they are computed instead).
    if (std::chrono::steady_clock::now() < s.segment_deadline) return false;
    s.segment_load.reset();
    return true;
  }
  AdoptSegments(s.ns, s.segment_load->Take(), 0);
  s.segment_load.reset();
  return true;
}

void Scheduler::AdoptSegments(const Hash128& ns, std::vector<std::shared_ptr<SegmentKv>> found,
                              int64_t ttl_ms) {
  uint64_t hits = 0, tokens = 0;
  for (std::shared_ptr<SegmentKv>& seg : found) {
    if (seg == nullptr) continue;
    ++hits;
    tokens += seg->tokens.size();
    segments_.Insert(ns, std::move(*seg), ttl_ms);
  }
  if (hits > 0) {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.segment_tier_hits += hits;
    stats_.segment_tier_tokens += tokens;
  }
}

void Scheduler::SegmentPrefillDone(Seq& s) {
  s.state = Seq::State::kDecode;
  if (options_.prefix_cache) {
    // Only the exact prefix, in whole pages: the pages past it hold approximate KV, and the
    // page that holds both is never shared (so the decode never writes into a shared page).
    const std::span<const TokenId> exact = ExactTokens(s);
    s.pool->Commit(*s.kv, exact);
    if (s.req.pin_ttl_ms > 0 && s.usage.pin_id == 0) {
      s.usage.pin_id = pins_.Add(s.ns, s.req.cache_salt, exact, s.req.pin_ttl_ms, s.pool).id;
    }
  }
  Emit(s);
}

std::shared_ptr<const SegmentKv> Scheduler::RelayLookup(const Hash128& ns,
                                                         std::span<const TokenId> toks) {
  // The output as generated, or without its last token: a request that ended on max_tokens
  // (or a stop string cut inside its last token) never fed that token, so its KV lacks it; the
  // placement then computes the segment's last token itself.
  const size_t len = RelayLength(ns, toks);
  if (len == 0) return nullptr;
  std::shared_ptr<const SegmentKv> seg = segments_.Lookup(ns, toks.first(len), kRelayContext);
  if (seg != nullptr) {
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.relay_hits;
  }
  return seg;
}

size_t Scheduler::RelayLength(const Hash128& ns, std::span<const TokenId> toks) {
  if (toks.empty()) return 0;
  for (size_t len : {toks.size(), toks.size() - 1}) {
    if (len > 0 && segments_.Contains(ns, toks.first(len), kRelayContext)) return len;
  }
  return 0;
}

void Scheduler::SaveRelay(Seq& s) {
  // The generated tokens whose KV the sequence holds (slots == positions: no budget policy).
  const int64_t begin = s.orig_prompt_len;
  const int64_t end = std::min<int64_t>(s.fed(), static_cast<int64_t>(s.tokens.size()));
  // A session pool's KV is not the engine's type: segments could not place it.
  if (s.policy != nullptr || s.kv->compacted() || s.ape || end - begin < 1 || s.pool != &kv_) {
    return;
  }
  SegmentKv seg;
  seg.tokens.assign(s.tokens.begin() + begin, s.tokens.begin() + end);
  seg.base_pos = begin;
  seg.context = kRelayContext;
  seg.shape = kv_.shape();
  CopySegmentKv(*s.kv, begin, end, seg);
  segments_.Insert(s.ns, std::move(seg));
  std::lock_guard<std::mutex> lock(mu_);
  ++stats_.relay_saved;
}

Result<std::vector<PrecomputedSegment>> Scheduler::PrecomputeSegments(
    const std::string& cache_salt, std::vector<TokenId> context,
    std::vector<std::vector<TokenId>> segments, int64_t ttl_ms) {
  if (!options_.prefix_cache) {
    return Unavailable("segment reuse is off on this server (--no-prefix-cache)");
  }
  auto job = std::make_shared<Job>();
  job->ns = Namespace(cache_salt);
  // Segments the tiers hold (filed by an earlier run, or another server on the same Redis) are
  // read back here, on the caller's thread, rather than computed again on the loop.
  std::vector<SegmentRef> refs = UncachedRefs(
      job->ns, context, std::vector<std::span<const TokenId>>(segments.begin(), segments.end()));
  if (!refs.empty()) {
    const SteadyTime deadline =
        std::chrono::steady_clock::now() + std::chrono::milliseconds(options_.load_deadline_ms);
    std::shared_ptr<PendingSegments> pending =
        source_->StartSegmentLoad(job->ns, std::move(refs), deadline);
    if (pending != nullptr && pending->WaitUntil(deadline)) {
      AdoptSegments(job->ns, pending->Take(), ttl_ms);
    }
  }
  job->context = std::move(context);
  job->segments = std::move(segments);
  job->ttl_ms = ttl_ms;
  std::future<Result<std::vector<PrecomputedSegment>>> done = job->done.get_future();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (draining_) return Unavailable("the server is shutting down");
    jobs_.push_back(job);
    wake_ = true;
  }
  cv_.notify_all();
  return done.get();
}

void Scheduler::RunJobs() {
  std::vector<std::shared_ptr<Job>> jobs;
  {
    std::lock_guard<std::mutex> lock(mu_);
    jobs.swap(jobs_);
  }
  for (auto& job : jobs) {
    std::vector<PrecomputedSegment> out;
    Status failed = Status::Ok();
    uint64_t computed = 0;
    for (size_t i = 0; i < job->segments.size() && failed.ok(); ++i) {
      const std::vector<TokenId>& toks = job->segments[i];
      PrecomputedSegment r;
      r.tokens = static_cast<int64_t>(toks.size());
      bool miss = false;
      Result<std::shared_ptr<const SegmentKv>> seg =
          SegmentFor(job->ns, job->context, toks, false, job->ttl_ms, &miss);
      if (!seg.ok()) {
        failed = seg.status().WithContext("segments[" + std::to_string(i) + "]");
        break;
      }
      r.cached = !miss;
      if (miss) computed += toks.size();
      out.push_back(r);
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      stats_.segment_computed_tokens += computed;
    }
    if (failed.ok()) {
      job->done.set_value(std::move(out));
    } else {
      job->done.set_value(failed);
    }
  }
}

void Scheduler::Preempt(Seq& v) {
  // What the sequence computed goes to the radix index (so the resume is a cache hit while the
  // pages last), its pages are released, and it waits at the front of its priority. With swap,
  // its full chunks are copied to the tiers first (only those not copied before).
  const int64_t fed = std::min<int64_t>(v.fed(), static_cast<int64_t>(v.tokens.size()));
  const std::span<const TokenId> kept(v.tokens.data(), static_cast<size_t>(fed));
  v.kv->SealWindow();  // its f16 window (kivi4, --kv-recent) is saved and indexed too
  // Only the exact part of a compacted or segment-prefilled sequence's KV may be shared.
  const std::span<const TokenId> exact =
      kept.first(std::min<size_t>(kept.size(), static_cast<size_t>(v.kv->exact_tokens())));
  uint64_t swapped = 0;
  if (options_.preempt == PreemptMode::kSwap && options_.prefix_cache) {
    const int64_t held = source_->Save(*v.kv, exact, v.tier_tokens);
    if (held > v.tier_tokens) {
      swapped = static_cast<uint64_t>(held - v.tier_tokens);
      v.tier_tokens = held;
    }
  }
  v.cascade.reset();  // a part-read prompt: its exact cached prefix was committed above
  v.pool->Finish(*v.kv, kept);
  v.kv.reset();
  v.load.reset();
  v.segment_load.reset();
  if (v.state == Seq::State::kDecode) {
    // tokens = prompt + every sampled token; the last one (next) is not in the KV yet, so the
    // resume's prefill feeds it and its logits give the next token, as a decode step would.
    v.req.prompt = v.tokens;
    v.prompt_len = static_cast<int64_t>(v.tokens.size());
  }
  if (v.policy != nullptr) {
    // The resume reads prompt and output again under the policy, as a new prompt.
    v.policy_budget = ResolveBudgetTokens(v.req.kv_policy, v.prompt_len);
    v.policy_block = PrefillBlock(*v.policy, v.policy_budget, v.prompt_len, n_ctx_);
    v.capacity = PolicyCapacity(*v.policy, v.policy_budget, v.policy_block, v.prompt_len,
                                std::max<int64_t>(1, v.req.gen.max_tokens - v.generated));
    const int64_t P = v.pool->page_tokens();
    v.forecast_blocks = CeilDiv(v.capacity, P) +
                        CompactionCopies(v.policy.get(), v.policy_budget, v.capacity, P);
  }
  v.state = Seq::State::kQueued;
  v.resumed = true;
  v.cow_pending = false;
  v.segment_pending = UsesSegments(v);
  v.ape.reset();
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.preemptions;
    stats_.swapped_out_tokens += swapped;
  }
}

bool Scheduler::Outranks(const Seq& a, const Seq& b, int64_t now_ns) const {
  if (a.req.priority != b.req.priority) return a.req.priority > b.req.priority;
  return a.deadline_ns > now_ns && b.deadline_ns == 0;
}

bool Scheduler::PreemptFor(const Seq& s, int64_t short_pages) {
  const int64_t now = NowNanos();
  std::vector<Seq*> victims;
  for (auto& r : running_) {
    // Only sequences of s's pool give it room.
    if (r->kv != nullptr && r->state != Seq::State::kQueued && r->pool == s.pool &&
        Outranks(s, *r, now)) {
      victims.push_back(r.get());
    }
  }
  // Lowest priority first, then the newest (admitted last): the least lost work first.
  std::stable_sort(victims.begin(), victims.end(), [](const Seq* a, const Seq* b) {
    if (a->req.priority != b->req.priority) return a->req.priority < b->req.priority;
    return a->id > b->id;
  });
  // A victim gives back its pages and what it may still allocate: its whole forecast.
  int64_t freed = 0;
  size_t take = 0;
  while (take < victims.size() && freed < short_pages) freed += victims[take++]->forecast_blocks;
  if (freed < short_pages) return false;  // not enough to make room: nobody is preempted
  for (size_t i = 0; i < take; ++i) Preempt(*victims[i]);
  return true;
}

int64_t Scheduler::Outstanding(const Seq& s) const {
  const int64_t held = s.kv ? s.kv->held_pages() : 0;
  return std::max<int64_t>(0, s.forecast_blocks - held) + (s.cow_pending ? 1 : 0);
}

bool Scheduler::Fits(Seq& s, int64_t* short_pages) {
  KvManager& pool = *s.pool;  // everything below is of s's pool only
  const int64_t P = pool.page_tokens();
  s.kv = pool.Start(s.ns, s.req.prompt, s.capacity);
  if (s.policy != nullptr) {
    // The policy's observation window (the prompt's last tokens) is computed, not reused, so
    // that its attention statistics exist; and the statistics start afresh.
    const int64_t window = std::max(1, s.policy->stats_window());
    int64_t limit = std::max<int64_t>(0, s.prompt_len - window);
    // Read in blocks, the first block must end within budget + block slots.
    if (s.policy_block > 0) limit = std::min(limit, s.policy_budget);
    // A cascade reads the whole prompt: a cached prefix would stay in whole pages, and the
    // first stage that evicts inside it would copy them all (every layer not read yet keeps
    // its part of them), more pages than the cascade saves. (cascade=false reuses it.)
    if (Cascades(s)) limit = 0;
    if (s.kv->n_tokens() > limit) s.kv->SetTokens(limit);
    s.stats = AttentionStats{};
    s.stats.cumulative = s.policy->stats_cumulative();
    s.since_compaction = 0;
  }
  if (s.NeedsPromptLogits()) {
    // Reused KV has no logits: only the positions whose logprobs are known (a resumed request's)
    // may come from the cache; the rest is prefilled with every position's logits.
    const auto known = static_cast<int64_t>(s.prompt_lp.size());
    if (s.kv->n_tokens() > known) s.kv->SetTokens(known);
  }
  // The whole prompt cached: its last token is recomputed (see Step), into a shared page.
  const int64_t reused = std::min(s.kv->n_tokens(), s.prompt_len - 1);
  const int64_t shared_full = reused / P;
  s.cow_pending = s.kv->n_tokens() > 0 && (s.kv->n_tokens() % P != 0 || reused < s.kv->n_tokens());
  int64_t need = s.forecast_blocks - shared_full + (s.cow_pending ? 1 : 0);
  if (s.cow_pending && need > static_cast<int64_t>(pool.GetStats().pages_total)) {
    // Its table takes the whole pool: the partial page it shares with the cache cannot be
    // kept beside its own copy (one page more than there are). Its tokens are prefilled
    // again instead, or the request would wait forever.
    s.kv->SetTokens(shared_full * P);
    s.cow_pending = false;
    need = s.forecast_blocks - shared_full;
  }
  const KvManager::Stats st = pool.GetStats();
  int64_t available = static_cast<int64_t>(st.pages_free) +
                      std::max<int64_t>(0, static_cast<int64_t>(st.pages_cached_unreferenced) -
                                               static_cast<int64_t>(st.pages_pinned));
  if (options_.admission == AdmissionPolicy::kPastFuture) {
    std::vector<SeqLoad> loads;
    for (const auto& r : running_) {
      if (r->pool == s.pool) loads.push_back(LoadOf(*r));
    }
    loads.push_back(LoadOf(s));
    const int64_t extra = past_future_.EstimateExtraPages(loads, static_cast<int>(P));
    if (extra >= 0) {  // else: too little history yet, the worst case below decides
      if (extra + (s.cow_pending ? 1 : 0) <= available) return true;
      if (short_pages != nullptr) *short_pages = extra + (s.cow_pending ? 1 : 0) - available;
      s.kv.reset();
      return false;
    }
  }
  for (const auto& r : running_) {
    if (r->pool == s.pool) available -= Outstanding(*r);
  }
  if (need <= available) return true;
  if (short_pages != nullptr) *short_pages = need - available;
  s.kv.reset();  // drops the references Start took; the cached pages stay cached
  return false;
}

size_t Scheduler::PickNext(const KvManager* blocked) {
  // The queue as it is, less the requests of the blocked pool; `front` is its first.
  auto eligible = [&](size_t i) { return queue_[i]->pool != blocked; };
  size_t front = 0;
  while (front < queue_.size() && !eligible(front)) ++front;
  if (front == queue_.size()) return kNoneEligible;
  if (blocked == nullptr && queue_.size() < 2 && options_.order != QueueOrder::kLpm) return 0;
  // Earliest deadline first among the front priority's requests that can still meet theirs.
  const int64_t now = NowNanos();
  const int priority = queue_[front]->req.priority;
  size_t edf = queue_.size();
  for (size_t i = front; i < queue_.size() && queue_[i]->req.priority == priority; ++i) {
    const Seq& q = *queue_[i];
    if (!eligible(i)) continue;
    if (q.deadline_ns > now && (edf == queue_.size() || q.deadline_ns < queue_[edf]->deadline_ns)) {
      edf = i;
    }
  }
  if (edf < queue_.size()) return edf;
  if (options_.order != QueueOrder::kLpm) return front;
  // Starvation bound: a request passed over lpm_max_skips times goes next.
  if (queue_[front]->skips >= options_.lpm_max_skips) return front;
  // Longest cached prefix first, among the requests of the front's priority; ties by arrival.
  // A request whose next uncached page a running request is prefilling right now waits for it
  // (the page is committed after that step, see Step) instead of computing it a second time.
  const int64_t P = kv_.page_tokens();
  std::vector<const Seq*> prefilling;
  for (const auto& r : running_) {
    if (r->state == Seq::State::kPrefill && r->kv && r->fed() < r->prompt_len) {
      prefilling.push_back(r.get());
    }
  }
  auto in_flight = [&](const Seq& q, int64_t cached) {
    for (const Seq* r : prefilling) {
      if (r->ns != q.ns) continue;
      const size_t n = std::min(q.req.prompt.size(), r->req.prompt.size());
      size_t common = 0;
      while (common < n && q.req.prompt[common] == r->req.prompt[common]) ++common;
      if (static_cast<int64_t>(common) >= cached + P) return true;
    }
    return false;
  };
  size_t best = queue_.size();
  int64_t best_len = -1;
  for (size_t i = front; i < queue_.size() && queue_[i]->req.priority == priority; ++i) {
    const Seq& q = *queue_[i];
    if (!eligible(i)) continue;
    const int64_t len = q.pool->CachedPrefix(q.ns, q.req.prompt);
    if (len > best_len && !in_flight(q, len)) {
      best = i;
      best_len = len;
    }
  }
  if (best == queue_.size()) return kWaitForPrefill;
  for (size_t i = front; i < best; ++i) {
    if (eligible(i)) ++queue_[i]->skips;
  }
  return best;
}

void Scheduler::Admit() {
  if (!admission_dirty_) return;
  // A pool whose next request does not fit: the other pool's requests may still go (they take
  // nothing from it), so one full pool never holds up the other.
  const KvManager* blocked = nullptr;
  while (!queue_.empty() && static_cast<int>(running_.size()) < options_.max_running) {
    const size_t pick = PickNext(blocked);
    if (pick == kNoneEligible) {
      admission_dirty_ = false;  // retried when a sequence finishes or a pin goes
      return;
    }
    if (pick == kWaitForPrefill) return;  // retried after the next step commits its pages
    Seq& s = *queue_[pick];
    int64_t short_pages = 0;
    if (!Fits(s, &short_pages)) {
      // A request that outranks running ones takes their room (they resume later).
      if (short_pages > 0 && PreemptFor(s, short_pages)) {
        Requeue();
        continue;
      }
      if (session_kv_ != nullptr && blocked == nullptr) {
        blocked = s.pool;
        continue;
      }
      admission_dirty_ = false;  // retried when a sequence finishes or a pin goes
      return;
    }
    if (s.resumed) {
      // A preempted request: restore what memory lost from the tiers (swap), prefill the rest,
      // then decode on.
      StartTierLoad(s);
      running_.push_back(std::move(queue_[pick]));
      queue_.erase(queue_.begin() + static_cast<std::ptrdiff_t>(pick));
      continue;
    }
    s.admit_ns = NowNanos();
    s.usage.queue_seconds = static_cast<double>(s.admit_ns - s.submit_ns) * 1e-9;
    queue_delay_s_ = 0.9 * queue_delay_s_ + 0.1 * s.usage.queue_seconds;
    const int64_t memory = std::min(s.kv->n_tokens(), s.prompt_len - 1);
    s.usage.cached_by_tier.push_back({"memory", memory});
    s.usage.cached_tokens = memory;
    s.usage.prompt_tokens = s.prompt_len;
    s.logits.resize(engine_.model().config().n_vocab);
    s.sampler = std::make_unique<Sampler>(s.req.gen.sampling);
    s.detok = std::make_unique<StreamingDetokenizer>(engine_.model().tokenizer());
    for (const auto& stop : s.req.gen.stop) s.max_stop = std::max(s.max_stop, stop.size());
    StartTierLoad(s);
    {
      std::lock_guard<std::mutex> lock(mu_);
      stats_.prompt_tokens += static_cast<uint64_t>(s.prompt_len);
      stats_.cached_tokens += static_cast<uint64_t>(memory);
    }
    running_.push_back(std::move(queue_[pick]));
    queue_.erase(queue_.begin() + static_cast<std::ptrdiff_t>(pick));
  }
}

void Scheduler::StartTierLoad(Seq& s) {
  s.state = Seq::State::kPrefill;
  if (!options_.prefix_cache) return;
  if (s.segment_pending) StartSegmentLoad(s);
  if (s.segment_load != nullptr) s.state = Seq::State::kLoading;
  if (s.NeedsPromptLogits()) return;  // restored KV has no logits either (see Fits)
  // The tiers are asked off this thread; the request waits in kLoading meanwhile.
  std::span<const TokenId> prompt(s.req.prompt);
  if (s.policy != nullptr) {
    // As in Fits: the observation window is computed.
    const int64_t window = std::max(1, s.policy->stats_window());
    int64_t limit = std::max<int64_t>(0, s.prompt_len - window);
    if (s.policy_block > 0) limit = std::min(limit, s.policy_budget);
    prompt = prompt.first(static_cast<size_t>(limit));
    if (s.kv->n_tokens() >= static_cast<int64_t>(prompt.size())) return;
  }
  s.load = source_->StartLoad(
      s.ns, prompt, s.kv->n_tokens(),
      std::chrono::steady_clock::now() + std::chrono::milliseconds(options_.load_deadline_ms));
  if (s.load != nullptr) s.state = Seq::State::kLoading;
}

void Scheduler::ExpireQueued() {
  if (options_.queue_timeout_ms <= 0 || queue_.empty()) return;
  const int64_t cutoff = NowNanos() - options_.queue_timeout_ms * 1000000;
  bool expired = false;
  for (auto& s : queue_) {
    if (s->submit_ns < cutoff && !s->resumed) {  // a preempted request has streamed already
      Finish(*s, Reason::kCancelled,
             DeadlineExceeded("the request waited in the queue longer than " +
                              std::to_string(options_.queue_timeout_ms) +
                              " ms (--queue-timeout); retry later"));
      expired = true;
    }
  }
  if (expired) {
    std::erase_if(queue_, [](const auto& s) { return s->state == Seq::State::kFinished; });
  }
}

void Scheduler::PollLoads() {
  for (auto& sp : running_) {
    Seq& s = *sp;
    if (s.state != Seq::State::kLoading) continue;
    if (s.load == nullptr) {
      // Only its segments are loading.
      if (SegmentsArrived(s)) s.state = Seq::State::kPrefill;
      continue;
    }
    LoadProgress p = source_->ApplyLoad(*s.load, *s.kv);
    s.tier_tokens = std::max(s.tier_tokens, p.tier_tokens);
    uint64_t restored = 0;
    for (TierTokens& t : p.added) {
      if (s.resumed) {
        // A preempted request: its usage was accounted at its first admission.
        restored += static_cast<uint64_t>(std::max<int64_t>(0, t.tokens));
        continue;
      }
      // Usage counts at most prompt_len - 1 cached tokens (the last one is always recomputed).
      t.tokens = std::min(t.tokens, s.prompt_len - 1 - s.usage.cached_tokens);
      if (t.tokens <= 0) continue;
      s.usage.cached_tokens += t.tokens;
      restored += static_cast<uint64_t>(t.tokens);
      auto same = std::find_if(s.usage.cached_by_tier.begin(), s.usage.cached_by_tier.end(),
                               [&](const TierTokens& u) { return u.tier == t.tier; });
      if (same != s.usage.cached_by_tier.end()) {
        same->tokens += t.tokens;
      } else {
        s.usage.cached_by_tier.push_back(std::move(t));
      }
    }
    if (restored > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      if (s.resumed) {
        stats_.resume_restored_tokens += restored;
      } else {
        stats_.restored_tokens += restored;
        stats_.cached_tokens += restored;
      }
    }
    if (p.done) {
      s.load.reset();
      if (SegmentsArrived(s)) s.state = Seq::State::kPrefill;
    }
  }
}

void Scheduler::Step() {
  // A segment prefill is one large synchronous call: one request per step.
  for (auto& s : running_) {
    if (s->state == Seq::State::kPrefill && s->segment_pending) {
      SegmentPrefill(*s);
      break;
    }
  }
  // APE sequences decode one at a time through DecodeApe (their attention is not Forward's).
  for (auto& s : running_) {
    if (s->state != Seq::State::kDecode || !s->ape) continue;
    Status st = s->kv->Reserve(s->kv->n_tokens() + 1);
    if (st.ok()) {
      st = DecodeApe(engine_, *s->kv, *s->ape, std::span<const TokenId>(&s->next, 1),
                     s->logits.data());
    }
    if (!st.ok()) {
      Finish(*s, Reason::kCancelled, st);
      continue;
    }
    Emit(*s);
  }
  std::erase_if(running_, [](const auto& s) { return s->state == Seq::State::kFinished; });
  if (running_.empty()) return;
  struct Planned {
    Seq* seq;
    int64_t n;
  };
  std::vector<Planned> plan;
  int64_t budget = options_.step_tokens;
  int64_t decodes = 0;
  for (auto& s : running_) {
    if (s->state == Seq::State::kDecode && !s->ape) {
      plan.push_back({s.get(), 1});
      --budget;
      ++decodes;
    }
  }
  // At least one page of prefill per step, so prompts always advance.
  int64_t left = std::max<int64_t>(budget, kv_.page_tokens());
  if (options_.itl_target_ms > 0 && decodes > 0) {
    // Decodes wait for this step: give prefill only what the inter-token objective leaves.
    left = step_cost_.PrefillBudget(decodes, options_.itl_target_ms * 1e-3, kv_.page_tokens(),
                                    left);
    std::lock_guard<std::mutex> lock(mu_);
    stats_.prefill_budget = left;
  }
  // Chunks of prompts that need every position's logits share one bounded buffer.
  const int64_t n_vocab = engine_.model().config().n_vocab;
  int64_t logit_rows_left =
      std::max<int64_t>(1, kPromptLogitsBytes / (n_vocab * static_cast<int64_t>(sizeof(float))));
  int64_t logit_rows = 0;
  struct CascadeStep {
    Seq* seq;
    int layers;
  };
  std::vector<CascadeStep> cascades;
  for (auto& s : running_) {
    if (s->state != Seq::State::kPrefill || left <= 0 || s->segment_pending) continue;
    if (Cascades(*s)) {
      // A layer of the prompt's rest costs about rest / n_layer tokens of a whole pass: as
      // many layers as the step's prefill budget pays for, at least one.
      const int L = engine_.model().config().n_layer;
      const int64_t rest =
          std::max<int64_t>(1, s->cascade ? s->cascade->tokens() : s->prompt_len - s->fed());
      const int next = s->cascade ? s->cascade->next_layer() : 0;
      const int layers =
          static_cast<int>(std::clamp<int64_t>(left * L / rest, 1, L - next));
      left -= CeilDiv(rest * layers, L);
      cascades.push_back({s.get(), layers});
      continue;
    }
    int64_t done = s->fed();
    if (done >= s->prompt_len) {
      done = s->prompt_len - 1;  // fully cached: recompute the last token for its logits
      s->kv->SetTokens(done);
    }
    int64_t n = std::min(s->prompt_len - done, left);
    if (s->policy != nullptr) {
      // A chunk ends at the prompt's end or the block's, and the chunk that ends it holds the
      // whole observation window (finishing it may overrun the step by less than a window).
      const int64_t block = s->policy_block;
      const int64_t end =
          block > 0 ? std::min(s->prompt_len, (done / block + 1) * block) : s->prompt_len;
      const int64_t rest = end - done;
      n = rest <= left + s->policy->stats_window() ? rest : left;
    }
    if (s->NeedsPromptLogits()) {
      if (logit_rows_left <= 0) continue;  // the buffer is taken: next step
      // A policy's chunk keeps its shape (its observation window); it is within step_tokens
      // plus a window anyway.
      if (s->policy == nullptr) n = std::min(n, logit_rows_left);
      logit_rows_left -= n;
      logit_rows += n;
    }
    left -= n;
    plan.push_back({s.get(), n});
  }
  // [logit_rows][n_vocab], filled by this step's kAll items; freed once no prompt needs it.
  if (logit_rows > 0) {
    prompt_logits_.resize(static_cast<size_t>(logit_rows * n_vocab));
  } else if (!prompt_logits_.empty()) {
    prompt_logits_ = std::vector<float>();
  }
  int64_t logit_row = 0;  // the next free row of prompt_logits_

  // Plan, then apply: reserve every item's pages first; an item that cannot get them waits.
  std::vector<Engine::Item> items;
  std::vector<Seq*> owners;
  uint64_t reserve_failures = 0;
  for (const Planned& p : plan) {
    Seq& s = *p.seq;
    if (s.state == Seq::State::kQueued) continue;  // preempted for an earlier item
    bool reserved = s.kv->Reserve(s.kv->n_tokens() + p.n).ok();
    // Past-Future admits on an estimate: when it was wrong, the newest request admitted after
    // this one that has no item in this step yet makes room (recompute preemption). Only newer
    // ones: the oldest request always progresses, so preemptions never cycle.
    while (!reserved && options_.admission == AdmissionPolicy::kPastFuture) {
      Seq* victim = nullptr;
      for (auto it = running_.rbegin(); it != running_.rend() && it->get() != &s; ++it) {
        Seq* c = it->get();
        if (c->kv == nullptr || c->pool != s.pool || c->state == Seq::State::kLoading ||
            c->state == Seq::State::kQueued ||
            std::find(owners.begin(), owners.end(), c) != owners.end()) {
          continue;
        }
        victim = c;
        break;
      }
      if (victim == nullptr) break;
      Preempt(*victim);
      reserved = s.kv->Reserve(s.kv->n_tokens() + p.n).ok();
    }
    if (!reserved) {
      ++reserve_failures;
      continue;
    }
    Engine::Item it;
    it.kv = s.kv.get();
    it.logits_out = s.logits.data();
    if (s.state == Seq::State::kDecode) {
      it.tokens = std::span<const TokenId>(&s.next, 1);
      it.logits = Engine::Logits::kLast;
    } else {
      const int64_t done = s.fed();
      it.tokens = std::span<const TokenId>(s.req.prompt).subspan(done, p.n);
      it.logits = done + p.n == s.prompt_len ? Engine::Logits::kLast : Engine::Logits::kNone;
      if (s.NeedsPromptLogits()) {
        it.logits = Engine::Logits::kAll;
        it.logits_out = prompt_logits_.data() + logit_row * n_vocab;
        logit_row += p.n;
      }
    }
    if (s.policy != nullptr &&
        (s.policy->stats_window() > 0 || s.policy->stats_cumulative())) {
      // The window sums take the chunk that ends the prompt or a block (see the planning), and
      // every decode token (the queries since the last compaction).
      const int64_t end_fed = s.fed() + static_cast<int64_t>(it.tokens.size());
      const bool ends = s.state == Seq::State::kDecode || end_fed == s.prompt_len ||
                        (s.policy_block > 0 && end_fed % s.policy_block == 0);
      s.stats.window = ends ? s.policy->stats_window() : 0;
      it.stats = &s.stats;
    }
    items.push_back(it);
    owners.push_back(&s);
  }
  if (reserve_failures > 0) {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.reserve_failures += reserve_failures;
  }
  // A pool none of whose planned requests could reserve pages cannot progress (pins taken since
  // admission hold them), and the other pool's progress frees none of its pages: give up its
  // newest request.
  std::vector<KvManager*> stalled;
  for (KvManager* pool : {&kv_, session_kv_}) {
    if (pool == nullptr) continue;
    const bool planned = std::any_of(plan.begin(), plan.end(), [&](const Planned& p) {
      return p.seq->pool == pool && p.seq->state != Seq::State::kQueued;
    });
    const bool progressed =
        std::any_of(owners.begin(), owners.end(), [&](const Seq* o) { return o->pool == pool; });
    if (planned && !progressed) stalled.push_back(pool);
  }
  // Cascading prompts read their layers outside the batch.
  for (const CascadeStep& c : cascades) {
    if (c.seq->state == Seq::State::kPrefill) StepCascade(*c.seq, c.layers);
  }
  if (items.empty()) Requeue();
  for (KvManager* pool : stalled) {
    auto newest = std::find_if(running_.rbegin(), running_.rend(),
                               [&](const std::unique_ptr<Seq>& r) { return r->pool == pool; });
    if (newest == running_.rend()) continue;
    Finish(**newest, Reason::kCancelled,
           ResourceExhausted("the KV pool is exhausted; retry later"));
    running_.erase(std::next(newest).base());
  }
  if (items.empty()) return;  // also when every running request is still loading
  const int64_t step_start = NowNanos();
  const Status st = engine_.Forward(items);
  uint64_t prefill = 0;
  int64_t step_decodes = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    Seq& s = *owners[i];
    if (!st.ok()) {
      Finish(s, Reason::kCancelled, st);
      continue;
    }
    s.cow_pending = false;
    if (s.state == Seq::State::kPrefill) {
      prefill += items[i].tokens.size();
    } else {
      ++step_decodes;
    }
    if (items[i].logits == Engine::Logits::kAll) TakePromptLogits(s, items[i]);
    if (items[i].logits == Engine::Logits::kNone ||
        (items[i].logits == Engine::Logits::kAll && s.fed() < s.prompt_len)) {
      // A prompt part-way through prefill: its full pages are final, so concurrent requests
      // with the same prefix may share them from now on.
      if (options_.prefix_cache) s.pool->Commit(*s.kv, s.req.prompt);
      if (s.policy != nullptr && s.policy_block > 0 && s.fed() % s.policy_block == 0) {
        if (Status cs = CompactPolicy(s); !cs.ok()) Finish(s, Reason::kCancelled, cs);
      }
      continue;
    }
    if (s.state == Seq::State::kPrefill) {
      // Prompt complete: share its full pages now; pin it if asked (cache_control).
      s.state = Seq::State::kDecode;
      if (options_.prefix_cache) {
        // A pinned prompt is committed with its last partial page too (so all of it is
        // pinned); the next decode then copies that page before writing (one more page).
        const bool partial = s.req.pin_ttl_ms > 0 && s.prompt_len % s.pool->page_tokens() != 0;
        s.pool->Commit(*s.kv, s.req.prompt, partial);
        s.cow_pending = partial;
        if (s.req.pin_ttl_ms > 0 && s.usage.pin_id == 0) {
          s.usage.pin_id =
              pins_.Add(s.ns, s.req.cache_salt, s.req.prompt, s.req.pin_ttl_ms, s.pool).id;
        }
      }
      if (s.policy != nullptr) {
        // The prompt's exact KV is in the index (above); now the sequence keeps its budget.
        if (Status cs = CompactPolicy(s); !cs.ok()) {
          Finish(s, Reason::kCancelled, cs);
          continue;
        }
      }
    } else if (s.policy != nullptr && ++s.since_compaction >= kPolicySlack) {
      if (Status cs = CompactPolicy(s); !cs.ok()) {
        Finish(s, Reason::kCancelled, cs);
        continue;
      }
    }
    Emit(s);
  }
  if (st.ok()) {
    step_cost_.Observe(step_decodes, static_cast<int64_t>(prefill),
                       static_cast<double>(NowNanos() - step_start) * 1e-9);
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.steps;
    stats_.prefill_tokens += prefill;
  }
  std::erase_if(running_, [](const auto& s) { return s->state == Seq::State::kFinished; });
  Requeue();
}

void Scheduler::TakePromptLogits(Seq& s, const Engine::Item& item) {
  const int64_t n_vocab = engine_.model().config().n_vocab;
  const int64_t start = item.tokens.data() - s.req.prompt.data();
  const auto rows = static_cast<int64_t>(item.tokens.size());
  for (int64_t j = 0; j < rows; ++j) {
    // Position pos gives prompt token pos + 1's logprob. A resumed request may recompute
    // positions it already has (the cache lost them meanwhile): they are skipped.
    const int64_t pos = start + j;
    if (pos != static_cast<int64_t>(s.prompt_lp.size()) || pos + 1 >= s.orig_prompt_len) continue;
    s.prompt_lp.push_back(LogprobsAt(std::span<const float>(item.logits_out + j * n_vocab,
                                                            static_cast<size_t>(n_vocab)),
                                     s.req.prompt[static_cast<size_t>(pos + 1)],
                                     s.req.logprobs));
  }
  if (start + rows == s.prompt_len) {
    // The prompt's last row is the first output token's distribution, which Emit samples.
    std::copy_n(item.logits_out + (rows - 1) * n_vocab, n_vocab, s.logits.begin());
  }
}

void Scheduler::TakePromptLogprobs(Seq& s, StreamEvent& e) {
  if (!s.req.prompt_logprobs || s.prompt_lp_sent) return;
  e.prompt_logprobs = std::move(s.prompt_lp);
  s.prompt_lp = {};
  s.prompt_lp_sent = true;
}

void Scheduler::Requeue() {
  bool any = false;
  for (auto& s : running_) {
    if (s->state != Seq::State::kQueued) continue;
    queue_.push_back(std::move(s));
    any = true;
  }
  if (!any) return;
  std::erase_if(running_, [](const auto& s) { return s == nullptr; });
  SortQueue();  // preempted requests keep their ids, so they go back ahead of newcomers
}

bool Scheduler::Emit(Seq& s) {
  const int64_t now = NowNanos();
  if (s.first_ns == 0) {
    s.first_ns = now;
    s.usage.ttft_seconds = static_cast<double>(now - s.submit_ns) * 1e-9;
    if (s.deadline_ns > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      ++(now <= s.deadline_ns ? stats_.deadline_met : stats_.deadline_missed);
    }
  }
  if (s.generated >= s.req.gen.max_tokens) {
    Finish(s, Reason::kLength);
    return false;
  }
  const Tokenizer& tok = engine_.model().tokenizer();
  // Logprobs report the model's raw distribution; the sampler changes the logits in place
  // (repetition penalty), so they are kept first.
  if (s.req.logprobs >= 0) raw_logits_.assign(s.logits.begin(), s.logits.end());
  const TokenId id = s.sampler->Sample(s.logits, s.tokens);
  if (!s.req.gen.ignore_eos && tok.IsEog(id)) {
    Finish(s, Reason::kEos);
    return false;
  }
  s.tokens.push_back(id);
  ++s.generated;
  std::string piece = s.detok->Push(id);
  const size_t old_size = s.text.size();
  s.text += piece;
  bool stopped = false;
  if (s.max_stop > 0) {
    // Only the region the new text could complete needs searching.
    const size_t start = old_size >= s.max_stop ? old_size - s.max_stop + 1 : 0;
    size_t cut = std::string::npos;
    for (const auto& stop : s.req.gen.stop) {
      if (stop.empty()) continue;
      const size_t at = s.text.find(stop, start);
      if (at != std::string::npos) cut = std::min(cut, at);
    }
    if (cut != std::string::npos) {
      piece = cut > old_size ? s.text.substr(old_size, cut - old_size) : std::string();
      s.text.resize(cut);
      stopped = true;
    }
  }
  StreamEvent e;
  e.kind = StreamEvent::Kind::kToken;
  e.token = id;
  e.text = std::move(piece);
  if (s.req.logprobs >= 0 && !(stopped && e.text.empty())) {
    e.logprobs = LogprobsAt(raw_logits_, id, s.req.logprobs);
  }
  TakePromptLogprobs(s, e);
  s.stream->Push(std::move(e));
  if (stopped) {
    Finish(s, Reason::kStop);
    return false;
  }
  if (s.generated >= s.req.gen.max_tokens || s.kv->n_tokens() + 1 > s.capacity ||
      s.kv->next_position() + 1 > n_ctx_) {
    Finish(s, Reason::kLength);
    return false;
  }
  s.next = id;
  return true;
}

void Scheduler::Finish(Seq& s, Reason reason, const Status& error) {
  if (s.state == Seq::State::kFinished) return;
  s.cascade.reset();  // a part-read cascade (it refers to s.kv)
  bool program_noted = false;
  if (s.kv) {
    const int64_t fed = std::min<int64_t>(s.fed(), static_cast<int64_t>(s.tokens.size()));
    s.kv->SealWindow();  // its f16 window (kivi4, --kv-recent) is saved and indexed too
    // Only the exact part of a compacted or segment-prefilled sequence's KV may be shared.
    const std::span<const TokenId> kept = ExactTokens(s);
    if (s.policy != nullptr) s.usage.kv_tokens_kept = s.kv->kept_tokens();
    if (options_.prefix_cache && error.ok()) {
      s.load.reset();  // a restore still in flight is abandoned (its late chunks are dropped)
      s.segment_load.reset();
      if (options_.relay && reason != Reason::kCancelled) SaveRelay(s);
      source_->Save(*s.kv, kept, s.tier_tokens);
      s.pool->Finish(*s.kv, kept);
      // A program's turn that called a tool gets Continuum's TTL instead of the session's.
      const bool program_pin = options_.order == QueueOrder::kProgram && !s.req.tool.empty() &&
                               s.req.program_id.empty();
      if (!s.req.session_id.empty() && fed > 0 && !program_pin) {
        const int64_t ttl =
            s.req.session_ttl_ms > 0 ? s.req.session_ttl_ms : options_.session_ttl_ms;
        pins_.SetSession(s.req.session_id, s.ns, s.req.cache_salt, kept, ttl, s.pool);
      }
      if (reason != Reason::kCancelled) ProgramTurnEnded(s, kept);
      program_noted = true;
    }
    s.kv.reset();  // releases whatever Finish did not
  }
  if (!program_noted && error.ok() && reason != Reason::kCancelled) ProgramTurnEnded(s, {});
  // WART: an incomplete UTF-8 character at the very end (StreamingDetokenizer::Flush) is dropped
  // rather than sent as invalid text.
  const int64_t now = NowNanos();
  s.usage.prompt_tokens = s.orig_prompt_len;
  s.usage.completion_tokens = s.generated;
  if (s.first_ns != 0) s.usage.decode_seconds = static_cast<double>(now - s.first_ns) * 1e-9;
  StreamEvent e;
  if (error.ok()) {
    e.kind = StreamEvent::Kind::kDone;
    e.finish = reason;
    e.usage = s.usage;
    TakePromptLogprobs(s, e);  // max_tokens 0, or EOS first: no token event carried them
  } else {
    e.kind = StreamEvent::Kind::kError;
    e.error = error;
    e.usage = s.usage;
  }
  {
    // Counted before the client can see its end: the published running and queued counts
    // (cachette_running_sequences, which a router takes as a backend's load) never include a
    // request whose answer is complete. The loop's end resets them from the lists; until then
    // this one comes off the count its state is in (a request admitted in this iteration is
    // still in the queued one).
    std::lock_guard<std::mutex> lock(mu_);
    int64_t* first = s.state == Seq::State::kQueued ? &stats_.queued : &stats_.running;
    int64_t* second = first == &stats_.queued ? &stats_.running : &stats_.queued;
    if (*first > 0) {
      --*first;
    } else if (*second > 0) {
      --*second;
    }
    if (!error.ok()) {
      ++stats_.failed;
    } else if (reason == Reason::kCancelled) {
      ++stats_.cancelled;
    } else {
      ++stats_.finished;
      past_future_.Finished(s.generated);  // the past the admission estimates from
    }
    stats_.generated_tokens += static_cast<uint64_t>(s.generated);
  }
  s.state = Seq::State::kFinished;
  admission_dirty_ = true;
  s.stream->Push(std::move(e));
}

}  // namespace cachette::sched
