// The soak test client: many concurrent clients send a seeded random mix of well-formed,
// abusive and malformed requests to a server for a bounded time, while a sampler watches the
// server's resident memory and /metrics. The question it answers: does the server stay up,
// never answer 5xx, and keep its memory flat under hostile traffic?
//
// Pieces, each usable alone (the pure ones are unit-tested in bench_client_test.cc):
//   1. the action mix: SoakAction, SoakMix, PlanSoakRequest() turn a seeded Rng into requests;
//   2. the tally: SoakOutcome -> SoakClass via Classify(), counted by SoakTally;
//   3. the memory figures: ParseVmRssBytes() over /proc/PID/status, SummarizeRss() over the
//      samples (start, max, end, slope of a least-squares line over the last half);
//   4. RunSoak(): the threads and the sockets.
// Thread-safety: the free functions are stateless and safe to call concurrently; SoakTally is
// thread-compatible (one per client thread, merged after the run).
//
// Outcome classes and which of them fail a run:
//   2xx, 4xx (any code but 429), 429 (backpressure), abandoned (the client left on purpose
//   before any answer): fine. 5xx (a 503 too, unless the server's /health says "draining"),
//   connection errors (connect, read or write failed, or timed out: the server died or hung)
//   and server-side stream errors (an SSE error event whose type is server_error or
//   service_unavailable): failures.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "bench_client/openai_client.h"
#include "bench_client/workload.h"
#include "core/prometheus.h"
#include "cachette/status.h"

namespace cachette::bench_client {

// What one client does next. Append only before kCount: the names below are reported.
enum class SoakAction : int {
  kChat = 0,          // non-streaming chat, random tenant, maybe a session
  kChatStream,        // streamed chat read to [DONE]
  kCompletionStream,  // streamed /v1/completions read to [DONE]
  kChatPin,           // chat with cache_control {"type": "ephemeral", "ttl": ...}
  kAdminPin,          // POST /v1/cache/pin (prefill or not, short ttl)
  kAdminUnpin,        // POST /v1/cache/unpin a pin id seen earlier, or a session
  kAdminClear,        // POST /v1/cache/clear one tenant (rarely: all)
  kAdminLookup,       // POST /v1/cache/lookup
  kAdminStats,        // GET /v1/cache/stats
  kMetrics,           // GET /metrics
  kStreamDisconnect,  // streamed chat; the socket is closed after the first SSE chunk
  kAbandon,           // a whole request written, the socket closed before the answer
  kMalformed,         // one of SoakMalformed
  kCount
};
inline constexpr int kSoakActionCount = static_cast<int>(SoakAction::kCount);
std::string_view SoakActionName(SoakAction a);

// The kinds of malformed request; the planner draws one uniformly. Any 2xx or 4xx answer is
// fine (the server may accept an unknown field); a 5xx or a hang is a finding.
enum class SoakMalformed : int {
  kBadJson = 0,        // truncated JSON
  kWrongTypes,         // messages a string, max_tokens a string, stream a number
  kHugeNumbers,        // 1e308 temperature, 2^70 max_tokens, a 400-digit seed
  kInvalidUtf8,        // 0xff 0xfe and a lone continuation byte inside content
  kEmptyBody,          // Content-Length: 0
  kUnknownFields,      // a valid request with extra unknown fields (may be 200)
  kOversizeMaxTokens,  // max_tokens 10^9
  kNegativeMaxTokens,  // max_tokens -5
  kUnknownRoute,       // POST /v1/nonexistent
  kWrongMethod,        // GET /v1/chat/completions
  kDeepNesting,        // 5,000 nested arrays
  kBadContentLength,   // Content-Length: abc
  kPartialBody,        // Content-Length larger than the body, then the socket is closed
  kBadExtensions,      // cache_salt a number, session_id an object, cache_control a string
  kHugePrompt,         // a prompt far beyond the context
  kBadAuth,            // a wrong bearer key (a server without keys ignores it: 2xx)
  kCount
};
inline constexpr int kSoakMalformedCount = static_cast<int>(SoakMalformed::kCount);
std::string_view SoakMalformedName(SoakMalformed m);

// Relative weights of the actions (not necessarily summing to anything); a zero weight turns
// an action off. Default() is the mix of issue 9: mostly generation, a fifth malformed.
struct SoakMix {
  std::array<int, kSoakActionCount> weights{};
  static SoakMix Default();
  // The action for a uniform draw `u` in [0, total weight). CT_CHECKs that u is in range.
  SoakAction Pick(uint64_t u) const;
  int Total() const;
};

// The pools requests draw from. Default() has 12 tenants ("" among them, one of 255 bytes, one
// of exactly 256 and two over 256, which a server may refuse with 400) and 16 sessions.
struct SoakPools {
  std::vector<std::string> tenants;
  std::vector<std::string> sessions;
  static SoakPools Default();
};

// How a planned request travels.
enum class SoakTransport : int {
  kHttp,              // one request, the whole answer read (httplib)
  kStream,            // SSE read to the end, events checked (httplib)
  kStreamDisconnect,  // SSE; the connection is dropped after the first data event (httplib)
  kRaw,               // `raw` bytes written to a socket, the answer read until EOF
  kRawAbandon,        // `raw` bytes written, the socket closed without reading
};

// One planned request. For kRaw and kRawAbandon `raw` holds the exact bytes on the wire;
// otherwise method, path and body describe it and the client adds the headers.
struct SoakRequest {
  SoakAction action = SoakAction::kChat;
  SoakMalformed malformed = SoakMalformed::kCount;  // kCount unless action is kMalformed
  SoakTransport transport = SoakTransport::kHttp;
  std::string method = "POST";
  std::string path;
  std::string body;
  bool admin = false;  // sent with the admin key
  std::string raw;
};

// What the planner may know about one client's history and the run's settings.
struct SoakClientState {
  std::vector<uint64_t> pin_ids;   // pins this client created and has not unpinned (<= 16)
  std::string api_key;             // "" when the server needs none
  std::string admin_key;           // "" : the api_key is used for admin calls
  std::string model;               // the "model" field of generation requests ("" : none)
  std::string host = "127.0.0.1";  // the Host header of raw requests
};

// Plans the next request of a client: draws the action from `mix`, then its tenant, session,
// sizes and body from `rng`. Deterministic: the same rng state, mix, pools and state give the
// same request. Generation requests ask for 1-24 tokens (64 with ignore_eos for a disconnect).
SoakRequest PlanSoakRequest(Rng& rng, const SoakMix& mix, const SoakPools& pools,
                            const SoakClientState& state);
// The same, for a given action (and, for kMalformed, a given kind).
SoakRequest PlanSoakAction(SoakAction action, SoakMalformed malformed, Rng& rng,
                           const SoakPools& pools, const SoakClientState& state);

// The bytes of an HTTP/1.1 request with Connection: close, a Host header, the given extra
// header lines (each "Name: value") and, when `content_length` is empty, a Content-Length equal
// to the body's size (else the given text, which may be a lie).
std::string RawHttpRequest(const std::string& method, const std::string& path,
                           const std::string& host, const std::vector<std::string>& headers,
                           const std::string& body, const std::string& content_length = "");

// What the client saw of one request.
struct SoakOutcome {
  int http_status = 0;             // 0 when no status line arrived
  bool transport_error = false;    // connect/read/write failed or timed out (not on purpose)
  bool abandoned = false;          // the client left before any answer, on purpose
  std::string stream_error_type;   // the "type" of an SSE error event; "" when none came
  bool stream_incomplete = false;  // a 200 stream read to the end ended without [DONE]
  bool draining = false;           // a 503 while the server's /health said "draining"
  std::string detail;              // a short description for the failure list
};

enum class SoakClass : int {
  k2xx = 0,
  k4xx,              // every 4xx except 429
  k429,              // backpressure: fine
  k5xx,              // failure
  k503Draining,      // fine: the server is shutting down
  kConnectionError,  // failure
  kStreamError,      // failure: a server-side error inside a 200 stream, or no [DONE]
  kAbandoned,        // fine: the client left on purpose
  kCount
};
inline constexpr int kSoakClassCount = static_cast<int>(SoakClass::kCount);
std::string_view SoakClassName(SoakClass c);
// True for the classes that fail a run.
bool IsSoakFailure(SoakClass c);

// The class of an outcome. Precedence: abandoned, connection error, HTTP status (503 draining
// before 5xx), then a 200 stream's error event (rate_limit_error counts as 429,
// invalid_request_error as 4xx, anything else as a stream error) or missing [DONE].
SoakClass Classify(const SoakOutcome& o);

// Counts of outcomes per class, per HTTP status, per action, and the first few failures.
// Thread-compatible: give each client thread its own and Merge() them after the run.
class SoakTally {
 public:
  void Add(SoakAction action, const SoakOutcome& o);
  void Merge(const SoakTally& other);

  int64_t requests() const { return requests_; }
  int64_t count(SoakClass c) const { return by_class_[static_cast<int>(c)]; }
  int64_t failures() const;
  const std::map<int, int64_t>& by_status() const { return by_status_; }
  int64_t action_count(SoakAction a) const { return by_action_[static_cast<int>(a)]; }
  // Up to kMaxFailureNotes "action: detail" lines, in the order added (then merged).
  const std::vector<std::string>& failure_notes() const { return failure_notes_; }
  static constexpr size_t kMaxFailureNotes = 8;

  nlohmann::json ToJson() const;

 private:
  int64_t requests_ = 0;
  std::array<int64_t, kSoakClassCount> by_class_{};
  std::array<int64_t, kSoakActionCount> by_action_{};
  std::map<int, int64_t> by_status_;
  std::vector<std::string> failure_notes_;
};

// The resident set size in bytes from the text of /proc/PID/status (its "VmRSS:   1234 kB"
// line). kInvalidArgument when the line is missing or unreadable (a kernel thread, a zombie).
Result<uint64_t> ParseVmRssBytes(std::string_view proc_status);
// Reads /proc/<pid>/status: kNotFound when the process is gone.
Result<uint64_t> ReadProcessRssBytes(int pid);

struct RssSample {
  double t_s = 0;  // seconds since the run started
  uint64_t bytes = 0;
};

struct RssSummary {
  int samples = 0;
  uint64_t start_bytes = 0, max_bytes = 0, end_bytes = 0;
  // Least-squares slope of bytes over time on the samples of the second half of the run
  // (t >= half the last sample's time); 0 with fewer than 2 such samples.
  double late_slope_bytes_per_s = 0;
};
RssSummary SummarizeRss(const std::vector<RssSample>& samples);


// "45", "45s", "10m", "2h", "1.5m": seconds (> 0). kInvalidArgument otherwise.
Result<double> ParseDurationSeconds(std::string_view text);

struct SoakOptions {
  std::string url;  // http://host:port
  double duration_s = 60;
  int clients = 64;
  uint64_t seed = 1;
  std::string api_key;           // sent as "Authorization: Bearer <key>" when set
  std::string admin_key;         // for /v1/cache/*; the api_key when empty
  int pid = 0;                   // > 0: sample /proc/<pid>/status every second
  uint64_t rss_limit_bytes = 0;  // > 0: an RSS sample above it fails the run
  double sample_every_s = 1.0;
  // Client i starts at i * min(ramp_s, duration_s) / clients: a burst of simultaneous connects can overflow a
  // server's listen backlog (cpp-httplib's default is 5), which a ramp of 1 s avoids.
  double ramp_s = 1.0;
  double request_timeout_s = 120;  // a request hanging longer is a connection error
  SoakMix mix = SoakMix::Default();
  SoakPools pools = SoakPools::Default();
};

struct SoakReport {
  std::string url;
  std::string model;
  int clients = 0;
  uint64_t seed = 0;
  double wall_s = 0;
  SoakTally tally;
  RssSummary rss;  // samples == 0 without a pid
  uint64_t rss_limit_bytes = 0;
  bool rss_over_limit = false;
  int metrics_reads = 0;  // successful GET /metrics by the sampler
  int metrics_failures = 0;
  // The maximum and the last value seen of a few /metrics series (pins, sessions, pages).
  std::map<std::string, double> metrics_max, metrics_end;
  bool server_draining = false;  // the run stopped early: /health said "draining"
  bool server_exited = false;    // /proc/<pid> disappeared during the run

  // Whether the run passed: no failure class counted, RSS within the limit, the server alive.
  bool ok() const { return tally.failures() == 0 && !rss_over_limit && !server_exited; }
  double requests_per_s() const;
  nlohmann::json ToJson() const;
};

// Runs the soak: `o.clients` threads, each with Rng(seed, client index), started over
// `o.ramp_s`, send planned requests one after another until `o.duration_s` has passed; one sampler
// thread reads RSS (when o.pid > 0) and /metrics every `o.sample_every_s`. Request failures are
// tallied, not returned. Returns kInvalidArgument for a bad URL or option and kUnavailable when the
// server does not answer GET /v1/models at the start.
Result<SoakReport> RunSoak(const SoakOptions& o);

}  // namespace cachette::bench_client
