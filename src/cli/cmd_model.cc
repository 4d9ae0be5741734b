// `cachette model synth|info`: make deterministic random-weight models; describe a model.
#include <cstdio>

#include "cli/cli.h"
#include "model/model.h"
#include "model/synth.h"

namespace cachette::cli {
namespace {

struct ModelArgs {
  SynthOptions synth;
  std::string type = "f32";
  std::string out;
  std::string info_path;
};

int Synth(ModelArgs& a) {
  auto t = ParseWType(a.type);
  if (!t.ok()) return Fail(t.status());
  a.synth.type = *t;
  if (a.synth.vocab_path.empty()) {
    a.synth.vocab_path = std::string(CACHETTE_SHARED_DIR) + "/testdata/tokenizer/ggml-vocab-gpt-2.gguf";
  }
  Status s = SynthesizeModel(a.synth, a.out);
  if (!s.ok()) return Fail(s);
  std::fprintf(stderr, "wrote %s (shape %s, type %s)\n", a.out.c_str(), a.synth.shape.c_str(),
               a.type.c_str());
  return 0;
}

int Info(const ModelArgs& a) {
  auto m = Model::Load(a.info_path.empty() ? DefaultModelPath() : a.info_path);
  if (!m.ok()) return Fail(m.status());
  const ModelConfig& c = (*m)->config();
  std::printf(
      "arch %s  name '%s'\nvocab %d  d_model %d  layers %d  heads %d  kv_heads %d  head_dim %d  "
      "ffn %d  ctx %d\nrope %s theta %.0f scale %.3f  eps %g  tied_output %s\n"
      "weights %s  params %lld  bytes/token %llu\nfingerprint %s\n",
      c.arch_name.c_str(), c.name.c_str(), c.n_vocab, c.d_model, c.n_layer, c.n_head,
      c.n_kv_head, c.head_dim, c.d_ff, c.n_ctx_train,
      c.rope.style == kernels::RopeStyle::kNeox ? "neox" : "normal", c.rope.theta_base,
      c.rope.freq_scale, c.norm_eps, c.tied_output ? "yes" : "no",
      std::string(kernels::WTypeName(c.weight_type)).c_str(), static_cast<long long>(c.n_params),
      static_cast<unsigned long long>((*m)->weight_bytes_per_token()),
      (*m)->Fingerprint().ToHex().c_str());
  return 0;
}

}  // namespace

Runner AddModelCommand(CLI::App& app) {
  auto a = std::make_shared<ModelArgs>();
  CLI::App* c = app.add_subcommand("model", "Make or describe models");
  c->require_subcommand(1);
  CLI::App* s = c->add_subcommand("synth", "Write a deterministic random-weight GGUF");
  s->add_option("--shape", a->synth.shape, "tiny, tiny-hd40, qwen2.5-0.5b, llama-1b");
  s->add_option("--type", a->type, "f32, f16, bf16, q8_0, q4_0");
  s->add_option("--vocab", a->synth.vocab_path, "Vocabulary GGUF (default: GPT-2's)");
  s->add_option("--arch", a->synth.arch, "Override the shape's architecture: llama, qwen2");
  s->add_option("--seed", a->synth.seed, "Weight seed");
  s->add_option("-o,--output", a->out, "Output file")->required();
  CLI::App* i = c->add_subcommand("info", "Print a model's hyperparameters and fingerprint");
  i->add_option("-m,--model", a->info_path, "GGUF model");
  return [a, s] { return s->parsed() ? Synth(*a) : Info(*a); };
}

}  // namespace cachette::cli
