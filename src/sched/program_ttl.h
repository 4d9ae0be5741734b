// Continuum's time-to-live for a paused agent program's KV: how long to keep a finished turn
// pinned while the program waits for a tool, chosen per tool from that tool's observed call
// durations.
//
// A program (program_id, else session_id) sends a turn, gets the answer, calls a tool, and sends
// the next turn with the tool's result. If the KV of the conversation is still pinned when the
// next turn arrives, the turn neither re-prefills its context nor waits behind newcomers; but
// every second the pin holds pages it takes them from other requests. For a TTL tau and the
// tool's call duration D:
//     benefit(tau) = P(D <= tau) * (reload_s + queue_s)
//     cost(tau)    = hold_rate * E[min(D, tau)]
// reload_s: what re-prefilling the context would cost (tokens x measured prefill seconds per
// token); queue_s: the mean queueing delay a returning turn would otherwise face; hold_rate: the
// latency the pin imposes on everyone else per second held = (pages held / pages in the pool) x
// (other requests running or waiting) x (pool utilisation) -- zero on an idle server, large when
// memory is what the others wait for. The TTL is the tau that maximises benefit - cost, searched
// over 0 and the durations themselves (the optimum of this step-function objective lies at one
// of them), then stretched by a small margin so that a call as long as the chosen sample still
// finds its pin.
//
// Durations: the last `window` observed calls of the tool, plus `prior_samples` pseudo-samples
// from an exponential prior (quantiles (i + 0.5) / k of Exp(mean)), mean = the mean over every
// tool seen so far or `prior_mean_s` before any: a new tool starts from a sensible guess and its
// own observations take over as they come (cold start as in the paper).
//
// Thread-safety: none; the scheduler loop owns it (Stats() is copied out under its lock).
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace cachette::sched {

class ToolTtlEstimator {
 public:
  struct Options {
    double prior_mean_s = 2.0;
    int prior_samples = 4;
    size_t window = 200;
    size_t max_tools = 1024;     // distinct tool names remembered (least used forgotten)
    double margin = 1.1;         // TTL = chosen duration x margin + margin_s
    double margin_s = 0.05;
  };
  ToolTtlEstimator() : ToolTtlEstimator(Options{}) {}
  explicit ToolTtlEstimator(Options o) : o_(o) {}

  // A call of `tool` took `seconds` (answer of one turn to arrival of the next).
  void Observe(const std::string& tool, double seconds);
  // The TTL in seconds for a program that just called `tool` (0: do not pin), capped at max_s.
  double Ttl(const std::string& tool, double benefit_s, double hold_rate, double max_s) const;
  // The duration samples the decision uses (observed + prior), for tests.
  std::vector<double> Samples(const std::string& tool) const;

  // {"tools": {name: {"calls", "mean_s", "p50_s", "p90_s", "last_ttl_s"}}}
  nlohmann::json Stats() const;
  void NoteTtl(const std::string& tool, double ttl_s);  // for Stats

 private:
  struct Tool {
    std::deque<double> durations;
    uint64_t calls = 0;
    double last_ttl_s = -1;
    uint64_t last_use = 0;
  };
  double PriorMean() const;

  Options o_;
  std::map<std::string, Tool> tools_;
  double total_s_ = 0;   // over every observation (prior mean for new tools)
  uint64_t total_n_ = 0;
  uint64_t clock_ = 0;
};

}  // namespace cachette::sched
