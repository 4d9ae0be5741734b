// The C API (include/cachette/cachette.h) over cachette::Cache. No exception or C++ type
// crosses it; every handle is a struct wrapping the C++ owner.
#include "cachette/cachette.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>

#include "cachette/cache.h"
#include "core/hash.h"

struct ct_cache {
  std::unique_ptr<cachette::Cache> impl;
};

struct ct_load {
  std::unique_ptr<cachette::LoadHandle> impl;
};

namespace {

using cachette::Status;

ct_status Code(const Status& s) { return static_cast<ct_status>(s.code()); }

cachette::Hash128 Ns(ct_namespace ns) { return cachette::Hash128{ns.lo, ns.hi}; }

cachette::ChunkLayout Layout(const ct_chunk_layout& l) {
  cachette::ChunkLayout out;
  out.n_layer = l.n_layer;
  out.n_kv_head = l.n_kv_head;
  out.head_dim = l.head_dim;
  out.n_tokens = l.n_tokens;
  out.kv_type = l.kv_type;
  return out;
}

// layout.raw_bytes() computed without overflow: 0 for an invalid layout (a zero dimension, an
// unknown kv_type, a q8_0 / q4_0 head_dim not a multiple of 32) or one whose size overflows 64
// bits.
uint64_t CheckedRawBytes(const cachette::ChunkLayout& l) {
  uint64_t n = l.head_bytes();
  for (uint64_t d : {uint64_t{l.n_layer}, uint64_t{2}, uint64_t{l.n_tokens},
                     uint64_t{l.n_kv_head}}) {
    if (n == 0 || __builtin_mul_overflow(n, d, &n)) return 0;
  }
  return n;
}

char* CopyString(const std::string& s) {
  char* p = static_cast<char*>(std::malloc(s.size() + 1));
  if (p != nullptr) std::memcpy(p, s.c_str(), s.size() + 1);
  return p;
}

std::span<const cachette::TokenId> TokenSpan(const int32_t* tokens, size_t n) {
  return tokens == nullptr ? std::span<const cachette::TokenId>()
                           : std::span<const cachette::TokenId>(tokens, n);
}

// A token array argument is valid when it is non-null or empty.
bool ValidTokens(const int32_t* tokens, size_t n) { return tokens != nullptr || n == 0; }

// True if chunks [first_chunk, first_chunk + n_chunks) of `chunk_tokens` tokens each lie
// within `n_tokens` tokens, with every product and sum checked for overflow.
bool ChunksWithin(size_t first_chunk, size_t n_chunks, int chunk_tokens, size_t n_tokens) {
  if (chunk_tokens <= 0) return false;
  size_t end_chunk = 0, end_token = 0;
  if (__builtin_add_overflow(first_chunk, n_chunks, &end_chunk)) return false;
  if (__builtin_mul_overflow(end_chunk, static_cast<size_t>(chunk_tokens), &end_token)) {
    return false;
  }
  return end_token <= n_tokens;
}

// Runs an entry point's body, turning any exception into a status, so none crosses the C
// boundary: std::bad_alloc and std::length_error (a size too large to allocate) are
// CT_RESOURCE_EXHAUSTED, std::out_of_range CT_INVALID_ARGUMENT, anything else CT_UNAVAILABLE.
template <typename Fn>
ct_status Guard(Fn&& body) noexcept {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return CT_RESOURCE_EXHAUSTED;
  } catch (const std::length_error&) {
    return CT_RESOURCE_EXHAUSTED;
  } catch (const std::out_of_range&) {
    return CT_INVALID_ARGUMENT;
  } catch (...) {
    return CT_UNAVAILABLE;
  }
}

}  // namespace

extern "C" {

void ct_cache_options_default(ct_cache_options* o) {
  if (o == nullptr) return;
  const cachette::CacheOptions d;
  std::memset(o, 0, sizeof(*o));
  o->chunk_tokens = d.chunk_tokens;
  o->ram_budget_bytes = d.ram_budget_bytes;
  o->disk_budget_bytes = d.disk_budget_bytes;
  o->disk_sync = d.disk_sync ? 1 : 0;
}

ct_status ct_cache_open(const ct_cache_options* o, ct_cache** out, char** error) {
  if (out == nullptr) return CT_INVALID_ARGUMENT;
  *out = nullptr;
  if (error != nullptr) *error = nullptr;
  if (o == nullptr) return CT_INVALID_ARGUMENT;
  return Guard([&] {
    cachette::CacheOptions opts;
    opts.chunk_tokens = o->chunk_tokens;
    opts.ram_budget_bytes = o->ram_budget_bytes;
    if (o->disk_dir != nullptr) opts.disk_dir = o->disk_dir;
    opts.disk_budget_bytes = o->disk_budget_bytes;
    opts.disk_sync = o->disk_sync != 0;
    if (o->redis_url != nullptr && *o->redis_url != '\0') opts.redis_urls = {o->redis_url};
    if (o->codec != nullptr) opts.codec = o->codec;
    if (o->policy != nullptr) opts.policy = o->policy;
    auto c = cachette::Cache::Open(opts);
    if (!c.ok()) {
      if (error != nullptr) *error = CopyString(c.status().ToString());
      return Code(c.status());
    }
    auto* h = new (std::nothrow) ct_cache{std::move(c).value()};
    if (h == nullptr) return CT_RESOURCE_EXHAUSTED;
    *out = h;
    return CT_OK;
  });
}

void ct_cache_close(ct_cache* cache) { delete cache; }

ct_namespace ct_namespace_of(const void* fingerprint, size_t size) {
  const cachette::Hash128 h = cachette::Hash128Of(
      cachette::ByteSpan(static_cast<const std::byte*>(fingerprint), fingerprint ? size : 0));
  return ct_namespace{h.lo, h.hi};
}

uint64_t ct_layout_raw_bytes(const ct_chunk_layout* layout) {
  return layout == nullptr ? 0 : CheckedRawBytes(Layout(*layout));
}

ct_status ct_cache_put(ct_cache* cache, ct_namespace ns, const int32_t* tokens, size_t n_tokens,
                       size_t first_chunk, const ct_chunk_layout* layout,
                       const void* const* chunks, size_t n_chunks) {
  if (cache == nullptr || layout == nullptr || (chunks == nullptr && n_chunks != 0) ||
      !ValidTokens(tokens, n_tokens)) {
    return CT_INVALID_ARGUMENT;
  }
  const cachette::ChunkLayout l = Layout(*layout);
  const uint64_t raw_bytes = CheckedRawBytes(l);
  const int chunk_tokens = cache->impl->chunk_tokens();
  // Everything checked before anything is allocated: a layout whose size is valid and fits in
  // memory, of the cache's chunk size, and chunks that lie within the tokens given.
  if (raw_bytes == 0 || raw_bytes > SIZE_MAX || l.n_tokens != static_cast<uint32_t>(chunk_tokens) ||
      !ChunksWithin(first_chunk, n_chunks, chunk_tokens, n_tokens)) {
    return CT_INVALID_ARGUMENT;
  }
  for (size_t i = 0; i < n_chunks; ++i) {
    if (chunks[i] == nullptr) return CT_INVALID_ARGUMENT;
  }
  return Guard([&] {
    std::vector<cachette::ByteSpan> spans;
    spans.reserve(n_chunks);
    for (size_t i = 0; i < n_chunks; ++i) {
      spans.emplace_back(static_cast<const std::byte*>(chunks[i]), raw_bytes);
    }
    return Code(cache->impl->Put(Ns(ns), TokenSpan(tokens, n_tokens), first_chunk, l, spans));
  });
}

ct_status ct_cache_lookup(ct_cache* cache, ct_namespace ns, const int32_t* tokens,
                          size_t n_tokens, size_t* cached_tokens, uint8_t* chunk_tiers) {
  if (cache == nullptr || cached_tokens == nullptr || !ValidTokens(tokens, n_tokens)) {
    return CT_INVALID_ARGUMENT;
  }
  *cached_tokens = 0;
  return Guard([&] {
    const cachette::LookupResult r = cache->impl->Lookup(TokenSpan(tokens, n_tokens), Ns(ns));
    const size_t room = n_tokens / static_cast<size_t>(std::max(cache->impl->chunk_tokens(), 1));
    // The caller gave room for n_tokens / chunk_tokens entries; never write past it.
    if (r.chunk_tiers.size() > room) return CT_UNAVAILABLE;
    *cached_tokens = r.tokens;
    if (chunk_tiers != nullptr) {
      for (size_t i = 0; i < r.chunk_tiers.size(); ++i) {
        chunk_tiers[i] = static_cast<uint8_t>(r.chunk_tiers[i]);
      }
    }
    return CT_OK;
  });
}

ct_status ct_cache_get(ct_cache* cache, ct_namespace ns, const int32_t* tokens, size_t n_tokens,
                       size_t first_chunk, size_t n_chunks, int64_t timeout_ms, ct_load** out) {
  if (out == nullptr) return CT_INVALID_ARGUMENT;
  *out = nullptr;
  if (cache == nullptr || timeout_ms < 0 || !ValidTokens(tokens, n_tokens) ||
      !ChunksWithin(first_chunk, n_chunks, cache->impl->chunk_tokens(), n_tokens)) {
    return CT_INVALID_ARGUMENT;
  }
  // Longer than any load can take, and far from overflowing steady_clock's nanoseconds.
  constexpr int64_t kMaxTimeoutMs = int64_t{1000} * 3600 * 24 * 365;
  timeout_ms = std::min(timeout_ms, kMaxTimeoutMs);
  return Guard([&] {
    const auto deadline =
        std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    auto* h = new (std::nothrow) ct_load{cache->impl->Get(
        Ns(ns), TokenSpan(tokens, n_tokens), first_chunk, n_chunks, deadline)};
    if (h == nullptr) return CT_RESOURCE_EXHAUSTED;
    *out = h;
    return CT_OK;
  });
}

void ct_load_wait(ct_load* load) {
  if (load == nullptr) return;
  (void)Guard([&] {
    load->impl->Wait();
    return CT_OK;
  });
}

size_t ct_load_ready_tokens(const ct_load* load) {
  return load == nullptr ? 0 : load->impl->ready_tokens();
}

ct_status ct_load_chunk(const ct_load* load, size_t i, const void** data, size_t* size,
                        int* tier) {
  if (load == nullptr || i >= load->impl->size()) return CT_INVALID_ARGUMENT;
  if (!load->impl->IsReady()) return CT_UNAVAILABLE;
  return Guard([&] {
    const cachette::ChunkData& d = load->impl->chunk(i);
    if (data != nullptr) *data = d.status.ok() ? d.bytes().data() : nullptr;
    if (size != nullptr) *size = d.status.ok() ? d.bytes().size() : 0;
    if (tier != nullptr) *tier = static_cast<int>(d.tier);
    return Code(d.status);
  });
}

void ct_load_free(ct_load* load) { delete load; }

ct_status ct_cache_pin(ct_cache* cache, ct_namespace ns, const int32_t* tokens, size_t n_tokens,
                       int64_t ttl_ms, uint64_t* pin) {
  if (cache == nullptr || pin == nullptr || ttl_ms < 0 || !ValidTokens(tokens, n_tokens)) {
    return CT_INVALID_ARGUMENT;
  }
  return Guard([&] {
    auto r = cache->impl->Pin(TokenSpan(tokens, n_tokens), Ns(ns),
                              std::chrono::milliseconds(ttl_ms));
    if (!r.ok()) return Code(r.status());
    *pin = *r;
    return CT_OK;
  });
}

ct_status ct_cache_unpin(ct_cache* cache, uint64_t pin) {
  if (cache == nullptr) return CT_INVALID_ARGUMENT;
  return Guard([&] { return Code(cache->impl->Unpin(pin)); });
}

ct_status ct_cache_erase(ct_cache* cache, ct_namespace ns, const int32_t* tokens,
                         size_t n_tokens) {
  if (cache == nullptr || !ValidTokens(tokens, n_tokens)) return CT_INVALID_ARGUMENT;
  return Guard([&] { return Code(cache->impl->Erase(TokenSpan(tokens, n_tokens), Ns(ns))); });
}

ct_status ct_cache_clear(ct_cache* cache, ct_namespace ns) {
  if (cache == nullptr) return CT_INVALID_ARGUMENT;
  return Guard([&] { return Code(cache->impl->Clear(Ns(ns))); });
}

ct_status ct_cache_flush(ct_cache* cache) {
  if (cache == nullptr) return CT_INVALID_ARGUMENT;
  return Guard([&] { return Code(cache->impl->Flush()); });
}

char* ct_cache_metrics_text(ct_cache* cache) {
  if (cache == nullptr) return nullptr;
  char* text = nullptr;
  (void)Guard([&] {
    text = CopyString(cachette::PrometheusText(cache->impl->Stats()));
    return CT_OK;
  });
  return text;
}

void ct_free(void* p) { std::free(p); }

const char* ct_status_name(ct_status status) {
  static const char* const kNames[] = {"OK",          "NotFound",    "InvalidArgument",
                                       "ResourceExhausted", "IOError", "Corruption",
                                       "Unavailable", "DeadlineExceeded", "Cancelled",
                                       "Unimplemented"};
  const int i = static_cast<int>(status);
  return i >= 0 && i < 10 ? kNames[i] : "Unknown";
}

}  // extern "C"
