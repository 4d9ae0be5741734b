#include "sched/batch_plan.h"

#include <algorithm>
#include <map>
#include <numeric>
#include <utility>

#include "core/check.h"

namespace cachette::sched {
namespace {

// A node of the compressed prefix trie: where requests hang or paths branch.
struct Node {
  int64_t depth = 0;  // tokens from the root
  std::vector<int32_t> children;
  std::vector<size_t> hung;  // requests whose reusable prefix ends here
  bool can_open = false;     // depth >= max(1, min_prefix_tokens)
  int64_t threshold = 0;     // open iff the open node above is shallower than this
};

// f(x) = base + sum over points (b, c) of c * max(0, x - b), for integer x >= 0: a convex,
// nondecreasing, piecewise-linear function whose slope at x is the sum of c over b <= x.
class SlopeFunction {
 public:
  // Adds c * max(0, x - b); c == 0 is a no-op.
  void AddRamp(int64_t b, int64_t c) {
    if (c == 0) return;
    points_[b] += c;
    count_ += c;
    weighted_ += b * c;
  }
  void AddConstant(int64_t v) { base_ += v; }

  // *this += o; o is left empty. The smaller set of points moves into the larger.
  void Merge(SlopeFunction& o) {
    if (o.points_.size() > points_.size()) {
      std::swap(points_, o.points_);
      std::swap(count_, o.count_);
      std::swap(weighted_, o.weighted_);
    }
    for (const auto& [b, c] : o.points_) AddRamp(b, c);
    base_ += o.base_;
    o = SlopeFunction();
  }

  // Drops the points >= x: no change to f on [0, x].
  void DropFrom(int64_t x) {
    while (!points_.empty() && std::prev(points_.end())->first >= x) {
      auto last = std::prev(points_.end());
      count_ -= last->second;
      weighted_ -= last->first * last->second;
      points_.erase(last);
    }
  }

  // f(x), for x at or beyond every point (after DropFrom(x)).
  int64_t AtOrBeyondPoints(int64_t x) const { return base_ + x * count_ - weighted_; }

  // f := max(f, o), for an o that f exceeds somewhere beyond its last point. Returns the
  // threshold t: the old f(x) < o exactly for the integers x < t (0: f >= o everywhere).
  int64_t ClampBelow(int64_t o) {
    if (base_ >= o) return 0;
    // Walk up the points while f stays below o; they fall under the new flat part.
    int64_t x = 0, value = base_, slope = 0;
    while (!points_.empty()) {
      const auto it = points_.begin();
      const int64_t at = value + slope * (it->first - x);
      if (at >= o) break;
      x = it->first;
      value = at;
      slope += it->second;
      count_ -= it->second;
      weighted_ -= it->first * it->second;
      points_.erase(it);
    }
    CT_CHECK(slope > 0) << "a clamped function must rise past the constant";
    // f rises from value (< o) at x with this slope until the next point: the first integer
    // at or above o is t. On the integers the new function is o up to t - 1, then f: a ramp of
    // (f(t) - o) from t - 1 and the rest of the slope from t.
    const int64_t t = x + (o - value + slope - 1) / slope;
    const int64_t at_t = value + slope * (t - x);
    base_ = o;
    AddRamp(t - 1, at_t - o);
    AddRamp(t, slope - (at_t - o));
    return t;
  }

  int64_t base() const { return base_; }

 private:
  int64_t base_ = 0;
  std::map<int64_t, int64_t> points_;  // b -> c > 0
  int64_t count_ = 0;                  // sum of c
  int64_t weighted_ = 0;               // sum of b * c
};

int64_t Reusable(const BatchItem& it) {
  return std::max<int64_t>(0, static_cast<int64_t>(it.prompt.size()) - 1);
}

// Adds the compressed trie of `ids` (one tenant) to `nodes`; returns its root.
int32_t BuildTrie(std::span<const BatchItem> items, std::vector<size_t> ids, int64_t min_prefix,
                  std::vector<Node>* nodes) {
  auto key = [&](size_t i) {
    return items[i].prompt.first(static_cast<size_t>(Reusable(items[i])));
  };
  std::stable_sort(ids.begin(), ids.end(), [&](size_t a, size_t b) {
    const auto ka = key(a), kb = key(b);
    return std::lexicographical_compare(ka.begin(), ka.end(), kb.begin(), kb.end());
  });
  auto add = [&](int64_t depth) {
    Node n;
    n.depth = depth;
    n.can_open = depth >= std::max<int64_t>(1, min_prefix);
    nodes->push_back(std::move(n));
    return static_cast<int32_t>(nodes->size() - 1);
  };
  const int32_t root = add(0);
  std::vector<int32_t> path = {root};  // the nodes from the root to the last request's node
  for (size_t k = 0; k < ids.size(); ++k) {
    const auto s = key(ids[k]);
    int64_t lcp = 0;
    if (k > 0) {
      const auto prev = key(ids[k - 1]);
      lcp = std::mismatch(prev.begin(), prev.end(), s.begin(), s.end()).first - prev.begin();
    }
    int32_t cut = -1;  // the deepest node popped: it hangs below the branch point
    while ((*nodes)[path.back()].depth > lcp) {
      cut = path.back();
      path.pop_back();
    }
    if ((*nodes)[path.back()].depth < lcp) {
      // The paths part inside the edge to `cut`: split it with a node at depth lcp.
      const int32_t mid = add(lcp);
      std::vector<int32_t>& up = (*nodes)[path.back()].children;
      *std::find(up.begin(), up.end(), cut) = mid;
      (*nodes)[mid].children.push_back(cut);
      path.push_back(mid);
    }
    if (static_cast<int64_t>(s.size()) > lcp) {
      const int32_t leaf = add(static_cast<int64_t>(s.size()));
      (*nodes)[path.back()].children.push_back(leaf);
      path.push_back(leaf);
    }
    (*nodes)[path.back()].hung.push_back(ids[k]);
  }
  return root;
}

// Nodes of the subtree of `root`, every node after its parent.
std::vector<int32_t> PreOrder(const std::vector<Node>& nodes, int32_t root) {
  std::vector<int32_t> order, stack = {root};
  while (!stack.empty()) {
    const int32_t v = stack.back();
    stack.pop_back();
    order.push_back(v);
    for (int32_t c : nodes[v].children) stack.push_back(c);
  }
  return order;
}

// Sets every node's threshold (header, 2.); returns the tokens the best grouping saves.
int64_t Optimize(std::vector<Node>& nodes, const std::vector<int32_t>& pre_order) {
  std::vector<SlopeFunction> f(nodes.size());
  for (auto it = pre_order.rbegin(); it != pre_order.rend(); ++it) {
    Node& v = nodes[*it];
    SlopeFunction& fv = f[*it];
    for (int32_t c : v.children) fv.Merge(f[c]);
    fv.AddRamp(0, static_cast<int64_t>(v.hung.size()));
    fv.DropFrom(v.depth);  // only x < depth matters from here up (x = depth for O_v)
    if (v.can_open) v.threshold = fv.ClampBelow(fv.AtOrBeyondPoints(v.depth) - v.depth);
  }
  return f[pre_order.front()].base();
}

}  // namespace

BatchPlan PlanBatch(std::span<const BatchItem> items, const BatchPlanOptions& options) {
  BatchPlan plan;
  for (const BatchItem& it : items) plan.prompt_tokens += static_cast<int64_t>(it.prompt.size());

  // One trie per tenant, tenants in order of first appearance.
  std::vector<std::vector<size_t>> tenants;
  std::map<std::string_view, size_t> tenant_of;
  for (size_t i = 0; i < items.size(); ++i) {
    auto [pos, added] = tenant_of.emplace(items[i].tenant, tenants.size());
    if (added) tenants.emplace_back();
    tenants[pos->second].push_back(i);
  }
  std::vector<Node> nodes;
  int64_t best = 0;
  std::vector<PrefixGroup> groups;
  for (std::vector<size_t>& ids : tenants) {
    const int32_t root = BuildTrie(items, std::move(ids), options.min_prefix_tokens, &nodes);
    const std::vector<int32_t> order = PreOrder(nodes, root);
    best += Optimize(nodes, order);
    // Read the groups top-down: a node opens when the open node above it is shallower than
    // its threshold; requests join the deepest open node above them (none: alone).
    struct Visit {
      int32_t node;
      int64_t open_depth;
      int64_t group;  // -1: the root
    };
    std::vector<Visit> stack = {{root, 0, -1}};
    while (!stack.empty()) {
      Visit at = stack.back();
      stack.pop_back();
      const Node& v = nodes[at.node];
      if (at.node != root && v.can_open && at.open_depth < v.threshold) {
        at.open_depth = v.depth;
        at.group = static_cast<int64_t>(groups.size());
        groups.push_back(PrefixGroup{v.depth, {}, 0});
      }
      for (size_t i : v.hung) {
        if (at.group >= 0) {
          groups[static_cast<size_t>(at.group)].members.push_back(i);
        } else {
          groups.push_back(PrefixGroup{0, {i}, 0});
        }
      }
      for (int32_t c : v.children) stack.push_back({c, at.open_depth, at.group});
    }
    nodes.clear();
  }

  // Groups of fewer than two members share nothing (the optimum never opens one; kept honest).
  std::vector<PrefixGroup> kept;
  for (PrefixGroup& g : groups) {
    if (g.members.size() >= 2 || g.prefix_tokens == 0) {
      kept.push_back(std::move(g));
    } else {
      for (size_t i : g.members) kept.push_back(PrefixGroup{0, {i}, 0});
    }
  }
  for (const PrefixGroup& g : kept) {
    plan.saved_tokens += static_cast<int64_t>(g.members.size() - 1) * g.prefix_tokens;
  }
  CT_CHECK(plan.saved_tokens == best)
      << "the groups save " << plan.saved_tokens << " tokens, the optimum is " << best;

  // The order (header, 3.).
  auto ratio = [](double decode, double prefill) { return decode / std::max(1.0, prefill); };
  for (PrefixGroup& g : kept) {
    double decode = 0, prefill = static_cast<double>(g.prefix_tokens);
    for (size_t i : g.members) {
      decode += static_cast<double>(items[i].decode_tokens);
      prefill += static_cast<double>(items[i].prompt.size()) - static_cast<double>(g.prefix_tokens);
    }
    g.key = ratio(decode, prefill);
    auto member_key = [&](size_t i) {
      return ratio(static_cast<double>(items[i].decode_tokens),
                   static_cast<double>(items[i].prompt.size()));
    };
    std::sort(g.members.begin(), g.members.end(), [&](size_t a, size_t b) {
      const double ka = member_key(a), kb = member_key(b);
      return ka != kb ? ka > kb : a < b;
    });
  }
  std::sort(kept.begin(), kept.end(), [](const PrefixGroup& a, const PrefixGroup& b) {
    return a.key != b.key ? a.key > b.key : a.members.front() < b.members.front();
  });
  plan.groups = std::move(kept);
  return plan;
}

}  // namespace cachette::sched
