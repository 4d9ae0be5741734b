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
// GET /v1/cache/stats; POST /v1/cache/lookup, /v1/cache/pin, /v1/cache/unpin, /v1/cache/clear.
// See docs/serving.md for the bodies.
//
// Thread-safety: handlers run on httplib's worker threads (http_threads of them); the scheduler
// and KvManager are synchronized on their own; Metrics has its own lock.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <thread>

#include "cachette/status.h"
#include "model/model.h"
#include "sched/scheduler.h"
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
  int http_threads = 32;                  // each open streaming response holds one
  size_t max_body_bytes = size_t{16} << 20;
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
  // Generation and admin handlers (admin ones live in admin_api.cc).
  void Generate(const httplib::Request& req, httplib::Response& res, Endpoint endpoint);
  void StreamResponse(httplib::Response& res, std::shared_ptr<StreamState> state);
  void CacheStats(httplib::Response& res);
  void CacheLookup(const httplib::Request& req, httplib::Response& res);
  void CachePin(const httplib::Request& req, httplib::Response& res);
  void CacheUnpin(const httplib::Request& req, httplib::Response& res);
  void CacheClear(const httplib::Request& req, httplib::Response& res);
  // Sets an OpenAI error body and its status; counts it.
  void Error(httplib::Response& res, const Status& s, const std::string& endpoint);
  void Json(httplib::Response& res, int status, const std::string& body,
            const std::string& endpoint);
  // Serving phase check: false (with a 503 set) while loading or draining.
  bool Serving(httplib::Response& res, const std::string& endpoint, bool allow_draining);
  void LogAndRecord(const StreamState& st, int http_status);

  ServerOptions options_;
  std::unique_ptr<httplib::Server> http_;
  std::thread listener_;  // runs httplib's accept loop; joined by Stop()
  int port_ = 0;
  std::atomic<Phase> phase_{Phase::kLoading};
  Backend backend_;  // written once, before phase_ becomes kReady (release/acquire)
  Metrics metrics_;
  std::atomic<uint64_t> next_id_{1};
  std::atomic<int64_t> in_flight_{0};  // generation responses not yet fully written
};

}  // namespace cachette::server
