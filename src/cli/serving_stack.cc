#include "cli/serving_stack.h"

#include <filesystem>
#include <optional>

#include "cache/codecs/codec.h"
#include "cli/cpu_info.h"
#include "core/log.h"
#include "core/timer.h"
#include "core/units.h"

namespace cachette::cli {

using server::ServeConfig;

void AddStackFlags(CLI::App* c, ServeFlags* p) {
  constexpr const char* kModel = "Model and engine";
  constexpr const char* kSched = "Scheduler";
  constexpr const char* kStore = "Cache store";
  Flag(c, p, kModel, "-m,--model", &ServeConfig::model, "GGUF model (default: the bundled one)");
  Flag(c, p, kModel, "--model-alias", &ServeConfig::model_alias,
       "Model id in the API (default: file)");
  Flag(c, p, kModel, "--threads", &ServeConfig::threads, "Compute threads (0 = one per core)");
  Flag(c, p, kModel, "--kv-budget", &ServeConfig::kv_budget,
       "Memory for in-memory KV pages (512MiB)");
  Flag(c, p, kModel, "--kv-type", &ServeConfig::kv_type,
       "KV element type: f32, f16, q8_0, q4_0, q4_1, kivi4");
  Flag(c, p, kModel, "--kv-recent", &ServeConfig::kv_recent, kKvRecentHelp);
  Flag(c, p, kModel, "--session-kv-type", &ServeConfig::session_kv_type,
       "Keep the KV of requests with a session_id in a pool of its own of this type "
       "(e.g. q4 = q4_0: agent memory in 4 bits, in memory and at rest)");
  Flag(c, p, kModel, "--session-kv-budget", &ServeConfig::session_kv_budget,
       "The session pool's share of --kv-budget (default: half)");
  Flag(c, p, kModel, "--chat-template", &ServeConfig::chat_template,
       "plain, chatml, llama3, gemma, llama2 (default: detected from the "
       "model)");
  Flag(c, p, kModel, "--max-tokens", &ServeConfig::max_tokens,
       "Default max_tokens of a request (256)");
  c->add_flag("--no-prefix-cache", p->no_prefix_cache,
              "Turn prefix reuse off (the baseline for benchmarks)")
      ->group(kModel);
  Flag(c, p, kSched, "--max-running", &ServeConfig::max_running, "Sequences decoded together (16)");
  Flag(c, p, kSched, "--max-queue", &ServeConfig::max_queue, "Waiting requests before 429 (256)");
  Flag(c, p, kSched, "--step-tokens", &ServeConfig::step_tokens, "Tokens per batched step (256)");
  Flag(c, p, kSched, "--queue-timeout", &ServeConfig::queue_timeout_s,
       "Seconds a request may wait in the queue before it fails (0 = no limit)");
  Flag(c, p, kSched, "--session-ttl", &ServeConfig::session_ttl_s,
       "Seconds a session stays pinned (300)");
  Flag(c, p, kSched, "--max-pinned", &ServeConfig::max_pinned,
       "Share of the KV pool pins may hold: 0.5 or 50% (0.5)");
  Flag(c, p, kSched, "--max-pin-ttl", &ServeConfig::max_pin_ttl_s,
       "Longest pin or session TTL in seconds (3600)");
  Flag(c, p, kSched, "--max-sessions", &ServeConfig::max_sessions, "Sessions at most (10000)");
  Flag(c, p, kSched, "--max-pins", &ServeConfig::max_pins, "Plain pins at most (10000)");
  Flag(c, p, kSched, "--max-tenants", &ServeConfig::max_tenants,
       "Tenant namespaces remembered at most (10000)");
  Flag(c, p, kSched, "--sched", &ServeConfig::sched,
       "Queue order: fcfs, lpm (longest cached prefix first, bounded skips) or program "
       "(program-level FCFS with tool-aware pins, Continuum)");
  Flag(c, p, kSched, "--admission", &ServeConfig::admission,
       "forecast (worst case, never preempts) or past-future (likely peak; preempts if wrong)");
  Flag(c, p, kSched, "--preempt", &ServeConfig::preempt,
       "A preempted request's KV: recompute (released, re-prefilled) or swap (kept in the RAM "
       "tier, restored)");
  Flag(c, p, kSched, "--kv-policy", &ServeConfig::kv_policy,
       "KV budget policy for requests that name none: streamingllm, h2o, snapkv, pyramidkv, "
       "cake, lacache, elastic, blockwise (default: full KV)");
  Flag(c, p, kSched, "--kv-policy-budget", &ServeConfig::kv_policy_budget,
       "Its budget: below 1 (or \"20%\") a fraction of each prompt, else tokens (0.2)");
  Flag(c, p, kSched, "--kv-reuse", &ServeConfig::kv_reuse,
       "Segment reuse of a request that names none: prefix (exact prefixes only), naive, blend "
       "(CacheBlend), cachecraft or ape (default: prefix)");
  Flag(c, p, kSched, "--blend-ratio", &ServeConfig::blend_ratio,
       "Default blend_ratio in [0, 1]: blend's recomputed share, cachecraft's alpha (0.15)");
  Flag(c, p, kSched, "--segment-separator", &ServeConfig::segment_separator,
       "Cut a completions string prompt into segments after each occurrence of STR (default: "
       "none)");
  Flag(c, p, kSched, "--segment-cache-mb", &ServeConfig::segment_cache_mb,
       "Memory for cached segments' KV in MiB (256)");
  c->add_flag("--relay", p->relay,
              "Keep each finished request's output KV in the segment cache, so a prompt that "
              "quotes it as a segment reuses it (RelayCaching; TOML: relay = true)")
      ->group(kSched);
  c->add_flag("--no-segment-pipeline", p->no_segment_pipeline,
              "Read segments from the tiers whole before their prefill, instead of computing each "
              "layer while the next loads (TOML: segment_pipeline = false)")
      ->group(kSched);
  c->add_flag("--blend-controller", p->blend_controller,
              "CacheBlend's loading controller: a blend whose segments load from the tiers "
              "recomputes above blend_ratio as much as hides under the load (TOML: "
              "blend_controller = true)")
      ->group(kSched);
  Flag(c, p, kSched, "--itl-target-ms", &ServeConfig::itl_target_ms,
       "Inter-token latency objective: each step's prefill share is sized to it (0: off)");
  Flag(c, p, kStore, "--ram-budget", &ServeConfig::ram_budget,
       "RAM tier budget of the chunk store");
  Flag(c, p, kStore, "--disk-dir", &ServeConfig::disk_dir, "Directory of the disk tier");
  Flag(c, p, kStore, "--disk-budget", &ServeConfig::disk_budget, "Disk tier budget");
  Flag(c, p, kStore, "--redis", &ServeConfig::redis,
       "Redis URL (repeatable; several seeds or redis+cluster:// mean a "
       "cluster)");
  Flag(c, p, kStore, "--redis-write", &ServeConfig::redis_write,
       "When chunks reach Redis: through (every put) or back (when RAM evicts "
       "them)");
  Flag(c, p, kStore, "--redis-ttl", &ServeConfig::redis_ttl_s,
       "Seconds a chunk lives in Redis (0 = no expiry)");
  Flag(c, p, kStore, "--chunk-tokens", &ServeConfig::chunk_tokens, "Tokens per stored chunk (256)");
  Flag(c, p, kStore, "--codec", &ServeConfig::codec,
       "Chunk codec of the store (raw, int8, int4, ...)");
  Flag(c, p, kStore, "--redis-levels", &ServeConfig::redis_levels,
       "Adaptive loading: more codecs whose encodings of each chunk go to Redis too, best "
       "first (repeatable, e.g. cachegen cachegen-low); a restore picks per chunk the best that "
       "loads by --load-deadline-ms at the measured bandwidth, else recomputes");
  Flag(c, p, kStore, "--disk-levels", &ServeConfig::disk_levels,
       "Adaptive loading on disk: more codecs whose encodings of each chunk go to the disk tier "
       "too, best first (repeatable); a restore picks per chunk the best that loads by "
       "--load-deadline-ms at the measured disk bandwidth, else recomputes");
  Flag(c, p, kStore, "--policy", &ServeConfig::policy, "Eviction policy: lru, lfu, s3fifo, cost");
  Flag(c, p, kStore, "--admit-after-hits", &ServeConfig::admit_after_hits,
       "Slower tiers take a chunk once it was hit N times (0)");
  Flag(c, p, kStore, "--tenant-quota", &ServeConfig::tenant_quota,
       "RAM and disk bytes (each) one tenant may hold in the store (0 = no quota)");
  Flag(c, p, kStore, "--load-deadline-ms", &ServeConfig::load_deadline_ms,
       "How long a restore waits for a slow tier before recomputing (1000)");
}

Result<ServeConfig> ResolveServeConfig(const ServeFlags& f) {
  ServeConfig cfg;
  if (!f.config_path.empty()) CT_RETURN_IF_ERROR(server::LoadConfigFile(f.config_path, &cfg));
  for (auto& [opt, copy] : f.apply) {
    if (opt->count() > 0) copy(cfg);
  }
  if (f.no_prefix_cache) cfg.prefix_cache = false;
  if (f.relay) cfg.relay = true;
  if (f.no_segment_pipeline) cfg.segment_pipeline = false;
  if (f.blend_controller) cfg.blend_controller = true;
  if (cfg.model.empty()) cfg.model = DefaultModelPath();
  CT_RETURN_IF_ERROR(server::ValidateConfig(cfg));
  return cfg;
}

Status CheckStackConfig(const ServeConfig& cfg) {
  CT_ASSIGN_OR_RETURN(const kernels::KvType kv_type, ParseKvType(cfg.kv_type));
  if (!cfg.session_kv_type.empty()) {
    auto st = ParseKvType(cfg.session_kv_type);
    if (!st.ok()) return st.status().WithContext("--session-kv-type");
    // A namespace is the model, the KV type and the tenant: a session pool of the main pool's
    // type would share every namespace with it, and the pools' pins and events would mix.
    if (*st == kv_type) {
      return InvalidArgument("--session-kv-type " + cfg.session_kv_type + " is --kv-type's " +
                             std::string(kernels::KvTypeName(kv_type)) +
                             ": a session pool needs a KV type of its own");
    }
    // Session requests take the prefix path (sched/scheduler.h): server-wide defaults that
    // compute KV in the engine's type would refuse every one of them.
    if (!cfg.kv_policy.empty()) {
      return InvalidArgument("--kv-policy does not combine with --session-kv-type: the session "
                             "pool keeps each session's whole KV");
    }
    if (cfg.kv_reuse != "prefix" && cfg.kv_reuse != "full") {
      return InvalidArgument("--kv-reuse " + cfg.kv_reuse + " does not combine with "
                             "--session-kv-type: sessions reuse exact prefixes only");
    }
    // --kv-recent applies to each quantized pool: valid when one is.
    const bool session_quantized =
        *st != kernels::KvType::kF16 && *st != kernels::KvType::kF32;
    CT_RETURN_IF_ERROR(CheckKvRecent(session_quantized ? *st : kv_type, cfg.kv_recent));
  } else {
    CT_RETURN_IF_ERROR(CheckKvRecent(kv_type, cfg.kv_recent));
  }
  // A windowed KV type (kivi4, --kv-recent) cannot serve what rewrites single slots.
  const KvShape shape{0, 0, 0, kv_type, std::max(cfg.kv_recent, 0)};
  if (!cfg.kv_policy.empty()) CT_RETURN_IF_ERROR(CheckKvRewritable(shape, "--kv-policy"));
  if (cfg.relay) CT_RETURN_IF_ERROR(CheckKvRewritable(shape, "--relay"));
  if (cfg.kv_reuse != "prefix" && cfg.kv_reuse != "full") {
    CT_RETURN_IF_ERROR(CheckKvRewritable(shape, "--kv-reuse " + cfg.kv_reuse));
  }
  auto budget = ParseBytes(cfg.kv_budget);
  if (!budget.ok()) return budget.status().WithContext("--kv-budget");
  if (!cfg.session_kv_budget.empty()) {
    auto b = ParseBytes(cfg.session_kv_budget);
    if (!b.ok()) return b.status().WithContext("--session-kv-budget");
    if (*b >= *budget) {
      return InvalidArgument("--session-kv-budget " + cfg.session_kv_budget +
                             " must be less than --kv-budget " + cfg.kv_budget +
                             " (the session pool's share of it)");
    }
  }
  if (!cfg.chat_template.empty()) {
    CT_RETURN_IF_ERROR(server::ChatTemplate::ByName(cfg.chat_template).status());
  }
  return Status::Ok();
}

ServingStack::~ServingStack() {
  // Members go in reverse declaration order anyway; spelled out because the order matters: the
  // scheduler's loop uses the bridge, the pool and the engine until it is joined.
  scheduler.reset();
  sessions.reset();  // publishes the last session records
  tiers.reset();
  store.reset();
  session_kv.reset();
  kv.reset();
  events.reset();  // after everything that reports into it
  engine.reset();
}

nlohmann::json ServingStack::KvEventsInfo() const {
  const auto kv_type = *ParseKvType(config.kv_type);  // CheckStackConfig parsed it
  nlohmann::json j = {
      {"enabled", events != nullptr},
      {"page_tokens", kv->page_tokens()},
      {"chunk_tokens", store != nullptr ? store->chunk_tokens() : 0},
      {"pages_total", kv->GetStats().pages_total},
      {"kv_type", kernels::KvTypeName(kv_type)},
      // The shared namespace (no cache_salt): a router that computes another id for the same
      // model and KV type would never match this server's blocks.
      {"namespace", KvNamespace(*model, kv_type).ToHex()},
      // The session pool (--session-kv-type), where requests with a session_id keep their KV,
      // and its shared namespace; nulls without one.
      {"session_kv_type", nullptr},
      {"session_namespace", nullptr}};
  if (session_kv != nullptr) {
    const kernels::KvType t = session_kv->shape().type;
    j["session_kv_type"] = kernels::KvTypeName(t);
    j["session_namespace"] = KvNamespace(*model, t).ToHex();
  }
  if (events != nullptr) {
    const events::KvEventPublisherStats st = events->stats();
    j["endpoint"] = events->endpoint();
    j["replay_endpoint"] = events->replay_endpoint();
    j["topic"] = events::KvEventPublisherOptions().topic;
    j["last_seq"] = st.last_seq;
    j["batches"] = st.batches;
    j["events"] = st.events;
    j["dropped"] = st.dropped;
  }
  return j;
}

namespace {

// The tiered chunk store for `cfg` and its bridge over `kv`, or nulls when no tier is asked for.
Status OpenStore(const ServeConfig& cfg, KvManager& kv, KvEventSink* events,
                 std::unique_ptr<Cache>* store, std::unique_ptr<sched::TierBridge>* tiers) {
  // Swap preemption keeps preempted KV in the RAM tier, so it turns the store on.
  if (!cfg.prefix_cache || (cfg.ram_budget.empty() && cfg.disk_dir.empty() && cfg.redis.empty() &&
                            cfg.preempt != "swap")) {
    return Status::Ok();
  }
  // RAM defaults to 1 GiB once tiers are on. Restores run off the scheduler loop and wait at
  // most the scheduler's load deadline for slow tiers; what is late is recomputed.
  CacheOptions co;
  co.chunk_tokens = cfg.chunk_tokens;
  co.event_sink = events;
  auto ram = ParseBytes(cfg.ram_budget.empty() ? "1GiB" : cfg.ram_budget);
  if (!ram.ok()) return ram.status().WithContext("--ram-budget");
  co.ram_budget_bytes = *ram;
  co.disk_dir = cfg.disk_dir;
  if (!cfg.disk_budget.empty()) {
    auto disk = ParseBytes(cfg.disk_budget);
    if (!disk.ok()) return disk.status().WithContext("--disk-budget");
    co.disk_budget_bytes = *disk;
  }
  co.redis_urls = cfg.redis;
  co.codec = cfg.codec;
  // Each level's codec is checked here so that an unknown one is refused naming its flag.
  for (const std::string& level : cfg.redis_levels) {
    CT_RETURN_IF_ERROR(cache::MakeCodec(level).status().WithContext("--redis-levels"));
  }
  co.remote_levels = cfg.redis_levels;
  for (const std::string& level : cfg.disk_levels) {
    CT_RETURN_IF_ERROR(cache::MakeCodec(level).status().WithContext("--disk-levels"));
  }
  co.disk_levels = cfg.disk_levels;
  co.policy = cfg.policy;
  co.admit_after_hits = static_cast<uint32_t>(cfg.admit_after_hits);
  co.redis_write =
      cfg.redis_write == "back" ? RedisWriteMode::kOnEviction : RedisWriteMode::kWriteThrough;
  co.redis_ttl_seconds = static_cast<uint32_t>(cfg.redis_ttl_s);
  if (!cfg.tenant_quota.empty()) {
    auto quota = ParseBytes(cfg.tenant_quota);
    if (!quota.ok()) return quota.status().WithContext("--tenant-quota");
    co.default_quota_bytes = *quota;
  }
  auto opened = Cache::Open(co);
  if (!opened.ok()) return opened.status().WithContext("chunk store");
  CT_RETURN_IF_ERROR(sched::TierBridge::Validate(**opened, kv));
  *store = std::move(*opened);
  *tiers = std::make_unique<sched::TierBridge>(kv, **store);
  CT_LOG(kInfo) << "chunk store: RAM " << FormatBytes(co.ram_budget_bytes)
                << (co.disk_dir.empty()
                        ? std::string(", no disk")
                        : ", disk " + co.disk_dir + " (" + FormatBytes(co.disk_budget_bytes) + ")")
                << (co.redis_urls.empty()
                        ? ", no Redis"
                        : ", Redis " + std::to_string(co.redis_urls.size()) + " URL(s)")
                << ", chunks of " << co.chunk_tokens << " tokens, codec " << co.codec << ", policy "
                << co.policy << ", Redis write-" << cfg.redis_write;
  return Status::Ok();
}

sched::SchedulerOptions SchedulerOptionsFor(const ServeConfig& cfg) {
  sched::SchedulerOptions sopt;
  sopt.max_running = cfg.max_running;
  sopt.max_queue = cfg.max_queue;
  sopt.step_tokens = cfg.step_tokens;
  sopt.prefix_cache = cfg.prefix_cache;
  sopt.session_ttl_ms = int64_t{cfg.session_ttl_s} * 1000;
  sopt.load_deadline_ms = cfg.load_deadline_ms;
  sopt.queue_timeout_ms = int64_t{cfg.queue_timeout_s} * 1000;
  sopt.max_pinned_fraction = *server::ParseFraction(cfg.max_pinned);  // ValidateConfig checked
  sopt.max_pin_ttl_ms = int64_t{cfg.max_pin_ttl_s} * 1000;
  sopt.max_sessions = static_cast<size_t>(cfg.max_sessions);
  sopt.max_pins = static_cast<size_t>(cfg.max_pins);
  sopt.max_tenants = static_cast<size_t>(cfg.max_tenants);
  sopt.order = cfg.sched == "lpm"       ? sched::QueueOrder::kLpm
               : cfg.sched == "program" ? sched::QueueOrder::kProgram
                                        : sched::QueueOrder::kFcfs;
  sopt.preempt = cfg.preempt == "swap" ? sched::PreemptMode::kSwap : sched::PreemptMode::kRecompute;
  sopt.itl_target_ms = cfg.itl_target_ms;
  sopt.segment_cache_bytes = static_cast<size_t>(cfg.segment_cache_mb) << 20;
  sopt.relay = cfg.relay;
  sopt.pipeline_segment_loads = cfg.segment_pipeline;
  sopt.blend_load_controller = cfg.blend_controller;
  sopt.admission = cfg.admission == "past-future" ? sched::AdmissionPolicy::kPastFuture
                                                  : sched::AdmissionPolicy::kForecast;
  return sopt;
}

}  // namespace

Result<std::unique_ptr<ServingStack>> BuildServingStack(const ServeConfig& cfg) {
  CT_RETURN_IF_ERROR(CheckStackConfig(cfg));
  auto st = std::make_unique<ServingStack>();
  st->config = cfg;

  // 1. The model.
  std::error_code ec;
  const auto file_bytes = std::filesystem::file_size(cfg.model, ec);
  CT_LOG(kInfo) << "loading model " << cfg.model << " ("
                << (ec ? std::string("size unknown") : FormatBytes(file_bytes)) << ")";
  Stopwatch sw;
  CT_ASSIGN_OR_RETURN(const gguf::Residence residence, WeightResidence(cfg.model));
  CT_ASSIGN_OR_RETURN(st->model, Model::Load(cfg.model, residence));
  const ModelConfig& mc = st->model->config();
  CT_LOG(kInfo) << "loaded " << mc.arch_name << ": " << mc.n_layer << " layers, d_model "
                << mc.d_model << ", vocab " << mc.n_vocab << ", context " << mc.n_ctx_train << ", "
                << mc.n_params << " parameters in " << sw.Millis() << " ms (weights: "
                << ResidenceName(residence) << ")";

  // 2. The chat template.
  const bool forced = !cfg.chat_template.empty();
  if (forced) {
    CT_ASSIGN_OR_RETURN(auto t, server::ChatTemplate::ByName(cfg.chat_template));
    st->chat_template = std::make_unique<server::ChatTemplate>(std::move(t));
  } else {
    auto jinja = st->model->file().GetString("tokenizer.chat_template");
    CT_ASSIGN_OR_RETURN(auto t,
                        server::ChatTemplate::Detect(jinja.ok() ? *jinja : std::string_view()));
    st->chat_template = std::make_unique<server::ChatTemplate>(std::move(t));
  }
  CT_LOG(kInfo) << "chat template: " << st->chat_template->name()
                << (st->chat_template->name() == "plain" && !forced ? " (the model has none)" : "");

  // 3-4. Engine and KV pool.
  EngineOptions eo;
  eo.threads = cfg.threads;
  eo.kv_type = *ParseKvType(cfg.kv_type);  // CheckStackConfig parsed both
  eo.kv_recent = cfg.kv_recent;
  CT_RETURN_IF_ERROR(CheckKvTypeFits(eo.kv_type, *st->model).WithContext("--kv-type"));
  st->engine = std::make_unique<Engine>(*st->model, eo);
  if (!cfg.kv_events.empty()) {
    events::KvEventPublisherOptions po;
    po.endpoint = cfg.kv_events;
    CT_ASSIGN_OR_RETURN(po.replay_endpoint,
                        server::ReplayEndpointFor(cfg.kv_events, cfg.kv_events_replay));
    CT_ASSIGN_OR_RETURN(st->events, events::KvEventPublisher::Start(po));
    CT_LOG(kInfo) << "KV events on " << st->events->endpoint() << ", replay and snapshots on "
                  << st->events->replay_endpoint();
  }
  KvManagerOptions ko;
  ko.shape = st->engine->kv_shape();
  ko.events = st->events.get();
  ko.budget_bytes = *ParseBytes(cfg.kv_budget);
  // The session pool (--session-kv-type): its share of the budget, and the same page size.
  std::optional<KvManagerOptions> so;
  if (!cfg.session_kv_type.empty()) {
    const kernels::KvType t = *ParseKvType(cfg.session_kv_type);
    CT_RETURN_IF_ERROR(CheckKvTypeFits(t, *st->model).WithContext("--session-kv-type"));
    so = ko;
    so->shape = st->engine->kv_shape(t);
    // Its pages are published too (--kv-events): a router scores a session's request in the
    // session pool's namespace, which KvEventsInfo advertises.
    so->budget_bytes = cfg.session_kv_budget.empty() ? ko.budget_bytes / 2
                                                     : *ParseBytes(cfg.session_kv_budget);
    ko.budget_bytes -= so->budget_bytes;  // CheckStackConfig: less than the whole
  }
  // kivi4 pages hold whole key groups (both pools: they share the page size).
  const bool kivi = eo.kv_type == kernels::KvType::kKivi4 ||
                    (so && so->shape.type == kernels::KvType::kKivi4);
  if (kivi) ko.page_tokens = kernels::kKiviGroup;
  if (Status s = KvManager::Validate(ko); !s.ok()) return s.WithContext("--kv-budget");
  st->kv = std::make_unique<KvManager>(ko);
  const KvManager::Stats ks = st->kv->GetStats();
  CT_LOG(kInfo) << "KV pool: " << ks.pages_total << " pages of " << ko.page_tokens << " tokens ("
                << FormatBytes(ks.bytes_reserved) << ", " << kernels::KvTypeName(eo.kv_type)
                << "), prefix cache " << (cfg.prefix_cache ? "on" : "off")
                << "; fingerprinting weights";
  if (so) {
    so->page_tokens = ko.page_tokens;
    if (Status s = KvManager::Validate(*so); !s.ok()) return s.WithContext("--session-kv-budget");
    st->session_kv = std::make_unique<KvManager>(*so);
    const KvManager::Stats ss = st->session_kv->GetStats();
    CT_LOG(kInfo) << "session KV pool: " << ss.pages_total << " pages ("
                  << FormatBytes(ss.bytes_reserved) << ", " << kernels::KvTypeName(so->shape.type)
                  << (so->shape.windowed()
                          ? ", the newest " + std::to_string(so->shape.recent) + " tokens in f16"
                          : std::string())
                  << ") for requests with a session_id";
  }

  // 5. The tiered chunk store behind the radix index, when any tier is configured.
  CT_RETURN_IF_ERROR(OpenStore(cfg, *st->kv, st->events.get(), &st->store, &st->tiers));

  // 6. The scheduler.
  st->scheduler = std::make_unique<sched::Scheduler>(*st->engine, *st->kv, SchedulerOptionsFor(cfg),
                                                     st->tiers.get(), st->session_kv.get());

  // 7. Sessions of earlier runs, kept beside the disk tier: registered again before serving.
  if (!cfg.disk_dir.empty() && cfg.prefix_cache) {
    CT_ASSIGN_OR_RETURN(st->sessions, cache::SessionJournal::Open({cfg.disk_dir}));
    auto scan = st->sessions->Scan();
    if (!scan.ok()) return scan.status().WithContext("session journal");
    for (const std::string& p : scan->problems) {
      CT_LOG(kWarning) << "session journal: removed a bad record: " << p;
    }
    const sched::PinRegistry::RestoreReport r =
        st->scheduler->pins().AttachJournal(st->sessions.get(), scan->records, UnixMillis());
    CT_LOG(kInfo) << "sessions: " << r.sessions << " restored (" << r.tokens << " tokens) from "
                  << st->sessions->dir() << ", " << r.expired << " expired"
                  << (r.dropped > 0 ? ", " + std::to_string(r.dropped) + " past --max-sessions"
                                    : std::string());
  }

  server::ApiContext& api = st->api;
  api.model_id =
      cfg.model_alias.empty() ? std::filesystem::path(cfg.model).stem().string() : cfg.model_alias;
  api.tokenizer = &st->model->tokenizer();
  api.chat_template = st->chat_template.get();
  api.n_vocab = mc.n_vocab;
  api.n_ctx = mc.n_ctx_train;
  api.default_max_tokens = cfg.max_tokens;
  api.max_token_bytes = server::MaxTokenBytes(st->model->tokenizer());
  api.max_messages = cfg.max_messages;
  if (!cfg.kv_policy.empty()) api.default_kv_policy = *server::ServeKvPolicy(cfg);
  api.default_reuse.mode = *ParseReuseMode(cfg.kv_reuse);         // ValidateConfig checked
  api.default_reuse.ratio = *server::ParseFraction(cfg.blend_ratio);
  api.segment_separator = cfg.segment_separator;
  return st;
}

}  // namespace cachette::cli
