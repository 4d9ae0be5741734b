// `cachette serve` configuration: one struct filled from a TOML file (--config) and then from
// flags, which override the file. Keys are the flag names with '_' for '-':
//
//   host = "127.0.0.1"        port = 8080           model = "models/x.gguf"   threads = 0
//   kv_budget = "512MiB"      kv_type = "f16"       max_running = 16          max_queue = 256
//   step_tokens = 256         max_tokens = 256      chat_template = "chatml"  model_alias = "x"
//   kv_recent = 64            (-1: the KV type's default, 64 for kivi4, 0 for the others)
//   session_kv_type = "q4_0"  session_kv_budget = "256MiB" (a pool of its own for sessions)
//   prefix_cache = true       session_ttl_s = 300   drain_timeout_s = 30      http_threads = 0
//   # the tiered store (stored; wired by the cache layer):
//   ram_budget = "4GiB"       disk_dir = "/var/cache/cachette"                disk_budget = "64GiB"
//   redis = ["redis://127.0.0.1:6379"]   chunk_tokens = 256                   codec = "raw"
//   policy = "lru"            admit_after_hits = 0  redis_write = "through"   redis_ttl_s = 0
//   tenant_quota = "1GiB"
//   # scheduler bounds:
//   queue_timeout_s = 0       max_pinned = 0.5 (or "50%")                     max_pin_ttl_s = 3600
//   max_sessions = 10000      max_pins = 10000      max_tenants = 10000     load_deadline_ms = 1000
//   sched = "fcfs"            admission = "forecast"  preempt = "recompute"  itl_target_ms = 0
//   # KV budget policy for requests that name none (docs/kv.md "KV budget policies"):
//   kv_policy = "snapkv"      kv_policy_budget = 0.2 (or "20%", or 512 tokens)
//   # segment reuse (docs/serving.md "Segment reuse"):
//   kv_reuse = "prefix"       blend_ratio = 0.15    segment_separator = "\n\n"  segment_cache_mb = 256
//   relay = false             (keep each finished request's output as a segment)
//   segment_pipeline = true   blend_controller = false   (segments loading from the tiers)
//   # access control and request limits:
//   api_key = ["k1", "k2"]    api_key_file = "/etc/cachette/keys"             admin_key = "secret"
//   max_body = "16MiB"        max_messages = 1024
//   # KV events for routers (docs/formats/kv-events.md):
//   kv_events = "tcp://127.0.0.1:5557"   kv_events_replay = "tcp://127.0.0.1:5558"
//
// An unknown key or a value of the wrong type is kInvalidArgument naming it (typos must not be
// silently ignored).
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "cachette/status.h"
#include "kv/kv_policy.h"

namespace cachette::server {

struct ServeConfig {
  std::string host = "127.0.0.1";
  int port = 8080;
  std::string model;  // empty: the bundled model
  std::string model_alias;  // the id /v1/models lists; default: the file name without .gguf
  int threads = 0;
  std::string kv_budget = "512MiB";
  std::string kv_type = "f16";
  int kv_recent = -1;  // newest tokens a quantized KV type keeps in f16 (-1: the type's default)
  // A pool of its own for the KV of requests with a session_id, in this type ("": sessions
  // share the main pool), of session_kv_budget bytes taken out of kv_budget ("": half of it).
  std::string session_kv_type;
  std::string session_kv_budget;
  int max_running = 16;
  int max_queue = 256;
  int step_tokens = 256;
  int max_tokens = 256;  // default max_tokens of a request that gives none
  std::string chat_template;  // empty: detected from the model
  bool prefix_cache = true;
  int session_ttl_s = 300;
  int drain_timeout_s = 30;
  int http_threads = 0;  // 0: enough for max_running + max_queue streams, capped
  // Tiered store.
  std::string ram_budget;
  std::string disk_dir;
  std::string disk_budget;
  std::vector<std::string> redis;
  int chunk_tokens = 256;
  std::string codec = "raw";
  // Adaptive loading: more encodings written to Redis, best first (CacheOptions::remote_levels).
  std::vector<std::string> redis_levels;
  // The same for the disk tier (CacheOptions::disk_levels).
  std::vector<std::string> disk_levels;
  std::string policy = "lru";           // lru | lfu | s3fifo | cost
  int admit_after_hits = 0;             // slower tiers take a chunk once it was hit N times
  std::string redis_write = "through";  // through | back (= when RAM evicts the chunk)
  int redis_ttl_s = 0;                  // 0: no expiry
  std::string tenant_quota;             // bytes per tenant namespace; empty: none
  // KV events: the ZeroMQ PUB endpoint ("tcp://HOST:PORT"; empty: none) and the replay/snapshot
  // endpoint (empty: the PUB endpoint's host with port + 1).
  std::string kv_events;
  std::string kv_events_replay;
  // Scheduler bounds.
  int queue_timeout_s = 0;         // 0: a queued request waits as long as it takes
  std::string max_pinned = "0.5";  // fraction of the KV pool pins may hold: "0.5" or "50%"
  int max_pin_ttl_s = 3600;
  int max_sessions = 10000;
  int max_pins = 10000;
  int max_tenants = 10000;
  int load_deadline_ms = 1000;  // how long a restore waits for a slow tier
  std::string sched = "fcfs";           // fcfs | lpm (longest cached prefix first) | program
  std::string admission = "forecast";   // forecast (worst case) | past-future
  std::string preempt = "recompute";    // recompute | swap (needs the RAM tier: on by default)
  int itl_target_ms = 0;                // > 0: prefill share per step sized to this ITL
  std::string kv_policy;                // "" = full KV; else a KvPolicyNames() name
  std::string kv_policy_budget = "0.2";  // below 1 a fraction of the prompt, else tokens
  // Segment reuse: the default kv_reuse (prefix | naive | blend | cachecraft) and blend_ratio of
  // a request, the separator cutting a string prompt into segments ("" = none), and the segment
  // cache's budget in MiB.
  std::string kv_reuse = "prefix";
  std::string blend_ratio = "0.15";
  std::string segment_separator;
  int segment_cache_mb = 256;
  bool relay = false;  // keep each finished request's output KV as a segment (RelayCaching)
  // Segments from the tiers: compute each layer while the next loads (CacheBlend's pipeline),
  // and let blend recompute more while that hides under the load (its loading controller).
  bool segment_pipeline = true;
  bool blend_controller = false;
  // Access control (docs/serving.md "Access control").
  std::vector<std::string> api_keys;  // TOML key and flag: api_key
  std::string api_key_file;           // one key a line; '#' comments and blank lines skipped
  std::string admin_key;
  // Request limits.
  std::string max_body = "16MiB";
  int max_messages = 1024;
};

// Reads `path` into `cfg`, overwriting the keys the file sets. kIOError when it cannot be read;
// otherwise as ParseConfigText, with the path in the message.
Status LoadConfigFile(const std::string& path, ServeConfig* cfg);

// Parses TOML text into `cfg`, overwriting the keys it sets. kInvalidArgument for a syntax error
// (line:column), an unknown key or a value of the wrong type. Never throws.
Status ParseConfigText(std::string_view toml, ServeConfig* cfg);

// "0.5", "50%" -> 0.5. kInvalidArgument unless it is a number in [0, 1] (or [0, 100]%).
Result<double> ParseFraction(std::string_view text);

// The server's default KV budget policy from kv_policy and kv_policy_budget ("0.2", "20%" or
// tokens); kInvalidArgument naming --kv-policy-budget when the budget does not parse (the name
// and the range are ValidateKvPolicy's).
Result<KvPolicyConfig> ServeKvPolicy(const ServeConfig& cfg);

// Range checks that do not need the model: kInvalidArgument naming the field.
Status ValidateConfig(const ServeConfig& cfg);

// The replay endpoint of the KV events: `replay` when given, else the PUB endpoint's host with
// its port + 1; "" when there are no events. kInvalidArgument naming the flag when either is
// not tcp://HOST:PORT.
Result<std::string> ReplayEndpointFor(const std::string& pub, const std::string& replay);

}  // namespace cachette::server
