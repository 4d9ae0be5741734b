// Feeds arbitrary bytes as the body of /v1/chat/completions, /v1/completions and the cache admin
// API into the OpenAI request parser (src/server/openai.*), with the bundled model's tokenizer
// (loaded once). The parser must return a request or an error, never crash; an accepted request
// must stay within the context (or name a valid KV budget policy that reads past it), its
// segments must be valid spans of its prompt, and every outcome must render to JSON.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string_view>

#include "core/check.h"
#include "model/model.h"
#include "server/chat_template.h"
#include "server/openai.h"

namespace {

using namespace cachette;
using namespace cachette::server;

struct Fixture {
  std::unique_ptr<Model> model;
  ChatTemplate chatml = *ChatTemplate::ByName("chatml");
  ApiContext ctx;

  Fixture() {
    auto m = Model::Load(CACHETTE_FUZZ_MODEL);
    CT_CHECK(m.ok()) << m.status().ToString();
    model = std::move(*m);
    ctx.model_id = "tiny";
    ctx.tokenizer = &model->tokenizer();
    ctx.chat_template = &chatml;
    ctx.n_vocab = model->config().n_vocab;
    ctx.n_ctx = 128;  // small, so that the context checks are reached often
    ctx.max_token_bytes = MaxTokenBytes(model->tokenizer());
    ctx.max_messages = 64;
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Fixture* f = new Fixture();  // never freed: lives for the whole run
  const std::string_view body(reinterpret_cast<const char*>(data), size);
  for (Endpoint ep : {Endpoint::kChat, Endpoint::kCompletion}) {
    ErrorDetail detail;
    auto call = ParseGenerate(body, ep, f->ctx, &detail);
    if (!call.ok()) {
      CT_CHECK(!ErrorBody(call.status(), detail).empty());
      CT_CHECK(HttpStatusFor(call.status()) >= 400);
      continue;
    }
    const sched::SchedRequest& r = call->request;
    CT_CHECK(!r.prompt.empty());
    // Within the context, unless a KV budget policy that reassigns positions reads past it.
    bool past_context = false;
    if (!r.kv_policy.name.empty()) {
      CT_CHECK(ValidateKvPolicy(r.kv_policy).ok());
      past_context = (*MakeKvPolicy(r.kv_policy))->reassigns_positions();
    }
    CT_CHECK(past_context ||
             static_cast<int64_t>(r.prompt.size()) + r.gen.max_tokens <= f->ctx.n_ctx);
    CT_CHECK(r.gen.max_tokens >= 0);
    CT_CHECK(r.cache_salt.size() <= kMaxIdBytes && r.session_id.size() <= kMaxIdBytes);
    for (TokenId t : r.prompt) CT_CHECK(t >= 0 && t < f->ctx.n_vocab);
    // Segments (issue 11): sorted, disjoint, non-empty spans of the prompt; an ape request
    // that was accepted has a layout the scheduler can serve; ratios and T, S in range.
    int64_t seg_end = 0;
    for (const sched::SegmentSpan& sp : r.segments) {
      CT_CHECK(sp.offset >= seg_end && sp.length > 0 &&
               sp.offset + sp.length <= static_cast<int64_t>(r.prompt.size()));
      seg_end = sp.offset + sp.length;
    }
    CT_CHECK(r.reuse.ratio >= 0 && r.reuse.ratio <= 1);
    if (r.reuse.mode == ReuseMode::kApe) CT_CHECK(sched::ValidateApeLayout(r).ok());
    sched::RequestUsage usage;
    CT_CHECK(!Dump(CompletionJson(*call, "id", 0, "tiny", "text", "stop", usage)).empty());
  }
  ErrorDetail detail;
  auto ref = ParsePromptRef(body, f->ctx, /*required=*/false, &detail);
  if (ref.ok()) {
    for (TokenId t : ref->tokens) CT_CHECK(t >= 0 && t < f->ctx.n_vocab);
  }
  return 0;
}
