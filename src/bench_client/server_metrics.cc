#include "bench_client/server_metrics.h"

#include <httplib.h>

#include <chrono>
#include <cmath>
#include <exception>
#include <utility>

#include "core/prometheus.h"
#include "core/check.h"

namespace cachette::bench_client {
namespace {

std::optional<double> FiniteValue(std::string_view text, std::string_view series) {
  std::optional<double> v = PrometheusValue(text, series);
  if (v && !std::isfinite(*v)) return std::nullopt;
  return v;
}

}  // namespace

MetricsSnapshot ParseMetricsSnapshot(std::string_view text) {
  MetricsSnapshot m;
  m.preemptions = FiniteValue(text, kPreemptionsSeries);
  m.kv_used = FiniteValue(text, kKvUsedSeries);
  m.kv_total = FiniteValue(text, kKvTotalSeries);
  m.session_kv_used = FiniteValue(text, kSessionKvUsedSeries);
  m.session_kv_total = FiniteValue(text, kSessionKvTotalSeries);
  return m;
}

Result<MetricsSnapshot> FetchMetricsSnapshot(const ServerUrl& url) {
  try {
    httplib::Client cli(url.host, url.port);
    cli.set_connection_timeout(2, 0);
    cli.set_read_timeout(2, 0);
    cli.set_keep_alive(false);
    auto res = cli.Get(url.base_path + "/metrics");
    if (!res) {
      return Unavailable("GET " + url.ToString() + "/metrics: " + httplib::to_string(res.error()));
    }
    if (res->status != 200) {
      return Unavailable("GET /metrics: HTTP " + std::to_string(res->status));
    }
    return ParseMetricsSnapshot(res->body);
  } catch (const std::exception& e) {
    return Unavailable(std::string("GET /metrics: ") + e.what());
  }
}

void AddPreemptions(const Result<MetricsSnapshot>& before, const Result<MetricsSnapshot>& after,
                    ServerFigures* f) {
  f->preemptions = 0;
  f->preemptions_known = false;
  for (const auto* snap : {&before, &after}) {
    if (!snap->ok()) {
      f->notes.push_back("preemptions unknown (shown as 0): " + snap->status().message());
      return;
    }
  }
  if (!before->preemptions || !after->preemptions) {
    f->notes.push_back("preemptions unknown (shown as 0): the server's /metrics has no " +
                       std::string(kPreemptionsSeries));
    return;
  }
  f->preemptions = *after->preemptions - *before->preemptions;
  f->preemptions_known = true;
}

KvSampler::KvSampler(ServerUrl url, double every_s, double origin_s)
    : url_(std::move(url)),
      every_s_(every_s),
      origin_s_(origin_s),
      thread_([this](std::stop_token stop) { Loop(stop); }) {
  CT_CHECK(every_s > 0) << "KvSampler period must be > 0, got " << every_s;
}

void KvSampler::Loop(std::stop_token stop) {
  double next_s = SteadySeconds();
  while (!stop.stop_requested()) {
    KvSample k;
    k.t_s = SteadySeconds() - origin_s_;
    if (auto m = FetchMetricsSnapshot(url_); m.ok()) {
      k.used = m->kv_used;
      k.total = m->kv_total;
      k.session_used = m->session_kv_used;
      k.session_total = m->session_kv_total;
    }
    std::unique_lock<std::mutex> lock(mu_);
    samples_.push_back(k);
    // On a fixed grid, so a slow read does not stretch the period; a read longer than a
    // period skips the missed slots.
    next_s += every_s_;
    const double now_s = SteadySeconds();
    while (next_s < now_s) next_s += every_s_;
    wake_.wait_for(lock, stop, std::chrono::duration<double>(next_s - now_s),
                   [] { return false; });
  }
}

std::vector<KvSample> KvSampler::Stop() {
  if (thread_.joinable()) {
    thread_.request_stop();
    thread_.join();
  }
  std::lock_guard<std::mutex> lock(mu_);
  return std::exchange(samples_, {});
}

}  // namespace cachette::bench_client
