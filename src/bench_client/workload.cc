#include "bench_client/workload.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string_view>

namespace cachette::bench_client {
namespace {

// Common English words: each is one GPT-2-style BPE token with its leading space, so a word
// count approximates a token count.
constexpr std::string_view kWords[] = {
    "the",     "of",     "and",    "to",     "in",     "is",     "was",    "for",    "on",
    "that",    "with",   "as",     "by",     "at",     "from",   "his",    "her",    "they",
    "it",      "an",     "be",     "this",   "which",  "or",     "are",    "had",    "first",
    "one",     "new",    "their",  "also",   "after",  "were",   "has",    "been",   "other",
    "two",     "when",   "time",   "would",  "into",   "more",   "city",   "school", "world",
    "year",    "years",  "during", "over",   "only",   "most",   "some",   "there",  "later",
    "state",   "where",  "three",  "many",   "people", "before", "film",   "since",  "war",
    "game",    "season", "team",   "used",   "while",  "such",   "between", "under", "both",
    "then",    "made",   "known",  "part",   "life",   "about",  "found",  "work",   "these",
    "through", "music",  "early",  "well",   "second", "them",   "album",  "house",  "water",
    "family",  "group",  "become", "called", "number", "night",  "series", "street", "against",
    "south",   "north",  "high",   "home",   "name",   "river",  "book",   "line",   "place",
    "government", "system", "around", "million", "small", "until", "company", "club", "story",
    "church",  "local",  "power",  "public", "area",   "end",    "form",   "own",    "back",
    "great",   "played", "four",   "old",    "long",   "each",   "major",  "last",   "road",
    "west",    "east",   "members", "court", "British", "station", "built", "main",  "air",
    "young",   "record", "side",   "center", "art",    "field",  "party",  "role",   "country",
    "death",   "voice",  "history", "general", "point", "land",  "head",   "body",   "army",
    "king",    "queen",  "light",  "stone",  "black",  "white",  "red",    "green",  "blue",
    "market",  "money",  "office", "paper",  "model",  "report", "table",  "garden", "forest",
    "island",  "bridge", "window", "letter", "summer", "winter", "morning", "evening", "village",
    "memory",  "engine", "data",   "signal", "level",  "cache",  "value",  "order",  "space",
};
constexpr uint64_t kWordCount = sizeof(kWords) / sizeof(kWords[0]);

// Poisson arrivals: `n` arrival times at rate `qps`, the first one at 0 so a run starts at once.
std::vector<double> PoissonArrivals(Rng& rng, int n, double qps) {
  std::vector<double> t(n);
  double now = 0;
  for (int i = 0; i < n; ++i) {
    if (i > 0) now += rng.Exponential(1.0 / qps);
    t[i] = now;
  }
  return t;
}

Status CheckRange(const char* name, double v, double lo, double hi) {
  if (v < lo || v > hi) {
    return InvalidArgument(std::string(name) + " must be in [" + std::to_string(lo) + ", " +
                           std::to_string(hi) + "], got " + std::to_string(v));
  }
  return Status::Ok();
}

Status CheckCommon(const WorkloadOptions& o) {
  // qps 0 is shared-prefix's burst; every other kind needs a rate.
  if (!(o.kind == "shared-prefix" && o.qps == 0)) {
    CT_RETURN_IF_ERROR(CheckRange("qps", o.qps, 1e-3, 1e4));
  }
  CT_RETURN_IF_ERROR(CheckRange("max_tokens", o.max_tokens, 1, 1 << 16));
  CT_RETURN_IF_ERROR(CheckRange("system_tokens", o.system_tokens, 0, 1 << 20));
  CT_RETURN_IF_ERROR(CheckRange("question_tokens", o.question_tokens, 1, 1 << 20));
  return Status::Ok();
}

Workload MultiRoundQa(const WorkloadOptions& o, Rng& rng) {
  Workload w;
  const std::string system = "You answer questions about the text below. " +
                             Words(rng, o.system_tokens);
  w.programs.resize(o.users);
  for (auto& p : w.programs) p.system = system;
  // Arrival k sends round k / users of user k % users: every user gets a round before any gets
  // the next, and a user whose previous answer is late delays only its own round.
  const std::vector<double> at = PoissonArrivals(rng, o.users * o.rounds, o.qps);
  for (int k = 0; k < o.users * o.rounds; ++k) {
    Turn t;
    t.user = Words(rng, o.question_tokens) + "?";
    t.at_s = at[k];
    t.max_tokens = o.max_tokens;
    t.tag = "round-" + std::to_string(k / o.users + 1);
    w.programs[k % o.users].turns.push_back(std::move(t));
  }
  return w;
}

Result<std::pair<int, int>> ParseHitMiss(const std::string& s) {
  const size_t colon = s.find(':');
  if (colon == std::string::npos) return InvalidArgument("hit_miss must be H:M, got " + s);
  try {
    const int h = std::stoi(s.substr(0, colon));
    const int m = std::stoi(s.substr(colon + 1));
    if (h < 0 || m < 0 || h + m == 0) return InvalidArgument("hit_miss: H, M >= 0, H + M > 0");
    return std::make_pair(h, m);
  } catch (const std::exception&) {
    return InvalidArgument("hit_miss must be H:M, got " + s);
  }
}

Result<Workload> LongDocQa(const WorkloadOptions& o, Rng& rng) {
  CT_ASSIGN_OR_RETURN(const auto hm, ParseHitMiss(o.hit_miss));
  Workload w;
  auto document = [&](int id) {
    return "Document " + std::to_string(id) + ". " + Words(rng, o.document_tokens);
  };
  std::vector<std::string> warmed;
  for (int d = 0; d < o.documents; ++d) warmed.push_back(document(d));
  const int lanes = std::max(1, o.concurrency);
  // Phase 0 reads each document once; phase 1 queries. Each phase is `lanes` closed-loop
  // programs that share the requests round-robin.
  for (int phase = 0; phase < 2; ++phase) {
    for (int l = 0; l < lanes; ++l) {
      Program p;
      p.keep_history = false;
      p.phase = phase;
      w.programs.push_back(std::move(p));
    }
  }
  for (int d = 0; d < o.documents; ++d) {
    Turn t;
    t.user = warmed[d] + "\n\nSummarize the document in one sentence.";
    t.max_tokens = o.max_tokens;
    t.tag = "warmup";
    t.measured = false;
    w.programs[d % lanes].turns.push_back(std::move(t));
  }
  int next_hit = 0, next_new = o.documents;
  for (int q = 0; q < o.queries; ++q) {
    const bool hit = q % (hm.first + hm.second) < hm.first && o.documents > 0;
    Turn t;
    const std::string& doc = hit ? warmed[next_hit++ % o.documents] : document(next_new++);
    t.user = doc + "\n\nQuestion: " + Words(rng, o.question_tokens) + "?";
    t.max_tokens = o.max_tokens;
    t.tag = hit ? "hit" : "miss";
    w.programs[lanes + q % lanes].turns.push_back(std::move(t));
  }
  return w;
}

Workload Agentic(const WorkloadOptions& o, const std::vector<ToolSpec>& tools, Rng& rng) {
  Workload w;
  const std::string system = "You are an agent. Call one tool per turn; tools: " +
                             Words(rng, o.system_tokens);
  const std::vector<double> start = PoissonArrivals(rng, o.programs, o.qps);
  for (int i = 0; i < o.programs; ++i) {
    Program p;
    p.system = system;
    p.id = "s" + std::to_string(o.seed) + "-p" + std::to_string(i);
    for (int k = 0; k < o.turns; ++k) {
      Turn t;
      if (k == 0) {
        t.user = "Task: " + Words(rng, o.question_tokens) + ".";
        t.at_s = start[i];
      } else {
        // The tool the previous turn called. With one tool nothing is drawn, so a workload
        // without --tools has the prompts and pauses it had before tools had names.
        const ToolSpec& tool = tools.size() == 1 ? tools[0] : tools[rng.Below(tools.size())];
        p.turns.back().tool = tool.name;
        t.user = "Tool result: " + Words(rng, o.tool_output_tokens) + ".";
        // The tool's run time; the cap keeps a rare long draw from dominating a short run.
        t.after_prev_s = std::min(rng.Exponential(tool.mean_ms), 4 * tool.mean_ms) / 1e3;
      }
      t.max_tokens = o.max_tokens;
      t.tag = "turn-" + std::to_string(k + 1);
      p.turns.push_back(std::move(t));
    }
    w.programs.push_back(std::move(p));
  }
  return w;
}

Workload Rag(const WorkloadOptions& o, Rng& rng) {
  Workload w;
  const std::string system = "Answer from the retrieved passages only. " +
                             Words(rng, o.system_tokens);
  std::vector<std::string> pool;
  for (int c = 0; c < o.chunks; ++c) {
    pool.push_back("[passage " + std::to_string(c) + "] " + Words(rng, o.chunk_tokens));
  }
  const std::vector<double> at = PoissonArrivals(rng, o.requests, o.qps);
  std::vector<int> ids(o.chunks);
  for (int r = 0; r < o.requests; ++r) {
    const int k = o.min_retrieved + static_cast<int>(rng.Below(o.max_retrieved -
                                                               o.min_retrieved + 1));
    // A partial Fisher-Yates shuffle: k distinct chunks, in a random order.
    for (int c = 0; c < o.chunks; ++c) ids[c] = c;
    std::string user = "Passages:\n";
    for (int j = 0; j < k; ++j) {
      const int pick = j + static_cast<int>(rng.Below(o.chunks - j));
      std::swap(ids[j], ids[pick]);
      user += pool[ids[j]] + "\n";
    }
    Turn t;
    t.user = user + "\nQuestion: " + Words(rng, o.question_tokens) + "?";
    t.at_s = at[r];
    t.max_tokens = o.max_tokens;
    t.tag = "k=" + std::to_string(k);
    Program p;
    p.system = system;
    p.keep_history = false;
    p.turns.push_back(std::move(t));
    w.programs.push_back(std::move(p));
  }
  return w;
}

// A single-turn program without history: the unit of the request-level kinds.
Program SingleRequest(std::string system, Turn t) {
  Program p;
  p.system = std::move(system);
  p.keep_history = false;
  p.turns.push_back(std::move(t));
  return p;
}

// "7" -> "07" when the largest index has two digits: tags then sort as numbers do.
std::string ZeroPadded(int v, int largest) {
  std::string s = std::to_string(v);
  const size_t width = std::to_string(largest).size();
  return std::string(width > s.size() ? width - s.size() : 0, '0') + s;
}

Workload SharedPrefix(const WorkloadOptions& o, Rng& rng) {
  Workload w;
  // Each group's prompt opens with its number, so two groups differ from their first word on
  // and share nothing beyond the chat template's own header.
  std::vector<std::string> systems;
  for (int g = 0; g < o.groups; ++g) {
    systems.push_back("Group " + std::to_string(g) + " assistant. " +
                      Words(rng, o.system_tokens));
  }
  struct Slot {
    int group;
    std::string question;
  };
  std::vector<Slot> slots;
  for (int g = 0; g < o.groups; ++g) {
    for (int q = 0; q < o.prompts_per_group; ++q) {
      slots.push_back({g, Words(rng, o.question_tokens) + "?"});
    }
  }
  // Fisher-Yates: FCFS over this order interleaves the groups.
  for (size_t i = slots.size(); i > 1; --i) std::swap(slots[i - 1], slots[rng.Below(i)]);
  const int n = static_cast<int>(slots.size());
  // A burst is 1 ms apart rather than simultaneous: the server then queues the requests in the
  // seeded order, not in whatever order the client threads happen to win the race.
  std::vector<double> at(n);
  if (o.qps > 0) {
    at = PoissonArrivals(rng, n, o.qps);
  } else {
    for (int k = 0; k < n; ++k) at[k] = 1e-3 * k;
  }
  for (int k = 0; k < n; ++k) {
    Turn t;
    t.user = std::move(slots[k].question);
    t.at_s = at[k];
    t.max_tokens = o.max_tokens;
    t.tag = "group-" + ZeroPadded(slots[k].group, o.groups - 1);
    w.programs.push_back(SingleRequest(systems[slots[k].group], std::move(t)));
  }
  return w;
}

Workload DeadlineMix(const WorkloadOptions& o, Rng& rng) {
  Workload w;
  const std::vector<double> at = PoissonArrivals(rng, o.requests, o.qps);
  for (int r = 0; r < o.requests; ++r) {
    Turn t;
    t.at_s = at[r];
    if (rng.Uniform() < o.interactive_share) {
      t.user = "Quick question: " + Words(rng, o.question_tokens) + "?";
      t.max_tokens = o.max_tokens;
      t.deadline_ms = o.deadline_ms;
      t.priority = o.deadline_priority ? 1 : 0;
      t.tag = "interactive";
    } else {
      t.user = "Summarize this report in detail: " + Words(rng, o.background_tokens);
      t.max_tokens = o.background_max_tokens;
      t.tag = "background";
    }
    w.programs.push_back(SingleRequest("", std::move(t)));
  }
  return w;
}

}  // namespace

Result<std::vector<ToolSpec>> ParseTools(const std::string& spec) {
  std::vector<ToolSpec> tools;
  size_t pos = 0;
  while (pos <= spec.size()) {
    size_t comma = spec.find(',', pos);
    if (comma == std::string::npos) comma = spec.size();
    const std::string entry = spec.substr(pos, comma - pos);
    pos = comma + 1;
    const size_t colon = entry.rfind(':');
    const std::string why = "--tools entry '" + entry + "' must be name:mean_ms";
    if (colon == std::string::npos || colon == 0 || colon > 64) return InvalidArgument(why);
    ToolSpec t;
    t.name = entry.substr(0, colon);
    for (char c : t.name) {
      const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                      (c >= '0' && c <= '9') || c == '_' || c == '.' || c == '-';
      if (!ok) return InvalidArgument(why + " (name of letters, digits, _ . -)");
    }
    const std::string ms = entry.substr(colon + 1);
    char* end = nullptr;
    t.mean_ms = ms.empty() ? -1 : std::strtod(ms.c_str(), &end);
    if (ms.empty() || *end != '\0' || !(t.mean_ms >= 0 && t.mean_ms <= 1e7)) {
      return InvalidArgument(why + " (mean_ms a number in [0, 1e7])");
    }
    for (const ToolSpec& u : tools) {
      if (u.name == t.name) return InvalidArgument("--tools names '" + t.name + "' twice");
    }
    tools.push_back(std::move(t));
  }
  return tools;
}

uint64_t Rng::Next() {
  uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

double Rng::Exponential(double mean) { return -mean * std::log1p(-Uniform()); }

std::string Words(Rng& rng, int n_words) {
  std::string s;
  s.reserve(static_cast<size_t>(n_words) * 7);
  for (int i = 0; i < n_words; ++i) {
    if (i > 0) s += ' ';
    s += kWords[rng.Below(kWordCount)];
  }
  return s;
}

int CountWords(const std::string& s) {
  int n = 0;
  bool in_word = false;
  for (char c : s) {
    const bool space = c == ' ' || c == '\n' || c == '\t';
    if (!space && !in_word) ++n;
    in_word = !space;
  }
  return n;
}

int Workload::TurnCount() const {
  int n = 0;
  for (const auto& p : programs) n += static_cast<int>(p.turns.size());
  return n;
}

int64_t Workload::UserWords() const {
  int64_t n = 0;
  for (const auto& p : programs) {
    n += CountWords(p.system);
    for (const auto& t : p.turns) n += CountWords(t.user);
  }
  return n;
}

Result<Workload> GenerateWorkload(const WorkloadOptions& o) {
  CT_RETURN_IF_ERROR(CheckCommon(o));
  // Each kind draws from its own stream, so adding a kind never changes another's prompts.
  uint64_t kind_hash = 1469598103934665603ull;  // FNV-1a: std::hash differs between libraries
  for (char c : o.kind) kind_hash = (kind_hash ^ static_cast<uint8_t>(c)) * 1099511628211ull;
  Rng rng(o.seed * 0x2545f4914f6cdd1dull + kind_hash);
  std::string known;
  for (const char* k : kWorkloadKinds) known += (known.empty() ? "" : ", ") + std::string(k);
  Result<Workload> w = InvalidArgument("unknown workload kind '" + o.kind + "' (" + known + ")");
  if (o.kind == "multi-round-qa") {
    CT_RETURN_IF_ERROR(CheckRange("users", o.users, 1, 1 << 16));
    CT_RETURN_IF_ERROR(CheckRange("rounds", o.rounds, 1, 1 << 16));
    w = MultiRoundQa(o, rng);
  } else if (o.kind == "long-doc-qa") {
    CT_RETURN_IF_ERROR(CheckRange("documents", o.documents, 0, 1 << 16));
    CT_RETURN_IF_ERROR(CheckRange("document_tokens", o.document_tokens, 1, 1 << 20));
    CT_RETURN_IF_ERROR(CheckRange("queries", o.queries, 0, 1 << 16));
    CT_RETURN_IF_ERROR(CheckRange("concurrency", o.concurrency, 1, 1024));
    w = LongDocQa(o, rng);
  } else if (o.kind == "agentic") {
    CT_RETURN_IF_ERROR(CheckRange("programs", o.programs, 1, 1 << 16));
    CT_RETURN_IF_ERROR(CheckRange("turns", o.turns, 1, 1 << 12));
    CT_RETURN_IF_ERROR(CheckRange("tool_ms", o.tool_ms, 0, 1e7));
    CT_RETURN_IF_ERROR(CheckRange("tool_output_tokens", o.tool_output_tokens, 0, 1 << 20));
    std::vector<ToolSpec> tools = {{"tool", o.tool_ms}};
    if (!o.tools.empty()) {
      CT_ASSIGN_OR_RETURN(tools, ParseTools(o.tools));
    }
    w = Agentic(o, tools, rng);
  } else if (o.kind == "rag") {
    CT_RETURN_IF_ERROR(CheckRange("requests", o.requests, 1, 1 << 16));
    CT_RETURN_IF_ERROR(CheckRange("chunks", o.chunks, 1, 1 << 16));
    CT_RETURN_IF_ERROR(CheckRange("chunk_tokens", o.chunk_tokens, 1, 1 << 20));
    CT_RETURN_IF_ERROR(CheckRange("min_retrieved", o.min_retrieved, 1, o.chunks));
    CT_RETURN_IF_ERROR(CheckRange("max_retrieved", o.max_retrieved, o.min_retrieved, o.chunks));
    w = Rag(o, rng);
  } else if (o.kind == "shared-prefix") {
    CT_RETURN_IF_ERROR(CheckRange("groups", o.groups, 1, 1 << 12));
    CT_RETURN_IF_ERROR(CheckRange("prompts_per_group", o.prompts_per_group, 1, 1 << 12));
    CT_RETURN_IF_ERROR(CheckRange("groups x prompts_per_group",
                                  static_cast<double>(o.groups) * o.prompts_per_group, 1,
                                  1 << 16));
    w = SharedPrefix(o, rng);
  } else if (o.kind == "deadline-mix") {
    CT_RETURN_IF_ERROR(CheckRange("requests", o.requests, 1, 1 << 16));
    CT_RETURN_IF_ERROR(CheckRange("deadline_ms", o.deadline_ms, 1, 24 * 3600 * 1000));
    CT_RETURN_IF_ERROR(CheckRange("interactive_share", o.interactive_share, 0, 1));
    CT_RETURN_IF_ERROR(CheckRange("background_tokens", o.background_tokens, 1, 1 << 20));
    CT_RETURN_IF_ERROR(CheckRange("background_max_tokens", o.background_max_tokens, 1, 1 << 16));
    w = DeadlineMix(o, rng);
  }
  if (w.ok()) {
    w->kind = o.kind;
    w->seed = o.seed;
  }
  return w;
}

}  // namespace cachette::bench_client
