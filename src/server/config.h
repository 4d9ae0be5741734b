// `cachette serve` configuration: one struct filled from a TOML file (--config) and then from
// flags, which override the file. Keys are the flag names with '_' for '-':
//
//   host = "127.0.0.1"        port = 8080           model = "models/x.gguf"   threads = 0
//   kv_budget = "512MiB"      kv_type = "f16"       max_running = 16          max_queue = 256
//   step_tokens = 256         max_tokens = 256      chat_template = "chatml"  model_alias = "x"
//   prefix_cache = true       session_ttl_s = 300   drain_timeout_s = 30      http_threads = 0
//   # the tiered store (stored; wired by the cache layer):
//   ram_budget = "4GiB"       disk_dir = "/var/cache/cachette"                disk_budget = "64GiB"
//   redis = ["redis://127.0.0.1:6379"]   chunk_tokens = 256                   codec = "raw"
//
// An unknown key or a value of the wrong type is kInvalidArgument naming it (typos must not be
// silently ignored).
#pragma once

#include <string>
#include <vector>

#include "cachette/status.h"

namespace cachette::server {

struct ServeConfig {
  std::string host = "127.0.0.1";
  int port = 8080;
  std::string model;  // empty: the bundled model
  std::string model_alias;  // the id /v1/models lists; default: the file name without .gguf
  int threads = 0;
  std::string kv_budget = "512MiB";
  std::string kv_type = "f16";
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
};

// Reads `path` into `cfg`, overwriting the keys the file sets.
Status LoadConfigFile(const std::string& path, ServeConfig* cfg);

// Range checks that do not need the model: kInvalidArgument naming the field.
Status ValidateConfig(const ServeConfig& cfg);

}  // namespace cachette::server
