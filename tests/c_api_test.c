/* The cache's C API from C: open (RAM + disk), put, lookup, get, reopen from disk, close; and
 * every entry point refusing bad arguments (null pointers with nonzero lengths, chunk counts
 * that overflow, layouts that do not match) with CT_INVALID_ARGUMENT instead of crashing or
 * allocating what the arguments claim.
 * Usage: c_api_test DIR (a directory it may create and fill). Exits 0 on success. */
#include <stdint.h>
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

/* Each case is one bad argument on an otherwise valid call; `cache` holds the chunks of
 * `tokens` (kChunk * kChunks + 3 of them) put by Run. */
static int BadArguments(ct_cache* cache, ct_namespace ns, const int32_t* tokens,
                        const ct_chunk_layout* layout, const void* const* chunks) {
  const size_t n_tokens = kChunk * kChunks;
  const void* null_chunks[2] = {NULL, NULL};
  ct_chunk_layout l;
  ct_load* load = (ct_load*)&l; /* must be reset to NULL on failure */
  size_t cached = 99;
  uint64_t pin = 0;

  /* put */
  CHECK(ct_cache_put(NULL, ns, tokens, n_tokens, 0, layout, chunks, 1) == CT_INVALID_ARGUMENT);
  CHECK(ct_cache_put(cache, ns, NULL, n_tokens, 0, layout, chunks, 1) == CT_INVALID_ARGUMENT);
  CHECK(ct_cache_put(cache, ns, tokens, n_tokens, 0, NULL, chunks, 1) == CT_INVALID_ARGUMENT);
  CHECK(ct_cache_put(cache, ns, tokens, n_tokens, 0, layout, NULL, 1) == CT_INVALID_ARGUMENT);
  CHECK(ct_cache_put(cache, ns, tokens, n_tokens, 0, layout, null_chunks, 2) ==
        CT_INVALID_ARGUMENT);
  /* Regression: n_chunks = SIZE_MAX reserved SIZE_MAX spans (std::length_error through C). */
  CHECK(ct_cache_put(cache, ns, tokens, n_tokens, 0, layout, chunks, SIZE_MAX) ==
        CT_INVALID_ARGUMENT);
  CHECK(ct_cache_put(cache, ns, tokens, n_tokens, SIZE_MAX, layout, chunks, 2) ==
        CT_INVALID_ARGUMENT); /* first_chunk + n_chunks overflows */
  CHECK(ct_cache_put(cache, ns, tokens, n_tokens, SIZE_MAX / kChunk, layout, chunks, 1) ==
        CT_INVALID_ARGUMENT); /* (first_chunk + n_chunks) * chunk_tokens overflows */
  CHECK(ct_cache_put(cache, ns, tokens, n_tokens, kChunks, layout, chunks, 1) ==
        CT_INVALID_ARGUMENT); /* past the tokens given */
  l = *layout;
  l.n_tokens = kChunk + 1; /* not the cache's chunk size */
  CHECK(ct_cache_put(cache, ns, tokens, n_tokens, 0, &l, chunks, 1) == CT_INVALID_ARGUMENT);
  l = *layout;
  l.kv_type = 7;
  CHECK(ct_layout_raw_bytes(&l) == 0);
  CHECK(ct_cache_put(cache, ns, tokens, n_tokens, 0, &l, chunks, 1) == CT_INVALID_ARGUMENT);
  l = *layout;
  l.kv_type = 2; /* q8_0 needs head_dim % 32 == 0 */
  CHECK(ct_layout_raw_bytes(&l) == 0);
  CHECK(ct_cache_put(cache, ns, tokens, n_tokens, 0, &l, chunks, 1) == CT_INVALID_ARGUMENT);
  l = *layout;
  l.n_layer = l.n_kv_head = l.head_dim = 0xFFFFFFFFu; /* the size overflows 64 bits */
  CHECK(ct_layout_raw_bytes(&l) == 0);
  CHECK(ct_cache_put(cache, ns, tokens, n_tokens, 0, &l, chunks, 1) == CT_INVALID_ARGUMENT);
  l = *layout;
  l.n_layer = 0;
  CHECK(ct_cache_put(cache, ns, tokens, n_tokens, 0, &l, chunks, 1) == CT_INVALID_ARGUMENT);
  CHECK(ct_layout_raw_bytes(NULL) == 0);

  /* lookup */
  CHECK(ct_cache_lookup(NULL, ns, tokens, n_tokens, &cached, NULL) == CT_INVALID_ARGUMENT);
  CHECK(ct_cache_lookup(cache, ns, NULL, n_tokens, &cached, NULL) == CT_INVALID_ARGUMENT);
  CHECK(ct_cache_lookup(cache, ns, tokens, n_tokens, NULL, NULL) == CT_INVALID_ARGUMENT);
  CHECK(ct_cache_lookup(cache, ns, NULL, 0, &cached, NULL) == CT_OK && cached == 0);

  /* get: *out is NULL after every failure */
  CHECK(ct_cache_get(cache, ns, tokens, n_tokens, 0, 1, 1000, NULL) == CT_INVALID_ARGUMENT);
  CHECK(ct_cache_get(NULL, ns, tokens, n_tokens, 0, 1, 1000, &load) == CT_INVALID_ARGUMENT);
  CHECK(load == NULL);
  load = (ct_load*)&l;
  CHECK(ct_cache_get(cache, ns, NULL, n_tokens, 0, 1, 1000, &load) == CT_INVALID_ARGUMENT);
  CHECK(load == NULL);
  CHECK(ct_cache_get(cache, ns, tokens, n_tokens, 0, SIZE_MAX, 1000, &load) ==
        CT_INVALID_ARGUMENT);
  CHECK(ct_cache_get(cache, ns, tokens, n_tokens, SIZE_MAX, 2, 1000, &load) ==
        CT_INVALID_ARGUMENT);
  CHECK(ct_cache_get(cache, ns, tokens, n_tokens, 0, kChunks + 1, 1000, &load) ==
        CT_INVALID_ARGUMENT);
  CHECK(ct_cache_get(cache, ns, tokens, n_tokens, 0, 1, -1, &load) == CT_INVALID_ARGUMENT);
  CHECK(load == NULL);
  /* Regression: now + INT64_MAX ms overflowed steady_clock (undefined behaviour). */
  CHECK(ct_cache_get(cache, ns, tokens, n_tokens, 0, 1, INT64_MAX, &load) == CT_OK);
  CHECK(load != NULL);
  ct_load_wait(load);
  CHECK(ct_load_chunk(load, 0, NULL, NULL, NULL) == CT_OK);
  ct_load_free(load);
  ct_load_wait(NULL);
  CHECK(ct_load_ready_tokens(NULL) == 0);
  CHECK(ct_load_chunk(NULL, 0, NULL, NULL, NULL) == CT_INVALID_ARGUMENT);

  /* pin, unpin, erase, clear, flush, metrics */
  CHECK(ct_cache_pin(cache, ns, tokens, n_tokens, -5, &pin) == CT_INVALID_ARGUMENT);
  CHECK(ct_cache_pin(cache, ns, NULL, n_tokens, 0, &pin) == CT_INVALID_ARGUMENT);
  CHECK(ct_cache_pin(cache, ns, tokens, n_tokens, 0, NULL) == CT_INVALID_ARGUMENT);
  CHECK(ct_cache_pin(NULL, ns, tokens, n_tokens, 0, &pin) == CT_INVALID_ARGUMENT);
  CHECK(ct_cache_unpin(NULL, 1) == CT_INVALID_ARGUMENT);
  CHECK(ct_cache_erase(cache, ns, NULL, n_tokens) == CT_INVALID_ARGUMENT);
  CHECK(ct_cache_erase(NULL, ns, tokens, n_tokens) == CT_INVALID_ARGUMENT);
  CHECK(ct_cache_clear(NULL, ns) == CT_INVALID_ARGUMENT);
  CHECK(ct_cache_flush(NULL) == CT_INVALID_ARGUMENT);
  CHECK(ct_cache_metrics_text(NULL) == NULL);
  CHECK(ct_cache_open(NULL, NULL, NULL) == CT_INVALID_ARGUMENT);
  CHECK(strcmp(ct_status_name((ct_status)77), "Unknown") == 0);
  ct_cache_close(NULL);
  ct_load_free(NULL);
  return 0;
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
  CHECK(BadArguments(cache, ns, tokens, &layout, chunks) == 0);
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
