// `cachette route`: an OpenAI-compatible proxy that sends each request to the backend that holds
// most of its KV, balanced against load (in the spirit of NVIDIA Dynamo's KV router and llm-d's
// scheduler). Flags and figures: docs/serving.md "Routing", docs/benchmarks.md "Routing".
//
// A request's path through the router:
//   1. Parse: the body is read with the server's own parser (server::ParseGenerate, the same
//      chat template and tokenizer as the backends), giving the prompt tokens, cache_salt and
//      session_id. A body the router cannot parse is still forwarded (the backend answers it);
//      it is routed by load alone.
//   2. Score: the prompt's chained block hashes in its namespace (KvNamespace: model, KV type,
//      cache_salt, so tenants never share) are looked up in the BlockIndex for every live
//      backend; for a request with a session_id at a backend with a session pool
//      (--session-kv-type), in that pool's namespace. Both terms of the cost are prompt tokens
//      of prefill:
//        cost(b) = prompt tokens not held by b (held tokens weighted by medium)
//                + load_weight x load(b),
//        load(b) = what the router's requests at b still have to prefill (those whose first
//                  bytes have not come back) + 16 per request of them decoding + a mean
//                  prompt per request b's /metrics shows running or queued beyond the
//                  router's own (other clients; ReportedLoad).
//      Lowest cost wins. --policy approx scores from the router's own record of where
//      it sent what (and so does kv for a backend that publishes no events: the fallback);
//      round-robin and least-loaded ignore the cache (baselines).
//      With kv and approx, a session_id sticks to its backend while that backend is up.
//   3. Forward, with retries: nothing is written to the client before the backend's first body
//      bytes arrive (for a stream: its first event, after queueing and prefill). A backend that
//      cannot be connected to or drops the connection until then is marked down, and one that
//      answers 503 (loading, draining) is passed over; the next best backend is tried (up to
//      max_attempts). A streamed response already under way that loses its backend ends with
//      an SSE error event and no [DONE], so the client knows.
//
// Backends are checked every health_interval_ms (GET /health and /metrics); one that comes
// (back) up has its /v1/cache/events read and, with --policy kv, its events subscribed to (a
// snapshot first, so a late or restarted router starts from the backend's true state). One that
// goes down is dropped from routing and from the index until it answers again. One whose /health
// gets no answer at all (gone, or frozen: it accepts connections and never answers) also has the
// requests in flight there aborted at once: retried as in 3 when nothing was written to the
// client yet, else ended as a broken stream, instead of waiting out read_timeout_s.
//
// Thread-safety: the HTTP handlers run on httplib's threads; the health thread and the event
// subscribers' threads update backends; every shared field is atomic or behind a mutex.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <shared_mutex>
#include <string>
#include <thread>
#include <vector>

#include "cachette/status.h"
#include "kernels/kernels.h"
#include "model/model.h"
#include "route/block_index.h"
#include "server/chat_template.h"
#include "server/openai.h"

namespace httplib {
class Server;
struct Request;
struct Response;
}  // namespace httplib

namespace cachette::route {

enum class Policy { kKv, kApprox, kRoundRobin, kLeastLoaded };
// "kv", "approx", "round-robin", "least-loaded"; kInvalidArgument naming --policy otherwise.
Result<Policy> ParsePolicy(std::string_view name);
const char* PolicyName(Policy p);

struct RouterOptions {
  std::string host = "127.0.0.1";
  int port = 8000;                     // 0: any free port
  std::vector<std::string> backends;   // http://host:port
  std::string backends_file;           // one URL a line ('#' comments); re-read by Reload()
  Policy policy = Policy::kKv;
  TierWeights weights;
  double load_weight = 1.0;
  int health_interval_ms = 1000;
  int connect_timeout_ms = 1000;
  int read_timeout_s = 600;            // a backend silent this long is failed
  int max_attempts = 3;                // backends tried per request
  int http_threads = 256;
  kernels::KvType kv_type = kernels::KvType::kF16;  // the backends' --kv-type
};

// A backend's own count of its requests (running + queued, from its /metrics) and how many of
// them this router did not send: the load other clients put there. A sample may still count
// requests of this router that have ended: those that ended while it was in transit, and those
// that ended shortly before it was sent, as a backend's count can lag its answers. So the
// router's requests that ended since the sample BEFORE this one was sent are not taken as
// foreign: a lag of up to one health interval is forgiven, at the price of hiding as many
// foreign requests for that long. (Counting them made a lagging sample put a mean prompt of
// phantom load on the backend that had just answered, and the follow-up that should hit its
// cache went elsewhere.) Thread-safe: one thread samples, any thread finishes and reads; a read
// racing a sample may mix the two samples' figures, which only an estimate sees.
class ReportedLoad {
 public:
  // One of this router's requests there ended (its answer is complete).
  void Finished() { finished_.fetch_add(1); }
  // Before sending a sample request: the mark to pass to Sampled with its answer.
  int64_t Sending() const { return finished_.load(); }
  void Sampled(int64_t mark, double reported) {
    forgive_from_ = sent_at_.exchange(mark);
    reported_ = reported;
  }
  double reported() const { return reported_.load(); }
  // The requests the last sample counted beyond this router's `inflight` ones (>= 0).
  double Foreign(int64_t inflight) const {
    const int64_t ended = finished_.load() - forgive_from_.load();
    return std::max(0.0, reported_.load() - static_cast<double>(inflight + ended));
  }

 private:
  std::atomic<int64_t> finished_{0};
  std::atomic<int64_t> sent_at_{0};       // finished_ when the last sample was sent
  std::atomic<int64_t> forgive_from_{0};  // ... and when the one before it was
  std::atomic<double> reported_{0};
};

struct BackendInfo;  // router.cc

class Router {
 public:
  // `model`, `api` (its tokenizer and chat template) are borrowed and must outlive the router.
  Router(const Model& model, const server::ApiContext& api, RouterOptions options);
  ~Router();  // Stop()s

  // Reads the backends (flags and file), binds, starts the health thread and the listener.
  Status Start();
  int port() const { return port_; }
  // Re-reads backends_file: new URLs are added, missing ones dropped (requests in flight to
  // them finish). kIOError naming the file.
  Status Reload();
  void Stop();

  // What the router reads of a request body.
  struct Parsed {
    bool ok = false;               // false: the router could not parse it (routed by load)
    std::vector<TokenId> tokens;   // the prompt, chat template applied
    Hash128 ns;                    // its namespace (model, KV type, cache_salt)
    std::string cache_salt;
    std::string session_id;
    bool stream = false;
  };
  Parsed Parse(const std::string& body, server::Endpoint endpoint);

  // One backend's score for a request (POST /v1/router/explain answers with these).
  struct Candidate {
    int id = -1;
    std::string url;
    Overlap overlap;
    double requests = 0;  // in flight there (the router's count or the backend's, the larger)
    double load = 0;      // the work ahead of a newcomer there, in prompt tokens
    double cost = 0;
  };
  // The live backends in the order they would be tried for `p` (empty when none is up).
  std::vector<Candidate> Rank(const Parsed& p);

 private:
  struct Upstream;  // one streamed response being relayed (router.cc)

  void Routes();
  void Proxy(const httplib::Request& req, httplib::Response& res, server::Endpoint endpoint);
  void Forward(const httplib::Request& req, httplib::Response& res, const std::string& path);
  void HealthLoop();
  void CheckBackend(const std::shared_ptr<BackendInfo>& b);
  void Subscribe(const std::shared_ptr<BackendInfo>& b);
  void MarkDown(const std::shared_ptr<BackendInfo>& b, const std::string& why);
  std::vector<std::shared_ptr<BackendInfo>> Snapshot() const;
  Status SetBackends(const std::vector<std::string>& urls);
  // The namespace of tenant `salt` in KV of `type` (cached, bounded).
  Hash128 NamespaceFor(const std::string& salt, kernels::KvType type);
  // Where `p`'s KV is at backend b: its session pool's namespace for a request with a
  // session_id at a backend with a session pool, else p.ns.
  Hash128 NamespaceAt(const BackendInfo& b, const Parsed& p);
  // The session pool's KV type a backend's GET /v1/cache/events advertises (as an int), or -1
  // without one or when its namespace is not the one this router computes for that type.
  int SessionKvTypeOf(const nlohmann::json& info, const std::string& url);
  std::string MetricsText() const;
  nlohmann::json BackendsJson() const;

  const Model& model_;
  const server::ApiContext& api_;
  RouterOptions options_;
  std::unique_ptr<httplib::Server> http_;
  std::thread listener_, health_;
  std::atomic<bool> listener_returned_{false};  // its accept loop has returned
  int port_ = 0;
  BlockIndex index_;

  mutable std::shared_mutex backends_mu_;
  std::vector<std::shared_ptr<BackendInfo>> backends_;  // GUARDED_BY(backends_mu_)
  int next_id_ = 0;                                     // GUARDED_BY(backends_mu_)

  std::mutex ns_mu_;
  // (KV type, salt) -> namespace; GUARDED_BY(ns_mu_), bounded
  std::map<std::pair<int, std::string>, Hash128> ns_by_salt_;
  Hash128 shared_ns_;                          // the namespace of cache_salt ""

  std::mutex sessions_mu_;
  std::map<std::string, int> sessions_;  // session_id -> backend id; GUARDED_BY(sessions_mu_)

  std::atomic<uint64_t> rr_{0};
  std::atomic<double> mean_prompt_tokens_{512};
  std::atomic<uint64_t> requests_{0}, failures_{0}, unparsed_{0};
  std::atomic<uint64_t> decision_ns_sum_{0}, decisions_{0};
  mutable std::mutex latency_mu_;
  std::vector<double> decision_us_;  // recent decision times, for the p50 (bounded ring)
  size_t decision_next_ = 0;

  std::mutex stop_mu_;
  std::condition_variable stop_cv_;
  bool stopping_ = false;
};

}  // namespace cachette::route
