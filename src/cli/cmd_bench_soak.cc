// `cachette bench soak`: a soak test against a running server. 64 clients (by default) send a
// seeded random mix of chats, streams, pins, admin calls, disconnects and malformed requests
// for --duration while the server's RSS (with --pid) and /metrics are sampled every second.
// Prints the counts per outcome class and the RSS figures; exits 1 on any 5xx, connection
// error or server-side stream error, an RSS sample above --rss-limit, or the server exiting.
#include <cstdio>
#include <nlohmann/json.hpp>

#include "bench_client/soak.h"
#include "cli/cli.h"
#include "core/units.h"

namespace cachette::cli {
namespace {

namespace bc = bench_client;

struct BenchSoakArgs {
  std::string url;
  std::string duration = "60";
  int clients = 64;
  double ramp_s = 1;
  uint64_t seed = 1;
  std::string api_key;
  std::string admin_key;
  int pid = 0;
  std::string rss_limit;
  bool json = false;
};

std::string Mib(uint64_t bytes) {
  char b[32];
  std::snprintf(b, sizeof b, "%.1f MiB", static_cast<double>(bytes) / (1 << 20));
  return b;
}

void PrintReport(const bc::SoakReport& r) {
  const bc::SoakTally& t = r.tally;
  std::printf("soak %s (model %s): %d clients, seed %llu, %.1f s: %lld requests, %.1f req/s\n",
              r.url.c_str(), r.model.c_str(), r.clients, static_cast<unsigned long long>(r.seed),
              r.wall_s, static_cast<long long>(t.requests()), r.requests_per_s());
  std::printf("  classes:");
  for (int i = 0; i < bc::kSoakClassCount; ++i) {
    const auto c = static_cast<bc::SoakClass>(i);
    std::printf(" %s %lld%s", std::string(bc::SoakClassName(c)).c_str(),
                static_cast<long long>(t.count(c)), bc::IsSoakFailure(c) ? "(fail)" : "");
  }
  std::printf("\n  statuses:");
  for (const auto& [code, n] : t.by_status())
    std::printf(" %d:%lld", code, static_cast<long long>(n));
  std::printf("\n  actions:");
  for (int i = 0; i < bc::kSoakActionCount; ++i) {
    const auto a = static_cast<bc::SoakAction>(i);
    std::printf(" %s %lld", std::string(bc::SoakActionName(a)).c_str(),
                static_cast<long long>(t.action_count(a)));
  }
  std::printf("\n");
  if (r.rss.samples > 0) {
    std::printf(
        "  RSS: start %s, max %s, end %s; slope over the last half %+.3f MiB/min "
        "(%d samples)%s\n",
        Mib(r.rss.start_bytes).c_str(), Mib(r.rss.max_bytes).c_str(), Mib(r.rss.end_bytes).c_str(),
        r.rss.late_slope_bytes_per_s * 60 / (1 << 20), r.rss.samples,
        r.rss_limit_bytes
            ? (", limit " + Mib(r.rss_limit_bytes) + (r.rss_over_limit ? " EXCEEDED" : "")).c_str()
            : "");
  }
  std::printf("  /metrics: %d reads, %d failures;", r.metrics_reads, r.metrics_failures);
  for (const auto& [series, max] : r.metrics_max) {
    const auto end = r.metrics_end.find(series);
    std::printf(" %s max %.0f end %.0f;", series.c_str(), max,
                end == r.metrics_end.end() ? 0.0 : end->second);
  }
  std::printf("\n");
  if (r.server_draining) std::printf("  the server began draining: the run stopped early\n");
  if (r.server_exited) std::printf("  the server process exited during the run\n");
  for (const auto& note : t.failure_notes()) std::printf("  failure: %s\n", note.c_str());
  std::printf("%s\n", r.ok() ? "PASS" : "FAIL");
}

int BenchSoak(const BenchSoakArgs& a) {
  bc::SoakOptions o;
  o.url = a.url;
  auto duration = bc::ParseDurationSeconds(a.duration);
  if (!duration.ok()) return Fail(duration.status().WithContext("--duration"));
  o.duration_s = *duration;
  o.clients = a.clients;
  o.ramp_s = a.ramp_s;
  o.seed = a.seed;
  o.api_key = a.api_key;
  o.admin_key = a.admin_key;
  o.pid = a.pid;
  if (!a.rss_limit.empty()) {
    auto limit = ParseBytes(a.rss_limit);
    if (!limit.ok()) return Fail(limit.status().WithContext("--rss-limit"));
    o.rss_limit_bytes = *limit;
  }
  std::fprintf(stderr, "soak: %d clients against %s for %.0f s\n", o.clients, o.url.c_str(),
               o.duration_s);
  auto report = bc::RunSoak(o);
  if (!report.ok()) return Fail(report.status());
  if (a.json) {
    std::printf("%s\n", report->ToJson().dump().c_str());
  } else {
    PrintReport(*report);
  }
  return report->ok() ? 0 : 1;
}

}  // namespace

Runner AddBenchSoakSubcommand(CLI::App* bench) {
  auto a = std::make_shared<BenchSoakArgs>();
  CLI::App* c = bench->add_subcommand(
      "soak", "Soak a server: random chats, pins, disconnects and malformed requests; RSS");
  c->add_option("--url", a->url, "Server base URL, e.g. http://127.0.0.1:8080")->required();
  c->add_option("--duration", a->duration, "How long: seconds, or with s, m, h (default 60)");
  c->add_option("--clients", a->clients, "Concurrent clients (default 64)")
      ->check(CLI::Range(1, 4096));
  c->add_option("--ramp", a->ramp_s, "Seconds over which the clients start (default 1)")
      ->check(CLI::Range(0.0, 3600.0));
  c->add_option("--seed", a->seed, "Seed of the clients' random choices");
  c->add_option("--api-key", a->api_key, "Sent as 'Authorization: Bearer KEY'");
  c->add_option("--admin-key", a->admin_key,
                "Key for /v1/cache/* and /metrics (default: --api-key)");
  c->add_option("--pid", a->pid, "Server process id: sample its RSS every second");
  c->add_option("--rss-limit", a->rss_limit, "Fail when the RSS exceeds this, e.g. 512MiB");
  c->add_flag("--json", a->json, "Print one JSON object instead of the summary");
  return [a, c]() -> int { return c->parsed() ? BenchSoak(*a) : -1; };
}

}  // namespace cachette::cli
