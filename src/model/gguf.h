// GGUF v3 reader (and v2, which differs only in nothing we rely on) over an mmapped file.
//
// File layout (little-endian), as llama.cpp writes it:
//   magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
//   n_kv x { string key | u32 value_type | value }
//   n_tensors x { string name | u32 n_dims | n_dims x u64 ne | u32 ggml_type | u64 offset }
//   padding to `general.alignment` (default 32) | tensor data
// string = u64 length + bytes (no NUL). array = u32 elem_type + u64 count + elements.
// ne[0] is the fastest-varying dimension: a weight matrix of `rows` outputs over `cols`
// inputs has ne = {cols, rows} and is stored row by row.
//
// Open() validates everything before returning: magic, version (2 or 3), counts against the
// file size, string lengths, value types, nested arrays, duplicate keys and tensor names,
// dims (1..4, each >= 1, product without overflow), tensor types, block-size divisibility,
// offsets aligned and data ranges inside the file and not overlapping. Errors are
// kCorruption (bytes that cannot be a valid GGUF) or kInvalidArgument/kUnimplemented (valid
// but unsupported), with a message naming the field, e.g.
//   "GGUF: tensor 'blk.0.attn_q.weight': data [1234, 5678) extends past end of file (4096)".
// Never crashes or hangs on any input (fuzzed by fuzz/fuzz_gguf.cc).
//
// Limits on otherwise valid files, so that hostile files cannot make the reader allocate or
// recurse without bound (kInvalidArgument): arrays nested at most kMaxArrayDepth deep, at most
// kMaxArrayElements array elements in the whole file.
//
// Thread-safety: a GgufFile is immutable after Open(); concurrent readers are safe.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "cachette/status.h"
#include "cachette/types.h"
#include "core/huge_pages.h"

namespace cachette::gguf {

enum class ValueType : uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};
std::string_view ValueTypeName(ValueType t);  // "uint8", ..., or "unknown"

inline constexpr int kMaxArrayDepth = 8;                // an array of arrays has depth 2
inline constexpr uint64_t kMaxArrayElements = 1 << 23;  // ~88 bytes of Value each

// ggml tensor types. Values are ggml's enum values as written in files.
enum class TensorType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ8_1 = 9,
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kQ8_K = 15,
  kIQ2_XXS = 16,
  kIQ2_XS = 17,
  kIQ3_XXS = 18,
  kIQ1_S = 19,
  kIQ4_NL = 20,
  kIQ3_S = 21,
  kIQ2_S = 22,
  kIQ4_XS = 23,
  kI8 = 24,
  kI16 = 25,
  kI32 = 26,
  kI64 = 27,
  kF64 = 28,
  kIQ1_M = 29,
  kBF16 = 30,
};

struct TypeTraits {
  std::string_view name;  // "f32", "q8_0", ...
  int64_t block_elems;    // elements per block (1 for plain types)
  int64_t block_bytes;    // bytes per block
};
// Traits of `t`, or nullptr if `t` is not a known ggml type.
const TypeTraits* GetTypeTraits(TensorType t);
std::string TensorTypeName(TensorType t);  // "q8_0", or "type(123)" if unknown

// A metadata value. Scalars are widened into one of u64/i64/f64/b/str; arrays keep their
// element type and hold their elements in `array` (strings point into the mapped file).
struct Value {
  ValueType type = ValueType::kUint8;
  uint64_t u64 = 0;        // kUint8/16/32/64
  int64_t i64 = 0;         // kInt8/16/32/64
  double f64 = 0;          // kFloat32/64
  bool b = false;          // kBool
  std::string_view str;    // kString
  ValueType array_type = ValueType::kUint8;  // kArray: element type
  std::vector<Value> array;                  // kArray: elements

  bool is_integer() const;
  bool is_float() const { return type == ValueType::kFloat32 || type == ValueType::kFloat64; }
};

struct KeyValue {
  std::string_view key;
  Value value;
};

struct TensorInfo {
  std::string_view name;
  TensorType type = TensorType::kF32;
  std::vector<int64_t> dims;  // ne[0..n_dims), ne[0] fastest-varying
  uint64_t offset = 0;        // relative to the start of the data section
  uint64_t n_bytes = 0;
  const std::byte* data = nullptr;  // inside the mapping

  int64_t n_elements() const;
};

// Where GgufFile::Open keeps the file's bytes.
enum class Residence {
  kMapped,     // an mmap of the file: shares the page cache, pages come in on first touch
  // Read at open into memory of its own: from 2 MiB up an anonymous mapping on 2 MiB pages
  // where the kernel gives them (ZeroedBuffer), below that the heap. A decode step streams
  // every weight, and on 4 KiB pages that is a page walk (in a VM a two-dimensional one) per
  // 4 KiB. Costs the read at open and memory not shared with the page cache or other processes.
  kHugePages,
};

class GgufFile {
 public:
  // Maps (or reads, as `residence` says) and validates the file at `path`. kIOError if it
  // cannot be opened, mapped or read.
  static Result<std::unique_ptr<GgufFile>> Open(const std::string& path,
                                                Residence residence = Residence::kMapped);
  // Validates `bytes` (not copied: they must outlive the returned object). For fuzzing/tests.
  static Result<std::unique_ptr<GgufFile>> FromMemory(ByteSpan bytes);

  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t file_size() const { return bytes_.size(); }
  Residence residence() const {
    return copy_ != nullptr ? Residence::kHugePages : Residence::kMapped;
  }
  ByteSpan bytes() const { return bytes_; }  // the whole file
  const std::string& path() const { return path_; }  // empty for FromMemory
  // t's bytes, writable, where the file was read into memory of its own (kHugePages): the
  // model rearranges weights there (kernels::InterleaveRows8). Null where it is mapped.
  std::byte* WritableData(const TensorInfo& t);

  const std::vector<KeyValue>& metadata() const { return kvs_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }

  // nullptr when absent.
  const Value* Find(std::string_view key) const;
  const TensorInfo* FindTensor(std::string_view name) const;

  // Typed getters: kNotFound when absent, kInvalidArgument naming the key when the type is
  // wrong (integers of any width/sign are accepted by GetInt if the value fits in int64).
  Result<int64_t> GetInt(std::string_view key) const;
  Result<double> GetFloat(std::string_view key) const;  // float32/float64 (or an integer)
  Result<bool> GetBool(std::string_view key) const;
  Result<std::string_view> GetString(std::string_view key) const;
  // The array under `key`: kInvalidArgument if it is not an array of `elem_type`.
  Result<const std::vector<Value>*> GetArray(std::string_view key, ValueType elem_type) const;

  // Defaults when absent; errors only when present with the wrong type.
  Result<int64_t> GetIntOr(std::string_view key, int64_t dflt) const;
  Result<double> GetFloatOr(std::string_view key, double dflt) const;
  Result<bool> GetBoolOr(std::string_view key, bool dflt) const;

 private:
  GgufFile() = default;
  Status Parse();

  std::string path_;
  void* map_ = nullptr;  // munmap on destruction when non-null
  size_t map_size_ = 0;
  std::unique_ptr<ZeroedBuffer> copy_;  // the bytes, for Residence::kHugePages
  ByteSpan bytes_;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::vector<KeyValue> kvs_;
  std::vector<TensorInfo> tensors_;
  // Name -> index into kvs_ / tensors_, for Find/FindTensor. Keys point into the mapping.
  std::unordered_map<std::string_view, size_t> kv_index_;
  std::unordered_map<std::string_view, size_t> tensor_index_;
};

// Builds a GGUF v3 file in memory and writes it atomically (temp file + rename). Used by
// `cachette model synth` and by tests to make valid and deliberately broken files.
class GgufWriter {
 public:
  void AddUint32(std::string key, uint32_t v);
  void AddInt32(std::string key, int32_t v);
  void AddUint64(std::string key, uint64_t v);
  void AddFloat32(std::string key, float v);
  void AddBool(std::string key, bool v);
  void AddString(std::string key, std::string v);
  void AddStringArray(std::string key, std::vector<std::string> v);
  void AddFloat32Array(std::string key, std::vector<float> v);
  void AddInt32Array(std::string key, std::vector<int32_t> v);
  // Copies any metadata value (e.g. from another GgufFile), arrays included.
  void AddValue(std::string key, const Value& v);
  // Data alignment, a power of two up to 2^30 (default 32; CT_CHECK-fails on anything else,
  // a caller bug). `general.alignment` is written only when it
  // differs from 32. Adding an integer `general.alignment` that is a power of two through the
  // Add* calls sets it the same way; any other `general.alignment` is written as given (a
  // deliberately broken file). Keys and tensor names are not checked for duplicates, for the
  // same reason.
  void SetAlignment(uint32_t alignment);

  // `data` must hold exactly the bytes of a tensor of `type` with dims `dims` (ne order).
  // Returns kInvalidArgument otherwise.
  Status AddTensor(std::string name, TensorType type, std::vector<int64_t> dims,
                   std::vector<std::byte> data);

  std::vector<std::byte> Serialize() const;
  Status WriteFile(const std::string& path) const;

 private:
  struct Entry {
    std::string key;
    std::vector<std::byte> encoded;  // u32 type + value
  };
  struct Tensor {
    std::string name;
    TensorType type;
    std::vector<int64_t> dims;
    std::vector<std::byte> data;
  };
  std::vector<std::byte> SerializeHeader() const;  // up to the data section

  std::vector<Entry> kvs_;
  std::vector<Tensor> tensors_;
  uint64_t alignment_ = 32;
};

}  // namespace cachette::gguf
