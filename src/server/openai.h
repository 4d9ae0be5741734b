// The OpenAI API surface: request bodies to scheduler requests (with validation), scheduler
// results to response bodies, and the error object.
//
// Accepted request fields (anything else is ignored, as OpenAI does):
//   model (string; must name the served model), messages (chat) or prompt (completions: a
//   string, a one-string array or an array of token ids), max_tokens / max_completion_tokens,
//   temperature, top_p, top_k, min_p, repetition_penalty, seed, stop (string or up to 4),
//   stream, stream_options.include_usage, n (only 1), ignore_eos, logprobs (chat: a boolean,
//   with top_logprobs 0..20, which needs logprobs true; completions: an integer 0..20, or false),
//   echo (completions: the prompt before the completion, with logprobs its tokens' too), and the
//   cachette extensions cache_salt (tenant), priority, session_id, session_ttl_s,
//   cache_control {"ttl_s": N} or {"type": "ephemeral", "ttl": "5m" | "1h" | N}, deadline_ms
//   (time-to-first-token objective), program_id (agent program; default session_id) and tool
//   (the tool the program calls after this turn; its result is the next turn).
// Segment reuse (issue 11; docs/serving.md "Segment reuse"): completions take "segments" (a
// non-empty array of strings) instead of "prompt" (the prompt is their concatenation); a chat
// message's content given as {"type": "text", "text"} parts makes each part a segment; with
// ApiContext::segment_separator a string prompt is split after each occurrence of it. Each
// segment is tokenized on its own (its boundaries are token boundaries), the text around them
// as usual; SchedRequest::segments gets their token spans. "kv_reuse" (prefix, naive, blend,
// cachecraft, ape) and "blend_ratio" in [0, 1] (blend's ratio, cachecraft's alpha) fill
// SchedRequest::reuse, defaulting to ApiContext::default_reuse; "ape_temperature" and
// "ape_scale" in (0, 100] fill SchedRequest::ape (an ape layout that cannot be served is a 400
// naming kv_reuse: sched::ValidateApeLayout).
// A wrong type, an out-of-range value, a prompt longer than the context or max_tokens beyond it
// gives kInvalidArgument with a message naming the field; an unknown model kNotFound.
//
// Limits checked before any tokenization (each a 400 naming the field): cache_salt, session_id,
// program_id and tool at most kMaxIdBytes bytes; at most ApiContext::max_messages messages;
// prompt text (or the messages' contents together) at most n_ctx * max_token_bytes * 2 bytes:
// no token stands for more input bytes than the longest token text of the vocabulary, so a
// longer text cannot fit the context (the factor 2 is margin for normalizers); an id array at
// most n_ctx.
//
// Thread-safety: stateless functions; ApiContext is read-only.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "cachette/status.h"
#include "engine/logprobs.h"
#include "kv/kv_policy.h"
#include "model/tokenizer.h"
#include "sched/request.h"
#include "server/chat_template.h"

namespace cachette::server {

struct ApiContext {
  std::string model_id;          // what /v1/models lists and requests must name
  const Tokenizer* tokenizer = nullptr;
  const ChatTemplate* chat_template = nullptr;
  int32_t n_vocab = 0;
  int64_t n_ctx = 0;
  int default_max_tokens = 256;  // when a request gives none (capped by the context)
  int64_t default_pin_ttl_ms = 300000;
  // The longest token text of the vocabulary in bytes (MaxTokenBytes); 0: no byte bound.
  int64_t max_token_bytes = 0;
  int max_messages = 1024;
  // The server's KV budget policy for requests that name none (name empty: full KV).
  KvPolicyConfig default_kv_policy;
  // Segment reuse: kv_reuse and blend_ratio of a request that gives none, and the separator
  // after each occurrence of which a completions string prompt is cut into segments (empty:
  // none).
  ReuseOptions default_reuse;
  std::string segment_separator;
};

// Longest cache_salt and session_id accepted.
inline constexpr size_t kMaxIdBytes = 256;

// The longest token of `tok` in bytes: its stored text or its piece, whichever is longer.
int64_t MaxTokenBytes(const Tokenizer& tok);

// What an OpenAI error body says beyond the Status: the request field at fault ("param") and an
// OpenAI error code such as "context_length_exceeded" or "model_not_found" (empty: the Status
// code's name).
struct ErrorDetail {
  std::string param;
  std::string code;
};

enum class Endpoint { kChat, kCompletion };

struct GenerateCall {
  Endpoint endpoint = Endpoint::kChat;
  sched::SchedRequest request;  // request.logprobs: -1 none, else top alternatives per token
  bool stream = false;
  bool include_usage = false;
  bool echo = false;        // completions: the prompt's text (and logprobs) first
  std::string prompt_text;  // echo: the prompt as given, or its token ids decoded
};

// Parses and validates a /v1/chat/completions or /v1/completions body. On failure, `detail` (when
// given) names the field at fault. Never throws, whatever the bytes.
Result<GenerateCall> ParseGenerate(std::string_view body, Endpoint endpoint, const ApiContext& ctx,
                                   ErrorDetail* detail = nullptr);

// Prompt tokens for the admin API: a body with "prompt" (string or ids) or "messages" (rendered
// with the chat template, generation prompt included), plus its "cache_salt" and "session_id"
// (strings of at most 256 bytes; kInvalidArgument naming the field otherwise).
struct PromptRef {
  std::vector<TokenId> tokens;
  std::string cache_salt;
  std::string session_id;  // "" when absent
  nlohmann::json body;     // the parsed body, for endpoint-specific fields
};
Result<PromptRef> ParsePromptRef(std::string_view body, const ApiContext& ctx, bool required,
                                 ErrorDetail* detail = nullptr);

// POST /v1/cache/segments: {"segments": [str, ...], "prefix": str, "cache_salt": str, "ttl_s": N}.
// context = BOS + the prefix's tokens; each segment tokenized as a completions segment is (on
// its own, special tokens parsed). kInvalidArgument naming the field: segments missing, not a
// non-empty array of non-empty strings, or longer than the context; prefix or cache_salt not a
// string; ttl_s not an integer in [1, 604800].
struct SegmentsRef {
  std::vector<TokenId> context;
  std::vector<std::vector<TokenId>> segments;
  std::string cache_salt;
  int64_t ttl_ms = 0;  // 0: until evicted
};
Result<SegmentsRef> ParseSegmentsRef(std::string_view body, const ApiContext& ctx,
                                     ErrorDetail* detail = nullptr);

// The HTTP status for a Status code (never for its message): InvalidArgument 400, NotFound 404,
// Cancelled 499, ResourceExhausted 429, Unavailable 503, DeadlineExceeded 504, Unimplemented 501,
// anything else 500.
int HttpStatusFor(const Status& s);
// {"error": {"message", "type", "param", "code"}}: type from the Status code (as HttpStatusFor),
// param and code from `detail` (param null when empty; code the Status code's name when empty).
std::string ErrorBody(const Status& s, const ErrorDetail& detail = {});

// The OpenAI finish_reason of a finished request: "length" when max_tokens (or the context) cut
// it, else "stop" (EOS, a stop string; a cancelled request's client is gone anyway).
const char* FinishReasonName(GenerateResult::Finish finish);

// One token of a choice's logprobs, in the order the choice lists them (echoed prompt tokens,
// then generated ones).
struct LogprobEntry {
  bool known = true;        // false: the first prompt token, which has no logprob (null)
  PositionLogprobs lp;      // lp.chosen.token is the token (also when !known)
  int64_t text_offset = 0;  // completions: where its text starts in the choice's text
};

// The echoed prompt's entries: the first token unknown, then `lp` (entry i for token i + 1, as
// sched::StreamEvent::prompt_logprobs). Text offsets are those of the prompt decoded
// (Tokenizer::Decode: pieces without special tokens' text).
std::vector<LogprobEntry> PromptLogprobEntries(std::span<const TokenId> prompt,
                                               std::vector<PositionLogprobs> lp,
                                               const Tokenizer& tok);

// A token's text in logprobs: its bytes with special tokens rendered ("<|endoftext|>"); bytes
// that are not valid UTF-8 (part of a character) are spelled "\xNN" after a "bytes:" prefix, as
// OpenAI does (chat's `bytes` array carries the raw bytes).
std::string LogprobTokenText(const Tokenizer& tok, TokenId id);

// The `logprobs` object of a choice (or of one streamed chunk's tokens) in the call's format:
//   completions: {"tokens", "token_logprobs", "top_logprobs", "text_offset"}; an unknown entry
//     has null token_logprobs and top_logprobs; a known one's top_logprobs maps token text to
//     logprob for the top N plus the chosen token (up to N + 1 keys, OpenAI's "logprobs + 1";
//     a key two tokens share keeps the likelier one's value);
//   chat: {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
//     "bytes"}] x N]}], "refusal": null} (unknown entries are skipped: chat has no prompt ones).
// Null when the call asked for no logprobs.
nlohmann::json LogprobsJson(const GenerateCall& call, std::span<const LogprobEntry> entries,
                            const Tokenizer& tok);

// Response pieces. `id` is "chatcmpl-N" / "cmpl-N"; `created` is Unix seconds. `logprobs` is
// the choice's (LogprobsJson; null when not asked). For echo, `text` already starts with the
// prompt.
nlohmann::json UsageJson(const sched::RequestUsage& u);
nlohmann::json CompletionJson(const GenerateCall& call, const std::string& id, int64_t created,
                              const std::string& model, const std::string& text,
                              const std::string& finish, const sched::RequestUsage& usage,
                              const nlohmann::json& logprobs = nullptr);
// One streamed chunk: a delta of text (first chunk of a chat also carries the role), or the
// final chunk with finish_reason (text empty), with the logprobs of the tokens it carries.
nlohmann::json ChunkJson(const GenerateCall& call, const std::string& id, int64_t created,
                         const std::string& model, const std::string& text, bool first,
                         const std::string* finish, const nlohmann::json& logprobs = nullptr);
nlohmann::json UsageChunkJson(const GenerateCall& call, const std::string& id, int64_t created,
                              const std::string& model, const sched::RequestUsage& usage);
// JSON text that never throws: invalid UTF-8 in generated text becomes U+FFFD.
std::string Dump(const nlohmann::json& j);

}  // namespace cachette::server
