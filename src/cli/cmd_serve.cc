// `cachette serve`: the OpenAI-compatible server (src/server) over the scheduler (src/sched).
//
// Start-up, in order: bind the port (so /health answers 503 "loading" at once), load the model,
// build the engine, the KV pool and the scheduler, then serve. SIGTERM or SIGINT drains: new
// requests get 503, running ones finish (up to drain_timeout_s), then the process exits 0.
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <pthread.h>

#include "cli/cli.h"
#include "core/log.h"
#include "core/timer.h"
#include "core/units.h"
#include "kv/kv_manager.h"
#include "sched/scheduler.h"
#include "sched/tiered_source.h"
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
void Flag(CLI::App* c, ServeFlags* f, const char* name, T ServeConfig::*field, const char* help) {
  CLI::Option* o = c->add_option(name, f->values.*field, help);
  f->apply.push_back({o, [f, field](ServeConfig& cfg) { cfg.*field = f->values.*field; }});
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
  so.http_threads = cfg.http_threads > 0 ? cfg.http_threads
                                         : std::min(256, cfg.max_running + 32);
  server::HttpServer http(so);
  if (Status s = http.Start(); !s.ok()) return Fail(s);
  CT_LOG(kInfo) << "listening on http://" << cfg.host << ":" << http.port()
                << " (loading the model)";

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
  // The tiered chunk store behind the radix index, when any tier is configured: RAM (default
  // 1 GiB once tiers are on), disk, Redis. Restores wait at most kTierLoadBudget for slow tiers;
  // what is late is recomputed.
  constexpr std::chrono::milliseconds kTierLoadBudget{1000};
  std::unique_ptr<Cache> store;
  std::unique_ptr<sched::TieredSource> tiers;
  if (cfg.prefix_cache &&
      (!cfg.ram_budget.empty() || !cfg.disk_dir.empty() || !cfg.redis.empty())) {
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
    auto opened = Cache::Open(co);
    if (!opened.ok()) return Fail(opened.status().WithContext("chunk store"));
    store = std::move(*opened);
    if (Status v = TieredPrefix::Validate(*store, kv); !v.ok()) return Fail(v);
    tiers = std::make_unique<sched::TieredSource>(model, kv, *store, kTierLoadBudget);
    CT_LOG(kInfo) << "chunk store: RAM " << FormatBytes(co.ram_budget_bytes)
                  << (co.disk_dir.empty() ? std::string(", no disk")
                                          : ", disk " + co.disk_dir + " (" +
                                                FormatBytes(co.disk_budget_bytes) + ")")
                  << (co.redis_urls.empty() ? ", no Redis"
                                            : ", Redis " + std::to_string(co.redis_urls.size()) +
                                                  " URL(s)")
                  << ", chunks of " << co.chunk_tokens << " tokens, codec " << co.codec;
  }
  sched::SchedulerOptions sopt;
  sopt.max_running = cfg.max_running;
  sopt.max_queue = cfg.max_queue;
  sopt.step_tokens = cfg.step_tokens;
  sopt.prefix_cache = cfg.prefix_cache;
  sopt.session_ttl_ms = int64_t{cfg.session_ttl_s} * 1000;
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
    if (!flushed.ok()) CT_LOG(kWarning) << "flushing the chunk store: " << flushed.ToString();
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
  Flag(c, p, "--host", &ServeConfig::host, "Address to listen on (default 127.0.0.1)");
  Flag(c, p, "--port", &ServeConfig::port, "Port (default 8080; 0 = any free port)");
  Flag(c, p, "-m,--model", &ServeConfig::model, "GGUF model (default: the bundled one)");
  Flag(c, p, "--model-alias", &ServeConfig::model_alias, "Model id in the API (default: file)");
  Flag(c, p, "--threads", &ServeConfig::threads, "Compute threads (0 = one per core)");
  Flag(c, p, "--kv-budget", &ServeConfig::kv_budget, "Memory for in-memory KV pages (512MiB)");
  Flag(c, p, "--kv-type", &ServeConfig::kv_type, "KV element type: f32, f16, q8_0");
  Flag(c, p, "--ram-budget", &ServeConfig::ram_budget, "RAM tier budget of the chunk store");
  Flag(c, p, "--disk-dir", &ServeConfig::disk_dir, "Directory of the disk tier");
  Flag(c, p, "--disk-budget", &ServeConfig::disk_budget, "Disk tier budget");
  Flag(c, p, "--redis", &ServeConfig::redis,
       "Redis URL (repeatable; several seeds or redis+cluster:// mean a cluster)");
  Flag(c, p, "--chunk-tokens", &ServeConfig::chunk_tokens, "Tokens per stored chunk (256)");
  Flag(c, p, "--codec", &ServeConfig::codec, "Chunk codec of the store (raw, int8, int4, ...)");
  Flag(c, p, "--max-running", &ServeConfig::max_running, "Sequences decoded together (16)");
  Flag(c, p, "--max-queue", &ServeConfig::max_queue, "Waiting requests before 429 (256)");
  Flag(c, p, "--step-tokens", &ServeConfig::step_tokens, "Tokens per batched step (256)");
  Flag(c, p, "--max-tokens", &ServeConfig::max_tokens, "Default max_tokens of a request (256)");
  Flag(c, p, "--chat-template", &ServeConfig::chat_template,
       "plain, chatml, llama3, gemma, llama2 (default: detected from the model)");
  Flag(c, p, "--session-ttl", &ServeConfig::session_ttl_s, "Seconds a session stays pinned (300)");
  Flag(c, p, "--drain-timeout", &ServeConfig::drain_timeout_s, "Seconds to drain on SIGTERM (30)");
  Flag(c, p, "--http-threads", &ServeConfig::http_threads, "HTTP worker threads (0 = auto)");
  c->add_flag("--no-prefix-cache", p->no_prefix_cache,
              "Turn prefix reuse off (the baseline for benchmarks)");
  c->add_option("--config", p->config_path, "TOML file with the same settings (flags win)")
      ->check(CLI::ExistingFile);
  return [f] { return Serve(*f); };
}

}  // namespace cachette::cli
