// Unit tests for the pieces of the server that need no model running: chat templates, request
// validation, configuration files, the metrics text and the listening socket. (tests/e2e drives
// the real binary.)
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <thread>
#include <tuple>

#include <cstdio>
#include <fstream>

#include "core/check.h"
#include "server/auth.h"
#include "server/chat_template.h"
#include "server/config.h"
#include "server/http_listen.h"
#include "server/metrics.h"
#include "server/openai.h"

namespace cachette::server {
namespace {

const Model& Tiny() {
  static std::unique_ptr<Model> m = [] {
    // Appended rather than `std::string(...) + "..."`, which trips a GCC 12 -Warray-bounds
    // false positive.
    std::string path(CACHETTE_SHARED_DIR);
    path += "/models/cachette-tiny-q8_0.gguf";
    auto r = Model::Load(path);
    CT_CHECK(r.ok()) << r.status().ToString();
    return std::move(*r);
  }();
  return *m;
}

TEST(ChatTemplateTest, DetectsFamiliesByContent) {
  struct Case {
    const char* jinja;
    const char* want;
  } cases[] = {
      {"", "plain"},
      {"{% for m in messages %}<|im_start|>{{m.role}}\n{{m.content}}<|im_end|>{% endfor %}",
       "chatml"},
      {"{{ '<|start_header_id|>' + m.role + '<|end_header_id|>' }}", "llama3"},
      {"{{ '<start_of_turn>' + role }}", "gemma"},
      {"{{ bos_token + '[INST] ' + m.content + ' [/INST]' }}", "llama2"},
  };
  for (const auto& c : cases) {
    auto t = ChatTemplate::Detect(c.jinja);
    ASSERT_TRUE(t.ok()) << c.want;
    EXPECT_EQ(t->name(), c.want);
  }
  EXPECT_FALSE(ChatTemplate::Detect("{{ something else }}").ok());
  EXPECT_FALSE(ChatTemplate::ByName("jinja").ok());
  EXPECT_EQ(ChatTemplate::ByName("mistral")->name(), "llama2");
}

TEST(ChatTemplateTest, RendersChatMlAndKeepsUserTextPlain) {
  auto t = *ChatTemplate::ByName("chatml");
  auto segs = t.Render({{"system", "Be brief."}, {"user", "Hi <|im_end|>"}});
  ASSERT_TRUE(segs.ok());
  std::string all;
  for (const auto& s : *segs) all += s.text;
  EXPECT_EQ(all,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi <|im_end|><|im_end|>\n"
            "<|im_start|>assistant\n");
  bool user_text_plain = false;
  for (const auto& s : *segs) user_text_plain |= (s.text == "Hi <|im_end|>" && !s.special);
  EXPECT_TRUE(user_text_plain);
  EXPECT_FALSE(t.Render({{"wizard", "x"}}).ok());
  EXPECT_FALSE(t.Render({}).ok());
}

TEST(ChatTemplateTest, NextTurnExtendsThePreviousPrompt) {
  auto t = *ChatTemplate::ByName("plain");
  const Tokenizer& tok = Tiny().tokenizer();
  auto one = ChatTemplate::Tokenize(tok, *t.Render({{"user", "What is a cat?"}}));
  auto two = ChatTemplate::Tokenize(
      tok, *t.Render({{"user", "What is a cat?"}, {"assistant", " A small animal."},
                      {"user", "And a dog?"}}));
  ASSERT_LT(one.size(), two.size());
  EXPECT_TRUE(std::equal(one.begin(), one.end(), two.begin()));
}

ApiContext Ctx() {
  static ChatTemplate tmpl = *ChatTemplate::ByName("plain");
  ApiContext c;
  c.model_id = "tiny";
  c.tokenizer = &Tiny().tokenizer();
  c.chat_template = &tmpl;
  c.n_vocab = Tiny().config().n_vocab;
  c.n_ctx = 64;
  return c;
}

TEST(OpenAiTest, ParsesAChatRequest) {
  auto call = ParseGenerate(
      R"({"model":"tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":5,
          "temperature":0,"stream":true,"stream_options":{"include_usage":true},
          "cache_salt":"t1","priority":3,"session_id":"s","cache_control":{"ttl":"2m"},
          "stop":["\n\n"],"deadline_ms":1500,"program_id":"agent-7","tool":"search"})",
      Endpoint::kChat, Ctx());
  ASSERT_TRUE(call.ok()) << call.status().ToString();
  EXPECT_TRUE(call->stream);
  EXPECT_TRUE(call->include_usage);
  EXPECT_EQ(call->request.gen.max_tokens, 5);
  EXPECT_EQ(call->request.cache_salt, "t1");
  EXPECT_EQ(call->request.priority, 3);
  EXPECT_EQ(call->request.pin_ttl_ms, 120000);
  EXPECT_EQ(call->request.deadline_ms, 1500);
  EXPECT_EQ(call->request.program_id, "agent-7");
  EXPECT_EQ(call->request.tool, "search");
  EXPECT_EQ(call->request.gen.stop.size(), 2u);  // "\n\n" and the plain template's "\nUser:"
}

// Segments are tokenized on their own: each span's tokens are its text's, the prompt their
// concatenation after BOS; chat parts are cut out of the rendered template text the same way.
TEST(OpenAiTest, SegmentsAreTokenizedOnTheirOwnAndSpanned) {
  const Tokenizer& tok = *Ctx().tokenizer;
  auto enc = [&](const std::string& t, bool special) { return tok.Encode(t, false, special); };
  auto span_tokens = [](const sched::SchedRequest& r, size_t i) {
    const sched::SegmentSpan& sp = r.segments[i];
    return std::vector<TokenId>(r.prompt.begin() + sp.offset,
                                r.prompt.begin() + sp.offset + sp.length);
  };
  auto c = ParseGenerate(R"({"segments":["The cat"," sat on","  the mat."],"max_tokens":1,
                             "kv_reuse":"blend","blend_ratio":0.5})",
                         Endpoint::kCompletion, Ctx());
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  const sched::SchedRequest& r = c->request;
  ASSERT_EQ(r.segments.size(), 3u);
  EXPECT_EQ(r.reuse.mode, ReuseMode::kBlend);
  EXPECT_DOUBLE_EQ(r.reuse.ratio, 0.5);
  EXPECT_EQ(r.segments[0].offset, tok.add_bos() ? 1 : 0);
  EXPECT_EQ(span_tokens(r, 0), enc("The cat", true));
  EXPECT_EQ(span_tokens(r, 1), enc(" sat on", true));
  EXPECT_EQ(span_tokens(r, 2), enc("  the mat.", true));
  EXPECT_EQ(r.segments[2].offset + r.segments[2].length, static_cast<int64_t>(r.prompt.size()));

  auto chat = ParseGenerate(R"({"messages":[{"role":"user","content":[
                                 {"type":"text","text":"Doc one."},
                                 {"type":"text","text":" Doc two?"}]}],"max_tokens":1})",
                            Endpoint::kChat, Ctx());
  ASSERT_TRUE(chat.ok()) << chat.status().ToString();
  const sched::SchedRequest& cr = chat->request;
  ASSERT_EQ(cr.segments.size(), 2u);
  EXPECT_EQ(cr.reuse.mode, ReuseMode::kPrefix);  // the default
  EXPECT_EQ(span_tokens(cr, 0), enc("Doc one.", false));
  EXPECT_EQ(span_tokens(cr, 1), enc(" Doc two?", false));
  // The plain template's text around them, tokenized as usual.
  std::vector<TokenId> want;
  if (tok.add_bos()) want.push_back(tok.bos());
  for (const auto& piece : {enc("User: ", false), enc("Doc one.", false), enc(" Doc two?", false),
                            enc("\nAssistant:", false)}) {
    want.insert(want.end(), piece.begin(), piece.end());
  }
  EXPECT_EQ(cr.prompt, want);

  ApiContext sep = Ctx();
  sep.segment_separator = "\n\n";
  auto cut = ParseGenerate(R"({"prompt":"A b.\n\nC d.\n\nE","max_tokens":1})",
                           Endpoint::kCompletion, sep);
  ASSERT_TRUE(cut.ok()) << cut.status().ToString();
  ASSERT_EQ(cut->request.segments.size(), 3u);
  EXPECT_EQ(span_tokens(cut->request, 0), enc("A b.\n\n", true));
  EXPECT_EQ(span_tokens(cut->request, 2), enc("E", true));
}

TEST(OpenAiTest, RejectsBadInputWithTheRightStatus) {
  struct Case {
    const char* body;
    Endpoint ep;
    int http;
  } cases[] = {
      {"{not json", Endpoint::kChat, 400},
      {"[1,2]", Endpoint::kChat, 400},
      {R"({"messages":"hi"})", Endpoint::kChat, 400},
      {R"({"messages":[{"role":"user","content":"x"}],"model":"gpt-9"})", Endpoint::kChat, 404},
      {R"({"messages":[{"role":"user","content":"x"}],"max_tokens":"5"})", Endpoint::kChat, 400},
      {R"({"messages":[{"role":"user","content":"x"}],"max_tokens":100})", Endpoint::kChat, 400},
      {R"({"messages":[{"role":"user","content":"x"}],"temperature":9})", Endpoint::kChat, 400},
      {R"({"messages":[{"role":"user","content":"x"}],"n":2})", Endpoint::kChat, 400},
      {R"({"messages":[{"role":"robot","content":"x"}]})", Endpoint::kChat, 400},
      {R"({"prompt":"x"})", Endpoint::kChat, 400},
      {R"({"prompt":[1, 99999]})", Endpoint::kCompletion, 400},
      {R"({"prompt":""})", Endpoint::kCompletion, 400},
      {"{\"prompt\":\"\xff\xfe\"}", Endpoint::kCompletion, 400},  // invalid UTF-8
  };
  for (const auto& c : cases) {
    auto r = ParseGenerate(c.body, c.ep, Ctx());
    ASSERT_FALSE(r.ok()) << c.body;
    EXPECT_EQ(HttpStatusFor(r.status()), c.http) << c.body << ": " << r.status().ToString();
  }
  std::string long_prompt(400, 'a');
  for (auto& ch : long_prompt) ch = (&ch - long_prompt.data()) % 2 ? ' ' : 'a';
  auto r = ParseGenerate("{\"prompt\":\"" + long_prompt + "\"}", Endpoint::kCompletion, Ctx());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(ErrorBody(r.status()).find("context_length_exceeded"), std::string::npos);
}

TEST(OpenAiLogprobsTest, ParsesBothEndpointsFormats) {
  struct Case {
    const char* body;
    Endpoint ep;
    int logprobs;
    bool echo;
    bool prompt_logprobs;
  } cases[] = {
      {R"({"prompt":"hi"})", Endpoint::kCompletion, -1, false, false},
      {R"({"prompt":"hi","logprobs":null})", Endpoint::kCompletion, -1, false, false},
      {R"({"prompt":"hi","logprobs":false})", Endpoint::kCompletion, -1, false, false},
      {R"({"prompt":"hi","logprobs":0})", Endpoint::kCompletion, 0, false, false},
      {R"({"prompt":"hi","logprobs":5,"max_tokens":3})", Endpoint::kCompletion, 5, false, false},
      {R"({"prompt":"hi","logprobs":20})", Endpoint::kCompletion, 20, false, false},
      {R"({"prompt":"hi","echo":true})", Endpoint::kCompletion, -1, true, false},
      {R"({"prompt":"hi","echo":true,"logprobs":1,"max_tokens":0})", Endpoint::kCompletion, 1,
       true, true},
      {R"({"messages":[{"role":"user","content":"x"}]})", Endpoint::kChat, -1, false, false},
      {R"({"messages":[{"role":"user","content":"x"}],"logprobs":false})", Endpoint::kChat, -1,
       false, false},
      {R"({"messages":[{"role":"user","content":"x"}],"logprobs":true})", Endpoint::kChat, 0,
       false, false},
      {R"({"messages":[{"role":"user","content":"x"}],"logprobs":true,"top_logprobs":3})",
       Endpoint::kChat, 3, false, false},
      // Chat has no echo: ignored like any unknown field.
      {R"({"messages":[{"role":"user","content":"x"}],"logprobs":true,"echo":true})",
       Endpoint::kChat, 0, false, false},
  };
  for (const auto& c : cases) {
    auto r = ParseGenerate(c.body, c.ep, Ctx());
    ASSERT_TRUE(r.ok()) << c.body << ": " << r.status().ToString();
    EXPECT_EQ(r->request.logprobs, c.logprobs) << c.body;
    EXPECT_EQ(r->echo, c.echo) << c.body;
    EXPECT_EQ(r->request.prompt_logprobs, c.prompt_logprobs) << c.body;
  }
  auto echo = ParseGenerate(R"({"prompt":["hi there"],"echo":true,"max_tokens":0})",
                            Endpoint::kCompletion, Ctx());
  ASSERT_TRUE(echo.ok());
  EXPECT_EQ(echo->prompt_text, "hi there");
  EXPECT_EQ(echo->request.gen.max_tokens, 0);
  // Token ids are echoed decoded (the BOS piece is empty).
  const Tokenizer& tok = *Ctx().tokenizer;
  std::vector<TokenId> ids = tok.Encode("Hello world", true, false);
  std::string body = R"({"echo":true,"prompt":[)";
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i) body += ',';  // appended, not "," + ...: GCC 12 warns falsely (-Wrestrict) on that
    body += std::to_string(ids[i]);
  }
  body += "]}";
  auto by_ids = ParseGenerate(body, Endpoint::kCompletion, Ctx());
  ASSERT_TRUE(by_ids.ok()) << by_ids.status().ToString();
  EXPECT_EQ(by_ids->prompt_text, "Hello world");
}

TEST(OpenAiLogprobsTest, RejectsBadValuesNamingTheField) {
  struct Case {
    const char* body;
    Endpoint ep;
    const char* param;
  } cases[] = {
      {R"({"prompt":"hi","logprobs":21})", Endpoint::kCompletion, "logprobs"},
      {R"({"prompt":"hi","logprobs":-1})", Endpoint::kCompletion, "logprobs"},
      {R"({"prompt":"hi","logprobs":true})", Endpoint::kCompletion, "logprobs"},
      {R"({"prompt":"hi","logprobs":"5"})", Endpoint::kCompletion, "logprobs"},
      {R"({"prompt":"hi","logprobs":1.5})", Endpoint::kCompletion, "logprobs"},
      {R"({"prompt":"hi","echo":1})", Endpoint::kCompletion, "echo"},
      {R"({"messages":[{"role":"user","content":"x"}],"logprobs":3})", Endpoint::kChat,
       "logprobs"},
      {R"({"messages":[{"role":"user","content":"x"}],"top_logprobs":2})", Endpoint::kChat,
       "top_logprobs"},
      {R"({"messages":[{"role":"user","content":"x"}],"logprobs":false,"top_logprobs":0})",
       Endpoint::kChat, "top_logprobs"},
      {R"({"messages":[{"role":"user","content":"x"}],"logprobs":true,"top_logprobs":21})",
       Endpoint::kChat, "top_logprobs"},
  };
  for (const auto& c : cases) {
    ErrorDetail d;
    auto r = ParseGenerate(c.body, c.ep, Ctx(), &d);
    ASSERT_FALSE(r.ok()) << c.body;
    EXPECT_EQ(HttpStatusFor(r.status()), 400) << c.body;
    EXPECT_EQ(d.param, c.param) << c.body << ": " << r.status().ToString();
  }
}

// Two positions of a completion: the formats of both endpoints.
TEST(OpenAiLogprobsTest, FormatsCompletionAndChatLogprobs) {
  const Tokenizer& tok = *Ctx().tokenizer;
  const std::vector<TokenId> prompt = tok.Encode("The cat", true, false);
  ASSERT_GE(prompt.size(), 3u);  // BOS, "The", " cat"
  std::vector<PositionLogprobs> lp(prompt.size() - 1);
  for (size_t i = 0; i < lp.size(); ++i) {
    lp[i].chosen = {prompt[i + 1], -1.5 - static_cast<double>(i)};
    lp[i].top = {{prompt[i + 1] == 11 ? 12 : 11, -0.25}};  // another token, likelier
  }
  std::vector<LogprobEntry> entries = PromptLogprobEntries(prompt, lp, tok);
  ASSERT_EQ(entries.size(), prompt.size());
  EXPECT_FALSE(entries[0].known);
  EXPECT_EQ(entries[0].text_offset, 0);
  EXPECT_EQ(entries[1].text_offset, 0);  // the BOS piece is empty
  EXPECT_EQ(entries[2].text_offset, 3);  // after "The"

  GenerateCall call;
  call.endpoint = Endpoint::kCompletion;
  EXPECT_TRUE(LogprobsJson(call, entries, tok).is_null());  // not asked
  call.request.logprobs = 1;
  const nlohmann::json c = LogprobsJson(call, entries, tok);
  ASSERT_EQ(c["tokens"].size(), prompt.size());
  EXPECT_EQ(c["tokens"][0], "<|endoftext|>");  // special tokens rendered
  EXPECT_EQ(c["tokens"][1], "The");
  EXPECT_TRUE(c["token_logprobs"][0].is_null());
  EXPECT_TRUE(c["top_logprobs"][0].is_null());
  EXPECT_EQ(c["token_logprobs"][1], -1.5);
  // The top N plus the chosen token: N + 1 keys when it is not among them.
  EXPECT_EQ(c["top_logprobs"][1].size(), 2u);
  EXPECT_EQ(c["top_logprobs"][1]["The"], -1.5);
  EXPECT_EQ(c["text_offset"], nlohmann::json({0, 0, 3}));

  call.endpoint = Endpoint::kChat;
  const nlohmann::json h = LogprobsJson(call, entries, tok);
  ASSERT_EQ(h["content"].size(), prompt.size() - 1);  // chat lists no unknown entry
  EXPECT_EQ(h["content"][1]["token"], " cat");
  EXPECT_EQ(h["content"][1]["logprob"], -2.5);
  EXPECT_EQ(h["content"][1]["bytes"], nlohmann::json({32, 99, 97, 116}));
  ASSERT_EQ(h["content"][1]["top_logprobs"].size(), 1u);
  EXPECT_EQ(h["content"][1]["top_logprobs"][0]["logprob"], -0.25);
  EXPECT_TRUE(h["refusal"].is_null());

  // In a response: the choice carries it; without logprobs, null.
  const nlohmann::json resp = CompletionJson(call, "chatcmpl-1", 0, "tiny", "x", "stop", {}, h);
  EXPECT_EQ(resp["choices"][0]["logprobs"], h);
  call.request.logprobs = -1;
  EXPECT_TRUE(CompletionJson(call, "chatcmpl-1", 0, "tiny", "x", "stop", {})["choices"][0]
                  ["logprobs"]
                      .is_null());
}

TEST(OpenAiLogprobsTest, PartialUtf8TokensAreSpelledAsBytes) {
  const Tokenizer& tok = *Ctx().tokenizer;
  // Byte-level BPE: some id stands for the lone byte 0xE2 (the lead of a 3-byte character).
  TokenId lone = -1;
  for (TokenId id = 0; id < tok.vocab_size() && lone < 0; ++id) {
    if (tok.TokenToPiece(id) == "\xE2") lone = id;
  }
  ASSERT_GE(lone, 0);
  EXPECT_EQ(LogprobTokenText(tok, lone), "bytes:\\xe2");
  GenerateCall call;
  call.endpoint = Endpoint::kChat;
  call.request.logprobs = 0;
  LogprobEntry e;
  e.lp.chosen = {lone, -0.5};
  const nlohmann::json h = LogprobsJson(call, std::span<const LogprobEntry>(&e, 1), tok);
  EXPECT_EQ(h["content"][0]["bytes"], nlohmann::json({0xE2}));
  EXPECT_EQ(h["content"][0]["top_logprobs"], nlohmann::json::array());
  EXPECT_EQ(Dump(h).find("\\ufffd"), std::string::npos);
}

TEST(ConfigTest, FileThenValidation) {
  const std::string path = testing::TempDir() + "/serve.toml";
  {
    std::ofstream f(path);
    f << "port = 9000\nkv_budget = \"64MiB\"\nredis = [\"redis://a:1\", \"redis://b:2\"]\n"
         "prefix_cache = false\n";
  }
  ServeConfig c;
  ASSERT_TRUE(LoadConfigFile(path, &c).ok());
  EXPECT_EQ(c.port, 9000);
  EXPECT_EQ(c.kv_budget, "64MiB");
  EXPECT_EQ(c.redis.size(), 2u);
  EXPECT_FALSE(c.prefix_cache);
  EXPECT_TRUE(ValidateConfig(c).ok());
  {
    std::ofstream f(path);
    f << "session_kv_type = \"q4\"\nsession_kv_budget = \"32MiB\"\n";
  }
  ASSERT_TRUE(LoadConfigFile(path, &c).ok());
  EXPECT_EQ(c.session_kv_type, "q4");
  EXPECT_EQ(c.session_kv_budget, "32MiB");
  EXPECT_TRUE(ValidateConfig(c).ok());
  {
    std::ofstream f(path);
    f << "prot = 9000\n";
  }
  EXPECT_EQ(LoadConfigFile(path, &c).code(), StatusCode::kInvalidArgument);
  {
    std::ofstream f(path);
    f << "port = \"x\"\n";
  }
  EXPECT_EQ(LoadConfigFile(path, &c).code(), StatusCode::kInvalidArgument);
  c = ServeConfig();
  c.redis = {"http://x"};
  EXPECT_FALSE(ValidateConfig(c).ok());
  std::remove(path.c_str());
}

TEST(OpenAiTest, RejectsOverlongIdsAndPromptsBeforeTokenizingAndNamesTheField) {
  ApiContext ctx = Ctx();
  ctx.max_token_bytes = 8;  // bound: 64 tokens * 8 bytes * 2 = 1024 bytes
  ctx.max_messages = 3;
  const std::string salt(300, 's');
  struct Case {
    std::string body;
    Endpoint ep;
    const char* param;
    const char* code;
  } cases[] = {
      {R"({"prompt":"hi","cache_salt":")" + salt + "\"}", Endpoint::kCompletion, "cache_salt",
       "InvalidArgument"},
      {R"({"prompt":"hi","session_id":")" + salt + "\"}", Endpoint::kCompletion, "session_id",
       "InvalidArgument"},
      {R"({"prompt":")" + std::string(1025, 'a') + "\"}", Endpoint::kCompletion, "prompt",
       "context_length_exceeded"},
      {R"({"messages":[{"role":"user","content":")" + std::string(1025, 'a') + "\"}]}",
       Endpoint::kChat, "messages", "context_length_exceeded"},
      {R"({"messages":[{"role":"user","content":"a"},{"role":"user","content":"b"},
           {"role":"user","content":"c"},{"role":"user","content":"d"}]})",
       Endpoint::kChat, "messages", "InvalidArgument"},
      {R"({"prompt":"hi","top_p":7})", Endpoint::kCompletion, "top_p", "InvalidArgument"},
      {R"({"prompt":"hi","program_id":")" + salt + "\"}", Endpoint::kCompletion, "program_id",
       "InvalidArgument"},
      {R"({"prompt":"hi","tool":")" + salt + "\"}", Endpoint::kCompletion, "tool",
       "InvalidArgument"},
      {R"({"prompt":"hi","tool":7})", Endpoint::kCompletion, "tool", "InvalidArgument"},
      {R"({"prompt":"hi","deadline_ms":0})", Endpoint::kCompletion, "deadline_ms",
       "InvalidArgument"},
      {R"({"prompt":"hi","deadline_ms":"soon"})", Endpoint::kCompletion, "deadline_ms",
       "InvalidArgument"},
      {R"({"prompt":"hi","model":"other"})", Endpoint::kCompletion, "model", "model_not_found"},
  };
  for (const auto& c : cases) {
    ErrorDetail d;
    auto r = ParseGenerate(c.body, c.ep, ctx, &d);
    ASSERT_FALSE(r.ok()) << c.body.substr(0, 80);
    EXPECT_EQ(d.param, c.param) << c.body.substr(0, 80);
    const auto j = nlohmann::json::parse(ErrorBody(r.status(), d));
    EXPECT_EQ(j["error"]["param"], c.param);
    EXPECT_EQ(j["error"]["code"], c.code) << r.status().ToString();
  }
  // At the limits: a 256-byte salt and exactly 3 messages are accepted.
  auto ok = ParseGenerate(
      R"({"messages":[{"role":"user","content":"a"},{"role":"assistant",
      "content":"b"},{"role":"user","content":"c"}],"max_tokens":1,"cache_salt":")" +
          std::string(256, 's') + "\"}",
      Endpoint::kChat, ctx);
  EXPECT_TRUE(ok.ok()) << ok.status().ToString();
}

// Regression (issue 9, item 8): the error code comes from the Status code and the parser's detail,
// never from words in the message.
TEST(OpenAiTest, ErrorCodeIgnoresMessageText) {
  const Status s = InvalidArgument("this model's maximum context length is nice");
  const auto j = nlohmann::json::parse(ErrorBody(s));
  EXPECT_EQ(j["error"]["code"], "InvalidArgument");
  EXPECT_TRUE(j["error"]["param"].is_null());
  EXPECT_EQ(j["error"]["type"], "invalid_request_error");
  struct Case {
    Status s;
    int http;
    const char* type;
  } cases[] = {
      {NotFound("x"), 404, "invalid_request_error"},
      {ResourceExhausted("x"), 429, "rate_limit_error"},
      {Unavailable("x"), 503, "service_unavailable"},
      {DeadlineExceeded("x"), 504, "timeout_error"},
      {Cancelled("x"), 499, "server_error"},
      {IOError("not found"), 500, "server_error"},
  };
  for (const auto& c : cases) {
    EXPECT_EQ(HttpStatusFor(c.s), c.http) << c.s.ToString();
    EXPECT_EQ(nlohmann::json::parse(ErrorBody(c.s))["error"]["type"], c.type);
  }
}

TEST(AuthTest, DecidesByRouteKeyAndAddress) {
  AccessPolicy open;
  AccessPolicy keyed{{"k1", "k2"}, "adm"};
  AccessPolicy api_only{{"k1"}, ""};
  struct Case {
    const AccessPolicy* p;
    Access access;
    const char* header;
    const char* addr;
    int http;
  } cases[] = {
      {&open, Access::kApi, "", "10.0.0.1", 0},
      {&open, Access::kAdmin, "", "127.0.0.1", 0},
      {&open, Access::kAdmin, "", "::1", 0},
      {&open, Access::kAdmin, "", "::ffff:127.0.0.5", 0},
      {&open, Access::kAdmin, "", "10.0.0.1", 403},
      {&open, Access::kAdmin, "", "128.0.0.1", 403},
      {&keyed, Access::kOpen, "", "10.0.0.1", 0},
      {&keyed, Access::kApi, "", "127.0.0.1", 401},
      {&keyed, Access::kApi, "Bearer k3", "127.0.0.1", 401},
      {&keyed, Access::kApi, "Bearer k", "127.0.0.1", 401},
      {&keyed, Access::kApi, "Bearer k22", "127.0.0.1", 401},
      {&keyed, Access::kApi, "Basic k1", "127.0.0.1", 401},
      {&keyed, Access::kApi, "Bearer k2", "10.0.0.1", 0},
      {&keyed, Access::kApi, "bearer  k1 ", "10.0.0.1", 0},
      {&keyed, Access::kApi, "Bearer adm", "10.0.0.1", 0},      // the admin key opens everything
      {&keyed, Access::kAdmin, "Bearer k1", "127.0.0.1", 401},  // API keys are not admin keys
      {&keyed, Access::kAdmin, "", "127.0.0.1", 401},
      {&keyed, Access::kAdmin, "Bearer adm", "10.0.0.1", 0},
      {&api_only, Access::kAdmin, "Bearer k1", "10.0.0.1", 403},
      {&api_only, Access::kAdmin, "", "127.0.0.1", 0},
  };
  for (const auto& c : cases) {
    const AuthDecision d = Authorize(*c.p, c.access, c.header, c.addr);
    EXPECT_EQ(d.http, c.http) << c.header << " from " << c.addr;
    if (d.http != 0) {
      const auto j = nlohmann::json::parse(AuthErrorBody(d));
      EXPECT_EQ(j["error"]["code"], d.http == 401 ? "invalid_api_key" : "permission_denied");
      EXPECT_EQ(j["error"]["message"].get<std::string>().find("k3"), std::string::npos);
    }
  }
}

TEST(AuthTest, ConstantTimeEqualsIsEquality) {
  EXPECT_TRUE(ConstantTimeEquals("", ""));
  EXPECT_TRUE(ConstantTimeEquals("secret", "secret"));
  EXPECT_FALSE(ConstantTimeEquals("secreT", "secret"));
  EXPECT_FALSE(ConstantTimeEquals("secret", "secret2"));
  EXPECT_FALSE(ConstantTimeEquals("secret2", "secret"));
  EXPECT_FALSE(ConstantTimeEquals("", "a"));
  EXPECT_FALSE(ConstantTimeEquals(std::string("a\0", 2), "a"));
}

TEST(AuthTest, KeyFileAndSessionDigest) {
  const std::string path = testing::TempDir() + "/keys.txt";
  {
    std::ofstream f(path);
    f << "# comment\n\n  key-one  \nkey-two\r\n";
  }
  std::vector<std::string> keys;
  ASSERT_TRUE(LoadApiKeyFile(path, &keys).ok());
  EXPECT_EQ(keys, (std::vector<std::string>{"key-one", "key-two"}));
  {
    std::ofstream f(path);
    f << "# only a comment\n";
  }
  EXPECT_EQ(LoadApiKeyFile(path, &keys).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(LoadApiKeyFile(path + ".missing", &keys).code(), StatusCode::kIOError);
  std::remove(path.c_str());
  const std::string d = SessionDigest("user-42-session");
  EXPECT_EQ(d.size(), 16u);
  EXPECT_EQ(d, SessionDigest("user-42-session"));
  EXPECT_NE(d, SessionDigest("user-43-session"));
  EXPECT_EQ(d.find("user"), std::string::npos);
}

TEST(ConfigTest, StoreSchedulerAndAccessKeys) {
  ServeConfig c;
  ASSERT_TRUE(ParseConfigText(R"(
policy = "s3fifo"
admit_after_hits = 2
redis_write = "back"
redis_ttl_s = 600
tenant_quota = "1GiB"
queue_timeout_s = 30
max_pinned = "25%"
max_pin_ttl_s = 120
max_sessions = 7
max_pins = 8
max_tenants = 9
load_deadline_ms = 250
api_key = ["a", "b"]
admin_key = "adm"
max_body = "1MiB"
max_messages = 16
)",
                              &c)
                  .ok());
  EXPECT_EQ(c.policy, "s3fifo");
  EXPECT_EQ(c.admit_after_hits, 2);
  EXPECT_EQ(c.redis_write, "back");
  EXPECT_EQ(c.redis_ttl_s, 600);
  EXPECT_EQ(c.tenant_quota, "1GiB");
  EXPECT_EQ(c.queue_timeout_s, 30);
  EXPECT_EQ(c.max_pinned, "25%");
  EXPECT_EQ(c.max_pin_ttl_s, 120);
  EXPECT_EQ(c.max_sessions, 7);
  EXPECT_EQ(c.max_pins, 8);
  EXPECT_EQ(c.max_tenants, 9);
  EXPECT_EQ(c.load_deadline_ms, 250);
  EXPECT_EQ(c.api_keys, (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(c.admin_key, "adm");
  EXPECT_EQ(c.max_messages, 16);
  EXPECT_TRUE(ValidateConfig(c).ok()) << ValidateConfig(c).ToString();
  ASSERT_TRUE(ParseConfigText("max_pinned = 0.75\napi_key = \"solo\"\n", &c).ok());
  EXPECT_DOUBLE_EQ(*ParseFraction(c.max_pinned), 0.75);
  EXPECT_EQ(c.api_keys, (std::vector<std::string>{"solo"}));

  // Each bad value is refused, naming its flag.
  struct Bad {
    const char* toml;
    const char* names;
  } bad[] = {
      {"policy = \"fifo\"", "--policy"},
      {"redis_write = \"sometimes\"", "--redis-write"},
      {"max_pinned = \"150%\"", "--max-pinned"},
      {"max_pinned = 2", "--max-pinned"},
      {"load_deadline_ms = -1", "--load-deadline-ms"},
      {"queue_timeout_s = -5", "--queue-timeout"},
      {"max_sessions = 0", "--max-sessions"},
      {"tenant_quota = \"lots\"", "--tenant-quota"},
      {"api_key = [\"has space\"]", "--api-key"},
      {"max_body = \"1\"", "--max-body"},
      {"admit_after_hits = -1", "--admit-after-hits"},
      {"sched = \"sjf\"", "--sched"},
      {"preempt = \"drop\"", "--preempt"},
      {"preempt = \"swap\"\nprefix_cache = false", "--preempt"},
      {"itl_target_ms = -1", "--itl-target-ms"},
      {"itl_target_ms = 60001", "--itl-target-ms"},
      {"redis_levels = [\"int4\"]", "--redis-levels"},  // without redis
      {"session_kv_budget = \"64MiB\"", "--session-kv-type"},  // without its pool
      {"session_kv_type = \"q4\"\nsession_kv_budget = \"lots\"", "--session-kv-budget"},
  };
  for (const auto& b : bad) {
    ServeConfig x;
    ASSERT_TRUE(ParseConfigText(b.toml, &x).ok()) << b.toml;
    const Status s = ValidateConfig(x);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << b.toml;
    EXPECT_NE(s.ToString().find(b.names), std::string::npos) << s.ToString();
  }
  // Type errors and syntax errors are refused by the parser.
  ServeConfig x;
  EXPECT_EQ(ParseConfigText("max_pinned = true", &x).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseConfigText("api_key = [1]", &x).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseConfigText("port = ", &x).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseConfigText("[table]\nx = 1", &x).code(), StatusCode::kInvalidArgument);
}

// Regression (fuzz_serve_config): toml++ hits undefined behaviour on some non-ASCII characters;
// they are refused, with their line, before it sees them. Other non-ASCII text stays fine.
TEST(ConfigTest, NonAsciiThatTrapsTheTomlLibraryIsRefusedFirst) {
  ServeConfig c;
  const std::string fuzz_input(
      "\xEF\xBB\xBE_pinned = 0.757_77777=)\x01\x00o\x00.\x02\n[table]\nx = 1\n", 47);
  const Status crash = ParseConfigText(fuzz_input, &c);
  EXPECT_EQ(crash.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(crash.ToString().find("line 1"), std::string::npos) << crash.ToString();
  const Status e_acute = ParseConfigText("port = 1\ndisk_dir = \"/caf\xC3\xA9\"\n", &c);
  EXPECT_EQ(e_acute.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(e_acute.ToString().find("line 2: the character U+00E9"), std::string::npos)
      << e_acute.ToString();
  // U+65E5 U+672C, a BOM, literal and multi-line strings and comments are fine.
  const Status ok = ParseConfigText(
      "\xEF\xBB\xBF# \xE6\x97\xA5\ndisk_dir = \"/var/\xE6\x97\xA5\xE6\x9C\xAC\"\n"
      "admin_key = 'k\xE6\x97\xA5'\ncodec = '''x''''\nmodel = \"\"\"y\\\\\"\"\"\n",
      &c);
  ASSERT_TRUE(ok.ok()) << ok.ToString();
  EXPECT_EQ(c.disk_dir, "/var/\xE6\x97\xA5\xE6\x9C\xAC");
  EXPECT_EQ(c.codec, "x'");
  EXPECT_EQ(c.model, "y\\");
}

TEST(ConfigTest, KvEventEndpoints) {
  // The replay endpoint defaults to the PUB port + 1; both must be tcp://HOST:PORT.
  EXPECT_EQ(*ReplayEndpointFor("", ""), "");
  EXPECT_EQ(*ReplayEndpointFor("tcp://127.0.0.1:5557", ""), "tcp://127.0.0.1:5558");
  EXPECT_EQ(*ReplayEndpointFor("tcp://*:7000", "tcp://*:9000"), "tcp://*:9000");
  for (const auto& [pub, replay, flag] :
       std::vector<std::tuple<std::string, std::string, std::string>>{
           {"udp://x:1", "", "--kv-events"},
           {"tcp://host", "", "--kv-events"},
           {"tcp://host:0", "", "--kv-events"},
           {"tcp://host:99999", "", "--kv-events"},
           {"tcp://host:65535", "", "--kv-events"},
           {"tcp://h:1", "tcp://h:1", "--kv-events-replay"},
           {"tcp://h:1", "ipc://x", "--kv-events-replay"},
           {"", "tcp://h:2", "--kv-events-replay"}}) {
    auto r = ReplayEndpointFor(pub, replay);
    ASSERT_FALSE(r.ok()) << pub << " " << replay;
    EXPECT_NE(r.status().message().find(flag), std::string::npos) << r.status().ToString();
  }
  ServeConfig c;
  c.model = "m.gguf";
  c.kv_events = "tcp://127.0.0.1:notaport";
  const Status s = ValidateConfig(c);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("--kv-events"), std::string::npos);
}

TEST(ConfigTest, KvPolicyDefault) {
  ServeConfig c;
  ASSERT_TRUE(ParseConfigText("kv_policy = \"snapkv\"\nkv_policy_budget = \"20%\"\n", &c).ok());
  EXPECT_TRUE(ValidateConfig(c).ok()) << ValidateConfig(c).ToString();
  EXPECT_EQ(ServeKvPolicy(c)->name, "snapkv");
  EXPECT_DOUBLE_EQ(ServeKvPolicy(c)->budget, 0.2);
  ASSERT_TRUE(ParseConfigText("kv_policy_budget = 512\n", &c).ok());  // a TOML number: tokens
  EXPECT_DOUBLE_EQ(ServeKvPolicy(c)->budget, 512);
  for (const auto& [name, budget, want] :
       std::vector<std::tuple<std::string, std::string, std::string>>{
           {"snapk", "0.2", "kv_policy.name"},
           {"h2o", "0", "kv_policy.budget"},
           {"h2o", "x", "--kv-policy-budget"},
           {"h2o", "150%", "--kv-policy-budget"},
           {"h2o", "inf", "--kv-policy-budget"}}) {
    ServeConfig x;
    x.model = "m.gguf";
    x.kv_policy = name;
    x.kv_policy_budget = budget;
    const Status st = ValidateConfig(x);
    EXPECT_NE(st.message().find(want), std::string::npos) << name << " " << budget << ": "
                                                          << st.ToString();
  }
}

TEST(ConfigTest, ParseFraction) {
  struct Case {
    const char* text;
    double want;  // < 0: refused
  } cases[] = {{"0.5", 0.5},     {"50%", 0.5}, {"0", 0},    {"1", 1},    {"100%", 1},
               {"12.5%", 0.125}, {"", -1},     {"%", -1},   {"1.5", -1}, {"-0.1", -1},
               {"abc", -1},      {"0.5x", -1}, {"nan", -1}, {"101%", -1}};
  for (const auto& c : cases) {
    auto r = ParseFraction(c.text);
    if (c.want < 0) {
      EXPECT_FALSE(r.ok()) << c.text;
    } else {
      ASSERT_TRUE(r.ok()) << c.text;
      EXPECT_DOUBLE_EQ(*r, c.want) << c.text;
    }
  }
}

TEST(MetricsTest, RendersPrometheusText) {
  Metrics m;
  sched::RequestUsage u;
  u.prompt_tokens = 10;
  u.completion_tokens = 3;
  u.cached_by_tier = {{"memory", 7}};
  m.ObserveGeneration(u, 0.02, 0.1);
  m.ObserveInterToken(0.004);
  m.CountRequest("chat", 200);
  const std::string t = m.Render({});
  EXPECT_NE(t.find("cachette_requests_total{endpoint=\"chat\",status=\"200\"} 1"),
            std::string::npos);
  EXPECT_NE(t.find("cachette_cache_hit_tokens_total{tier=\"memory\"} 7"), std::string::npos);
  EXPECT_NE(t.find("cachette_time_to_first_token_seconds_bucket{le=\"0.025\"} 1"),
            std::string::npos);
  EXPECT_NE(t.find("cachette_inter_token_latency_seconds_count 1"), std::string::npos);
}

// Connects `n` non-blocking sockets to 127.0.0.1:port at once; returns how many completed their
// handshake within `ms` (nobody accepts them: the rest wait in or beyond the accept queue).
int ConnectedWithin(int port, int n, int ms) {
  std::vector<int> fds;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  for (int i = 0; i < n; ++i) {
    const int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    CT_CHECK(fd >= 0);
    connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr);  // EINPROGRESS
    fds.push_back(fd);
  }
  std::vector<pollfd> pfds;
  for (int fd : fds) pfds.push_back({fd, POLLOUT, 0});
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
  for (;;) {
    for (auto& p : pfds) p.revents = 0;
    poll(pfds.data(), pfds.size(), 0);
    int done = 0;
    for (const auto& p : pfds) done += (p.revents & POLLOUT) != 0;
    if (done == n || std::chrono::steady_clock::now() >= deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  int connected = 0;
  for (int fd : fds) {
    int err = -1;
    socklen_t len = sizeof err;
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
    sockaddr_in peer{};
    socklen_t plen = sizeof peer;
    connected += err == 0 && getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &plen) == 0;
    close(fd);
  }
  return connected;
}

// httplib's compiled library listens with a backlog of 5: the 7th connection of a burst waits
// for a second (its handshake dropped and resent). BindHttp's backlog takes a burst of 48.
TEST(HttpListenTest, ABurstOfConnectionsFitsTheBacklogAndTheLibrarysDefaultWouldNot) {
  httplib::Server plain;
  const int plain_port = plain.bind_to_any_port("127.0.0.1");
  ASSERT_GT(plain_port, 0);
  EXPECT_LT(ConnectedWithin(plain_port, 48, 300), 48) << "the library's own backlog held 48";

  httplib::Server http;
  auto port = BindHttp(http, "127.0.0.1", 0, 64);
  ASSERT_TRUE(port.ok()) << port.status().ToString();
  EXPECT_EQ(ConnectedWithin(*port, 48, 2000), 48);
}

TEST(HttpListenTest, APortInUseIsAnErrorNamingIt) {
  httplib::Server first;
  auto port = BindHttp(first, "127.0.0.1", 0);
  ASSERT_TRUE(port.ok()) << port.status().ToString();
  httplib::Server second;
  auto again = BindHttp(second, "127.0.0.1", *port);
  ASSERT_FALSE(again.ok()) << "two servers share port " << *port;
  EXPECT_EQ(again.status().code(), StatusCode::kUnavailable);
  EXPECT_NE(again.status().message().find("127.0.0.1:" + std::to_string(*port)),
            std::string::npos)
      << again.status().message();
}

}  // namespace
}  // namespace cachette::server
