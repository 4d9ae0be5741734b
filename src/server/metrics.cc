#include "server/metrics.h"

#include <cstdio>

namespace cachette::server {
namespace {

std::string Num(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return buf;
}

void Family(std::string* out, const std::string& name, const char* type, const char* help) {
  *out += "# HELP " + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
}

void Sample(std::string* out, const std::string& name, double v, const std::string& labels = "") {
  *out += name + (labels.empty() ? "" : "{" + labels + "}") + " " + Num(v) + "\n";
}

}  // namespace

Histogram::Histogram(std::vector<double> upper_bounds)
    : bounds_(std::move(upper_bounds)), counts_(bounds_.size() + 1, 0) {}

void Histogram::Observe(double v) {
  size_t i = 0;
  while (i < bounds_.size() && v > bounds_[i]) ++i;
  ++counts_[i];
  sum_ += v;
  ++count_;
}

void Histogram::Render(const std::string& name, const std::string& help, std::string* out) const {
  Family(out, name, "histogram", help.c_str());
  uint64_t cum = 0;
  for (size_t i = 0; i < bounds_.size(); ++i) {
    cum += counts_[i];
    Sample(out, name + "_bucket", static_cast<double>(cum), "le=\"" + Num(bounds_[i]) + "\"");
  }
  cum += counts_.back();
  Sample(out, name + "_bucket", static_cast<double>(cum), "le=\"+Inf\"");
  Sample(out, name + "_sum", sum_);
  Sample(out, name + "_count", static_cast<double>(count_));
}

Metrics::Metrics()
    : ttft_({0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}),
      itl_({0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1}),
      e2e_({0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120}) {}

void Metrics::CountRequest(const std::string& endpoint, int http_status) {
  std::lock_guard<std::mutex> lock(mu_);
  ++requests_[{endpoint, http_status}];
}

void Metrics::ObserveGeneration(const sched::RequestUsage& u, double ttft_s, double e2e_s) {
  std::lock_guard<std::mutex> lock(mu_);
  prompt_tokens_ += static_cast<uint64_t>(u.prompt_tokens);
  generation_tokens_ += static_cast<uint64_t>(u.completion_tokens);
  for (const auto& t : u.cached_by_tier) cached_by_tier_[t.tier] += static_cast<uint64_t>(t.tokens);
  if (ttft_s > 0) ttft_.Observe(ttft_s);
  e2e_.Observe(e2e_s);
}

void Metrics::ObserveInterToken(double seconds) {
  std::lock_guard<std::mutex> lock(mu_);
  itl_.Observe(seconds);
}

std::string Metrics::Render(const Gauges& g) {
  std::string out;
  std::lock_guard<std::mutex> lock(mu_);
  Family(&out, "cachette_requests_total", "counter", "HTTP requests by endpoint and status.");
  for (const auto& [key, n] : requests_) {
    Sample(&out, "cachette_requests_total", static_cast<double>(n),
           "endpoint=\"" + key.first + "\",status=\"" + std::to_string(key.second) + "\"");
  }
  Family(&out, "cachette_prompt_tokens_total", "counter", "Prompt tokens of finished requests.");
  Sample(&out, "cachette_prompt_tokens_total", static_cast<double>(prompt_tokens_));
  Family(&out, "cachette_generation_tokens_total", "counter", "Generated tokens.");
  Sample(&out, "cachette_generation_tokens_total", static_cast<double>(generation_tokens_));
  Family(&out, "cachette_cache_hit_tokens_total", "counter",
         "Prompt tokens reused instead of prefilled, by tier.");
  if (cached_by_tier_.empty()) Sample(&out, "cachette_cache_hit_tokens_total", 0, "tier=\"memory\"");
  for (const auto& [tier, n] : cached_by_tier_) {
    Sample(&out, "cachette_cache_hit_tokens_total", static_cast<double>(n),
           "tier=\"" + tier + "\"");
  }
  Family(&out, "cachette_reused_tokens_total", "counter",
         "Prompt tokens whose KV was reused: exact prefix (radix index, tiers, segments in "
         "place) or cached segments placed at a new position.");
  Sample(&out, "cachette_reused_tokens_total",
         static_cast<double>(g.sched.cached_tokens - g.sched.segment_tokens), "kind=\"prefix\"");
  Sample(&out, "cachette_reused_tokens_total", static_cast<double>(g.sched.segment_tokens),
         "kind=\"segment\"");
  Family(&out, "cachette_recomputed_tokens_total", "counter",
         "Placed segment tokens recomputed (blend, cachecraft).");
  Sample(&out, "cachette_recomputed_tokens_total", static_cast<double>(g.sched.recomputed_tokens));
  Family(&out, "cachette_segment_cache_entries", "gauge", "Segments in the segment cache.");
  Sample(&out, "cachette_segment_cache_entries", static_cast<double>(g.segments.entries));
  Family(&out, "cachette_segment_cache_bytes", "gauge", "Bytes of the segment cache.");
  Sample(&out, "cachette_segment_cache_bytes", static_cast<double>(g.segments.bytes));
  Family(&out, "cachette_segment_cache_lookups_total", "counter",
         "Segment cache lookups, by result.");
  Sample(&out, "cachette_segment_cache_lookups_total", static_cast<double>(g.segments.hits),
         "result=\"hit\"");
  Sample(&out, "cachette_segment_cache_lookups_total", static_cast<double>(g.segments.misses),
         "result=\"miss\"");
  Family(&out, "cachette_segment_computed_tokens_total", "counter",
         "Segment tokens computed on their own for the segment cache.");
  Sample(&out, "cachette_segment_computed_tokens_total",
         static_cast<double>(g.sched.segment_computed_tokens));
  Family(&out, "cachette_segment_tier_hits_total", "counter",
         "Segments the segment cache lacked that the disk or Redis tier gave back.");
  Sample(&out, "cachette_segment_tier_hits_total",
         static_cast<double>(g.sched.segment_tier_hits));
  Family(&out, "cachette_segment_pipelined_prefills_total", "counter",
         "Segment prefills that computed while their segments' later layers were still loading.");
  Sample(&out, "cachette_segment_pipelined_prefills_total",
         static_cast<double>(g.sched.segment_pipelined_prefills));
  Family(&out, "cachette_segment_load_wait_seconds_total", "counter",
         "Time pipelined segment prefills waited for a layer of their segments to load.");
  Sample(&out, "cachette_segment_load_wait_seconds_total",
         static_cast<double>(g.sched.segment_load_wait_us) / 1e6);
  Family(&out, "cachette_relay_saved_total", "counter",
         "Finished requests whose output's KV went into the segment cache (--relay).");
  Sample(&out, "cachette_relay_saved_total", static_cast<double>(g.sched.relay_saved));
  Family(&out, "cachette_relay_hits_total", "counter",
         "Segments found in the segment cache as an earlier request's output (--relay).");
  Sample(&out, "cachette_relay_hits_total", static_cast<double>(g.sched.relay_hits));
  Family(&out, "cachette_prefill_tokens_total", "counter", "Prompt tokens actually computed.");
  Sample(&out, "cachette_prefill_tokens_total", static_cast<double>(g.sched.prefill_tokens));
  ttft_.Render("cachette_time_to_first_token_seconds", "Submit to first token.", &out);
  itl_.Render("cachette_inter_token_latency_seconds", "Time between streamed tokens.", &out);
  e2e_.Render("cachette_request_duration_seconds", "Submit to last token.", &out);

  Family(&out, "cachette_ready", "gauge", "1 when the model is loaded and serving.");
  Sample(&out, "cachette_ready", g.ready ? 1 : 0);
  Family(&out, "cachette_queue_length", "gauge", "Requests waiting for admission.");
  Sample(&out, "cachette_queue_length", static_cast<double>(g.sched.queued));
  Family(&out, "cachette_running_sequences", "gauge", "Sequences in the running batch.");
  Sample(&out, "cachette_running_sequences", static_cast<double>(g.sched.running));
  Family(&out, "cachette_requests_rejected_total", "counter", "Requests refused: queue full.");
  Sample(&out, "cachette_requests_rejected_total", static_cast<double>(g.sched.rejected));
  Family(&out, "cachette_requests_cancelled_total", "counter", "Requests whose client left.");
  Sample(&out, "cachette_requests_cancelled_total", static_cast<double>(g.sched.cancelled));
  Family(&out, "cachette_preemptions_total", "counter",
         "Running requests sent back to the queue to free KV pages (a wrong Past-Future estimate "
         "or a higher-ranked request).");
  Sample(&out, "cachette_preemptions_total", static_cast<double>(g.sched.preemptions));
  Family(&out, "cachette_swapped_out_tokens_total", "counter",
         "Tokens of KV copied to the tiers by swap preemptions (--preempt swap).");
  Sample(&out, "cachette_swapped_out_tokens_total",
         static_cast<double>(g.sched.swapped_out_tokens));
  Family(&out, "cachette_resume_restored_tokens_total", "counter",
         "Tokens of KV restored from the tiers by preempted requests when they resumed.");
  Sample(&out, "cachette_resume_restored_tokens_total",
         static_cast<double>(g.sched.resume_restored_tokens));
  Family(&out, "cachette_deadline_requests_total", "counter",
         "Requests with a deadline_ms, by whether their first token met it.");
  Sample(&out, "cachette_deadline_requests_total", static_cast<double>(g.sched.deadline_met),
         "result=\"met\"");
  Sample(&out, "cachette_deadline_requests_total", static_cast<double>(g.sched.deadline_missed),
         "result=\"missed\"");
  Family(&out, "cachette_program_turns_total", "counter",
         "Agent turns that followed a tool call, by whether the program's pin still held.");
  Sample(&out, "cachette_program_turns_total",
         static_cast<double>(g.sched.program_pin_hits), "pin=\"held\"");
  Sample(&out, "cachette_program_turns_total",
         static_cast<double>(g.sched.program_turns - g.sched.program_pin_hits),
         "pin=\"expired\"");
  Family(&out, "cachette_prefill_budget_tokens", "gauge",
         "Prefill tokens the last step with decodes allowed (--itl-target-ms).");
  Sample(&out, "cachette_prefill_budget_tokens", static_cast<double>(g.sched.prefill_budget));
  Family(&out, "cachette_kv_pages", "gauge",
         "KV pages: total, used (running or cached), active (held by running sequences), "
         "cached (held only by the index), pinned, free.");
  const double active = static_cast<double>(g.kv.pages_used) -
                        static_cast<double>(g.kv.pages_cached_unreferenced);
  Sample(&out, "cachette_kv_pages", g.kv.pages_total, "state=\"total\"");
  Sample(&out, "cachette_kv_pages", g.kv.pages_used, "state=\"used\"");
  Sample(&out, "cachette_kv_pages", active, "state=\"active\"");
  Sample(&out, "cachette_kv_pages", g.kv.pages_cached_unreferenced, "state=\"cached\"");
  Sample(&out, "cachette_kv_pages", g.kv.pages_pinned, "state=\"pinned\"");
  Sample(&out, "cachette_kv_pages", g.kv.pages_free, "state=\"free\"");
  if (g.session_kv) {
    const KvManager::Stats& k = *g.session_kv;
    Family(&out, "cachette_session_kv_pages", "gauge",
           "Pages of the session pool (--session-kv-type): total, used, cached, pinned, free.");
    Sample(&out, "cachette_session_kv_pages", k.pages_total, "state=\"total\"");
    Sample(&out, "cachette_session_kv_pages", k.pages_used, "state=\"used\"");
    Sample(&out, "cachette_session_kv_pages", k.pages_cached_unreferenced, "state=\"cached\"");
    Sample(&out, "cachette_session_kv_pages", k.pages_pinned, "state=\"pinned\"");
    Sample(&out, "cachette_session_kv_pages", k.pages_free, "state=\"free\"");
  }
  Family(&out, "cachette_kv_evictions_total", "counter", "Cached KV pages evicted.");
  Sample(&out, "cachette_kv_evictions_total", static_cast<double>(g.kv.evictions));
  Family(&out, "cachette_kv_cow_copies_total", "counter", "Shared pages copied before a write.");
  Sample(&out, "cachette_kv_cow_copies_total", static_cast<double>(g.kv.cow_copies));
  Family(&out, "cachette_kv_lookup_tokens_total", "counter", "Tokens looked up in the index.");
  Sample(&out, "cachette_kv_lookup_tokens_total", static_cast<double>(g.kv.lookup_tokens));
  Family(&out, "cachette_pins", "gauge", "Pins held (cache_control, admin, sessions).");
  Sample(&out, "cachette_pins", static_cast<double>(g.pins));
  Family(&out, "cachette_sessions", "gauge", "Sessions with a pinned conversation.");
  Sample(&out, "cachette_sessions", static_cast<double>(g.sessions));
  return out;
}

}  // namespace cachette::server
