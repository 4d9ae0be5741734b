// Helpers shared by the cache layer's tests: synthetic chunks, raw chunk bytes and temp
// directories.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

#include "cache/chunk.h"
#include "cache/record.h"
#include "core/fp16.h"

namespace cachette::cache::testing {

// A small layout: 2 layers, 1 head, head_dim 4, f16, n_tokens tokens.
inline ChunkLayout SmallLayout(uint32_t n_tokens) {
  ChunkLayout l;
  l.n_layer = 2;
  l.n_kv_head = 1;
  l.head_dim = 4;
  l.n_tokens = n_tokens;
  l.kv_type = 1;
  return l;
}

inline std::vector<TokenId> Tokens(size_t n, uint32_t seed) {
  std::vector<TokenId> t(n);
  uint64_t x = seed * 2654435761u + 1;
  for (auto& v : t) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    v = static_cast<TokenId>((x >> 33) % 50000);
  }
  return t;
}

inline std::vector<std::byte> Bytes(size_t n, uint32_t seed) {
  std::vector<std::byte> b(n);
  uint64_t x = seed + 7;
  for (auto& v : b) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    v = static_cast<std::byte>(x >> 56);
  }
  return b;
}

// A valid raw record of chunk 0 of `tokens` (which must be one chunk long).
inline std::vector<std::byte> MakeRecord(const Hash128& ns, const std::vector<TokenId>& tokens,
                                         uint32_t seed, ChunkKey* key_out = nullptr) {
  RecordMeta m;
  m.ns = ns;
  m.layout = SmallLayout(static_cast<uint32_t>(tokens.size()));
  m.raw_bytes = m.layout.raw_bytes();
  m.key = ChainKey(m.parent, ns, tokens);
  if (key_out != nullptr) *key_out = m.key;
  auto r = EncodeRecord(m, tokens, Bytes(m.raw_bytes, seed));
  return std::move(r).value();
}

// A fresh directory under the system temp dir, removed (recursively) at scope exit.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "cachette-test-XXXXXX").string();
    path_ = ::mkdtemp(tmpl.data());
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// A chunk's raw bytes from floats (f32 when kv_type is 0, else f16) and back: the codec tests
// build and read chunks through these.
inline std::vector<std::byte> ToRaw(const ChunkLayout& l, const std::vector<float>& v) {
  std::vector<std::byte> raw(l.raw_bytes());
  for (size_t i = 0; i < v.size(); ++i) {
    if (l.kv_type == 0) {
      std::memcpy(raw.data() + 4 * i, &v[i], 4);
    } else {
      const uint16_t h = Fp32ToFp16(v[i]);
      std::memcpy(raw.data() + 2 * i, &h, 2);
    }
  }
  return raw;
}

inline std::vector<float> FromRaw(const ChunkLayout& l, std::span<const std::byte> raw) {
  const size_t n = raw.size() / (l.kv_type == 0 ? 4 : 2);
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) {
    if (l.kv_type == 0) {
      std::memcpy(&v[i], raw.data() + 4 * i, 4);
    } else {
      uint16_t h;
      std::memcpy(&h, raw.data() + 2 * i, 2);
      v[i] = Fp16ToFp32(h);
    }
  }
  return v;
}

}  // namespace cachette::cache::testing
