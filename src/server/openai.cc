#include "server/openai.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "model/unicode.h"

namespace cachette::server {
namespace {

using nlohmann::json;

// Parses JSON, turning the library's exceptions into a Status (they never leave this file).
Result<json> ParseJson(std::string_view body) {
  try {
    json j = json::parse(body.begin(), body.end());
    if (!j.is_object()) return InvalidArgument("the request body must be a JSON object");
    return j;
  } catch (const json::exception& e) {
    return InvalidArgument(std::string("the request body is not valid JSON: ") + e.what());
  }
}

// Field readers: absent (or null) keeps the default; a wrong type is an error naming the field.
Status GetNumber(const json& j, const char* key, double lo, double hi, float* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return Status::Ok();
  if (!it->is_number()) return InvalidArgument(std::string("'") + key + "' must be a number");
  const double v = it->get<double>();
  if (!(v >= lo && v <= hi)) {
    return InvalidArgument(std::string("'") + key + "' must be in [" + std::to_string(lo) + ", " +
                           std::to_string(hi) + "]");
  }
  *out = static_cast<float>(v);
  return Status::Ok();
}

Status GetInt(const json& j, const char* key, int64_t lo, int64_t hi, int64_t* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return Status::Ok();
  if (!it->is_number_integer()) {
    return InvalidArgument(std::string("'") + key + "' must be an integer");
  }
  // Unsigned values beyond int64 read as negative or huge: both fail the range check.
  const int64_t v = it->is_number_unsigned() && it->get<uint64_t>() > INT64_MAX
                        ? INT64_MAX
                        : it->get<int64_t>();
  if (v < lo || v > hi) {
    return InvalidArgument(std::string("'") + key + "' must be in [" + std::to_string(lo) + ", " +
                           std::to_string(hi) + "]");
  }
  *out = v;
  return Status::Ok();
}

Status GetBool(const json& j, const char* key, bool* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return Status::Ok();
  if (!it->is_boolean()) return InvalidArgument(std::string("'") + key + "' must be a boolean");
  *out = it->get<bool>();
  return Status::Ok();
}

Status GetString(const json& j, const char* key, std::string* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return Status::Ok();
  if (!it->is_string()) return InvalidArgument(std::string("'") + key + "' must be a string");
  *out = it->get<std::string>();
  return Status::Ok();
}

// Names the field at fault when `s` is an error.
Status Param(ErrorDetail* d, const char* key, Status s) {
  if (!s.ok() && d != nullptr && d->param.empty()) d->param = key;
  return s;
}

// The cheap bound of openai.h: can `bytes` of text possibly fit the context?
Status CheckTextBytes(const ApiContext& ctx, size_t bytes, const char* field) {
  if (ctx.max_token_bytes <= 0 || ctx.n_ctx <= 0) return Status::Ok();
  const uint64_t bound =
      static_cast<uint64_t>(ctx.n_ctx) * static_cast<uint64_t>(ctx.max_token_bytes) * 2;
  if (bytes <= bound) return Status::Ok();
  return InvalidArgument(std::string("'") + field + "' has " + std::to_string(bytes) +
                         " bytes of text, more than can fit this model's maximum context "
                         "length of " +
                         std::to_string(ctx.n_ctx) + " tokens");
}

Status CheckIdBytes(const std::string& v, const char* field) {
  if (v.size() <= kMaxIdBytes) return Status::Ok();
  return InvalidArgument(std::string("'") + field + "' must be at most " +
                         std::to_string(kMaxIdBytes) + " bytes (got " + std::to_string(v.size()) +
                         ")");
}

// "5m", "1h", "30s", "300" or a number: seconds.
Result<int64_t> ParseTtlSeconds(const json& v) {
  if (v.is_number()) {
    const double s = v.get<double>();
    if (s > 0 && s <= 7 * 24 * 3600) return static_cast<int64_t>(std::ceil(s));
  } else if (v.is_string()) {
    std::string s = v.get<std::string>();
    int64_t mult = 1;
    if (!s.empty() && (s.back() == 's' || s.back() == 'm' || s.back() == 'h')) {
      mult = s.back() == 'h' ? 3600 : s.back() == 'm' ? 60 : 1;
      s.pop_back();
    }
    char* end = nullptr;
    const long long n = std::strtoll(s.c_str(), &end, 10);
    if (!s.empty() && *end == '\0' && n > 0 && n <= 7 * 24 * 3600 / mult) return n * mult;
  }
  return InvalidArgument("'cache_control.ttl' must be a duration such as \"5m\", \"1h\" or a "
                         "number of seconds (at most a week)");
}

// Message content: a string, or an array of {"type": "text", "text": ...} parts (each part a
// segment).
struct Content {
  std::string text;                // the whole content
  std::vector<std::string> parts;  // given as parts: each one's text
  bool has_parts = false;
};
Result<Content> ContentOf(const json& m, size_t i) {
  Content c;
  auto it = m.find("content");
  if (it == m.end() || it->is_null()) return c;
  if (it->is_string()) {
    c.text = it->get<std::string>();
    return c;
  }
  if (it->is_array()) {
    c.has_parts = true;
    for (size_t k = 0; k < it->size(); ++k) {
      const json& part = (*it)[k];
      if (!part.is_object() || !part.contains("type") || !part["type"].is_string() ||
          part["type"].get<std::string>() != "text" || !part.contains("text") ||
          !part["text"].is_string()) {
        return InvalidArgument("messages[" + std::to_string(i) + "].content[" +
                               std::to_string(k) +
                               "]: content parts must be {\"type\": \"text\", \"text\": "
                               "string} (other part types are not supported)");
      }
      c.parts.push_back(part["text"].get<std::string>());
      c.text += c.parts.back();
    }
    return c;
  }
  return InvalidArgument("messages[" + std::to_string(i) + "].content must be a string or an "
                         "array of text parts");
}

// A piece of prompt text: special (control tokens in it parsed) or not, a segment or not.
struct TextPiece {
  std::string text;
  bool special = false;
  bool segment = false;
};

// BOS (when the tokenizer adds one), then the pieces: each segment and each special piece
// tokenized on its own, adjacent plain pieces together (as ChatTemplate::Tokenize does). The
// segments' token spans go to `spans` (an empty segment has none).
std::vector<TokenId> TokenizePieces(const Tokenizer& tok, const std::vector<TextPiece>& pieces,
                                    std::vector<sched::SegmentSpan>* spans) {
  std::vector<TokenId> ids;
  if (tok.add_bos() && tok.bos() >= 0) ids.push_back(tok.bos());
  for (size_t i = 0; i < pieces.size();) {
    std::string run = pieces[i].text;
    size_t j = i + 1;
    const bool joinable = !pieces[i].special && !pieces[i].segment;
    while (joinable && j < pieces.size() && !pieces[j].special && !pieces[j].segment) {
      run += pieces[j++].text;
    }
    const std::vector<TokenId> part = tok.Encode(run, /*add_bos=*/false, pieces[i].special);
    if (pieces[i].segment && !part.empty()) {
      spans->push_back({static_cast<int64_t>(ids.size()), static_cast<int64_t>(part.size())});
    }
    ids.insert(ids.end(), part.begin(), part.end());
    i = j;
  }
  return ids;
}

// Chat: a message given as parts is rendered with a marker in place of its content, so that
// the rendered text can be cut exactly where the parts go (whatever text the template puts
// around them). The marker holds a control character no tokenizer input has in practice; a
// content that holds one is refused.
constexpr std::string_view kPartsMarker = "\x1f" "cachette-parts:";
std::string PartsMarker(size_t k) {
  return std::string(kPartsMarker) + std::to_string(k) + "\x1f";
}

// The rendered segments with each marker replaced by its message's parts (as segments).
std::vector<TextPiece> CutParts(const std::vector<ChatTemplate::Segment>& segs,
                                const std::vector<std::vector<std::string>>& parts) {
  std::vector<TextPiece> out;
  auto plain = [&](std::string t) {
    if (!t.empty()) out.push_back({std::move(t), false, false});
  };
  for (const ChatTemplate::Segment& seg : segs) {
    if (seg.special) {
      out.push_back({seg.text, true, false});
      continue;
    }
    size_t at = 0;
    for (;;) {
      const size_t m = seg.text.find(kPartsMarker, at);
      if (m == std::string::npos) break;
      const size_t num = m + kPartsMarker.size();
      const size_t end = seg.text.find('\x1f', num);
      const size_t k = std::stoul(seg.text.substr(num, end - num));
      plain(seg.text.substr(at, m - at));
      for (const std::string& p : parts[k]) {
        if (!p.empty()) out.push_back({p, false, true});
      }
      at = end + 1;
    }
    plain(seg.text.substr(at));
  }
  return out;
}

// The prompt's tokens from "messages", "prompt" or "segments"; the segments' token spans go to
// `spans`.
Result<std::vector<TokenId>> PromptTokens(const json& j, const ApiContext& ctx, bool* present,
                                          ErrorDetail* d, std::vector<sched::SegmentSpan>* spans) {
  *present = false;
  spans->clear();
  const Tokenizer& tok = *ctx.tokenizer;
  if (auto it = j.find("messages"); it != j.end() && !it->is_null()) {
    *present = true;
    if (d != nullptr) d->param = "messages";  // every error below is about them
    if (!it->is_array()) return InvalidArgument("'messages' must be an array");
    if (it->size() > static_cast<size_t>(std::max(ctx.max_messages, 1))) {
      return InvalidArgument("'messages' holds " + std::to_string(it->size()) +
                             " messages; at most " + std::to_string(ctx.max_messages) +
                             " are accepted");
    }
    std::vector<ChatTemplate::Message> msgs;
    std::vector<std::vector<std::string>> parts;  // of the messages rendered with a marker
    size_t content_bytes = 0;
    for (size_t i = 0; i < it->size(); ++i) {
      const json& m = (*it)[i];
      if (!m.is_object() || !m.contains("role") || !m["role"].is_string()) {
        return InvalidArgument("messages[" + std::to_string(i) +
                               "] must be an object with a string 'role'");
      }
      CT_ASSIGN_OR_RETURN(Content content, ContentOf(m, i));
      if (content.text.find(kPartsMarker) != std::string::npos) {
        return InvalidArgument("messages[" + std::to_string(i) +
                               "].content holds a reserved control sequence (\\x1f)");
      }
      content_bytes += content.text.size();
      if (content.has_parts && !content.text.empty()) {
        msgs.push_back({m["role"].get<std::string>(), PartsMarker(parts.size())});
        parts.push_back(std::move(content.parts));
      } else {
        msgs.push_back({m["role"].get<std::string>(), std::move(content.text)});
      }
    }
    if (Status s = CheckTextBytes(ctx, content_bytes, "messages"); !s.ok()) {
      if (d != nullptr) d->code = "context_length_exceeded";
      return s;
    }
    CT_ASSIGN_OR_RETURN(auto segs, ctx.chat_template->Render(msgs));
    if (d != nullptr) d->param.clear();
    if (parts.empty()) return ChatTemplate::Tokenize(tok, segs);
    return TokenizePieces(tok, CutParts(segs, parts), spans);
  }
  if (auto it = j.find("segments"); it != j.end() && !it->is_null()) {
    *present = true;
    if (d != nullptr) d->param = "segments";  // every error below is about them
    if (j.contains("prompt")) {
      return InvalidArgument("give either 'prompt' or 'segments', not both");
    }
    if (!it->is_array() || it->empty()) {
      return InvalidArgument("'segments' must be a non-empty array of strings");
    }
    std::vector<TextPiece> pieces;
    size_t bytes = 0;
    for (size_t i = 0; i < it->size(); ++i) {
      if (!(*it)[i].is_string()) {
        return InvalidArgument("'segments' must be a non-empty array of strings (segments[" +
                               std::to_string(i) + "] is not a string)");
      }
      pieces.push_back({(*it)[i].get<std::string>(), true, true});
      bytes += pieces.back().text.size();
    }
    if (bytes == 0) return InvalidArgument("'segments' must not be empty (all are empty strings)");
    if (Status s = CheckTextBytes(ctx, bytes, "segments"); !s.ok()) {
      if (d != nullptr) d->code = "context_length_exceeded";
      return s;
    }
    if (d != nullptr) d->param.clear();
    return TokenizePieces(tok, pieces, spans);
  }
  if (auto it = j.find("prompt"); it != j.end() && !it->is_null()) {
    *present = true;
    if (d != nullptr) d->param = "prompt";
    const json* p = &*it;
    if (p->is_array() && p->size() == 1 && (*p)[0].is_string()) p = &(*p)[0];
    if (p->is_string()) {
      const std::string& text = p->get_ref<const std::string&>();
      if (text.empty()) return InvalidArgument("'prompt' must not be empty");
      if (Status s = CheckTextBytes(ctx, text.size(), "prompt"); !s.ok()) {
        if (d != nullptr) d->code = "context_length_exceeded";
        return s;
      }
      if (d != nullptr) d->param.clear();
      const std::string& sep = ctx.segment_separator;
      if (sep.empty()) return tok.Encode(text, tok.add_bos(), /*parse_special=*/true);
      // --segment-separator: a segment ends after each occurrence of it.
      std::vector<TextPiece> pieces;
      size_t at = 0;
      for (size_t k = text.find(sep); k != std::string::npos; k = text.find(sep, at)) {
        pieces.push_back({text.substr(at, k + sep.size() - at), true, true});
        at = k + sep.size();
      }
      if (at < text.size()) pieces.push_back({text.substr(at), true, true});
      return TokenizePieces(tok, pieces, spans);
    }
    if (p->is_array()) {
      if (ctx.n_ctx > 0 && p->size() >= static_cast<size_t>(ctx.n_ctx)) {
        if (d != nullptr) d->code = "context_length_exceeded";
        return InvalidArgument("'prompt' has " + std::to_string(p->size()) +
                               " tokens but this model's maximum context length is " +
                               std::to_string(ctx.n_ctx) + " tokens");
      }
      std::vector<TokenId> ids;
      for (const json& v : *p) {
        if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= ctx.n_vocab) {
          return InvalidArgument("'prompt' as an array must hold token ids in [0, " +
                                 std::to_string(ctx.n_vocab) + ") (batched prompts are not "
                                 "supported)");
        }
        ids.push_back(static_cast<TokenId>(v.get<int64_t>()));
      }
      if (ids.empty()) return InvalidArgument("'prompt' must not be empty");
      if (d != nullptr) d->param.clear();
      return ids;
    }
    return InvalidArgument("'prompt' must be a string or an array of token ids");
  }
  return std::vector<TokenId>{};
}

// logprobs, top_logprobs and echo into `call` (its prompt tokens are parsed already).
Status ParseLogprobs(const json& j, Endpoint endpoint, const ApiContext& ctx, GenerateCall* call,
                     ErrorDetail* d) {
  sched::SchedRequest& r = call->request;
  if (endpoint == Endpoint::kChat) {
    // Chat: logprobs is a boolean, top_logprobs the alternatives (it needs logprobs). Chat has
    // no echo; the field is ignored like any unknown one.
    bool want = false;
    CT_RETURN_IF_ERROR(Param(d, "logprobs", GetBool(j, "logprobs", &want)));
    int64_t top = -1;
    CT_RETURN_IF_ERROR(
        Param(d, "top_logprobs", GetInt(j, "top_logprobs", 0, kMaxTopLogprobs, &top)));
    if (top >= 0 && !want) {
      return Param(d, "top_logprobs",
                   InvalidArgument("'top_logprobs' requires 'logprobs': true"));
    }
    if (want) r.logprobs = static_cast<int>(std::max<int64_t>(top, 0));
    return Status::Ok();
  }
  // Completions (OpenAI's legacy format): logprobs is the number of alternatives; false (as
  // some clients send) means none.
  int64_t top = -1;
  if (auto it = j.find("logprobs"); it == j.end() || !it->is_boolean() || it->get<bool>()) {
    CT_RETURN_IF_ERROR(Param(d, "logprobs", GetInt(j, "logprobs", 0, kMaxTopLogprobs, &top)));
  }
  r.logprobs = static_cast<int>(top);
  CT_RETURN_IF_ERROR(Param(d, "echo", GetBool(j, "echo", &call->echo)));
  r.prompt_logprobs = call->echo && r.logprobs >= 0;
  if (call->echo && !j.contains("prompt")) {
    // "segments" (checked before the prompt was read): their concatenation.
    for (const json& seg : j["segments"]) call->prompt_text += seg.get<std::string>();
  } else if (call->echo) {
    const json* p = &*j.find("prompt");  // present: checked before the prompt was read
    if (p->is_array() && p->size() == 1 && (*p)[0].is_string()) p = &(*p)[0];
    call->prompt_text =
        p->is_string() ? p->get<std::string>() : ctx.tokenizer->Decode(r.prompt);
  }
  return Status::Ok();
}

}  // namespace

Result<GenerateCall> ParseGenerate(std::string_view body, Endpoint endpoint, const ApiContext& ctx,
                                   ErrorDetail* d) {
  ErrorDetail unused;
  if (d == nullptr) d = &unused;
  CT_ASSIGN_OR_RETURN(json j, ParseJson(body));
  GenerateCall call;
  call.endpoint = endpoint;
  sched::SchedRequest& r = call.request;

  std::string model;
  CT_RETURN_IF_ERROR(Param(d, "model", GetString(j, "model", &model)));
  if (!model.empty() && model != ctx.model_id) {
    d->param = "model";
    d->code = "model_not_found";
    return NotFound("the model '" + model + "' does not exist; this server serves '" +
                    ctx.model_id + "'");
  }
  const char* need = endpoint == Endpoint::kChat          ? "messages"
                     : j.contains("segments") && !j.contains("prompt") ? "segments"
                                                                        : "prompt";
  if (endpoint == Endpoint::kChat && j.contains("segments")) {
    return Param(d, "segments",
                 InvalidArgument("'segments' is for /v1/completions; in chat, give a message's "
                                 "content as text parts"));
  }
  if (endpoint == Endpoint::kCompletion && j.contains("segments") && j.contains("prompt")) {
    return Param(d, "segments", InvalidArgument("give either 'prompt' or 'segments', not both"));
  }
  if (!j.contains(need)) {
    return Param(d, need, InvalidArgument(std::string("'") + need + "' is required"));
  }
  if (endpoint == Endpoint::kChat && j.contains("prompt")) {
    return Param(d, "prompt",
                 InvalidArgument("use 'messages' (not 'prompt') with /v1/chat/completions"));
  }
  if (endpoint == Endpoint::kCompletion && j.contains("messages")) {
    return Param(d, "messages",
                 InvalidArgument("use 'prompt' (not 'messages') with /v1/completions"));
  }
  // The short identifiers first: they are cheap and bound what follows.
  CT_RETURN_IF_ERROR(Param(d, "cache_salt", GetString(j, "cache_salt", &r.cache_salt)));
  CT_RETURN_IF_ERROR(Param(d, "cache_salt", CheckIdBytes(r.cache_salt, "cache_salt")));
  CT_RETURN_IF_ERROR(Param(d, "session_id", GetString(j, "session_id", &r.session_id)));
  CT_RETURN_IF_ERROR(Param(d, "session_id", CheckIdBytes(r.session_id, "session_id")));
  CT_RETURN_IF_ERROR(Param(d, "program_id", GetString(j, "program_id", &r.program_id)));
  CT_RETURN_IF_ERROR(Param(d, "program_id", CheckIdBytes(r.program_id, "program_id")));
  CT_RETURN_IF_ERROR(Param(d, "tool", GetString(j, "tool", &r.tool)));
  CT_RETURN_IF_ERROR(Param(d, "tool", CheckIdBytes(r.tool, "tool")));
  // kv_policy (cachette): {"name": NAME, "budget": B, "cascade": C} or NAME alone (budget
  // 0.2), "none" or null for full KV; absent: the server's default. cascade (cake only,
  // default true): false reads the prompt whole and leaves its exact KV in the prefix cache. Read before the prompt and the context
  // checks: a policy that reassigns positions reads and generates past the context.
  r.kv_policy = ctx.default_kv_policy;
  if (auto it = j.find("kv_policy"); it != j.end()) {
    d->param = "kv_policy";
    KvPolicyConfig pc;
    if (it->is_null()) {
      pc.name.clear();
    } else if (it->is_string()) {
      pc.name = it->get<std::string>();
    } else if (it->is_object()) {
      for (const auto& [key, value] : it->items()) {
        if (key != "name" && key != "budget" && key != "cascade") {
          return InvalidArgument("'kv_policy' has an unknown field '" + key +
                                 "' (known: name, budget, cascade)");
        }
      }
      if (!it->contains("name") || !(*it)["name"].is_string()) {
        return InvalidArgument("kv_policy.name: a string is required");
      }
      pc.name = (*it)["name"].get<std::string>();
      if (it->contains("budget")) {
        if (!(*it)["budget"].is_number()) {
          return InvalidArgument("kv_policy.budget: must be a number");
        }
        pc.budget = (*it)["budget"].get<double>();
      }
      if (it->contains("cascade")) {
        if (!(*it)["cascade"].is_boolean()) {
          return InvalidArgument("kv_policy.cascade: must be true or false");
        }
        pc.cascade = (*it)["cascade"].get<bool>();
      }
    } else {
      return InvalidArgument("'kv_policy' must be an object {\"name\", \"budget\"}, a name or null");
    }
    if (pc.name == "none") pc.name.clear();
    if (!pc.name.empty()) CT_RETURN_IF_ERROR(ValidateKvPolicy(pc));
    r.kv_policy = pc;
    d->param.clear();
  }
  bool past_context = false;  // the policy lets positions stay within the cache
  if (!r.kv_policy.name.empty()) {
    auto policy = MakeKvPolicy(r.kv_policy);
    if (!policy.ok()) return Param(d, "kv_policy", policy.status());
    past_context = (*policy)->reassigns_positions();
  }

  // kv_reuse and blend_ratio (cachette, issue 11): how the prompt's segments are reused.
  r.reuse = ctx.default_reuse;
  if (auto it = j.find("kv_reuse"); it != j.end() && !it->is_null()) {
    d->param = "kv_reuse";
    if (!it->is_string()) return InvalidArgument("'kv_reuse' must be a string");
    const std::string mode = it->get<std::string>();
    auto m = ParseReuseMode(mode);
    if (!m.ok() || *m == ReuseMode::kFull) {
      return InvalidArgument(
          "'kv_reuse' must be one of prefix, naive, blend, cachecraft, ape (got '" + mode + "')");
    }
    r.reuse.mode = *m;
    d->param.clear();
  }
  if (auto it = j.find("blend_ratio"); it != j.end() && !it->is_null()) {
    d->param = "blend_ratio";
    if (!it->is_number()) return InvalidArgument("'blend_ratio' must be a number in [0, 1]");
    const double v = it->get<double>();
    if (!(v >= 0 && v <= 1)) return InvalidArgument("'blend_ratio' must be in [0, 1]");
    r.reuse.ratio = v;
    d->param.clear();
  }
  // APE's attention temperature T and scale S (engine/ape.h), for kv_reuse ape.
  for (auto [name, field] : {std::pair{"ape_temperature", &r.ape.temperature},
                             std::pair{"ape_scale", &r.ape.scale}}) {
    if (auto it = j.find(name); it != j.end() && !it->is_null()) {
      d->param = name;
      if (!it->is_number() || !(it->get<double>() > 0 && it->get<double>() <= 100)) {
        return InvalidArgument(std::string("'") + name + "' must be a number in (0, 100]");
      }
      *field = it->get<double>();
      d->param.clear();
    }
  }

  bool present = false;
  // Past the context, the prompt's text is bounded by the body limit alone.
  ApiContext prompt_ctx = ctx;
  if (past_context) prompt_ctx.max_token_bytes = 0;
  CT_ASSIGN_OR_RETURN(r.prompt, PromptTokens(j, prompt_ctx, &present, d, &r.segments));
  if (r.reuse.mode == ReuseMode::kApe) {
    const Status layout = sched::ValidateApeLayout(r);
    // Asked for: a 400; the server's default: this prompt is served by exact prefixes.
    if (j.contains("kv_reuse")) CT_RETURN_IF_ERROR(Param(d, "kv_reuse", layout));
    if (!layout.ok()) r.reuse.mode = ReuseMode::kPrefix;
  }
  if (r.prompt.empty()) {
    return Param(d, need, InvalidArgument(std::string("'") + need + "' is empty"));
  }

  SamplingParams& sp = r.gen.sampling;
  sp.temperature = 1.0f;  // OpenAI's default
  CT_RETURN_IF_ERROR(Param(d, "temperature", GetNumber(j, "temperature", 0, 2, &sp.temperature)));
  CT_RETURN_IF_ERROR(Param(d, "top_p", GetNumber(j, "top_p", 0, 1, &sp.top_p)));
  CT_RETURN_IF_ERROR(Param(d, "min_p", GetNumber(j, "min_p", 0, 1, &sp.min_p)));
  CT_RETURN_IF_ERROR(Param(d, "repetition_penalty",
                           GetNumber(j, "repetition_penalty", 0.01, 10, &sp.repetition_penalty)));
  float ignored = 0;
  CT_RETURN_IF_ERROR(
      Param(d, "presence_penalty", GetNumber(j, "presence_penalty", -2, 2, &ignored)));
  CT_RETURN_IF_ERROR(
      Param(d, "frequency_penalty", GetNumber(j, "frequency_penalty", -2, 2, &ignored)));
  int64_t v = 0;
  CT_RETURN_IF_ERROR(Param(d, "top_k", GetInt(j, "top_k", 0, 1 << 20, &v)));
  sp.top_k = static_cast<int>(v);
  v = 0;
  CT_RETURN_IF_ERROR(Param(d, "seed", GetInt(j, "seed", INT64_MIN, INT64_MAX, &v)));
  sp.seed = static_cast<uint64_t>(v);
  int64_t n = 1;
  CT_RETURN_IF_ERROR(Param(d, "n", GetInt(j, "n", 1, 1, &n)));
  CT_RETURN_IF_ERROR(ParseLogprobs(j, endpoint, ctx, &call, d));

  // max_tokens: within what the context leaves after the prompt.
  const int64_t prompt_len = static_cast<int64_t>(r.prompt.size());
  if (prompt_len >= ctx.n_ctx && !past_context) {
    d->param = need;
    d->code = "context_length_exceeded";
    return InvalidArgument("the prompt has " + std::to_string(prompt_len) +
                           " tokens but this model's maximum context length is " +
                           std::to_string(ctx.n_ctx) + " tokens (context_length_exceeded)");
  }
  int64_t max_tokens = -1;
  CT_RETURN_IF_ERROR(Param(d, "max_tokens", GetInt(j, "max_tokens", 0, INT64_MAX, &max_tokens)));
  CT_RETURN_IF_ERROR(Param(d, "max_completion_tokens",
                           GetInt(j, "max_completion_tokens", 0, INT64_MAX, &max_tokens)));
  if (max_tokens < 0) {
    max_tokens = past_context ? ctx.default_max_tokens
                              : std::min<int64_t>(ctx.default_max_tokens, ctx.n_ctx - prompt_len);
  } else if (prompt_len + max_tokens > ctx.n_ctx && !past_context) {
    d->param = "max_tokens";
    d->code = "context_length_exceeded";
    return InvalidArgument("this model's maximum context length is " + std::to_string(ctx.n_ctx) +
                           " tokens, but " + std::to_string(prompt_len + max_tokens) +
                           " were requested (" + std::to_string(prompt_len) + " in the prompt, " +
                           std::to_string(max_tokens) + " in 'max_tokens')");
  }
  r.gen.max_tokens = static_cast<int>(std::min<int64_t>(max_tokens, INT32_MAX));

  if (auto it = j.find("stop"); it != j.end() && !it->is_null()) {
    if (it->is_string()) {
      r.gen.stop.push_back(it->get<std::string>());
    } else if (it->is_array() && it->size() <= 4 &&
               std::all_of(it->begin(), it->end(), [](const json& s) { return s.is_string(); })) {
      for (const json& s : *it) r.gen.stop.push_back(s.get<std::string>());
    } else {
      return Param(d, "stop",
                   InvalidArgument("'stop' must be a string or an array of up to 4 strings"));
    }
  }
  if (endpoint == Endpoint::kChat) {
    for (auto& s : ctx.chat_template->DefaultStops()) r.gen.stop.push_back(s);
  }
  CT_RETURN_IF_ERROR(Param(d, "ignore_eos", GetBool(j, "ignore_eos", &r.gen.ignore_eos)));
  CT_RETURN_IF_ERROR(Param(d, "stream", GetBool(j, "stream", &call.stream)));
  if (auto it = j.find("stream_options"); it != j.end() && !it->is_null()) {
    d->param = "stream_options";
    if (!it->is_object()) return InvalidArgument("'stream_options' must be an object");
    CT_RETURN_IF_ERROR(GetBool(*it, "include_usage", &call.include_usage));
    d->param.clear();
  }

  // cachette extensions (cache_salt and session_id are read above).
  int64_t prio = 0;
  CT_RETURN_IF_ERROR(Param(d, "priority", GetInt(j, "priority", -1000000, 1000000, &prio)));
  r.priority = static_cast<int>(prio);
  int64_t session_ttl_s = 0;
  CT_RETURN_IF_ERROR(
      Param(d, "session_ttl_s", GetInt(j, "session_ttl_s", 1, 7 * 24 * 3600, &session_ttl_s)));
  r.session_ttl_ms = session_ttl_s * 1000;
  CT_RETURN_IF_ERROR(
      Param(d, "deadline_ms", GetInt(j, "deadline_ms", 1, 24 * 3600 * 1000, &r.deadline_ms)));
  if (auto it = j.find("cache_control"); it != j.end() && !it->is_null()) {
    d->param = "cache_control";
    if (!it->is_object()) return InvalidArgument("'cache_control' must be an object");
    r.pin_ttl_ms = ctx.default_pin_ttl_ms;
    const json* ttl = it->contains("ttl_s") ? &(*it)["ttl_s"]
                      : it->contains("ttl") ? &(*it)["ttl"]
                                            : nullptr;
    if (ttl != nullptr) {
      CT_ASSIGN_OR_RETURN(int64_t s, ParseTtlSeconds(*ttl));
      r.pin_ttl_ms = s * 1000;
    }
    d->param.clear();
  }
  CT_RETURN_IF_ERROR(sp.Validate());
  return call;
}

const char* FinishReasonName(GenerateResult::Finish finish) {
  return finish == GenerateResult::Finish::kLength ? "length" : "stop";
}

Result<PromptRef> ParsePromptRef(std::string_view body, const ApiContext& ctx, bool required,
                                 ErrorDetail* d) {
  PromptRef ref;
  CT_ASSIGN_OR_RETURN(ref.body, ParseJson(body.empty() ? std::string_view("{}") : body));
  CT_RETURN_IF_ERROR(Param(d, "cache_salt", GetString(ref.body, "cache_salt", &ref.cache_salt)));
  CT_RETURN_IF_ERROR(Param(d, "cache_salt", CheckIdBytes(ref.cache_salt, "cache_salt")));
  CT_RETURN_IF_ERROR(Param(d, "session_id", GetString(ref.body, "session_id", &ref.session_id)));
  CT_RETURN_IF_ERROR(Param(d, "session_id", CheckIdBytes(ref.session_id, "session_id")));
  bool present = false;
  std::vector<sched::SegmentSpan> spans;  // cut as a generation request's, then unused
  CT_ASSIGN_OR_RETURN(ref.tokens, PromptTokens(ref.body, ctx, &present, d, &spans));
  if (required && ref.tokens.empty()) {
    return InvalidArgument("give the prefix as 'prompt' (text or token ids) or 'messages'");
  }
  return ref;
}

Result<SegmentsRef> ParseSegmentsRef(std::string_view body, const ApiContext& ctx,
                                     ErrorDetail* d) {
  ErrorDetail unused;
  if (d == nullptr) d = &unused;
  CT_ASSIGN_OR_RETURN(json j, ParseJson(body));
  SegmentsRef ref;
  CT_RETURN_IF_ERROR(Param(d, "cache_salt", GetString(j, "cache_salt", &ref.cache_salt)));
  CT_RETURN_IF_ERROR(Param(d, "cache_salt", CheckIdBytes(ref.cache_salt, "cache_salt")));
  std::string prefix;
  CT_RETURN_IF_ERROR(Param(d, "prefix", GetString(j, "prefix", &prefix)));
  int64_t ttl_s = 0;
  CT_RETURN_IF_ERROR(Param(d, "ttl_s", GetInt(j, "ttl_s", 1, 7 * 24 * 3600, &ttl_s)));
  ref.ttl_ms = ttl_s * 1000;
  const Tokenizer& tok = *ctx.tokenizer;
  if (tok.add_bos() && tok.bos() >= 0) ref.context.push_back(tok.bos());
  if (!prefix.empty()) {
    if (Status s = CheckTextBytes(ctx, prefix.size(), "prefix"); !s.ok()) return Param(d, "prefix", s);
    const std::vector<TokenId> p = tok.Encode(prefix, /*add_bos=*/false, /*parse_special=*/true);
    ref.context.insert(ref.context.end(), p.begin(), p.end());
  }
  auto it = j.find("segments");
  if (it == j.end() || !it->is_array() || it->empty()) {
    return Param(d, "segments", InvalidArgument("'segments' must be a non-empty array of strings"));
  }
  for (size_t i = 0; i < it->size(); ++i) {
    const json& v = (*it)[i];
    if (!v.is_string() || v.get_ref<const std::string&>().empty()) {
      return Param(d, "segments",
                   InvalidArgument("'segments' must hold non-empty strings (segments[" +
                                   std::to_string(i) + "] is not one)"));
    }
    const std::string& text = v.get_ref<const std::string&>();
    if (Status s = CheckTextBytes(ctx, text.size(), "segments"); !s.ok()) {
      return Param(d, "segments", s);
    }
    ref.segments.push_back(tok.Encode(text, /*add_bos=*/false, /*parse_special=*/true));
    if (ref.segments.back().empty()) {
      return Param(d, "segments",
                   InvalidArgument("segments[" + std::to_string(i) + "] has no tokens"));
    }
    const int64_t len = static_cast<int64_t>(ref.context.size() + ref.segments.back().size());
    if (ctx.n_ctx > 0 && len > ctx.n_ctx) {
      return Param(d, "segments",
                   InvalidArgument("segments[" + std::to_string(i) + "] with the prefix has " +
                                   std::to_string(len) + " tokens, more than this model's " +
                                   "maximum context length of " + std::to_string(ctx.n_ctx)));
    }
  }
  return ref;
}

int HttpStatusFor(const Status& s) {
  switch (s.code()) {
    case StatusCode::kInvalidArgument: return 400;
    case StatusCode::kNotFound: return 404;
    case StatusCode::kResourceExhausted: return 429;
    case StatusCode::kUnavailable: return 503;
    case StatusCode::kDeadlineExceeded: return 504;
    case StatusCode::kUnimplemented:
      return 501;
    case StatusCode::kCancelled:
      return 499;
    default: return 500;
  }
}

std::string ErrorBody(const Status& s, const ErrorDetail& detail) {
  const char* type = "server_error";
  switch (s.code()) {
    case StatusCode::kInvalidArgument:
    case StatusCode::kNotFound:
      type = "invalid_request_error";
      break;
    case StatusCode::kResourceExhausted:
      type = "rate_limit_error";
      break;
    case StatusCode::kUnavailable:
      type = "service_unavailable";
      break;
    case StatusCode::kDeadlineExceeded:
      type = "timeout_error";
      break;
    default:
      break;
  }
  const std::string code =
      detail.code.empty() ? std::string(StatusCodeName(s.code())) : detail.code;
  json j = {{"error",
             {{"message", s.message()},
              {"type", type},
              {"param", detail.param.empty() ? json(nullptr) : json(detail.param)},
              {"code", code}}}};
  return Dump(j);
}

int64_t MaxTokenBytes(const Tokenizer& tok) {
  size_t longest = 0;
  for (int32_t id = 0; id < tok.vocab_size(); ++id) {
    longest = std::max(
        {longest, tok.TokenText(id).size(), tok.TokenToPiece(id, /*render_special=*/true).size()});
  }
  return static_cast<int64_t>(longest);
}

json UsageJson(const sched::RequestUsage& u) {
  json tiers = json::object();
  for (const auto& t : u.cached_by_tier) tiers[t.tier] = t.tokens;
  json ext = {{"cached_tokens_by_tier", tiers},
              {"queue_ms", u.queue_seconds * 1e3},
              {"ttft_ms", u.ttft_seconds * 1e3},
              {"decode_ms", u.decode_seconds * 1e3}};
  if (u.pin_id != 0) ext["pin_id"] = u.pin_id;
  if (u.kv_tokens_kept >= 0) ext["kv_tokens_kept"] = u.kv_tokens_kept;
  ext["reused_tokens"] = {{"prefix", u.cached_tokens - u.segment_tokens},
                          {"segment", u.segment_tokens}};
  ext["recomputed_tokens"] = u.recomputed_tokens;
  return {{"prompt_tokens", u.prompt_tokens},
          {"completion_tokens", u.completion_tokens},
          {"total_tokens", u.prompt_tokens + u.completion_tokens},
          {"prompt_tokens_details", {{"cached_tokens", u.cached_tokens}}},
          {"cachette", ext}};
}

std::vector<LogprobEntry> PromptLogprobEntries(std::span<const TokenId> prompt,
                                               std::vector<PositionLogprobs> lp,
                                               const Tokenizer& tok) {
  std::vector<LogprobEntry> out(prompt.size());
  // Offsets in the decoded prompt: the pieces' running length, less what Decode strips at the
  // start (SentencePiece's leading space; nothing for byte-level BPE).
  std::vector<int64_t> at(prompt.size());
  int64_t pieces = 0;
  for (size_t i = 0; i < prompt.size(); ++i) {
    at[i] = pieces;
    pieces += static_cast<int64_t>(tok.TokenToPiece(prompt[i]).size());
  }
  const int64_t stripped =
      pieces - static_cast<int64_t>(tok.Decode(std::vector<TokenId>(prompt.begin(), prompt.end()))
                                        .size());
  for (size_t i = 0; i < prompt.size(); ++i) {
    LogprobEntry& e = out[i];
    e.text_offset = std::max<int64_t>(0, at[i] - stripped);
    e.lp.chosen.token = prompt[i];
    if (i == 0) {
      e.known = false;
    } else if (i - 1 < lp.size()) {
      e.lp = std::move(lp[i - 1]);
    } else {
      e.known = false;  // not computed (a request cut short): null, never a made-up value
    }
  }
  return out;
}

std::string LogprobTokenText(const Tokenizer& tok, TokenId id) {
  const std::string piece = tok.TokenToPiece(id, /*render_special=*/true);
  const std::vector<unicode::Unit> units = unicode::Decode(piece);
  if (std::none_of(units.begin(), units.end(),
                   [](const unicode::Unit& u) { return u.cp == unicode::Unit::kInvalid; })) {
    return piece;
  }
  std::string out = "bytes:";
  for (const unicode::Unit& u : units) {
    if (u.cp != unicode::Unit::kInvalid) {
      out.append(piece, u.offset, u.len);
      continue;
    }
    char hex[8];
    std::snprintf(hex, sizeof hex, "\\x%02x", static_cast<unsigned char>(piece[u.offset]));
    out += hex;
  }
  return out;
}

json LogprobsJson(const GenerateCall& call, std::span<const LogprobEntry> entries,
                  const Tokenizer& tok) {
  if (call.request.logprobs < 0) return nullptr;
  if (call.endpoint == Endpoint::kChat) {
    auto token_json = [&](const TokenLogprob& t) {
      const std::string piece = tok.TokenToPiece(t.token, /*render_special=*/true);
      json bytes = json::array();
      for (char c : piece) bytes.push_back(static_cast<unsigned char>(c));
      return json{{"token", LogprobTokenText(tok, t.token)},
                  {"logprob", t.logprob},
                  {"bytes", std::move(bytes)}};
    };
    json content = json::array();
    for (const LogprobEntry& e : entries) {
      if (!e.known) continue;
      json item = token_json(e.lp.chosen);
      json top = json::array();
      for (const TokenLogprob& t : e.lp.top) top.push_back(token_json(t));
      item["top_logprobs"] = std::move(top);
      content.push_back(std::move(item));
    }
    return {{"content", std::move(content)}, {"refusal", nullptr}};
  }
  json tokens = json::array(), token_logprobs = json::array(), top_logprobs = json::array(),
       offsets = json::array();
  for (const LogprobEntry& e : entries) {
    tokens.push_back(LogprobTokenText(tok, e.lp.chosen.token));
    offsets.push_back(e.text_offset);
    if (!e.known) {
      token_logprobs.push_back(nullptr);
      top_logprobs.push_back(nullptr);
      continue;
    }
    token_logprobs.push_back(e.lp.chosen.logprob);
    // Most likely first, so a key two tokens share keeps the likelier one's value; the chosen
    // token last (it is there already when among the top N).
    json top = json::object();
    for (const TokenLogprob& t : e.lp.top) top.emplace(LogprobTokenText(tok, t.token), t.logprob);
    top.emplace(LogprobTokenText(tok, e.lp.chosen.token), e.lp.chosen.logprob);
    top_logprobs.push_back(std::move(top));
  }
  return {{"tokens", std::move(tokens)},
          {"token_logprobs", std::move(token_logprobs)},
          {"top_logprobs", std::move(top_logprobs)},
          {"text_offset", std::move(offsets)}};
}

json CompletionJson(const GenerateCall& call, const std::string& id, int64_t created,
                    const std::string& model, const std::string& text, const std::string& finish,
                    const sched::RequestUsage& usage, const json& logprobs) {
  json choice = {{"index", 0}, {"finish_reason", finish}, {"logprobs", logprobs}};
  if (call.endpoint == Endpoint::kChat) {
    choice["message"] = {{"role", "assistant"}, {"content", text}};
  } else {
    choice["text"] = text;
  }
  return {{"id", id},
          {"object", call.endpoint == Endpoint::kChat ? "chat.completion" : "text_completion"},
          {"created", created},
          {"model", model},
          {"choices", json::array({choice})},
          {"usage", UsageJson(usage)}};
}

json ChunkJson(const GenerateCall& call, const std::string& id, int64_t created,
               const std::string& model, const std::string& text, bool first,
               const std::string* finish, const json& logprobs) {
  json choice = {{"index", 0},
                 {"finish_reason", finish ? json(*finish) : json(nullptr)},
                 {"logprobs", logprobs}};
  if (call.endpoint == Endpoint::kChat) {
    json delta = json::object();
    if (first) delta["role"] = "assistant";
    if (!finish) delta["content"] = text;
    choice["delta"] = delta;
  } else {
    choice["text"] = text;
  }
  return {{"id", id},
          {"object", call.endpoint == Endpoint::kChat ? "chat.completion.chunk" : "text_completion"},
          {"created", created},
          {"model", model},
          {"choices", json::array({choice})}};
}

json UsageChunkJson(const GenerateCall& call, const std::string& id, int64_t created,
                    const std::string& model, const sched::RequestUsage& usage) {
  json j = ChunkJson(call, id, created, model, "", false, nullptr);
  j["choices"] = json::array();
  j["usage"] = UsageJson(usage);
  return j;
}

std::string Dump(const json& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

}  // namespace cachette::server
