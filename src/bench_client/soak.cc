#include "bench_client/soak.h"

#include <httplib.h>
#include <netdb.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <sstream>
#include <thread>

#include "core/check.h"
#include "core/file_io.h"

namespace cachette::bench_client {

using nlohmann::json;

// ---- 1. The action mix -------------------------------------------------------------------

std::string_view SoakActionName(SoakAction a) {
  switch (a) {
    case SoakAction::kChat: return "chat";
    case SoakAction::kChatStream: return "chat_stream";
    case SoakAction::kCompletionStream: return "completion_stream";
    case SoakAction::kChatPin: return "chat_pin";
    case SoakAction::kAdminPin: return "admin_pin";
    case SoakAction::kAdminUnpin: return "admin_unpin";
    case SoakAction::kAdminClear: return "admin_clear";
    case SoakAction::kAdminLookup: return "admin_lookup";
    case SoakAction::kAdminStats: return "admin_stats";
    case SoakAction::kMetrics: return "metrics";
    case SoakAction::kStreamDisconnect: return "stream_disconnect";
    case SoakAction::kAbandon: return "abandon";
    case SoakAction::kMalformed: return "malformed";
    case SoakAction::kCount: break;
  }
  return "?";
}

std::string_view SoakMalformedName(SoakMalformed m) {
  switch (m) {
    case SoakMalformed::kBadJson: return "bad_json";
    case SoakMalformed::kWrongTypes: return "wrong_types";
    case SoakMalformed::kHugeNumbers: return "huge_numbers";
    case SoakMalformed::kInvalidUtf8: return "invalid_utf8";
    case SoakMalformed::kEmptyBody: return "empty_body";
    case SoakMalformed::kUnknownFields: return "unknown_fields";
    case SoakMalformed::kOversizeMaxTokens: return "oversize_max_tokens";
    case SoakMalformed::kNegativeMaxTokens: return "negative_max_tokens";
    case SoakMalformed::kUnknownRoute: return "unknown_route";
    case SoakMalformed::kWrongMethod: return "wrong_method";
    case SoakMalformed::kDeepNesting: return "deep_nesting";
    case SoakMalformed::kBadContentLength: return "bad_content_length";
    case SoakMalformed::kPartialBody: return "partial_body";
    case SoakMalformed::kBadExtensions: return "bad_extensions";
    case SoakMalformed::kHugePrompt: return "huge_prompt";
    case SoakMalformed::kBadAuth: return "bad_auth";
    case SoakMalformed::kCount: break;
  }
  return "?";
}

SoakMix SoakMix::Default() {
  SoakMix m;
  auto w = [&m](SoakAction a, int weight) { m.weights[static_cast<int>(a)] = weight; };
  w(SoakAction::kChat, 16);
  w(SoakAction::kChatStream, 14);
  w(SoakAction::kCompletionStream, 6);
  w(SoakAction::kChatPin, 6);
  w(SoakAction::kAdminPin, 4);
  w(SoakAction::kAdminUnpin, 4);
  w(SoakAction::kAdminClear, 2);
  w(SoakAction::kAdminLookup, 4);
  w(SoakAction::kAdminStats, 3);
  w(SoakAction::kMetrics, 2);
  w(SoakAction::kStreamDisconnect, 10);
  w(SoakAction::kAbandon, 7);
  w(SoakAction::kMalformed, 22);
  return m;
}

int SoakMix::Total() const {
  int t = 0;
  for (int w : weights) t += w;
  return t;
}

SoakAction SoakMix::Pick(uint64_t u) const {
  CT_CHECK(u < static_cast<uint64_t>(Total())) << "draw " << u << " of " << Total();
  for (int i = 0; i < kSoakActionCount; ++i) {
    if (u < static_cast<uint64_t>(weights[i])) return static_cast<SoakAction>(i);
    u -= weights[i];
  }
  CT_CHECK(false) << "unreachable";
  return SoakAction::kChat;
}

SoakPools SoakPools::Default() {
  SoakPools p;
  p.tenants = {"", "acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne"};
  // Around the 256-byte limit a server may put on cache_salt: just under, at, and over it.
  for (size_t n : {255, 256, 257, 300}) {
    std::string t = "tenant-" + std::to_string(n) + "-";
    t.resize(n, 'x');
    p.tenants.push_back(std::move(t));
  }
  for (int i = 0; i < 16; ++i) p.sessions.push_back("soak-session-" + std::to_string(i));
  return p;
}

namespace {

// Each tenant has its own fixed "system prompt" (the same for every client, so prefixes are
// shared and cached across clients), made from a generator seeded by the tenant's index. Odd
// tenants have long ones (300-600 words), past a 256-token chunk, so the chunk store's tiers
// fill too.
std::string TenantSystemPrompt(size_t tenant_index) {
  Rng r(0x5eedull * (tenant_index + 1));
  const int words =
      tenant_index % 2 ? 300 + static_cast<int>(r.Below(300)) : 40 + static_cast<int>(r.Below(60));
  return "You are assistant " + std::to_string(tenant_index) + ". " + Words(r, words);
}

const std::string& Pick(Rng& rng, const std::vector<std::string>& v) {
  CT_CHECK(!v.empty());
  return v[rng.Below(v.size())];
}

struct Draw {
  size_t tenant_index = 0;
  std::string tenant;
  std::string system;
  std::string question;
};

Draw DrawTenantAndQuestion(Rng& rng, const SoakPools& pools) {
  Draw d;
  d.tenant_index = rng.Below(pools.tenants.size());
  d.tenant = pools.tenants[d.tenant_index];
  d.system = TenantSystemPrompt(d.tenant_index);
  d.question = Words(rng, 3 + static_cast<int>(rng.Below(28))) + "?";
  return d;
}

json ChatBody(const Draw& d, const SoakClientState& st, int max_tokens) {
  json b = {{"messages", json::array({{{"role", "system"}, {"content", d.system}},
                                      {{"role", "user"}, {"content", d.question}}})},
            {"max_tokens", max_tokens}};
  if (!st.model.empty()) b["model"] = st.model;
  if (!d.tenant.empty()) b["cache_salt"] = d.tenant;
  return b;
}

std::vector<std::string> AuthHeaders(const SoakClientState& st, bool admin) {
  const std::string& key = admin && !st.admin_key.empty() ? st.admin_key : st.api_key;
  if (key.empty()) return {};
  return {"Authorization: Bearer " + key};
}

}  // namespace

std::string RawHttpRequest(const std::string& method, const std::string& path,
                           const std::string& host, const std::vector<std::string>& headers,
                           const std::string& body, const std::string& content_length) {
  std::string r = method + " " + path + " HTTP/1.1\r\nHost: " + host + "\r\nConnection: close\r\n";
  for (const auto& h : headers) r += h + "\r\n";
  r += "Content-Length: " + (content_length.empty() ? std::to_string(body.size()) : content_length);
  r += "\r\n\r\n";
  r += body;
  return r;
}

SoakRequest PlanSoakAction(SoakAction action, SoakMalformed malformed, Rng& rng,
                           const SoakPools& pools, const SoakClientState& st) {
  SoakRequest q;
  q.action = action;
  q.path = "/v1/chat/completions";
  const Draw d = DrawTenantAndQuestion(rng, pools);
  const int max_tokens = 1 + static_cast<int>(rng.Below(24));
  switch (action) {
    case SoakAction::kChat:
    case SoakAction::kChatStream:
    case SoakAction::kChatPin: {
      json b = ChatBody(d, st, max_tokens);
      if (rng.Below(2) == 0) b["temperature"] = 0;
      if (rng.Below(3) == 0) b["session_id"] = Pick(rng, pools.sessions);
      if (action == SoakAction::kChatStream) {
        b["stream"] = true;
        if (rng.Below(2) == 0) b["stream_options"] = {{"include_usage", true}};
        q.transport = SoakTransport::kStream;
      }
      if (action == SoakAction::kChatPin) {
        static const char* kTtls[] = {"30s", "1m", "2m"};
        b["cache_control"] = {{"type", "ephemeral"}};
        if (rng.Below(2) == 0) b["cache_control"]["ttl"] = kTtls[rng.Below(3)];
      }
      q.body = b.dump();
      break;
    }
    case SoakAction::kCompletionStream: {
      json b = {
          {"prompt", d.system + "\n" + d.question}, {"max_tokens", max_tokens}, {"stream", true}};
      if (!st.model.empty()) b["model"] = st.model;
      if (!d.tenant.empty()) b["cache_salt"] = d.tenant;
      q.path = "/v1/completions";
      q.body = b.dump();
      q.transport = SoakTransport::kStream;
      break;
    }
    case SoakAction::kAdminPin: {
      json b = {{"prompt", d.system}, {"ttl_s", 5 + rng.Below(55)}, {"prefill", rng.Below(2) == 0}};
      if (!d.tenant.empty()) b["cache_salt"] = d.tenant;
      q.path = "/v1/cache/pin";
      q.body = b.dump();
      q.admin = true;
      break;
    }
    case SoakAction::kAdminUnpin: {
      json b;
      if (!st.pin_ids.empty() && rng.Below(4) != 0) {
        b["pin_id"] = st.pin_ids[rng.Below(st.pin_ids.size())];
      } else {
        b["session_id"] = Pick(rng, pools.sessions);
      }
      q.path = "/v1/cache/unpin";
      q.body = b.dump();
      q.admin = true;
      break;
    }
    case SoakAction::kAdminClear: {
      json b = json::object();
      if (rng.Below(20) == 0) {
        b["all"] = true;
      } else if (!d.tenant.empty()) {
        b["cache_salt"] = d.tenant;
      }
      q.path = "/v1/cache/clear";
      q.body = b.dump();
      q.admin = true;
      break;
    }
    case SoakAction::kAdminLookup: {
      json b = {{"prompt", d.system + "\n" + d.question}};
      if (!d.tenant.empty()) b["cache_salt"] = d.tenant;
      q.path = "/v1/cache/lookup";
      q.body = b.dump();
      q.admin = true;
      break;
    }
    case SoakAction::kAdminStats:
      q.method = "GET";
      q.path = "/v1/cache/stats";
      q.admin = true;
      break;
    case SoakAction::kMetrics:
      q.method = "GET";
      q.path = "/metrics";
      q.admin = true;
      break;
    case SoakAction::kStreamDisconnect: {
      json b = ChatBody(d, st, 64);
      b["ignore_eos"] = true;
      b["stream"] = true;
      q.body = b.dump();
      q.transport = SoakTransport::kStreamDisconnect;
      break;
    }
    case SoakAction::kAbandon: {
      json b = ChatBody(d, st, 1 + static_cast<int>(rng.Below(8)));
      if (rng.Below(2) == 0) b["stream"] = true;
      std::vector<std::string> h = AuthHeaders(st, false);
      h.push_back("Content-Type: application/json");
      q.body = b.dump();
      q.raw = RawHttpRequest("POST", q.path, st.host, h, q.body);
      q.transport = SoakTransport::kRawAbandon;
      break;
    }
    case SoakAction::kMalformed: {
      q.malformed = malformed;
      q.transport = SoakTransport::kRaw;
      std::vector<std::string> h = AuthHeaders(st, false);
      h.push_back("Content-Type: application/json");
      std::string content_length;
      const json valid = ChatBody(d, st, max_tokens);
      const json msgs = valid["messages"];
      switch (malformed) {
        case SoakMalformed::kBadJson:
          q.body = valid.dump();
          q.body.resize(1 + rng.Below(q.body.size() - 1));  // never the whole object
          break;
        case SoakMalformed::kWrongTypes:
          q.body = R"({"messages": "hello", "max_tokens": "ten", "stream": 3})";
          break;
        case SoakMalformed::kHugeNumbers:
          q.body = R"({"messages": )" + msgs.dump() +
                   R"(, "max_tokens": 1180591620717411303424, "temperature": 1e308, "seed": 1)" +
                   std::string(400, '7') + "}";
          break;
        case SoakMalformed::kInvalidUtf8:
          q.body = R"({"messages": [{"role": "user", "content": "ab)" + std::string("\xff\xfe") +
                   " cd " + std::string("\x80") + R"("}], "max_tokens": 2})";
          break;
        case SoakMalformed::kEmptyBody: q.body.clear(); break;
        case SoakMalformed::kUnknownFields: {
          json b = valid;
          b["frobnicate"] = {{"a", json::array({1, 2, 3})}};
          b["x_soak_unknown"] = true;
          q.body = b.dump();
          break;
        }
        case SoakMalformed::kOversizeMaxTokens: {
          json b = valid;
          b["max_tokens"] = 1000000000;
          q.body = b.dump();
          break;
        }
        case SoakMalformed::kNegativeMaxTokens: {
          json b = valid;
          b["max_tokens"] = -5;
          q.body = b.dump();
          break;
        }
        case SoakMalformed::kUnknownRoute:
          q.path = "/v1/nonexistent";
          q.body = valid.dump();
          break;
        case SoakMalformed::kWrongMethod: q.method = "GET"; break;
        case SoakMalformed::kDeepNesting:
          q.body = R"({"messages": )" + std::string(5000, '[') + std::string(5000, ']') + "}";
          break;
        case SoakMalformed::kBadContentLength:
          q.body = valid.dump();
          content_length = "abc";
          break;
        case SoakMalformed::kPartialBody:
          q.body = valid.dump();
          content_length = std::to_string(q.body.size() + 100);
          q.transport = SoakTransport::kRawAbandon;
          break;
        case SoakMalformed::kBadExtensions: {
          json b = valid;
          b["cache_salt"] = 42;
          b["session_id"] = {{"a", 1}};
          b["cache_control"] = "yes";
          q.body = b.dump();
          break;
        }
        case SoakMalformed::kHugePrompt: {
          json b = valid;
          b["messages"][1]["content"] = Words(rng, 20000);
          q.body = b.dump();
          break;
        }
        case SoakMalformed::kBadAuth:
          h.erase(std::remove_if(
                      h.begin(), h.end(),
                      [](const std::string& s) { return s.rfind("Authorization:", 0) == 0; }),
                  h.end());
          h.push_back("Authorization: Bearer soak-wrong-key");
          q.body = valid.dump();
          break;
        case SoakMalformed::kCount: CT_CHECK(false) << "kMalformed needs a kind";
      }
      q.raw = RawHttpRequest(q.method, q.path, st.host, h, q.body, content_length);
      break;
    }
    case SoakAction::kCount: CT_CHECK(false) << "not an action";
  }
  return q;
}

SoakRequest PlanSoakRequest(Rng& rng, const SoakMix& mix, const SoakPools& pools,
                            const SoakClientState& state) {
  const SoakAction a = mix.Pick(rng.Below(static_cast<uint64_t>(mix.Total())));
  SoakMalformed m = SoakMalformed::kCount;
  if (a == SoakAction::kMalformed) m = static_cast<SoakMalformed>(rng.Below(kSoakMalformedCount));
  return PlanSoakAction(a, m, rng, pools, state);
}

// ---- 2. The tally ------------------------------------------------------------------------

std::string_view SoakClassName(SoakClass c) {
  switch (c) {
    case SoakClass::k2xx: return "2xx";
    case SoakClass::k4xx: return "4xx";
    case SoakClass::k429: return "429";
    case SoakClass::k5xx: return "5xx";
    case SoakClass::k503Draining: return "503_draining";
    case SoakClass::kConnectionError: return "connection_error";
    case SoakClass::kStreamError: return "stream_error";
    case SoakClass::kAbandoned: return "abandoned";
    case SoakClass::kCount: break;
  }
  return "?";
}

bool IsSoakFailure(SoakClass c) {
  return c == SoakClass::k5xx || c == SoakClass::kConnectionError || c == SoakClass::kStreamError;
}

SoakClass Classify(const SoakOutcome& o) {
  if (o.abandoned) return SoakClass::kAbandoned;
  if (o.transport_error || o.http_status == 0) return SoakClass::kConnectionError;
  if (o.http_status == 503 && o.draining) return SoakClass::k503Draining;
  if (o.http_status >= 500) return SoakClass::k5xx;
  if (o.http_status == 429) return SoakClass::k429;
  if (o.http_status >= 400) return SoakClass::k4xx;
  if (!o.stream_error_type.empty()) {
    if (o.stream_error_type == "rate_limit_error") return SoakClass::k429;
    if (o.stream_error_type == "invalid_request_error") return SoakClass::k4xx;
    return SoakClass::kStreamError;
  }
  if (o.stream_incomplete) return SoakClass::kStreamError;
  return SoakClass::k2xx;
}

void SoakTally::Add(SoakAction action, const SoakOutcome& o) {
  const SoakClass c = Classify(o);
  ++requests_;
  ++by_class_[static_cast<int>(c)];
  ++by_action_[static_cast<int>(action)];
  if (o.http_status != 0) ++by_status_[o.http_status];
  if (IsSoakFailure(c) && failure_notes_.size() < kMaxFailureNotes) {
    failure_notes_.push_back(std::string(SoakActionName(action)) + ": " +
                             std::string(SoakClassName(c)) + " " + o.detail);
  }
}

void SoakTally::Merge(const SoakTally& other) {
  requests_ += other.requests_;
  for (int i = 0; i < kSoakClassCount; ++i) by_class_[i] += other.by_class_[i];
  for (int i = 0; i < kSoakActionCount; ++i) by_action_[i] += other.by_action_[i];
  for (const auto& [code, n] : other.by_status_) by_status_[code] += n;
  for (const auto& note : other.failure_notes_) {
    if (failure_notes_.size() >= kMaxFailureNotes) break;
    failure_notes_.push_back(note);
  }
}

int64_t SoakTally::failures() const {
  int64_t n = 0;
  for (int i = 0; i < kSoakClassCount; ++i) {
    if (IsSoakFailure(static_cast<SoakClass>(i))) n += by_class_[i];
  }
  return n;
}

json SoakTally::ToJson() const {
  json classes = json::object(), actions = json::object(), statuses = json::object();
  for (int i = 0; i < kSoakClassCount; ++i) {
    classes[std::string(SoakClassName(static_cast<SoakClass>(i)))] = by_class_[i];
  }
  for (int i = 0; i < kSoakActionCount; ++i) {
    actions[std::string(SoakActionName(static_cast<SoakAction>(i)))] = by_action_[i];
  }
  for (const auto& [code, n] : by_status_) statuses[std::to_string(code)] = n;
  return {{"requests", requests_}, {"failures", failures()}, {"classes", classes},
          {"statuses", statuses},  {"actions", actions},     {"failure_notes", failure_notes_}};
}

// ---- 3. Memory and metrics ---------------------------------------------------------------

Result<uint64_t> ParseVmRssBytes(std::string_view text) {
  constexpr std::string_view kKey = "VmRSS:";
  size_t pos = 0;
  while (pos < text.size()) {
    size_t eol = text.find('\n', pos);
    if (eol == std::string_view::npos) eol = text.size();
    std::string_view line = text.substr(pos, eol - pos);
    pos = eol + 1;
    if (line.substr(0, kKey.size()) != kKey) continue;
    line.remove_prefix(kKey.size());
    while (!line.empty() && (line.front() == ' ' || line.front() == '\t')) line.remove_prefix(1);
    uint64_t kb = 0;
    size_t digits = 0;
    while (digits < line.size() && line[digits] >= '0' && line[digits] <= '9') {
      if (kb > (UINT64_MAX / 1024 - 9) / 10) return InvalidArgument("VmRSS overflows");
      kb = kb * 10 + static_cast<uint64_t>(line[digits] - '0');
      ++digits;
    }
    line.remove_prefix(digits);
    while (!line.empty() && line.front() == ' ') line.remove_prefix(1);
    if (digits == 0 || line != "kB") {
      return InvalidArgument("unreadable VmRSS line in /proc/PID/status");
    }
    return kb * 1024;
  }
  return InvalidArgument("no VmRSS line in /proc/PID/status");
}

Result<uint64_t> ReadProcessRssBytes(int pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/status");
  if (!f) return NotFound("no process " + std::to_string(pid));
  std::stringstream ss;
  ss << f.rdbuf();
  return ParseVmRssBytes(ss.str());
}

RssSummary SummarizeRss(const std::vector<RssSample>& samples) {
  RssSummary s;
  s.samples = static_cast<int>(samples.size());
  if (samples.empty()) return s;
  s.start_bytes = samples.front().bytes;
  s.end_bytes = samples.back().bytes;
  for (const auto& x : samples) s.max_bytes = std::max(s.max_bytes, x.bytes);
  const double half = samples.back().t_s / 2;
  double n = 0, st = 0, sb = 0;
  for (const auto& x : samples) {
    if (x.t_s < half) continue;
    n += 1;
    st += x.t_s;
    sb += static_cast<double>(x.bytes);
  }
  if (n < 2) return s;
  const double mt = st / n, mb = sb / n;
  double cov = 0, var = 0;
  for (const auto& x : samples) {
    if (x.t_s < half) continue;
    cov += (x.t_s - mt) * (static_cast<double>(x.bytes) - mb);
    var += (x.t_s - mt) * (x.t_s - mt);
  }
  s.late_slope_bytes_per_s = var > 0 ? cov / var : 0;
  return s;
}

Result<double> ParseDurationSeconds(std::string_view text) {
  std::string s(text);
  double mult = 1;
  if (!s.empty() && (s.back() == 's' || s.back() == 'm' || s.back() == 'h')) {
    mult = s.back() == 'h' ? 3600 : s.back() == 'm' ? 60 : 1;
    s.pop_back();
  }
  char* end = nullptr;
  const double v = s.empty() ? 0 : std::strtod(s.c_str(), &end);
  if (s.empty() || *end != '\0' || !(v > 0) || !std::isfinite(v * mult)) {
    return InvalidArgument("bad duration '" + std::string(text) +
                           "' (seconds, or a number with s, m or h)");
  }
  return v * mult;
}

// ---- 4. The run --------------------------------------------------------------------------

double SoakReport::requests_per_s() const {
  return wall_s > 0 ? static_cast<double>(tally.requests()) / wall_s : 0;
}

json SoakReport::ToJson() const {
  json rss = nullptr;
  if (this->rss.samples > 0) {
    rss = {{"samples", this->rss.samples},
           {"start_bytes", this->rss.start_bytes},
           {"max_bytes", this->rss.max_bytes},
           {"end_bytes", this->rss.end_bytes},
           {"late_slope_bytes_per_s", this->rss.late_slope_bytes_per_s},
           {"limit_bytes", rss_limit_bytes},
           {"over_limit", rss_over_limit}};
  }
  return {{"url", url},
          {"model", model},
          {"clients", clients},
          {"seed", seed},
          {"wall_s", wall_s},
          {"requests_per_s", requests_per_s()},
          {"tally", tally.ToJson()},
          {"rss", rss},
          {"server_exited", server_exited},
          {"server_draining", server_draining},
          {"metrics",
           {{"reads", metrics_reads},
            {"failures", metrics_failures},
            {"max", metrics_max},
            {"end", metrics_end}}},
          {"ok", ok()}};
}

namespace {

// The /metrics series the sampler follows: growth in any of them over a long run is a leak.
constexpr const char* kWatchedSeries[] = {"cachette_pins",
                                          "cachette_sessions",
                                          "cachette_kv_pages{state=\"used\"}",
                                          "cachette_kv_pages{state=\"pinned\"}",
                                          "cachette_queue_length",
                                          "cachette_running_sequences"};

struct Shared {
  ServerUrl url;
  const SoakOptions* o = nullptr;
  std::string model;
  double start_s = 0;
  std::atomic<bool> stop{false};
  std::atomic<bool> draining{false};
};

void Configure(httplib::Client& cli, double timeout_s) {
  const time_t sec = static_cast<time_t>(timeout_s);
  cli.set_connection_timeout(10, 0);
  cli.set_read_timeout(sec, 0);
  cli.set_write_timeout(sec, 0);
  cli.set_keep_alive(false);
}

Result<int> Connect(const ServerUrl& url, double timeout_s) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  const std::string port = std::to_string(url.port);
  if (getaddrinfo(url.host.c_str(), port.c_str(), &hints, &res) != 0 || res == nullptr) {
    return Unavailable("cannot resolve " + url.host);
  }
  int fd = -1;
  for (addrinfo* a = res; a != nullptr && fd < 0; a = a->ai_next) {
    fd = ::socket(a->ai_family, a->ai_socktype, a->ai_protocol);
    if (fd < 0) continue;
    timeval tv{};
    tv.tv_sec = static_cast<time_t>(timeout_s);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (::connect(fd, a->ai_addr, a->ai_addrlen) != 0) {
      ::close(fd);
      fd = -1;
    }
  }
  freeaddrinfo(res);
  if (fd < 0) return Unavailable("cannot connect to " + url.ToString());
  return fd;
}

// Writes `raw`; then either closes at once (abandon) or reads until EOF and returns the status
// of the first line.
SoakOutcome SendRaw(const ServerUrl& url, const std::string& raw, bool abandon, double timeout_s) {
  SoakOutcome out;
  auto fd = Connect(url, timeout_s);
  if (!fd.ok()) {
    out.transport_error = true;
    out.detail = fd.status().message();
    return out;
  }
  Fd sock(*fd);  // closed on every way out
  size_t sent = 0;
  while (sent < raw.size()) {
    const ssize_t n = ::send(sock.get(), raw.data() + sent, raw.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) break;  // the server may answer (413, 400) and close before reading it all
    sent += static_cast<size_t>(n);
  }
  if (abandon) {
    out.abandoned = true;
    return out;
  }
  std::string got;
  char buf[16384];
  for (;;) {
    const ssize_t n = ::recv(sock.get(), buf, sizeof buf, 0);
    if (n <= 0) {
      if (n < 0 && got.empty()) out.detail = "read failed or timed out";
      break;
    }
    got.append(buf, static_cast<size_t>(n));
    if (got.size() > (8 << 20)) break;
  }
  if (got.rfind("HTTP/1.", 0) == 0 && got.size() >= 12) {
    out.http_status = std::atoi(got.c_str() + 9);
  }
  if (out.http_status == 0) {
    out.transport_error = true;
    if (out.detail.empty()) {
      out.detail =
          got.empty() ? "closed without an answer" : "no status line: " + got.substr(0, 60);
    }
  } else if (out.http_status >= 500) {
    const size_t body = got.find("\r\n\r\n");
    out.detail = "HTTP " + std::to_string(out.http_status) + ": " +
                 (body == std::string::npos ? "" : got.substr(body + 4, 160));
  }
  return out;
}

// Scans an SSE body for data events: the error type of an error event, [DONE], and a count.
struct SseScan {
  std::string line;
  int events = 0;
  bool done = false;
  std::string error_type;
  std::string error_message;

  void Feed(const char* data, size_t n) {
    for (size_t i = 0; i < n; ++i) {
      if (data[i] != '\n') {
        line += data[i];
        continue;
      }
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.rfind("data:", 0) == 0) Event(std::string_view(line).substr(5));
      line.clear();
    }
  }
  void Event(std::string_view payload) {
    if (!payload.empty() && payload.front() == ' ') payload.remove_prefix(1);
    ++events;
    if (payload == "[DONE]") {
      done = true;
      return;
    }
    try {
      const json ev = json::parse(payload);
      if (ev.contains("error")) {
        const json& e = ev["error"];
        error_type = e.is_object() ? e.value("type", "unknown") : "unknown";
        error_message = e.is_object() ? e.value("message", "") : e.dump();
      }
    } catch (const std::exception&) {
      error_type = "unparsable_event";
      error_message = std::string(payload.substr(0, 80));
    }
  }
};

std::string BodyExcerpt(const std::string& body) { return body.substr(0, 160); }

// Remembers the pin a successful request created, and forgets one that was unpinned.
void TrackPins(const SoakRequest& q, int status, const std::string& body, SoakClientState* st) {
  try {
    if (q.action == SoakAction::kAdminUnpin && (status == 200 || status == 404)) {
      const json b = json::parse(q.body);
      if (b.contains("pin_id")) {
        const uint64_t id = b["pin_id"].get<uint64_t>();
        st->pin_ids.erase(std::remove(st->pin_ids.begin(), st->pin_ids.end(), id),
                          st->pin_ids.end());
      }
      return;
    }
    if (status != 200) return;
    uint64_t id = 0;
    if (q.action == SoakAction::kAdminPin) {
      id = json::parse(body).value("pin_id", uint64_t{0});
    } else if (q.action == SoakAction::kChatPin) {
      const json r = json::parse(body);
      if (r.contains("usage") && r["usage"].contains("cachette")) {
        id = r["usage"]["cachette"].value("pin_id", uint64_t{0});
      }
    }
    if (id != 0) {
      if (st->pin_ids.size() >= 16) st->pin_ids.erase(st->pin_ids.begin());
      st->pin_ids.push_back(id);
    }
  } catch (const std::exception&) {
    // An unparsable 200 body is the server's business; the pin list is only a convenience.
  }
}

httplib::Headers Headers(const SoakClientState& st, bool admin) {
  httplib::Headers h;
  const std::string& key = admin && !st.admin_key.empty() ? st.admin_key : st.api_key;
  if (!key.empty()) h.emplace("Authorization", "Bearer " + key);
  return h;
}

SoakOutcome SendHttp(Shared& sh, const SoakRequest& q, SoakClientState* st) {
  SoakOutcome out;
  try {
    httplib::Client cli(sh.url.host, sh.url.port);
    Configure(cli, sh.o->request_timeout_s);
    const std::string path = sh.url.base_path + q.path;
    const httplib::Headers h = Headers(*st, q.admin);
    if (q.transport == SoakTransport::kHttp) {
      auto res =
          q.method == "GET" ? cli.Get(path, h) : cli.Post(path, h, q.body, "application/json");
      if (!res) {
        out.transport_error = true;
        out.detail = "HTTP: " + httplib::to_string(res.error());
        return out;
      }
      out.http_status = res->status;
      if (res->status >= 500) {
        out.detail = "HTTP " + std::to_string(res->status) + ": " + BodyExcerpt(res->body);
      }
      TrackPins(q, res->status, res->body, st);
      return out;
    }
    // A stream: read to the end, or leave after the first data event.
    const bool leave = q.transport == SoakTransport::kStreamDisconnect;
    httplib::Request req;
    req.method = "POST";
    req.path = path;
    req.headers = h;
    req.headers.emplace("Content-Type", "application/json");
    req.headers.emplace("Accept", "text/event-stream");
    req.body = q.body;
    SseScan sse;
    std::string error_body;
    int status = 0;
    bool left = false;
    req.response_handler = [&status](const httplib::Response& r) {
      status = r.status;
      return true;
    };
    req.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
      if (status != 200) {
        if (error_body.size() < 4096) error_body.append(data, n);
        return true;
      }
      sse.Feed(data, n);
      if (leave && sse.events > 0) {
        left = true;
        return false;  // httplib closes the socket: the server sees the client go
      }
      return true;
    };
    auto res = cli.send(req);
    out.http_status = status;
    if (left) return out;
    if (!res) {
      out.transport_error = true;
      out.detail = "HTTP: " + httplib::to_string(res.error());
      return out;
    }
    if (status >= 500) {
      out.detail = "HTTP " + std::to_string(status) + ": " + BodyExcerpt(error_body);
    }
    if (status == 200) {
      out.stream_error_type = sse.error_type;
      out.stream_incomplete = !sse.done;
      if (!sse.error_type.empty()) {
        out.detail = "stream error " + sse.error_type + ": " + sse.error_message;
      } else if (!sse.done) {
        out.detail = "stream ended without [DONE] after " + std::to_string(sse.events) + " events";
      }
    }
    return out;
  } catch (const std::exception& e) {
    out.transport_error = true;
    out.detail = std::string("client: ") + e.what();
    return out;
  }
}

// GET /health: true when the server says it is draining.
bool ServerDraining(const Shared& sh) {
  try {
    httplib::Client cli(sh.url.host, sh.url.port);
    Configure(cli, 10);
    auto res = cli.Get(sh.url.base_path + "/health");
    if (!res) return false;
    const json j = json::parse(res->body);
    return j.value("status", "") == "draining";
  } catch (const std::exception&) {
    return false;
  }
}

SoakOutcome Send(Shared& sh, const SoakRequest& q, SoakClientState* st) {
  SoakOutcome out;
  switch (q.transport) {
    case SoakTransport::kRaw:
    case SoakTransport::kRawAbandon:
      out = SendRaw(sh.url, q.raw, q.transport == SoakTransport::kRawAbandon,
                    sh.o->request_timeout_s);
      break;
    default: out = SendHttp(sh, q, st);
  }
  if (q.action == SoakAction::kMalformed && !out.detail.empty()) {
    out.detail = std::string(SoakMalformedName(q.malformed)) + ": " + out.detail;
  }
  if (out.http_status == 503 && ServerDraining(sh)) {
    out.draining = true;
    sh.draining.store(true);
  }
  return out;
}

void ClientLoop(Shared& sh, int index, SoakTally* tally) {
  const SoakOptions& o = *sh.o;
  Rng rng(o.seed * 0x9e3779b97f4a7c15ull + static_cast<uint64_t>(index) * 0x2545f4914f6cdd1dull +
          1);
  SoakClientState st;
  st.api_key = o.api_key;
  st.admin_key = o.admin_key;
  st.model = sh.model;
  st.host = sh.url.host + ":" + std::to_string(sh.url.port);
  const double end_s = sh.start_s + o.duration_s;
  const double begin_s = sh.start_s + std::min(o.ramp_s, o.duration_s) * index / o.clients;
  while (!sh.stop.load() && SteadySeconds() < begin_s) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  while (!sh.stop.load() && !sh.draining.load() && SteadySeconds() < end_s) {
    const SoakRequest q = PlanSoakRequest(rng, o.mix, o.pools, st);
    const double sent_s = SteadySeconds() - sh.start_s;
    SoakOutcome out = Send(sh, q, &st);
    if (!out.detail.empty()) {
      char when[64];
      std::snprintf(when, sizeof when, "(sent at %.1f s, %.2f s) ", sent_s,
                    SteadySeconds() - sh.start_s - sent_s);
      out.detail = when + out.detail;
    }
    tally->Add(q.action, out);
  }
}

}  // namespace

Result<SoakReport> RunSoak(const SoakOptions& o) {
  if (o.clients < 1 || o.clients > 4096) return InvalidArgument("clients must be in [1, 4096]");
  if (!(o.duration_s > 0)) return InvalidArgument("the duration must be positive");
  if (!(o.ramp_s >= 0)) return InvalidArgument("the ramp must not be negative");
  if (o.mix.Total() <= 0) return InvalidArgument("the action mix has no weight");
  if (o.pools.tenants.empty() || o.pools.sessions.empty()) {
    return InvalidArgument("the tenant and session pools must not be empty");
  }
  Shared sh;
  CT_ASSIGN_OR_RETURN(sh.url, ParseServerUrl(o.url));
  sh.o = &o;
  SoakReport rep;
  rep.url = sh.url.ToString();
  rep.clients = o.clients;
  rep.seed = o.seed;
  rep.rss_limit_bytes = o.rss_limit_bytes;
  CT_ASSIGN_OR_RETURN(rep.model, FetchModelId(sh.url, o.api_key));
  sh.model = rep.model;

  std::vector<RssSample> rss;
  auto sample = [&](double t_s) {
    if (o.pid > 0) {
      auto b = ReadProcessRssBytes(o.pid);
      if (b.ok()) {
        rss.push_back({t_s, *b});
        if (o.rss_limit_bytes > 0 && *b > o.rss_limit_bytes) rep.rss_over_limit = true;
      } else if (b.status().code() == StatusCode::kNotFound) {
        rep.server_exited = true;
      }
    }
    try {
      httplib::Client cli(sh.url.host, sh.url.port);
      Configure(cli, 10);
      httplib::Headers h;
      const std::string& key = o.admin_key.empty() ? o.api_key : o.admin_key;
      if (!key.empty()) h.emplace("Authorization", "Bearer " + key);
      auto res = cli.Get(sh.url.base_path + "/metrics", h);
      if (!res || res->status != 200) {
        ++rep.metrics_failures;
        return;
      }
      ++rep.metrics_reads;
      for (const char* series : kWatchedSeries) {
        if (auto v = PrometheusValue(res->body, series)) {
          rep.metrics_end[series] = *v;
          double& m = rep.metrics_max[series];
          m = std::max(m, *v);
        }
      }
    } catch (const std::exception&) {
      ++rep.metrics_failures;
    }
  };

  sh.start_s = SteadySeconds();
  sample(0);
  std::thread sampler([&] {
    double next = o.sample_every_s;
    while (!sh.stop.load()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      const double t = SteadySeconds() - sh.start_s;
      if (t < next) continue;
      next = t + o.sample_every_s;
      sample(t);
    }
  });
  std::vector<SoakTally> tallies(static_cast<size_t>(o.clients));
  std::vector<std::thread> clients;
  clients.reserve(tallies.size());
  for (int i = 0; i < o.clients; ++i) {
    clients.emplace_back([&sh, i, t = &tallies[static_cast<size_t>(i)]] { ClientLoop(sh, i, t); });
  }
  for (auto& t : clients) t.join();
  rep.wall_s = SteadySeconds() - sh.start_s;
  sh.stop.store(true);
  sampler.join();
  sample(SteadySeconds() - sh.start_s);  // the end figure, after the last request

  for (const auto& t : tallies) rep.tally.Merge(t);
  rep.rss = SummarizeRss(rss);
  rep.server_draining = sh.draining.load();
  return rep;
}

}  // namespace cachette::bench_client
