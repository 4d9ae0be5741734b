#include "bench_client/stats.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace cachette::bench_client {

double RequestRecord::ItlMeanSeconds() const {
  if (gaps_s.empty()) return 0;
  double sum = 0;
  for (double g : gaps_s) sum += g;
  return sum / static_cast<double>(gaps_s.size());
}

nlohmann::json RecordJson(const RequestRecord& r) {
  nlohmann::json j = {{"program", r.program},
                      {"turn", r.turn},
                      {"phase", r.phase},
                      {"tag", r.tag},
                      {"measured", r.measured},
                      {"scheduled_s", r.scheduled_s},
                      {"arrival_s", r.sent_s},
                      {"ttft_ms", r.ttft_s >= 0 ? nlohmann::json(r.ttft_s * 1e3) : nullptr},
                      {"itl_mean_ms", r.ItlMeanSeconds() * 1e3},
                      {"e2e_ms", r.e2e_s * 1e3},
                      {"prompt_tokens", r.prompt_tokens},
                      {"completion_tokens", r.completion_tokens},
                      {"cached_tokens", r.cached_tokens},
                      {"cached_tokens_by_tier", r.cached_by_tier},
                      {"http_status", r.http_status},
                      {"status", r.status}};
  if (!r.error.empty()) j["error"] = r.error;
  return j;
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return std::numeric_limits<double>::quiet_NaN();
  std::sort(v.begin(), v.end());
  const double rank = std::clamp(p, 0.0, 100.0) / 100.0 * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(rank));
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (rank - static_cast<double>(lo)) * (v[hi] - v[lo]);
}

Summary Summarize(const std::vector<RequestRecord>& records) {
  Summary s;
  std::vector<double> ttft, gaps, e2e;
  std::map<std::string, std::vector<double>> tag_ttft;
  std::map<std::string, std::pair<int64_t, int64_t>> tag_tokens;  // cached, prompt
  double first_sent = std::numeric_limits<double>::infinity(), last_end = 0;
  for (const RequestRecord& r : records) {
    if (!r.measured) continue;
    if (r.status == "skipped") {
      ++s.skipped;
      continue;
    }
    ++s.requests;
    first_sent = std::min(first_sent, r.sent_s);
    last_end = std::max(last_end, r.sent_s + r.e2e_s);
    if (r.status != "ok") {
      ++s.errors;
      if (s.first_errors.size() < 3 &&
          std::find(s.first_errors.begin(), s.first_errors.end(), r.error) ==
              s.first_errors.end()) {
        s.first_errors.push_back(r.error);
      }
      continue;
    }
    ++s.ok;
    if (r.ttft_s >= 0) {
      ttft.push_back(r.ttft_s * 1e3);
      tag_ttft[r.tag].push_back(r.ttft_s * 1e3);
    }
    e2e.push_back(r.e2e_s * 1e3);
    for (double g : r.gaps_s) gaps.push_back(g * 1e3);
    s.prompt_tokens += r.prompt_tokens;
    s.completion_tokens += r.completion_tokens;
    s.cached_tokens += r.cached_tokens;
    for (const auto& [tier, n] : r.cached_by_tier) s.cached_by_tier[tier] += n;
    auto& tt = tag_tokens[r.tag];
    tt.first += r.cached_tokens;
    tt.second += r.prompt_tokens;
    ++s.by_tag[r.tag].requests;
  }
  s.wall_s = s.requests > 0 ? last_end - first_sent : 0;
  s.ttft_p50_ms = Percentile(ttft, 50);
  s.ttft_p90_ms = Percentile(ttft, 90);
  s.ttft_p99_ms = Percentile(ttft, 99);
  double sum = 0;
  for (double t : ttft) sum += t;
  s.ttft_mean_ms = ttft.empty() ? std::numeric_limits<double>::quiet_NaN() : sum / ttft.size();
  s.itl_p50_ms = Percentile(gaps, 50);
  s.itl_p99_ms = Percentile(gaps, 99);
  s.e2e_p50_ms = Percentile(e2e, 50);
  if (s.wall_s > 0) {
    s.req_per_s = s.ok / s.wall_s;
    s.gen_tok_per_s = static_cast<double>(s.completion_tokens) / s.wall_s;
  }
  s.hit_rate = s.prompt_tokens > 0
                   ? static_cast<double>(s.cached_tokens) / static_cast<double>(s.prompt_tokens)
                   : 0;
  for (auto& [tag, ts] : s.by_tag) {
    ts.ttft_p50_ms = Percentile(tag_ttft[tag], 50);
    const auto& tt = tag_tokens[tag];
    ts.hit_rate = tt.second > 0 ? static_cast<double>(tt.first) / tt.second : 0;
  }
  return s;
}

nlohmann::json SummaryJson(const Summary& s) {
  nlohmann::json tags = nlohmann::json::object();
  for (const auto& [tag, t] : s.by_tag) {
    tags[tag] = {{"requests", t.requests}, {"ttft_p50_ms", t.ttft_p50_ms},
                 {"hit_rate", t.hit_rate}};
  }
  return {{"requests", s.requests},
          {"ok", s.ok},
          {"errors", s.errors},
          {"skipped", s.skipped},
          {"wall_s", s.wall_s},
          {"ttft_p50_ms", s.ttft_p50_ms},
          {"ttft_p90_ms", s.ttft_p90_ms},
          {"ttft_p99_ms", s.ttft_p99_ms},
          {"ttft_mean_ms", s.ttft_mean_ms},
          {"itl_p50_ms", s.itl_p50_ms},
          {"itl_p99_ms", s.itl_p99_ms},
          {"e2e_p50_ms", s.e2e_p50_ms},
          {"req_per_s", s.req_per_s},
          {"gen_tok_per_s", s.gen_tok_per_s},
          {"prompt_tokens", s.prompt_tokens},
          {"completion_tokens", s.completion_tokens},
          {"cached_tokens", s.cached_tokens},
          {"hit_rate", s.hit_rate},
          {"cached_tokens_by_tier", s.cached_by_tier},
          {"by_tag", tags},
          {"first_errors", s.first_errors}};
}

}  // namespace cachette::bench_client
