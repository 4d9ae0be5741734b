#include "kv/radix_index.h"

#include <algorithm>
#include <limits>
#include <queue>

#include "cache/chunk.h"  // NextChunkKey: page keys chain like chunk keys
#include "core/check.h"

namespace cachette {

struct RadixIndex::Node {
  Node* parent = nullptr;
  std::vector<TokenId> tokens;  // 1..page_tokens ids (empty only for a root)
  PageId page;
  int depth = 0;
  std::vector<std::unique_ptr<Node>> children;
  std::unordered_multimap<uint64_t, Node*> full_children;  // hash of a full page's tokens
  int64_t last_access_ns = 0;
  uint64_t hits = 0;
  int pin_count = 0;
  int64_t pin_until_ns = 0;  // the latest expiry of the pins applied (max = no expiry)
  // The chained content key of the prefix ending with this full page (with an event sink;
  // zero for roots, partial pages and without a sink).
  Hash128 key;

  bool is_root() const { return parent == nullptr; }
};

namespace {

uint64_t HashTokens(std::span<const TokenId> t) {
  return Hash64(ByteSpan(reinterpret_cast<const std::byte*>(t.data()), t.size_bytes()));
}

size_t CommonPrefix(std::span<const TokenId> a, std::span<const TokenId> b) {
  const size_t n = std::min(a.size(), b.size());
  size_t i = 0;
  while (i < n && a[i] == b[i]) ++i;
  return i;
}

}  // namespace

RadixIndex::RadixIndex(PagePool& pool, ClockFn clock, Priority priority)
    : pool_(pool),
      page_tokens_(pool.page_tokens()),
      clock_(std::move(clock)),
      priority_(std::move(priority)) {}

RadixIndex::~RadixIndex() {
  for (auto& [ns, root] : roots_) {
    Visit(root.get(), [&](const Node* n) {
      if (!n->is_root()) pool_.Unref(n->page);
    });
  }
}

template <typename Fn>
void RadixIndex::Visit(const Node* n, Fn&& fn) const {
  // Iterative depth-first walk (prefixes can be thousands of pages deep).
  std::vector<const Node*> stack = {n};
  while (!stack.empty()) {
    const Node* cur = stack.back();
    stack.pop_back();
    fn(cur);
    for (const auto& c : cur->children) stack.push_back(c.get());
  }
}

RadixIndex::Node* RadixIndex::Root(const Hash128& ns, bool create) {
  auto it = roots_.find(ns);
  if (it != roots_.end()) return it->second.get();
  if (!create) return nullptr;
  auto root = std::make_unique<Node>();
  Node* r = root.get();
  roots_.emplace(ns, std::move(root));
  return r;
}

RadixIndex::Node* RadixIndex::FindFull(Node* n, std::span<const TokenId> page) const {
  auto [b, e] = n->full_children.equal_range(HashTokens(page));
  for (auto it = b; it != e; ++it) {
    if (std::equal(page.begin(), page.end(), it->second->tokens.begin(),
                   it->second->tokens.end())) {
      return it->second;
    }
  }
  return nullptr;
}

RadixIndex::Node* RadixIndex::BestPartial(Node* n, std::span<const TokenId> rest,
                                          size_t* len) const {
  // Longest common prefix; ties go to the most recently used child, then the lowest page id,
  // so the choice (and so LRU state) is deterministic.
  Node* best = nullptr;
  *len = 0;
  for (const auto& c : n->children) {
    const size_t l = CommonPrefix(c->tokens, rest);
    if (l == 0) continue;
    if (best == nullptr || l > *len ||
        (l == *len && (c->last_access_ns > best->last_access_ns ||
                       (c->last_access_ns == best->last_access_ns &&
                        c->page.value < best->page.value)))) {
      best = c.get();
      *len = l;
    }
  }
  return best;
}

RadixIndex::Match RadixIndex::Lookup(const Hash128& ns, std::span<const TokenId> tokens) {
  Match m;
  Node* n = Root(ns, false);
  if (n == nullptr) return m;
  const int64_t now = clock_();
  const size_t P = page_tokens_;
  size_t pos = 0;
  while (tokens.size() - pos >= P) {
    Node* c = FindFull(n, tokens.subspan(pos, P));
    if (c == nullptr) break;
    n = c;
    pos += P;
    m.pages.push_back(c->page);
    c->last_access_ns = now;
    ++c->hits;
  }
  // The rest ends inside a page: the child sharing the longest prefix with it, full or not.
  size_t best_len = 0;
  Node* best = BestPartial(n, tokens.subspan(pos), &best_len);
  if (best != nullptr) {
    m.pages.push_back(best->page);
    pos += best_len;
    best->last_access_ns = now;
    ++best->hits;
  }
  for (PageId p : m.pages) pool_.Ref(p);
  m.n_tokens = static_cast<int64_t>(pos);
  return m;
}

void RadixIndex::Insert(const Hash128& ns, std::span<const TokenId> tokens,
                        std::span<const PageId> pages) {
  const size_t P = page_tokens_;
  CT_CHECK_EQ(pages.size(), (tokens.size() + P - 1) / P);
  Node* n = Root(ns, true);
  const int64_t now = clock_();
  KvEvent stored;  // the new full pages, consecutive blocks of one sequence
  stored.block_size = page_tokens_;
  for (size_t i = 0; i < pages.size(); ++i) {
    std::span<const TokenId> chunk = tokens.subspan(i * P, std::min(P, tokens.size() - i * P));
    const bool full = chunk.size() == P;
    Node* existing = nullptr;
    if (full) {
      existing = FindFull(n, chunk);
    } else {
      // Covered by a child that extends it (the same deterministic choice as a lookup).
      size_t len = 0;
      Node* best = BestPartial(n, chunk, &len);
      if (best != nullptr && len == chunk.size()) existing = best;
    }
    if (existing != nullptr) {
      existing->last_access_ns = now;
      n = existing;
      continue;
    }
    // Partial leaves that this chunk extends are now redundant: drop those not in use.
    for (size_t k = 0; k < n->children.size();) {
      Node* c = n->children[k].get();
      if (c->tokens.size() < chunk.size() && CommonPrefix(c->tokens, chunk) == c->tokens.size() &&
          Evictable(c, now)) {
        RemoveLeaf(c);  // moves the last child into slot k
      } else {
        ++k;
      }
    }
    auto child = std::make_unique<Node>();
    child->parent = n;
    child->tokens.assign(chunk.begin(), chunk.end());
    child->page = pages[i];
    child->depth = n->depth + 1;
    child->last_access_ns = now;
    pool_.Ref(pages[i]);
    Node* c = child.get();
    if (full) n->full_children.emplace(HashTokens(chunk), c);
    if (full && events_ != nullptr) {
      c->key = cache::NextChunkKey(n->key, ns, chunk);
      if (stored.block_hashes.empty() && !n->is_root()) stored.parent = KvBlockHash(n->key);
      stored.block_hashes.push_back(KvBlockHash(c->key));
      stored.token_ids.insert(stored.token_ids.end(), chunk.begin(), chunk.end());
    }
    n->children.push_back(std::move(child));
    ++n_nodes_;
    n = c;
    if (!full) break;  // a partial page is always a leaf
  }
  if (!stored.block_hashes.empty()) events_->Emit(std::move(stored));
}

void RadixIndex::EmitRemoved() {
  if (removed_.empty()) return;
  KvEvent ev;
  ev.kind = KvEvent::Kind::kRemoved;
  ev.block_hashes = std::move(removed_);
  removed_.clear();
  events_->Emit(std::move(ev));
}

bool RadixIndex::Pinned(const Node* n, int64_t now) const {
  return n->pin_count > 0 && now < n->pin_until_ns;
}

bool RadixIndex::Evictable(const Node* n, int64_t now) const {
  return !n->is_root() && n->children.empty() && pool_.RefCount(n->page) == 1 &&
         !Pinned(n, now);
}

void RadixIndex::DropPinRefsTo(const Node* n) {
  if (n->pin_count == 0) return;
  for (auto& [id, nodes] : pins_) nodes.erase(std::remove(nodes.begin(), nodes.end(), n), nodes.end());
}

void RadixIndex::RemoveLeaf(Node* leaf) {
  CT_CHECK(leaf->children.empty() && !leaf->is_root());
  DropPinRefsTo(leaf);
  Node* parent = leaf->parent;
  if (leaf->tokens.size() == static_cast<size_t>(page_tokens_)) {
    auto [b, e] = parent->full_children.equal_range(HashTokens(leaf->tokens));
    for (auto it = b; it != e; ++it) {
      if (it->second == leaf) {
        parent->full_children.erase(it);
        break;
      }
    }
  }
  if (events_ != nullptr && leaf->tokens.size() == static_cast<size_t>(page_tokens_)) {
    removed_.push_back(KvBlockHash(leaf->key));
  }
  pool_.Unref(leaf->page);
  auto& ch = parent->children;
  for (size_t k = 0; k < ch.size(); ++k) {
    if (ch[k].get() == leaf) {
      ch[k] = std::move(ch.back());
      ch.pop_back();
      break;
    }
  }
  --n_nodes_;
}

size_t RadixIndex::Evict(size_t n_pages) {
  const int64_t now = clock_();
  using Entry = std::pair<double, Node*>;
  auto cmp = [](const Entry& a, const Entry& b) { return a.first > b.first; };
  std::priority_queue<Entry, std::vector<Entry>, decltype(cmp)> heap(cmp);
  auto stats = [](const Node* n) {
    return NodeStats{n->last_access_ns, n->hits, static_cast<int>(n->tokens.size()), n->depth};
  };
  for (auto& [ns, root] : roots_) {
    Visit(root.get(), [&](const Node* n) {
      if (Evictable(n, now)) heap.emplace(priority_(stats(n)), const_cast<Node*>(n));
    });
  }
  size_t freed = 0;
  while (freed < n_pages && !heap.empty()) {
    Node* n = heap.top().second;
    heap.pop();
    Node* parent = n->parent;
    RemoveLeaf(n);
    ++freed;
    if (Evictable(parent, now)) heap.emplace(priority_(stats(parent)), parent);
  }
  // A namespace whose last page went is forgotten, so idle tenants cost nothing.
  if (freed > 0) std::erase_if(roots_, [](const auto& r) { return r.second->children.empty(); });
  EmitRemoved();
  return freed;
}

uint64_t RadixIndex::Pin(const Hash128& ns, std::span<const TokenId> tokens, int64_t ttl_ns,
                         int64_t* pinned_tokens) {
  *pinned_tokens = 0;
  Node* n = Root(ns, false);
  const uint64_t id = next_pin_++;
  std::vector<Node*>& nodes = pins_[id];
  if (n == nullptr) return id;
  const int64_t now = clock_();
  const int64_t until =
      ttl_ns > 0 ? now + ttl_ns : std::numeric_limits<int64_t>::max();
  const size_t P = page_tokens_;
  size_t pos = 0;
  auto pin = [&](Node* c) {
    ++c->pin_count;
    c->pin_until_ns = std::max(c->pin_until_ns, until);
    nodes.push_back(c);
  };
  while (tokens.size() - pos >= P) {
    Node* c = FindFull(n, tokens.subspan(pos, P));
    if (c == nullptr) break;
    pin(c);
    n = c;
    pos += P;
  }
  size_t best_len = 0;
  Node* best = BestPartial(n, tokens.subspan(pos), &best_len);
  if (best != nullptr) {
    pin(best);
    pos += best_len;
  }
  *pinned_tokens = static_cast<int64_t>(pos);
  return id;
}

void RadixIndex::Unpin(uint64_t pin_id) {
  auto it = pins_.find(pin_id);
  if (it == pins_.end()) return;
  for (Node* n : it->second) {
    if (--n->pin_count == 0) n->pin_until_ns = 0;
  }
  pins_.erase(it);
}

void RadixIndex::Clear(const Hash128& ns) {
  auto it = roots_.find(ns);
  if (it == roots_.end()) return;
  std::vector<const Node*> all;
  Visit(it->second.get(), [&](const Node* n) { all.push_back(n); });
  for (const Node* n : all) {
    if (n->is_root()) continue;
    DropPinRefsTo(n);
    if (events_ != nullptr && n->tokens.size() == static_cast<size_t>(page_tokens_)) {
      removed_.push_back(KvBlockHash(n->key));
    }
    pool_.Unref(n->page);
    --n_nodes_;
  }
  roots_.erase(it);
  if (events_ != nullptr) EmitRemoved();
}

size_t RadixIndex::pages_cached_unreferenced() const {
  size_t n = 0;
  for (const auto& [ns, root] : roots_) {
    Visit(root.get(), [&](const Node* c) {
      if (!c->is_root() && pool_.RefCount(c->page) == 1) ++n;
    });
  }
  return n;
}

size_t RadixIndex::pages_pinned() const {
  const int64_t now = clock_();
  size_t n = 0;
  for (const auto& [ns, root] : roots_) {
    Visit(root.get(), [&](const Node* c) {
      if (Pinned(c, now)) ++n;
    });
  }
  return n;
}

void RadixIndex::ForEachPath(
    const std::function<void(const Hash128&, const std::vector<TokenId>&)>& fn) const {
  for (const auto& [ns, root] : roots_) {
    std::vector<std::pair<const Node*, std::vector<TokenId>>> stack = {{root.get(), {}}};
    while (!stack.empty()) {
      auto [n, prefix] = std::move(stack.back());
      stack.pop_back();
      if (!n->is_root()) fn(ns, prefix);
      for (const auto& c : n->children) {
        std::vector<TokenId> p = prefix;
        p.insert(p.end(), c->tokens.begin(), c->tokens.end());
        stack.emplace_back(c.get(), std::move(p));
      }
    }
  }
}

}  // namespace cachette
