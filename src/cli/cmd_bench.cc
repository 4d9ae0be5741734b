// `cachette bench engine`: prefill and decode throughput of the forward pass, with decode's
// achieved weight-read bandwidth beside the machine's measured memory read bandwidth.
#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "cli/cli.h"
#include "core/timer.h"
#include "engine/engine.h"
#include "engine/sampler.h"
#include "core/units.h"
#include "kv/kv_manager.h"

namespace cachette::cli {

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

std::vector<TokenId> PseudoRandomTokens(int n, int vocab, uint64_t seed) {
  std::vector<TokenId> t(n);
  uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
  for (auto& v : t) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    v = static_cast<TokenId>((x >> 33) % static_cast<uint64_t>(std::max(1, vocab - 1)));
  }
  return t;
}

namespace {

struct BenchArgs {
  std::string model;
  int threads = 0;
  int n_prompt = 512;
  int n_gen = 128;
  int reps = 3;
  std::string kv_type = "f16";
  bool json = false;
};

int BenchEngine(const BenchArgs& a) {
  auto loaded = LoadEngine(a.model, a.kv_type, a.threads);
  if (!loaded.ok()) return Fail(loaded.status());
  const std::string& path = loaded->path;
  const Model& model = *loaded->model;
  Engine& engine = *loaded->engine;
  const ModelConfig& c = model.config();
  if (a.n_prompt + a.n_gen > c.n_ctx_train) {
    return Fail(InvalidArgument("-p + -n exceed the model's context of " +
                                std::to_string(c.n_ctx_train)));
  }

  // A fixed pseudo-random prompt (the same every run).
  const std::vector<TokenId> prompt = PseudoRandomTokens(a.n_prompt, c.n_vocab, 12345);
  std::vector<float> logits(c.n_vocab);
  std::vector<double> prefill_tps, decode_tps;
  // One untimed warm-up pass pages the weights in and sizes the scratch buffers.
  for (int rep = -1; rep < a.reps; ++rep) {
    auto kv = engine.NewSequence(a.n_prompt + a.n_gen + 1);
    Stopwatch sw;
    Status s = engine.Forward(*kv, prompt, logits.data());
    if (!s.ok()) return Fail(s);
    const double tp = sw.Seconds();
    sw.Reset();
    for (int i = 0; i < a.n_gen; ++i) {
      const TokenId next[1] = {Sampler::Argmax(logits)};
      s = engine.Forward(*kv, next, logits.data());
      if (!s.ok()) return Fail(s);
    }
    const double td = sw.Seconds();
    if (rep < 0) continue;
    prefill_tps.push_back(a.n_prompt / tp);
    if (a.n_gen > 0) decode_tps.push_back(a.n_gen / td);
  }
  const double p_tps = Median(prefill_tps);
  const double d_tps = decode_tps.empty() ? 0 : Median(decode_tps);
  const double d_gbs = d_tps * static_cast<double>(model.weight_bytes_per_token()) / 1e9;
  const double mem_gbs = MeasureMemoryReadBandwidth(size_t{1} << 30, engine.pool().size()) / 1e9;
  const std::string isa(kernels::IsaName(kernels::ActiveIsa()));
  if (a.json) {
    nlohmann::json j = {{"model", path},
                        {"weight_type", std::string(kernels::WTypeName(c.weight_type))},
                        {"kv_type", a.kv_type},
                        {"threads", engine.pool().size()},
                        {"isa", isa},
                        {"n_prompt", a.n_prompt},
                        {"n_gen", a.n_gen},
                        {"reps", a.reps},
                        {"prefill_tok_s", p_tps},
                        {"decode_tok_s", d_tps},
                        {"decode_gb_s", d_gbs},
                        {"mem_read_gb_s", mem_gbs},
                        {"weight_bytes_per_token", model.weight_bytes_per_token()}};
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf("model %s (%s weights, %s KV), %d threads, isa %s, median of %d\n", path.c_str(),
                std::string(kernels::WTypeName(c.weight_type)).c_str(), a.kv_type.c_str(),
                engine.pool().size(), isa.c_str(), a.reps);
    std::printf("prefill %5d tokens: %8.1f tok/s\n", a.n_prompt, p_tps);
    std::printf("decode  %5d tokens: %8.1f tok/s  weights %.2f GB/s = %.0f%% of measured memory "
                "read bandwidth %.2f GB/s\n",
                a.n_gen, d_tps, d_gbs, 100.0 * d_gbs / mem_gbs, mem_gbs);
  }
  return 0;
}

struct PrefixArgs {
  std::string model;
  int threads = 0;
  int n_prompt = 2048;
  int n_gen = 32;
  int reps = 3;
  std::vector<int> batches = {1, 4, 8, 16};
  std::string kv_type = "f16";
  std::string kv_budget = "2GiB";
  int page_tokens = 16;
  bool json = false;
};

// Time to first token for a long prompt, cold vs fully cached in the paged prefix cache, and
// batched decode throughput with 1..N concurrent sequences over the paged KV.
int BenchPrefix(const PrefixArgs& a) {
  auto loaded = LoadEngine(a.model, a.kv_type, a.threads);
  if (!loaded.ok()) return Fail(loaded.status());
  const std::string& path = loaded->path;
  const Model& model = *loaded->model;
  Engine& engine = *loaded->engine;
  const kernels::KvType kv_type = loaded->kv_type;
  auto budget = ParseBytes(a.kv_budget);
  if (!budget.ok()) return Fail(budget.status().WithContext("--kv-budget"));
  const ModelConfig& c = model.config();
  if (a.n_prompt + a.n_gen > c.n_ctx_train) {
    return Fail(InvalidArgument("-p + --gen exceed the model's context of " +
                                std::to_string(c.n_ctx_train)));
  }
  KvManagerOptions ko;
  ko.shape = engine.kv_shape();
  ko.page_tokens = a.page_tokens;
  ko.budget_bytes = *budget;
  Status valid = KvManager::Validate(ko);
  if (!valid.ok()) return Fail(valid);
  KvManager kvm(ko);
  const Hash128 ns = KvNamespace(model, kv_type);
  std::vector<float> logits(c.n_vocab);

  // 1. TTFT: a cold prefill of the whole prompt, then the same prompt fully cached (only the
  // last token is recomputed for its logits).
  std::vector<double> cold_s, warm_s;
  for (int rep = 0; rep < a.reps; ++rep) {
    const auto prompt = PseudoRandomTokens(a.n_prompt, c.n_vocab, 1000 + rep);
    Stopwatch sw;
    auto seq = kvm.Start(ns, prompt, a.n_prompt + 1);
    if (seq->cached_tokens() != 0) return Fail(InvalidArgument("unexpected cache hit"));
    Status s = engine.Forward(*seq, prompt, logits.data());
    if (!s.ok()) return Fail(s);
    cold_s.push_back(sw.Seconds());
    kvm.Finish(*seq, prompt);
    sw.Reset();
    auto warm = kvm.Start(ns, prompt, a.n_prompt + 1);
    if (warm->cached_tokens() != a.n_prompt) {
      return Fail(ResourceExhausted("the prompt did not stay cached: raise --kv-budget"));
    }
    warm->SetTokens(a.n_prompt - 1);
    s = engine.Forward(*warm, std::span(prompt).last(1), logits.data());
    if (!s.ok()) return Fail(s);
    warm_s.push_back(sw.Seconds());
    kvm.Finish(*warm, prompt);
  }
  const double cold = Median(cold_s), warm = Median(warm_s);

  // 2. Batched decode: B sequences with distinct 64-token prompts decode n_gen steps together.
  struct BatchFigure {
    int batch;
    double tok_s;
  };
  std::vector<BatchFigure> figures;
  for (int b : a.batches) {
    std::vector<double> rates;
    for (int rep = 0; rep < a.reps; ++rep) {
      std::vector<std::unique_ptr<PagedSequence>> seqs;
      std::vector<std::vector<float>> out(b, std::vector<float>(c.n_vocab));
      std::vector<std::vector<TokenId>> next(b, std::vector<TokenId>(1));
      std::vector<Engine::Item> items;
      std::vector<std::vector<TokenId>> prompts;
      for (int i = 0; i < b; ++i) {
        prompts.push_back(PseudoRandomTokens(64, c.n_vocab, 50000 + 1000 * rep + i));
        seqs.push_back(kvm.Start(ns, prompts.back(), 64 + a.n_gen + 1));
      }
      for (int i = 0; i < b; ++i) {
        items.push_back({seqs[i].get(), prompts[i], Engine::Logits::kLast, out[i].data()});
      }
      Status s = engine.Forward(items);
      if (!s.ok()) return Fail(s);
      Stopwatch sw;
      for (int step = 0; step < a.n_gen; ++step) {
        items.clear();
        for (int i = 0; i < b; ++i) {
          next[i][0] = Sampler::Argmax(out[i]);
          items.push_back({seqs[i].get(), next[i], Engine::Logits::kLast, out[i].data()});
        }
        s = engine.Forward(items);
        if (!s.ok()) return Fail(s);
      }
      rates.push_back(static_cast<double>(b) * a.n_gen / sw.Seconds());
    }
    figures.push_back({b, Median(rates)});
  }
  const double base = figures.empty() ? 0 : figures[0].tok_s;
  if (a.json) {
    nlohmann::json j = {{"model", path}, {"threads", engine.pool().size()},
                        {"kv_type", a.kv_type}, {"n_prompt", a.n_prompt},
                        {"ttft_cold_ms", cold * 1e3}, {"ttft_cached_ms", warm * 1e3},
                        {"ttft_speedup", cold / warm}};
    nlohmann::json dec = nlohmann::json::array();
    for (const auto& f : figures) {
      dec.push_back({{"batch", f.batch}, {"decode_tok_s", f.tok_s}, {"vs_batch1", f.tok_s / base}});
    }
    j["decode"] = dec;
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf("model %s (%s weights, %s KV, pages of %d), %d threads, median of %d\n",
                path.c_str(), std::string(kernels::WTypeName(c.weight_type)).c_str(),
                a.kv_type.c_str(), a.page_tokens, engine.pool().size(), a.reps);
    std::printf("TTFT %d-token prompt: cold %.1f ms, fully cached %.2f ms: %.0fx faster\n",
                a.n_prompt, cold * 1e3, warm * 1e3, cold / warm);
    for (const auto& f : figures) {
      std::printf("decode batch %2d: %8.1f tok/s total (%.2fx batch 1)\n", f.batch, f.tok_s,
                  f.tok_s / base);
    }
  }
  return 0;
}

}  // namespace

Runner AddBenchCommand(CLI::App& app) {
  auto a = std::make_shared<BenchArgs>();
  CLI::App* c = app.add_subcommand("bench", "Benchmarks");
  c->require_subcommand(1);
  CLI::App* e = c->add_subcommand("engine", "Prefill and decode tokens/s of the forward pass");
  e->add_option("-m,--model", a->model, "GGUF model (default: the bundled cachette-tiny)");
  e->add_option("--threads", a->threads, "Compute threads (0 = one per core)");
  e->add_option("-p", a->n_prompt, "Prompt tokens")->check(CLI::Range(1, 1 << 20));
  e->add_option("-n", a->n_gen, "Generated tokens")->check(CLI::Range(0, 1 << 20));
  e->add_option("--reps", a->reps, "Repetitions (the median is reported)")
      ->check(CLI::Range(1, 1000));
  e->add_option("--kv-type", a->kv_type, "KV element type: f32, f16, q8_0");
  e->add_flag("--json", a->json, "Print one JSON object");
  auto pa = std::make_shared<PrefixArgs>();
  CLI::App* p = c->add_subcommand("prefix", "TTFT cold vs cached prefix; batched decode scaling");
  p->add_option("-m,--model", pa->model, "GGUF model (default: the bundled cachette-tiny)");
  p->add_option("--threads", pa->threads, "Compute threads (0 = one per core)");
  p->add_option("-p", pa->n_prompt, "Prompt tokens for the TTFT figure")
      ->check(CLI::Range(2, 1 << 20));
  p->add_option("--gen", pa->n_gen, "Decode steps per batch figure")->check(CLI::Range(1, 4096));
  p->add_option("--reps", pa->reps, "Repetitions (the median is reported)")
      ->check(CLI::Range(1, 1000));
  p->add_option("--batches", pa->batches, "Concurrent sequences to measure")->delimiter(',');
  p->add_option("--kv-type", pa->kv_type, "KV element type: f32, f16, q8_0");
  p->add_option("--kv-budget", pa->kv_budget, "Paged KV memory, e.g. 512MiB, 4GiB");
  p->add_option("--page-tokens", pa->page_tokens, "Tokens per page")->check(CLI::Range(1, 4096));
  p->add_flag("--json", pa->json, "Print one JSON object");
  Runner cache = AddBenchCacheSubcommand(c);
  Runner serve = AddBenchServeSubcommands(c);
  Runner soak = AddBenchSoakSubcommand(c);
  return [a, e, pa, p, cache, serve, soak] {
    if (e->parsed()) return BenchEngine(*a);
    if (p->parsed()) return BenchPrefix(*pa);
    int rc = cache();
    if (rc == -1) rc = serve();
    return rc != -1 ? rc : soak();
  };
}

}  // namespace cachette::cli
