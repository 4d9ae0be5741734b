// The hook through which the scheduler reaches KV beyond the in-memory radix index (the tiered
// chunk store: RAM, disk, Redis). The scheduler calls, on its loop thread only:
//   Restore() after KvManager::Start() and before prefill: load whatever of prompt[n_tokens():]
//             the source holds into the sequence's pages (Reserve, write, SetTokens) and return
//             how many tokens it added, per tier. A late or failed load restores less: never an
//             error, never a wrong answer.
//   Save()    when a request finishes, before its pages are released: write behind whatever of
//             `tokens` (all of them hold KV in `seq`) the source wants to keep.
//   Lookup()  for the admin API: how much of `prompt` each tier could restore (no loading).
// The default (NoPrefixSource) does nothing, so the scheduler serves from memory alone.
//
// Thread-safety: Restore/Save come from the scheduler loop; Lookup and Stats from HTTP threads.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <vector>

#include "cachette/types.h"
#include "core/hash.h"
#include "kv/kv_manager.h"
#include "sched/request.h"

namespace cachette::sched {

class PrefixSource {
 public:
  virtual ~PrefixSource() = default;
  // Tokens added to `seq` (seq.n_tokens() grew by their sum), per tier, in restore order.
  virtual std::vector<TierTokens> Restore(PagedSequence& seq, std::span<const TokenId> prompt) = 0;
  virtual void Save(PagedSequence& seq, std::span<const TokenId> tokens) = 0;
  virtual std::vector<TierTokens> Lookup(const Hash128& ns, std::span<const TokenId> prompt) {
    return {};
  }
  virtual nlohmann::json Stats() { return nlohmann::json::object(); }
  // Prometheus text exposition lines of the source's own metrics ("" when none).
  virtual std::string PrometheusText() { return {}; }
};

class NoPrefixSource final : public PrefixSource {
 public:
  std::vector<TierTokens> Restore(PagedSequence&, std::span<const TokenId>) override {
    return {};
  }
  void Save(PagedSequence&, std::span<const TokenId>) override {}
};

}  // namespace cachette::sched
