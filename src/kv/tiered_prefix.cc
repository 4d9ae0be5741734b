#include "kv/tiered_prefix.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "core/log.h"

namespace cachette {

Hash128 CacheNamespace(const Model& model, kernels::KvType kv_type, std::string_view salt) {
  const ModelConfig& c = model.config();
  cache::NamespaceSpec s;
  s.model_fingerprint = model.Fingerprint();
  s.arch = c.arch_name;
  s.n_layer = static_cast<uint32_t>(c.n_layer);
  s.n_kv_head = static_cast<uint32_t>(c.n_kv_head);
  s.head_dim = static_cast<uint32_t>(c.head_dim);
  s.kv_type = std::string(kernels::KvTypeName(kv_type));
  s.rope = std::string(c.rope.style == kernels::RopeStyle::kNeox ? "neox" : "normal") +
           " theta=" + std::to_string(c.rope.theta_base) +
           " scale=" + std::to_string(c.rope.freq_scale);
  s.tenant_salt = std::string(salt);
  return cache::NamespaceId(s);
}

Status TieredPrefix::Validate(const Cache& cache, const KvManager& kv) {
  if (cache.chunk_tokens() <= 0 || cache.chunk_tokens() % kv.page_tokens() != 0) {
    return InvalidArgument("chunk size " + std::to_string(cache.chunk_tokens()) +
                           " tokens must be a multiple of the page size " +
                           std::to_string(kv.page_tokens()));
  }
  return Status::Ok();
}

TieredPrefix::TieredPrefix(Cache& cache, KvManager& kv)
    : cache_(cache), kv_(kv), chunk_tokens_(cache.chunk_tokens()) {}

ChunkLayout TieredPrefix::Layout() const {
  const KvShape& s = kv_.shape();
  ChunkLayout l;
  l.n_layer = static_cast<uint32_t>(s.n_layer);
  l.n_kv_head = static_cast<uint32_t>(s.n_kv_head);
  l.head_dim = static_cast<uint32_t>(s.head_dim);
  l.n_tokens = static_cast<uint32_t>(chunk_tokens_);
  l.kv_type = static_cast<uint32_t>(s.type);
  return l;
}

namespace {

// Copies positions [from, to) of one chunk (starting at position `chunk_start`) between the
// chunk's layer-major bytes and the sequence's pages. to_pages selects the direction.
void CopyChunk(PagedSequence& seq, const KvShape& shape, int page_tokens, int chunk_tokens,
               int64_t chunk_start, int64_t from, int64_t to, std::byte* chunk, bool to_pages) {
  const size_t tb = shape.token_bytes();
  for (int l = 0; l < shape.n_layer; ++l) {
    for (int kv = 0; kv < 2; ++kv) {
      std::byte* block = chunk + (static_cast<size_t>(2 * l + kv) * chunk_tokens) * tb;
      for (int64_t p = from; p < to;) {
        // A run of positions inside one page is contiguous on both sides.
        const int64_t run = std::min<int64_t>(to - p, page_tokens - p % page_tokens);
        auto* slot = static_cast<std::byte*>(kv == 0 ? seq.KSlot(l, p) : seq.VSlot(l, p));
        std::byte* c = block + static_cast<size_t>(p - chunk_start) * tb;
        if (to_pages) {
          std::memcpy(slot, c, run * tb);
        } else {
          std::memcpy(c, slot, run * tb);
        }
        p += run;
      }
    }
  }
}

}  // namespace

TieredPrefix::Restored TieredPrefix::Restore(PagedSequence& seq, std::span<const TokenId> prompt,
                                             const Hash128& store_ns,
                                             std::chrono::steady_clock::time_point deadline) {
  Restored r;
  const int64_t C = chunk_tokens_;
  const int64_t have = seq.n_tokens();
  LookupResult hit = cache_.Lookup(prompt, store_ns);
  r.tier_tokens = static_cast<int64_t>(hit.tokens);
  if (r.tier_tokens <= have) return r;
  const size_t first = static_cast<size_t>(have / C);
  const size_t n_chunks = static_cast<size_t>(r.tier_tokens / C) - first;
  std::unique_ptr<LoadHandle> load = cache_.Get(store_ns, prompt, first, n_chunks, deadline);
  load->Wait();
  const int64_t end = std::min<int64_t>(static_cast<int64_t>(first) * C +
                                            static_cast<int64_t>(load->ready_tokens()),
                                        seq.capacity());
  if (end <= have) return r;
  Status s = seq.Reserve(end);
  if (!s.ok()) {
    CT_LOG(kWarning) << "tier restore skipped: " << s.ToString();
    return r;
  }
  const ChunkLayout layout = Layout();
  for (size_t i = 0; i < n_chunks; ++i) {
    const int64_t start = static_cast<int64_t>(first + i) * C;
    if (start >= end) break;
    const ChunkData& d = load->chunk(i);
    if (!d.status.ok() || !(d.layout == layout)) break;  // ready_tokens stops here too
    const int64_t from = std::max(start, have), to = std::min(start + C, end);
    CopyChunk(seq, kv_.shape(), kv_.page_tokens(), static_cast<int>(C), start, from, to,
              const_cast<std::byte*>(d.bytes().data()), /*to_pages=*/true);
    if (d.tier != CacheTier::kNone) r.tokens_by_tier[static_cast<int>(d.tier)] += to - from;
    r.tokens += to - from;
  }
  seq.SetTokens(have + r.tokens);
  return r;
}

size_t TieredPrefix::Save(PagedSequence& seq, std::span<const TokenId> tokens,
                          const Hash128& store_ns, int64_t skip_tokens) {
  const int64_t C = chunk_tokens_;
  const int64_t n = std::min<int64_t>(static_cast<int64_t>(tokens.size()), seq.n_tokens());
  const size_t first = static_cast<size_t>(std::max<int64_t>(0, skip_tokens) / C);
  const size_t last = static_cast<size_t>(n / C);
  if (last <= first) return 0;
  const ChunkLayout layout = Layout();
  std::vector<std::vector<std::byte>> bufs(last - first,
                                           std::vector<std::byte>(layout.raw_bytes()));
  std::vector<ByteSpan> spans;
  for (size_t i = first; i < last; ++i) {
    const int64_t start = static_cast<int64_t>(i) * C;
    CopyChunk(seq, kv_.shape(), kv_.page_tokens(), static_cast<int>(C), start, start, start + C,
              bufs[i - first].data(), /*to_pages=*/false);
    spans.emplace_back(bufs[i - first].data(), bufs[i - first].size());
  }
  Status s = cache_.Put(store_ns, tokens.first(last * C), first, layout, spans);
  if (!s.ok()) {
    CT_LOG(kWarning) << "tier save failed: " << s.ToString();
    return 0;
  }
  return last - first;
}

}  // namespace cachette
