// `cachette bench segment-load`: CacheBlend's pipeline and loading controller, measured in one
// run. A RAG prompt (BOS, --docs documents of --doc-tokens tokens cut from natural text, a
// question) whose documents were computed on their own and filed in a tier (a disk directory,
// or Redis behind an optional simulated link, --link-mbps) is prefilled with blend at
// --ratio, the documents read back from the tier:
//   whole       the load first (every band of every document), then the blend
//   pipelined   the blend starts once the first band of layers is in and computes each layer
//               while the next loads (PrefillWithSegments' SegmentLoad::await_layer)
//   controller  pipelined, with the loading controller raising the ratio to what hides under
//               the load (SegmentLoad::load_left_us)
// beside full prefill and the blend with the documents in memory. Reported per row: the
// median time to the first token's logits, its ratio to full prefill, the load's own time
// (whole), the time the prefill waited for a layer, the ratio applied, the tokens recomputed,
// and the first token's KL(full || row) in nats (the controller's quality gain).
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli/cli.h"
#include "cli/slow_link.h"
#include "core/timer.h"
#include "engine/segment_reuse.h"
#include "eval/rag.h"
#include "sched/tier_bridge.h"

namespace cachette::cli {
namespace {

struct SegmentLoadArgs {
  std::string model;
  std::string text = std::string(CACHETTE_SHARED_DIR) + "/eval/heldout-text.txt";
  int threads = 0;
  int docs = 8;
  int doc_tokens = 512;
  double ratio = 0.15;
  int reps = 3;
  int chunk_tokens = 256;
  std::string kv_type = "f16";
  std::string disk_dir;
  std::vector<std::string> redis;
  std::vector<double> link_mbps = {0};  // 0: the tier as it is
  bool json = false;
};

struct Row {
  explicit Row(std::string l) : label(std::move(l)) {}
  std::string label;
  std::vector<double> ms, load_ms, wait_ms;
  double ratio = 0;
  int64_t recomputed = 0;
  double kl = 0;
};

int BenchSegmentLoad(const SegmentLoadArgs& a) {
  if (a.redis.empty()) {
    for (double l : a.link_mbps) {
      if (l > 0) return Fail(InvalidArgument("--link-mbps needs --redis (it slows Redis reads)"));
    }
  }
  auto loaded = LoadEngine(a.model, a.kv_type, a.threads);
  if (!loaded.ok()) return Fail(loaded.status());
  Engine& engine = *loaded->engine;
  const Model& model = *loaded->model;
  const ModelConfig& c = model.config();
  const Tokenizer& tok = model.tokenizer();
  if (Status s = CheckKvRewritable(engine.kv_shape(), "segment reuse"); !s.ok()) return Fail(s);

  // The documents: consecutive slices of the text; the question: a fixed line.
  std::ifstream f(a.text, std::ios::binary);
  if (!f) return Fail(IOError("cannot open " + a.text));
  std::ostringstream ss;
  ss << f.rdbuf();
  const std::vector<TokenId> text = tok.Encode(ss.str(), false, false);
  const int64_t need = static_cast<int64_t>(a.docs) * a.doc_tokens;
  if (static_cast<int64_t>(text.size()) < need) {
    return Fail(InvalidArgument(a.text + " holds " + std::to_string(text.size()) +
                                " tokens, fewer than --docs x --doc-tokens"));
  }
  const std::vector<TokenId> bos = {tok.bos()};
  const std::vector<TokenId> question =
      tok.Encode("\nQuestion: What is the first word of the third document?\nAnswer:", false,
                 false);
  std::vector<TokenId> prompt = bos;
  std::vector<std::vector<TokenId>> docs;
  std::vector<int64_t> offsets;
  for (int d = 0; d < a.docs; ++d) {
    docs.emplace_back(text.begin() + static_cast<int64_t>(d) * a.doc_tokens,
                      text.begin() + static_cast<int64_t>(d + 1) * a.doc_tokens);
    offsets.push_back(static_cast<int64_t>(prompt.size()));
    prompt.insert(prompt.end(), docs.back().begin(), docs.back().end());
  }
  prompt.insert(prompt.end(), question.begin(), question.end());
  const int64_t n = static_cast<int64_t>(prompt.size());
  if (n > c.n_ctx_train) {
    return Fail(InvalidArgument(std::to_string(n) + " prompt tokens exceed the model's context"));
  }

  // Each document computed on its own after BOS, kept in memory and filed in the tier.
  std::vector<SegmentKv> segs;
  for (const auto& d : docs) {
    auto s = ComputeSegment(engine, bos, d);
    if (!s.ok()) return Fail(s.status());
    segs.push_back(std::move(*s));
  }
  KvManagerOptions ko;
  ko.shape = engine.kv_shape();
  ko.page_tokens = 16;
  ko.budget_bytes = PagePool::PageBytes(ko.shape, 16) * 8;
  if (Status v = KvManager::Validate(ko); !v.ok()) return Fail(v);
  KvManager kvm(ko);
  const Hash128 ns = KvNamespace(model, loaded->kv_type, "bench-segment-load");
  std::string dir = a.disk_dir;
  const bool own_dir = dir.empty() && a.redis.empty();
  if (own_dir) {
    dir = (std::filesystem::temp_directory_path() /
           ("cachette_bench_segment_load_" + std::to_string(getpid())))
              .string();
  }
  std::unique_ptr<cache::Tier> redis_tier;
  if (!a.redis.empty()) {
    auto r = OpenBenchRedis(a.redis, 0, &redis_tier);
    if (!r.ok()) return Fail(r.status());
  }
  const uint64_t kv_bytes = static_cast<uint64_t>(n) * ko.shape.token_bytes() * 2 *
                            static_cast<uint64_t>(c.n_layer);
  auto open = [&](cache::Tier* remote) -> Result<std::unique_ptr<Cache>> {
    CacheOptions o;
    o.chunk_tokens = a.chunk_tokens;
    o.ram_budget_bytes = 0;  // segments are never kept there: every load reads the tier
    if (!dir.empty()) {
      std::filesystem::create_directories(dir);
      o.disk_dir = dir;
      o.disk_budget_bytes = kv_bytes * 4 + (64 << 20);
    }
    o.remote_tier = remote;
    o.remote_lookup_timeout = std::chrono::milliseconds(5000);
    return Cache::Open(o);
  };

  std::vector<float> logits(c.n_vocab);
  std::vector<double> full_logp, row_logp;  // log-softmax of full prefill's and a row's
  nlohmann::json out;
  out["model"] = loaded->path;
  out["prompt_tokens"] = n;
  out["docs"] = a.docs;
  out["doc_tokens"] = a.doc_tokens;
  out["ratio"] = a.ratio;
  out["tier"] = a.redis.empty() ? "disk" : "redis";
  out["kv_bytes"] = kv_bytes;
  const ReuseOptions base{.mode = ReuseMode::kBlend, .ratio = a.ratio};
  const std::chrono::seconds deadline_after = std::chrono::seconds(120);
  std::vector<sched::SegmentRef> refs;
  for (const auto& d : docs) refs.push_back({d, ContextId(bos)});

  // Full prefill, once to warm up and then timed; its logits are the KL reference.
  Row full{"full prefill"}, ram{"blend, in memory"};
  for (int rep = 0; rep <= a.reps; ++rep) {
    auto seq = engine.NewSequence(n + 1);
    Stopwatch sw;
    if (Status s = engine.Forward(*seq, prompt, logits.data()); !s.ok()) return Fail(s);
    if (rep > 0) full.ms.push_back(sw.Seconds() * 1e3);
  }
  eval::LogSoftmax(logits, full_logp);
  full.ratio = 1;
  // A sequence holding BOS (in every row it is there before the clock starts).
  auto with_bos = [&]() -> Result<std::unique_ptr<SequenceKv>> {
    auto seq = engine.NewSequence(n + 1);
    CT_RETURN_IF_ERROR(engine.Forward(*seq, bos, nullptr));
    return std::unique_ptr<SequenceKv>(std::move(seq));
  };
  // The blend of `seq` with the documents `kv`, timed from `sw`'s start.
  auto blend = [&](Row& row, SequenceKv& seq, std::span<const SegmentKv* const> kv,
                   const SegmentLoad* load, const Stopwatch& sw) -> Status {
    std::vector<SegmentUse> uses;
    for (size_t i = 0; i < kv.size(); ++i) uses.push_back({offsets[i], kv[i]});
    ReuseReport rep;
    CT_RETURN_IF_ERROR(
        PrefillWithSegments(engine, seq, prompt, uses, base, logits.data(), &rep, load));
    row.ms.push_back(sw.Seconds() * 1e3);
    row.wait_ms.push_back(static_cast<double>(rep.load_wait_us) / 1e3);
    row.ratio = rep.ratio;
    row.recomputed = rep.recomputed_tokens;
    eval::LogSoftmax(logits, row_logp);
    row.kl = eval::KlDivergence(full_logp, row_logp);
    return Status::Ok();
  };
  {
    std::vector<const SegmentKv*> kv;
    for (const SegmentKv& s : segs) kv.push_back(&s);
    for (int rep = 0; rep < a.reps; ++rep) {
      auto seq = with_bos();
      if (!seq.ok()) return Fail(seq.status());
      Stopwatch sw;
      if (Status s = blend(ram, **seq, kv, nullptr, sw); !s.ok()) return Fail(s);
    }
  }

  for (double mbps : a.link_mbps) {
    std::unique_ptr<cache::Tier> link;
    if (mbps > 0) link = std::make_unique<SlowLink>(*redis_tier, mbps * 1e6 / 8);
    auto cache = open(link != nullptr ? link.get() : redis_tier.get());
    if (!cache.ok()) return Fail(cache.status());
    sched::TierBridge bridge(kvm, **cache);
    if (Status v = sched::TierBridge::Validate(**cache, kvm); !v.ok()) return Fail(v);
    for (const SegmentKv& s : segs) bridge.SaveSegment(ns, s);
    if (Status s = (*cache)->Flush(); !s.ok()) return Fail(s);
    Row whole{"whole"}, piped{"pipelined"}, ctl{"controller"};
    for (int rep = 0; rep < a.reps; ++rep) {
      for (Row* row : {&whole, &piped, &ctl}) {
        auto seq = with_bos();
        if (!seq.ok()) return Fail(seq.status());
        Stopwatch sw;
        std::shared_ptr<sched::PendingSegments> p =
            bridge.StartSegmentLoad(ns, refs, std::chrono::steady_clock::now() + deadline_after);
        if (p == nullptr) return Fail(Unavailable("the store has no tier to load from"));
        const bool pipelined = row != &whole;
        if (!(pipelined ? p->WaitPublished(std::chrono::steady_clock::now() + deadline_after)
                        : p->WaitUntil(std::chrono::steady_clock::now() + deadline_after))) {
          return Fail(DeadlineExceeded("the segment load did not finish"));
        }
        if (!pipelined) row->load_ms.push_back(sw.Seconds() * 1e3);
        std::vector<std::shared_ptr<const SegmentKv>> held;
        std::vector<const SegmentKv*> kv;
        for (const auto& r : refs) {
          held.push_back(p->Found(r.tokens, r.context));
          if (held.back() == nullptr) {
            return Fail(NotFound("a document was not found in the tier"));
          }
          kv.push_back(held.back().get());
        }
        SegmentLoad load;
        if (pipelined) {
          load.await_layer = [&](int l) {
            return p->AwaitLayer(l, std::chrono::steady_clock::now() + deadline_after);
          };
        }
        if (row == &ctl) load.load_left_us = [&] { return p->load_left_us(); };
        if (Status s = blend(*row, **seq, kv, pipelined ? &load : nullptr, sw); !s.ok()) {
          return Fail(s);
        }
        p->WaitUntil(std::chrono::steady_clock::now() + deadline_after);
      }
    }
    const std::vector<Row> rows = {full, ram, whole, piped, ctl};
    const double base_ms = Median(full.ms);
    nlohmann::json j;
    j["link_mbps"] = mbps;
    for (const Row& r : rows) {
      j["rows"].push_back({{"label", r.label},
                           {"ms", Median(r.ms)},
                           {"vs_full", Median(r.ms) / base_ms},
                           {"load_ms", Median(r.load_ms)},
                           {"wait_ms", Median(r.wait_ms)},
                           {"ratio", r.ratio},
                           {"recomputed", r.recomputed},
                           {"kl", r.kl}});
    }
    out["links"].push_back(j);
    if (!a.json) {
      std::printf("segment load: %s, %lld prompt tokens (%d documents of %d, %s KV, %.1f MiB), "
                  "blend %.2f, %s%s, %d reps (median)\n",
                  loaded->path.c_str(), static_cast<long long>(n), a.docs, a.doc_tokens,
                  std::string(kernels::KvTypeName(loaded->kv_type)).c_str(),
                  static_cast<double>(kv_bytes) / (1 << 20), a.ratio,
                  a.redis.empty() ? "disk" : "Redis",
                  mbps > 0 ? (" through a " + std::to_string(static_cast<int>(mbps)) +
                              " Mbit/s link")
                                 .c_str()
                           : "",
                  a.reps);
      std::printf("  %-18s %10s %8s %9s %9s %6s %10s %8s\n", "row", "ms", "vs full", "load ms",
                  "wait ms", "ratio", "recomputed", "KL");
      for (const Row& r : rows) {
        std::printf("  %-18s %10.1f %8.3f %9.1f %9.1f %6.3f %10lld %8.4f\n", r.label.c_str(),
                    Median(r.ms), Median(r.ms) / base_ms, Median(r.load_ms), Median(r.wait_ms),
                    r.ratio, static_cast<long long>(r.recomputed), r.kl);
      }
    }
    (void)(*cache)->Clear(sched::SegmentNamespace(ns));
  }
  if (own_dir) std::filesystem::remove_all(dir);
  if (a.json) std::printf("%s\n", out.dump().c_str());
  return 0;
}

}  // namespace

Runner AddBenchSegmentLoadSubcommand(CLI::App* bench) {
  auto a = std::make_shared<SegmentLoadArgs>();
  CLI::App* k = bench->add_subcommand(
      "segment-load",
      "Blend with its documents read from a tier: whole load, pipelined, loading controller");
  k->add_option("-m,--model", a->model, "GGUF model (default: the bundled cachette-tiny)");
  k->add_option("--text", a->text, "Document text (default ../shared/eval/heldout-text.txt)");
  k->add_option("--threads", a->threads, "Compute threads (0 = one per core)");
  k->add_option("--docs", a->docs, "Documents")->check(CLI::Range(1, 256));
  k->add_option("--doc-tokens", a->doc_tokens, "Tokens per document")->check(CLI::Range(1, 65536));
  k->add_option("--ratio", a->ratio, "Blend's recompute ratio")->check(CLI::Range(0.0, 1.0));
  k->add_option("--reps", a->reps, "Repetitions (median)")->check(CLI::Range(1, 1000));
  k->add_option("--chunk-tokens", a->chunk_tokens, "Tokens per stored chunk (256)")
      ->check(CLI::Range(16, 65536));
  k->add_option("--kv-type", a->kv_type, "KV element type: f32, f16");
  k->add_option("--disk-dir", a->disk_dir, "Disk tier directory (default: a temporary one)");
  k->add_option("--redis", a->redis, "Redis URL: read the documents from Redis, not disk");
  k->add_option("--link-mbps", a->link_mbps,
                "Simulated link bandwidths for the Redis reads, comma-separated (0: none)")
      ->delimiter(',')
      ->check(CLI::Range(0.0, 1e6));
  k->add_flag("--json", a->json, "Print one JSON object");
  return [a, k] { return k->parsed() ? BenchSegmentLoad(*a) : -1; };
}

}  // namespace cachette::cli
