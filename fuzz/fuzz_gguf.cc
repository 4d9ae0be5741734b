// Feeds arbitrary bytes to the GGUF reader. On success, touches every metadata value and every
// tensor byte range so that a bad view into the input (a string or tensor past the end) shows
// up under ASan, exercises the lookups and typed getters, and checks that the writer can
// reproduce every file the reader accepts.
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "model/gguf.h"

namespace {

using cachette::gguf::GgufFile;
using cachette::gguf::Value;
using cachette::gguf::ValueType;

uint64_t Touch(const Value& v) {
  uint64_t h = static_cast<uint64_t>(v.type) + v.u64 + static_cast<uint64_t>(v.i64) +
               (v.b ? 1 : 0) + static_cast<uint64_t>(v.array_type);
  if (v.f64 == v.f64) h += static_cast<uint64_t>(v.f64 != 0);  // skip NaN compare noise
  for (char c : v.str) h = h * 31 + static_cast<unsigned char>(c);
  for (const Value& e : v.array) h += Touch(e);
  return h;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto file = GgufFile::FromMemory(std::span(reinterpret_cast<const std::byte*>(data), size));
  if (!file.ok()) return 0;
  const GgufFile& f = **file;
  volatile uint64_t sink = f.version() + f.alignment();
  for (const auto& kv : f.metadata()) {
    sink = sink + Touch(kv.value) + kv.key.size();
    if (f.Find(kv.key) == nullptr) __builtin_trap();
    (void)f.GetInt(kv.key);
    (void)f.GetFloat(kv.key);
    (void)f.GetBool(kv.key);
    (void)f.GetString(kv.key);
    (void)f.GetArray(kv.key, ValueType::kString);
  }
  for (const auto& t : f.tensors()) {
    if (f.FindTensor(t.name) != &t) __builtin_trap();
    if (t.n_bytes == 0 || t.data == nullptr) __builtin_trap();
    // First and last byte of the range: ASan flags either if the range leaves the input.
    sink = sink + static_cast<uint8_t>(t.data[0]) + static_cast<uint8_t>(t.data[t.n_bytes - 1]) +
           static_cast<uint64_t>(t.n_elements());
  }
  (void)sink;

  // Whatever the reader accepts, the writer must reproduce in a form the reader accepts again
  // with the same contents. An explicit `general.alignment` of 32 is the writer's default and
  // is not rewritten.
  cachette::gguf::GgufWriter w;
  for (const auto& kv : f.metadata()) w.AddValue(std::string(kv.key), kv.value);
  for (const auto& t : f.tensors()) {
    if (!w.AddTensor(std::string(t.name), t.type, t.dims, {t.data, t.data + t.n_bytes}).ok()) {
      __builtin_trap();
    }
  }
  std::vector<std::byte> again = w.Serialize();
  auto g = GgufFile::FromMemory(again);
  if (!g.ok()) __builtin_trap();
  size_t dropped = f.alignment() == 32 && f.Find("general.alignment") != nullptr ? 1 : 0;
  if ((*g)->metadata().size() + dropped != f.metadata().size()) __builtin_trap();
  if ((*g)->tensors().size() != f.tensors().size()) __builtin_trap();
  if ((*g)->alignment() != f.alignment()) __builtin_trap();
  return 0;
}
