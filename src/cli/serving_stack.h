// The serving stack that `cachette serve` and `cachette batch` share: the flags that configure
// it and the objects it is made of.
//
// Flags. Every setting lives in a server::ServeConfig, filled from the TOML file of --config
// and then from the flags given on the command line (flags win). AddStackFlags registers the
// three groups both commands take, with the same names, help and TOML keys:
//   "Model and engine"  -m/--model, --model-alias, --threads, --kv-budget, --kv-type,
//                       --kv-recent, --session-kv-type, --session-kv-budget,
//                       --chat-template, --max-tokens, --no-prefix-cache
//   "Scheduler"         --max-running, --max-queue, --step-tokens, --queue-timeout, the pin and
//                       session bounds, --sched, --admission, --preempt, --itl-target-ms,
//                       segment reuse (--kv-reuse, --blend-ratio, --segment-separator,
//                       --segment-cache-mb)
//   "Cache store"       --ram-budget, --disk-dir, --disk-budget, --redis, --redis-write, ...
// Each command adds its own (serve: network and access control; batch: files and order).
//
// Objects, built by BuildServingStack in this order (each borrows the ones before it):
//   1. the model (GGUF file), 2. the chat template (forced by --chat-template, else detected
//   from the model's tokenizer.chat_template, else "plain"), 3. the engine, 4. the KV pool
//   (and the session pool, --session-kv-type, out of the same budget),
//   4a. the KV event publisher (--kv-events), which the pool and the store report to,
//   5. the tiered chunk store and its bridge to the scheduler (only when a tier is configured,
//   or --preempt swap, which keeps preempted KV in the RAM tier; and never without the prefix
//   cache), 6. the scheduler, whose loop thread starts here.
// ServingStack owns them and destroys them in the reverse order (the scheduler, which drains
// and joins its loop, first; the model last).
//
// Thread-safety: building and destroying happen on one thread; the scheduler and the store are
// safe to use from any thread (see their headers); the rest is read-only once built.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "cache/session_journal.h"
#include "cachette/cache.h"
#include "cli/cli.h"
#include "events/publisher.h"
#include "kv/kv_manager.h"
#include "sched/scheduler.h"
#include "sched/tier_bridge.h"
#include "server/chat_template.h"
#include "server/config.h"
#include "server/openai.h"

namespace cachette::cli {

// What the command line says: the flags' values, which of them were given, --config and
// --no-prefix-cache. Lives as long as the CLI::App (its options point into it).
struct ServeFlags {
  server::ServeConfig values;
  std::string config_path;
  bool no_prefix_cache = false;
  bool relay = false;
  bool no_segment_pipeline = false;
  bool blend_controller = false;
  // Copies the flags given on the command line over the configuration (flags win).
  std::vector<std::pair<CLI::Option*, std::function<void(server::ServeConfig&)>>> apply;
};

// Registers `name` as an option of `c` in `group`, stored in f->values.*field, and remembers to
// copy it over the configuration when it is given (ResolveServeConfig).
template <typename T>
CLI::Option* Flag(CLI::App* c, ServeFlags* f, const char* group, const char* name,
                  T server::ServeConfig::*field, const char* help) {
  CLI::Option* o = c->add_option(name, f->values.*field, help)->group(group);
  f->apply.push_back({o, [f, field](server::ServeConfig& cfg) { cfg.*field = f->values.*field; }});
  return o;
}

// Registers the model/engine, scheduler and store flags (the groups above) on `c`. `f` must
// outlive the parse.
void AddStackFlags(CLI::App* c, ServeFlags* f);

// The configuration the command line asks for: the --config file (kIOError or
// kInvalidArgument naming the file and the key), then the flags given, --no-prefix-cache, the
// bundled model when none is named; validated (server::ValidateConfig, kInvalidArgument
// naming the field).
Result<server::ServeConfig> ResolveServeConfig(const ServeFlags& f);

// The checks that need no model: the KV type, the KV budget and the chat template name.
// kInvalidArgument naming the flag. BuildServingStack runs them first; serve runs them before
// it binds its port, so a typo fails at once.
Status CheckStackConfig(const server::ServeConfig& cfg);

struct ServingStack {
  server::ServeConfig config;
  std::unique_ptr<Model> model;
  std::unique_ptr<server::ChatTemplate> chat_template;
  std::unique_ptr<Engine> engine;
  // KV events (--kv-events), null without; the KV pool and the store report into it, so it
  // outlives both.
  std::unique_ptr<events::KvEventPublisher> events;
  std::unique_ptr<KvManager> kv;
  std::unique_ptr<KvManager> session_kv;  // --session-kv-type; null: sessions share kv
  std::unique_ptr<Cache> store;              // null: no tier configured
  std::unique_ptr<sched::TierBridge> tiers;  // non-null exactly when store is
  // Sessions kept across restarts (--disk-dir): DIR/sessions, attached to the scheduler's pins.
  std::unique_ptr<cache::SessionJournal> sessions;
  std::unique_ptr<sched::Scheduler> scheduler;
  // What GET /v1/cache/events says: whether and where the events are published, and how to
  // name this server's blocks (page and chunk sizes, KV type, shared namespace).
  nlohmann::json KvEventsInfo() const;
  // What server::ParseGenerate needs, filled as `serve` serves it (model id: --model-alias, else
  // the file name without .gguf; default max_tokens: --max-tokens). Points into this stack.
  server::ApiContext api;

  ServingStack() = default;
  ServingStack(const ServingStack&) = delete;
  ServingStack& operator=(const ServingStack&) = delete;
  ~ServingStack();  // the scheduler first (drains, joins its loop), then the rest in reverse
};

// Builds the stack for `cfg` (as ResolveServeConfig returns it), logging each part as it comes
// up. Errors: CheckStackConfig's; the model file's (kIOError, kCorruption, ...); a KV budget
// that holds no page or a store option out of range (kInvalidArgument naming the flag); a
// chunk store that cannot open (its error, "chunk store: ..."). The scheduler is running on
// return.
Result<std::unique_ptr<ServingStack>> BuildServingStack(const server::ServeConfig& cfg);

}  // namespace cachette::cli
