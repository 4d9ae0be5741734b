// `cachette run`: generate a continuation of a prompt on one model.
#include <cstdio>
#include <nlohmann/json.hpp>

#include "cli/cli.h"
#include "core/thread_pool.h"
#include "engine/generate.h"
#include "kv/budget_runner.h"

namespace cachette::cli {
namespace {

struct RunArgs {
  std::string model;
  std::string prompt;
  std::string prompt_ids;
  int n = 64;
  float temp = 0.0f;
  int top_k = 0;
  float top_p = 1.0f;
  float min_p = 0.0f;
  float repeat_penalty = 1.0f;
  uint64_t seed = 0;
  int threads = 0;
  std::string kv_type = "f16";
  int kv_recent = -1;
  std::vector<std::string> stop;
  bool json = false;
  bool no_bos = false;
  std::string kv_policy;
  double kv_policy_budget = 0.2;
};

Result<std::vector<TokenId>> ParseIds(const std::string& s) {
  std::vector<TokenId> ids;
  size_t i = 0;
  while (i < s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    std::string part = s.substr(i, j - i);
    char* end = nullptr;
    errno = 0;
    long v = std::strtol(part.c_str(), &end, 10);
    if (part.empty() || *end != '\0' || errno != 0 || v < 0 || v > INT32_MAX) {
      return InvalidArgument("--prompt-ids: '" + part + "' is not a token id");
    }
    ids.push_back(static_cast<TokenId>(v));
    i = j + 1;
  }
  if (ids.empty()) return InvalidArgument("--prompt-ids is empty");
  return ids;
}

int Run(const RunArgs& a) {
  auto loaded = LoadEngine(a.model, a.kv_type, a.threads, a.kv_recent);
  if (!loaded.ok()) return Fail(loaded.status());
  const std::string& path = loaded->path;
  const Model& model = *loaded->model;
  Engine& engine = *loaded->engine;

  std::vector<TokenId> prompt;
  if (!a.prompt_ids.empty()) {
    auto ids = ParseIds(a.prompt_ids);
    if (!ids.ok()) return Fail(ids.status());
    prompt = *ids;
  } else {
    const Tokenizer& tok = model.tokenizer();
    prompt = tok.Encode(a.prompt, tok.add_bos() && !a.no_bos, /*parse_special=*/true);
  }
  if (prompt.empty()) return Fail(InvalidArgument("the prompt is empty"));

  const int64_t ctx = model.config().n_ctx_train;
  std::unique_ptr<BudgetRunner> runner;
  if (!a.kv_policy.empty()) {
    KvPolicyConfig pc;
    pc.name = a.kv_policy;
    pc.budget = a.kv_policy_budget;
    auto r = BudgetRunner::Create(engine, pc);
    if (!r.ok()) return Fail(r.status());
    runner = std::move(*r);
  } else if (static_cast<int64_t>(prompt.size()) > ctx) {
    return Fail(InvalidArgument("the prompt has " + std::to_string(prompt.size()) +
                                " tokens but the model's context is " + std::to_string(ctx)));
  }
  std::unique_ptr<ContiguousKv> kv;
  if (!runner) {
    kv = engine.NewSequence(std::min<int64_t>(ctx, prompt.size() + std::max(a.n, 0)));
  }

  GenerateOptions go;
  go.max_tokens = a.n;
  go.sampling.temperature = a.temp;
  go.sampling.top_k = a.top_k;
  go.sampling.top_p = a.top_p;
  go.sampling.min_p = a.min_p;
  go.sampling.repetition_penalty = a.repeat_penalty;
  go.sampling.seed = a.seed;
  go.stop = a.stop;
  TokenCallback stream;
  if (!a.json) {
    stream = [](TokenId, std::string_view text) {
      std::fwrite(text.data(), 1, text.size(), stdout);
      std::fflush(stdout);
      return true;
    };
  }
  Result<GenerateResult> res = InvalidArgument("no generation");
  if (runner) {
    // Under a KV budget policy: its runner reads the prompt and each token; a policy that
    // reassigns positions generates past the context.
    LogitSource src;
    src.prefill = [&](float* logits) { return runner->Prefill(prompt, logits); };
    src.step = [&](TokenId id, float* logits) {
      return runner->Step(std::span<const TokenId>(&id, 1), Engine::Logits::kLast, logits);
    };
    src.room = [&] {
      return runner->policy().reassigns_positions() || runner->kv()->next_position() < ctx;
    };
    res = Generate(model, prompt, go, src, stream);
  } else {
    res = Generate(engine, *kv, prompt, go, stream);
  }
  if (!res.ok()) return Fail(res.status());
  const double prefill_tps = res->prompt_tokens / std::max(res->prefill_seconds, 1e-9);
  const int64_t decoded = std::max<int64_t>(0, static_cast<int64_t>(res->tokens.size()) - 1);
  const double decode_tps = decoded / std::max(res->decode_seconds, 1e-9);
  if (a.json) {
    nlohmann::json j;
    j["model"] = path;
    j["prompt_ids"] = prompt;
    j["generated_ids"] = res->tokens;
    j["text"] = res->text;
    j["finish_reason"] = std::string(FinishName(res->finish));
    j["timings"] = {{"prefill_tokens", res->prompt_tokens},
                    {"prefill_seconds", res->prefill_seconds},
                    {"prefill_tok_s", prefill_tps},
                    {"decode_tokens", decoded},
                    {"decode_seconds", res->decode_seconds},
                    {"decode_tok_s", decode_tps}};
    if (runner) {
      j["kv_policy"] = {{"name", a.kv_policy},
                        {"budget", a.kv_policy_budget},
                        {"budget_tokens", runner->budget_tokens()},
                        {"kv_tokens_kept", runner->kept_tokens()},
                        {"peak_kv_tokens", runner->peak_kept_tokens()},
                        {"compactions", runner->compactions()}};
    }
    std::printf("%s\n", j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  } else {
    std::printf("\n");
    std::fprintf(stderr,
                 "\nprefill: %lld tokens in %.1f ms (%.1f tok/s) | decode: %lld tokens in %.1f ms "
                 "(%.1f tok/s) | finish: %s | isa %s, %d threads\n",
                 static_cast<long long>(res->prompt_tokens), res->prefill_seconds * 1e3,
                 prefill_tps, static_cast<long long>(decoded), res->decode_seconds * 1e3,
                 decode_tps, std::string(FinishName(res->finish)).c_str(),
                 std::string(kernels::IsaName(kernels::ActiveIsa())).c_str(), engine.pool().size());
  }
  return 0;
}

}  // namespace

Runner AddRunCommand(CLI::App& app) {
  auto a = std::make_shared<RunArgs>();
  CLI::App* c = app.add_subcommand("run", "Generate a continuation of a prompt");
  c->add_option("-m,--model", a->model, "GGUF model (default: the bundled cachette-tiny)");
  auto* p = c->add_option("-p,--prompt", a->prompt, "Prompt text");
  auto* ids = c->add_option("--prompt-ids", a->prompt_ids, "Prompt as comma-separated token ids");
  p->excludes(ids);
  c->add_option("-n,--n-predict", a->n, "Tokens to generate")->check(CLI::Range(0, 1 << 20));
  c->add_option("--temp", a->temp, "Temperature (0 = greedy)");
  c->add_option("--top-k", a->top_k, "Top-k (0 = off)");
  c->add_option("--top-p", a->top_p, "Top-p (1 = off)");
  c->add_option("--min-p", a->min_p, "Min-p (0 = off)");
  c->add_option("--repeat-penalty", a->repeat_penalty, "Repetition penalty (1 = off)");
  c->add_option("--seed", a->seed, "Sampling seed");
  c->add_option("--threads", a->threads, "Compute threads (0 = one per core)");
  c->add_option("--kv-type", a->kv_type, "KV element type: f32, f16, q8_0, q4_0, q4_1, kivi4");
  c->add_option("--kv-recent", a->kv_recent, kKvRecentHelp);
  c->add_option("--stop", a->stop, "Stop string (repeatable)");
  c->add_flag("--json", a->json, "Print prompt ids, generated ids and timings as JSON");
  c->add_flag("--no-bos", a->no_bos, "Do not prepend BOS to a text prompt");
  c->add_option("--kv-policy", a->kv_policy,
                "Keep the KV within a budget: streamingllm, h2o, snapkv, pyramidkv, cake, "
                "lacache, elastic, blockwise (streamingllm and lacache read and generate past "
                "the context)");
  c->add_option("--kv-policy-budget", a->kv_policy_budget,
                "Budget: below 1 a fraction of the prompt, 1 or more tokens (default 0.2)");
  return [a] {
    if (a->prompt.empty() && a->prompt_ids.empty()) {
      return Fail(InvalidArgument("give a prompt with -p TEXT or --prompt-ids 1,2,3"));
    }
    return Run(*a);
  };
}

}  // namespace cachette::cli
