#include "eval/rag.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>

#include "core/timer.h"
#include "eval/retrieval.h"

namespace cachette::eval {

Result<std::vector<RagItem>> ParseRagJsonl(std::string_view text, std::string_view source) {
  std::vector<RagItem> items;
  CT_RETURN_IF_ERROR(ForEachJsonLine(text, source, [&](const nlohmann::json& j, int line) {
    RagItem item;
    item.line = line;
    for (auto [name, field] :
         {std::pair{"kind", &item.kind}, std::pair{"question", &item.question},
          std::pair{"answer", &item.answer}}) {
      auto it = j.find(name);
      if (it == j.end() || !it->is_string()) {
        return InvalidArgument(std::string("missing string field '") + name + "'");
      }
      *field = it->get<std::string>();
    }
    auto docs = j.find("docs");
    if (docs == j.end() || !docs->is_array() || docs->empty()) {
      return InvalidArgument("'docs' must be a non-empty array of strings");
    }
    for (const auto& d : *docs) {
      if (!d.is_string()) return InvalidArgument("'docs' holds a non-string");
      item.docs.push_back(d.get<std::string>());
    }
    if (auto h = j.find("hops"); h != j.end()) {
      if (!h->is_number_integer() || h->get<int64_t>() < 1 || h->get<int64_t>() > 100) {
        return InvalidArgument("'hops' must be an integer from 1 to 100");
      }
      item.hops = h->get<int>();
    }
    items.push_back(std::move(item));
    return Status::Ok();
  }));
  return items;
}

std::string RagConfig::Name() const {
  std::string name(ReuseModeName(mode));
  if (mode == ReuseMode::kCacheCraft && craft != ReuseOptions{}.craft_choice) {
    name += ":";
    name += CraftChoiceName(craft);
  }
  if (mode == ReuseMode::kBlend || mode == ReuseMode::kCacheCraft) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "@%g", ratio);
    name += buf;
  }
  return name;
}

std::map<std::string, RagResult::Score> RagResult::Scores() const {
  std::map<std::string, Score> by;
  auto add = [&](const std::string& group, const RagOutcome& o) {
    Score& s = by[group];
    s.correct.resize(configs.size(), 0);
    ++s.n;
    for (size_t i = 0; i < configs.size(); ++i) s.correct[i] += o.correct[i];
  };
  for (const RagOutcome& o : outcomes) {
    if (o.skipped) continue;
    add("all", o);
    add(o.kind, o);
    if (o.hops >= 2) add("hops=2", o);
  }
  return by;
}

std::vector<double> RagResult::MedianTtft() const {
  std::vector<double> med;
  for (size_t i = 0; i < configs.size(); ++i) {
    std::vector<double> t;
    for (const RagOutcome& o : outcomes) {
      if (!o.skipped) t.push_back(o.ttft_s[i]);
    }
    if (t.empty()) {
      med.push_back(0);
      continue;
    }
    std::nth_element(t.begin(), t.begin() + t.size() / 2, t.end());
    med.push_back(t[t.size() / 2]);
  }
  return med;
}

std::vector<ReuseReport> RagResult::Totals() const {
  std::vector<ReuseReport> tot(configs.size());
  for (const RagOutcome& o : outcomes) {
    if (o.skipped) continue;
    for (size_t i = 0; i < configs.size(); ++i) {
      tot[i].prefix_tokens += o.reports[i].prefix_tokens;
      tot[i].reused_tokens += o.reports[i].reused_tokens;
      tot[i].recomputed_tokens += o.reports[i].recomputed_tokens;
      tot[i].computed_tokens += o.reports[i].computed_tokens;
    }
  }
  return tot;
}

void LogSoftmax(std::span<const float> logits, std::vector<double>& out) {
  out.resize(logits.size());
  double mx = -INFINITY;
  for (float f : logits) mx = std::max(mx, static_cast<double>(f));
  double z = 0;
  for (float f : logits) z += std::exp(f - mx);
  const double lz = mx + std::log(z);
  for (size_t i = 0; i < logits.size(); ++i) out[i] = logits[i] - lz;
}

double KlDivergence(std::span<const double> log_p, std::span<const double> log_q) {
  double kl = 0;
  for (size_t t = 0; t < log_p.size(); ++t) kl += std::exp(log_p[t]) * (log_p[t] - log_q[t]);
  return std::max(kl, 0.0);
}

std::vector<double> RagResult::AgreementWithFull() const {
  std::vector<double> agree;
  if (full_index < 0) return agree;
  agree.assign(configs.size(), 0);
  int n = 0;
  for (const RagOutcome& o : outcomes) {
    if (o.skipped) continue;
    ++n;
    for (size_t i = 0; i < configs.size(); ++i) agree[i] += o.answers[i] == o.answers[full_index];
  }
  for (double& a : agree) a = n ? a / n : 0;
  return agree;
}

std::vector<double> RagResult::MeanKlVsFull() const {
  std::vector<double> kl;
  if (full_index < 0) return kl;
  kl.assign(configs.size(), 0);
  int n = 0;
  for (const RagOutcome& o : outcomes) {
    if (o.skipped) continue;
    ++n;
    for (size_t i = 0; i < configs.size(); ++i) kl[i] += o.kl_vs_full[i];
  }
  for (double& v : kl) v = n ? v / n : 0;
  return kl;
}

int RagResult::n_skipped() const {
  return static_cast<int>(std::count_if(outcomes.begin(), outcomes.end(),
                                        [](const RagOutcome& o) { return o.skipped; }));
}

Result<RagResult> EvalRag(Engine& engine, std::span<const RagItem> items,
                          const RagOptions& options) {
  if (options.configs.empty()) return InvalidArgument("no configuration to measure");
  if (std::count_if(options.configs.begin(), options.configs.end(),
                    [](const RagConfig& c) { return c.mode == ReuseMode::kApe; }) > 1) {
    return InvalidArgument("ape is measured once per run");
  }
  for (const RagConfig& c : options.configs) {
    if (!(c.ratio >= 0 && c.ratio <= 1)) {
      return InvalidArgument("ratio " + std::to_string(c.ratio) + " is outside [0, 1]");
    }
  }
  const ModelConfig& cfg = engine.model().config();
  const Tokenizer& tok = engine.model().tokenizer();
  const int nv = cfg.n_vocab;
  const size_t k = options.configs.size();
  RagResult r;
  for (size_t i = 0; i < k; ++i) {
    r.configs.push_back(options.configs[i].Name());
    if (options.configs[i].mode == ReuseMode::kFull && r.full_index < 0) {
      r.full_index = static_cast<int>(i);
    }
  }
  Stopwatch total;
  for (size_t idx = 0; idx < items.size(); ++idx) {
    const RagItem& item = items[idx];
    RagOutcome o;
    o.index = static_cast<int>(idx);
    o.kind = item.kind;
    o.hops = item.hops;
    std::vector<TokenId> bos;
    if (tok.add_bos() && tok.bos() >= 0) bos.push_back(tok.bos());
    std::vector<TokenId> prompt = bos;
    std::vector<std::vector<TokenId>> docs;
    std::vector<int64_t> offsets;
    for (const std::string& d : item.docs) {
      docs.push_back(tok.Encode(d, false, false));
      offsets.push_back(static_cast<int64_t>(prompt.size()));
      prompt.insert(prompt.end(), docs.back().begin(), docs.back().end());
    }
    const std::vector<TokenId> question = tok.Encode(item.question, false, false);
    prompt.insert(prompt.end(), question.begin(), question.end());
    std::string spaced = " " + AnswerLine(item.answer);
    const int budget =
        static_cast<int>(tok.Encode(spaced, false, false).size()) + options.extra_answer_tokens;
    o.prompt_tokens = static_cast<int64_t>(prompt.size());
    o.skipped = question.empty() || o.prompt_tokens + budget > cfg.n_ctx_train;
    if (!o.skipped) {
      // Ingestion: every document on its own after BOS.
      std::vector<SegmentKv> cached;
      std::vector<SegmentUse> uses;
      cached.reserve(docs.size());
      for (size_t i = 0; i < docs.size(); ++i) {
        if (docs[i].empty()) continue;
        CT_ASSIGN_OR_RETURN(SegmentKv seg, ComputeSegment(engine, bos, docs[i]));
        cached.push_back(std::move(seg));
        uses.push_back(SegmentUse{offsets[i], &cached.back()});
      }
      std::vector<std::unique_ptr<ContiguousKv>> seqs;
      std::vector<SequenceKv*> ptrs;
      std::vector<GreedyAnswer> answers(k, GreedyAnswer(0));
      std::vector<float> logits(nv);
      std::vector<std::vector<double>> first_logp(k);
      ApeState ape_state;
      int ape_index = -1;  // the ape configuration, if any (one at most)
      for (size_t i = 0; i < k; ++i) {
        seqs.push_back(engine.NewSequence(o.prompt_tokens + budget));
        ptrs.push_back(seqs.back().get());
        if (!bos.empty()) CT_RETURN_IF_ERROR(engine.Forward(*seqs.back(), bos, nullptr));
        ReuseReport rep;
        if (options.configs[i].mode == ReuseMode::kApe) {
          std::vector<const SegmentKv*> doc_kv;
          for (const SegmentKv& seg : cached) doc_kv.push_back(&seg);
          Stopwatch ttft;
          CT_RETURN_IF_ERROR(PrefillApe(engine, *seqs.back(), bos, doc_kv, question, options.ape,
                                        logits.data(), &ape_state));
          o.ttft_s.push_back(ttft.Seconds());
          rep.prefix_tokens = static_cast<int64_t>(bos.size());
          rep.computed_tokens = static_cast<int64_t>(question.size());
          rep.reused_tokens = o.prompt_tokens - rep.prefix_tokens - rep.computed_tokens;
          ape_index = static_cast<int>(i);
        } else {
          ReuseOptions ro;
          ro.mode = options.configs[i].mode;
          ro.ratio = options.configs[i].ratio;
          ro.craft_choice = options.configs[i].craft;
          Stopwatch ttft;
          CT_RETURN_IF_ERROR(
              PrefillWithSegments(engine, *seqs.back(), prompt, uses, ro, logits.data(), &rep));
          o.ttft_s.push_back(ttft.Seconds());
        }
        o.reports.push_back(rep);
        answers[i].Take(tok, logits);
        if (r.full_index >= 0) LogSoftmax(logits, first_logp[i]);
      }
      if (r.full_index >= 0) {
        const std::vector<double>& p = first_logp[r.full_index];
        for (size_t i = 0; i < k; ++i) o.kl_vs_full.push_back(KlDivergence(p, first_logp[i]));
      }
      // APE decodes on its own (its attention is not Forward's); the others in one batch.
      if (ape_index >= 0) {
        GreedyAnswer& a = answers[ape_index];
        for (int step = 1; step < budget && !a.done; ++step) {
          CT_RETURN_IF_ERROR(DecodeApe(engine, *seqs[ape_index], ape_state,
                                       std::span<const TokenId>(&a.next, 1), logits.data()));
          a.Take(tok, logits);
        }
        a.done = true;
      }
      int64_t steps = 0;
      CT_RETURN_IF_ERROR(DecodeGreedy(engine, ptrs, answers, budget - 1, steps));
      for (size_t i = 0; i < k; ++i) {
        o.answers.push_back(AnswerLine(answers[i].text));
        o.correct.push_back(ExactMatch(answers[i].text, item.answer));
      }
    }
    r.outcomes.push_back(std::move(o));
    if (options.progress) options.progress(static_cast<int>(idx + 1), items.size());
  }
  r.seconds = total.Seconds();
  return r;
}

}  // namespace cachette::eval
