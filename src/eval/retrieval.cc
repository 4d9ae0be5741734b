#include "eval/retrieval.h"

#include <algorithm>
#include <memory>
#include <nlohmann/json.hpp>

#include "cache/codecs/codec.h"
#include "core/check.h"
#include "core/timer.h"
#include "engine/sampler.h"

namespace cachette::eval {

Status ForEachJsonLine(std::string_view text, std::string_view source,
                       const std::function<Status(const nlohmann::json&, int)>& item) {
  int line_no = 0;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t eol = text.find('\n', pos);
    if (eol == std::string_view::npos) eol = text.size();
    const std::string_view line = text.substr(pos, eol - pos);
    pos = eol + 1;
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;
    const std::string where = std::string(source) + ":" + std::to_string(line_no) + ": ";
    nlohmann::json j;
    // The JSON library throws; its errors end here, as a Status naming the line.
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      return InvalidArgument(where + "not valid JSON (" + e.what() + ")");
    }
    if (!j.is_object()) return InvalidArgument(where + "not a JSON object");
    if (Status s = item(j, line_no); !s.ok()) return InvalidArgument(where + s.message());
  }
  return Status::Ok();
}

Result<std::vector<QaItem>> ParseQaJsonl(std::string_view text, std::string_view source) {
  std::vector<QaItem> items;
  CT_RETURN_IF_ERROR(ForEachJsonLine(text, source, [&](const nlohmann::json& j, int line) {
    QaItem item;
    item.line = line;
    for (auto [name, field] : {std::pair{"kind", &item.kind}, std::pair{"prompt", &item.prompt},
                               std::pair{"answer", &item.answer}}) {
      auto it = j.find(name);
      if (it == j.end() || !it->is_string()) {
        return InvalidArgument(std::string("missing string field '") + name + "'");
      }
      *field = it->get<std::string>();
    }
    items.push_back(std::move(item));
    return Status::Ok();
  }));
  return items;
}

std::string AnswerLine(std::string_view generated) {
  std::string_view s = generated.substr(0, generated.find('\n'));
  const size_t b = s.find_first_not_of(" \t\r");
  if (b == std::string_view::npos) return "";
  const size_t e = s.find_last_not_of(" \t\r");
  return std::string(s.substr(b, e - b + 1));
}

bool ExactMatch(std::string_view generated, std::string_view expected) {
  return AnswerLine(generated) == AnswerLine(expected);
}

std::map<std::string, RetrievalResult::Score> RetrievalResult::ByKind() const {
  std::map<std::string, Score> by;
  Score& all = by["all"];
  all.correct.assign(configs.size(), 0);
  for (const QaOutcome& o : outcomes) {
    if (o.skipped) continue;
    Score& s = by[o.kind];
    s.correct.resize(configs.size(), 0);
    ++s.n;
    ++by["all"].n;
    for (size_t i = 0; i < configs.size(); ++i) {
      s.correct[i] += o.correct[i];
      by["all"].correct[i] += o.correct[i];
    }
  }
  return by;
}

int RetrievalResult::n_skipped() const {
  return static_cast<int>(std::count_if(outcomes.begin(), outcomes.end(),
                                        [](const QaOutcome& o) { return o.skipped; }));
}

PreparedQa PrepareQa(const Tokenizer& tok, const QaItem& item, int index, int extra_answer_tokens,
                     int64_t n_ctx, size_t min_prompt_tokens) {
  PreparedQa q;
  QaOutcome& o = q.outcome;
  o.index = index;
  o.kind = item.kind;
  q.prompt = tok.Encode(item.prompt, tok.add_bos(), false);
  // The answer as the model would write it after "Answer:" (with its leading space).
  std::string spaced = AnswerLine(item.answer);
  spaced.insert(spaced.begin(), ' ');
  q.answer_budget = static_cast<int>(tok.Encode(spaced, false, false).size()) + extra_answer_tokens;
  o.prompt_tokens = static_cast<int64_t>(q.prompt.size());
  o.skipped = q.prompt.size() < min_prompt_tokens || o.prompt_tokens + q.answer_budget > n_ctx;
  return q;
}

void GreedyAnswer::Take(const Tokenizer& tok, std::span<const float> logits) {
  const TokenId id = Sampler::Argmax(logits);
  if (tok.IsEog(id)) {
    done = true;
    return;
  }
  ids.push_back(id);
  next = id;
  text = tok.Decode(ids);
  // The answer is the rest of the "Answer:" line: a newline ends it.
  if (text.find('\n') != std::string::npos) done = true;
}

Status DecodeGreedy(Engine& engine, std::span<SequenceKv* const> seqs,
                    std::span<GreedyAnswer> answers, int max_tokens, int64_t& steps) {
  CT_CHECK_EQ(seqs.size(), answers.size());
  const Tokenizer& tok = engine.model().tokenizer();
  const int nv = engine.model().config().n_vocab;
  const size_t k = seqs.size();
  std::vector<float> logits(k * nv);
  for (int step = 0; step < max_tokens; ++step) {
    std::vector<Engine::Item> batch;
    std::vector<size_t> who;
    for (size_t i = 0; i < k; ++i) {
      if (answers[i].done) continue;
      batch.push_back({seqs[i], std::span<const TokenId>(&answers[i].next, 1),
                       Engine::Logits::kLast, logits.data() + i * nv});
      who.push_back(i);
    }
    if (batch.empty()) break;
    CT_RETURN_IF_ERROR(engine.Forward(batch));
    ++steps;
    for (size_t i : who) {
      answers[i].Take(tok, std::span<const float>(logits.data() + i * nv, static_cast<size_t>(nv)));
    }
  }
  return Status::Ok();
}

namespace {

// Greedy decoding of every configuration's sequence in one batch per step, each starting from
// `first` at the end of its KV. Fills `texts`.
Status DecodeAnswers(Engine& engine, std::span<const std::unique_ptr<ContiguousKv>> seqs,
                     TokenId first, int max_tokens, std::vector<std::string>& texts,
                     int64_t& steps) {
  std::vector<GreedyAnswer> answers(seqs.size(), GreedyAnswer(first));
  std::vector<SequenceKv*> ptrs;
  for (const auto& s : seqs) ptrs.push_back(s.get());
  CT_RETURN_IF_ERROR(DecodeGreedy(engine, ptrs, answers, max_tokens, steps));
  texts.clear();
  for (GreedyAnswer& a : answers) texts.push_back(std::move(a.text));
  return Status::Ok();
}

}  // namespace

Result<RetrievalResult> EvalRetrieval(Engine& engine, std::span<const QaItem> items,
                                      const RetrievalOptions& options) {
  if (options.chunk_tokens <= 0) return InvalidArgument("chunk_tokens must be positive");
  std::vector<std::unique_ptr<cache::Codec>> codecs;
  for (const std::string& name : options.codecs) {
    CT_ASSIGN_OR_RETURN(auto c, cache::MakeCodec(name));
    codecs.push_back(std::move(c));
  }
  const ModelConfig& cfg = engine.model().config();
  const Tokenizer& tok = engine.model().tokenizer();
  const KvShape shape = engine.kv_shape();
  const size_t k = 1 + codecs.size();
  const int64_t chunk = options.chunk_tokens;
  RetrievalResult r;
  r.configs.push_back("");
  for (const auto& c : codecs) r.configs.push_back(c->name());
  r.roundtrip.resize(k);
  r.bytes_per_token.assign(k, 2.0 * static_cast<double>(shape.n_layer * shape.token_bytes()));

  // seqs[0] holds the exact KV of `cached`; seqs[i] its round trip through codecs[i - 1].
  std::vector<std::unique_ptr<ContiguousKv>> seqs;
  for (size_t i = 0; i < k; ++i) seqs.push_back(engine.NewSequence(cfg.n_ctx_train));
  std::vector<TokenId> cached;
  Stopwatch total;
  for (size_t idx = 0; idx < items.size(); ++idx) {
    const QaItem& item = items[idx];
    PreparedQa q = PrepareQa(tok, item, static_cast<int>(idx), options.extra_answer_tokens,
                             cfg.n_ctx_train, /*min_prompt_tokens=*/1);
    QaOutcome& o = q.outcome;
    const std::vector<TokenId>& toks = q.prompt;
    const int budget = q.answer_budget;
    if (o.skipped) {
      r.outcomes.push_back(std::move(o));
      if (options.progress) options.progress(static_cast<int>(idx + 1), items.size());
      continue;
    }
    const int64_t n = o.prompt_tokens - 1;  // prefilled; the last token starts decoding
    int64_t common = 0;
    while (common < std::min<int64_t>(n, cached.size()) && cached[common] == toks[common]) {
      ++common;
    }
    seqs[0]->SetTokens(common);
    if (n > common) {
      CT_RETURN_IF_ERROR(engine.Forward(
          *seqs[0], std::span<const TokenId>(toks.data() + common, n - common), nullptr));
      r.prefill_tokens += n - common;
    }
    cached.assign(toks.begin(), toks.begin() + n);
    // Whole chunks before the divergence were encoded complete last time; re-encode from the
    // chunk holding it, as the store would hold only chunks of this prompt's own tokens.
    const int64_t keep = common / chunk * chunk;
    for (size_t i = 1; i < k; ++i) {
      seqs[i]->SetTokens(keep);
      CT_RETURN_IF_ERROR(RoundTripKv(*codecs[i - 1], shape, options.chunk_tokens, *seqs[0],
                                     *seqs[i], keep, n, &r.roundtrip[i]));
    }
    std::vector<std::string> texts;
    CT_RETURN_IF_ERROR(DecodeAnswers(engine, seqs, toks.back(), budget, texts, r.decode_steps));
    for (size_t i = 0; i < k; ++i) {
      o.answers.push_back(AnswerLine(texts[i]));
      o.correct.push_back(ExactMatch(texts[i], item.answer));
    }
    r.outcomes.push_back(std::move(o));
    if (options.progress) options.progress(static_cast<int>(idx + 1), items.size());
  }
  r.seconds = total.Seconds();
  for (size_t i = 1; i < k; ++i) r.bytes_per_token[i] = r.roundtrip[i].bytes_per_token();
  return r;
}

}  // namespace cachette::eval
