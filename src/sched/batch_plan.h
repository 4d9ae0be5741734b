// BatchLLM planning for an offline batch: which requests share a prefix that is computed once,
// and in which order the requests run. Pure logic over token vectors; no engine, no KV.
//
// 1. The prefix tree. Request i may reuse at most its prompt minus its last token (the last
//    token is always recomputed: its logits give the first output token), so it hangs in a trie
//    at depth t_i = len_i - 1. The trie is at TOKEN granularity, not page granularity, because
//    the KV cache shares at token granularity: the radix index matches a prefix that ends
//    inside a page and the sequence copies that page before writing (copy-on-write), so a
//    shared prefix of 37 tokens saves 37 tokens of prefill, not 32. The trie is compressed (a
//    node where requests hang or paths branch, edges of many tokens) and built from the sorted
//    prompts and the longest common prefixes of neighbours, with a stack: one sort, no node per
//    token.
//
// 2. Single-level groups (BatchLLM's prefix-sharing groups). Each request joins exactly one
//    group; a group of k >= 2 requests of one tenant shares one prefix of p tokens (a common
//    prefix of all its members, at most t_i of each): it is computed once and reused by the
//    k requests, which saves (k - 1) * p tokens of prefill. Groups are not nested: a group's
//    prefix lives from its first member's admission to its last member's end, then is free.
//    The plan MAXIMIZES the tokens saved, exactly (no greedy): opening a group at trie node v
//    (depth d_v) costs d_v once (its prefill), and every request gains the depth of the
//    deepest open node above it (its tokens reused); the root, depth 0, is always "open" at no
//    cost, and a request that ends there runs alone. Saved = sum of gains - sum of costs.
//    That is facility location on a tree; with F_v(x) = the best of v's subtree when the
//    deepest open node above v has depth x:
//        N_v(x) = a_v * x + sum over children c of F_c(x)    v not open (a_v requests hang at v)
//        O_v    = N_v(d_v) - d_v                              v open
//        F_v(x) = max(N_v(x), O_v)
//    Each F_v is convex, nondecreasing and piecewise linear in x with integer slopes (the
//    number of requests that would use the node above), so it is kept as its value at 0 plus
//    the points where its slope grows ("slope trick"): sums merge the smaller set of points
//    into the larger, max with O_v drops the points below the first x where N_v reaches O_v.
//    Opening v pays exactly when the open node above is shallower than that x (the node's
//    threshold), so the groups are read top-down from the thresholds. O(n log^2 n) for n
//    requests after the sort. The test checks the result against every partition of small
//    batches and against a plain dynamic program over an uncompressed trie.
//    A node shallower than min_prefix_tokens is never opened (a prefix that short is not worth
//    a separate prefill request: the online prefix cache shares it anyway).
//
// 3. Order (BatchLLM): requests with relatively more decode work go first, so their decode
//    steps overlap the prefill of later groups. A group's key is its decode tokens over the
//    prefill tokens it computes (the prefix once, plus every member's own suffix); groups run
//    by key, highest first; within a group members run by decode_tokens / prompt length,
//    highest first. Ties keep input order.
//
// Thread-safety: PlanBatch is a pure function.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "cachette/types.h"

namespace cachette::sched {

// One request of the batch as the planner sees it. Borrowed views: they must stay valid during
// PlanBatch only.
struct BatchItem {
  std::span<const TokenId> prompt;
  int64_t decode_tokens = 0;  // the output it may generate (max_tokens), for the order
  std::string_view tenant;    // cache_salt: requests of different tenants never share a group
};

struct BatchPlanOptions {
  int64_t min_prefix_tokens = 1;  // shorter shared prefixes make no group
};

struct PrefixGroup {
  // members.size() >= 2: the first prefix_tokens tokens of every member's prompt are equal,
  // prefix_tokens >= min_prefix_tokens and < every member's prompt length. A singleton (one
  // member) has prefix_tokens 0.
  int64_t prefix_tokens = 0;
  std::vector<size_t> members;  // indices into the items, in run order
  double key = 0;               // the ordering key (3. above); groups run by key, descending
};

struct BatchPlan {
  std::vector<PrefixGroup> groups;  // in run order; every item in exactly one
  int64_t prompt_tokens = 0;        // sum of the prompts' lengths
  int64_t saved_tokens = 0;         // sum over groups of (members - 1) * prefix_tokens
};

BatchPlan PlanBatch(std::span<const BatchItem> items, const BatchPlanOptions& options = {});

}  // namespace cachette::sched
