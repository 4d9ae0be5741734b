/* cachette.h: the C API of cachette's KV cache layer (a thin layer over cachette/cache.h).
 *
 * A cache stores chunks of KV bytes (chunk_tokens tokens each, layer-major:
 * [n_layer][2][n_tokens][n_kv_head][head_dim]) under keys that chain the token ids, in RAM, on
 * local disk and in Redis. See include/cachette/cache.h for the semantics of each call.
 *
 * Who frees what:
 *   1. ct_cache_open() creates a ct_cache; the caller frees it with ct_cache_close(), which
 *      waits for write-behind first. Close it once, after every other call on it returned.
 *   2. ct_cache_get() creates a ct_load; the caller frees it with ct_load_free() (allowed before
 *      it is ready). A ct_load must be freed before its ct_cache is closed.
 *   3. Pointers returned by ct_load_chunk() are borrowed from the ct_load: valid until
 *      ct_load_free().
 *   4. Strings returned through `char**` or as `char*` (error messages, metrics text) are
 *      allocated by the library; the caller frees them with ct_free().
 *   5. Everything the caller passes in (options, tokens, chunk bytes) stays the caller's; the
 *      library copies what it keeps before the call returns.
 *
 * Thread-safety: calls on one ct_cache may be made from several threads at once; a ct_load is
 * used by one thread at a time. Errors are returned as ct_status codes, never by aborting.
 *
 * Arguments are checked before anything is allocated: a NULL handle or out-pointer, a NULL
 * array with a nonzero length, a layout that is invalid or not of the cache's chunk size, and
 * chunk ranges whose end (first_chunk + n_chunks, times chunk_tokens) overflows or lies past
 * n_tokens all give CT_INVALID_ARGUMENT. No C++ exception crosses this API: one raised inside
 * a call becomes CT_RESOURCE_EXHAUSTED (out of memory) or another error code.
 */
#ifndef CACHETTE_CACHETTE_H_
#define CACHETTE_CACHETTE_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ct_cache ct_cache;
typedef struct ct_load ct_load;

typedef enum ct_status {
  CT_OK = 0,
  CT_NOT_FOUND = 1, /* a miss; not a failure */
  CT_INVALID_ARGUMENT = 2,
  CT_RESOURCE_EXHAUSTED = 3,
  CT_IO_ERROR = 4,
  CT_CORRUPTION = 5,
  CT_UNAVAILABLE = 6,
  CT_DEADLINE_EXCEEDED = 7,
  CT_CANCELLED = 8,
  CT_UNIMPLEMENTED = 9
} ct_status;

/* Tiers, as reported per chunk. */
enum { CT_TIER_RAM = 0, CT_TIER_DISK = 1, CT_TIER_REDIS = 2, CT_TIER_NONE = 255 };

/* A namespace id: everything that changes the KV bytes (model, dims, KV type, RoPE, adapter,
 * tenant salt), hashed. Make one with ct_namespace_of(). */
typedef struct ct_namespace {
  uint64_t lo, hi;
} ct_namespace;

typedef struct ct_chunk_layout {
  uint32_t n_layer, n_kv_head, head_dim, n_tokens;
  uint32_t kv_type; /* 0 f32, 1 f16, 2 q8_0, 3 q4_0, 4 kivi4, 5 q4_1 */
} ct_chunk_layout;

typedef struct ct_cache_options {
  int32_t chunk_tokens;       /* default 256 */
  uint64_t ram_budget_bytes;  /* default 1 GiB; 0 = no RAM tier */
  const char* disk_dir;       /* NULL or "" = no disk tier */
  uint64_t disk_budget_bytes; /* default 10 GiB */
  int32_t disk_sync;          /* default 1: fdatasync every record */
  const char* redis_url;      /* NULL = no Redis tier; "redis://host:port" */
  const char* codec;          /* NULL = "raw" */
  const char* policy;         /* NULL = "lru"; "lfu", "s3fifo", "cost" */
} ct_cache_options;

/* Fills `options` with the defaults above. */
void ct_cache_options_default(ct_cache_options* options);

/* Opens a cache into *out. On failure returns the code, sets *out to NULL and, if `error` is
 * not NULL, *error to a message (free with ct_free). */
ct_status ct_cache_open(const ct_cache_options* options, ct_cache** out, char** error);
/* Waits for write-behind, then frees the cache. NULL is ignored. */
void ct_cache_close(ct_cache* cache);

/* The namespace of a fingerprint (any bytes that identify the KV's producer). */
ct_namespace ct_namespace_of(const void* fingerprint, size_t size);
/* Bytes of one raw chunk of `layout` (0 if the layout is invalid: NULL, a zero dimension, an
 * unknown kv_type, a q8_0 / q4_0 head_dim not a multiple of 32, or a size that overflows 64
 * bits). */
uint64_t ct_layout_raw_bytes(const ct_chunk_layout* layout);

/* Stores chunks [first_chunk, first_chunk + n_chunks) of `tokens`; chunks[i] points to
 * ct_layout_raw_bytes(layout) bytes. Write-behind: returns once the bytes are copied. */
ct_status ct_cache_put(ct_cache* cache, ct_namespace ns, const int32_t* tokens, size_t n_tokens,
                       size_t first_chunk, const ct_chunk_layout* layout,
                       const void* const* chunks, size_t n_chunks);

/* *cached_tokens = how many leading tokens are cached (0 on a miss; CT_OK either way). If
 * `chunk_tiers` is not NULL it receives the tier of each cached chunk (room for
 * n_tokens / chunk_tokens entries). */
ct_status ct_cache_lookup(ct_cache* cache, ct_namespace ns, const int32_t* tokens,
                          size_t n_tokens, size_t* cached_tokens, uint8_t* chunk_tiers);

/* Starts loading chunks [first_chunk, first_chunk + n_chunks) into *out, with a deadline of
 * `timeout_ms` from now (>= 0; values beyond a year are treated as a year). Free *out with
 * ct_load_free. On failure *out is NULL. */
ct_status ct_cache_get(ct_cache* cache, ct_namespace ns, const int32_t* tokens, size_t n_tokens,
                       size_t first_chunk, size_t n_chunks, int64_t timeout_ms, ct_load** out);
/* Waits for the load (or its deadline). */
void ct_load_wait(ct_load* load);
/* Tokens covered by the leading run of loaded chunks (after ct_load_wait). */
size_t ct_load_ready_tokens(const ct_load* load);
/* Chunk i of the load: its status (CT_OK, CT_NOT_FOUND, CT_DEADLINE_EXCEEDED), and on CT_OK
 * its raw bytes (borrowed, see 3. above), size and tier. Any out-pointer may be NULL. */
ct_status ct_load_chunk(const ct_load* load, size_t i, const void** data, size_t* size,
                        int* tier);
void ct_load_free(ct_load* load);

/* Pins the full chunks of `tokens` for ttl_ms (>= 0; 0 = until unpinned) into *pin. */
ct_status ct_cache_pin(ct_cache* cache, ct_namespace ns, const int32_t* tokens, size_t n_tokens,
                       int64_t ttl_ms, uint64_t* pin);
ct_status ct_cache_unpin(ct_cache* cache, uint64_t pin);
ct_status ct_cache_erase(ct_cache* cache, ct_namespace ns, const int32_t* tokens,
                         size_t n_tokens);
ct_status ct_cache_clear(ct_cache* cache, ct_namespace ns);
/* Waits until write-behind queued before the call is done. */
ct_status ct_cache_flush(ct_cache* cache);

/* Metrics in Prometheus text format (free with ct_free). NULL if out of memory. */
char* ct_cache_metrics_text(ct_cache* cache);

void ct_free(void* p);
/* "OK", "NotFound", ... (static storage). */
const char* ct_status_name(ct_status status);

#ifdef __cplusplus
}  /* extern "C" */
#endif

#endif /* CACHETTE_CACHETTE_H_ */
