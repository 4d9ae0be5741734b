// The C++ API of an installed libcachette (cachette/cache.h): open a RAM + disk cache, put the
// chunks of a prompt, look them up and get them back byte for byte.
// Usage: cpp_roundtrip DIR (a new or empty directory). Exits 0 on success.
#include <cachette/cache.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  cachette::CacheOptions options;
  options.chunk_tokens = 4;
  options.ram_budget_bytes = 1 << 20;
  options.disk_dir = argv[1];
  auto cache = cachette::Cache::Open(options);
  if (!cache.ok()) {
    std::fprintf(stderr, "cpp_roundtrip: %s\n", cache.status().ToString().c_str());
    return 1;
  }
  cachette::cache::NamespaceSpec spec;
  spec.arch = "llama";
  spec.n_layer = 1;
  spec.n_kv_head = 1;
  spec.head_dim = 32;
  spec.kv_type = "f32";
  const cachette::Hash128 ns = cachette::cache::NamespaceId(spec);
  const cachette::ChunkLayout layout{.n_layer = 1, .n_kv_head = 1, .head_dim = 32, .n_tokens = 4,
                                     .kv_type = 0};
  const std::vector<cachette::TokenId> tokens = {5, 6, 7, 8, 9, 10, 11, 12, 13};
  std::vector<std::vector<std::byte>> kv(2, std::vector<std::byte>(layout.raw_bytes()));
  for (size_t c = 0; c < kv.size(); ++c) {
    for (size_t i = 0; i < kv[c].size(); ++i) {
      kv[c][i] = std::byte(static_cast<unsigned char>(c * 101 + i));
    }
  }
  const std::vector<cachette::ByteSpan> chunks = {kv[0], kv[1]};
  if (auto s = (*cache)->Put(ns, tokens, 0, layout, chunks); !s.ok()) {
    std::fprintf(stderr, "cpp_roundtrip: put: %s\n", s.ToString().c_str());
    return 1;
  }
  const cachette::LookupResult hit = (*cache)->Lookup(tokens, ns);
  if (hit.tokens != 8) {
    std::fprintf(stderr, "cpp_roundtrip: %zu tokens cached, expected 8\n", hit.tokens);
    return 1;
  }
  auto load = (*cache)->Get(ns, tokens, 0, 2,
                            std::chrono::steady_clock::now() + std::chrono::seconds(1));
  load->Wait();
  for (size_t c = 0; c < 2; ++c) {
    const cachette::ChunkData& d = load->chunk(c);
    if (!d.status.ok() || d.bytes().size() != kv[c].size() ||
        std::memcmp(d.bytes().data(), kv[c].data(), kv[c].size()) != 0) {
      std::fprintf(stderr, "cpp_roundtrip: chunk %zu: %s\n", c, d.status.ToString().c_str());
      return 1;
    }
  }
  std::printf("cpp_roundtrip: OK: %zu tokens, tier %s\n", load->ready_tokens(),
              std::string(cachette::CacheTierName(load->chunk(0).tier)).c_str());
  return 0;
}
