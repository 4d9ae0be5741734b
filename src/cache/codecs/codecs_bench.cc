// KV codec microbenchmark: bytes/token and encode/decode GB/s (of raw chunk bytes) for every
// codec on one qwen2.5-0.5b-shaped chunk ([24 layers][K, V][256 tokens][2 KV heads][64] f16,
// 1.5 MiB), beside memcpy of the same chunk measured in the same run. Lossy codecs also run on
// the scalar reference kernels and, where the CPU has it, the AVX2 table (the fast path of
// machines without AVX-512), so each path's gain is visible. A summary table with the
// ratios to memcpy is printed at the end. The chunk has no token locality (every element
// independent) and rare 100x spikes, which set whole channels' steps in cachegen (its WART in
// docs/formats/codecs.md): its sizes here are small for that reason, not a measure of it;
// cachegen_test prints sizes and errors on smooth KV.
//
//   build/h-codec/src/cache/codecs/codecs_bench [--benchmark_filter=...]
//
// Single-threaded: the codec executor runs one chunk per thread.
#include <benchmark/benchmark.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "cache/codecs/codec.h"
#include "cache/codecs/codec_internal.h"
#include "cache/codecs/quant_kernels.h"
#include "core/fp16.h"

namespace cachette::cache {
namespace {

const ChunkLayout kLayout{24, 2, 64, 256, 1};

// KV-like f16 data: N(0, 1) with outlier channels and rare spikes, as real keys have.
const std::vector<std::byte>& Chunk() {
  static const std::vector<std::byte> chunk = [] {
    std::mt19937 rng(42);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<std::byte> raw(kLayout.raw_bytes());
    for (size_t i = 0; i < raw.size() / 2; ++i) {
      float x = normal(rng);
      if (i % 64 % 17 == 3) x *= 30.0f;
      if (rng() % 200 == 0) x *= 100.0f;
      const uint16_t h = Fp32ToFp16(x);
      std::memcpy(raw.data() + 2 * i, &h, 2);
    }
    return raw;
  }();
  return chunk;
}

struct Row {
  double bytes_per_token = 0, encode_gbs = 0, decode_gbs = 0;
};
std::map<std::string, Row>& Rows() {
  static std::map<std::string, Row> rows;
  return rows;
}
double g_memcpy_gbs = 0;

using Clock = std::chrono::steady_clock;

// Times the loop body itself (wall clock) and returns GB/s of raw chunk bytes.
template <typename Fn>
double Run(benchmark::State& state, Fn&& fn) {
  const auto start = Clock::now();
  int64_t n = 0;
  for (auto _ : state) {
    fn();
    ++n;
  }
  const double secs = std::chrono::duration<double>(Clock::now() - start).count();
  state.SetBytesProcessed(n * static_cast<int64_t>(kLayout.raw_bytes()));
  return secs > 0 ? n * static_cast<double>(kLayout.raw_bytes()) / secs / 1e9 : 0;
}

void BM_Memcpy(benchmark::State& state) {
  const auto& src = Chunk();
  std::vector<std::byte> dst(src.size());
  g_memcpy_gbs = Run(state, [&] {
    std::memcpy(dst.data(), src.data(), src.size());
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  });
}

// The codec `name` on kernel table k (a lossy codec), or as MakeCodec builds it (k null: the
// best table for lossy codecs).
std::unique_ptr<Codec> Build(const std::string& name, const codecs::QuantKernels* k) {
  if (k == nullptr) return MakeCodec(name).value();
  if (name == "int8") return codecs::MakeInt8Codec(*k);
  if (name == "int4") return codecs::MakeInt4KiviCodec(*k);
  return codecs::MakeInt4G64Codec(*k);
}

std::string RowName(const std::string& name, const codecs::QuantKernels* k) {
  return k == nullptr ? name : name + " (" + k->name + ")";
}

void BM_Encode(benchmark::State& state, std::string name, const codecs::QuantKernels* k) {
  auto codec = Build(name, k);
  const auto& raw = Chunk();
  size_t encoded_bytes = 0;
  const double gbs = Run(state, [&] {
    auto enc = codec->Encode(kLayout, raw);
    if (!enc.ok()) state.SkipWithError(enc.status().ToString().c_str());
    encoded_bytes = enc.ok() ? enc->size() : 0;
    benchmark::DoNotOptimize(encoded_bytes);
  });
  Row& row = Rows()[RowName(name, k)];
  row.encode_gbs = gbs;
  row.bytes_per_token = static_cast<double>(encoded_bytes) / kLayout.n_tokens;
  state.counters["bytes_per_token"] = row.bytes_per_token;
}

void BM_Decode(benchmark::State& state, std::string name, const codecs::QuantKernels* k) {
  auto codec = Build(name, k);
  auto enc = codec->Encode(kLayout, Chunk());
  if (!enc.ok()) {
    state.SkipWithError(enc.status().ToString().c_str());
    return;
  }
  std::vector<std::byte> out(kLayout.raw_bytes());
  Rows()[RowName(name, k)].decode_gbs = Run(state, [&] {
    const Status s = codec->Decode(kLayout, *enc, out);
    if (!s.ok()) state.SkipWithError(s.ToString().c_str());
    benchmark::DoNotOptimize(out.data());
  });
}

const char* kCodecs[] = {"raw",           "int8",      "int4",        "int4-g64",
                         "zstd+raw",      "zstd+int8", "zstd+int4",   "zstd+int4-g64",
                         "cachegen-high", "cachegen",  "cachegen-low"};
const char* kLossy[] = {"int8", "int4", "int4-g64"};

void PrintSummary() {
  const double raw_per_token = static_cast<double>(kLayout.raw_bytes()) / kLayout.n_tokens;
  std::printf("\nqwen2.5-0.5b chunk (24 layers, 2 KV heads, head_dim 64, 256 tokens, f16): "
              "%.0f raw bytes/token; memcpy %.2f GB/s; kernels %s\n",
              raw_per_token, g_memcpy_gbs, codecs::BestQuantKernels().name);
  std::printf("%-22s %12s %8s %12s %9s %12s %9s\n", "codec", "bytes/token", "of raw",
              "encode GB/s", "/memcpy", "decode GB/s", "/memcpy");
  for (const auto& [name, row] : Rows()) {
    std::printf("%-22s %12.1f %7.1f%% %12.2f %9.3f %12.2f %9.3f\n", name.c_str(),
                row.bytes_per_token, 100 * row.bytes_per_token / raw_per_token, row.encode_gbs,
                row.encode_gbs / g_memcpy_gbs, row.decode_gbs, row.decode_gbs / g_memcpy_gbs);
  }
}

}  // namespace
}  // namespace cachette::cache

int main(int argc, char** argv) {
  using namespace cachette::cache;
  benchmark::RegisterBenchmark("memcpy", BM_Memcpy)->UseRealTime();
  for (const char* name : kCodecs) {
    const codecs::QuantKernels* best = nullptr;  // MakeCodec's own choice
    benchmark::RegisterBenchmark((std::string("encode/") + name).c_str(), BM_Encode,
                                 std::string(name), best)->UseRealTime();
    benchmark::RegisterBenchmark((std::string("decode/") + name).c_str(), BM_Decode,
                                 std::string(name), best)->UseRealTime();
  }
  // The other tables of the lossy codecs: scalar always, AVX2 where the CPU has it (when AVX2
  // is the best table this repeats the rows above under its own name).
  for (const codecs::QuantKernels* k :
       {&codecs::ScalarQuantKernels(), codecs::Avx2QuantKernels()}) {
    if (k == nullptr) continue;
    for (const char* name : kLossy) {
      benchmark::RegisterBenchmark((std::string("encode_") + k->name + "/" + name).c_str(),
                                   BM_Encode, std::string(name), k)->UseRealTime();
      benchmark::RegisterBenchmark((std::string("decode_") + k->name + "/" + name).c_str(),
                                   BM_Decode, std::string(name), k)->UseRealTime();
    }
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  PrintSummary();
  return 0;
}
