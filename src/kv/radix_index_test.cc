// The radix index against a naive reference: a flat list of cached page paths scanned
// linearly, with the same documented semantics (prefix-closed paths per namespace, longest
// common prefix lookups, LRU eviction of unreferenced unpinned leaves, pins with TTL).
#include "kv/radix_index.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <limits>
#include <map>
#include <random>
#include <set>

#include "cache/chunk.h"

namespace cachette {
namespace {

constexpr int kP = 4;  // small pages so that paths are deep and partial pages common

KvShape TinyShape() { return KvShape{1, 1, 32, kernels::KvType::kF32}; }

struct NaiveEntry {
  Hash128 ns;
  std::vector<TokenId> path;  // all tokens from the root through this node
  PageId page;
  int64_t last_access = 0;
  int pins = 0;
  int64_t pin_until = 0;
  uint64_t uid = 0;  // identity, so pins on an evicted node never apply to a re-inserted one
};

size_t Lcp(const std::vector<TokenId>& a, std::span<const TokenId> b) {
  size_t i = 0;
  while (i < a.size() && i < b.size() && a[i] == b[i]) ++i;
  return i;
}

bool IsPrefix(const std::vector<TokenId>& a, std::span<const TokenId> b) {
  return a.size() <= b.size() && std::equal(a.begin(), a.end(), b.begin());
}

class NaiveIndex {
 public:
  explicit NaiveIndex(PagePool& pool) : pool_(pool) {}
  std::vector<NaiveEntry> e;

  size_t ParentLen(const NaiveEntry& x) const { return (x.path.size() - 1) / kP * kP; }
  bool IsLeaf(size_t i) const {
    for (size_t j = 0; j < e.size(); ++j) {
      if (j != i && e[j].ns == e[i].ns && e[j].path.size() > e[i].path.size() &&
          IsPrefix(e[i].path, e[j].path) && ParentLen(e[j]) == e[i].path.size()) {
        return false;
      }
    }
    return true;
  }
  bool Pinned(const NaiveEntry& x, int64_t now) const { return x.pins > 0 && now < x.pin_until; }
  bool Evictable(size_t i, int64_t now) const {
    return IsLeaf(i) && pool_.RefCount(e[i].page) == 1 && !Pinned(e[i], now);
  }
  // Children of the node whose path is tokens[0:len) (len a multiple of kP).
  std::vector<size_t> Children(const Hash128& ns, std::span<const TokenId> t, size_t len) const {
    std::vector<size_t> out;
    for (size_t j = 0; j < e.size(); ++j) {
      if (e[j].ns == ns && ParentLen(e[j]) == len && Lcp(e[j].path, t) >= len) out.push_back(j);
    }
    return out;
  }
  // The entries a lookup touches, in path order, and the matched length.
  std::vector<size_t> Walk(const Hash128& ns, std::span<const TokenId> t, size_t* matched) const {
    std::vector<size_t> path;
    size_t pos = 0;
    for (;;) {
      if (t.size() - pos >= static_cast<size_t>(kP)) {
        bool found = false;
        for (size_t j : Children(ns, t, pos)) {
          if (e[j].path.size() == pos + kP && IsPrefix(e[j].path, t)) {
            path.push_back(j);
            pos += kP;
            found = true;
            break;
          }
        }
        if (found) continue;
      }
      // Partial: longest common prefix, ties to most recent access, then lowest page id.
      long best = -1;
      size_t best_len = 0;
      for (size_t j : Children(ns, t, pos)) {
        const size_t l = Lcp(e[j].path, t) - pos;
        if (l == 0) continue;
        if (best < 0 || l > best_len ||
            (l == best_len && (e[j].last_access > e[best].last_access ||
                               (e[j].last_access == e[best].last_access &&
                                e[j].page.value < e[best].page.value)))) {
          best = static_cast<long>(j);
          best_len = l;
        }
      }
      if (best >= 0) {
        path.push_back(best);
        pos += best_len;
      }
      break;
    }
    *matched = pos;
    return path;
  }
  size_t Lookup(const Hash128& ns, std::span<const TokenId> t, int64_t now) {
    size_t matched;
    for (size_t j : Walk(ns, t, &matched)) e[j].last_access = now;
    return matched;
  }
  void Insert(const Hash128& ns, std::span<const TokenId> t, std::span<const PageId> pages,
              int64_t now) {
    for (size_t i = 0; i < pages.size(); ++i) {
      const size_t end = std::min(t.size(), (i + 1) * kP);
      std::span<const TokenId> path = t.first(end);
      const bool full = end - i * kP == static_cast<size_t>(kP);
      long existing = -1;
      if (full) {
        for (size_t j : Children(ns, t, i * kP)) {
          if (e[j].path.size() == end && IsPrefix(e[j].path, path)) existing = static_cast<long>(j);
        }
      } else {
        size_t matched;
        std::vector<size_t> walk = Walk(ns, path, &matched);
        if (matched == path.size() && walk.size() == i + 1) existing = static_cast<long>(walk.back());
      }
      if (existing >= 0) {
        e[existing].last_access = now;
        continue;
      }
      for (size_t j = 0; j < e.size();) {
        if (e[j].ns == ns && ParentLen(e[j]) == i * kP && e[j].path.size() < end &&
            IsPrefix(e[j].path, path) && Evictable(j, now)) {
          pool_.Unref(e[j].page);
          e.erase(e.begin() + j);
        } else {
          ++j;
        }
      }
      pool_.Ref(pages[i]);
      e.push_back(
          {ns, std::vector<TokenId>(path.begin(), path.end()), pages[i], now, 0, 0, next_uid_++});
      if (!full) break;
    }
  }
  size_t Evict(size_t n, int64_t now) {
    size_t freed = 0;
    while (freed < n) {
      long victim = -1;
      for (size_t j = 0; j < e.size(); ++j) {
        if (Evictable(j, now) && (victim < 0 || e[j].last_access < e[victim].last_access)) {
          victim = static_cast<long>(j);
        }
      }
      if (victim < 0) break;
      pool_.Unref(e[victim].page);
      e.erase(e.begin() + victim);
      ++freed;
    }
    return freed;
  }
  std::set<std::pair<Hash128, std::vector<TokenId>>> Paths() const {
    std::set<std::pair<Hash128, std::vector<TokenId>>> s;
    for (const auto& x : e) s.emplace(x.ns, x.path);
    return s;
  }

 private:
  PagePool& pool_;
  uint64_t next_uid_ = 1;
};

std::string Show(const std::vector<TokenId>& t) {
  std::string s;
  for (size_t i = 0; i < t.size(); ++i) {
    if (i && i % kP == 0) s += '|';  // appended, not "|" + ...: GCC 12 warns falsely (-Wrestrict)
    s += std::to_string(t[i]);
  }
  return s;
}

std::set<std::pair<Hash128, std::vector<TokenId>>> IndexPaths(const RadixIndex& idx) {
  std::set<std::pair<Hash128, std::vector<TokenId>>> s;
  idx.ForEachPath([&](const Hash128& ns, const std::vector<TokenId>& p) { s.emplace(ns, p); });
  return s;
}

// Replays KV events into the set of blocks they say are held; counts what would be a protocol
// error (a block stored twice, or removed while not held).
struct RecordingSink final : KvEventSink {
  std::set<uint64_t> live;
  int duplicate_stores = 0, unknown_removals = 0, bad_shapes = 0;
  void Emit(KvEvent e) override {
    if (e.medium != KvMedium::kMemory) ++bad_shapes;
    for (uint64_t h : e.block_hashes) {
      if (e.kind == KvEvent::Kind::kStored) {
        if (!live.insert(h).second) ++duplicate_stores;
      } else if (live.erase(h) == 0) {
        ++unknown_removals;
      }
    }
    if (e.kind == KvEvent::Kind::kStored &&
        (e.block_size != kP || e.token_ids.size() != e.block_hashes.size() * kP)) {
      ++bad_shapes;
    }
  }
};

// The blocks the index holds, by the documented naming: the chained key of every full page's
// whole path, computed from the tokens alone.
std::set<uint64_t> ExpectedBlocks(const RadixIndex& idx) {
  std::set<uint64_t> s;
  idx.ForEachPath([&](const Hash128& ns, const std::vector<TokenId>& p) {
    if (p.empty() || p.size() % kP != 0) return;  // partial pages are not reported
    s.insert(KvBlockHash(cache::ComputeChunkKeys(ns, p, kP).back()));
  });
  return s;
}

TEST(RadixIndexTest, RandomOperationsMatchNaiveReference) {
  // Two pools of pages so the index and the reference hold their own references; the test
  // plays the sequences that allocate pages and hand them to both.
  for (uint32_t seed : {1u, 2u, 3u}) {
    PagePool pool_a(TinyShape(), kP, PagePool::PageBytes(TinyShape(), kP) * 4000);
    PagePool pool_b(TinyShape(), kP, PagePool::PageBytes(TinyShape(), kP) * 4000);
    int64_t now = 0;
    RadixIndex index(pool_a, [&] { return now; });
    RecordingSink events;
    index.SetEventSink(&events);
    NaiveIndex naive(pool_b);
    std::mt19937 rng(seed);
    const Hash128 ns[2] = {Hash128{1, 2}, Hash128{3, 4}};
    std::vector<std::vector<TokenId>> bases(6);
    for (auto& b : bases) {
      b.resize(40);
      for (auto& t : b) t = static_cast<TokenId>(rng() % 3);  // tiny alphabet: many shared prefixes
    }
    struct Held {
      std::vector<PageId> a, b;
    };
    std::vector<Held> held;
    std::map<uint64_t, std::vector<uint64_t>> pins;  // pin id -> naive entry uids
    auto random_tokens = [&] {
      std::vector<TokenId> t = bases[rng() % bases.size()];
      t.resize(1 + rng() % t.size());
      if (rng() % 3 == 0 && !t.empty()) t[rng() % t.size()] = static_cast<TokenId>(rng() % 3);
      return t;
    };
    for (int op = 0; op < 3000; ++op) {
      ++now;
      const Hash128& n = ns[rng() % 2];
      const int kind = static_cast<int>(rng() % 10);
      if (kind < 4) {  // insert a sequence whose pages the test allocated
        auto t = random_tokens();
        const size_t np = (t.size() + kP - 1) / kP;
        std::vector<PageId> pa(np), pb(np);
        bool ok = true;
        for (size_t i = 0; i < np && ok; ++i) ok = pool_a.Allocate(&pa[i]) && pool_b.Allocate(&pb[i]);
        ASSERT_TRUE(ok) << "test pools too small";
        index.Insert(n, t, pa);
        naive.Insert(n, t, pb, now);
        for (size_t i = 0; i < np; ++i) pool_a.Unref(pa[i]), pool_b.Unref(pb[i]);
      } else if (kind < 6) {  // lookup, maybe holding the pages like a running sequence
        auto t = random_tokens();
        RadixIndex::Match m = index.Lookup(n, t);
        size_t matched;
        std::vector<size_t> walk = naive.Walk(n, t, &matched);
        ASSERT_EQ(static_cast<size_t>(m.n_tokens), matched) << "op " << op;
        ASSERT_EQ(m.pages.size(), walk.size()) << "op " << op;
        naive.Lookup(n, t, now);
        Held h;
        h.a = m.pages;
        for (size_t j : walk) {
          pool_b.Ref(naive.e[j].page);
          h.b.push_back(naive.e[j].page);
        }
        held.push_back(std::move(h));
      } else if (kind == 6 && !held.empty()) {  // a sequence ends
        const size_t k = rng() % held.size();
        for (PageId p : held[k].a) pool_a.Unref(p);
        for (PageId p : held[k].b) pool_b.Unref(p);
        held.erase(held.begin() + k);
      } else if (kind == 7) {  // evict
        const size_t want = 1 + rng() % 8;
        ASSERT_EQ(index.Evict(want), naive.Evict(want, now)) << "op " << op;
      } else if (kind == 8) {  // pin, with or without a TTL
        auto t = random_tokens();
        const int64_t ttl = rng() % 2 ? 0 : 1 + rng() % 50;
        int64_t pinned = 0;
        const uint64_t id = index.Pin(n, t, ttl, &pinned);
        size_t matched;
        std::vector<size_t> walk = naive.Walk(n, t, &matched);
        ASSERT_EQ(static_cast<size_t>(pinned), matched);
        std::vector<uint64_t> uids;
        for (size_t j : walk) {
          naive.e[j].pins++;
          naive.e[j].pin_until = std::max(
              naive.e[j].pin_until, ttl ? now + ttl : std::numeric_limits<int64_t>::max());
          uids.push_back(naive.e[j].uid);
        }
        pins[id] = uids;
      } else if (kind == 9 && !pins.empty()) {  // unpin
        auto it = pins.begin();
        std::advance(it, rng() % pins.size());
        index.Unpin(it->first);
        for (uint64_t uid : it->second) {
          for (auto& x : naive.e) {
            if (x.uid == uid && --x.pins == 0) x.pin_until = 0;
          }
        }
        pins.erase(it);
      }
      const auto got = IndexPaths(index), want = naive.Paths();
      if (got != want) {
        std::string diff;
        for (const auto& p : got) {
          if (!want.count(p)) diff += "  only in index: " + Show(p.second) + "\n";
        }
        for (const auto& p : want) {
          if (!got.count(p)) diff += "  only in reference: " + Show(p.second) + "\n";
        }
        FAIL() << "op " << op << " (kind " << kind << ") seed " << seed << "\n" << diff;
      }
      ASSERT_EQ(pool_a.pages_used(), pool_b.pages_used()) << "op " << op;
      // The events say exactly what the index holds, in the names a router computes.
      ASSERT_EQ(events.live, ExpectedBlocks(index)) << "op " << op << " kind " << kind;
      ASSERT_EQ(events.duplicate_stores + events.unknown_removals + events.bad_shapes, 0);
    }
    for (auto& h : held) {
      for (PageId p : h.a) pool_a.Unref(p);
      for (PageId p : h.b) pool_b.Unref(p);
    }
  }
}

TEST(RadixIndexTest, NamespacesNeverCross) {
  PagePool pool(TinyShape(), kP, PagePool::PageBytes(TinyShape(), kP) * 16);
  RadixIndex index(pool, [] { return int64_t{0}; });
  const std::vector<TokenId> t = {1, 2, 3, 4, 5, 6};
  std::vector<PageId> pages(2);
  ASSERT_TRUE(pool.Allocate(&pages[0]) && pool.Allocate(&pages[1]));
  index.Insert(Hash128{1, 1}, t, pages);
  EXPECT_EQ(index.Lookup(Hash128{2, 2}, t).n_tokens, 0);
  RadixIndex::Match m = index.Lookup(Hash128{1, 1}, t);
  EXPECT_EQ(m.n_tokens, 6);
  for (PageId p : m.pages) pool.Unref(p);
  index.Clear(Hash128{1, 1});
  EXPECT_EQ(index.Lookup(Hash128{1, 1}, t).n_tokens, 0);
  EXPECT_EQ(pool.pages_used(), 2u);  // the test's own references remain
  pool.Unref(pages[0]);
  pool.Unref(pages[1]);
  EXPECT_EQ(pool.pages_used(), 0u);
}

// Regression: every tenant's radix root stayed forever once created, so request input (random
// cache_salt values) grew the index without bound.
TEST(RadixIndexTest, EvictingANamespacesLastPageForgetsTheNamespace) {
  PagePool pool(TinyShape(), kP, PagePool::PageBytes(TinyShape(), kP) * 16);
  int64_t now = 0;
  RadixIndex index(pool, [&] { return now; });
  for (uint64_t tenant = 1; tenant <= 5; ++tenant) {
    const std::vector<TokenId> t = {static_cast<TokenId>(tenant), 2, 3, 4};
    std::vector<PageId> pages(1);
    ASSERT_TRUE(pool.Allocate(&pages[0]));
    index.Insert(Hash128{tenant, tenant}, t, pages);
    pool.Unref(pages[0]);  // the index holds the only reference
    ++now;
  }
  EXPECT_EQ(index.namespaces(), 5u);
  EXPECT_EQ(index.Evict(3), 3u);  // the three least recently used tenants
  EXPECT_EQ(index.namespaces(), 2u);
  EXPECT_EQ(index.Lookup(Hash128{5, 5}, std::vector<TokenId>{5, 2, 3, 4}).n_tokens, 4);
}

TEST(RadixIndexTest, ClearReportsEveryFullPageRemoved) {
  PagePool pool(TinyShape(), kP, PagePool::PageBytes(TinyShape(), kP) * 16);
  RadixIndex index(pool, [] { return int64_t{0}; });
  RecordingSink events;
  index.SetEventSink(&events);
  const Hash128 a{1, 1}, b{2, 2};
  std::vector<TokenId> t = {1, 2, 3, 4, 5, 6, 7, 8, 9};  // two full pages and a partial one
  std::vector<PageId> pages(3);
  for (int ns = 0; ns < 2; ++ns) {
    for (PageId& p : pages) ASSERT_TRUE(pool.Allocate(&p));
    index.Insert(ns == 0 ? a : b, t, pages);
    for (PageId p : pages) pool.Unref(p);
  }
  EXPECT_EQ(events.live.size(), 4u);  // 2 full pages x 2 namespaces
  // The first stored event of a namespace has no parent and carries both pages' tokens.
  EXPECT_EQ(events.live, ExpectedBlocks(index));
  index.Clear(a);
  EXPECT_EQ(events.live, ExpectedBlocks(index));
  EXPECT_EQ(events.live.size(), 2u);
  EXPECT_EQ(events.unknown_removals, 0);
}

}  // namespace
}  // namespace cachette
