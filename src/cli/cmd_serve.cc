// `cachette serve`: the OpenAI-compatible server (src/server) over the scheduler (src/sched).
//
// Start-up, in order: bind the port (so /health answers 503 "loading" at once), then build the
// serving stack (serving_stack.h: model, chat template, engine, KV pool, chunk store,
// scheduler), then serve. SIGTERM or SIGINT drains: new requests get 503, running ones finish
// (up to drain_timeout_s), then the process exits 0.
#include <pthread.h>

#include <algorithm>
#include <csignal>
#include <memory>

#include "cli/cli.h"
#include "cli/serving_stack.h"
#include "core/log.h"
#include "core/timer.h"
#include "core/units.h"
#include "server/config.h"
#include "server/server.h"

namespace cachette::cli {
namespace {

int Serve(ServeFlags& f) {
  // Signals are taken by sigwait() below; every thread started from here inherits the mask.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  std::signal(SIGPIPE, SIG_IGN);  // a client that leaves must not kill the server

  auto cfg_or = ResolveServeConfig(f);
  if (!cfg_or.ok()) return Fail(cfg_or.status());
  const server::ServeConfig& cfg = *cfg_or;
  server::AccessPolicy access;
  access.api_keys = cfg.api_keys;
  access.admin_key = cfg.admin_key;
  if (!cfg.api_key_file.empty()) {
    if (Status s = server::LoadApiKeyFile(cfg.api_key_file, &access.api_keys); !s.ok()) {
      return Fail(s);
    }
  }
  const uint64_t max_body = *ParseBytes(cfg.max_body);  // validated above
  if (Status s = CheckStackConfig(cfg); !s.ok()) return Fail(s);

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

  // 2-3. Model, chat template, engine, KV pool, chunk store, scheduler (serving_stack.h).
  Stopwatch sw;
  auto stack_or = BuildServingStack(cfg);
  if (!stack_or.ok()) return Fail(stack_or.status());
  std::unique_ptr<ServingStack> stack = std::move(*stack_or);

  server::HttpServer::Backend b;
  b.model = stack->model.get();
  b.scheduler = stack->scheduler.get();
  b.api = stack->api;
  b.kv_events_info = [st = stack.get()] { return st->KvEventsInfo(); };
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
  stack->scheduler->Drain(drain_ms);
  // The scheduler is idle; let the HTTP threads finish writing what it produced.
  http.WaitIdle(std::max<int64_t>(1000, drain_ms - static_cast<int64_t>(drain.Millis())));
  http.Stop();
  if (stack->store != nullptr) {
    Status flushed = stack->store->Flush();  // write-behind chunks reach the disk tier before exit
    if (!flushed.ok()) {
      CT_LOG(kWarning) << "flushing the chunk store: " << flushed.ToString();
    }
  }
  const sched::SchedulerStats st = stack->scheduler->Stats();
  CT_LOG(kInfo) << "stopped: " << st.finished << " requests served, " << st.cancelled
                << " cancelled, " << st.rejected << " rejected";
  return 0;
}

}  // namespace

Runner AddServeCommand(CLI::App& app) {
  using server::ServeConfig;
  auto f = std::make_shared<ServeFlags>();
  ServeFlags* p = f.get();
  CLI::App* c = app.add_subcommand("serve", "Serve the OpenAI API with cachette's KV cache");
  constexpr const char *kNet = "Network and limits";
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
  Flag(c, p, kNet, "--kv-events", &ServeConfig::kv_events,
       "Publish KV block events (ZeroMQ PUB, vLLM layout) on tcp://HOST:PORT, for "
       "`cachette route` and other KV-aware routers");
  Flag(c, p, kNet, "--kv-events-replay", &ServeConfig::kv_events_replay,
       "Replay and snapshot endpoint of the KV events (default: --kv-events' port + 1)");
  c->add_option("--config", p->config_path, "TOML file with the same settings (flags win)")
      ->check(CLI::ExistingFile)
      ->group(kNet);
  AddStackFlags(c, p);  // model and engine, scheduler, cache store
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
