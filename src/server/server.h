// The HTTP front of `cachette serve`: OpenAI routes, SSE streaming, health, metrics and the
// cache admin API, over cpp-httplib. Every library exception (httplib, JSON) is caught here.
//
// Phases (numbered, one way):
//   1 kLoading   Start() has bound the port; /health and generation answer 503 "loading".
//   2 kReady     SetReady() handed over the model and scheduler; everything is served.
//   3 kDraining  BeginDrain(): new generation requests get 503; running ones finish.
// Stop() then closes the listener and joins its threads (in-flight handlers finish first).
//
// Routes: POST /v1/chat/completions, /v1/completions; GET /v1/models, /health, /metrics;
// GET /v1/cache/stats, /v1/cache/events; POST /v1/cache/lookup, /v1/cache/pin, /v1/cache/unpin,
// /v1/cache/clear, /v1/cache/segments.
// See docs/serving.md for the bodies.
//
// Connections and overload: every accepted connection gets its own thread at once (no hidden queue
// inside the HTTP library), up to max_connections; only beyond that does the accept loop wait for
// one to end (the kernel's backlog holds the rest). So /health, /metrics and the admin API answer
// while every generation slot is busy. Generation requests beyond max_generations (max_running +
// max_queue) in flight get 429 before their body is parsed. A non-streaming client that disconnects
// while its request waits or runs is noticed within kDisconnectPoll and its request is cancelled (a
// streaming one is noticed by the next write).
//
// Access control: see auth.h (API keys for generation and /v1/models, admin key or loopback for
// /v1/cache/*; /health and /metrics open).
//
// Thread-safety: handlers run on the connection threads; the scheduler and KvManager are
// synchronized on their own; Metrics has its own lock.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "cachette/status.h"
#include "model/model.h"
#include "sched/scheduler.h"
#include "server/auth.h"
#include "server/metrics.h"
#include "server/openai.h"

namespace httplib {
class Server;
struct Request;
struct Response;
}  // namespace httplib

namespace cachette::server {

struct StreamState;  // one generation request in flight (server.cc)

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;                        // 0: any free port (see port())
  int max_connections = 1024;             // connection threads at most (each open one holds one)
  int max_generations = 0;                // generation requests in flight at most; 0: no bound
  size_t max_body_bytes = size_t{16} << 20;
  AccessPolicy access;
};

class HttpServer {
 public:
  explicit HttpServer(const ServerOptions& options);
  ~HttpServer();  // Stop()s
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Binds and starts listening on its own thread. kUnavailable when the address cannot be bound.
  Status Start();
  int port() const { return port_; }

  struct Backend {
    const Model* model = nullptr;
    sched::Scheduler* scheduler = nullptr;
    ApiContext api;
    // GET /v1/cache/events: where this server publishes its KV events (empty: not published).
    std::function<nlohmann::json()> kv_events_info;
  };
  // Phase 2. The backend's objects must outlive Stop().
  void SetReady(const Backend& backend);
  // Phase 3.
  void BeginDrain();
  // Waits until no generation response is being written (streams included), up to timeout_ms;
  // false on timeout.
  bool WaitIdle(int64_t timeout_ms);
  // Closes the listener and joins it; in-flight handlers complete first. Idempotent.
  void Stop();

 private:
  enum class Phase { kLoading = 1, kReady = 2, kDraining = 3 };
  void Routes();
  // Access check of a route; false (with a 401/403 set) when refused.
  bool Allowed(const httplib::Request& req, httplib::Response& res, Access access,
               const std::string& endpoint);
  // Generation and admin handlers (admin ones live in admin_api.cc).
  void Generate(const httplib::Request& req, httplib::Response& res, Endpoint endpoint);
  void StreamResponse(httplib::Response& res, std::shared_ptr<StreamState> state);
  void CacheStats(httplib::Response& res);
  void CacheLookup(const httplib::Request& req, httplib::Response& res);
  void CachePin(const httplib::Request& req, httplib::Response& res);
  void CacheUnpin(const httplib::Request& req, httplib::Response& res);
  void CacheClear(const httplib::Request& req, httplib::Response& res);
  void CacheEvents(httplib::Response& res);
  void CacheSegments(const httplib::Request& req, httplib::Response& res);
  // Sets an OpenAI error body and its status; counts it.
  void Error(httplib::Response& res, const Status& s, const std::string& endpoint,
             const ErrorDetail& detail = {});
  void Json(httplib::Response& res, int status, const std::string& body,
            const std::string& endpoint);
  // Serving phase check: false (with a 503 set) while loading or draining.
  bool Serving(httplib::Response& res, const std::string& endpoint, bool allow_draining);
  void LogAndRecord(const StreamState& st, int http_status);

  ServerOptions options_;
  std::unique_ptr<httplib::Server> http_;
  std::thread listener_;  // runs httplib's accept loop; joined by Stop()
  std::atomic<bool> listener_returned_{false};  // its accept loop has returned
  int port_ = 0;
  std::atomic<Phase> phase_{Phase::kLoading};
  Backend backend_;  // written once, before phase_ becomes kReady (release/acquire)
  Metrics metrics_;
  std::atomic<uint64_t> next_id_{1};
  std::atomic<int64_t> in_flight_{0};  // generation responses not yet fully written
  std::atomic<int64_t> generations_{0};  // generation requests in a handler or being written
};

}  // namespace cachette::server
