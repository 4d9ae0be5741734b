#include "cache/policy.h"

#include <algorithm>
#include <numeric>
#include <string>

namespace cachette::cache {

std::string_view PolicyName(PolicyKind p) {
  switch (p) {
    case PolicyKind::kLru: return "lru";
    case PolicyKind::kLfu: return "lfu";
    case PolicyKind::kS3Fifo: return "s3fifo";
    case PolicyKind::kCost: return "cost";
  }
  return "?";
}

Result<PolicyKind> ParsePolicy(std::string_view name) {
  for (PolicyKind p : {PolicyKind::kLru, PolicyKind::kLfu, PolicyKind::kS3Fifo, PolicyKind::kCost}) {
    if (name == PolicyName(p)) return p;
  }
  return InvalidArgument("unknown eviction policy '" + std::string(name) +
                         "' (lru, lfu, s3fifo, cost)");
}

double PrefillCostSaved(const EntryStats& e) {
  // Tokens [p0, p0 + n): sum over t of (kTokenCost + t) = n * (kTokenCost + p0 + (n - 1) / 2).
  const double n = e.n_tokens;
  const double p0 = static_cast<double>(e.chunk_index) * n;
  return n * (kTokenCost + p0 + (n - 1) / 2);
}

Priority EvictionPriority(PolicyKind policy, const EntryStats& e) {
  switch (policy) {
    case PolicyKind::kLru:
      return {0, static_cast<double>(e.last_access_tick)};
    case PolicyKind::kLfu:
      return {static_cast<int64_t>(e.hits), static_cast<double>(e.last_access_tick)};
    case PolicyKind::kS3Fifo:
      // Small queue (class 0) in insertion order, then main (class 1) in order of entry.
      return e.main_tick == 0 ? Priority{0, static_cast<double>(e.insert_tick)}
                              : Priority{1, static_cast<double>(e.main_tick)};
    case PolicyKind::kCost: {
      const double per_byte =
          PrefillCostSaved(e) * (1.0 + static_cast<double>(e.hits)) /
          static_cast<double>(std::max<uint64_t>(e.bytes, 1));
      // Ties (equal value) are rare in doubles; recency breaks them via a tiny bias below the
      // resolution that matters (ticks < 2^40).
      return {0, per_byte * (1.0 + 1e-15 * static_cast<double>(e.last_access_tick))};
    }
  }
  return {};
}

bool SelectVictims(PolicyKind policy, std::span<const EntryStats> candidates,
                   uint64_t bytes_to_free, std::vector<size_t>* victims) {
  victims->clear();
  if (bytes_to_free == 0) return true;
  uint64_t total = 0;
  for (const EntryStats& e : candidates) total += e.bytes;
  if (total < bytes_to_free) return false;
  std::vector<size_t> order(candidates.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::vector<Priority> prio(candidates.size());
  for (size_t i = 0; i < candidates.size(); ++i) prio[i] = EvictionPriority(policy, candidates[i]);
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return prio[a] < prio[b]; });
  uint64_t freed = 0;
  for (size_t i : order) {
    if (freed >= bytes_to_free) break;
    victims->push_back(i);
    freed += candidates[i].bytes;
  }
  return true;
}

}  // namespace cachette::cache
