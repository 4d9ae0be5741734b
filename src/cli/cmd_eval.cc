// `cachette eval ppl`, `eval retrieval`, `eval stream` and `eval rag`: quality of the engine
// with the KV cache passed through a store codec, a KV budget policy or reused from documents
// computed on their own, beside the exact baseline measured in the same run.
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli/cli.h"
#include "core/timer.h"
#include "engine/engine.h"
#include "eval/kv_policy_eval.h"
#include "eval/perplexity.h"
#include "eval/rag.h"
#include "eval/retrieval.h"
#include "eval/synthetic.h"

namespace cachette::cli {
namespace {

struct CommonArgs {
  std::string model;
  int threads = 0;
  std::string kv_type = "f16";
  int kv_recent = -1;
  std::vector<std::string> codecs;
  int chunk_tokens = 256;
  std::vector<std::string> kv_policies;
  std::vector<double> budgets = {0.05, 0.1, 0.2, 0.5};
  int step = 16;
  bool json = false;
  bool quiet = false;
};

struct StreamArgs {
  CommonArgs c;
  std::string text;
  std::string policy = "streamingllm";
  int cache = 2048;
  int64_t tokens = 20000;
  int report = 2048;
};

struct PplArgs {
  CommonArgs c;
  std::string text;
  int ctx = 1024;
  int score_step = 0;
  uint64_t bytes = 0;
};

struct RetrievalArgs {
  CommonArgs c;
  std::string data;
  int n = 0;
  std::vector<std::string> kinds;
  int64_t synthetic_seed = -1;
  int synthetic_chars = 2400;
  std::string filler;
  bool details = false;
};

struct RagArgs {
  CommonArgs c;
  std::string data;
  int n = 0;
  std::vector<std::string> kinds;
  std::vector<std::string> modes = {"full", "prefix", "naive", "blend", "cachecraft", "ape"};
  double ape_t = 0.9, ape_s = 0.9;
  std::vector<double> ratios = {0.15};
  std::vector<double> alphas = {0.2};
  std::vector<std::string> craft_choices = {
      std::string(CraftChoiceName(ReuseOptions{}.craft_choice))};
  bool details = false;
};

std::string SharedPath(const std::string& rel) { return std::string(CACHETTE_SHARED_DIR) + rel; }

Result<std::string> ReadFile(const std::string& path, uint64_t max_bytes) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return IOError("cannot open " + path);
  std::ostringstream ss;
  ss << f.rdbuf();
  std::string s = ss.str();
  if (max_bytes > 0 && s.size() > max_bytes) s.resize(max_bytes);
  return s;
}

// Loads the model and builds the engine the eval runs on.
Result<LoadedEngine> Load(const CommonArgs& a) {
  return LoadEngine(a.model, a.kv_type, a.threads, a.kv_recent);
}

// Progress on stderr, only for a person watching a terminal.
std::function<void(int, int)> ProgressPrinter(const CommonArgs& a, const char* what) {
  if (a.quiet || !isatty(2)) return nullptr;
  return [what](int done, int total) {
    std::fprintf(stderr, "\r%s %d/%d", what, done, total);
    if (done == total) std::fprintf(stderr, "\n");
  };
}

nlohmann::json Header(const LoadedEngine& l, const CommonArgs& a) {
  const ModelConfig& c = l.model->config();
  return {{"model", l.path},
          {"weight_type", std::string(kernels::WTypeName(c.weight_type))},
          {"kv_type", a.kv_type},
          {"kv_recent", l.engine->kv_shape().recent},
          {"threads", l.engine->pool().size()},
          {"chunk_tokens", a.chunk_tokens}};
}

// One config per (policy, budget), validated; empty when no --kv-policy was given.
Result<std::vector<KvPolicyConfig>> PolicyConfigs(const CommonArgs& a) {
  std::vector<KvPolicyConfig> out;
  if (a.kv_policies.empty()) return out;
  if (!a.codecs.empty()) {
    return InvalidArgument("--kv-codec and --kv-policy are measured in separate runs");
  }
  for (const std::string& name : a.kv_policies) {
    for (double b : a.budgets) {
      KvPolicyConfig c;
      c.name = name;
      c.budget = b;
      CT_RETURN_IF_ERROR(ValidateKvPolicy(c).WithContext("--kv-policy/--budget"));
      out.push_back(c);
    }
  }
  return out;
}

nlohmann::json PolicyJson(const KvPolicyConfig* c) {
  if (c == nullptr) return {{"kv_policy", "full"}, {"budget", nullptr}, {"baseline", true}};
  return {{"kv_policy", c->name}, {"budget", c->budget}, {"baseline", false}};
}

int EvalPolicyPpl(const PplArgs& a, const LoadedEngine& l, const std::string& text,
                  const std::vector<TokenId>& tokens, const std::vector<KvPolicyConfig>& pcs) {
  const Tokenizer& tok = l.model->tokenizer();
  eval::PolicyPplOptions o;
  o.ctx = a.ctx;
  o.policies = pcs;
  o.step = a.c.step;
  o.bos = tok.add_bos() ? tok.bos() : -1;
  o.progress = ProgressPrinter(a.c, "windows");
  Stopwatch sw;
  auto r = eval::EvalPolicyPerplexity(*l.engine, tokens, o);
  if (!r.ok()) return Fail(r.status());
  const eval::PolicyPplFigure& base = r->figures[0];
  if (a.c.json) {
    nlohmann::json j = Header(l, a.c);
    j["eval"] = "ppl";
    j["text"] = a.text;
    j["text_bytes"] = text.size();
    j["ctx"] = r->ctx;
    j["scoring"] = "second-half";
    j["step"] = a.c.step;
    j["n_tokens"] = r->n_input_tokens;
    j["n_windows"] = r->n_windows;
    j["n_scored"] = base.n_scored;
    j["seconds"] = sw.Seconds();
    nlohmann::json rows = nlohmann::json::array();
    for (size_t i = 0; i < r->figures.size(); ++i) {
      const auto& f = r->figures[i];
      nlohmann::json row = PolicyJson(i == 0 ? nullptr : &pcs[i - 1]);
      row.update({{"ppl", f.ppl()},
                  {"mean_nll", f.mean_nll()},
                  {"ppl_ratio", f.ppl() / base.ppl()},
                  {"mean_kv_tokens", f.mean_kept()},
                  {"peak_kv_tokens", f.peak_kept},
                  {"seconds", f.seconds}});
      rows.push_back(row);
    }
    j["results"] = rows;
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  std::printf("model %s, %s KV, %d threads; %s: %zu bytes, %lld tokens\n", l.path.c_str(),
              a.c.kv_type.c_str(), l.engine->pool().size(), a.text.c_str(), text.size(),
              static_cast<long long>(r->n_input_tokens));
  std::printf(
      "%d windows of %d tokens, second half scored in steps of %d; the first half's KV is "
      "compacted to the budget (a fraction of %d tokens) and kept there\n",
      r->n_windows, r->ctx, a.c.step, r->ctx / 2);
  std::printf("%-18s %10s %9s %10s %10s %8s\n", "kv policy", "ppl", "vs full", "mean kv",
              "peak kv", "s");
  for (const auto& f : r->figures) {
    std::printf("%-18s %10.4f %+8.2f%% %10.1f %10lld %8.1f\n", f.label.c_str(), f.ppl(),
                100.0 * (f.ppl() / base.ppl() - 1), f.mean_kept(),
                static_cast<long long>(f.peak_kept), f.seconds);
  }
  std::printf("total %.1f s\n", sw.Seconds());
  return 0;
}

int EvalPpl(const PplArgs& a) {
  auto pcs = PolicyConfigs(a.c);
  if (!pcs.ok()) return Fail(pcs.status());
  auto l = Load(a.c);
  if (!l.ok()) return Fail(l.status());
  auto text = ReadFile(a.text, a.bytes);
  if (!text.ok()) return Fail(text.status());
  const Tokenizer& tok = l->model->tokenizer();
  const std::vector<TokenId> tokens = tok.Encode(*text, tok.add_bos(), false);
  if (!pcs->empty()) return EvalPolicyPpl(a, *l, *text, tokens, *pcs);
  eval::PerplexityOptions o;
  o.ctx = a.ctx;
  o.score_step = a.score_step;
  o.codecs = a.c.codecs;
  o.chunk_tokens = a.c.chunk_tokens;
  o.bos = tok.add_bos() ? tok.bos() : -1;
  o.progress = ProgressPrinter(a.c, "windows");
  Stopwatch sw;
  auto r = eval::EvalPerplexity(*l->engine, tokens, o);
  if (!r.ok()) return Fail(r.status());
  const double seconds = sw.Seconds();
  const eval::PerplexityFigure& base = r->figures[0];
  if (a.c.json) {
    nlohmann::json j = Header(*l, a.c);
    j["eval"] = "ppl";
    j["text"] = a.text;
    j["text_bytes"] = text->size();
    j["ctx"] = r->ctx;
    j["score_step"] = a.score_step;
    j["scoring"] = "second-half";  // llama.cpp perplexity: positions [ctx/2, ctx-1) of a window
    j["n_tokens"] = r->n_input_tokens;
    j["n_windows"] = r->n_windows;
    j["n_scored"] = base.n_scored;
    j["seconds"] = seconds;
    j["prefill_seconds"] = r->prefill_seconds;
    nlohmann::json rows = nlohmann::json::array();
    for (const auto& f : r->figures) {
      nlohmann::json row = {{"codec", f.codec.empty() ? "none" : f.codec},
                            {"baseline", f.codec.empty()},
                            {"ppl", f.ppl()},
                            {"mean_nll", f.mean_nll()},
                            {"delta_ppl", f.ppl() - base.ppl()},
                            {"ppl_ratio", f.ppl() / base.ppl()},
                            {"bytes_per_token", f.bytes_per_token},
                            {"bytes_ratio", f.bytes_per_token / base.bytes_per_token},
                            {"seconds", f.seconds}};
      if (!f.codec.empty()) {
        row["encode_seconds"] = f.roundtrip.encode_seconds;
        row["decode_seconds"] = f.roundtrip.decode_seconds;
      }
      rows.push_back(row);
    }
    j["results"] = rows;
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  std::printf("model %s, %s KV, %d threads; %s: %zu bytes, %lld tokens\n", l->path.c_str(),
              a.c.kv_type.c_str(), l->engine->pool().size(), a.text.c_str(), text->size(),
              static_cast<long long>(r->n_input_tokens));
  std::printf(
      "%d windows of %d tokens, second half of each scored (as llama.cpp perplexity): "
      "%lld tokens; prefix KV through the codec in chunks of %d\n",
      r->n_windows, r->ctx, static_cast<long long>(base.n_scored), a.c.chunk_tokens);
  std::printf("%-10s %12s %7s %10s %9s %8s\n", "kv codec", "bytes/token", "of raw", "ppl", "delta",
              "s");
  for (const auto& f : r->figures) {
    std::printf("%-10s %12.1f %6.1f%% %10.4f %+9.4f %8.1f\n",
                f.codec.empty() ? "none" : f.codec.c_str(), f.bytes_per_token,
                100.0 * f.bytes_per_token / base.bytes_per_token, f.ppl(), f.ppl() - base.ppl(),
                f.seconds);
  }
  std::printf("total %.1f s\n", seconds);
  return 0;
}

int EvalPolicyRetrieval(const RetrievalArgs& a, const LoadedEngine& l,
                        const std::vector<eval::QaItem>& items, const std::string& source,
                        const std::vector<KvPolicyConfig>& pcs) {
  eval::PolicyRetrievalOptions o;
  o.policies = pcs;
  o.progress = ProgressPrinter(a.c, "questions");
  auto res = eval::EvalPolicyRetrieval(*l.engine, items, o);
  if (!res.ok()) return Fail(res.status());
  const eval::RetrievalResult& r = res->r;
  const auto by = r.ByKind();
  const int n_all = by.at("all").n;
  if (a.c.json) {
    nlohmann::json j = Header(l, a.c);
    j["eval"] = "retrieval";
    j["source"] = source;
    j["n_items"] = items.size();
    j["n_scored"] = n_all;
    j["n_skipped"] = r.n_skipped();
    j["seconds"] = r.seconds;
    nlohmann::json rows = nlohmann::json::array();
    for (size_t i = 0; i < r.configs.size(); ++i) {
      nlohmann::json kinds = nlohmann::json::object();
      for (const auto& [kind, s] : by) {
        kinds[kind] = {{"n", s.n},
                       {"correct", s.correct[i]},
                       {"accuracy", s.n ? static_cast<double>(s.correct[i]) / s.n : 0.0}};
      }
      nlohmann::json row = PolicyJson(i == 0 ? nullptr : &pcs[i - 1]);
      row.update({{"correct", by.at("all").correct[i]},
                  {"accuracy", n_all ? static_cast<double>(by.at("all").correct[i]) / n_all : 0.0},
                  {"mean_kv_tokens", n_all ? res->kept_sum[i] / n_all : 0.0},
                  {"peak_kv_tokens", res->peak_kept[i]},
                  {"kinds", kinds}});
      rows.push_back(row);
    }
    j["results"] = rows;
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  std::printf("model %s, %s KV, %d threads; %s: %zu questions (%d skipped: too long)\n",
              l.path.c_str(), a.c.kv_type.c_str(), l.engine->pool().size(), source.c_str(),
              items.size(), r.n_skipped());
  std::printf("greedy answers, exact match; the prompt's KV compacted to the budget (a fraction "
              "of the prompt) before decoding\n");
  std::printf("%-18s %9s", "kv policy", "mean kv");
  for (const auto& [kind, s] : by) std::printf(" %14s", kind.c_str());
  std::printf("\n");
  for (size_t i = 0; i < r.configs.size(); ++i) {
    std::printf("%-18s %9.1f", r.configs[i].c_str(), n_all ? res->kept_sum[i] / n_all : 0.0);
    for (const auto& [kind, s] : by) {
      char cell[32];
      std::snprintf(cell, sizeof(cell), "%d/%d %.1f%%", s.correct[i], s.n,
                    s.n ? 100.0 * s.correct[i] / s.n : 0.0);
      std::printf(" %14s", cell);
    }
    std::printf("\n");
  }
  std::printf("%.1f s\n", r.seconds);
  return 0;
}

int EvalStream(const StreamArgs& a) {
  KvPolicyConfig pc;
  pc.name = a.policy;
  pc.budget = a.cache;
  if (Status s = ValidateKvPolicy(pc); !s.ok()) return Fail(s);
  auto l = Load(a.c);
  if (!l.ok()) return Fail(l.status());
  auto text = ReadFile(a.text, 0);
  if (!text.ok()) return Fail(text.status());
  const Tokenizer& tok = l->model->tokenizer();
  std::vector<TokenId> tokens = tok.Encode(*text, tok.add_bos(), false);
  if (a.tokens > 0 && static_cast<int64_t>(tokens.size()) > a.tokens) tokens.resize(a.tokens);
  eval::StreamingOptions o;
  o.policy = pc;
  o.cache = a.cache;
  o.step = a.c.step;
  o.report = a.report;
  auto r = eval::EvalStreaming(*l->engine, tokens, o);
  if (!r.ok()) return Fail(r.status());
  const double total_ppl = std::exp(r->nll_sum / static_cast<double>(std::max<int64_t>(1, r->n_scored)));
  if (a.c.json) {
    nlohmann::json j = Header(*l, a.c);
    j["eval"] = "stream";
    j["text"] = a.text;
    j["kv_policy"] = a.policy;
    j["cache"] = a.cache;
    j["step"] = a.c.step;
    j["n_scored"] = r->n_scored;
    j["ppl"] = total_ppl;
    j["max_kv_tokens"] = r->max_kept;
    j["seconds"] = r->seconds;
    nlohmann::json w = nlohmann::json::array();
    for (const auto& x : r->windows) {
      w.push_back({{"first_token", x.first_token},
                   {"n_scored", x.n_scored},
                   {"ppl", x.ppl()},
                   {"full_restart_ppl", x.full_ppl()},
                   {"peak_rss_bytes", x.peak_rss_bytes}});
    }
    j["windows"] = w;
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  std::printf("model %s, %s KV; %s: %lld tokens scored with %s, cache of %d tokens (steps of %d)\n",
              l->path.c_str(), a.c.kv_type.c_str(), a.text.c_str(),
              static_cast<long long>(r->n_scored), a.policy.c_str(), a.cache, a.c.step);
  std::printf("%12s %10s %10s %12s %14s\n", "from token", "scored", "ppl", "full restart",
              "peak RSS MiB");
  for (const auto& x : r->windows) {
    std::printf("%12lld %10lld %10.4f %12.4f %14.1f\n", static_cast<long long>(x.first_token),
                static_cast<long long>(x.n_scored), x.ppl(), x.full_ppl(),
                x.peak_rss_bytes / 1048576.0);
  }
  std::printf("full restart: the same windows with full KV, the context starting afresh at "
              "each window\n");
  std::printf("all: ppl %.4f, at most %lld KV tokens per layer, %.1f s\n", total_ppl,
              static_cast<long long>(r->max_kept), r->seconds);
  return 0;
}

// The --details rows of eval retrieval and eval rag, one per question: its kind, prompt length
// and expected answer, and unless skipped each configuration's answer and whether it was right.
// more(outcome, row) adds a command's own fields.
template <typename Outcome, typename Item, typename More>
nlohmann::json DetailsJson(const std::vector<Outcome>& outcomes, const std::vector<Item>& items,
                           const More& more) {
  nlohmann::json details = nlohmann::json::array();
  for (const Outcome& oc : outcomes) {
    nlohmann::json d = {{"index", oc.index},
                        {"kind", oc.kind},
                        {"prompt_tokens", oc.prompt_tokens},
                        {"expected", eval::AnswerLine(items[oc.index].answer)},
                        {"skipped", oc.skipped}};
    if (!oc.skipped) {
      d["answers"] = oc.answers;
      d["correct"] = oc.correct;
    }
    more(oc, d);
    details.push_back(d);
  }
  return details;
}

int EvalRetrieval(const RetrievalArgs& a) {
  auto pcs = PolicyConfigs(a.c);
  if (!pcs.ok()) return Fail(pcs.status());
  auto l = Load(a.c);
  if (!l.ok()) return Fail(l.status());
  std::vector<eval::QaItem> items;
  std::string source;
  if (a.synthetic_seed >= 0) {
    eval::SyntheticOptions so;
    so.seed = static_cast<uint64_t>(a.synthetic_seed);
    so.n = a.n > 0 ? a.n : 24;
    if (!a.kinds.empty()) so.kinds = a.kinds;
    so.approx_chars = a.synthetic_chars;
    std::string filler;
    if (std::find(so.kinds.begin(), so.kinds.end(), "needle") != so.kinds.end()) {
      auto f = ReadFile(a.filler.empty() ? SharedPath("/eval/heldout-text.txt") : a.filler, 0);
      if (!f.ok()) return Fail(f.status().WithContext("--filler"));
      filler = std::move(*f);
    }
    so.filler = filler;
    auto gen = eval::GenerateSyntheticTasks(so);
    if (!gen.ok()) return Fail(gen.status());
    items = std::move(*gen);
    source = "synthetic seed " + std::to_string(a.synthetic_seed);
  } else {
    source = a.data.empty() ? SharedPath("/eval/longctx-qa.jsonl") : a.data;
    auto text = ReadFile(source, 0);
    if (!text.ok()) return Fail(text.status());
    auto parsed = eval::ParseQaJsonl(*text, source);
    if (!parsed.ok()) return Fail(parsed.status());
    for (auto& it : *parsed) {
      if (!a.kinds.empty() && std::find(a.kinds.begin(), a.kinds.end(), it.kind) == a.kinds.end()) {
        continue;
      }
      if (a.n > 0 && static_cast<int>(items.size()) >= a.n) break;
      items.push_back(std::move(it));
    }
  }
  if (items.empty()) return Fail(InvalidArgument("no questions selected from " + source));
  if (!pcs->empty()) return EvalPolicyRetrieval(a, *l, items, source, *pcs);
  eval::RetrievalOptions o;
  o.codecs = a.c.codecs;
  o.chunk_tokens = a.c.chunk_tokens;
  o.progress = ProgressPrinter(a.c, "questions");
  auto r = eval::EvalRetrieval(*l->engine, items, o);
  if (!r.ok()) return Fail(r.status());
  const auto by = r->ByKind();
  auto name = [&](size_t i) { return r->configs[i].empty() ? std::string("none") : r->configs[i]; };
  if (a.c.json) {
    nlohmann::json j = Header(*l, a.c);
    j["eval"] = "retrieval";
    j["source"] = source;
    j["n_items"] = items.size();
    j["n_scored"] = by.at("all").n;
    j["n_skipped"] = r->n_skipped();
    j["prefill_tokens"] = r->prefill_tokens;
    j["decode_steps"] = r->decode_steps;
    j["seconds"] = r->seconds;
    nlohmann::json rows = nlohmann::json::array();
    for (size_t i = 0; i < r->configs.size(); ++i) {
      nlohmann::json kinds = nlohmann::json::object();
      for (const auto& [kind, s] : by) {
        kinds[kind] = {{"n", s.n},
                       {"correct", s.correct[i]},
                       {"accuracy", s.n ? static_cast<double>(s.correct[i]) / s.n : 0.0}};
      }
      const auto& all = by.at("all");
      rows.push_back({{"codec", name(i)},
                      {"baseline", i == 0},
                      {"bytes_per_token", r->bytes_per_token[i]},
                      {"bytes_ratio", r->bytes_per_token[i] / r->bytes_per_token[0]},
                      {"correct", all.correct[i]},
                      {"accuracy", all.n ? static_cast<double>(all.correct[i]) / all.n : 0.0},
                      {"kinds", kinds}});
    }
    j["results"] = rows;
    if (a.details) {
      j["items"] = DetailsJson(r->outcomes, items, [](const eval::QaOutcome&, nlohmann::json&) {});
    }
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  std::printf("model %s, %s KV, %d threads; %s: %zu questions (%d skipped: too long)\n",
              l->path.c_str(), a.c.kv_type.c_str(), l->engine->pool().size(), source.c_str(),
              items.size(), r->n_skipped());
  std::printf(
      "greedy answers, exact match up to the end of the line; prompt KV (all but the "
      "last token) through the codec in chunks of %d\n",
      a.c.chunk_tokens);
  std::printf("%-10s %12s", "kv codec", "bytes/token");
  for (const auto& [kind, s] : by) std::printf(" %14s", kind.c_str());
  std::printf("\n");
  for (size_t i = 0; i < r->configs.size(); ++i) {
    std::printf("%-10s %12.1f", name(i).c_str(), r->bytes_per_token[i]);
    for (const auto& [kind, s] : by) {
      char cell[32];
      std::snprintf(cell, sizeof(cell), "%d/%d %.1f%%", s.correct[i], s.n,
                    s.n ? 100.0 * s.correct[i] / s.n : 0.0);
      std::printf(" %14s", cell);
    }
    std::printf("\n");
  }
  std::printf("prefilled %lld tokens (after prefix reuse), %lld decode steps, %.1f s\n",
              static_cast<long long>(r->prefill_tokens), static_cast<long long>(r->decode_steps),
              r->seconds);
  return 0;
}

int EvalRag(const RagArgs& a) {
  std::vector<eval::RagConfig> configs;
  for (const std::string& m : a.modes) {
    auto mode = ParseReuseMode(m);
    if (!mode.ok()) return Fail(mode.status().WithContext("--mode"));
    if (*mode != ReuseMode::kBlend && *mode != ReuseMode::kCacheCraft) {
      configs.push_back({*mode, 0});
      continue;
    }
    const bool blend = *mode == ReuseMode::kBlend;
    std::vector<CraftChoice> choices = {ReuseOptions{}.craft_choice};
    if (!blend) {
      choices.clear();
      for (const std::string& name : a.craft_choices) {
        auto choice = ParseCraftChoice(name);
        if (!choice.ok()) return Fail(choice.status().WithContext("--craft-choice"));
        choices.push_back(*choice);
      }
    }
    for (CraftChoice choice : choices) {
      for (double r : blend ? a.ratios : a.alphas) {
        if (!(r >= 0 && r <= 1)) {
          return Fail(InvalidArgument(std::string(blend ? "--ratio " : "--alpha ") +
                                      std::to_string(r) + " is outside [0, 1]"));
        }
        configs.push_back({*mode, r, choice});
      }
    }
  }
  if (configs.empty()) return Fail(InvalidArgument("--mode: no mode given"));
  const std::string source = a.data.empty() ? SharedPath("/eval/multidoc-qa.jsonl") : a.data;
  auto text = ReadFile(source, 0);
  if (!text.ok()) return Fail(text.status());
  auto parsed = eval::ParseRagJsonl(*text, source);
  if (!parsed.ok()) return Fail(parsed.status());
  std::vector<eval::RagItem> items;
  for (auto& it : *parsed) {
    if (!a.kinds.empty() && std::find(a.kinds.begin(), a.kinds.end(), it.kind) == a.kinds.end()) {
      continue;
    }
    if (a.n > 0 && static_cast<int>(items.size()) >= a.n) break;
    items.push_back(std::move(it));
  }
  if (items.empty()) return Fail(InvalidArgument("no questions selected from " + source));
  auto l = Load(a.c);
  if (!l.ok()) return Fail(l.status());
  eval::RagOptions o;
  o.configs = configs;
  o.ape.temperature = a.ape_t;
  o.ape.scale = a.ape_s;
  o.progress = ProgressPrinter(a.c, "questions");
  auto r = eval::EvalRag(*l->engine, items, o);
  if (!r.ok()) return Fail(r.status());
  const auto scores = r->Scores();
  const auto ttft = r->MedianTtft();
  const auto totals = r->Totals();
  const auto agree = r->AgreementWithFull();
  const auto kl = r->MeanKlVsFull();
  // The TTFT baseline is full prefill when it was measured.
  double full_ttft = 0;
  for (size_t i = 0; i < configs.size(); ++i) {
    if (configs[i].mode == ReuseMode::kFull) full_ttft = ttft[i];
  }
  auto share = [](int64_t part, int64_t whole) {
    return whole > 0 ? static_cast<double>(part) / whole : 0.0;
  };
  if (a.c.json) {
    nlohmann::json j = Header(*l, a.c);
    j.erase("chunk_tokens");
    j["eval"] = "rag";
    j["source"] = source;
    j["n_items"] = items.size();
    j["n_scored"] = scores.count("all") ? scores.at("all").n : 0;
    j["n_skipped"] = r->n_skipped();
    j["seconds"] = r->seconds;
    j["ape"] = {{"temperature", a.ape_t}, {"scale", a.ape_s}};
    nlohmann::json rows = nlohmann::json::array();
    for (size_t i = 0; i < configs.size(); ++i) {
      nlohmann::json groups = nlohmann::json::object();
      for (const auto& [group, s] : scores) {
        groups[group] = {{"n", s.n},
                         {"correct", s.correct[i]},
                         {"accuracy", s.n ? static_cast<double>(s.correct[i]) / s.n : 0.0}};
      }
      const ReuseReport& t = totals[i];
      rows.push_back(
          {{"config", r->configs[i]},
           {"mode", std::string(ReuseModeName(configs[i].mode))},
           {"ratio", configs[i].mode == ReuseMode::kBlend ? nlohmann::json(configs[i].ratio)
                                                           : nlohmann::json(nullptr)},
           {"alpha", configs[i].mode == ReuseMode::kCacheCraft
                         ? nlohmann::json(configs[i].ratio)
                         : nlohmann::json(nullptr)},
           {"craft_choice", configs[i].mode == ReuseMode::kCacheCraft
                                ? nlohmann::json(CraftChoiceName(configs[i].craft))
                                : nlohmann::json(nullptr)},
           {"baseline", configs[i].mode == ReuseMode::kFull},
           {"accuracy", groups.contains("all") ? groups["all"]["accuracy"] : nlohmann::json(0)},
           {"groups", groups},
           {"ttft_median_s", ttft[i]},
           {"ttft_ratio", full_ttft > 0 ? nlohmann::json(ttft[i] / full_ttft) : nlohmann::json()},
           {"prefix_tokens", t.prefix_tokens},
           {"reused_tokens", t.reused_tokens},
           {"recomputed_tokens", t.recomputed_tokens},
           {"computed_tokens", t.computed_tokens},
           {"recomputed_share", share(t.recomputed_tokens, t.reused_tokens)},
           {"agreement_with_full", agree.empty() ? nlohmann::json() : nlohmann::json(agree[i])},
           {"first_token_kl_vs_full", kl.empty() ? nlohmann::json() : nlohmann::json(kl[i])}});
    }
    j["results"] = rows;
    if (a.details) {
      auto rag_fields = [](const eval::RagOutcome& oc, nlohmann::json& d) {
        d["hops"] = oc.hops;
        if (!oc.skipped) d["ttft_s"] = oc.ttft_s;
        if (!oc.kl_vs_full.empty()) d["kl_vs_full"] = oc.kl_vs_full;
      };
      j["items"] = DetailsJson(r->outcomes, items, rag_fields);
    }
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  std::printf("model %s, %s KV, %d threads; %s: %zu questions (%d skipped: too long)\n",
              l->path.c_str(), a.c.kv_type.c_str(), l->engine->pool().size(), source.c_str(),
              items.size(), r->n_skipped());
  std::printf(
      "every document computed on its own after BOS first; greedy answers, exact match; TTFT "
      "median from the cached documents to the first token; =full: answers equal to full "
      "prefill's; KL: mean KL(full || mode) of the first answer token, nats\n");
  std::printf("%-15s", "mode");
  for (const auto& [group, s] : scores) std::printf(" %15s", group.c_str());
  std::printf(" %10s %8s %11s %9s %8s\n", "TTFT ms", "vs full", "recomputed", "=full", "KL");
  for (size_t i = 0; i < configs.size(); ++i) {
    std::printf("%-15s", r->configs[i].c_str());
    for (const auto& [group, s] : scores) {
      char cell[32];
      std::snprintf(cell, sizeof(cell), "%d/%d %.1f%%", s.correct[i], s.n,
                    s.n ? 100.0 * s.correct[i] / s.n : 0.0);
      std::printf(" %15s", cell);
    }
    char vs[16] = "-";
    if (full_ttft > 0) std::snprintf(vs, sizeof vs, "%.2fx", ttft[i] / full_ttft);
    std::printf(" %10.2f %8s %10.1f%%", ttft[i] * 1e3, vs,
                100 * share(totals[i].recomputed_tokens, totals[i].reused_tokens));
    if (agree.empty()) {
      std::printf(" %9s %8s\n", "-", "-");
    } else {
      std::printf(" %8.1f%% %8.4f\n", 100 * agree[i], kl[i]);
    }
  }
  // Prompt tokens (the same in every mode) and the most any mode served as exact prefix.
  int64_t prompt_tokens = 0, prefix_tokens = 0;
  for (const ReuseReport& t : totals) {
    prompt_tokens = t.prefix_tokens + t.reused_tokens + t.computed_tokens;
    prefix_tokens = std::max(prefix_tokens, t.prefix_tokens);
  }
  std::printf("(recomputed: share of the reused document tokens; %lld prompt tokens in all, "
              "up to %lld of them an exact prefix: BOS and first documents in place)\n%.1f s\n",
              static_cast<long long>(prompt_tokens), static_cast<long long>(prefix_tokens),
              r->seconds);
  return 0;
}

void AddCommon(CLI::App* c, CommonArgs& a) {
  c->add_option("-m,--model", a.model, "GGUF model (default: the bundled cachette-tiny)");
  c->add_option("--threads", a.threads, "Compute threads (0 = one per core)");
  c->add_option("--kv-type", a.kv_type,
                "KV element type: f32, f16, q8_0, q4_0, q4_1, kivi4 (lossy codecs: f32, f16)");
  c->add_option("--kv-recent", a.kv_recent, kKvRecentHelp);
  c->add_option("--kv-codec", a.codecs,
                "Codecs to pass the KV through, comma-separated: raw, int8, int4, int4-g64, "
                "cachegen-high, cachegen, cachegen-low, zstd+X (the exact-KV baseline always "
                "runs beside them)")
      ->delimiter(',');
  c->add_option("--chunk-tokens", a.chunk_tokens, "Store chunk size the KV is cut into")
      ->check(CLI::Range(1, 1 << 16));
  c->add_option("--kv-policy", a.kv_policies,
                "KV budget policies to measure against full KV, comma-separated: streamingllm, "
                "h2o, snapkv, pyramidkv, cake, lacache, elastic, blockwise")
      ->delimiter(',');
  c->add_option("--budget", a.budgets,
                "With --kv-policy: budgets, comma-separated; below 1 a fraction of the prompt, "
                "1 or more tokens (default 0.05,0.1,0.2,0.5)")
      ->delimiter(',');
  c->add_option("--step", a.step, "With --kv-policy: tokens scored per step (compaction slack)")
      ->check(CLI::Range(1, 1 << 16));
  c->add_flag("--json", a.json, "Print one JSON object");
  c->add_flag("-q,--quiet", a.quiet, "No progress on stderr");
}

}  // namespace

Runner AddEvalCommand(CLI::App& app) {
  CLI::App* c = app.add_subcommand("eval", "Quality: perplexity and retrieval, KV through codecs");
  c->require_subcommand(1);
  auto pa = std::make_shared<PplArgs>();
  CLI::App* p = c->add_subcommand(
      "ppl",
      "Perplexity over non-overlapping windows of --ctx tokens, scoring the second half of "
      "each window (as llama.cpp perplexity) with the first half's KV passed through the codec");
  AddCommon(p, pa->c);
  p->add_option("-f,--file", pa->text, "Text file")->required();
  p->add_option("--ctx", pa->ctx, "Window length in tokens")->check(CLI::Range(4, 1 << 20));
  p->add_option("--bytes", pa->bytes, "Use only the first B bytes of the file (0 = all)");
  p->add_option("--score-step", pa->score_step,
                "Scored tokens per forward pass (0 = the second half at once; 1 = as decoding, "
                "each token attending to the KV as stored, e.g. quantized past a --kv-recent "
                "window)")
      ->check(CLI::Range(0, 1 << 20));
  auto ra = std::make_shared<RetrievalArgs>();
  CLI::App* r = c->add_subcommand(
      "retrieval",
      "Long-context QA accuracy (greedy, exact match) with the prompt KV through the codec");
  AddCommon(r, ra->c);
  r->add_option("--data", ra->data,
                "JSONL of {kind, prompt, answer} (default ../shared/eval/longctx-qa.jsonl)");
  r->add_option("--n", ra->n,
                "Questions: the first N of the selected kinds (0 = all; "
                "synthetic: default 24)")
      ->check(CLI::Range(0, 1 << 24));
  r->add_option("--kinds", ra->kinds,
                "Kinds to keep, comma-separated (kv, needle, facts, "
                "recall)")
      ->delimiter(',');
  r->add_option("--synthetic", ra->synthetic_seed,
                "Generate tasks (kv, needle, facts) from this seed instead of --data")
      ->check(CLI::Range(int64_t{0}, INT64_MAX));
  r->add_option("--synthetic-chars", ra->synthetic_chars, "Synthetic prompt length in bytes")
      ->check(CLI::Range(200, 1 << 20));
  r->add_option("--filler", ra->filler,
                "Natural text for needle haystacks (default ../shared/eval/heldout-text.txt)");
  r->add_flag("--details", ra->details, "With --json: every question's answers");
  auto sa = std::make_shared<StreamArgs>();
  sa->c.step = 64;
  CLI::App* st = c->add_subcommand(
      "stream",
      "Perplexity of one long text read past the context with a policy that reassigns "
      "positions (StreamingLLM), the KV never above --cache tokens; per window and peak RSS");
  st->add_option("-m,--model", sa->c.model, "GGUF model (default: the bundled cachette-tiny)");
  st->add_option("--threads", sa->c.threads, "Compute threads (0 = one per core)");
  st->add_option("--kv-type", sa->c.kv_type, "KV element type: f32, f16, q8_0, q4_0, q4_1, kivi4");
  st->add_option("-f,--file", sa->text, "Text file")->required();
  st->add_option("--kv-policy", sa->policy, "streamingllm or lacache");
  st->add_option("--cache", sa->cache, "Most KV tokens per layer")->check(CLI::Range(2, 1 << 24));
  st->add_option("--step", sa->c.step, "Tokens per step")->check(CLI::Range(1, 1 << 16));
  st->add_option("--tokens", sa->tokens, "Score the first N tokens of the file (0 = all)");
  st->add_option("--report", sa->report, "Tokens per reported window")
      ->check(CLI::Range(1, 1 << 24));
  st->add_flag("--json", sa->c.json, "Print one JSON object");
  auto ga = std::make_shared<RagArgs>();
  CLI::App* g = c->add_subcommand(
      "rag",
      "Multi-document QA with every document's KV computed on its own and reused in the "
      "prompt: accuracy, TTFT and recomputed share per reuse mode, full prefill beside them");
  g->add_option("-m,--model", ga->c.model, "GGUF model (default: the bundled cachette-tiny)");
  g->add_option("--threads", ga->c.threads, "Compute threads (0 = one per core)");
  g->add_option("--kv-type", ga->c.kv_type, "KV element type: f32, f16, q8_0, q4_0, q4_1, kivi4");
  g->add_option("--data", ga->data,
                "JSONL of {kind, docs, question, answer, hops} (default "
                "../shared/eval/multidoc-qa.jsonl)");
  g->add_option("--n", ga->n, "Questions: the first N of the selected kinds (0 = all)")
      ->check(CLI::Range(0, 1 << 24));
  g->add_option("--kinds", ga->kinds, "Kinds to keep, comma-separated (facts, kv, needle)")
      ->delimiter(',');
  g->add_option("--mode", ga->modes,
                "Reuse modes, comma-separated: full, prefix, naive, blend, cachecraft, ape "
                "(default all)")
      ->delimiter(',');
  g->add_option("--ratio", ga->ratios, "Blend's recompute ratios, comma-separated (0.15)")
      ->delimiter(',');
  g->add_option("--alpha", ga->alphas,
                "Cache-Craft's alpha (recompute share = alpha x CCI x (1 - overlap)), "
                "comma-separated (0.2)")
      ->delimiter(',');
  g->add_option("--craft-choice", ga->craft_choices,
                "Cache-Craft's choice of tokens: stored (inter-attention stored with the "
                "document) or prompt (attention to its new context, in layer 0 of the prompt), "
                "comma-separated (stored)")
      ->delimiter(',');
  g->add_option("--ape-t", ga->ape_t, "APE's attention temperature T (0.9)")
      ->check(CLI::PositiveNumber);
  g->add_option("--ape-s", ga->ape_s, "APE's scale S (0.9)")->check(CLI::PositiveNumber);
  g->add_flag("--details", ga->details,
              "With --json: every question's answers (and KL from full prefill)");
  g->add_flag("--json", ga->c.json, "Print one JSON object");
  g->add_flag("-q,--quiet", ga->c.quiet, "No progress on stderr");
  return [pa, p, ra, sa, st, ga, g] {
    if (p->parsed()) return EvalPpl(*pa);
    if (st->parsed()) return EvalStream(*sa);
    if (g->parsed()) return EvalRag(*ga);
    return EvalRetrieval(*ra);
  };
}

}  // namespace cachette::cli
