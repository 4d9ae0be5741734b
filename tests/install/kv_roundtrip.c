/* kv_roundtrip: what an inference engine does with libcachette's C API, step by step (the
 * example of docs/c-api.md). A restarted engine gets back, byte for byte, the KV chunks that
 * the previous run stored on disk:
 *   1. open a cache with a RAM tier and a disk tier in DIR; a bad option is an error value;
 *   2. name the namespace of the KV (the model and everything that changes its bytes);
 *   3. before prefill: look up how many leading tokens are cached (none yet);
 *   4. after prefill: put the chunks of KV it computed, then close (waits for the disk writes);
 *   5. reopen, as a new process would: look up again (now found on disk), get the chunks with a
 *      deadline, and check every byte; a chunk that is missing or late is recomputed instead.
 * Build: cc kv_roundtrip.c $(pkg-config --cflags --libs cachette) -o kv_roundtrip
 * Usage: kv_roundtrip DIR   (DIR: a new or empty directory it may fill). Exits 0 on success. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cachette/cachette.h>

/* The KV shape of a small model: 2 layers, 2 KV heads of 64 dims, f16; 16 tokens a chunk. */
enum { kLayers = 2, kKvHeads = 2, kHeadDim = 64, kChunkTokens = 16 };
/* A 40-token prompt: two full chunks are cached, the last 8 tokens are not (a partial chunk). */
enum { kPromptTokens = 40, kFullChunks = kPromptTokens / kChunkTokens };

static int Fail(const char* what, ct_status status) {
  fprintf(stderr, "kv_roundtrip: %s: %s\n", what, ct_status_name(status));
  return 1;
}

/* Stands in for prefill: the KV bytes of chunk `chunk`, a pattern of its tokens. */
static void FakePrefill(const int32_t* tokens, size_t chunk, unsigned char* kv, size_t size) {
  size_t i;
  for (i = 0; i < size; ++i) {
    kv[i] = (unsigned char)(tokens[chunk * kChunkTokens + i % kChunkTokens] * 31 + i / 7);
  }
}

static ct_status OpenCache(const char* dir, const char* policy, ct_cache** cache) {
  ct_cache_options options;
  char* error = NULL;
  ct_status status;
  ct_cache_options_default(&options);
  options.chunk_tokens = kChunkTokens;
  options.ram_budget_bytes = 64u << 20;
  options.disk_dir = dir;
  options.disk_budget_bytes = 256u << 20;
  options.policy = policy;
  status = ct_cache_open(&options, cache, &error);
  if (status != CT_OK) {
    fprintf(stderr, "kv_roundtrip: open: %s\n", error != NULL ? error : ct_status_name(status));
    ct_free(error); /* who frees what, 4.: messages are the caller's to free */
  }
  return status;
}

int main(int argc, char** argv) {
  const char* fingerprint = "model=demo-2l;kv=f16;layers=2;kv_heads=2;head_dim=64;rope=10000";
  const ct_chunk_layout layout = {kLayers, kKvHeads, kHeadDim, kChunkTokens, 1 /* f16 */};
  int32_t tokens[kPromptTokens];
  unsigned char* kv[kFullChunks];
  const void* chunks[kFullChunks];
  uint8_t tiers[kFullChunks];
  ct_cache* cache = NULL;
  ct_load* load = NULL;
  ct_namespace ns;
  ct_status status;
  size_t raw_bytes, cached = 0, i;

  if (argc != 2) {
    fprintf(stderr, "usage: kv_roundtrip DIR\n");
    return 2;
  }
  for (i = 0; i < kPromptTokens; ++i) tokens[i] = (int32_t)(1000 + i * 7 % 50);
  raw_bytes = (size_t)ct_layout_raw_bytes(&layout); /* [2][2][16][2][64] f16 = 16 KiB */
  if (raw_bytes == 0) return Fail("layout", CT_INVALID_ARGUMENT);

  /* 1. Open. A bad option is an error code and a message, never an abort. */
  if (OpenCache(argv[1], "no-such-policy", &cache) != CT_INVALID_ARGUMENT || cache != NULL) {
    fprintf(stderr, "kv_roundtrip: an unknown policy was not refused\n");
    return 1;
  }
  if (OpenCache(argv[1], NULL, &cache) != CT_OK) return 1;

  /* 2. The namespace: chunks of different models (or KV types, RoPE, ...) never mix. */
  ns = ct_namespace_of(fingerprint, strlen(fingerprint));

  /* 3. Before prefill: nothing cached yet. */
  status = ct_cache_lookup(cache, ns, tokens, kPromptTokens, &cached, NULL);
  if (status != CT_OK) return Fail("lookup", status);
  if (cached != 0) {
    fprintf(stderr, "kv_roundtrip: %s already holds this prompt; give a new directory\n",
            argv[1]);
    return 1;
  }

  /* 4. After prefill: store the full chunks (the library copies them before returning). */
  for (i = 0; i < kFullChunks; ++i) {
    kv[i] = malloc(raw_bytes);
    if (kv[i] == NULL) return Fail("malloc", CT_RESOURCE_EXHAUSTED);
    FakePrefill(tokens, i, kv[i], raw_bytes);
    chunks[i] = kv[i];
  }
  status = ct_cache_put(cache, ns, tokens, kPromptTokens, 0, &layout, chunks, kFullChunks);
  if (status != CT_OK) return Fail("put", status);
  /* A wrong call is refused with a status too: here, a chunk past the prompt's end. */
  status = ct_cache_put(cache, ns, tokens, kPromptTokens, kFullChunks, &layout, chunks, 1);
  if (status != CT_INVALID_ARGUMENT) return Fail("put past the end", status);
  ct_cache_close(cache); /* waits for the write-behind to reach the disk */

  /* 5. A new run: reopen, look up, get with a deadline, compare. */
  cache = NULL;
  if (OpenCache(argv[1], NULL, &cache) != CT_OK) return 1;
  status = ct_cache_lookup(cache, ns, tokens, kPromptTokens, &cached, tiers);
  if (status != CT_OK) return Fail("lookup after reopen", status);
  if (cached != kFullChunks * kChunkTokens || tiers[0] != CT_TIER_DISK) {
    fprintf(stderr, "kv_roundtrip: after reopen %zu tokens cached (tier %d), expected %d\n",
            cached, tiers[0], kFullChunks * kChunkTokens);
    return 1;
  }
  status = ct_cache_get(cache, ns, tokens, kPromptTokens, 0, cached / kChunkTokens,
                        500 /* ms */, &load);
  if (status != CT_OK) return Fail("get", status);
  ct_load_wait(load);
  for (i = 0; i < cached / kChunkTokens; ++i) {
    const void* data = NULL;
    size_t size = 0;
    int tier = CT_TIER_NONE;
    status = ct_load_chunk(load, i, &data, &size, &tier);
    if (status != CT_OK) {
      /* CT_NOT_FOUND or CT_DEADLINE_EXCEEDED: prefill from this chunk on instead. */
      fprintf(stderr, "kv_roundtrip: chunk %zu: %s\n", i, ct_status_name(status));
      return 1;
    }
    if (size != raw_bytes || memcmp(data, kv[i], raw_bytes) != 0) {
      fprintf(stderr, "kv_roundtrip: chunk %zu differs from what was put\n", i);
      return 1;
    }
  }
  printf("kv_roundtrip: OK: %zu of %d tokens restored from disk, %zu bytes a chunk\n",
         ct_load_ready_tokens(load), kPromptTokens, raw_bytes);
  ct_load_free(load); /* before the cache it came from */
  ct_cache_close(cache);
  for (i = 0; i < kFullChunks; ++i) free(kv[i]);
  return 0;
}
