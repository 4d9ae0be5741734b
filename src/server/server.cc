#include "server/server.h"

#include <httplib.h>

#include <chrono>
#include <ctime>

#include "core/log.h"
#include "core/timer.h"

namespace cachette::server {

// One generation request in flight: what the HTTP side knows of it.
struct StreamState {
  GenerateCall call;
  std::shared_ptr<sched::RequestStream> stream;
  std::string id;
  std::string endpoint;  // "chat" or "completions"
  int64_t created = 0;
  int64_t start_ns = 0, first_ns = 0, last_ns = 0;
  std::string text;
  bool first_chunk = true;
  bool finished = false;  // a terminal event was seen
  int64_t tokens = 0;     // token events received
  std::string finish;
  sched::RequestUsage usage;
  Status error;
};

namespace {

constexpr auto kPoll = std::chrono::milliseconds(1000);

int64_t UnixSeconds() { return static_cast<int64_t>(std::time(nullptr)); }

// Applies one event to the state; records inter-token gaps.
void Absorb(StreamState& st, sched::StreamEvent& e, Metrics& m) {
  const int64_t now = NowNanos();
  switch (e.kind) {
    case sched::StreamEvent::Kind::kToken:
      if (st.first_ns == 0) {
        st.first_ns = now;
      } else {
        m.ObserveInterToken(static_cast<double>(now - st.last_ns) * 1e-9);
      }
      st.last_ns = now;
      st.text += e.text;
      ++st.tokens;
      break;
    case sched::StreamEvent::Kind::kDone:
      st.finished = true;
      st.finish = e.finish == "cancelled" ? "stop" : e.finish;
      st.usage = e.usage;
      break;
    case sched::StreamEvent::Kind::kError:
      st.finished = true;
      st.error = e.error;
      st.usage = e.usage;
      break;
  }
}

}  // namespace

HttpServer::HttpServer(const ServerOptions& options)
    : options_(options), http_(std::make_unique<httplib::Server>()) {}

HttpServer::~HttpServer() { Stop(); }

Status HttpServer::Start() {
  const int threads = std::max(4, options_.http_threads);
  // WART: httplib takes ownership of a raw TaskQueue pointer.
  http_->new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  http_->set_payload_max_length(options_.max_body_bytes);
  http_->set_read_timeout(30, 0);
  http_->set_write_timeout(10, 0);
  http_->set_keep_alive_timeout(5);
  Routes();
  try {
    if (options_.port == 0) {
      port_ = http_->bind_to_any_port(options_.host);
      if (port_ < 0) port_ = 0;
    } else {
      port_ = http_->bind_to_port(options_.host, options_.port) ? options_.port : 0;
    }
  } catch (const std::exception& e) {
    port_ = 0;
  }
  if (port_ <= 0) {
    return Unavailable("cannot listen on " + options_.host + ":" + std::to_string(options_.port) +
                       " (address in use or not local?)");
  }
  listener_ = std::thread([this] {
    try {
      http_->listen_after_bind();
    } catch (const std::exception& e) {
      CT_LOG(kError) << "http listener stopped: " << e.what();
    }
  });
  return Status::Ok();
}

void HttpServer::SetReady(const Backend& backend) {
  backend_ = backend;
  phase_.store(Phase::kReady, std::memory_order_release);
}

void HttpServer::BeginDrain() { phase_.store(Phase::kDraining, std::memory_order_release); }

bool HttpServer::WaitIdle(int64_t timeout_ms) {
  const int64_t deadline = NowNanos() + timeout_ms * 1000000;
  while (in_flight_.load(std::memory_order_acquire) > 0) {
    if (NowNanos() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return true;
}

void HttpServer::Stop() {
  if (!listener_.joinable()) return;
  http_->stop();
  listener_.join();
}

void HttpServer::Json(httplib::Response& res, int status, const std::string& body,
                      const std::string& endpoint) {
  res.status = status;
  res.set_content(body, "application/json");
  metrics_.CountRequest(endpoint, status);
}

void HttpServer::Error(httplib::Response& res, const Status& s, const std::string& endpoint) {
  Json(res, HttpStatusFor(s), ErrorBody(s), endpoint);
}

bool HttpServer::Serving(httplib::Response& res, const std::string& endpoint,
                         bool allow_draining) {
  const Phase p = phase_.load(std::memory_order_acquire);
  if (p == Phase::kReady || (p == Phase::kDraining && allow_draining)) return true;
  Error(res,
        Unavailable(p == Phase::kLoading ? "the model is loading; retry shortly"
                                         : "the server is shutting down"),
        endpoint);
  return false;
}

void HttpServer::Routes() {
  using httplib::Request;
  using httplib::Response;
  // Every handler is wrapped: no exception reaches httplib.
  auto guard = [this](const std::string& endpoint, auto fn) {
    return [this, endpoint, fn](const Request& req, Response& res) {
      try {
        fn(req, res);
      } catch (const std::exception& e) {
        Error(res, Status(StatusCode::kIOError, std::string("internal error: ") + e.what()),
              endpoint);
      }
    };
  };
  http_->Post("/v1/chat/completions", guard("chat", [this](const Request& q, Response& r) {
                Generate(q, r, Endpoint::kChat);
              }));
  http_->Post("/v1/completions", guard("completions", [this](const Request& q, Response& r) {
                Generate(q, r, Endpoint::kCompletion);
              }));
  http_->Get("/v1/models", guard("models", [this](const Request&, Response& r) {
               if (!Serving(r, "models", true)) return;
               nlohmann::json m = {{"id", backend_.api.model_id},
                                   {"object", "model"},
                                   {"created", UnixSeconds()},
                                   {"owned_by", "cachette"},
                                   {"max_model_len", backend_.api.n_ctx}};
               Json(r, 200, Dump({{"object", "list"}, {"data", nlohmann::json::array({m})}}),
                    "models");
             }));
  http_->Get("/health", guard("health", [this](const Request&, Response& r) {
               const Phase p = phase_.load(std::memory_order_acquire);
               const char* s = p == Phase::kReady     ? "ok"
                               : p == Phase::kLoading ? "loading"
                                                      : "draining";
               Json(r, p == Phase::kReady ? 200 : 503, Dump({{"status", s}}), "health");
             }));
  http_->Get("/metrics", guard("metrics", [this](const Request&, Response& r) {
               Metrics::Gauges g;
               const Phase p = phase_.load(std::memory_order_acquire);
               g.ready = p == Phase::kReady;
               if (p != Phase::kLoading) {
                 g.sched = backend_.scheduler->Stats();
                 g.kv = backend_.scheduler->kv().GetStats();
                 g.pins = backend_.scheduler->pins().List().size();
                 g.sessions = backend_.scheduler->pins().sessions();
               }
               metrics_.CountRequest("metrics", 200);
               r.status = 200;
               std::string text = metrics_.Render(g);
               // The chunk store's own families (hits, bytes, evictions, corruptions and load
               // latency per tier), when a tiered source is configured.
               if (p != Phase::kLoading) text += backend_.scheduler->source().PrometheusText();
               r.set_content(text, "text/plain; version=0.0.4");
             }));
  http_->Get("/v1/cache/stats", guard("admin", [this](const Request&, Response& r) {
               if (Serving(r, "admin", true)) CacheStats(r);
             }));
  http_->Post("/v1/cache/lookup", guard("admin", [this](const Request& q, Response& r) {
                if (Serving(r, "admin", true)) CacheLookup(q, r);
              }));
  http_->Post("/v1/cache/pin", guard("admin", [this](const Request& q, Response& r) {
                if (Serving(r, "admin", false)) CachePin(q, r);
              }));
  http_->Post("/v1/cache/unpin", guard("admin", [this](const Request& q, Response& r) {
                if (Serving(r, "admin", true)) CacheUnpin(q, r);
              }));
  http_->Post("/v1/cache/clear", guard("admin", [this](const Request& q, Response& r) {
                if (Serving(r, "admin", true)) CacheClear(q, r);
              }));
  // Unknown routes and httplib's own errors (413, 400) get an OpenAI error body.
  http_->set_error_handler(httplib::Server::HandlerWithResponse([this](const Request& q,
                                                                       Response& r) {
    if (!r.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
    const std::string msg = r.status == 404
                                ? "no route " + q.method + " " + q.path
                                : "HTTP error " + std::to_string(r.status);
    const Status s = r.status == 404 ? NotFound(msg) : InvalidArgument(msg);
    nlohmann::json j = {{"error", {{"message", msg}, {"type", "invalid_request_error"},
                                   {"param", nullptr}, {"code", StatusCodeName(s.code())}}}};
    r.set_content(Dump(j), "application/json");
    metrics_.CountRequest("other", r.status);
    return httplib::Server::HandlerResponse::Handled;
  }));
  http_->set_exception_handler([this](const Request&, Response& r, std::exception_ptr) {
    Error(r, Status(StatusCode::kIOError, "internal error"), "other");
  });
}

void HttpServer::Generate(const httplib::Request& req, httplib::Response& res,
                          Endpoint endpoint) {
  const std::string ep = endpoint == Endpoint::kChat ? "chat" : "completions";
  if (!Serving(res, ep, false)) return;
  auto st = std::make_shared<StreamState>();
  st->start_ns = NowNanos();
  st->endpoint = ep;
  st->created = UnixSeconds();
  st->id = (endpoint == Endpoint::kChat ? "chatcmpl-" : "cmpl-") +
           std::to_string(next_id_.fetch_add(1));
  auto call = ParseGenerate(req.body, endpoint, backend_.api);
  if (!call.ok()) return Error(res, call.status(), ep);
  st->call = std::move(*call);
  auto stream = backend_.scheduler->Submit(st->call.request);
  if (!stream.ok()) return Error(res, stream.status(), ep);
  st->stream = *stream;
  in_flight_.fetch_add(1, std::memory_order_acq_rel);
  if (st->call.stream) return StreamResponse(res, st);  // the releaser ends the flight

  // WART: a non-streaming client that disconnects is not noticed (httplib gives no socket
  // event); its request runs to max_tokens.
  sched::StreamEvent e;
  while (!st->finished) {
    if (st->stream->Next(&e, kPoll)) Absorb(*st, e, metrics_);
  }
  in_flight_.fetch_sub(1, std::memory_order_acq_rel);
  if (!st->error.ok()) {
    LogAndRecord(*st, HttpStatusFor(st->error));
    return Error(res, st->error, ep);
  }
  LogAndRecord(*st, 200);
  Json(res, 200,
       Dump(CompletionJson(st->call, st->id, st->created, backend_.api.model_id, st->text,
                           st->finish, st->usage)),
       ep);
}

void HttpServer::StreamResponse(httplib::Response& res, std::shared_ptr<StreamState> st) {
  res.set_header("Cache-Control", "no-cache");
  res.set_header("X-Accel-Buffering", "no");
  const std::string model = backend_.api.model_id;
  auto provider = [this, st, model](size_t, httplib::DataSink& sink) -> bool {
    auto send = [&](const std::string& data) {
      const std::string frame = "data: " + data + "\n\n";
      return sink.write(frame.data(), frame.size());
    };
    sched::StreamEvent e;
    if (!st->stream->Next(&e, kPoll)) {
      // A comment line: keeps proxies from timing out and notices a client that left.
      static constexpr char kPing[] = ": ping\n\n";
      if (!sink.write(kPing, sizeof kPing - 1)) {
        st->stream->Cancel();
        return false;
      }
      return true;
    }
    Absorb(*st, e, metrics_);
    bool ok = true;
    if (e.kind == sched::StreamEvent::Kind::kToken) {
      ok = send(Dump(ChunkJson(st->call, st->id, st->created, model, e.text, st->first_chunk,
                               nullptr)));
      st->first_chunk = false;
    } else if (e.kind == sched::StreamEvent::Kind::kDone) {
      ok = send(Dump(ChunkJson(st->call, st->id, st->created, model, "", st->first_chunk,
                               &st->finish)));
      if (ok && st->call.include_usage) {
        ok = send(Dump(UsageChunkJson(st->call, st->id, st->created, model, st->usage)));
      }
      ok = ok && send("[DONE]");
      LogAndRecord(*st, 200);
      sink.done();
    } else {
      // Headers (200) are gone already: the error travels as an SSE event.
      ok = send(ErrorBody(st->error)) && send("[DONE]");
      LogAndRecord(*st, HttpStatusFor(st->error));
      sink.done();
    }
    if (!ok) st->stream->Cancel();
    return ok;
  };
  // Runs when httplib is done with the response, whatever happened.
  auto releaser = [this, st](bool) {
    if (!st->finished) {
      st->stream->Cancel();  // the client left mid-stream: free the sequence now
      CT_LOG(kInfo) << "request " << st->id << " " << st->endpoint
                    << " client disconnected after " << st->tokens << " tokens; cancelled";
      metrics_.CountRequest(st->endpoint, 499);
    }
    in_flight_.fetch_sub(1, std::memory_order_acq_rel);
  };
  res.status = 200;
  res.set_chunked_content_provider("text/event-stream", provider, releaser);
}

void HttpServer::LogAndRecord(const StreamState& st, int http_status) {
  const double e2e = static_cast<double>(NowNanos() - st.start_ns) * 1e-9;
  const double ttft = st.first_ns ? static_cast<double>(st.first_ns - st.start_ns) * 1e-9 : 0;
  const double decode = st.first_ns && st.last_ns > st.first_ns
                            ? static_cast<double>(st.last_ns - st.first_ns) * 1e-9
                            : 0;
  const int64_t gen = st.usage.completion_tokens;
  metrics_.ObserveGeneration(st.usage, ttft, e2e);
  if (st.call.stream) metrics_.CountRequest(st.endpoint, http_status);
  std::string tiers;
  for (const auto& t : st.usage.cached_by_tier) {
    tiers += (tiers.empty() ? "" : ",") + t.tier + "=" + std::to_string(t.tokens);
  }
  char rate[32];
  std::snprintf(rate, sizeof rate, "%.1f", gen > 1 && decode > 0 ? (gen - 1) / decode : 0.0);
  char ms[64];
  std::snprintf(ms, sizeof ms, "ttft=%.1fms total=%.1fms", ttft * 1e3, e2e * 1e3);
  CT_LOG(kInfo) << "request " << st.id << " " << st.endpoint << (st.call.stream ? " stream" : "")
                << " status=" << http_status << " prompt=" << st.usage.prompt_tokens
                << " cached=" << st.usage.cached_tokens << " [" << tiers << "] gen=" << gen
                << " " << ms << " " << rate << " tok/s finish="
                << (st.error.ok() ? st.finish : st.error.ToString());
}

}  // namespace cachette::server
