#include "engine/generate.h"

#include <algorithm>

#include "core/timer.h"

namespace cachette {

std::string_view FinishName(GenerateResult::Finish f) {
  switch (f) {
    case GenerateResult::Finish::kLength: return "length";
    case GenerateResult::Finish::kEos: return "eos";
    case GenerateResult::Finish::kStop: return "stop";
    case GenerateResult::Finish::kCancelled: return "cancelled";
  }
  return "?";
}

Result<GenerateResult> Generate(Engine& engine, SequenceKv& kv, std::span<const TokenId> prompt,
                                const GenerateOptions& options, const TokenCallback& on_token) {
  const Model& model = engine.model();
  if (prompt.empty()) return InvalidArgument("the prompt is empty");
  const int64_t cached = kv.n_tokens();
  if (cached > static_cast<int64_t>(prompt.size())) {
    return InvalidArgument("the KV cache holds more tokens than the prompt");
  }
  const int64_t ctx = std::min<int64_t>(kv.capacity(), model.config().n_ctx_train);
  if (static_cast<int64_t>(prompt.size()) > ctx) {
    return InvalidArgument("the prompt has " + std::to_string(prompt.size()) +
                           " tokens but the context holds " + std::to_string(ctx));
  }
  LogitSource source;
  source.prefill = [&](float* logits) {
    // With the whole prompt cached, the last prompt token is recomputed for its logits.
    int64_t from = cached;
    if (from == static_cast<int64_t>(prompt.size())) {
      from -= 1;
      kv.SetTokens(from);
    }
    return engine.Forward(kv, prompt.subspan(from), logits);
  };
  source.step = [&](TokenId id, float* logits) {
    const TokenId next[1] = {id};
    return engine.Forward(kv, next, logits);
  };
  source.room = [&] { return kv.n_tokens() + 1 <= ctx; };
  return Generate(model, prompt, options, source, on_token);
}

Result<GenerateResult> Generate(const Model& model, std::span<const TokenId> prompt,
                                const GenerateOptions& options, const LogitSource& source,
                                const TokenCallback& on_token) {
  const Tokenizer& tok = model.tokenizer();
  const int64_t n_vocab = model.config().n_vocab;
  CT_RETURN_IF_ERROR(options.sampling.Validate());
  if (prompt.empty()) return InvalidArgument("the prompt is empty");
  if (options.max_tokens < 0) return InvalidArgument("max_tokens must be >= 0");

  GenerateResult res;
  res.prompt_tokens = static_cast<int64_t>(prompt.size());
  std::vector<float> logits(n_vocab);
  std::vector<TokenId> history(prompt.begin(), prompt.end());
  Stopwatch sw;
  CT_RETURN_IF_ERROR(source.prefill(logits.data()));
  res.prefill_seconds = sw.Seconds();
  sw.Reset();

  Sampler sampler(options.sampling);
  StreamingDetokenizer detok(tok);
  size_t max_stop = 0;
  for (const auto& s : options.stop) max_stop = std::max(max_stop, s.size());
  for (int i = 0; i < options.max_tokens; ++i) {
    const TokenId id = sampler.Sample(logits, history);
    if (!options.ignore_eos && tok.IsEog(id)) {
      res.finish = GenerateResult::Finish::kEos;
      break;
    }
    res.tokens.push_back(id);
    history.push_back(id);
    std::string piece = detok.Push(id);
    const size_t old_size = res.text.size();
    res.text += piece;
    bool stopped = false;
    if (max_stop > 0) {
      // Only the region that the new text could complete needs searching.
      const size_t start = old_size >= max_stop ? old_size - max_stop + 1 : 0;
      size_t cut = std::string::npos;
      for (const auto& s : options.stop) {
        if (s.empty()) continue;
        size_t at = res.text.find(s, start);
        if (at != std::string::npos) cut = std::min(cut, at);
      }
      if (cut != std::string::npos) {
        piece = cut > old_size ? res.text.substr(old_size, cut - old_size) : std::string();
        res.text.resize(cut);
        stopped = true;
      }
    }
    if (on_token && !on_token(id, piece)) {
      res.finish = GenerateResult::Finish::kCancelled;
      break;
    }
    if (stopped) {
      res.finish = GenerateResult::Finish::kStop;
      break;
    }
    if (i + 1 == options.max_tokens) break;
    if (!source.room()) break;  // context full: finish as kLength
    CT_RETURN_IF_ERROR(source.step(id, logits.data()));
  }
  if (res.finish == GenerateResult::Finish::kLength || res.finish == GenerateResult::Finish::kEos) {
    res.text += detok.Flush();  // an incomplete UTF-8 tail, kept as is
  }
  res.decode_seconds = sw.Seconds();
  return res;
}

}  // namespace cachette
