// CacheStats helpers: tier names, the latency histogram and the Prometheus text exposition.
#include <cinttypes>
#include <cstdio>
#include <string>

#include "cachette/cache.h"

namespace cachette {

std::string_view CacheTierName(CacheTier tier) {
  switch (tier) {
    case CacheTier::kRam: return "ram";
    case CacheTier::kDisk: return "disk";
    case CacheTier::kRedis: return "redis";
    case CacheTier::kNone: return "none";
  }
  return "none";
}

void LatencyHistogram::Add(uint64_t us) {
  int b = 0;
  while (us > kUpperUs[b]) ++b;  // the last bound is UINT64_MAX
  ++counts[b];
  sum_us += us;
  ++count;
}

namespace {

void Line(std::string& out, const char* name, const std::string& labels, uint64_t v) {
  char buf[256];
  std::snprintf(buf, sizeof(buf), "cachette_cache_%s%s %" PRIu64 "\n", name, labels.c_str(), v);
  out += buf;
}

void Type(std::string& out, const char* name, const char* type, const char* help) {
  out += "# HELP cachette_cache_";
  out += name;
  out += ' ';
  out += help;
  out += "\n# TYPE cachette_cache_";
  out += name;
  out += ' ';
  out += type;
  out += '\n';
}

}  // namespace

std::string PrometheusText(const CacheStats& s) {
  std::string out;
  struct PerTier {
    const char* name;
    const char* type;
    const char* help;
    uint64_t CacheTierMetrics::*field;
  };
  const PerTier per_tier[] = {
      {"hit_chunks_total", "counter", "Chunks loaded from the tier.", &CacheTierMetrics::hit_chunks},
      {"hit_tokens_total", "counter", "Tokens loaded from the tier.", &CacheTierMetrics::hit_tokens},
      {"miss_chunks_total", "counter", "Chunks the tier was asked for and did not serve.",
       &CacheTierMetrics::miss_chunks},
      {"miss_tokens_total", "counter", "Tokens the tier was asked for and did not serve.",
       &CacheTierMetrics::miss_tokens},
      {"bytes_in_total", "counter", "Bytes written to the tier.", &CacheTierMetrics::bytes_in},
      {"bytes_out_total", "counter", "Bytes read from the tier.", &CacheTierMetrics::bytes_out},
      {"entries", "gauge", "Chunks held by the tier.", &CacheTierMetrics::entries},
      {"bytes_used", "gauge", "Bytes held by the tier.", &CacheTierMetrics::bytes_used},
      {"bytes_budget", "gauge", "Byte budget of the tier (0 = unbounded).",
       &CacheTierMetrics::bytes_budget},
      {"evictions_total", "counter", "Chunks evicted from the tier.", &CacheTierMetrics::evictions},
      {"corruptions_total", "counter", "Corrupt records detected (never served).",
       &CacheTierMetrics::corruptions},
      {"errors_total", "counter", "I/O errors, timeouts, connection failures.",
       &CacheTierMetrics::errors},
  };
  for (const PerTier& m : per_tier) {
    Type(out, m.name, m.type, m.help);
    for (int t = 0; t < kCacheTierCount; ++t) {
      if (!s.tier[t].enabled) continue;
      Line(out, m.name,
           "{tier=\"" + std::string(CacheTierName(static_cast<CacheTier>(t))) + "\"}",
           s.tier[t].*m.field);
    }
  }
  struct Global {
    const char* name;
    const char* type;
    const char* help;
    uint64_t v;
  };
  const Global globals[] = {
      {"lookups_total", "counter", "Lookup calls.", s.lookups},
      {"lookup_tokens_total", "counter", "Tokens asked about by Lookup.", s.lookup_tokens},
      {"lookup_hit_tokens_total", "counter", "Tokens Lookup found cached.", s.lookup_hit_tokens},
      {"puts_total", "counter", "Chunks accepted by Put.", s.puts},
      {"puts_dropped_total", "counter", "Write-behind jobs dropped (queue full).",
       s.puts_dropped},
      {"puts_rejected_total", "counter", "Chunks no tier had room for.", s.puts_rejected},
      {"promotions_total", "counter", "Chunks promoted to RAM.", s.promotions},
      {"demotions_total", "counter", "RAM evictions written to a slower tier.", s.demotions},
      {"collisions_total", "counter", "Key matches with other tokens (served as misses).",
       s.collisions},
      {"corruptions_total", "counter", "Corrupt records detected, all tiers.", s.corruptions},
      {"deadline_misses_total", "counter", "Chunks not loaded by their deadline.",
       s.deadline_misses},
      {"remote_lower_level_chunks_total", "counter",
       "Chunks loaded from Redis at a level below the codec's (adaptive loading).",
       s.remote_lower_level_chunks},
      {"remote_recompute_chunks_total", "counter",
       "Chunks given up for recompute: no stored level fit the deadline (adaptive loading).",
       s.remote_recompute_chunks},
      {"disk_lower_level_chunks_total", "counter",
       "Chunks loaded from disk at a level below the codec's (adaptive loading).",
       s.disk_lower_level_chunks},
      {"disk_recompute_chunks_total", "counter",
       "Disk chunks given up for recompute: no stored level fit the deadline.",
       s.disk_recompute_chunks},
      {"pins_active", "gauge", "Live pins.", s.pins_active},
      {"io_queue_depth", "gauge", "Write-behind jobs queued or running.", s.io_queue_depth},
  };
  for (const Global& g : globals) {
    Type(out, g.name, g.type, g.help);
    Line(out, g.name, "", g.v);
  }
  const LatencyHistogram& h = s.load_latency;
  Type(out, "load_latency_seconds", "histogram", "Latency of chunk loads.");
  uint64_t cumulative = 0;
  for (int b = 0; b < LatencyHistogram::kBuckets; ++b) {
    cumulative += h.counts[b];
    char le[32];
    if (LatencyHistogram::kUpperUs[b] == UINT64_MAX) {
      std::snprintf(le, sizeof(le), "+Inf");
    } else {
      std::snprintf(le, sizeof(le), "%g", static_cast<double>(LatencyHistogram::kUpperUs[b]) * 1e-6);
    }
    Line(out, "load_latency_seconds_bucket", std::string("{le=\"") + le + "\"}", cumulative);
  }
  char sum[64];
  std::snprintf(sum, sizeof(sum), "cachette_cache_load_latency_seconds_sum %.6f\n",
                static_cast<double>(h.sum_us) * 1e-6);
  out += sum;
  Line(out, "load_latency_seconds_count", "", h.count);
  return out;
}

}  // namespace cachette
