// cachette: an LLM inference server whose heart is a KV-cache engine.
#include <cstdio>
#include <filesystem>
#include <vector>

#include "cli/cli.h"
#include "cli/cpu_info.h"
#include "core/log.h"

namespace cachette::cli {

std::string DefaultModelPath() {
  if (const char* e = std::getenv("CACHETTE_MODEL"); e != nullptr && *e) return e;
  const std::string file = "cachette-tiny-q8_0.gguf";
  namespace fs = std::filesystem;
  // Installed: <prefix>/bin/cachette next to <prefix>/share/cachette/models/ (the relative path
  // comes from CMake's install dirs), found through /proc/self/exe wherever it is run from.
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    const fs::path p = exe.parent_path() / CACHETTE_INSTALL_MODEL_DIR / file;
    if (fs::exists(p, ec)) return p.lexically_normal().string();
  }
  const std::string bundled = "models/" + file;
  for (const std::string& dir : {std::string(CACHETTE_SOURCE_DIR), std::string(".")}) {
    fs::path p = fs::path(dir) / bundled;
    if (fs::exists(p, ec)) return p.string();
  }
  return bundled;
}

Result<kernels::WType> ParseWType(const std::string& s) {
  for (auto t : {kernels::WType::kF32, kernels::WType::kF16, kernels::WType::kBF16,
                 kernels::WType::kQ8_0, kernels::WType::kQ4_0}) {
    if (s == kernels::WTypeName(t)) return t;
  }
  return InvalidArgument("unknown weight type '" + s + "' (f32, f16, bf16, q8_0, q4_0)");
}

Result<kernels::KvType> ParseKvType(const std::string& s) {
  if (const std::optional<kernels::KvType> t = kernels::KvTypeFromName(s)) return *t;
  if (s == "q4") return kernels::KvType::kQ4_0;  // the 4-bit type, as the agent-memory papers say
  return InvalidArgument("unknown KV type '" + s + "' (f32, f16, q8_0, q4_0 or q4, q4_1, kivi4)");
}

Status CheckKvTypeFits(kernels::KvType t, const Model& model) {
  const int head_dim = model.config().head_dim;
  if (head_dim % kernels::KvTypeBlockElems(t) != 0) {
    return InvalidArgument(
        "KV type " + std::string(kernels::KvTypeName(t)) + " stores head vectors in blocks of " +
        std::to_string(kernels::KvTypeBlockElems(t)) + " but the model's head_dim is " +
        std::to_string(head_dim) + " (use f16)");
  }
  return Status::Ok();
}

Status CheckKvRecent(kernels::KvType t, int kv_recent) {
  if (kv_recent < -1 || kv_recent > 65536) {
    return InvalidArgument("--kv-recent " + std::to_string(kv_recent) +
                           " is out of range [0, 65536]");
  }
  if (kv_recent > 0 && (t == kernels::KvType::kF32 || t == kernels::KvType::kF16)) {
    return InvalidArgument("--kv-recent keeps the newest tokens of a quantized KV type in f16; " +
                           std::string(kernels::KvTypeName(t)) + " KV has nothing to keep");
  }
  return Status::Ok();
}

Result<LoadedEngine> LoadEngine(const std::string& model, const std::string& kv_type,
                                int threads, int kv_recent) {
  LoadedEngine l;
  l.path = model.empty() ? DefaultModelPath() : model;
  CT_ASSIGN_OR_RETURN(l.kv_type, ParseKvType(kv_type));
  CT_RETURN_IF_ERROR(CheckKvRecent(l.kv_type, kv_recent));
  CT_ASSIGN_OR_RETURN(const gguf::Residence residence, WeightResidence(l.path));
  CT_ASSIGN_OR_RETURN(l.model, Model::Load(l.path, residence));
  CT_RETURN_IF_ERROR(CheckKvTypeFits(l.kv_type, *l.model).WithContext(l.path));
  EngineOptions eo;
  eo.threads = threads;
  eo.kv_type = l.kv_type;
  eo.kv_recent = kv_recent;
  l.engine = std::make_unique<Engine>(*l.model, eo);
  return l;
}

int Fail(const Status& s) {
  std::fprintf(stderr, "error: %s\n", s.ToString().c_str());
  return 1;
}

}  // namespace cachette::cli

int main(int argc, char** argv) {
  using namespace cachette::cli;
  // CACHETTE_LOG is read when something first logs; read it now, so that a value it does not
  // know is named at once whatever the command (CACHETTE_ISA and CACHETTE_Q8_DECODE are read
  // at start-up by the kernels).
  (void)cachette::MinLogLevel();
  CLI::App app{"cachette: an LLM inference server whose heart is a KV-cache engine"};
  app.require_subcommand(1);
  std::vector<std::pair<CLI::App*, Runner>> commands;
  auto add = [&](Runner (*fn)(CLI::App&)) {
    const size_t before = app.get_subcommands({}).size();
    Runner r = fn(app);
    commands.emplace_back(app.get_subcommands({})[before], std::move(r));
  };
  add(AddRunCommand);
  add(AddTokenizeCommand);
  add(AddModelCommand);
  add(AddBenchCommand);
  add(AddCacheCommand);
  add(AddServeCommand);
  add(AddBatchCommand);
  add(AddRouteCommand);
  add(AddEvalCommand);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  for (auto& [cmd, run] : commands) {
    if (cmd->parsed()) return run();
  }
  return 1;
}
