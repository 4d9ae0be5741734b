// Helpers shared by the cache layer's tests: synthetic chunks and temp directories.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "cache/chunk.h"
#include "cache/record.h"

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

}  // namespace cachette::cache::testing
