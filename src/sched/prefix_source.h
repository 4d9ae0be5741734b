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
//   segments up and reads them on the source's threads, a band of layers at a time (null when
//   it has no such tier); the loop polls PendingSegments and takes what was found, or starts a
//   prefill once the first band is in and awaits the rest layer by layer.
// Pins and clears reach every tier: Pin/Unpin protect a prefix's chunks, Clear(ns) removes a
// namespace's chunks from every tier (including copies other processes wrote to Redis).
// The default (NoPrefixSource) does nothing, so the scheduler serves from memory alone.
//
// Thread-safety: StartLoad/ApplyLoad/Save come from the scheduler loop; Lookup, Pin, Unpin,
// Clear and Stats may come from any thread.
#pragma once

#include <algorithm>
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

// Segments being read from the tiers, a band of layers at a time (sched/segment_tier.h). The
// reader calls Publish once the first band of every segment is read (the segments found, each
// with its first band's layers filled and every layer's arrays allocated), Advance after each
// later band, Fail when a later band of a found segment could not be read, and Finish once at
// the end. A consumer either waits for the whole load (ready, WaitUntil, Take) or pipelines a
// prefill with it: once published() it places the segments Found gives and awaits each layer
// before reading it (AwaitLayer, for PrefillWithSegments' SegmentLoad), so the later bands load
// while the earlier layers compute.
class PendingSegments {
 public:
  using Time = std::chrono::steady_clock::time_point;

  // `band_ends`: the end layer of each band, ascending, the last the model's layer count.
  PendingSegments(std::vector<SegmentRef> refs, std::vector<int> band_ends);
  const std::vector<SegmentRef>& refs() const { return refs_; }

  bool ready() const;
  // Waits until ready or `deadline`; returns ready().
  bool WaitUntil(Time deadline);
  // Whether the first band is in (Found may be used), or the load ended.
  bool published() const;
  // Waits until published() or `deadline`; returns published().
  bool WaitPublished(Time deadline);
  // The segment of `tokens` after `context` once published (its layers past those in may still
  // be arriving: AwaitLayer first), or null (not asked for, a miss, not yet in).
  std::shared_ptr<const SegmentKv> Found(std::span<const TokenId> tokens,
                                         uint64_t context) const;
  // Returns once layer `layer` of every found segment is in: OK; kUnavailable when the load
  // ended (or failed) short of it; kDeadlineExceeded at `deadline`.
  Status AwaitLayer(int layer, Time deadline);
  // How many AwaitLayer calls are blocked now (a prefill held up by this load).
  int waiting() const;
  // How long the load still runs, in microseconds (0 once it ended), for CacheBlend's loading
  // controller: each band left at what the bands in took, fitted (least squares) as a fixed
  // cost per band (lookups, round trips, queueing) plus a cost per layer, less what the band in
  // flight has run already. With one band in, all of its time counts as fixed: a low estimate,
  // never a high one (the first band is one layer, where per-record costs dominate).
  double load_left_us() const;
  // Once ready: the segments found whole, in the order of the refs (null: a miss, or every one
  // when a band could not be read). Empty before ready() and after a first Take.
  std::vector<std::shared_ptr<SegmentKv>> Take();

  // The reader's side. `found`: one per ref (null: a miss), the first band's layers filled;
  // `elapsed_us`: since the load started, when this band was in.
  void Publish(std::vector<std::shared_ptr<SegmentKv>> found, double elapsed_us);
  void Advance(double elapsed_us);  // the next band is in
  void Fail();
  void Finish();

 private:
  const std::vector<SegmentRef> refs_;
  const std::vector<int> band_ends_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;                              // GUARDED_BY(mu_)
  bool failed_ = false;                            // GUARDED_BY(mu_)
  int waiting_ = 0;                                // GUARDED_BY(mu_): AwaitLayer calls blocked
  std::vector<double> band_done_us_;               // GUARDED_BY(mu_): per band in, when
  Time updated_{};                                 // GUARDED_BY(mu_): the last band's arrival
  std::vector<std::shared_ptr<SegmentKv>> found_;  // GUARDED_BY(mu_)

  int LayersLocked() const {
    return band_done_us_.empty() ? 0 : band_ends_[band_done_us_.size() - 1];
  }
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

// Nothing behind the radix index. Test stand-ins derive from it and override what they offer.
class NoPrefixSource : public PrefixSource {
 public:
  std::unique_ptr<PendingLoad> StartLoad(const Hash128&, std::span<const TokenId>, int64_t,
                                         SteadyTime) override {
    return nullptr;
  }
  LoadProgress ApplyLoad(PendingLoad&, PagedSequence&) override { return {true, {}, 0}; }
  int64_t Save(PagedSequence&, std::span<const TokenId>, int64_t skip) override { return skip; }
};

}  // namespace cachette::sched
