#include "eval/kv_policy_eval.h"

#include <sys/resource.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>

#include "core/timer.h"
#include "eval/perplexity.h"
#include "kv/budget_runner.h"

namespace cachette::eval {

std::string PolicyLabel(const KvPolicyConfig& config) {
  char b[32];
  std::snprintf(b, sizeof(b), "%g", config.budget);
  return config.name + "@" + b;
}

double PolicyPplFigure::ppl() const { return std::exp(mean_nll()); }
double StreamingWindow::ppl() const {
  return n_scored > 0 ? std::exp(nll_sum / static_cast<double>(n_scored)) : 0;
}
double StreamingWindow::full_ppl() const {
  return n_scored > 0 ? std::exp(full_nll_sum / static_cast<double>(n_scored)) : 0;
}

namespace {

// The statistics an exact prefill must collect so that every policy can start from it.
AttentionStats StatsFor(const std::vector<std::unique_ptr<BudgetRunner>>& runners) {
  AttentionStats s;
  for (const auto& r : runners) {
    s.window = std::max(s.window, r->stats_window());
    s.cumulative |= r->stats_cumulative();
  }
  return s;
}

Result<std::vector<std::unique_ptr<BudgetRunner>>> Runners(
    Engine& engine, const std::vector<KvPolicyConfig>& policies, int slack) {
  std::vector<std::unique_ptr<BudgetRunner>> out;
  for (const KvPolicyConfig& p : policies) {
    CT_ASSIGN_OR_RETURN(auto r, BudgetRunner::Create(engine, p, slack));
    out.push_back(std::move(r));
  }
  return out;
}

// Puts a runner at the end of an exact prefill of `prompt`: from the shared prefill, or, for
// block-wise prefill and CAKE's cascade (whose compactions happen while reading), by reading
// it again.
Status StartRunner(BudgetRunner& r, const SequenceKv& exact, std::span<const TokenId> prompt,
                   const AttentionStats& stats) {
  if (r.policy().blockwise_prefill() || r.policy().cascades()) return r.Prefill(prompt, nullptr);
  return r.StartFrom(exact, static_cast<int64_t>(prompt.size()), &stats);
}

int64_t PeakRssBytes() {
  struct rusage u {};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<int64_t>(u.ru_maxrss) * 1024;  // Linux reports kB
}

}  // namespace

Result<PolicyPplResult> EvalPolicyPerplexity(Engine& engine, std::span<const TokenId> tokens,
                                             const PolicyPplOptions& options) {
  const ModelConfig& cfg = engine.model().config();
  const int ctx = options.ctx;
  CT_RETURN_IF_ERROR(CheckWindows(ctx, cfg.n_ctx_train, tokens.size()));
  if (options.step < 1) return InvalidArgument("step must be >= 1");
  CT_ASSIGN_OR_RETURN(auto runners, Runners(engine, options.policies, options.step));
  PolicyPplResult r;
  r.ctx = ctx;
  r.n_input_tokens = static_cast<int64_t>(tokens.size());
  r.n_windows = static_cast<int>(tokens.size() / ctx);
  r.figures.resize(1 + runners.size());
  r.figures[0].label = "full";
  for (size_t i = 0; i < runners.size(); ++i) {
    r.figures[1 + i].label = PolicyLabel(options.policies[i]);
  }
  const int first = ctx / 2;
  const int nv = cfg.n_vocab;
  auto kv = engine.NewSequence(ctx);
  std::vector<float> logits(static_cast<size_t>(ctx - first) * nv);
  std::vector<TokenId> window(ctx);
  for (int w = 0; w < r.n_windows; ++w) {
    CopyWindow(tokens, w, options.bos, window);
    const std::span<const TokenId> head(window.data(), first);
    const std::span<const TokenId> tail(window.data() + first, ctx - first);
    const int64_t n_tail = static_cast<int64_t>(tail.size());

    kv->SetTokens(0);
    AttentionStats stats = StatsFor(runners);
    Engine::Item item{kv.get(), head, Engine::Logits::kNone, nullptr, &stats};
    CT_RETURN_IF_ERROR(engine.Forward(std::span<Engine::Item>(&item, 1)));
    {
      PolicyPplFigure& f = r.figures[0];
      Stopwatch sw;
      Engine::Item t{kv.get(), tail, Engine::Logits::kAll, logits.data()};
      CT_RETURN_IF_ERROR(engine.Forward(std::span<Engine::Item>(&t, 1)));
      for (int64_t j = 0; j + 1 < n_tail; ++j) {
        f.nll_sum += NegLogLikelihood(std::span<const float>(logits.data() + j * nv, nv),
                                      tail[j + 1]);
        ++f.n_scored;
      }
      f.kept_sum += first + n_tail / 2.0;
      f.steps += 1;
      f.peak_kept = std::max<int64_t>(f.peak_kept, ctx);
      f.seconds += sw.Seconds();
    }
    for (size_t i = 0; i < runners.size(); ++i) {
      BudgetRunner& run = *runners[i];
      PolicyPplFigure& f = r.figures[1 + i];
      Stopwatch sw;
      CT_RETURN_IF_ERROR(StartRunner(run, *kv, head, stats));
      for (int64_t j = 0; j < n_tail; j += options.step) {
        const int64_t m = std::min<int64_t>(options.step, n_tail - j);
        CT_RETURN_IF_ERROR(run.Step(tail.subspan(j, m), Engine::Logits::kAll, logits.data()));
        f.kept_sum += static_cast<double>(run.kept_tokens());
        f.steps += 1;
        for (int64_t t = 0; t < m && j + t + 1 < n_tail; ++t) {
          f.nll_sum += NegLogLikelihood(std::span<const float>(logits.data() + t * nv, nv),
                                        tail[j + t + 1]);
          ++f.n_scored;
        }
      }
      f.peak_kept = std::max(f.peak_kept, run.peak_kept_tokens());
      f.seconds += sw.Seconds();
    }
    if (options.progress) options.progress(w + 1, r.n_windows);
  }
  return r;
}

namespace {

// Greedy answer from `first` on, through `step` (one token at a time), until done (see
// GreedyAnswer) or max_tokens. The unbatched twin of retrieval.cc's DecodeAnswers.
template <typename StepFn>
Result<std::string> DecodeGreedy(const Tokenizer& tok, int nv, TokenId first, int max_tokens,
                                 StepFn step) {
  std::vector<float> logits(nv);
  GreedyAnswer a(first);
  for (int i = 0; i < max_tokens && !a.done; ++i) {
    CT_RETURN_IF_ERROR(step(a.next, logits.data()));
    a.Take(tok, logits);
  }
  return std::move(a.text);
}

}  // namespace

Result<PolicyRetrievalResult> EvalPolicyRetrieval(Engine& engine, std::span<const QaItem> items,
                                                  const PolicyRetrievalOptions& options) {
  CT_ASSIGN_OR_RETURN(auto runners, Runners(engine, options.policies, /*slack=*/16));
  const ModelConfig& cfg = engine.model().config();
  const Tokenizer& tok = engine.model().tokenizer();
  const int nv = cfg.n_vocab;
  const size_t k = 1 + runners.size();
  PolicyRetrievalResult out;
  RetrievalResult& r = out.r;
  r.configs.push_back("full");
  for (const auto& p : options.policies) r.configs.push_back(PolicyLabel(p));
  out.kept_sum.assign(k, 0);
  out.peak_kept.assign(k, 0);
  auto exact = engine.NewSequence(cfg.n_ctx_train);
  Stopwatch total;
  for (size_t idx = 0; idx < items.size(); ++idx) {
    const QaItem& item = items[idx];
    // Two tokens at least: a policy starts from a non-empty prefill (BudgetRunner needs one).
    PreparedQa q = PrepareQa(tok, item, static_cast<int>(idx), options.extra_answer_tokens,
                             cfg.n_ctx_train, /*min_prompt_tokens=*/2);
    QaOutcome& o = q.outcome;
    const std::vector<TokenId>& toks = q.prompt;
    const int budget = q.answer_budget;
    if (o.skipped) {
      r.outcomes.push_back(std::move(o));
      if (options.progress) options.progress(static_cast<int>(idx + 1), items.size());
      continue;
    }
    const int64_t n = o.prompt_tokens - 1;
    const std::span<const TokenId> prompt(toks.data(), n);
    exact->SetTokens(0);
    AttentionStats stats = StatsFor(runners);
    Engine::Item pre{exact.get(), prompt, Engine::Logits::kNone, nullptr, &stats};
    CT_RETURN_IF_ERROR(engine.Forward(std::span<Engine::Item>(&pre, 1)));
    // The baseline decodes on a copy-free path: its own sequence, truncated back each item.
    CT_ASSIGN_OR_RETURN(
        std::string full,
        DecodeGreedy(tok, nv, toks.back(), budget, [&](TokenId t, float* lg) {
          return engine.Forward(*exact, std::span<const TokenId>(&t, 1), lg);
        }));
    o.answers.push_back(AnswerLine(full));
    o.correct.push_back(ExactMatch(full, item.answer));
    out.kept_sum[0] += static_cast<double>(n);
    out.peak_kept[0] = std::max(out.peak_kept[0], n + budget);
    exact->SetTokens(n);
    for (size_t i = 0; i < runners.size(); ++i) {
      BudgetRunner& run = *runners[i];
      CT_RETURN_IF_ERROR(StartRunner(run, *exact, prompt, stats));
      out.kept_sum[1 + i] += static_cast<double>(run.kept_tokens());
      CT_ASSIGN_OR_RETURN(
          std::string text,
          DecodeGreedy(tok, nv, toks.back(), budget, [&](TokenId t, float* lg) {
            return run.Step(std::span<const TokenId>(&t, 1), Engine::Logits::kLast, lg);
          }));
      out.peak_kept[1 + i] = std::max(out.peak_kept[1 + i], run.peak_kept_tokens());
      o.answers.push_back(AnswerLine(text));
      o.correct.push_back(ExactMatch(text, item.answer));
    }
    r.outcomes.push_back(std::move(o));
    if (options.progress) options.progress(static_cast<int>(idx + 1), items.size());
  }
  r.seconds = total.Seconds();
  return out;
}

Result<StreamingResult> EvalStreaming(Engine& engine, std::span<const TokenId> tokens,
                                      const StreamingOptions& options) {
  if (options.step < 1 || options.report < 1) {
    return InvalidArgument("step and report must be >= 1");
  }
  if (options.baseline && options.report > engine.model().config().n_ctx_train) {
    return InvalidArgument("report windows of " + std::to_string(options.report) +
                           " tokens do not fit the model's context of " +
                           std::to_string(engine.model().config().n_ctx_train) +
                           " for the full-KV baseline");
  }
  if (options.cache <= options.step) {
    return InvalidArgument("the cache (" + std::to_string(options.cache) +
                           " tokens) must exceed the step (" + std::to_string(options.step) + ")");
  }
  KvPolicyConfig pc = options.policy;
  pc.budget = options.cache - options.step;  // kept after a compaction; + step while scoring
  CT_ASSIGN_OR_RETURN(auto run, BudgetRunner::Create(engine, pc, options.step));
  if (!run->policy().reassigns_positions()) {
    return InvalidArgument("kv_policy.name: " + pc.name +
                           " keeps positions, so it cannot stream past the context");
  }
  const int nv = engine.model().config().n_vocab;
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (n < 2) return InvalidArgument("the text has fewer than 2 tokens");
  StreamingResult res;
  std::vector<float> logits(static_cast<size_t>(options.step) * nv);
  Stopwatch sw;
  // The first step is the "prompt"; the rest are scored steps.
  const int64_t first = std::min<int64_t>(options.step, n - 1);
  CT_RETURN_IF_ERROR(run->Prefill(tokens.first(first), logits.data()));
  StreamingWindow win;
  win.first_token = first;
  auto score = [&](const float* lg, TokenId target) {
    const double nll = NegLogLikelihood(std::span<const float>(lg, nv), target);
    win.nll_sum += nll;
    ++win.n_scored;
    res.nll_sum += nll;
    ++res.n_scored;
  };
  score(logits.data(), tokens[first]);
  for (int64_t j = first; j + 1 < n; j += options.step) {
    const int64_t m = std::min<int64_t>(options.step, n - 1 - j);
    CT_RETURN_IF_ERROR(run->Step(tokens.subspan(j, m), Engine::Logits::kAll, logits.data()));
    res.max_kept = std::max(res.max_kept, run->peak_kept_tokens());
    for (int64_t t = 0; t < m; ++t) {
      score(logits.data() + t * nv, tokens[j + t + 1]);
      if (win.n_scored >= options.report) {
        win.peak_rss_bytes = PeakRssBytes();
        res.windows.push_back(win);
        win = StreamingWindow{};
        win.first_token = j + t + 2;
      }
    }
    if (options.progress) options.progress(j + m, n);
  }
  if (win.n_scored > 0) {
    win.peak_rss_bytes = PeakRssBytes();
    res.windows.push_back(win);
  }
  res.seconds = sw.Seconds();
  if (options.baseline) {
    // Window w's scored tokens are [a, a + n): feed [a - 1, a + n - 1) to a fresh sequence.
    std::vector<float> all;
    for (StreamingWindow& w : res.windows) {
      const int64_t a = w.first_token, m = w.n_scored;
      auto kv = engine.NewSequence(m);
      all.resize(static_cast<size_t>(m) * nv);
      Engine::Item item{kv.get(), tokens.subspan(a - 1, m), Engine::Logits::kAll, all.data()};
      CT_RETURN_IF_ERROR(engine.Forward(std::span<Engine::Item>(&item, 1)));
      for (int64_t t = 0; t < m; ++t) {
        w.full_nll_sum += NegLogLikelihood(std::span<const float>(all.data() + t * nv, nv),
                                           tokens[a + t]);
      }
    }
  }
  return res;
}

}  // namespace cachette::eval
