// MatMul microbenchmarks: GFLOP/s for prefill (m = 512 tokens) and GB/s of weight bytes for
// decode (m = 1), per weight type and qwen2.5-0.5b shape, at the best ISA and at the scalar
// reference in the same run; a summary table with the ratio is printed at the end.
//
//   build/h-kernels/bench/kernels_bench [--threads=N] [--benchmark_filter=...]
//
// Shapes are [cols -> rows] of y[m][rows] = x[m][cols] . W^T. The "model" rows run all seven
// matmuls of the 24 layers of qwen2.5-0.5b (without the LM head) on distinct weights, ~380 MB
// for q8_0, so decode there reads from DRAM as a real forward pass does, and report tokens/s.
// The scalar prefill baseline runs at m = 16 instead of 512 (its rate does not depend on m and
// m = 512 would take seconds per iteration).
#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/fp16.h"
#include "core/huge_pages.h"
#include "core/thread_pool.h"
#include "kernels/kernels.h"

namespace cachette::kernels {
namespace {

int g_threads = 2;
// Rates from the main thread's CPU time instead of wall time: on a machine shared with other
// jobs, a single-threaded run (--threads=1 --cpu_time) still measures the kernel itself.
bool g_cpu_time = false;

ThreadPool& Pool() {
  static ThreadPool pool(g_threads);
  return pool;
}

// Weight bytes with plausible values: random f16 scales in [0.001, 0.02] for quantized blocks,
// random values in [-1, 1] for float types (no denormals or NaNs to slow anything down).
std::vector<uint8_t> RandomWeights(WType t, int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  const size_t row_bytes = WTypeRowBytes(t, cols);
  std::vector<uint8_t> b(row_bytes * rows);
  for (auto& v : b) v = static_cast<uint8_t>(rng());
  auto put16 = [&](size_t off, uint16_t v) { std::memcpy(b.data() + off, &v, 2); };
  std::uniform_real_distribution<float> val(-1, 1), scale(0.001f, 0.02f);
  const size_t n = rows * cols;
  switch (t) {
    case WType::kF32:
      for (size_t i = 0; i < n; ++i) {
        const float f = val(rng);
        std::memcpy(b.data() + 4 * i, &f, 4);
      }
      break;
    case WType::kF16:
      for (size_t i = 0; i < n; ++i) put16(2 * i, Fp32ToFp16(val(rng)));
      break;
    case WType::kBF16:
      for (size_t i = 0; i < n; ++i) put16(2 * i, Fp32ToBf16(val(rng)));
      break;
    case WType::kQ8_0:
    case WType::kQ4_0:
      for (size_t blk = 0; blk < n / 32; ++blk) {
        put16(blk * WTypeBlockBytes(t), Fp32ToFp16(scale(rng)));
      }
      break;
  }
  return b;
}

WeightMatrix Matrix(WType t, int64_t rows, int64_t cols, const std::vector<uint8_t>& b) {
  return WeightMatrix{t, b.data(), rows, cols, WTypeRowBytes(t, cols)};
}

std::vector<float> RandomActivations(int64_t n) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> d(-1, 1);
  std::vector<float> x(n);
  for (auto& v : x) v = d(rng);
  return x;
}

struct Shape {
  int64_t cols, rows;
};
constexpr Shape kShapes[] = {{896, 896}, {896, 128}, {896, 4864}, {4864, 896}};
constexpr WType kTypes[] = {WType::kQ8_0, WType::kF16, WType::kQ4_0, WType::kBF16, WType::kF32};

void BM_MatMul(benchmark::State& state, WType t, Shape s, int64_t m, Isa isa) {
  SetIsa(isa);
  if (ActiveIsa() != isa) {
    state.SkipWithError("ISA not supported here");
    return;
  }
  const std::vector<uint8_t> wb = RandomWeights(t, s.rows, s.cols, 1);
  WeightMatrix w = Matrix(t, s.rows, s.cols, wb);
  std::vector<uint16_t> scales;  // as a model builds them where the kernels read them
  if (UsesDecodeScales(t)) {
    scales = DecodeScales(w);
    w.scales8 = scales.data();
  }
  w.cache_resident = FitsInLastLevelCache(wb.size());  // as a model this size would set it
  const std::vector<float> x = RandomActivations(m * s.cols);
  std::vector<float> y(m * s.rows);
  for (auto _ : state) {
    MatMul(x.data(), m, w, y.data(), Pool());
    benchmark::DoNotOptimize(y.data());
  }
  const double flops = 2.0 * m * s.rows * s.cols;
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GB/s"] = benchmark::Counter(static_cast<double>(wb.size()) * 1e-9,
                                              benchmark::Counter::kIsIterationInvariantRate);
  SetIsa(BestIsa());
}

// The seven matmuls of every layer of qwen2.5-0.5b, distinct weights per layer.
void BM_Model(benchmark::State& state, WType t, int64_t m, Isa isa) {
  SetIsa(isa);
  constexpr int kLayers = 24;
  constexpr int64_t kD = 896, kFf = 4864, kKv = 128;
  const Shape shapes[] = {{kD, kD},  {kD, kKv}, {kD, kKv}, {kD, kD},
                          {kD, kFf}, {kD, kFf}, {kFf, kD}};
  struct Layer {
    std::vector<std::vector<uint8_t>> bytes;
    std::vector<std::vector<uint16_t>> scales;  // the kernels that do not read them ignore them
    std::vector<WeightMatrix> w;
  };
  static std::map<int, std::unique_ptr<std::vector<Layer>>> cache;  // built once per type
  auto& layers = cache[static_cast<int>(t)];
  if (!layers) {
    layers = std::make_unique<std::vector<Layer>>(kLayers);
    for (int l = 0; l < kLayers; ++l) {
      for (const Shape& s : shapes) {
        (*layers)[l].bytes.push_back(RandomWeights(t, s.rows, s.cols, 100 + l));
        Layer& layer = (*layers)[l];
        layer.w.push_back(Matrix(t, s.rows, s.cols, layer.bytes.back()));
        if (t == WType::kQ8_0 || t == WType::kQ4_0) {
          layer.scales.push_back(DecodeScales(layer.w.back()));
          layer.w.back().scales8 = layer.scales.back().data();
        }
      }
    }
  }
  double bytes = 0;
  for (const Layer& l : *layers)
    for (const auto& b : l.bytes) bytes += static_cast<double>(b.size());
  for (Layer& l : *layers) {  // as a model this size would set it
    for (WeightMatrix& w : l.w) w.cache_resident = FitsInLastLevelCache(bytes);
  }
  const std::vector<float> x = RandomActivations(m * kFf);
  std::vector<float> y(m * kFf);
  for (auto _ : state) {
    for (const Layer& l : *layers) {
      for (const WeightMatrix& w : l.w) MatMul(x.data(), m, w, y.data(), Pool());
    }
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["tok/s"] =
      benchmark::Counter(static_cast<double>(m), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GB/s"] =
      benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  SetIsa(BestIsa());
}

// n_q queries ending at position ctx - 1, qwen2.5-0.5b heads (14 query heads, 2 KV heads,
// head_dim 64): one layer's attention over a paged cache of 32-slot blocks, or with layers > 1
// a decode step's attention over that many layers laid out as the engine's page pool lays
// them (kv/page_pool.h: a 16-slot page holds every layer's K and V blocks, pages in address
// order). 24 layers at 4,096 slots hold 48 MiB of f16 KV, more than a last-level cache, so
// the K and V vectors come from memory in blocks 196 KiB apart, as in a decode step; one
// layer's KV stays in cache across iterations.
void BM_Attention(benchmark::State& state, KvType type, int64_t n_q, int64_t ctx, int layers) {
  constexpr int kHead = 14, kKvHead = 2, kHd = 64;
  const int block = layers > 1 ? 16 : 32;
  const size_t tok_bytes = KvHeadBytes(type, kHd) * kKvHead;
  const size_t block_bytes = tok_bytes * block, page_bytes = 2 * layers * block_bytes;
  const int64_t n_pages = (ctx + block - 1) / block;
  ZeroedBuffer pool(n_pages * page_bytes);  // as the page pool's: huge pages from 2 MiB up
  std::vector<const void*> kp(layers * n_pages), vp(layers * n_pages);
  const std::vector<float> vals = RandomActivations(block * kKvHead * kHd);
  for (int64_t p = 0; p < n_pages; ++p) {
    for (int l = 0; l < layers; ++l) {
      auto* k = reinterpret_cast<uint8_t*>(pool.get()) + p * page_bytes + 2 * l * block_bytes;
      StoreKv(vals.data(), block * kKvHead, kHd, type, k);
      StoreKv(vals.data(), block * kKvHead, kHd, type, k + block_bytes);
      kp[l * n_pages + p] = k;
      vp[l * n_pages + p] = k + block_bytes;
    }
  }
  std::vector<KvView> kv;
  for (int l = 0; l < layers; ++l) {
    kv.push_back(KvView{type, kKvHead, kHd, block, kp.data() + l * n_pages,
                        vp.data() + l * n_pages, ctx});
  }
  const std::vector<float> q = RandomActivations(n_q * kHead * kHd);
  std::vector<float> out(q.size());
  for (auto _ : state) {
    for (const KvView& v : kv) {
      Attention(q.data(), n_q, kHead, ctx - n_q, v, 0.125f, out.data(), Pool());
    }
    benchmark::DoNotOptimize(out.data());
  }
  state.counters["tok/s"] =
      benchmark::Counter(static_cast<double>(n_q), benchmark::Counter::kIsIterationInvariantRate);
}

// RoPE over one layer's queries of a 512-token prefill chunk (qwen2 style, 14 heads x 64).
void BM_Rope(benchmark::State& state) {
  constexpr int kHead = 14;
  constexpr int64_t kTok = 512;
  RopeParams p;
  p.style = RopeStyle::kNeox;
  p.head_dim = 64;
  p.theta_base = 1000000.0f;
  std::vector<float> x = RandomActivations(kTok * kHead * p.head_dim);
  std::vector<int32_t> pos(kTok);
  for (int64_t i = 0; i < kTok; ++i) pos[i] = static_cast<int32_t>(i);
  for (auto _ : state) {
    Rope(x.data(), kTok, kHead, pos.data(), p);
    benchmark::DoNotOptimize(x.data());
  }
  state.counters["tok/s"] =
      benchmark::Counter(static_cast<double>(kTok), benchmark::Counter::kIsIterationInvariantRate);
}

// Collects every run's counters for the summary table.
class SummaryReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& r : runs) {
      if (r.error_occurred) continue;
      std::map<std::string, double> c;
      for (const auto& [k, v] : r.counters) c[k] = v.value;
      std::string name = r.benchmark_name();
      for (const std::string suffix : {"/real_time", "/min_time:1.000", "/min_time:3.000"}) {
        const size_t at = name.find(suffix);
        if (at != std::string::npos) name.erase(at, suffix.size());
      }
      results_[name] = c;
    }
  }
  double Get(const std::string& name, const std::string& counter) const {
    auto it = results_.find(name);
    if (it == results_.end()) return 0;
    auto jt = it->second.find(counter);
    return jt == it->second.end() ? 0 : jt->second;
  }

 private:
  std::map<std::string, std::map<std::string, double>> results_;
};

std::string MatMulName(WType t, Shape s, int64_t m, Isa isa) {
  return "MatMul/" + std::string(WTypeName(t)) + "/" + std::to_string(s.cols) + "->" +
         std::to_string(s.rows) + "/m" + std::to_string(m) + "/" + std::string(IsaName(isa));
}
std::string ModelName(WType t, int64_t m, Isa isa) {
  return "Model/" + std::string(WTypeName(t)) + "/m" + std::to_string(m) + "/" +
         std::string(IsaName(isa));
}

constexpr int64_t kPrefill = 512, kScalarPrefill = 16;

}  // namespace
}  // namespace cachette::kernels

int main(int argc, char** argv) {
  using namespace cachette::kernels;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--threads=", 10) == 0) g_threads = std::atoi(argv[i] + 10);
    if (std::strcmp(argv[i], "--cpu_time") == 0) g_cpu_time = true;
  }
  const Isa best = BestIsa();
  auto timing = [](benchmark::internal::Benchmark* b) {
    if (!g_cpu_time) b->UseRealTime();
    return b;
  };
  for (WType t : kTypes) {
    for (Shape s : kShapes) {
      for (Isa isa : {best, Isa::kScalar}) {
        const int64_t pm = isa == Isa::kScalar ? kScalarPrefill : kPrefill;
        timing(benchmark::RegisterBenchmark(MatMulName(t, s, pm, isa).c_str(), BM_MatMul, t, s, pm,
                                            isa))
            ->Unit(benchmark::kMillisecond);
        timing(
            benchmark::RegisterBenchmark(MatMulName(t, s, 1, isa).c_str(), BM_MatMul, t, s, 1, isa))
            ->Unit(benchmark::kMicrosecond);
      }
    }
  }
  // Small batches (several sequences decoding together, short prompts): where the quantized
  // kernels switch from dot tiles to repacked panels.
  for (WType t : {WType::kQ8_0, WType::kF16, WType::kQ4_0}) {
    for (int64_t m : {2, 4, 6, 8, 12, 16, 32, 64}) {
      timing(benchmark::RegisterBenchmark(MatMulName(t, {896, 4864}, m, best).c_str(), BM_MatMul, t,
                                          Shape{896, 4864}, m, best))
          ->Unit(benchmark::kMicrosecond);
    }
  }
  for (WType t : {WType::kQ8_0, WType::kF16, WType::kQ4_0}) {
    for (int64_t m : {int64_t{1}, kPrefill}) {
      timing(benchmark::RegisterBenchmark(ModelName(t, m, best).c_str(), BM_Model, t, m, best))
          ->Unit(benchmark::kMillisecond)
          ->MinTime(m == 1 ? 1.0 : 3.0);
    }
  }
  for (KvType kt : {KvType::kF16, KvType::kQ8_0, KvType::kQ4_0, KvType::kF32}) {
    for (auto [n_q, ctx] : {std::pair<int64_t, int64_t>{512, 512}, {512, 4096}, {1, 512}, {1, 4096},
                            {1, 16384}}) {
      const std::string name = "Attention/" + std::string(KvTypeName(kt)) + "/q" +
                               std::to_string(n_q) + "/ctx" + std::to_string(ctx);
      timing(benchmark::RegisterBenchmark(name.c_str(), BM_Attention, kt, n_q, ctx, 1))
          ->Unit(benchmark::kMicrosecond);
    }
  }
  for (KvType kt : {KvType::kF16, KvType::kQ8_0}) {
    const std::string name = "Attention/" + std::string(KvTypeName(kt)) + "/q1/ctx4096/layers24";
    timing(benchmark::RegisterBenchmark(name.c_str(), BM_Attention, kt, 1, 4096, 24))
        ->Unit(benchmark::kMicrosecond);
  }
  timing(benchmark::RegisterBenchmark("Rope/neox/512x14x64", BM_Rope))
      ->Unit(benchmark::kMicrosecond);
  benchmark::Initialize(&argc, argv);
  SummaryReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);

  std::printf("\nthreads=%d best=%s, rates from %s time (scalar prefill measured at m=%lld)\n",
              g_threads, std::string(IsaName(best)).c_str(), g_cpu_time ? "CPU" : "wall",
              static_cast<long long>(kScalarPrefill));
  std::printf("%-6s %-11s %12s %12s %8s   %10s %10s %8s\n", "type", "shape", "prefill", "scalar",
              "ratio", "decode", "scalar", "ratio");
  std::printf("%-6s %-11s %12s %12s %8s   %10s %10s %8s\n", "", "", "GFLOP/s", "GFLOP/s", "",
              "GB/s", "GB/s", "");
  for (WType t : kTypes) {
    for (Shape s : kShapes) {
      const double pf = reporter.Get(MatMulName(t, s, kPrefill, best), "GFLOP/s");
      const double ps = reporter.Get(MatMulName(t, s, kScalarPrefill, Isa::kScalar), "GFLOP/s");
      const double df = reporter.Get(MatMulName(t, s, 1, best), "GB/s");
      const double ds = reporter.Get(MatMulName(t, s, 1, Isa::kScalar), "GB/s");
      if (pf == 0 && df == 0) continue;
      const std::string shape = std::to_string(s.cols) + "->" + std::to_string(s.rows);
      std::printf("%-6s %-11s %12.1f %12.2f %7.1fx   %10.2f %10.3f %7.1fx\n",
                  std::string(WTypeName(t)).c_str(), shape.c_str(), pf, ps, ps > 0 ? pf / ps : 0,
                  df, ds, ds > 0 ? df / ds : 0);
    }
  }
  for (WType t : {WType::kQ8_0, WType::kF16, WType::kQ4_0}) {
    const double d = reporter.Get(ModelName(t, 1, best), "tok/s");
    const double p = reporter.Get(ModelName(t, kPrefill, best), "tok/s");
    if (d == 0 && p == 0) continue;
    std::printf("model %-5s matmuls only: decode %.1f tok/s (%.1f GB/s), prefill-512 %.1f tok/s\n",
                std::string(WTypeName(t)).c_str(), d, reporter.Get(ModelName(t, 1, best), "GB/s"),
                p);
  }
  benchmark::Shutdown();
  return 0;
}
