#include "model/model.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <functional>

#include "model/synth.h"

namespace cachette {
namespace {

namespace fs = std::filesystem;
const std::string kShared = CACHETTE_SHARED_DIR;

class ModelLoadTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("cachette_model_test_" + std::to_string(getpid()));
    fs::create_directories(dir_);
    good_ = (dir_ / "good.gguf").string();
    SynthOptions o;
    o.shape = "tiny";
    o.type = kernels::WType::kQ8_0;
    o.arch = "qwen2";
    o.vocab_path = kShared + "/testdata/tokenizer/ggml-vocab-gpt-2.gguf";
    ASSERT_TRUE(SynthesizeModel(o, good_).ok());
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Rewrites the good model: `kv` may change or drop (return false) metadata, `tensor` may
  // change or drop tensors.
  std::string Rewrite(const std::function<bool(std::string&, gguf::Value&)>& kv,
                      const std::function<bool(std::string&, gguf::TensorType&,
                                               std::vector<int64_t>&)>& tensor) {
    auto f = gguf::GgufFile::Open(good_);
    EXPECT_TRUE(f.ok());
    gguf::GgufWriter w;
    for (const auto& e : (*f)->metadata()) {
      std::string key(e.key);
      gguf::Value v = e.value;
      if (kv(key, v)) w.AddValue(key, v);
    }
    for (const auto& t : (*f)->tensors()) {
      std::string name(t.name);
      gguf::TensorType type = t.type;
      std::vector<int64_t> dims = t.dims;
      if (!tensor(name, type, dims)) continue;
      std::vector<std::byte> data(t.data, t.data + t.n_bytes);
      if (type != t.type || dims != t.dims) {
        // Re-size the data for the new type/dims.
        const auto* tr = gguf::GetTypeTraits(type);
        int64_t n = 1;
        for (int64_t d : dims) n *= d;
        data.assign(n / tr->block_elems * tr->block_bytes, std::byte{0});
      }
      EXPECT_TRUE(w.AddTensor(name, type, dims, std::move(data)).ok()) << name;
    }
    const std::string path = (dir_ / ("bad" + std::to_string(counter_++) + ".gguf")).string();
    EXPECT_TRUE(w.WriteFile(path).ok());
    return path;
  }

  static bool KeepKv(std::string&, gguf::Value&) { return true; }
  static bool KeepTensor(std::string&, gguf::TensorType&, std::vector<int64_t>&) { return true; }

  fs::path dir_;
  std::string good_;
  int counter_ = 0;
};

void ExpectError(const Result<std::unique_ptr<Model>>& r, StatusCode code, const std::string& part) {
  ASSERT_FALSE(r.ok()) << "expected an error containing '" << part << "'";
  EXPECT_EQ(r.status().code(), code) << r.status().ToString();
  EXPECT_NE(r.status().message().find(part), std::string::npos) << r.status().ToString();
}

TEST_F(ModelLoadTest, GoodModelLoads) {
  auto m = Model::Load(good_);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  const ModelConfig& c = (*m)->config();
  EXPECT_EQ(c.arch, Arch::kQwen2);
  EXPECT_EQ(c.rope.style, kernels::RopeStyle::kNeox);
  EXPECT_TRUE(c.tied_output);
  EXPECT_EQ(c.n_vocab, 1024);
  EXPECT_EQ(c.head_dim, 32);
  EXPECT_NE((*m)->layers()[0].bq, nullptr);
  EXPECT_LT(fs::file_size(good_), 2u << 20);
}

TEST_F(ModelLoadTest, TrainedModelLoads) {
  auto m = Model::Load(kShared + "/models/cachette-tiny-q8_0.gguf");
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  const ModelConfig& c = (*m)->config();
  EXPECT_EQ(c.arch, Arch::kLlama);
  EXPECT_EQ(c.d_model, 384);
  EXPECT_EQ(c.n_layer, 6);
  EXPECT_EQ(c.n_kv_head, 2);
  EXPECT_EQ(c.n_vocab, 8192);
  EXPECT_TRUE(c.tied_output);
  EXPECT_EQ(c.weight_type, kernels::WType::kQ8_0);
}

// weight_bytes_per_token counts every matrix a decode step streams once (the embedding, read
// a row per token, aside; here it is tied, so it counts once as the output head), and the
// regrouped block scales exactly where the dispatched kernels read them.
TEST_F(ModelLoadTest, WeightBytesPerTokenCountsWhatDecodeReads) {
  const kernels::Isa best = kernels::BestIsa();
  for (kernels::Isa isa : {kernels::Isa::kScalar, kernels::Isa::kAvx2, best}) {
    if (isa > best) continue;
    kernels::SetIsa(isa);
    auto m = Model::Load(kShared + "/models/cachette-tiny-q8_0.gguf");
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    const bool scales = kernels::UsesDecodeScales(kernels::WType::kQ8_0);
    uint64_t rows_bytes = 0, scale_bytes = 0;
    auto add = [&](const kernels::WeightMatrix& w) {
      EXPECT_EQ(w.scales8 != nullptr, scales) << kernels::IsaName(isa);
      rows_bytes += static_cast<uint64_t>(w.rows) * w.row_bytes;
      // ceil(rows / 8) groups of 8 rows, one f16 scale per row and block of 32 columns.
      if (scales) scale_bytes += static_cast<uint64_t>((w.rows + 7) / 8 * 8 * (w.cols / 32) * 2);
    };
    for (const LayerWeights& l : (*m)->layers()) {
      for (const auto* w : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) add(*w);
    }
    add((*m)->output());
    EXPECT_EQ((*m)->weight_bytes_per_token(), rows_bytes + scale_bytes) << kernels::IsaName(isa);
    EXPECT_EQ(scale_bytes > 0, isa != kernels::Isa::kScalar) << kernels::IsaName(isa);
  }
  kernels::SetIsa(best);
}

// Every matrix a decode step streams carries the cache hint its model's size calls for (the
// 14 MB model fits in half of the 32 MiB and larger last-level caches of the machines this
// project runs on, where sysfs reports it).
TEST_F(ModelLoadTest, MatricesCarryTheCacheHintOfTheModelsSize) {
  auto m = Model::Load(kShared + "/models/cachette-tiny-q8_0.gguf");
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  const bool fits = kernels::FitsInLastLevelCache((*m)->weight_bytes_per_token());
  for (const LayerWeights& l : (*m)->layers()) {
    for (const auto* w : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) {
      EXPECT_EQ(w->cache_resident, fits);
    }
  }
  EXPECT_EQ((*m)->output().cache_resident, fits);
  EXPECT_FALSE(kernels::FitsInLastLevelCache(uint64_t{1} << 40));
}

TEST_F(ModelLoadTest, FingerprintChangesWithAnyWeightByte) {
  auto a = Model::Load(good_);
  ASSERT_TRUE(a.ok());
  const Hash128 fa = (*a)->Fingerprint();
  EXPECT_EQ(fa, (*a)->Fingerprint());
  SynthOptions o;
  o.shape = "tiny";
  o.type = kernels::WType::kQ8_0;
  o.arch = "qwen2";
  o.seed = 2;
  o.vocab_path = kShared + "/testdata/tokenizer/ggml-vocab-gpt-2.gguf";
  const std::string other = (dir_ / "other.gguf").string();
  ASSERT_TRUE(SynthesizeModel(o, other).ok());
  auto b = Model::Load(other);
  ASSERT_TRUE(b.ok());
  EXPECT_NE(fa, (*b)->Fingerprint());
}

TEST_F(ModelLoadTest, MalformedModelsGiveNamedErrors) {
  ExpectError(Model::Load((dir_ / "missing.gguf").string()), StatusCode::kIOError, "missing.gguf");
  ExpectError(Model::Load(Rewrite(
                  [](std::string& k, gguf::Value& v) {
                    if (k == "general.architecture") v.str = "mamba";
                    return true;
                  },
                  KeepTensor)),
              StatusCode::kUnimplemented, "unknown architecture 'mamba'");
  ExpectError(Model::Load(Rewrite([](std::string& k, gguf::Value&) {
                return k != "qwen2.block_count";
              }, KeepTensor)),
              StatusCode::kNotFound, "qwen2.block_count");
  ExpectError(Model::Load(Rewrite(KeepKv,
                                  [](std::string& n, gguf::TensorType&, std::vector<int64_t>&) {
                                    return n != "blk.1.ffn_up.weight";
                                  })),
              StatusCode::kInvalidArgument, "missing tensor 'blk.1.ffn_up.weight'");
  ExpectError(Model::Load(Rewrite(KeepKv,
                                  [](std::string& n, gguf::TensorType&, std::vector<int64_t>&) {
                                    return n != "blk.0.attn_k.bias";
                                  })),
              StatusCode::kInvalidArgument, "missing tensor 'blk.0.attn_k.bias'");
  ExpectError(Model::Load(Rewrite(KeepKv,
                                  [](std::string& n, gguf::TensorType&, std::vector<int64_t>& d) {
                                    if (n == "token_embd.weight") d[1] = 512;
                                    return true;
                                  })),
              StatusCode::kInvalidArgument, "vocabulary has 1024 tokens but token_embd.weight");
  ExpectError(Model::Load(Rewrite(KeepKv,
                                  [](std::string& n, gguf::TensorType& t, std::vector<int64_t>&) {
                                    if (n == "blk.0.attn_q.weight") t = gguf::TensorType::kQ4_1;
                                    return true;
                                  })),
              StatusCode::kUnimplemented, "q4_1");
  ExpectError(Model::Load(Rewrite(KeepKv,
                                  [](std::string& n, gguf::TensorType&, std::vector<int64_t>& d) {
                                    if (n == "blk.1.attn_output.weight") d = {128, 64};
                                    return true;
                                  })),
              StatusCode::kInvalidArgument, "tensor 'blk.1.attn_output.weight' has dims");
  ExpectError(Model::Load(Rewrite(
                  [](std::string& k, gguf::Value& v) {
                    if (k == "qwen2.attention.head_count_kv") v.u64 = 3;
                    return true;
                  },
                  KeepTensor)),
              StatusCode::kInvalidArgument, "head_count_kv");
  ExpectError(Model::Load(Rewrite([](std::string& k, gguf::Value&) {
                return k != "tokenizer.ggml.tokens";
              }, KeepTensor)),
              StatusCode::kInvalidArgument, "tokenizer.ggml.tokens");
}

}  // namespace
}  // namespace cachette
