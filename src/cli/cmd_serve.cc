// `cachette serve`: the OpenAI-compatible server (src/server) over the scheduler (src/sched).
//
// Start-up, in order: bind the port (so /health answers 503 "loading" at once), load the model,
// build the engine, the KV pool and the scheduler, then serve. SIGTERM or SIGINT drains: new
// requests get 503, running ones finish (up to drain_timeout_s), then the process exits 0.
#include <pthread.h>

#include <csignal>
#include <cstdio>
#include <filesystem>
#include <functional>

#include "cli/cli.h"
#include "core/log.h"
#include "core/timer.h"
#include "core/units.h"
#include "kv/kv_manager.h"
#include "sched/scheduler.h"
#include "sched/tier_bridge.h"
#include "server/chat_template.h"
#include "server/config.h"
#include "server/server.h"

namespace cachette::cli {
namespace {

using server::ServeConfig;

struct ServeFlags {
  ServeConfig values;
  std::string config_path;
  bool no_prefix_cache = false;
  // Copies the flags given on the command line over the configuration (flags win).
  std::vector<std::pair<CLI::Option*, std::function<void(ServeConfig&)>>> apply;
};

template <typename T>
CLI::Option *Flag(CLI::App *c, ServeFlags *f, const char *group, const char *name,
                  T ServeConfig::*field, const char *help) {
  CLI::Option *o = c->add_option(name, f->values.*field, help)->group(group);
  f->apply.push_back({o, [f, field](ServeConfig& cfg) { cfg.*field = f->values.*field; }});
  return o;
}

int Serve(ServeFlags& f) {
  // Signals are taken by sigwait() below; every thread started from here inherits the mask.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  std::signal(SIGPIPE, SIG_IGN);  // a client that leaves must not kill the server

  ServeConfig cfg;
  if (!f.config_path.empty()) {
    Status s = server::LoadConfigFile(f.config_path, &cfg);
    if (!s.ok()) return Fail(s);
  }
  for (auto& [opt, copy] : f.apply) {
    if (opt->count() > 0) copy(cfg);
  }
  if (f.no_prefix_cache) cfg.prefix_cache = false;
  if (cfg.model.empty()) cfg.model = DefaultModelPath();
  if (Status s = server::ValidateConfig(cfg); !s.ok()) return Fail(s);
  server::AccessPolicy access;
  access.api_keys = cfg.api_keys;
  access.admin_key = cfg.admin_key;
  if (!cfg.api_key_file.empty()) {
    if (Status s = server::LoadApiKeyFile(cfg.api_key_file, &access.api_keys); !s.ok()) {
      return Fail(s);
    }
  }
  const double max_pinned = *server::ParseFraction(cfg.max_pinned);  // validated above
  const uint64_t max_body = *ParseBytes(cfg.max_body);               // validated above
  auto kv_type = ParseKvType(cfg.kv_type);
  if (!kv_type.ok()) return Fail(kv_type.status());
  auto kv_budget = ParseBytes(cfg.kv_budget);
  if (!kv_budget.ok()) return Fail(kv_budget.status().WithContext("--kv-budget"));
  std::unique_ptr<server::ChatTemplate> forced;
  if (!cfg.chat_template.empty()) {
    auto t = server::ChatTemplate::ByName(cfg.chat_template);
    if (!t.ok()) return Fail(t.status());
    forced = std::make_unique<server::ChatTemplate>(*t);
  }

  // 1. Listen first: /health says "loading" while the model loads.
  server::ServerOptions so;
  so.host = cfg.host;
  so.port = cfg.port;
  // One thread per open connection: every running or queued request, plus a reserve for /health,
  // /metrics, the admin API and idle keep-alive connections.
  so.max_connections = cfg.http_threads > 0
                           ? cfg.http_threads
                           : static_cast<int>(std::min<int64_t>(
                                 8192, int64_t{cfg.max_running} + cfg.max_queue + 256));
  so.max_generations = cfg.max_running + cfg.max_queue;
  so.max_body_bytes = max_body;
  so.access = access;
  server::HttpServer http(so);
  if (Status s = http.Start(); !s.ok()) return Fail(s);
  CT_LOG(kInfo) << "listening on http://" << cfg.host << ":" << http.port()
                << " (loading the model); " << so.max_connections << " connections at most, "
                << (access.api_keys.empty()
                        ? "no API key"
                        : std::to_string(access.api_keys.size()) + " API key(s)")
                << ", admin API " << (access.admin_key.empty() ? "loopback only" : "by admin key");

  // 2. The model.
  std::error_code ec;
  const auto file_bytes = std::filesystem::file_size(cfg.model, ec);
  CT_LOG(kInfo) << "loading model " << cfg.model << " ("
                << (ec ? std::string("size unknown") : FormatBytes(file_bytes)) << ")";
  Stopwatch sw;
  auto model_or = Model::Load(cfg.model);
  if (!model_or.ok()) return Fail(model_or.status());
  const Model& model = **model_or;
  const ModelConfig& mc = model.config();
  CT_LOG(kInfo) << "loaded " << mc.arch_name << ": " << mc.n_layer << " layers, d_model "
                << mc.d_model << ", vocab " << mc.n_vocab << ", context " << mc.n_ctx_train
                << ", " << mc.n_params << " parameters in " << sw.Millis() << " ms";
  server::ChatTemplate tmpl = *server::ChatTemplate::ByName("plain");
  if (forced) {
    tmpl = *forced;
  } else {
    auto jinja = model.file().GetString("tokenizer.chat_template");
    auto t = server::ChatTemplate::Detect(jinja.ok() ? *jinja : std::string_view());
    if (!t.ok()) return Fail(t.status());
    tmpl = *t;
  }
  CT_LOG(kInfo) << "chat template: " << tmpl.name()
                << (tmpl.name() == "plain" && !forced ? " (the model has none)" : "");

  // 3. Engine, KV pool, scheduler.
  EngineOptions eo;
  eo.threads = cfg.threads;
  eo.kv_type = *kv_type;
  Engine engine(model, eo);
  KvManagerOptions ko;
  ko.shape = engine.kv_shape();
  ko.budget_bytes = *kv_budget;
  if (Status s = KvManager::Validate(ko); !s.ok()) return Fail(s.WithContext("--kv-budget"));
  KvManager kv(ko);
  const KvManager::Stats ks = kv.GetStats();
  CT_LOG(kInfo) << "KV pool: " << ks.pages_total << " pages of " << ko.page_tokens
                << " tokens (" << FormatBytes(ks.bytes_reserved) << ", "
                << kernels::KvTypeName(*kv_type) << "), prefix cache "
                << (cfg.prefix_cache ? "on" : "off") << "; fingerprinting weights";
  // The tiered chunk store behind the radix index, when any tier is configured: RAM (default 1 GiB
  // once tiers are on), disk, Redis. Restores run off the scheduler loop and wait at most the
  // scheduler's load deadline for slow tiers; what is late is recomputed.
  std::unique_ptr<Cache> store;
  std::unique_ptr<sched::TierBridge> tiers;
  // Swap preemption keeps preempted KV in the RAM tier, so it turns the store on.
  if (cfg.prefix_cache && (!cfg.ram_budget.empty() || !cfg.disk_dir.empty() ||
                           !cfg.redis.empty() || cfg.preempt == "swap")) {
    CacheOptions co;
    co.chunk_tokens = cfg.chunk_tokens;
    auto ram = ParseBytes(cfg.ram_budget.empty() ? "1GiB" : cfg.ram_budget);
    if (!ram.ok()) return Fail(ram.status().WithContext("--ram-budget"));
    co.ram_budget_bytes = *ram;
    co.disk_dir = cfg.disk_dir;
    if (!cfg.disk_budget.empty()) {
      auto disk = ParseBytes(cfg.disk_budget);
      if (!disk.ok()) return Fail(disk.status().WithContext("--disk-budget"));
      co.disk_budget_bytes = *disk;
    }
    co.redis_urls = cfg.redis;
    co.codec = cfg.codec;
    co.policy = cfg.policy;
    co.admit_after_hits = static_cast<uint32_t>(cfg.admit_after_hits);
    co.redis_write =
        cfg.redis_write == "back" ? RedisWriteMode::kOnEviction : RedisWriteMode::kWriteThrough;
    co.redis_ttl_seconds = static_cast<uint32_t>(cfg.redis_ttl_s);
    if (!cfg.tenant_quota.empty()) {
      auto quota = ParseBytes(cfg.tenant_quota);
      if (!quota.ok()) return Fail(quota.status().WithContext("--tenant-quota"));
      co.default_quota_bytes = *quota;
    }
    auto opened = Cache::Open(co);
    if (!opened.ok()) return Fail(opened.status().WithContext("chunk store"));
    store = std::move(*opened);
    if (Status v = sched::TierBridge::Validate(*store, kv); !v.ok()) return Fail(v);
    tiers = std::make_unique<sched::TierBridge>(kv, *store);
    CT_LOG(kInfo) << "chunk store: RAM " << FormatBytes(co.ram_budget_bytes)
                  << (co.disk_dir.empty() ? std::string(", no disk")
                                          : ", disk " + co.disk_dir + " (" +
                                                FormatBytes(co.disk_budget_bytes) + ")")
                  << (co.redis_urls.empty()
                          ? ", no Redis"
                          : ", Redis " + std::to_string(co.redis_urls.size()) + " URL(s)")
                  << ", chunks of " << co.chunk_tokens << " tokens, codec " << co.codec
                  << ", policy " << co.policy << ", Redis write-" << cfg.redis_write;
  }
  sched::SchedulerOptions sopt;
  sopt.max_running = cfg.max_running;
  sopt.max_queue = cfg.max_queue;
  sopt.step_tokens = cfg.step_tokens;
  sopt.prefix_cache = cfg.prefix_cache;
  sopt.session_ttl_ms = int64_t{cfg.session_ttl_s} * 1000;
  sopt.load_deadline_ms = cfg.load_deadline_ms;
  sopt.queue_timeout_ms = int64_t{cfg.queue_timeout_s} * 1000;
  sopt.max_pinned_fraction = max_pinned;
  sopt.max_pin_ttl_ms = int64_t{cfg.max_pin_ttl_s} * 1000;
  sopt.max_sessions = static_cast<size_t>(cfg.max_sessions);
  sopt.max_pins = static_cast<size_t>(cfg.max_pins);
  sopt.max_tenants = static_cast<size_t>(cfg.max_tenants);
  sopt.order = cfg.sched == "lpm"       ? sched::QueueOrder::kLpm
               : cfg.sched == "program" ? sched::QueueOrder::kProgram
                                        : sched::QueueOrder::kFcfs;
  sopt.preempt = cfg.preempt == "swap" ? sched::PreemptMode::kSwap : sched::PreemptMode::kRecompute;
  sopt.itl_target_ms = cfg.itl_target_ms;
  sopt.admission = cfg.admission == "past-future" ? sched::AdmissionPolicy::kPastFuture
                                                  : sched::AdmissionPolicy::kForecast;
  sched::Scheduler scheduler(engine, kv, sopt, tiers.get());

  server::HttpServer::Backend b;
  b.model = &model;
  b.scheduler = &scheduler;
  b.api.model_id = cfg.model_alias.empty()
                       ? std::filesystem::path(cfg.model).stem().string()
                       : cfg.model_alias;
  b.api.tokenizer = &model.tokenizer();
  b.api.chat_template = &tmpl;
  b.api.n_vocab = mc.n_vocab;
  b.api.n_ctx = mc.n_ctx_train;
  b.api.default_max_tokens = cfg.max_tokens;
  b.api.max_token_bytes = server::MaxTokenBytes(model.tokenizer());
  b.api.max_messages = cfg.max_messages;
  http.SetReady(b);
  CT_LOG(kInfo) << "ready: model '" << b.api.model_id << "' on http://" << cfg.host << ":"
                << http.port() << " (" << sw.Millis() << " ms after start of loading)";

  // 4. Serve until SIGTERM/SIGINT, then drain.
  int sig = 0;
  sigwait(&sigs, &sig);
  CT_LOG(kInfo) << "signal " << sig << ": draining (up to " << cfg.drain_timeout_s << " s)";
  http.BeginDrain();
  const int64_t drain_ms = int64_t{cfg.drain_timeout_s} * 1000;
  Stopwatch drain;
  scheduler.Drain(drain_ms);
  // The scheduler is idle; let the HTTP threads finish writing what it produced.
  http.WaitIdle(std::max<int64_t>(1000, drain_ms - static_cast<int64_t>(drain.Millis())));
  http.Stop();
  if (store != nullptr) {
    Status flushed = store->Flush();  // write-behind chunks reach the disk tier before exit
    if (!flushed.ok()) {
      CT_LOG(kWarning) << "flushing the chunk store: " << flushed.ToString();
    }
  }
  const sched::SchedulerStats st = scheduler.Stats();
  CT_LOG(kInfo) << "stopped: " << st.finished << " requests served, " << st.cancelled
                << " cancelled, " << st.rejected << " rejected";
  return 0;
}

}  // namespace

Runner AddServeCommand(CLI::App& app) {
  auto f = std::make_shared<ServeFlags>();
  ServeFlags* p = f.get();
  CLI::App* c = app.add_subcommand("serve", "Serve the OpenAI API with cachette's KV cache");
  constexpr const char *kNet = "Network and limits";
  constexpr const char *kModel = "Model and engine";
  constexpr const char *kSched = "Scheduler";
  constexpr const char *kStore = "Cache store";
  constexpr const char *kAuth = "Access control";
  Flag(c, p, kNet, "--host", &ServeConfig::host, "Address to listen on (default 127.0.0.1)");
  Flag(c, p, kNet, "--port", &ServeConfig::port, "Port (default 8080; 0 = any free port)");
  Flag(c, p, kNet, "--http-threads", &ServeConfig::http_threads,
       "Open connections at most, one thread each (0 = max-running + max-queue "
       "+ 256)");
  Flag(c, p, kNet, "--max-body", &ServeConfig::max_body, "Largest request body (16MiB)");
  Flag(c, p, kNet, "--max-messages", &ServeConfig::max_messages,
       "Most chat messages in one request (1024)");
  Flag(c, p, kNet, "--drain-timeout", &ServeConfig::drain_timeout_s,
       "Seconds to drain on SIGTERM (30)");
  c->add_option("--config", p->config_path, "TOML file with the same settings (flags win)")
      ->check(CLI::ExistingFile)
      ->group(kNet);
  Flag(c, p, kModel, "-m,--model", &ServeConfig::model, "GGUF model (default: the bundled one)");
  Flag(c, p, kModel, "--model-alias", &ServeConfig::model_alias,
       "Model id in the API (default: file)");
  Flag(c, p, kModel, "--threads", &ServeConfig::threads, "Compute threads (0 = one per core)");
  Flag(c, p, kModel, "--kv-budget", &ServeConfig::kv_budget,
       "Memory for in-memory KV pages (512MiB)");
  Flag(c, p, kModel, "--kv-type", &ServeConfig::kv_type, "KV element type: f32, f16, q8_0");
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
  Flag(c, p, kStore, "--policy", &ServeConfig::policy, "Eviction policy: lru, lfu, s3fifo, cost");
  Flag(c, p, kStore, "--admit-after-hits", &ServeConfig::admit_after_hits,
       "Slower tiers take a chunk once it was hit N times (0)");
  Flag(c, p, kStore, "--tenant-quota", &ServeConfig::tenant_quota,
       "RAM and disk bytes (each) one tenant may hold in the store (0 = no quota)");
  Flag(c, p, kStore, "--load-deadline-ms", &ServeConfig::load_deadline_ms,
       "How long a restore waits for a slow tier before recomputing (1000)");
  Flag(c, p, kAuth, "--api-key", &ServeConfig::api_keys,
       "Key the generation endpoints and /v1/models require as 'Authorization: "
       "Bearer' "
       "(repeatable)");
  Flag(c, p, kAuth, "--api-key-file", &ServeConfig::api_key_file, "File of API keys, one a line");
  Flag(c, p, kAuth, "--admin-key", &ServeConfig::admin_key,
       "Key /v1/cache/* requires (without one: loopback clients only)");
  return [f] { return Serve(*f); };
}

}  // namespace cachette::cli
