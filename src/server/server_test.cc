// Unit tests for the pieces of the server that need no socket: chat templates, request
// validation, configuration files and the metrics text. (tests/e2e drives the real binary.)
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>

#include "core/check.h"
#include "server/chat_template.h"
#include "server/config.h"
#include "server/metrics.h"
#include "server/openai.h"

namespace cachette::server {
namespace {

const Model& Tiny() {
  static std::unique_ptr<Model> m = [] {
    auto r = Model::Load(std::string(CACHETTE_SHARED_DIR) + "/models/cachette-tiny-q8_0.gguf");
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
          "stop":["\n\n"]})",
      Endpoint::kChat, Ctx());
  ASSERT_TRUE(call.ok()) << call.status().ToString();
  EXPECT_TRUE(call->stream);
  EXPECT_TRUE(call->include_usage);
  EXPECT_EQ(call->request.gen.max_tokens, 5);
  EXPECT_EQ(call->request.cache_salt, "t1");
  EXPECT_EQ(call->request.priority, 3);
  EXPECT_EQ(call->request.pin_ttl_ms, 120000);
  EXPECT_EQ(call->request.gen.stop.size(), 2u);  // "\n\n" and the plain template's "\nUser:"
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
  EXPECT_NE(t.find("cachette_requests_total{endpoint=\"chat\",status=\"200\"} 1"), std::string::npos);
  EXPECT_NE(t.find("cachette_cache_hit_tokens_total{tier=\"memory\"} 7"), std::string::npos);
  EXPECT_NE(t.find("cachette_time_to_first_token_seconds_bucket{le=\"0.025\"} 1"),
            std::string::npos);
  EXPECT_NE(t.find("cachette_inter_token_latency_seconds_count 1"), std::string::npos);
}

}  // namespace
}  // namespace cachette::server
