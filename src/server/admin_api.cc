// The cache admin API: stats, lookup, pin, unpin, clear (see docs/serving.md). Access is checked
// before these run (auth.h). The stats name tenants by namespace id and sessions by a digest, never
// by their salt or id.
#include <httplib.h>

#include "server/server.h"

namespace cachette::server {

using nlohmann::json;

void HttpServer::CacheEvents(httplib::Response& res) {
  const json j = backend_.kv_events_info ? backend_.kv_events_info() : json{{"enabled", false}};
  Json(res, 200, Dump(j), "admin");
}

namespace {

// A page pool's figures in the stats.
json PoolJson(KvManager& pool) {
  const KvManager::Stats k = pool.GetStats();
  return {{"kv_type", kernels::KvTypeName(pool.shape().type)},
          {"page_tokens", pool.page_tokens()},
          {"page_bytes", k.page_bytes},
          {"budget_bytes", k.budget_bytes},
          {"pages_total", k.pages_total},
          {"pages_free", k.pages_free},
          {"pages_used", k.pages_used},
          {"pages_active", k.pages_used - k.pages_cached_unreferenced},
          {"pages_cached", k.pages_cached_unreferenced},
          {"pages_pinned", k.pages_pinned},
          {"evictions", k.evictions},
          {"cow_copies", k.cow_copies},
          {"lookups", k.lookups},
          {"lookup_tokens", k.lookup_tokens},
          {"hit_tokens", k.hit_tokens}};
}

}  // namespace

void HttpServer::CacheStats(httplib::Response& res) {
  sched::Scheduler& s = *backend_.scheduler;
  const sched::SchedulerStats st = s.Stats();
  const sched::SegmentCache::Stats sc = s.segment_cache().GetStats();
  json pins = json::array();
  for (const auto& p : s.pins().List()) {
    pins.push_back({{"pin_id", p.id},
                    {"ns", p.ns.ToHex()},
                    {"session", p.digest == 0 ? json(nullptr) : json(SessionDigestHex(p.digest))},
                    {"restored", p.restored},
                    {"tokens", p.tokens}});
  }
  json j = {
      {"kv", PoolJson(s.kv())},
      // The session pool (--session-kv-type), null without one.
      {"session_kv", s.session_kv() != nullptr ? PoolJson(*s.session_kv()) : json(nullptr)},
      {"scheduler",
       {{"queued", st.queued},
        {"running", st.running},
        {"submitted", st.submitted},
        {"finished", st.finished},
        {"cancelled", st.cancelled},
        {"rejected", st.rejected},
        {"failed", st.failed},
        {"preemptions", st.preemptions},
        {"reserve_failures", st.reserve_failures},
        {"swapped_out_tokens", st.swapped_out_tokens},
        {"resume_restored_tokens", st.resume_restored_tokens},
        {"deadline_met", st.deadline_met},
        {"deadline_missed", st.deadline_missed},
        {"program_turns", st.program_turns},
        {"program_pin_hits", st.program_pin_hits},
        {"prefill_budget", st.prefill_budget},
        {"steps", st.steps},
        {"prompt_tokens", st.prompt_tokens},
        {"prefill_tokens", st.prefill_tokens},
        {"cached_tokens", st.cached_tokens},
        {"generated_tokens", st.generated_tokens},
        {"hit_rate", st.prompt_tokens ? static_cast<double>(st.cached_tokens) /
                                            static_cast<double>(st.prompt_tokens)
                                      : 0.0}}},
      {"policies", s.SchedJson()},
      {"segments",
       {{"entries", sc.entries},
        {"bytes", sc.bytes},
        {"budget_bytes", sc.budget_bytes},
        {"hits", sc.hits},
        {"misses", sc.misses},
        {"inserts", sc.inserts},
        {"evictions", sc.evictions},
        {"expirations", sc.expirations},
        {"prefills", st.segment_prefills},
        {"computed_tokens", st.segment_computed_tokens},
        {"relay_saved", st.relay_saved},
        {"relay_hits", st.relay_hits},
        {"tier_hits", st.segment_tier_hits},
        {"tier_tokens", st.segment_tier_tokens},
        {"pipelined_prefills", st.segment_pipelined_prefills},
        {"load_wait_us", st.segment_load_wait_us},
        {"ratio_raised", st.segment_ratio_raised}}},
      {"reused_tokens",
       {{"prefix", st.cached_tokens - st.segment_tokens}, {"segment", st.segment_tokens}}},
      {"recomputed_tokens", st.recomputed_tokens},
      {"prefix_cache", s.options().prefix_cache},
      {"pins", pins},
      {"sessions", s.pins().sessions()},
      {"tiers", s.source().Stats()}};
  Json(res, 200, Dump(j), "admin");
}

void HttpServer::CacheLookup(const httplib::Request& req, httplib::Response& res) {
  ErrorDetail detail;
  auto ref = ParsePromptRef(req.body, backend_.api, /*required=*/true, &detail);
  if (!ref.ok()) return Error(res, ref.status(), "admin", detail);
  sched::Scheduler& s = *backend_.scheduler;
  // A session's KV is in the session pool when the server has one (--session-kv-type), under
  // that pool's namespace; in memory and in the tiers alike.
  const bool session = !ref->session_id.empty() && s.session_kv() != nullptr;
  const Hash128 ns =
      session ? s.SessionNamespace(ref->cache_salt) : s.Namespace(ref->cache_salt);
  KvManager& pool = session ? *s.session_kv() : s.kv();
  const int64_t memory = pool.CachedPrefix(ns, ref->tokens);
  json tiers = {{"memory", memory}};
  int64_t total = memory;
  for (const auto& t : s.source().Lookup(ns, ref->tokens)) {
    tiers[t.tier] = t.tokens;
    total = std::max(total, t.tokens);
  }
  Json(res, 200,
       Dump({{"prompt_tokens", ref->tokens.size()},
             {"cached_tokens", total},
             {"tiers", tiers},
             {"pool", session ? "session" : "main"}}),
       "admin");
}

void HttpServer::CachePin(const httplib::Request& req, httplib::Response& res) {
  ErrorDetail detail;
  auto ref = ParsePromptRef(req.body, backend_.api, /*required=*/true, &detail);
  if (!ref.ok()) return Error(res, ref.status(), "admin", detail);
  if (!ref->session_id.empty()) {
    // A session's turns pin its conversation (session_ttl_s) in its own pool; a pin made here
    // would be a plain one in the main pool.
    detail.param = "session_id";
    return Error(res,
                 InvalidArgument("'session_id': a session's conversation is pinned by its "
                                 "turns (session_ttl_s); /v1/cache/unpin takes a session_id"),
                 "admin", detail);
  }
  const json& b = ref->body;
  int64_t ttl_s = 300;
  if (b.contains("ttl_s")) {
    if (!b["ttl_s"].is_number_integer() || b["ttl_s"].get<int64_t>() < 1 ||
        b["ttl_s"].get<int64_t>() > 7 * 24 * 3600) {
      return Error(res, InvalidArgument("'ttl_s' must be an integer in [1, 604800]"), "admin");
    }
    ttl_s = b["ttl_s"].get<int64_t>();
  }
  bool prefill = true;
  if (b.contains("prefill")) {
    if (!b["prefill"].is_boolean()) {
      return Error(res, InvalidArgument("'prefill' must be a boolean"), "admin");
    }
    prefill = b["prefill"].get<bool>();
  }
  sched::Scheduler& s = *backend_.scheduler;
  uint64_t pin_id = 0;
  if (prefill) {
    // Prefill what is missing through the scheduler (max_tokens 0), which pins it afterwards.
    sched::SchedRequest r;
    r.prompt = ref->tokens;
    r.gen.max_tokens = 0;
    r.cache_salt = ref->cache_salt;
    r.pin_ttl_ms = ttl_s * 1000;
    auto stream = s.Submit(std::move(r));
    if (!stream.ok()) return Error(res, stream.status(), "admin");
    sched::StreamEvent e;
    while (!(*stream)->Next(&e, std::chrono::milliseconds(1000)) ||
           e.kind == sched::StreamEvent::Kind::kToken) {
    }
    if (e.kind == sched::StreamEvent::Kind::kError) return Error(res, e.error, "admin");
    pin_id = e.usage.pin_id;
  } else {
    pin_id = s.pins().Add(s.Namespace(ref->cache_salt), ref->cache_salt, ref->tokens,
                          ttl_s * 1000).id;
  }
  int64_t pinned = 0;
  for (const auto& p : s.pins().List()) {
    if (p.id == pin_id) pinned = p.tokens;
  }
  Json(res, 200,
       Dump({{"pin_id", pin_id},
             {"pinned_tokens", pinned},
             {"prompt_tokens", ref->tokens.size()},
             {"ttl_s", ttl_s}}),
       "admin");
}

void HttpServer::CacheUnpin(const httplib::Request& req, httplib::Response& res) {
  ErrorDetail detail;
  auto ref = ParsePromptRef(req.body, backend_.api, /*required=*/false, &detail);
  if (!ref.ok()) return Error(res, ref.status(), "admin", detail);
  const json& b = ref->body;
  sched::Scheduler& s = *backend_.scheduler;
  bool removed = false;
  if (b.contains("pin_id") && b["pin_id"].is_number_unsigned()) {
    removed = s.pins().Remove(b["pin_id"].get<uint64_t>());
  } else if (b.contains("session_id") && b["session_id"].is_string()) {
    removed = s.pins().RemoveSession(ref->session_id);
  } else {
    return Error(res, InvalidArgument("give 'pin_id' (integer) or 'session_id' (string)"),
                 "admin");
  }
  if (!removed) return Error(res, NotFound("no such pin or session"), "admin");
  Json(res, 200, Dump({{"unpinned", true}}), "admin");
}

void HttpServer::CacheClear(const httplib::Request& req, httplib::Response& res) {
  ErrorDetail detail;
  auto ref = ParsePromptRef(req.body, backend_.api, /*required=*/false, &detail);
  if (!ref.ok()) return Error(res, ref.status(), "admin", detail);
  sched::Scheduler& s = *backend_.scheduler;
  const json& b = ref->body;
  if (b.contains("all") && b["all"].is_boolean() && b["all"].get<bool>()) {
    const size_t n = s.ClearAll();
    return Json(res, 200, Dump({{"cleared", true}, {"namespaces", n}}), "admin");
  }
  // Pins, pages and the chunks in every tier (RAM, disk, Redis: other processes' copies too).
  if (Status st = s.ClearTenant(ref->cache_salt); !st.ok()) return Error(res, st, "admin");
  Json(res, 200, Dump({{"cleared", true}, {"namespaces", 1}}), "admin");
}

void HttpServer::CacheSegments(const httplib::Request& req, httplib::Response& res) {
  ErrorDetail detail;
  auto ref = ParseSegmentsRef(req.body, backend_.api, &detail);
  if (!ref.ok()) return Error(res, ref.status(), "admin", detail);
  sched::Scheduler& s = *backend_.scheduler;
  const size_t context_tokens = ref->context.size();
  // The engine belongs to the scheduler loop: the work runs there, this thread waits.
  auto done = s.PrecomputeSegments(ref->cache_salt, std::move(ref->context),
                                   std::move(ref->segments), ref->ttl_ms);
  if (!done.ok()) {
    if (done.status().code() == StatusCode::kInvalidArgument) detail.param = "segments";
    return Error(res, done.status(), "admin", detail);
  }
  json segs = json::array();
  for (const sched::PrecomputedSegment& p : *done) {
    segs.push_back({{"tokens", p.tokens}, {"cached", p.cached}});
  }
  Json(res, 200,
       Dump({{"segments", segs},
             {"context_tokens", context_tokens},
             {"ttl_s", ref->ttl_ms / 1000}}),
       "admin");
}

}  // namespace cachette::server
