// The hook through which the scheduler reaches KV beyond the in-memory radix index (the tiered
// chunk store: RAM, disk, Redis). Nothing here may block the scheduler loop: lookups and loads
// run on the source's own threads, and the loop only polls.
//
// A restore, as the scheduler drives it (loop thread):
//   1. StartLoad(ns, prompt, have, deadline) right after admission, with `have` tokens already
//      in the sequence from the radix index. Returns null when the source has nothing to offer
//      (no tiers); otherwise a PendingLoad whose lookup and reads run in the background.
//   2. ApplyLoad(load, seq) once per loop iteration while the request is loading: copies the
//      chunks that have arrived, in prompt order, into the sequence's pages and reports them.
//      It says `done` after the last chunk, at the first miss, when pages cannot be reserved,
//      or once `deadline` passed; whatever was not copied by then is recomputed by prefill.
//      Never an error, never a wrong answer.
//   3. Save(seq, tokens, skip) when the request finishes (or is preempted with swap), before
//      its pages are released: writes the full chunks of `tokens` past the first `skip` tokens
//      (those the tiers already held, LoadProgress::tier_tokens). Returns how many leading
//      tokens the tiers hold afterwards (`skip` when nothing was written), the next skip.
// Segments (issue 11) reach the tiers too (sched/segment_tier.h for how they are filed):
//   SaveSegment(ns, seg) on the loop after a segment is computed (disk and Redis only, behind:
//   the segment cache is its copy in memory); StartSegmentLoad(ns, refs, deadline) looks the
//   segments up and reads them on the source's threads (null when it has no such tier); the
//   loop polls PendingSegments::ready() and takes what was found.
// Pins and clears reach every tier: Pin/Unpin protect a prefix's chunks, Clear(ns) removes a
// namespace's chunks from every tier (including copies other processes wrote to Redis).
// The default (NoPrefixSource) does nothing, so the scheduler serves from memory alone.
//
// Thread-safety: StartLoad/ApplyLoad/Save come from the scheduler loop; Lookup, Pin, Unpin,
// Clear and Stats may come from any thread.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <vector>

#include "cachette/status.h"
#include "cachette/types.h"
#include "core/hash.h"
#include "engine/segment_reuse.h"
#include "kv/kv_manager.h"
#include "sched/request.h"

namespace cachette::sched {

using SteadyTime = std::chrono::steady_clock::time_point;

// One request's restore in flight; owned by the scheduler, opaque to it. Destroying it before
// it is done is fine: late results are discarded.
class PendingLoad {
 public:
  virtual ~PendingLoad() = default;
};

// A segment to look for: its tokens after a context (SegmentKv::context).
struct SegmentRef {
  std::vector<TokenId> tokens;
  uint64_t context = 0;
};

// Segments being read from the tiers. The reader calls Finish once; the loop (or an HTTP
// thread) polls ready() or waits, then takes them.
class PendingSegments {
 public:
  explicit PendingSegments(size_t n) : found_(n) {}
  bool ready() const {
    std::lock_guard lock(mu_);
    return done_;
  }
  // Waits until ready or `deadline`; returns ready().
  bool WaitUntil(std::chrono::steady_clock::time_point deadline) {
    std::unique_lock lock(mu_);
    return cv_.wait_until(lock, deadline, [&] { return done_; });
  }
  // The segments found, in the order of the refs (null: a miss). Empty before ready().
  std::vector<std::shared_ptr<SegmentKv>> Take() {
    std::lock_guard lock(mu_);
    if (!done_) return {};
    return std::move(found_);
  }
  // `found`: one per ref, or empty for none found.
  void Finish(std::vector<std::shared_ptr<SegmentKv>> found) {
    {
      std::lock_guard lock(mu_);
      if (!found.empty()) found_ = std::move(found);
      done_ = true;
    }
    cv_.notify_all();
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;                               // GUARDED_BY(mu_)
  std::vector<std::shared_ptr<SegmentKv>> found_;   // GUARDED_BY(mu_)
};

struct LoadProgress {
  bool done = false;              // nothing more will be copied: the request may prefill
  std::vector<TierTokens> added;  // tokens this call copied into the sequence, per tier
  int64_t tier_tokens = 0;        // once known: leading prompt tokens the tiers hold (Save skip)
};

class PrefixSource {
 public:
  virtual ~PrefixSource() = default;
  virtual std::unique_ptr<PendingLoad> StartLoad(const Hash128& ns,
                                                 std::span<const TokenId> prompt, int64_t have,
                                                 SteadyTime deadline) = 0;
  virtual LoadProgress ApplyLoad(PendingLoad& load, PagedSequence& seq) = 0;
  virtual int64_t Save(PagedSequence& seq, std::span<const TokenId> tokens,
                       int64_t skip_tokens) = 0;

  // Segments: null when the source has no disk or Redis tier (nothing to look in).
  virtual std::shared_ptr<PendingSegments> StartSegmentLoad(const Hash128& ns,
                                                            std::vector<SegmentRef> refs,
                                                            SteadyTime deadline) {
    return nullptr;
  }
  virtual void SaveSegment(const Hash128& ns, const SegmentKv& seg) {}

  // For the admin API: how much of `prompt` each tier could restore (no loading). May wait for
  // a remote tier up to its lookup timeout, so never call it on the scheduler loop.
  virtual std::vector<TierTokens> Lookup(const Hash128& ns, std::span<const TokenId> prompt) {
    return {};
  }
  // Protects the full chunks of `tokens` in every local tier for ttl_ms (> 0); returns a pin id
  // for Unpin (0 when the source holds nothing to pin).
  virtual uint64_t Pin(const Hash128& ns, std::span<const TokenId> tokens, int64_t ttl_ms) {
    return 0;
  }
  virtual void Unpin(uint64_t pin) {}
  // Removes every chunk of `ns` from every tier.
  virtual Status Clear(const Hash128& ns) { return Status::Ok(); }
  virtual nlohmann::json Stats() { return nlohmann::json::object(); }
  // Prometheus text exposition lines of the source's own metrics ("" when none).
  virtual std::string PrometheusText() { return {}; }
};

class NoPrefixSource final : public PrefixSource {
 public:
  std::unique_ptr<PendingLoad> StartLoad(const Hash128&, std::span<const TokenId>, int64_t,
                                         SteadyTime) override {
    return nullptr;
  }
  LoadProgress ApplyLoad(PendingLoad&, PagedSequence&) override { return {true, {}, 0}; }
  int64_t Save(PagedSequence&, std::span<const TokenId>, int64_t skip) override { return skip; }
};

}  // namespace cachette::sched
