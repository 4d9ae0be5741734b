// `cachette bench serve` and `cachette bench workload`: a benchmark client for any server that
// speaks the OpenAI API. Runs a seeded workload with streamed requests, times each one on the
// client (TTFT, inter-token gaps), writes one JSON line per request and prints a summary; with
// --compare-url it runs the same workload against a second server and prints the ratios.
//
// Every summary also carries the scheduling figures (goodput against each request's TTFT
// objective, TTFT per priority class, agent programs' completion time and tool pauses) and what
// the server's /metrics said during the run (preemptions, KV pages used; --kv-timeline writes
// every sample).
//
// `bench serve` is `bench workload --kind multi-round-qa` (the serving issue's benchmark).
#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "bench_client/runner.h"
#include "bench_client/workload.h"
#include "cli/cli.h"

namespace cachette::cli {
namespace {

namespace bc = bench_client;

struct BenchServeArgs {
  bc::WorkloadOptions w;
  std::string url;
  std::string compare_url;
  std::string model;
  std::string label = "A";
  std::string compare_label = "B";
  double duration_s = 0;
  std::vector<std::string> stop;
  std::string out;
  std::string kv_timeline;
  double metrics_every_ms = 250;
  bool session_ids = false;
  bool json = false;
  CLI::Option* qps_flag = nullptr;  // to tell a given --qps from the default
};

struct ServeRun {
  std::string label;
  std::string url;
  bc::RunResult result;
  bc::Summary summary;
};

nlohmann::json OptionsJson(const bc::WorkloadOptions& o) {
  nlohmann::json j = {{"kind", o.kind}, {"seed", o.seed}, {"qps", o.qps},
                      {"max_tokens", o.max_tokens}};
  if (o.kind != "long-doc-qa") j["system_tokens"] = o.system_tokens;
  j["question_tokens"] = o.question_tokens;
  if (o.kind == "multi-round-qa") {
    j["users"] = o.users;
    j["rounds"] = o.rounds;
  } else if (o.kind == "long-doc-qa") {
    j["documents"] = o.documents;
    j["document_tokens"] = o.document_tokens;
    j["queries"] = o.queries;
    j["hit_miss"] = o.hit_miss;
    j["concurrency"] = o.concurrency;
  } else if (o.kind == "agentic") {
    j["programs"] = o.programs;
    j["turns"] = o.turns;
    if (o.tools.empty()) {
      j["tool_ms"] = o.tool_ms;
    } else {
      j["tools"] = o.tools;
    }
    j["tool_output_tokens"] = o.tool_output_tokens;
  } else if (o.kind == "rag") {
    j["requests"] = o.requests;
    j["chunks"] = o.chunks;
    j["chunk_tokens"] = o.chunk_tokens;
    j["retrieved"] = {o.min_retrieved, o.max_retrieved};
  } else if (o.kind == "shared-prefix") {
    j["groups"] = o.groups;
    j["prompts_per_group"] = o.prompts_per_group;
    if (o.qps == 0) j["qps"] = nullptr;  // a burst
  } else if (o.kind == "deadline-mix") {
    j["requests"] = o.requests;
    j["deadline_ms"] = o.deadline_ms;
    j["deadline_priority"] = o.deadline_priority;
    j["interactive_share"] = o.interactive_share;
    j["background_tokens"] = o.background_tokens;
    j["background_max_tokens"] = o.background_max_tokens;
  }
  return j;
}

std::string Ms(double v) {
  if (std::isnan(v)) return "-";
  char b[32];
  std::snprintf(b, sizeof(b), v < 10 ? "%.2f ms" : "%.1f ms", v);
  return b;
}

// Goodput, priority classes, programs and tools, and the server's figures.
void PrintScheduling(const bc::Summary& s) {
  std::printf("  goodput %.2f req/s, %.1f tok/s: %d of %d met their objective (%.1f%%)",
              s.goodput_req_per_s, s.goodput_tok_per_s, s.met_objective, s.requests,
              100 * s.goodput_fraction);
  if (s.with_deadline > 0) {
    std::printf("; TTFT deadline met by %d of %d", s.met_deadline, s.with_deadline);
  }
  std::printf("\n");
  if (s.by_priority.size() > 1) {
    for (const auto& [prio, c] : s.by_priority) {
      std::printf("  priority %-4d %4d requests  TTFT p50 %-10s p99 %-10s met %.1f%%\n", prio,
                  c.requests, Ms(c.ttft_p50_ms).c_str(), Ms(c.ttft_p99_ms).c_str(),
                  100 * c.goodput_fraction);
    }
  }
  if (s.programs_completed > 0) {
    std::printf("  programs: %d completed, completion mean %s  p50 %s  p90 %s\n",
                s.programs_completed, Ms(s.program_completion_mean_ms).c_str(),
                Ms(s.program_completion_p50_ms).c_str(), Ms(s.program_completion_p90_ms).c_str());
  }
  for (const auto& [tool, t] : s.by_tool) {
    std::printf("  tool %-10s %4d calls  mean pause %s\n", tool.c_str(), t.calls,
                Ms(t.pause_mean_ms).c_str());
  }
  const bc::ServerFigures& f = s.server;
  std::string line = "  server: ";
  line += f.preemptions_known ? std::to_string(static_cast<long long>(f.preemptions)) +
                                    " preemptions"
                              : "preemptions unknown";
  if (f.kv_samples > 0) {
    char b[160];
    std::snprintf(b, sizeof(b), " | KV pages used peak %.0f, mean %.1f of %.0f (%d samples)",
                  f.kv_used_peak, f.kv_used_mean, f.kv_total, f.kv_samples);
    line += b;
  }
  if (f.session_kv_samples > 0) {
    char b[160];
    std::snprintf(b, sizeof(b), " | session pool pages used peak %.0f, mean %.1f of %.0f",
                  f.session_kv_used_peak, f.session_kv_used_mean, f.session_kv_total);
    line += b;
  }
  std::printf("%s\n", line.c_str());
  for (const auto& n : f.notes) std::printf("  note: %s\n", n.c_str());
}

void PrintRun(const ServeRun& r) {
  const bc::Summary& s = r.summary;
  std::printf("[%s] %s (model %s): %d requests, %d ok, %d errors, %d skipped, %.1f s\n",
              r.label.c_str(), r.url.c_str(), r.result.model.c_str(), s.requests, s.ok, s.errors,
              s.skipped, s.wall_s);
  std::printf("  TTFT p50 %s  p90 %s  p99 %s  | ITL p50 %s  p99 %s\n", Ms(s.ttft_p50_ms).c_str(),
              Ms(s.ttft_p90_ms).c_str(), Ms(s.ttft_p99_ms).c_str(), Ms(s.itl_p50_ms).c_str(),
              Ms(s.itl_p99_ms).c_str());
  std::string tiers;
  for (const auto& [tier, n] : s.cached_by_tier) {
    tiers += (tiers.empty() ? "" : ", ") + tier + " " + std::to_string(n);
  }
  std::printf("  %.2f req/s, %.1f gen tok/s | prompt %lld tokens, cached %lld = hit rate %.1f%%%s\n",
              s.req_per_s, s.gen_tok_per_s, static_cast<long long>(s.prompt_tokens),
              static_cast<long long>(s.cached_tokens), 100 * s.hit_rate,
              tiers.empty() ? "" : (" (" + tiers + ")").c_str());
  for (const auto& [tag, t] : s.by_tag) {
    std::printf("  %-12s %4d requests  TTFT p50 %-10s p99 %-10s hit rate %.1f%%\n", tag.c_str(),
                t.requests, Ms(t.ttft_p50_ms).c_str(), Ms(t.ttft_p99_ms).c_str(),
                100 * t.hit_rate);
  }
  PrintScheduling(s);
  for (const auto& e : s.first_errors) std::printf("  error: %s\n", e.c_str());
}

struct Figure {
  const char* name;
  double (*get)(const bc::Summary&);
};

constexpr Figure kFigures[] = {
    {"ttft_p50_ms", [](const bc::Summary& s) { return s.ttft_p50_ms; }},
    {"ttft_p90_ms", [](const bc::Summary& s) { return s.ttft_p90_ms; }},
    {"ttft_p99_ms", [](const bc::Summary& s) { return s.ttft_p99_ms; }},
    {"itl_p50_ms", [](const bc::Summary& s) { return s.itl_p50_ms; }},
    {"e2e_p50_ms", [](const bc::Summary& s) { return s.e2e_p50_ms; }},
    {"req_per_s", [](const bc::Summary& s) { return s.req_per_s; }},
    {"gen_tok_per_s", [](const bc::Summary& s) { return s.gen_tok_per_s; }},
    {"hit_rate", [](const bc::Summary& s) { return s.hit_rate; }},
    {"goodput_req_per_s", [](const bc::Summary& s) { return s.goodput_req_per_s; }},
    {"goodput_fraction", [](const bc::Summary& s) { return s.goodput_fraction; }},
    {"program_p50_ms", [](const bc::Summary& s) { return s.program_completion_p50_ms; }},
    {"program_p90_ms", [](const bc::Summary& s) { return s.program_completion_p90_ms; }},
    {"preemptions", [](const bc::Summary& s) { return s.server.preemptions; }},
    {"kv_used_peak", [](const bc::Summary& s) { return s.server.kv_used_peak; }},
    {"errors", [](const bc::Summary& s) { return static_cast<double>(s.errors); }},
};

double Ratio(double b, double a) {
  return a != 0 && !std::isnan(a) && !std::isnan(b) ? b / a
                                                    : std::numeric_limits<double>::quiet_NaN();
}

void PrintComparison(const ServeRun& a, const ServeRun& b) {
  std::printf("%-18s %14s %14s %10s\n", "figure", a.label.c_str(), b.label.c_str(),
              (b.label + "/" + a.label).c_str());
  for (const Figure& f : kFigures) {
    const double va = f.get(a.summary), vb = f.get(b.summary);
    if (std::isnan(va) && std::isnan(vb)) continue;  // a figure this workload does not have
    const double r = Ratio(vb, va);
    char ratio[32] = "-";
    if (!std::isnan(r)) std::snprintf(ratio, sizeof(ratio), "%.2fx", r);
    std::printf("%-18s %14.3f %14.3f %10s\n", f.name, va, vb, ratio);
  }
}

nlohmann::json RunJson(const ServeRun& r) {
  return {{"label", r.label}, {"url", r.url}, {"model", r.result.model},
          {"run_nonce", r.result.run_nonce}, {"summary", bc::SummaryJson(r.summary)}};
}

int BenchServe(BenchServeArgs a) {
  // shared-prefix's default is one burst; a --qps given on the command line spreads it.
  if (a.w.kind == "shared-prefix" && a.qps_flag != nullptr && a.qps_flag->count() == 0) {
    a.w.qps = 0;
  }
  if (a.metrics_every_ms < 0) return Fail(InvalidArgument("--metrics-every-ms must be >= 0"));
  auto workload = bc::GenerateWorkload(a.w);
  if (!workload.ok()) return Fail(workload.status());
  std::ofstream out, kv_out;
  if (!a.out.empty()) {
    out.open(a.out, std::ios::trunc);
    if (!out) return Fail(IOError("cannot write --out " + a.out));
  }
  if (!a.kv_timeline.empty()) {
    kv_out.open(a.kv_timeline, std::ios::trunc);
    if (!kv_out) return Fail(IOError("cannot write --kv-timeline " + a.kv_timeline));
  }
  std::vector<std::pair<std::string, std::string>> targets = {{a.label, a.url}};
  if (!a.compare_url.empty()) targets.emplace_back(a.compare_label, a.compare_url);
  std::fprintf(stderr, "workload %s seed %llu: %d requests in %zu programs\n", a.w.kind.c_str(),
               static_cast<unsigned long long>(a.w.seed), workload->TurnCount(),
               workload->programs.size());
  std::vector<ServeRun> runs;
  for (const auto& [label, url] : targets) {
    bc::RunOptions ro;
    ro.url = url;
    ro.model = a.model;
    ro.duration_s = a.duration_s;
    ro.stop = a.stop;
    ro.metrics_every_s = a.metrics_every_ms / 1e3;
    ro.session_ids = a.session_ids;
    int done = 0;
    const int total = workload->TurnCount();
    ro.on_record = [&, label = label](const bc::RequestRecord& r) {
      ++done;
      if (r.status != "ok") {
        std::fprintf(stderr, "[%s] request %d/%d: %s\n", label.c_str(), done, total,
                     r.error.c_str());
      }
    };
    std::fprintf(stderr, "[%s] running against %s\n", label.c_str(), url.c_str());
    auto result = bc::RunWorkload(*workload, ro);
    if (!result.ok()) return Fail(result.status().WithContext(url));
    ServeRun run{label, url, std::move(*result), {}};
    run.summary = bc::Summarize(run.result.records, run.result.server);
    if (out.is_open()) {
      for (const auto& rec : run.result.records) {
        nlohmann::json j = bc::RecordJson(rec);
        j["target"] = label;
        out << j.dump() << "\n";
      }
    }
    if (kv_out.is_open()) {
      for (const auto& k : run.result.kv_timeline) {
        const nlohmann::json j = {{"target", label},
                                  {"t_s", k.t_s},
                                  {"used", k.used ? nlohmann::json(*k.used) : nullptr},
                                  {"total", k.total ? nlohmann::json(*k.total) : nullptr}};
        kv_out << j.dump() << "\n";
      }
    }
    runs.push_back(std::move(run));
  }
  if (out.is_open()) {
    out.flush();
    if (!out) return Fail(IOError("writing --out " + a.out));
  }
  if (kv_out.is_open()) {
    kv_out.flush();
    if (!kv_out) return Fail(IOError("writing --kv-timeline " + a.kv_timeline));
  }
  if (a.json) {
    nlohmann::json j = {{"workload", OptionsJson(a.w)}, {"runs", nlohmann::json::array()}};
    for (const ServeRun& r : runs) j["runs"].push_back(RunJson(r));
    if (runs.size() == 2) {
      nlohmann::json ratio;
      for (const Figure& f : kFigures) {
        ratio[f.name] = Ratio(f.get(runs[1].summary), f.get(runs[0].summary));
      }
      j["ratio"] = ratio;  // B / A; null where A is 0
    }
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf("workload %s\n", OptionsJson(a.w).dump().c_str());
    for (const ServeRun& r : runs) PrintRun(r);
    if (runs.size() == 2) PrintComparison(runs[0], runs[1]);
  }
  // Failed requests are figures, not a failed benchmark; a run where nothing succeeded is.
  for (const ServeRun& r : runs) {
    if (r.summary.requests > 0 && r.summary.ok == 0) return 1;
  }
  return 0;
}

void AddFlags(CLI::App* c, BenchServeArgs* a, bool with_kind) {
  bc::WorkloadOptions& w = a->w;
  c->add_option("--url", a->url, "Server base URL, e.g. http://127.0.0.1:8080")->required();
  c->add_option("--compare-url", a->compare_url,
                "Run the same workload against this server too and print ratios B/A");
  c->add_option("--label", a->label, "Name of --url in the output (A)");
  c->add_option("--compare-label", a->compare_label, "Name of --compare-url in the output (B)");
  c->add_option("--model", a->model, "Model id to request (default: first of GET /v1/models)");
  if (with_kind) {
    c->add_option("--kind", w.kind,
                  "multi-round-qa, long-doc-qa, agentic, rag, shared-prefix, deadline-mix")
        ->required();
  }
  c->add_option("--seed", w.seed, "Seed of the workload (the same seed, the same prompts)");
  a->qps_flag = c->add_option(
      "--qps", w.qps,
      "Poisson arrivals per second (rounds, programs, requests); shared-prefix: one burst "
      "unless given");
  c->add_option("--max-tokens", w.max_tokens, "Generated tokens per request");
  c->add_option("--system-tokens", w.system_tokens, "Shared system prompt (words ~ tokens)");
  c->add_option("--question-tokens", w.question_tokens, "Each question or task");
  c->add_option("--users", w.users, "multi-round-qa: users");
  c->add_option("--rounds", w.rounds, "multi-round-qa: rounds per user");
  c->add_option("--documents", w.documents, "long-doc-qa: documents read in the warm-up");
  c->add_option("--document-tokens", w.document_tokens, "long-doc-qa: tokens per document");
  c->add_option("--queries", w.queries, "long-doc-qa: queries after the warm-up");
  c->add_option("--hit-miss", w.hit_miss, "long-doc-qa: H:M, H warmed then M new documents");
  c->add_option("--concurrency", w.concurrency, "long-doc-qa: requests in flight");
  c->add_option("--programs", w.programs, "agentic: programs");
  c->add_option("--turns", w.turns, "agentic: turns per program");
  c->add_option("--tool-ms", w.tool_ms, "agentic: mean tool-call pause between turns");
  c->add_option("--tools", w.tools,
                "agentic: tools as name:mean_ms,... (e.g. search:300,code:1500), one drawn per "
                "turn; replaces --tool-ms");
  c->add_option("--tool-output-tokens", w.tool_output_tokens, "agentic: tool output per turn");
  c->add_option("--requests", w.requests, "rag, deadline-mix: requests");
  c->add_option("--chunks", w.chunks, "rag: chunks in the pool");
  c->add_option("--chunk-tokens", w.chunk_tokens, "rag: tokens per chunk");
  c->add_option("--min-retrieved", w.min_retrieved, "rag: fewest chunks per request");
  c->add_option("--max-retrieved", w.max_retrieved, "rag: most chunks per request");
  c->add_option("--groups", w.groups, "shared-prefix: groups, each with its own system prompt");
  c->add_option("--prompts-per-group", w.prompts_per_group, "shared-prefix: requests per group");
  c->add_option("--deadline-ms", w.deadline_ms, "deadline-mix: interactive TTFT objective");
  c->add_flag("--deadline-priority", w.deadline_priority,
              "deadline-mix: send interactive requests with priority 1");
  c->add_option("--interactive-share", w.interactive_share,
                "deadline-mix: fraction of interactive requests (0..1)");
  c->add_option("--background-tokens", w.background_tokens, "deadline-mix: background prompt");
  c->add_option("--background-max-tokens", w.background_max_tokens,
                "deadline-mix: tokens generated per background request");
  c->add_option("--duration", a->duration_s, "Send nothing after this many seconds (0: no cap)");
  c->add_option("--stop", a->stop,
                "Stop string sent with every request (repeatable, up to 4): answers end early, "
                "as real ones do")
      ->expected(1)
      ->check([](const std::string& s) { return s.empty() ? "--stop must not be empty" : ""; });
  c->add_option("--out", a->out, "Write one JSON line per request to this file");
  c->add_option("--kv-timeline", a->kv_timeline,
                "Write the KV-pages samples from /metrics, one JSON line each, to this file");
  c->add_option("--metrics-every-ms", a->metrics_every_ms,
                "Period of the /metrics sampler (0: do not read /metrics)");
  c->add_flag("--session-ids", a->session_ids,
              "Send each program's turns with a session_id of its own (cachette sessions)");
  c->add_flag("--json", a->json, "Print one JSON object instead of the table");
}

}  // namespace

Runner AddBenchServeSubcommands(CLI::App* bench) {
  auto serve_args = std::make_shared<BenchServeArgs>();
  CLI::App* serve = bench->add_subcommand(
      "serve", "Multi-round QA against an OpenAI API server: TTFT, ITL, throughput, hit rate");
  AddFlags(serve, serve_args.get(), /*with_kind=*/false);
  auto workload_args = std::make_shared<BenchServeArgs>();
  CLI::App* workload = bench->add_subcommand(
      "workload",
      "A seeded workload (multi-round-qa, long-doc-qa, agentic, rag, shared-prefix, "
      "deadline-mix) against --url");
  AddFlags(workload, workload_args.get(), /*with_kind=*/true);
  return [=]() -> int {
    if (serve->parsed()) return BenchServe(*serve_args);
    if (workload->parsed()) return BenchServe(*workload_args);
    return -1;
  };
}

}  // namespace cachette::cli
