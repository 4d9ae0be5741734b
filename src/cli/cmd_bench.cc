// `cachette bench engine`: prefill and decode throughput of the forward pass, with decode's
// achieved weight-read bandwidth beside the machine's measured memory read bandwidth; with
// --ctx-depth, decode after a long context, over full KV and under KV budget policies.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <numeric>
#include <utility>
#include <vector>
#include <nlohmann/json.hpp>

#include "cli/cli.h"
#include "cli/cpu_info.h"
#include "core/timer.h"
#include "engine/engine.h"
#include "engine/sampler.h"
#include "core/units.h"
#include "eval/kv_policy_eval.h"
#include "kv/budget_runner.h"
#include "kv/kv_manager.h"

namespace cachette::cli {

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
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

// Where the weights are, for the header line: "huge pages" or "mmap", and how they are laid out
// where the model rearranged them.
std::string WeightsWhere(const Model& model) {
  std::string s(ResidenceName(model.file().residence()));
  if (model.interleaved()) s += ", rows interleaved by 8";
  return s;
}

struct BenchArgs {
  std::string model;
  int threads = 0;
  int n_prompt = 512;
  int n_gen = 128;
  int reps = 3;
  std::string kv_type = "f16";
  int kv_recent = -1;
  bool json = false;
  int ctx_depth = 0;                     // > 0: decode after this many tokens of context
  std::vector<std::string> kv_policies;  // with ctx_depth: policies measured beside full KV
  double kv_policy_budget = 0.1;
};

int BenchEngineAtDepth(const BenchArgs& a);

// Floating-point operations of a prefill of n tokens from an empty context: every layer's
// matmuls for each token (2 per weight), the attention's scores and weighted values over the
// causal prefix (2 x 2 x n_head x head_dim per query and key), and the output matrix for the
// last token only (the engine computes no other logits).
double PrefillFlops(const Model& model, int64_t n) {
  const ModelConfig& c = model.config();
  double per_token = 0;
  for (const LayerWeights& l : model.layers()) {
    for (const kernels::WeightMatrix* w :
         {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) {
      per_token += 2.0 * static_cast<double>(w->rows) * static_cast<double>(w->cols);
    }
  }
  const double pairs = 0.5 * static_cast<double>(n) * static_cast<double>(n + 1);
  const double attention = 4.0 * c.n_head * c.head_dim * pairs * c.n_layer;
  return per_token * static_cast<double>(n) + attention + 2.0 * c.n_vocab * c.d_model;
}

// The FMA peak of all of the pool's threads at once (kernels::FmaPeakFlops on each, summed):
// the ceiling of a compute-bound prefill with these threads.
double PoolFmaPeakFlops(ThreadPool& pool, double seconds) {
  std::vector<double> per_thread(pool.size());
  pool.RunOnAll([&](int i, int) { per_thread[i] = kernels::FmaPeakFlops(seconds); });
  return std::accumulate(per_thread.begin(), per_thread.end(), 0.0);
}

int BenchEngine(const BenchArgs& a) {
  if (a.ctx_depth > 0) return BenchEngineAtDepth(a);
  if (!a.kv_policies.empty()) {
    return Fail(InvalidArgument("--kv-policy is measured at a context depth: add --ctx-depth N"));
  }
  auto loaded = LoadEngine(a.model, a.kv_type, a.threads, a.kv_recent);
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
  // Right after each decode repetition a pass of the memory read probe as long as it (within
  // [0.25 s, 2 s]): the repetition's share of the bandwidth is taken against the bandwidth of
  // that moment. On a shared VM the probe reads 40 GB/s in one quarter hour and 65 in the next;
  // a figure and a bandwidth measured minutes apart are then not comparable, one repetition and
  // the pass right after it are. The probe's buffer (1 GiB, less where memory is short) is
  // allocated before the repetitions.
  std::error_code ec;
  const uintmax_t model_bytes = std::filesystem::file_size(path, ec);
  MemoryReadProbe probe(ProbeBufferBytes(MemAvailableBytes(), ec ? 0 : model_bytes),
                        engine.pool().size());
  std::vector<double> paired_gbs, paired_share;
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
    const double bw =
        a.n_gen > 0 && probe.ok() ? probe.Pass(rep < 0 ? 0 : std::clamp(td, 0.25, 2.0)) : 0;
    if (rep < 0) continue;
    prefill_tps.push_back(a.n_prompt / tp);
    if (a.n_gen > 0) decode_tps.push_back(a.n_gen / td);
    if (bw > 0) {
      paired_gbs.push_back(bw / 1e9);
      paired_share.push_back(a.n_gen / td * static_cast<double>(model.weight_bytes_per_token()) /
                             bw);
    }
  }
  const double p_tps = Median(prefill_tps);
  const double d_tps = decode_tps.empty() ? 0 : Median(decode_tps);
  const double d_gbs = d_tps * static_cast<double>(model.weight_bytes_per_token()) / 1e9;
  const double paired_median = Median(paired_share);
  double paired_min = 0, paired_max = 0;
  if (!paired_share.empty()) {
    const auto [lo, hi] = std::minmax_element(paired_share.begin(), paired_share.end());
    paired_min = *lo;
    paired_max = *hi;
  }
  // The probe's passes last about as long as a decode repetition (within [0.25 s, 2 s]): a
  // median of second-long repetitions is compared with passes of the same length, not with the
  // luckiest 20 ms sweep of a shared machine.
  const double rep_seconds = d_tps > 0 ? a.n_gen / d_tps : 0;
  const ReadBandwidth mem = MeasureMemoryReadBandwidth(probe, std::clamp(rep_seconds, 0.25, 2.0));
  const double mem_gbs = mem.best / 1e9, mem_median_gbs = mem.median / 1e9;
  const std::string isa(kernels::IsaName(kernels::ActiveIsa()));
  // Prefill is compute-bound: its rate against the threads' FMA peak, as decode's against the
  // read bandwidth. That peak is the ceiling of the float weight types' kernels only: Q8_0 and
  // Q4_0 multiply in 8-bit integers (VPMADDUBSW: 4 times the multiply-adds of a float FMA a
  // vector), so their share can pass 100% and is printed as no ceiling's.
  const bool float_weights = kernels::WTypeBlockElems(c.weight_type) == 1;  // f32, f16, bf16
  const double p_gflops = p_tps * PrefillFlops(model, a.n_prompt) / a.n_prompt / 1e9;
  const double fma_gflops = PoolFmaPeakFlops(engine.pool(), 0.25) / 1e9;
  const double p_share = fma_gflops > 0 ? p_gflops / fma_gflops : 0;
  if (a.json) {
    nlohmann::json j = {{"model", path},
                        {"weight_type", std::string(kernels::WTypeName(c.weight_type))},
                        {"weights_on", std::string(ResidenceName(model.file().residence()))},
                        {"weights_interleaved", model.interleaved()},
                        {"kv_type", a.kv_type},
                        {"threads", engine.pool().size()},
                        {"cpu", CpuModelName()},
                        {"isa", isa},
                        {"n_prompt", a.n_prompt},
                        {"n_gen", a.n_gen},
                        {"reps", a.reps},
                        {"prefill_tok_s", p_tps},
                        {"prefill_gflop_s", p_gflops},
                        {"fma_peak_gflop_s", fma_gflops},
                        {"prefill_share_of_fma_peak", p_share},
                        {"fma_peak_is_prefill_ceiling", float_weights},
                        {"decode_tok_s", d_tps},
                        {"decode_gb_s", d_gbs},
                        {"mem_read_gb_s", mem_gbs},
                        {"mem_read_median_gb_s", mem_median_gbs},
                        {"mem_read_paired_gb_s", paired_gbs},
                        {"decode_share_paired", paired_share},
                        {"decode_share_paired_median", paired_median},
                        {"weight_bytes_per_token", model.weight_bytes_per_token()}};
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf("model %s (%s weights on %s, %s KV), %d threads, cpu %s, isa %s, median of %d\n",
                path.c_str(), std::string(kernels::WTypeName(c.weight_type)).c_str(),
                WeightsWhere(model).c_str(), a.kv_type.c_str(),
                engine.pool().size(), CpuModelName().c_str(), isa.c_str(), a.reps);
    if (float_weights) {
      std::printf("prefill %5d tokens: %8.1f tok/s  %.1f GFLOP/s = %.0f%% of the measured FMA "
                  "peak of %d threads %.1f GFLOP/s\n",
                  a.n_prompt, p_tps, p_gflops, 100.0 * p_share, engine.pool().size(),
                  fma_gflops);
    } else {
      std::printf("prefill %5d tokens: %8.1f tok/s  %.1f GFLOP/s (8-bit integer products: the "
                  "measured float FMA peak of %d threads, %.1f GFLOP/s, is not their ceiling)\n",
                  a.n_prompt, p_tps, p_gflops, engine.pool().size(), fma_gflops);
    }
    if (mem_gbs > 0) {
      std::printf("decode  %5d tokens: %8.1f tok/s  weights %.2f GB/s = %.0f%% of measured "
                  "memory read bandwidth %.2f GB/s\n",
                  a.n_gen, d_tps, d_gbs, 100.0 * d_gbs / mem_gbs, mem_gbs);
      // The decode figure is a median of repetitions, the bandwidth the best of the probe's
      // passes: its median pass is printed too.
      std::printf("  (the probe's best of 5 passes as long as a repetition; its median pass "
                  "read %.2f GB/s, of which the weights are %.0f%%)\n",
                  mem_median_gbs, 100.0 * d_gbs / mem_median_gbs);
      if (!paired_share.empty()) {
        std::printf("  paired: each repetition against a probe pass right after it: median %.0f%% "
                    "(%.0f-%.0f%%) of %.2f GB/s (median pass)\n",
                    100.0 * paired_median, 100.0 * paired_min, 100.0 * paired_max,
                    Median(paired_gbs));
      }
    } else {
      std::printf("decode  %5d tokens: %8.1f tok/s  weights %.2f GB/s (memory read bandwidth "
                  "not measured: no room for the probe's buffer)\n",
                  a.n_gen, d_tps, d_gbs);
    }
  }
  return 0;
}

// ---- Decode at a context depth (--ctx-depth): full KV against KV budget policies ---------
//
// The context, N pseudo-random tokens, is read once with full attention in chunks, collecting
// the attention statistics the policies ask for (kv/budget_runner.h); that read is not a
// figure. Each repetition then
//   1. decodes n tokens after a 1-token prompt (depth 1: the step without context),
//   2. decodes n tokens over the full KV of the context (truncated back to N first),
//   3. for each policy: copies the context into the policy's runner, which compacts it to the
//      budget (BudgetRunner::StartFrom; a block-wise policy reads the context again), then
//      decodes n tokens with Step, which compacts every `slack` tokens and, for the policies
//      that score, collects the decode queries' attention: both part of the policy's cost.
// Every decode starts from the context's last logits and feeds back the argmax. The decodes of
// a repetition run interleaved, one step of each configuration in turn, so that a change in the
// machine's load falls on every configuration alike; only the steps are timed. After the
// decodes, kernels::Attention is timed alone on the KV each decode left, as the engine calls it
// for one decode token (one query per layer over the layer's slots, the same thread pool):
// the attention share is that time over the decode step's.

// One decode figure: a configuration's median over the repetitions.
struct DepthFigure {
  std::string label;     // "full" or the policy's label
  int64_t depth = 0;     // context tokens read before the decode
  int64_t kept = 0;      // slots per layer after the decode (average over layers)
  double tok_s = 0;      // decode tokens per second
  double attn_s = 0;     // seconds per decode token in kernels::Attention, timed alone
  double step_s() const { return 1.0 / tok_s; }
  double attn_share() const { return attn_s / step_s(); }
};

// One configuration's greedy decode in progress.
struct Decoder {
  std::function<Status(TokenId, float*)> step;  // adds a token, writes the next logits
  std::vector<float> logits;                    // the last step's (first: the context's)
  const SequenceKv* kv = nullptr;               // what the steps extend
  double seconds = 0;                           // time in `step` so far
};

// n greedy steps of every decoder, interleaved step by step, each step timed.
Status DecodeInterleaved(std::vector<Decoder>& decoders, int n) {
  for (int i = 0; i < n; ++i) {
    for (Decoder& d : decoders) {
      const TokenId t = Sampler::Argmax(d.logits);
      Stopwatch sw;
      CT_RETURN_IF_ERROR(d.step(t, d.logits.data()));
      d.seconds += sw.Seconds();
    }
  }
  return Status::Ok();
}

// Seconds per decode token spent in kernels::Attention over `kv` as it stands: for every
// layer, one pseudo-random query at the layer's last slot over all its slots, timed call by
// call and summed over the layers; the median of `rounds` passes over the layers.
double AttentionSecondsPerToken(Engine& engine, const SequenceKv& kv, int rounds) {
  const ModelConfig& c = engine.model().config();
  const size_t qd = static_cast<size_t>(c.n_head) * c.head_dim;
  std::vector<float> q(qd), out(qd);
  uint64_t x = 0x5eed;
  for (float& v : q) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    v = static_cast<float>((x >> 40) % 2001) / 1000.0f - 1.0f;  // in [-1, 1]
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  std::vector<double> passes;
  for (int r = 0; r < rounds; ++r) {
    double total = 0;
    for (int layer = 0; layer < c.n_layer; ++layer) {
      const int64_t n = kv.layer_tokens(layer);
      const kernels::KvView view = kv.View(layer, n);
      Stopwatch sw;
      kernels::Attention(q.data(), 1, c.n_head, n - 1, view, scale, out.data(), engine.pool());
      total += sw.Seconds();
    }
    passes.push_back(total);
  }
  return Median(passes);
}

int BenchEngineAtDepth(const BenchArgs& a) {
  auto loaded = LoadEngine(a.model, a.kv_type, a.threads, a.kv_recent);
  if (!loaded.ok()) return Fail(loaded.status());
  const Model& model = *loaded->model;
  Engine& engine = *loaded->engine;
  const ModelConfig& c = model.config();
  const int64_t depth = a.ctx_depth;
  const int n = a.n_gen;
  if (n < 1) return Fail(InvalidArgument("--ctx-depth needs -n >= 1 decoded tokens"));
  if (depth + n + 1 > c.n_ctx_train) {
    return Fail(InvalidArgument("--ctx-depth + -n exceed the model's context of " +
                                std::to_string(c.n_ctx_train)));
  }
  constexpr int kSlack = 16;        // the runner's compaction slack
  constexpr int kAttnRounds = 5;    // passes of the attention timing per decode
  constexpr int64_t kChunk = 2048;  // context tokens per Forward while reading the context
  std::vector<std::unique_ptr<BudgetRunner>> runners;
  for (const std::string& name : a.kv_policies) {
    KvPolicyConfig pc;
    pc.name = name;
    pc.budget = a.kv_policy_budget;
    auto r = BudgetRunner::Create(engine, pc, kSlack);
    if (!r.ok()) return Fail(r.status().WithContext("--kv-policy/--kv-policy-budget"));
    runners.push_back(std::move(*r));
  }

  // The context, read once, with the statistics every policy needs: cumulative sums over all
  // of it, window sums over its last tokens only (so the window is set for the last chunk,
  // which is made at least a window long).
  AttentionStats stats;
  int window = 0;
  for (const auto& r : runners) {
    window = std::max(window, r->stats_window());
    stats.cumulative |= r->stats_cumulative();
  }
  const std::vector<TokenId> context =
      PseudoRandomTokens(static_cast<int>(depth), c.n_vocab, 12345);
  std::vector<float> context_logits(c.n_vocab);
  auto full = engine.NewSequence(depth + n + 1);
  Stopwatch fill_sw;
  for (int64_t i = 0; i < depth;) {
    int64_t m = std::min(kChunk, depth - i);
    if (depth - i - m < std::max(window, 1)) m = depth - i;
    const bool last = i + m == depth;
    stats.window = last ? window : 0;
    Engine::Item item{full.get(), std::span(context).subspan(i, m),
                      last ? Engine::Logits::kLast : Engine::Logits::kNone,
                      last ? context_logits.data() : nullptr};
    if (stats.window > 0 || stats.cumulative) item.stats = &stats;
    Status s = engine.Forward(std::span<Engine::Item>(&item, 1));
    if (!s.ok()) return Fail(s.WithContext("reading the context"));
    i += m;
    // Progress on stderr: a long context takes minutes.
    std::fprintf(stderr, "\rreading the context: %lld / %lld tokens", static_cast<long long>(i),
                 static_cast<long long>(depth));
  }
  std::fprintf(stderr, "\n");
  const double fill_s = fill_sw.Seconds();

  // Decode figures: [0] depth 1, [1] full KV at the depth, then one per policy.
  std::vector<DepthFigure> figures(2 + runners.size());
  std::vector<std::vector<double>> rates(figures.size()), attn(figures.size());
  figures[0].label = figures[1].label = "full";
  figures[0].depth = 1;
  figures[1].depth = depth;
  for (size_t p = 0; p < runners.size(); ++p) {
    figures[2 + p].label = eval::PolicyLabel(runners[p]->config());
    figures[2 + p].depth = depth;
  }
  auto shallow = engine.NewSequence(n + 2);
  const TokenId first[1] = {context[0]};
  const auto forward_on = [&engine](SequenceKv& kv) {
    return [&engine, &kv](TokenId t, float* logits) {
      const TokenId tok[1] = {t};
      return engine.Forward(kv, tok, logits);
    };
  };
  for (int rep = 0; rep < a.reps; ++rep) {
    std::vector<Decoder> decoders(figures.size());
    shallow->SetTokens(0);
    decoders[0] = {forward_on(*shallow), std::vector<float>(c.n_vocab), shallow.get()};
    Status s = engine.Forward(*shallow, first, decoders[0].logits.data());
    if (!s.ok()) return Fail(s.WithContext("the depth-1 prompt"));
    full->SetTokens(depth);
    decoders[1] = {forward_on(*full), context_logits, full.get()};
    for (size_t p = 0; p < runners.size(); ++p) {
      BudgetRunner& r = *runners[p];
      Decoder& d = decoders[2 + p];
      d.logits = context_logits;
      s = r.policy().blockwise_prefill() ? r.Prefill(context, d.logits.data())
                                         : r.StartFrom(*full, depth, &stats);
      if (!s.ok()) return Fail(s.WithContext(figures[2 + p].label));
      d.step = [&r](TokenId t, float* logits) {
        const TokenId tok[1] = {t};
        return r.Step(tok, Engine::Logits::kLast, logits);
      };
      d.kv = r.kv();
    }
    s = DecodeInterleaved(decoders, n);
    if (!s.ok()) return Fail(s.WithContext("decode"));
    for (size_t f = 0; f < figures.size(); ++f) {
      const SequenceKv& kv = *decoders[f].kv;
      rates[f].push_back(n / decoders[f].seconds);
      attn[f].push_back(AttentionSecondsPerToken(engine, kv, kAttnRounds));
      int64_t slots = 0;
      for (int layer = 0; layer < c.n_layer; ++layer) slots += kv.layer_tokens(layer);
      figures[f].kept = (slots + c.n_layer - 1) / c.n_layer;
    }
  }
  for (size_t f = 0; f < figures.size(); ++f) {
    figures[f].tok_s = Median(rates[f]);
    figures[f].attn_s = Median(attn[f]);
  }
  const DepthFigure& base = figures[1];
  // The part of a step at the depth that the context adds: attention plus everything else
  // that grows with it (reading the KV, cache misses).
  const double context_share = 1.0 - figures[0].step_s() / base.step_s();
  const std::string isa(kernels::IsaName(kernels::ActiveIsa()));
  if (a.json) {
    nlohmann::json decode = nlohmann::json::array();
    for (const DepthFigure& f : figures) {
      decode.push_back({{"config", f.label},
                        {"depth", f.depth},
                        {"kept_per_layer", f.kept},
                        {"decode_tok_s", f.tok_s},
                        {"step_ms", f.step_s() * 1e3},
                        {"attention_ms", f.attn_s * 1e3},
                        {"attention_share", f.attn_share()},
                        {"vs_full", f.tok_s / base.tok_s}});
    }
    nlohmann::json j = {{"model", loaded->path},
                        {"weight_type", std::string(kernels::WTypeName(c.weight_type))},
                        {"weights_on", std::string(ResidenceName(model.file().residence()))},
                        {"weights_interleaved", model.interleaved()},
                        {"kv_type", a.kv_type},
                        {"threads", engine.pool().size()},
                        {"cpu", CpuModelName()},
                        {"isa", isa},
                        {"ctx_depth", depth},
                        {"n_gen", n},
                        {"reps", a.reps},
                        {"kv_policy_budget", a.kv_policy_budget},
                        {"context_read_s", fill_s},
                        {"context_share", context_share},
                        {"decode", decode}};
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  std::printf("model %s (%s weights on %s, %s KV), %d threads, cpu %s, isa %s, median of %d\n",
              loaded->path.c_str(), std::string(kernels::WTypeName(c.weight_type)).c_str(),
              WeightsWhere(model).c_str(), a.kv_type.c_str(),
              engine.pool().size(), CpuModelName().c_str(), isa.c_str(), a.reps);
  std::printf("context of %lld tokens read once in %.1f s (full attention, not a figure)\n",
              static_cast<long long>(depth), fill_s);
  std::printf("decode %d tokens:\n", n);
  std::printf("  %-20s %6s %10s %9s %8s %12s %6s %8s\n", "config", "depth", "kept/layer",
              "tok/s", "step ms", "attention ms", "share", "vs full");
  for (const DepthFigure& f : figures) {
    std::printf("  %-20s %6lld %10lld %9.2f %8.2f %12.2f %5.0f%% %7.2fx\n", f.label.c_str(),
                static_cast<long long>(f.depth), static_cast<long long>(f.kept), f.tok_s,
                f.step_s() * 1e3, f.attn_s * 1e3, 100 * f.attn_share(), f.tok_s / base.tok_s);
  }
  std::printf("steps interleaved across the configurations; attention ms = kernels::Attention "
              "for one decode token\n  over every layer, timed alone after the decode on the KV "
              "it left (same threads);\n  share = that over the decode step (1 / tok/s).\n");
  std::printf("context cost: a step at depth %lld takes %.2f ms against %.2f ms at depth 1: "
              "%.0f%% of it grows\n  with the context (attention and KV reads); full at depth 1 "
              "is the ceiling any budget can reach.\n",
              static_cast<long long>(depth), base.step_s() * 1e3, figures[0].step_s() * 1e3,
              100 * context_share);
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
  e->add_option("--kv-type", a->kv_type, "KV element type: f32, f16, q8_0, q4_0, q4_1, kivi4");
  e->add_option("--kv-recent", a->kv_recent, kKvRecentHelp);
  e->add_flag("--json", a->json, "Print one JSON object");
  e->add_option("--ctx-depth", a->ctx_depth,
                "Decode after this many tokens of context (read once, untimed; -p is unused), "
                "beside decode at depth 1, with the attention share of a step")
      ->check(CLI::Range(0, 1 << 24));
  e->add_option("--kv-policy", a->kv_policies,
                "With --ctx-depth: KV budget policies to decode under beside full KV, "
                "comma-separated (one context read is shared)")
      ->delimiter(',');
  e->add_option("--kv-policy-budget", a->kv_policy_budget,
                "Budget: below 1 a fraction of the context, 1 or more tokens (default 0.1)");
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
  p->add_option("--kv-type", pa->kv_type, "KV element type: f32, f16, q8_0, q4_0, q4_1, kivi4");
  p->add_option("--kv-budget", pa->kv_budget, "Paged KV memory, e.g. 512MiB, 4GiB");
  p->add_option("--page-tokens", pa->page_tokens, "Tokens per page")->check(CLI::Range(1, 4096));
  p->add_flag("--json", pa->json, "Print one JSON object");
  Runner cache = AddBenchCacheSubcommand(c);
  Runner serve = AddBenchServeSubcommands(c);
  Runner soak = AddBenchSoakSubcommand(c);
  Runner kv_pages = AddBenchKvPagesSubcommand(c);
  Runner segment_load = AddBenchSegmentLoadSubcommand(c);
  return [a, e, pa, p, cache, serve, soak, kv_pages, segment_load] {
    if (e->parsed()) return BenchEngine(*a);
    if (p->parsed()) return BenchPrefix(*pa);
    int rc = cache();
    if (rc == -1) rc = serve();
    if (rc == -1) rc = soak();
    rc = rc != -1 ? rc : kv_pages();
    return rc != -1 ? rc : segment_load();
  };
}

}  // namespace cachette::cli
