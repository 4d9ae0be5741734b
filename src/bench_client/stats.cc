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
  if (r.priority != 0) j["priority"] = r.priority;
  if (r.deadline_ms > 0) j["deadline_ms"] = r.deadline_ms;
  if (!r.program_id.empty()) j["program_id"] = r.program_id;
  if (!r.session_id.empty()) j["session_id"] = r.session_id;
  if (!r.tool.empty()) j["tool"] = r.tool;
  if (r.tool_pause_s >= 0) j["tool_pause_ms"] = r.tool_pause_s * 1e3;
  if (r.status != "skipped") j["met_objective"] = r.MetObjective();
  return j;
}

bool RequestRecord::MetObjective() const {
  if (status != "ok") return false;
  return deadline_ms <= 0 || (ttft_s >= 0 && ttft_s * 1e3 <= deadline_ms);
}

void SummarizeKv(const std::vector<KvSample>& samples, ServerFigures* f) {
  using Field = std::optional<double> KvSample::*;
  auto summarize = [&](Field used, Field total, int* n, double* peak, double* mean,
                       double* last_total) {
    *n = 0;
    *peak = *mean = *last_total = 0;
    double sum = 0;
    for (const KvSample& k : samples) {
      if (k.*total) *last_total = *(k.*total);
      if (!(k.*used)) continue;
      ++*n;
      sum += *(k.*used);
      *peak = std::max(*peak, *(k.*used));
    }
    if (*n > 0) *mean = sum / *n;
  };
  summarize(&KvSample::used, &KvSample::total, &f->kv_samples, &f->kv_used_peak,
            &f->kv_used_mean, &f->kv_total);
  summarize(&KvSample::session_used, &KvSample::session_total, &f->session_kv_samples,
            &f->session_kv_used_peak, &f->session_kv_used_mean, &f->session_kv_total);
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return std::numeric_limits<double>::quiet_NaN();
  std::sort(v.begin(), v.end());
  const double rank = std::clamp(p, 0.0, 100.0) / 100.0 * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(rank));
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (rank - static_cast<double>(lo)) * (v[hi] - v[lo]);
}

namespace {

double Mean(const std::vector<double>& v) {
  if (v.empty()) return std::numeric_limits<double>::quiet_NaN();
  double sum = 0;
  for (double x : v) sum += x;
  return sum / static_cast<double>(v.size());
}

// Completion time of each agent program and the calls and pauses of each tool.
void SummarizePrograms(const std::vector<RequestRecord>& records, Summary* s) {
  struct Span {
    double first_sent = std::numeric_limits<double>::infinity(), last_end = 0;
    bool all_ok = true;
  };
  std::map<std::string, Span> spans;
  std::map<std::string, std::vector<double>> pauses_ms;
  for (const RequestRecord& r : records) {
    if (!r.measured || r.program_id.empty()) continue;
    Span& sp = spans[r.program_id];
    if (r.status != "ok") {
      sp.all_ok = false;
      continue;
    }
    sp.first_sent = std::min(sp.first_sent, r.sent_s);
    sp.last_end = std::max(sp.last_end, r.sent_s + r.e2e_s);
    if (r.tool.empty()) continue;
    ++s->by_tool[r.tool].calls;
    auto& p = pauses_ms[r.tool];  // created even without a pause: the tool is listed
    if (r.tool_pause_s >= 0) p.push_back(r.tool_pause_s * 1e3);
  }
  for (auto& [tool, t] : s->by_tool) t.pause_mean_ms = Mean(pauses_ms[tool]);
  std::vector<double> completion_ms;
  for (const auto& [id, sp] : spans) {
    if (sp.all_ok) completion_ms.push_back((sp.last_end - sp.first_sent) * 1e3);
  }
  s->programs_completed = static_cast<int>(completion_ms.size());
  s->program_completion_mean_ms = Mean(completion_ms);
  s->program_completion_p50_ms = Percentile(completion_ms, 50);
  s->program_completion_p90_ms = Percentile(completion_ms, 90);
}

// Goodput over the sent measured requests, in total and per priority class.
void SummarizeGoodput(const std::vector<RequestRecord>& records, Summary* s) {
  std::map<int, std::vector<double>> class_ttft;
  std::map<int, int> class_met;
  int64_t met_tokens = 0;
  for (const RequestRecord& r : records) {
    if (!r.measured || r.status == "skipped") continue;
    const bool met = r.MetObjective();
    PrioritySummary& c = s->by_priority[r.priority];
    ++c.requests;
    if (r.status == "ok" && r.ttft_s >= 0) class_ttft[r.priority].push_back(r.ttft_s * 1e3);
    if (r.deadline_ms > 0) {
      ++s->with_deadline;
      if (met) ++s->met_deadline;
    }
    if (!met) continue;
    ++s->met_objective;
    ++class_met[r.priority];
    met_tokens += r.completion_tokens;
  }
  if (s->wall_s > 0) {
    s->goodput_req_per_s = s->met_objective / s->wall_s;
    s->goodput_tok_per_s = static_cast<double>(met_tokens) / s->wall_s;
  }
  s->goodput_fraction =
      s->requests > 0 ? static_cast<double>(s->met_objective) / s->requests : 0;
  for (auto& [prio, c] : s->by_priority) {
    c.ttft_p50_ms = Percentile(class_ttft[prio], 50);
    c.ttft_p99_ms = Percentile(class_ttft[prio], 99);
    c.goodput_fraction = static_cast<double>(class_met[prio]) / c.requests;
  }
}

}  // namespace

Summary Summarize(const std::vector<RequestRecord>& records, const ServerFigures& server) {
  Summary s;
  s.server = server;
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
    ts.ttft_p99_ms = Percentile(tag_ttft[tag], 99);
    const auto& tt = tag_tokens[tag];
    ts.hit_rate = tt.second > 0 ? static_cast<double>(tt.first) / tt.second : 0;
  }
  SummarizeGoodput(records, &s);
  SummarizePrograms(records, &s);
  return s;
}

nlohmann::json SummaryJson(const Summary& s) {
  nlohmann::json tags = nlohmann::json::object();
  for (const auto& [tag, t] : s.by_tag) {
    tags[tag] = {{"requests", t.requests}, {"ttft_p50_ms", t.ttft_p50_ms},
                 {"ttft_p99_ms", t.ttft_p99_ms}, {"hit_rate", t.hit_rate}};
  }
  nlohmann::json priorities = nlohmann::json::object();
  for (const auto& [prio, c] : s.by_priority) {
    priorities[std::to_string(prio)] = {{"requests", c.requests},
                                        {"ttft_p50_ms", c.ttft_p50_ms},
                                        {"ttft_p99_ms", c.ttft_p99_ms},
                                        {"goodput_fraction", c.goodput_fraction}};
  }
  nlohmann::json tools = nlohmann::json::object();
  for (const auto& [tool, t] : s.by_tool) {
    tools[tool] = {{"calls", t.calls}, {"pause_mean_ms", t.pause_mean_ms}};
  }
  const ServerFigures& f = s.server;
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
          {"first_errors", s.first_errors},
          {"met_objective", s.met_objective},
          {"with_deadline", s.with_deadline},
          {"met_deadline", s.met_deadline},
          {"goodput_req_per_s", s.goodput_req_per_s},
          {"goodput_tok_per_s", s.goodput_tok_per_s},
          {"goodput_fraction", s.goodput_fraction},
          {"by_priority", priorities},
          {"programs_completed", s.programs_completed},
          {"program_completion_mean_ms", s.program_completion_mean_ms},
          {"program_completion_p50_ms", s.program_completion_p50_ms},
          {"program_completion_p90_ms", s.program_completion_p90_ms},
          {"by_tool", tools},
          {"preemptions", f.preemptions},
          {"preemptions_known", f.preemptions_known},
          {"kv_samples", f.kv_samples},
          {"kv_used_peak", f.kv_used_peak},
          {"kv_used_mean", f.kv_used_mean},
          {"kv_total", f.kv_total},
          {"session_kv_samples", f.session_kv_samples},
          {"session_kv_used_peak", f.session_kv_used_peak},
          {"session_kv_used_mean", f.session_kv_used_mean},
          {"session_kv_total", f.session_kv_total},
          {"server_notes", f.notes}};
}

}  // namespace cachette::bench_client
