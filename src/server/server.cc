#include "server/server.h"

#include <dirent.h>
#include <httplib.h>
#include <netdb.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <ctime>
#include <map>
#include <mutex>

#include "core/log.h"
#include "core/timer.h"
#include "server/http_listen.h"

namespace cachette::server {

// One generation request in flight: what the HTTP side knows of it.
struct StreamState {
  GenerateCall call;
  std::shared_ptr<sched::RequestStream> stream;
  std::string id;
  std::string endpoint;  // "chat" or "completions"
  int64_t created = 0;
  int64_t start_ns = 0, first_ns = 0, last_ns = 0;
  std::string text;  // the completion (an echoed prompt is not in it)
  // Logprobs (call.request.logprobs >= 0): the echoed prompt's entries, then each generated
  // token's; a stream has sent the first `logprobs_sent` of them.
  std::vector<LogprobEntry> logprobs;
  size_t logprobs_sent = 0;
  bool prompt_seen = false;  // the first event (which carries the prompt's logprobs) arrived
  bool echo_sent = false;    // a stream's echo chunk is out
  bool first_chunk = true;
  bool finished = false;  // a terminal event was seen
  int64_t tokens = 0;     // token events received
  std::string finish;
  sched::RequestUsage usage;
  Status error;
  std::atomic<int64_t>* slot = nullptr;  // the generation slot held; released with the state

  StreamState() = default;
  StreamState(const StreamState&) = delete;
  StreamState& operator=(const StreamState&) = delete;
  ~StreamState() {
    if (slot != nullptr) slot->fetch_sub(1, std::memory_order_acq_rel);
  }
};

namespace {

constexpr auto kPoll = std::chrono::milliseconds(1000);
// How often a non-streaming request checks that its client is still connected.
constexpr auto kDisconnectPoll = std::chrono::milliseconds(100);

// httplib's TaskQueue as one thread per connection, started at once: a connection never waits in a
// queue nobody can see. Only at max_threads live ones does enqueue (the accept loop) wait for one
// to end; the connections behind then wait in the kernel's listen backlog.
//
// A thread's states (numbered, one way):
//   1 running fn  --fn returns-->  2 finished (its id in finished_)
//   2  --the next enqueue, or shutdown-->  3 joined.
class ConnectionThreads : public httplib::TaskQueue {
 public:
  explicit ConnectionThreads(int max_threads) : max_(std::max(1, max_threads)) {}
  ~ConnectionThreads() override { shutdown(); }

  void enqueue(std::function<void()> fn) override {
    // Shared so that a failed thread start keeps the task (it owns the socket) for a retry.
    auto task = std::make_shared<std::function<void()>>(std::move(fn));
    bool warned = false;
    for (;;) {
      std::vector<std::thread> done;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return live_ < max_; });
        TakeFinished(&done);
        try {
          std::thread t([this, task] { Run(*task); });
          const std::thread::id id = t.get_id();
          threads_.emplace(id, std::move(t));
          ++live_;
          task.reset();
        } catch (const std::system_error& e) {
          if (!warned) {
            CT_LOG(kWarning) << "cannot start a connection thread: " << e.what();
          }
          warned = true;
        }
      }
      for (std::thread& t : done) t.join();
      if (task == nullptr) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));  // out of threads: retry
    }
  }

  void shutdown() override {
    for (;;) {
      std::vector<std::thread> all;
      {
        std::lock_guard<std::mutex> lock(mu_);
        for (auto& [id, t] : threads_) all.push_back(std::move(t));
        threads_.clear();
        finished_.clear();
      }
      if (all.empty()) return;
      for (std::thread& t : all) t.join();
    }
  }

 private:
  void Run(const std::function<void()>& fn) {
    try {
      fn();
    } catch (const std::exception& e) {
      CT_LOG(kError) << "connection thread: " << e.what();
    } catch (...) {
      CT_LOG(kError) << "connection thread: unknown exception";
    }
    std::lock_guard<std::mutex> lock(mu_);
    finished_.push_back(std::this_thread::get_id());
    --live_;
    cv_.notify_all();
  }

  void TakeFinished(std::vector<std::thread>* out) {
    for (const std::thread::id& id : finished_) {
      auto it = threads_.find(id);
      if (it == threads_.end()) continue;  // already taken by shutdown()
      out->push_back(std::move(it->second));
      threads_.erase(it);
    }
    finished_.clear();
  }

  const int max_;
  std::mutex mu_;
  std::condition_variable cv_;
  int live_ = 0;                                    // GUARDED_BY(mu_)
  std::map<std::thread::id, std::thread> threads_;  // GUARDED_BY(mu_)
  std::vector<std::thread::id> finished_;           // GUARDED_BY(mu_)
};

std::string NumericHost(const sockaddr_storage& a, socklen_t len, int* port) {
  char host[NI_MAXHOST] = {0};
  char serv[NI_MAXSERV] = {0};
  if (getnameinfo(reinterpret_cast<const sockaddr*>(&a), len, host, sizeof host, serv, sizeof serv,
                  NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
    return {};
  }
  *port = std::atoi(serv);
  return host;
}

// The socket of the connection `req` arrived on, or -1.
// WART: cpp-httplib 0.11.4 does not hand the socket to handlers (and its process_and_close_socket
// cannot be wrapped: it is private), so the socket is found by its address pair among the
// process's descriptors. Runs once per non-streaming request; the match is exact because the
// connection stays open while its handler runs.
int FindConnectionFd(const httplib::Request& req) {
  DIR* dir = opendir("/proc/self/fd");
  if (dir == nullptr) return -1;
  int found = -1;
  while (dirent* ent = readdir(dir)) {
    char* end = nullptr;
    const long fd = std::strtol(ent->d_name, &end, 10);
    if (end == ent->d_name || *end != '\0' || fd == dirfd(dir)) continue;
    struct stat sb;
    if (fstat(static_cast<int>(fd), &sb) != 0 || !S_ISSOCK(sb.st_mode)) continue;
    sockaddr_storage peer{}, local{};
    socklen_t peer_len = sizeof peer, local_len = sizeof local;
    if (getpeername(static_cast<int>(fd), reinterpret_cast<sockaddr*>(&peer), &peer_len) != 0 ||
        getsockname(static_cast<int>(fd), reinterpret_cast<sockaddr*>(&local), &local_len) != 0) {
      continue;
    }
    int peer_port = -1, local_port = -1;
    if (NumericHost(peer, peer_len, &peer_port) == req.remote_addr &&
        peer_port == req.remote_port &&
        NumericHost(local, local_len, &local_port) == req.local_addr &&
        local_port == req.local_port) {
      found = static_cast<int>(fd);
      break;
    }
  }
  closedir(dir);
  return found;
}

// True when the peer of `fd` has closed its side (or the connection broke). Data waiting to be read
// (a pipelined request) counts as connected.
bool PeerClosed(int fd) {
  char c;
  const ssize_t n = recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
  if (n > 0) return false;
  if (n == 0) return true;
  return errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR;
}

int64_t UnixSeconds() { return static_cast<int64_t>(std::time(nullptr)); }

// Applies one event to the state; records inter-token gaps.
void Absorb(StreamState& st, sched::StreamEvent& e, Metrics& m, const Tokenizer& tok) {
  const int64_t now = NowNanos();
  if (!st.prompt_seen && e.kind != sched::StreamEvent::Kind::kError) {
    st.prompt_seen = true;
    if (st.call.request.prompt_logprobs) {
      st.logprobs =
          PromptLogprobEntries(st.call.request.prompt, std::move(e.prompt_logprobs), tok);
    }
  }
  switch (e.kind) {
    case sched::StreamEvent::Kind::kToken:
      if (st.first_ns == 0) {
        st.first_ns = now;
      } else {
        m.ObserveInterToken(static_cast<double>(now - st.last_ns) * 1e-9);
      }
      st.last_ns = now;
      if (st.call.request.logprobs >= 0 && e.logprobs.chosen.token >= 0) {
        LogprobEntry entry;
        entry.lp = std::move(e.logprobs);
        entry.text_offset =
            static_cast<int64_t>((st.call.echo ? st.call.prompt_text.size() : 0) + st.text.size());
        st.logprobs.push_back(std::move(entry));
      }
      st.text += e.text;
      ++st.tokens;
      break;
    case sched::StreamEvent::Kind::kDone:
      st.finished = true;
      st.finish = FinishReasonName(e.finish);
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
  const int threads = std::max(4, options_.max_connections);
  // WART: httplib takes ownership of a raw TaskQueue pointer.
  http_->new_task_queue = [threads] { return new ConnectionThreads(threads); };
  http_->set_payload_max_length(options_.max_body_bytes);
  http_->set_read_timeout(30, 0);
  http_->set_write_timeout(10, 0);
  http_->set_keep_alive_timeout(5);
  Routes();
  auto port = BindHttp(*http_, options_.host, options_.port);
  if (!port.ok()) return port.status();
  port_ = *port;
  listener_ = std::thread([this] {
    try {
      http_->listen_after_bind();
    } catch (const std::exception& e) {
      CT_LOG(kError) << "http listener stopped: " << e.what();
    }
    listener_returned_.store(true, std::memory_order_release);
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
  // httplib's stop() does nothing until the accept loop has begun (is_running()): a stop that
  // came first (a server failing to load its model right after Start) left the listener
  // accepting forever and this join hanging. So wait for the loop to begin (or to have ended).
  while (!http_->is_running() && !listener_returned_.load(std::memory_order_acquire)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  http_->stop();
  listener_.join();
}

void HttpServer::Json(httplib::Response& res, int status, const std::string& body,
                      const std::string& endpoint) {
  res.status = status;
  res.set_content(body, "application/json");
  metrics_.CountRequest(endpoint, status);
}

void HttpServer::Error(httplib::Response& res, const Status& s, const std::string& endpoint,
                       const ErrorDetail& detail) {
  if (s.code() == StatusCode::kResourceExhausted || s.code() == StatusCode::kUnavailable) {
    res.set_header("Retry-After", "1");
  }
  Json(res, HttpStatusFor(s), ErrorBody(s, detail), endpoint);
}

bool HttpServer::Allowed(const httplib::Request& req, httplib::Response& res, Access access,
                         const std::string& endpoint) {
  const AuthDecision d =
      Authorize(options_.access, access, req.get_header_value("Authorization"), req.remote_addr);
  if (d.allowed()) return true;
  if (d.http == 401) res.set_header("WWW-Authenticate", "Bearer");
  Json(res, d.http, AuthErrorBody(d), endpoint);
  return false;
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
  // Every handler is wrapped: access is checked first, and no exception reaches httplib.
  auto guard = [this](const std::string& endpoint, Access access, auto fn) {
    return [this, endpoint, access, fn](const Request& req, Response& res) {
      try {
        if (!Allowed(req, res, access, endpoint)) return;
        fn(req, res);
      } catch (const std::exception& e) {
        Error(res, Status(StatusCode::kIOError, std::string("internal error: ") + e.what()),
              endpoint);
      }
    };
  };
  http_->Post("/v1/chat/completions",
              guard("chat", Access::kApi,
                    [this](const Request& q, Response& r) { Generate(q, r, Endpoint::kChat); }));
  http_->Post("/v1/completions",
              guard("completions", Access::kApi, [this](const Request& q, Response& r) {
                Generate(q, r, Endpoint::kCompletion);
              }));
  http_->Get(
      "/v1/models", guard("models", Access::kApi, [this](const Request&, Response& r) {
        if (!Serving(r, "models", true)) return;
        nlohmann::json m = {{"id", backend_.api.model_id},
                            {"object", "model"},
                            {"created", UnixSeconds()},
                            {"owned_by", "cachette"},
                            {"max_model_len", backend_.api.n_ctx}};
        Json(r, 200, Dump({{"object", "list"}, {"data", nlohmann::json::array({m})}}), "models");
      }));
  http_->Get(
      "/health", guard("health", Access::kOpen, [this](const Request&, Response& r) {
        const Phase p = phase_.load(std::memory_order_acquire);
        const char* s = p == Phase::kReady ? "ok" : p == Phase::kLoading ? "loading" : "draining";
        Json(r, p == Phase::kReady ? 200 : 503, Dump({{"status", s}}), "health");
      }));
  http_->Get("/metrics", guard("metrics", Access::kOpen, [this](const Request&, Response& r) {
               Metrics::Gauges g;
               const Phase p = phase_.load(std::memory_order_acquire);
               g.ready = p == Phase::kReady;
               if (p != Phase::kLoading) {
                 g.sched = backend_.scheduler->Stats();
                 g.kv = backend_.scheduler->kv().GetStats();
                 if (KvManager* sk = backend_.scheduler->session_kv()) {
                   g.session_kv = sk->GetStats();
                 }
                 g.pins = backend_.scheduler->pins().List().size();
                 g.sessions = backend_.scheduler->pins().sessions();
                 g.segments = backend_.scheduler->segment_cache().GetStats();
               }
               metrics_.CountRequest("metrics", 200);
               r.status = 200;
               std::string text = metrics_.Render(g);
               // The chunk store's own families (hits, bytes, evictions, corruptions and load
               // latency per tier), when a tiered source is configured.
               if (p != Phase::kLoading) text += backend_.scheduler->source().PrometheusText();
               r.set_content(text, "text/plain; version=0.0.4");
             }));
  http_->Get("/v1/cache/stats", guard("admin", Access::kAdmin, [this](const Request&, Response& r) {
               if (Serving(r, "admin", true)) CacheStats(r);
             }));
  // Open like /metrics: a router must find the events; nothing tenant-specific is in it.
  http_->Get("/v1/cache/events", guard("admin", Access::kOpen, [this](const Request&, Response& r) {
               if (Serving(r, "admin", true)) CacheEvents(r);
             }));
  http_->Post("/v1/cache/lookup",
              guard("admin", Access::kAdmin, [this](const Request& q, Response& r) {
                if (Serving(r, "admin", true)) CacheLookup(q, r);
              }));
  http_->Post("/v1/cache/pin",
              guard("admin", Access::kAdmin, [this](const Request& q, Response& r) {
                if (Serving(r, "admin", false)) CachePin(q, r);
              }));
  http_->Post("/v1/cache/unpin",
              guard("admin", Access::kAdmin, [this](const Request& q, Response& r) {
                if (Serving(r, "admin", true)) CacheUnpin(q, r);
              }));
  http_->Post("/v1/cache/segments",
              guard("admin", Access::kAdmin, [this](const Request& q, Response& r) {
                if (Serving(r, "admin", false)) CacheSegments(q, r);
              }));
  http_->Post("/v1/cache/clear",
              guard("admin", Access::kAdmin, [this](const Request& q, Response& r) {
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
  // The generation slot: taken before the body is parsed, so a request beyond max_running +
  // max_queue costs nothing but this answer.
  const int64_t busy = generations_.fetch_add(1, std::memory_order_acq_rel);
  st->slot = &generations_;
  if (options_.max_generations > 0 && busy >= options_.max_generations) {
    return Error(
        res,
        ResourceExhausted("the server is at capacity (" + std::to_string(options_.max_generations) +
                          " requests running or queued); retry later"),
        ep);
  }
  st->start_ns = NowNanos();
  st->endpoint = ep;
  st->created = UnixSeconds();
  st->id = (endpoint == Endpoint::kChat ? "chatcmpl-" : "cmpl-") +
           std::to_string(next_id_.fetch_add(1));
  ErrorDetail detail;
  auto call = ParseGenerate(req.body, endpoint, backend_.api, &detail);
  if (!call.ok()) return Error(res, call.status(), ep, detail);
  st->call = std::move(*call);
  auto stream = backend_.scheduler->Submit(st->call.request);
  if (!stream.ok()) return Error(res, stream.status(), ep);
  st->stream = *stream;
  in_flight_.fetch_add(1, std::memory_order_acq_rel);
  if (st->call.stream) return StreamResponse(res, st);  // the releaser ends the flight

  // A client that disconnects while it waits is noticed by polling its socket, and its request is
  // cancelled (freeing its queue slot or sequence at once).
  const int fd = FindConnectionFd(req);
  bool client_gone = false;
  int64_t next_check_ns = 0;
  sched::StreamEvent e;
  while (!st->finished) {
    if (st->stream->Next(&e, kDisconnectPoll)) Absorb(*st, e, metrics_, *backend_.api.tokenizer);
    const int64_t now = NowNanos();
    if (st->finished || client_gone || fd < 0 || now < next_check_ns) continue;
    next_check_ns = now + std::chrono::nanoseconds(kDisconnectPoll).count();
    if (PeerClosed(fd)) {
      client_gone = true;
      st->stream->Cancel();
    }
  }
  in_flight_.fetch_sub(1, std::memory_order_acq_rel);
  if (client_gone) {
    CT_LOG(kInfo) << "request " << st->id << " " << ep << " client disconnected after "
                  << st->tokens << " tokens; cancelled";
    return Error(res, Cancelled("the client closed the connection"), ep);
  }
  if (!st->error.ok()) {
    LogAndRecord(*st, HttpStatusFor(st->error));
    return Error(res, st->error, ep);
  }
  LogAndRecord(*st, 200);
  const std::string text = st->call.echo ? st->call.prompt_text + st->text : st->text;
  Json(res, 200,
       Dump(CompletionJson(st->call, st->id, st->created, backend_.api.model_id, text, st->finish,
                           st->usage,
                           LogprobsJson(st->call, st->logprobs, *backend_.api.tokenizer))),
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
    const Tokenizer& tok = *backend_.api.tokenizer;
    Absorb(*st, e, metrics_, tok);
    // The logprobs entries not streamed yet, up to `end`.
    auto unsent = [&](size_t end) {
      const std::span<const LogprobEntry> all(st->logprobs);
      nlohmann::json lp =
          LogprobsJson(st->call, all.subspan(st->logprobs_sent, end - st->logprobs_sent), tok);
      st->logprobs_sent = end;
      return lp;
    };
    if (st->call.echo && !st->echo_sent && e.kind != sched::StreamEvent::Kind::kError) {
      // The echoed prompt first, in a chunk of its own (with its tokens' logprobs).
      st->echo_sent = true;
      const size_t prompt_entries =
          st->call.request.prompt_logprobs ? st->call.request.prompt.size() : 0;
      if (!send(Dump(ChunkJson(st->call, st->id, st->created, model, st->call.prompt_text,
                               st->first_chunk, nullptr, unsent(prompt_entries))))) {
        st->stream->Cancel();
        return false;
      }
      st->first_chunk = false;
    }
    bool ok = true;
    if (e.kind == sched::StreamEvent::Kind::kToken) {
      ok = send(Dump(ChunkJson(st->call, st->id, st->created, model, e.text, st->first_chunk,
                               nullptr, unsent(st->logprobs.size()))));
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
