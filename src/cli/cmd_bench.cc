// `cachette bench engine`: prefill and decode throughput of the forward pass, with decode's
// achieved weight-read bandwidth beside the machine's measured memory read bandwidth.
#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "cli/cli.h"
#include "core/timer.h"
#include "engine/engine.h"
#include "engine/sampler.h"

namespace cachette::cli {
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

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

int BenchEngine(const BenchArgs& a) {
  const std::string path = a.model.empty() ? DefaultModelPath() : a.model;
  auto model_or = Model::Load(path);
  if (!model_or.ok()) return Fail(model_or.status());
  const Model& model = **model_or;
  auto kv_type = ParseKvType(a.kv_type);
  if (!kv_type.ok()) return Fail(kv_type.status());
  const ModelConfig& c = model.config();
  if (a.n_prompt + a.n_gen > c.n_ctx_train) {
    return Fail(InvalidArgument("-p + -n exceed the model's context of " +
                                std::to_string(c.n_ctx_train)));
  }
  EngineOptions eo;
  eo.threads = a.threads;
  eo.kv_type = *kv_type;
  Engine engine(model, eo);

  // A fixed pseudo-random prompt (the same every run).
  std::vector<TokenId> prompt(a.n_prompt);
  uint64_t x = 12345;
  for (auto& t : prompt) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    t = static_cast<TokenId>((x >> 33) % static_cast<uint64_t>(std::max(1, c.n_vocab - 1)));
  }
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
  return [a] { return BenchEngine(*a); };
}

}  // namespace cachette::cli
