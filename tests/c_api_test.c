/* The cache's C API from C: open (RAM + disk), put, lookup, get, reopen from disk, close.
 * Usage: c_api_test DIR (a directory it may create and fill). Exits 0 on success. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cachette/cachette.h"

#define CHECK(cond)                                                  \
  do {                                                               \
    if (!(cond)) {                                                   \
      fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
      return 1;                                                      \
    }                                                                \
  } while (0)

enum { kChunk = 16, kChunks = 3 };

static void Fill(unsigned char* p, size_t n, unsigned seed) {
  size_t i;
  for (i = 0; i < n; ++i) p[i] = (unsigned char)(seed * 131u + i * 7u);
}

static int Run(const char* dir) {
  ct_cache_options o;
  ct_cache* cache = NULL;
  char* err = NULL;
  int32_t tokens[kChunk * kChunks + 3];
  ct_chunk_layout layout = {2, 2, 8, kChunk, 1};
  unsigned char* data[kChunks];
  const void* chunks[kChunks];
  size_t raw, i, cached = 0;
  uint8_t tiers[kChunks];
  ct_load* load = NULL;
  const char* fp = "model=test;kv=f16";
  ct_namespace ns = ct_namespace_of(fp, strlen(fp));
  char cmd[1024];

  snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
  CHECK(system(cmd) == 0);
  for (i = 0; i < sizeof(tokens) / sizeof(tokens[0]); ++i) tokens[i] = (int32_t)(i * 37 % 1000);
  raw = (size_t)ct_layout_raw_bytes(&layout);
  CHECK(raw == 2u * 2 * kChunk * 2 * 8 * 2);

  ct_cache_options_default(&o);
  o.chunk_tokens = kChunk;
  o.ram_budget_bytes = 1 << 20;
  o.disk_dir = dir;
  o.disk_sync = 0;
  o.policy = "nonsense";
  CHECK(ct_cache_open(&o, &cache, &err) == CT_INVALID_ARGUMENT);
  CHECK(cache == NULL && err != NULL && strstr(err, "nonsense") != NULL);
  ct_free(err);
  o.policy = NULL;
  CHECK(ct_cache_open(&o, &cache, &err) == CT_OK);

  for (i = 0; i < kChunks; ++i) {
    data[i] = (unsigned char*)malloc(raw);
    CHECK(data[i] != NULL);
    Fill(data[i], raw, (unsigned)i + 1);
    chunks[i] = data[i];
  }
  CHECK(ct_cache_lookup(cache, ns, tokens, kChunk * kChunks + 3, &cached, tiers) == CT_OK);
  CHECK(cached == 0);
  CHECK(ct_cache_put(cache, ns, tokens, kChunk * kChunks + 3, 0, &layout, chunks, kChunks) ==
        CT_OK);
  CHECK(ct_cache_put(cache, ns, tokens, 5, 0, &layout, chunks, 1) == CT_INVALID_ARGUMENT);
  CHECK(ct_cache_lookup(cache, ns, tokens, kChunk * kChunks + 3, &cached, tiers) == CT_OK);
  CHECK(cached == kChunk * kChunks);
  CHECK(tiers[0] == CT_TIER_RAM && tiers[2] == CT_TIER_RAM);

  CHECK(ct_cache_get(cache, ns, tokens, kChunk * kChunks, 0, kChunks, 1000, &load) == CT_OK);
  ct_load_wait(load);
  CHECK(ct_load_ready_tokens(load) == kChunk * kChunks);
  for (i = 0; i < kChunks; ++i) {
    const void* p = NULL;
    size_t n = 0;
    int tier = -1;
    CHECK(ct_load_chunk(load, i, &p, &n, &tier) == CT_OK);
    CHECK(n == raw && memcmp(p, data[i], raw) == 0 && tier == CT_TIER_RAM);
  }
  CHECK(ct_load_chunk(load, kChunks, NULL, NULL, NULL) == CT_INVALID_ARGUMENT);
  ct_load_free(load);
  CHECK(ct_cache_flush(cache) == CT_OK);
  {
    char* text = ct_cache_metrics_text(cache);
    CHECK(text != NULL && strstr(text, "cachette_cache_hit_chunks_total{tier=\"ram\"} 3") != NULL);
    ct_free(text);
  }
  ct_cache_close(cache);

  /* A new process would find the chunks on disk. */
  cache = NULL;
  CHECK(ct_cache_open(&o, &cache, NULL) == CT_OK);
  CHECK(ct_cache_lookup(cache, ns, tokens, kChunk * kChunks, &cached, tiers) == CT_OK);
  CHECK(cached == kChunk * kChunks && tiers[1] == CT_TIER_DISK);
  CHECK(ct_cache_get(cache, ns, tokens, kChunk * kChunks, 1, 1, 1000, &load) == CT_OK);
  ct_load_wait(load);
  {
    const void* p = NULL;
    size_t n = 0;
    int tier = -1;
    CHECK(ct_load_chunk(load, 0, &p, &n, &tier) == CT_OK);
    CHECK(n == raw && memcmp(p, data[1], raw) == 0 && tier == CT_TIER_DISK);
  }
  ct_load_free(load);
  {
    ct_namespace other = ct_namespace_of("other", 5);
    CHECK(ct_cache_lookup(cache, other, tokens, kChunk * kChunks, &cached, NULL) == CT_OK);
    CHECK(cached == 0);
  }
  CHECK(ct_cache_clear(cache, ns) == CT_OK);
  CHECK(ct_cache_lookup(cache, ns, tokens, kChunk * kChunks, &cached, NULL) == CT_OK);
  CHECK(cached == 0);
  ct_cache_close(cache);
  CHECK(strcmp(ct_status_name(CT_CORRUPTION), "Corruption") == 0);
  for (i = 0; i < kChunks; ++i) free(data[i]);
  snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
  CHECK(system(cmd) == 0);
  return 0;
}

int main(int argc, char** argv) {
  int rc = Run(argc > 1 ? argv[1] : "/tmp/cachette_c_api_test");
  printf(rc == 0 ? "c_api_test: OK\n" : "c_api_test: FAILED\n");
  return rc;
}
