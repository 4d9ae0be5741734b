#include "bench_client/runner.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <thread>

namespace cachette::bench_client {
namespace {

void SleepUntil(double run_start_s, double t_s) {
  const double wait = run_start_s + t_s - SteadySeconds();
  if (wait > 0) std::this_thread::sleep_for(std::chrono::duration<double>(wait));
}

// Sends one program's turns in order; writes its records into `out` (one per turn).
void RunProgram(const Program& p, int program_index, const ServerUrl& url,
                const std::string& model, const RunOptions& o, const std::string& nonce,
                double run_start_s, double phase_start_s, std::mutex& mu,
                std::vector<RequestRecord>* out) {
  std::vector<ChatMessage> history;
  if (!p.system.empty()) history.push_back({"system", p.system});
  double prev_end_s = phase_start_s;
  bool past_cap = false;
  for (size_t i = 0; i < p.turns.size(); ++i) {
    const Turn& t = p.turns[i];
    RequestRecord& r = (*out)[i];
    r.program = program_index;
    r.turn = static_cast<int>(i);
    r.phase = p.phase;
    r.tag = t.tag;
    r.measured = t.measured;
    r.priority = t.priority;
    r.deadline_ms = t.deadline_ms;
    r.tool = t.tool;
    if (!p.id.empty()) r.program_id = p.id + "-" + nonce;
    if (o.session_ids) r.session_id = "sess-" + std::to_string(program_index) + "-" + nonce;
    r.scheduled_s = t.at_s >= 0 ? phase_start_s + t.at_s : prev_end_s + t.after_prev_s;
    const double send_s = std::max(r.scheduled_s, prev_end_s + t.after_prev_s);
    if (past_cap || (o.duration_s > 0 && send_s > o.duration_s)) {
      past_cap = true;
      r.status = "skipped";
      continue;
    }
    SleepUntil(run_start_s, send_s);
    std::vector<ChatMessage> messages;
    if (p.keep_history) {
      history.push_back({"user", t.user});
      messages = history;
    } else {
      messages = history;  // the system prompt only
      messages.push_back({"user", t.user});
    }
    StreamChat(url, model, messages, t.max_tokens, run_start_s, &r, o.stop);
    // The previous turn's tool ran from its answer until this send.
    if (i > 0 && !p.turns[i - 1].tool.empty()) {
      (*out)[i - 1].tool_pause_s = r.sent_s - prev_end_s;
    }
    // The answer joins the history even after an error (then empty), so later turns keep
    // their shape and the comparison between servers stays turn for turn.
    if (p.keep_history) history.push_back({"assistant", r.answer});
    prev_end_s = r.sent_s + r.e2e_s;
    if (o.on_record) {
      std::lock_guard<std::mutex> lock(mu);
      o.on_record(r);
    }
  }
}

// 8 hex digits from the random device and the clock: unique enough between runs.
std::string FreshNonce() {
  std::random_device rd;
  const auto ticks = std::chrono::steady_clock::now().time_since_epoch().count();
  const uint32_t x = rd() ^ static_cast<uint32_t>(ticks) ^ static_cast<uint32_t>(ticks >> 32);
  char b[9];
  std::snprintf(b, sizeof(b), "%08x", x);
  return b;
}

}  // namespace

Result<RunResult> RunWorkload(const Workload& w, const RunOptions& o) {
  CT_ASSIGN_OR_RETURN(const ServerUrl url, ParseServerUrl(o.url));
  RunResult result;
  if (o.model.empty()) {
    CT_ASSIGN_OR_RETURN(result.model, FetchModelId(url));
  } else {
    result.model = o.model;
  }
  std::vector<std::vector<RequestRecord>> per_program(w.programs.size());
  for (size_t i = 0; i < w.programs.size(); ++i) {
    per_program[i].resize(w.programs[i].turns.size());
  }
  std::set<int> phases;
  for (const Program& p : w.programs) phases.insert(p.phase);
  result.run_nonce = o.run_nonce.empty() ? FreshNonce() : o.run_nonce;
  std::mutex mu;
  const Result<MetricsSnapshot> before =
      o.metrics_every_s > 0 ? FetchMetricsSnapshot(url)
                            : Unavailable("/metrics not read (metrics_every_s is 0)");
  const double run_start_s = SteadySeconds();
  std::optional<KvSampler> sampler;
  // A server without /metrics would answer 4 failed reads a second for nothing.
  if (before.ok()) sampler.emplace(url, o.metrics_every_s, run_start_s);
  for (int phase : phases) {
    const double phase_start_s = SteadySeconds() - run_start_s;
    std::vector<std::thread> threads;
    for (size_t i = 0; i < w.programs.size(); ++i) {
      if (w.programs[i].phase != phase) continue;
      threads.emplace_back(RunProgram, std::cref(w.programs[i]), static_cast<int>(i),
                           std::cref(url), std::cref(result.model), std::cref(o),
                           std::cref(result.run_nonce), run_start_s, phase_start_s, std::ref(mu),
                           &per_program[i]);
    }
    for (auto& t : threads) t.join();
  }
  result.wall_s = SteadySeconds() - run_start_s;
  if (sampler) result.kv_timeline = sampler->Stop();
  const Result<MetricsSnapshot> after =
      o.metrics_every_s > 0 ? FetchMetricsSnapshot(url) : before;
  AddPreemptions(before, after, &result.server);
  SummarizeKv(result.kv_timeline, &result.server);
  if (result.server.kv_samples == 0) {
    result.server.notes.push_back(
        "KV pages unknown: " + (before.ok() ? "the server's /metrics has no " +
                                                  std::string(kKvUsedSeries)
                                            : before.status().message()));
  }
  for (auto& recs : per_program) {
    for (auto& r : recs) result.records.push_back(std::move(r));
  }
  return result;
}

}  // namespace cachette::bench_client
