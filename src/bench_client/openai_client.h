// A minimal OpenAI API client for benchmarks: streamed chat completions timed on the client.
// Speaks to any server with /v1/chat/completions (cachette, llama.cpp's server, vLLM, ...).
// cpp-httplib and nlohmann-json exceptions are caught here; callers see Status values.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "bench_client/stats.h"
#include "cachette/status.h"

namespace cachette::bench_client {

// Where the server is: parsed from "http://host:port" (a trailing "/" or "/v1" is dropped).
struct ServerUrl {
  std::string host;
  int port = 80;
  std::string base_path;  // prepended to /v1/...: for servers behind a path prefix
  std::string ToString() const;
};
// InvalidArgument for anything but http:// URLs with a host (https needs TLS, not built in).
Result<ServerUrl> ParseServerUrl(const std::string& url);

// The first model id of GET /v1/models, sent with `api_key` as a Bearer token when given.
// Unavailable when the server does not answer or refuses (a 401 says to give an API key).
Result<std::string> FetchModelId(const ServerUrl& url, const std::string& api_key = {});

struct ChatMessage {
  std::string role;
  std::string content;
};

// Parses a Server-Sent Events body fed in arbitrary pieces and records, into a RequestRecord,
// the arrival time of each content chunk, the usage chunk and error events. Thread-compatible.
class SseRecorder {
 public:
  // `r` is borrowed and must outlive this object; times are seconds since `sent_s`'s origin.
  explicit SseRecorder(RequestRecord* r) : r_(r) {}
  // Consumes `data`, received at `now_s`.
  void Feed(std::string_view data, double now_s);
  // True once "data: [DONE]" was seen.
  bool done() const { return done_; }

 private:
  void Event(std::string_view payload, double now_s);

  RequestRecord* r_;
  std::string line_;
  double last_content_s_ = -1;
  double first_event_s_ = -1;
  bool done_ = false;
};

// Sends one streamed chat completion (temperature 0, stream_options.include_usage) and fills
// `r`: sent time, TTFT (first content chunk; the first chunk of any kind if no content came),
// the gaps between content chunks, usage (cached tokens in total and per tier when the server
// reports them) and status "ok" or "error" with the HTTP status and message. `run_start_s` is
// the run's origin on the steady clock (seconds). The scheduling fields already set in `*r`
// are sent as cachette's request fields, each only when set: "priority" (non-zero),
// "deadline_ms" (> 0), "program_id", "session_id" and "tool" (non-empty). `stop` (when not
// empty) is sent as the request's stop strings. Never throws.
void StreamChat(const ServerUrl& url, const std::string& model,
                const std::vector<ChatMessage>& messages, int max_tokens, double run_start_s,
                RequestRecord* r, const std::vector<std::string>& stop = {});

// Seconds on the steady clock.
double SteadySeconds();

}  // namespace cachette::bench_client
