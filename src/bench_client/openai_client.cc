#include "bench_client/openai_client.h"

#include <httplib.h>

#include <chrono>
#include <exception>
#include <nlohmann/json.hpp>

namespace cachette::bench_client {
namespace {

using nlohmann::json;

// Streams can sit queued for a long time on a loaded server (cachette sends pings meanwhile),
// so reads wait long; a server that never answers is still noticed.
constexpr int kConnectTimeoutS = 10;
constexpr int kReadTimeoutS = 600;

void ConfigureClient(httplib::Client& cli) {
  cli.set_connection_timeout(kConnectTimeoutS, 0);
  cli.set_read_timeout(kReadTimeoutS, 0);
  cli.set_write_timeout(kReadTimeoutS, 0);
  cli.set_keep_alive(false);
}

std::string ErrorMessageOf(const std::string& body) {
  try {
    const json j = json::parse(body);
    if (j.contains("error") && j["error"].is_object() && j["error"].contains("message")) {
      return j["error"]["message"].get<std::string>();
    }
  } catch (const std::exception&) {
  }
  return body.substr(0, 200);
}

}  // namespace

double SteadySeconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

std::string ServerUrl::ToString() const {
  return "http://" + host + ":" + std::to_string(port) + base_path;
}

Result<ServerUrl> ParseServerUrl(const std::string& url) {
  constexpr std::string_view kScheme = "http://";
  if (url.rfind(kScheme, 0) != 0) {
    return InvalidArgument("--url must start with http:// (got '" + url + "')");
  }
  std::string rest = url.substr(kScheme.size());
  ServerUrl u;
  const size_t slash = rest.find('/');
  if (slash != std::string::npos) {
    u.base_path = rest.substr(slash);
    rest.resize(slash);
  }
  while (!u.base_path.empty() && u.base_path.back() == '/') u.base_path.pop_back();
  if (u.base_path.size() >= 3 && u.base_path.compare(u.base_path.size() - 3, 3, "/v1") == 0) {
    u.base_path.resize(u.base_path.size() - 3);
  }
  const size_t colon = rest.rfind(':');
  if (colon != std::string::npos) {
    const std::string port = rest.substr(colon + 1);
    u.port = 0;
    for (char c : port) {
      u.port = (c >= '0' && c <= '9' && u.port < 65536) ? u.port * 10 + (c - '0') : 1 << 20;
    }
    if (port.empty() || u.port <= 0 || u.port > 65535) {
      return InvalidArgument("bad port in URL '" + url + "'");
    }
    rest.resize(colon);
  }
  if (rest.empty()) return InvalidArgument("no host in URL '" + url + "'");
  u.host = rest;
  return u;
}

Result<std::string> FetchModelId(const ServerUrl& url, const std::string& api_key) {
  try {
    httplib::Client cli(url.host, url.port);
    ConfigureClient(cli);
    httplib::Headers h;
    if (!api_key.empty()) h.emplace("Authorization", "Bearer " + api_key);
    auto res = cli.Get(url.base_path + "/v1/models", h);
    if (!res) {
      return Unavailable("GET " + url.ToString() + "/v1/models: " + httplib::to_string(res.error()));
    }
    if (res->status != 200) {
      return Unavailable("GET /v1/models: HTTP " + std::to_string(res->status) +
                         (res->status == 401 ? " (give --api-key)" : ""));
    }
    const json j = json::parse(res->body);
    if (!j.contains("data") || !j["data"].is_array() || j["data"].empty()) {
      return Unavailable("GET /v1/models listed no model");
    }
    return j["data"][0].at("id").get<std::string>();
  } catch (const std::exception& e) {
    return Unavailable(std::string("GET /v1/models: ") + e.what());
  }
}

void SseRecorder::Feed(std::string_view data, double now_s) {
  for (char c : data) {
    if (c != '\n') {
      line_ += c;
      continue;
    }
    if (!line_.empty() && line_.back() == '\r') line_.pop_back();
    // Comment lines (": ping") and blank separators carry nothing to record.
    if (line_.rfind("data:", 0) == 0) {
      std::string_view payload(line_);
      payload.remove_prefix(5);
      if (!payload.empty() && payload.front() == ' ') payload.remove_prefix(1);
      Event(payload, now_s);
    }
    line_.clear();
  }
}

void SseRecorder::Event(std::string_view payload, double now_s) {
  if (payload == "[DONE]") {
    done_ = true;
    return;
  }
  json ev;
  try {
    ev = json::parse(payload);
  } catch (const std::exception&) {
    r_->status = "error";
    r_->error = "unparsable event: " + std::string(payload.substr(0, 100));
    return;
  }
  try {
    if (ev.contains("error")) {
      r_->status = "error";
      const json& e = ev["error"];
      r_->error = e.is_object() && e.contains("message") ? e["message"].get<std::string>()
                                                          : e.dump();
      return;
    }
    if (first_event_s_ < 0 && ev.contains("choices") && !ev["choices"].empty()) {
      first_event_s_ = now_s;
    }
    if (ev.contains("choices")) {
      for (const json& ch : ev["choices"]) {
        std::string piece;
        if (ch.contains("delta") && ch["delta"].contains("content") &&
            ch["delta"]["content"].is_string()) {
          piece = ch["delta"]["content"].get<std::string>();
        } else if (ch.contains("text") && ch["text"].is_string()) {
          piece = ch["text"].get<std::string>();
        }
        if (piece.empty()) continue;
        if (last_content_s_ < 0) {
          r_->ttft_s = now_s - r_->sent_s;
        } else {
          r_->gaps_s.push_back(now_s - last_content_s_);
        }
        last_content_s_ = now_s;
        r_->answer += piece;
      }
    }
    if (ev.contains("usage") && ev["usage"].is_object()) {
      const json& u = ev["usage"];
      r_->prompt_tokens = u.value("prompt_tokens", int64_t{0});
      r_->completion_tokens = u.value("completion_tokens", int64_t{0});
      if (u.contains("prompt_tokens_details") && u["prompt_tokens_details"].is_object()) {
        r_->cached_tokens = u["prompt_tokens_details"].value("cached_tokens", int64_t{0});
      }
      if (u.contains("cachette") && u["cachette"].contains("cached_tokens_by_tier")) {
        for (const auto& [tier, n] : u["cachette"]["cached_tokens_by_tier"].items()) {
          if (n.is_number_integer()) r_->cached_by_tier[tier] = n.get<int64_t>();
        }
      }
    }
  } catch (const std::exception& e) {
    r_->status = "error";
    r_->error = std::string("malformed event: ") + e.what();
  }
  // A stream with no content at all (an empty answer) still has a first token time.
  if (r_->ttft_s < 0 && first_event_s_ >= 0 && ev.contains("usage")) {
    r_->ttft_s = first_event_s_ - r_->sent_s;
  }
}

void StreamChat(const ServerUrl& url, const std::string& model,
                const std::vector<ChatMessage>& messages, int max_tokens, double run_start_s,
                RequestRecord* r, const std::vector<std::string>& stop) {
  r->status = "ok";
  try {
    json msgs = json::array();
    for (const auto& m : messages) msgs.push_back({{"role", m.role}, {"content", m.content}});
    json body = {{"model", model},
                 {"messages", msgs},
                 {"max_tokens", max_tokens},
                 {"temperature", 0},
                 {"stream", true},
                 {"stream_options", {{"include_usage", true}}}};
    // Other servers may refuse fields they do not know (vLLM refuses a non-zero priority
    // without its priority policy), so a plain request carries none of them.
    if (r->priority != 0) body["priority"] = r->priority;
    if (r->deadline_ms > 0) body["deadline_ms"] = r->deadline_ms;
    if (!r->program_id.empty()) body["program_id"] = r->program_id;
    if (!r->session_id.empty()) body["session_id"] = r->session_id;
    if (!r->tool.empty()) body["tool"] = r->tool;
    if (!stop.empty()) body["stop"] = stop;
    httplib::Client cli(url.host, url.port);
    ConfigureClient(cli);
    httplib::Request req;
    req.method = "POST";
    req.path = url.base_path + "/v1/chat/completions";
    req.headers = {{"Content-Type", "application/json"}, {"Accept", "text/event-stream"}};
    req.body = body.dump();
    SseRecorder sse(r);
    std::string error_body;
    req.response_handler = [r](const httplib::Response& res) {
      r->http_status = res.status;
      return true;
    };
    req.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
      if (r->http_status != 200) {
        error_body.append(data, n);
      } else {
        sse.Feed(std::string_view(data, n), SteadySeconds() - run_start_s);
      }
      return true;
    };
    r->sent_s = SteadySeconds() - run_start_s;
    auto res = cli.send(req);
    r->e2e_s = SteadySeconds() - run_start_s - r->sent_s;
    if (!res) {
      r->status = "error";
      r->error = "HTTP: " + httplib::to_string(res.error());
      return;
    }
    if (r->http_status != 200) {
      r->status = "error";
      r->error = "HTTP " + std::to_string(r->http_status) + ": " + ErrorMessageOf(error_body);
      return;
    }
    if (r->status == "ok" && !sse.done()) {
      r->status = "error";
      r->error = "stream ended without [DONE]";
    }
  } catch (const std::exception& e) {
    r->status = "error";
    r->error = std::string("client: ") + e.what();
  }
}

}  // namespace cachette::bench_client
