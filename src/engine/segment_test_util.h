// Test helpers shared by the engine, segment reuse and APE tests (test code only): the models
// they run on, random token runs, and the comparisons they make.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <initializer_list>
#include <map>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "model/model.h"
#include "model/synth.h"

namespace cachette::segment_test {

inline const std::string kShared = CACHETTE_SHARED_DIR;

// A synthetic tiny model of `arch` (llama: normal RoPE; qwen2: NEOX and QKV biases) with
// weights of `type` over the GPT-2 vocabulary, synthesized once per process.
inline const Model& Synthetic(const std::string& arch,
                              kernels::WType type = kernels::WType::kF32) {
  static std::map<std::pair<std::string, kernels::WType>, std::unique_ptr<Model>> cache;
  const auto key = std::make_pair(arch, type);
  auto it = cache.find(key);
  if (it != cache.end()) return *it->second;
  const std::filesystem::path path =
      std::filesystem::temp_directory_path() /
      ("cachette_segment_test_" + std::to_string(getpid()) + arch + "-" +
       std::string(kernels::WTypeName(type)));
  SynthOptions o;
  o.arch = arch;
  o.type = type;
  o.vocab_path = kShared + "/testdata/tokenizer/ggml-vocab-gpt-2.gguf";
  Status s = SynthesizeModel(o, path.string());
  EXPECT_TRUE(s.ok()) << s.ToString();
  auto m = Model::Load(path.string());
  EXPECT_TRUE(m.ok()) << m.status().ToString();
  std::filesystem::remove(path);
  return *(cache[key] = std::move(*m));
}

// The trained model in F32 (../shared/models/cachette-tiny-f32.gguf), loaded once.
inline const Model& Trained() {
  static std::unique_ptr<Model> m = [] {
    auto r = Model::Load(kShared + "/models/cachette-tiny-f32.gguf");
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return std::move(*r);
  }();
  return *m;
}

inline std::vector<TokenId> RandomTokens(int n, int vocab, std::mt19937& rng) {
  std::vector<TokenId> t(n);
  for (auto& x : t) x = static_cast<TokenId>(rng() % vocab);
  return t;
}

inline std::vector<TokenId> Concat(std::initializer_list<std::span<const TokenId>> parts) {
  std::vector<TokenId> out;
  for (auto p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

// ||a - b|| / ||b||, in double.
template <typename T>
double RelL2(const std::vector<float>& a, const std::vector<T>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - double(b[i])) * (a[i] - double(b[i]));
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / den);
}

inline TokenId Argmax(const std::vector<float>& v) {
  return static_cast<TokenId>(std::max_element(v.begin(), v.end()) - v.begin());
}

}  // namespace cachette::segment_test
