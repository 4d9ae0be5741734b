// What the benchmark client reads from the server's Prometheus endpoint (GET /metrics) around
// a run: the preemption counter before and after, and KV pages in use sampled during it.
//
// The series (exported by src/server/metrics.cc):
//   cachette_preemptions_total               counter: running requests sent back to the queue
//   cachette_kv_pages{state="used"|"total"}  gauges: KV pages held (running or cached) / pool
// A server without them (another engine, an older cachette) is not an error: the figure is
// missing and ServerFigures::notes says why. Parsing never fails on malformed text; a series
// that cannot be read is missing.
#pragma once

#include <condition_variable>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "bench_client/openai_client.h"
#include "bench_client/stats.h"
#include "cachette/status.h"

namespace cachette::bench_client {

inline constexpr std::string_view kPreemptionsSeries = "cachette_preemptions_total";
inline constexpr std::string_view kKvUsedSeries = "cachette_kv_pages{state=\"used\"}";
inline constexpr std::string_view kKvTotalSeries = "cachette_kv_pages{state=\"total\"}";
inline constexpr std::string_view kSessionKvUsedSeries =
    "cachette_session_kv_pages{state=\"used\"}";
inline constexpr std::string_view kSessionKvTotalSeries =
    "cachette_session_kv_pages{state=\"total\"}";

// The series above in one /metrics text; each absent when missing, unparsable or not finite.
struct MetricsSnapshot {
  std::optional<double> preemptions;
  std::optional<double> kv_used, kv_total;
  std::optional<double> session_kv_used, session_kv_total;  // --session-kv-type's pool
};
MetricsSnapshot ParseMetricsSnapshot(std::string_view text);

// GET /metrics once (2 s timeouts). Unavailable when the server does not answer or answers
// other than 200 (the message names the status). Never throws.
Result<MetricsSnapshot> FetchMetricsSnapshot(const ServerUrl& url);

// Fills f->preemptions (after - before) and f->preemptions_known, or adds a note naming what
// was missing (the fetch error, or a server without the counter) and leaves 0.
void AddPreemptions(const Result<MetricsSnapshot>& before, const Result<MetricsSnapshot>& after,
                    ServerFigures* f);

// Samples KV pages from /metrics on its own thread, every `every_s` seconds from construction
// (the first sample at once) until Stop() or destruction. A failed read is a sample with no
// values. Not copyable; Stop() is called by one thread.
class KvSampler {
 public:
  // `origin_s` is the run's start on the steady clock (SteadySeconds()): samples' t_s count
  // from it.
  KvSampler(ServerUrl url, double every_s, double origin_s);
  ~KvSampler() { Stop(); }
  KvSampler(const KvSampler&) = delete;
  KvSampler& operator=(const KvSampler&) = delete;

  // Stops the thread (waits for a read in progress, at most its 2 s timeouts) and returns the
  // samples in time order; empty on a second call.
  std::vector<KvSample> Stop();

 private:
  void Loop(std::stop_token stop);

  const ServerUrl url_;
  const double every_s_;
  const double origin_s_;
  std::mutex mu_;
  std::condition_variable_any wake_;
  std::vector<KvSample> samples_;  // guarded by mu_
  std::jthread thread_;            // last: starts after the members it reads
};

}  // namespace cachette::bench_client
