// `cachette bench cache`: time to first token for a long prompt restored from each tier of the
// chunk store (RAM, disk, Redis) against a cold prefill, measured in one run.
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "cli/cli.h"
#include "core/timer.h"
#include "core/units.h"
#include "engine/engine.h"
#include "kv/tiered_prefix.h"

namespace cachette::cli {
namespace {

struct BenchCacheArgs {
  std::string model;
  int threads = 0;
  int n_prompt = 4096;
  int chunk_tokens = 256;
  std::string kv_type = "f16";
  std::string codec = "raw";
  std::string disk_dir;
  std::vector<std::string> redis;
  int reps = 3;
  bool json = false;
};

int BenchCache(const BenchCacheArgs& a) {
  const std::string path = a.model.empty() ? DefaultModelPath() : a.model;
  auto model_or = Model::Load(path);
  if (!model_or.ok()) return Fail(model_or.status());
  const Model& model = **model_or;
  auto kv_type = ParseKvType(a.kv_type);
  if (!kv_type.ok()) return Fail(kv_type.status());
  if (a.n_prompt > model.config().n_ctx_train) {
    return Fail(InvalidArgument("-p exceeds the model's context"));
  }
  EngineOptions eo;
  eo.threads = a.threads;
  eo.kv_type = *kv_type;
  Engine engine(model, eo);
  KvManagerOptions ko;
  ko.shape = engine.kv_shape();
  ko.page_tokens = 16;
  ko.budget_bytes = PagePool::PageBytes(ko.shape, 16) * ((a.n_prompt + 15) / 16 * 2 + 4);
  const auto prompt = PseudoRandomTokens(a.n_prompt, model.config().n_vocab, 424242);
  const Hash128 kv_ns = KvNamespace(model.Fingerprint(), *kv_type);
  const Hash128 store_ns = CacheNamespace(model, *kv_type);
  std::vector<float> logits(model.config().n_vocab);
  std::string dir = a.disk_dir;
  const bool own_dir = dir.empty();
  if (own_dir) {
    dir = (std::filesystem::temp_directory_path() /
           ("cachette_bench_cache_" + std::to_string(getpid())))
              .string();
  }
  std::filesystem::create_directories(dir);
  const uint64_t chunk_bytes_total =
      static_cast<uint64_t>(a.n_prompt) * ko.shape.token_bytes() * 2 * ko.shape.n_layer;

  auto open = [&](bool ram, bool disk, bool redis) -> Result<std::unique_ptr<Cache>> {
    CacheOptions o;
    o.chunk_tokens = a.chunk_tokens;
    o.ram_budget_bytes = ram ? chunk_bytes_total * 2 + (64 << 20) : 0;
    o.disk_dir = disk ? dir : "";
    o.disk_budget_bytes = chunk_bytes_total * 2 + (64 << 20);
    if (redis) o.redis_urls = a.redis;
    o.codec = a.codec;
    o.remote_lookup_timeout = std::chrono::milliseconds(2000);
    return Cache::Open(o);
  };

  // Cold: the whole prompt prefilled; its chunks then go to every tier (write-through).
  std::vector<double> cold_s;
  {
    auto cache = open(true, true, !a.redis.empty());
    if (!cache.ok()) return Fail(cache.status());
    for (int rep = 0; rep < a.reps; ++rep) {
      KvManager kvm(ko);
      auto seq = kvm.Start(kv_ns, prompt, a.n_prompt + 1);
      Stopwatch sw;
      Status s = engine.Forward(*seq, prompt, logits.data());
      if (!s.ok()) return Fail(s);
      cold_s.push_back(sw.Seconds());
      if (rep == 0) {
        TieredPrefix tiers(**cache, kvm);
        tiers.Save(*seq, prompt, store_ns);
      }
    }
    Status f = (*cache)->Flush();
    if (!f.ok()) return Fail(f);
  }
  struct Row {
    std::string tier;
    double ttft_s;
    int64_t restored;
  };
  std::vector<Row> rows;
  auto measure = [&](const std::string& name, bool ram, bool disk, bool redis) -> Status {
    std::vector<double> times;
    int64_t restored = 0;
    for (int rep = 0; rep < a.reps; ++rep) {
      // A fresh store object per repetition. For RAM, a first restore through it promotes the
      // disk copies into its RAM tier; disk and Redis are read from scratch (the OS page cache
      // may still hold the disk files: disk figures are for a warm OS cache).
      CT_ASSIGN_OR_RETURN(auto cache, open(ram, disk, redis));
      if (ram) {
        KvManager warm(ko);
        TieredPrefix t(*cache, warm);
        auto s0 = warm.Start(kv_ns, prompt, a.n_prompt + 1);
        t.Restore(*s0, prompt, store_ns,
                  std::chrono::steady_clock::now() + std::chrono::seconds(30));
      }
      KvManager kvm(ko);
      TieredPrefix tiers(*cache, kvm);
      Stopwatch sw;
      auto seq = kvm.Start(kv_ns, prompt, a.n_prompt + 1);
      auto r = tiers.Restore(*seq, prompt, store_ns,
                             std::chrono::steady_clock::now() + std::chrono::seconds(30));
      int64_t from = seq->n_tokens();
      if (from == a.n_prompt) seq->SetTokens(--from);
      CT_RETURN_IF_ERROR(engine.Forward(*seq, std::span(prompt).subspan(from), logits.data()));
      times.push_back(sw.Seconds());
      restored = r.tokens;
    }
    rows.push_back({name, Median(times), restored});
    return Status::Ok();
  };
  Status s = measure("ram", true, true, false);
  if (s.ok()) s = measure("disk", false, true, false);
  if (s.ok() && !a.redis.empty()) s = measure("redis", false, false, true);
  if (own_dir) std::filesystem::remove_all(dir);
  if (!s.ok()) return Fail(s);
  const double cold = Median(cold_s);
  if (a.json) {
    nlohmann::json j = {{"model", path}, {"n_prompt", a.n_prompt}, {"kv_type", a.kv_type},
                        {"codec", a.codec}, {"chunk_tokens", a.chunk_tokens},
                        {"cold_ttft_ms", cold * 1e3}};
    for (const auto& r : rows) {
      j["restored"][r.tier] = {{"ttft_ms", r.ttft_s * 1e3},
                               {"of_cold", r.ttft_s / cold},
                               {"restored_tokens", r.restored}};
    }
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf("model %s, %d-token prompt, %s KV (%s of chunks), codec %s, median of %d\n",
                path.c_str(), a.n_prompt, a.kv_type.c_str(),
                FormatBytes(chunk_bytes_total).c_str(), a.codec.c_str(), a.reps);
    std::printf("cold prefill          TTFT %9.1f ms\n", cold * 1e3);
    for (const auto& r : rows) {
      std::printf("restored from %-6s  TTFT %9.1f ms = %5.1f%% of cold (%lld tokens restored)\n",
                  r.tier.c_str(), r.ttft_s * 1e3, 100.0 * r.ttft_s / cold,
                  static_cast<long long>(r.restored));
    }
  }
  return 0;
}

}  // namespace

Runner AddBenchCacheSubcommand(CLI::App* bench) {
  auto a = std::make_shared<BenchCacheArgs>();
  CLI::App* c = bench->add_subcommand("cache", "TTFT restored from RAM, disk, Redis vs cold");
  c->add_option("-m,--model", a->model, "GGUF model (default: the bundled cachette-tiny)");
  c->add_option("--threads", a->threads, "Compute threads (0 = one per core)");
  c->add_option("-p", a->n_prompt, "Prompt tokens")->check(CLI::Range(1, 1 << 20));
  c->add_option("--chunk-tokens", a->chunk_tokens, "Tokens per chunk (multiple of 16)");
  c->add_option("--kv-type", a->kv_type, "KV element type: f32, f16, q8_0");
  c->add_option("--codec", a->codec, "Codec for disk and Redis: raw, int8, int4, zstd+raw, ...");
  c->add_option("--disk-dir", a->disk_dir, "Disk tier directory (default: a temporary one)");
  c->add_option("--redis", a->redis, "Redis URL (repeatable; redis+cluster:// for a cluster)");
  c->add_option("--reps", a->reps, "Repetitions (the median is reported)")
      ->check(CLI::Range(1, 100));
  c->add_flag("--json", a->json, "Print one JSON object");
  return [a, c]() -> int { return c->parsed() ? BenchCache(*a) : -1; };
}

}  // namespace cachette::cli
