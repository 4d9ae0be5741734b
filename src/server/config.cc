#include "server/config.h"

#include <functional>
#include <map>
#include <toml++/toml.h>

#include "core/units.h"

namespace cachette::server {
namespace {

using Setter = std::function<Status(const toml::node&, const std::string& key)>;

Status TypeError(const std::string& key, const char* want) {
  return InvalidArgument("config key '" + key + "' must be " + want);
}

Setter Str(std::string* out) {
  return [out](const toml::node& n, const std::string& key) {
    auto v = n.value<std::string>();
    if (!v || !n.is_string()) return TypeError(key, "a string");
    *out = *v;
    return Status::Ok();
  };
}

Setter Int(int* out) {
  return [out](const toml::node& n, const std::string& key) {
    auto v = n.value<int64_t>();
    if (!v || !n.is_integer() || *v < INT32_MIN || *v > INT32_MAX) {
      return TypeError(key, "an integer");
    }
    *out = static_cast<int>(*v);
    return Status::Ok();
  };
}

Setter Bool(bool* out) {
  return [out](const toml::node& n, const std::string& key) {
    auto v = n.value<bool>();
    if (!v || !n.is_boolean()) return TypeError(key, "true or false");
    *out = *v;
    return Status::Ok();
  };
}

Setter StrList(std::vector<std::string>* out) {
  return [out](const toml::node& n, const std::string& key) {
    out->clear();
    if (n.is_string()) {
      out->push_back(*n.value<std::string>());
      return Status::Ok();
    }
    const toml::array* a = n.as_array();
    if (a == nullptr) return TypeError(key, "a string or an array of strings");
    for (const toml::node& e : *a) {
      if (!e.is_string()) return TypeError(key, "a string or an array of strings");
      out->push_back(*e.value<std::string>());
    }
    return Status::Ok();
  };
}

}  // namespace

Status LoadConfigFile(const std::string& path, ServeConfig* cfg) {
  const std::map<std::string, Setter> keys = {
      {"host", Str(&cfg->host)},
      {"port", Int(&cfg->port)},
      {"model", Str(&cfg->model)},
      {"model_alias", Str(&cfg->model_alias)},
      {"threads", Int(&cfg->threads)},
      {"kv_budget", Str(&cfg->kv_budget)},
      {"kv_type", Str(&cfg->kv_type)},
      {"max_running", Int(&cfg->max_running)},
      {"max_queue", Int(&cfg->max_queue)},
      {"step_tokens", Int(&cfg->step_tokens)},
      {"max_tokens", Int(&cfg->max_tokens)},
      {"chat_template", Str(&cfg->chat_template)},
      {"prefix_cache", Bool(&cfg->prefix_cache)},
      {"session_ttl_s", Int(&cfg->session_ttl_s)},
      {"drain_timeout_s", Int(&cfg->drain_timeout_s)},
      {"http_threads", Int(&cfg->http_threads)},
      {"ram_budget", Str(&cfg->ram_budget)},
      {"disk_dir", Str(&cfg->disk_dir)},
      {"disk_budget", Str(&cfg->disk_budget)},
      {"redis", StrList(&cfg->redis)},
      {"chunk_tokens", Int(&cfg->chunk_tokens)},
      {"codec", Str(&cfg->codec)},
  };
  toml::table table;
  try {
    table = toml::parse_file(path);
  } catch (const toml::parse_error& e) {
    const auto& where = e.source().begin;
    return InvalidArgument("config file " + path + ":" + std::to_string(where.line) + ":" +
                           std::to_string(where.column) + ": " + std::string(e.description()));
  } catch (const std::exception& e) {
    return IOError("config file " + path + ": " + e.what());
  }
  for (const auto& [k, node] : table) {
    const std::string key(k.str());
    auto it = keys.find(key);
    if (it == keys.end()) return InvalidArgument("config file " + path + ": unknown key '" + key + "'");
    CT_RETURN_IF_ERROR(it->second(node, key).WithContext("config file " + path));
  }
  return Status::Ok();
}

Status ValidateConfig(const ServeConfig& c) {
  if (c.port < 0 || c.port > 65535) return InvalidArgument("--port must be in [0, 65535]");
  if (c.max_running < 1 || c.max_running > 4096) {
    return InvalidArgument("--max-running must be in [1, 4096]");
  }
  if (c.max_queue < 0 || c.max_queue > 1000000) {
    return InvalidArgument("--max-queue must be in [0, 1000000]");
  }
  if (c.step_tokens < 1) return InvalidArgument("--step-tokens must be >= 1");
  if (c.max_tokens < 1) return InvalidArgument("--max-tokens must be >= 1");
  if (c.session_ttl_s < 1) return InvalidArgument("--session-ttl must be >= 1 second");
  if (c.chunk_tokens < 1 || c.chunk_tokens > 65536) {
    return InvalidArgument("--chunk-tokens must be in [1, 65536]");
  }
  if (c.codec.empty()) return InvalidArgument("--codec must not be empty");
  auto bytes = [](const std::string& v, const char* flag) -> Status {
    if (v.empty()) return Status::Ok();
    auto r = ParseBytes(v);
    return r.ok() ? Status::Ok() : r.status().WithContext(flag);
  };
  CT_RETURN_IF_ERROR(bytes(c.kv_budget, "--kv-budget"));
  CT_RETURN_IF_ERROR(bytes(c.ram_budget, "--ram-budget"));
  CT_RETURN_IF_ERROR(bytes(c.disk_budget, "--disk-budget"));
  for (const std::string& r : c.redis) {
    if (r.rfind("redis://", 0) != 0 && r.rfind("redis+cluster://", 0) != 0) {
      return InvalidArgument("--redis '" + r + "' must start with redis:// or redis+cluster://");
    }
  }
  return Status::Ok();
}

}  // namespace cachette::server
