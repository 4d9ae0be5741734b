// `cachette bench kv-pages`: the paged KV memory a KV budget policy holds, beside full KV in
// the same run. A prompt of natural text is read into a paged sequence (kv/kv_manager.h) once
// per configuration: with full KV; then, per policy, read whole and compacted once (the
// scheduler's path), or, for a cascading policy (CAKE), a layer at a time with the layers read
// compacted after each (Engine::ForwardLayerMajor). Reported per configuration: the slots kept
// per layer (average and longest), the pages held once compacted (each layer's blocks packed,
// n_layer to a page), the pages a whole-page layout would need (the longest layer's), and the
// most pages held while reading. Memory only: nothing here is timed.
#include <cstdio>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli/cli.h"
#include "kv/budget_runner.h"
#include "kv/kv_manager.h"
#include "kv/kv_policy.h"

namespace cachette::cli {
namespace {

struct KvPagesArgs {
  std::string model;
  std::string text = std::string(CACHETTE_SHARED_DIR) + "/eval/heldout-text.txt";
  int threads = 0;
  int64_t n_prompt = 1024;
  std::vector<std::string> policies = {"snapkv", "pyramidkv", "cake"};
  double budget = 0.1;
  int page_tokens = 16;
  std::string kv_type = "f16";
  bool json = false;
};

struct PagesFigure {
  std::string label;
  double kept = 0;          // slots per layer, average
  int64_t longest = 0;      // slots of the longest layer
  int64_t pages = 0;        // pages held once compacted
  int64_t whole_pages = 0;  // pages a whole-page layout needs: the longest layer's
  int64_t peak_pages = 0;   // most pages held while reading
};

Result<std::vector<TokenId>> PromptTokens(const Model& model, const KvPagesArgs& a) {
  std::ifstream f(a.text, std::ios::binary);
  if (!f) return IOError("cannot open " + a.text);
  std::ostringstream ss;
  ss << f.rdbuf();
  const Tokenizer& tok = model.tokenizer();
  std::vector<TokenId> t = tok.Encode(ss.str(), tok.add_bos(), false);
  if (static_cast<int64_t>(t.size()) < a.n_prompt) {
    return InvalidArgument(a.text + " holds " + std::to_string(t.size()) +
                           " tokens, fewer than -p " + std::to_string(a.n_prompt));
  }
  t.resize(static_cast<size_t>(a.n_prompt));
  return t;
}

PagesFigure Measure(const std::string& label, const PagedSequence& seq, int n_layer,
                    int64_t page_tokens, int64_t peak) {
  PagesFigure f;
  f.label = label;
  int64_t total = 0;
  for (int l = 0; l < n_layer; ++l) {
    total += seq.layer_tokens(l);
    f.longest = std::max(f.longest, seq.layer_tokens(l));
  }
  f.kept = static_cast<double>(total) / n_layer;
  f.pages = seq.held_pages();
  f.whole_pages = (f.longest + page_tokens - 1) / page_tokens;
  f.peak_pages = std::max(peak, f.pages);
  return f;
}

Result<PagesFigure> RunPolicy(Engine& engine, KvManager& kvm, const Hash128& ns,
                              std::span<const TokenId> prompt, const KvPolicyConfig& config) {
  CT_ASSIGN_OR_RETURN(auto policy, MakeKvPolicy(config));
  const ModelConfig& c = engine.model().config();
  const int64_t n = static_cast<int64_t>(prompt.size());
  const int64_t budget = ResolveBudgetTokens(config, n);
  auto seq = kvm.Start(ns, {}, n + 1);
  AttentionStats stats;
  stats.window = policy->stats_window();
  stats.cumulative = policy->stats_cumulative();
  int64_t peak = 0;
  auto compact = [&](int layers_seen) {
    peak = std::max(peak, seq->held_pages());
    const KeepPlan plan = policy->Select(PolicyInputFor(*seq, budget, &stats, layers_seen));
    return kvm.Compact(*seq, plan, c.rope, &stats);
  };
  if (policy->cascades()) {
    CT_RETURN_IF_ERROR(engine.ForwardLayerMajor(*seq, prompt, nullptr, &stats,
                                                [&](int layer) { return compact(layer + 1); }));
  } else {
    Engine::Item item{seq.get(), prompt, Engine::Logits::kNone, nullptr, &stats};
    CT_RETURN_IF_ERROR(engine.Forward(std::span(&item, 1)));
    CT_RETURN_IF_ERROR(compact(0));
  }
  std::string label = config.name;
  if (config.name == "cake" && !config.cascade) label += " (whole)";
  PagesFigure f = Measure(label, *seq, c.n_layer, kvm.page_tokens(), peak);
  kvm.Finish(*seq, {});
  return f;
}

int BenchKvPages(const KvPagesArgs& a) {
  auto l = LoadEngine(a.model, a.kv_type, a.threads);
  if (!l.ok()) return Fail(l.status());
  Engine& engine = *l->engine;
  const ModelConfig& c = l->model->config();
  auto prompt = PromptTokens(*l->model, a);
  if (!prompt.ok()) return Fail(prompt.status());
  if (a.n_prompt > c.n_ctx_train) {
    return Fail(InvalidArgument("-p " + std::to_string(a.n_prompt) +
                                " is past the model's context of " +
                                std::to_string(c.n_ctx_train)));
  }
  KvManagerOptions ko;
  ko.shape = engine.kv_shape();
  ko.page_tokens = a.page_tokens;
  const int64_t full_pages = (a.n_prompt + a.page_tokens) / a.page_tokens;
  ko.budget_bytes = PagePool::PageBytes(ko.shape, a.page_tokens) * (2 * full_pages + 8);
  if (Status s = KvManager::Validate(ko); !s.ok()) return Fail(s);
  KvManager kvm(ko);
  const Hash128 ns = KvNamespace(*l->model, l->kv_type);

  std::vector<PagesFigure> figures;
  {
    auto seq = kvm.Start(ns, {}, a.n_prompt + 1);
    if (Status s = engine.Forward(*seq, *prompt, nullptr); !s.ok()) return Fail(s);
    figures.push_back(Measure("full", *seq, c.n_layer, a.page_tokens, 0));
    kvm.Finish(*seq, {});
  }
  std::vector<KvPolicyConfig> configs;
  for (const std::string& name : a.policies) {
    KvPolicyConfig pc;
    pc.name = name;
    pc.budget = a.budget;
    if (Status s = ValidateKvPolicy(pc); !s.ok()) return Fail(s);
    configs.push_back(pc);
    if (name == "cake") {
      pc.cascade = false;  // the one-shot read beside the cascade
      configs.push_back(pc);
    }
  }
  for (const KvPolicyConfig& pc : configs) {
    auto f = RunPolicy(engine, kvm, ns, *prompt, pc);
    if (!f.ok()) return Fail(f.status());
    figures.push_back(*f);
  }

  if (a.json) {
    nlohmann::json j;
    j["model"] = l->path;
    j["prompt_tokens"] = a.n_prompt;
    j["page_tokens"] = a.page_tokens;
    j["budget"] = a.budget;
    j["kv_type"] = kernels::KvTypeName(l->kv_type);
    for (const PagesFigure& f : figures) {
      j["configs"].push_back({{"label", f.label},
                              {"kept_per_layer", f.kept},
                              {"longest_layer", f.longest},
                              {"pages", f.pages},
                              {"whole_page_layout_pages", f.whole_pages},
                              {"peak_pages", f.peak_pages}});
    }
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  std::printf("kv pages: %s, %lld tokens of %s, %s KV, pages of %d tokens, budget %g\n",
              l->path.c_str(), static_cast<long long>(a.n_prompt), a.text.c_str(),
              std::string(kernels::KvTypeName(l->kv_type)).c_str(), a.page_tokens, a.budget);
  std::printf("%-14s %12s %8s %7s %12s %10s %11s\n", "config", "kept/layer", "longest",
              "pages", "whole-page", "peak", "vs full");
  const double full = static_cast<double>(figures[0].pages);
  for (const PagesFigure& f : figures) {
    std::printf("%-14s %12.1f %8lld %7lld %12lld %10lld %10.1f%%\n", f.label.c_str(), f.kept,
                static_cast<long long>(f.longest), static_cast<long long>(f.pages),
                static_cast<long long>(f.whole_pages), static_cast<long long>(f.peak_pages),
                100.0 * static_cast<double>(f.pages) / full);
  }
  return 0;
}

}  // namespace

Runner AddBenchKvPagesSubcommand(CLI::App* bench) {
  auto a = std::make_shared<KvPagesArgs>();
  CLI::App* k = bench->add_subcommand(
      "kv-pages", "Paged KV memory held under KV budget policies, beside full KV");
  k->add_option("-m,--model", a->model, "GGUF model (default: the bundled cachette-tiny)");
  k->add_option("--text", a->text, "Prompt text (default ../shared/eval/heldout-text.txt)");
  k->add_option("--threads", a->threads, "Compute threads (0 = one per core)");
  k->add_option("-p", a->n_prompt, "Prompt tokens")->check(CLI::Range(1, 1 << 20));
  k->add_option("--kv-policy", a->policies, "Policies, comma-separated")->delimiter(',');
  k->add_option("--kv-policy-budget", a->budget,
                "Budget: below 1 a fraction of the prompt, 1 or more tokens (default 0.1)");
  k->add_option("--page-tokens", a->page_tokens, "Tokens per page")->check(CLI::Range(1, 4096));
  k->add_option("--kv-type", a->kv_type, "KV element type: f32, f16, q8_0, q4_0, q4_1");
  k->add_flag("--json", a->json, "Print one JSON object");
  return [a, k] { return k->parsed() ? BenchKvPages(*a) : -1; };
}

}  // namespace cachette::cli
