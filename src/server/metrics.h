// Server metrics in the Prometheus text exposition format (version 0.0.4).
//
// Counters and histograms are recorded by HTTP threads as requests finish; gauges (queue,
// running sequences, KV pages, pins) are read from the scheduler and KvManager when /metrics is
// scraped. Families share the `cachette_` prefix.
//
// Thread-safety: all methods are safe to call concurrently (one mutex; recording is a few adds).
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "kv/kv_manager.h"
#include "sched/request.h"
#include "sched/scheduler.h"

namespace cachette::server {

class Histogram {
 public:
  explicit Histogram(std::vector<double> upper_bounds);
  void Observe(double v);  // NOT synchronized: Metrics holds the lock
  void Render(const std::string& name, const std::string& help, std::string* out) const;

 private:
  std::vector<double> bounds_;
  std::vector<uint64_t> counts_;  // [bounds_.size() + 1], the last is +Inf
  double sum_ = 0;
  uint64_t count_ = 0;
};

class Metrics {
 public:
  Metrics();

  // One finished HTTP request to `endpoint` ("chat", "completions", "admin", ...).
  void CountRequest(const std::string& endpoint, int http_status);
  // A generation that completed (or was cancelled): its usage and latencies.
  void ObserveGeneration(const sched::RequestUsage& usage, double ttft_s, double e2e_s);
  void ObserveInterToken(double seconds);

  struct Gauges {
    sched::SchedulerStats sched;
    KvManager::Stats kv;
    std::optional<KvManager::Stats> session_kv;  // --session-kv-type's pool
    size_t pins = 0, sessions = 0;
    sched::SegmentCache::Stats segments;
    bool ready = false;
  };
  std::string Render(const Gauges& g);

 private:
  std::mutex mu_;
  std::map<std::pair<std::string, int>, uint64_t> requests_;  // GUARDED_BY(mu_)
  uint64_t prompt_tokens_ = 0, generation_tokens_ = 0;        // GUARDED_BY(mu_)
  std::map<std::string, uint64_t> cached_by_tier_;            // GUARDED_BY(mu_)
  Histogram ttft_, itl_, e2e_;                                 // GUARDED_BY(mu_)
};

}  // namespace cachette::server
