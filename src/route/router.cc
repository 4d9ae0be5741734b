#include "route/router.h"

#include <httplib.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <deque>
#include <fstream>
#include <set>
#include <sstream>
#include <tuple>
#include <utility>

#include "bench_client/openai_client.h"  // ParseServerUrl
#include "cache/chunk.h"
#include "core/log.h"
#include "core/prometheus.h"
#include "events/subscriber.h"
#include "kv/kv_manager.h"  // KvNamespace
#include "server/http_listen.h"

namespace cachette::route {

using nlohmann::json;

class UpstreamCall;

// One backend as the router sees it. Atomics are read by request threads without a lock; `mu`
// guards the rest.
struct BackendInfo {
  int id = -1;
  std::string url;
  bench_client::ServerUrl addr;

  std::atomic<bool> up{false};
  std::atomic<bool> removed{false};     // dropped by Reload
  std::atomic<int64_t> inflight{0};     // requests the router has sent and not finished
  // Of those, the ones whose first bytes have not come back (queued or prefilling), and the
  // prompt tokens the router expects them to prefill (not held by the backend).
  std::atomic<int64_t> prefilling{0};
  std::atomic<int64_t> prefill_tokens{0};
  ReportedLoad reported;                 // running + queued, from its /metrics
  std::atomic<int> page_tokens{16};
  std::atomic<int> chunk_tokens{0};
  std::atomic<int64_t> pages_total{0};
  std::atomic<bool> ns_mismatch{false};  // its blocks are of another model or KV type
  // The KV type of its session pool (serve --session-kv-type), as an int; -1 without one. The
  // KV of requests with a session_id is there, under that type's namespace.
  std::atomic<int> session_kv_type{-1};
  std::atomic<bool> has_events{false};   // a subscription to its KV events is running

  std::atomic<uint64_t> requests{0}, retries{0}, errors{0}, prompt_tokens{0};
  std::atomic<uint64_t> predicted_tokens{0}, cached_tokens{0}, reported_requests{0};

  std::mutex mu;
  std::string down_reason;                           // GUARDED_BY(mu)
  std::unique_ptr<events::KvEventSubscriber> sub;    // GUARDED_BY(mu)
  std::string events_endpoint;                       // GUARDED_BY(mu)
  std::set<UpstreamCall*> calls;                     // in flight here; GUARDED_BY(mu)
};

// One request sent to a backend: its client, registered with the backend while it lives, so that
// a health check that gets no answer from the backend aborts it at once (AbortCalls). A frozen
// backend accepts connections and never answers: without this, its requests would wait
// for read_timeout_s.
class UpstreamCall {
 public:
  UpstreamCall(std::shared_ptr<BackendInfo> b, std::unique_ptr<httplib::Client> client)
      : backend_(std::move(b)), client_(std::move(client)) {
    std::lock_guard lock(backend_->mu);
    backend_->calls.insert(this);
  }
  ~UpstreamCall() {
    std::lock_guard lock(backend_->mu);
    backend_->calls.erase(this);
  }
  UpstreamCall(const UpstreamCall&) = delete;
  UpstreamCall& operator=(const UpstreamCall&) = delete;

  httplib::Client& client() { return *client_; }
  // Shuts the connection down: the request ends at once with an error. Called with backend->mu
  // held. WART: a call not yet connected is not stopped (httplib has no socket to shut down); the
  // next health round that gets no answer aborts it again.
  void Abort() {
    aborted_ = true;
    client_->stop();
  }
  bool aborted() const { return aborted_; }
  // What a request that got no response says: why it was aborted, or httplib's error.
  std::string ErrorText(httplib::Error e) const {
    return aborted_ ? "aborted: the backend's health check got no answer" : httplib::to_string(e);
  }

 private:
  const std::shared_ptr<BackendInfo> backend_;
  const std::unique_ptr<httplib::Client> client_;
  std::atomic<bool> aborted_{false};
};

namespace {

constexpr size_t kMaxSalts = 4096;
constexpr size_t kMaxSessions = 100000;
constexpr size_t kDecisionRing = 4096;
// What one decoding sequence costs a newcomer's first token, in prompt tokens of prefill: a
// decode adds one token to every batched step, so a page's worth is a generous bound.
constexpr double kDecodeTokens = 16;

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

std::vector<uint64_t> BlockHashes(const Hash128& ns, std::span<const TokenId> tokens, int size) {
  std::vector<uint64_t> out;
  if (size <= 0) return out;
  for (const cache::ChunkKey& k : cache::ComputeChunkKeys(ns, tokens, size)) {
    out.push_back(KvBlockHash(k));
  }
  return out;
}

std::unique_ptr<httplib::Client> ClientFor(const bench_client::ServerUrl& u, int connect_ms,
                                           int read_s) {
  auto c = std::make_unique<httplib::Client>(u.host, u.port);
  c->set_connection_timeout(connect_ms / 1000, (connect_ms % 1000) * 1000);
  c->set_read_timeout(read_s, 0);
  c->set_write_timeout(read_s, 0);
  c->set_keep_alive(false);
  return c;
}

// The headers a backend needs from the client's request.
httplib::Headers ForwardHeaders(const httplib::Request& req) {
  httplib::Headers h;
  for (const char* name : {"Authorization", "X-Request-Id"}) {
    if (req.has_header(name)) h.emplace(name, req.get_header_value(name));
  }
  return h;
}

// "cached_tokens":N in a response body or an SSE chunk; -1 when absent.
int64_t CachedTokensIn(std::string_view text) {
  constexpr std::string_view kKey = "\"cached_tokens\":";
  const size_t at = text.rfind(kKey);
  if (at == std::string_view::npos) return -1;
  size_t i = at + kKey.size();
  while (i < text.size() && text[i] == ' ') ++i;
  int64_t v = 0;
  bool any = false;
  while (i < text.size() && text[i] >= '0' && text[i] <= '9') {
    v = v * 10 + (text[i++] - '0');
    any = true;
  }
  return any ? v : -1;
}

// Replaces a wildcard host in a ZeroMQ endpoint ("tcp://*:5557", "tcp://0.0.0.0:5557") by the
// host the backend was reached at.
std::string Reachable(std::string endpoint, const std::string& host) {
  for (std::string_view any : {"tcp://*:", "tcp://0.0.0.0:"}) {
    if (endpoint.rfind(any, 0) == 0) {
      return "tcp://" + host + ":" + endpoint.substr(any.size());
    }
  }
  return endpoint;
}

// How an attempt at one backend ended, judged before anything is written to the client.
enum class AttemptEnd {
  kAnswered,     // a response to relay (any status but 503)
  kUnavailable,  // 503 (loading, draining): another backend may serve it now
  kFailed,       // no response (connect, send or read failed): the backend is marked down
  kAborted,      // no response: aborted by a health check that found the backend down already
};

// Aborts every request in flight at `b`, whose health check got no answer.
void AbortCalls(BackendInfo& b) {
  std::lock_guard lock(b.mu);
  for (UpstreamCall* c : b.calls) c->Abort();
}

// The retry rule, for whole and streamed responses alike. `responded`: the backend's status
// arrived (for a stream, with its first body bytes or its end).
AttemptEnd EndOf(bool responded, int status, const UpstreamCall& call) {
  if (!responded) return call.aborted() ? AttemptEnd::kAborted : AttemptEnd::kFailed;
  return status == 503 ? AttemptEnd::kUnavailable : AttemptEnd::kAnswered;
}

std::string ErrorJson(const std::string& message, const char* type) {
  return json{{"error", {{"message", message}, {"type", type}, {"param", nullptr},
                         {"code", nullptr}}}}
      .dump();
}

}  // namespace

Result<Policy> ParsePolicy(std::string_view name) {
  if (name == "kv") return Policy::kKv;
  if (name == "approx") return Policy::kApprox;
  if (name == "round-robin") return Policy::kRoundRobin;
  if (name == "least-loaded") return Policy::kLeastLoaded;
  return InvalidArgument("--policy '" + std::string(name) +
                         "' must be kv, approx, round-robin or least-loaded");
}

const char* PolicyName(Policy p) {
  switch (p) {
    case Policy::kKv: return "kv";
    case Policy::kApprox: return "approx";
    case Policy::kRoundRobin: return "round-robin";
    case Policy::kLeastLoaded: return "least-loaded";
  }
  return "kv";
}

Router::Router(const Model& model, const server::ApiContext& api, RouterOptions options)
    : model_(model), api_(api), options_(std::move(options)) {
  shared_ns_ = KvNamespace(model_, options_.kv_type);
  decision_us_.reserve(kDecisionRing);
}

Router::~Router() { Stop(); }

std::vector<std::shared_ptr<BackendInfo>> Router::Snapshot() const {
  std::shared_lock lock(backends_mu_);
  return backends_;
}

Status Router::SetBackends(const std::vector<std::string>& urls) {
  std::vector<bench_client::ServerUrl> parsed;
  for (const std::string& u : urls) {
    auto p = bench_client::ParseServerUrl(u);
    if (!p.ok()) return InvalidArgument("--backend: " + p.status().message());
    parsed.push_back(*p);
  }
  std::vector<std::shared_ptr<BackendInfo>> dropped;
  {
    std::unique_lock lock(backends_mu_);
    std::vector<std::shared_ptr<BackendInfo>> next;
    for (size_t i = 0; i < urls.size(); ++i) {
      auto same = std::find_if(backends_.begin(), backends_.end(),
                               [&](const auto& b) { return b->url == urls[i]; });
      if (same != backends_.end()) {
        next.push_back(*same);
        continue;
      }
      if (std::any_of(next.begin(), next.end(), [&](const auto& b) { return b->url == urls[i]; })) {
        continue;  // listed twice
      }
      auto b = std::make_shared<BackendInfo>();
      b->id = next_id_++;
      b->url = urls[i];
      b->addr = parsed[i];
      next.push_back(std::move(b));
    }
    for (const auto& b : backends_) {
      if (std::find(next.begin(), next.end(), b) == next.end()) dropped.push_back(b);
    }
    backends_ = std::move(next);
  }
  for (const auto& b : dropped) {
    b->removed = true;
    MarkDown(b, "removed from the backend list");
    CT_LOG(kInfo) << "route: backend " << b->url << " removed";
  }
  return Status::Ok();
}

Status Router::Reload() {
  std::vector<std::string> urls = options_.backends;
  if (!options_.backends_file.empty()) {
    std::ifstream in(options_.backends_file);
    if (!in) return IOError("--backends-file " + options_.backends_file + ": cannot read it");
    std::string line;
    while (std::getline(in, line)) {
      if (const size_t hash = line.find('#'); hash != std::string::npos) line.resize(hash);
      const size_t b = line.find_first_not_of(" \t\r");
      if (b == std::string::npos) continue;
      const size_t e = line.find_last_not_of(" \t\r");
      urls.push_back(line.substr(b, e - b + 1));
    }
  }
  if (urls.empty()) return InvalidArgument("route: no backend (--backend or --backends-file)");
  Status s = SetBackends(urls);
  if (!s.ok() && !options_.backends_file.empty()) {
    return s.WithContext("--backends-file " + options_.backends_file);
  }
  return s;
}

Status Router::Start() {
  CT_RETURN_IF_ERROR(Reload());
  http_ = std::make_unique<httplib::Server>();
  const int threads = std::max(4, options_.http_threads);
  http_->new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  http_->set_read_timeout(options_.read_timeout_s, 0);
  http_->set_write_timeout(options_.read_timeout_s, 0);
  http_->set_payload_max_length(size_t{64} << 20);
  Routes();
  auto port = server::BindHttp(*http_, options_.host, options_.port);
  if (!port.ok()) return Unavailable("route: " + port.status().message());
  port_ = *port;
  // The first health round before serving, so the first requests have backends to go to.
  for (const auto& b : Snapshot()) CheckBackend(b);
  health_ = std::thread([this] { HealthLoop(); });
  listener_ = std::thread([this] {
    http_->listen_after_bind();
    listener_returned_.store(true, std::memory_order_release);
  });
  return Status::Ok();
}

void Router::Stop() {
  {
    std::lock_guard lock(stop_mu_);
    if (stopping_) return;
    stopping_ = true;
  }
  stop_cv_.notify_all();
  if (health_.joinable()) health_.join();
  if (http_ != nullptr && listener_.joinable()) {
    // httplib's stop() does nothing before the accept loop begins: wait for it (see
    // HttpServer::Stop).
    while (!http_->is_running() && !listener_returned_.load(std::memory_order_acquire)) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    http_->stop();
  }
  if (listener_.joinable()) listener_.join();
  for (const auto& b : Snapshot()) {
    std::lock_guard lock(b->mu);
    b->sub.reset();
  }
}

// ---- health and events ----------------------------------------------------------------------

void Router::HealthLoop() {
  std::unique_lock lock(stop_mu_);
  while (!stop_cv_.wait_for(lock, std::chrono::milliseconds(options_.health_interval_ms),
                            [this] { return stopping_; })) {
    lock.unlock();
    for (const auto& b : Snapshot()) CheckBackend(b);
    lock.lock();
  }
}

void Router::MarkDown(const std::shared_ptr<BackendInfo>& b, const std::string& why) {
  const bool was_up = b->up.exchange(false);
  std::unique_ptr<events::KvEventSubscriber> sub;
  {
    std::lock_guard lock(b->mu);
    b->down_reason = why;
    sub = std::move(b->sub);
    b->has_events = false;
  }
  sub.reset();  // joins its thread outside the lock
  // What it held is unknown until it is back (a restart empties its memory).
  index_.Reset(b->id);
  if (was_up) {
    CT_LOG(kWarning) << "route: backend " << b->url << " down: " << why;
  }
}

void Router::CheckBackend(const std::shared_ptr<BackendInfo>& b) {
  if (b->removed) return;
  auto c = ClientFor(b->addr, options_.connect_timeout_ms, 2);
  auto health = c->Get(b->addr.base_path + "/health");
  if (!health || health->status != 200) {
    MarkDown(b, health ? "/health answered " + std::to_string(health->status)
                       : "/health: " + httplib::to_string(health.error()));
    // No answer at all (gone, or frozen: connected but silent): what is in flight there will not
    // be answered either, so it is retried elsewhere now rather than after read_timeout_s. One
    // that answers (503: loading, draining) finishes what it has.
    if (!health) AbortCalls(*b);
    return;
  }
  const int64_t mark = b->reported.Sending();
  if (auto m = c->Get(b->addr.base_path + "/metrics"); m && m->status == 200) {
    const double running = PrometheusValue(m->body, "cachette_running_sequences").value_or(0);
    const double queued = PrometheusValue(m->body, "cachette_queue_length").value_or(0);
    b->reported.Sampled(mark, running + queued);
  }
  if (b->up) {
    // A subscriber that lost its publisher for good (a restart on another port) is renewed
    // through the next down/up; nothing else to do while it is up.
    return;
  }
  // (Back) up: learn its block sizes and namespace, then subscribe.
  auto ev = c->Get(b->addr.base_path + "/v1/cache/events");
  json info;
  if (ev && ev->status == 200) info = json::parse(ev->body, nullptr, false);
  if (info.is_object()) {
    b->page_tokens = info.value("page_tokens", 16);
    b->chunk_tokens = info.value("chunk_tokens", 0);
    b->pages_total = info.value("pages_total", int64_t{0});
    const std::string ns = info.value("namespace", std::string());
    b->ns_mismatch = !ns.empty() && ns != shared_ns_.ToHex();
    if (b->ns_mismatch) {
      CT_LOG(kError) << "route: backend " << b->url << " serves namespace " << ns
                     << ", not this router's " << shared_ns_.ToHex()
                     << " (another model or --kv-type): its cache is never counted";
    }
    b->session_kv_type = SessionKvTypeOf(info, b->url);
  }
  index_.Reset(b->id);
  if (options_.policy == Policy::kKv && info.is_object() && info.value("enabled", false) &&
      !b->ns_mismatch) {
    events::KvEventSubscriberOptions so;
    so.endpoint = Reachable(info.value("endpoint", std::string()), b->addr.host);
    so.replay_endpoint = Reachable(info.value("replay_endpoint", std::string()), b->addr.host);
    so.topic = info.value("topic", std::string("kv-events"));
    const int id = b->id;
    auto sub = events::KvEventSubscriber::Start(
        so, [this, id](const events::KvEventBatch& batch, bool reset) {
          if (reset) index_.Reset(id);
          for (const KvEvent& e : batch.events) index_.Apply(id, e);
        });
    if (!sub.ok()) {
      CT_LOG(kWarning) << "route: backend " << b->url << ": " << sub.status().ToString()
                       << "; routing it without its events";
    } else {
      std::lock_guard lock(b->mu);
      b->sub = std::move(*sub);
      b->events_endpoint = so.endpoint;
      b->has_events = true;
    }
  } else if (options_.policy == Policy::kKv) {
    CT_LOG(kWarning) << "route: backend " << b->url
                     << " publishes no KV events (serve --kv-events): routed by the router's "
                        "own record of what it sent there (as --policy approx)";
  }
  {
    std::lock_guard lock(b->mu);
    b->down_reason.clear();
  }
  b->up = true;
  CT_LOG(kInfo) << "route: backend " << b->url << " up";
}

int Router::SessionKvTypeOf(const json& info, const std::string& url) {
  auto type = info.find("session_kv_type");
  auto ns = info.find("session_namespace");
  if (type == info.end() || !type->is_string() || ns == info.end() || !ns->is_string()) return -1;
  const std::optional<kernels::KvType> t = kernels::KvTypeFromName(type->get<std::string>());
  if (t && KvNamespace(model_, *t).ToHex() == ns->get<std::string>()) return static_cast<int>(*t);
  CT_LOG(kError) << "route: backend " << url << " has a session pool of "
                 << type->get<std::string>() << " in namespace " << ns->get<std::string>()
                 << ", which this router does not compute: its sessions' KV is never counted";
  return -1;
}

// ---- choosing -------------------------------------------------------------------------------

Hash128 Router::NamespaceFor(const std::string& salt, kernels::KvType type) {
  if (salt.empty() && type == options_.kv_type) return shared_ns_;
  std::lock_guard lock(ns_mu_);
  const auto key = std::make_pair(static_cast<int>(type), salt);
  auto it = ns_by_salt_.find(key);
  if (it != ns_by_salt_.end()) return it->second;
  if (ns_by_salt_.size() >= kMaxSalts) ns_by_salt_.clear();  // recomputed on demand
  const Hash128 ns = KvNamespace(model_, type, salt);
  ns_by_salt_.emplace(key, ns);
  return ns;
}

Hash128 Router::NamespaceAt(const BackendInfo& b, const Parsed& p) {
  const int session_type = b.session_kv_type.load();
  if (p.session_id.empty() || session_type < 0) return p.ns;
  return NamespaceFor(p.cache_salt, static_cast<kernels::KvType>(session_type));
}

Router::Parsed Router::Parse(const std::string& body, server::Endpoint endpoint) {
  Parsed p;
  auto call = server::ParseGenerate(body, endpoint, api_);
  if (!call.ok()) {
    ++unparsed_;
    return p;
  }
  p.ok = true;
  p.tokens = std::move(call->request.prompt);
  p.cache_salt = call->request.cache_salt;
  p.ns = NamespaceFor(p.cache_salt, options_.kv_type);
  p.session_id = std::move(call->request.session_id);
  p.stream = call->stream;
  const double mean = mean_prompt_tokens_.load();
  mean_prompt_tokens_ = mean + 0.05 * (static_cast<double>(p.tokens.size()) - mean);
  return p;
}

std::vector<Router::Candidate> Router::Rank(const Parsed& p) {
  std::vector<std::shared_ptr<BackendInfo>> live;
  for (const auto& b : Snapshot()) {
    if (b->up) live.push_back(b);
  }
  std::vector<Candidate> out;
  if (live.empty()) return out;
  const double mean = mean_prompt_tokens_.load();
  for (const auto& b : live) {
    Candidate c;
    c.id = b->id;
    c.url = b->url;
    c.requests = std::max<double>(static_cast<double>(b->inflight.load()), b->reported.reported());
    // The work ahead of a newcomer at b, in prompt tokens: what the router's requests there
    // still have to prefill, a page's worth per decoding one, and a mean prompt for each
    // request b reports that this router did not send (other routers, direct clients).
    const int64_t inflight = b->inflight.load(), prefilling = b->prefilling.load();
    c.load = static_cast<double>(std::max<int64_t>(0, b->prefill_tokens.load())) +
             kDecodeTokens * static_cast<double>(std::max<int64_t>(0, inflight - prefilling)) +
             b->reported.Foreign(inflight) * mean;
    out.push_back(c);
  }
  auto by_cost = [](const Candidate& a, const Candidate& b) {
    return a.cost != b.cost ? a.cost < b.cost : a.requests < b.requests;
  };
  // Rotating the start breaks ties evenly instead of always favouring the first backend.
  const uint64_t turn = rr_.fetch_add(1);
  std::rotate(out.begin(), out.begin() + static_cast<std::ptrdiff_t>(turn % out.size()),
              out.end());
  if (options_.policy == Policy::kRoundRobin) return out;
  if (options_.policy == Policy::kLeastLoaded) {
    for (Candidate& c : out) c.cost = c.requests;
    std::stable_sort(out.begin(), out.end(), by_cost);
    return out;
  }

  if (!p.ok) {
    for (Candidate& c : out) c.cost = c.load;  // no prompt to compare: by the work ahead
    std::stable_sort(out.begin(), out.end(), by_cost);
    return out;
  }
  const std::vector<TokenId>& tokens = p.tokens;

  // Hashes per namespace and block size (backends normally share one page and chunk size; a
  // session's namespace is its backend's session pool's, when it has one).
  std::map<std::tuple<uint64_t, uint64_t, int>, std::vector<uint64_t>> hashes;
  auto hashes_of = [&](const Hash128& ns, int size) -> const std::vector<uint64_t>& {
    const auto key = std::make_tuple(ns.hi, ns.lo, size);
    auto it = hashes.find(key);
    if (it == hashes.end()) it = hashes.emplace(key, BlockHashes(ns, tokens, size)).first;
    return it->second;
  };
  for (size_t i = 0; i < out.size(); ++i) {
    Candidate& c = out[i];
    const auto& b =
        *std::find_if(live.begin(), live.end(), [&](const auto& x) { return x->id == c.id; });
    if (!b->ns_mismatch) {
      const int P = b->page_tokens, C = b->chunk_tokens;
      const Hash128 ns = NamespaceAt(*b, p);
      static const std::vector<uint64_t> kNone;
      c.overlap = index_.Score(c.id, hashes_of(ns, P), P, C > 0 ? hashes_of(ns, C) : kNone, C,
                               options_.weights);
    }
    c.cost = (static_cast<double>(tokens.size()) - c.overlap.weighted) +
             options_.load_weight * c.load;
  }
  std::stable_sort(out.begin(), out.end(), by_cost);
  // A session sticks to its backend while that backend is up.
  if (!p.session_id.empty()) {
    int sticky = -1;
    {
      std::lock_guard lock(sessions_mu_);
      auto it = sessions_.find(p.session_id);
      if (it != sessions_.end()) sticky = it->second;
    }
    auto it =
        std::find_if(out.begin(), out.end(), [&](const Candidate& c) { return c.id == sticky; });
    if (it != out.end()) std::rotate(out.begin(), it, it + 1);
  }
  return out;
}

// ---- forwarding -----------------------------------------------------------------------------

// A streamed response relayed from a backend: the upstream request runs on its own thread and
// hands its pieces to the client's connection thread through this queue.
struct Router::Upstream {
  std::mutex mu;
  std::condition_variable cv;
  bool headers = false;          // the backend's status line and headers arrived
  int status = 0;
  std::string content_type;
  std::deque<std::string> pieces;
  bool done = false;             // the upstream request ended (fully or not)
  bool failed = false;           // ... with a transport error
  std::string error;
  std::atomic<bool> cancel{false};  // the client went away: abort the upstream request
  std::thread thread;
  std::string tail;              // the last bytes relayed (for the usage chunk)
  std::unique_ptr<UpstreamCall> call;  // the request, registered with its backend
};

void Router::Proxy(const httplib::Request& req, httplib::Response& res,
                   server::Endpoint endpoint) {
  ++requests_;
  const int64_t t0 = NowNs();
  const bool cache_aware = options_.policy == Policy::kKv || options_.policy == Policy::kApprox;
  // The baselines route without reading the body; a streamed body still needs its flag.
  Parsed parsed = cache_aware ? Parse(req.body, endpoint) : Parsed();
  if (!cache_aware) {
    const json j = json::parse(req.body, nullptr, false);
    parsed.stream = j.is_object() && j.contains("stream") && j["stream"].is_boolean() &&
                    j["stream"].get<bool>();
  }
  std::vector<Candidate> order = Rank(parsed);
  const int64_t prompt_tokens = static_cast<int64_t>(parsed.tokens.size());
  const std::string& session_id = parsed.session_id;
  const int64_t decided = NowNs() - t0;
  decision_ns_sum_ += static_cast<uint64_t>(decided);
  ++decisions_;
  {
    std::lock_guard lock(latency_mu_);
    if (decision_us_.size() < kDecisionRing) {
      decision_us_.push_back(static_cast<double>(decided) / 1e3);
    } else {
      decision_us_[decision_next_] = static_cast<double>(decided) / 1e3;
      decision_next_ = (decision_next_ + 1) % kDecisionRing;
    }
  }
  if (order.empty()) {
    ++failures_;
    res.status = 503;
    res.set_content(ErrorJson("route: no backend is up", "unavailable"), "application/json");
    return;
  }
  const bool stream = parsed.stream;
  const std::string path = req.path;
  const httplib::Headers headers = ForwardHeaders(req);
  std::string last_error = "no backend tried";
  const auto all = Snapshot();
  const int attempts = std::min<int>(options_.max_attempts, static_cast<int>(order.size()));
  for (int a = 0; a < attempts; ++a) {
    const Candidate& cand = order[a];
    auto it = std::find_if(all.begin(), all.end(), [&](const auto& b) { return b->id == cand.id; });
    if (it == all.end() || !(*it)->up) continue;
    std::shared_ptr<BackendInfo> b = *it;
    b->inflight++;
    // Until its first bytes come back, this request's prefill is work ahead of later ones.
    const int64_t to_prefill = prompt_tokens - cand.overlap.tokens;
    b->prefilling++;
    b->prefill_tokens += to_prefill;
    bool prefill_done = false;
    auto first_bytes = [&] {
      if (prefill_done) return;
      prefill_done = true;
      b->prefilling--;
      b->prefill_tokens -= to_prefill;
    };
    auto finish = [this, b, prompt_tokens, cand, session_id](int64_t cached) {
      b->inflight--;
      b->reported.Finished();
      b->requests++;
      b->prompt_tokens += static_cast<uint64_t>(prompt_tokens);
      b->predicted_tokens += static_cast<uint64_t>(cand.overlap.tokens);
      if (cached >= 0) {
        b->cached_tokens += static_cast<uint64_t>(cached);
        b->reported_requests++;
      }
      if (!session_id.empty() &&
          (options_.policy == Policy::kKv || options_.policy == Policy::kApprox)) {
        std::lock_guard lock(sessions_mu_);
        if (sessions_.size() >= kMaxSessions) {
          sessions_.clear();
        }
        sessions_[session_id] = b->id;
      }
    };
    // approx, and kv for a backend without events (none published, or not reachable): the
    // router's own record that the backend will hold this prompt's pages.
    if (parsed.ok && (options_.policy == Policy::kApprox ||
                      (options_.policy == Policy::kKv && !b->has_events))) {
      const size_t cap = b->pages_total > 0 ? static_cast<size_t>(b->pages_total.load()) : 65536;
      index_.Record(b->id, BlockHashes(NamespaceAt(*b, parsed), parsed.tokens, b->page_tokens),
                    cap);
    }

    // Nothing reached the client from b: count the retry, drop b if it failed (not when it
    // answered 503, nor when a health check dropped it already), and go on to the next backend.
    auto move_on = [&](AttemptEnd end, std::string error) {
      last_error = std::move(error);
      b->inflight--;
      b->retries++;
      if (end == AttemptEnd::kFailed) MarkDown(b, "request failed: " + last_error);
    };
    auto call = std::make_unique<UpstreamCall>(
        b, ClientFor(b->addr, options_.connect_timeout_ms, options_.read_timeout_s));
    const std::string upath = b->addr.base_path + path;
    if (!stream) {
      auto r = call->client().Post(upath, headers, req.body, "application/json");
      first_bytes();
      if (const AttemptEnd end = EndOf(static_cast<bool>(r), r ? r->status : 0, *call);
          end != AttemptEnd::kAnswered) {
        move_on(end, r ? "503 " + r->body : call->ErrorText(r.error()));
        continue;
      }
      res.status = r->status;
      const std::string ct = r->get_header_value("Content-Type");
      res.set_content(r->body, ct.empty() ? "application/json" : ct.c_str());
      finish(r->status == 200 ? CachedTokensIn(r->body) : -1);
      return;
    }

    // Streaming: start the upstream request and wait for its first body bytes (or its end)
    // before anything is written to the client, so a backend that fails until then (while it
    // queues or prefills the prompt) costs a retry on another backend, not the request.
    auto up = std::make_shared<Upstream>();
    up->call = std::move(call);
    httplib::Request ureq;
    ureq.method = "POST";
    ureq.path = upath;
    ureq.headers = headers;
    ureq.headers.emplace("Content-Type", "application/json");
    ureq.body = req.body;
    ureq.response_handler = [up](const httplib::Response& r) {
      std::lock_guard lock(up->mu);
      up->headers = true;
      up->status = r.status;
      up->content_type = r.get_header_value("Content-Type");
      up->cv.notify_all();
      return !up->cancel.load();
    };
    ureq.content_receiver = [up](const char* data, size_t n, uint64_t, uint64_t) {
      if (up->cancel) return false;
      std::lock_guard lock(up->mu);
      up->pieces.emplace_back(data, n);
      up->cv.notify_all();
      return true;
    };
    up->thread = std::thread([up, ureq = std::move(ureq)] {
      auto r = up->call->client().send(ureq);
      std::lock_guard lock(up->mu);
      up->done = true;
      if (!r && !up->cancel) {
        up->failed = true;
        up->error = up->call->ErrorText(r.error());
      }
      up->cv.notify_all();
    });
    {
      std::unique_lock lock(up->mu);
      up->cv.wait(lock, [&] { return up->done || (up->headers && !up->pieces.empty()); });
    }
    first_bytes();
    AttemptEnd end;
    std::string error;
    {
      std::unique_lock lock(up->mu);
      end = EndOf(!(up->failed && up->pieces.empty()), up->status, *up->call);
      error = end == AttemptEnd::kUnavailable ? "503"
              : up->error.empty()             ? "no response"
                                              : up->error;
    }
    if (end != AttemptEnd::kAnswered) {
      up->thread.join();
      move_on(end, std::move(error));
      continue;
    }
    res.status = up->status;
    const std::string ct = up->content_type.empty() ? "text/event-stream" : up->content_type;
    res.set_chunked_content_provider(
        ct,
        [up, url = b->url](size_t, httplib::DataSink& sink) {
          std::unique_lock lock(up->mu);
          up->cv.wait(lock, [&] { return !up->pieces.empty() || up->done; });
          while (!up->pieces.empty()) {
            std::string piece = std::move(up->pieces.front());
            up->pieces.pop_front();
            lock.unlock();
            up->tail = (up->tail + piece).substr(
                std::max<size_t>(up->tail.size() + piece.size(), 4096) - 4096);
            const bool ok = sink.write(piece.data(), piece.size());
            lock.lock();
            if (!ok) {
              up->cancel = true;
              return false;
            }
          }
          if (up->done) {
            if (up->failed) {
              // The backend went away mid-stream: say so instead of ending as if complete.
              const std::string ev =
                  "data: " + ErrorJson("route: backend " + url + " failed mid-stream (" +
                                           up->error + ")",
                                       "backend_error") +
                  "\n\n";
              sink.write(ev.data(), ev.size());
            }
            sink.done();
          }
          return true;
        },
        [this, up, b, finish](bool) {
          up->cancel = true;
          if (up->thread.joinable()) up->thread.join();
          if (up->failed) {
            b->errors++;
            if (!up->call->aborted()) MarkDown(b, "stream failed: " + up->error);
          }
          finish(CachedTokensIn(up->tail));
        });
    return;
  }
  ++failures_;
  res.status = 503;
  res.set_content(ErrorJson("route: every backend tried failed; last: " + last_error,
                            "unavailable"),
                  "application/json");
}

void Router::Forward(const httplib::Request& req, httplib::Response& res,
                     const std::string& path) {
  for (const auto& b : Snapshot()) {
    if (!b->up) continue;
    auto c = ClientFor(b->addr, options_.connect_timeout_ms, 10);
    auto r = c->Get(b->addr.base_path + path, ForwardHeaders(req));
    if (!r) continue;
    res.status = r->status;
    res.set_content(r->body, r->get_header_value("Content-Type").c_str());
    return;
  }
  res.status = 503;
  res.set_content(ErrorJson("route: no backend is up", "unavailable"), "application/json");
}

// ---- HTTP -----------------------------------------------------------------------------------

void Router::Routes() {
  using httplib::Request;
  using httplib::Response;
  http_->Post("/v1/chat/completions", [this](const Request& q, Response& r) {
    Proxy(q, r, server::Endpoint::kChat);
  });
  http_->Post("/v1/completions", [this](const Request& q, Response& r) {
    Proxy(q, r, server::Endpoint::kCompletion);
  });
  http_->Get("/v1/models", [this](const Request& q, Response& r) { Forward(q, r, "/v1/models"); });
  http_->Get("/health", [this](const Request&, Response& r) {
    int n = 0;
    for (const auto& b : Snapshot()) n += b->up ? 1 : 0;
    r.status = n > 0 ? 200 : 503;
    r.set_content(json{{"status", n > 0 ? "ok" : "no backend up"}, {"backends_up", n}}.dump(),
                  "application/json");
  });
  http_->Get("/metrics", [this](const Request&, Response& r) {
    r.set_content(MetricsText(), "text/plain; version=0.0.4");
  });
  http_->Get("/v1/router/backends", [this](const Request&, Response& r) {
    r.set_content(BackendsJson().dump(2), "application/json");
  });
  http_->Post("/v1/router/explain", [this](const Request& q, Response& r) {
    const bool completions =
        q.has_param("endpoint") && q.get_param_value("endpoint") == "completions";
    const server::Endpoint ep =
        completions ? server::Endpoint::kCompletion : server::Endpoint::kChat;
    const Parsed p = Parse(q.body, ep);
    const int64_t n = static_cast<int64_t>(p.tokens.size());
    json out = json::array();
    for (const Candidate& c : Rank(p)) {
      out.push_back({{"backend", c.url},
                     {"held_tokens", c.overlap.tokens},
                     {"memory_tokens", c.overlap.memory_tokens},
                     {"weighted_tokens", c.overlap.weighted},
                     {"requests", c.requests},
                     {"load_tokens", c.load},
                     {"cost", c.cost}});
    }
    r.set_content(json{{"prompt_tokens", n}, {"policy", PolicyName(options_.policy)},
                       {"order", out}}
                      .dump(),
                  "application/json");
  });
  http_->set_error_handler([](const Request& q, Response& r) {
    if (r.body.empty()) {
      r.set_content(ErrorJson("route: " + std::to_string(r.status) + " for " + q.method + " " +
                                  q.path,
                              "invalid_request_error"),
                    "application/json");
    }
  });
}

nlohmann::json Router::BackendsJson() const {
  json out = json::array();
  for (const auto& b : Snapshot()) {
    const int session_kv_type = b->session_kv_type.load();
    json j = {{"url", b->url},
              {"id", b->id},
              {"up", b->up.load()},
              {"inflight", b->inflight.load()},
              {"prefilling", b->prefilling.load()},
              {"prefill_tokens", b->prefill_tokens.load()},
              {"reported_load", b->reported.reported()},
              {"page_tokens", b->page_tokens.load()},
              {"chunk_tokens", b->chunk_tokens.load()},
              {"namespace_mismatch", b->ns_mismatch.load()},
              {"session_kv_type",
               session_kv_type < 0 ? json(nullptr)
                                   : json(kernels::KvTypeName(
                                         static_cast<kernels::KvType>(session_kv_type)))},
              {"requests", b->requests.load()},
              {"retries", b->retries.load()},
              {"predicted_hit_tokens", b->predicted_tokens.load()},
              {"cached_tokens", b->cached_tokens.load()},
              {"blocks",
               {{"memory", index_.blocks(b->id, KvMedium::kMemory)},
                {"ram", index_.blocks(b->id, KvMedium::kRam)},
                {"disk", index_.blocks(b->id, KvMedium::kDisk)}}}};
    std::lock_guard lock(b->mu);
    if (!b->down_reason.empty()) j["down_reason"] = b->down_reason;
    if (b->sub != nullptr) {
      const events::KvEventSubscriberStats s = b->sub->stats();
      j["events"] = {{"endpoint", b->events_endpoint}, {"synced", b->sub->synced()},
                     {"batches", s.batches}, {"events", s.events}, {"gaps", s.gaps},
                     {"replays", s.replays}, {"snapshots", s.snapshots},
                     {"malformed", s.malformed}, {"last_seq", s.last_seq}};
    }
    out.push_back(std::move(j));
  }
  return {{"policy", PolicyName(options_.policy)},
          {"backends", out},
          {"redis_blocks", index_.blocks(-1, KvMedium::kRedis)}};
}

std::string Router::MetricsText() const {
  std::ostringstream o;
  auto family = [&](const char* name, const char* type, const char* help) {
    o << "# HELP " << name << ' ' << help << "\n# TYPE " << name << ' ' << type << '\n';
  };
  const auto all = Snapshot();
  auto per_backend = [&](const char* name, const char* type, const char* help, auto value) {
    family(name, type, help);
    for (const auto& b : all) o << name << "{backend=\"" << b->url << "\"} " << value(*b) << '\n';
  };
  family("cachette_route_requests_total", "counter", "Generation requests received.");
  o << "cachette_route_requests_total " << requests_.load() << '\n';
  family("cachette_route_failures_total", "counter",
         "Requests no backend could answer (503 from the router).");
  o << "cachette_route_failures_total " << failures_.load() << '\n';
  family("cachette_route_unparsed_total", "counter",
         "Requests the router could not parse (routed by load; the backend answers them).");
  o << "cachette_route_unparsed_total " << unparsed_.load() << '\n';
  family("cachette_route_decision_seconds", "summary", "Time to choose a backend.");
  double p50 = 0;
  {
    std::lock_guard lock(latency_mu_);
    std::vector<double> v = decision_us_;
    if (!v.empty()) {
      std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(v.size() / 2), v.end());
      p50 = v[v.size() / 2] / 1e6;
    }
  }
  o << "cachette_route_decision_seconds{quantile=\"0.5\"} " << p50 << '\n';
  o << "cachette_route_decision_seconds_sum " << static_cast<double>(decision_ns_sum_.load()) / 1e9
    << '\n';
  o << "cachette_route_decision_seconds_count " << decisions_.load() << '\n';
  per_backend("cachette_route_backend_up", "gauge", "1 while the backend answers its health check.",
              [](const BackendInfo& b) { return b.up ? 1 : 0; });
  per_backend("cachette_route_backend_inflight", "gauge", "Requests in flight at the backend.",
              [](const BackendInfo& b) { return b.inflight.load(); });
  per_backend("cachette_route_backend_requests_total", "counter",
              "Requests answered by the backend.",
              [](const BackendInfo& b) { return b.requests.load(); });
  per_backend("cachette_route_backend_retries_total", "counter",
              "Requests moved to another backend after this one failed before answering.",
              [](const BackendInfo& b) { return b.retries.load(); });
  per_backend("cachette_route_backend_stream_errors_total", "counter",
              "Streams the backend broke off after they had started.",
              [](const BackendInfo& b) { return b.errors.load(); });
  per_backend("cachette_route_backend_prompt_tokens_total", "counter",
              "Prompt tokens sent to the backend.",
              [](const BackendInfo& b) { return b.prompt_tokens.load(); });
  per_backend("cachette_route_backend_predicted_hit_tokens_total", "counter",
              "Prompt tokens the router expected the backend to hold.",
              [](const BackendInfo& b) { return b.predicted_tokens.load(); });
  per_backend("cachette_route_backend_cached_tokens_total", "counter",
              "Prompt tokens the backend reported as cached (usage.prompt_tokens_details).",
              [](const BackendInfo& b) { return b.cached_tokens.load(); });
  family("cachette_route_index_blocks", "gauge", "Blocks the router knows a backend holds.");
  for (const auto& b : all) {
    for (KvMedium m : {KvMedium::kMemory, KvMedium::kRam, KvMedium::kDisk}) {
      o << "cachette_route_index_blocks{backend=\"" << b->url << "\",medium=\"" << KvMediumName(m)
        << "\"} " << index_.blocks(b->id, m) << '\n';
    }
  }
  o << "cachette_route_index_blocks{medium=\"redis\"} " << index_.blocks(-1, KvMedium::kRedis)
    << '\n';
  family("cachette_route_event_malformed_total", "counter",
         "Event messages from the backend rejected as malformed (each followed by a resync).");
  for (const auto& b : all) {
    std::lock_guard lock(b->mu);
    const uint64_t v = b->sub != nullptr ? b->sub->stats().malformed : 0;
    o << "cachette_route_event_malformed_total{backend=\"" << b->url << "\"} " << v << '\n';
  }
  return o.str();
}

}  // namespace cachette::route
