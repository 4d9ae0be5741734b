// GGUF reader and writer: writer -> reader round trips, the real files in shared/, and a table
// of malformed inputs, each with the error code and a piece of the message it must produce.
#include "model/gguf.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

namespace cachette::gguf {
namespace {

namespace fs = std::filesystem;
using namespace std::string_view_literals;

std::vector<std::byte> Bytes(size_t n, uint8_t seed) {
  std::vector<std::byte> b(n);
  for (size_t i = 0; i < n; ++i) b[i] = static_cast<std::byte>((i * 131 + seed) & 0xff);
  return b;
}

Value Scalar(ValueType t) {
  Value v;
  v.type = t;
  return v;
}

// ---------------------------------------------------------------------------------------------
// Round trips.

// One value of every type, including arrays of every element type, nested and empty arrays.
std::vector<std::pair<std::string, Value>> EveryValue() {
  std::vector<std::pair<std::string, Value>> out;
  auto add = [&](std::string k, Value v) { out.emplace_back(std::move(k), std::move(v)); };
  Value v;
  v = Scalar(ValueType::kUint8), v.u64 = 250, add("t.u8", v);
  v = Scalar(ValueType::kInt8), v.i64 = -120, add("t.i8", v);
  v = Scalar(ValueType::kUint16), v.u64 = 65000, add("t.u16", v);
  v = Scalar(ValueType::kInt16), v.i64 = -32000, add("t.i16", v);
  v = Scalar(ValueType::kUint32), v.u64 = 4000000000u, add("t.u32", v);
  v = Scalar(ValueType::kInt32), v.i64 = -2000000000, add("t.i32", v);
  v = Scalar(ValueType::kUint64), v.u64 = std::numeric_limits<uint64_t>::max(), add("t.u64", v);
  v = Scalar(ValueType::kInt64), v.i64 = std::numeric_limits<int64_t>::min(), add("t.i64", v);
  v = Scalar(ValueType::kFloat32), v.f64 = 0.15625, add("t.f32", v);
  v = Scalar(ValueType::kFloat64), v.f64 = 1e300, add("t.f64", v);
  v = Scalar(ValueType::kBool), v.b = true, add("t.bool", v);
  v = Scalar(ValueType::kString), v.str = "h\xc3\xa9llo\0x"sv, add("t.str", v);
  v = Scalar(ValueType::kString), v.str = "", add("t.str_empty", v);
  // Arrays of each scalar element type, two elements each.
  for (auto [name, t] :
       std::vector<std::pair<std::string, ValueType>>{{"u8", ValueType::kUint8},
                                                      {"i8", ValueType::kInt8},
                                                      {"u16", ValueType::kUint16},
                                                      {"i16", ValueType::kInt16},
                                                      {"u32", ValueType::kUint32},
                                                      {"i32", ValueType::kInt32},
                                                      {"u64", ValueType::kUint64},
                                                      {"i64", ValueType::kInt64},
                                                      {"f32", ValueType::kFloat32},
                                                      {"f64", ValueType::kFloat64},
                                                      {"bool", ValueType::kBool},
                                                      {"str", ValueType::kString}}) {
    Value a = Scalar(ValueType::kArray);
    a.array_type = t;
    for (int i = 0; i < 2; ++i) {
      Value e = Scalar(t);
      if (e.is_integer()) {
        bool is_signed = t == ValueType::kInt8 || t == ValueType::kInt16 ||
                         t == ValueType::kInt32 || t == ValueType::kInt64;
        if (is_signed) {
          e.i64 = -3 - i;
        } else {
          e.u64 = 7 + i;
        }
      }
      if (e.is_float()) e.f64 = 0.5 + i;
      if (t == ValueType::kBool) e.b = i == 1;
      if (t == ValueType::kString) e.str = i == 0 ? "a" : "bc";
      a.array.push_back(e);
    }
    add("arr." + name, a);
  }
  Value empty = Scalar(ValueType::kArray);
  empty.array_type = ValueType::kFloat32;
  add("arr.empty", empty);
  // [[1, 2], [], [3]] of int32, and [[["x"]]] of strings three deep.
  Value nested = Scalar(ValueType::kArray);
  nested.array_type = ValueType::kArray;
  for (std::vector<int> inner : std::vector<std::vector<int>>{{1, 2}, {}, {3}}) {
    Value a = Scalar(ValueType::kArray);
    a.array_type = ValueType::kInt32;
    for (int x : inner) {
      Value e = Scalar(ValueType::kInt32);
      e.i64 = x;
      a.array.push_back(e);
    }
    nested.array.push_back(a);
  }
  add("arr.nested", nested);
  Value s = Scalar(ValueType::kString);
  s.str = "x";
  Value l1 = Scalar(ValueType::kArray);
  l1.array_type = ValueType::kString;
  l1.array.push_back(s);
  Value l2 = Scalar(ValueType::kArray);
  l2.array_type = ValueType::kArray;
  l2.array.push_back(l1);
  Value l3 = Scalar(ValueType::kArray);
  l3.array_type = ValueType::kArray;
  l3.array.push_back(l2);
  add("arr.deep", l3);
  return out;
}

void ExpectSameValue(const Value& want, const Value& got, const std::string& where) {
  SCOPED_TRACE(where);
  ASSERT_EQ(want.type, got.type);
  switch (want.type) {
    case ValueType::kUint8:
    case ValueType::kUint16:
    case ValueType::kUint32:
    case ValueType::kUint64:
      EXPECT_EQ(want.u64, got.u64);
      break;
    case ValueType::kInt8:
    case ValueType::kInt16:
    case ValueType::kInt32:
    case ValueType::kInt64:
      EXPECT_EQ(want.i64, got.i64);
      break;
    case ValueType::kFloat32:
    case ValueType::kFloat64:
      EXPECT_EQ(want.f64, got.f64);
      break;
    case ValueType::kBool:
      EXPECT_EQ(want.b, got.b);
      break;
    case ValueType::kString:
      EXPECT_EQ(want.str, got.str);
      break;
    case ValueType::kArray:
      ASSERT_EQ(want.array_type, got.array_type);
      ASSERT_EQ(want.array.size(), got.array.size());
      for (size_t i = 0; i < want.array.size(); ++i) {
        ExpectSameValue(want.array[i], got.array[i], where + "[" + std::to_string(i) + "]");
      }
      break;
  }
}

TEST(GgufRoundTrip, EveryValueType) {
  auto values = EveryValue();
  GgufWriter w;
  for (const auto& [k, v] : values) w.AddValue(k, v);
  std::vector<std::byte> bytes = w.Serialize();
  auto f = GgufFile::FromMemory(bytes);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ((*f)->version(), 3u);
  EXPECT_EQ((*f)->alignment(), 32u);
  ASSERT_EQ((*f)->metadata().size(), values.size());
  for (size_t i = 0; i < values.size(); ++i) {
    // File order is kept.
    EXPECT_EQ((*f)->metadata()[i].key, values[i].first);
    ExpectSameValue(values[i].second, (*f)->metadata()[i].value, values[i].first);
    ASSERT_NE((*f)->Find(values[i].first), nullptr);
  }
  EXPECT_EQ((*f)->Find("t.absent"), nullptr);

  // AddValue copies what the reader produced (views into `bytes`) byte for byte.
  GgufWriter copy;
  for (const KeyValue& kv : (*f)->metadata()) copy.AddValue(std::string(kv.key), kv.value);
  EXPECT_EQ(copy.Serialize(), bytes);
}

TEST(GgufRoundTrip, ConvenienceAdders) {
  GgufWriter w;
  w.AddUint32("a.u32", 7);
  w.AddInt32("a.i32", -7);
  w.AddUint64("a.u64", uint64_t{1} << 40);
  w.AddFloat32("a.f32", 1.5f);
  w.AddBool("a.bool", false);
  w.AddString("a.str", "llama");
  w.AddStringArray("a.strs", {"<s>", "", "hello world"});
  w.AddFloat32Array("a.f32s", {-1.0f, 0.25f});
  w.AddInt32Array("a.i32s", {1, -2, 3});
  std::vector<std::byte> bytes = w.Serialize();
  auto f = GgufFile::FromMemory(bytes);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  const GgufFile& g = **f;
  EXPECT_EQ(*g.GetInt("a.u32"), 7);
  EXPECT_EQ(*g.GetInt("a.i32"), -7);
  EXPECT_EQ(*g.GetInt("a.u64"), int64_t{1} << 40);
  EXPECT_EQ(*g.GetFloat("a.f32"), 1.5);
  EXPECT_EQ(*g.GetFloat("a.u32"), 7.0);  // integers widen to float
  EXPECT_EQ(*g.GetBool("a.bool"), false);
  EXPECT_EQ(*g.GetString("a.str"), "llama");
  auto strs = g.GetArray("a.strs", ValueType::kString);
  ASSERT_TRUE(strs.ok());
  ASSERT_EQ((*strs)->size(), 3u);
  EXPECT_EQ((**strs)[2].str, "hello world");
  auto f32s = g.GetArray("a.f32s", ValueType::kFloat32);
  ASSERT_TRUE(f32s.ok());
  EXPECT_EQ((**f32s)[1].f64, 0.25);
  auto i32s = g.GetArray("a.i32s", ValueType::kInt32);
  ASSERT_TRUE(i32s.ok());
  EXPECT_EQ((**i32s)[1].i64, -2);

  // Typed getter errors.
  EXPECT_EQ(g.GetInt("nope").status().code(), StatusCode::kNotFound);
  EXPECT_EQ(g.GetInt("a.str").status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(g.GetInt("a.str").status().message().find("a.str"), std::string::npos);
  EXPECT_EQ(g.GetFloat("a.bool").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(g.GetBool("a.u32").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(g.GetString("a.u32").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(g.GetArray("a.strs", ValueType::kInt32).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(g.GetArray("a.str", ValueType::kString).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(*g.GetIntOr("nope", 42), 42);
  EXPECT_EQ(*g.GetFloatOr("nope", 0.5), 0.5);
  EXPECT_EQ(*g.GetBoolOr("nope", true), true);
  EXPECT_EQ(g.GetIntOr("a.str", 1).status().code(), StatusCode::kInvalidArgument);
}

TEST(GgufRoundTrip, GetIntRejectsUint64AboveInt64Max) {
  GgufWriter w;
  w.AddUint64("big", std::numeric_limits<uint64_t>::max());
  std::vector<std::byte> bytes = w.Serialize();
  auto f = GgufFile::FromMemory(bytes);
  ASSERT_TRUE(f.ok());
  auto r = (*f)->GetInt("big");
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("does not fit"), std::string::npos);
}

struct TensorSpec {
  std::string name;
  TensorType type;
  std::vector<int64_t> dims;
  size_t n_bytes;
};

std::vector<TensorSpec> SomeTensors() {
  return {
      {"tok.f32", TensorType::kF32, {4, 3}, 4 * 3 * 4},
      {"vec.f16", TensorType::kF16, {7}, 7 * 2},
      {"w.q8_0", TensorType::kQ8_0, {64, 2}, 2 * 2 * 34},
      {"w.q4_k", TensorType::kQ4_K, {256, 1, 2}, 2 * 144},
      {"x.i8", TensorType::kI8, {5, 1, 2, 3}, 30},
      {"x.bf16", TensorType::kBF16, {3, 1}, 6},
  };
}

void CheckTensors(const GgufFile& g, const std::vector<TensorSpec>& specs) {
  ASSERT_EQ(g.tensors().size(), specs.size());
  for (size_t i = 0; i < specs.size(); ++i) {
    SCOPED_TRACE(specs[i].name);
    const TensorInfo& t = g.tensors()[i];
    EXPECT_EQ(t.name, specs[i].name);
    EXPECT_EQ(t.type, specs[i].type);
    EXPECT_EQ(t.dims, specs[i].dims);
    EXPECT_EQ(t.n_bytes, specs[i].n_bytes);
    EXPECT_EQ(t.offset % g.alignment(), 0u);
    EXPECT_EQ((t.data - g.bytes().data()) % static_cast<ptrdiff_t>(g.alignment()), 0);
    std::vector<std::byte> want = Bytes(specs[i].n_bytes, static_cast<uint8_t>(i));
    EXPECT_EQ(std::memcmp(t.data, want.data(), want.size()), 0);
    EXPECT_EQ(g.FindTensor(specs[i].name), &t);
  }
  EXPECT_EQ(g.FindTensor("absent"), nullptr);
}

TEST(GgufRoundTrip, TensorsOfSeveralTypesAndDims) {
  GgufWriter w;
  w.AddString("general.architecture", "test");
  auto specs = SomeTensors();
  for (size_t i = 0; i < specs.size(); ++i) {
    ASSERT_TRUE(w.AddTensor(specs[i].name, specs[i].type, specs[i].dims,
                            Bytes(specs[i].n_bytes, static_cast<uint8_t>(i)))
                    .ok());
  }
  std::vector<std::byte> bytes = w.Serialize();
  auto f = GgufFile::FromMemory(bytes);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ((*f)->tensors()[0].n_elements(), 12);
  EXPECT_EQ((*f)->tensors()[4].n_elements(), 30);
  CheckTensors(**f, specs);
  EXPECT_EQ((*f)->Find("general.alignment"), nullptr);  // default alignment is not written
}

TEST(GgufRoundTrip, NonDefaultAlignment) {
  GgufWriter w;
  w.SetAlignment(64);
  auto specs = SomeTensors();
  for (size_t i = 0; i < specs.size(); ++i) {
    ASSERT_TRUE(w.AddTensor(specs[i].name, specs[i].type, specs[i].dims,
                            Bytes(specs[i].n_bytes, static_cast<uint8_t>(i)))
                    .ok());
  }
  std::vector<std::byte> bytes = w.Serialize();
  auto f = GgufFile::FromMemory(bytes);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ((*f)->alignment(), 64u);
  EXPECT_EQ(*(*f)->GetInt("general.alignment"), 64);
  CheckTensors(**f, specs);

  // Copying the metadata of that file carries the alignment through AddValue.
  GgufWriter copy;
  for (const KeyValue& kv : (*f)->metadata()) copy.AddValue(std::string(kv.key), kv.value);
  std::vector<std::byte> copied = copy.Serialize();
  auto g = GgufFile::FromMemory(copied);
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  EXPECT_EQ((*g)->alignment(), 64u);
  EXPECT_EQ((*g)->metadata().size(), 1u);
}

TEST(GgufWriter, AddTensorRejectsBadShapes) {
  GgufWriter w;
  EXPECT_EQ(w.AddTensor("a", TensorType::kF32, {2}, Bytes(7, 0)).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(w.AddTensor("a", TensorType::kF32, {}, {}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(w.AddTensor("a", TensorType::kF32, {1, 1, 1, 1, 1}, Bytes(4, 0)).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(w.AddTensor("a", TensorType::kF32, {0}, {}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(w.AddTensor("a", TensorType::kQ8_0, {16}, Bytes(17, 0)).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(w.AddTensor("a", static_cast<TensorType>(4), {1}, Bytes(1, 0)).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(w.AddTensor("", TensorType::kF32, {1}, Bytes(4, 0)).code(),
            StatusCode::kInvalidArgument);
  EXPECT_TRUE(w.AddTensor("a", TensorType::kF32, {1}, Bytes(4, 0)).ok());
}

class TempDir {
 public:
  TempDir() {
    path_ = fs::temp_directory_path() / ("gguf_test." + std::to_string(getpid()));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

TEST(GgufRoundTrip, WriteFileThenOpen) {
  TempDir dir;
  GgufWriter w;
  w.AddString("general.architecture", "llama");
  auto specs = SomeTensors();
  for (size_t i = 0; i < specs.size(); ++i) {
    ASSERT_TRUE(w.AddTensor(specs[i].name, specs[i].type, specs[i].dims,
                            Bytes(specs[i].n_bytes, static_cast<uint8_t>(i)))
                    .ok());
  }
  std::string path = (dir.path() / "m.gguf").string();
  ASSERT_TRUE(w.WriteFile(path).ok());
  // Overwriting replaces the file atomically and leaves no temporary behind.
  ASSERT_TRUE(w.WriteFile(path).ok());
  int n_files = 0;
  for (const auto& e : fs::directory_iterator(dir.path())) {
    ++n_files;
    EXPECT_EQ(e.path().filename(), "m.gguf");
  }
  EXPECT_EQ(n_files, 1);
  auto f = GgufFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ((*f)->path(), path);
  EXPECT_EQ((*f)->file_size(), w.Serialize().size());
  EXPECT_EQ(std::memcmp((*f)->bytes().data(), w.Serialize().data(), (*f)->file_size()), 0);
  CheckTensors(**f, specs);

  EXPECT_EQ(GgufFile::Open((dir.path() / "missing.gguf").string()).status().code(),
            StatusCode::kIOError);
  EXPECT_EQ(GgufFile::Open(dir.path().string()).status().code(), StatusCode::kIOError);
  EXPECT_EQ(w.WriteFile((dir.path() / "no" / "such" / "dir.gguf").string()).code(),
            StatusCode::kIOError);
  // An empty file is opened (mmap cannot map 0 bytes) and rejected as corrupt.
  std::string empty = (dir.path() / "empty.gguf").string();
  fclose(fopen(empty.c_str(), "w"));
  auto e = GgufFile::Open(empty);
  EXPECT_EQ(e.status().code(), StatusCode::kCorruption);
  EXPECT_NE(e.status().message().find(empty), std::string::npos);
}

// Residence::kHugePages reads the file into memory of its own: the same bytes and tensors as the
// mapping, at and above the 2 MiB from which the buffer is an anonymous huge-page mapping, and
// the same errors.
TEST(GgufRoundTrip, ReadIntoHugePagesGivesTheMappedBytes) {
  TempDir dir;
  for (const size_t payload : {size_t{4096}, size_t{3} << 20}) {
    SCOPED_TRACE(payload);
    GgufWriter w;
    w.AddString("general.architecture", "llama");
    std::vector<std::byte> data(payload);
    for (size_t i = 0; i < payload; ++i) data[i] = static_cast<std::byte>(i * 131 + 7);
    ASSERT_TRUE(
        w.AddTensor("t", TensorType::kF32, {static_cast<int64_t>(payload / 4)}, data).ok());
    const std::string path = (dir.path() / "m.gguf").string();
    ASSERT_TRUE(w.WriteFile(path).ok());
    auto mapped = GgufFile::Open(path, Residence::kMapped);
    auto read = GgufFile::Open(path, Residence::kHugePages);
    ASSERT_TRUE(mapped.ok()) << mapped.status().ToString();
    ASSERT_TRUE(read.ok()) << read.status().ToString();
    EXPECT_EQ((*mapped)->residence(), Residence::kMapped);
    EXPECT_EQ((*read)->residence(), Residence::kHugePages);
    EXPECT_NE((*read)->bytes().data(), (*mapped)->bytes().data());
    ASSERT_EQ((*read)->file_size(), (*mapped)->file_size());
    EXPECT_EQ(std::memcmp((*read)->bytes().data(), (*mapped)->bytes().data(),
                          (*read)->file_size()), 0);
    const TensorInfo* t = (*read)->FindTensor("t");
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(t->data) % (*read)->alignment(), 0u);
    ASSERT_EQ(t->n_bytes, payload);
    EXPECT_EQ(std::memcmp(t->data, data.data(), payload), 0);
  }
  EXPECT_EQ(GgufFile::Open((dir.path() / "missing.gguf").string(), Residence::kHugePages)
                .status().code(),
            StatusCode::kIOError);
  EXPECT_EQ(GgufFile::Open(dir.path().string(), Residence::kHugePages).status().code(),
            StatusCode::kIOError);
  const std::string empty = (dir.path() / "empty.gguf").string();
  fclose(fopen(empty.c_str(), "w"));
  EXPECT_EQ(GgufFile::Open(empty, Residence::kHugePages).status().code(),
            StatusCode::kCorruption);
}

// ---------------------------------------------------------------------------------------------
// The real files.

std::string Shared(const std::string& rel) { return std::string(CACHETTE_SHARED_DIR) + "/" + rel; }

TEST(GgufRealFiles, EveryFileParses) {
  int n = 0;
  for (const char* dir : {"models", "testdata/tokenizer"}) {
    fs::path p = Shared(dir);
    if (!fs::exists(p)) continue;
    for (const auto& e : fs::directory_iterator(p)) {
      if (e.path().extension() != ".gguf") continue;
      SCOPED_TRACE(e.path().string());
      auto f = GgufFile::Open(e.path().string());
      ASSERT_TRUE(f.ok()) << f.status().ToString();
      EXPECT_TRUE((*f)->GetString("general.architecture").ok());
      for (const TensorInfo& t : (*f)->tensors()) {
        EXPECT_GE(t.data, (*f)->bytes().data());
        EXPECT_LE(t.data + t.n_bytes, (*f)->bytes().data() + (*f)->file_size());
      }
      ++n;
    }
  }
  EXPECT_GE(n, 6);
}

TEST(GgufRealFiles, TinyModelFacts) {
  for (auto [file, type] : std::vector<std::pair<std::string, TensorType>>{
           {"cachette-tiny-f32.gguf", TensorType::kF32},
           {"cachette-tiny-f16.gguf", TensorType::kF16},
           {"cachette-tiny-q8_0.gguf", TensorType::kQ8_0}}) {
    SCOPED_TRACE(file);
    auto f = GgufFile::Open(Shared("models/" + file));
    ASSERT_TRUE(f.ok()) << f.status().ToString();
    const GgufFile& g = **f;
    EXPECT_EQ(g.version(), 3u);
    EXPECT_EQ(*g.GetString("general.architecture"), "llama");
    EXPECT_EQ(*g.GetInt("llama.block_count"), 6);
    EXPECT_EQ(*g.GetInt("llama.embedding_length"), 384);
    const TensorInfo* emb = g.FindTensor("token_embd.weight");
    ASSERT_NE(emb, nullptr);
    EXPECT_EQ(emb->dims, (std::vector<int64_t>{384, 8192}));
    const TensorInfo* wq = g.FindTensor("blk.0.attn_q.weight");
    ASSERT_NE(wq, nullptr);
    EXPECT_EQ(wq->dims, (std::vector<int64_t>{384, 384}));
    EXPECT_EQ(wq->type, type);
    EXPECT_EQ(g.FindTensor("output.weight"), nullptr);  // tied to the embedding
    auto tokens = g.GetArray("tokenizer.ggml.tokens", ValueType::kString);
    ASSERT_TRUE(tokens.ok()) << tokens.status().ToString();
    EXPECT_EQ((*tokens)->size(), 8192u);
    EXPECT_EQ((**tokens)[8191].str, "<|endoftext|>");
  }
  auto emb = (*GgufFile::Open(Shared("models/cachette-tiny-f32.gguf")))->FindTensor("x");
  EXPECT_EQ(emb, nullptr);
}

TEST(GgufRealFiles, TokenizerVocabs) {
  auto f = GgufFile::Open(Shared("testdata/tokenizer/ggml-vocab-llama-spm.gguf"));
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(*(*f)->GetString("tokenizer.ggml.model"), "llama");
  auto scores = (*f)->GetArray("tokenizer.ggml.scores", ValueType::kFloat32);
  ASSERT_TRUE(scores.ok());
  EXPECT_EQ((*scores)->size(), 32000u);
  auto g = GgufFile::Open(Shared("testdata/tokenizer/ggml-vocab-gpt-2.gguf"));
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  EXPECT_EQ(*(*g)->GetString("tokenizer.ggml.model"), "gpt2");
  EXPECT_TRUE((*g)->GetArray("tokenizer.ggml.merges", ValueType::kString).ok());
  EXPECT_TRUE((*g)->tensors().empty());
}

TEST(GgufRealFiles, CopyThroughWriter) {
  // Every key and tensor of a real file, copied with AddValue/AddTensor, reads back the same.
  auto f = GgufFile::Open(Shared("models/cachette-tiny-vocab.gguf"));
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  GgufWriter w;
  for (const KeyValue& kv : (*f)->metadata()) w.AddValue(std::string(kv.key), kv.value);
  for (const TensorInfo& t : (*f)->tensors()) {
    ASSERT_TRUE(
        w.AddTensor(std::string(t.name), t.type, t.dims, {t.data, t.data + t.n_bytes}).ok());
  }
  std::vector<std::byte> bytes = w.Serialize();
  auto g = GgufFile::FromMemory(bytes);
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  ASSERT_EQ((*g)->metadata().size(), (*f)->metadata().size());
  for (size_t i = 0; i < (*f)->metadata().size(); ++i) {
    EXPECT_EQ((*g)->metadata()[i].key, (*f)->metadata()[i].key);
    ExpectSameValue((*f)->metadata()[i].value, (*g)->metadata()[i].value,
                    std::string((*f)->metadata()[i].key));
  }
  EXPECT_EQ((*g)->tensors().size(), (*f)->tensors().size());
}

// ---------------------------------------------------------------------------------------------
// Malformed inputs. Files are assembled field by field so that each case breaks one thing.

class Raw {
 public:
  Raw& U8(uint8_t v) { return Put(&v, 1); }
  Raw& U32(uint32_t v) { return Put(&v, 4); }
  Raw& U64(uint64_t v) { return Put(&v, 8); }
  Raw& Str(std::string_view s) {
    U64(s.size());
    return Put(s.data(), s.size());
  }
  Raw& Header(uint32_t version, uint64_t n_tensors, uint64_t n_kv) {
    return Put("GGUF", 4).U32(version).U64(n_tensors).U64(n_kv);
  }
  // A key with a u32 value.
  Raw& KvU32(std::string_view key, uint32_t v) { return Str(key).U32(4).U32(v); }
  Raw& Tensor(std::string_view name, std::vector<uint64_t> dims, uint32_t type, uint64_t offset) {
    Str(name).U32(static_cast<uint32_t>(dims.size()));
    for (uint64_t d : dims) U64(d);
    return U32(type).U64(offset);
  }
  Raw& PadTo(size_t alignment) {
    b_.resize((b_.size() + alignment - 1) / alignment * alignment);
    return *this;
  }
  Raw& Zeros(size_t n) {
    b_.resize(b_.size() + n);
    return *this;
  }
  Raw& Put(const void* p, size_t n) {
    const auto* c = static_cast<const std::byte*>(p);
    b_.insert(b_.end(), c, c + n);
    return *this;
  }
  std::vector<std::byte> bytes() const { return b_; }

 private:
  std::vector<std::byte> b_;
};

constexpr uint32_t kF32 = 0;
constexpr uint32_t kQ8_0 = 8;
constexpr uint32_t kF64 = 28;
constexpr uint32_t kArray = 9;
constexpr uint32_t kString = 8;

std::vector<std::byte> DepthBomb(int depth) {
  Raw r;
  r.Header(3, 0, 1).Str("bomb").U32(kArray);
  for (int i = 0; i < depth; ++i) r.U32(kArray).U64(1);
  r.U32(kArray).U64(0);
  return r.bytes();
}

// A file with one f32 tensor of `dims` at `offset` and `data_bytes` of data.
std::vector<std::byte> OneTensor(std::vector<uint64_t> dims, uint32_t type, uint64_t offset,
                                 size_t data_bytes) {
  return Raw().Header(3, 1, 0).Tensor("t", dims, type, offset).PadTo(32).Zeros(data_bytes).bytes();
}

struct BadCase {
  std::string name;
  std::vector<std::byte> bytes;
  StatusCode code;
  std::string message;  // a substring of the error message
};

std::vector<BadCase> BadCases() {
  const uint64_t kHuge = uint64_t{1} << 60;
  std::vector<BadCase> c;
  c.push_back({"empty file", {}, StatusCode::kCorruption, "too small for a header"});
  c.push_back(
      {"short header", Raw().Put("GGUF", 4).U32(3).bytes(), StatusCode::kCorruption, "too small"});
  c.push_back({"bad magic", Raw().Put("GGML", 4).U32(3).U64(0).U64(0).bytes(),
               StatusCode::kCorruption, "bad magic"});
  c.push_back({"version 0", Raw().Header(0, 0, 0).bytes(), StatusCode::kCorruption,
               "unsupported version 0"});
  c.push_back({"version 1", Raw().Header(1, 0, 0).bytes(), StatusCode::kUnimplemented,
               "unsupported version 1"});
  c.push_back({"version 4", Raw().Header(4, 0, 0).bytes(), StatusCode::kUnimplemented,
               "unsupported version 4"});
  c.push_back({"huge kv count", Raw().Header(3, 0, kHuge).Zeros(100).bytes(),
               StatusCode::kCorruption, "metadata count 1152921504606846976 cannot fit"});
  c.push_back({"huge tensor count", Raw().Header(3, kHuge, 0).Zeros(100).bytes(),
               StatusCode::kCorruption, "tensor count 1152921504606846976 cannot fit"});
  c.push_back(
      {"huge string array count",
       Raw().Header(3, 0, 1).Str("a.strs").U32(kArray).U32(kString).U64(kHuge).Zeros(64).bytes(),
       StatusCode::kCorruption, "key 'a.strs': array count 1152921504606846976"});
  c.push_back({"huge nested array count",
               Raw().Header(3, 0, 1).Str("a").U32(kArray).U32(kArray).U64(kHuge).Zeros(64).bytes(),
               StatusCode::kCorruption, "array count"});
  c.push_back({"string length past end",
               Raw().Header(3, 0, 1).Str("k").U32(kString).U64(1000).Put("abc", 3).bytes(),
               StatusCode::kCorruption, "key 'k': string length 1000"});
  c.push_back({"key length past end", Raw().Header(3, 0, 1).U64(kHuge).Zeros(20).bytes(),
               StatusCode::kCorruption, "metadata #0 key: string length"});
  c.push_back({"empty key", Raw().Header(3, 0, 1).Str("").U32(4).U32(1).bytes(),
               StatusCode::kCorruption, "empty key"});
  c.push_back({"unknown value type", Raw().Header(3, 0, 1).Str("k").U32(13).U32(0).bytes(),
               StatusCode::kCorruption, "key 'k': unknown value type 13"});
  c.push_back({"unknown array element type",
               Raw().Header(3, 0, 1).Str("k").U32(kArray).U32(99).U64(0).bytes(),
               StatusCode::kCorruption, "key 'k': unknown array element value type 99"});
  c.push_back({"nested array depth bomb", DepthBomb(10000), StatusCode::kInvalidArgument,
               "key 'bomb': arrays nested deeper than"});
  c.push_back({"bool not 0 or 1", Raw().Header(3, 0, 1).Str("b").U32(7).U8(2).bytes(),
               StatusCode::kCorruption, "key 'b': bool value 2"});
  c.push_back({"truncated value", Raw().Header(3, 0, 1).Str("k").U32(10).U32(0).bytes(),
               StatusCode::kCorruption, "key 'k': truncated"});
  c.push_back({"duplicate key", Raw().Header(3, 0, 2).KvU32("k", 1).KvU32("k", 2).bytes(),
               StatusCode::kCorruption, "duplicate key 'k'"});
  c.push_back({"duplicate tensor name",
               Raw()
                   .Header(3, 2, 0)
                   .Tensor("w", {8}, kF32, 0)
                   .Tensor("w", {8}, kF32, 32)
                   .PadTo(32)
                   .Zeros(64)
                   .bytes(),
               StatusCode::kCorruption, "duplicate tensor 'w'"});
  c.push_back({"empty tensor name",
               Raw().Header(3, 1, 0).Tensor("", {8}, kF32, 0).PadTo(32).Zeros(32).bytes(),
               StatusCode::kCorruption, "tensor #0: empty name"});
  c.push_back({"n_dims 0", OneTensor({}, kF32, 0, 32), StatusCode::kCorruption,
               "tensor 't': n_dims 0 not in [1, 4]"});
  c.push_back({"n_dims 5", OneTensor({1, 1, 1, 1, 1}, kF32, 0, 32), StatusCode::kCorruption,
               "tensor 't': n_dims 5 not in [1, 4]"});
  c.push_back({"zero dim", OneTensor({8, 0}, kF32, 0, 32), StatusCode::kCorruption,
               "tensor 't': dim 1 is 0"});
  c.push_back({"dim above int64", OneTensor({uint64_t{1} << 63}, kF32, 0, 32),
               StatusCode::kCorruption, "fit in int64"});
  c.push_back({"dims product overflows",
               OneTensor({uint64_t{1} << 32, uint64_t{1} << 32}, kF32, 0, 32),
               StatusCode::kCorruption, "tensor 't': element count overflows"});
  c.push_back({"byte size overflows", OneTensor({uint64_t{1} << 62}, kF64, 0, 32),
               StatusCode::kCorruption, "tensor 't': byte size overflows"});
  c.push_back({"ne[0] not a multiple of the block size", OneTensor({33, 2}, kQ8_0, 0, 256),
               StatusCode::kCorruption, "ne[0] = 33 is not a multiple of the q8_0 block size 32"});
  c.push_back({"unknown tensor type", OneTensor({8}, 99, 0, 32), StatusCode::kUnimplemented,
               "tensor 't': unknown tensor type id 99"});
  c.push_back({"removed tensor type", OneTensor({32}, 4, 0, 32), StatusCode::kUnimplemented,
               "unknown tensor type id 4"});
  c.push_back({"misaligned offset", OneTensor({8}, kF32, 4, 64), StatusCode::kCorruption,
               "tensor 't': offset 4 is not a multiple of the alignment 32"});
  c.push_back({"data past the end", OneTensor({8}, kF32, 0, 31), StatusCode::kCorruption,
               "tensor 't': data [64, 96) extends past end of file (95)"});
  c.push_back({"offset past the end", OneTensor({8}, kF32, uint64_t{1} << 63, 32),
               StatusCode::kCorruption, "extends past end of file"});
  c.push_back({"offset wraps around", OneTensor({8}, kF32, ~uint64_t{31}, 32),
               StatusCode::kCorruption, "extends past end of file"});
  c.push_back({"overlapping tensors",
               Raw()
                   .Header(3, 2, 0)
                   .Tensor("a", {16}, kF32, 0)
                   .Tensor("b", {8}, kF32, 32)
                   .PadTo(32)
                   .Zeros(64)
                   .bytes(),
               StatusCode::kCorruption, "tensor 'b' at offset 32 overlaps tensor 'a' [0, 64)"});
  c.push_back({"same offset",
               Raw()
                   .Header(3, 2, 0)
                   .Tensor("a", {8}, kF32, 0)
                   .Tensor("b", {8}, kF32, 0)
                   .PadTo(32)
                   .Zeros(32)
                   .bytes(),
               StatusCode::kCorruption, "overlaps"});
  c.push_back({"alignment 0", Raw().Header(3, 0, 1).KvU32("general.alignment", 0).bytes(),
               StatusCode::kCorruption, "general.alignment must be a nonzero power of two"});
  c.push_back({"alignment 48", Raw().Header(3, 0, 1).KvU32("general.alignment", 48).bytes(),
               StatusCode::kCorruption, "got 48"});
  c.push_back({"alignment 2^31", Raw().Header(3, 0, 1).KvU32("general.alignment", 1u << 31).bytes(),
               StatusCode::kCorruption, "general.alignment"});
  c.push_back({"alignment not an integer",
               Raw().Header(3, 0, 1).Str("general.alignment").U32(kString).Str("32").bytes(),
               StatusCode::kCorruption, "got string"});
  c.push_back({"offset misaligned for a custom alignment",
               Raw()
                   .Header(3, 1, 1)
                   .KvU32("general.alignment", 64)
                   .Tensor("t", {8}, kF32, 32)
                   .PadTo(64)
                   .Zeros(64)
                   .bytes(),
               StatusCode::kCorruption, "not a multiple of the alignment 64"});
  return c;
}

TEST(GgufMalformed, Table) {
  for (const BadCase& c : BadCases()) {
    SCOPED_TRACE(c.name);
    // A heap copy of exactly the input size, so that ASan flags any read past its end.
    std::vector<std::byte> copy(c.bytes);
    auto f = GgufFile::FromMemory(copy);
    ASSERT_FALSE(f.ok());
    EXPECT_EQ(f.status().code(), c.code) << f.status().ToString();
    EXPECT_NE(f.status().message().find(c.message), std::string::npos)
        << "message: " << f.status().message() << "\nwant substring: " << c.message;
    EXPECT_EQ(f.status().message().rfind("GGUF: ", 0), 0u) << f.status().message();
  }
}

TEST(GgufMalformed, ControlCasesAreValid) {
  // The neighbours of the bad cases parse, so the table tests what it says it does.
  std::vector<std::pair<std::string, std::vector<std::byte>>> good = {
      {"no tensors, no padding", Raw().Header(3, 0, 1).KvU32("k", 1).bytes()},
      {"version 2", Raw().Header(2, 0, 1).KvU32("k", 1).bytes()},
      {"one tensor", OneTensor({8}, kF32, 0, 32)},
      {"q8_0 block", OneTensor({32, 2}, kQ8_0, 0, 68)},
      {"adjacent tensors", Raw()
                               .Header(3, 2, 0)
                               .Tensor("a", {8}, kF32, 0)
                               .Tensor("b", {8}, kF32, 32)
                               .PadTo(32)
                               .Zeros(64)
                               .bytes()},
      {"depth 8", DepthBomb(kMaxArrayDepth - 1)},
      {"alignment 64", Raw()
                           .Header(3, 1, 1)
                           .KvU32("general.alignment", 64)
                           .Tensor("t", {8}, kF32, 64)
                           .PadTo(64)
                           .Zeros(96)
                           .bytes()},
  };
  for (const auto& [name, bytes] : good) {
    SCOPED_TRACE(name);
    auto f = GgufFile::FromMemory(bytes);
    EXPECT_TRUE(f.ok()) << f.status().ToString();
  }
}

TEST(GgufMalformed, TruncatedAtEveryByte) {
  GgufWriter w;
  w.AddString("general.architecture", "llama");
  w.AddInt32Array("a.i32s", {1, 2, 3});
  w.AddStringArray("a.strs", {"x", "yz"});
  Value nested = Scalar(ValueType::kArray);
  nested.array_type = ValueType::kArray;
  Value inner = Scalar(ValueType::kArray);
  inner.array_type = ValueType::kUint16;
  inner.array.push_back(Scalar(ValueType::kUint16));
  nested.array.push_back(inner);
  w.AddValue("a.nested", nested);
  w.AddFloat32("a.f", 2.0f);
  // Sizes that are multiples of 32, so that the file ends with tensor data, not padding, and
  // every proper prefix is broken.
  ASSERT_TRUE(w.AddTensor("a", TensorType::kF32, {8, 2}, Bytes(64, 1)).ok());
  ASSERT_TRUE(w.AddTensor("b", TensorType::kQ8_0, {32, 16}, Bytes(16 * 34, 2)).ok());
  std::vector<std::byte> full = w.Serialize();
  ASSERT_EQ(full.size() % 32, 0u);
  ASSERT_TRUE(GgufFile::FromMemory(full).ok());
  for (size_t n = 0; n < full.size(); ++n) {
    std::vector<std::byte> prefix(full.begin(), full.begin() + n);
    auto f = GgufFile::FromMemory(prefix);
    ASSERT_FALSE(f.ok()) << "prefix of " << n << " bytes parsed";
    ASSERT_EQ(f.status().code(), StatusCode::kCorruption) << n << ": " << f.status().ToString();
  }
}

TEST(GgufMalformed, HugeCountFailsFast) {
  // 2^60 strings in a 100-byte file: rejected from the count alone, nothing reserved.
  std::vector<std::byte> b = Raw()
                                 .Header(3, 0, 1)
                                 .Str("s")
                                 .U32(kArray)
                                 .U32(kString)
                                 .U64(uint64_t{1} << 60)
                                 .Zeros(50)
                                 .bytes();
  auto f = GgufFile::FromMemory(b);
  EXPECT_EQ(f.status().code(), StatusCode::kCorruption);
}

}  // namespace
}  // namespace cachette::gguf
