#include "cli/batch_runner.h"

#include <algorithm>
#include <chrono>
#include <memory>
#include <thread>
#include <utility>

#include "core/check.h"
#include "core/log.h"
#include "core/timer.h"
#include "sched/batch_plan.h"

namespace cachette::cli {
namespace {

using sched::RequestStream;
using sched::StreamEvent;

// How long the loop blocks on one stream when no other had an event.
constexpr auto kIdleWait = std::chrono::milliseconds(2);

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

class BatchRun {
 public:
  BatchRun(sched::Scheduler& scheduler, std::vector<sched::SchedRequest> jobs,
      const BatchRunOptions& options, const std::function<void(size_t, JobResult)>& on_done)
      : scheduler_(scheduler),
        jobs_(std::move(jobs)),
        options_(options),
        on_done_(on_done),
        page_tokens_(scheduler.kv().page_tokens()) {}

  BatchRunStats Go() {
    if (options_.order == BatchOrder::kFcfs) {
      for (size_t i = 0; i < jobs_.size(); ++i) Submit(i, -1, 0);
    } else {
      Plan();
    }
    while (ended_ < jobs_.size()) {
      if (options_.order == BatchOrder::kBatchLlm) FillWindow();
      if (!PollAll()) WaitForOne();
    }
    CT_CHECK(flights_.empty() && window_pages_ == 0) << "pages left in the window";
    return stats_;
  }

 private:
  // A group of the plan as it runs. States (numbered):
  //   1 waiting  --its first member enters the window (shared, no other prime runs)-->  2 priming
  //   1 waiting  --its first member enters the window (singleton)-->  3 ready
  //   2 priming  --the prime ended (pinned, refused or failed)-->  3 ready
  //   3 ready    --its last member ended-->  4 closed (unpinned, prefix pages released)
  struct Group {
    enum class State {
      kWaiting = 1,
      kPriming = 2,
      kReady = 3,
      kClosed = 4
    } state = State::kWaiting;
    sched::PrefixGroup plan;
    size_t taken = 0;                              // members entered in the window so far
    size_t open = 0;                               // ... and not ended yet
    std::vector<std::pair<size_t, int64_t>> held;  // members waiting for the prime, pages
    std::shared_ptr<RequestStream> prime;
    uint64_t pin_id = 0;
    int64_t prefix_pages = 0;  // charged to the window while the group is open
    bool shared() const { return plan.members.size() >= 2 && plan.prefix_tokens > 0; }
  };
  struct Flight {
    size_t job = 0;
    int64_t group = -1;  // -1: no group (fcfs)
    int64_t pages = 0;   // charged to the window
    std::shared_ptr<RequestStream> stream;
    JobResult result;
  };

  void Plan() {
    Stopwatch sw;
    std::vector<sched::BatchItem> items;
    items.reserve(jobs_.size());
    for (const sched::SchedRequest& r : jobs_) {
      items.push_back({r.prompt, r.gen.max_tokens, r.cache_salt});
    }
    sched::BatchPlan plan = sched::PlanBatch(items, {options_.min_prefix_tokens});
    stats_.plan_seconds = sw.Millis() * 1e-3;
    stats_.groups = plan.groups.size();
    stats_.planned_saved_tokens = scheduler_.options().prefix_cache ? plan.saved_tokens : 0;
    const bool reuse = scheduler_.options().prefix_cache;  // else a prime would share nothing
    for (sched::PrefixGroup& g : plan.groups) {
      if (!reuse) g.prefix_tokens = 0;
      groups_.emplace_back();
      groups_.back().plan = std::move(g);
      if (groups_.back().shared()) ++stats_.shared_groups;
    }
    stats_.window_pages = scheduler_.kv().GetStats().pages_total;
    CT_LOG(kInfo) << "plan: " << jobs_.size() << " requests in " << stats_.groups << " groups ("
                  << stats_.shared_groups << " sharing a prefix), " << stats_.planned_saved_tokens
                  << " of " << plan.prompt_tokens << " prompt tokens to reuse; planned in "
                  << stats_.plan_seconds * 1e3 << " ms; window " << stats_.window_pages
                  << " KV pages";
  }

  // Pages job i may need beyond its group's shared prefix (the full pages of it), as the
  // scheduler's admission counts them: one more for the copy of a shared partial page.
  int64_t MemberPages(size_t i, const Group& g) const {
    const sched::SchedRequest& r = jobs_[i];
    const int64_t all =
        CeilDiv(static_cast<int64_t>(r.prompt.size()) + r.gen.max_tokens, page_tokens_);
    return (g.shared() ? all - g.plan.prefix_tokens / page_tokens_ : all) + 1;
  }

  // Takes requests in plan order while the window has room (the header's window).
  void FillWindow() {
    while (cursor_ < groups_.size()) {
      Group& g = groups_[cursor_];
      if (g.taken == g.plan.members.size()) {
        ++cursor_;
        continue;
      }
      // One prime at a time: the next group's prime waits until this one's members are in.
      if (g.shared() && g.state == Group::State::kWaiting && priming_ >= 0) return;
      const size_t job = g.plan.members[g.taken];
      // A request larger than the pool (the scheduler refuses it) is charged the whole pool:
      // it goes alone, and the window never holds more than its bound.
      const int64_t prefix =
          std::min(stats_.window_pages, g.shared() && g.state == Group::State::kWaiting
                                            ? CeilDiv(g.plan.prefix_tokens, page_tokens_)
                                            : 0);
      const int64_t pages = std::min(stats_.window_pages - prefix, MemberPages(job, g));
      if (window_pages_ > 0 && window_pages_ + prefix + pages > stats_.window_pages) return;
      window_pages_ += prefix + pages;
      stats_.peak_window_pages = std::max(stats_.peak_window_pages, window_pages_);
      ++g.taken;
      ++g.open;
      const int64_t gi = static_cast<int64_t>(cursor_);
      if (g.state == Group::State::kWaiting) {
        g.prefix_pages = prefix;
        g.state = Group::State::kReady;
        if (g.shared()) StartPrime(g);
      }
      if (g.state == Group::State::kPriming) {
        g.held.emplace_back(job, pages);
      } else {
        Submit(job, gi, pages);
      }
    }
  }

  void StartPrime(Group& g) {
    const sched::SchedRequest& first = jobs_[g.plan.members.front()];
    sched::SchedRequest prime;
    prime.prompt.assign(first.prompt.begin(), first.prompt.begin() + g.plan.prefix_tokens);
    prime.gen.max_tokens = 0;  // prefill only
    prime.cache_salt = first.cache_salt;
    prime.priority = first.priority;
    prime.pin_ttl_ms = options_.pin_ttl_ms;  // pinned by the loop right after the prefill
    auto stream = scheduler_.Submit(std::move(prime));
    if (!stream.ok()) {
      ++stats_.primes_failed;
      CT_LOG(kDebug) << "a prime was rejected (its group runs unshared): "
                     << stream.status().ToString();
      return;  // stays kReady: the members go in unshared
    }
    g.prime = *stream;
    g.state = Group::State::kPriming;
    priming_ = &g - groups_.data();
  }

  void PrimeEnded(Group& g, const StreamEvent& e) {
    if (e.kind == StreamEvent::Kind::kError) {
      ++stats_.primes_failed;
      CT_LOG(kDebug) << "a prime failed (its group runs unshared): " << e.error.ToString();
    } else {
      g.pin_id = e.usage.pin_id;
      if (g.pin_id == 0) ++stats_.pins_refused;
    }
    g.prime.reset();
    g.state = Group::State::kReady;
    priming_ = -1;
    const int64_t gi = &g - groups_.data();
    std::vector<std::pair<size_t, int64_t>> held = std::move(g.held);
    g.held.clear();
    for (const auto& [job, pages] : held) Submit(job, gi, pages);
  }

  void Submit(size_t job, int64_t group, int64_t pages) {
    Flight f;
    f.job = job;
    f.group = group;
    f.pages = pages;
    auto stream = scheduler_.Submit(std::move(jobs_[job]));  // after any prime copied it
    if (!stream.ok()) {
      f.result.error = stream.status();
      End(f);
      return;
    }
    f.stream = *stream;
    flights_.push_back(std::move(f));
  }

  // Releases what job f held and reports it.
  void End(Flight& f) {
    window_pages_ -= f.pages;
    if (f.group >= 0) {
      Group& g = groups_[static_cast<size_t>(f.group)];
      --g.open;
      if (g.open == 0 && g.taken == g.plan.members.size()) {
        if (g.pin_id != 0) scheduler_.pins().Remove(g.pin_id);
        window_pages_ -= g.prefix_pages;
        g.state = Group::State::kClosed;
      }
    }
    ++ended_;
    on_done_(f.job, std::move(f.result));
  }

  // Applies one event to flight f; true when it was the last.
  static bool Absorb(Flight& f, StreamEvent& e) {
    switch (e.kind) {
      case StreamEvent::Kind::kToken:
        f.result.text += e.text;
        return false;
      case StreamEvent::Kind::kDone:
        f.result.finish = e.finish;
        f.result.usage = std::move(e.usage);
        return true;
      case StreamEvent::Kind::kError:
        f.result.error = e.error;
        f.result.usage = std::move(e.usage);
        return true;
    }
    return true;
  }

  // Drains every stream's pending events; true when there were any.
  bool PollAll() {
    bool any = false;
    StreamEvent e;
    if (priming_ >= 0) {
      Group& g = groups_[static_cast<size_t>(priming_)];
      if (g.prime->Next(&e, std::chrono::milliseconds(0))) {
        any = true;
        if (e.kind != StreamEvent::Kind::kToken) PrimeEnded(g, e);
      }
    }
    for (size_t i = 0; i < flights_.size();) {
      bool ended = false;
      while (!ended && flights_[i].stream->Next(&e, std::chrono::milliseconds(0))) {
        any = true;
        ended = Absorb(flights_[i], e);
      }
      if (ended) {
        Flight f = TakeFlight(i);
        End(f);
      } else {
        ++i;
      }
    }
    return any;
  }

  // Removes flights_[i] (the last one takes its place).
  Flight TakeFlight(size_t i) {
    Flight f = std::move(flights_[i]);
    if (i + 1 != flights_.size()) flights_[i] = std::move(flights_.back());
    flights_.pop_back();
    return f;
  }

  // Nothing had an event: block briefly on the oldest stream instead of spinning.
  void WaitForOne() {
    StreamEvent e;
    if (!flights_.empty()) {
      Flight& f = flights_.front();
      if (f.stream->Next(&e, kIdleWait) && Absorb(f, e)) {
        Flight done = TakeFlight(0);
        End(done);
      }
      return;
    }
    if (priming_ < 0) {
      std::this_thread::sleep_for(kIdleWait);  // not reached: something is always in flight
      return;
    }
    Group& g = groups_[static_cast<size_t>(priming_)];
    if (g.prime->Next(&e, kIdleWait) && e.kind != StreamEvent::Kind::kToken) PrimeEnded(g, e);
  }

  sched::Scheduler& scheduler_;
  std::vector<sched::SchedRequest> jobs_;
  const BatchRunOptions options_;
  const std::function<void(size_t, JobResult)>& on_done_;
  const int64_t page_tokens_;

  std::vector<Group> groups_;    // in plan order
  size_t cursor_ = 0;            // the group whose members enter the window next
  int64_t priming_ = -1;         // the group whose prime runs (at most one), -1: none
  std::vector<Flight> flights_;  // submitted, not ended
  int64_t window_pages_ = 0;
  size_t ended_ = 0;
  BatchRunStats stats_;
};

}  // namespace

BatchRunStats RunBatch(sched::Scheduler& scheduler, std::vector<sched::SchedRequest> jobs,
                       const BatchRunOptions& options,
                       const std::function<void(size_t, JobResult)>& on_done) {
  return BatchRun(scheduler, std::move(jobs), options, on_done).Go();
}

}  // namespace cachette::cli
