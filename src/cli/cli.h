// The `cachette` command: shared helpers for the subcommands.
#pragma once

#include <CLI/CLI.hpp>

#include <memory>
#include <string>

#include "cachette/status.h"
#include "cachette/types.h"
#include "engine/engine.h"
#include "kernels/kernels.h"
#include "model/model.h"

namespace cachette::cli {

// The model used when no -m is given: $CACHETTE_MODEL, else the bundled
// cachette-tiny-q8_0.gguf, looked for in order: the installed copy (<exe dir>/../share/cachette/
// models/, as `cmake --install` and the Debian package lay it out), the source tree's models/,
// then ./models/.
std::string DefaultModelPath();

Result<kernels::WType> ParseWType(const std::string& s);

// The model named by -m (the bundled one when empty) and an engine over it with the given KV
// type (f32, f16, q8_0, q4_0, q4_1, kivi4) and threads: what every command that computes starts
// with. Errors name the file, the problem in it, the unknown KV type, or a KV type the model's
// head_dim does not fit.
struct LoadedEngine {
  std::string path;
  std::unique_ptr<Model> model;
  kernels::KvType kv_type = kernels::KvType::kF16;
  std::unique_ptr<Engine> engine;
};
// kv_recent: --kv-recent (-1: the type's default; CheckKvRecent's rules).
Result<LoadedEngine> LoadEngine(const std::string& model, const std::string& kv_type,
                                int threads, int kv_recent = -1);
Result<kernels::KvType> ParseKvType(const std::string& s);
// --kv-recent N: the newest N tokens of a quantized KV type kept in f16 (KvShape::recent).
// kInvalidArgument for N < -1 or above 65536, or N > 0 on f32 / f16 KV (nothing to keep).
Status CheckKvRecent(kernels::KvType t, int kv_recent);
inline constexpr const char* kKvRecentHelp =
    "Newest tokens a quantized KV type keeps in f16 (KIVI's residual; default 64 for kivi4, 0 "
    "for the others)";
// kInvalidArgument naming both when `model`'s head_dim is not a multiple of the KV type's
// block (32 for q8_0 and q4_0).
Status CheckKvTypeFits(kernels::KvType t, const Model& model);

// Benchmark helpers: the median of `v` (mean of the middle two for even sizes; 0 for none),
// and a fixed pseudo-random prompt of ids in [0, vocab - 1) (the last id, often end-of-text,
// excluded).
double Median(std::vector<double> v);
std::vector<TokenId> PseudoRandomTokens(int n, int vocab, uint64_t seed);

// Prints "error: <status>" to stderr and returns exit code 1.
int Fail(const Status& s);

// Each adds its subcommand to `app` and returns the function that runs it.
using Runner = std::function<int()>;
Runner AddRunCommand(CLI::App& app);
Runner AddTokenizeCommand(CLI::App& app);
Runner AddModelCommand(CLI::App& app);
Runner AddBenchCommand(CLI::App& app);
// `bench cache`, a subcommand of `bench`; its runner returns -1 unless it was the one parsed.
Runner AddBenchCacheSubcommand(CLI::App* bench);
// `bench serve` and `bench workload`: the OpenAI API client; same convention as above.
Runner AddBenchServeSubcommands(CLI::App* bench);
// `bench soak`: the soak test client; same convention as above.
Runner AddBenchSoakSubcommand(CLI::App* bench);
// `bench kv-pages`: paged KV memory under KV budget policies; same convention as above.
Runner AddBenchKvPagesSubcommand(CLI::App* bench);
// `bench segment-load`: segments read from a tier, whole or pipelined; same convention.
Runner AddBenchSegmentLoadSubcommand(CLI::App* bench);
Runner AddCacheCommand(CLI::App& app);
Runner AddServeCommand(CLI::App& app);
Runner AddBatchCommand(CLI::App& app);
Runner AddRouteCommand(CLI::App& app);
Runner AddEvalCommand(CLI::App& app);

}  // namespace cachette::cli
