// `cachette route`: the KV-aware router in front of several `cachette serve` backends
// (src/route/router.h). SIGHUP re-reads --backends-file; SIGTERM or SIGINT stops.
#include <pthread.h>

#include <csignal>
#include <filesystem>
#include <sstream>

#include "cli/cli.h"
#include "core/log.h"
#include "route/router.h"
#include "server/chat_template.h"
#include "server/openai.h"

namespace cachette::cli {
namespace {

struct RouteFlags {
  route::RouterOptions options;
  std::string policy = "kv";
  std::string model;
  std::string model_alias;
  std::string chat_template;
  std::string kv_type = "f16";
  std::string tier_weights = "1,0.7,0.4,0.25";
};

Status ParseWeights(const std::string& text, route::TierWeights* w) {
  std::vector<double> v;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    char* end = nullptr;
    const double x = std::strtod(item.c_str(), &end);
    if (item.empty() || end != item.c_str() + item.size() || !(x >= 0) || x > 1e6) {
      return InvalidArgument("--tier-weights '" + text +
                             "' must be four numbers >= 0: memory,ram,disk,redis");
    }
    v.push_back(x);
  }
  if (v.size() != 4) {
    return InvalidArgument("--tier-weights '" + text + "' must be four numbers: memory,ram,disk,redis");
  }
  *w = {v[0], v[1], v[2], v[3]};
  return Status::Ok();
}

int Route(RouteFlags& f) {
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  std::signal(SIGPIPE, SIG_IGN);

  route::RouterOptions& o = f.options;
  auto policy = route::ParsePolicy(f.policy);
  if (!policy.ok()) return Fail(policy.status());
  o.policy = *policy;
  if (Status s = ParseWeights(f.tier_weights, &o.weights); !s.ok()) return Fail(s);
  auto kv_type = ParseKvType(f.kv_type);
  if (!kv_type.ok()) return Fail(kv_type.status().WithContext("--kv-type"));
  o.kv_type = *kv_type;
  if (o.load_weight < 0) return Fail(InvalidArgument("--load-weight must be >= 0"));
  if (o.max_attempts < 1) return Fail(InvalidArgument("--max-attempts must be >= 1"));
  if (o.health_interval_ms < 50) return Fail(InvalidArgument("--health-interval-ms must be >= 50"));
  if (o.backends.empty() && o.backends_file.empty()) {
    return Fail(InvalidArgument("route: give --backend URL (repeatable) or --backends-file"));
  }

  // The model: its tokenizer and chat template read requests exactly as the backends do, and its
  // fingerprint names the namespace of their blocks.
  const std::string path = f.model.empty() ? DefaultModelPath() : f.model;
  auto model = Model::Load(path);
  if (!model.ok()) return Fail(model.status());
  std::unique_ptr<server::ChatTemplate> tmpl;
  if (!f.chat_template.empty()) {
    auto t = server::ChatTemplate::ByName(f.chat_template);
    if (!t.ok()) return Fail(t.status().WithContext("--chat-template"));
    tmpl = std::make_unique<server::ChatTemplate>(std::move(*t));
  } else {
    auto jinja = (*model)->file().GetString("tokenizer.chat_template");
    auto t = server::ChatTemplate::Detect(jinja.ok() ? *jinja : std::string_view());
    if (!t.ok()) return Fail(t.status());
    tmpl = std::make_unique<server::ChatTemplate>(std::move(*t));
  }
  server::ApiContext api;
  api.model_id = f.model_alias.empty() ? std::filesystem::path(path).stem().string() : f.model_alias;
  api.tokenizer = &(*model)->tokenizer();
  api.chat_template = tmpl.get();
  api.n_vocab = (*model)->config().n_vocab;
  api.n_ctx = (*model)->config().n_ctx_train;
  api.max_token_bytes = server::MaxTokenBytes((*model)->tokenizer());
  CT_LOG(kInfo) << "route: model " << path << " (" << api.model_id << "), fingerprinting weights";

  route::Router router(**model, api, o);
  if (Status s = router.Start(); !s.ok()) return Fail(s);
  CT_LOG(kInfo) << "route: listening on http://" << o.host << ":" << router.port() << ", policy "
                << route::PolicyName(o.policy);
  for (;;) {
    int sig = 0;
    sigwait(&sigs, &sig);
    if (sig != SIGHUP) break;
    if (Status s = router.Reload(); !s.ok()) {
      CT_LOG(kError) << "route: reload: " << s.ToString() << " (keeping the backends as they were)";
    } else {
      CT_LOG(kInfo) << "route: backends reloaded";
    }
  }
  CT_LOG(kInfo) << "route: stopping";
  router.Stop();
  return 0;
}

}  // namespace

Runner AddRouteCommand(CLI::App& app) {
  auto f = std::make_shared<RouteFlags>();
  CLI::App* c = app.add_subcommand(
      "route", "KV-aware router: an OpenAI-compatible proxy in front of several `cachette serve`");
  route::RouterOptions& o = f->options;
  c->add_option("--backend", o.backends, "Backend URL http://HOST:PORT (repeatable)");
  c->add_option("--backends-file", o.backends_file,
                "File of backend URLs, one a line ('#' comments), re-read on SIGHUP");
  c->add_option("--host", o.host, "Address to listen on (default 127.0.0.1)");
  c->add_option("--port", o.port, "Port (default 8000; 0 = any free port)");
  c->add_option("--policy", f->policy,
                "kv (KV events, default) | approx (the router's own record) | round-robin | "
                "least-loaded");
  c->add_option("-m,--model", f->model,
                "The backends' GGUF model: its tokenizer, chat template and fingerprint "
                "(default: the bundled one)");
  c->add_option("--model-alias", f->model_alias, "The model id requests name (as serve's)");
  c->add_option("--chat-template", f->chat_template, "As serve's --chat-template");
  c->add_option("--kv-type", f->kv_type, "The backends' --kv-type (default f16)");
  c->add_option("--load-weight", o.load_weight,
                "Weight of the work queued at a backend against the prefill it saves (default 1)");
  c->add_option("--tier-weights", f->tier_weights,
                "Worth of a held token by medium: memory,ram,disk,redis (default 1,0.7,0.4,0.25)");
  c->add_option("--health-interval-ms", o.health_interval_ms, "Health check period (1000)");
  c->add_option("--connect-timeout-ms", o.connect_timeout_ms, "Backend connect timeout (1000)");
  c->add_option("--read-timeout", o.read_timeout_s, "Seconds a backend may stay silent (600)");
  c->add_option("--max-attempts", o.max_attempts, "Backends tried per request (3)");
  c->add_option("--http-threads", o.http_threads, "Connection threads (256)");
  return [f] { return Route(*f); };
}

}  // namespace cachette::cli
