// A radix prefix index over token ids at page granularity (after SGLang's radix cache).
//
// Each node stands for one page of one cached token sequence: up to page_tokens token ids and
// the page that holds their K/V. The path from a namespace's root spells a cached prefix.
// Interior nodes are full pages; a partially filled page can only be a leaf. Children of a node
// are found by the exact token ids of a full page (hashed); a prefix that ends inside a page
// matches the child with the longest common prefix, so hits end on and off page boundaries.
//
// References: the index holds one pool reference on each node's page; Match() adds one more per
// returned page for the caller (a sequence's block table). A page referenced only by the index
// (RefCount == 1) is "cached but unreferenced" and its node, if it is an unpinned leaf, can be
// evicted. Eviction order is a priority function over node statistics (lowest evicted first):
//   kLru   : last access time.           Benefits: recency captures turn-taking chat/agents.
//                                         Costs: one scan of a shared document evicts hot ones.
//   kLfu   : hit count, then recency.     Benefits: keeps shared system prompts.
//                                         Costs: stale once-popular prefixes linger.
// Pins keep a path from eviction until unpinned or until their TTL passes.
//
// Namespaces: every node lives under the root of one namespace (a Hash128 of model fingerprint,
// KV type and tenant salt); lookups and inserts never cross namespaces.
//
// Events: with a sink, every full page that enters the index is reported as a stored block and
// every one that leaves (eviction, Clear) as a removed block, medium "memory", named by the
// chained content key of its prefix (core/kv_events.h); partial pages are not reported.
//
// Thread-safety: not synchronized (KvManager serializes access).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <unordered_map>
#include <vector>

#include "core/hash.h"
#include "core/kv_events.h"
#include "kv/page_pool.h"

namespace cachette {

class RadixIndex {
 public:
  struct NodeStats {
    int64_t last_access_ns = 0;
    uint64_t hits = 0;
    int n_tokens = 0;  // tokens in this node's page
    int depth = 0;     // pages from the root
  };
  // Lower priority is evicted first.
  using Priority = std::function<double(const NodeStats&)>;
  static double Lru(const NodeStats& s) { return static_cast<double>(s.last_access_ns); }
  static double Lfu(const NodeStats& s) {
    return static_cast<double>(s.hits) * 1e12 + static_cast<double>(s.last_access_ns) * 1e-9;
  }

  using ClockFn = std::function<int64_t()>;  // nanoseconds, monotonic

  RadixIndex(PagePool& pool, ClockFn clock, Priority priority = Lru);
  ~RadixIndex();  // releases the index's page references
  RadixIndex(const RadixIndex&) = delete;
  RadixIndex& operator=(const RadixIndex&) = delete;

  // Where inserts and removals of full pages are reported (borrowed; null = nowhere). Set
  // before the first Insert: pages inserted earlier carry no key and are never reported.
  void SetEventSink(KvEventSink* sink) { events_ = sink; }

  struct Match {
    std::vector<PageId> pages;  // one reference each, owned by the caller
    int64_t n_tokens = 0;       // pages[i] holds positions [i*P, (i+1)*P) of the prefix
  };
  // The longest cached prefix of `tokens` in namespace `ns`. Touches the matched nodes.
  Match Lookup(const Hash128& ns, std::span<const TokenId> tokens);

  // Caches a sequence: pages[i] holds the K/V of tokens [i*P, min(n, (i+1)*P)), n =
  // tokens.size(), pages.size() == ceil(n / P). Pages already cached under the same tokens are
  // kept (the new ones are not added); new nodes take a reference on their page.
  void Insert(const Hash128& ns, std::span<const TokenId> tokens, std::span<const PageId> pages);

  // Evicts unpinned, unreferenced leaves in priority order until `n_pages` pages have been
  // returned to the pool or nothing more is evictable. Returns the pages freed.
  size_t Evict(size_t n_pages);

  // Pins the cached part of the prefix `tokens` for ttl_ns (0 = until unpinned). Returns an id
  // for Unpin and the number of tokens pinned (0 if nothing of it is cached).
  uint64_t Pin(const Hash128& ns, std::span<const TokenId> tokens, int64_t ttl_ns,
               int64_t* pinned_tokens);
  void Unpin(uint64_t pin_id);

  // Drops every node of namespace `ns` (pages still used by sequences stay alive through
  // their references) and the pins on them.
  void Clear(const Hash128& ns);

  // Accounting.
  size_t nodes() const { return n_nodes_; }
  size_t namespaces() const { return roots_.size(); }  // with at least one cached page
  size_t pages_cached_unreferenced() const;  // nodes whose page only the index holds
  size_t pages_pinned() const;

  // For tests: every cached (namespace, token sequence) path, depth first.
  void ForEachPath(const std::function<void(const Hash128&, const std::vector<TokenId>&)>& fn) const;

 private:
  struct Node;
  Node* Root(const Hash128& ns, bool create);
  Node* FindFull(Node* n, std::span<const TokenId> page_tokens) const;
  Node* BestPartial(Node* n, std::span<const TokenId> rest, size_t* len) const;
  void RemoveLeaf(Node* leaf);
  void EmitRemoved();  // reports removed_ as one event and empties it
  bool Pinned(const Node* n, int64_t now) const;
  bool Evictable(const Node* n, int64_t now) const;
  void DropPinRefsTo(const Node* n);
  template <typename Fn>
  void Visit(const Node* n, Fn&& fn) const;

  PagePool& pool_;
  const int page_tokens_;
  ClockFn clock_;
  Priority priority_;
  std::map<Hash128, std::unique_ptr<Node>> roots_;
  size_t n_nodes_ = 0;
  uint64_t next_pin_ = 1;
  std::unordered_map<uint64_t, std::vector<Node*>> pins_;
  KvEventSink* events_ = nullptr;
  std::vector<uint64_t> removed_;  // block hashes removed since the last EmitRemoved
};

}  // namespace cachette
