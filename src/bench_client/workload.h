// Workloads for the serving benchmark client: deterministic request programs generated from a
// seed, independent of any server.
//
// A workload is a set of programs. A program is a sequence of turns sent one after another:
// turn i+1 is never sent before turn i's answer has arrived (plus the turn's pause), and, when
// the program keeps its history, its prompt is the system prompt, every earlier turn and answer,
// then the new user message. Programs run concurrently; phases run one after another (all of
// phase 0, then all of phase 1), which gives long-doc-qa its warm-up round.
//
// The scheduling kinds add what a scheduler looks at, carried per turn and sent as the server's
// request fields: a priority and a time-to-first-token objective (deadline-mix), and for agent
// programs a program id and the tool the program calls after the turn (agentic). They exist to
// compare schedulers (FCFS, longest-prefix-match, program-aware) on the same requests:
//   shared-prefix  G groups x N requests; each group has its own system prompt; one burst in a
//                  seeded shuffled order, so only a prefix-aware scheduler finds the groups.
//   deadline-mix   interactive requests (short, with a TTFT objective) among background ones
//                  (long prompt, long output, no objective): does the objective survive them?
//   agentic        multi-turn programs that pause between turns for a tool call (a named tool
//                  with its own mean run time), the shape Continuum schedules around.
//
// Sizes are given in tokens and approximated by words: the synthetic words are common English
// words that a BPE vocabulary encodes as one token each (with the leading space).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cachette/status.h"

namespace cachette::bench_client {

// The kinds GenerateWorkload() knows.
inline constexpr const char* kWorkloadKinds[] = {"multi-round-qa", "long-doc-qa", "agentic",
                                                 "rag", "shared-prefix", "deadline-mix"};

// One tool of an agentic workload: its name (sent as the request's "tool") and its mean run
// time, the pause between a turn's answer and the next turn that carries the tool's result.
struct ToolSpec {
  std::string name;
  double mean_ms = 0;
};

// Parses "search:300,code:1500,browse:800" (name:mean_ms, comma-separated; names distinct,
// 1..64 bytes of [A-Za-z0-9_.-], means in [0, 1e7] ms). InvalidArgument naming the bad entry.
Result<std::vector<ToolSpec>> ParseTools(const std::string& spec);

struct WorkloadOptions {
  std::string kind = "multi-round-qa";
  uint64_t seed = 1;
  // Poisson arrival rate of new rounds / programs / requests. 0 means "all at once", which
  // only shared-prefix accepts (its default burst).
  double qps = 1.0;
  int max_tokens = 32;        // generated tokens per request
  int system_tokens = 400;    // the shared system prompt (multi-round-qa, agentic, rag)
  int question_tokens = 40;   // each user question / task / RAG question

  // multi-round-qa: `users` conversations of `rounds` rounds each.
  int users = 8;
  int rounds = 4;

  // long-doc-qa: `documents` documents of `document_tokens`, read once each in a warm-up
  // round, then `queries` queries following `hit_miss` ("H:M": H warmed documents, then M
  // documents never seen, repeated), `concurrency` requests in flight (closed loop).
  int documents = 8;
  int document_tokens = 1000;
  int queries = 16;
  std::string hit_miss = "1:1";
  int concurrency = 1;

  // agentic: `programs` programs of `turns` turns; after each answer but the last, the program
  // calls a tool drawn uniformly from `tools` ("name:mean_ms,..."; empty: one tool named
  // "tool" of mean `tool_ms`), pauses for an exponentially drawn time of that tool's mean
  // (capped at 4x the mean) and sends `tool_output_tokens` of output as the next turn.
  int programs = 4;
  int turns = 4;
  double tool_ms = 500;
  std::string tools;
  int tool_output_tokens = 100;

  // rag: `requests` requests over a pool of `chunks` chunks of `chunk_tokens`, each with
  // between `min_retrieved` and `max_retrieved` distinct chunks in a random order.
  int requests = 32;
  int chunks = 32;
  int chunk_tokens = 200;
  int min_retrieved = 3;
  int max_retrieved = 6;

  // shared-prefix: `groups` x `prompts_per_group` single requests without history; each starts
  // with its group's system prompt of `system_tokens`, then its own question of
  // `question_tokens`. Sent in a seeded shuffled order, 1 ms apart when qps is 0 (a burst),
  // else by Poisson arrivals at qps.
  int groups = 4;
  int prompts_per_group = 8;

  // deadline-mix: `requests` requests by Poisson arrivals at qps; each is interactive with
  // probability `interactive_share` (a prompt of `question_tokens`, `max_tokens` of output, a
  // TTFT objective of `deadline_ms`, priority 1 when `deadline_priority`) or else background
  // (a prompt of `background_tokens`, `background_max_tokens` of output, no objective).
  int deadline_ms = 1000;
  bool deadline_priority = false;
  double interactive_share = 0.5;
  int background_tokens = 600;
  int background_max_tokens = 128;
};

struct Turn {
  std::string user;           // the new user message
  double at_s = -1;           // scheduled arrival, seconds after its phase starts (< 0: none)
  double after_prev_s = 0;    // pause after the previous turn's answer (a tool call)
  int max_tokens = 32;
  std::string tag;            // groups figures in the summary: "round-2", "hit", "miss", ...
  bool measured = true;       // false for warm-up turns: logged, left out of the summary
  // Scheduling fields, sent only when set (0 / empty): "priority" (higher first),
  // "deadline_ms" (the TTFT objective; it also decides goodput) and "tool" (the tool the
  // program calls after this turn's answer; the next turn carries its result).
  int priority = 0;
  int deadline_ms = 0;
  std::string tool;
};

struct Program {
  std::string system;         // system prompt; empty for none
  bool keep_history = true;   // false: each turn is sent alone after the system prompt
  int phase = 0;
  // "s<seed>-p<i>" for agent programs, empty otherwise. Sent as "program_id" with a per-run
  // nonce appended by the runner, so two runs against one server never share a program.
  std::string id;
  std::vector<Turn> turns;
};

struct Workload {
  std::string kind;
  uint64_t seed = 0;
  std::vector<Program> programs;

  int TurnCount() const;
  // Sum of the words of every system prompt and user message: a size check for tests.
  int64_t UserWords() const;
};

// Returns the workload `o.kind` generated from `o.seed`; the same options always give the same
// workload. InvalidArgument for an unknown kind or sizes out of range.
Result<Workload> GenerateWorkload(const WorkloadOptions& o);

// A deterministic 64-bit generator (SplitMix64): workloads must not depend on the standard
// library's distributions, which differ between implementations.
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t Next();
  // Uniform in [0, n); n > 0.
  uint64_t Below(uint64_t n) { return Next() % n; }
  // Uniform in [0, 1).
  double Uniform() { return static_cast<double>(Next() >> 11) * 0x1.0p-53; }
  // Exponential with the given mean.
  double Exponential(double mean);

 private:
  uint64_t state_;
};

// `n_words` synthetic English words separated by spaces (no leading space).
std::string Words(Rng& rng, int n_words);

// Counts space-separated words in `s`.
int CountWords(const std::string& s);

}  // namespace cachette::bench_client
