#include "server/config.h"

#include <toml++/toml.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>

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

// A fraction: a TOML number (0.5) or a string ("0.5", "50%"); kept as text, checked by
// ValidateConfig.
Setter Fraction(std::string* out) {
  return [out](const toml::node& n, const std::string& key) {
    if (n.is_string()) {
      *out = *n.value<std::string>();
    } else if (n.is_number()) {
      std::ostringstream os;
      os << *n.value<double>();
      *out = os.str();
    } else {
      return TypeError(key, "a number or a string such as \"50%\"");
    }
    return Status::Ok();
  };
}

std::map<std::string, Setter> Keys(ServeConfig* cfg) {
  return {
      {"host", Str(&cfg->host)},
      {"port", Int(&cfg->port)},
      {"model", Str(&cfg->model)},
      {"model_alias", Str(&cfg->model_alias)},
      {"threads", Int(&cfg->threads)},
      {"kv_budget", Str(&cfg->kv_budget)},
      {"kv_type", Str(&cfg->kv_type)},
      {"kv_recent", Int(&cfg->kv_recent)},
      {"session_kv_type", Str(&cfg->session_kv_type)},
      {"session_kv_budget", Str(&cfg->session_kv_budget)},
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
      {"redis_levels", StrList(&cfg->redis_levels)},
      {"disk_levels", StrList(&cfg->disk_levels)},
      {"policy", Str(&cfg->policy)},
      {"admit_after_hits", Int(&cfg->admit_after_hits)},
      {"redis_write", Str(&cfg->redis_write)},
      {"redis_ttl_s", Int(&cfg->redis_ttl_s)},
      {"tenant_quota", Str(&cfg->tenant_quota)},
      {"kv_events", Str(&cfg->kv_events)},
      {"kv_events_replay", Str(&cfg->kv_events_replay)},
      {"queue_timeout_s", Int(&cfg->queue_timeout_s)},
      {"max_pinned", Fraction(&cfg->max_pinned)},
      {"max_pin_ttl_s", Int(&cfg->max_pin_ttl_s)},
      {"max_sessions", Int(&cfg->max_sessions)},
      {"max_pins", Int(&cfg->max_pins)},
      {"max_tenants", Int(&cfg->max_tenants)},
      {"sched", Str(&cfg->sched)},
      {"admission", Str(&cfg->admission)},
      {"preempt", Str(&cfg->preempt)},
      {"itl_target_ms", Int(&cfg->itl_target_ms)},
      {"kv_policy", Str(&cfg->kv_policy)},
      {"kv_policy_budget", Fraction(&cfg->kv_policy_budget)},
      {"kv_reuse", Str(&cfg->kv_reuse)},
      {"blend_ratio", Fraction(&cfg->blend_ratio)},
      {"segment_separator", Str(&cfg->segment_separator)},
      {"segment_cache_mb", Int(&cfg->segment_cache_mb)},
      {"relay", Bool(&cfg->relay)},
      {"segment_pipeline", Bool(&cfg->segment_pipeline)},
      {"blend_controller", Bool(&cfg->blend_controller)},
      {"load_deadline_ms", Int(&cfg->load_deadline_ms)},
      {"api_key", StrList(&cfg->api_keys)},
      {"api_key_file", Str(&cfg->api_key_file)},
      {"admin_key", Str(&cfg->admin_key)},
      {"max_body", Str(&cfg->max_body)},
      {"max_messages", Int(&cfg->max_messages)},
  };
}

// WART: Debian's toml++ reaches __builtin_unreachable() (undefined behaviour) when it asks whether
// certain non-ASCII characters are whitespace: U+00A1..U+0499, U+2C4E..U+3047 and U+FB06..U+FEFE,
// bar U+3000 (found by fuzz_serve_config). It asks between tokens, in multi-line strings and while
// it scans a bad value for its error message, so ScreenToml refuses these characters anywhere in
// the text before toml++ sees it (other non-ASCII text is fine, and any value can still be given as
// a flag).
bool TomlWhitespaceTrap(char32_t c) {
  if (c <= 0xA0 || c >= 0xFEFF || c == 0x3000) return false;
  const uint32_t chunk = (c - 0xA0) / 0x3FA;
  return chunk == 0 || chunk == 11 || chunk == 63;
}

// The code point at the start of `t` and its length in bytes; {0xFFFD, 1} when malformed. Overlong
// forms are decoded, not refused: they must be screened as what they spell.
std::pair<char32_t, size_t> DecodeUtf8(std::string_view t) {
  const auto b = [&](size_t i) { return static_cast<unsigned char>(t[i]); };
  const unsigned char c = b(0);
  const size_t n = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
  if (n == 1 || t.size() < n) return {0xFFFD, 1};
  char32_t cp = c & (0x3F >> (n - 1));
  for (size_t i = 1; i < n; ++i) {
    if ((b(i) & 0xC0) != 0x80) return {0xFFFD, 1};
    cp = (cp << 6) | (b(i) & 0x3F);
  }
  return {cp, n};
}

Status ScreenToml(std::string_view t) {
  int line = 1;
  for (size_t i = 0; i < t.size();) {
    const unsigned char c = static_cast<unsigned char>(t[i]);
    if (c < 0x80) {
      line += c == '\n';
      ++i;
      continue;
    }
    const auto [cp, n] = DecodeUtf8(t.substr(i));
    if (TomlWhitespaceTrap(cp)) {
      char hex[16];
      std::snprintf(hex, sizeof hex, "U+%04X", static_cast<unsigned>(cp));
      return InvalidArgument("line " + std::to_string(line) + ": the character " + hex +
                             " is not supported in a configuration file (give that value as a "
                             "flag)");
    }
    i += n;
  }
  return Status::Ok();
}

}  // namespace

Status ParseConfigText(std::string_view text, ServeConfig* cfg) {
  const std::map<std::string, Setter> keys = Keys(cfg);
  CT_RETURN_IF_ERROR(ScreenToml(text));
  toml::table table;
  try {
    table = toml::parse(text);
  } catch (const toml::parse_error& e) {
    const auto& where = e.source().begin;
    return InvalidArgument(std::to_string(where.line) + ":" + std::to_string(where.column) + ": " +
                           std::string(e.description()));
  } catch (const std::exception& e) {
    return InvalidArgument(std::string("not valid TOML: ") + e.what());
  }
  for (const auto& [k, node] : table) {
    const std::string key(k.str());
    auto it = keys.find(key);
    if (it == keys.end()) return InvalidArgument("unknown key '" + key + "'");
    CT_RETURN_IF_ERROR(it->second(node, key));
  }
  return Status::Ok();
}

Status LoadConfigFile(const std::string& path, ServeConfig* cfg) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return IOError("config file " + path + ": cannot be read");
  std::ostringstream text;
  text << f.rdbuf();
  if (f.bad()) return IOError("config file " + path + ": read failed");
  return ParseConfigText(text.str(), cfg).WithContext("config file " + path);
}

Result<KvPolicyConfig> ServeKvPolicy(const ServeConfig& c) {
  KvPolicyConfig pc;
  pc.name = c.kv_policy;
  std::string t = c.kv_policy_budget;
  const bool percent = !t.empty() && t.back() == '%';
  if (percent) t.pop_back();
  char* end = nullptr;
  const double v = t.empty() ? NAN : std::strtod(t.c_str(), &end);
  if (t.empty() || end == nullptr || *end != '\0' || !std::isfinite(v) ||
      (percent && !(v > 0 && v < 100))) {
    return InvalidArgument("--kv-policy-budget '" + c.kv_policy_budget +
                           "' is not a budget (0.2, \"20%\" or a number of tokens such as 512)");
  }
  pc.budget = percent ? v / 100 : v;
  return pc;
}

Result<double> ParseFraction(std::string_view text) {
  std::string t(text);
  const bool percent = !t.empty() && t.back() == '%';
  if (percent) t.pop_back();
  char* end = nullptr;
  const double v = t.empty() ? NAN : std::strtod(t.c_str(), &end);
  const double f = percent ? v / 100 : v;
  if (t.empty() || end == nullptr || *end != '\0' || !(f >= 0 && f <= 1)) {
    std::string msg = "'";  // built by appends: GCC 12 warns falsely on "'" + std::string
    msg.append(text);
    msg.append("' is not a fraction in [0, 1] (e.g. 0.5 or \"50%\")");
    return InvalidArgument(std::move(msg));
  }
  return f;
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
  if (!c.redis_levels.empty() && c.redis.empty()) {
    return InvalidArgument("--redis-levels needs --redis (the levels are written to Redis)");
  }
  if (!c.disk_levels.empty() && c.disk_dir.empty()) {
    return InvalidArgument("--disk-levels needs --disk-dir (the levels are written to disk)");
  }
  auto bytes = [](const std::string& v, const char* flag) -> Status {
    if (v.empty()) return Status::Ok();
    auto r = ParseBytes(v);
    return r.ok() ? Status::Ok() : r.status().WithContext(flag);
  };
  CT_RETURN_IF_ERROR(bytes(c.kv_budget, "--kv-budget"));
  CT_RETURN_IF_ERROR(bytes(c.session_kv_budget, "--session-kv-budget"));
  if (!c.session_kv_budget.empty() && c.session_kv_type.empty()) {
    return InvalidArgument("--session-kv-budget needs --session-kv-type (the session pool)");
  }
  CT_RETURN_IF_ERROR(bytes(c.ram_budget, "--ram-budget"));
  CT_RETURN_IF_ERROR(bytes(c.disk_budget, "--disk-budget"));
  CT_RETURN_IF_ERROR(bytes(c.tenant_quota, "--tenant-quota"));
  CT_RETURN_IF_ERROR(bytes(c.max_body, "--max-body"));
  if (auto b = ParseBytes(c.max_body); b.ok() && (*b < 1024 || *b > (uint64_t{1} << 30))) {
    return InvalidArgument("--max-body must be in [1KiB, 1GiB]");
  }
  if (c.policy != "lru" && c.policy != "lfu" && c.policy != "s3fifo" && c.policy != "cost") {
    return InvalidArgument("--policy '" + c.policy + "' must be lru, lfu, s3fifo or cost");
  }
  if (c.redis_write != "through" && c.redis_write != "back") {
    return InvalidArgument("--redis-write '" + c.redis_write + "' must be through or back");
  }
  if (c.admit_after_hits < 0 || c.admit_after_hits > 1000000) {
    return InvalidArgument("--admit-after-hits must be in [0, 1000000]");
  }
  if (c.redis_ttl_s < 0) return InvalidArgument("--redis-ttl must be >= 0 seconds (0: none)");
  if (c.queue_timeout_s < 0) {
    return InvalidArgument("--queue-timeout must be >= 0 seconds (0: none)");
  }
  CT_RETURN_IF_ERROR(ParseFraction(c.max_pinned).status().WithContext("--max-pinned"));
  if (c.max_pin_ttl_s < 1) return InvalidArgument("--max-pin-ttl must be >= 1 second");
  if (c.max_sessions < 1) return InvalidArgument("--max-sessions must be >= 1");
  if (c.max_pins < 1) return InvalidArgument("--max-pins must be >= 1");
  if (c.max_tenants < 1) return InvalidArgument("--max-tenants must be >= 1");
  if (c.sched != "fcfs" && c.sched != "lpm" && c.sched != "program") {
    return InvalidArgument("--sched '" + c.sched + "' must be fcfs, lpm or program");
  }
  if (c.preempt != "recompute" && c.preempt != "swap") {
    return InvalidArgument("--preempt '" + c.preempt + "' must be recompute or swap");
  }
  if (c.preempt == "swap" && !c.prefix_cache) {
    return InvalidArgument("--preempt swap keeps KV in the chunk store: it needs the prefix cache");
  }
  if (!c.kv_policy.empty()) {
    CT_ASSIGN_OR_RETURN(KvPolicyConfig pc, ServeKvPolicy(c));
    CT_RETURN_IF_ERROR(ValidateKvPolicy(pc).WithContext("--kv-policy/--kv-policy-budget"));
  }
  if (c.kv_reuse != "prefix" && c.kv_reuse != "naive" && c.kv_reuse != "blend" &&
      c.kv_reuse != "cachecraft" && c.kv_reuse != "ape") {
    return InvalidArgument("--kv-reuse '" + c.kv_reuse +
                           "' must be prefix, naive, blend, cachecraft or ape");
  }
  CT_RETURN_IF_ERROR(ParseFraction(c.blend_ratio).status().WithContext("--blend-ratio"));
  if (c.segment_cache_mb < 0 || c.segment_cache_mb > 1 << 20) {
    return InvalidArgument("--segment-cache-mb must be in [0, 1048576]");
  }
  if (c.itl_target_ms < 0 || c.itl_target_ms > 60000) {
    return InvalidArgument("--itl-target-ms must be in [0, 60000] (0: off)");
  }
  if (c.admission != "forecast" && c.admission != "past-future") {
    return InvalidArgument("--admission '" + c.admission + "' must be forecast or past-future");
  }
  if (c.load_deadline_ms < 0 || c.load_deadline_ms > 600000) {
    return InvalidArgument("--load-deadline-ms must be in [0, 600000]");
  }
  if (c.max_messages < 1 || c.max_messages > 1000000) {
    return InvalidArgument("--max-messages must be in [1, 1000000]");
  }
  if (c.http_threads < 0) return InvalidArgument("--http-threads must be >= 0 (0: auto)");
  CT_RETURN_IF_ERROR(ReplayEndpointFor(c.kv_events, c.kv_events_replay).status());
  for (const std::string& k : c.api_keys) {
    if (k.empty() || k.find_first_of(" \t\r\n") != std::string::npos) {
      return InvalidArgument("--api-key must be non-empty and hold no whitespace");
    }
  }
  if (!c.admin_key.empty() && c.admin_key.find_first_of(" \t\r\n") != std::string::npos) {
    return InvalidArgument("--admin-key must hold no whitespace");
  }
  for (const std::string& r : c.redis) {
    if (r.rfind("redis://", 0) != 0 && r.rfind("redis+cluster://", 0) != 0) {
      return InvalidArgument("--redis '" + r + "' must start with redis:// or redis+cluster://");
    }
  }
  return Status::Ok();
}

Result<std::string> ReplayEndpointFor(const std::string& pub, const std::string& replay) {
  auto check = [](const std::string& e, const char* flag) -> Status {
    const size_t colon = e.rfind(':');
    int port = -1;
    if (e.rfind("tcp://", 0) == 0 && colon != std::string::npos && colon > 6) {
      const std::string p = e.substr(colon + 1);
      if (!p.empty() && p.size() <= 5 && p.find_first_not_of("0123456789") == std::string::npos) {
        port = std::stoi(p);
      }
    }
    if (port < 1 || port > 65535) {
      return InvalidArgument(std::string(flag) + " '" + e + "' must be tcp://HOST:PORT");
    }
    return Status::Ok();
  };
  if (pub.empty()) {
    if (!replay.empty()) return InvalidArgument("--kv-events-replay needs --kv-events");
    return std::string();
  }
  CT_RETURN_IF_ERROR(check(pub, "--kv-events"));
  if (!replay.empty()) {
    CT_RETURN_IF_ERROR(check(replay, "--kv-events-replay"));
    if (replay == pub) return InvalidArgument("--kv-events-replay must differ from --kv-events");
    return replay;
  }
  const size_t colon = pub.rfind(':');
  const int port = std::stoi(pub.substr(colon + 1));
  if (port == 65535) return InvalidArgument("--kv-events port 65535 leaves no port + 1 for replay");
  return pub.substr(0, colon + 1) + std::to_string(port + 1);
}

}  // namespace cachette::server
