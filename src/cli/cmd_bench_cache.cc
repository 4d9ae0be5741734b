// `cachette bench cache`: time to first token for a long prompt restored from each tier of the
// chunk store (RAM, disk, Redis) against a cold prefill, measured in one run. With --link-mbps
// the Redis reads pass through a simulated link of that bandwidth (the time the bytes would
// take on it is slept after each read), to show where compressed chunks (--codec, or adaptive
// --redis-levels and --disk-levels under --load-deadline-ms) restore faster than raw ones.
#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <thread>
#include <nlohmann/json.hpp>

#include "cache/redis/redis_tier.h"
#include "cli/cli.h"
#include "cli/slow_link.h"
#include "core/fp16.h"
#include "core/timer.h"
#include "core/units.h"
#include "engine/engine.h"
#include "sched/tier_bridge.h"

namespace cachette::cli {
namespace {

struct BenchCacheArgs {
  std::string model;
  int threads = 0;
  int n_prompt = 4096;
  int chunk_tokens = 256;
  std::string kv_type = "f16";
  int kv_recent = -1;
  std::string codec = "raw";
  std::string disk_dir;
  std::vector<std::string> redis;
  std::vector<std::string> redis_levels;
  std::vector<std::string> disk_levels;
  double link_mbps = 0;        // 0: Redis as it is
  int load_deadline_ms = 30000;  // the Redis restore's deadline (and the disk's, with levels)
  int reps = 3;
  bool json = false;
  int tp_chunks = 64;  // chunks per throughput figure; 0 skips the throughput part
  std::vector<std::string> tp_codecs = {"raw", "int8", "int4", "zstd+raw"};
};


// Put/get throughput of each tier and codec over `n` chunks of KV-like f16 data (N(0,1)-ish
// values with a few outlier channels), beside the limits measured in the same run: memcpy into
// a pre-faulted buffer (RAM), sequential write+fdatasync and read of one file (disk).
// Disk figures read files the OS has cached (warm page cache); cold-read figures are in
// cache_tier_bench. Returns the figures as JSON and prints a table unless `quiet`.
Result<nlohmann::json> Throughput(const BenchCacheArgs& a, const KvShape& shape,
                                  const std::string& dir, bool quiet) {
  const int C = a.chunk_tokens, n = a.tp_chunks;
  ChunkLayout layout;
  layout.n_layer = shape.n_layer;
  layout.n_kv_head = shape.n_kv_head;
  layout.head_dim = shape.head_dim;
  layout.n_tokens = C;
  layout.kv_type = static_cast<uint32_t>(shape.type);
  const size_t chunk_bytes = layout.raw_bytes();
  const double total = static_cast<double>(chunk_bytes) * n;
  std::vector<std::vector<std::byte>> chunks(n, std::vector<std::byte>(chunk_bytes));
  uint64_t x = 99;
  for (auto& c : chunks) {
    for (size_t i = 0; i + 1 < c.size(); i += 2) {
      x = x * 6364136223846793005ull + 1442695040888963407ull;
      // Sum of 4 uniforms ~ N(0, 1/3); every 64th element x20 as an outlier channel.
      float v = 0;
      for (int k = 0; k < 4; ++k) v += static_cast<float>((x >> (16 * k)) & 0xffff) / 65536.0f;
      v = (v - 2.0f) * ((i / 2) % 64 == 0 ? 20.0f : 1.0f);
      uint16_t h = shape.type == kernels::KvType::kF16 ? Fp32ToFp16(v) : 0;
      std::memcpy(&c[i], &h, 2);
    }
  }
  std::vector<ByteSpan> spans;
  for (const auto& c : chunks) spans.emplace_back(c.data(), c.size());
  const auto tokens = PseudoRandomTokens(n * C, 50000, 777);
  const Hash128 ns{0x5eed, 0xbe4c};

  nlohmann::json out;
  {  // memcpy into a pre-faulted destination
    std::vector<std::byte> dst(chunk_bytes * n, std::byte{1});
    Stopwatch sw;
    for (int i = 0; i < n; ++i) std::memcpy(dst.data() + i * chunk_bytes, chunks[i].data(), chunk_bytes);
    out["memcpy_gb_s"] = total / sw.Seconds() / 1e9;
  }
  {  // sequential file write (+ fdatasync) and read
    const std::string f = dir + "/seq.bin";
    int fd = ::open(f.c_str(), O_CREAT | O_TRUNC | O_WRONLY, 0644);
    if (fd < 0) return IOError("cannot create " + f);
    Stopwatch sw;
    for (const auto& c : chunks) {
      if (::write(fd, c.data(), c.size()) != static_cast<ssize_t>(c.size())) {
        ::close(fd);
        return IOError("write to " + f + " failed");
      }
    }
    ::fdatasync(fd);
    out["disk_seq_write_gb_s"] = total / sw.Seconds() / 1e9;
    ::close(fd);
    fd = ::open(f.c_str(), O_RDONLY);
    std::vector<std::byte> buf(chunk_bytes);
    sw.Reset();
    while (::read(fd, buf.data(), buf.size()) > 0) {
    }
    out["disk_seq_read_warm_gb_s"] = total / sw.Seconds() / 1e9;
    ::close(fd);
    std::filesystem::remove(f);
  }
  struct Config {
    std::string tier, codec;
  };
  std::vector<Config> configs = {{"ram", "raw"}};
  for (const auto& c : a.tp_codecs) configs.push_back({"disk", c});
  if (!a.redis.empty()) {
    for (const auto& c : a.tp_codecs) configs.push_back({"redis", c});
  }
  if (!quiet) {
    std::printf("chunk store throughput: %d chunks of %d tokens (%s each)\n", n, C,
                FormatBytes(chunk_bytes).c_str());
    std::printf("  memcpy %.2f GB/s; disk sequential write+fdatasync %.2f GB/s, read (warm) "
                "%.2f GB/s\n",
                out["memcpy_gb_s"].get<double>(), out["disk_seq_write_gb_s"].get<double>(),
                out["disk_seq_read_warm_gb_s"].get<double>());
  }
  int run = 0;
  for (const Config& cfg : configs) {
    CacheOptions o;
    o.chunk_tokens = C;
    o.ram_budget_bytes = cfg.tier == "ram" ? chunk_bytes * (n + 8) : 0;
    const std::string sub = dir + "/tp" + std::to_string(run++);
    if (cfg.tier == "disk") {
      std::filesystem::create_directories(sub);
      o.disk_dir = sub;
      o.disk_budget_bytes = chunk_bytes * (n + 8) * 2;
    }
    if (cfg.tier == "redis") o.redis_urls = a.redis;
    o.codec = cfg.codec;
    o.io_queue_capacity = static_cast<size_t>(n) + 16;
    o.remote_lookup_timeout = std::chrono::milliseconds(5000);
    CT_ASSIGN_OR_RETURN(auto store, Cache::Open(o));
    const Hash128 cns{ns.lo + static_cast<uint64_t>(run), ns.hi};  // fresh keys per config
    Stopwatch sw;
    CT_RETURN_IF_ERROR(store->Put(cns, tokens, 0, layout, spans));
    CT_RETURN_IF_ERROR(store->Flush());
    const double put_s = sw.Seconds();
    sw.Reset();
    auto load = store->Get(cns, tokens, 0, n,
                           std::chrono::steady_clock::now() + std::chrono::seconds(60));
    load->Wait();
    const double get_s = sw.Seconds();
    const size_t got = load->ready_tokens() / C;
    const CacheStats st = store->Stats();
    const int ti = cfg.tier == "ram" ? 0 : cfg.tier == "disk" ? 1 : 2;
    const double stored = static_cast<double>(st.tier[ti].bytes_in);  // written to the tier
    nlohmann::json row = {{"tier", cfg.tier},
                          {"codec", cfg.codec},
                          {"put_gb_s", total / put_s / 1e9},
                          {"get_gb_s", total / get_s / 1e9},
                          {"chunks_read", got},
                          {"stored_bytes_per_token", stored / (static_cast<double>(n) * C)}};
    if (!quiet) {
      std::printf("  %-5s %-9s put %7.2f GB/s  get %8.2f GB/s  %6.0f stored bytes/token%s\n",
                  cfg.tier.c_str(), cfg.codec.c_str(), row["put_gb_s"].get<double>(),
                  row["get_gb_s"].get<double>(), row["stored_bytes_per_token"].get<double>(),
                  got == static_cast<size_t>(n) ? "" : "  (INCOMPLETE READ)");
    }
    out["tiers"].push_back(row);
    if (cfg.tier == "redis") CT_RETURN_IF_ERROR(store->Clear(cns));
    store.reset();
    std::filesystem::remove_all(sub);
  }
  return out;
}

int BenchCache(const BenchCacheArgs& a) {
  auto loaded = LoadEngine(a.model, a.kv_type, a.threads, a.kv_recent);
  if (!loaded.ok()) return Fail(loaded.status());
  const std::string& path = loaded->path;
  const Model& model = *loaded->model;
  Engine& engine = *loaded->engine;
  const kernels::KvType kv_type = loaded->kv_type;
  if (a.n_prompt > model.config().n_ctx_train) {
    return Fail(InvalidArgument("-p exceeds the model's context"));
  }
  KvManagerOptions ko;
  ko.shape = engine.kv_shape();
  ko.page_tokens = kv_type == kernels::KvType::kKivi4 ? kernels::kKiviGroup : 16;  // whole groups
  const int P = ko.page_tokens;
  ko.budget_bytes = PagePool::PageBytes(ko.shape, P) * ((a.n_prompt + P - 1) / P * 2 + 4);
  if (Status v = KvManager::Validate(ko); !v.ok()) return Fail(v);
  const auto prompt = PseudoRandomTokens(a.n_prompt, model.config().n_vocab, 424242);
  const Hash128 kv_ns = KvNamespace(model, kv_type);
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

  // Redis, behind the simulated link when asked for.
  std::unique_ptr<cache::Tier> redis_tier, link;
  if (!a.redis.empty()) {
    auto r = OpenBenchRedis(a.redis, a.link_mbps, &redis_tier);
    if (!r.ok()) return Fail(r.status());
    link = std::move(*r);
  }
  auto open = [&](bool ram, bool disk, bool redis) -> Result<std::unique_ptr<Cache>> {
    CacheOptions o;
    o.chunk_tokens = a.chunk_tokens;
    o.ram_budget_bytes = ram ? chunk_bytes_total * 2 + (64 << 20) : 0;
    o.disk_dir = disk ? dir : "";
    o.disk_budget_bytes = chunk_bytes_total * 2 + (64 << 20);
    // Every store over the directory reads the levels: one without them removes their files.
    if (disk) o.disk_levels = a.disk_levels;
    if (redis) o.remote_tier = link != nullptr ? link.get() : redis_tier.get();
    if (redis) o.remote_levels = a.redis_levels;
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
        sched::TierBridge tiers(kvm, **cache);
        seq->SealWindow();  // a windowed KV type's f16 tail is stored too
        tiers.Save(*seq, prompt, 0);
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
        sched::TierBridge t(warm, *cache);
        auto s0 = warm.Start(kv_ns, prompt, a.n_prompt + 1);
        t.RestoreNow(*s0, prompt, std::chrono::steady_clock::now() + std::chrono::seconds(30));
      }
      KvManager kvm(ko);
      sched::TierBridge tiers(kvm, *cache);
      Stopwatch sw;
      auto seq = kvm.Start(kv_ns, prompt, a.n_prompt + 1);
      const int64_t radix = seq->n_tokens();
      // The deadline the adaptive levels are picked against: Redis's, the disk's with levels.
      const bool bounded = redis || (!ram && disk && !a.disk_levels.empty());
      const auto deadline = std::chrono::milliseconds(bounded ? a.load_deadline_ms : 30000);
      tiers.RestoreNow(*seq, prompt, std::chrono::steady_clock::now() + deadline);
      restored = seq->n_tokens() - radix;  // what the tier gave; the rest is prefilled
      int64_t from = seq->n_tokens();
      if (from == a.n_prompt) seq->SetTokens(--from);
      CT_RETURN_IF_ERROR(engine.Forward(*seq, std::span(prompt).subspan(from), logits.data()));
      times.push_back(sw.Seconds());
    }
    rows.push_back({name, Median(times), restored});
    return Status::Ok();
  };
  nlohmann::json throughput;
  if (a.tp_chunks > 0) {
    auto tp = Throughput(a, ko.shape, dir, a.json);
    if (!tp.ok()) return Fail(tp.status().WithContext("throughput"));
    throughput = *tp;
  }
  Status s = measure("ram", true, true, false);
  if (s.ok()) s = measure("disk", false, true, false);
  if (s.ok() && !a.redis.empty()) s = measure("redis", false, false, true);
  if (own_dir) std::filesystem::remove_all(dir);
  if (!s.ok()) return Fail(s);
  const double cold = Median(cold_s);
  if (a.json) {
    nlohmann::json j = {{"model", path}, {"n_prompt", a.n_prompt}, {"kv_type", a.kv_type},
                        {"codec", a.codec}, {"chunk_tokens", a.chunk_tokens},
                        {"redis_levels", a.redis_levels}, {"disk_levels", a.disk_levels},
                        {"link_mbps", a.link_mbps}, {"load_deadline_ms", a.load_deadline_ms},
                        {"cold_ttft_ms", cold * 1e3}, {"throughput", throughput}};
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
    // The codec first, then the extra levels, best first.
    auto levels = [&](const std::vector<std::string>& extra) {
      std::string out = a.codec;
      for (const auto& l : extra) out += " " + l;
      return out;
    };
    if (!a.redis.empty() && (a.link_mbps > 0 || !a.redis_levels.empty())) {
      std::printf("Redis behind a %s link, levels: %s, load deadline %d ms\n",
                  a.link_mbps > 0 ? (std::to_string(a.link_mbps) + " Mbit/s").c_str()
                                  : "loopback",
                  levels(a.redis_levels).c_str(), a.load_deadline_ms);
    }
    if (!a.disk_levels.empty()) {
      std::printf("disk levels: %s, load deadline %d ms\n", levels(a.disk_levels).c_str(),
                  a.load_deadline_ms);
    }
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
  c->add_option("--kv-type", a->kv_type, "KV element type: f32, f16, q8_0, q4_0, q4_1, kivi4");
  c->add_option("--kv-recent", a->kv_recent, kKvRecentHelp);
  c->add_option("--codec", a->codec, "Codec for disk and Redis: raw, int8, int4, zstd+raw, ...");
  c->add_option("--disk-dir", a->disk_dir, "Disk tier directory (default: a temporary one)");
  c->add_option("--redis", a->redis, "Redis URL (repeatable; redis+cluster:// for a cluster)");
  c->add_option("--redis-levels", a->redis_levels,
                "Adaptive loading: more codecs written to Redis, best first")
      ->delimiter(',');
  c->add_option("--disk-levels", a->disk_levels,
                "Adaptive loading: more codecs written to disk, best first")
      ->delimiter(',');
  c->add_option("--link-mbps", a->link_mbps,
                "Simulated link to Redis, Mbit/s (reads take their bytes' time on it; 0: none)")
      ->check(CLI::Range(0.0, 1e6));
  c->add_option("--load-deadline-ms", a->load_deadline_ms,
                "Deadline of the Redis restore (and of the disk restore with --disk-levels); "
                "what is not restored by then is prefilled")
      ->check(CLI::Range(1, 3600000));
  c->add_option("--reps", a->reps, "Repetitions (the median is reported)")
      ->check(CLI::Range(1, 100));
  c->add_option("--tp-chunks", a->tp_chunks, "Chunks per put/get throughput figure (0: skip)")
      ->check(CLI::Range(0, 100000));
  c->add_option("--tp-codecs", a->tp_codecs, "Codecs for the throughput figures")->delimiter(',');
  c->add_flag("--json", a->json, "Print one JSON object");
  return [a, c]() -> int { return c->parsed() ? BenchCache(*a) : -1; };
}

}  // namespace cachette::cli
